"""report.html renders in headless Chromium (skipped where no Chromium is installed)."""

import importlib.util
from pathlib import Path

import pytest
from conftest import build_tiny_pixart_pipeline
from eval_helpers import small_config

from accel.eval.cost import TimingConfig
from accel.eval.harness import run_evaluation

SCRIPT = Path(__file__).parents[1] / "scripts" / "screenshot_report.py"


def _script():
    spec = importlib.util.spec_from_file_location("screenshot_report", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_report_renders_in_chromium(tmp_path):
    script = _script()
    if script.find_chromium() is None:
        pytest.skip("no Chromium on PATH (apt-get install -y chromium); report.html not rendered")
    from PIL import Image

    # a warm-up round and three timed ones: with one cold round a slow first call can reorder the speeds and leave
    # the front short (one CI run drew 40 red pixels where four reruns drew 349-437)
    config = small_config(methods=("full", "fora-2", "steps-2"), timing=TimingConfig(warmup=1, repeats=3))
    run_evaluation(config, tmp_path, pipe=build_tiny_pixart_pipeline())
    shot = script.screenshot(tmp_path / "report.html", tmp_path / "shot.png", width=1200, height=1600)
    with Image.open(shot) as image:
        assert image.size == (1200, 1600)
        rgb = image.convert("RGB")
        colors = rgb.getcolors(maxcolors=1_000_000)
        assert len(colors) > 200  # text, plots and image grids, not a blank or error page
        red = sum(count for count, (r, g, b) in colors if r > 180 and g < 80 and b < 80)
        assert red > 50  # the Pareto front is drawn in red


def test_missing_page_is_a_clear_error(tmp_path):
    assert _script().main([str(tmp_path / "nothing.html"), "--out", str(tmp_path / "x.png")]) == 1
