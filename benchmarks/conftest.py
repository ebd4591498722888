"""Benchmark plumbing: timing, peak memory, and tables printed at the end of `pytest benchmarks/`.

Benchmarks are measurements, never timed tests: nothing here fails because a machine is slow. Each benchmark
hands its rows to the `bench_table` fixture; the tables are printed from `pytest_terminal_summary`, so they
show without `-s`, and, when RARO_BENCH_JSON names a file, are also written there as JSON (for RESULTS.md).
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict

import pytest
from harness import Table, device_description, versions

_TABLES: list[Table] = []


@pytest.fixture(scope="session")
def bench_table() -> Callable[[str, Sequence[str], Sequence[Sequence[object]]], None]:
    """bench_table(title, columns, rows): queue a table for the end-of-run summary (and the JSON file)."""

    def add(title: str, columns: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
        _TABLES.append(Table(title, list(columns), [[str(c) for c in r] for r in rows]))

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
    path = os.environ.get("RARO_BENCH_JSON")
    if path:
        with open(path, "w") as f:
            json.dump({"device": device_description(), "versions": versions(),
                       "tables": [asdict(t) for t in _TABLES]}, f, indent=1)
