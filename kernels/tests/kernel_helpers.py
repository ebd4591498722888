"""Float64 references for the kernel tests, written the plain way (full logits, loops over sequences)."""
from __future__ import annotations

import torch


def reference_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, temperature: float | torch.Tensor,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(target), entropy) in float64 from the full logits; 0 at ignored positions. Differentiable.
    temperature: a number, or one per token (shaped like targets)."""
    if isinstance(temperature, torch.Tensor):
        temperature = temperature.detach().cpu().double().reshape(-1, 1)
    logits = hidden.double().reshape(-1, hidden.shape[-1]) @ weight.double().T / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    t = targets.reshape(-1)
    keep = t != ignore_index
    picked = logp_all.gather(1, torch.where(keep, t, 0)[:, None]).squeeze(1)
    entropy = -(logp_all.exp() * logp_all).sum(dim=-1)
    zero = torch.zeros((), dtype=torch.float64)
    return (
        torch.where(keep, picked, zero).reshape(targets.shape),
        torch.where(keep, entropy, zero).reshape(targets.shape),
    )


def reference_policy_loss(
    logp: torch.Tensor,
    old: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    ref: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    rollout: torch.Tensor | None = None,
    tis_cap: float | None = None,
    loss_agg: str = "token_mean",
    seq_ids: torch.Tensor | None = None,
    num_sequences: float | None = None,
    num_tokens: float | None = None,
    norm_constant: float | None = None,
    weights: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
) -> torch.Tensor:
    """The loss in float64, token by token and sequence by sequence."""
    terms = []
    for n in range(logp.shape[0]):
        lp, a = logp[n], float(adv[n])
        log_r = torch.clamp(lp - float(old[n]), -20.0, 20.0)
        r = torch.exp(log_r)
        surr = torch.maximum(-a * r, -a * torch.clamp(r, 1 - clip_low, 1 + clip_high))
        if dual_clip is not None and a < 0:
            surr = torch.minimum(surr, torch.tensor(-a * dual_clip, dtype=torch.float64))
        if tis_cap is not None:
            surr = surr * min(float(torch.exp(old[n].double() - rollout[n].double())), tis_cap)
        term = surr
        if kl_coef > 0:
            lr = torch.clamp(float(ref[n]) - lp, -20.0, 20.0)
            kl = {"k1": -lr, "k2": 0.5 * lr * lr, "k3": torch.exp(lr) - 1 - lr}[kl_estimator]
            term = term + kl_coef * kl
        if entropy_coef:
            term = term - entropy_coef * entropy[n]
        if weights is not None:
            term = term * float(weights[n])
        terms.append(term)
    masked = [n for n in range(logp.shape[0]) if bool(mask[n])]
    zero = logp.sum() * 0
    if loss_agg == "token_mean":
        denom = num_tokens if num_tokens is not None else max(len(masked), 1)
        return sum((terms[n] for n in masked), zero) / denom
    if loss_agg == "token_sum_norm":
        return sum((terms[n] for n in masked), zero) / norm_constant
    seqs: dict[int, list[int]] = {}
    for n in masked:
        seqs.setdefault(int(seq_ids[n]), []).append(n)
    n_seq = num_sequences if num_sequences is not None else max(len(seqs), 1)
    total = zero
    for members in seqs.values():
        seq_sum = sum((terms[n] for n in members), zero)
        total = total + (seq_sum if loss_agg == "seq_mean_token_sum" else seq_sum / len(members))
    return total / n_seq
