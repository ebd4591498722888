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


def test_the_commit_is_the_benchmarked_checkouts_wherever_pytest_starts(tmp_path, monkeypatch):
    """git was asked in pytest's working directory: started from another repository, the JSON named its commit
    (found by review on 2026-12-07)."""
    import importlib.util

    sys.path.insert(0, str(ROOT / "benchmarks"))  # it imports harness
    spec = importlib.util.spec_from_file_location("bench_conftest", ROOT / "benchmarks" / "conftest.py")
    bench_conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_conftest)
    other = tmp_path / "other"
    other.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=other, check=True)
    monkeypatch.chdir(other)
    monkeypatch.delenv("RARO_COMMIT", raising=False)
    bench_conftest._commit.cache_clear()
    here = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    assert bench_conftest._commit().split()[0] == here
    bench_conftest._commit.cache_clear()


def test_the_rollout_benchmark_times_every_backend_on_the_same_prompts(monkeypatch):
    """Drawn inside the backend loop, the second backend got other prompts (3% more tokens at 256): the "vs
    embedded" column compared unequal work (found by review on 2026-12-07)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_rollout

    seen = {}

    class Recording:
        def __init__(self, name):
            self.name = name

        def generate(self, prompts, params):
            if params.seed == 0:
                seen.setdefault(len(prompts), {})[self.name] = prompts
            return [[]] * len(prompts)

        def release_memory(self, tags):
            pass

    monkeypatch.setattr(bench_rollout, "_engines", lambda model: {"embedded": Recording("embedded"),
                                                                   "continuous": Recording("continuous")})
    monkeypatch.setattr(bench_rollout, "PROMPTS", (8, 32))
    monkeypatch.setattr(bench_rollout, "REPS", 1)
    try:
        bench_rollout.test_rollout_throughput("embedded-default", lambda *a, **k: None)
    except ZeroDivisionError:  # no token came back from the recording engines
        pass
    assert sorted(seen) == [8, 32] and all(by["embedded"] == by["continuous"] for by in seen.values())
