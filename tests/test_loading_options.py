"""Real models first: --variant, --revision, --offload, --height/--width and the pipeline's own step count, through
the CLI's loading path on a tiny PixArt pipeline saved to disk; peak memory means one thing on every device."""

import inspect

import pytest
import torch
from PIL import Image

from accel.cli import main
from accel.eval.config import EvalConfig
from accel.eval.runtime import RuntimeConfig
from accel.pipelines.loading import BUNDLED_STEPS, default_steps, execution_device, load_pipeline
from tests.conftest import build_tiny_pixart_pipeline, one_thread  # noqa: F401


@pytest.fixture(scope="module")
def variant_dir(tmp_path_factory):
    """A tiny PixArt pipeline whose weights exist only as the fp16 variant (``*.fp16.safetensors``)."""
    path = tmp_path_factory.mktemp("tiny-pixart-fp16")
    build_tiny_pixart_pipeline().save_pretrained(path, variant="fp16")
    return path


def test_variant_is_loaded_through_the_cli(variant_dir, tmp_path, one_thread):  # noqa: F811
    assert list(variant_dir.glob("transformer/*.fp16.safetensors")), "the fixture saved no fp16 variant"
    with pytest.raises(OSError):  # without the variant there are no weights to load
        load_pipeline(str(variant_dir))
    argv = ["generate", "--model", str(variant_dir), "--variant", "fp16", "--steps", "2", "--prompt", "red apple"]
    assert main([*argv, "--out", str(tmp_path)]) == 0
    assert len(list(tmp_path.glob("*.png"))) == 1
    pipe = RuntimeConfig(variant="fp16").load_pipeline(str(variant_dir))
    reference = build_tiny_pixart_pipeline()
    for name in ("transformer", "vae", "text_encoder"):  # the saved weights came back, not fresh ones
        loaded, saved = getattr(pipe, name).state_dict(), getattr(reference, name).state_dict()
        assert all(torch.equal(loaded[k], saved[k]) for k in saved)


def test_a_variant_the_folder_lacks_is_an_error_naming_it(variant_dir, tmp_path, capsys):
    argv = ["generate", "--model", str(variant_dir), "--variant", "bf16", "--steps", "2", "--prompt", "x"]
    assert main([*argv, "--out", str(tmp_path)]) == 1
    assert "--variant bf16" in capsys.readouterr().err


def test_variant_and_revision_reach_from_pretrained(monkeypatch):
    from diffusers import DiffusionPipeline

    seen = {}

    def fake_from_pretrained(name, **kwargs):
        seen.update(kwargs, name=name)
        raise OSError("offline")

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", fake_from_pretrained)
    with pytest.raises(ValueError, match="--variant fp16 --revision refs/pr/7"):
        load_pipeline("org/model", variant="fp16", revision="refs/pr/7")
    assert seen == {"name": "org/model", "torch_dtype": torch.float32, "variant": "fp16", "revision": "refs/pr/7"}


def test_bundled_model_refuses_a_variant():
    with pytest.raises(ValueError, match="bundled"):
        load_pipeline(None, variant="fp16")


def test_offload_on_a_cpu_is_refused_before_loading(tmp_path, capsys):
    with pytest.raises(ValueError, match="--offload .* --device cuda"):
        RuntimeConfig(offload=True).check()
    argv = ["generate", "--model", str(tmp_path / "never-read"), "--offload", "--prompt", "x", "--out", str(tmp_path)]
    assert main(argv) == 1
    assert "--offload" in capsys.readouterr().err


def test_offload_calls_diffusers_model_cpu_offload_on_the_device(monkeypatch):
    from accel.pipelines import loading

    calls = []

    class Pipe:
        def enable_model_cpu_offload(self, device=None):
            calls.append(device)

        def to(self, device):
            raise AssertionError("an offloaded pipeline is not moved whole")

    assert loading._place(Pipe(), "cuda:1", offload=True) is not None
    assert calls == ["cuda:1"]


def test_execution_device_prefers_the_offload_device():
    class Offloaded:
        device = torch.device("cpu")
        _execution_device = torch.device("cuda", 0)

    assert execution_device(Offloaded()) == torch.device("cuda", 0)
    assert execution_device(build_tiny_pixart_pipeline()) == torch.device("cpu")


def test_default_steps_read_from_the_call_signature():
    class Pipe:
        def __call__(self, prompt, num_inference_steps: int = 28):
            pass

    class NoDefault:
        def __call__(self, prompt, num_inference_steps=None):
            pass

    assert default_steps(Pipe(), "org/sd3") == 28
    pixart = build_tiny_pixart_pipeline()
    expected = inspect.signature(type(pixart).__call__).parameters["num_inference_steps"].default
    assert default_steps(pixart, "some/folder") == expected
    assert default_steps(pixart, None) == BUNDLED_STEPS
    with pytest.raises(ValueError, match="--steps"):
        default_steps(NoDefault(), "org/x")


def test_eval_stores_the_resolved_step_count(tmp_path, monkeypatch):
    from accel.eval import harness

    class TwelveStepPipeline(type(build_tiny_pixart_pipeline())):
        def __call__(self, *args, num_inference_steps: int = 12, **kwargs):
            return super().__call__(*args, num_inference_steps=num_inference_steps, **kwargs)

    pipe = TwelveStepPipeline(**build_tiny_pixart_pipeline().components)
    config = EvalConfig(model="org/tiny", methods=("full",), prompts=("red apple",), metrics=("psnr",))
    context = harness.build_context(config, tmp_path, pipe=pipe)
    assert config.steps is None and context.config.steps == 12


def test_height_and_width_reach_the_pipeline(variant_dir, tmp_path, one_thread):  # noqa: F811
    argv = ["generate", "--model", str(variant_dir), "--variant", "fp16", "--steps", "2", "--prompt", "x"]
    assert main([*argv, "--height", "24", "--width", "40", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("*.png")
    assert Image.open(path).size == (40, 24)
    with pytest.raises(ValueError, match="height must be a positive"):
        EvalConfig(height=0)
    assert EvalConfig(height=32, pipeline_kwargs={"x": 1}).call_overrides == {"x": 1, "height": 32}


def test_help_shows_the_step_default_and_new_flags(capsys):
    for command in ("eval", "generate", "search"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "num_inference_steps" in text, command
        for flag in ("--variant", "--revision", "--offload", "--height", "--width"):
            assert flag in text, (command, flag)


def test_peak_memory_on_cuda_excludes_what_was_allocated_before(monkeypatch):
    from accel.eval import cost

    counters = {"allocated": 500, "peak": 0}

    def run():
        counters["peak"] = counters["allocated"] + 300  # the call allocates 300 bytes at its peak

    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: counters["allocated"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: counters.update(peak=0))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: counters["peak"])
    cuda = cost.peak_memory(run, "cuda")
    assert cuda["peak_bytes"] == 300 and cuda["total_peak_bytes"] == 800
    cpu = cost.peak_memory(lambda: torch.ones(1000), "cpu")
    assert cpu["what"].startswith(cost.PEAK_WHAT) and cuda["what"].startswith(cost.PEAK_WHAT)
    assert cpu["peak_bytes"] >= 4000


def test_a_command_that_loads_its_model_itself_has_no_loading_flags(capsys):
    from accel.bench.__main__ import main as bench_main

    with pytest.raises(SystemExit):
        bench_main(["model", "--help"])
    text = capsys.readouterr().out
    assert "--device" in text and not any(flag in text for flag in ("--variant", "--revision", "--offload"))


def test_search_takes_the_loading_flags_and_the_pipeline_step_default(variant_dir, tmp_path, monkeypatch):
    from accel.caching.search import runner

    seen = []

    def search(pipe, prompts, config, out, resume=True, call_kwargs=None, info=None):
        seen.append((config.evaluation.num_steps, dict(call_kwargs), default_steps(pipe, str(variant_dir))))
        return []  # an empty front: nothing to print

    monkeypatch.setattr(runner, "search", search)
    argv = [
        "search",
        "--model",
        str(variant_dir),
        "--variant",
        "fp16",
        "--height",
        "24",
        "--width",
        "40",
        "--algorithm",
        "dp",
    ]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    assert main([*argv, "--steps", "7", "--out", str(tmp_path / "b")]) == 0
    (steps, kwargs, signature_default), (given, _, _) = seen
    assert steps == signature_default and given == 7
    assert kwargs["height"] == 24 and kwargs["width"] == 40
