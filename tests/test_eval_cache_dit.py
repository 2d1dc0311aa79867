"""cache-dit's DBCache as a harness method (accel.eval.cache_dit_peer): parsing, what it skips, its error bound
on a tiny PixArt pipeline, exact removal, and the clear errors when cache-dit is missing."""

from __future__ import annotations

import logging
import sys

import pytest
import torch
from eval_helpers import self_attention_calls

from accel.eval.generation import call_kwargs, generate
from accel.eval.method_checks import check_method
from accel.eval.methods import UnsupportedMethod, apply_method, parse_method
from accel.eval.metrics import psnr

STEPS = 12  # cache-dit always computes its first 8 warm-up steps: 4 steps left to reuse


def _generate(pipe, steps: int = STEPS) -> torch.Tensor:
    return generate(pipe, ["a red apple", "a blue car"], [0, 1], steps, 4.5, call_kwargs(pipe))


@pytest.mark.parametrize(
    "name, params",
    [
        ("cache-dit-0.12", {"threshold": 0.12, "first": 1, "last": 0, "taylorseer": False}),
        ("cache-dit-F2B1-0.2", {"threshold": 0.2, "first": 2, "last": 1, "taylorseer": False}),
        ("cache-dit-.5-taylorseer", {"threshold": 0.5, "first": 1, "last": 0, "taylorseer": True}),
    ],
)
def test_cache_dit_names_parse(name, params):
    method = parse_method(name)
    assert method.kind == "cache-dit" and method.params == params


def test_cache_dit_name_with_no_first_block_is_refused():
    with pytest.raises(ValueError, match="must be >= 1"):
        parse_method("cache-dit-F0B0-0.1")


def test_cache_dit_skips_blocks_within_its_error_bound_and_comes_off_exactly(tiny_pixart_pipeline, one_thread):
    pytest.importorskip("cache_dit")
    pipe = tiny_pixart_pipeline
    full = _generate(pipe)
    full_calls = self_attention_calls(pipe, lambda: _generate(pipe))
    with apply_method(parse_method("cache-dit-1.0"), pipe, STEPS) as applied:  # every step after warm-up reuses
        cached = _generate(pipe)
        calls = self_attention_calls(pipe, lambda: _generate(pipe))
        again = _generate(pipe)
        stats = applied.stats()
    assert applied.config["type"] == "cache_dit.DBCacheConfig"
    assert applied.config["Fn_compute_blocks"] == 1 and applied.config["residual_diff_threshold"] == 1.0
    assert stats["cached_steps"] == [8, 9, 10, 11] and stats["cached_fraction"] == pytest.approx(4 / STEPS, abs=1e-4)
    blocks = len(pipe.transformer.transformer_blocks)
    assert calls == full_calls - 4 * (blocks - 1)  # each reused step computes the first block only
    assert torch.equal(again, cached)  # one generation leaves nothing to the next
    assert float(psnr(cached, full, 1.0).min()) >= 40.0  # 4 of 12 steps reused, late in the trajectory (measured 64)
    assert torch.equal(_generate(pipe), full)  # disable_cache took every wrapper off


def test_cache_dit_says_when_it_reused_nothing(tiny_pixart_pipeline, one_thread, caplog):
    pytest.importorskip("cache_dit")
    pipe = tiny_pixart_pipeline
    with apply_method(parse_method("cache-dit-0"), pipe, STEPS) as applied:
        _generate(pipe)
        with caplog.at_level(logging.WARNING, logger="accel.eval.cache_dit_peer"):
            stats = applied.stats()
    assert stats["cached_steps"] == []
    assert "reused no step" in caplog.text


def test_missing_cache_dit_fails_before_compute_naming_the_extra(tiny_pixart_pipeline, monkeypatch):
    monkeypatch.setitem(sys.modules, "cache_dit", None)  # import cache_dit raises ImportError
    method = parse_method("cache-dit-0.1")
    with pytest.raises(ValueError, match=r"diffusers-accel\[peers\]"):
        check_method(method, tiny_pixart_pipeline, STEPS)
    with pytest.raises(UnsupportedMethod, match=r"diffusers-accel\[peers\]"):
        with apply_method(method, tiny_pixart_pipeline, STEPS):
            pass
