"""Resume keys (issue 17, finding 2): a trial's key is a content hash of what determines it, the same at any
thread count, and a rerun that cannot reuse a trial says why."""

from __future__ import annotations

import logging

import torch
from conftest import build_tiny_pixart_pipeline
from eval_helpers import small_config

from accel.eval.generation import weights_checksum
from accel.eval.harness import build_context, run_evaluation, trial_key
from accel.eval.methods import parse_method


def test_trial_keys_of_the_bundled_model_do_not_depend_on_the_thread_count(tmp_path):
    """A float sum of the bundled model's weights differed between 1 and 2 threads, so every trial of a run
    resumed with another ``--threads`` was computed again."""
    threads = torch.get_num_threads()
    keys = []
    try:
        for count in (1, 2):
            config = small_config(prompts=("a red apple",), threads=count)
            context = build_context(config, tmp_path)
            keys.append([trial_key(context, parse_method(name)) for name in ("full", "fora-2")])
            del context
    finally:
        torch.set_num_threads(threads)
    assert keys[0] == keys[1]


def test_the_weights_hash_sees_every_weight_exactly():
    pipe = build_tiny_pixart_pipeline()
    before = weights_checksum(pipe)
    assert weights_checksum(build_tiny_pixart_pipeline()) == before  # same weights, same hash
    weight = pipe.transformer.transformer_blocks[0].attn1.to_q.weight
    original = weight[0, 0].item()
    weight.data[0, 0] = torch.nextafter(weight[0, 0], torch.tensor(float("inf")))  # one ulp
    assert weights_checksum(pipe) != before
    weight.data[0, 0] = original
    assert weights_checksum(pipe) == before


def test_a_rerun_that_cannot_reuse_a_trial_says_why(tmp_path, caplog, one_thread):
    config = small_config(methods=("full",), prompts=("a red apple",), batch_size=1)
    pipe = build_tiny_pixart_pipeline()
    first = run_evaluation(config, tmp_path, pipe=pipe)
    with torch.no_grad():
        pipe.transformer.proj_out.weight.mul_(1.01)  # retrained in place: same folder, other weights
    with caplog.at_level(logging.WARNING, logger="accel.eval.harness"):
        second = run_evaluation(config, tmp_path, pipe=pipe)
    assert first["trials"][0]["key"] != second["trials"][0]["key"]
    assert "full: not reusing" in caplog.text and "model weights differ; computing it again" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="accel.eval.harness"):
        third = run_evaluation(config, tmp_path, pipe=pipe)  # unchanged: reused, without a warning
    assert third["trials"][0]["key"] == second["trials"][0]["key"] and "not reusing" not in caplog.text
