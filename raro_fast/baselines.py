"""Baselines that share the RARO trainer: they differ only in where the trained sequences and their advantages
come from; packing, the fused loss, the update and the weight sync are the same.

- rlvr: GRPO with the task's verifier as reward (1 if the answer checks, else 0): the oracle upper bound where a
  verifier exists.
- sft: next-token training on the expert's final answers (`<think></think><answer>a*</answer>`). It runs through
  the same clipped-surrogate update with advantage 1: with the recomputed (on-policy) log-probs as old log-probs
  the ratio is 1, no clip is active, and the gradient of -A·ratio is exactly -∇ log p of the expert tokens.
- rationalization: SFT as above, but on `<think>r</think><answer>a*</answer>` where the reasoning r is the model's
  own, generated with the expert answer shown in the prompt (STaR's rationalization). A rationalization that
  never closes its </think> falls back to empty reasoning (counted in `rationalization/fallback_rate`).
- rl_logit: GRPO where the reward of a sampled reasoning r is the model's own mean per-token log-likelihood of
  the expert answer after it, log p(<answer>a*</answer><eos> | question, r) / its length. Only the reasoning
  (up to and including </think>) is trained; samples that never close </think> are filtered like truncated ones.
  The likelihoods are computed by the trainer's model on packed micro-batches (`score_expert_answers`).
- dpo (iterative DPO): every step, each policy sample that is not the expert answer itself is paired with the expert
  completion (chosen ≻ rejected); the reference is the policy at the start of the round. With one gradient step
  per batch, DPO's gradient is exactly the clipped-surrogate update's at ratio 1 with sequence advantages +w for
  the chosen and -w for the rejected, w = beta·sigmoid(-beta·margin), summed over tokens and divided by the
  number of pairs (`dpo_advantages`), so DPO too runs through the fused loss and the packed update.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from raro_fast import prompts
from raro_fast.config import JobConfig
from raro_fast.distributed import Dist
from raro_fast.packing import SequenceSample, plan_micro_batches
from raro_fast.raro import RankRollout, _sequence
from raro_fast.rewards import group_advantages
from raro_fast.rollout.engine import RolloutEngine, SamplingParams
from raro_fast.tasks.base import Example, Task


def policy_groups(examples: list[Example], *, engine: RolloutEngine, tokenizer, cfg: JobConfig, seed: int):
    """`raro.group_size` policy samples per question, at the rollout settings."""
    params = SamplingParams(max_new_tokens=cfg.rollout.max_new_tokens, temperature=cfg.rollout.temperature,
                            top_p=cfg.rollout.top_p, n=cfg.raro.group_size, seed=seed)
    return engine.generate([prompts.render_prompt(tokenizer, prompts.policy_messages(ex.question)) for ex in examples], params)


def expert_completion_ids(tokenizer, answer: str, think: str = "") -> list[int]:
    """The expert's final answer in the policy format (after `think` as reasoning), ending with the end token."""
    return tokenizer(prompts.format_completion(think, answer) + tokenizer.eos_token, add_special_tokens=False)["input_ids"]


def rlvr_rollouts(examples: list[Example], *, engine: RolloutEngine, tokenizer, task: Task, cfg: JobConfig,
                  seed: int) -> RankRollout:
    out = RankRollout()
    if not examples:
        return out
    policy = policy_groups(examples, engine=engine, tokenizer=tokenizer, cfg=cfg, seed=seed)
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


def sft_samples(examples: list[Example], *, tokenizer, reasonings: list[str] | None = None) -> RankRollout:
    out = RankRollout()
    for i, ex in enumerate(examples):
        prompt = prompts.render_prompt(tokenizer, prompts.policy_messages(ex.question))
        think = reasonings[i] if reasonings else ""
        answer = expert_completion_ids(tokenizer, ex.answer, think)
        out.samples.append(SequenceSample(input_ids=prompt + answer, prompt_len=len(prompt), advantage=1.0, role="policy",
                                          group=i, uid=-1, loss_weight=1.0))
        out.add("policy/response_length", len(answer))
    return out


def rationalization_samples(examples: list[Example], *, engine: RolloutEngine, tokenizer, cfg: JobConfig,
                            seed: int) -> RankRollout:
    if not examples:
        return RankRollout()
    params = SamplingParams(max_new_tokens=cfg.rollout.max_new_tokens, temperature=cfg.rollout.temperature,
                            top_p=cfg.rollout.top_p, n=1, seed=seed)
    outs = engine.generate([prompts.render_prompt(tokenizer, prompts.rationalization_messages(ex.question, ex.answer))
                            for ex in examples], params)
    reasonings = [_reasoning_text(c.text) for (c,) in outs]
    out = sft_samples(examples, tokenizer=tokenizer, reasonings=[r or "" for r in reasonings])
    for r in reasonings:
        out.add("rationalization/fallback_rate", r is None)
    return out


def _reasoning_text(text: str) -> str | None:
    """What the model wrote inside <think>…</think>, or None if it never closed it."""
    end = text.find(prompts.THINK_END)
    if end < 0:
        return None
    start = text.find("<think>")
    return text[start + len("<think>") if 0 <= start < end else 0 : end].strip()


def reasoning_prefix_length(token_ids: list[int], decode) -> int | None:
    """Tokens up to and including the one that completes </think> (None if it never appears). Works on the
    sampled tokens themselves, so their engine log-probs stay aligned: no re-tokenisation."""
    if prompts.THINK_END not in decode(token_ids):
        return None
    lo, hi = 1, len(token_ids)  # the shortest prefix whose text contains </think> (containment is monotone)
    while lo < hi:
        mid = (lo + hi) // 2
        if prompts.THINK_END in decode(token_ids[:mid]):
            hi = mid
        else:
            lo = mid + 1
    return lo


def rl_logit_rollouts(examples: list[Example], *, engine: RolloutEngine, tokenizer, cfg: JobConfig, seed: int,
                      group_offset: int) -> RankRollout:
    """Sampled reasonings to train (advantages filled in later by `score_expert_answers`) and, in `scoring`, the
    same reasonings followed by the expert answer. `group_offset` makes group ids unique across ranks."""
    out = RankRollout()
    if not examples:
        return out
    policy = policy_groups(examples, engine=engine, tokenizer=tokenizer, cfg=cfg, seed=seed)
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    for i, (ex, comps) in enumerate(zip(examples, policy)):
        expert = tokenizer(prompts.format_completion("", ex.answer).removeprefix("<think></think>") + tokenizer.eos_token,
                           add_special_tokens=False)["input_ids"]
        for c in comps:
            n = None if c.truncated else reasoning_prefix_length(c.token_ids, decode)
            out.add("policy/truncated_rate", c.truncated)
            out.add("policy/response_length", len(c.token_ids))
            out.add("rl_logit/reasoning_rate", n is not None)
            if n is None:
                continue
            reasoning = replace(c, token_ids=c.token_ids[:n], logprobs=c.logprobs[:n])
            out.samples.append(_sequence(reasoning, advantage=0.0, role="policy", group=group_offset + i, weight=1.0))
            out.scoring.append(SequenceSample(input_ids=list(c.prompt_ids) + c.token_ids[:n] + expert,
                                              prompt_len=len(c.prompt_ids) + n, advantage=0.0, role="policy",
                                              group=group_offset + i, uid=-1))
    return out


def score_expert_answers(model, samples: list[SequenceSample], scoring: list[SequenceSample], *, d: Dist,
                         max_tokens_per_micro_batch: int, std_normalize: bool) -> dict[str, float | None]:
    """RL-Logit rewards: every rank holds the same global lists; each scores its share of `scoring` with the
    trainer's model, the per-sequence mean log-probs are summed over ranks, and GRPO advantages per question are
    written into `samples` (scoring[j] belongs to samples[j])."""
    from raro_fast.update import recompute_logprobs

    for uid, s in enumerate(scoring):
        s.uid = uid
    device = d.device
    mbs = [mb.to(device) for mb in plan_micro_batches(scoring, max_tokens_per_micro_batch=max_tokens_per_micro_batch,
                                                      world_size=d.world_size, rank=d.rank)]
    recompute_logprobs(model, mbs, temperature=1.0)
    sums, counts = sequence_sums(mbs, len(scoring), ["old_logprobs", None], d=d)
    rewards = (sums / counts.clamp_min(1)).tolist()
    for sample, a in zip(samples, group_advantages(rewards, [s.group for s in scoring], std_normalize=std_normalize), strict=True):
        sample.advantage = a
    return {"reward/policy_mean": sum(rewards) / len(rewards) if rewards else None}


def sequence_sums(mbs, n: int, fields: list[str | None], *, d: Dist) -> list[torch.Tensor]:
    """Per-sequence (index = uid) float64 sums over completion tokens of each per-token `field` of the micro-batches
    (None: count the tokens), added over all ranks."""
    sums = torch.zeros(len(fields), n, dtype=torch.float64, device=d.device)
    for mb in mbs:
        if mb.is_padding:
            continue
        m = mb.targets != -100
        uid = mb.uids[mb.seq_ids][m]
        for row, name in zip(sums, fields):
            row.index_add_(0, uid, torch.ones_like(uid, dtype=torch.float64) if name is None else getattr(mb, name)[m].double())
    if d.enabled:
        torch.distributed.all_reduce(sums)
    return list(sums)


def dpo_pairs(examples: list[Example], *, engine: RolloutEngine, tokenizer, task: Task, cfg: JobConfig, seed: int,
              group_offset: int) -> RankRollout:
    """(expert ≻ policy sample) pairs, the chosen then the rejected member of each, `group` = a pair id unique over
    ranks. A truncated sample, or one whose answer is the expert's own, makes no pair."""
    out = RankRollout()
    if not examples:
        return out
    policy = policy_groups(examples, engine=engine, tokenizer=tokenizer, cfg=cfg, seed=seed)
    pair = group_offset
    for ex, comps in zip(examples, policy):
        expert = expert_completion_ids(tokenizer, ex.answer)
        for c in comps:
            answer = None if c.truncated else task.extract_answer(c.text)
            paired = not c.truncated and (answer is None or answer.strip() != ex.answer.strip())
            out.add("policy/truncated_rate", c.truncated)
            out.add("policy/answer_rate", answer is not None)
            out.add("policy/response_length", len(c.token_ids))
            verdict = task.verify(ex, answer)
            if verdict is not None:  # logged only; DPO never sees it
                out.add("policy/answer_accuracy", verdict)
            out.add("dpo/pair_rate", paired)
            if not paired:
                continue
            prompt = list(c.prompt_ids)
            out.samples.append(SequenceSample(input_ids=prompt + expert, prompt_len=len(prompt), advantage=0.0,
                                              role="policy", group=pair, uid=-1, preference=1))
            out.samples.append(SequenceSample(input_ids=prompt + list(c.token_ids), prompt_len=len(prompt), advantage=0.0,
                                              role="policy", group=pair, uid=-1, preference=-1,
                                              weight_version=c.weight_version))
            pair += 1
    return out


def dpo_advantages(samples: list[SequenceSample], mbs, *, d: Dist, beta: float) -> tuple[int, dict[str, float | None]]:
    """Write DPO's per-sequence advantages into the packed micro-batches (after old and reference log-probs are
    recomputed) and return (number of pairs, metrics). Sequence log-prob sums are added over ranks first."""
    device = d.device
    n = len(samples)
    policy_sum, ref_sum = sequence_sums(mbs, n, ["old_logprobs", "ref_logprobs"], d=d)
    members: dict[int, dict[int, int]] = {}
    for s in samples:
        members.setdefault(s.group, {})[s.preference] = s.uid
    if any(set(m) != {1, -1} for m in members.values()):
        raise ValueError("dpo: every pair needs exactly one chosen and one rejected sequence")
    chosen = torch.tensor([m[1] for m in members.values()], dtype=torch.long, device=device)
    rejected = torch.tensor([m[-1] for m in members.values()], dtype=torch.long, device=device)
    log_ratio = policy_sum - ref_sum
    margin = log_ratio[chosen] - log_ratio[rejected]
    weight = beta * torch.sigmoid(-beta * margin)
    adv = torch.zeros(n, dtype=torch.float64, device=device)
    adv[chosen], adv[rejected] = weight, -weight
    for mb in mbs:
        if not mb.is_padding:
            mb.advantages = torch.where(mb.targets != -100, adv[mb.uids[mb.seq_ids]].float(), 0.0)
    pairs = len(members)
    metrics = {
        "dpo/loss": float(-torch.nn.functional.logsigmoid(beta * margin).mean()) if pairs else None,
        "dpo/margin": float(margin.mean()) if pairs else None,
        "dpo/accuracy": float((margin > 0).double().mean()) if pairs else None,
        "dpo/pairs": pairs,
    }
    return pairs, metrics
