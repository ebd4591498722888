"""Log-prob recompute and the GRPO update of the shared model on packed micro-batches: per-role normalisation,
PPO mini-batches (k optimizer steps per rollout round), and the update of one mini-batch."""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Sequence

import torch

from raro_fast.config import LossConfig
from raro_fast.model.policy import PolicyModel
from raro_fast.packing import PackedMicroBatch, SequenceSample
from raro_kernels import policy_loss


def split_mini_batches(samples: Sequence[SequenceSample], k: int, seed: str) -> list[list[SequenceSample]]:
    """k near-equal mini-batches of a seeded shuffle of the sequences (verl and TRL shuffle too: a GRPO group
    may straddle mini-batches, its advantages are already fixed). k = 1 keeps the batch as it is. With fewer
    sequences than k, only the non-empty ones: an empty one took an optimizer step of nothing, and its loss and
    grad norm of 0 pulled the step's means down."""
    if k == 1:
        return [list(samples)]
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    n = len(order)
    parts = [[samples[i] for i in order[p * n // k : (p + 1) * n // k]] for p in range(k)]
    return [part for part in parts if part] or [[]]


def weigh_roles(samples: Sequence[SequenceSample], *, loss_agg: str, role_constants: dict[str, float],
                parts: int = 1) -> float:
    """Normalise every role of a (mini-)batch by its own count, not by the mixed batch's: each sample's loss
    weight (its role's lambda) is multiplied, in place and once, by D / D_role, where D is what the loss divides
    everything by and D_role the same count over that role alone. Then sum_n w_n loss_n / D equals
    sum_role lambda_role * J_role, J_role the role's own normalised objective (RARO's lambda_pol J_pol +
    lambda_crit J_crit as written). With one role the factor is exactly 1.

    token_sum_norm (Dr.GRPO): D_role = `role_constants[role] / parts` (planned sequences x longest completion,
    a mini-batch's share of it), D = their sum; returned as the norm_constant to pass. Other aggregations count
    the batch itself: trained tokens (token_mean) or sequences with a trained token (seq_mean_*)."""
    if loss_agg == "token_sum_norm":
        total = sum(role_constants.values())
        for s in samples:
            s.loss_weight *= total / role_constants[s.role]
        return total / parts
    per_role: dict[str, float] = {}
    for s in samples:
        count = s.num_targets if loss_agg == "token_mean" else float(s.num_targets > 0)
        per_role[s.role] = per_role.get(s.role, 0.0) + count
    total = sum(per_role.values())
    for s in samples:
        if per_role[s.role] > 0:
            s.loss_weight *= total / per_role[s.role]
    return total / parts


@torch.no_grad()
def recompute_logprobs(
    model: PolicyModel, mbs: list[PackedMicroBatch], *, temperature: float, field: str = "old_logprobs"
) -> list[torch.Tensor]:
    """Fill `mb.<field>` with the trainer's log-probs of every target (under the current weights); also
    return the per-token entropies (0 at untrained positions) for the entropy metric."""
    entropies = []
    for mb in mbs:
        logprobs, entropy = model(mb, temperature=temperature, return_entropy=True)
        setattr(mb, field, logprobs.float())
        entropies.append(entropy)
    return entropies


class DivergedError(FloatingPointError):
    """The update made the weights non-finite (or could not make a finite step): training cannot go on."""


@dataclass
class UpdateStats:
    loss: float
    grad_norm: float
    metrics: dict[str, float]
    tokens: float = 0.0  # trained tokens the metrics average over: the global batch's, summed over ranks
    skipped: int = 0  # optimizer steps skipped for a non-finite loss or gradient
    optimizer_steps: int = 1  # optimizer steps tried (train.ppo_mini_batches)
    entropies: list[torch.Tensor] | None = None  # per micro-batch, when the update's forward filled the old log-probs


def update_mini_batches(model: PolicyModel, optimizer: torch.optim.Optimizer,
                        plan: list[tuple[list[PackedMicroBatch], float]], *, old_from_forward: bool = False,
                        **kwargs) -> UpdateStats:
    """One optimizer step per (micro-batches, norm_constant) of `plan`; the old log-probs of every micro-batch
    must have been recomputed before the first, unless `old_from_forward` (one step only; see `update_step`).
    Loss and grad norm are the mean over the steps that were not skipped (NaN if all were), the actor metrics their
    token-weighted mean. (Found by review: one skipped mini-batch made the step's loss NaN and the step count as
    skipped, though its other mini-batches had moved the weights.)"""
    if old_from_forward and len(plan) != 1:
        raise ValueError(f"old log-probs from the update's own forward need exactly one optimizer step, got {len(plan)}")
    steps = [update_step(model, optimizer, mbs, norm_constant=norm, old_from_forward=old_from_forward, **kwargs)
             for mbs, norm in plan]
    if len(steps) == 1:
        return steps[0]
    tokens = sum(u.tokens for u in steps)
    keys = {k for u in steps for k in u.metrics}
    metrics = {k: sum(u.metrics.get(k, 0.0) * u.tokens for u in steps) / tokens for k in keys} if tokens else {}
    taken = [u for u in steps if not u.skipped]
    mean = lambda values: sum(values) / len(taken) if taken else float("nan")  # noqa: E731
    return UpdateStats(loss=mean(u.loss for u in taken), grad_norm=mean(u.grad_norm for u in taken), metrics=metrics,
                       tokens=tokens, skipped=sum(u.skipped for u in steps), optimizer_steps=len(steps))


def update_step(
    model: PolicyModel,
    optimizer: torch.optim.Optimizer,
    mbs: list[PackedMicroBatch],
    *,
    loss_cfg: LossConfig,
    temperature: float,
    norm_constant: float,
    grad_clip: float,
    old_from_forward: bool = False,
) -> UpdateStats:
    """One optimizer step over all micro-batches. The loss of each micro-batch is normalised by the GLOBAL
    token/sequence counts carried by the micro-batch, so the summed gradient is the full batch's gradient on
    every rank (FSDP2 averages over ranks; we pre-multiply by world size to turn that into a sum).

    `old_from_forward`: the old log-probs are this forward's own, detached, and are written into each micro-batch
    (with the entropies returned) for the metrics. With one optimizer step per rollout round the weights here are
    the weights a recompute would have used, so the ratio is 1 and the gradient is the same: a whole forward pass
    over the batch is saved."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    # A step with nothing to train still takes part in the all-reduce below, on the model's device: NCCL reduces
    # CUDA tensors only (a CPU fallback stopped multi-GPU runs on an empty step: every RLVR sample truncated).
    device = mbs[0].input_ids.device if mbs else next(model.parameters()).device
    total_loss = torch.zeros((), device=device)
    # Token-weighted sums of the scalar metrics and the trained-token count, over this rank's micro-batches; they
    # are added over ranks below, so the averages are the global batch's (rank 0 alone writes metrics.jsonl).
    sums: dict[str, torch.Tensor] = {}
    n_tokens = torch.zeros((), device=device)
    entropies = [] if old_from_forward else None
    for mb in mbs:
        logprobs, entropy = model(mb, temperature=temperature, return_entropy=old_from_forward)
        if old_from_forward:
            mb.old_logprobs = logprobs.detach().float()
            entropies.append(entropy.detach())
        mask = mb.targets != -100
        loss, metrics = _micro_batch_loss(logprobs, mb, mask, loss_cfg, norm_constant)
        if mb.is_padding:
            # A filler micro-batch keeps collectives in step across ranks; it must add nothing.
            loss = loss * 0.0
        (loss * world).backward()
        total_loss += loss.detach()
        # A filler adds nothing, but names its metrics all the same: every rank then holds the same keys (they
        # follow the loss settings and the micro-batches' fields, which a filler copies), so the sums line up.
        n = mask.sum().float()
        for k, v in metrics.items():
            if v.dim() == 0 and k not in ("ratio_min", "ratio_max"):
                add = torch.zeros((), device=device) if mb.is_padding else v.detach().float() * n
                sums[k] = sums.get(k, 0.0) + add
        if not mb.is_padding:
            n_tokens += n
    grad_norm = _clip_grad_norm(model, grad_clip)
    keys = sorted(sums)
    # loss, trained tokens, then each metric's sum: one collective for all of them
    totals = torch.stack([total_loss.float(), n_tokens, *(sums[k] for k in keys)])
    if world > 1:
        torch.distributed.all_reduce(totals)
    totals = totals.tolist()
    total, tokens = totals[0], totals[1]
    skipped = _step_unless_non_finite(model, optimizer, total, grad_norm, world)
    metrics = {f"actor/{k}": v / tokens for k, v in zip(keys, totals[2:])} if tokens > 0 else {}
    return UpdateStats(loss=total, grad_norm=grad_norm, metrics=metrics, tokens=tokens, skipped=int(skipped),
                       entropies=entropies)


def _micro_batch_loss(logprobs: torch.Tensor, mb: PackedMicroBatch, mask: torch.Tensor, loss_cfg: LossConfig,
                      norm_constant: float) -> tuple[torch.Tensor, dict]:
    """The role-weighted policy loss of one micro-batch, and −β·KL added outside the role weights."""
    loss, metrics = policy_loss(
        logprobs,
        mb.old_logprobs,
        mb.advantages,
        mask,
        clip_low=loss_cfg.clip_low,
        clip_high=loss_cfg.clip_high,
        dual_clip=loss_cfg.dual_clip,
        ref_logprobs=mb.ref_logprobs if loss_cfg.kl_coef > 0 else None,  # for the ref_kl metric
        kl_estimator=loss_cfg.kl_estimator,
        rollout_logprobs=mb.rollout_logprobs if loss_cfg.tis_cap is not None else None,
        tis_cap=loss_cfg.tis_cap,
        loss_agg=loss_cfg.loss_agg,
        seq_ids=mb.seq_ids,
        num_sequences=mb.num_sequences,
        num_tokens=mb.num_tokens,
        norm_constant=norm_constant,
        weights=mb.loss_weights,
    )
    if loss_cfg.kl_coef > 0:
        # -beta * KL sits outside the role-weighted sum (paper): unit weights and the whole batch's normaliser.
        # It is the policy loss with zero advantages, whose surrogate is exactly 0.
        kl_loss, _ = policy_loss(
            logprobs, mb.old_logprobs, torch.zeros_like(mb.advantages), mask, ref_logprobs=mb.ref_logprobs,
            kl_coef=loss_cfg.kl_coef, kl_estimator=loss_cfg.kl_estimator, loss_agg=loss_cfg.loss_agg,
            seq_ids=mb.seq_ids, num_sequences=mb.num_sequences, num_tokens=mb.num_tokens,
            norm_constant=norm_constant,
        )
        loss = loss + kl_loss
    return loss, metrics


def _step_unless_non_finite(model: PolicyModel, optimizer: torch.optim.Optimizer, total: float, grad_norm: float,
                            world: int) -> bool:
    """The optimizer step, skipped (True) when the loss or gradient norm is not finite. Both numbers are global,
    so every rank takes the same branch."""
    if not (math.isfinite(total) and math.isfinite(grad_norm)):
        # one bad batch must not poison Adam's moments and the weights; the loop counts these
        optimizer.zero_grad(set_to_none=True)
        return True
    try:
        optimizer.step()
    except RuntimeError as e:  # torch's Adam: "value cannot be converted to type float without overflow"
        if "overflow" not in str(e):
            raise
        raise DivergedError(f"the optimizer step overflowed ({e})") from None
    if not _weights_finite(model, world):
        raise DivergedError("the weights are not finite after the optimizer step (the step was too large to "
                            "represent)")
    return False


def _weights_finite(model: torch.nn.Module, world: int) -> bool:
    local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
    ok = torch.stack([torch.isfinite(t.detach()).all() for t in local]).all().to(torch.int32)
    if world > 1:
        torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
    return bool(ok)


def _clip_grad_norm(model: torch.nn.Module, max_norm: float) -> float:
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)
