"""Benchmark helpers: timing and peak memory of a callable, and a plain-text table (used by conftest.py's
`bench_table` fixture and by the bench_*.py files)."""
from __future__ import annotations

import importlib.metadata
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)

    def render(self) -> str:
        cells = [self.columns] + self.rows
        widths = [max(len(str(r[i])) for r in cells) for i in range(len(self.columns))]
        line = lambda r: "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
        rule = "-" * (sum(widths) + 2 * (len(widths) - 1))
        return "\n".join([self.title, rule, line(self.columns), rule, *(line(r) for r in self.rows), rule])


def device_description() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    # the threads torch runs on, not the cores (OMP_NUM_THREADS=1 on 2 cores read "2 threads"; found by review)
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads of {os.cpu_count()} cores"


# Dense (not 2:4 sparse) bf16 tensor-core peaks from NVIDIA's data sheets, TFLOP/s, by a substring of
# torch.cuda.get_device_name(); more specific names first (an "H100 NVL" also contains "H100").
RATED_BF16_TFLOPS = (("H200 NVL", 835.5), ("H200", 989.4), ("H100 NVL", 835.5), ("H100 PCIe", 756.5),
                     ("H100", 989.4), ("A100", 312.0), ("L40S", 362.05))


def rated_bf16_flops(device_name: str) -> float:
    """The data-sheet dense bf16 peak of a GPU, in FLOP/s, the denominator of MFU as usually stated (PaLM's);
    NaN for a GPU not in the table."""
    for name, tflops in RATED_BF16_TFLOPS:
        if name in device_name:
            return tflops * 1e12
    return float("nan")


def versions() -> str:
    try:
        import triton

        tv = triton.__version__
    except ImportError:  # pragma: no cover
        tv = "none"
    # the baselines' versions too: their rows time whatever is installed (found by review: none was recorded)
    extra = []
    for package in ("liger_kernel", "cut_cross_entropy"):
        try:
            extra.append(f"{package.replace('_', '-')} {importlib.metadata.version(package.replace('_', '-'))}")
        except importlib.metadata.PackageNotFoundError:
            pass
    return ", ".join([f"torch {torch.__version__}, triton {tv}", *extra])


@dataclass(frozen=True)
class Measurement:
    median_ms: float
    peak_extra_bytes: int | None  # None on CPU


def measure(fn: Callable[[], object], *, device: torch.device, reps: int, warmup: int = 1) -> Measurement:
    """Median wall time of fn() over `reps` runs after `warmup` runs (CUDA events on GPU), and the peak
    memory allocated during one more run above what was allocated before it (CUDA only)."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        return Measurement(statistics.median(times), peak)
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return Measurement(statistics.median(times), None)
