"""The task interface: what a trainer needs from a task, small enough to add a task in one file.

A task gives demonstrations (question, expert final answer) per split, extracts a final answer from a completion,
and optionally verifies one (for evaluation only: RARO never trains on a verifier). To add a task: subclass
`Task`, write a dataclass config, and register both in `raro_fast.tasks.TASKS`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Mapping

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
    has_verifier: bool = False  # True where `verify` answers True/False (evaluation and diagnostics only)

    @abstractmethod
    def examples(self, split: str) -> list[Example]:
        """Demonstrations of `split` ("train" or "heldout"); the two never share a problem."""

    def extract_answer(self, completion: str) -> str | None:
        return prompts.parse_answer(completion)

    def verify(self, example: Example, answer: str | None) -> bool | None:
        """True/False if the task can check an answer, None if it has no verifier."""
        return None

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
        self._splits = self.load(cfg)

    def examples(self, split: str) -> list[Example]:
        self.check_split(split)
        return list(self._splits[split])

