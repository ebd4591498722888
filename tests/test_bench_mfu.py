"""benchmarks/: MFU is stated against a GPU's rated dense bf16 peak (the usual definition), and counts causal
attention within each sequence; both are checked here without a GPU, on the update-step benchmark's own batch."""
import math
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from harness import rated_bf16_flops  # noqa: E402


@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 NVL", 835.5), ("NVIDIA H100 PCIe", 756.5),
    ("NVIDIA H200", 989.4), ("NVIDIA H200 NVL", 835.5), ("NVIDIA A100-SXM4-80GB", 312.0),
])
def test_rated_peaks_by_device_name(name, tflops):
    assert rated_bf16_flops(name) == tflops * 1e12


def test_an_unknown_gpu_has_no_rated_peak():
    assert math.isnan(rated_bf16_flops("NVIDIA GeForce GTX 1080"))


def test_the_run_of_records_mfu_against_the_rated_peak():
    # RESULTS.md, H200 2026-11-27: 2942 ms for the packed step of this batch. Against the 783 TFLOP/s that an
    # 8192^3 matmul measured, without attention, it read 49.6%; the usual definition gives 40.5%.
    from bench_update_step import QWEN25_1_5B, mixed_batch, model_flops

    samples = mixed_batch(random.Random(0), n_policy=64, n_critic=64, scale=1.0, vocab=QWEN25_1_5B["vocab_size"])
    tokens = sum(len(s.input_ids) for s in samples)
    assert tokens == 123429  # the batch of record
    n_params = 1_543_714_304  # Qwen2.5-1.5B shape, tied embedding counted once
    assert round(6 * n_params * tokens / 2.942 / 783e12, 3) == 0.496  # the old figure
    flops = model_flops(n_params, samples, QWEN25_1_5B)
    assert 1.03 < flops / (6 * n_params * tokens) < 1.035  # attention: 3.2% on top
    assert round(flops / 2.942 / rated_bf16_flops("NVIDIA H200"), 3) == 0.405
