"""Checkpoints that resume exactly: the model in Hugging Face format (safetensors) plus the trainer state.

Layout of one checkpoint, `<output_dir>/checkpoints/step_000010/`:
  model/                      HF model + tokenizer (loadable with AutoModelForCausalLM)
  optimizer.safetensors       every optimizer tensor, keyed "<param fqn>/<state name>"
  optimizer.json              param groups (hyper-parameters and parameter order)
  rng_rank<r>.safetensors     each rank's torch RNG state
  trainer_state.json          step, data position, replay buffer, anything else the loop needs
A checkpoint is written in a hidden temporary folder and renamed into place; `latest` (a one-line file, itself
replaced atomically) names the newest complete one. No pickles anywhere.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from raro_fast.distributed import Dist, barrier
from raro_fast.model.hf import save_pretrained_atomic
from raro_fast.weight_sync.source import full_state_dict


def checkpoint_root(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "checkpoints"


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    pointer = checkpoint_root(output_dir) / "latest"
    if not pointer.is_file():
        return None
    path = checkpoint_root(output_dir) / pointer.read_text().strip()
    if not (path / "trainer_state.json").is_file():
        raise ValueError(f"{pointer}: names {path.name}, which is not a complete checkpoint")
    return path


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


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
    optim_state = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))
    if d.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        cpu_weights = {k: v.cpu() for k, v in weights.items()}
        save_pretrained_atomic(hf_model, tokenizer, tmp / "model", state_dict=cpu_weights)
        tensors, groups = _flatten_optimizer(optim_state)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "optimizer.json").write_text(json.dumps(groups))
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state))
    barrier(d)
    save_file({"torch_cpu": torch.get_rng_state()}, str(tmp / f"rng_rank{d.rank}.safetensors"))
    barrier(d)
    if d.is_main:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _atomic_write_text(root / "latest", name + "\n")
        old = sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep] if keep > 0 else []
        for p in old:
            shutil.rmtree(p, ignore_errors=True)
    barrier(d)
    return final


def load_trainer_state(path: Path) -> dict[str, Any]:
    return json.loads((path / "trainer_state.json").read_text())


def restore_optimizer_and_rng(path: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, d: Dist) -> None:
    """Load optimizer state (every rank reads the full state and keeps its shard) and this rank's RNG."""
    tensors = load_file(str(path / "optimizer.safetensors"))
    groups = json.loads((path / "optimizer.json").read_text())
    state = _unflatten_optimizer(tensors, groups)
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
