"""Held-out accuracy: the only place the task's verifier decides anything, and it trains nothing."""
from __future__ import annotations

from raro_fast import prompts
from raro_fast.distributed import Dist, all_gather_objects
from raro_fast.rollout.engine import RolloutEngine, SamplingParams
from raro_fast.tasks.base import Example, Task


def heldout_accuracy(
    examples: list[Example],
    *,
    engine: RolloutEngine,
    tokenizer,
    task: Task,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    d: Dist,
) -> float:
    """Fraction of `examples` whose sampled (greedy at temperature 0) answer the verifier accepts, over all ranks."""
    mine = examples[d.rank :: d.world_size]
    correct = 0
    if mine:
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, n=1, seed=seed)
        outs = engine.generate([prompts.render_prompt(tokenizer, prompts.policy_messages(ex.question)) for ex in mine], params)
        for ex, (c,) in zip(mine, outs):
            answer = None if c.truncated else task.extract_answer(c.text)
            correct += bool(task.verify(ex, answer))
    totals = all_gather_objects(d, (correct, len(mine)))
    n = sum(t[1] for t in totals)
    return sum(t[0] for t in totals) / max(n, 1)
