"""A benchmark run cut by its time limit keeps the tables it made: on a lent GPU, `timeout` ends pytest before its
summary, where the tables and RARO_BENCH_JSON used to be written (found by review: a cut run left no table)."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_a_cut_benchmark_run_keeps_its_tables_with_date_commit_and_command(tmp_path):
    bench = tmp_path / "benchmarks"
    bench.mkdir()
    for name in ("conftest.py", "harness.py"):
        shutil.copy(ROOT / "benchmarks" / name, bench / name)
    (bench / "bench_cut.py").write_text(
        "import time\n\n"
        "def test_first(bench_table):\n"
        "    bench_table('first table', ['a', 'b'], [[1, 2.5]])\n\n"
        "def test_second_never_ends(bench_table):\n"
        "    time.sleep(600)\n")
    out = tmp_path / "bench.json"
    env = {"PATH": "/usr/bin:/bin", "RARO_BENCH_JSON": str(out), "RARO_COMMIT": "abc123", "PYTHONPATH": str(bench)}
    cut = subprocess.run(["timeout", "20", sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
                          "-o", "python_files=bench_*.py", "--rootdir", str(bench), str(bench)],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert cut.returncode == 124  # killed by its limit, before pytest's summary
    record = json.loads(out.read_text())
    assert [t["title"] for t in record["tables"]] == ["first table"] and record["tables"][0]["rows"] == [["1", "2.5"]]
    assert record["commit"] == "abc123" and "pytest" in record["command"] and record["date"].startswith("20")
    assert "first table" in cut.stdout  # printed when made (gpu_run.sh runs with -s), not at the end
