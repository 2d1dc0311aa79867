"""The caching benchmarks run end to end and report what they promise (tiny shapes; slow: they compile)."""

from __future__ import annotations

import pytest

from accel.bench import caching, gpu

pytestmark = pytest.mark.slow


def test_bench_caching_compile_reports_the_issue_keys():
    result = caching.run(["--layers", "2", "--steps", "4", "--repeats", "1", "--sample-size", "8", "--compile"])
    for key in ("compiled_speedup", "compiled_overhead", "compiled_fora2_speedup", "fora2_ideal", "recompiles",
                "fbc_overhead"):  # fmt: skip
        assert key in result
    assert result["recompiles"] <= 2


def test_bench_gpu_runs_on_a_cpu_at_tiny_shapes():
    result = gpu.run(["--device", "cpu", "--dtype", "fp32", "--tiny", "--steps", "3", "--repeats", "1"])
    assert set(result) == {"pixart", "wan"}
    assert "diffusers_fbc_speedup" in result["wan"] and result["pixart"]["recompiles"] <= 2
