"""Flattened weight buckets: many tensors in one contiguous byte buffer, and back.

A bucket holds tensors of ONE dtype, laid out back to back as raw bytes (each tensor `flatten().view(uint8)`),
with per-tensor metadata (name, shape, dtype, byte range). This is the byte layout of SGLang's
`FlattenedTensorBucket` (`load_format="flattened_bucket"`), so a bucket goes to an engine in one call (CUDA IPC)
or one broadcast (NCCL/gloo) instead of one call per tensor — the known slow path.

Buckets are filled in the order tensors arrive, up to `bucket_bytes`; a tensor bigger than `bucket_bytes` gets a
bucket of its own (never split: the receiver loads whole tensors). One dtype per bucket keeps the receiver free of
mixed-dtype views and matches SGLang versions that predate mixed-dtype buckets.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

import torch

DEFAULT_BUCKET_BYTES = 512 * 2**20


@dataclass(frozen=True)
class TensorMeta:
    """Where one tensor lives in a bucket's byte buffer. Field names are SGLang's FlattenedTensorMetadata's."""

    name: str
    shape: torch.Size
    dtype: torch.dtype
    start_idx: int  # byte offset
    end_idx: int
    numel: int  # bytes (SGLang counts the uint8 view's elements)


@dataclass
class Bucket:
    flat: torch.Tensor  # 1-D uint8
    metas: list[TensorMeta]

    @property
    def dtype(self) -> torch.dtype:
        return self.metas[0].dtype

    @property
    def nbytes(self) -> int:
        return self.flat.numel()


def flatten(named_tensors: list[tuple[str, torch.Tensor]]) -> Bucket:
    """One new contiguous uint8 buffer holding `named_tensors` (all of one dtype) back to back.

    The buffer is always freshly allocated: a buffer handed to an engine is never written again (SGLang answers
    before its device has finished reading, so reuse would race).
    """
    if not named_tensors:
        raise ValueError("flatten: a bucket needs at least one tensor")
    dtypes = {t.dtype for _, t in named_tensors}
    if len(dtypes) != 1:
        raise ValueError(f"flatten: one dtype per bucket, got {sorted(map(str, dtypes))}")
    metas, start = [], 0
    for name, t in named_tensors:
        nbytes = t.numel() * t.element_size()
        metas.append(TensorMeta(name, torch.Size(t.shape), t.dtype, start, start + nbytes, nbytes))
        start += nbytes
    device = named_tensors[0][1].device
    flat = torch.empty(start, dtype=torch.uint8, device=device)
    for (_, t), m in zip(named_tensors, metas):
        # contiguous() copies only non-contiguous tensors (reshape(-1) of a strided column such as base[:, 1] is a
        # strided view, which view(uint8) refuses); view(uint8) reinterprets bytes, so any dtype round-trips
        flat[m.start_idx : m.end_idx].copy_(t.detach().contiguous().view(-1).view(torch.uint8))
    return Bucket(flat, metas)


def unflatten(flat: torch.Tensor, metas: Iterable[TensorMeta]) -> list[tuple[str, torch.Tensor]]:
    """Views into `flat` with each tensor's name, dtype and shape (no copy)."""
    out = []
    for m in metas:
        if m.end_idx > flat.numel() or m.end_idx - m.start_idx != m.numel:
            raise ValueError(f"unflatten: metadata of {m.name!r} ({m.start_idx}:{m.end_idx}) does not fit a {flat.numel()}-byte bucket")
        out.append((m.name, flat[m.start_idx : m.end_idx].view(m.dtype).reshape(m.shape)))
    return out


def iter_buckets(named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> Iterator[Bucket]:
    """Stream tensors into buckets of at most `bucket_bytes` per dtype (a larger tensor alone), so at most one
    bucket per dtype is pending: memory stays bounded by the bucket size, not the model size."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}")
    pending: dict[torch.dtype, tuple[list[tuple[str, torch.Tensor]], int]] = {}
    for name, t in named_tensors:
        items, size = pending.get(t.dtype, ([], 0))
        nbytes = t.numel() * t.element_size()
        if items and size + nbytes > bucket_bytes:
            yield flatten(items)
            items, size = [], 0
        pending[t.dtype] = (items + [(name, t)], size + nbytes)
    for items, _ in pending.values():
        if items:
            yield flatten(items)


def with_last(items: Iterable) -> Iterator[tuple[object, bool]]:
    """(item, is_last) pairs: the last bucket of a sync is the one that flushes the engine's cache."""
    it = iter(items)
    try:
        prev = next(it)
    except StopIteration:
        return
    for item in it:
        yield prev, False
        prev = item
    yield prev, True
