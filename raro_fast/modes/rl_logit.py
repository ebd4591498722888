"""RL-Logit: GRPO where the reward of a sampled reasoning r is the model's own mean per-token log-likelihood of the
expert answer after it, log p(<answer>a*</answer><eos> | question, r) / its length. Only the reasoning (up to and
including </think>, and the separator the model wrote after it: `separator_end`) is trained; samples that never
close </think> are filtered like truncated ones. The likelihoods are computed by the trainer's model on packed
micro-batches (`score_expert_answers`).

Where </think> is several tokens (a byte-level BPE), the token that completes it can hold the start of what follows
(`><` in `</think><answer>`); that spill is part of the sampled reasoning, so only the rest of the expert answer is
scored after it (`expert_continuation`)."""
from __future__ import annotations

from dataclasses import replace

from raro_fast import prompts
from raro_fast.config import JobConfig
from raro_fast.distributed import Dist
from raro_fast.modes.base import Mode, RankRollout, Trainer, policy_groups, sampled_sequence, sequence_sums
from raro_fast.packing import SequenceSample, plan_micro_batches
from raro_fast.rewards import group_advantages
from raro_fast.rollout.engine import RolloutEngine
from raro_fast.tasks.base import Example
from raro_fast.update import recompute_logprobs


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


def separator_end(token_ids: list[int], n: int, decode, expert_text: str) -> int:
    """`n` (the tokens up to the one completing </think>) extended over the separator the model wrote after it in
    tokens of its own: whitespace-only tokens, then a token that starts with whitespace and goes on as `expert_text`
    does (` <` in a byte-level BPE), whose text after the whitespace is spill. Found by review: with SmolLM2's
    tokenizer, `</think>\n<answer>` ends the reasoning on a bare `>`, and the expert answer was scored from a `<`
    right after it, a pair of tokens neither the tokenizer nor the model writes (about 10 nats): the same reasoning
    earned less for a newline after it."""
    after = decode(token_ids[:n]).split(prompts.THINK_END, 1)[1]
    if after.strip():  # the completing token spilled text already: `expert_continuation` takes it from there
        return n
    while n < len(token_ids):
        longer = decode(token_ids[:n + 1]).split(prompts.THINK_END, 1)[1]
        if longer == after:  # a special token (the end of turn): nothing written
            return n
        if longer.strip():
            new = longer[len(after):] if longer.startswith(after) else ""  # decoding more never rewrites whitespace
            spills = new[:1].isspace() and expert_text.startswith(longer.lstrip())
            return n + 1 if spills else n
        n, after = n + 1, longer
    return n


def expert_continuation(reasoning_text: str, expert_text: str) -> str | None:
    """What of `expert_text` is scored after the reasoning `reasoning_text` (which ends in the token that completes
    </think>): the expert text less what that token already spilled past </think>, so the scored sequence reads as
    the expert answer right after the reasoning, never `</think><<answer>`. Whitespace first in the spill is the
    model's own separator and is kept before the whole answer. None when the rest of the spill is not how the expert
    text starts: no continuation of this reasoning writes the expert answer, and scoring one would score text the
    model never writes."""
    spill = reasoning_text.split(prompts.THINK_END, 1)[1].lstrip()
    return expert_text[len(spill):] if expert_text.startswith(spill) else None


def rl_logit_rollouts(examples: list[Example], *, engine: RolloutEngine, tokenizer, cfg: JobConfig, seed: int,
                      group_offset: int) -> RankRollout:
    """Sampled reasonings to train (advantages filled in later by `score_expert_answers`) and, in `scoring`, the
    same reasonings followed by the expert answer. `group_offset` makes group ids unique across ranks."""
    out = RankRollout()
    if not examples:
        return out
    policy = out.generated(policy_groups(examples, engine=engine, tokenizer=tokenizer, cfg=cfg, seed=seed))
    decode = prompts.completion_decoder(tokenizer)
    for i, (ex, comps) in enumerate(zip(examples, policy)):
        expert_text = prompts.format_completion("", ex.answer).removeprefix("<think></think>") + tokenizer.eos_token
        for c in comps:
            n = None if c.truncated else reasoning_prefix_length(c.token_ids, decode)
            n = None if n is None else separator_end(c.token_ids, n, decode, expert_text)
            out.add("policy/truncated_rate", c.truncated)
            out.add("policy/response_length", len(c.token_ids))
            out.add("rl_logit/reasoning_rate", n is not None)
            if n is None:
                continue
            reasoning_text = decode(c.token_ids[:n])
            rest = expert_continuation(reasoning_text, expert_text)
            out.add("rl_logit/misaligned_rate", rest is None)  # of the samples that closed </think>
            if rest is None:
                continue
            tail = prompts.THINK_END + reasoning_text.split(prompts.THINK_END, 1)[1]
            # after the reasoning: tokenized alone, a SentencePiece tokenizer began it with a `▁` the model never
            # writes there, and the reward scored `</think> <answer>` (found by review on 2026-12-07)
            expert = (prompts.text_ids_after(tokenizer, tail, rest.removesuffix(tokenizer.eos_token))
                      + [tokenizer.eos_token_id])
            reasoning = replace(c, token_ids=c.token_ids[:n], logprobs=c.logprobs[:n])
            out.samples.append(sampled_sequence(reasoning, advantage=0.0, role="policy", group=group_offset + i, weight=1.0))
            out.scoring.append(SequenceSample(input_ids=list(c.prompt_ids) + c.token_ids[:n] + expert,
                                              prompt_len=len(c.prompt_ids) + n, advantage=0.0, role="policy",
                                              group=group_offset + i, uid=-1))
    return out


def score_expert_answers(model, samples: list[SequenceSample], scoring: list[SequenceSample], *, d: Dist,
                         max_tokens_per_micro_batch: int, std_normalize: bool) -> dict[str, float | None]:
    """RL-Logit rewards: every rank holds the same global lists; each scores its share of `scoring` with the
    trainer's model, the per-sequence mean log-probs are summed over ranks, and GRPO advantages per question are
    written into `samples` (scoring[j] belongs to samples[j]), with the rewards they come from."""
    for uid, s in enumerate(scoring):
        s.uid = uid
    device = d.device
    mbs = [mb.to(device) for mb in plan_micro_batches(scoring, max_tokens_per_micro_batch=max_tokens_per_micro_batch,
                                                      world_size=d.world_size, rank=d.rank)]
    recompute_logprobs(model, mbs, temperature=1.0)
    sums, counts = sequence_sums(mbs, len(scoring), ["old_logprobs", None], d=d)
    rewards = (sums / counts.clamp_min(1)).tolist()
    advantages = group_advantages(rewards, [s.group for s in scoring], std_normalize=std_normalize)
    for sample, reward, a in zip(samples, rewards, advantages, strict=True):
        sample.reward, sample.advantage = reward, a
    return {"reward/policy_mean": sum(rewards) / len(rewards) if rewards else None}


class RlLogitMode(Mode):
    name = "rl_logit"

    def rollouts(self, r: Trainer, examples: list[Example], *, step: int, seed: int) -> RankRollout:
        return rl_logit_rollouts(examples, engine=r.engine, tokenizer=r.tokenizer, cfg=r.cfg, seed=seed,
                                 group_offset=r.d.rank * r.cfg.raro.questions_per_step)

    def score(self, r: Trainer, samples: list[SequenceSample], scoring: list[SequenceSample]) -> dict[str, float | None]:
        return score_expert_answers(r.model, samples, scoring, d=r.d, std_normalize=r.cfg.loss.std_normalize,
                                    max_tokens_per_micro_batch=r.cfg.train.max_tokens_per_micro_batch)

    def policy_sequences(self, cfg: JobConfig) -> int:
        return cfg.raro.questions_per_step * cfg.raro.group_size
