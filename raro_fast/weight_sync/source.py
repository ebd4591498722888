"""The trainer's side of a weight sync: full (unsharded) tensors one at a time, with Hugging Face names.

Under FSDP2 every rank holds a shard; `full_tensor()` is a collective, so every rank walks the parameters in the same
order and only one full tensor exists at a time (plus the bucket being filled): memory stays bounded by the bucket
size, never the model size.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

# The trainer wraps the Hugging Face model as `PolicyModel.lm`; engines want the HF names.
_WRAPPER_PREFIX = "lm."


def tied_names(model: nn.Module) -> set[str]:
    """Names an engine must not be sent: with tied embeddings (Qwen2 small models, some Llamas) `lm_head.weight`
    IS `embed_tokens.weight`; SGLang's loaders skip it, and sending it would double the embedding traffic."""
    config = getattr(getattr(model, "lm", model), "config", None)
    return {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()


def hf_named_tensors(model: nn.Module, *, dtype: torch.dtype | None = None, skip_tied: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, full tensor) for every parameter and persistent buffer, cast to `dtype` (the engine's), tied
    aliases left out unless `skip_tied=False`. A generator: each rank must consume it to the end (every step is a
    collective)."""
    skip = tied_names(model) if skip_tied else set()
    for name, t in model.state_dict().items():
        name = name.removeprefix(_WRAPPER_PREFIX)
        if hasattr(t, "full_tensor"):
            t = t.full_tensor()
        if name in skip:
            continue
        t = t.detach()
        yield name, (t if dtype is None or not t.is_floating_point() else t.to(dtype))


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """All unsharded tensors at once with HF names, tied aliases included (for saving; collective under FSDP2)."""
    return dict(hf_named_tensors(model, skip_tied=False))
