"""Weight sync by broadcast: the trainer's rank 0 streams flattened buckets to engines on other GPUs or nodes.

The protocol is SGLang's server mode: for each bucket the receiver is told, as JSON, the (names, dtypes, shapes)
it will get (`POST /update_weights_from_distributed` with `load_format="flattened_bucket"`), then ONE broadcast
of the bucket's bytes from rank 0 of a dedicated group moves the data. The receiver rebuilds the same byte layout
from the names, dtypes and shapes alone. Here the same protocol also runs between CPU processes over gloo: the
receiver below loads the buckets into an embedded engine, which is how it is tested without a GPU.
"""
from __future__ import annotations

import datetime
import json
import time
from typing import Callable, Iterable

import torch
import torch.distributed as dist

from raro_fast.weight_sync.buckets import Bucket, TensorMeta, iter_buckets, unflatten, with_last


def open_weight_group(*, master_address: str, master_port: int, rank: int, world_size: int, group_name: str,
                      backend: str, timeout_s: float = 600.0):
    """A process group outside the default one (the trainer's FSDP world is separate from the engines').

    Rank 0 (the trainer) hosts the TCP store, as in SGLang's `init_custom_process_group`. When SGLang is
    installed (the server backend requires it) its own function builds the group, so the store keys match the
    server's side exactly; tests/weight_sync/test_sglang_source.py runs that handshake against SGLang's receiver.
    Without SGLang, a plain group (its store keys differ from SGLang's) serves receivers of our own: the embedded
    engine, tests.
    """
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"weight group backend must be 'gloo' or 'nccl', got {backend!r}")
    timeout = datetime.timedelta(seconds=timeout_s)
    try:
        from sglang.srt.utils import init_custom_process_group
    except ImportError:
        init_custom_process_group = None
    if init_custom_process_group is not None:
        return init_custom_process_group(backend=backend, init_method=f"tcp://{master_address}:{master_port}",
                                         world_size=world_size, rank=rank, group_name=group_name, timeout=timeout)
    store = dist.TCPStore(master_address, master_port, world_size, rank == 0, timeout=timeout)
    prefixed = dist.PrefixStore(group_name, store)
    if backend == "gloo":
        return dist.ProcessGroupGloo(prefixed, rank, world_size, timeout)
    return dist.ProcessGroupNCCL(prefixed, rank, world_size)


def _broadcast(group, tensor: torch.Tensor, answered: Callable[..., None] | None = None) -> None:
    """Broadcast from rank 0 (raw ProcessGroup API: the group is not registered with torch.distributed's default
    world). The sender passes `answered`, the wait for the receivers' answer to this bucket's request: a receiver
    that refused the request never joins, and a gloo wait would block until the group's timeout (ten minutes by
    default) and then report that instead of the refusal (found by review). So it polls, and the refusal is raised
    as soon as it comes back. An NCCL wait returns once the broadcast is queued: the refusal surfaces at the next
    wait for an answer, as before. (The broadcast stays pending, and gloo's group, which has no abort, waits it out
    when it is destroyed: the process that stops on the refusal exits only after the group's timeout.)"""
    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    work = group.broadcast([tensor], opts)
    if answered is not None and tensor.device.type == "cpu":
        while not work.is_completed():
            began = time.monotonic()
            answered(0.05)  # raises a refusal; returns (after at most 50 ms) while the request is in flight
            # one that has answered returns at once: not a busy loop on a core the broadcast needs (review)
            time.sleep(max(0.0, 0.005 - (time.monotonic() - began)))
    work.wait()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def update_request(bucket: Bucket, *, group_name: str, flush_cache: bool, weight_version: int | None = None) -> dict:
    """The JSON body of SGLang's `/update_weights_from_distributed` for one bucket."""
    body = {
        "names": [m.name for m in bucket.metas],
        "dtypes": [_dtype_name(m.dtype) for m in bucket.metas],
        "shapes": [list(m.shape) for m in bucket.metas],
        "group_name": group_name,
        "flush_cache": flush_cache,
        "load_format": "flattened_bucket",
    }
    if weight_version is not None:
        body["weight_version"] = str(weight_version)
    return body


def metas_from_request(body: dict) -> list[TensorMeta]:
    """The byte layout a receiver rebuilds from a request: the sender's, as long as both flatten in order."""
    metas, start = [], 0
    for name, dtype_name, shape in zip(body["names"], body["dtypes"], body["shapes"], strict=True):
        dtype = getattr(torch, dtype_name)
        nbytes = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
        metas.append(TensorMeta(name, torch.Size(shape), dtype, start, start + nbytes, nbytes))
        start += nbytes
    return metas


def broadcast_weights(group, named_tensors: Iterable[tuple[str, torch.Tensor]], *, group_name: str, bucket_bytes: int,
                      announce: Callable[[dict], Callable[..., None]], weight_version: int) -> int:
    """Stream `named_tensors` as buckets to every receiver in `group` (this process is rank 0).

    `announce(request)` tells the receivers what comes next and returns a `wait(timeout=None)` that blocks until they
    have finished loading that bucket (an HTTP call in flight, for a server), raising their refusal; it may be called
    again, and with a timeout it returns while they have not answered. The cache is flushed with the last bucket
    only; the version goes with it. Returns the number of bytes sent.

    One bucket is announced at a time: the next is gathered while the receivers load this one, but announced only
    once they have answered. Announced as soon as this one's broadcast was issued (found by review), two requests
    could be in flight over separate connections; an NCCL broadcast returns before the data has moved, so the
    server could take bucket k+1's request first and read bucket k's bytes under its names, with no error where
    the two buckets have the same size.
    """
    sent = 0
    pending = None
    for bucket, last in with_last(iter_buckets(named_tensors, bucket_bytes)):
        if pending is not None:
            pending()
        wait = announce(update_request(bucket, group_name=group_name, flush_cache=last,
                                       weight_version=weight_version if last else None))
        try:
            _broadcast(group, bucket.flat, answered=wait)
        except Exception:
            wait()  # a receiver that refused the request never joins the broadcast: its answer names the cause
            raise
        pending = wait
        sent += bucket.nbytes
    if pending is not None:
        pending()
    return sent


def receive_bucket(group, body: dict, device: torch.device | str = "cpu") -> list[tuple[str, torch.Tensor]]:
    """A receiver's half of one bucket: an empty buffer shaped by the request, filled by the broadcast."""
    metas = metas_from_request(body)
    flat = torch.empty(metas[-1].end_idx if metas else 0, dtype=torch.uint8, device=device)
    _broadcast(group, flat)
    return unflatten(flat, metas)


# ---------------------------------------------------------------------------------------------------------------
# A control channel over the group itself, for receivers that are not HTTP servers (our embedded engine, tests).


def send_json(group, obj) -> None:
    data = torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8)
    _broadcast(group, torch.tensor([data.numel()], dtype=torch.int64))
    _broadcast(group, data)


def recv_json(group):
    size = torch.zeros(1, dtype=torch.int64)
    _broadcast(group, size)
    data = torch.empty(int(size), dtype=torch.uint8)
    _broadcast(group, data)
    return json.loads(bytes(data.tolist()).decode())


def channel_announce(group) -> Callable[[dict], Callable[[], None]]:
    """`announce` for a receiver that reads requests from the group (see `serve_weight_updates`)."""

    def announce(body: dict):
        send_json(group, body)
        return lambda timeout=None: None

    return announce


def close_channel(group) -> None:
    send_json(group, {"stop": True})


def serve_weight_updates(group, engine, device: torch.device | str = "cpu") -> int:
    """Receiver loop: rebuild each sync's state dict from buckets and load it into `engine` when the bucket that
    flushes the cache arrives. Returns after `close_channel`; the number of syncs loaded."""
    loaded, received = 0, []
    while True:
        body = recv_json(group)
        if body.get("stop"):
            return loaded
        received.extend(receive_bucket(group, body, device))
        if body["flush_cache"]:
            engine.update_weights(received, version=int(body["weight_version"]))
            received, loaded = [], loaded + 1
