"""Rollout generation: tokens/s and time per call of every in-process backend side by side (the embedded engine,
transformers' continuous batching where the installed transformers has it), on the same model and prompts.

Models (random weights from a config, nothing downloaded, bf16): the embedded default model (EmbeddedModelConfig,
the project's tokenizer), Qwen2.5-0.5B- and 1.5B-shaped models. Workload: 64 and 256 prompts of 64-192 random
tokens, one sample each, 256 new tokens at temperature 1 (random weights rarely draw an end token, so nearly every
sample runs to the limit), the embedded engine at the trainer's default `rollout.batch_size` (128 since
2026-12-06, 64 before).
Each call is timed as the trainer makes it: after `release_memory(("kv_cache",))`, so the continuous engine's cache
is built inside the timed call, as it is every step. One untimed warm-up call first (16 new tokens) takes the
one-time costs (CUDA context, kernel selection). tokens/s = generated tokens / wall time of the call. SGLang is not
measured here (it runs out of process and is not installed on the benchmark machines).
On CPU a smoke version runs: the embedded default model, 8 prompts, 16 new tokens, fp32.
"""
from __future__ import annotations

import random
import statistics
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from raro_fast.config import EmbeddedModelConfig, RolloutConfig
from raro_fast.model.hf import build_embedded_model, load_project_tokenizer
from raro_fast.rollout.continuous import ContinuousEngine, continuous_batching_unavailable
from raro_fast.rollout.embedded import EmbeddedEngine
from raro_fast.rollout.engine import SamplingParams

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16 if CUDA else torch.float32
QWEN_SHAPES = {
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=4096),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=4096),
}
MODELS = ["embedded-default", *QWEN_SHAPES] if CUDA else ["embedded-default"]
PROMPTS = (64, 256) if CUDA else (8,)
NEW_TOKENS = 256 if CUDA else 16
REPS = 2 if CUDA else 1
EOS = 1  # random weights: an end token the model draws about as rarely as any other


def _model(name: str):
    if name == "embedded-default":
        e = EmbeddedModelConfig()
        model = build_embedded_model(load_project_tokenizer(), hidden_size=e.hidden_size, num_layers=e.num_layers,
                                     num_heads=e.num_heads, num_kv_heads=e.num_kv_heads,
                                     intermediate_size=e.intermediate_size, max_position=e.max_position, seed=0)
        return model.to(DEVICE, DTYPE).eval()
    torch.manual_seed(0)
    with DEVICE:
        return AutoModelForCausalLM.from_config(Qwen2Config(**QWEN_SHAPES[name]), dtype=DTYPE,
                                                attn_implementation="sdpa").eval()


def _engines(model) -> dict[str, object]:
    """Every in-process backend available here, by name; a string where one is not (the reason)."""
    kw = dict(pad_token_id=0, eos_token_ids=[EOS], decode=lambda ids: "")
    missing = continuous_batching_unavailable()
    return {"embedded": EmbeddedEngine(model, batch_size=RolloutConfig().batch_size, **kw),
            "continuous": missing or ContinuousEngine(model, **kw)}


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def _timed_call(engine, prompts, params) -> tuple[float, int, float | None]:
    """Seconds, generated tokens, and peak GB allocated during one call made as the trainer makes it."""
    engine.release_memory(("kv_cache",))
    _sync()
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    outs = engine.generate(prompts, params)
    _sync()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if CUDA else None
    return seconds, sum(len(c.token_ids) for o in outs for c in o), peak


@pytest.mark.parametrize("name", MODELS)
def test_rollout_throughput(name, bench_table):
    model = _model(name)
    n_params = sum(p.numel() for p in model.parameters())
    vocab = model.config.vocab_size
    rng = random.Random(0)
    rows = []

    def add(row):  # printed at once too (with -s): a run cut short keeps what it measured
        rows.append([str(c) for c in row])
        print(" | ".join(rows[-1]), flush=True)

    # One draw of prompts per count, for every backend (found by review: drawn in the loop, each backend timed
    # other prompts, 3% more tokens for the second at 256).
    drawn = {n: [[rng.randrange(2, vocab) for _ in range(rng.randrange(64, 193))] for _ in range(n)] for n in PROMPTS}
    for backend, engine in _engines(model).items():
        if isinstance(engine, str):
            add([name, f"{n_params / 1e6:.1f}M", "-", NEW_TOKENS, backend, "unavailable: " + engine, "", "", ""])
            continue
        for n_prompts in PROMPTS:
            prompts = drawn[n_prompts]
            params = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=1.0, seed=0)
            try:
                engine.generate(prompts, SamplingParams(max_new_tokens=16, temperature=1.0, seed=1))  # warm-up
                runs = [_timed_call(engine, prompts, params) for _ in range(REPS)]
            except Exception as e:  # noqa: BLE001 - one backend's failure must not hide the others' numbers
                add([name, f"{n_params / 1e6:.1f}M", n_prompts, NEW_TOKENS, backend,
                     f"failed: {type(e).__name__}: {str(e)[:120]}", "", "", ""])
                continue
            seconds = statistics.median(r[0] for r in runs)
            tokens = statistics.median(r[1] for r in runs)
            peak = max(r[2] for r in runs) if CUDA else None
            add([name, f"{n_params / 1e6:.1f}M", n_prompts, NEW_TOKENS, backend, f"{seconds:.3f}", f"{tokens:.0f}",
                 f"{tokens / seconds:.0f}", "-" if peak is None else f"{peak:.2f}"])
        engine.release_memory(("kv_cache",))
    _add_speedups(rows)
    bench_table(f"rollout generation, {name} ({'CUDA bf16' if CUDA else 'CPU smoke, fp32'}; median of {REPS} "
                f"call{'s' if REPS > 1 else ''} after a warm-up)",
                ["model", "params", "prompts", "new tokens", "backend", "s / call", "tokens / call", "tokens / s",
                 "peak GB", "vs embedded"], rows)
    model = None
    if CUDA:
        torch.cuda.empty_cache()


def _add_speedups(rows: list[list[str]]) -> None:
    """Each row's tokens/s over the embedded engine's on the same prompts."""
    embedded = {r[2]: float(r[7]) for r in rows if r[4] == "embedded" and r[7]}
    for r in rows:
        base = embedded.get(r[2])
        r.append(f"{float(r[7]) / base:.2f}x" if base and r[7] else "")
