"""RLVR: GRPO with the task's verifier as reward (1 if the answer checks, else 0): the oracle upper bound where a
verifier exists."""
from __future__ import annotations

from raro_fast.config import JobConfig
from raro_fast.modes.base import Mode, RankRollout, Trainer, policy_groups, sampled_sequence
from raro_fast.rewards import group_advantages
from raro_fast.rollout.engine import RolloutEngine
from raro_fast.tasks.base import Example, Task


def rlvr_rollouts(examples: list[Example], *, engine: RolloutEngine, tokenizer, task: Task, cfg: JobConfig,
                  seed: int) -> RankRollout:
    out = RankRollout()
    if not examples:
        return out
    policy = out.generated(policy_groups(examples, engine=engine, tokenizer=tokenizer, cfg=cfg, seed=seed))
    for i, (ex, comps) in enumerate(zip(examples, policy)):
        answers = [task.final_answer(c.text, c.truncated) for c in comps]
        rewards = [float(bool(task.verify(ex, a))) for a in answers]
        adv = group_advantages(rewards, [0] * len(rewards), std_normalize=cfg.loss.std_normalize)
        for c, a, r, g in zip(comps, answers, rewards, adv):
            out.add("policy/truncated_rate", c.truncated)
            out.add("policy/answer_rate", a is not None)
            out.add("policy/response_length", len(c.token_ids))
            out.add("policy/answer_accuracy", r)
            out.add("reward/policy_mean", r)
            if not c.truncated:
                out.samples.append(sampled_sequence(c, advantage=g, role="policy", group=i, weight=1.0, reward=r))
    return out


class RlvrMode(Mode):
    name = "rlvr"

    def rollouts(self, r: Trainer, examples: list[Example], *, step: int, seed: int) -> RankRollout:
        return rlvr_rollouts(examples, engine=r.engine, tokenizer=r.tokenizer, task=r.task, cfg=r.cfg, seed=seed)

    def policy_sequences(self, cfg: JobConfig) -> int:
        return cfg.raro.questions_per_step * cfg.raro.group_size
