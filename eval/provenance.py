"""What an evaluation run was: the ``run`` section of ``results.json`` (model, settings, prompts, seeds, versions,
device), so that every number in a report can be traced to what made it."""

from __future__ import annotations

import hashlib
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch


def versions() -> dict:
    """Versions of everything that shapes the numbers."""
    import accelerate
    import diffusers
    import transformers

    import accel

    found = {
        "accel": accel.__version__,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "python": sys.version.split()[0],
    }
    try:
        import torchmetrics

        found["torchmetrics"] = torchmetrics.__version__
    except ImportError:
        pass
    return found


def describe_device(device: torch.device) -> str:
    """E.g. ``"cuda: NVIDIA H100 80GB HBM3"`` or ``"cpu: x86_64, 2 threads"``."""
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"{device.type}: {platform.machine()}, {torch.get_num_threads()} threads"


def _file_sha256(source: str) -> str | None:
    path = Path(source)
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def provenance(context: Any) -> dict:
    """What the run was: model, settings, prompts, seeds, what a sample is (and a clip's frames), the metrics,
    versions, device.

    Args:
        context: the run's :class:`accel.eval.harness.RunContext`, its full-compute trial scored.
    """
    config = context.config
    clips = context.media == "video" and context.reference is not None
    return {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": context.model_fingerprint,
        "transformer_class": type(getattr(context.pipe, "transformer", None)).__name__,
        "config": config.to_dict(),
        "pipeline_call_kwargs": context.kwargs,
        "guidance_scale": context.guidance_scale,
        "prompts_source": config.prompts_source,
        "prompts_file_sha256": _file_sha256(config.prompts_source),
        "prompts_sha256": config.prompts_sha256,
        "seeds": list(config.seeds),
        "media": context.media,
        **({"frames": context.reference.shape[1]} if clips else {}),
        "metrics": list(context.suite.keys),
        "versions": versions(),
        "device": describe_device(torch.device(context.pipe.device)),
        "num_processes": context.state.num_processes,
    }
