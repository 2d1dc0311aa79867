"""The quantization forms of the method grammar (:mod:`accel.eval.methods`): ``SCHEME`` alone and
``METHOD+SCHEME``, one of accel's caching methods with the scheme in one ``accel.apply`` call, so the quantization
is calibrated and corrected under that cache."""

from __future__ import annotations

import json
import re
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from accel.eval.methods import Applied

#: the methods a scheme may follow: accel's caching, whose CacheConfig the quantization calibrates under
CACHE_KINDS = ("fora", "taylorseer", "delta-dit", "tgate", "fbc", "json", "front")


def parse_quantized(match: re.Match) -> dict:
    """``METHOD+SCHEME``: the caching method's own parse, and the scheme."""
    from accel.eval.methods import parse_method

    base = parse_method(match["base"])
    if base.kind not in CACHE_KINDS:
        raise ValueError(f"{match['base']!r} is not one of accel's caching methods ({', '.join(CACHE_KINDS)})")
    return {"base": {"kind": base.kind, "params": base.params}, "scheme": match["scheme"]}


#: plans a quantization method calibrated, per transformer, keyed by the method, step count and call arguments:
#: the harness applies a method several times (generation, statistics, memory, timing); it calibrates once
PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@contextmanager
def apply_quant(
    pipe: Any, params: dict, steps: int, instrument: bool, call_kwargs: dict | None = None
) -> Iterator[Applied]:
    """Quantization (``SCHEME``), or a caching method with it (``METHOD+SCHEME``) in one ``accel.apply`` call, so
    the QuantConfig calibrates and corrects under the cache (its default), on the calibration prompts at the
    generation's ``steps`` and ``call_kwargs``. A scheme this device cannot run is unsupported here, with
    torchao's reason."""
    import accel
    from accel.eval.methods import Applied, UnsupportedMethod, cache_config
    from accel.quant import Calibration, QuantConfig, check_scheme

    try:
        check_scheme(params["scheme"], getattr(pipe, "device", "cpu"))
    except (RuntimeError, ImportError) as error:
        raise UnsupportedMethod(str(error)) from None
    configs = []
    if "base" in params:
        configs.append(cache_config(pipe, params["base"]["kind"], params["base"]["params"], steps, instrument))
    kwargs = {k: v for k, v in (call_kwargs or {}).items() if k != "output_type"}  # calibration keeps latents
    key = json.dumps([params, steps, {k: repr(v) for k, v in sorted(kwargs.items())}])
    plans = PLANS.setdefault(pipe.transformer, {})
    if key in plans:  # calibrated at an earlier apply of the same method: its plan, with no calibration run
        configs.append(QuantConfig(scheme=params["scheme"], plan=plans[key]))
    elif configs:
        calibration = Calibration(num_inference_steps=steps, call_kwargs=kwargs)
        configs.append(QuantConfig(scheme=params["scheme"], calibration=calibration))
    else:
        configs.append(QuantConfig(scheme=params["scheme"]))
    with accel.apply(pipe, *configs) as handle:
        parts = [handle[type(config)] for config in configs]
        plan = parts[-1].plan
        if plan is not None:
            plans[key] = plan
        recorded = [_config_json(config, plan) for config in configs]
        yield Applied(
            steps=steps,
            config={"type": "combined", "configs": recorded},
            reset=handle.reset,
            stats=lambda: {type(c).__name__: _json(p.stats()) for c, p in zip(configs, parts)} if instrument else None,
        )


def _config_json(config: Any, plan: Any) -> dict:
    """A config as JSON: its own ``to_dict`` (caching), else the quantization's scheme and what it did (whether
    a correction was fitted and applied; ``plan``: the handle's calibrated plan, or None)."""
    if hasattr(config, "to_dict"):
        return config.to_dict()
    corrected = plan is not None and "corrected" in plan.channels
    return {"type": type(config).__name__, "scheme": config.scheme, "corrected": corrected}


def _json(stats: Any) -> dict | None:
    """A technique's stats as JSON (its ``to_dict``), or None."""
    return None if stats is None else stats.to_dict()
