"""Tasks: demonstrations, answer extraction and (for evaluation only) verifiers. See base.py for the interface."""
from __future__ import annotations

from raro_fast.tasks.base import Example, Task
from raro_fast.tasks.countdown import CountdownConfig, CountdownTask

# name -> (task class, its config class)
TASKS: dict[str, tuple[type[Task], type]] = {"countdown": (CountdownTask, CountdownConfig)}


def get_task(name: str, config) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {sorted(TASKS)}")
    return TASKS[name][0](config)


__all__ = ["Example", "Task", "TASKS", "get_task", "CountdownConfig", "CountdownTask"]
