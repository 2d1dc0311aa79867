"""Dynamic caching policies: decisions made per sample from the features themselves.

:class:`FirstBlockPolicy` is the first-block-residual rule (as in ParaAttention's and diffusers'
FirstBlockCache), decided per sample rather than per batch: the first block always runs; a sample reuses the
cached residuals of all later blocks when its first-block residual changed, relative to the last step at
which the sample was computed, by less than ``threshold``. The later blocks run on the computing samples only
(their batch-major arguments sliced), so a batch saves compute whenever some of its samples reuse. The
classifier-free-guidance branches of one prompt decide together (``branches="paired"``, the default): a fresh
conditional output beside a reused unconditional one (or the reverse) is amplified by the guidance scale, and
on a small model computing one of two rows costs about what computing both does. The decision functions are
pure, so the search and the tests can evaluate them without a model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import torch

from accel.serialization import json_type

POLICY_TYPE = "accel.caching.FirstBlockPolicy"
POLICY_VERSION = 2  # 2: ``branches``; version 1 objects load as ``branches="own"``, how they decided


@json_type(POLICY_TYPE, (1, POLICY_VERSION))
@dataclass(frozen=True, kw_only=True)
class FirstBlockPolicy:
    """Per-sample first-block-residual caching.

    Attributes:
        threshold: relative L1 change of the first block's residual below which a sample reuses.
        warmup_steps: the first steps always compute (at least 1: nothing is cached before step 0).
        final_steps: the last steps always compute (needs the step count, known inside a pipeline call).
        max_consecutive_reuse: a sample is recomputed after this many reused steps in a row (None: no cap).
        branches: ``"paired"``: the rows of one transformer call whose first-block inputs are the same latents
            (the two halves of a batch that holds both CFG branches) decide together, from their mean change,
            and a later call of a step whose first-block input equals the step's first call's (CFG in separate
            calls, as Wan runs it) takes that call's decision; ``"own"``: every row and call decides alone.
    """

    threshold: float = 0.08
    warmup_steps: int = 1
    final_steps: int = 0
    max_consecutive_reuse: int | None = None
    branches: Literal["paired", "own"] = "paired"

    def __post_init__(self):
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)):
            raise TypeError(f"threshold must be a number >= 0, got {self.threshold!r}")
        for name in ("warmup_steps", "final_steps"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), int):
                raise TypeError(f"{name} must be a whole number, got {getattr(self, name)!r}")
        if not self.threshold >= 0:
            raise ValueError(f"threshold must be >= 0, got {self.threshold}")
        if self.warmup_steps < 1:
            raise ValueError(f"warmup_steps must be >= 1 (step 0 has nothing cached), got {self.warmup_steps}")
        if self.final_steps < 0:
            raise ValueError(f"final_steps must be >= 0, got {self.final_steps}")
        if self.branches not in ("paired", "own"):
            raise ValueError(f"branches must be 'paired' or 'own', got {self.branches!r}")
        if self.max_consecutive_reuse is not None and self.max_consecutive_reuse < 1:
            raise ValueError(f"max_consecutive_reuse must be >= 1 or None, got {self.max_consecutive_reuse}")

    def to_dict(self) -> dict:
        """Versioned JSON-ready form."""
        return {"type": POLICY_TYPE, "version": POLICY_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict) -> FirstBlockPolicy:
        """Parse :meth:`to_dict` output (version 1, from before ``branches``, as ``branches="own"``)."""
        if data.get("type") != POLICY_TYPE or data.get("version") not in (1, POLICY_VERSION):
            raise ValueError(f"not a {POLICY_TYPE} version 1 or {POLICY_VERSION} object")
        fields = {k: v for k, v in data.items() if k not in ("type", "version")}
        if data["version"] == 1:
            fields.setdefault("branches", "own")
        try:
            return cls(**fields)
        except TypeError as error:
            raise ValueError(f"bad {POLICY_TYPE}: {error}") from None


def relative_change(current: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor | None:
    """Per-sample ``mean|current - previous| / mean|previous|``; shape ``(batch,)``. None if no previous."""
    if previous is None or previous.shape != current.shape:
        return None
    dims = tuple(range(1, current.ndim))
    difference = (current.float() - previous.float()).abs().mean(dim=dims)
    scale = previous.float().abs().mean(dim=dims).clamp_min(1e-12)
    return difference / scale


def same_halves(rows: torch.Tensor) -> torch.Tensor:
    """0-dim bool tensor on ``rows``' device: whether the two halves of ``rows`` (batch first) are equal, one
    batch holding both CFG branches of the same latents (read on the host with the decision's other values)."""
    half = rows.shape[0] // 2
    if rows.shape[0] % 2 or half == 0:
        return torch.zeros((), dtype=torch.bool, device=rows.device)
    return (rows[:half] == rows[half:]).all()


def paired_change(change: torch.Tensor) -> torch.Tensor:
    """``(batch, ...)`` per-row values (changes, scores) with each row of the first half and its partner in the
    second half given their mean, so the pair decides together."""
    half = change.shape[0] // 2
    mean = (change[:half] + change[half:]) / 2
    return torch.cat([mean, mean])


def first_block_decision(
    policy: FirstBlockPolicy,
    step: int,
    num_steps: int | None,
    change: torch.Tensor | None,
    consecutive_reuse: torch.Tensor | None,
    batch: int,
) -> torch.Tensor:
    """Which samples compute the remaining blocks at ``step``: bool ``(batch,)``, True = compute.

    Args:
        change: :func:`relative_change` of each sample's first-block residual, or None (no history).
        consecutive_reuse: int ``(batch,)`` steps each sample has reused in a row, or None.
    """
    if change is None or step < policy.warmup_steps:
        return torch.ones(batch, dtype=torch.bool)
    if num_steps is not None and step >= num_steps - policy.final_steps:
        return torch.ones(batch, dtype=torch.bool)
    compute = ~(change < policy.threshold).cpu()  # a NaN or infinite change computes: it is no evidence of reuse
    if policy.max_consecutive_reuse is not None and consecutive_reuse is not None:
        compute |= consecutive_reuse.cpu() >= policy.max_consecutive_reuse
    return compute
