"""The wheel ships every package and data file: an editable install would hide a package missing from
pyproject's explicit list (it did once: `raro_fast.weight_sync`, so `pip install .` gave an ImportError in training)."""
from __future__ import annotations

import fnmatch
import subprocess
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _setuptools_table() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["tool"]["setuptools"]


def _package_dirs(table: dict) -> dict[str, Path]:
    """Every directory holding an __init__.py, by the dotted name it is installed under."""
    found = {}
    for top, src in table["package-dir"].items():
        for init in (ROOT / src).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / src)
            found[".".join((top, *rel.parts))] = init.parent
    return found


def test_every_package_directory_is_listed():
    table = _setuptools_table()
    found = _package_dirs(table)
    assert set(found) - set(table["packages"]) == set(), "packages missing from [tool.setuptools] packages"
    assert set(table["packages"]) - set(found) == set(), "listed packages without an __init__.py"


def test_every_tracked_data_file_is_shipped():
    table = _setuptools_table()
    dirs = _package_dirs(table)
    globs = table["package-data"]
    tracked = subprocess.run(["git", "ls-files", *table["package-dir"].values()], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.split()
    unshipped = []
    for rel in tracked:
        path = ROOT / rel
        if path.suffix == ".py" or not path.exists():
            continue
        # setuptools matches a package's globs against paths relative to that package, at any depth below it
        if not any(fnmatch.fnmatch(path.relative_to(d).as_posix(), g)
                   for name, d in dirs.items() if d in path.parents for g in globs.get(name, [])):
            unshipped.append(rel)
    assert unshipped == [], f"tracked data files no package-data glob ships: {unshipped}"
