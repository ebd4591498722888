"""RARO: the game for one step on one rank: policy rollouts, critic verdicts, rewards, critic rollouts.

Data in: this rank's demonstrations and a way to draw replayed pairs. Data out: trainable sequences (policy and
critic, with GRPO advantages and role weights), the fresh pairs for the replay buffer, and raw statistics. The
verifier never sets a reward here (except under the diagnostic `raro.critic oracle`); it is called to *log*
how the critic's reward relates to correctness: `reward/policy_mean_correct` vs `reward/policy_mean_incorrect`.
"""
from __future__ import annotations

import bisect
import itertools
import math
import random
from dataclasses import dataclass, replace
from typing import Callable

from raro_fast import prompts
from raro_fast.config import JobConfig
from raro_fast.distributed import all_gather_objects
from raro_fast.modes.base import Mode, RankRollout, Trainer, sampled_sequence, trained_length_limit
from raro_fast.replay import CriticPair
from raro_fast.rewards import group_advantages, mean_or_none, verdict_rewards
from raro_fast.rollout.engine import Completion, RolloutEngine, SamplingParams, engine_context_limit
from raro_fast.tasks.base import Example, Task


@dataclass
class Judged:
    """One policy answer put before the critic: the pair, where the expert's answer sits, and (logged only) what
    the verifier says of the policy's answer (None: the task has no verifier)."""

    question: int
    sample: int
    pair: CriticPair
    expert_position: int
    correct: bool | None


def role_temperatures(cfg: JobConfig) -> dict[str, float | None]:
    """Each role's sampling temperature, carried by its sequences only where the critic has its own (else every
    sequence is at the run's rollout.temperature and carries none)."""
    ro = cfg.rollout
    if ro.critic_temperature is None:
        return {"policy": None, "critic": None}
    return {"policy": ro.temperature, "critic": ro.critic_temperature}


def raro_rollouts(
    examples: list[Example],
    *,
    engine: RolloutEngine,
    tokenizer,
    task: Task,
    cfg: JobConfig,
    rng: random.Random,
    seed: int,
    fresh_cap: Callable[[int], int] | None,
    draw_replay: Callable[[int], list[CriticPair]],
    train_policy: bool = True,
    packed_limit: int | None = None,
) -> RankRollout:
    """This rank's step of the game. The critic trains on every fresh judged pair (at most `fresh_cap(n)` of the
    n this rank judged, a collective that every rank calls once a step; None: no cap) and on `raro.replay_ratio`
    of replayed ones, drawn by `draw_replay(n)` (a collective too, on several ranks); the policy's sequences join
    the batch only if `train_policy` (see `raro.critic_lead_steps`). A pair whose critic sequence could outgrow
    `packed_limit` (`varlen.packed_length_limit`) is left unjudged, as one past the micro-batch budget is."""
    rc, ro = cfg.raro, cfg.rollout
    out = RankRollout()
    if not examples:  # the collectives every rank calls once a step, in the same order
        if fresh_cap is not None:
            fresh_cap(0)
        draw_replay(0)
        return out
    policy_params = SamplingParams(max_new_tokens=ro.max_new_tokens, temperature=ro.temperature, top_p=ro.top_p,
                                   n=rc.group_size, seed=seed)
    critic_temperature = ro.temperature if ro.critic_temperature is None else ro.critic_temperature
    critic_params = SamplingParams(max_new_tokens=ro.critic_max_new_tokens, temperature=critic_temperature,
                                   top_p=ro.top_p, n=rc.critic_samples_per_pair, seed=seed + 1)

    # 1. Policy rollouts: G per question.
    policy = out.generated(engine.generate(
        [prompts.render_prompt(tokenizer, prompts.policy_messages(ex.question)) for ex in examples], policy_params))
    # 2. Every finished answer is judged against the expert's, in random order.
    budget = min(cfg.train.max_tokens_per_micro_batch, packed_limit or math.inf)
    judged = readable(answers_to_judge(examples, policy, task, rng, out), engine, tokenizer, critic_params, out,
                      budget=budget)
    verdicts = out.generated(judge_pairs(judged, engine, tokenizer, critic_params))
    out.new_pairs.extend(j.pair for j in judged)
    # 3. Policy rewards and advantages.
    rewards = _policy_rewards(examples, judged, verdicts, cfg, out)
    for i, comps in enumerate(policy):
        adv = group_advantages(rewards[i], [0] * len(comps), std_normalize=cfg.loss.std_normalize)
        for j, c in enumerate(comps):
            if train_policy and not c.truncated:  # over-length filtering: in the baseline, not in the loss
                out.samples.append(sampled_sequence(c, advantage=adv[j], role="policy", group=i, weight=rc.lambda_pol,
                                                    temperature=role_temperatures(cfg)["policy"], reward=rewards[i][j]))
    # 4. Critic training: the fresh verdicts above (on-policy rollouts already), plus rollouts on replayed pairs.
    fresh = list(zip((j.pair for j in judged), (j.expert_position for j in judged), verdicts))
    keep = len(fresh) if fresh_cap is None else fresh_cap(len(fresh))
    if len(fresh) > keep:
        fresh = rng.sample(fresh, keep)
    replayed = [Judged(-1, -1, p, rng.choice((1, 2)), None) for p in draw_replay(rc.replay_pairs_for(len(fresh), rng))]
    replay_params = replace(critic_params, seed=seed + 2)
    # stored when they fitted; a resume may have lengthened critic_max_new_tokens since
    replayed = readable(replayed, engine, tokenizer, replay_params, None, budget=budget)
    replay_verdicts = out.generated(judge_pairs(replayed, engine, tokenizer, replay_params))
    out.add("critic/fresh_pairs", len(fresh))
    out.add("critic/replay_pairs", len(replayed))
    for g, (_pair, pos, comps) in enumerate(fresh + [(jd.pair, jd.expert_position, v)
                                                     for jd, v in zip(replayed, replay_verdicts)]):
        _add_critic_group(out, comps, pos, cfg, group=len(examples) + g)
    return out


def answers_to_judge(examples: list[Example], policy: list[list[Completion]], task: Task, rng: random.Random,
                     out: RankRollout) -> list[Judged]:
    """Every policy sample that finished with an answer, paired with its question's expert answer at a random
    position; the policy's statistics go to `out`."""
    judged = []
    for i, (ex, comps) in enumerate(zip(examples, policy)):
        for j, c in enumerate(comps):
            answer = task.final_answer(c.text, c.truncated)
            correct = task.verify(ex, answer) if task.has_verifier else None
            out.add("policy/truncated_rate", c.truncated)
            out.add("policy/answer_rate", answer is not None)
            out.add("policy/response_length", len(c.token_ids))
            out.add("policy/answer_accuracy", correct)
            if answer is not None:
                judged.append(Judged(i, j, CriticPair(ex.id, ex.question, answer, ex.answer), rng.choice((1, 2)),
                                     None if correct is None else bool(correct)))
    return judged


def _policy_rewards(examples: list[Example], judged: list[Judged], verdicts: list[list[Completion]], cfg: JobConfig,
                    out: RankRollout) -> list[list[float | None]]:
    """Reward of every policy sample: the mean of the valid verdicts on its answer (None if there are none);
    no answer (truncated or no tag) earns 0. Under `raro.critic oracle` the verifier's verdict replaces the
    critic's for this reward; the critic's own verdicts are still measured, and so is what they would have paid
    (`reward/policy_mean_correct`/`_incorrect` are the critic's reward under either critic: logged from the
    oracle's, they read +0.6 for any critic, found by review)."""
    rc = cfg.raro
    rewards: list[list[float | None]] = [[0.0] * rc.group_size for _ in examples]
    for jd, comps in zip(judged, verdicts):
        pos = jd.expert_position
        oracle = None if jd.correct is None else ("tie" if jd.correct else str(pos))
        parsed = [None if c.truncated else prompts.parse_verdict(c.text) for c in comps]
        for c, v in zip(comps, parsed):
            out.add("critic/tie_rate", v == "tie")
            out.add("critic/invalid_rate", v is None)
            out.add("critic/accuracy", v is not None and v != "tie" and int(v) == pos)
            out.add("critic/decisive_accuracy", int(v) == pos if v in ("1", "2") else None)
            out.add("critic/oracle_agreement", None if oracle is None else v == oracle)
            out.add("critic/response_length", len(c.token_ids))
            out.add("critic/truncated_rate", c.truncated)
        paid = lambda verdicts: mean_or_none([verdict_rewards(v, pos, tau_pol=rc.tau_pol, tau_crit=rc.tau_crit,  # noqa: E731
                                                              invalid=rc.invalid_verdicts)[0] for v in verdicts])
        by_critic = paid(parsed)
        rewards[jd.question][jd.sample] = paid([oracle]) if rc.critic == "oracle" else by_critic
        if jd.correct is not None and by_critic is not None:
            out.add("reward/policy_mean_correct" if jd.correct else "reward/policy_mean_incorrect", by_critic)
    for row in rewards:
        for reward in row:
            out.add("reward/policy_mean", reward)
    return rewards


def _add_critic_group(out: RankRollout, comps: list[Completion], expert_position: int, cfg: JobConfig,
                      group: int) -> None:
    """One critic GRPO group: the critic's rollouts on one pair, rewarded by their own verdicts. A truncated
    rollout is scored 0; it stays in the loss under `raro.invalid_verdicts abstain` (so rambling is trained
    away) and is filtered out under `tie`."""
    rc = cfg.raro
    rewards = [verdict_rewards(None if c.truncated else prompts.parse_verdict(c.text), expert_position,
                               tau_pol=rc.tau_pol, tau_crit=rc.tau_crit, invalid=rc.invalid_verdicts)[1] for c in comps]
    adv = group_advantages(rewards, [0] * len(rewards), std_normalize=cfg.loss.std_normalize)
    for c, a, reward in zip(comps, adv, rewards):
        out.add("reward/critic_mean", reward)
        if not c.truncated or rc.invalid_verdicts == "abstain":
            out.samples.append(sampled_sequence(c, advantage=a, role="critic", group=group, weight=rc.lambda_crit,
                                                temperature=role_temperatures(cfg)["critic"], reward=reward))


def critic_prompt(jd: Judged, tokenizer) -> list[int]:
    """The critic's prompt for one pair, the two answers in the order `expert_position` says."""
    pair = jd.pair
    first, second = ((pair.expert_answer, pair.policy_answer) if jd.expert_position == 1
                     else (pair.policy_answer, pair.expert_answer))
    return prompts.render_prompt(tokenizer, prompts.critic_messages(pair.question, first, second))


def readable(judged: list[Judged], engine: RolloutEngine, tokenizer, params: SamplingParams,
             out: RankRollout | None, *, budget: int) -> list[Judged]:
    """The pairs whose critic prompt leaves room for the critic's reply in the model's positions and in one
    micro-batch of `budget` tokens. A longer one (a long policy answer beside a long expert answer) stopped the run
    in the engine's refusal or at packing (found by review); it is not judged now, so its answer earns 0 as no
    answer does, and `critic/unreadable_rate` counts it."""
    limit = engine_context_limit(engine)
    room = budget if limit is None else min(limit, budget)
    fits = [len(critic_prompt(jd, tokenizer)) + params.max_new_tokens <= room for jd in judged]
    if out is not None:
        for fit in fits:
            out.add("critic/unreadable_rate", not fit)
    return [jd for jd, fit in zip(judged, fits) if fit]


def judge_pairs(judged: list[Judged], engine: RolloutEngine, tokenizer,
                params: SamplingParams) -> list[list[Completion]]:
    """The critic's `params.n` rollouts on each pair."""
    if not judged:
        return []
    return engine.generate([critic_prompt(jd, tokenizer) for jd in judged], params)


def deal_cap(cap: int, counts: list[int], rng: random.Random) -> list[int]:
    """How many of its `counts[r]` items each rank keeps so that all ranks keep min(cap, sum) together, every item
    as likely as on one rank: the ranks' shares of `cap` items drawn from all of them by `rng` (seeded alike on
    every rank); each rank then draws its share from its own. (Split evenly before the counts were known, a rank
    with more judged pairs than its share dropped them while another's share went unused; dealt in equal shares
    after, a pair judged on a rank that judged few was kept more often: 0.8 against 0.25 on two ranks. Both found by
    review.)"""
    total = sum(counts)
    if total <= cap:
        return list(counts)
    if len(counts) == 1:
        return [cap]
    ends = list(itertools.accumulate(counts))
    shares = [0] * len(counts)
    for i in rng.sample(range(total), cap):
        shares[bisect.bisect_right(ends, i)] += 1
    return shares


class RaroMode(Mode):
    """The policy and the critic of one shared model, trained together on the game's mixed batch."""

    name = "raro"

    def rollouts(self, r: Trainer, examples: list[Example], *, step: int, seed: int) -> RankRollout:
        cfg, d = r.cfg, r.d
        cap = cfg.raro.critic_pairs_per_step
        # The buffer is the same on every rank, and so is this generator (the seed of rank 0's draws when ranks drew
        # on their own): the ranks deal one shuffle of it out, so no replayed pair is trained twice in a step.
        replay_rng = random.Random(f"{cfg.train.seed}/replay/{step}/0")
        return raro_rollouts(
            examples, engine=r.engine, tokenizer=r.tokenizer, task=r.task, cfg=cfg,
            rng=random.Random(f"{cfg.train.seed}/game/{step}/{d.rank}"), seed=seed,
            fresh_cap=(lambda judged: deal_cap(cap, all_gather_objects(d, judged),
                                               random.Random(f"{cfg.train.seed}/cap/{step}"))[d.rank]) if cap else None,
            draw_replay=lambda n: r.replay.sample(n, replay_rng) if d.world_size == 1 else r.replay.sample(
                n, replay_rng, part=d.rank, shares=deal_cap(len(r.replay), all_gather_objects(d, n),
                                                             random.Random(f"{cfg.train.seed}/replay-cap/{step}"))),
            train_policy=step >= cfg.raro.critic_lead_steps,
            packed_limit=trained_length_limit(r),
        )

    def policy_sequences(self, cfg: JobConfig) -> int:
        return cfg.raro.questions_per_step * cfg.raro.group_size

    def role_constants(self, cfg: JobConfig) -> dict[str, float]:
        rc = cfg.raro
        pairs = rc.planned_fresh_pairs + rc.planned_replay_pairs
        return {**super().role_constants(cfg),
                "critic": float(pairs * rc.critic_samples_per_pair * cfg.rollout.critic_max_new_tokens)}
