"""``python -m accel.bench model --video`` and ``python -m accel.bench model`` (the image model): arguments
checked before anything loads, and the image model's JSON line keeps its keys beside the video one."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from accel.bench.__main__ import main as bench_main
from accel.bench.model import DATA_FILE
from accel.pipelines.default import DEFAULT_MODEL_DIR

IMAGE_JSON_KEYS = {
    "fid_trained",
    "fid_untrained",
    "kid_trained",
    "kid_untrained",
    "scorer_top1",
    "scorer_top5",
    "score_matched",
    "score_shuffled",
    "seconds_per_step",
    "samples",
    "runtime",
}


@pytest.fixture
def no_loading(monkeypatch):
    """Both benchmarks' pipeline loaders, replaced by one that records its calls and stops the run."""
    calls = []

    def load(*args, **kwargs):
        calls.append(kwargs)
        raise ValueError("stopped at loading")

    monkeypatch.setattr("accel.bench.video_model.load_default_video_pipeline", load)
    monkeypatch.setattr("accel.bench.model.load_default_pipeline", load)
    return calls


def _one_line_error(capsys) -> str:
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1, error
    return error


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json", "is not valid JSON"),
        ('"red apple"', "must be a non-empty JSON list of object names"),
        ("[]", "must be a non-empty JSON list of object names"),
        ('["red apple", 3]', "must be a non-empty JSON list of object names"),
    ],
)
def test_video_bench_refuses_an_objects_file_that_is_not_a_list_of_names(
    tmp_path, content, message, no_loading, capsys
):
    path = tmp_path / "objects.json"
    path.write_text(content)
    assert bench_main(["model", "--video", "--objects", str(path)]) == 1
    assert message in _one_line_error(capsys) and no_loading == []


def test_video_bench_refuses_a_bad_objects_list_in_the_models_training_json(tmp_path, no_loading, capsys):
    (tmp_path / "training.json").write_text(json.dumps({"objects": "red apple"}))
    assert bench_main(["model", "--video", "--model", str(tmp_path)]) == 1
    assert "training.json's 'objects' must be a non-empty JSON list" in _one_line_error(capsys)
    assert no_loading == []


@pytest.mark.parametrize(("flag", "kind"), [("--model", "folder"), ("--motion-weights", "file"), ("--objects", "file")])
def test_video_bench_paths_must_be_the_right_kind(tmp_path, flag, kind, no_loading, capsys):
    wrong = tmp_path  # a folder where a file is wanted
    if kind == "folder":
        wrong = tmp_path / "a-file.json"
        wrong.write_text("[]")
    assert bench_main(["model", "--video", flag, str(wrong)]) == 1
    assert f"{flag} {wrong} is not a {kind}" in _one_line_error(capsys) and no_loading == []


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--samples", "1"], "--samples must be >= 2"),
        (["--steps", "0"], "--steps must be >= 1"),
        (["--batch", "0"], "--batch must be >= 1"),
        (["--data", "/no/such.npz"], "--data /no/such.npz is not a file"),
        (["--model", "/no/such/folder"], "--model /no/such/folder is not a folder"),
    ],
)
def test_image_bench_checks_its_arguments_before_loading(flags, message, no_loading, capsys):
    assert bench_main(["model", *flags]) == 1
    assert message in _one_line_error(capsys) and no_loading == []


@pytest.mark.skipif(
    not DATA_FILE.is_file() or not (DEFAULT_MODEL_DIR / "transformer").is_dir(), reason="data or model missing"
)
def test_image_bench_keeps_its_json_line(monkeypatch, tmp_path, capsys):
    """The image model's whole run with generation stubbed: the real images of the prompts stand in for the
    trained model's, noise for the untrained one's; a small data file keeps the FID features quick."""
    import accel.bench.model as model

    data = np.load(DATA_FILE, allow_pickle=False)
    keep = np.r_[np.flatnonzero(data["split"] == "train")[:12], np.flatnonzero(data["split"] == "test")[:4]]
    small = tmp_path / "emoji16.npz"
    np.savez(small, images=data["images"][keep], captions=data["captions"][keep], split=data["split"][keep])
    real = {
        str(c): torch.from_numpy(i).permute(2, 0, 1).float() / 255 for c, i in zip(data["captions"], data["images"])
    }

    def generate(pipe, prompts, steps, batch, seed=0):
        if pipe.transformer is generate.trained:
            return torch.stack([real[p] for p in prompts])
        return torch.rand(len(prompts), 3, 64, 64)

    original = model.load_default_pipeline

    def load(*args, **kwargs):
        pipe = original(*args, **kwargs)
        generate.trained = pipe.transformer
        return pipe

    monkeypatch.setattr(model, "load_default_pipeline", load)
    monkeypatch.setattr(model, "generate", generate)
    assert bench_main(["model", "--samples", "8", "--steps", "2", "--data", str(small)]) == 0
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    assert set(result) == IMAGE_JSON_KEYS and result["samples"] == 8
    assert result["fid_trained"] < 0.5 * result["fid_untrained"]  # the data set's own images against noise
    assert result["kid_trained"] < result["kid_untrained"] and result["seconds_per_step"] >= 0
    assert "FID-EffNetLite0" in out and "alignment scorer, held-out retrieval" in out


@pytest.mark.skipif(not DATA_FILE.is_file(), reason=f"dataset not found: {DATA_FILE}")
@pytest.mark.parametrize("kind", ["junk", "no metadata"])
def test_video_bench_refuses_motion_weights_that_are_not_a_motion_classifier(tmp_path, kind, no_loading, capsys):
    from safetensors.torch import save_file

    path = tmp_path / "weights.safetensors"
    if kind == "junk":
        path.write_bytes(b"not safetensors")
    else:
        save_file({"weight": torch.zeros(2)}, str(path))
    assert bench_main(["model", "--video", "--motion-weights", str(path), "--samples", "2", "--real-clips", "2"]) == 1
    error = _one_line_error(capsys)
    expected = "is not a safetensors file" if kind == "junk" else "is not a motion classifier written by"
    assert expected in error and no_loading == []
