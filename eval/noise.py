"""The noise model: how far apart two runs of full compute land, and what counts as a difference beyond it.

Run-to-run noise is measured, not assumed: full compute is run with several seed sets (the same prompts, other
starting noise) and the noise of a metric is the spread (max - min) of its values over them
(:func:`run_to_run_noise`). Then, with the rows of a comparison (``speedup``, ``psnr`` and, when measured,
``fid`` and ``prompt_score`` per method):

* a method *dominates* another (:func:`dominates`) when it is at least as fast, has higher PSNR, and its FID and
  prompt score are no worse than the other's beyond the noise;
* a method is *within noise* of full compute (:func:`within_noise`) when its FID and prompt score are worse
  than full compute's by at most the noise (better is within).

:func:`paired_standard_error` says how much of a prompt-score gap the choice of prompts alone explains.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def run_to_run_noise(values: dict[str, Sequence[float]]) -> dict[str, float]:
    """Per metric, the spread (max - min) of its values over full-compute runs with different seed sets."""
    short = [name for name, runs in values.items() if len(runs) < 2]
    if short:
        raise ValueError(f"the noise of {short} needs at least two runs each")
    return {name: max(runs) - min(runs) for name, runs in values.items()}


def paired_standard_error(scores: torch.Tensor, full_scores: torch.Tensor) -> float:
    """Standard error of the mean per-prompt difference ``scores - full_scores`` (same prompts and seeds): how
    far a method's mean prompt score may sit from full compute's by the choice of prompts alone."""
    difference = (scores - full_scores).double()
    if len(difference) < 2:
        return 0.0
    return float(difference.std() / len(difference) ** 0.5)


def dominance_failures(row: dict, other: dict, noise: dict | None) -> list[str]:
    """The dominance criteria ``row`` fails against ``other``, each as a short phrase (none: it dominates)."""
    fails = []
    if row["speedup"] < other["speedup"]:
        fails.append(f"speedup {row['speedup']:.2f}x < {other['speedup']:.2f}x")
    if row["psnr"] <= other["psnr"]:
        fails.append(f"PSNR {row['psnr']:.2f} <= {other['psnr']:.2f}")
    if noise is None:
        return fails
    if row["fid"] > other["fid"] + noise["fid"]:
        fails.append(f"FID {row['fid']:.1f} > {other['fid']:.1f} + {noise['fid']:.1f}")
    if row["prompt_score"] < other["prompt_score"] - noise["prompt_score"]:
        fails.append(
            f"prompt score {row['prompt_score']:.2f} < {other['prompt_score']:.2f} - {noise['prompt_score']:.2f}"
        )
    return fails


def dominates(row: dict, other: dict, noise: dict | None) -> bool:
    """Whether ``row`` dominates ``other``: at least as fast, better PSNR, and FID and prompt score no worse
    beyond the run-to-run ``noise`` (PSNR and speed only when FID was not measured: ``noise`` None)."""
    return not dominance_failures(row, other, noise)


def why_not_dominated(rows: dict, candidates: list[str], baseline: str, noise: dict | None) -> str:
    """The nearest miss against ``baseline``: the candidate failing the fewest dominance criteria (on ties the
    closest in speed, then the higher PSNR) and those criteria."""
    fails = {m: dominance_failures(rows[m], rows[baseline], noise) for m in candidates}
    speed = rows[baseline]["speedup"]
    nearest = min(
        candidates, key=lambda m: (len(fails[m]), abs(math.log(rows[m]["speedup"] / speed)), -rows[m]["psnr"])
    )
    return f"nearest {nearest} ({rows[nearest]['speedup']:.2f}x): " + (", ".join(fails[nearest]) or "dominates")


def within(value: float, full: float, noise: float, better: str) -> bool:
    """Whether a metric's ``value`` is worse than full compute's ``full`` by at most ``noise`` (better is
    within); ``better`` is ``"higher"`` or ``"lower"``."""
    return value >= full - noise if better == "higher" else value <= full + noise


def within_noise(row: dict, full: dict, noise: dict) -> bool:
    """Whether a method's FID and prompt score are within the run-to-run noise of full compute's."""
    fid_ok = within(row["fid"], full["fid"], noise["fid"], "lower")
    return fid_ok and within(row["prompt_score"], full["prompt_score"], noise["prompt_score"], "higher")
