"""The wheel ships the package, all of it, and nothing else.

The repository root *is* the package (``package-dir = {"wakepoint" = "."}``), so it is easy to
forget a subpackage in ``[tool.setuptools] packages`` (its modules silently vanish from the
wheel while editable installs keep working) or to ship ``tests/`` by accident.  These tests
build a real wheel from a copy of the source tree and look inside it, then install it into a
scratch directory and import it from there.
"""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
import wakepoint

ROOT = Path(__file__).resolve().parent.parent

PACKAGES = [
    "wakepoint",
    "wakepoint.kernel",
    "wakepoint.effects",
    "wakepoint.ledger",
    "wakepoint.stores",
    "wakepoint.scheduler",
    "wakepoint.migrations",
    "wakepoint.migrations.versions",
]
DATA_FILES = ["wakepoint/py.typed", "wakepoint/migrations/script.py.mako"]
ROOT_MODULES = {"__init__.py", "__main__.py", "cli.py", "runtime.py"}
"""The only ``.py`` files the design allows at the root (a root conftest.py would ship)."""

# What a fresh clone does not have, or what must never reach a build.
_NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv", "venv", "build", "dist", "*.egg-info", "__pycache__", ".mypy_cache",
    ".ruff_cache", ".pytest_cache", ".hypothesis", ".wakepoint*", ".coverage*", "htmlcov",
    ".venvs",
)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built with ``python -m build`` from a copy of the source tree (so the build
    writes nothing into the repository)."""
    base = tmp_path_factory.mktemp("wheel")
    src = base / "src"
    shutil.copytree(ROOT, src, ignore=_NOT_SOURCE)
    proc = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--outdir", str(base / "dist"), str(src)],
        capture_output=True, text=True, timeout=600, check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (built,) = (base / "dist").glob("wakepoint-*.whl")
    return built


@pytest.fixture(scope="module")
def names(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as zf:
        return set(zf.namelist())


def test_pyproject_lists_every_subpackage() -> None:
    """``[tool.setuptools] packages`` is exactly the design's package list, and every source
    folder holding an ``__init__.py`` is one of them."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert config["tool"]["setuptools"]["packages"] == PACKAGES
    not_package = {"build", "dist", "tests", "examples", "benchmarks", "venv"}
    on_disk = set()
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith((".", "_")) and d not in not_package]
        if "__init__.py" in files:
            on_disk.add(".".join(("wakepoint", *Path(folder).relative_to(ROOT).parts)))
    assert on_disk == set(PACKAGES)


def test_wheel_has_every_subpackage(names: set[str]) -> None:
    """Every subpackage's ``__init__.py`` is inside the wheel."""
    missing = [p for p in PACKAGES if p.replace(".", "/") + "/__init__.py" not in names]
    assert not missing


def test_wheel_has_every_module_of_every_package(names: set[str]) -> None:
    """Every ``.py`` file of every package folder in the source is in the wheel (migration
    versions included), and the root holds only the modules the design allows."""
    missing = []
    for package in PACKAGES:
        folder = ROOT.joinpath(*package.split(".")[1:])
        for module in folder.glob("*.py"):
            name = f"{package.replace('.', '/')}/{module.name}"
            if name not in names:
                missing.append(name)
    assert not missing
    root_modules = {n.split("/")[1] for n in names if n.count("/") == 1 and n.endswith(".py")}
    assert root_modules == ROOT_MODULES


def test_wheel_has_data_files(names: set[str]) -> None:
    """``py.typed`` (PEP 561) and the Alembic ``script.py.mako`` template are shipped."""
    assert set(DATA_FILES) <= names


def test_wheel_has_no_tests_examples_or_benchmarks(names: set[str]) -> None:
    """Only ``wakepoint/`` and its ``dist-info`` are in the wheel: no tests, examples,
    benchmarks, and no top-level files."""
    tops = {n.split("/")[0] for n in names}
    assert tops == {"wakepoint", f"wakepoint-{wakepoint.__version__}.dist-info"}
    unwanted = [n for n in names
                if {"tests", "examples", "benchmarks", "conftest.py"} & set(n.split("/"))]
    assert not unwanted


def test_wheel_declares_the_console_script(wheel: Path) -> None:
    """The ``wakepoint`` console script points at ``wakepoint.cli:main``."""
    with zipfile.ZipFile(wheel) as zf:
        text = zf.read(f"wakepoint-{wakepoint.__version__}.dist-info/entry_points.txt")
    entry_points = configparser.ConfigParser()
    entry_points.read_string(text.decode())
    assert entry_points["console_scripts"]["wakepoint"] == "wakepoint.cli:main"


def test_installed_wheel_imports_and_runs(wheel: Path, tmp_path: Path) -> None:
    """Installed from the wheel (not the source tree), every subpackage imports, the public
    names resolve, and ``python -m wakepoint --version`` answers."""
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
         "--target", str(target), str(wheel)],
        check=True, capture_output=True, timeout=300,
    )
    probe = (
        "import importlib, sys, wakepoint\n"
        f"assert wakepoint.__file__.startswith({str(target)!r}), wakepoint.__file__\n"
        f"for name in {PACKAGES!r}: importlib.import_module(name)\n"
        "for name in wakepoint.__all__: getattr(wakepoint, name)\n"
        "print('imported', len(wakepoint.__all__))\n"
    )
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    version = subprocess.run([sys.executable, "-m", "wakepoint", "--version"], cwd=tmp_path,
                             env=env, capture_output=True, text=True, timeout=60, check=False)
    assert version.stdout.strip() == f"wakepoint {wakepoint.__version__}", version


def test_public_api_is_sorted_and_importable() -> None:
    """``wakepoint.__all__`` is sorted, has no duplicates, and every name in it imports."""
    names = list(wakepoint.__all__)
    assert names == sorted(names)
    assert len(names) == len(set(names))
    namespace: dict[str, object] = {}
    exec("from wakepoint import *", namespace)
    assert set(names) <= set(namespace)
    for name in names:
        assert getattr(wakepoint, name) is namespace[name]
