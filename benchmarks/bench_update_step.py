"""One RARO update step (forward, backward, optimizer) on a mixed policy/critic batch: packed vs padded.

Model: Qwen2.5-1.5B-shaped (hidden 1536, 28 layers, 12 heads / 2 KV heads, MLP 8960, vocab 151,936, tied), random
weights from its config (no download), bf16 parameters and AdamW states on one GPU. The LM head goes through
the fused kernel in both variants; only the batching differs:
  packed: `plan_micro_batches` rows of at most BUDGET tokens, attention within sequences (varlen);
  padded, per micro-batch: the same sequences in rollout order, right-padded rectangles of at most BUDGET cells,
    each as wide as its longest sequence (sdpa + mask);
  padded, fixed rectangle: every sequence padded to the batch's longest prompt + longest completion, BUDGET //
    that width rows per micro-batch — what a trainer padding prompts and responses to fixed lengths runs.
Length distribution (stated, per step): 64 policy sequences, prompt U[64, 256] + completion lognormal (median
512, sigma 0.6, clipped to [32, 2048]); 64 critic sequences, prompt U[384, 1024] (question + two answers) +
completion lognormal (median 384, sigma 0.5, clipped to [32, 1536]).
MFU = model FLOPs / step time / the GPU's rated dense bf16 peak (its data sheet: 989.4 TFLOP/s for an H100 or H200
SXM), where model FLOPs = 6 x parameters x real tokens + 6 x layers x hidden x sum of squared sequence lengths
(causal attention within each sequence, forward and backward): the same useful work for every batching. Until
2026-12-06 the denominator was an 8192^3 bf16 matmul timed in the same run (783 TFLOP/s on the H200) and attention
was left out, which read 49.6% where the usual definition gives 40.5%; that ratio is still shown, as "of a
measured matmul". On CPU a tiny model and batch run as a smoke test.
"""
from __future__ import annotations

import math
import os
import random
import statistics
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from harness import rated_bf16_flops

from raro_fast.model.varlen import VARLEN_ATTENTION, packed_hidden_states, use_varlen_attention
from raro_fast.packing import SequenceSample, padding_stats, plan_micro_batches
from raro_kernels import linear_logprobs, policy_loss

CUDA = torch.cuda.is_available()
QWEN25_1_5B = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                   num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=4096)
SMOKE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=1000, tie_word_embeddings=True, max_position_embeddings=4096)


def mixed_batch(rng: random.Random, *, n_policy: int, n_critic: int, scale: float, vocab: int) -> list[SequenceSample]:
    def lognormal(median, sigma, lo, hi):
        return int(min(hi, max(lo, math.exp(rng.gauss(math.log(median), sigma)))))

    shapes = [(rng.randint(64, 256), lognormal(512, 0.6, 32, 2048), "policy") for _ in range(n_policy)]
    shapes += [(rng.randint(384, 1024), lognormal(384, 0.5, 32, 1536), "critic") for _ in range(n_critic)]
    out = []
    for uid, (p, c, role) in enumerate(shapes):
        p, c = max(1, int(p * scale)), max(1, int(c * scale))
        out.append(SequenceSample(input_ids=[rng.randrange(vocab) for _ in range(p + c)], prompt_len=p,
                                  advantage=rng.uniform(-1, 1), role=role, group=uid // 16, uid=uid,
                                  old_logprobs=[-rng.random() * 3 for _ in range(c)]))
    return out


def padded_micro_batches(samples: list[SequenceSample], budget: int, device, *, fixed_width: int = 0) -> list[dict]:
    """Rollout order, right-padded. Budgeted: filled while batch x longest <= budget, each micro-batch as wide as
    its longest sequence. Fixed (`fixed_width`): every row that wide, budget // width rows per micro-batch — the
    one rectangle of a trainer that pads prompts and responses to their maximum lengths (verl without
    remove_padding)."""
    groups, cur = [], []
    for s in samples:
        rows = len(cur) + 1
        width = fixed_width or max(len(x.input_ids) for x in cur + [s])
        if cur and rows * width > budget:
            groups.append(cur)
            cur = []
        cur.append(s)
    groups.append(cur)
    out = []
    for g in groups:
        width = fixed_width or max(len(s.input_ids) for s in g)
        ids = torch.zeros(len(g), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        tgt = torch.full_like(ids, -100)
        old = torch.zeros(len(g), width)
        adv = torch.zeros(len(g), width)
        for i, s in enumerate(g):
            n, p = len(s.input_ids), s.prompt_len
            ids[i, :n] = torch.tensor(s.input_ids)
            mask[i, :n] = 1
            tgt[i, p - 1 : n - 1] = torch.tensor(s.input_ids[p:])
            old[i, p - 1 : n - 1] = torch.tensor(s.old_logprobs)
            adv[i, p - 1 : n - 1] = s.advantage
        out.append({k: v.to(device) for k, v in dict(ids=ids, mask=mask, tgt=tgt, old=old, adv=adv).items()})
    return out


def _loss(lp, old, adv, tgt, num_tokens):
    loss, _ = policy_loss(lp, old, adv, tgt != -100, loss_agg="token_mean", num_tokens=num_tokens)
    return loss


def step_packed(model, opt, mbs):
    weight = model.get_output_embeddings().weight
    for mb in mbs:
        hidden = packed_hidden_states(model.model, mb)
        lp = linear_logprobs(hidden, weight, mb.targets).logprobs
        _loss(lp, mb.old_logprobs, mb.advantages, mb.targets, mb.num_tokens).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def step_padded(model, opt, mbs, num_tokens):
    weight = model.get_output_embeddings().weight
    for mb in mbs:
        hidden = model.model(input_ids=mb["ids"], attention_mask=mb["mask"], use_cache=False).last_hidden_state
        lp = linear_logprobs(hidden.flatten(0, 1), weight, mb["tgt"].flatten()).logprobs
        _loss(lp, mb["old"].flatten(), mb["adv"].flatten(), mb["tgt"].flatten(), num_tokens).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def timed(fn, repeats):
    fn()  # warm-up: compilation, autotuning, allocator growth
    _sync()
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if CUDA else float("nan")
    return statistics.median(times), peak


def model_flops(n_params: int, samples: list[SequenceSample], shape: dict) -> float:
    """One update's useful FLOPs: 6 x parameters x tokens, plus causal attention within each sequence (QK^T and AV,
    half of the square under the mask, forward and backward: 6 x layers x hidden x length^2)."""
    tokens = sum(len(s.input_ids) for s in samples)
    return (6 * n_params * tokens
            + 6 * shape["num_hidden_layers"] * shape["hidden_size"] * sum(len(s.input_ids) ** 2 for s in samples))


def peak_bf16_flops() -> float:
    if not CUDA:
        return float("nan")
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    t, _ = timed(lambda: a @ b, 10)
    return 2 * 8192**3 / t


@pytest.mark.skipif(os.environ.get("RARO_SKIP_UPDATE_BENCH") == "1", reason="RARO_SKIP_UPDATE_BENCH=1")
def test_update_step_packed_vs_padded(bench_table):
    device = torch.device("cuda" if CUDA else "cpu")
    dtype = torch.bfloat16 if CUDA else torch.float32
    budget = int(os.environ.get("RARO_UPDATE_BUDGET", "16384" if CUDA else "512"))
    shape = QWEN25_1_5B if CUDA else SMOKE
    rng = random.Random(0)
    samples = mixed_batch(rng, n_policy=64 if CUDA else 6, n_critic=64 if CUDA else 6, scale=1.0 if CUDA else 0.1,
                          vocab=shape["vocab_size"])
    tokens = sum(len(s.input_ids) for s in samples)
    num_tokens = sum(s.num_targets for s in samples)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(Qwen2Config(**shape), attn_implementation="sdpa", dtype=dtype)
    n_params = sum(p.numel() for p in model.parameters())
    flops = model_flops(n_params, samples, shape)
    rated = rated_bf16_flops(torch.cuda.get_device_name()) if CUDA else float("nan")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, foreach=True)
    peak = peak_bf16_flops()
    repeats = 2 if CUDA else 1
    rows = []

    packed = [mb.to(device) for mb in plan_micro_batches(samples, max_tokens_per_micro_batch=budget, world_size=1, rank=0)]
    use_varlen_attention(model)
    t_packed, mem_packed = timed(lambda: step_packed(model, opt, packed), repeats)
    computed = sum(mb.input_ids.numel() for mb in packed)
    model.set_attn_implementation("sdpa")
    # The fixed rectangle: longest prompt + longest completion of the batch (tighter than configured maxima).
    rectangle = max(s.prompt_len for s in samples) + max(len(s.input_ids) - s.prompt_len for s in samples)
    variants = [("packed", t_packed, mem_packed, len(packed), computed)]
    for name, width in (("padded, per micro-batch", 0), ("padded, fixed rectangle", rectangle)):
        padded = padded_micro_batches(samples, budget, device, fixed_width=width)
        try:
            t, mem = timed(lambda: step_padded(model, opt, padded, num_tokens), repeats)
        except torch.OutOfMemoryError:
            t, mem = float("nan"), float("nan")
        variants.append((name, t, mem, len(padded), sum(mb["ids"].numel() for mb in padded)))
    model.set_attn_implementation(VARLEN_ATTENTION)

    for name, t, mem, n_mb, computed_tokens in variants:
        # the old ratio as the docstring says: 6 x parameters x tokens, no attention (review: it took attention in)
        mfu, of_matmul = (flops / t / rated, 6 * n_params * tokens / t / peak) if CUDA else (float("nan"),) * 2
        rows.append([name, n_mb, tokens, computed_tokens, f"{1 - tokens / computed_tokens:.1%}", f"{t * 1e3:.0f}",
                     f"{tokens / t:.0f}", f"{mfu:.1%}", f"{of_matmul:.1%}", f"{mem:.1f}"])
    for name, t, *_ in variants[1:]:
        rows.append([f"packed speed-up over {name}", "", "", "", "", "", f"{t / t_packed:.2f}x", "", "", ""])
    stats = padding_stats(samples, packed)
    bench_table(
        f"update step, {'Qwen2.5-1.5B shape' if CUDA else 'smoke (tiny model)'} ({n_params / 1e9:.2f}B params), "
        f"{len(samples)} sequences, {tokens} tokens, budget {budget}, rated dense bf16 {rated / 1e12:.1f} TFLOP/s "
        f"(an 8192^3 matmul measured {peak / 1e12:.0f}); "
        f"rectangle of the whole batch would pad {stats['padded_padding_fraction']:.1%}",
        ["batching", "micro-batches", "real tokens", "computed tokens", "padding", "step ms", "tokens/s",
         "MFU (rated peak)", "of a measured matmul", "peak GiB"],
        rows,
    )
    assert t_packed > 0


def grouped_batch(rng: random.Random, *, questions: int, per_question: int, pairs: int, per_pair: int, scale: float,
                  vocab: int) -> list[SequenceSample]:
    """A RARO step's shape of sharing: `per_question` policy samples of each question, `per_pair` critic samples of
    each (question, two answers) prompt; lengths drawn as in `mixed_batch`, prompts per group, completions per
    sample."""
    def lognormal(median, sigma, lo, hi):
        return int(min(hi, max(lo, math.exp(rng.gauss(math.log(median), sigma)))))

    out = []
    for role, count, size, prompt_range, completion in (
            ("policy", questions, per_question, (64, 256), (512, 0.6, 32, 2048)),
            ("critic", pairs, per_pair, (384, 1024), (384, 0.5, 32, 1536))):
        for _ in range(count):
            prompt = [rng.randrange(vocab) for _ in range(max(1, int(rng.randint(*prompt_range) * scale)))]
            group = len(out) // size
            for _ in range(size):
                c = max(1, int(lognormal(*completion) * scale))
                out.append(SequenceSample(input_ids=prompt + [rng.randrange(vocab) for _ in range(c)],
                                          prompt_len=len(prompt), advantage=rng.uniform(-1, 1), role=role,
                                          group=group, uid=len(out), old_logprobs=[-rng.random() * 3 for _ in range(c)]))
    return out


def step_policy_model(policy, opt, mbs):
    """What the trainer runs: `PolicyModel`, which reads a micro-batch's shared prompts and trained rows."""
    for mb in mbs:
        lp, _ = policy(mb)
        _loss(lp, mb.old_logprobs, mb.advantages, mb.targets, mb.num_tokens).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


@pytest.mark.skipif(os.environ.get("RARO_SKIP_UPDATE_BENCH") == "1", reason="RARO_SKIP_UPDATE_BENCH=1")
def test_update_step_whole_vs_shared_prompts(bench_table):
    """`train.share_prompts`: the same grouped batch planned with every sequence whole and with a group's prompt
    computed once (and the LM head on trained rows only)."""
    from raro_fast.model.policy import PolicyModel

    device = torch.device("cuda" if CUDA else "cpu")
    dtype = torch.bfloat16 if CUDA else torch.float32
    budget = int(os.environ.get("RARO_UPDATE_BUDGET", "16384" if CUDA else "512"))
    shape = QWEN25_1_5B if CUDA else SMOKE
    samples = grouped_batch(random.Random(1), questions=8 if CUDA else 2, per_question=8 if CUDA else 3,
                            pairs=16 if CUDA else 2, per_pair=4, scale=1.0 if CUDA else 0.1, vocab=shape["vocab_size"])
    tokens = sum(len(s.input_ids) for s in samples)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(Qwen2Config(**shape), attn_implementation="sdpa", dtype=dtype)
    use_varlen_attention(model)
    policy = PolicyModel(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, foreach=True)
    rows, whole = [], None
    for share in (False, True):
        mbs = [mb.to(device) for mb in plan_micro_batches(samples, max_tokens_per_micro_batch=budget, world_size=1,
                                                         rank=0, share_prompts=share)]
        t, mem = timed(lambda: step_policy_model(policy, opt, mbs), 2 if CUDA else 1)
        whole = whole or t
        decoder = sum(mb.input_ids.numel() if mb.kept_rows is None else mb.kept_rows.numel() for mb in mbs)
        rows.append(["shared prompts" if share else "whole sequences", len(mbs), tokens, decoder,
                     f"{t * 1e3:.0f}", f"{tokens / t:.0f}", f"{whole / t:.2f}x", f"{mem:.1f}"])
    bench_table(
        f"update step, {'Qwen2.5-1.5B shape' if CUDA else 'smoke (tiny model)'}, a RARO step's groups "
        f"({len(samples)} sequences: policy samples of a question, 4 critic samples of a pair), budget {budget}",
        ["prompts", "micro-batches", "tokens", "decoder tokens", "step ms", "tokens/s", "speed-up", "peak GiB"],
        rows,
    )
    assert rows[1][3] < rows[0][3]  # the shared plan computes fewer decoder tokens
