"""One whole RARO step through the trainer's own code, for each in-process rollout backend: the wall time of every
stage (generation of policy and critic rollouts, packing, log-prob recompute, update, weight sync) and the step's
tokens/s. `raro_fast.train.train_step` runs the step, on a one-rank process group (FSDP2, as under
`torchrun --nproc_per_node=1`), from a model directory saved here.

Model: Qwen2.5-0.5B-shaped (random weights from its config, nothing downloaded; engine copy in bf16, trainer in
FSDP2 mixed precision), the project's tokenizer. Random weights never write an answer or a verdict, so the game's
sequences are made by count, not by what the model says (`FixedLengthGame`): Q questions x G policy samples, each
policy sample put before the critic (prompt = the question's prompt + the policy sample + the expert's answer, about
the length of the real critic prompt) with `critic_samples_per_pair` samples, then `replay_ratio` as many replayed
pairs again, in two engine calls as the game makes them; every sequence runs to the token limit (random weights
rarely draw the end token), and advantages are random. Everything after the rollouts is the real step.
Workload on CUDA: Q = 8, G = 8, 4 critic samples per pair, replay ratio 0.5 (64 policy and 512 critic sequences),
256 new tokens each; RARO_STEP_QUESTIONS, RARO_STEP_NEW_TOKENS and RARO_STEP_BACKENDS ("embedded,continuous")
change it. One untimed step of 8 new tokens first takes the one-time costs (CUDA context, kernel selection), then
the measured step. On CPU a smoke version runs: a tiny model, Q = 2, G = 2, 2 critic samples, 8 new tokens, fp32.
"""
from __future__ import annotations

import os
import random
import socket

import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from raro_fast import prompts
from raro_fast.config import load_config
from raro_fast.distributed import init_distributed, shutdown
from raro_fast.model.hf import load_project_tokenizer, save_pretrained_atomic
from raro_fast.modes.base import RankRollout, expert_completion_ids, sampled_sequence
from raro_fast.modes.raro import RaroMode
from raro_fast.rollout import auto_backend
from raro_fast.rollout.continuous import continuous_batching_unavailable
from raro_fast.rollout.engine import SamplingParams
from raro_fast.train import setup, train_step

CUDA = torch.cuda.is_available()
QWEN25_0_5B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                   num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=4096)
SMOKE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             tie_word_embeddings=True, max_position_embeddings=4096)  # vocab: the tokenizer's
QUESTIONS = int(os.environ.get("RARO_STEP_QUESTIONS", "8" if CUDA else "2"))
NEW_TOKENS = int(os.environ.get("RARO_STEP_NEW_TOKENS", "256" if CUDA else "8"))
GROUP, CRITIC_SAMPLES = (8, 4) if CUDA else (2, 2)
WARMUP_TOKENS = 8
STAGES = ("gen", "pack", "old_log_prob", "update_actor", "update_weights")


class FixedLengthGame(RaroMode):
    """RARO's step with sequences made by count (see the module docstring); everything else is RaroMode's."""

    def __init__(self, new_tokens: int) -> None:
        self.new_tokens = new_tokens

    def rollouts(self, r, examples, *, step: int, seed: int) -> RankRollout:
        rc, ro, rng, out = r.cfg.raro, r.cfg.rollout, random.Random(seed), RankRollout()

        def sample(prompt_ids, n, seed):  # counted (`generated`): the table's rollout tokens/s reads the count
            return out.generated(r.engine.generate(prompt_ids, SamplingParams(
                max_new_tokens=self.new_tokens, temperature=ro.temperature, n=n, seed=seed)))

        policy = sample([prompts.render_prompt(r.tokenizer, prompts.policy_messages(ex.question)) for ex in examples],
                        rc.group_size, seed)
        pairs = [list(c.prompt_ids) + list(c.token_ids) + expert_completion_ids(r.tokenizer, ex.answer)
                 for ex, comps in zip(examples, policy) for c in comps]
        fresh = sample(pairs, rc.critic_samples_per_pair, seed + 1)
        replayed = sample(rng.choices(pairs, k=rc.replay_pairs_for(len(pairs), rng)), rc.critic_samples_per_pair,
                          seed + 2)
        for role, groups, weight in (("policy", policy, rc.lambda_pol), ("critic", fresh + replayed, rc.lambda_crit)):
            for g, comps in enumerate(groups):
                out.samples += [sampled_sequence(c, advantage=rng.uniform(-1, 1), role=role, group=g, weight=weight)
                                for c in comps]
        return out


def _model_dir(path) -> str:
    tokenizer = load_project_tokenizer()
    shape = QWEN25_0_5B if CUDA else {**SMOKE, "vocab_size": len(tokenizer)}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Qwen2Config(**shape), attn_implementation="sdpa")
    save_pretrained_atomic(model, tokenizer, path)
    return str(path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _backends() -> list[str]:
    if "RARO_STEP_BACKENDS" in os.environ:
        return [b for b in os.environ["RARO_STEP_BACKENDS"].split(",") if b]
    return ["embedded", "continuous"]


def test_raro_step(bench_table, tmp_path, monkeypatch):
    for key, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(_free_port())).items():
        monkeypatch.setenv(key, value)
    model_dir = _model_dir(tmp_path / "model")
    d = init_distributed()
    rows = []
    try:
        for backend in _backends():
            missing = continuous_batching_unavailable() if backend == "continuous" else None
            if missing:
                rows.append([backend, f"unavailable: {missing}"] + [""] * (len(STAGES) + 4))
                continue
            cfg = load_config([
                "--model.path", model_dir, "--train.mode", "raro", "--train.output_dir", str(tmp_path / backend),
                "--train.progress", "false", "--rollout.backend", backend,
                "--raro.questions_per_step", str(QUESTIONS), "--raro.group_size", str(GROUP),
                "--raro.critic_samples_per_pair", str(CRITIC_SAMPLES),
                "--rollout.max_new_tokens", str(NEW_TOKENS), "--rollout.critic_max_new_tokens", str(NEW_TOKENS)])
            r = setup(cfg, d)
            r.mode = FixedLengthGame(WARMUP_TOKENS)
            train_step(r, 0)
            r.mode = FixedLengthGame(NEW_TOKENS)
            rec = train_step(r, 1)
            t = {s: rec.get(f"timing_s/{s}") for s in STAGES}  # old_log_prob: none with one update a round
            step_s = rec["timing_s/step"]
            rows.append([backend, f"{step_s:.2f}", *("-" if t[s] is None else f"{t[s]:.2f}" for s in STAGES),
                         f"{t['gen'] / step_s:.0%}",
                         f"{rec['perf/rollout_tokens_per_s']:.0f}", f"{rec['batch/tokens'] / step_s:.0f}",
                         f"{rec['batch/policy_sequences']}+{rec['batch/critic_sequences']}"])
            print(" | ".join(rows[-1]), flush=True)  # with -s: a run cut short keeps what it measured
            del r
            if CUDA:
                torch.cuda.empty_cache()
    finally:
        shutdown(d)
    shape = "Qwen2.5-0.5B shape, CUDA bf16" if CUDA else "CPU smoke, tiny model, fp32"
    bench_table(f"one whole RARO step ({shape}; Q={QUESTIONS} x G={GROUP}, {CRITIC_SAMPLES} critic samples per pair, "
                f"replay 0.5, {NEW_TOKENS} new tokens per sequence; auto picks {auto_backend(torch.device('cuda' if CUDA else 'cpu'))[0]})",
                ["backend", "step s", *(f"{s} s" for s in STAGES), "gen share", "gen tokens/s", "step tokens/s",
                 "sequences"], rows)
    assert rows
