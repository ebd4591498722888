"""The critic's replay buffer: past (question, policy answer, expert answer) pairs, so the critic keeps being
trained against earlier policy behaviour and does not forget it (a stabiliser the paper calls essential)."""
from __future__ import annotations

import random
from collections import deque
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class CriticPair:
    example_id: str
    question: str
    policy_answer: str
    expert_answer: str


class ReplayBuffer:
    """FIFO of CriticPair with a fixed capacity; its whole state is JSON-able for exact resume."""

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"raro.replay_size must be >= 0, got {capacity}")
        self.capacity = capacity
        self._items: deque[CriticPair] = deque(maxlen=capacity or None)

    def __len__(self) -> int:
        return len(self._items)

    def extend(self, pairs: list[CriticPair]) -> None:
        if self.capacity:
            self._items.extend(pairs)

    def sample(self, k: int, rng: random.Random, *, part: int = 0, shares: list[int] | None = None) -> list[CriticPair]:
        """k pairs without replacement (fewer if the buffer holds fewer). Ranks pass `shares`, every rank's count
        (summing to at most len(self): `deal_cap`), their own `part`, and an `rng` seeded the same on every rank;
        each takes its share (k is not read then) in consecutive slices of one shuffle of the buffer, so their pairs
        are disjoint (each rank drawing on its own put the same pair in a step's critic batch twice) and any pair may
        go to any rank (a rank dealt every other pair of the shuffle could take no more than half the buffer,
        however many it needed: found by review)."""
        if shares is None:
            k = min(k, len(self._items))
            return [self._items[i] for i in sorted(rng.sample(range(len(self._items)), k))]
        if sum(shares) > len(self._items):
            raise ValueError(f"replay shares {shares} ask for more than the {len(self._items)} pairs held")
        order = list(range(len(self._items)))
        rng.shuffle(order)
        start = sum(shares[:part])
        return [self._items[i] for i in sorted(order[start:start + shares[part]])]

    def state_dict(self) -> dict:
        return {"capacity": self.capacity, "items": [asdict(p) for p in self._items]}

    def load_state_dict(self, state: dict) -> None:
        self.capacity = state["capacity"]
        self._items = deque((CriticPair(**p) for p in state["items"]), maxlen=self.capacity or None)
