"""The LM head and the policy loss in one pass: loss and gradients from hidden states, logits never whole.

The loss gradient of a token is known as soon as its log-prob is (every denominator of the aggregation is
known up front), so forward and backward take three matrix products in total: logits, grad hidden, grad
weight. The one-pass (triton) strategy keeps the fp32 logits of one chunk of tokens, reduces them to
log-probs, turns them in place into d(loss)/d(logits), and feeds that to the two gradient GEMMs; autograd's
backward only scales the stored gradients by the incoming scalar.

Layering: kernels (`_triton_lm_head`) -> `_one_pass_triton` / `_two_pass` host functions ->
`_LinearPolicyLossFn` (autograd) -> `linear_policy_loss` (public).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from raro_kernels._common import (
    alloc,
    check_lm_head_inputs,
    check_targets_in_range,
    finish_logprobs,
    inverse_temperatures,
    resolve_backend,
    round_up,
)
from raro_kernels.linear_logprobs import DEFAULT_CHUNK_COLS, linear_logprobs, lm_head_grads, lm_head_stats
from raro_kernels.policy_loss import (
    PolicyLossOptions,
    TokenBatch,
    check_token_batch,
    policy_metrics,
    scaled_objective,
    token_scale,
)

# Tokens per chunk of the one-pass strategy: its fp32 logits (chunk x V x 4 bytes) are the working set.
DEFAULT_CHUNK_TOKENS = 2048

TokenGrads = Callable[[int, int, torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor | None]]


@dataclass
class _LossTerms:
    """What the per-token loss needs besides the log-probs and entropies."""

    batch: TokenBatch
    opts: PolicyLossOptions
    scale_N: torch.Tensor

    def value(self, logprobs_N: torch.Tensor, entropy_N: torch.Tensor | None) -> torch.Tensor:
        loss = scaled_objective(logprobs_N, self.batch, self.opts, self.scale_N)
        if self.opts.entropy_coef != 0:
            assert entropy_N is not None
            ent = torch.where(self.batch.mask, self.scale_N * entropy_N, torch.zeros_like(entropy_N)).sum()
            loss = loss - self.opts.entropy_coef * ent
        return loss

    def token_grads(
        self, r0: int, r1: int, logprobs_R: torch.Tensor, entropy_R: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """d loss / d logprob and d loss / d entropy for tokens [r0, r1), by autograd on [R] vectors so the
        gradient is exactly that of `policy_loss`."""
        batch, scale_R = self.batch.rows(r0, r1), self.scale_N[r0:r1]
        with torch.enable_grad():
            lp_R = logprobs_R.detach().requires_grad_(True)
            (g_lp_R,) = torch.autograd.grad(scaled_objective(lp_R, batch, self.opts, scale_R), lp_R)
        g_ent_R = None
        if self.opts.entropy_coef != 0:
            g_ent_R = torch.where(batch.mask, -self.opts.entropy_coef * scale_R, torch.zeros_like(scale_R))
        return g_lp_R, g_ent_R


def _one_pass_triton(
    hidden_NH: torch.Tensor,
    weight_VH: torch.Tensor,
    targets_N: torch.Tensor,
    *,
    inv_temp_N: torch.Tensor,
    ignore_index: int,
    with_entropy: bool,
    token_grads: TokenGrads,
    need_hidden: bool,
    need_weight: bool,
    chunk_tokens: int,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(logprobs, entropy, grad hidden, grad weight) of sum(loss), with 6NHV FLOPs: per chunk of tokens the
    chunk's fp32 logits (cuBLAS, or the fused Triton kernel) reduced to statistics, the per-token loss
    gradient, one kernel turning the logits into dz in place, and two cuBLAS products."""
    from raro_kernels._triton_lm_head import accumulate_fp32_, dz_from_logits_, lm_head_stats_triton, mm_

    n_rows, hidden_size = hidden_NH.shape
    vocab = weight_VH.shape[0]
    dev, dtype = hidden_NH.device, hidden_NH.dtype
    rows = min(chunk_tokens, n_rows)
    n_chunks = (n_rows + rows - 1) // rows
    logits_buf = alloc((rows, round_up(vocab, 8)), torch.float32, dev)
    logprobs_N = alloc((n_rows,), torch.float32, dev)
    entropy_N = alloc((n_rows,), torch.float32, dev) if with_entropy else None
    grad_hidden_NH = alloc((n_rows, hidden_size), dtype, dev) if need_hidden else None
    grad_weight_VH = None
    grad_weight32_VH = None
    if need_weight and n_chunks > 1:
        grad_weight32_VH = alloc((vocab, hidden_size), torch.float32, dev)
    for r0 in range(0, n_rows, rows):
        r1 = min(r0 + rows, n_rows)
        h_RH, tgt_R, inv_R = hidden_NH[r0:r1], targets_N[r0:r1], inv_temp_N[r0:r1]
        z_RV = logits_buf[: r1 - r0, :vocab]
        stats = lm_head_stats_triton(
            h_RH, weight_VH, tgt_R, inv_temp_N=inv_R, with_entropy=with_entropy, logits_out=z_RV
        )
        lp_R, ent_R = finish_logprobs(stats, tgt_R, vocab, ignore_index)
        logprobs_N[r0:r1] = lp_R
        if entropy_N is not None:
            entropy_N[r0:r1] = ent_R
        g_lp_R, g_ent_R = token_grads(r0, r1, lp_R, ent_R)
        dz_RV = dz_from_logits_(
            z_RV, tgt_R, stats.lse, stats.entropy, g_lp_R, g_ent_R, inv_temp_N=inv_R, dtype=dtype
        )
        if grad_hidden_NH is not None:
            mm_(dz_RV, weight_VH, out=grad_hidden_NH[r0:r1])
        if need_weight:
            if grad_weight32_VH is None:
                grad_weight_VH = mm_(dz_RV.t(), h_RH)
            else:
                accumulate_fp32_(grad_weight32_VH, dz_RV.t(), h_RH, first=r0 == 0)
    if grad_weight32_VH is not None:
        grad_weight_VH = grad_weight32_VH.to(dtype)
    return logprobs_N, entropy_N, grad_hidden_NH, grad_weight_VH


def _two_pass(
    backend: str,
    hidden_NH: torch.Tensor,
    weight_VH: torch.Tensor,
    targets_N: torch.Tensor,
    *,
    inv_temp_N: torch.Tensor,
    ignore_index: int,
    with_entropy: bool,
    token_grads: TokenGrads | None,
    need_hidden: bool,
    need_weight: bool,
    chunk_cols: int,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Statistics of all tokens first, then the gradients with the logits recomputed (8NHV FLOPs, memory of
    `linear_logprobs`' backward). `token_grads` None: forward only."""
    stats = lm_head_stats(
        backend, hidden_NH, weight_VH, targets_N, inv_temp_N=inv_temp_N, with_entropy=with_entropy,
        chunk_cols=chunk_cols,
    )
    logprobs_N, entropy_N = finish_logprobs(stats, targets_N, weight_VH.shape[0], ignore_index)
    if token_grads is None:
        return logprobs_N, entropy_N, None, None
    g_lp_N, g_ent_N = token_grads(0, hidden_NH.shape[0], logprobs_N, entropy_N)
    grad_hidden, grad_weight = lm_head_grads(
        backend, hidden_NH, weight_VH, targets_N, stats.lse, stats.entropy, g_lp_N, g_ent_N,
        inv_temp_N=inv_temp_N, need_hidden=need_hidden, need_weight=need_weight, chunk_cols=chunk_cols,
    )
    return logprobs_N, entropy_N, grad_hidden, grad_weight


@dataclass(frozen=True)
class _RunConfig:
    ignore_index: int
    with_entropy: bool
    backend: str
    one_pass: bool
    chunk_tokens: int
    chunk_cols: int
    grad_enabled: bool  # ctx.needs_input_grad ignores torch.no_grad(), so the caller's mode is passed in


class _LinearPolicyLossFn(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx, hidden_NH: torch.Tensor, weight_VH: torch.Tensor, targets_N: torch.Tensor, inv_temp_N: torch.Tensor,
        cfg: _RunConfig, terms: _LossTerms,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        need_hidden = cfg.grad_enabled and ctx.needs_input_grad[0]
        need_weight = cfg.grad_enabled and ctx.needs_input_grad[1]
        grads_needed = need_hidden or need_weight
        common = dict(
            inv_temp_N=inv_temp_N, ignore_index=cfg.ignore_index, with_entropy=cfg.with_entropy,
            need_hidden=need_hidden, need_weight=need_weight,
        )
        if cfg.backend == "triton" and cfg.one_pass and grads_needed:
            logprobs_N, entropy_N, grad_hidden, grad_weight = _one_pass_triton(
                hidden_NH, weight_VH, targets_N, token_grads=terms.token_grads, chunk_tokens=cfg.chunk_tokens,
                **common,
            )
        else:
            logprobs_N, entropy_N, grad_hidden, grad_weight = _two_pass(
                cfg.backend, hidden_NH, weight_VH, targets_N,
                token_grads=terms.token_grads if grads_needed else None, chunk_cols=cfg.chunk_cols, **common,
            )
        loss = terms.value(logprobs_N, entropy_N)
        # Kept as attributes, not saved tensors: backward scales them in place and hands them over, so the
        # gradients exist once in memory; a second backward through the same graph is refused below.
        ctx.grads = (grad_hidden, grad_weight)
        if entropy_N is None:
            entropy_N = logprobs_N.new_empty(0)
        ctx.mark_non_differentiable(logprobs_N, entropy_N)
        return loss, logprobs_N, entropy_N

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, _g_lp: torch.Tensor | None, _g_ent: torch.Tensor | None):  # type: ignore[override]
        if ctx.grads is None:
            raise RuntimeError("linear_policy_loss: backward ran twice through one graph (retain_graph); its "
                               "gradients are computed in the forward and handed over once")
        grad_hidden, grad_weight = ctx.grads
        ctx.grads = None
        # The gradients were computed for d(output)/d(loss) = 1 during the forward; scale by the real one.
        for g in (grad_hidden, grad_weight):
            if g is not None:
                g.mul_(grad_loss.to(g.dtype))
        return grad_hidden, grad_weight, None, None, None, None


def linear_policy_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    temperature: float | torch.Tensor = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    entropy_coef: float = 0.0,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    rollout_logprobs: torch.Tensor | None = None,
    tis_cap: float | None = None,
    loss_agg: str = "token_mean",
    seq_ids: torch.Tensor | None = None,
    num_sequences: int | torch.Tensor | None = None,
    num_tokens: int | torch.Tensor | None = None,
    norm_constant: float | None = None,
    weights: torch.Tensor | None = None,
    backend: str | None = None,
    one_pass: bool = True,
    chunk_tokens: int | None = None,
    chunk_cols: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`policy_loss(linear_logprobs(hidden, weight, targets).logprobs, ...)` in one pass, same value and gradient.

    hidden [N, H] (flatten leading dims first), weight [V, H], targets int [N] (`ignore_index` positions are
    dropped from `mask`), and the per-token [N] inputs and keyword options of `policy_loss`, whose docstring
    defines the loss, aggregation and metrics. temperature: a number or one per token, as in `linear_logprobs`. `entropy_coef` adds an entropy bonus:
    loss -= entropy_coef * (entropy aggregated like the per-token loss, weights included).
    Returns (loss 0-dim fp32, metrics): `policy_loss`'s metrics plus "logprobs" (fp32 [N], detached: the
    trainer's log-probs, e.g. to compare with the rollout engine's), and with return_entropy or entropy_coef
    "entropy" (masked mean, detached). Differentiable w.r.t. hidden and weight.

    Strategies and memory (beyond inputs, outputs and gradients):
    - one_pass=True, triton backend (default on CUDA): 6NHV FLOPs. Holds the fp32 logits of `chunk_tokens`
      tokens (default 2048: chunk_tokens x V x 4 bytes, 1.2 GB at V = 151,936; when N <= chunk_tokens that is
      the whole batch) and, when N > chunk_tokens, an fp32 [V, H] accumulator for grad weight. On an H100,
      chunk_tokens=4096 measured 5-11% faster than 2048 for twice the chunk (benchmarks/RESULTS.md).
    - one_pass=False, or the torch backend: statistics of all tokens, then gradients with the logits recomputed
      (8NHV FLOPs); memory as in `linear_logprobs` (N x chunk_cols fp32 slice, fp32 [N, H]).
    The gradients are computed during the forward and kept until backward, which scales them in place by the
    incoming gradient: backward can run once per graph (a second one raises).
    backend: as in `linear_logprobs` (None: triton on CUDA, torch on CPU; "triton" on CPU needs
    TRITON_INTERPRET=1 before the first Triton call).
    """
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be [N, H] (flatten leading dims first), got shape {tuple(hidden.shape)}")
    check_lm_head_inputs(hidden, weight, targets, temperature)
    chosen = resolve_backend(backend, hidden.device)
    for name, value in (("chunk_tokens", chunk_tokens), ("chunk_cols", chunk_cols)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    opts = PolicyLossOptions(
        clip_low, clip_high, dual_clip, kl_coef, kl_estimator, tis_cap, loss_agg, entropy_coef=entropy_coef
    )
    n_tokens = hidden.shape[0]
    batch = TokenBatch(old_logprobs, advantages, mask, ref_logprobs, rollout_logprobs)
    check_token_batch(n_tokens, hidden.device, batch, opts, weights)
    if not torch.compiler.is_compiling():  # needs the targets' values: a host sync, and a guard a graph cannot hold
        check_targets_in_range(targets, weight.shape[0], ignore_index)
    batch.mask = mask & (targets != ignore_index)
    scale_N = token_scale(
        batch.mask, loss_agg, seq_ids=seq_ids, num_sequences=num_sequences, num_tokens=num_tokens,
        norm_constant=norm_constant, weights=weights,
    )
    terms = _LossTerms(batch, opts, scale_N)
    with_entropy = return_entropy or entropy_coef != 0
    cfg = _RunConfig(
        ignore_index, with_entropy, chosen, one_pass,
        DEFAULT_CHUNK_TOKENS if chunk_tokens is None else chunk_tokens,
        DEFAULT_CHUNK_COLS if chunk_cols is None else chunk_cols,
        torch.is_grad_enabled(),
    )
    return _loss_and_metrics(hidden, weight, targets, temperature, cfg, terms)


def _loss_and_metrics(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                      temperature: float | torch.Tensor, cfg: _RunConfig,
                      terms: _LossTerms) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The fused loss over validated inputs, with `policy_loss`'s metrics, the log-probs and the entropy."""
    batch, opts = terms.batch, terms.opts
    if hidden.shape[0] == 0:
        loss = hidden.float().sum() * 0.0
        logprobs_N = torch.zeros(0, dtype=torch.float32, device=hidden.device)
        entropy_N = logprobs_N
    elif torch.compiler.is_compiling():
        # Traced: the loss on the custom op `linear_logprobs` (the two-pass strategy, 8NHV FLOPs). The one-pass
        # strategy takes each token's loss gradient by autograd in the middle of its forward, which an op the
        # compiler treats as opaque cannot do (autograd runs above custom ops); value and gradient are the same.
        out = linear_logprobs(hidden, weight, targets, temperature=temperature, return_entropy=cfg.with_entropy,
                              ignore_index=cfg.ignore_index, backend=cfg.backend, chunk_cols=cfg.chunk_cols)
        loss = terms.value(out.logprobs, out.entropy)
        logprobs_N, entropy_N = out.logprobs.detach(), None if out.entropy is None else out.entropy.detach()
    else:
        inv_temp_N = inverse_temperatures(temperature, hidden.shape[0], hidden.device)
        loss, logprobs_N, entropy_N = _LinearPolicyLossFn.apply(hidden, weight, targets, inv_temp_N, cfg, terms)
    metrics = policy_metrics(logprobs_N, batch, opts)
    metrics["logprobs"] = logprobs_N.detach()
    if cfg.with_entropy:
        count = batch.mask.sum().clamp(min=1)
        metrics["entropy"] = torch.where(batch.mask, entropy_N, torch.zeros_like(entropy_N)).sum() / count
    return loss, metrics
