"""benchmarks/compile_report.py still compiles the fused-GEMM kernels for Hopper and reads their SASS (no GPU
needed: Triton's own ptxas and cuobjdump). Run in a subprocess: the tests' Triton interpreter would replace the
kernels it compiles."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]
TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
pytestmark = pytest.mark.skipif(not (TOOLS / "ptxas").exists() or not (TOOLS / "cuobjdump").exists(),
                                reason="this Triton ships no ptxas/cuobjdump")


def test_report_rows_for_both_kernels(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "compile_report.py"), "--configs", "1", "--hidden", "1536",
         "--tokens", "4096", "--sass-dir", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    header = [c.strip() for c in next(line for line in lines if line.startswith("| kernel")).strip("|").split("|")]
    rows = [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines
            if line.startswith("| _")]
    assert [r["kernel"] for r in rows] == ["_stats_kernel", "_dz_kernel"]
    for r in rows:
        assert 0 < int(r["regs"]) <= 255
        assert int(r["HGMMA"]) > 0 and int(r["HMMA"]) == 0  # Hopper's warpgroup MMA, not the older mma.sync
        assert int(r["LDGSTS"]) > 0  # pipelined asynchronous copies: the launch specialisations were applied
    assert len(list(tmp_path.glob("*.sass"))) == 2
