"""The task interface: what a trainer needs from a task, small enough to add a task in one file.

A task gives demonstrations (question, expert final answer) per split, extracts a final answer from a completion,
and optionally verifies one (for evaluation only: RARO never trains on a verifier). To add a task: subclass
`Task`, write a dataclass config, and register both in `raro_fast.tasks.TASKS`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from raro_fast import prompts

SPLITS = ("train", "heldout")


@dataclass(frozen=True)
class Example:
    id: str
    question: str
    answer: str  # the expert's final answer only, no reasoning
    meta: Mapping[str, Any] = field(default_factory=dict)


class Task(ABC):
    name: str = "task"

    @property
    def has_verifier(self) -> bool:
        """Whether `verify` answers True/False (evaluation and diagnostics only): a task that overrides it. (A flag
        to set beside it was missed by a task written from docs/tasks.md, and its verifier went unused: RLVR and the
        analysis refused it, and the critic's correct-vs-incorrect reward gap was never logged.)"""
        return type(self).verify is not Task.verify

    @abstractmethod
    def examples(self, split: str) -> list[Example]:
        """Demonstrations of `split` ("train" or "heldout"); the two never share a problem."""

    def extract_answer(self, completion: str) -> str | None:
        return prompts.parse_answer(completion)

    def final_answer(self, completion: str, truncated: bool) -> str | None:
        """The answer a sampled completion gives: none if it was cut off at its token limit (whatever it wrote so
        far), else `extract_answer`'s. Training, evaluation and analysis all read answers through this."""
        return None if truncated else self.extract_answer(completion)

    def verify(self, example: Example, answer: str | None) -> bool | None:
        """True/False if the task can check an answer, None if it has no verifier."""
        return None

    def answer_classes(self, answers: Sequence[str | None]) -> list[int | None]:
        """One class number per answer (None for no answer), numbered by first appearance: answers that are the
        same answer share one. Majority vote and answer entropy count classes, not strings. Here: the same text
        up to surrounding whitespace; a task whose answers have many spellings (DeepMath: 1/2 and 0.5) says more."""
        return classes_by_key(answers, str.strip)

    @staticmethod
    def check_split(split: str) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


class FileTask(Task):
    """A task whose demonstrations come from a local file, read and checked when the task is built (so a bad
    file fails before any model is loaded). Subclasses set `load(cfg) -> {split: [Example, ...]}`."""

    load: Any  # a staticmethod

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        if not Path(cfg.path).is_file():  # the setting to fix, not only a path (it may come from a config file)
            raise ValueError(f"task.{self.name}.path: {cfg.path}: no such file")
        self._splits = self.load(cfg)

    def examples(self, split: str) -> list[Example]:
        self.check_split(split)
        return list(self._splits[split])


def classes_by_key(answers: Sequence[str | None], key) -> list[int | None]:
    """Class numbers (by first appearance) of answers grouped by `key(answer)`; None stays None."""
    numbers: dict[Any, int] = {}
    return [None if a is None else numbers.setdefault(key(a), len(numbers)) for a in answers]
