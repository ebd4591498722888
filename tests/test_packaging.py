"""Both wheels ship every package and data file: an editable install would hide a package missing from pyproject's
explicit list (it did once: `raro_fast.weight_sync`, so `pip install .` gave an ImportError in training). The
kernels are a project of their own (kernels/pyproject.toml) that needs torch and triton only."""
from __future__ import annotations

import fnmatch
import re
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECTS = [ROOT, ROOT / "kernels"]


def _pyproject(project: Path) -> dict:
    with open(project / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def _package_dirs(project: Path, table: dict) -> dict[str, Path]:
    """Every directory holding an __init__.py, by the dotted name it is installed under."""
    tops = table.get("package-dir") or {p: p for p in table["packages"] if "." not in p}
    found = {}
    for top, src in tops.items():
        for init in (project / src).rglob("__init__.py"):
            rel = init.parent.relative_to(project / src)
            found[".".join((top, *rel.parts))] = init.parent
    return found


@pytest.mark.parametrize("project", PROJECTS, ids=["raro-fast", "raro-kernels"])
def test_every_package_directory_is_listed(project):
    table = _pyproject(project)["tool"]["setuptools"]
    found = _package_dirs(project, table)
    assert set(found) - set(table["packages"]) == set(), "packages missing from [tool.setuptools] packages"
    assert set(table["packages"]) - set(found) == set(), "listed packages without an __init__.py"


@pytest.mark.parametrize("project", PROJECTS, ids=["raro-fast", "raro-kernels"])
def test_every_tracked_data_file_is_shipped(project):
    table = _pyproject(project)["tool"]["setuptools"]
    dirs = _package_dirs(project, table)
    globs = table.get("package-data", {})
    tracked = subprocess.run(["git", "ls-files", *map(str, dirs.values())], cwd=project, capture_output=True,
                             text=True, check=True).stdout.split()
    unshipped = []
    for rel in tracked:
        path = project / rel
        if path.suffix == ".py" or not path.exists():
            continue
        # setuptools matches a package's globs against paths relative to that package, at any depth below it
        if not any(fnmatch.fnmatch(path.relative_to(d).as_posix(), g)
                   for name, d in dirs.items() if d in path.parents for g in globs.get(name, [])):
            unshipped.append(rel)
    assert unshipped == [], f"tracked data files no package-data glob ships: {unshipped}"


def _names(requirements: list[str]) -> set[str]:
    return {re.match(r"[A-Za-z0-9_.-]+", r)[0].lower() for r in requirements}


def test_the_kernels_need_torch_and_triton_only_and_raro_fast_depends_on_them():
    kernels = _pyproject(ROOT / "kernels")["project"]
    assert kernels["name"] == "raro-kernels" and _names(kernels["dependencies"]) == {"torch", "triton"}
    assert "raro-kernels" in _names(_pyproject(ROOT)["project"]["dependencies"])
    # and the source agrees: nothing under kernels/ imports raro_fast
    offenders = [str(f.relative_to(ROOT)) for f in (ROOT / "kernels").rglob("*.py")
                 if re.search(r"^\s*(from|import)\s+raro_fast\b", f.read_text(), re.M)]
    assert offenders == []


def test_the_readmes_layout_table_names_every_module_and_folder():
    """Issue 20: the layout table matches the tree. Every top-level module and folder of raro_fast/ and of the
    repository's code folders is named in it."""
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Layout"):].split("\n## ", 1)[0]
    named = set(re.findall(r"`([\w./-]+)`", table))
    names = {n.rsplit("/", 1)[-1] if not n.endswith("/") else n.rstrip("/").rsplit("/", 1)[-1] + "/" for n in named}
    entries = [p for p in (ROOT / "raro_fast").iterdir()
               if (p.suffix == ".py" and p.name != "__init__.py") or (p / "__init__.py").is_file()]
    missing = [p.name + ("/" if p.is_dir() else "") for p in entries
               if (p.name + ("/" if p.is_dir() else "")) not in names]
    assert missing == [], f"raro_fast entries the README's layout table does not name: {missing}"
    for folder in ("kernels/", "benchmarks/", "configs/", "experiments/"):
        assert folder in names, folder
