"""The calibration's knobs and reachability, the scores, the table and the JSON headline of ``python -m accel.bench
tokens`` (:mod:`accel.bench.tokens`).

A row *reaches* its target when the calibration predicts its runtime within :data:`TOLERANCE` of the target's
share of full compute's. A knob clamped at its fastest setting (a budget of 0.05, two steps, the longest FORA
interval, the front's fastest member) misses a lower target that way, and the calibration says it was clamped. A
row that misses is flagged ``unreachable`` in the table, and its headline PSNR is ``null`` in the JSON line (its
measured numbers stay under ``details``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from accel.bench.tokens import Model
    from accel.caching import Front

#: how far (a share of the target) a row's predicted runtime may miss its target and still count as reaching it
TOLERANCE = 0.1
#: the headline's per-target tags
TAGS = {0.5: "50", 0.25: "25"}


def frames_of(samples: torch.Tensor) -> torch.Tensor:
    """Images ``(N, 3, H, W)`` as they are, clips ``(N, F, 3, H, W)`` as ``(N * F, 3, H, W)`` frames."""
    return samples.flatten(0, 1) if samples.ndim == 5 else samples


def psnr_of(samples: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean PSNR (dB) of the images or frames of ``samples`` in [0, 1] against ``reference``'s."""
    from accel.eval.metrics import psnr

    return float(psnr(frames_of(samples).float(), frames_of(reference).float(), 1.0).mean())


def reaches(ratio: float, target: float) -> bool:
    """Whether a row whose predicted runtime is ``ratio`` of full compute's reaches ``target`` (a share of full
    compute's runtime): within :data:`TOLERANCE` of it."""
    return abs(ratio - target) <= TOLERANCE * target


@dataclass(frozen=True)
class Knob:
    """One method's knob in the calibration.

    Attributes:
        values: the settings it may take.
        fastest: the fastest of them (a row clamped there may miss its target).
        predict: a setting's predicted runtime ratio (to full compute's).
    """

    values: Sequence
    fastest: Any
    predict: Callable[[Any], float]

    def pick(self, target: float) -> Any:
        """The setting predicted closest to ``target``."""
        return min(self.values, key=lambda value: abs(self.predict(value) - target))


@dataclass(frozen=True)
class FrontKnob(Knob):
    """The member index of a searched caching front, picked by quality (the front's ``psnr`` metric).

    Attributes:
        front: the front.
    """

    front: Front | None = None

    def __post_init__(self):
        if self.front is None:
            raise TypeError("FrontKnob needs the front its member indices point into")

    def pick(self, target: float) -> int:
        """The best-quality member predicted within :data:`TOLERANCE` of ``target``; if none is, the member
        predicted closest to it."""
        near = [i for i in self.values if reaches(self.predict(i), target)]
        if not near:
            return super().pick(target)
        return max(near, key=lambda i: self.front.schedules[i].metrics.get("psnr", -np.inf))


class Scores:
    """PSNR/SSIM against full compute, FID/KID against a full-compute reference, alignment, motion."""

    def __init__(self, model: Model, full: torch.Tensor, reference: torch.Tensor):
        from accel.eval.alignment import load_alignment_scorer

        self.model, self.full = model, full
        self.scorer = load_alignment_scorer()
        self.real = self._features(reference)[:, -1280:]

    def _features(self, samples: torch.Tensor) -> torch.Tensor:
        frames = frames_of(samples).float()
        with torch.no_grad():
            return torch.cat([self.scorer.frozen_image_features(frames[i : i + 64]) for i in range(0, len(frames), 64)])

    def __call__(self, samples: torch.Tensor) -> dict:
        """The scores of ``samples`` (one per prompt, in the model's prompt order, like the full-compute ones):
        ``psnr`` (dB) and ``ssim`` against full compute, ``fid`` and ``kid`` against the reference run,
        ``alignment`` (100 x mean image-prompt cosine) and, for clips, ``motion`` (accuracy of the motion the
        prompt names)."""
        from torchmetrics.functional.image import structural_similarity_index_measure as ssim

        from accel.eval.fid import FidKidConfig, fid_kid_from_features

        frames, full = frames_of(samples).float(), frames_of(self.full).float()
        features = self._features(samples)
        fid = fid_kid_from_features(self.real.double(), features[:, -1280:].double(), "E", FidKidConfig())
        per_frame = samples.shape[1] if samples.ndim == 5 else 1
        prompts = [p for p in self.model.prompts for _ in range(per_frame)]
        with torch.no_grad():
            images = self.scorer.heads.embed_image_features(features.float())
            texts = self.scorer.embed_prompts(prompts)
        row = {
            "psnr": psnr_of(samples, self.full),
            "ssim": float(ssim(frames, full, data_range=1.0)),
            "fid": fid["FID-E"],
            "kid": fid["KID-E"],
            "alignment": float(100 * (images * texts).sum(-1).mean()),
        }
        if samples.ndim == 5:
            from accel.eval.motion import load_motion_scorer, motion_accuracy

            row["motion"] = motion_accuracy(load_motion_scorer(), samples, self.model.prompts)["accuracy"]
        return row


def print_table(model: Model, steps: int, rows: dict) -> None:
    """One line per row: ``pred`` is the calibration's predicted runtime share, ``unreachable`` flags a row that
    misses its target (see the module docstring)."""
    print(f"\n{model.name} model: {len(model.prompts)} prompts, {steps} steps, {model.tokens} tokens per sample")
    motion = model.name == "video"
    header = f"{'method':<17}{'target':>7}{'pred':>6}{'tokens':>7}{'speedup':>8}{'PSNR':>7}{'SSIM':>7}{'FID':>8}"
    print(header + f"{'KID':>8}{'align':>7}" + ("  motion" if motion else ""))
    for name, row in rows.items():
        tokens = f"{row['token_steps']:.2f}" if "token_steps" in row else "-"
        line = (
            f"{name:<17}{row['target']:>7.2f}{row.get('predicted', 1.0):>6.2f}{tokens:>7}{row['speedup']:>8.2f}"
            f"{row['psnr']:>7.2f}{row['ssim']:>7.3f}{row['fid']:>8.2f}{row['kid']:>8.4f}{row['alignment']:>7.2f}"
        )
        line += f"  {row['motion']:.2f}" if motion else ""
        print(line + ("" if row.get("reached", True) else "  unreachable"))
    if not any(name.startswith("front-") for name in rows):
        print(f"{model.name}: no searched caching front for this model: its caching rows are FORA")


def print_active(name: str, rows: dict) -> None:
    """The per-step active fraction of every row that records one (``ours@50``, ``ours@25``)."""
    for row_name, row in rows.items():
        if "active" in row:
            fractions = " ".join(f"{value:.2f}" for value in row["active"])
            print(f"{name} {row_name}: active fraction per step ({len(row['active'])} ran): {fractions}")


def print_heat_map(name: str, heat: dict | None) -> None:
    """Per-token step counts of the first sample, as digits (``+`` for 10 or more), frame by frame."""
    if not heat:
        return
    counts = np.asarray(heat["counts"])
    asked, ran = heat["steps"]
    print(f"{name}: steps computed per token of sample 0 at the 25% point ({ran} of {asked} ran), frames side by side")
    frames = [["".join(str(v) if v < 10 else "+" for v in line) for line in frame] for frame in counts]
    for row in range(counts.shape[1]):
        print("  " + " ".join(frame[row] for frame in frames))


def _psnr(row: dict) -> float | None:
    """A row's headline PSNR: ``None`` when it does not reach its target."""
    return round(row["psnr"], 2) if row.get("reached", True) else None


def _cache_row(at: dict[str, dict]) -> str | None:
    """The better (by PSNR) of the caching rows (``fora-k``, ``front-i``) at one target that reach it."""
    cached = [name for name, row in at.items() if name.startswith(("fora-", "front-")) and row.get("reached", True)]
    return max(cached, key=lambda name: at[name]["psnr"], default=None)


def headline(rows: dict, prefix: str = "") -> dict:
    """The issue's keys from one model's rows (``prefix`` before each): per target, our, RAS's, fewer steps' and
    the caching baseline's PSNR and measured speed-up, and ours at the fewer-steps row's runtime (``matched_*``);
    ``cache_row_at_*`` names the caching row (the better of FORA and the searched front's member, FORA alone where
    the model has no front); a PSNR is ``None`` where the row does not reach the target."""
    result = {}
    for target, tag in TAGS.items():
        at = {name.split("@")[0]: row for name, row in rows.items() if row["target"] == target}
        steps = next(row for name, row in at.items() if name.startswith("steps-"))
        cache = _cache_row(at)
        result.update({
            f"{prefix}psnr_at_{tag}": _psnr(at["ours"]),
            f"{prefix}own_psnr_at_{tag}": _psnr(at["ours-own"]),
            f"{prefix}ras_psnr_at_{tag}": _psnr(at["ras"]),
            f"{prefix}steps_psnr_at_{tag}": _psnr(steps),
            f"{prefix}cache_psnr_at_{tag}": None if cache is None else _psnr(at[cache]),
            f"{prefix}cache_row_at_{tag}": cache,
            f"{prefix}speedup_at_{tag}": round(at["ours"]["speedup"], 2),
            f"{prefix}ras_speedup_at_{tag}": round(at["ras"]["speedup"], 2),
            f"{prefix}steps_speedup_at_{tag}": round(steps["speedup"], 2),
            f"{prefix}cache_speedup_at_{tag}": None if cache is None else round(at[cache]["speedup"], 2),
            f"{prefix}matched_psnr_at_{tag}": _psnr(at["ours-at-steps"]),
            f"{prefix}matched_speedup_at_{tag}": round(at["ours-at-steps"]["speedup"], 2),
            f"{prefix}all_steps_psnr_at_{tag}": _psnr(at["ours-all-steps"]),
            f"{prefix}all_steps_speedup_at_{tag}": round(at["ours-all-steps"]["speedup"], 2),
        })  # fmt: skip
    return result
