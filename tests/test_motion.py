"""The motion classifier (accel.eval.motion) and the video model benchmark (python -m accel.bench model --video)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from accel.bench.__main__ import main as bench_main
from accel.eval.motion import (
    DEFAULT_WEIGHTS,
    MotionClassifierConfig,
    MotionScorer,
    load_motion_scorer,
    motion_accuracy,
    motion_of_prompt,
    save_motion_scorer,
)

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))

import render_clips  # noqa: E402

needs_data = pytest.mark.skipif(not render_clips.EMOJI.is_file(), reason=f"dataset not found: {render_clips.EMOJI}")
JSON_KEYS = {
    "tokens_per_clip",
    "fid_rendered",
    "fid_autoencoded",
    "kid_rendered",
    "kid_autoencoded",
    "kid_rendered_std",
    "kid_autoencoded_std",
    "fid_trained",
    "fid_untrained",
    "kid_trained",
    "kid_untrained",
    "kid_trained_std",
    "kid_untrained_std",
    "motion_accuracy",
    "motion_accuracy_untrained",
    "motion_accuracy_real",
    "motion_chance",
    "score_matched",
    "score_shuffled",
    "seconds_per_step",
    "targets",
    "samples",
    "steps",
    "real_clips",
    "held_out_pairs",
    "frames_per_clip",
    "runtime",
}
TARGETS = {"fid_trained_below_half_untrained", "motion_accuracy_at_least_twice_chance", "tokens_per_clip_at_least_512"}


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here on one thread (see conftest.one_thread)."""


@pytest.fixture(scope="module")
def scorer():
    return load_motion_scorer()


def _rendered(part: str, clips_per_object: int, count: int) -> tuple[torch.Tensor, list[str]]:
    """``count`` rendered clips ``(count, 17, 3, 64, 64)`` of split ``part``, every motion present, and captions."""
    images, names, split = render_clips.load_emoji()
    specs = render_clips.clip_specs(split, part, clips_per_object, seed=7)
    picks = [specs[k] for k in np.random.default_rng(0).permutation(len(specs))[:count]]
    clips = np.stack([render_clips.render_clip(images[s.index], s.motion, s.seed) for s in picks])
    return torch.from_numpy(clips).permute(0, 1, 4, 2, 3).float() / 255, [
        render_clips.caption(names[s.index], s.motion) for s in picks
    ]


def _tiny_scorer() -> MotionScorer:
    config = MotionClassifierConfig(
        motion_names=("left", "right", "still"),
        motion_phrases=("going left", "going right", "standing still"),
        frames=5,
        size=16,
        widths=(4, 4, 8, 8),
    )
    return MotionScorer(config).eval()


# -- the classifier ------------------------------------------------------------------------------------------


@needs_data
def test_shipped_classifier_reads_held_out_rendered_clips(scorer):
    heldout, heldout_captions = _rendered("heldout", 1, 24)
    test, test_captions = _rendered("test", 13, 24)
    result = motion_accuracy(scorer, torch.cat([heldout, test]), heldout_captions + test_captions)
    assert result["scored"] == result["total"] == 48 and result["chance"] == pytest.approx(1 / 13)
    assert result["accuracy"] >= 0.75  # chance is 0.077; the stored held-out accuracy is higher still
    assert scorer.metrics["accuracy_heldout_and_test"] >= 0.9


def test_shipped_weights_carry_the_motions_and_stay_small(scorer):
    assert DEFAULT_WEIGHTS.stat().st_size < 1_000_000
    assert scorer.motions == {motion.name: motion.phrase for motion in render_clips.MOTIONS}
    assert scorer.metrics["clips_heldout"] > 0 and scorer.metrics["clips_test"] > 0
    assert not scorer.training and not any(p.requires_grad for p in scorer.parameters())


def test_motion_of_prompt_takes_the_longest_whole_phrase():
    assert motion_of_prompt("red apple sliding to the right") == "slide_right"
    assert motion_of_prompt("Cat Face ROTATING COUNTERCLOCKWISE") == "rotate_counterclockwise"
    assert motion_of_prompt("ghost rotating clockwise") == "rotate_clockwise"
    assert motion_of_prompt("snowman falling down") == "fall"
    assert motion_of_prompt("rocket orbiting in a circle") == "orbit"
    assert motion_of_prompt("red apple") is None
    assert motion_of_prompt("red apple sliding to the rightmost corner") is None  # whole words only
    custom = {"slide": "sliding", "slide_up": "sliding up"}
    assert motion_of_prompt("a dog sliding up", custom) == "slide_up"
    assert motion_of_prompt("a dog sliding down", custom) == "slide"
    with pytest.raises(TypeError, match="str"):
        motion_of_prompt(["red apple bouncing"])


def test_bad_clips_are_refused_with_a_hint():
    model = _tiny_scorer()
    with pytest.raises(ValueError, match=r"\(N, 5, 3, H, W\).*permute\(0, 1, 4, 2, 3\)"):
        model.predict(torch.rand(2, 5, 16, 16, 3))  # a pipeline's channels-last frames
    with pytest.raises(ValueError, match=r"got \(2, 4, 3, 16, 16\)"):
        model.predict(torch.rand(2, 4, 3, 16, 16))  # wrong frame count
    with pytest.raises(ValueError, match="expected clips of shape"):
        model.predict(torch.rand(5, 3, 16, 16))
    with pytest.raises(TypeError, match="torch.Tensor"):
        model.predict(np.zeros((2, 5, 3, 16, 16), np.float32))
    with pytest.raises(TypeError, match="float or uint8"):
        model.predict(torch.zeros(2, 5, 3, 16, 16, dtype=torch.int32))
    with pytest.raises(ValueError, match="2 clips but 1 prompts"):
        motion_accuracy(model, torch.rand(2, 5, 3, 16, 16), ["going left"])


def test_accuracy_counts_only_prompts_that_name_a_motion():
    model = _tiny_scorer()
    clips = torch.rand(3, 5, 3, 24, 20)  # any frame size
    logits = model.predict(clips)
    assert logits.shape == (3, 3) and torch.isfinite(logits).all()
    predicted = [model.motion_names[k] for k in logits.argmax(1)]
    prompts = [f"cat {model.motions[predicted[0]]}", "a cat", f"dog {model.motions[predicted[2]]}"]
    assert motion_accuracy(model, clips, prompts) == {"accuracy": 1.0, "chance": 1 / 3, "scored": 2, "total": 3}
    none = motion_accuracy(model, clips, ["a cat"] * 3)
    assert none["accuracy"] is None and none["scored"] == 0
    uint8 = (clips * 255).round().to(torch.uint8)
    torch.testing.assert_close(model.predict(uint8), model.predict(uint8.float() / 255))


def test_save_and_load_give_the_same_predictions(tmp_path):
    model = _tiny_scorer()
    for module in model.modules():  # non-trivial BatchNorm statistics
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 2.0)
    save_motion_scorer(model, tmp_path / "m.safetensors", {"accuracy": 0.5})
    loaded = load_motion_scorer(tmp_path / "m.safetensors")
    clips = torch.rand(2, 5, 3, 16, 16)
    assert torch.equal(loaded.predict(clips), model.predict(clips))
    assert loaded.config == model.config and loaded.metrics == {"accuracy": 0.5}
    with pytest.raises(FileNotFoundError, match="train_motion_classifier"):
        load_motion_scorer(tmp_path / "missing.safetensors")
    text = model.config.to_json()
    assert MotionClassifierConfig.from_json(text) == model.config
    with pytest.raises(ValueError, match="version"):
        MotionClassifierConfig.from_json(text.replace('"version": 1', '"version": 2'))
    with pytest.raises(ValueError, match="one phrase per motion"):
        MotionClassifierConfig(motion_names=("a", "b"), motion_phrases=("x",))


# -- the benchmark -------------------------------------------------------------------------------------------


@pytest.fixture
def no_model(monkeypatch):
    """The video pipeline loader, replaced by one that records its calls and stops the run."""
    calls = []

    def load(*args, **kwargs):
        calls.append(kwargs)
        raise ValueError("stopped at loading")

    monkeypatch.setattr("accel.bench.video_model.load_default_video_pipeline", load)
    return calls


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--samples", "1"], "--samples must be an int >= 2"),
        (["--steps", "0"], "--steps must be an int >= 1"),
        (["--real-clips", "1"], "--real-clips must be an int >= 2"),
        (["--frames-per-clip", "18"], "--frames-per-clip must be at most 17"),
        (["--model", "/no/such/folder"], "--model /no/such/folder does not exist"),
        (["--motion-weights", "/no/such.safetensors"], "--motion-weights /no/such.safetensors does not exist"),
        (["--objects", "/no/such.json"], "--objects /no/such.json does not exist"),
        (["--device", "gpu"], "unknown device 'gpu'"),
    ],
)
def test_video_bench_checks_its_arguments_before_loading(flags, message, no_model, capsys):
    assert bench_main(["model", "--video", *flags]) == 1
    error = capsys.readouterr().err.strip()
    assert message in error and len(error.splitlines()) == 1
    assert no_model == []


@needs_data
def test_video_bench_scores_a_subset_model_on_its_objects_held_out_pairs_going_round_them(tmp_path):
    from accel.bench.video_model import VideoBenchConfig, held_out_data, trained_objects

    objects = ["red apple", "ghost", "rocket"]
    (tmp_path / "training.json").write_text(json.dumps({"dit_steps": 1, "objects": objects}))
    assert trained_objects(str(tmp_path)) == objects
    (tmp_path / "training.json").write_text(json.dumps({"dit_steps": 1}))
    assert trained_objects(str(tmp_path)) is None
    (tmp_path / "chosen.json").write_text(json.dumps(objects[:1]))
    assert trained_objects(str(tmp_path), str(tmp_path / "chosen.json")) == objects[:1]
    _, names, split = render_clips.load_emoji()
    held = {render_clips.caption(names[i], m) for i, m in render_clips.split_pairs(split)["heldout"]}
    wanted = {c for c in held if any(c.startswith(name + " ") for name in objects)}
    assert len(wanted) == 3
    config = VideoBenchConfig(samples=7, real_clips=6, frames_per_clip=1)
    data = held_out_data(config, render_clips, objects)
    assert data.pairs == 3 and len(data.prompts) == 7 and len(data.other_clips) == 7
    assert sorted(data.prompts.count(c) for c in wanted) == [2, 2, 3]  # round the pairs again, evenly
    assert sorted(data.real_captions) == sorted(2 * list(wanted))
    by_caption = {}
    for clip, caption in zip(data.real_clips, data.real_captions):
        by_caption.setdefault(caption, []).append(clip)
    assert all(not torch.equal(*clips) for clips in by_caption.values())  # a pair's clips differ in seed
    full = held_out_data(config, render_clips)
    assert data.pairs < full.pairs and len(set(full.prompts)) == 7 and set(full.prompts) <= held


def test_the_shuffled_prompt_is_never_the_clips_own_even_when_prompts_repeat():
    from accel.bench.video_model import other_prompts

    for prompts in (["a", "b", "c", "d"], ["a", "b", "a", "b"], ["a", "b", "c"] * 3 + ["a"]):
        shuffled = other_prompts(prompts)
        assert all(mine != other for mine, other in zip(prompts, shuffled))
        assert sorted(set(shuffled)) == sorted(set(prompts))
    assert other_prompts(["a", "b", "c", "d"]) == ["c", "d", "a", "b"]  # distinct prompts: shifted by half
    with pytest.raises(ValueError, match="2 distinct"):
        other_prompts(["a", "a"])


@needs_data
def test_video_bench_refuses_objects_with_a_single_held_out_pair_before_loading(tmp_path, no_model, capsys):
    (tmp_path / "one.json").write_text(json.dumps(["red apple"]))
    assert bench_main(["model", "--video", "--objects", str(tmp_path / "one.json")]) == 1
    assert "needs at least 2" in capsys.readouterr().err
    assert no_model == []


def test_video_bench_help_lists_its_flags(capsys):
    with pytest.raises(SystemExit):
        bench_main(["model", "--video", "--help"])
    usage = capsys.readouterr().out
    assert all(flag in usage for flag in ("--samples", "--real-clips", "--frames-per-clip", "--device"))
    with pytest.raises(SystemExit):
        bench_main(["model", "--help"])
    assert "--video" in capsys.readouterr().out


def test_frame_features_end_in_the_fid_features():
    from accel.bench.video_model import frame_features, frame_subset
    from accel.eval.alignment import load_alignment_scorer
    from accel.eval.efficientnet_lite import FEATURE_DIM
    from accel.eval.fid import EfficientNetLite0Features

    clips = torch.rand(1, 17, 3, 32, 32)
    frames = frame_subset(clips, 2)
    assert torch.equal(frames, clips[0, [0, 16]])
    features = frame_features(load_alignment_scorer(), clips, 2)
    torch.testing.assert_close(features[:, -FEATURE_DIM:].float(), EfficientNetLite0Features()(frames))


@needs_data
def test_video_bench_json_on_a_tiny_run(monkeypatch, capsys):
    """The whole run with generation stubbed out (rendered clips stand in for the trained model's)."""
    import accel.bench.video_model as video_model

    def generate(pipe, prompts, steps, batch, seed=0):
        if pipe.transformer is generate.trained:
            return _rendered("heldout", 1, len(prompts))[0]
        return torch.rand(len(prompts), 17, 3, 64, 64)

    original = video_model.load_default_video_pipeline

    def load(*args, **kwargs):
        pipe = original(*args, **kwargs)
        generate.trained = pipe.transformer
        return pipe

    monkeypatch.setattr(video_model, "load_default_video_pipeline", load)
    monkeypatch.setattr(video_model, "generate_clips", generate)
    monkeypatch.setattr(video_model, "seconds_per_step", lambda pipe, steps: 0.25)
    flags = ["--samples", "3", "--steps", "2", "--real-clips", "3", "--frames-per-clip", "1"]
    assert bench_main(["model", "--video", *flags]) == 0
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    assert set(result) == JSON_KEYS and set(result["targets"]) == TARGETS
    assert result["tokens_per_clip"] == 576 and result["targets"]["tokens_per_clip_at_least_512"] is True
    assert result["seconds_per_step"] == 0.25 and result["motion_chance"] == pytest.approx(1 / 13, abs=1e-3)
    assert result["fid_trained"] < result["fid_untrained"]  # rendered clips against noise
    # the reference rows: other rendered clips, and the same through the autoencoder
    assert result["fid_rendered"] < result["fid_untrained"] and result["fid_autoencoded"] < result["fid_untrained"]
    assert "autoencoded" in out
    assert "FID-EffNetLite0" in out and "motion accuracy" in out


@pytest.mark.slow
def test_video_bench_runs_end_to_end(capsys):
    flags = ["--samples", "2", "--steps", "2", "--batch", "2", "--real-clips", "2", "--frames-per-clip", "2"]
    assert bench_main(["model", "--video", *flags]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(result) == JSON_KEYS and result["tokens_per_clip"] == 576
    assert all(np.isfinite(result[key]) for key in ("fid_trained", "fid_untrained", "seconds_per_step"))


@needs_data
def test_autoencoded_clips_keep_the_layout_and_come_back_close_to_the_input():
    from accel.bench.video_model import autoencoded
    from accel.eval.metrics import psnr
    from accel.pipelines.video import load_default_video_pipeline

    clips = _rendered("heldout", 1, 3)[0]  # (3, 17, 3, 64, 64) in [0, 1]
    out = autoencoded(load_default_video_pipeline().vae, clips, batch=2)
    assert out.shape == clips.shape and 0 <= out.min() and out.max() <= 1
    assert psnr(out, clips).min() > 18  # per clip; the shipped VAE: about 22 dB on held-out clips; noise would be ~5 dB
