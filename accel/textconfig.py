"""Small readers shared by the command-line tools: prompt files and the field docs of config dataclasses."""

from __future__ import annotations

import json
from pathlib import Path


def read_prompts(path: str | Path) -> tuple[str, ...]:
    """Prompts from a text file (one per line; blank lines and ``#`` comments skipped) or a JSON list.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a JSON file that is not a list of strings, or a file without prompts.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file not found: {path}")
    text = path.read_text()
    if path.suffix == ".json":
        prompts = json.loads(text)
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"{path}: expected a JSON list of strings")
    else:
        prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise ValueError(f"{path} has no prompts")
    return tuple(prompts)


def attribute_docs(cls: type) -> dict[str, str]:
    """The ``Attributes:`` section of a class docstring as ``{name: one-line text}``."""
    lines = (cls.__doc__ or "").splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == "Attributes:"), None)
    docs: dict[str, str] = {}
    if start is None:
        return docs
    indent, name = None, None
    for line in lines[start + 1 :]:
        if not line.strip():
            break
        depth = len(line) - len(line.lstrip())
        indent = depth if indent is None else indent
        if depth == indent and ":" in line:
            name, text = line.strip().split(":", 1)
            docs[name] = text.strip()
        elif depth > indent and name is not None:
            docs[name] += " " + line.strip()
    return docs
