"""The README's examples run as written.

Every ```python block runs in a fresh namespace in a temporary folder; every command of a ```bash block is checked
by the command's own parser, and the cheap ones run (in-process, through ``accel.cli.main``). Examples that take
minutes (compilation, searches, benchmarks, the demo) run under the ``slow`` marker; commands with a placeholder
the reader replaces (``DIR_OR_HUB_ID``, ``FILE``) are only parsed. The install commands are CI's own (checked
below against ``.ci/run``).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()

#: a python block containing one of these runs under ``slow``, with the reason
SLOW_PYTHON = {
    "accel.compile_blocks(": "regional compilation of every block takes minutes on a CPU",
    "load_default_video_pipeline(": "20 steps of the video model take tens of seconds on a CPU",
}
#: commands that run in the fast suite (seconds on the bundled model); every other command runs under ``slow``
FAST_COMMANDS = (
    "accel info",
    "accel schedule ",
    "accel eval --list-methods",
    "accel generate --method fora-2 --prompt",
    "accel generate --method front@2",
)
#: a word in capitals the reader replaces: such a command is parsed, never run
PLACEHOLDER = re.compile(r"\b[A-Z][A-Z_]{2,}\b")


def _blocks(language: str) -> list[tuple[str, str]]:
    """``(id, code)`` of every fenced block of ``language``, the id naming the section it is in."""
    found, heading = [], "top"
    for match in re.finditer(r"^(#+ [^\n]*)$|^```(\w*)\n(.*?)^```", README, flags=re.M | re.S):
        if match.group(1):
            heading = re.sub(r"\W+", "-", match.group(1).lstrip("# ").lower()).strip("-")
        elif match.group(2) == language:
            found.append((f"{heading}-{len(found)}", match.group(3)))
    return found


def _commands(code: str) -> list[list[str]]:
    """The command lines of a bash block (continuations joined, comments dropped) as argument lists."""
    joined = re.sub(r"\\\n\s*", " ", code)
    return [tokens for line in joined.splitlines() if (tokens := shlex.split(line, comments=True))]


def _is_install(tokens: list[str]) -> bool:
    return tokens[:3] == ["python3", "-m", "venv"]


def _run(tokens: list[str]) -> int:
    """Run one README command in this process; its exit status."""
    if tokens[0] == "accel":
        from accel.cli import main

        return main(tokens[1:])
    if tokens[:3] == ["python", "-m", "accel.bench"]:
        from accel.bench.__main__ import main

        return main(tokens[3:])
    raise AssertionError(f"the README shows a command this test does not know how to run: {shlex.join(tokens)}")


def _python_params():
    params = []
    for name, code in _blocks("python"):
        slow = [reason for marker, reason in SLOW_PYTHON.items() if marker in code]
        params.append(pytest.param(code, id=name, marks=[pytest.mark.slow] if slow else []))
    return params


def _command_params(fast: bool):
    params = []
    for name, code in _blocks("bash"):
        commands = [c for c in _commands(code) if not _is_install(c) and not PLACEHOLDER.search(shlex.join(c))]
        for tokens in commands:
            line = shlex.join(tokens)
            if line.startswith(FAST_COMMANDS) == fast:
                params.append(pytest.param(tokens, id=f"{name}: {line}", marks=[] if fast else [pytest.mark.slow]))
    return params


@pytest.mark.parametrize("code", _python_params())
def test_python_example_runs(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {"__name__": "__readme__"})


@pytest.mark.parametrize(
    "tokens",
    [pytest.param(c, id=shlex.join(c)) for _, code in _blocks("bash") for c in _commands(code) if c[0] == "accel"],
)
def test_command_parses(tokens):
    from accel.cli import subcommand

    _, parser, rest = subcommand(tokens[1], tokens[2:])
    parser.parse_args(rest)  # an unknown flag or bad value exits with status 2


@pytest.mark.parametrize("tokens", _command_params(fast=True))
def test_cheap_command_runs(tokens, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert _run(tokens) == 0


@pytest.mark.parametrize("tokens", _command_params(fast=False))
def test_long_command_runs(tokens, tmp_path_factory, monkeypatch):
    # one folder for every long command, so that a command may read what an earlier one of its block wrote
    folder = tmp_path_factory.getbasetemp() / "readme-commands"
    folder.mkdir(exist_ok=True)
    monkeypatch.chdir(folder)
    for flag, value in zip(tokens, tokens[1:]):
        if flag == "--prompts" and not Path(value).exists():  # the reader's own prompt file, one prompt a line
            Path(value).write_text("red apple sliding to the right\nyellow star bouncing\n")
    assert _run(tokens) == 0


def test_every_example_is_collected():
    assert len(_blocks("python")) >= 6
    assert _command_params(fast=True) and _command_params(fast=False)


def _install_commands(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip().startswith("python3 -m venv")]


def test_ci_runs_the_readme_test_command():
    readme = _install_commands(README)
    ci = _install_commands((ROOT / ".ci" / "run").read_text())
    assert len(readme) == 2, "README should show two newcomer commands: the main job and the tests"
    assert readme[1].endswith("python -m pytest -q") and ci == [readme[1]]
    assert readme[0].endswith("accel demo")
