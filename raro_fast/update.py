"""Log-prob recompute and the one GRPO update of the shared model on packed micro-batches."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from raro_fast.config import LossConfig
from raro_fast.model.policy import PolicyModel
from raro_fast.packing import PackedMicroBatch
from raro_kernels import policy_loss


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


@dataclass
class UpdateStats:
    loss: float
    grad_norm: float
    metrics: dict[str, float]


def update_step(
    model: PolicyModel,
    optimizer: torch.optim.Optimizer,
    mbs: list[PackedMicroBatch],
    *,
    loss_cfg: LossConfig,
    temperature: float,
    norm_constant: float,
    grad_clip: float,
) -> UpdateStats:
    """One optimizer step over all micro-batches. The loss of each micro-batch is normalised by the GLOBAL
    token/sequence counts carried by the micro-batch, so the summed gradient is the full batch's gradient on
    every rank (FSDP2 averages over ranks; we pre-multiply by world size to turn that into a sum)."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    total_loss = torch.zeros((), device=mbs[0].input_ids.device) if mbs else torch.zeros(())
    sums: dict[str, torch.Tensor] = {}
    for mb in mbs:
        logprobs, _ = model(mb, temperature=temperature)
        mask = mb.targets != -100
        loss, metrics = policy_loss(
            logprobs,
            mb.old_logprobs,
            mb.advantages,
            mask,
            clip_low=loss_cfg.clip_low,
            clip_high=loss_cfg.clip_high,
            dual_clip=loss_cfg.dual_clip,
            ref_logprobs=mb.ref_logprobs if loss_cfg.kl_coef > 0 else None,
            kl_coef=loss_cfg.kl_coef,
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
        if mb.is_padding:
            # A filler micro-batch keeps collectives in step across ranks; it must add nothing.
            loss = loss * 0.0
        (loss * world).backward()
        total_loss += loss.detach()
        if not mb.is_padding:
            n = mask.sum()
            for k, v in metrics.items():
                if v.dim() == 0 and k not in ("ratio_min", "ratio_max"):
                    sums[k] = sums.get(k, 0.0) + v.detach().float() * n
            sums["_n"] = sums.get("_n", 0.0) + n
    grad_norm = _clip_grad_norm(model, grad_clip)
    optimizer.step()
    n = sums.pop("_n", None)
    metrics = {f"actor/{k}": float(v / n) for k, v in sums.items()} if n is not None and float(n) > 0 else {}
    if world > 1:
        loss_t = total_loss.clone()
        torch.distributed.all_reduce(loss_t)
        total = float(loss_t)
    else:
        total = float(total_loss)
    return UpdateStats(loss=total, grad_norm=grad_norm, metrics=metrics)


def _clip_grad_norm(model: torch.nn.Module, max_norm: float) -> float:
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)
