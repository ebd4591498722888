"""Test-time use of the critic (RARO): pick one of N sampled answers by a single-elimination tournament of
pairwise critic verdicts.

The bracket, for the answers of one question:
  - Unparseable or unfinished answers (None) are out before the first round: they lose to any parsed answer
    without a match. If no answer parsed, the pick is index 0 (whose answer is None: no answer).
  - Each round pairs the remaining entrants in index order: (1st, 2nd), (3rd, 4th), ...; with an odd count the
    last one gets a bye and advances unjudged.
  - Two identical answers need no match: the lower index advances (either way the picked answer is the same).
  - Position: the critic may favour whichever answer it reads first, so which of the two is shown as "Answer 1"
    is a fair coin from `random.Random(f"raro-tournament:{seed}:{question}")`, drawn once per judged pairing in
    bracket order. It depends on the question text and seed only, so a question gets the same bracket whether it
    is judged alone or batched with others, and every run with the same seed is the same.
  - Verdict "1" or "2": the answer shown in that position advances. "tie", None (unparseable or truncated) or
    anything else: a rematch with the order swapped; if that too gives no winner, the lower index advances.

Batching: `batched_tournaments` plays all questions' brackets side by side, round by round, so a round costs
one judge call holding every match of that round across all questions (plus one more call for the rematches
of that round's ties, when there are any). A tournament of N parsed answers takes ceil(log2 N) rounds.

A judge is any callable from a list of matches (question, answer_1, answer_2) to one verdict per match;
`critic_judge` makes one from a rollout engine and the shared model's critic prompt.
"""
from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from typing import Callable, Sequence

from raro_fast import prompts
from raro_fast.rollout.engine import RolloutEngine, SamplingParams, generate_where_room

Match = tuple[str, str, str]  # (question, answer shown as 1, answer shown as 2)
Judge = Callable[[list[Match]], list[str | None]]


@dataclass
class _Pairing:
    """One judged pairing of a round: entrants `low` < `high` (answer indices) of question number `q`."""

    q: int
    low: int
    high: int
    low_shown_first: bool
    winner: int | None = None


def tournament_pick(question: str, answers: Sequence[str | None], *, judge: Judge, seed: int = 0) -> int:
    """Index of the answer that wins the critic tournament among `answers` (see the module docstring)."""
    return batched_tournaments([question], [answers], judge, seed=seed)[0]


def batched_tournaments(
    questions: Sequence[str], answers_per_question: Sequence[Sequence[str | None]], judge: Judge, *, seed: int = 0
) -> list[int]:
    """The tournament winner (an index into its answers) of every question, all brackets played round by round
    together: one judge call per round for all questions, plus one for that round's rematches if any tied."""
    if len(questions) != len(answers_per_question):
        raise ValueError(
            f"batched_tournaments: {len(questions)} questions but {len(answers_per_question)} answer lists")
    for q, answers in enumerate(answers_per_question):
        if not answers:
            raise ValueError(f"batched_tournaments: question {q} has no answers to choose from")
    alive = [[i for i, a in enumerate(answers) if a is not None] for answers in answers_per_question]
    coins = [random.Random(f"raro-tournament:{seed}:{question}") for question in questions]
    while any(len(entrants) > 1 for entrants in alive):
        # A round's plan per question: slots in bracket order, each an index that advances unjudged or a pairing.
        plans: list[list[int | _Pairing]] = []
        judged: list[_Pairing] = []
        for q, entrants in enumerate(alive):
            answers = answers_per_question[q]
            plan: list[int | _Pairing] = []
            for k in range(0, len(entrants) - 1, 2):
                low, high = entrants[k], entrants[k + 1]
                if answers[low] == answers[high]:
                    plan.append(low)
                    continue
                pairing = _Pairing(q, low, high, low_shown_first=coins[q].random() < 0.5)
                plan.append(pairing)
                judged.append(pairing)
            if len(entrants) % 2:
                plan.append(entrants[-1])  # the bye
            plans.append(plan)
        _play(judged, questions, answers_per_question, judge, swapped=False)
        _play([p for p in judged if p.winner is None], questions, answers_per_question, judge, swapped=True)
        for p in judged:
            if p.winner is None:
                p.winner = p.low
        # Winners stay in ascending index order, so the next round pairs neighbours of this one.
        alive = [[slot if isinstance(slot, int) else slot.winner for slot in plan] for plan in plans]
    return [entrants[0] if entrants else 0 for entrants in alive]


def _play(pairings: list[_Pairing], questions, answers_per_question, judge: Judge, *, swapped: bool) -> None:
    """One judge call for all `pairings`; sets `winner` where the verdict names one (else leaves None)."""
    if not pairings:
        return
    shown: list[tuple[int, int]] = []
    for p in pairings:
        low_first = p.low_shown_first != swapped
        shown.append((p.low, p.high) if low_first else (p.high, p.low))
    matches = [
        (questions[p.q], answers_per_question[p.q][first], answers_per_question[p.q][second])
        for p, (first, second) in zip(pairings, shown)
    ]
    verdicts = judge(matches)
    if len(verdicts) != len(matches):
        raise ValueError(f"tournament judge: {len(verdicts)} verdicts for {len(matches)} matches")
    for p, (first, second), verdict in zip(pairings, shown, verdicts):
        if verdict == "1":
            p.winner = first
        elif verdict == "2":
            p.winner = second


def critic_judge(
    engine: RolloutEngine, tokenizer, *, max_new_tokens: int, temperature: float, seed: int, top_p: float = 1.0
) -> Judge:
    """A judge that asks the shared model, in its critic role, one verdict per match (one engine call per call).

    Truncated or unparseable critic outputs give None. Each call uses the next seed (seed, seed + 1, ...) so a
    rematch round does not replay the sampling noise of the round before it.
    """
    call_index = itertools.count()

    def judge(matches: list[Match]) -> list[str | None]:
        params = SamplingParams(
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, n=1, seed=seed + next(call_index)
        )
        critic_prompts = [prompts.render_prompt(tokenizer, prompts.critic_messages(q, a1, a2)) for q, a1, a2 in matches]
        # a match the critic has no room to judge (two long answers) is invalid: it stopped the evaluation (review)
        outs = generate_where_room(engine, critic_prompts, params)
        return [None if out is None or out[0].truncated else prompts.parse_verdict(out[0].text) for out in outs]

    return judge
