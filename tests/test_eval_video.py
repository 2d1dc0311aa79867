"""Video in ``accel eval`` and ``accel generate``: a tiny Wan pipeline's clips stored as PNG filmstrips, scored per
clip, shown as animations; bad metric choices refused before any compute."""

import json
import re
import sys
import types

import pytest
import torch
from conftest import build_tiny_pixart_pipeline
from eval_helpers import TINY_VIDEO_KWARGS, VIDEO_PROMPTS, build_tiny_wan_pipeline, small_config

import accel.eval.harness as harness
from accel.cli import main
from accel.eval.generation import (
    FRAMES_KEY,
    call_kwargs,
    generate,
    load_samples,
    pipeline_defaults,
    png_frames,
    save_sample,
    to_uint8,
)
from accel.eval.harness import run_evaluation
from accel.eval.html import animation_file
from accel.eval.metrics import MetricInputs, MetricSuite, metric_keys
from accel.pipelines.video import DEFAULT_VIDEO_MODEL_DIR

METHODS = ("full", "fora-2")
METRICS = ("psnr", "ssim", "motion")  # FID and the prompt score on frames: tests of their own (model loads are slow)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here on one thread (see conftest.one_thread)."""


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_wan_pipeline()


def video_config(**overrides):
    """2 prompts, 3 steps, clips of 5 frames of 16 x 16."""
    values = dict(prompts=VIDEO_PROMPTS, steps=3, methods=METHODS, metrics=METRICS, pipeline_kwargs=TINY_VIDEO_KWARGS)
    return small_config(**{**values, **overrides})


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, pipe):
    out = tmp_path_factory.mktemp("video-eval")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "accel.eval.motion", None)  # as if not installed: the metric says so
        results = run_evaluation(video_config(), out, pipe=pipe)
    torch.set_num_threads(threads)
    return out, results


def test_results_hold_clip_metrics_frames_and_per_clip_cost(evaluated):
    out, results = evaluated
    assert json.loads((out / "results.json").read_text()) == results
    run = results["run"]
    assert run["media"] == "video" and run["frames"] == 5 and run["metrics"] == list(METRICS)
    trials = {t["method"]: t for t in results["trials"]}
    assert set(trials) == set(METHODS) and all(t["status"] == "ok" and t["frames"] == 5 for t in trials.values())
    full, fora = trials["full"]["metrics"], trials["fora-2"]["metrics"]
    assert full["PSNR"]["value"] == 100.0 and full["SSIM"]["value"] == pytest.approx(1.0, abs=1e-6)
    assert 25 < fora["PSNR"]["value"] < 100 and fora["PSNR"]["min"] <= fora["PSNR"]["value"]
    assert 0.5 < fora["SSIM"]["value"] < 1
    assert "2 clips" in fora["PSNR"]["computed"] and "averaged over its 5 frames" in fora["SSIM"]["computed"]
    motion = fora["motion-accuracy"]
    assert motion["value"] is None and "accel.eval.motion" in motion["unavailable"]
    for trial in trials.values():
        assert trial["latency"]["per_clip_s"] > 0 and trial["macs"]["per_clip"] > 0
        assert "per_image_s" not in trial["latency"]
    assert trials["fora-2"]["macs"]["per_clip"] < trials["full"]["macs"]["per_clip"]


def test_clips_are_stored_losslessly_as_png_filmstrips(evaluated, pipe):
    out, results = evaluated
    full = next(t for t in results["trials"] if t["method"] == "full")
    paths = sorted((out / full["images"]).glob("*.png"))
    assert len(paths) == 2 and png_frames(paths[0]) == 5
    clips = load_samples(paths)
    assert clips.shape == (2, 5, 3, 16, 16) and clips.dtype == torch.uint8
    kwargs, guidance = pipeline_defaults(pipe, False, TINY_VIDEO_KWARGS)
    again = generate(pipe, list(VIDEO_PROMPTS), [0, 1], 3, guidance, kwargs)
    assert torch.equal(clips, to_uint8(again))  # the same seeds give the same clips, and PNG loses nothing


def test_html_shows_each_clip_as_an_animation_beside_full_compute(evaluated):
    from PIL import Image

    out, results = evaluated
    page = (out / "report.html").read_text()
    assert "<h2>Clips: same prompt and seed across methods</h2>" in page and "data:image/webp;base64," in page
    for trial in results["trials"]:
        name = trial["images"].split("/")[-1]
        for index in range(len(VIDEO_PROMPTS)):
            path = out / "animations" / name / f"{index:05d}.webp"
            with Image.open(path) as animation:
                assert animation.is_animated and animation.n_frames == 5
            assert f'href="animations/{name}/{index:05d}.webp"' in page
    assert page.index("<th>full</th>") < page.index("<th>fora-2</th>")  # full compute is the first column
    assert "s/clip" in (out / "report.md").read_text() and "clips of 5 frames" in page
    # each prompt's row: full compute's clip, then each method's clip of the same prompt and seed beside it
    rows = re.findall(r"<tr><td class='prompt'>(.*?)</tr>", page)
    assert len(rows) == len(VIDEO_PROMPTS)
    for index, (prompt, row) in enumerate(zip(VIDEO_PROMPTS, rows)):
        assert row.startswith(prompt) and f"seed {results['run']['seeds'][index]}" in row
        links = re.findall(r'<td><a href="(animations/[^"]+)"><img src="data:image/webp;base64,', row)
        assert links == [animation_file(trial, index) for trial in results["trials"]]
        assert "reference" in row.split("</td>")[1] and " dB</div>" in row.split("</td>")[2]


def test_a_second_run_resumes_without_generating(evaluated, pipe, monkeypatch):
    out, results = evaluated
    calls = []
    monkeypatch.setattr(harness, "generate", lambda *a, **k: calls.append(a) or pytest.fail("generated"))
    monkeypatch.setitem(sys.modules, "accel.eval.motion", None)
    again = run_evaluation(video_config(), out, pipe=pipe)
    assert calls == [] and again["trials"] == results["trials"]


def _fake_motion_module(accuracy: float | None) -> types.ModuleType:
    module = types.ModuleType("accel.eval.motion")
    module.load_motion_scorer = lambda: "scorer"
    seen = {}

    def motion_accuracy(scorer, clips, prompts):
        seen.update(scorer=scorer, shape=tuple(clips.shape), dtype=clips.dtype, top=float(clips.max()), prompts=prompts)
        return {"accuracy": accuracy, "chance": 1 / 13, "scored": len(prompts), "total": len(prompts)}

    module.motion_accuracy = motion_accuracy
    module.seen = seen
    return module


def test_motion_metric_scores_clips_through_accel_eval_motion(monkeypatch):
    clips = torch.randint(0, 256, (2, 4, 3, 8, 8), dtype=torch.uint8)
    inputs = MetricInputs(images=clips, reference=clips, prompts=("a sliding up", "b zooming in"))
    module = _fake_motion_module(0.5)
    monkeypatch.setitem(sys.modules, "accel.eval.motion", module)
    result = MetricSuite(["motion"]).compute(inputs)["motion-accuracy"]
    assert result["value"] == 0.5 and result["better"] == "higher" and result["scored"] == 2
    assert module.seen["shape"] == (2, 4, 3, 8, 8) and module.seen["dtype"] == torch.float32
    assert module.seen["top"] <= 1 and module.seen["prompts"] == list(inputs.prompts)
    monkeypatch.setitem(sys.modules, "accel.eval.motion", _fake_motion_module(None))  # no prompt names a motion
    assert "names a motion" in MetricSuite(["motion"]).compute(inputs)["motion-accuracy"]["unavailable"]
    monkeypatch.setitem(sys.modules, "accel.eval.motion", None)
    assert "not importable" in MetricSuite(["motion"]).compute(inputs)["motion-accuracy"]["unavailable"]


def test_motion_accuracy_of_an_evaluated_video_run_is_the_shipped_classifiers(pipe, tmp_path):
    """The real classifier through the harness: 17-frame clips of prompts naming motions are scored, the value
    lands in results.json and the report, and equals the classifier run by hand on the stored clips."""
    from accel.eval.motion import load_motion_scorer, motion_accuracy

    prompts = ("red apple sliding up", "ghost zooming in", "rocket")  # the last names no motion: not scored
    kwargs = {**TINY_VIDEO_KWARGS, "num_frames": 17}
    config = video_config(prompts=prompts, methods=("full",), metrics=("motion",), pipeline_kwargs=kwargs)
    results = run_evaluation(config, tmp_path, pipe=pipe)
    (trial,) = results["trials"]
    motion = trial["metrics"]["motion-accuracy"]
    assert trial["frames"] == 17 and motion["scored"] == 2 and motion["total"] == 3
    clips = load_samples(sorted((tmp_path / trial["images"]).glob("*.png")))
    expected = motion_accuracy(load_motion_scorer(), clips.float() / 255, list(prompts))
    assert motion["value"] is not None and motion["value"] == pytest.approx(expected["accuracy"])
    assert motion["chance"] == pytest.approx(1 / 13)
    assert "motion-accuracy" in (tmp_path / "report.md").read_text()
    assert "motion-accuracy" in (tmp_path / "report.html").read_text()


def test_clip_psnr_is_per_clip_averaged_over_frames():
    reference = torch.full((2, 2, 3, 8, 8), 100, dtype=torch.uint8)
    clips = reference.clone()
    clips[0, 1] += 1  # clip 0: one frame off by 1 -> 48.13 dB there, capped 100 dB on the other
    clips[1] += 2  # clip 1: both frames off by 2 -> 42.11 dB
    result = MetricSuite(["psnr"]).compute(MetricInputs(images=clips, reference=reference, prompts=("a", "b")))
    clip0, clip1 = (100 + 48.1308) / 2, 42.1102
    assert result["PSNR"]["value"] == pytest.approx((clip0 + clip1) / 2, abs=1e-3)
    assert result["PSNR"]["min"] == pytest.approx(clip1, abs=1e-3)


def test_fid_and_kid_take_every_frame():
    generator = torch.Generator().manual_seed(0)
    reference = torch.randint(0, 256, (2, 5, 3, 16, 16), dtype=torch.uint8, generator=generator)
    clips = (reference.int() + torch.randint(-20, 21, reference.shape, generator=generator)).clamp(0, 255).byte()
    results = MetricSuite(["fid"]).compute(MetricInputs(images=clips, reference=reference, prompts=("a", "b")))
    fid, kid = results["FID-EffNetLite0"], results["KID-EffNetLite0"]
    assert fid["value"] > 0 and kid["value"] is not None
    assert "this method's 10 frames of 2 clips" in fid["computed"] and "(10 images)" in fid["computed"]


def test_prompt_score_takes_every_frame_with_its_clips_prompt(monkeypatch):
    import accel.eval.feature_metrics as feature_metrics

    class Scorer:
        metric_name = "alignment-test"

        def score(self, images, prompts):
            seen.update(shape=tuple(images.shape), prompts=prompts)
            return torch.arange(len(prompts), dtype=torch.float32)

    seen = {}
    monkeypatch.setattr(feature_metrics, "load_prompt_scorer", lambda weights: (Scorer(), "a stub"))
    clips = torch.zeros(2, 3, 3, 8, 8, dtype=torch.uint8)
    result = MetricSuite(["clip"]).compute(MetricInputs(images=clips, reference=clips, prompts=("a", "b")))
    assert seen == {"shape": (6, 3, 8, 8), "prompts": ["a", "a", "a", "b", "b", "b"]}
    assert result["alignment-test"]["value"] == pytest.approx(2.5) and "6 frames of 2 clips" in str(result)


def test_metrics_follow_what_the_pipeline_makes():
    assert "motion" not in metric_keys(None, "image") and metric_keys(None, "video")[-1] == "motion"
    assert metric_keys(("psnr", "motion"), "video") == ("psnr", "motion")
    with pytest.raises(ValueError, match=r"\['motion'\] score video only, but PixArt makes images"):
        metric_keys(("psnr", "motion"), "image", "PixArt")


def test_video_only_metric_on_an_image_pipeline_fails_before_any_compute(tmp_path, monkeypatch):
    monkeypatch.setattr(harness, "generate", lambda *a, **k: pytest.fail("generated"))
    with pytest.raises(ValueError, match="motion"):
        run_evaluation(small_config(metrics=("psnr", "motion")), tmp_path, pipe=build_tiny_pixart_pipeline())
    assert not (tmp_path / "images").exists()


def test_pipeline_arguments_the_pipeline_does_not_take_fail_before_any_compute():
    with pytest.raises(ValueError, match=r"PixArtAlphaPipeline takes no \['num_frames'\]"):
        pipeline_defaults(build_tiny_pixart_pipeline(), False, {"num_frames": 5})


def test_images_keep_plain_pngs(tmp_path):
    from PIL import Image

    image = torch.rand(3, 8, 8)
    save_sample(image, tmp_path / "image.png")
    with Image.open(tmp_path / "image.png") as saved:
        assert FRAMES_KEY not in saved.text
    assert load_samples([tmp_path / "image.png"]).shape == (1, 3, 8, 8)
    save_sample(torch.rand(2, 3, 8, 8), tmp_path / "clip.png")
    with pytest.raises(ValueError, match="mix frame counts"):
        load_samples([tmp_path / "image.png", tmp_path / "clip.png"])


@pytest.fixture(scope="module")
def video_model_dir(tmp_path_factory, pipe):
    path = tmp_path_factory.mktemp("tiny-wan")
    pipe.save_pretrained(path)
    return path


def test_generate_writes_a_filmstrip_and_an_animation_per_clip(video_model_dir, tmp_path, capsys):
    from PIL import Image

    argv = ["generate", "--model", str(video_model_dir), "--method", "fora-2", "--steps", "3"]
    argv += ["--prompt", "a red apple", "--num-images", "2", "--out", str(tmp_path)]
    argv += ["--pipeline-kwargs", json.dumps(TINY_VIDEO_KWARGS)]
    assert main(argv) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "fora-2-000-seed0.png",
        "fora-2-000-seed0.webp",
        "fora-2-001-seed1.png",
        "fora-2-001-seed1.webp",
    ]
    clips = load_samples(sorted(tmp_path.glob("*.png")))
    assert clips.shape == (2, 5, 3, 16, 16) and not torch.equal(clips[0], clips[1])  # seeds 0 and 1
    with Image.open(tmp_path / "fora-2-000-seed0.webp") as animation:
        assert animation.n_frames == 5
    assert "a red apple" in capsys.readouterr().out


@pytest.mark.skipif(not (DEFAULT_VIDEO_MODEL_DIR / "transformer").is_dir(), reason="video model not exported")
def test_generate_on_the_bundled_video_model_writes_its_17_frame_clips(tmp_path, capsys):
    from PIL import Image

    argv = ["generate", "--model", "bundled-video", "--steps", "2", "--threads", "1", "--out", str(tmp_path)]
    assert main([*argv, "--prompt", "red apple sliding to the right"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full-000-seed0.png", "full-000-seed0.webp"]
    clip = load_samples([tmp_path / "full-000-seed0.png"])
    assert clip.shape == (1, 17, 3, 64, 64)  # the model's own clip size (DEFAULT_VIDEO_CALL_KWARGS)
    assert clip.float().mean() > 0.3 * 255  # mostly white, not black or NaN
    with Image.open(tmp_path / "full-000-seed0.webp") as animation:
        assert animation.is_animated and animation.n_frames == 17 and animation.size == (64, 64)
    assert "red apple sliding to the right" in capsys.readouterr().out


def test_demo_video_flag_evaluates_the_bundled_video_model(monkeypatch, tmp_path, capsys):
    from accel.eval.config import BUILTIN_VIDEO_PROMPTS, DEFAULT_VIDEO_METHODS

    seen = {}
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(harness, "run_evaluation", lambda config, out: seen.update(config=config, out=out))
    assert main(["demo", "--video", "--steps", "4"]) == 0
    config = seen["config"]
    assert config.model == "bundled-video" and config.prompts == BUILTIN_VIDEO_PROMPTS and config.steps == 4
    assert config.methods == DEFAULT_VIDEO_METHODS and seen["out"] == "report-video"
    assert "accel demo: 5 methods x 4 clips, 4 steps, on bundled-video" in capsys.readouterr().out
    assert main(["demo", "--video", "--methods", "full,fora-2", "--out", "elsewhere"]) == 0
    assert seen["config"].methods == ("full", "fora-2") and seen["out"] == "elsewhere"


def test_call_kwargs_of_the_video_pipeline_ask_for_tensors(pipe):
    assert call_kwargs(pipe)["output_type"] == "pt" and call_kwargs(pipe)["max_sequence_length"] == 16


@pytest.mark.slow
def test_video_demo_end_to_end_on_the_bundled_video_model(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--video", "--steps", "4", "--methods", "fora-2", "--metrics", "psnr,ssim,motion"]
    assert main([*argv, "--timing-repeats", "1", "--timing-warmup", "0", "--threads", "1", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["run"]["frames"] == 17 and results["run"]["model"]["pipeline_class"] == "WanPipeline"
    assert len(list(out.glob("animations/*/*.webp"))) == 2 * 4
    assert "fora-2" in capsys.readouterr().out
