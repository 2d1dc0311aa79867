"""``--device``, ``--dtype`` and ``--compile`` on every command that runs a model, parsed and checked in one place
(:class:`accel.eval.runtime.RuntimeConfig`), before anything is loaded or computed."""

import argparse

import pytest
import torch

from accel.bench.__main__ import main as bench_main
from accel.cli import main
from accel.eval.config import EvalConfig, add_config_arguments, config_from_args
from accel.eval.runtime import RuntimeConfig

#: every command that runs a model, with the arguments it needs besides the runtime flags
COMMANDS = {
    "generate": ["generate", "--prompt", "red apple", "--steps", "2"],
    "eval": ["eval", "--methods", "full", "--steps", "2"],
    "demo": ["demo", "--methods", "full", "--steps", "2"],
    "search": ["search", "--algorithm", "dp", "--steps", "4"],
}
BENCHMARKS = {"model": ["model", "--samples", "2"], "search": ["search", "--images", "2"]}


class Stop(ValueError):
    """Raised by a stand-in loader once it has recorded its arguments (a ValueError: the CLI prints it)."""


def _run(kind: str, name: str, tmp_path, *flags: str) -> int:
    if kind == "command":
        return main([*COMMANDS[name], "--out", str(tmp_path / "out"), *flags])
    return bench_main([*BENCHMARKS[name], *flags] + (["--front", str(tmp_path / "front")] if name == "search" else []))


ALL = [("command", name) for name in COMMANDS] + [("bench", name) for name in BENCHMARKS]


@pytest.fixture
def loaders(monkeypatch):
    """Stand-ins for every pipeline loader: they record what they were asked for, then stop the command."""
    calls = []

    def load(model=None, torch_dtype=torch.float32, device="cpu", **options):  # options: variant, revision, offload
        calls.append({"device": str(device), "dtype": torch_dtype})
        raise Stop("stopped after loading")

    monkeypatch.setattr("accel.pipelines.loading.load_pipeline", load)
    monkeypatch.setattr("accel.bench.model.load_default_pipeline", load)
    return calls


def test_dtype_names_short_and_long():
    for short, long in (("bf16", "bfloat16"), ("fp16", "float16"), ("fp32", "float32")):
        assert RuntimeConfig(dtype=short).dtype == long == RuntimeConfig(dtype=long).dtype
    assert RuntimeConfig(dtype="BF16").torch_dtype is torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype 'int8'; use bf16, fp16 or fp32"):
        RuntimeConfig(dtype="int8")


def test_devices_are_parsed_then_checked_against_this_machine(monkeypatch):
    assert RuntimeConfig(device="cpu").check() == torch.device("cpu")
    for name in ("tpu", "cuda:x", "meta"):
        with pytest.raises(ValueError, match=f"unknown device '{name}'; use cpu, cuda, mps, xpu"):
            RuntimeConfig(device=name)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"device 'cuda' is not available: this torch \(.*\) "):
        RuntimeConfig(device="cuda").check()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert RuntimeConfig(device="cuda:1").check() == torch.device("cuda:1")
    with pytest.raises(ValueError, match=r"'cuda:2' is not available: this machine has 2 CUDA devices"):
        RuntimeConfig(device="cuda:2").check()


def test_flags_come_from_the_config_and_compile_is_a_switch():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, EvalConfig)
    config = config_from_args(parser.parse_args(["--device", "cpu", "--dtype", "bf16", "--compile"]))
    assert config.runtime == RuntimeConfig(device="cpu", dtype="bfloat16", compile=True)
    assert config_from_args(parser.parse_args(["--compile", "false"])).runtime.compile is False
    assert config_from_args(parser.parse_args([])).runtime == RuntimeConfig()
    loading = {"variant": None, "revision": None, "offload": False}
    assert config.to_dict()["runtime"] == {"device": "cpu", "dtype": "bfloat16", "compile": True, **loading}


@pytest.mark.parametrize("kind,name", ALL)
def test_every_command_has_the_runtime_flags(kind, name, capsys):
    with pytest.raises(SystemExit):
        (main([name, "--help"]) if kind == "command" else bench_main([name, "--help"]))
    usage = capsys.readouterr().out
    assert all(flag in usage for flag in ("--device", "--dtype", "--compile"))


@pytest.mark.parametrize("kind,name", ALL)
def test_a_missing_device_is_one_line_before_anything_loads(kind, name, tmp_path, capsys, monkeypatch, loaders):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _run(kind, name, tmp_path, "--device", "cuda") == 1
    error = capsys.readouterr().err.strip()
    assert "device 'cuda' is not available" in error and len(error.splitlines()) == 1
    assert _run(kind, name, tmp_path, "--device", "gpu") == 1
    error = capsys.readouterr().err.strip()
    assert "unknown device 'gpu'" in error and len(error.splitlines()) == 1
    assert loaders == [] and not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind,name", ALL)
def test_every_command_loads_the_model_where_it_is_told(kind, name, tmp_path, capsys, monkeypatch, loaders):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    if name == "eval" or name == "demo":  # accelerate's PartialState would initialise CUDA for real
        monkeypatch.setattr(
            "accelerate.PartialState", lambda cpu=False: argparse.Namespace(num_processes=1, is_main_process=True)
        )
    assert _run(kind, name, tmp_path, "--device", "cuda:0", "--dtype", "bf16") == 1
    assert "stopped after loading" in capsys.readouterr().err
    assert loaders == [{"device": "cuda:0", "dtype": torch.bfloat16}]


@pytest.mark.parametrize("kind,name", ALL)
def test_compile_compiles_the_loaded_pipeline_blocks(kind, name, tmp_path, capsys, monkeypatch):
    compile_module = pytest.importorskip("accel.compile")  # added by the compile-safe core (issue 11)
    compiled = []
    monkeypatch.setattr("accel.pipelines.loading.load_pipeline", lambda *a, **k: "the pipeline")
    monkeypatch.setattr("accel.bench.model.load_default_pipeline", lambda *a, **k: "the pipeline")

    def compile_blocks(pipe, **kwargs):
        compiled.append((pipe, kwargs))
        raise Stop("stopped after compiling")

    monkeypatch.setattr(compile_module, "compile_blocks", compile_blocks)
    assert _run(kind, name, tmp_path, "--compile") == 1
    # room for the recompiles of every method one run compares
    limit = {"recompile_limit": compile_module.COMPARISON_RECOMPILE_LIMIT}
    assert "stopped after compiling" in capsys.readouterr().err and compiled == [("the pipeline", limit)]
