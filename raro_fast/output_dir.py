"""The run's output folder: one run per folder, and a warmed-up base reused only for the settings it was made with.

A new run (no `--resume`) into a folder that holds another run's files would mix two runs: its metrics.jsonl
rewritten, its checkpoints pruned by step number against the new run's, `latest` naming one that is then deleted.
So a new run refuses such a folder unless `train.overwrite` says to delete those files. `base_model/` is the
embedded model's warm-up, cached: it is reused (by a new run, a resume that finds no checkpoint yet, or a test
that prepared it) only when the settings it was warmed up with, recorded next to it, are the run's own.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from raro_fast.checkpoint import checkpoint_root, step_folders
from raro_fast.config import JobConfig, warmup_countdown_settings
from raro_fast.model.hf import BUILTIN_PREFIX, model_files_digest, resolve_model_path, weights_digest

# What a run writes into its folder (besides base_model/, handled on its own).
RUN_ENTRIES = ("metrics.jsonl", "rollouts.jsonl", "checkpoints", "final_model", "config.json", "curves.png",
               "dpo_reference")
RECIPE_FILE = "warmup_recipe.json"


FORMAT_RATES_FILE = "format_rates.json"


def uses_base(cfg: JobConfig) -> bool:
    """Whether the run starts from a base it warms up itself (and caches in base_model/): the embedded default,
    or a real checkpoint given `warmup.checkpoint_steps`."""
    return not cfg.model.path or cfg.warmup.checkpoint_steps > 0


def base_recipe(cfg: JobConfig) -> dict[str, Any]:
    """Every setting the base's weights depend on."""
    countdown = {name: getattr(cfg.task.countdown, name) for name in warmup_countdown_settings(cfg)}
    if cfg.model.path:  # the path and what is there now: a model saved there again is another starting point
        path = resolve_model_path(cfg.model.path, "model.path")
        # its config and tokenizer too: a cached base was reused after config.json changed (found by review)
        start = {"model.path": cfg.model.path, "model.path weights sha256": weights_digest(path),
                 "model.path files sha256": model_files_digest(path) if Path(path).is_dir() else None}
    else:
        start = {"model.embedded": dataclasses.asdict(cfg.model.embedded)}
    return {
        **start,
        "warmup": dataclasses.asdict(cfg.warmup),
        "task.countdown": countdown,
        "train.seed": cfg.train.seed,
    }


def recipe_file(cfg: JobConfig) -> dict[str, str]:
    """The recipe as a file to save atomically with the base (`save_pretrained_atomic(extra_files=...)`)."""
    return {RECIPE_FILE: json.dumps(base_recipe(cfg), indent=2)}


def _recipe_differences(base: Path, cfg: JobConfig) -> list[str]:
    path = base / RECIPE_FILE
    try:
        saved = json.loads(path.read_text())
    except FileNotFoundError:
        return [f"{path.name} is missing, so what it was warmed up with is unknown"]
    except json.JSONDecodeError as e:
        return [f"{path} is not valid JSON ({e})"]
    if not isinstance(saved, dict):
        return [f"{path} holds {type(saved).__name__}, not an object of settings"]
    diffs = []
    for section, now in base_recipe(cfg).items():
        then = saved.get(section)
        if isinstance(now, dict):
            then = then if isinstance(then, dict) else {}
            diffs += [f"{section}.{k}: {then.get(k)!r} there, {v!r} now" for k, v in now.items() if then.get(k) != v]
        elif then != now:
            diffs.append(f"{section}: {then!r} there, {now!r} now")
    return diffs


def check_builtin_base(cfg: JobConfig) -> None:
    """A base shipped with the package trains only the Countdown task it was warmed up for (its folder's
    warmup_recipe.json). Found by review: `--task.countdown.max_target 30` or `--task.countdown.target 24` started
    from builtin:countdown-easy, whose warm-up had shown worked solutions of most of those tasks' held-out puzzles
    (51 of 64 in a fifth of its corpus), so their held-out accuracy was not held out."""
    if not cfg.model.path.startswith(BUILTIN_PREFIX) or cfg.task.name != "countdown":
        return
    recipe = Path(resolve_model_path(cfg.model.path, "model.path")) / RECIPE_FILE
    if not recipe.is_file():  # a shipped base made for no Countdown task in particular
        return
    made_for = json.loads(recipe.read_text())["task.countdown"]
    now = cfg.task.countdown
    diffs = [f"task.countdown.{k} {v!r} there, {getattr(now, k)!r} now" for k, v in made_for.items()
             if getattr(now, k) != v]
    if diffs:
        raise ValueError(f"model.path {cfg.model.path}: this base was warmed up for another Countdown task "
                         f"({'; '.join(diffs)}), and its warm-up showed solutions of puzzles like this task's, held-out "
                         "ones included. Pass --model.path '' to warm up the embedded model in the run (it leaves "
                         "this task's puzzles out), or keep the task's settings")


def _has_checkpoints(out: Path) -> bool:
    """Whether a resume has a checkpoint to start from: `checkpoint.resume_point` returns one (or refuses, when all
    are damaged) exactly when a step folder exists; this looks without verifying any."""
    return bool(step_folders(checkpoint_root(out)))


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()


def prepare(cfg: JobConfig, *, delete: bool) -> None:
    """Before anything is built, on every rank (the same verdict everywhere): refuse (ValueError) a folder a new run
    must not mix with, or under `train.overwrite` clear it (only where `delete`: one rank).

    A resume that finds a checkpoint continues from its weights (its settings are checked against the saved ones
    later). One that finds none starts from scratch, from base_model/ like a new run, so its base gets a new run's
    check: a base warmed up with other settings is refused, or warmed up again under `train.overwrite`. The run's
    own files stay: a resume continues in this folder (the logs are cut back to where it starts)."""
    out = Path(cfg.train.output_dir)
    # A file in the way failed only when the metrics were opened, after the model loaded (found by review)
    blocked = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    if blocked is not None:
        raise ValueError(f"train.output_dir: {blocked} is a file, not a folder")
    check_builtin_base(cfg)
    _refuse_or_clear(cfg, out, delete=delete)
    # A folder that cannot be written failed where the metrics were opened, after the model loaded, or where the
    # base was saved, after its whole warm-up, in a traceback (found by review): try it, once the run is accepted.
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"train.output_dir: cannot write in {out} ({type(e).__name__}: {e.strerror or e})") from None


def _refuse_or_clear(cfg: JobConfig, out: Path, *, delete: bool) -> None:
    t = cfg.train
    if t.resume and _has_checkpoints(out):
        return
    found = [] if t.resume else [name for name in RUN_ENTRIES if (out / name).exists()]
    base = out / "base_model"
    stale_base = _recipe_differences(base, cfg) if uses_base(cfg) and base.exists() else []
    if t.overwrite:
        if not delete:
            return
        for name in found:
            _remove(out / name)
        if stale_base:
            _remove(base)
        return
    if found:
        raise ValueError(
            f"train.output_dir: {out} holds another run ({', '.join(found)}). Continue it with --resume, choose "
            f"another --train.output_dir, or pass --train.overwrite true to delete that run's files and start over.")
    if stale_base:
        raise ValueError(
            f"train.output_dir: {base} was warmed up with other settings ({'; '.join(stale_base)}). Choose another "
            f"--train.output_dir, or pass --train.overwrite true to warm up again there.")
