"""Helpers of the evaluation tests: a small, fast run on the tiny PixArt pipeline."""

from __future__ import annotations

from accel.eval.config import EvalConfig
from accel.eval.cost import TimingConfig

PROMPTS = ("a red apple", "a blue car", "a green tree", "the sun")


def small_config(**overrides) -> EvalConfig:
    """Four prompts, 4 steps, one timed round, fidelity metrics only (unless overridden)."""
    values = dict(
        prompts=PROMPTS,
        methods=("full", "fora-2"),
        steps=4,
        batch_size=2,
        metrics=("psnr", "ssim"),
        timing=TimingConfig(warmup=0, repeats=1),
        threads=1,
    )
    return EvalConfig(**{**values, **overrides})
