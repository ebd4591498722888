"""The RARO game for one step on one rank: policy rollouts, critic verdicts, rewards, critic rollouts.

Data in: this rank's demonstrations and replayed pairs. Data out: trainable sequences (policy and critic, with
GRPO advantages and role weights), the fresh pairs for the replay buffer, and raw statistics. The verifier is
never called here except to *log* the policy's training accuracy.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

from raro_fast import prompts
from raro_fast.config import JobConfig
from raro_fast.packing import SequenceSample
from raro_fast.replay import CriticPair
from raro_fast.rewards import group_advantages, verdict_rewards
from raro_fast.rollout.engine import Completion, RolloutEngine, SamplingParams
from raro_fast.tasks.base import Example, Task


# Statistics every step reports (null in metrics.jsonl when a step has no data for one, e.g. no critic verdicts).
STAT_KEYS = (
    "policy/truncated_rate", "policy/answer_rate", "policy/response_length", "policy/answer_accuracy",
    "critic/tie_rate", "critic/invalid_rate", "critic/accuracy", "critic/response_length", "critic/truncated_rate",
    "reward/policy_mean", "reward/critic_mean",
)


@dataclass
class RankRollout:
    samples: list[SequenceSample] = field(default_factory=list)
    new_pairs: list[CriticPair] = field(default_factory=list)
    scoring: list[SequenceSample] = field(default_factory=list)  # rl_logit: reasoning + expert answer, to score
    stats: dict[str, list[float]] = field(default_factory=dict)

    def add(self, key: str, value: float) -> None:
        self.stats.setdefault(key, []).append(float(value))


def _sequence(c: Completion, *, advantage: float, role: str, group: int, weight: float) -> SequenceSample:
    return SequenceSample(
        input_ids=list(c.prompt_ids) + list(c.token_ids),
        prompt_len=len(c.prompt_ids),
        advantage=advantage,
        role=role,
        group=group,
        uid=-1,  # assigned once all ranks' samples are gathered
        loss_weight=weight,
        rollout_logprobs=list(c.logprobs),
        weight_version=c.weight_version,
    )


def raro_rollouts(
    examples: list[Example],
    replay_pairs: list[CriticPair],
    *,
    engine: RolloutEngine,
    tokenizer,
    task: Task,
    cfg: JobConfig,
    rng: random.Random,
    seed: int,
    critic_fresh_pairs: int,
) -> RankRollout:
    rc, ro = cfg.raro, cfg.rollout
    out = RankRollout()
    if not examples:
        return out
    policy_params = SamplingParams(
        max_new_tokens=ro.max_new_tokens, temperature=ro.temperature, top_p=ro.top_p, n=rc.group_size, seed=seed
    )
    critic_params = SamplingParams(
        max_new_tokens=ro.critic_max_new_tokens,
        temperature=ro.temperature,
        top_p=ro.top_p,
        n=rc.critic_samples_per_pair,
        seed=seed + 1,
    )

    # 1. Policy rollouts: G per question.
    policy = engine.generate([prompts.render_prompt(tokenizer, prompts.policy_messages(ex.question)) for ex in examples], policy_params)

    # 2. Every finished answer is judged against the expert's, in random order.
    judged: list[tuple[int, int, CriticPair, int]] = []  # (question, sample, pair, expert position)
    for i, (ex, comps) in enumerate(zip(examples, policy)):
        for j, c in enumerate(comps):
            answer = None if c.truncated else task.extract_answer(c.text)
            out.add("policy/truncated_rate", c.truncated)
            out.add("policy/answer_rate", answer is not None)
            out.add("policy/response_length", len(c.token_ids))
            out.add("policy/answer_accuracy", bool(task.verify(ex, answer)))
            if answer is not None:
                judged.append((i, j, CriticPair(ex.id, ex.question, answer, ex.answer), rng.choice((1, 2))))
    verdicts = _judge(judged, engine, tokenizer, critic_params)

    # 3. Policy rewards: mean over the critic's verdicts; no answer (truncated or no tag) earns 0.
    rewards = [[0.0] * rc.group_size for _ in examples]
    critic_groups: list[tuple[CriticPair, int, list[Completion], list[float]]] = []
    for (i, j, pair, pos), comps in zip(judged, verdicts):
        pol, crit = [], []
        for c in comps:
            verdict = None if c.truncated else prompts.parse_verdict(c.text)
            r_pol, r_crit = verdict_rewards(verdict, pos, tau_pol=rc.tau_pol, tau_crit=rc.tau_crit)
            pol.append(r_pol)
            crit.append(r_crit)
            out.add("critic/tie_rate", verdict == "tie")
            out.add("critic/invalid_rate", verdict is None)
            out.add("critic/accuracy", verdict is not None and verdict != "tie" and int(verdict) == pos)
            out.add("critic/response_length", len(c.token_ids))
            out.add("critic/truncated_rate", c.truncated)
        rewards[i][j] = sum(pol) / len(pol)
        critic_groups.append((pair, pos, comps, crit))
        out.new_pairs.append(pair)

    for i, comps in enumerate(policy):
        adv = group_advantages(rewards[i], [0] * len(comps), std_normalize=cfg.loss.std_normalize)
        for j, c in enumerate(comps):
            out.add("reward/policy_mean", rewards[i][j])
            if not c.truncated:  # over-length filtering: truncated samples count in the baseline, not the loss
                out.samples.append(_sequence(c, advantage=adv[j], role="policy", group=i, weight=rc.lambda_pol))

    # 4. Critic training pairs: some fresh (their verdicts above are on-policy rollouts) plus replayed ones.
    critic_train = rng.sample(critic_groups, min(critic_fresh_pairs, len(critic_groups)))
    replay_judged = [(-1, -1, p, rng.choice((1, 2))) for p in replay_pairs]
    for (_, _, pair, pos), comps in zip(replay_judged, _judge(replay_judged, engine, tokenizer, critic_params)):
        crit = [
            verdict_rewards(None if c.truncated else prompts.parse_verdict(c.text), pos, tau_pol=rc.tau_pol, tau_crit=rc.tau_crit)[1]
            for c in comps
        ]
        critic_train.append((pair, pos, comps, crit))
    out.add("critic/replay_pairs", len(replay_pairs))
    for g, (_pair, _pos, comps, crit) in enumerate(critic_train):
        adv = group_advantages(crit, [0] * len(crit), std_normalize=cfg.loss.std_normalize)
        for c, a, r in zip(comps, adv, crit):
            out.add("reward/critic_mean", r)
            if not c.truncated:
                out.samples.append(
                    _sequence(c, advantage=a, role="critic", group=len(examples) + g, weight=rc.lambda_crit)
                )
    return out


def _judge(
    judged: list[tuple[int, int, CriticPair, int]], engine: RolloutEngine, tokenizer, params: SamplingParams
) -> list[list[Completion]]:
    if not judged:
        return []
    critic_prompts = []
    for _, _, pair, pos in judged:
        first, second = (pair.expert_answer, pair.policy_answer) if pos == 1 else (pair.policy_answer, pair.expert_answer)
        critic_prompts.append(prompts.render_prompt(tokenizer, prompts.critic_messages(pair.question, first, second)))
    return engine.generate(critic_prompts, params)
