"""Helpers of the evaluation tests: a small, fast run on the tiny PixArt pipeline."""

from __future__ import annotations

import pytest
import torch

from accel.eval.config import EvalConfig
from accel.eval.cost import TimingConfig

PROMPTS = ("a red apple", "a blue car", "a green tree", "the sun")


@pytest.fixture
def one_thread():
    """One torch thread: the tiny models run ~50x faster on a busy CPU than with several threads spinning."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
