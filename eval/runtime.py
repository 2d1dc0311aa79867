"""Where a command's model runs: device, dtype and regional compilation, parsed and checked in one place.

Every command that runs a model (``accel eval``, ``generate``, ``demo``, ``search`` and the benchmarks) takes
``--device``, ``--dtype`` and ``--compile`` from :class:`RuntimeConfig`'s fields (through
:func:`accel.flags.add_config_arguments`), and calls :meth:`RuntimeConfig.check` before any compute, so
that a device this machine lacks ends in one clear error instead of a traceback halfway through a run.
"""

from __future__ import annotations

import json
import shlex
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

#: accepted ``--dtype`` names -> the canonical name stored in configs and results
DTYPE_NAMES = {
    "fp32": "float32",
    "float32": "float32",
    "fp16": "float16",
    "float16": "float16",
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: device types a pipeline can run on here (``cuda:1``-style indices allowed)
DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")


def canonical_dtype(name: str) -> str:
    """``"bf16"`` -> ``"bfloat16"`` (and likewise fp16, fp32 and the long names themselves)."""
    try:
        return DTYPE_NAMES[str(name).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use bf16, fp16 or fp32 (or bfloat16, float16, float32)") from None


def parse_device(name: str) -> torch.device:
    """A device string as torch reads it, restricted to :data:`DEVICE_TYPES`."""
    allowed = f"use {', '.join(DEVICE_TYPES)}, optionally with an index such as cuda:1"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"unknown device {name!r}; {allowed}") from None
    if device.type not in DEVICE_TYPES:
        raise ValueError(f"unknown device {name!r}; {allowed}")
    return device


def _unavailable(device: torch.device) -> str | None:
    """Why ``device`` cannot be used on this machine, or None."""
    if device.type == "cuda":
        if not torch.cuda.is_available():
            built = "was built without CUDA" if torch.version.cuda is None else "finds no CUDA device"
            return f"this torch ({torch.__version__}) {built}"
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            return f"this machine has {count} CUDA device{'s' if count != 1 else ''} (cuda:0 .. cuda:{count - 1})"
    elif device.type == "mps" and not torch.backends.mps.is_available():
        return f"this torch ({torch.__version__}) finds no Apple MPS device"
    elif device.type == "xpu" and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        return f"this torch ({torch.__version__}) finds no Intel XPU device"
    return None


def _help(text: str) -> dict:
    return {"help": text}


@dataclass(frozen=True, kw_only=True)
class RuntimeConfig:
    """Where and how the model runs.

    Attributes:
        device: torch device: cpu, cuda, cuda:N, mps or xpu.
        dtype: weights dtype, stored by its long name (bf16, fp16 and fp32 are read as bfloat16, float16, float32).
        compile: regional compilation: every block of the transformer compiled in place
            (:func:`accel.compile.compile_blocks`) after loading, before any method is applied.
        variant: weights variant to load (``from_pretrained(variant=...)``, e.g. fp16).
        revision: hub branch, tag or commit to load (``from_pretrained(revision=...)``).
        offload: model CPU offload (diffusers' ``enable_model_cpu_offload``): each model moves to ``device`` only
            while it runs; needs an accelerator device and accelerate.
    """

    device: str = field(default="cpu", metadata=_help("torch device: cpu, cuda, cuda:N, mps or xpu"))
    dtype: str = field(
        default="float32",
        metadata={"help": "weights dtype: bf16, fp16, fp32 (or the long names)", "parse": canonical_dtype},
    )
    compile: bool = field(
        default=False, metadata=_help("compile each transformer block (regional torch.compile) after loading")
    )
    variant: str | None = field(
        default=None, metadata=_help("weights variant, e.g. fp16 (diffusion_pytorch_model.fp16.safetensors)")
    )
    revision: str | None = field(default=None, metadata=_help("hub branch, tag or commit of --model"))
    offload: bool = field(
        default=False,
        metadata=_help(
            "model CPU offload (enable_model_cpu_offload): models wait on the CPU and move to --device only while "
            "they run; needs a GPU"
        ),
    )

    def __post_init__(self):
        object.__setattr__(self, "dtype", canonical_dtype(self.dtype))
        parse_device(self.device)
        for name in ("compile", "offload"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be true or false, got {getattr(self, name)!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        """The dtype as a ``torch.dtype``."""
        return DTYPES[self.dtype]

    def check(self) -> torch.device:
        """The device, after making sure this machine has it (call before any compute).

        Raises:
            ValueError: in one line, what is missing (no CUDA in this torch build, no such device index, ...).
        """
        device = parse_device(self.device)
        reason = _unavailable(device)
        if reason is not None:
            raise ValueError(f"device {self.device!r} is not available: {reason}")
        if self.offload:
            if device.type == "cpu":
                raise ValueError(
                    "--offload keeps the models on the CPU and moves each to the GPU while it runs: it needs "
                    "--device cuda (or another accelerator), not cpu; on a CPU leave --offload out"
                )
            import importlib.util

            if importlib.util.find_spec("accelerate") is None:
                raise ValueError("--offload needs accelerate: pip install accelerate")
        return device

    def compile_pipeline(self, pipe: Any) -> Any:
        """Compile the transformer's blocks in place when :attr:`compile` is set (with room for the recompiles of
        every method a run compares: :data:`accel.compile.COMPARISON_RECOMPILE_LIMIT`); returns ``pipe``."""
        if self.compile:
            try:
                from accel.compile import COMPARISON_RECOMPILE_LIMIT, compile_blocks
            except ModuleNotFoundError as error:
                if error.name != "accel.compile":
                    raise
                raise ValueError("--compile needs accel.compile, which this version of accel lacks") from None
            compile_blocks(pipe, recompile_limit=COMPARISON_RECOMPILE_LIMIT)
        return pipe

    def load_pipeline(self, model: str | None) -> Any:
        """:func:`accel.pipelines.loading.load_pipeline` on this device in this dtype, then compiled if asked."""
        from accel.pipelines.loading import load_pipeline

        device = self.check()
        check_model(model)
        options = {"variant": self.variant, "revision": self.revision, "offload": self.offload}
        return self.compile_pipeline(load_pipeline(model, torch_dtype=self.torch_dtype, device=str(device), **options))


def check_output_dir(path: str | Path, flag: str = "--out") -> Path:
    """``path`` as a folder this process can write in, created if missing (call before any compute).

    Raises:
        ValueError: in one line, naming ``flag``: the path is a file, or the folder cannot be created or written.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path} is a file; give a folder (created if missing)")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check-"):
            pass
    except OSError as error:
        raise ValueError(f"{flag} {path} cannot be written: {error.strerror or error}") from None
    return path


def check_model(model: str | None) -> None:
    """Raise a one-line ``ValueError`` if ``model`` names a local path that is not a loadable pipeline folder
    (missing, its ``model_index.json`` unreadable or without ``_class_name``, or a component it names without a
    folder: :func:`~accel.pipelines.loading.check_components`), before any loading. A hub id
    (``org/name``) and the bundled names pass."""
    from accel.pipelines.loading import check_components, is_bundled

    if is_bundled(model):
        return
    path = Path(model).expanduser()
    local = model.startswith((".", "/", "~")) or model.count("/") > 1 or "\\" in model or path.exists()
    if not local:
        return
    if not path.is_dir():
        raise ValueError(f"--model {model}: no such folder (a local pipeline folder, or a hub id like org/name)")
    index = path / "model_index.json"
    try:
        data = json.loads(index.read_text())
    except FileNotFoundError:
        raise ValueError(f"--model {model}: {index} is missing; not a diffusers pipeline folder") from None
    except (OSError, ValueError) as error:
        raise ValueError(f"--model {model}: {index} cannot be read as JSON ({error})") from None
    if not isinstance(data, dict) or not isinstance(data.get("_class_name"), str):
        raise ValueError(f"--model {model}: {index} names no pipeline class (_class_name); not a pipeline folder")
    try:
        check_components(path)
    except ValueError as error:
        raise ValueError(f"--model {model}: {error}") from None


def resume_command(drop: tuple[str, ...] = ()) -> str:
    """The command line this process was started with, as ``accel ...``, without the switches ``drop`` (e.g.
    ``--restart``, which would discard what an interrupted run kept): what resumes an interrupted run."""
    words = [word for word in sys.argv[1:] if word not in drop]
    name = Path(sys.argv[0]).name if sys.argv else ""
    if name in ("accel", "cli.py", "__main__.py"):
        return shlex.join(["accel", *words])
    return shlex.join([sys.argv[0], *words]) if sys.argv else "the same command"


def report_interrupted(kept: str, drop: tuple[str, ...] = ()) -> int:
    """Print the one line a command interrupted by Ctrl-C ends with: what was kept and the command that resumes
    it (:func:`resume_command`); returns the exit status for an interrupt (130)."""
    print(f"interrupted: {kept}; to resume, run: {resume_command(drop)}", file=sys.stderr)
    return 130
