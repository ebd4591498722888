"""Shared plumbing of the LM-head ops: backend choice, input checks, the per-row statistics they exchange.

Two backends compute the same function:
- "triton": cuBLAS for the matrix products (logits in fp32 slices, the two gradient products) and Triton
  kernels for everything per row (softmax statistics, d(logits)); see `_triton_lm_head`. Used for CUDA
  tensors; for CPU tensors only when the process runs Triton's interpreter (`TRITON_INTERPRET=1` set before the
  Triton kernels are decorated, i.e. before `raro_kernels._triton_lm_head` is first imported, which happens
  lazily on the first Triton call). The tests use that to run every kernel on a machine without a GPU.
- "torch": a chunked PyTorch path with the same semantics and the same memory bound. Used for CPU tensors.
"""
from __future__ import annotations

import math
import os
import sys
from typing import NamedTuple

import torch

BACKENDS = ("triton", "torch")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Tests set this to fill every scratch and output buffer with NaN before a kernel writes it, so a value a
# kernel forgot to write cannot pass for a correct one left over from an earlier allocation.
POISON_ALLOCATIONS = False

try:  # triton is a Linux-only dependency; the torch path must keep working without it.
    import triton  # noqa: F401

    HAVE_TRITON, TRITON_IMPORT_ERROR = True, None
except ImportError as e:  # pragma: no cover - depends on the platform
    # e.g. no triton wheel for the platform, or (under TRITON_INTERPRET=1) no numpy, which the interpreter needs
    HAVE_TRITON, TRITON_IMPORT_ERROR = False, f"{type(e).__name__}: {e}"


def triton_interpret() -> bool:
    """Whether the Triton kernels run in Triton's interpreter. Triton reads TRITON_INTERPRET when a kernel is
    decorated, i.e. when `raro_kernels._triton_lm_head` is first imported (lazily, on first Triton use): once
    that module exists its reading is final."""
    module = sys.modules.get("raro_kernels._triton_lm_head")
    if module is not None:
        return bool(module.TRITON_INTERPRET)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def alloc(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.empty, or NaN-filled under POISON_ALLOCATIONS."""
    if POISON_ALLOCATIONS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """The backend that will run for tensors on `device`; `backend` None means the default for the device."""
    if backend is None:
        return "triton" if device.type == "cuda" and HAVE_TRITON else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be None, 'triton' or 'torch', got {backend!r}")
    if backend == "triton":
        if not HAVE_TRITON:
            raise ValueError("backend='triton' but triton is not installed")
        if device.type != "cuda" and not triton_interpret():
            raise ValueError(
                "backend='triton' with CPU tensors needs TRITON_INTERPRET=1 in the environment before "
                "the Triton kernels are first used"
            )
    return backend


class RowStats(NamedTuple):
    """Per-token statistics of softmax(z), z = hidden @ weight.T / temperature (one per row), all fp32 [N].

    lse: logsumexp(z); target_logit: z[target] (0 where the target is ignored); entropy: -sum p log p, or None.
    """

    lse: torch.Tensor
    target_logit: torch.Tensor
    entropy: torch.Tensor | None


def check_lm_head_inputs(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float | torch.Tensor
) -> None:
    """ValueError naming the argument at fault; shapes: hidden [..., H], weight [V, H], targets [...], temperature
    a number or a tensor shaped like targets (one temperature per token)."""
    if hidden.dim() < 2:
        raise ValueError(f"hidden must be [..., H] with at least 2 dims, got shape {tuple(hidden.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be [V, H], got shape {tuple(weight.shape)}")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden size mismatch: hidden has H={hidden.shape[-1]}, weight [V, H] has H={weight.shape[1]}"
        )
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"targets shape {tuple(targets.shape)} must equal hidden's leading dims {tuple(hidden.shape[:-1])}"
        )
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets must be int64 or int32, got {targets.dtype}")
    if hidden.dtype not in FLOAT_DTYPES:
        raise ValueError(f"hidden dtype must be one of fp32/bf16/fp16, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight dtype {weight.dtype} must equal hidden dtype {hidden.dtype}")
    if not (hidden.device == weight.device == targets.device):
        raise ValueError(
            f"hidden ({hidden.device}), weight ({weight.device}) and targets ({targets.device}) must share a device"
        )
    if weight.shape[0] == 0 or weight.shape[1] == 0:
        raise ValueError(f"weight must have V > 0 and H > 0, got shape {tuple(weight.shape)}")
    if isinstance(temperature, torch.Tensor):
        _check_temperature_tensor(temperature, targets)
    elif not 0 < temperature < math.inf:  # inf would give every token -log V, silently (compared: a traced SymFloat)
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")


def _check_temperature_tensor(temperature: torch.Tensor, targets: torch.Tensor) -> None:
    if tuple(temperature.shape) != tuple(targets.shape):
        raise ValueError(f"temperature, a tensor, must be shaped like targets {tuple(targets.shape)} (one per token), "
                         f"got shape {tuple(temperature.shape)}")
    if not temperature.is_floating_point():
        raise ValueError(f"temperature, a tensor, must be floating point, got {temperature.dtype}")
    if temperature.device != targets.device:
        raise ValueError(f"temperature ({temperature.device}) must be on the targets' device ({targets.device})")
    # Like the targets' range check: a host sync, so CPU tensors only (on CUDA a temperature <= 0 gives inf/NaN).
    if temperature.device.type == "cpu" and temperature.numel() and not torch.compiler.is_compiling():
        bad = ~(temperature > 0) | ~torch.isfinite(temperature)
        if bool(bad.any()):
            first = int(bad.reshape(-1).nonzero()[0, 0])
            raise ValueError(f"temperature must be finite and > 0 at every token, got "
                             f"{float(temperature.reshape(-1)[first])} at flat index {first}")


def inverse_temperatures(temperature: float | torch.Tensor, n_rows: int, device: torch.device) -> torch.Tensor:
    """1 / temperature per row, fp32 [N] and contiguous, as every kernel reads it. The reciprocal is taken in
    float64 and rounded once, so a float64 tensor of T gives bit for bit what the number T gives (a float32 one
    holds T rounded to float32)."""
    if isinstance(temperature, torch.Tensor):
        return temperature.reshape(-1).to(torch.float64).reciprocal().to(torch.float32).contiguous()
    return torch.full((n_rows,), 1.0 / temperature, dtype=torch.float32, device=device)


def check_targets_in_range(targets_N: torch.Tensor, vocab: int, ignore_index: int,
                           shape: torch.Size | None = None) -> None:
    """ValueError for a target outside [0, V) that is not ignore_index, at its index in the caller's `shape` (the
    flat index named a position a [B, L] tensor does not have). Needs a host sync, so it runs for CPU tensors only;
    on CUDA such a target yields a NaN log-prob instead (documented in the public functions)."""
    if targets_N.device.type != "cpu" or targets_N.numel() == 0:
        return
    bad = (targets_N != ignore_index) & ((targets_N < 0) | (targets_N >= vocab))
    if bool(bad.any()):
        first = int(bad.nonzero()[0, 0])
        where = [first] if shape is None or len(shape) < 2 else [int(i) for i in torch.unravel_index(
            torch.tensor(first), tuple(shape))]
        raise ValueError(f"targets[{', '.join(map(str, where))}] = {int(targets_N[first])} is outside [0, {vocab}) "
                         f"and is not ignore_index={ignore_index}")


def finish_logprobs(
    stats: RowStats, targets_N: torch.Tensor, vocab: int, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(target) = z[target] - lse, and the entropy; both 0 at ignored positions, NaN where the target is
    out of range (no kernel column matched it, so z[target] would silently read as 0)."""
    ignored_N = targets_N == ignore_index
    out_of_range_N = ~ignored_N & ((targets_N < 0) | (targets_N >= vocab))
    zero = torch.zeros((), dtype=torch.float32, device=stats.lse.device)
    logprobs_N = torch.where(ignored_N, zero, stats.target_logit - stats.lse)
    logprobs_N = torch.where(out_of_range_N, torch.full_like(zero, float("nan")), logprobs_N)
    entropy_N = None if stats.entropy is None else torch.where(ignored_N, zero, stats.entropy)
    return logprobs_N, entropy_N


def round_up(x: int, multiple: int) -> int:
    return (x + multiple - 1) // multiple * multiple
