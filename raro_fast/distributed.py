"""Process-group setup under torchrun (or a single plain process): nccl on CUDA, gloo on CPU."""
from __future__ import annotations

import datetime
import gc
import os
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """A process group exists (launched by torchrun: several processes, or one that uses FSDP2's mixed
        precision)."""
        return dist.is_available() and dist.is_initialized()


def cpu_threads(env: Mapping[str, str], cpus: int) -> int:
    """Threads for this process's CPU work. An OMP_NUM_THREADS the user set is kept (several runs side by side
    on one machine each take a share; overriding it oversubscribes the cores, 4x slower measured on 2 cores).
    torchrun sets OMP_NUM_THREADS=1 itself when it starts several ranks and the user set nothing; then the ranks
    share the cores instead."""
    local_world = int(env.get("LOCAL_WORLD_SIZE", "1"))
    given = env.get("OMP_NUM_THREADS", "")
    if given.isdigit() and int(given) > 0 and not (local_world > 1 and given == "1"):
        return int(given)
    return max(1, cpus // local_world)


def init_distributed(*, half_precision: bool = False) -> Dist:
    """This process's rank and device, and the process group under torchrun. One process gets a group where FSDP2
    gives it something, mixed precision: on CUDA, or on CPU with a `half_precision` model dtype. A float32 CPU
    process has nothing to shard, reduce or cast, and a gloo group only slows it: the default job's step took 6.3-6.8 s
    with one against 4.8-5.0 s without, with the same numbers (measured on 2 cores, runs alternated)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world_size > 1 and "RANK" not in os.environ:  # each process would train alone as rank 0 of world_size
        raise ValueError(f"WORLD_SIZE={world_size} is set but RANK is not: start the ranks with torchrun (or "
                         "`raro-fast train --nproc_per_node=N`), which sets both, or unset WORLD_SIZE")
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK={local_rank} but this node has {torch.cuda.device_count()} GPU(s): start at "
                             "most one rank per GPU (--nproc_per_node)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
        torch.set_num_threads(cpu_threads(os.environ, os.cpu_count() or 1))
    if "RANK" in os.environ and not dist.is_initialized() and (world_size > 1 or device.type == "cuda" or half_precision):
        # device_id binds NCCL to this rank's GPU up front (no guessing from the rank number).
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30),
                                device_id=device if device.type == "cuda" else None)
    return Dist(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def all_gather_objects(d: Dist, obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (a list of one without a process group)."""
    if not d.enabled:
        return [obj]
    out: list[Any] = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(d: Dist, obj: Any) -> Any:
    if not d.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def shutdown(d: Dist) -> None:
    # FSDP2 modules sit in reference cycles that hold the process group, and with it gloo's last pending work.
    # Collected here, the group goes away now; left to interpreter finalisation, gloo can abort the process after
    # all work is done (seen once in CI: rank 1 "terminate called without an active exception", SIGABRT).
    gc.collect()
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()
