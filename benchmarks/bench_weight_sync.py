"""Trainer-side weight-sync time: gather (FSDP2 `full_tensor`, one tensor at a time), cast, flatten into per-dtype
buckets, hand-off — for Qwen2.5-1.5B- and 7B-shaped models (random weights from a config, no download).

Hand-off: the trainer's share of the CUDA IPC hand-off, one IPC handle per bucket
(`torch.multiprocessing.reductions.reduce_tensor`, what SGLang's serializer does per tensor it pickles). The
engine's own copy into its weights is not in the number (no SGLang on the benchmark machine). Beside it, the
per-tensor path (one handle per tensor) that bucketing replaces. Target (issue 5): <= 0.5 s for 1.5B colocated. On CPU a tiny model runs as a smoke test.
FSDP2 runs over a one-rank process group so the DTensor gather path is the real one.
"""
from __future__ import annotations

import socket
import time

import pytest
import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, Qwen2Config

from raro_fast.model.policy import PolicyModel
from raro_fast.weight_sync import hf_named_tensors, iter_buckets

CUDA = torch.cuda.is_available()
SHAPES = {
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
}
SMOKE = {"tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=True)}
BUCKET_MB = (128, 512, 1024) if CUDA else (1,)


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def _one_rank_world():
    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("nccl" if CUDA else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def _sharded_model(shape: dict) -> PolicyModel:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    device = torch.device("cuda" if CUDA else "cpu")
    with device:
        lm = AutoModelForCausalLM.from_config(Qwen2Config(**shape), torch_dtype=torch.float32)
    model = PolicyModel(lm)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in model.decoder_layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def _time(fn, repeats=3) -> float:
    fn()  # warm-up
    _sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync()
        best = min(best, time.perf_counter() - t0)
    return best


@pytest.mark.parametrize("name", list(SHAPES if CUDA else SMOKE))
def test_weight_sync_time(name, bench_table, tmp_path):
    _one_rank_world()
    shape = (SHAPES if CUDA else SMOKE)[name]
    model = _sharded_model(shape)
    from torch.multiprocessing.reductions import reduce_tensor as handoff
    n_params = sum(p.numel() for p in model.parameters())
    rows = []

    def gather_only():
        for _ in hf_named_tensors(model, dtype=torch.bfloat16):
            pass

    t_gather = _time(gather_only)
    def per_tensor():
        for _, t in hf_named_tensors(model, dtype=torch.bfloat16):
            handoff(t.contiguous())

    rows.append([name, f"{n_params / 1e9:.2f}B", "per tensor", f"{t_gather:.3f}", "-", f"{_time(per_tensor):.3f}"])
    for mb in BUCKET_MB:
        def flatten_only(mb=mb):
            for _ in iter_buckets(hf_named_tensors(model, dtype=torch.bfloat16), mb * 2**20):
                pass

        def full_sync(mb=mb):
            for bucket in iter_buckets(hf_named_tensors(model, dtype=torch.bfloat16), mb * 2**20):
                handoff(bucket.flat)

        rows.append([name, f"{n_params / 1e9:.2f}B", f"{mb} MB buckets", f"{t_gather:.3f}", f"{_time(flatten_only):.3f}",
                     f"{_time(full_sync):.3f}"])
    bench_table(f"weight sync, trainer side ({'CUDA' if CUDA else 'CPU smoke'}; seconds, best of 3)",
                ["model", "params", "path", "gather+cast", "+flatten", "+IPC hand-off (total)"], rows)
