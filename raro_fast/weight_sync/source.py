"""The trainer's side of a weight sync: full (unsharded) tensors one at a time, with Hugging Face names.

Under FSDP2 every rank holds a shard; `full_tensor()` is a collective, so every rank walks the parameters in the same
order and only one full tensor exists at a time (plus the bucket being filled): memory stays bounded by the bucket
size, never the model size.
"""
from __future__ import annotations

import re
import weakref
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


def checkpoint_renamer(model: nn.Module) -> Callable[[str, torch.Tensor], list[tuple[str, torch.Tensor]]] | None:
    """How one tensor of `model`'s state dict is written in its checkpoint, or None where the two are the same.

    transformers 5 holds some weights otherwise than its checkpoints do: an MoE's experts fused into one tensor
    (`mlp.experts.gate_up_proj`; the checkpoint's `mlp.experts.0.gate_proj.weight`, ...). SGLang loads checkpoint
    names, and its loaders skip a name they do not know, silently: an MoE's experts were never synced (found by
    review). `save_pretrained` reverts the whole state dict at once; a sync streams it one tensor at a time, so the
    model's state dict is first reverted both ways on the meta device, and a model whose checkpoint needs several
    of its tensors at once is refused."""
    hf = getattr(model, "lm", model)
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers 4: the state dict is the checkpoint
        return None
    if hf not in _RENAMERS:  # the check costs seconds on a large MoE; a sync each step need not repeat it
        _RENAMERS[hf] = _checked_renamer(hf, revert_weight_conversion)
    return _RENAMERS[hf]


_RENAMERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _checked_renamer(hf: nn.Module, revert_weight_conversion):
    probe = {name: torch.empty(t.shape, dtype=t.dtype, device="meta") for name, t in hf.state_dict().items()}
    whole = revert_weight_conversion(hf, dict(probe))
    if set(whole) == set(probe):
        return None
    each = {}
    for name, t in probe.items():
        each.update(revert_weight_conversion(hf, {name: t}))
    if {n: t.shape for n, t in each.items()} != {n: t.shape for n, t in whole.items()}:
        raise ValueError(f"{type(hf).__name__}: its checkpoint holds some weights only as several of its tensors "
                         "together, so it cannot be synced to SGLang one tensor at a time; use the embedded engine")
    model = weakref.ref(hf)  # not hf itself: the cache's value would keep its key, the model, alive
    return lambda name, t: list(revert_weight_conversion(model(), {name: t}).items())


def hf_named_tensors(model: nn.Module, *, dtype: torch.dtype | None = None, skip_tied: bool = True,
                     checkpoint_names: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, full tensor) for every parameter and persistent buffer, tied aliases left out unless
    `skip_tied=False`. Parameters are cast to `dtype` (the engine's) unless transformers keeps them in fp32
    (`kept_in_fp32`); buffers keep their own dtype, as `from_pretrained(dtype=...)` and `engine_copy` keep them (an
    fp32 router bias such as LFM2-MoE's `expert_bias`, sent in bf16, was rounded in the engine at every sync: found
    by review). With `checkpoint_names`, named and shaped as the model's checkpoint holds them (what SGLang loads;
    see `checkpoint_renamer`). A generator: each rank must consume it to the end (every step is a collective)."""
    skip = tied_names(model) if skip_tied else set()
    rename = checkpoint_renamer(model) if checkpoint_names else None
    fp32 = kept_in_fp32(model, dtype)
    buffers = {name for name, _ in model.named_buffers(remove_duplicate=False)}
    for name, t in model.state_dict().items():
        is_buffer = name in buffers
        name = name.removeprefix(_WRAPPER_PREFIX)
        if hasattr(t, "full_tensor"):
            t = t.full_tensor()
        if name in skip:
            continue
        t = t.detach()
        keep = dtype is None or not t.is_floating_point() or is_buffer or fp32(name)
        t = t if keep else t.to(dtype)
        if rename is None:
            yield name, t
        else:
            yield from rename(name, t)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """All unsharded tensors at once with HF names, tied aliases included (for saving; collective under FSDP2)."""
    return dict(hf_named_tensors(model, skip_tied=False))
