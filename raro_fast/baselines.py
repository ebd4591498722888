"""Baselines that share the RARO trainer: they differ only in where the trained sequences and their advantages
come from; packing, the fused loss, the update and the weight sync are the same.

- rlvr: GRPO with the task's verifier as reward (1 if the answer checks, else 0): the oracle upper bound where a
  verifier exists.
- sft: next-token training on the expert's final answers (`<think></think><answer>a*</answer>`). It runs through
  the same clipped-surrogate update with advantage 1: with the recomputed (on-policy) log-probs as old log-probs
  the ratio is 1, no clip is active, and the gradient of -A·ratio is exactly -∇ log p of the expert tokens.
"""
from __future__ import annotations

from raro_fast import prompts
from raro_fast.config import JobConfig
from raro_fast.packing import SequenceSample
from raro_fast.raro import RankRollout, _sequence
from raro_fast.rewards import group_advantages
from raro_fast.rollout.engine import RolloutEngine, SamplingParams
from raro_fast.tasks.base import Example, Task


def rlvr_rollouts(examples: list[Example], *, engine: RolloutEngine, tokenizer, task: Task, cfg: JobConfig,
                  seed: int) -> RankRollout:
    out = RankRollout()
    if not examples:
        return out
    params = SamplingParams(max_new_tokens=cfg.rollout.max_new_tokens, temperature=cfg.rollout.temperature,
                            top_p=cfg.rollout.top_p, n=cfg.raro.group_size, seed=seed)
    policy = engine.generate([prompts.render_prompt(tokenizer, prompts.policy_messages(ex.question)) for ex in examples], params)
    for i, (ex, comps) in enumerate(zip(examples, policy)):
        answers = [None if c.truncated else task.extract_answer(c.text) for c in comps]
        rewards = [float(bool(task.verify(ex, a))) for a in answers]
        adv = group_advantages(rewards, [0] * len(rewards), std_normalize=cfg.loss.std_normalize)
        for c, a, r, g in zip(comps, answers, rewards, adv):
            out.add("policy/truncated_rate", c.truncated)
            out.add("policy/answer_rate", a is not None)
            out.add("policy/response_length", len(c.token_ids))
            out.add("policy/answer_accuracy", r)
            out.add("reward/policy_mean", r)
            if not c.truncated:
                out.samples.append(_sequence(c, advantage=g, role="policy", group=i, weight=1.0))
    return out


def sft_samples(examples: list[Example], *, tokenizer) -> RankRollout:
    out = RankRollout()
    for i, ex in enumerate(examples):
        prompt = prompts.render_prompt(tokenizer, prompts.policy_messages(ex.question))
        answer = tokenizer(prompts.format_completion("", ex.answer) + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        out.samples.append(SequenceSample(input_ids=prompt + answer, prompt_len=len(prompt), advantage=1.0, role="policy",
                                          group=i, uid=-1, loss_weight=1.0))
        out.add("policy/response_length", len(answer))
    return out
