"""Render an evaluation report (``report.html``) in headless Chromium and save a PNG screenshot.

Checks that the self-contained page renders offline: no network, no extensions, a throw-away profile.

Usage::

    python scripts/screenshot_report.py report/report.html --out report/screenshot.png [--width 1200 --height 2000]

Needs a Chromium binary (Debian: ``apt-get install -y chromium``); as root it runs with ``--no-sandbox``.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


def find_chromium() -> str | None:
    """The first Chromium-like browser on ``PATH``, or None."""
    return next((path for name in CANDIDATES if (path := shutil.which(name))), None)


def screenshot(
    page: str | Path, out: str | Path, width: int = 1200, height: int = 2000, chromium: str | None = None
) -> Path:
    """Screenshot ``page`` (an HTML file) into ``out`` (PNG) at ``width`` x ``height``.

    Raises:
        FileNotFoundError: the page, or any Chromium binary, is missing.
        RuntimeError: Chromium failed or wrote no screenshot; the message carries its output.
    """
    page, out = Path(page).resolve(), Path(out).resolve()
    if not page.is_file():
        raise FileNotFoundError(f"no such page: {page}")
    chromium = chromium or find_chromium()
    if chromium is None:
        raise FileNotFoundError(f"no Chromium found (looked for {', '.join(CANDIDATES)}); apt-get install chromium")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        command = [
            chromium,
            "--headless",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={profile}",
            f"--screenshot={out}",
            f"--window-size={width},{height}",
            "--hide-scrollbars",
            page.as_uri(),
        ]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            command.insert(2, "--no-sandbox")
        done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    if done.returncode != 0 or not out.is_file():
        raise RuntimeError(f"{chromium} exited {done.returncode} without {out}:\n{done.stderr[-2000:]}")
    logger.info("wrote %s (%dx%d) of %s", out, width, height, page)
    return out


def main(argv: list[str] | None = None) -> int:
    """Command line: ``screenshot_report.py PAGE --out PNG``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("page", help="report.html to render")
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.add_argument("--width", type=int, default=1200)
    parser.add_argument("--height", type=int, default=2000)
    parser.add_argument("--chromium", help="browser binary; default: the first of " + ", ".join(CANDIDATES))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        screenshot(args.page, args.out, args.width, args.height, args.chromium)
    except (FileNotFoundError, RuntimeError, subprocess.TimeoutExpired) as error:
        logger.error("screenshot failed: %s", error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
