"""Rollout engines behind one interface (engine.py): the embedded transformers engine, transformers' continuous
batching, and SGLang on GPU nodes."""
from __future__ import annotations

from raro_fast.rollout.engine import Completion, RolloutEngine, SamplingParams

__all__ = ["Completion", "RolloutEngine", "SamplingParams", "auto_backend", "check_backend", "make_engine",
           "settle_backend"]


def auto_backend(device) -> tuple[str, str]:
    """The one place `rollout.backend=auto` is decided: the backend measured fastest on `device`'s kind, and why.

    SGLang is never picked: it is a separate install with settings of its own (memory fraction, TP size)."""
    if device.type == "cuda":
        # Nothing measured on a GPU yet: benchmarks/bench_rollout.py measures both backends; until its numbers are
        # in benchmarks/RESULTS.md, the embedded engine stays the choice.
        return "embedded", "no GPU measurement of the continuous backend yet (benchmarks/bench_rollout.py)"
    # benchmarks/rollout_cpu_real_model.py, 2 CPU cores, SmolLM2-135M, 8 prompts x 4 samples x 64 tokens, fp32
    # (2026-12-06): embedded 199-201 tokens/s (median of 4 calls, two runs), continuous 104-115.
    return "embedded", "on CPU it measured faster than continuous batching (about 200 vs 104-115 tokens/s)"


def settle_backend(requested: str, device, continuous_missing) -> tuple[str, str | None]:
    """The in-process backend that runs for `requested` on `device`, and the line that says so where it is not
    simply what was asked for. `continuous_missing()`: why continuous batching cannot run here (None: it can),
    asked only when it matters. Other backends pass through."""
    backend, line = requested, None
    if requested == "auto":
        backend, why = auto_backend(device)
        line = f"rollout.backend=auto: {backend} ({why})"
    if backend == "continuous":
        reason = continuous_missing()
        if reason:
            return "embedded", f"rollout.backend={requested}: {reason}; using the embedded engine instead"
    return backend, line


def check_backend(cfg, device, dtype: str) -> None:
    """What `cfg.backend` needs here (SGLang installed and new enough, a GPU and a half-precision dtype for a
    colocated engine), checked before any model is built or warmed up so a wrong setting fails in a second, not
    after minutes of work. `dtype`: the engine's, e.g. "bfloat16".

    It also settles which in-process backend runs (`settle_backend`) and writes it back into `cfg.backend`, with
    one line where that is not what was asked for: everything after it (the engine's model copy, the saved config)
    then sees the backend actually used."""
    if cfg.backend in ("auto", "continuous"):
        cfg.backend, line = settle_backend(cfg.backend, device, _continuous_missing)
        if line:
            _say(line)
    if cfg.backend in ("embedded", "continuous"):
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
                end_ids: list[int] | None = None, positions: int | None = None) -> RolloutEngine:
    """The engine `cfg.backend` names (`auto` and an unavailable `continuous` settled by `check_backend` first).
    `model` is the in-process engines' own copy; the embedded backend needs it and takes its end tokens from it.
    The continuous backend uses it where given, else loads `model_path` in `dtype` onto `device` (as SGLang does);
    it and SGLang stop at `end_ids`. `positions`: the trained model's, which an SGLang engine is asked to stay
    within (`engine_context_limit`). Each backend's module is imported only when asked for."""
    if cfg.backend in ("auto", "continuous"):
        check_backend(cfg, device, dtype)
    if cfg.backend == "embedded":
        from raro_fast.rollout.embedded import EmbeddedEngine

        return EmbeddedEngine.from_tokenizer(model, tokenizer, batch_size=cfg.batch_size)
    if cfg.backend == "continuous":
        from raro_fast.rollout.continuous import ContinuousEngine

        if model is None:
            import torch
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype)).to(device)
        return ContinuousEngine.from_tokenizer(model, tokenizer, end_ids=end_ids)
    from raro_fast.rollout.sglang import SGLangEngine, SGLangServerEngine

    check_backend(cfg, device, dtype)
    bucket_bytes = cfg.weight_bucket_mb * 2**20
    if cfg.backend == "sglang":
        engine = SGLangEngine(model_path=model_path, tokenizer=tokenizer, dtype=dtype, mem_fraction=cfg.mem_fraction,
                              tp_size=cfg.tp_size, bucket_bytes=bucket_bytes, seed=seed + rank,
                              gpu_id=device.index or 0, end_ids=end_ids)
    else:
        engine = SGLangServerEngine(url=cfg.sglang_url, tokenizer=tokenizer, bucket_bytes=bucket_bytes,
                                    sync_rank=rank == 0, server_ranks=cfg.server_ranks,
                                    group_address=cfg.weight_group_address, group_port=cfg.weight_group_port,
                                    group_backend="nccl" if device.type == "cuda" else "gloo",
                                    timeout_s=cfg.sglang_timeout_s, end_ids=end_ids)
    engine.context_limit = positions
    return engine


def _continuous_missing() -> str | None:
    from raro_fast.rollout.continuous import continuous_batching_unavailable

    return continuous_batching_unavailable()


def _say(line: str) -> None:
    """Print `line` once per job: on rank 0 where a process group is up (every rank settles the same backend)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        print(line, flush=True)
