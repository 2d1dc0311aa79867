"""Interruptions and damaged files (issue 17, finding 11): Ctrl-C ends in one line saying what was kept and the
command that resumes; a damaged trial record or image is named, and computed again."""

from __future__ import annotations

import logging
import sys

import pytest
from conftest import FAST, build_tiny_pixart_pipeline
from eval_helpers import small_config

from accel.cli import main
from accel.eval.generation import load_pngs


def _interrupt_after(monkeypatch, module, name: str, calls: int) -> None:
    """Make ``module.name`` raise KeyboardInterrupt (as Ctrl-C would) on its call number ``calls + 1``."""
    original, count = getattr(module, name), [0]

    def interrupted(*args, **kwargs):
        count[0] += 1
        if count[0] > calls:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, interrupted)


def test_ctrl_c_in_eval_says_what_was_kept_and_how_to_resume(model_dir, tmp_path, capsys, monkeypatch, one_thread):
    import accel.eval.harness as harness

    out, prompts = tmp_path / "report", tmp_path / "prompts.txt"
    prompts.write_text("a red apple\na blue car\n")
    argv = ["eval", "--model", str(model_dir), "--methods", "full,fora-2", "--prompts", str(prompts)]
    argv += ["--out", str(out), *FAST]
    monkeypatch.setattr(sys, "argv", ["accel", *argv])
    _interrupt_after(monkeypatch, harness, "measure_cost", 1)  # full finishes; fora-2 is cut after its images
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"interrupted: 1 finished trial and 4 samples are kept in {out}; to resume, run: ")
    assert line.endswith(" ".join(["accel", *argv]))
    monkeypatch.undo()
    monkeypatch.setattr(sys, "argv", ["accel", *argv])
    assert main(argv) == 0  # the same command resumes and finishes
    assert len(list((out / "trials").glob("*.json"))) == 2


def test_ctrl_c_in_search_points_at_the_checkpoint(model_dir, tmp_path, capsys, monkeypatch, one_thread):
    from accel.caching.search.evaluator import Evaluator

    out = tmp_path / "search"
    argv = ["search", "--model", str(model_dir), "--steps", "4", "--population", "4", "--generations", "2"]
    argv += ["--max-sequence-length", "16", "--threads", "1", "--out", str(out), "--restart"]
    monkeypatch.setattr(sys, "argv", ["accel", *argv])
    _interrupt_after(monkeypatch, Evaluator, "measure", 3)
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"interrupted: the checkpoint in {out} keeps 3 evaluations (0 generations done)")
    assert line.endswith(" ".join(["accel", *argv[:-1]]))  # without --restart, which would discard them


def test_a_damaged_trial_record_or_image_is_named_and_computed_again(tmp_path, caplog, one_thread):
    from accel.eval.harness import run_evaluation

    config = small_config(methods=("full", "fora-2"), prompts=("a red apple", "a blue car"))
    pipe = build_tiny_pixart_pipeline()
    first = run_evaluation(config, tmp_path, pipe=pipe)
    trial = next((tmp_path / "trials").glob("fora-2-*.json"))
    trial.write_text('{"status": "ok", "metr')  # cut short
    image = next((tmp_path / "images").glob("fora-2-*")) / "00001.png"
    image.write_bytes(image.read_bytes()[:100])
    with caplog.at_level(logging.WARNING):
        second = run_evaluation(config, tmp_path, pipe=pipe)
    assert f"{trial} cannot be read" in caplog.text and f"{image} cannot be read" in caplog.text
    assert first["trials"][1]["metrics"] == second["trials"][1]["metrics"]  # the same images, made again
    assert load_pngs([image]).shape[0] == 1


def test_an_unreadable_image_is_named_with_what_to_do(tmp_path):
    broken = tmp_path / "00000.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(ValueError, match=f"{broken} cannot be read as an image .*delete it and run again"):
        load_pngs([broken])
