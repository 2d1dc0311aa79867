"""The README's newcomer commands stay true: CI runs exactly the README's test command."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _commands(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip().startswith("python3 -m venv")]


def test_ci_runs_the_readme_test_command():
    readme = _commands((ROOT / "README.md").read_text())
    ci = _commands((ROOT / ".ci" / "run").read_text())
    assert len(readme) == 2, "README should show two newcomer commands: the main job and the tests"
    assert readme[1].endswith("python -m pytest -q") and ci == [readme[1]]
    assert readme[0].endswith("accel demo")
