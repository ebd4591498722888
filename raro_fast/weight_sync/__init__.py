"""Weight sync from the trainer to a rollout engine: FSDP2 shards gathered one tensor at a time (source.py),
packed into flattened per-dtype buckets (buckets.py), handed over in-process (CUDA IPC, rollout/sglang.py) or by
broadcast to engines elsewhere (broadcast.py)."""
from __future__ import annotations

from raro_fast.weight_sync.buckets import DEFAULT_BUCKET_BYTES, Bucket, TensorMeta, flatten, iter_buckets, unflatten
from raro_fast.weight_sync.source import full_state_dict, hf_named_tensors

__all__ = ["DEFAULT_BUCKET_BYTES", "Bucket", "TensorMeta", "flatten", "iter_buckets", "unflatten",
           "full_state_dict", "hf_named_tensors", "push_weights"]


def push_weights(engine, model, *, version: int, dtype, released: tuple[str, ...] = ()) -> None:
    """One sync, staged so memory never peaks: engine weights back (if they were released), new weights in, then
    the KV cache back (if it was released)."""
    if "weights" in released:
        engine.resume_memory(("weights",))
    names = getattr(engine, "takes_checkpoint_names", False)  # SGLang's loaders: see source.checkpoint_renamer
    engine.update_weights(hf_named_tensors(model, dtype=dtype, checkpoint_names=names), version=version)
    if "kv_cache" in released:
        engine.resume_memory(("kv_cache",))
