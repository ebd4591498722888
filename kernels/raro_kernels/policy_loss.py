"""PPO / GRPO clipped policy loss on per-token log-probs, with the options RL trainers use today.

Everything here works on [N] vectors (a flattened, possibly packed micro-batch), so it is a handful of fused
elementwise ops: no Triton kernel is needed for speed. The same per-token objective and per-token scale are
reused by `linear_policy_loss`, which needs the loss gradient per token while it still holds that token's
logits, so both functions compute exactly the same loss.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

KL_ESTIMATORS = ("k1", "k2", "k3")
LOSS_AGGS = ("token_mean", "seq_mean_token_sum", "seq_mean_token_mean", "token_sum_norm")
# exp() of a log-ratio beyond this overflows fp32 long before it means anything; clipping it also bounds the
# gradient of the unclipped branch (negative advantages) when the policy has drifted far.
LOG_RATIO_LIMIT = 20.0


@dataclass(frozen=True)
class PolicyLossOptions:
    """The keyword options of `policy_loss` (see its docstring), validated once."""

    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = None
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    tis_cap: float | None = None
    loss_agg: str = "token_mean"
    entropy_coef: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.clip_low < 1:
            raise ValueError(f"clip_low must be in [0, 1), got {self.clip_low}")
        if not self.clip_high >= 0:
            raise ValueError(f"clip_high must be >= 0, got {self.clip_high}")
        if self.dual_clip is not None and not self.dual_clip > 1:
            raise ValueError(f"dual_clip must be > 1 (typically 3), got {self.dual_clip}")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {self.kl_estimator!r}")
        if not self.kl_coef >= 0:
            raise ValueError(f"kl_coef must be >= 0, got {self.kl_coef}")
        if self.tis_cap is not None and not self.tis_cap > 0:
            raise ValueError(f"tis_cap must be > 0, got {self.tis_cap}")
        if self.loss_agg not in LOSS_AGGS:
            raise ValueError(f"loss_agg must be one of {LOSS_AGGS}, got {self.loss_agg!r}")


@dataclass
class TokenBatch:
    """The per-token inputs besides the log-probs, all [N]; `mask` bool."""

    old_logprobs: torch.Tensor
    advantages: torch.Tensor
    mask: torch.Tensor
    ref_logprobs: torch.Tensor | None = None
    rollout_logprobs: torch.Tensor | None = None

    def rows(self, r0: int, r1: int) -> TokenBatch:
        def cut(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[r0:r1]

        return TokenBatch(
            self.old_logprobs[r0:r1],
            self.advantages[r0:r1],
            self.mask[r0:r1],
            cut(self.ref_logprobs),
            cut(self.rollout_logprobs),
        )


def check_token_batch(
    n_tokens: int, device: torch.device, batch: TokenBatch, opts: PolicyLossOptions, weights: torch.Tensor | None
) -> None:
    named = {
        "old_logprobs": batch.old_logprobs,
        "advantages": batch.advantages,
        "mask": batch.mask,
        "ref_logprobs": batch.ref_logprobs,
        "rollout_logprobs": batch.rollout_logprobs,
        "weights": weights,
    }
    for name, t in named.items():
        if t is None:
            continue
        if tuple(t.shape) != (n_tokens,):
            raise ValueError(f"{name} must have shape [N] = [{n_tokens}], got {tuple(t.shape)}")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device}, expected {device}")
    if batch.mask.dtype != torch.bool:
        raise ValueError(f"mask must be bool, got {batch.mask.dtype}")
    if opts.kl_coef > 0 and batch.ref_logprobs is None:
        raise ValueError("kl_coef > 0 needs ref_logprobs")
    if (opts.tis_cap is None) != (batch.rollout_logprobs is None):
        raise ValueError(
            "truncated importance weighting needs both rollout_logprobs and tis_cap (got only "
            f"{'tis_cap' if opts.tis_cap is not None else 'rollout_logprobs'})"
        )


def _as_count(x: int | float | torch.Tensor, name: str, device: torch.device) -> torch.Tensor | float:
    """A denominator: a tensor stays on the device (no sync), a Python number stays a Python float (no copy)."""
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=torch.float32)
    if not 0 < x < math.inf:  # an infinite one made the loss and its gradient 0, silently (found by review)
        raise ValueError(f"{name} must be finite and > 0, got {x}")
    return float(x)


def token_scale(
    mask_N: torch.Tensor,
    loss_agg: str,
    *,
    seq_ids: torch.Tensor | None = None,
    num_sequences: int | torch.Tensor | None = None,
    num_tokens: int | torch.Tensor | None = None,
    norm_constant: float | None = None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """fp32 [N] factor s such that loss = sum_n s_n * loss_n; 0 at unmasked tokens. No host sync."""
    dev = mask_N.device
    n = mask_N.shape[0]
    m_N = mask_N.float()
    if weights is not None:
        m_N = m_N * weights.float()
    if loss_agg == "token_mean":
        denom = _as_count(num_tokens, "num_tokens", dev) if num_tokens is not None else mask_N.sum().clamp(min=1)
        return m_N / denom
    if loss_agg == "token_sum_norm":
        if norm_constant is None:
            raise ValueError("loss_agg='token_sum_norm' (Dr.GRPO) needs norm_constant")
        return m_N / _as_count(norm_constant, "norm_constant", dev)
    # Sequence aggregations: count masked tokens per sequence with a scatter, so no host sync is needed.
    if seq_ids is None:
        raise ValueError(f"loss_agg={loss_agg!r} needs seq_ids (int64 [N], the sequence index of each token)")
    if tuple(seq_ids.shape) != (n,) or seq_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"seq_ids must be int64 [N] = [{n}], got {seq_ids.dtype} {tuple(seq_ids.shape)}")
    seq_ids = seq_ids.long()
    if dev.type == "cpu" and n > 0 and not torch.compiler.is_compiling() and (
            int(seq_ids.min()) < 0 or int(seq_ids.max()) >= n):
        raise ValueError(f"seq_ids must lie in [0, N) = [0, {n}), got range [{int(seq_ids.min())}, {int(seq_ids.max())}]")
    tokens_per_seq = torch.zeros(n, dtype=torch.float32, device=dev).scatter_add_(0, seq_ids, mask_N.float())
    if num_sequences is not None:
        n_seq = _as_count(num_sequences, "num_sequences", dev)
    else:
        n_seq = (tokens_per_seq > 0).sum().clamp(min=1).float()
    if loss_agg == "seq_mean_token_sum":
        return m_N / n_seq
    return m_N / (tokens_per_seq[seq_ids].clamp(min=1) * n_seq)


def tis_weight(batch: TokenBatch, tis_cap: float | None) -> torch.Tensor | None:
    """Truncated importance weight min(pi_old / pi_rollout, cap), detached; None when TIS is off."""
    if tis_cap is None or batch.rollout_logprobs is None:
        return None
    log_w = (batch.old_logprobs.float() - batch.rollout_logprobs.float()).clamp(max=LOG_RATIO_LIMIT)
    return torch.exp(log_w).clamp(max=tis_cap).detach()


def kl_estimate(logprobs_N: torch.Tensor, ref_logprobs_N: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi (Schulman's k1, k2, k3)."""
    log_r = (ref_logprobs_N.float() - logprobs_N).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * log_r * log_r
    return torch.exp(log_r) - 1.0 - log_r


def _clipped_surrogate(
    logprobs_N: torch.Tensor, batch: TokenBatch, opts: PolicyLossOptions
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-token clipped surrogate, ratio, log-ratio, max(pg1, pg2) before the dual clip)."""
    adv_N = batch.advantages.float()
    log_ratio_N = (logprobs_N - batch.old_logprobs.float()).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    ratio_N = torch.exp(log_ratio_N)
    pg1_N = -adv_N * ratio_N
    pg2_N = -adv_N * ratio_N.clamp(1.0 - opts.clip_low, 1.0 + opts.clip_high)
    pg_N = torch.maximum(pg1_N, pg2_N)
    clipped_N = pg_N
    if opts.dual_clip is not None:
        # Dual clip (Ye et al. 2020): for negative advantages the loss is capped at |A| * c.
        clipped_N = torch.where(adv_N < 0, torch.minimum(pg_N, -adv_N * opts.dual_clip), pg_N)
    return clipped_N, ratio_N, log_ratio_N, pg_N


def token_objective(logprobs_N: torch.Tensor, batch: TokenBatch, opts: PolicyLossOptions) -> torch.Tensor:
    """Per-token loss (differentiable in logprobs): TIS-weighted clipped surrogate + kl_coef * KL to ref.

    The TIS weight multiplies the policy-gradient term only: the KL term is a regulariser of the current
    policy, not an estimate over the rollout distribution.
    """
    loss_N, _, _, _ = _clipped_surrogate(logprobs_N, batch, opts)
    w_N = tis_weight(batch, opts.tis_cap)
    if w_N is not None:
        loss_N = loss_N * w_N
    if opts.kl_coef > 0:
        assert batch.ref_logprobs is not None
        loss_N = loss_N + opts.kl_coef * kl_estimate(logprobs_N, batch.ref_logprobs, opts.kl_estimator)
    return loss_N


def scaled_objective(
    logprobs_N: torch.Tensor, batch: TokenBatch, opts: PolicyLossOptions, scale_N: torch.Tensor
) -> torch.Tensor:
    """sum_n scale_n * loss_n over masked tokens; `where` keeps NaN/inf of unmasked tokens out of the sum, and the
    log-probs of unmasked tokens enter as constants: their gradient is 0 exactly. (Behind the output's `where`
    alone, a NaN advantage at an unmasked token still gave d loss / d logprob = 0 * NaN = NaN there, and through
    the LM head a NaN in every entry of the weight's gradient, with a finite loss.)"""
    logprobs_N = torch.where(batch.mask, logprobs_N, logprobs_N.detach())
    loss_N = token_objective(logprobs_N, batch, opts)
    return torch.where(batch.mask, loss_N * scale_N, torch.zeros_like(loss_N)).sum()


@torch.no_grad()
def policy_metrics(logprobs_N: torch.Tensor, batch: TokenBatch, opts: PolicyLossOptions) -> dict[str, torch.Tensor]:
    """Masked statistics over this call's tokens, each a 0-dim fp32 tensor (no host sync)."""
    mask_N = batch.mask
    count = mask_N.sum().clamp(min=1).float()

    def mean(x_N: torch.Tensor) -> torch.Tensor:
        return torch.where(mask_N, x_N.float(), torch.zeros((), device=x_N.device)).sum() / count

    logprobs_N = logprobs_N.detach().float()
    clipped_N, ratio_N, log_ratio_N, pg_N = _clipped_surrogate(logprobs_N, batch, opts)
    adv_N = batch.advantages.float()
    high_N = (adv_N > 0) & (ratio_N > 1.0 + opts.clip_high)
    low_N = (adv_N < 0) & (ratio_N < 1.0 - opts.clip_low)
    any_masked = mask_N.any()
    inf = torch.full((), float("inf"), device=mask_N.device)
    out = {
        "clip_frac_low": mean(low_N),
        "clip_frac_high": mean(high_N),
        "clip_frac": mean(low_N | high_N),
        # k3 estimate of KL(pi_old || pi) from samples of pi_old: (r - 1) - log r >= 0.
        "approx_kl": mean(ratio_N - 1.0 - log_ratio_N),
        "ratio_mean": mean(ratio_N),
        # No tokens at all: min/max of an empty tensor raise (a shape, so no host sync to test it).
        "ratio_min": _masked_extreme(ratio_N, mask_N, any_masked, torch.amin, inf),
        "ratio_max": _masked_extreme(ratio_N, mask_N, any_masked, torch.amax, -inf),
    }
    if opts.dual_clip is not None:
        out["dual_clip_frac"] = mean((adv_N < 0) & (pg_N > -adv_N * opts.dual_clip))
    if batch.ref_logprobs is not None:
        out["ref_kl"] = mean(kl_estimate(logprobs_N, batch.ref_logprobs, opts.kl_estimator))
    if opts.tis_cap is not None and batch.rollout_logprobs is not None:
        log_w_N = batch.old_logprobs.float() - batch.rollout_logprobs.float()
        out["tis_frac_capped"] = mean(torch.exp(log_w_N.clamp(max=LOG_RATIO_LIMIT)) > opts.tis_cap)
    return out


def _masked_extreme(x_N: torch.Tensor, mask_N: torch.Tensor, any_masked: torch.Tensor, reduce, fill: torch.Tensor
                    ) -> torch.Tensor:
    """`reduce` (amin/amax) of x over the masked tokens; 0 where none is masked, or there are no tokens at all."""
    zero = torch.zeros((), dtype=torch.float32, device=mask_N.device)
    if mask_N.numel() == 0:  # a shape: no host sync
        return zero
    return torch.where(any_masked, reduce(torch.where(mask_N, x_N, fill)), zero)


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
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
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO/GRPO clipped surrogate loss and its metrics. All per-token tensors are [N] (flattened, e.g. a packed
    micro-batch); `mask` is bool [N] and selects the tokens that are trained.

    Per token, with r = exp(logprobs - old_logprobs) (log-ratio clamped to +-20 so exp cannot overflow) and
    A = advantages (per token; broadcast a sequence's advantage to its tokens):
        pg = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high))
        if dual_clip c (> 1):  pg = min(pg, -A c) where A < 0                          (Ye et al. 2020)
        if tis_cap:            pg = pg * min(exp(old_logprobs - rollout_logprobs), tis_cap)   (detached;
                               truncated importance weight against the rollout engine's log-probs)
        loss_n = pg + kl_coef * KL_est(logprobs, ref_logprobs)   (k1: log pi/pi_ref; k2: (log pi/pi_ref)^2 / 2;
                                                                  k3: pi_ref/pi - 1 - log pi_ref/pi)
    `weights` (optional fp32 [N]) multiplies loss_n (e.g. role weights); it does not change the denominators.
    Aggregation (`loss_agg`), over masked tokens:
        "token_mean":          sum_n loss_n / D, D = num_tokens if given else mask.sum()
        "seq_mean_token_sum":  sum_n loss_n / S
        "seq_mean_token_mean": sum_s (sum_{n in s} loss_n / T_s) / S, T_s = masked tokens of sequence s
        "token_sum_norm":      sum_n loss_n / norm_constant   (Dr.GRPO; norm_constant required)
    S = num_sequences if given else the number of distinct `seq_ids` (int64 [N], values in [0, N)) that have a
    masked token. The num_tokens / num_sequences overrides (int or 0-dim tensor) exist so that a batch split into
    micro-batches (and ranks) sums exactly to the full-batch loss: pass the GLOBAL counts and sum the gradients.
    (Sequences must not straddle micro-batches for "seq_mean_token_mean", since T_s is counted locally.)
    Arguments that the chosen options do not use are ignored (e.g. norm_constant with "token_mean").

    Returns (loss: 0-dim fp32, metrics: dict of 0-dim fp32 tensors, detached, masked over this call's tokens):
    clip_frac_low, clip_frac_high, clip_frac (either), dual_clip_frac (if dual_clip), approx_kl (k3 estimate of
    KL(pi_old || pi)), ref_kl (the chosen estimator, if ref_logprobs given), ratio_mean, ratio_min, ratio_max,
    tis_frac_capped (if TIS). No host synchronisation happens on CUDA.
    """
    opts = PolicyLossOptions(clip_low, clip_high, dual_clip, kl_coef, kl_estimator, tis_cap, loss_agg)
    if logprobs.dim() != 1:
        raise ValueError(f"logprobs must be [N], got shape {tuple(logprobs.shape)}")
    batch = TokenBatch(old_logprobs, advantages, mask, ref_logprobs, rollout_logprobs)
    check_token_batch(logprobs.shape[0], logprobs.device, batch, opts, weights)
    scale_N = token_scale(
        mask, loss_agg, seq_ids=seq_ids, num_sequences=num_sequences, num_tokens=num_tokens,
        norm_constant=norm_constant, weights=weights,
    )
    loss = scaled_objective(logprobs.float(), batch, opts, scale_N)
    return loss, policy_metrics(logprobs, batch, opts)
