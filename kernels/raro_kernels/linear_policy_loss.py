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
            # where twice: a NaN token weight at an untrained token (scale_N there) must not reach the gradient as
            # 0 * NaN, which it did under torch.compile, where this is the backward (found by review)
            mask = self.batch.mask
            ent = torch.where(mask, torch.where(mask, self.scale_N, 0.0) * entropy_N, 0.0).sum()
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


def _grad_prescale(g_lp_N: torch.Tensor, g_ent_N: torch.Tensor | None) -> torch.Tensor:
    """A power of two s (fp32, 0-dim, on the tokens' device, no host sync) with s * bound < 1, where bound =
    max |d loss / d logprob| + 16 max |d loss / d entropy| bounds |d loss / d logit| / inv_temp at any token and
    column (p |log p| <= 1/e, entropy <= ln V < 15). From the token gradients themselves: a power of two near
    1 / max |token weight| left a token with |A| * ratio above 65504 (a log-ratio of 11 with A = -1) inf in fp16
    whatever the loss scale, and GradScaler skipped every step."""
    bound = g_lp_N.abs().amax()
    if g_ent_N is not None:
        bound = bound + 16.0 * g_ent_N.abs().amax()
    _mantissa, exponent = torch.frexp(bound.float())  # bound = mantissa * 2^exponent, mantissa in [0.5, 1); 0 -> 1
    return torch.ldexp(torch.ones((), dtype=torch.float32, device=g_lp_N.device), -exponent)


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
    grad_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(logprobs, entropy, grad hidden, grad weight) of sum(loss), with 6NHV FLOPs: per chunk of tokens the
    chunk's fp32 logits (cuBLAS, or the fused Triton kernel) reduced to statistics, the per-token loss
    gradient, one kernel turning the logits into dz in place, and two cuBLAS products. The gradients come in
    `grad_dtype`: the input dtype, or fp32 (the GEMMs' fp32 results, unrounded)."""
    from raro_kernels._triton_lm_head import accumulate_fp32_, dz_from_logits_, lm_head_stats_triton, mm_

    n_rows, hidden_size = hidden_NH.shape
    vocab = weight_VH.shape[0]
    dev, dtype = hidden_NH.device, hidden_NH.dtype
    assert grad_dtype in (dtype, torch.float32), grad_dtype
    wide = grad_dtype != dtype  # 16-bit inputs, fp32 gradients
    rows = min(chunk_tokens, n_rows)
    n_chunks = (n_rows + rows - 1) // rows
    logits_buf = alloc((rows, round_up(vocab, 8)), torch.float32, dev)
    logprobs_N = alloc((n_rows,), torch.float32, dev)
    entropy_N = alloc((n_rows,), torch.float32, dev) if with_entropy else None
    grad_hidden_NH = alloc((n_rows, hidden_size), grad_dtype, dev) if need_hidden else None
    grad_weight_VH = None
    grad_weight32_VH = None
    if need_weight and (n_chunks > 1 or wide):
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
            if wide:
                accumulate_fp32_(grad_hidden_NH[r0:r1], dz_RV, weight_VH, first=True)
            else:
                mm_(dz_RV, weight_VH, out=grad_hidden_NH[r0:r1])
        if need_weight:
            if grad_weight32_VH is None:
                grad_weight_VH = mm_(dz_RV.t(), h_RH)
            else:
                accumulate_fp32_(grad_weight32_VH, dz_RV.t(), h_RH, first=r0 == 0)
    if grad_weight32_VH is not None:
        grad_weight_VH = grad_weight32_VH.to(grad_dtype)
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
    grad_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Statistics of all tokens first, then the gradients (in `grad_dtype`) with the logits recomputed (8NHV
    FLOPs, memory of `linear_logprobs`' backward). `token_grads` None: forward only."""
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
        grad_dtype=grad_dtype,
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
        # fp16 (5-bit exponent) cannot hold the gradients at d(loss)=1 and scale them later: their small entries
        # are subnormal or 0 before backward's loss scale arrives, and that scale cast to fp16 (GradScaler starts
        # at 65536) is inf. So for fp16:
        # (a) the gradients stay fp32 until backward has scaled them. Cost: 2 more bytes per element of grad
        #     hidden and grad weight held from forward to backward (+1.1 GB at a 151,936 x 3584 head). The peak
        #     does not grow where an fp32 grad-weight accumulator existed already (torch backend, one pass over
        #     several token chunks: its 16-bit copy now appears in backward instead of forward); it grows by that
        #     much on the triton single-chunk and two-pass paths, which wrote 16-bit grad weight directly.
        # (b) the per-token gradients are multiplied by a power of two s with s * max |d(logits)| < 1
        #     (`_grad_prescale`), as a loss scale would be, since the triton backend rounds d(logits) to fp16
        #     before its GEMMs and a token's d(logits) is ~ its weight (1 / token count for token_mean) times p:
        #     mostly subnormal or 0 at d(loss)=1, and above fp16's 65504 where |A| * ratio is. Backward divides
        #     it out exactly. No host sync: the scale stays on the device. It needs every token's gradient
        #     before the first d(logits), so fp16 takes the one-pass strategy only where the tokens are one chunk.
        # bf16 has fp32's exponent range, neither under- nor overflows here, and keeps the 2-byte gradients.
        ctx.out_dtype = hidden_NH.dtype
        fp16_grads = grads_needed and hidden_NH.dtype == torch.float16
        grad_dtype = torch.float32 if hidden_NH.dtype == torch.float16 else hidden_NH.dtype
        token_grads = terms.token_grads
        prescales: list[torch.Tensor] = []
        if fp16_grads:
            def token_grads(r0: int, r1: int, lp_R: torch.Tensor, ent_R: torch.Tensor | None):
                assert not prescales and (r0, r1) == (0, hidden_NH.shape[0]), "fp16: one call over all tokens"
                g_lp_R, g_ent_R = terms.token_grads(r0, r1, lp_R, ent_R)
                prescales.append(prescale := _grad_prescale(g_lp_R, g_ent_R))
                return g_lp_R * prescale, None if g_ent_R is None else g_ent_R * prescale

        common = dict(
            inv_temp_N=inv_temp_N, ignore_index=cfg.ignore_index, with_entropy=cfg.with_entropy,
            need_hidden=need_hidden, need_weight=need_weight, grad_dtype=grad_dtype,
        )
        one_pass = cfg.backend == "triton" and cfg.one_pass and grads_needed
        if one_pass and not (fp16_grads and hidden_NH.shape[0] > cfg.chunk_tokens):
            logprobs_N, entropy_N, grad_hidden, grad_weight = _one_pass_triton(
                hidden_NH, weight_VH, targets_N, token_grads=token_grads, chunk_tokens=cfg.chunk_tokens,
                **common,
            )
        else:
            logprobs_N, entropy_N, grad_hidden, grad_weight = _two_pass(
                cfg.backend, hidden_NH, weight_VH, targets_N,
                token_grads=token_grads if grads_needed else None, chunk_cols=cfg.chunk_cols, **common,
            )
        ctx.prescale = prescales[0] if prescales else None
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
        grads = list(ctx.grads)
        ctx.grads = None
        # The gradients were computed for d(output)/d(loss) = 1 (times the fp16 prescale) during the forward;
        # scale by the real one, in fp32 where they are fp32, then round once to the inputs' dtype.
        for i, g in enumerate(grads):
            if g is None:
                continue
            if g.dtype == ctx.out_dtype:
                g.mul_(grad_loss.float())  # an fp32 factor: rounded to bf16 first, it was up to 0.2% off
            else:
                factor = grad_loss.float() if ctx.prescale is None else grad_loss.float() / ctx.prescale
                grads[i] = g.mul_(factor).to(ctx.out_dtype)
            del g  # the fp32 buffer goes as soon as its 16-bit copy exists
        return grads[0], grads[1], None, None, None, None


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
    incoming gradient: backward can run once per graph (a second one raises). fp16 inputs keep them in fp32
    until then (2 more bytes per element of grad hidden and grad weight), so that a loss scale (GradScaler)
    neither overflows nor arrives after their small entries were flushed to 0. fp16 with N > chunk_tokens runs
    the two-pass strategy: its per-token gradients are scaled by their common maximum before any is rounded to
    fp16, which needs all of them first.
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
    if hidden.shape[0] == 0:  # attached to the weight too: its gradient is 0, not None (found by review)
        loss = hidden.float().sum() * 0.0 + weight[:0].float().sum()
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
