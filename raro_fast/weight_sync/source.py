"""The trainer's side of a weight sync: full (unsharded) tensors one at a time, with Hugging Face names.

Under FSDP2 every rank holds a shard; `full_tensor()` is a collective, so every rank walks the parameters in the same
order and only one full tensor exists at a time (plus the bucket being filled): memory stays bounded by the bucket
size, never the model size.
"""
from __future__ import annotations

import re
from typing import Callable, Iterator

import torch
from torch import nn

# The trainer wraps the Hugging Face model as `PolicyModel.lm`; engines want the HF names.
_WRAPPER_PREFIX = "lm."


def tied_names(model: nn.Module) -> set[str]:
    """Names an engine must not be sent: with tied embeddings (Qwen2 small models, some Llamas) `lm_head.weight`
    IS `embed_tokens.weight`; SGLang's loaders skip it, and sending it would double the embedding traffic."""
    config = getattr(getattr(model, "lm", model), "config", None)
    return {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()


def kept_in_fp32(model: nn.Module, dtype: torch.dtype | None) -> Callable[[str], bool]:
    """Whether a parameter name is one transformers keeps in fp32 when loading the model in `dtype`
    (`_keep_in_fp32_modules_strict`, and `_keep_in_fp32_modules` under fp16: MoE routers such as DeepSeek-V3's
    `gate.weight`), matched as transformers matches them. Cast to bf16, their values were rounded on the way to an
    engine that holds them in fp32 (found by review); no Qwen2 or Llama lists any."""
    hf = getattr(model, "lm", model)
    keep = list(getattr(hf, "_keep_in_fp32_modules_strict", None) or [])
    if dtype == torch.float16:
        keep += list(getattr(hf, "_keep_in_fp32_modules", None) or [])
    if not keep:
        return lambda name: False
    pattern = re.compile("|".join(map(re.escape, keep)))
    return lambda name: pattern.search(name) is not None


def hf_named_tensors(model: nn.Module, *, dtype: torch.dtype | None = None, skip_tied: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, full tensor) for every parameter and persistent buffer, tied aliases left out unless
    `skip_tied=False`. Parameters are cast to `dtype` (the engine's) unless transformers keeps them in fp32
    (`kept_in_fp32`); buffers keep their own dtype, as `from_pretrained(dtype=...)` and `engine_copy` keep them (an
    fp32 router bias such as LFM2-MoE's `expert_bias`, sent in bf16, was rounded in the engine at every sync: found
    by review). A generator: each rank must consume it to the end (every step is a collective)."""
    skip = tied_names(model) if skip_tied else set()
    fp32 = kept_in_fp32(model, dtype)
    buffers = {name for name, _ in model.named_buffers()}
    for name, t in model.state_dict().items():
        is_buffer = name in buffers
        name = name.removeprefix(_WRAPPER_PREFIX)
        if hasattr(t, "full_tensor"):
            t = t.full_tensor()
        if name in skip:
            continue
        t = t.detach()
        keep = dtype is None or not t.is_floating_point() or is_buffer or fp32(name)
        yield name, (t if keep else t.to(dtype))


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """All unsharded tensors at once with HF names, tied aliases included (for saving; collective under FSDP2)."""
    return dict(hf_named_tensors(model, skip_tied=False))
