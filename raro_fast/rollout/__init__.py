"""Rollout engines behind one interface (engine.py): the embedded transformers engine, and SGLang on GPU nodes."""
from __future__ import annotations

from raro_fast.rollout.engine import Completion, RolloutEngine, SamplingParams

__all__ = ["Completion", "RolloutEngine", "SamplingParams", "check_backend", "make_engine"]


def check_backend(cfg, device, dtype: str) -> None:
    """What `cfg.backend` needs here (SGLang installed and new enough, a GPU and a half-precision dtype for a
    colocated engine), checked before any model is built or warmed up so a wrong setting fails in a second, not
    after minutes of work. `dtype`: the engine's, e.g. "bfloat16"."""
    if cfg.backend == "embedded":
        return
    from raro_fast.rollout.sglang import require_sglang

    require_sglang(cfg.backend)
    if cfg.backend == "sglang" and device.type != "cuda":
        raise ValueError("rollout.backend='sglang' runs on CUDA GPUs only; use --rollout.backend embedded here")
    if cfg.backend == "sglang" and dtype not in ("bfloat16", "float16"):
        # SGLang 0.5.23 picks fa3 on Hopper and flashinfer elsewhere (model_override_base.py); both are built for
        # fp16/bf16 only, so an fp32 engine would fail deep inside its first forward.
        raise ValueError(f"model.dtype={dtype} with rollout.backend='sglang': SGLang's attention kernels on GPUs "
                         "(fa3, flashinfer) take bfloat16/float16 only; use --model.dtype bfloat16 (what 'auto' "
                         "picks on CUDA)")


def make_engine(cfg, model, tokenizer, *, model_path: str, dtype: str, device, rank: int, seed: int,
                end_ids: list[int] | None = None) -> RolloutEngine:
    """The engine `cfg.backend` names. `model` (the embedded engine's own copy) is used only by the embedded
    backend, which takes its end tokens from it; SGLang loads `model_path` itself, stops at `end_ids`, and is
    imported only when asked for."""
    if cfg.backend == "embedded":
        from raro_fast.rollout.embedded import EmbeddedEngine

        return EmbeddedEngine.from_tokenizer(model, tokenizer, batch_size=cfg.batch_size)
    from raro_fast.rollout.sglang import SGLangEngine, SGLangServerEngine

    check_backend(cfg, device, dtype)
    bucket_bytes = cfg.weight_bucket_mb * 2**20
    if cfg.backend == "sglang":
        return SGLangEngine(model_path=model_path, tokenizer=tokenizer, dtype=dtype, mem_fraction=cfg.mem_fraction,
                            tp_size=cfg.tp_size, bucket_bytes=bucket_bytes, seed=seed + rank, gpu_id=device.index or 0,
                            end_ids=end_ids)
    return SGLangServerEngine(url=cfg.sglang_url, tokenizer=tokenizer, bucket_bytes=bucket_bytes, sync_rank=rank == 0,
                              server_ranks=cfg.server_ranks, group_address=cfg.weight_group_address,
                              group_port=cfg.weight_group_port, group_backend="nccl" if device.type == "cuda" else "gloo",
                              end_ids=end_ids)
