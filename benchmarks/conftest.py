"""Benchmark plumbing: timing, peak memory, and tables printed at the end of `pytest benchmarks/`.

Benchmarks are measurements, never timed tests: nothing here fails because a machine is slow. Each benchmark
hands its rows to the `bench_table` fixture; the tables are printed from `pytest_terminal_summary`, so they
show without `-s`. When RARO_BENCH_JSON names a file, each table is also written there as JSON the moment it is
made, with the device, versions, date, commit (RARO_COMMIT, else git's) and command, and printed at once: a run cut
by its time limit on a lent GPU used to lose every table, because they were written at the end only.
"""
from __future__ import annotations

import datetime
import functools
import json
import os
import subprocess
from pathlib import Path
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict

import pytest
from harness import Table, device_description, versions

_TABLES: list[Table] = []


@functools.cache  # once a run: git is asked at the first table, not at each
def _commit() -> str:
    """RARO_COMMIT where the command names it (a lent GPU's checkout may carry no .git), else git's HEAD."""
    if os.environ.get("RARO_COMMIT"):
        return os.environ["RARO_COMMIT"]
    here = Path(__file__).resolve().parent  # the benchmarked checkout, wherever pytest was started (review)
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, cwd=here)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=10, cwd=here).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if head.returncode != 0:
        return "unknown"
    return head.stdout.strip() + (" (with uncommitted changes)" if dirty else "")


_STARTED = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv)}


def _write_json(path: str) -> None:
    record = {"device": device_description(), "versions": versions(), **_STARTED, "commit": _commit(),
              "tables": [asdict(t) for t in _TABLES]}
    with open(path + ".tmp", "w") as f:
        json.dump(record, f, indent=1)
    os.replace(path + ".tmp", path)


@pytest.fixture(scope="session")
def bench_table() -> Callable[[str, Sequence[str], Sequence[Sequence[object]]], None]:
    """bench_table(title, columns, rows): a table for the end-of-run summary, and at once for RARO_BENCH_JSON."""

    def add(title: str, columns: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
        table = Table(title, list(columns), [[str(c) for c in r] for r in rows])
        _TABLES.append(table)
        path = os.environ.get("RARO_BENCH_JSON")
        if path:
            _write_json(path)
            print(f"\n{table.render()}", file=sys.__stdout__, flush=True)

    return add


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:  # noqa: ARG001
    if not _TABLES:
        return
    terminalreporter.section("benchmark results")
    terminalreporter.write_line(f"device: {device_description()}; {versions()}")
    for table in _TABLES:
        terminalreporter.write_line("")
        for line in table.render().splitlines():
            terminalreporter.write_line(line)
