"""Flattened buckets round-trip every dtype and odd shape bit for bit; bucketing keeps one dtype per bucket and a
bounded size; the receiver's layout (built from the JSON request alone) is the sender's."""
import random

import pytest
import torch

from raro_fast.weight_sync.broadcast import metas_from_request, update_request
from raro_fast.weight_sync.buckets import TensorMeta, flatten, iter_buckets, unflatten, with_last

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int16,
          torch.int8, torch.uint8, torch.bool, torch.complex64]
if hasattr(torch, "float8_e4m3fn"):
    DTYPES.append(torch.float8_e4m3fn)
SHAPES = [(), (1,), (0,), (7,), (3, 5), (2, 3, 5), (1, 1, 13), (4, 0, 3)]


def rand(shape, dtype, gen):
    if dtype == torch.bool:
        return torch.rand(shape, generator=gen) > 0.5
    if dtype.is_floating_point or dtype.is_complex:
        x = torch.randn(shape, generator=gen, dtype=torch.float64) * 100
        if dtype.is_complex:
            return torch.complex(x, -x).to(dtype)
        return x.to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -1000), min(info.max, 1000) + 1, shape, generator=gen, dtype=torch.int64).to(dtype)


def same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.contiguous().reshape(-1).view(torch.uint8),
                                                                     b.contiguous().reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_flatten_unflatten_round_trips_exactly(dtype):
    gen = torch.Generator().manual_seed(hash(str(dtype)) % 2**31)
    named = [(f"t{i}.{'x' * i}", rand(s, dtype, gen)) for i, s in enumerate(SHAPES)]
    # a non-contiguous tensor (transposed) and a strided slice must flatten by value, not by storage
    big = rand((6, 4), dtype, gen)
    # a column, and every other column: reshape(-1) keeps those strided (view(uint8) refused them)
    named += [("transposed", big.t()), ("strided", big[::2, 1:]), ("column", big[:, 1]), ("every_other", big[:, ::2])]
    bucket = flatten(named)
    assert bucket.flat.dtype == torch.uint8 and bucket.flat.dim() == 1
    assert bucket.nbytes == sum(t.numel() * t.element_size() for _, t in named)
    back = unflatten(bucket.flat, bucket.metas)
    assert [n for n, _ in back] == [n for n, _ in named]
    for (_, want), (_, got) in zip(named, back):
        assert same_bits(want.contiguous(), got)


def test_flatten_copies_and_never_aliases_the_source():
    src = torch.arange(10, dtype=torch.float32)
    bucket = flatten([("a", src)])
    src.add_(1)
    assert torch.equal(unflatten(bucket.flat, bucket.metas)[0][1], torch.arange(10, dtype=torch.float32))


def test_flatten_rejects_mixed_dtypes_and_empty_buckets():
    with pytest.raises(ValueError, match="one dtype per bucket"):
        flatten([("a", torch.ones(2)), ("b", torch.ones(2, dtype=torch.float16))])
    with pytest.raises(ValueError, match="at least one tensor"):
        flatten([])


def test_unflatten_rejects_metadata_that_does_not_fit():
    bucket = flatten([("a", torch.ones(4))])
    with pytest.raises(ValueError, match="does not fit"):
        unflatten(bucket.flat[:8], bucket.metas)
    # a byte range that disagrees with the byte count the metadata states (a receiver's layout out of step)
    (m,) = bucket.metas
    with pytest.raises(ValueError, match="does not fit"):
        unflatten(bucket.flat, [TensorMeta(m.name, m.shape, m.dtype, 4, 16, 16)])


def test_iter_buckets_bounds_size_keeps_order_and_one_dtype_each():
    rng = random.Random(0)
    gen = torch.Generator().manual_seed(0)
    named = []
    for i in range(60):
        dtype = rng.choice([torch.float32, torch.bfloat16, torch.int64])
        named.append((f"p{i}", rand((rng.randrange(1, 40), rng.randrange(1, 9)), dtype, gen)))
    named.append(("huge", torch.randn(600, generator=gen)))  # 2400 bytes > the bucket: a bucket of its own
    limit = 1024
    buckets = list(iter_buckets(named, limit))
    seen = []
    for b in buckets:
        assert len({m.dtype for m in b.metas}) == 1
        assert b.nbytes <= limit or len(b.metas) == 1
        seen.extend((m.name, m.dtype) for m in b.metas)
        for (name, got) in unflatten(b.flat, b.metas):
            assert same_bits(dict(named)[name], got)
    assert sorted(n for n, _ in seen) == sorted(n for n, _ in named)  # every tensor exactly once
    for dtype in (torch.float32, torch.bfloat16, torch.int64):  # arrival order kept within a dtype
        assert [n for n, d in seen if d == dtype] == [n for n, t in named if t.dtype == dtype]
    # buckets are filled: no two consecutive same-dtype buckets could have been merged
    by_dtype = {}
    for b in buckets:
        by_dtype.setdefault(b.dtype, []).append(b.nbytes)
    for sizes in by_dtype.values():
        assert all(a + b > limit for a, b in zip(sizes, sizes[1:]))


def test_iter_buckets_fills_a_bucket_to_exactly_bucket_bytes():
    """A bucket takes tensors up to and including `bucket_bytes`: tensors that fill it exactly must not be split
    over two buckets (twice the requests and broadcasts per sync)."""
    named = [("a", torch.tensor([1.5, -2.0])), ("b", torch.tensor([3.25, 4.0])), ("c", torch.tensor([-5.5, 6.0]))]
    buckets = list(iter_buckets(named, 16))  # 8 bytes each: a and b fill the first bucket exactly
    assert [[m.name for m in b.metas] for b in buckets] == [["a", "b"], ["c"]]
    assert [b.nbytes for b in buckets] == [16, 8]
    assert torch.equal(unflatten(buckets[0].flat, buckets[0].metas)[1][1], torch.tensor([3.25, 4.0]))


def test_iter_buckets_rejects_nonpositive_size():
    with pytest.raises(ValueError, match="bucket_bytes"):
        list(iter_buckets([("a", torch.ones(1))], 0))


def test_receiver_layout_from_the_request_equals_the_senders():
    gen = torch.Generator().manual_seed(3)
    bucket = flatten([("w", rand((3, 7), torch.bfloat16, gen)), ("b", rand((7,), torch.bfloat16, gen)),
                      ("s", rand((), torch.bfloat16, gen))])
    body = update_request(bucket, group_name="g", flush_cache=True, weight_version=5)
    assert body == {"names": ["w", "b", "s"], "dtypes": ["bfloat16"] * 3, "shapes": [[3, 7], [7], []],
                    "group_name": "g", "flush_cache": True, "load_format": "flattened_bucket", "weight_version": "5"}
    assert metas_from_request(body) == bucket.metas
    assert "weight_version" not in update_request(bucket, group_name="g", flush_cache=False)


def test_with_last_marks_only_the_final_item():
    assert list(with_last([])) == []
    assert list(with_last("ab")) == [("a", False), ("b", True)]
