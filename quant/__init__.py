"""Cache-aware post-training quantization (CacheQuant on DiTs) through torchao's real low-precision kernels.

Typical use::

    import accel
    config = accel.quant.QuantConfig(scheme="int8-dynamic")           # or int8-weight, int8-static, fp8
    with accel.apply(pipe, config) as handle:
        images = pipe(prompts).images
    print(handle.stats().weight_memory_ratio)

    # cache-aware: with a CacheConfig in the same call, calibration prompts run under its schedule at apply and
    # the error correction is fitted there (correct=None, the default: correct=False opts out, min_sqnr=20.0
    # adds layer selection; without a cache nothing calibrates)
    with accel.apply(pipe, accel.caching.CacheConfig(schedule=schedule), config):
        images = pipe(prompts).images

    plan = accel.quant.calibrate(pipe, config, cache=CacheConfig(schedule=schedule))   # once; plan.save(path)
    accel.apply(pipe, accel.quant.QuantConfig(scheme="int8-dynamic", plan=plan))      # no calibration run

    # the caching schedule search (NSGA-II) with the quantized model in the loop: the front of the combination
    front = accel.quant.search_schedules(pipe, prompts, config, SearchConfig(generations=8, evaluation=
                                         EvaluatorConfig(cost="latency")), "schedules-int8/")
"""

from accel.quant import apply as _apply  # noqa: F401  (registers QuantConfig with accel.apply)
from accel.quant.apply import QuantHandle, QuantStats
from accel.quant.calibration import calibrate, candidate_layers
from accel.quant.config import Calibration, QuantConfig
from accel.quant.correction import CorrectionStatistics, fit_lines
from accel.quant.schedule_search import search_schedules
from accel.quant.schemes import SCHEMES, check_scheme, sqnr

__all__ = [
    "SCHEMES",
    "Calibration",
    "CorrectionStatistics",
    "QuantConfig",
    "QuantHandle",
    "QuantStats",
    "calibrate",
    "candidate_layers",
    "check_scheme",
    "fit_lines",
    "search_schedules",
    "sqnr",
]
