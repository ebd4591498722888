"""Tasks: demonstrations, answer extraction and (for evaluation only) verifiers. See base.py for the interface."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal

from raro_fast.tasks.base import Example, Task
from raro_fast.tasks.countdown import CountdownConfig, CountdownTask
from raro_fast.tasks.deepmath import DeepMathConfig, DeepMathTask
from raro_fast.tasks.poetry import JudgeReport, PoetryConfig, PoetryTask, judge_pairwise

# name -> (task class, its config class)
TASKS: dict[str, tuple[type[Task], type]] = {
    "countdown": (CountdownTask, CountdownConfig),
    "deepmath": (DeepMathTask, DeepMathConfig),
    "poetry": (PoetryTask, PoetryConfig),
}


@dataclass(kw_only=True)
class TaskConfig:
    """Which task, and every task's own settings (only the named one is used)."""

    name: Literal["countdown", "deepmath", "poetry"] = field(default="countdown", metadata={
        "help": "The task: countdown (generated puzzles, verifier), deepmath (local JSONL/Parquet, math-verify), "
                "poetry (local JSONL, no verifier: judged pairwise). Its settings are task.<name>.*"})
    countdown: CountdownConfig = field(default_factory=CountdownConfig, metadata={"help": "Countdown settings."})
    deepmath: DeepMathConfig = field(default_factory=DeepMathConfig, metadata={"help": "DeepMath settings."})
    poetry: PoetryConfig = field(default_factory=PoetryConfig, metadata={"help": "Poetry settings."})

    def __post_init__(self) -> None:
        # Found by review: `--task.deepmath.path my_math.jsonl` without `--task.name deepmath` trained Countdown and
        # never opened the file. (Countdown's settings also shape the warm-up's puzzles: JobConfig checks those.)
        for name in ("deepmath", "poetry"):
            section, default = getattr(self, name), type(getattr(self, name))()
            given = [f"task.{name}.{f.name}" for f in fields(section)
                     if getattr(section, f.name) != getattr(default, f.name)
                     and not (f.name == "path" and _shipped_sample(section.path, default.path))]
            if given and self.name != name:
                raise ValueError(f"{', '.join(given)}: settings of the {name} task, which task.name {self.name} does "
                                 f"not use; add --task.name {name}")


def _shipped_sample(path: str, default: str) -> bool:
    """Whether `path` is the shipped sample in another checkout: a run's saved config.json holds the absolute path
    of its own (`--config out/config.json` after a re-clone is no other task's data)."""
    return Path(path).parts[-4:] == Path(default).parts[-4:]


def make_task(cfg: TaskConfig) -> Task:
    return get_task(cfg.name, getattr(cfg, cfg.name))


def get_task(name: str, config) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {sorted(TASKS)}")
    return TASKS[name][0](config)


__all__ = [
    "Example", "Task", "TASKS", "TaskConfig", "get_task", "make_task", "CountdownConfig", "CountdownTask", "DeepMathConfig", "DeepMathTask",
    "PoetryConfig", "PoetryTask", "JudgeReport", "judge_pairwise",
]
