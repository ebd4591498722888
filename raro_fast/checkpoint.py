"""Checkpoints that resume exactly: the model in Hugging Face format (safetensors) plus the trainer state.

Layout of one checkpoint, `<output_dir>/checkpoints/step_000010/`:
  model/                      HF model + tokenizer (loadable with AutoModelForCausalLM)
  optimizer.safetensors       every optimizer tensor, keyed "<param fqn>/<state name>"
  optimizer.json              param groups (hyper-parameters and parameter order)
  rng_rank<r>.safetensors     each rank's torch RNG state
  trainer_state.json          step, data position, replay buffer, anything else the loop needs
  manifest.json               every other file's size and SHA-256, written last
A checkpoint is written in a hidden temporary folder, synced to disk and renamed into place; `latest` (a one-line
file, itself replaced atomically) names the newest complete one. No pickles anywhere. A resume verifies the checkpoint
against its manifest first; a damaged one is named and the newest intact one used instead, never a silent restart.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from raro_fast.config import PER_COMMAND, unread_loss_settings
from raro_fast.distributed import Dist, barrier
from raro_fast.durable import write_text_atomic
from raro_fast.model.hf import fsync_tree, save_pretrained_atomic, with_umask_modes
from raro_fast.weight_sync.source import full_state_dict


def checkpoint_root(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "checkpoints"


MANIFEST = "manifest.json"
# A key of trainer_state.json in every checkpoint written with a manifest: one without its manifest is damaged.
FORMAT_KEY = "checkpoint_format"


def step_number(path: Path) -> int | None:
    """The step of a checkpoint folder's name (step_000010: 10); None for any other name."""
    m = re.fullmatch(r"step_(\d+)", path.name)
    return int(m[1]) if m else None


def step_folders(root: Path) -> list[Path]:
    """The checkpoint folders under `root`, oldest step first. Only `step_<digits>`: a user's copy beside them
    (step_000004.bak) was taken for a checkpoint, and pruned or made the real one pruned; and by name, step 1000000
    came before step 999999 (found by review)."""
    return sorted((p for p in root.glob("step_*") if p.is_dir() and step_number(p) is not None), key=step_number)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: Path) -> None:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    (folder / MANIFEST).write_text(json.dumps(entries, indent=1))


def damage(folder: Path) -> str | None:
    """What is wrong with checkpoint `folder` (naming the file), or None if it is intact. A checkpoint from before
    manifests (its trainer state has no FORMAT_KEY) is checked for its files only; a later one without its manifest
    is damaged: one half deleted when the run was killed passed as intact, and loaded a changed optimizer state."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        needed = ["trainer_state.json", "optimizer.safetensors", "optimizer.json", "model/config.json"]
        missing = [n for n in needed if not (folder / n).is_file()]
        if missing:
            return f"{folder / missing[0]} is missing"
        try:
            has_manifest = FORMAT_KEY in json.loads((folder / "trainer_state.json").read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError) as e:
            return f"{folder / 'trainer_state.json'} cannot be read ({type(e).__name__}: {e})"
        return f"{manifest} is missing" if has_manifest else None
    try:
        entries = json.loads(manifest.read_text())
        wants = [(name, int(want["bytes"]), str(want["sha256"])) for name, want in entries.items()]
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, KeyError, TypeError, ValueError) as e:
        return f"{manifest} is not a valid manifest ({type(e).__name__}: {e})"
    for name, size, sha256 in wants:
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != size:
            return f"{path} has {path.stat().st_size} bytes, the manifest says {size} (truncated or replaced)"
        if _sha256(path) != sha256:
            return f"{path} does not match its SHA-256 in the manifest (changed after it was written)"
    return None


def resume_point(output_dir: str | os.PathLike, warn: Callable[[str], None] = print) -> Path | None:
    """The checkpoint to resume from: the one `latest` names if intact, else the newest intact one (each one passed
    over is reported through `warn`, naming what is damaged). None when there are no checkpoints at all; a
    ValueError when there are some but none is intact."""
    root = checkpoint_root(output_dir)
    pointer = root / "latest"
    steps = step_folders(root)[::-1]
    named = None
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if named.is_dir():
            steps = [named] + [p for p in steps if p != named]
        else:
            warn(f"train.resume: {pointer} names {named.name}, which does not exist")
    elif steps:
        warn(f"train.resume: {pointer} is missing; looking for the newest intact checkpoint instead")
    problems = []
    for path in steps:
        problem = damage(path)
        if problem is None:
            if problems or (named is not None and path != named):
                warn(f"train.resume: resuming from {path.name}, the newest intact checkpoint")
            return path
        problems.append(problem)
        warn(f"train.resume: {path.name} is damaged, skipped: {problem}")
    if problems:
        raise ValueError(f"train.resume: no intact checkpoint in {root}: " + "; ".join(problems))
    return None


def save_checkpoint(
    output_dir: str | os.PathLike,
    step: int,
    *,
    model: torch.nn.Module,
    hf_model: Any,
    tokenizer: Any,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    d: Dist,
    keep: int = 2,
) -> Path:
    """Collective: every rank calls it. `model` is the (possibly sharded) trained module, `hf_model` the HF
    model object whose class and config are saved with the weights."""
    root = checkpoint_root(output_dir)
    name = f"step_{step:06d}"
    tmp = root / f".{name}.tmp"
    final = root / name
    weights = full_state_dict(model)
    optim_state = optimizer_state_dict(model, optimizer)
    if d.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        cpu_weights = {k: v.cpu() for k, v in weights.items()}
        save_pretrained_atomic(hf_model, tokenizer, tmp / "model", state_dict=cpu_weights)
        tensors, groups = _flatten_optimizer(optim_state)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "optimizer.json").write_text(json.dumps(groups))
        (tmp / "trainer_state.json").write_text(json.dumps({**trainer_state, FORMAT_KEY: 2}))
    barrier(d)
    save_file({"torch_cpu": torch.get_rng_state()}, str(tmp / f"rng_rank{d.rank}.safetensors"))
    barrier(d)
    if d.is_main:
        with_umask_modes(tmp)
        write_manifest(tmp)
        # On disk before `latest` names it and older ones are pruned: after a power cut the rename alone could
        # leave this one's files empty and the intact older ones deleted.
        fsync_tree(tmp)
        if final.exists():
            _remove(final)
        os.replace(tmp, final)
        write_text_atomic(root / "latest", name + "\n")
        prune(root, final, keep)
    barrier(d)
    return final


def prune(root: Path, newest: Path, keep: int = 2) -> None:
    """Delete what `prunable` names, and what a run killed inside a deletion left. After each save, and when a run
    resumes from `newest` (rank 0): a run killed in its last save's pruning kept a checkpoint too many, or a half-
    deleted one, for good, since a resume of a finished run saves nothing (found by review). A run killed while
    writing a checkpoint left a whole one as `.step_N.tmp`, removed only by a later save of step N, which a changed
    `save_every` or a finished run never makes (found by review); no save is under way where this runs."""
    for p in prunable(root, newest, keep):
        _remove(p)
    for p in [*root.glob(".step_*.old"), *root.glob(".step_*.tmp")]:
        shutil.rmtree(p, ignore_errors=True)


def _remove(folder: Path) -> None:
    """Rename a step folder out of `step_*` first, then delete it: a run killed inside the deletion left a half-deleted
    folder under its step's name, which a resume could take for a checkpoint."""
    hidden = folder.with_name(f".{folder.name}.old")
    shutil.rmtree(hidden, ignore_errors=True)
    os.replace(folder, hidden)
    shutil.rmtree(hidden, ignore_errors=True)


def prunable(root: Path, newest: Path, keep: int) -> list[Path]:
    """Step folders to delete once `newest` is written and named by `latest`: all but the `keep` newest up to it
    (`keep` <= 0: none). Never `newest` itself, whatever the names say: a folder with a higher step number is not
    newer (it is left from a run this one resumed before, or a damaged one it fell back from), so it goes too."""
    if keep <= 0:
        return []
    older = [p for p in step_folders(root) if step_number(p) < step_number(newest)]
    later = [p for p in step_folders(root) if step_number(p) > step_number(newest)]
    return older[: max(0, len(older) - (keep - 1))] + later


def load_trainer_state(path: Path) -> dict[str, Any]:
    return json.loads((path / "trainer_state.json").read_text())


# What a resume may change: how long the run goes, how often it evaluates and saves, how it runs (engine, memory,
# micro-batch budget), and the optimizer's hyperparameters (a diverged run resumes with a smaller lr). Every other
# setting defines what the run trains on and how; a resume that changed one would continue another run under this
# one's name (a changed questions_per_step, say, skips demonstrations: the data position is step x that count).
# What an evaluation measures (its puzzles, samples, temperature) is the run's too: the summary compares the last
# evaluation with step 0's, and a resume that changed them compared 8 puzzles with 16, or avg@4 with avg@2.
# What a run derives from train.steps at its start stays as it was (DPO's rounds: `train.Run.mode_state`).
# rollout.batch_size is the run's too: the embedded engine draws every batch from one generator, so another
# batching samples other completions from the resumed step on (it was resumable, as a memory bound).
# A task's data path may change (the shipped samples' paths move with the checkout: a re-cloned run could not
# resume); what it holds is checked by the checkpoint's data digest. The SGLang timeout is how the run waits (a run
# stopped by it resumes with a longer one). Both found by review.
RESUMABLE = ("train.steps", "train.eval_every", "train.eval_tournament", "train.progress", "train.save_every",
             "train.log_rollouts_every", "train.output_dir", "train.max_tokens_per_micro_batch",
             "train.share_prompts",
             "optim.", "rollout.backend", "rollout.release_memory", "rollout.weight_bucket_mb",
             "rollout.mem_fraction", "rollout.tp_size", "rollout.sglang_url", "rollout.server_ranks",
             "rollout.weight_group_", "model.gradient_checkpointing", "model.liger_kernels",
             "task.deepmath.verify_timeout_seconds", "task.deepmath.path", "task.poetry.path",
             "rollout.sglang_timeout_s")


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def resume_changes(saved: dict[str, Any], now: dict[str, Any],
                   defaults: dict[str, Any] | None = None) -> tuple[list[str], list[str]]:
    """(refused, allowed): the settings of `now` (a `to_dict(config)`) that differ from the run's `saved` ones, as
    'name: saved -> now'. Only the run's own task section is compared (another task's data path may move with the
    checkout), and a setting the saved config does not have (added to the project later) has its value in
    `defaults` (a `to_dict` of the default config); without `defaults`, such a setting is not compared."""
    then, current = _flat(saved), _flat(json.loads(json.dumps(now)))  # as saved: tuples are lists there
    if defaults is not None:
        then = {**_flat(json.loads(json.dumps(defaults))), **then}
    task = f"task.{current.get('task.name')}."
    refused, allowed = [], []
    for name, value in current.items():
        # every resume "changes" train.resume; the others of PER_COMMAND are this command's, not the run's
        if name not in then or then[name] == value or name.removeprefix("train.") in PER_COMMAND:
            continue
        if name.startswith("task.") and name != "task.name" and not name.startswith(task):
            continue
        if name == "model.dtype" and then[name] == "auto":  # saved before `auto` was resolved: what it was is unknown
            continue
        change = f"{name}: {then[name]!r} -> {value!r}"
        # a setting the saved run never read, refused since: dropping it changes nothing (found by review: such a
        # run could not be resumed, refused with the setting and without it)
        never_read = name.startswith("loss.") and name.removeprefix("loss.") in unread_loss_settings(
            then.get("train.mode", ""), then.get("loss.kl_coef", 0.0))
        (allowed if name.startswith(RESUMABLE) or never_read else refused).append(change)
    return refused, allowed


def optimizer_state_dict(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's full state dict (DCP's format: state and groups keyed by parameter name). Before its first
    step the state is empty and stays so: DCP's own would first take a step of zero gradients to fill it, and Adam
    would count that step, so a run that saved before anything trained took a first real update 0.74x as large as
    the same run without the save (found by review; 10 s of the save for a 135M model, too)."""
    if optimizer.state:
        return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))
    names = {id(p): name for name, p in model.named_parameters()}
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [names[id(p)] for p in g["params"]]}
              for g in optimizer.param_groups]
    return {"state": {}, "param_groups": groups}


def restore_optimizer_and_rng(path: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, d: Dist) -> None:
    """Load optimizer state (every rank reads the full state and keeps its shard) and this rank's RNG."""
    tensors = load_file(str(path / "optimizer.safetensors"))
    groups = json.loads((path / "optimizer.json").read_text())
    state = _unflatten_optimizer(tensors, groups)
    if state["state"]:  # empty: saved before the first step, and DCP's load would fill it as its save did
        set_optimizer_state_dict(model, optimizer, optim_state_dict=state, options=StateDictOptions(full_state_dict=True))
    rng_file = path / f"rng_rank{d.rank}.safetensors"
    if not rng_file.is_file():
        raise ValueError(f"{path}: no RNG state for rank {d.rank}; resume with the world size it was saved with")
    torch.set_rng_state(load_file(str(rng_file))["torch_cpu"])


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    tensors = {}
    for fqn, per_param in state["state"].items():
        for key, value in per_param.items():
            t = value.full_tensor() if hasattr(value, "full_tensor") else value
            tensors[f"{fqn}/{key}"] = torch.as_tensor(t).detach().cpu().contiguous()
    return tensors, state["param_groups"]


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], groups: list[dict[str, Any]]) -> dict[str, Any]:
    state: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        fqn, _, name = key.rpartition("/")
        state.setdefault(fqn, {})[name] = t
    return {"state": state, "param_groups": groups}
