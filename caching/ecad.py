"""ECAD's published caching schedules as :class:`~accel.caching.Schedule` values.

ECAD (Evolutionary Caching to Accelerate Your Off-the-Shelf Diffusion Model, Aggarwal et al. 2025) saves each
schedule it finds as JSON::

    {"cache_schedule": {"num_blocks": 28, "num_inference_steps": 20, "name": "...", "attributes": {...},
                        "schedule": {"000": {"0": {"attn1": true, "attn2": false, "ff": true}, "1": {...}, ...},
                                     "001": {...}, ...}},
     "config": {...}, "metrics": {...}}

``true`` recomputes the component at that step, ``false`` returns the output it cached at the last step that
computed it (accel's ``reuse="output"``). Steps are zero-padded, blocks are keyed by their index. ECAD computes
a reused component when nothing is cached yet (some of its schedules reuse at step 0); accel's engine does the
same and says so once.

PixArt-α and PixArt-Σ schedules (components ``attn1``, ``attn2``, ``ff``) load; FLUX schedules name a
single-block component (``single_proj_out``, the output projection) that accel's FLUX adapter does not cache
separately, and are refused with that reason.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from accel.caching.schedule import Schedule, read_json

#: ECAD's PixArt component names -> accel's
PIXART_COMPONENTS = {"attn1": "self_attn", "attn2": "cross_attn", "ff": "ffn"}
FLUX_MARKERS = ("full_attn", "single_attn", "single_proj_out")


def schedule_from_ecad(data: dict, source: str = "ECAD schedule") -> Schedule:
    """The :class:`Schedule` of ECAD's JSON form ``data`` (see the module docstring).

    Raises:
        ValueError: not ECAD's layout, a step or block missing, a value not a boolean, or a FLUX schedule.
    """
    if not isinstance(data, dict) or not isinstance(data.get("cache_schedule"), dict):
        raise ValueError(f"{source}: not an ECAD schedule (expected a JSON object with 'cache_schedule')")
    body = data["cache_schedule"]
    missing = [key for key in ("num_blocks", "num_inference_steps", "schedule") if key not in body]
    if missing:
        raise ValueError(f"{source}: cache_schedule lacks {missing}")
    steps, blocks, table = int(body["num_inference_steps"]), int(body["num_blocks"]), body["schedule"]
    if "num_single_blocks" in body or _names(table) & set(FLUX_MARKERS):
        raise ValueError(
            f"{source}: a FLUX schedule; ECAD caches FLUX's single-block output projection (single_proj_out) on its "
            "own, which accel's FLUX adapter does not (its single blocks cache joint_attn and mlp), so it cannot be "
            "run with its meaning"
        )
    by_step = {int(key): value for key, value in table.items()}
    if sorted(by_step) != list(range(steps)):
        raise ValueError(f"{source}: schedule must have steps 0..{steps - 1}, got {sorted(by_step)}")
    mask = np.zeros((steps, blocks, len(PIXART_COMPONENTS)), dtype=bool)
    for step, row in by_step.items():
        if not isinstance(row, dict) or sorted(int(block) for block in row) != list(range(blocks)):
            raise ValueError(f"{source}: step {step} must list blocks 0..{blocks - 1}")
        for block, parts in row.items():
            for c, name in enumerate(PIXART_COMPONENTS):
                value = parts.get(name) if isinstance(parts, dict) else None
                if not isinstance(value, bool):
                    raise ValueError(f"{source}: step {step} block {block}: {name!r} must be true or false")
                mask[step, int(block), c] = value
    provenance = {
        "generator": "ecad",
        "name": body.get("name"),
        "attributes": body.get("attributes", {}),
        "ecad_config": data.get("config", {}),
        "source": source,
    }
    return Schedule(
        mask=mask,
        components=tuple(PIXART_COMPONENTS.values()),
        model_class="PixArtTransformer2DModel",
        reuse="output",
        provenance=provenance,
        metrics=dict(data.get("metrics") or {}),
    )


def load_ecad(path: str | Path) -> Schedule:
    """Read ECAD's schedule JSON file ``path`` (see :func:`schedule_from_ecad`)."""
    return schedule_from_ecad(read_json(path, "ECAD schedule file"), source=str(path))


def _names(table: dict) -> set[str]:
    return {name for row in table.values() if isinstance(row, dict) for parts in row.values() for name in parts}
