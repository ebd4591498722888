"""Trainer-side weight-sync time: gather (FSDP2 `full_tensor`, one tensor at a time), cast, flatten into per-dtype
buckets, hand-off — for Qwen2.5-1.5B- and 7B-shaped models (random weights from a config, no download).

Hand-off: each bucket goes to a second process over a torch.multiprocessing queue (one CUDA IPC handle per bucket,
what SGLang's serializer makes per tensor it pickles); that process, standing in for a colocated engine, opens
it, copies it into buffers of its own, drops the handle and acknowledges before the next bucket is sent (so no
buffer is reused before the engine has synchronised). The total is therefore an upper bound on the trainer's side:
it includes the engine's copy, not SGLang's own weight loading (no SGLang on the benchmark machine). Beside it,
the per-tensor path (one hand-off per tensor) that bucketing replaces. Target (issue 5): <= 0.5 s for 1.5B colocated. On CPU a tiny model runs as a smoke test.
FSDP2 runs over a one-rank process group so the DTensor gather path is the real one.
"""
from __future__ import annotations

import queue
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
        lm = AutoModelForCausalLM.from_config(Qwen2Config(**shape), dtype=torch.float32)
    model = PolicyModel(lm)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in model.decoder_layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def _engine_stand_in(inbox, acks) -> None:
    """The receiving side of the hand-off: open each tensor, copy it into memory of its own, release, ack."""
    own: dict[int, torch.Tensor] = {}
    while (item := inbox.get()) is not None:
        key, t = item
        if key not in own or own[key].shape != t.shape:
            own[key] = torch.empty_like(t)
        own[key].copy_(t)
        _sync()
        del t
        acks.put(key)


class _Engine:
    def __init__(self):
        ctx = torch.multiprocessing.get_context("spawn")
        self.inbox, self.acks = ctx.Queue(), ctx.Queue()
        self.proc = ctx.Process(target=_engine_stand_in, args=(self.inbox, self.acks), daemon=True)
        self.proc.start()
        self.pending = 0

    def hand_off(self, key: int, t: torch.Tensor) -> None:
        self.inbox.put((key, t))
        deadline = time.monotonic() + 120
        while True:
            try:
                got = self.acks.get(timeout=1)
                break
            except queue.Empty:
                if not self.proc.is_alive():
                    raise RuntimeError(f"engine stand-in exited (code {self.proc.exitcode}) "
                                       f"while copying tensor {key} {tuple(t.shape)} {t.dtype}") from None
                if time.monotonic() > deadline:
                    raise RuntimeError(f"engine stand-in has not acknowledged tensor {key} in 120 s") from None
        if got != key:
            raise RuntimeError("engine stand-in acknowledged the wrong tensor")
        self.pending += t.numel() * t.element_size()
        if CUDA and self.pending > 2**31:
            # Memory shared over IPC returns to the sender's allocator only when collected, once the receiver
            # has released it; uncollected, every timed pass would keep a whole extra copy of the model.
            torch.cuda.ipc_collect()
            self.pending = 0

    def close(self) -> None:
        self.inbox.put(None)
        self.proc.join(timeout=60)
        if CUDA:
            torch.cuda.ipc_collect()  # handles the stand-in released


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
    n_params = sum(p.numel() for p in model.parameters())
    rows = []

    def add(row):  # printed at once too (with -s): a run cut short keeps what it measured
        rows.append(row)
        print(" | ".join(row), flush=True)

    def gather_only():
        for _ in hf_named_tensors(model, dtype=torch.bfloat16):
            pass

    def timed_hand_off(send) -> float:
        # A fresh receiver per path: it holds one copy of the model (a 7B one is 15 GB in bf16), never two.
        engine = _Engine()
        try:
            return _time(lambda: send(engine))
        finally:
            engine.close()

    t_gather = _time(gather_only)

    def per_tensor(engine):
        for i, (_, t) in enumerate(hf_named_tensors(model, dtype=torch.bfloat16)):
            engine.hand_off(i, t.contiguous())

    add([name, f"{n_params / 1e9:.2f}B", "per tensor", f"{t_gather:.3f}", "-", f"{timed_hand_off(per_tensor):.3f}"])
    for mb in BUCKET_MB:
        def flatten_only(mb=mb):
            for _ in iter_buckets(hf_named_tensors(model, dtype=torch.bfloat16), mb * 2**20):
                pass

        def full_sync(engine, mb=mb):
            for i, bucket in enumerate(iter_buckets(hf_named_tensors(model, dtype=torch.bfloat16), mb * 2**20)):
                engine.hand_off(i, bucket.flat)

        add([name, f"{n_params / 1e9:.2f}B", f"{mb} MB buckets", f"{t_gather:.3f}", f"{_time(flatten_only):.3f}",
             f"{timed_hand_off(full_sync):.3f}"])
    model = None  # freed before the next shape is built
    if CUDA:
        torch.cuda.empty_cache()
    bench_table(f"weight sync, trainer side ({'CUDA' if CUDA else 'CPU smoke'}; seconds, best of 3)",
                ["model", "params", "path", "gather+cast", "+flatten", "+hand-off to engine process (total)"], rows)
