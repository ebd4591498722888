"""Parallelism applied from outside the model: FSDP2 per decoder layer.

The model code (transformers) never sees torch.distributed; this one function wraps it.
"""
from __future__ import annotations

import torch
from torch import nn

from raro_fast.distributed import Dist


def parallelize(root: nn.Module, layers: list[nn.Module], d: Dist, *, compute_dtype: torch.dtype) -> nn.Module:
    """Shard `root` with FSDP2 over all ranks: one unit per decoder layer, the rest (embeddings, final norm,
    LM head) in the root unit. Parameters are kept in fp32 (the optimizer's master copy); with a bf16
    `compute_dtype` they are cast for forward/backward and gradients reduce in fp32.
    Without a process group (a plain `python -m`) the module is returned as it is. Activation checkpointing is
    transformers' own (`--model.gradient_checkpointing`, enabled in train.py before this is called).
    """
    if not d.enabled:
        return root
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for layer in layers:
        fully_shard(layer, mp_policy=mp)
    # The root's inputs stay as given: FSDP2 would cast every float tensor in them to bf16, the packed batch's
    # per-token temperatures too (0.3 -> 0.30078: critic log-probs 0.47 nats off in a test). The decoder layers
    # still cast what reaches them; the embeddings' output is in the compute dtype anyway.
    fully_shard(root, mp_policy=MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32,
                                                     cast_forward_inputs=False))
    return root

