"""Per-token log-probabilities (and entropy) straight from hidden states: the LM head without its logits.

Layering: kernels (`_triton_lm_head`, `_chunked_torch`) -> host stats/grads functions -> the custom ops
`raro_kernels::linear_logprobs` and its backward (autograd registered, fake implementations for tracing) ->
`linear_logprobs` (public).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from raro_kernels import _chunked_torch
from raro_kernels._common import (
    RowStats,
    check_lm_head_inputs,
    check_targets_in_range,
    finish_logprobs,
    inverse_temperatures,
    resolve_backend,
)

# Vocabulary columns per backward slice (triton) / per tile (torch): dz of one slice is N x 4096 x 2 bytes.
DEFAULT_CHUNK_COLS = 4096


class LinearLogprobs(NamedTuple):
    """logprobs: fp32 [...] log p(target); entropy: fp32 [...] entropy of the distribution, or None."""

    logprobs: torch.Tensor
    entropy: torch.Tensor | None


def lm_head_stats(
    backend: str,
    hidden_NH: torch.Tensor,
    weight_VH: torch.Tensor,
    targets_N: torch.Tensor,
    *,
    inv_temp_N: torch.Tensor,
    with_entropy: bool,
    chunk_cols: int = DEFAULT_CHUNK_COLS,
) -> RowStats:
    if backend == "triton":
        from raro_kernels._triton_lm_head import lm_head_stats_triton

        return lm_head_stats_triton(hidden_NH, weight_VH, targets_N, inv_temp_N=inv_temp_N,
                                    with_entropy=with_entropy)
    return _chunked_torch.lm_head_stats_torch(
        hidden_NH, weight_VH, targets_N, inv_temp_N=inv_temp_N, with_entropy=with_entropy, cols_per_chunk=chunk_cols
    )


def lm_head_grads(
    backend: str,
    hidden_NH: torch.Tensor,
    weight_VH: torch.Tensor,
    targets_N: torch.Tensor,
    lse_N: torch.Tensor,
    entropy_N: torch.Tensor | None,
    grad_logprob_N: torch.Tensor,
    grad_entropy_N: torch.Tensor | None,
    *,
    inv_temp_N: torch.Tensor,
    need_hidden: bool,
    need_weight: bool,
    chunk_cols: int = DEFAULT_CHUNK_COLS,
    grad_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients w.r.t. hidden and weight, in `grad_dtype` (default: the input dtype; fp32 skips the final
    rounding, for a caller that still has to scale them)."""
    args = (hidden_NH, weight_VH, targets_N, lse_N, entropy_N, grad_logprob_N, grad_entropy_N)
    kwargs = dict(inv_temp_N=inv_temp_N, need_hidden=need_hidden, need_weight=need_weight,
                  cols_per_chunk=chunk_cols, grad_dtype=grad_dtype)
    if backend == "triton":
        from raro_kernels._triton_lm_head import lm_head_grads_triton

        return lm_head_grads_triton(*args, **kwargs)
    return _chunked_torch.lm_head_grads_torch(*args, **kwargs)


# The public function is a torch.library custom op (forward and backward each one op, with fake implementations
# for tracing and the backward registered as the forward's autograd), so torch.compile(fullgraph=True) traces it
# as one node instead of stopping at the host-side code inside. Optional outputs are empty tensors: an op
# returns tensors only.


@torch.library.custom_op("raro_kernels::linear_logprobs", mutates_args=())
def _forward_op(hidden_NH: torch.Tensor, weight_VH: torch.Tensor, targets_N: torch.Tensor, inv_temp_N: torch.Tensor,
                with_entropy: bool, ignore_index: int, backend: str, chunk_cols: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logprobs [N], entropy [N] (0 where ignored) or [0], and for the backward: logsumexp [N], raw entropy [N]
    or [0]). inv_temp_N: fp32 [N], 1 / each row's temperature."""
    stats = lm_head_stats(
        backend, hidden_NH, weight_VH, targets_N, inv_temp_N=inv_temp_N, with_entropy=with_entropy,
        chunk_cols=chunk_cols,
    )
    logprobs_N, entropy_N = finish_logprobs(stats, targets_N, weight_VH.shape[0], ignore_index)
    if entropy_N is None:
        return logprobs_N, logprobs_N.new_empty(0), stats.lse, logprobs_N.new_empty(0)
    return logprobs_N, entropy_N, stats.lse, stats.entropy.clone()  # clone: outputs may not alias each other


@_forward_op.register_fake
def _(hidden_NH, weight_VH, targets_N, inv_temp_N, with_entropy, ignore_index, backend, chunk_cols):
    row = hidden_NH.new_empty((hidden_NH.shape[0],), dtype=torch.float32)
    maybe = (lambda: torch.empty_like(row)) if with_entropy else (lambda: row.new_empty(0))
    return torch.empty_like(row), maybe(), torch.empty_like(row), maybe()


@torch.library.custom_op("raro_kernels::linear_logprobs_backward", mutates_args=())
def _backward_op(hidden_NH: torch.Tensor, weight_VH: torch.Tensor, targets_N: torch.Tensor, lse_N: torch.Tensor,
                 entropy_N: torch.Tensor, grad_logprob_N: torch.Tensor, grad_entropy_N: torch.Tensor,
                 inv_temp_N: torch.Tensor, need_hidden: bool, need_weight: bool, backend: str, chunk_cols: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad hidden [N, H] or [0], grad weight [V, H] or [0]); an empty entropy or its gradient means none."""
    grad_hidden, grad_weight = lm_head_grads(
        backend, hidden_NH, weight_VH, targets_N, lse_N, entropy_N if entropy_N.numel() else None, grad_logprob_N,
        grad_entropy_N if grad_entropy_N.numel() else None, inv_temp_N=inv_temp_N, need_hidden=need_hidden,
        need_weight=need_weight, chunk_cols=chunk_cols,
    )
    return (hidden_NH.new_empty(0) if grad_hidden is None else grad_hidden,
            weight_VH.new_empty(0) if grad_weight is None else grad_weight)


@_backward_op.register_fake
def _(hidden_NH, weight_VH, targets_N, lse_N, entropy_N, grad_logprob_N, grad_entropy_N, inv_temp_N, need_hidden,
      need_weight, backend, chunk_cols):
    # new_empty, not empty_like: the real op returns fresh contiguous gradients whatever the inputs' strides
    # (a transposed weight, e.g. W.t() of a weight stored [H, V]), and inductor asserts the fake's strides.
    return (hidden_NH.new_empty(hidden_NH.shape) if need_hidden else hidden_NH.new_empty(0),
            weight_VH.new_empty(weight_VH.shape) if need_weight else weight_VH.new_empty(0))


def _setup_context(ctx, inputs, output) -> None:
    hidden_NH, weight_VH, targets_N, inv_temp_N, _with_entropy, ignore_index, backend, chunk_cols = inputs
    _logprobs, _entropy, lse_N, raw_entropy_N = output
    ctx.save_for_backward(hidden_NH, weight_VH, targets_N, inv_temp_N, lse_N, raw_entropy_N)
    ctx.cfg = (ignore_index, backend, chunk_cols)


def _backward(ctx, grad_logprobs_N, grad_entropy_N, _grad_lse, _grad_raw_entropy):
    hidden_NH, weight_VH, targets_N, inv_temp_N, lse_N, entropy_N = ctx.saved_tensors
    ignore_index, backend, chunk_cols = ctx.cfg
    need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    none = (None,) * 6
    if not (need_hidden or need_weight):
        return (None, None, *none)
    keep_N = targets_N != ignore_index
    zero = torch.zeros((), dtype=torch.float32, device=lse_N.device)
    g_lp_N = torch.zeros_like(lse_N) if grad_logprobs_N is None else torch.where(keep_N, grad_logprobs_N.float(), zero)
    g_ent_N = lse_N.new_empty(0)
    if entropy_N.numel() and grad_entropy_N is not None and grad_entropy_N.numel():
        g_ent_N = torch.where(keep_N, grad_entropy_N.float(), zero)
    grad_hidden, grad_weight = _backward_op(hidden_NH, weight_VH, targets_N, lse_N, entropy_N, g_lp_N, g_ent_N,
                                            inv_temp_N, need_hidden, need_weight, backend, chunk_cols)
    return (grad_hidden if need_hidden else None, grad_weight if need_weight else None, *none)


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float | torch.Tensor = 1.0,
    return_entropy: bool = False,
    ignore_index: int = -100,
    backend: str | None = None,
    chunk_cols: int | None = None,
) -> LinearLogprobs:
    """log softmax(hidden @ weight.T / temperature)[target] and the entropy of that softmax, per token,
    without ever holding the [N, V] logits.

    temperature: one number, or a float tensor shaped like targets giving each token its own (a batch that
    mixes rollouts sampled at different temperatures, e.g. RARO's policy and critic). Either way the logits are
    divided in fp32, after the fp32-accumulated product: scaling 16-bit hidden states instead would round them
    again. A tensor must be > 0 everywhere (checked for CPU tensors; on CUDA a bad one gives inf/NaN). The
    temperature gets no gradient.

    hidden [..., H] (any leading dims, any strides), weight [V, H] (the LM head or tied embedding), same dtype
    (fp32, bf16 or fp16); targets int [...] in [0, V) or `ignore_index`. Any N, H, V. Returns
    LinearLogprobs(logprobs fp32 [...], entropy fp32 [...] or None unless `return_entropy`). Ignored positions
    give 0 for both and no gradient (but a non-finite hidden state there still reaches the weight's gradient, as in
    torch's own cross-entropy). A target outside [0, V) raises ValueError for CPU tensors and gives NaN on
    CUDA (checking would need a host sync). Differentiable w.r.t. hidden and weight through both outputs; the
    weight gradient is a fresh tensor that autograd adds to any other use of the weight (tied embeddings).
    Logits are computed with fp32 accumulation; the log-prob's target logit and normaliser come from the same
    fp32 values; entropy costs nothing unless asked.

    Memory (beyond inputs, outputs and gradients), triton backend: one fp32 logits slice of N x chunk_cols
    (default 4096 columns: 2.7% of the fp32 logits at V = 151,936; the backward writes dz over it) plus, in
    backward, an fp32 [N, H] accumulator for grad hidden; grad weight is written once per slice; per-row
    statistics are O(N). Measured on an H100: 3.7% (H = 1536) and 5.1% (H = 3584) of the fp32 logits above
    the gradients themselves (benchmarks/RESULTS.md). Torch backend: fp32 tiles of 1024 x chunk_cols plus fp32
    accumulators for the gradients. FLOPs: 2NHV forward, 6NHV backward (the logits are recomputed).
    The logits products run on cuBLAS with fp32 output; Triton kernels reduce each row (see _triton_lm_head).

    backend: None picks "triton" for CUDA tensors and "torch" (chunked PyTorch, same semantics) otherwise;
    "triton" forces the Triton kernels (for CPU tensors only under TRITON_INTERPRET=1, set before the first Triton
    call, best before importing raro_kernels: that is how the tests run them without a GPU); "torch" forces the
    PyTorch path.
    chunk_cols: vocabulary columns per backward slice / tile (default 4096).
    """
    check_lm_head_inputs(hidden, weight, targets, temperature)
    chosen = resolve_backend(backend, hidden.device)
    cols = DEFAULT_CHUNK_COLS if chunk_cols is None else chunk_cols
    if cols < 1:
        raise ValueError(f"chunk_cols must be >= 1, got {chunk_cols}")
    lead_shape = targets.shape
    hidden_NH = hidden.reshape(-1, hidden.shape[-1])
    targets_N = targets.reshape(-1)
    if not torch.compiler.is_compiling():  # needs the targets' values: a host sync, and a guard a graph cannot hold
        check_targets_in_range(targets_N, weight.shape[0], ignore_index, shape=lead_shape)
    if hidden_NH.shape[0] == 0:
        # Nothing to compute; keep the result attached to hidden and the weight, so a caller's backward() still runs
        # and the weight gets its (zero) gradient like any other rank's (found by review: it got none).
        zeros_N = hidden_NH.float().sum(dim=-1) * 0.0 + weight[:0].float().sum()
        return LinearLogprobs(zeros_N.reshape(lead_shape), zeros_N.reshape(lead_shape) if return_entropy else None)
    inv_temp_N = inverse_temperatures(temperature, hidden_NH.shape[0], hidden.device)
    logprobs_N, entropy_N, _lse, _raw_entropy = _forward_op(
        hidden_NH, weight, targets_N, inv_temp_N, return_entropy, ignore_index, chosen, cols
    )
    return LinearLogprobs(
        logprobs_N.reshape(lead_shape), entropy_N.reshape(lead_shape) if return_entropy else None
    )
