"""End-to-end runs of a pipeline for the sparse-attention search (:mod:`accel.sparse.offline`) and benchmark: its
decoded output (:func:`run_pipeline`), a plan's PSNR and SSIM against the dense output (:func:`compare_to_dense`,
:func:`check_plans`), and the token grid one transformer call sees (:func:`grid_of_call`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from accel.api import apply, resolve
from accel.plan import Plan
from accel.sparse.apply import SparseAttentionConfig, call_grid
from accel.sparse.patterns import TokenGrid


def run_pipeline(pipe: Any, prompts: Sequence[str], steps: int, seed: int, call_kwargs: dict | None) -> torch.Tensor:
    """The pipeline's decoded output for ``prompts`` (prompt ``i`` seeded ``seed + i``), float in [0, 1]:
    ``(N, 3, H, W)`` images or ``(N, F, 3, H, W)`` videos."""
    from accel.eval.generation import generate

    kwargs = {"output_type": "pt", **(call_kwargs or {})}
    guidance = kwargs.pop("guidance_scale", None)
    if guidance is None:  # the pipeline's own default
        return _call(pipe, prompts, steps, seed, kwargs)
    return generate(pipe, prompts, [seed + i for i in range(len(prompts))], steps, guidance, kwargs)


def _call(pipe: Any, prompts: Sequence[str], steps: int, seed: int, kwargs: dict) -> torch.Tensor:
    generators = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    output = pipe(list(prompts), num_inference_steps=steps, generator=generators, **kwargs)
    result = output.frames if hasattr(output, "frames") else output.images
    return result.float().clamp(0, 1).cpu()


def compare_to_dense(candidate: torch.Tensor, dense: torch.Tensor) -> dict[str, float]:
    """PSNR (dB, over each sample, averaged) and SSIM (over frames) of ``candidate`` against ``dense``."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    from accel.eval.metrics import psnr

    frames = (lambda t: t.flatten(0, 1)) if candidate.ndim == 5 else (lambda t: t)
    return {
        "psnr": float(psnr(candidate, dense).mean()),
        "ssim": float(structural_similarity_index_measure(frames(candidate), frames(dense), data_range=1.0)),
    }


def check_plans(
    pipe: Any,
    plans: Sequence[Plan],
    prompts: Sequence[str],
    steps: int,
    seed: int,
    call_kwargs: dict | None,
    dense: torch.Tensor | None = None,
) -> list[dict[str, float]]:
    """PSNR/SSIM of each plan's output against the dense output of the same prompts and seeds (``dense``, when
    the caller has it already)."""
    if dense is None:
        dense = run_pipeline(pipe, prompts, steps, seed, call_kwargs)
    results = []
    for plan in plans:
        with apply(pipe, SparseAttentionConfig(plan=plan)):
            results.append(compare_to_dense(run_pipeline(pipe, prompts, steps, seed, call_kwargs), dense))
    return results


def grid_of_call(pipe: Any, prompts: Sequence[str], call_kwargs: dict | None) -> TokenGrid:
    """The token grid of one transformer call of ``pipe`` with ``call_kwargs`` (one 1-step call, listened to)."""
    target = resolve(pipe)
    seen: list[TokenGrid] = []

    def listen(args: tuple, kwargs: dict) -> None:
        seen.append(call_grid(target, args, kwargs))
        raise _Stop

    target.tracker.acquire()
    target.tracker.add_call_listener(listen)
    try:
        run_pipeline(pipe, prompts[:1], 1, 0, call_kwargs)
    except _Stop:
        pass
    finally:
        target.tracker.remove_call_listener(listen)
        target.tracker.release()
    return seen[0]


class _Stop(Exception):
    """Ends a pipeline call once the first transformer call has shown its grid."""
