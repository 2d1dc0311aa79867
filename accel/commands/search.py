"""Search offline for what a technique should do on one pipeline: ``--technique caching`` (default; schedules,
:mod:`accel.caching.search.command`) or ``--technique sparse`` (attention plans, :mod:`accel.sparse.command`)."""

from __future__ import annotations

#: --technique -> the module implementing its search command
TECHNIQUES = {"caching": "accel.caching.search.command", "sparse": "accel.sparse.command"}


def select(argv: list[str]) -> tuple[str, list[str]]:
    """The module of the technique ``argv`` names with ``--technique NAME`` (default caching), and ``argv``
    without that flag.

    Raises:
        ValueError: an unknown technique, or ``--technique`` without a value.
    """
    rest, technique = list(argv), "caching"
    for index, token in enumerate(rest):
        if token == "--technique" or token.startswith("--technique="):
            value = token.partition("=")[2] if "=" in token else (rest[index + 1] if index + 1 < len(rest) else "")
            del rest[index : index + (1 if "=" in token else 2)]
            technique = value
            break
    if technique not in TECHNIQUES:
        raise ValueError(f"--technique must be one of {', '.join(TECHNIQUES)}, got {technique!r}")
    return TECHNIQUES[technique], rest
