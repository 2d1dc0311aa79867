"""CacheQuant's decoupled error correction as plain tensor maths: per-channel linear fits ``y ~ a x + b``.

For every (step, block, component) a quantized component computes at, calibration pairs its quantized output
``x`` with the full-precision output ``y`` of the same component on the same inputs, along the trajectory the
caching schedule produces. Per output channel, the least-squares line is ``a = cov(y, x) / var(x)``,
``b = mean(y) - a mean(x)``: one scale and one shift per channel, fitted independently of every other channel,
step and component. The correction is decoupled from the cache: it removes the quantization error of what a
step computes, so what the cache stores (and reuses or extrapolates at later steps) is the corrected value,
and the caching error stays the schedule's. (Fitting ``x`` to the full-precision outputs of every step of its
reuse window instead, to absorb the caching error too, was measured on the bundled model and made images
worse at every window: the fitted slopes shrink towards the channel means.)

:class:`CorrectionStatistics` keeps only sufficient statistics (counts and sums in float64), so calibration
memory does not grow with the number of prompts or tokens; :func:`fit_lines` turns them into coefficients.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

#: a channel whose calibration inputs vary less than this (relative to their magnitude) keeps scale 1 and gets
#: only the mean shift: its slope is not identifiable
MIN_RELATIVE_VARIANCE = 1e-10


@dataclass
class CorrectionStatistics:
    """Running sums for the per-channel fits, keyed by ``(step, block, component)``.

    Each entry is a float64 ``(5, channels)`` tensor of ``(n, sum x, sum y, sum x^2, sum x y)``.
    """

    sums: dict[tuple[int, int, int], torch.Tensor] = field(default_factory=dict)

    def update(self, key: tuple[int, int, int], x: torch.Tensor, y: torch.Tensor) -> None:
        """Add the pairs of rows of ``x`` and ``y`` (same shape ``(..., channels)``) to ``key``'s sums."""
        if x.shape != y.shape:
            raise ValueError(f"x and y must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
        x = x.detach().reshape(-1, x.shape[-1]).double()
        y = y.detach().reshape(-1, y.shape[-1]).double()
        rows = torch.full((x.shape[1],), float(x.shape[0]), dtype=torch.float64, device=x.device)
        update = torch.stack([rows, x.sum(0), y.sum(0), (x * x).sum(0), (x * y).sum(0)]).cpu()
        if key in self.sums and self.sums[key].shape != update.shape:
            raise ValueError(f"{key}: {update.shape[1]} channels, earlier {self.sums[key].shape[1]}")
        self.sums[key] = self.sums[key] + update if key in self.sums else update

    def coefficients(
        self, steps: int, blocks: int, components: int, channels: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(scale, shift, fitted)``: float32 ``(steps, blocks, components, channels)`` arrays of ``a`` and
        ``b`` (1 and 0 where nothing was fitted or a component has fewer channels), and a bool
        ``(steps, blocks, components)`` array of where a fit exists."""
        scale = np.ones((steps, blocks, components, channels), dtype=np.float32)
        shift = np.zeros_like(scale)
        fitted = np.zeros((steps, blocks, components), dtype=bool)
        for (step, block, component), sums in self.sums.items():
            a, b = fit_lines(sums)
            width = a.shape[0]
            scale[step, block, component, :width] = a.numpy()
            shift[step, block, component, :width] = b.numpy()
            fitted[step, block, component] = True
        return scale, shift, fitted


def fit_lines(sums: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel least-squares lines from ``(5, channels)`` sums ``(n, sum x, sum y, sum x^2, sum x y)``.

    Returns:
        ``(a, b)``, float32 ``(channels,)``: ``a = cov(y, x) / var(x)``, ``b = mean(y) - a mean(x)``; a channel
        whose ``x`` hardly varies gets ``a = 1`` and ``b = mean(y) - mean(x)``.
    """
    n, sx, sy, sxx, sxy = sums.double()
    mean_x, mean_y = sx / n, sy / n
    variance = (sxx / n - mean_x * mean_x).clamp_min(0)
    covariance = sxy / n - mean_x * mean_y
    identifiable = variance > MIN_RELATIVE_VARIANCE * (sxx / n).clamp_min(1e-30)
    a = torch.where(identifiable, covariance / variance.clamp_min(1e-300), torch.ones_like(variance))
    b = mean_y - a * mean_x
    return a.float(), b.float()
