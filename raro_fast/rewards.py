"""Rewards from critic verdicts (the relativistic game) and GRPO group advantages."""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Sequence

# What an unparseable or truncated critic verdict means for the two roles (`raro.invalid_verdicts`).
INVALID_VERDICT_RULES = ("abstain", "tie")


def verdict_rewards(verdict: str | None, expert_position: int, *, tau_pol: float, tau_crit: float,
                    invalid: str = "abstain") -> tuple[float | None, float]:
    """(policy reward, critic reward) from one verdict on a pair whose expert answer sits at `expert_position`.

    verdict is "1", "2", "tie" or None (unparseable or truncated). Picking the expert rewards the critic; picking
    the policy answer rewards the policy; a tie gives each its tau. An invalid verdict gives the critic 0 (it failed
    its format) and the policy, by `invalid`:
      - "abstain" (default): None, no reward at all: the verdict does not count in the policy's reward, so an
        answer that makes the critic ramble past its limit earns nothing for it;
      - "tie": tau_pol, as if the critic had said tie (the rule before 2026-11-28; it paid a wrong answer that
        broke the critic like a right one).
    """
    if expert_position not in (1, 2):
        raise ValueError(f"expert_position must be 1 or 2, got {expert_position}")
    if invalid not in INVALID_VERDICT_RULES:
        raise ValueError(f"invalid must be one of {INVALID_VERDICT_RULES}, got {invalid!r}")
    if verdict is None:
        return (tau_pol if invalid == "tie" else None), 0.0
    if verdict == "tie":
        return tau_pol, tau_crit
    if verdict not in ("1", "2"):  # "3" or " 2" used to pay the policy as if it had been picked
        raise ValueError(f'verdict must be "1", "2", "tie" or None, got {verdict!r}')
    picked_expert = int(verdict) == expert_position
    return (0.0, 1.0) if picked_expert else (1.0, 0.0)


def mean_or_none(values: Sequence[float | None]) -> float | None:
    """The mean of the values that are not None; None if there are none. A NaN or infinite value is refused."""
    kept = [_finite(v, i) for i, v in enumerate(values) if v is not None]
    return sum(kept) / len(kept) if kept else None


def group_advantages(rewards: Sequence[float | None], groups: Sequence[int], *,
                     std_normalize: bool = False) -> list[float]:
    """GRPO: each reward minus its group's mean (optionally over the group's std). A group of one gets 0.

    A reward of None (nothing to reward: e.g. every critic verdict on that answer was invalid) takes its group's
    mean: its advantage is 0 and it moves neither the mean nor the std of the others. A NaN or infinite reward is
    refused: it made its whole group's advantages NaN, the step was skipped, and three such steps stopped the run
    with a message about the loss, not the reward."""
    if len(rewards) != len(groups):
        raise ValueError("rewards and groups must have the same length")
    members: dict[int, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        if rewards[i] is not None:
            _finite(rewards[i], i, g)
            members[g].append(i)
    adv = [0.0] * len(rewards)
    for idx in members.values():
        vals = [rewards[i] for i in idx]
        mean = sum(vals) / len(vals)
        std = (sum((v - mean) ** 2 for v in vals) / max(len(vals) - 1, 1)) ** 0.5
        for i in idx:
            a = rewards[i] - mean
            adv[i] = a / (std + 1e-6) if std_normalize else a
    return adv


def _finite(value: float, index: int, group: int | None = None) -> float:
    if not math.isfinite(value):
        where = f"reward {index}" + ("" if group is None else f" (group {group})")
        raise ValueError(f"{where} is {value}: a reward must be a finite number or None")
    return value
