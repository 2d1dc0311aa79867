"""Every input is checked before any compute (issue 17, findings 3, 4 and 11): methods against the model, the
output folder, the step count, the model folder, a ``--config`` file; each bad one ends in one line that names it,
with nothing computed first."""

from __future__ import annotations

import json

import pytest
from conftest import FAST

from accel.cli import main


def _other_model_schedule(path):
    from accel.caching import fora
    from accel.caching.schedule import ScheduleLayout

    layout = ScheduleLayout(model_class="FluxTransformer2DModel", num_blocks=3, components=("attn", "ff"))
    fora(layout, 4, 2).save(path)
    return path


def _bad_schedule_json(model_dir, tmp_path):
    from accel.caching import fora, layout_of
    from accel.pipelines.loading import load_pipeline

    path = tmp_path / "typed.json"
    fora(layout_of(load_pipeline(str(model_dir))), 4, 2).save(path)
    data = json.loads(path.read_text())
    data["num_blocks"] = str(data["num_blocks"])
    path.write_text(json.dumps(data))
    return path


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


@pytest.mark.parametrize(
    ("bad", "expected"),
    [
        ("tgate-99", "method 'tgate-99': gate_step must be in 1..4"),
        ("{tmp}/missing.json", "method file not found"),
        ("{tmp}@2", "no front.json in"),
        ("{other}", "Schedule does not fit this model: it was made for FluxTransformer2DModel"),
        ("{typed}", "bad accel.caching.Schedule"),
        ("steps-1", "PixArtAlphaPipeline cannot run 1 step"),
    ],
    ids=["out-of-range", "missing-file", "front-without-front-json", "other-model", "string-num-blocks", "one-step"],
)
def test_a_bad_method_fails_before_any_compute(model_dir, tmp_path, capsys, one_thread, bad, expected):
    other = _other_model_schedule(tmp_path / "other.json")
    typed = _bad_schedule_json(model_dir, tmp_path)
    bad = bad.format(tmp=tmp_path, other=other, typed=typed)
    out = tmp_path / "report"
    argv = ["eval", "--model", str(model_dir), "--methods", f"full,fora-2,{bad}", "--out", str(out), *FAST]
    assert main(argv) == 1
    line = _error_line(capsys)
    assert line.startswith(f"accel eval: error: method '{bad}'") and expected in line
    assert not (out / "trials").exists() and not (out / "images").exists()  # full and fora-2 never ran


@pytest.mark.parametrize("command", ["eval", "generate", "search"])
def test_an_output_path_that_is_a_file_fails_before_any_compute(model_dir, tmp_path, capsys, one_thread, command):
    taken = tmp_path / "taken"
    taken.write_text("not a folder")
    argv = {
        "eval": ["eval", *FAST, "--methods", "full"],
        "generate": ["generate", "--prompt", "a red apple", "--steps", "4"],
        "search": ["search", "--steps", "4", "--generations", "1", "--population", "4"],
    }[command]
    assert main([*argv, "--model", str(model_dir), "--out", str(taken)]) == 1
    assert _error_line(capsys) == f"accel {command}: error: --out {taken} is a file; give a folder (created if missing)"
    assert taken.read_text() == "not a folder"


def test_one_step_on_pixart_is_refused_up_front(model_dir, tmp_path, capsys, one_thread):
    out = tmp_path / "report"
    assert main(["eval", "--model", str(model_dir), *FAST, "--steps", "1", "--methods", "full", "--out", str(out)]) == 1
    assert "--steps: PixArtAlphaPipeline cannot run 1 step" in _error_line(capsys)
    assert not (out / "trials").exists()


def test_model_folders_that_cannot_be_loaded(tmp_path, capsys):
    from accel.pipelines.video import DEFAULT_VIDEO_MODEL_DIR

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "model_index.json").write_text("{}")
    partial = tmp_path / "partial"
    partial.mkdir()
    index = {"_class_name": "WanPipeline", "vae": ["diffusers", "AutoencoderKLWan"]}
    (partial / "model_index.json").write_text(json.dumps(index))
    for model, expected in [
        ("./no/such/dir", "--model ./no/such/dir: no such folder"),
        (str(empty), "names no pipeline class (_class_name)"),
        (str(partial), "names ['vae'], which have no folder"),
        (str(DEFAULT_VIDEO_MODEL_DIR), "is the bundled video model, which borrows the image model's text encoder"),
    ]:
        assert main(["eval", "--model", model, *FAST, "--methods", "full", "--out", str(tmp_path / "o")]) == 1
        line = _error_line(capsys)
        assert expected in line and "hub" not in line.split("(")[0]


@pytest.mark.parametrize(
    ("device", "expected"), [("cuda:7", "is not available"), ("tpu", "unknown device 'tpu'")], ids=["absent", "unknown"]
)
def test_devices_are_checked_before_loading(tmp_path, capsys, device, expected):
    assert main(["eval", "--device", device, *FAST, "--methods", "full", "--out", str(tmp_path / "o")]) == 1
    assert expected in _error_line(capsys)
    assert not (tmp_path / "o").exists()


def test_a_bad_config_file_names_its_path(tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text('{"steps": 4,')
    assert main(["eval", "--config", str(config), "--out", str(tmp_path / "o")]) == 1
    assert f"--config {config} is not valid JSON" in _error_line(capsys)


def test_a_unet_pipeline_is_refused_before_any_compute(tmp_path):
    from eval_helpers import build_tiny_unet_pipeline, small_config

    from accel.eval.harness import run_evaluation

    with pytest.raises(ValueError, match="method 'fora-2': caching needs a transformer pipeline; .* unet"):
        run_evaluation(small_config(), tmp_path, pipe=build_tiny_unet_pipeline())
    assert not (tmp_path / "trials").exists()
