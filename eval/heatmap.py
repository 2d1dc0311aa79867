"""Heat maps of per-token step counts in ``report.html``, one per per-token-steps method.

A per-token-steps trial's ``technique_stats`` (:meth:`accel.caching.TokenStepStats.to_dict`; under
``"TokenStepConfig"`` for a combined method, ``fora-2+tokens-0.5``) holds
``heat_map``: each visual token's step count averaged over the timed call's rows and branches,
``[frame][row][column]`` on the transformer's token grid. It is drawn as inline SVG: one small grid of cells per
frame (an image has one frame), white for no step and dark red for every step, so what the budget spent where is
visible beside the images; under it, one bar per step that ran for ``active``, the share of tokens it computed.
"""

from __future__ import annotations

import html

from accel.eval.report import ok_trials

#: pixels per token cell, and the widest a frame's grid is drawn
CELL, MAX_WIDTH = 8, 192


def _colour(fraction: float) -> str:
    """White (0) to dark red (1)."""
    fraction = min(max(fraction, 0.0), 1.0)
    green_blue = round(255 * (1 - fraction))
    red = round(255 - 100 * fraction)
    return f"rgb({red},{green_blue},{green_blue})"


def frame_svg(frame: list[list[float]], steps: int, title: str) -> str:
    """One frame's ``[row][column]`` step counts as an SVG grid; each cell's tooltip says its count."""
    rows, columns = len(frame), len(frame[0]) if frame else 0
    cell = max(1, min(CELL, MAX_WIDTH // max(columns, 1)))
    parts = [
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{columns * cell}' height='{rows * cell}' "
        f"role='img' aria-label='{html.escape(title)}'><title>{html.escape(title)}</title>"
    ]
    for y, row in enumerate(frame):
        for x, value in enumerate(row):
            parts.append(
                f"<rect x='{x * cell}' y='{y * cell}' width='{cell}' height='{cell}' "
                f"fill='{_colour(value / steps if steps else 0.0)}'><title>{value:.2f} steps</title></rect>"
            )
    parts.append("</svg>")
    return "".join(parts)


def active_svg(active: list[float], title: str) -> str:
    """The share of tokens each step computed, one bar per step (full height: every token); each bar's tooltip
    says its step and share."""
    width, height = 6, 32
    parts = [
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{len(active) * width}' height='{height}' role='img' "
        f"aria-label='{html.escape(title)}'><title>{html.escape(title)}</title>"
    ]
    for step, share in enumerate(active):
        bar = round(height * min(max(share, 0.0), 1.0))
        parts.append(
            f"<rect x='{step * width}' y='{height - bar}' width='{width - 1}' height='{bar}' fill='{_colour(share)}'>"
            f"<title>step {step}: {100 * share:.0f}% of tokens</title></rect>"
        )
    parts.append("</svg>")
    return "".join(parts)


def _figure(frame: list[list[float]], steps: int, method: str, index: int, video: bool) -> str:
    caption = f"<figcaption class='muted'>frame {index}</figcaption>" if video else ""
    svg = frame_svg(frame, steps, f"{method} frame {index}")
    return f"<figure style='display:inline-block;margin:2px'>{svg}{caption}</figure>"


def token_heat_maps(results: dict) -> str:
    """The report section: for each trial with a heat map, its frames' grids and its token-steps fraction;
    empty when no method allocates steps per token."""
    blocks = []
    for trial in ok_trials(results):
        stats = trial.get("technique_stats") or {}
        stats = stats.get("TokenStepConfig") or stats  # a combined method keeps each technique's stats by type
        heat = stats.get("heat_map")
        if not heat:
            continue
        steps = int(trial.get("steps") or max(v for f in heat for r in f for v in r) or 1)
        frames = "".join(_figure(frame, steps, trial["method"], i, len(heat) > 1) for i, frame in enumerate(heat))
        share = stats.get("token_steps")
        note = f"{100 * share:.0f}% of token-steps computed" if share is not None else ""
        active = stats.get("active") or []
        bars = active_svg(active, f"{trial['method']}: tokens computed per step") if active else ""
        blocks.append(
            f"<div class='heat'><p><code>{html.escape(trial['method'])}</code> "
            f"<span class='muted'>{html.escape(note)}</span></p>{frames}<p>{bars}</p></div>"
        )
    if not blocks:
        return ""
    legend = (
        "Each cell is one visual token of the transformer's grid (one grid per latent frame), coloured by how many "
        "of the steps computed it, averaged over the samples and guidance branches of the timed call: white none, "
        "dark red all; hover a cell for its count. Below each, one bar per step that ran: the share of the tokens "
        "it computed."
    )
    return f"<h2>Per-token step counts</h2><p class='muted'>{legend}</p>{''.join(blocks)}"
