"""The forms of the method grammar (:mod:`accel.eval.methods`) that apply several techniques, or a technique's
saved plan, in one ``accel.apply`` call.

* ``METHOD+METHOD[+...]``: one part per technique: one of accel's caching methods (or a Schedule/CacheConfig
  JSON), ``tokens-B``, a sparse-attention plan JSON, and a quantization scheme (or a quantization plan JSON),
  e.g. ``fora-2+tokens-0.5``, ``fora-2+wan-sparse.json`` or ``front@2+int8-dynamic``;
* ``SCHEME``: quantization alone;
* ``PATH.json``: a Schedule or CacheConfig JSON, or a plan that :func:`accel.sparse.search` or
  :func:`accel.quant.calibrate` saved.

They compose as ``accel.apply`` composes them: per-token steps gather tokens outside the cached blocks, and a
quantization scheme given without a plan calibrates and corrects under the cache applied with it (its default),
on the calibration prompts at the generation's step count and call arguments, once per method (the harness
applies a method several times; :data:`PLANS` keeps what it calibrated). A composition ``accel.apply`` refuses
(e.g. sparse attention with per-token steps, which replace the same processors) is unsupported, with its reason.
"""

from __future__ import annotations

import json
import re
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

#: accel's caching methods: the forms a ``CacheConfig`` part may take (``json``: a Schedule or CacheConfig file)
CACHE_KINDS = ("fora", "taylorseer", "delta-dit", "tgate", "fbc", "json", "front")

#: the forms a part of ``METHOD+METHOD`` may take (a ``json`` part may also hold a sparse or quantization plan)
PART_KINDS = (*CACHE_KINDS, "tokens", "quant")

#: plans a quantization part calibrated, per transformer, keyed by the method, step count and call arguments
PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def parse_combined(match: re.Match) -> dict:
    """``METHOD+METHOD[+...]``: each part's own parse; at most one part of each technique that the name shows
    (a ``json`` part's technique is known once its file is read: :func:`part_configs` checks it).

    Raises:
        ValueError: a part that is no technique of accel's (``full``, ``steps-N``, diffusers' caches) or a
            technique given twice.
    """
    from accel.eval.methods import parse_method

    parts = [parse_method(text) for text in match[0].split("+")]
    for part in parts:
        if part.kind not in PART_KINDS:
            raise ValueError(
                f"{part.name!r} cannot be combined: the parts of METHOD+METHOD are accel's caching methods, "
                "tokens-B, a quantization scheme and plan or schedule JSON files"
            )
    _check_once([_technique_of_kind(part.kind) for part in parts if part.kind != "json"])
    return {"parts": [{"kind": part.kind, "params": part.params} for part in parts]}


def _technique_of_kind(kind: str) -> str:
    return {"tokens": "TokenStepConfig", "quant": "QuantConfig"}.get(kind, "CacheConfig")


def _check_once(techniques: list[str]) -> None:
    repeated = sorted({name for name in techniques if techniques.count(name) > 1})
    if repeated:
        raise ValueError(f"one part per technique: {', '.join(repeated)} given twice")


def load_json_config(path: Path, instrument: bool):
    """The config a method JSON file holds: a ``CacheConfig`` (from a Schedule, policy or CacheConfig file), a
    ``SparseAttentionConfig`` (a sparse-attention plan) or a ``QuantConfig`` (a quantization plan).

    Raises:
        ValueError: a file of none of these kinds (or a plan of another technique), naming the path.
    """
    from dataclasses import replace

    from accel.caching import CacheConfig, load_policy
    from accel.caching.config import CONFIG_TYPE
    from accel.caching.schedule import read_json
    from accel.plan import PLAN_TYPE, Plan

    data = read_json(path, "method file")
    kinds = "a Schedule, a CacheConfig, a sparse-attention plan or a quantization plan JSON"
    try:
        if isinstance(data, dict) and data.get("type") == PLAN_TYPE:
            return _plan_config(Plan.load(path))
        if isinstance(data, dict) and data.get("type") == CONFIG_TYPE:
            return replace(CacheConfig.from_dict(data), count_macs=instrument)
        return CacheConfig(schedule=load_policy(data), count_macs=instrument)
    except ValueError as error:
        raise ValueError(f"method file {path}: {error} (expected {kinds})") from None


def _plan_config(plan):
    """The config that applies a saved plan of the sparse-attention or quantization technique."""
    from accel.quant import QuantConfig
    from accel.sparse import SparseAttentionConfig

    technique = plan.settings.get("technique")
    if technique == "sparse_attention":
        return SparseAttentionConfig(plan=plan)
    if technique == "quant":
        return QuantConfig(scheme=plan.settings.get("scheme"), plan=plan)
    raise ValueError(f"a plan of technique {technique!r}, which no method applies from a file")


def part_configs(pipe: Any, parts: list[dict], steps: int, instrument: bool, call_kwargs: dict | None) -> list:
    """The configs of ``parts`` (parsed ``{"kind", "params"}``) for a ``steps``-step generation with
    ``call_kwargs``, the quantization last (it calibrates under the cache, if one comes). With a ``tokens-B``
    part whose budget coarsens the step grid, a caching method's schedule is made for the coarse grid's steps.

    Raises:
        ValueError: a file part of a technique another part already gives.
        UnsupportedMethod: a front searched for another model; a scheme this device cannot run.
    """
    from accel.caching import TokenStepConfig
    from accel.eval.methods import cache_config
    from accel.quant import QuantConfig

    configs, scheme = [], None
    tokens = next((TokenStepConfig(budget=p["params"]["budget"]) for p in parts if p["kind"] == "tokens"), None)
    # a budget below min_active runs the pipeline on a coarser grid: a cache part is made for the steps that run
    grid = steps if tokens is None else tokens.grid_steps(steps)
    for part in parts:
        kind, params = part["kind"], part["params"]
        if kind == "quant":
            scheme = params["scheme"]
        elif kind == "tokens":
            configs.append(tokens)  # parse_combined allows one tokens part
        elif kind == "json":
            configs.append(load_json_config(Path(params["path"]), instrument))
        else:
            configs.append(cache_config(pipe, kind, params, grid, instrument))
    _check_once([type(config).__name__ for config in configs] + (["QuantConfig"] * (scheme is not None)))
    if scheme is not None:
        configs.append(_scheme_config(pipe, scheme, parts, (steps, grid), call_kwargs, configs))
    quant = next((c for c in configs if isinstance(c, QuantConfig)), None)
    if quant is not None:
        _check_device(quant.scheme, pipe)
    return configs


def _scheme_config(pipe: Any, scheme: str, parts: list[dict], steps: tuple[int, int], call_kwargs, others: list):
    """The ``QuantConfig`` of a scheme part: the plan calibrated at an earlier apply of the same method, else a
    calibration when a cache comes (cache-aware) with this generation's call arguments, on the grid the cache's
    schedule was made for (``steps``: the generation's and that grid's), else none."""
    from accel.caching import CacheConfig
    from accel.quant import Calibration, QuantConfig

    plan = PLANS.setdefault(pipe.transformer, {}).get(_plan_key(parts, steps[0], call_kwargs))
    if plan is not None:
        return QuantConfig(scheme=scheme, plan=plan)
    if any(isinstance(config, CacheConfig) for config in others):
        calibration = Calibration(num_inference_steps=steps[1], call_kwargs=_calibration_kwargs(call_kwargs))
        return QuantConfig(scheme=scheme, calibration=calibration)
    return QuantConfig(scheme=scheme)


def _check_device(scheme: str, pipe: Any) -> None:
    from accel.eval.methods import UnsupportedMethod
    from accel.quant import check_scheme

    try:
        check_scheme(scheme, getattr(pipe, "device", "cpu"))
    except (RuntimeError, ImportError) as error:
        raise UnsupportedMethod(str(error)) from None


@contextmanager
def apply_parts(pipe: Any, params: dict, steps: int, instrument: bool, call_kwargs: dict | None = None) -> Iterator:
    """Apply ``params["parts"]`` in one ``accel.apply`` call; a context manager yielding
    :class:`~accel.eval.methods.Applied`. One part records its config and stats as it would alone; several
    record ``{"type": "combined", "configs": [...]}`` and their stats keyed by config type.

    Raises:
        UnsupportedMethod: a composition or model ``accel.apply`` refuses (its reason), or a scheme this device
            cannot run.
    """
    import accel
    from accel.eval.methods import Applied, UnsupportedMethod
    from accel.quant import QuantConfig

    configs = part_configs(pipe, params["parts"], steps, instrument, call_kwargs)
    try:
        handle = accel.apply(pipe, *configs)
    except ValueError as error:  # a model or composition where it does not apply: the harness records why
        raise UnsupportedMethod(str(error)) from None
    with handle:
        parts = [handle[type(config)] for config in configs]
        for config, part in zip(configs, parts):
            if isinstance(config, QuantConfig) and config.plan is None and part.plan is not None:
                PLANS[pipe.transformer][_plan_key(params["parts"], steps, call_kwargs)] = part.plan
        recorded = [_config_json(config, part) for config, part in zip(configs, parts)]
        stats = {type(config).__name__: part.stats for config, part in zip(configs, parts)}
        one = len(configs) == 1
        yield Applied(
            steps=steps,
            config=recorded[0] if one else {"type": "combined", "configs": recorded},
            reset=handle.reset,
            stats=lambda: _stats_json(stats, one) if instrument else None,
        )


def _calibration_kwargs(call_kwargs: dict | None) -> dict:
    """The generation's call arguments a calibration runs with (it keeps latents: no ``output_type``)."""
    return {k: v for k, v in (call_kwargs or {}).items() if k != "output_type"}


def _plan_key(parts: list[dict], steps: int, call_kwargs: dict | None) -> str:
    """What a calibrated quantization plan is kept under: the method's parts, step count and call arguments."""
    kwargs = _calibration_kwargs(call_kwargs)
    return json.dumps([parts, steps, {k: repr(v) for k, v in sorted(kwargs.items())}])


def _config_json(config: Any, part: Any) -> dict:
    """A config as JSON: its own ``to_dict`` (caching); per-token steps' budget; a sparse plan's layers and
    density; the quantization's scheme and whether a correction was fitted and applied."""
    from accel.caching import TokenStepConfig
    from accel.sparse import SparseAttentionConfig

    if hasattr(config, "to_dict"):
        return config.to_dict()
    if isinstance(config, TokenStepConfig):
        return {"type": "TokenStepConfig", "budget": config.budget}
    if isinstance(config, SparseAttentionConfig):
        plan = config.plan
        return {
            "type": "SparseAttentionConfig",
            "backend": config.backend,
            "metrics": plan.metrics,
            "sizes": plan.sizes,
        }
    corrected = part.plan is not None and "corrected" in part.plan.channels
    return {"type": type(config).__name__, "scheme": config.scheme, "corrected": corrected}


def _stats_json(stats: dict, one: bool) -> dict | None:
    """Each technique's stats as JSON (their ``to_dict``): one technique's as they are, several keyed by type."""
    found = {name: _to_dict(read()) for name, read in stats.items()}
    return next(iter(found.values())) if one else found


def _to_dict(stats: Any) -> dict | None:
    return None if stats is None else stats.to_dict()
