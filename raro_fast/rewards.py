"""Rewards from critic verdicts (the relativistic game) and GRPO group advantages."""
from __future__ import annotations

from collections import defaultdict
from typing import Sequence


def verdict_rewards(verdict: str | None, expert_position: int, *, tau_pol: float, tau_crit: float) -> tuple[float, float]:
    """(policy reward, critic reward) from one verdict on a pair whose expert answer sits at `expert_position`.

    verdict is "1", "2", "tie" or None (unparseable). Picking the expert rewards the critic; picking the policy
    answer rewards the policy; a tie gives each its tau. An unparseable verdict gives the policy tau_pol (the critic
    told it nothing, as with a tie) and the critic 0 (it failed its format).
    """
    if expert_position not in (1, 2):
        raise ValueError(f"expert_position must be 1 or 2, got {expert_position}")
    if verdict is None:
        return tau_pol, 0.0
    if verdict == "tie":
        return tau_pol, tau_crit
    picked_expert = int(verdict) == expert_position
    return (0.0, 1.0) if picked_expert else (1.0, 0.0)


def group_advantages(rewards: Sequence[float], groups: Sequence[int], *, std_normalize: bool = False) -> list[float]:
    """GRPO: each reward minus its group's mean (optionally over the group's std). A group of one gets 0."""
    if len(rewards) != len(groups):
        raise ValueError("rewards and groups must have the same length")
    members: dict[int, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
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
