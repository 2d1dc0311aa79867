"""Benchmarks: ``python -m accel.bench NAME`` prints a table, then one JSON line with the headline numbers.

Each benchmark is a module of this package exposing ``run(argv) -> dict``. Speed is measured as ratios within
one process (accelerated vs full, warm-up first, several interleaved repeats, medians): absolute times vary
between machines and runs, ratios much less.
"""

BENCHMARKS = {
    "caching": "accel.bench.caching",
    "search": "accel.bench.search",
    "model": "accel.bench.model",
    "gpu": "accel.bench.gpu",
    "sparse": "accel.bench.sparse",
    "tokens": "accel.bench.tokens",
    "quant": "accel.bench.quant",
}
