"""Trial records on disk: the key that names a finished trial (what determines its outputs), why an earlier
trial cannot be reused, reading a record back, and what an interrupted run kept."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from accel.eval.methods import Method

if TYPE_CHECKING:
    from accel.eval.harness import RunContext

logger = logging.getLogger("accel.eval.harness")  # the harness's log: its messages are part of a run's story


def key_material(context: RunContext, method: Method) -> dict:
    """What determines a trial's outputs, as plain JSON: the model's identity (pipeline class, content hash of
    its weights, dtype; not the path it was loaded from), the method (and a JSON method's file content), the
    prompts, seeds, step count, guidance scale and pipeline arguments. Nothing in it changes with the thread count
    or the number of processes."""
    config = context.config
    model = {k: v for k, v in context.model_fingerprint.items() if k != "model"}
    material = {
        "model": model,
        "method": method.fingerprint(),
        "prompts_sha256": config.prompts_sha256,
        "seeds": list(config.seeds),
        "steps": config.steps,
        "guidance_scale": context.guidance_scale,
        "pipeline_kwargs": context.kwargs,
    }
    return json.loads(json.dumps(material, sort_keys=True, default=str))


def trial_key(context: RunContext, method: Method) -> str:
    """Hash of :func:`key_material`."""
    material = key_material(context, method)
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:16]


def explain_recompute(context: RunContext, method: Method) -> None:
    """Log why earlier trials of ``method`` in the output folder cannot be reused (what in their key differs)."""
    material = key_material(context, method)
    for path in sorted((context.out / "trials").glob(f"{method.slug}-*.json")):
        try:
            earlier = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if earlier.get("method") != method.name:
            continue
        before = earlier.get("key_material")
        if before is None:
            why = "it was written by an earlier version of accel, which kept no key material"
        else:
            model, earlier_model = material["model"], before.get("model") or {}
            differ = [f"model {k}" for k in model if model[k] != earlier_model.get(k)]
            differ += [name for name in material if name != "model" and material[name] != before.get(name)]
            why = f"{', '.join(differ) or 'its key'} differ"
        if context.is_main:
            logger.warning("%s: not reusing %s: %s; computing it again", method.name, path, why)


def read_trial(path: Path) -> dict | None:
    """The trial record in ``path``, or None (with a warning naming it) if it cannot be read: then the trial is
    computed again and the file replaced."""
    try:
        record = json.loads(path.read_text())
        if isinstance(record, dict) and record.get("status") in ("ok", "unsupported"):
            return record
        problem = "not a trial record"
    except (OSError, ValueError) as error:
        problem = str(error)
    logger.warning("%s cannot be read (%s): computing this trial again", path, problem)
    return None


def saved_progress(out: Path) -> str:
    """What an interrupted run left in ``out`` for the next one to reuse, in words."""
    trials = len(list((out / "trials").glob("*.json")))
    images = len(list((out / "images").glob("*/*.png")))
    return f"{trials} finished trial{'s' if trials != 1 else ''} and {images} samples are kept in {out}"
