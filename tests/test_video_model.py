"""The bundled video model: clip renderer, training loss, WanPipeline assembly and the exported weights."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))

import render_clips  # noqa: E402
import train_default_model  # noqa: E402
import train_video_model  # noqa: E402
import video_data  # noqa: E402
import video_dit  # noqa: E402
import video_vae  # noqa: E402

from accel.pipelines.video import (  # noqa: E402
    DEFAULT_VIDEO_CALL_KWARGS,
    DEFAULT_VIDEO_MODEL_DIR,
    load_default_video_pipeline,
)

if not render_clips.EMOJI.is_file():
    pytest.skip(f"dataset not found: {render_clips.EMOJI}", allow_module_level=True)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here on one thread (see conftest.one_thread)."""


@pytest.fixture(scope="module")
def emoji():
    return render_clips.load_emoji()


def _ink_track(clip: np.ndarray) -> np.ndarray:
    """Per frame: ink centroid x, y (pixels) and ink area of a ``(T, H, W, 3)`` uint8 clip on white."""
    ink = 1 - clip.astype(np.float64).mean(axis=3) / 255  # (T, H, W)
    rows, cols = np.mgrid[: clip.shape[1], : clip.shape[2]]
    area = ink.sum(axis=(1, 2))
    return np.stack([(ink * cols).sum((1, 2)) / area, (ink * rows).sum((1, 2)) / area, area], axis=1)


def test_renderer_is_deterministic(emoji):
    images = emoji[0]
    first = render_clips.render_clip(images[5], "orbit", seed=3)
    assert first.shape == (render_clips.FRAMES, render_clips.SIZE, render_clips.SIZE, 3) and first.dtype == np.uint8
    assert np.array_equal(first, render_clips.render_clip(images[5], "orbit", seed=3))
    assert not np.array_equal(first, render_clips.render_clip(images[5], "orbit", seed=4))
    _, _, split = emoji
    assert render_clips.clip_specs(split, "train", 2) == render_clips.clip_specs(split, "train", 2)


@pytest.mark.parametrize(
    ("motion", "column", "sign"),
    [
        ("slide_right", 0, 1),
        ("slide_left", 0, -1),
        ("slide_down", 1, 1),
        ("slide_up", 1, -1),
        ("fall", 1, 1),
        ("zoom_in", 2, 1),
        ("zoom_out", 2, -1),
    ],
)
def test_clips_move_as_their_captions_say(emoji, motion, column, sign):
    images, names, _ = emoji
    index = names.index("red apple")
    assert render_clips.caption(names[index], motion).startswith("red apple ")
    for seed in range(3):
        track = _ink_track(render_clips.render_clip(images[index], motion, seed))
        change = track[-1, column] - track[0, column]
        assert sign * change > (20 if column < 2 else 0.5 * track[:, 2].min()), (motion, seed, track[[0, -1]])


def test_still_and_rotating_clips_stay_in_place(emoji):
    images, names, _ = emoji
    index = names.index("red apple")
    for motion in ("still", "rotate_clockwise"):
        track = _ink_track(render_clips.render_clip(images[index], motion, 0))
        assert np.ptp(track[:, 0]) < 6 and np.ptp(track[:, 1]) < 6  # an off-centre sprite's centroid turns
    rotating = render_clips.render_clip(images[index], "rotate_clockwise", 0)
    assert np.abs(rotating[0].astype(int) - rotating[8].astype(int)).mean() > 5


def test_split_is_recorded_and_holds_pairs_out(emoji):
    _, _, split = emoji
    assert json.loads(render_clips.SPLIT_FILE.read_text()) == render_clips.split_record(split)
    pairs = render_clips.split_pairs(split)
    assert not set(pairs["train"]) & set(pairs["heldout"])
    assert {motion for _, motion in pairs["train"]} == set(render_clips.MOTION_INDEX)
    assert len(pairs["heldout"]) == int((split == "train").sum())  # one held-out motion per training object
    train_objects = {index for index, _ in pairs["train"]}
    assert not train_objects & {index for index, _ in pairs["test"]}
    specs = render_clips.clip_specs(split, "train", 3)
    train_pairs = set(pairs["train"])
    assert all((s.index, s.motion) in train_pairs for s in specs)


def test_an_object_subset_keeps_its_held_out_pairs_and_unknown_names_are_refused(emoji, tmp_path):
    _, names, split = emoji
    objects = tmp_path / "objects.json"
    objects.write_text(json.dumps(["red apple", "ghost"]))
    subset = video_data.object_split(split, names, objects)
    full, part = render_clips.split_pairs(split), render_clips.split_pairs(subset)
    kept = {names.index("red apple"), names.index("ghost")}
    assert {index for index, _ in part["train"]} == kept
    assert part["heldout"] == [pair for pair in full["heldout"] if pair[0] in kept]
    assert part["test"] == full["test"]
    objects.write_text(json.dumps(["red apple", "unicorn with a hat"]))
    with pytest.raises(ValueError, match="unicorn with a hat"):
        video_data.object_split(split, names, objects)


def test_configs_give_a_long_token_sequence_and_a_small_transformer(emoji):
    images, _, split = emoji
    vae = video_vae.new_vae(base_dim=4).eval()  # the real layout, narrower
    clips = video_data.render_batch(images, render_clips.clip_specs(split, "train", 1)[:1])
    with torch.no_grad():
        latents = vae.encode(clips).latent_dist.mean
    assert latents.shape == (1, 8, 9, 16, 16)  # 17 frames of 64 x 64: temporal factor 2, spatial factor 4
    assert (vae.config.scale_factor_temporal, vae.config.scale_factor_spatial) == (2, 4)
    patch = video_dit.DIT_CONFIG["patch_size"]
    tokens = latents.shape[2] // patch[0] * (latents.shape[3] // patch[1]) * (latents.shape[4] // patch[2])
    assert tokens == 576
    model = video_dit.new_transformer()
    assert sum(p.numel() for p in model.parameters()) <= 20e6


def test_tiny_untrained_model_trains_one_step_and_runs_in_wan_pipeline(emoji):
    from diffusers import UniPCMultistepScheduler, WanPipeline
    from transformers import AutoTokenizer, BertModel

    images, names, split = emoji
    specs = render_clips.clip_specs(split, "train", 1)[:2]
    vae = video_vae.new_vae(base_dim=4).eval()
    model = video_dit.new_transformer(num_layers=1, num_attention_heads=2, attention_head_dim=24, ffn_dim=64)
    clips = video_data.render_batch(images, specs)[:, :, :5]
    with torch.no_grad():
        latents = vae.encode(clips).latent_dist.mean  # (2, 8, 3, 16, 16)
        unclamped = video_vae.decode_unclamped(vae, latents)  # what the VAE stage trains on
        torch.testing.assert_close(unclamped.clamp(-1, 1), vae.decode(latents).sample)
    captions = [render_clips.caption(names[s.index], s.motion) for s in specs]
    data = {"latents": latents, "text": video_data.encode_text(captions), "empty_text": torch.zeros(1, 32, 384)}
    batch = video_dit.flow_batch(data, 2, 0.5, torch.Generator().manual_seed(0))
    loss = video_dit.flow_loss(model, *batch)
    loss.backward()
    assert torch.isfinite(loss) and model.patch_embedding.weight.grad.abs().sum() > 0

    text_dir = video_data.TEXT_DIR
    pipe = WanPipeline(
        tokenizer=AutoTokenizer.from_pretrained(text_dir / "tokenizer"),
        text_encoder=BertModel.from_pretrained(text_dir / "text_encoder", torch_dtype=torch.float32),
        vae=vae,
        transformer=model.eval().requires_grad_(False),
        scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=2.0),
    )
    # the training captions are encoded exactly as the pipeline encodes prompts
    states, _ = pipe.encode_prompt(captions, do_classifier_free_guidance=False, max_sequence_length=32)
    torch.testing.assert_close(states, data["text"], atol=1e-5, rtol=1e-5)
    kwargs = {**DEFAULT_VIDEO_CALL_KWARGS, "num_frames": 5}
    frames = pipe(captions[0], num_inference_steps=2, generator=torch.Generator().manual_seed(0), **kwargs).frames
    assert frames.shape == (1, 5, 64, 64, 3) and 0 <= frames.min() and frames.max() <= 1


@pytest.mark.skipif(not (DEFAULT_VIDEO_MODEL_DIR / "transformer").is_dir(), reason="video model not exported yet")
def test_exported_video_model_loads_and_generates():
    pipe = load_default_video_pipeline()
    assert type(pipe).__name__ == "WanPipeline"
    assert pipe.transformer.dtype == torch.float32 and not pipe.transformer.training
    assert pipe.vae.config.scale_factor_spatial == 4 and pipe.vae.config.scale_factor_temporal == 2
    generator = torch.Generator().manual_seed(0)
    frames = pipe(
        "red apple sliding to the right", num_inference_steps=2, generator=generator, **DEFAULT_VIDEO_CALL_KWARGS
    ).frames
    assert frames.shape == (1, 17, 64, 64, 3) and np.isfinite(frames).all()
    assert 0.3 < frames.mean() <= 1  # mostly white clips, not black or NaN


exported = pytest.mark.skipif(
    not (DEFAULT_VIDEO_MODEL_DIR / "transformer").is_dir(), reason="video model not exported yet"
)


@exported
def test_exported_weights_are_small_half_precision_safetensors_with_wans_flow_scheduler():
    from diffusers import UniPCMultistepScheduler
    from safetensors import safe_open

    for component in ("transformer", "vae"):
        with safe_open(str(DEFAULT_VIDEO_MODEL_DIR / component / "diffusion_pytorch_model.safetensors"), "pt") as f:
            dtypes = {f.get_slice(name).get_dtype() for name in f.keys()}
            count = sum(int(np.prod(f.get_slice(name).get_shape())) for name in f.keys())
        assert dtypes <= {"F16", "BF16"}, (component, dtypes)
        assert count <= 20e6, (component, count)
    scheduler = UniPCMultistepScheduler.from_pretrained(DEFAULT_VIDEO_MODEL_DIR / "scheduler")
    assert scheduler.config.prediction_type == "flow_prediction" and scheduler.config.use_flow_sigmas


@exported
def test_save_pretrained_writes_a_folder_wan_pipeline_loads_alone_with_the_same_clips(tmp_path):
    from diffusers import DiffusionPipeline, WanPipeline

    pipe = load_default_video_pipeline()
    pipe.save_pretrained(tmp_path)
    again = DiffusionPipeline.from_pretrained(tmp_path)
    assert type(again) is WanPipeline and type(again.text_encoder).__name__ == "BertModel"
    kwargs = {**DEFAULT_VIDEO_CALL_KWARGS, "num_frames": 5, "output_type": "pt"}
    clips = [
        p("red apple sliding up", num_inference_steps=2, generator=torch.Generator().manual_seed(0), **kwargs).frames
        for p in (pipe, again)
    ]
    torch.testing.assert_close(clips[0], clips[1], rtol=0, atol=1e-6)


def test_loader_names_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="transformer.*vae.*scheduler.*train_video_model.py export"):
        load_default_video_pipeline(tmp_path)
    for part in ("transformer", "vae", "scheduler"):
        (tmp_path / part).mkdir()
    with pytest.raises(FileNotFoundError, match="text_encoder.*tokenizer.*image model") as error:
        load_default_video_pipeline(tmp_path, text_path=tmp_path)
    assert str(tmp_path / "vae") not in str(error.value)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"torch_dtype": "float16"}, TypeError, "floating-point torch.dtype"),
        ({"torch_dtype": torch.int8}, TypeError, "floating-point torch.dtype"),
        ({"device": "gpu"}, ValueError, "torch device such as 'cpu'"),
    ],
)
def test_loader_checks_dtype_and_device_before_looking_for_weights(tmp_path, kwargs, error, message):
    with pytest.raises(error, match=message):  # not FileNotFoundError: checked before the folder
        load_default_video_pipeline(tmp_path / "nothing-here", **kwargs)


def test_frames_stage_caches_first_latent_frames_and_dit_trains_on_them_jointly(emoji, tmp_path):
    from safetensors.torch import load_file, save_file

    images, _, split = emoji
    init, work = tmp_path / "init", tmp_path / "work"
    work.mkdir()
    vae = video_vae.new_vae(base_dim=4).eval()
    vae.save_pretrained(init / "vae")
    mean, std = torch.linspace(-1, 1, 8), torch.linspace(0.5, 2, 8)
    stats = {"latents_mean": json.dumps(mean.tolist()), "latents_std": json.dumps(std.tolist())}
    clips = torch.randn(2, 8, 9, 16, 16).half()
    encoded = {"latents": clips, "text": torch.randn(2, 32, 384).half(), "empty_text": torch.zeros(1, 32, 384)}
    save_file(encoded, work / "encoded.safetensors", metadata=stats)
    args = train_video_model.build_parser().parse_args(
        ["frames", "--work", str(work), "--init", str(init), "--max-clips", "3"]
    )
    video_vae.encode_frames(args)

    frames = load_file(work / "frames.safetensors")
    assert frames["latents"].shape == (3, 8, 1, 16, 16) and frames["text"].shape == (3, 32, 384)
    # a one-frame clip is the first latent frame of the whole clip (the causal VAE encodes frame 0 alone)
    index, motion = render_clips.split_pairs(split)["train"][0]
    clip = video_data.render_batch(images, [render_clips.ClipSpec(index, motion, 5)])
    with torch.no_grad():
        whole, first = (vae.encode(x).latent_dist.mean for x in (clip, clip[:, :, :1]))
    torch.testing.assert_close(first, whole[:, :, :1])
    # and the cache holds such latents, normalised with the clip statistics
    raw = frames["latents"][:1].float() * std.view(1, -1, 1, 1, 1) + mean.view(1, -1, 1, 1, 1)
    seed = int(np.random.default_rng(args.seed + 1).integers(2**31))
    clip = video_data.render_batch(images, [render_clips.ClipSpec(index, motion, seed)])[:, :, :1]
    with torch.no_grad():
        torch.testing.assert_close(raw, vae.encode(clip).latent_dist.mean, atol=0.02, rtol=0.01)  # fp16 cache

    argv = ["dit", "--work", str(work), "--batch", "1", "--frame-batch", "2", "--max-steps", "1", "--warmup", "1"]
    video_dit.train_dit(train_video_model.build_parser().parse_args(argv))
    assert load_file(work / "dit.safetensors")["generator"].numel() > 0


def test_reinit_text_starts_the_caption_path_afresh_and_loads_the_rest(tmp_path):
    from safetensors.torch import load_file, save_file

    init, work = tmp_path / "init", tmp_path / "work"
    work.mkdir()
    exported = video_dit.new_transformer()
    with torch.no_grad():  # unlike any fresh initialisation, whatever the seed
        for parameter in exported.parameters():
            parameter.add_(1.0)
    exported.save_pretrained(init / "transformer")
    encoded = {"latents": torch.randn(2, 8, 9, 16, 16).half(), "text": torch.randn(2, 32, 384).half()}
    save_file({**encoded, "empty_text": torch.zeros(1, 32, 384)}, work / "encoded.safetensors")
    argv = ["dit", "--work", str(work), "--init", str(init), "--reinit-text", "--batch", "1", "--max-steps", "1"]
    video_dit.train_dit(train_video_model.build_parser().parse_args([*argv, "--lr", "0", "--warmup", "1"]))

    trained = {k[6:]: v for k, v in load_file(work / "dit.safetensors").items() if k.startswith("model.")}
    text = {k for k in trained if video_dit.is_text_path(k)}
    assert any(".attn2." in k for k in text) and any("text_embedder" in k for k in text)
    for name, value in exported.state_dict().items():  # lr 0: what was loaded is still there
        assert torch.equal(trained[name], value) != (name in text), name


class _KnowsTheObject:
    """A stand-in transformer that reads each row's clean latents from its caption (or ignores the caption),
    predicting the flow velocity from that, a little off."""

    def __init__(self, reads_caption: bool):
        self.reads_caption = reads_caption

    def __call__(self, hidden_states, timestep, encoder_hidden_states):
        from types import SimpleNamespace

        s = (timestep / 1000).view(-1, 1, 1, 1, 1)
        x0 = encoder_hidden_states[:, :1, :1].view(-1, 1, 1, 1, 1) if self.reads_caption else 0.0
        noise = (hidden_states - (1 - s) * x0) / s
        return SimpleNamespace(sample=noise - x0 + 0.1)


def test_caption_gap_is_zero_for_a_model_that_ignores_the_name_and_large_for_one_that_reads_it():
    objects = [0, 1, 2, 3] * 6
    motions = ["bounce", "zoom_in", "bounce", "zoom_in"] * 6
    values = torch.tensor([float(o) for o in objects])
    data = {"latents": values.view(-1, 1, 1, 1, 1).expand(-1, 8, 2, 4, 4).clone(),
            "text": values.view(-1, 1, 1).expand(-1, 32, 384).clone()}  # fmt: skip
    ignoring = video_dit.caption_gap(_KnowsTheObject(False), data, objects, motions, count=16)
    reading = video_dit.caption_gap(_KnowsTheObject(True), data, objects, motions, count=16)
    assert ignoring["rows"] == reading["rows"] == 16
    assert ignoring["gap"] == pytest.approx(0.0, abs=1e-9) and reading["own"] == pytest.approx(0.01, rel=1e-4)
    assert reading["gap"] > 1000  # another object's caption puts the clean latents 2 away instead of 0.1
    with pytest.raises(ValueError, match="another object with the same motion"):
        video_dit.caption_gap(_KnowsTheObject(True), data, [0] * 24, motions)


def test_exports_drop_the_paths_components_were_loaded_from(tmp_path):
    video_vae.new_vae(base_dim=4).save_pretrained(tmp_path / "init" / "vae")
    from diffusers import AutoencoderKLWan

    AutoencoderKLWan.from_pretrained(tmp_path / "init" / "vae").save_pretrained(tmp_path / "out" / "vae")
    assert "_name_or_path" in json.loads((tmp_path / "out" / "vae" / "config.json").read_text())  # what it fixes
    train_default_model.strip_load_paths(tmp_path / "out")
    config = json.loads((tmp_path / "out" / "vae" / "config.json").read_text())
    assert "_name_or_path" not in config and config["z_dim"] == 8


@pytest.mark.parametrize(
    "argv,missing",
    [
        (["dit"], "'encode' stage"),
        (["frames"], "'encode' stage"),
        (["export"], "'encode' stage"),
    ],
)
def test_a_stage_whose_input_is_missing_names_the_stage_to_run_first(tmp_path, argv, missing):
    args = train_video_model.build_parser().parse_args([*argv, "--work", str(tmp_path)])
    stages = {"dit": video_dit.train_dit, "frames": video_vae.encode_frames,
              "export": video_dit.export}  # fmt: skip
    with pytest.raises(FileNotFoundError, match=missing):
        stages[argv[0]](args)


def test_reinit_text_without_an_export_to_start_from_is_refused_before_any_compute(tmp_path):
    args = train_video_model.build_parser().parse_args(["dit", "--work", str(tmp_path), "--reinit-text"])
    with pytest.raises(ValueError, match="--init"):
        video_dit.train_dit(args)


def test_roundtrip_strip_puts_each_rendered_held_out_clip_above_its_vae_reconstruction(emoji, tmp_path, caplog):
    images, names, split = emoji
    argv = ["roundtrip", "--work", str(tmp_path), "--out", str(DEFAULT_VIDEO_MODEL_DIR), "--samples", "2"]
    with caplog.at_level("INFO", logger=video_dit.logger.name):
        video_dit.roundtrip(train_video_model.build_parser().parse_args(argv))
    from PIL import Image

    strip = np.asarray(Image.open(tmp_path / "roundtrip.png"))
    size = render_clips.SIZE
    assert strip.shape == (4 * size, 9 * size, 3)
    logged = [r.getMessage() for r in caplog.records if "ink colour [" in r.getMessage()]
    assert len(logged) == 2 and "mean of 2 clips" in caplog.records[-2].getMessage()
    held = {render_clips.caption(names[i], m): (i, m) for i, m in render_clips.split_pairs(split)["heldout"]}
    first = held[logged[0].split(":")[0]]
    spec = next(s for s in render_clips.clip_specs(split, "heldout", 1) if (s.index, s.motion) == first)
    clip = render_clips.render_clip(images[spec.index], spec.motion, spec.seed)  # (T, H, W, 3) uint8
    np.testing.assert_allclose(strip[:size, :size].astype(int), clip[0].astype(int), atol=1)  # row 0: rendered
    # the shipped VAE's reconstructions (row 1) keep the clip to within its measured 19-25 dB
    assert all(float(message.split("PSNR ")[1].split(" dB")[0]) > 17 for message in logged)
    decoded = strip[size : 2 * size, :size].astype(float)
    assert np.abs(decoded - clip[0]).mean() < 20


def test_roundtrip_refuses_more_samples_than_held_out_pairs_before_loading(tmp_path):
    (tmp_path / "objects.json").write_text(json.dumps(["red apple", "ghost"]))
    argv = ["roundtrip", "--work", str(tmp_path), "--out", str(tmp_path / "none"), "--samples", "3"]
    args = train_video_model.build_parser().parse_args([*argv, "--objects", str(tmp_path / "objects.json")])
    with pytest.raises(ValueError, match=r"--samples must be in 1\.\.2"):
        video_dit.roundtrip(args)


def test_captions_table_stands_in_for_the_text_encoder_and_workers_render_the_same_clips(emoji, tmp_path):
    images, names, split = emoji
    objects = tmp_path / "objects.json"
    pairs = render_clips.split_pairs(split)["train"]
    objects.write_text(json.dumps([names[pairs[0][0]]]))
    args = train_video_model.build_parser().parse_args(["captions", "--work", str(tmp_path), "--objects", str(objects)])
    video_data.write_captions(args)
    captions = [render_clips.caption(names[pairs[0][0]], pairs[0][1]), ""]
    looked_up = video_data.caption_states(args, captions)
    torch.testing.assert_close(looked_up, video_data.encode_text(captions), atol=4e-3, rtol=4e-3)  # fp16
    with pytest.raises(KeyError, match="captions"):
        video_data.caption_states(args, ["a caption of no pair"])

    specs = render_clips.clip_specs(split, "train", 1)[:5]
    rendered = torch.cat(list(video_data.rendered_batches(images, specs, 2, workers=2)))
    assert torch.equal(rendered, video_data.render_batch(images, specs))


def test_dit_without_a_frames_cache_trains_on_the_clips_first_latent_frames(tmp_path, caplog):
    from safetensors.torch import save_file

    encoded = {"latents": torch.randn(2, 8, 9, 16, 16).half(), "text": torch.randn(2, 32, 384).half()}
    save_file({**encoded, "empty_text": torch.zeros(1, 32, 384)}, tmp_path / "encoded.safetensors")
    argv = ["dit", "--work", str(tmp_path), "--batch", "1", "--frame-batch", "2", "--max-steps", "2"]
    with caplog.at_level("INFO", logger="train_video_model"):
        video_dit.train_dit(train_video_model.build_parser().parse_args([*argv, "--decay-at-deadline"]))
    assert "first latent frames of the 2 clips" in caplog.text
    assert (tmp_path / "dit.safetensors").is_file()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--batch", "0"], "--batch must be >= 1"),
        (["--threads", "0"], "--threads must be >= 1"),
        (["--warmup", "-1"], "--warmup must be >= 0"),
        (["--caption-dropout", "1.5"], r"--caption-dropout must be in \[0, 1\)"),
        (["--ema-decay", "1"], r"--ema-decay must be in \[0, 1\)"),
        (["--lr=-1e-4"], "--lr must be > 0"),
        (["--minutes", "0"], "--minutes must be > 0"),
        (["--max-clips", "0"], "--max-clips must be >= 1"),
        (["--device", "gpu"], "--device must be a torch device"),
        (["--init", "/no/such/export"], "--init /no/such/export is not a folder"),
        (["--objects", "/no/such.json"], "--objects /no/such.json is not a file"),
    ],
)
def test_training_options_are_checked_before_any_stage_runs(flags, message, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train_video_model, "train_dit", lambda args: pytest.fail("the stage ran"))
    monkeypatch.setattr(sys, "argv", ["train_video_model.py", "dit", "--work", str(tmp_path / "work"), *flags])
    with pytest.raises(SystemExit) as exit_info:
        train_video_model.main()
    assert exit_info.value.code == 2 and re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "work").exists()  # nothing written either
    args = train_video_model.build_parser().parse_args(["dit", "--work", str(tmp_path)])
    train_video_model.check_arguments(args)  # the defaults pass


def test_render_clips_refuses_a_preview_in_a_missing_folder_before_rendering(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(render_clips, "save_preview", lambda *a: pytest.fail("rendered"))
    monkeypatch.setattr(sys, "argv", ["render_clips.py", "--preview", str(tmp_path / "missing" / "clips.png")])
    with pytest.raises(SystemExit) as exit_info:
        render_clips.main()
    assert exit_info.value.code == 2 and f"folder {tmp_path / 'missing'} does not exist" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--lr", "0"], "--lr must be > 0"),
        (["--batch", "1"], "--batch >= 2"),
        (["--out", "runs/motion"], "--out must name a .safetensors file"),
    ],
)
def test_motion_classifier_training_checks_its_options_before_training(flags, message, monkeypatch, capsys):
    import train_motion_classifier

    monkeypatch.setattr(train_motion_classifier, "train", lambda args: pytest.fail("trained"))
    monkeypatch.setattr(sys, "argv", ["train_motion_classifier.py", *flags])
    with pytest.raises(SystemExit) as exit_info:
        train_motion_classifier.main()
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_dit_resumed_from_its_checkpoint_equals_an_uninterrupted_seeded_run(tmp_path):
    from safetensors.torch import load_file, save_file

    encoded = {"latents": torch.randn(3, 8, 9, 16, 16).half(), "text": torch.randn(3, 32, 384).half()}
    runs = {}
    for name, stops in (("straight", [3]), ("resumed", [1, 3])):
        work = tmp_path / name
        work.mkdir()
        save_file({**encoded, "empty_text": torch.zeros(1, 32, 384)}, work / "encoded.safetensors")
        for stop in stops:
            argv = ["dit", "--work", str(work), "--batch", "2", "--max-steps", str(stop), "--warmup", "2"]
            video_dit.train_dit(train_video_model.build_parser().parse_args(argv))
        runs[name] = load_file(work / "dit.safetensors")
    straight, resumed = runs["straight"], runs["resumed"]
    assert set(straight) == set(resumed) and any(k.startswith("ema.") for k in straight)
    for key, value in straight.items():  # model, EMA, optimiser state and generator: bit for bit
        assert torch.equal(value, resumed[key]), key
