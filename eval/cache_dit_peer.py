"""cache-dit's DBCache as a harness method, through cache-dit's public API, so the report measures a peer side by
side with accel's techniques on the same prompts, seeds, timer and metrics.

cache-dit (``pip install "diffusers-accel[peers]"``) caches a whole pipeline: ``cache_dit.enable_cache(pipe,
cache_config=DBCacheConfig(...))`` wraps the transformer's block stack so that, after the warm-up steps, a step
computes the first ``Fn`` blocks, compares their residual with the last computed step's, and reuses the middle
blocks' residual while the relative change stays under ``residual_diff_threshold``; the last ``Bn`` blocks always
compute. ``cache_dit.disable_cache(pipe)`` takes its wrappers off again; it puts the original ``forward`` back as
an instance attribute, which the harness then drops, so the modules are left exactly as they were (the outputs
after it equal the uncached ones bit for bit: tests/test_eval_cache_dit.py, tests/test_eval_methods.py). An
optional TaylorSeer calibrator (order 1) forecasts the reused residuals instead of reusing them as they are.

Only cache-dit's defaults are changed where the method name says so (``Fn``, ``Bn``, the threshold, the
calibrator); its warm-up (the first 8 steps always compute) and every other option stay cache-dit's. cache-dit
logs a table per call and a warning each time it is disabled; the harness raises its loggers to ERROR while the
method is applied (lowers them to DEBUG when accel's own logging is at DEBUG, ``accel -v``).
"""

from __future__ import annotations

import dataclasses
import enum
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from accel.eval.methods import Applied, UnsupportedMethod

logger = logging.getLogger(__name__)

#: what to install when cache-dit is missing
INSTALL_HINT = 'pip install "diffusers-accel[peers]"  (cache-dit)'


def import_cache_dit():
    """The ``cache_dit`` module.

    Raises:
        ImportError: cache-dit is not installed; the message names the extra that installs it.
    """
    try:
        import cache_dit
    except ImportError as error:
        raise ImportError(f"the cache-dit methods need cache-dit: {INSTALL_HINT}") from error
    return cache_dit


def _config_dict(config: Any) -> dict:
    """A cache-dit config dataclass as JSON-ready fields."""
    fields = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if isinstance(value, enum.Enum):
            value = value.value
        elif dataclasses.is_dataclass(value):
            value = _config_dict(value)
        elif not isinstance(value, (int, float, str, bool, list, type(None))):
            value = str(value)
        fields[field.name] = value
    return {"type": f"cache_dit.{type(config).__name__}", **fields}


@contextmanager
def _quiet() -> Iterator[None]:
    """cache-dit's loggers at ERROR (DEBUG when accel logs at DEBUG) for the block, restored after."""
    level = logging.DEBUG if logging.getLogger("accel").isEnabledFor(logging.DEBUG) else logging.ERROR
    names = [n for n in logging.root.manager.loggerDict if n.split(".")[0] in ("cache_dit", "CACHE_DIT")]
    loggers = [logging.getLogger(n) for n in names]
    before = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(level)
    try:
        yield
    finally:
        for lg, old in zip(loggers, before, strict=True):
            lg.setLevel(old)


def _stats(cache_dit_module: Any, pipe: Any, steps: int) -> dict:
    """The steps cache-dit reused at the pipeline's last call (its own summary of the first cached block stack)."""
    summaries = cache_dit_module.summary(pipe, logging=False)
    reused = sorted(int(s) for s in summaries[0].cached_steps) if summaries else []
    if not reused:
        logger.warning("cache-dit reused no step of %d: its threshold never let a step skip blocks here", steps)
    return {"type": "cache_dit.summary", "cached_steps": reused, "cached_fraction": round(len(reused) / steps, 4)}


def _modules(pipe: Any) -> dict[str, torch.nn.Module]:
    """Every module of the pipeline's components, by ``component.qualified.name``."""
    components = getattr(pipe, "components", {}) or {}
    return {
        f"{key}.{name}".rstrip("."): module
        for key, component in components.items()
        if isinstance(component, torch.nn.Module)
        for name, module in component.named_modules()
    }


def _drop_restored_forwards(pipe: Any, had_own: set[str]) -> None:
    """``disable_cache`` puts a module's original ``forward`` back as an instance attribute (the bound class
    method) where it had none: drop those, so the modules are as they were; warn about any other leftover."""
    for name, module in _modules(pipe).items():
        forward = module.__dict__.get("forward")
        if forward is None or name in had_own:
            continue
        if getattr(forward, "__func__", None) is type(module).forward and getattr(forward, "__self__", None) is module:
            del module.__dict__["forward"]
        else:
            logger.warning("cache-dit left a forward wrapper on %s after disable_cache", name)


@contextmanager
def apply_cache_dit(pipe: Any, params: dict, steps: int, instrument: bool) -> Iterator[Applied]:
    """Apply cache-dit's DBCache with ``params`` (``threshold``, ``first``: Fn, ``last``: Bn, ``taylorseer``) to
    ``pipe`` for the ``with`` block; ``disable_cache`` on exit.

    Raises:
        UnsupportedMethod: cache-dit is missing, cannot cache this pipeline, or the pipeline call fails with it
            (the error chained).
    """
    try:
        cache_dit = import_cache_dit()
    except ImportError as error:
        raise UnsupportedMethod(str(error)) from None
    config = cache_dit.DBCacheConfig(
        Fn_compute_blocks=params["first"], Bn_compute_blocks=params["last"], residual_diff_threshold=params["threshold"]
    )
    calibrator = cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=1) if params["taylorseer"] else None
    had_own = {name for name, module in _modules(pipe).items() if "forward" in module.__dict__}
    with _quiet():
        try:
            cache_dit.enable_cache(pipe, cache_config=config, calibrator_config=calibrator)
        except Exception as error:  # cache-dit has no adapter for this pipeline, or refuses its options
            raise UnsupportedMethod(f"cache-dit cannot cache {type(pipe).__name__}: {error}") from error
        applied = {**_config_dict(config), "cache_dit_version": cache_dit.__version__}
        if calibrator is not None:
            applied["calibrator"] = _config_dict(calibrator)
        try:
            yield Applied(steps=steps, config=applied, stats=lambda: _stats(cache_dit, pipe, steps))
        except Exception as error:  # a third-party cache failing on this model is recorded, not fatal
            raise UnsupportedMethod(
                f"cache-dit failed on {type(pipe).__name__}: {type(error).__name__}: {error}"
            ) from error
        finally:
            cache_dit.disable_cache(pipe)
            _drop_restored_forwards(pipe, had_own)
