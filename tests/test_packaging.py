"""The wheel ships every package: pyproject.toml's package list is exactly the folders with an ``__init__.py``.

An editable install (what the tests run under) imports from the source tree and hides a package missing from
the list; a built wheel lacks it. ``.ci/run`` also builds and installs the wheel and runs the CLI from it.
"""

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]
NOT_INSTALLED = {"tests", "scripts"}  # folders at the root that are not part of the distribution


def _setuptools() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def _package_folders() -> dict[str, Path]:
    """Import name -> folder, for every folder with an ``__init__.py`` below a ``package-dir`` root."""
    found = {}
    for prefix, folder in _setuptools()["package-dir"].items():
        for init in sorted((ROOT / folder).rglob("__init__.py")):
            parts = init.parent.relative_to(ROOT / folder).parts
            found[".".join((prefix, *parts))] = init.parent
    return found


def test_every_package_folder_is_in_the_package_list():
    declared = set(_setuptools()["packages"])
    found = set(_package_folders())
    assert not found - declared, f"add to [tool.setuptools] packages in pyproject.toml: {sorted(found - declared)}"
    assert not declared - found, f"listed but no such package folder: {sorted(declared - found)}"


def test_every_package_folder_at_the_root_is_mapped():
    mapped = {Path(folder).parts[0] for folder in _setuptools()["package-dir"].values()}
    roots = {p.parent.name for p in ROOT.glob("*/__init__.py")} - NOT_INSTALLED
    assert roots <= mapped, f"add to [tool.setuptools.package-dir]: {sorted(roots - mapped)}"


def test_package_folders_resolve_as_installed():
    """Each listed package's folder, as setuptools derives it from ``package-dir``, holds an ``__init__.py``."""
    directories = _setuptools()["package-dir"]
    for name in _setuptools()["packages"]:
        prefix = max((p for p in directories if name == p or name.startswith(p + ".")), key=len)
        folder = ROOT / directories[prefix] / Path(*name[len(prefix) :].split(".")[1:])
        assert (folder / "__init__.py").is_file(), f"{name}: no {folder / '__init__.py'}"


def test_accel_version_prints_the_installed_version(capsys):
    from importlib.metadata import version

    from accel.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"diffusers-accel {version('diffusers-accel')}"
