"""policy_loss against a float64 token-by-token reference: value, gradient, metrics, micro-batch splits.

Tolerances: the op computes in fp32 from fp32 inputs; a loss of O(1) summed over ~100 tokens carries relative
rounding ~1e-6, so value and gradient are compared at rtol 1e-5 (atol 1e-6).
"""
from __future__ import annotations

import math
import zlib

import pytest
import torch
from kernel_helpers import reference_policy_loss

from raro_kernels import policy_loss

N_TOKENS = 101  # odd, several sequences of uneven length


def _inputs(device: torch.device, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n = N_TOKENS
    old = -torch.rand(n, generator=g) * 4 - 0.1
    # Current log-probs near the old ones, some far enough to hit both clip edges and the dual clip.
    logp = old + torch.randn(n, generator=g) * 0.4
    lengths = [7, 13, 1, 25, 9, 17, 29]
    seq_ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    assert seq_ids.numel() == n
    out = {
        "logp": logp,
        "old": old,
        "adv": torch.randn(n, generator=g),
        "mask": torch.rand(n, generator=g) > 0.25,
        "ref": old + torch.randn(n, generator=g) * 0.3,
        "rollout": old + torch.randn(n, generator=g) * 0.5,
        "seq_ids": seq_ids,
        "weights": torch.rand(n, generator=g) * 2,
    }
    out["mask"][20:21] = False  # the 1-token sequence (after 7 + 13 tokens) has no trained token
    return {k: v.to(device) for k, v in out.items()}


CASES = {
    "token_mean": dict(),
    "asym_dual_clip": dict(clip_low=0.2, clip_high=0.28, dual_clip=3.0),
    "kl_k1": dict(kl_coef=0.05, kl_estimator="k1", ref=True),
    "kl_k2": dict(kl_coef=0.05, kl_estimator="k2", ref=True),
    "kl_k3": dict(kl_coef=0.05, kl_estimator="k3", ref=True),
    "tis": dict(tis_cap=2.0, rollout=True),
    "seq_mean_token_sum": dict(loss_agg="seq_mean_token_sum"),
    "seq_mean_token_mean": dict(loss_agg="seq_mean_token_mean", weights=True),
    "dr_grpo": dict(loss_agg="token_sum_norm", norm_constant=37.0, weights=True),
    "everything": dict(
        clip_high=0.3, dual_clip=2.5, kl_coef=0.1, ref=True, tis_cap=1.5, rollout=True,
        loss_agg="seq_mean_token_mean", weights=True,
    ),
}


def _kwargs(case: dict, x: dict[str, torch.Tensor]) -> dict:
    kw = {k: v for k, v in case.items() if k not in ("ref", "rollout", "weights")}
    if case.get("ref"):
        kw["ref_logprobs"] = x["ref"]
    if case.get("rollout"):
        kw["rollout_logprobs"] = x["rollout"]
    if case.get("weights"):
        kw["weights"] = x["weights"]
    if kw.get("loss_agg", "token_mean").startswith("seq"):
        kw["seq_ids"] = x["seq_ids"]
    return kw


def _reference_kwargs(kw: dict) -> dict:
    ref = dict(kw)
    ref["ref"] = ref.pop("ref_logprobs", None)
    ref["rollout"] = ref.pop("rollout_logprobs", None)
    return {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in ref.items()}


@pytest.mark.parametrize("name", list(CASES))
def test_loss_and_grad_match_float64_reference(name: str, device: torch.device) -> None:
    x = _inputs(device, seed=zlib.crc32(name.encode()))
    kw = _kwargs(CASES[name], x)
    logp = x["logp"].clone().requires_grad_(True)
    loss, metrics = policy_loss(logp, x["old"], x["adv"], x["mask"], **kw)
    (grad,) = torch.autograd.grad(loss, logp)

    logp64 = x["logp"].cpu().double().requires_grad_(True)
    ref = reference_policy_loss(
        logp64, x["old"].cpu(), x["adv"].cpu(), x["mask"].cpu(), **_reference_kwargs(kw)
    )
    (ref_grad,) = torch.autograd.grad(ref, logp64)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss.cpu().double(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.cpu().double(), ref_grad, rtol=1e-5, atol=1e-6)
    assert float(grad[~x["mask"]].abs().max()) == 0.0
    for v in metrics.values():
        assert v.dtype == torch.float32 and v.dim() == 0 and torch.isfinite(v)


def test_metrics_match_direct_computation(device: torch.device) -> None:
    x = _inputs(device, seed=7)
    kw = dict(clip_low=0.1, clip_high=0.15, dual_clip=2.0, ref_logprobs=x["ref"], tis_cap=1.2,
              rollout_logprobs=x["rollout"])
    _, m = policy_loss(x["logp"], x["old"], x["adv"], x["mask"], **kw)
    mk = x["mask"].cpu()
    lp, old, adv = x["logp"].cpu().double()[mk], x["old"].cpu().double()[mk], x["adv"].cpu().double()[mk]
    r = torch.exp(lp - old)
    high = (adv > 0) & (r > 1.15)
    low = (adv < 0) & (r < 0.9)
    surr = torch.maximum(-adv * r, -adv * r.clamp(0.9, 1.15))
    expected = {
        "clip_frac_high": high.double().mean(),
        "clip_frac_low": low.double().mean(),
        "clip_frac": (high | low).double().mean(),
        "dual_clip_frac": ((adv < 0) & (surr > -adv * 2.0)).double().mean(),
        "approx_kl": (r - 1 - torch.log(r)).mean(),
        "ratio_mean": r.mean(),
        "ratio_min": r.min(),
        "ratio_max": r.max(),
        "ref_kl": (lambda lr: torch.exp(lr) - 1 - lr)(x["ref"].cpu().double()[mk] - lp).mean(),
        "tis_frac_capped": (torch.exp(old - x["rollout"].cpu().double()[mk]) > 1.2).double().mean(),
    }
    assert set(m) == set(expected)
    for k, v in expected.items():
        torch.testing.assert_close(m[k].cpu().double(), v, rtol=1e-5, atol=1e-6, msg=k)
    # The inputs were drawn so that every clip statistic is exercised.
    assert 0 < float(m["clip_frac_high"]) and 0 < float(m["clip_frac_low"]) and 0 < float(m["dual_clip_frac"])


@pytest.mark.parametrize("loss_agg", ["token_mean", "seq_mean_token_sum", "seq_mean_token_mean", "token_sum_norm"])
def test_microbatches_with_global_counts_sum_to_full_batch(loss_agg: str, device: torch.device) -> None:
    x = _inputs(device, seed=3)
    common = dict(loss_agg=loss_agg, norm_constant=50.0, weights=x["weights"], seq_ids=x["seq_ids"])
    logp = x["logp"].clone().requires_grad_(True)
    full, _ = policy_loss(logp, x["old"], x["adv"], x["mask"], **common)
    (full_grad,) = torch.autograd.grad(full, logp)

    n_tok = x["mask"].sum()
    n_seq = torch.unique(x["seq_ids"][x["mask"]]).numel()
    cut = 7 + 13 + 1 + 25  # a sequence boundary
    total = torch.zeros((), device=device)
    grads = []
    for sl in (slice(0, cut), slice(cut, N_TOKENS)):
        part = logp.detach()[sl].clone().requires_grad_(True)
        loss, _ = policy_loss(
            part, x["old"][sl], x["adv"][sl], x["mask"][sl], loss_agg=loss_agg, norm_constant=50.0,
            weights=x["weights"][sl], seq_ids=x["seq_ids"][sl] - x["seq_ids"][sl][0],
            num_tokens=n_tok, num_sequences=n_seq,
        )
        total = total + loss.detach()
        grads.append(torch.autograd.grad(loss, part)[0])
    torch.testing.assert_close(total, full.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat(grads), full_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("side", ["above", "below"])
def test_log_ratios_beyond_the_limit_are_clamped_at_20(device: torch.device, side: str) -> None:
    """Log-ratios past +-20 are clamped in the ratio and in the KL estimate: the value, the gradient (0 through a
    clamp) and the ratio metric, computed by hand in float64. Above: +30 (policy) and -40 (KL, ref - logp); below:
    -30 and +30 (only the first was tested, and a KL clamped from below alone passed; found by review on
    2026-12-07). Every other input here keeps log-ratios within +-2, where a missing or different limit changes
    nothing."""
    if side == "above":  # token 0: ratio e^20, advantage > 0: the clipped branch -1.2; KL at -20: e^-20 - 1 + 20
        logp0, old0, ref0, pg0, kl0, ratio_key, ratio = -0.5, -30.5, -40.5, -1.2, math.exp(-20) + 19, "ratio_max", 20
    else:  # token 0: ratio e^-20, advantage > 0: the unclipped branch -e^-20; KL at +20: e^20 - 1 - 20
        logp0, old0, ref0, pg0, kl0, ratio_key, ratio = -30.5, -0.5, -0.5, -math.exp(-20), math.exp(20) - 21, "ratio_min", -20
    logp = torch.tensor([logp0, -2.0], device=device, requires_grad=True)
    old = torch.tensor([old0, -1.5], device=device)
    adv = torch.tensor([1.0, 0.5], device=device)
    ref = torch.tensor([ref0, -2.3], device=device)
    mask = torch.ones(2, dtype=torch.bool, device=device)
    loss, m = policy_loss(logp, old, adv, mask, ref_logprobs=ref, kl_coef=0.1)
    (grad,) = torch.autograd.grad(loss, logp)
    r1, lr1 = math.exp(-0.5), -0.3
    kl1 = math.exp(lr1) - 1 - lr1
    f64 = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    torch.testing.assert_close(loss.cpu().double(), f64((pg0 + 0.1 * kl0 - 0.5 * r1 + 0.1 * kl1) / 2), rtol=1e-6, atol=0)
    torch.testing.assert_close(grad.cpu().double(), f64([0.0, (-0.5 * r1 + 0.1 * (1 - math.exp(lr1))) / 2]),
                               rtol=1e-6, atol=0)
    torch.testing.assert_close(m[ratio_key].cpu().double(), f64(math.exp(ratio)), rtol=1e-6, atol=0)
    torch.testing.assert_close(m["ref_kl"].cpu().double(), f64((kl0 + kl1) / 2), rtol=1e-6, atol=0)


def test_no_trained_token_gives_zero_loss(device: torch.device) -> None:
    """A micro-batch without a trained token (all masked, or every target ignored) adds 0 to the loss and exactly
    0 to the gradient: a 0 / 0 token weight would be NaN, and where() passes NaN * 0 = NaN to the gradient."""
    x = _inputs(device, seed=4)
    mask = torch.zeros_like(x["mask"])
    for agg in ("token_mean", "seq_mean_token_sum", "seq_mean_token_mean"):
        logp = x["logp"].clone().requires_grad_(True)
        loss, m = policy_loss(logp, x["old"], x["adv"], mask, loss_agg=agg, seq_ids=x["seq_ids"])
        (grad,) = torch.autograd.grad(loss, logp)
        assert float(loss.detach()) == 0.0
        assert float(grad.abs().max()) == 0.0, agg
        assert all(bool(torch.isfinite(v)) for v in m.values())


def test_unmasked_nan_does_not_leak(device: torch.device) -> None:
    x = _inputs(device, seed=5)
    old = x["old"].clone()
    old[~x["mask"]] = float("nan")
    logp = x["logp"].clone().requires_grad_(True)
    loss, m = policy_loss(logp, old, x["adv"], x["mask"])
    (grad,) = torch.autograd.grad(loss, logp)
    assert torch.isfinite(loss) and bool(torch.isfinite(grad).all())
    assert all(bool(torch.isfinite(v)) for v in m.values())


def test_unmasked_nan_advantage_or_reference_does_not_leak(device: torch.device) -> None:
    """A NaN advantage or reference log-prob at an unmasked token gave d loss / d logprob = 0 * NaN = NaN there
    (the output's `where` kept it out of the loss only). Found by review on 2026-12-07."""
    x = _inputs(device, seed=6)
    for field in ("adv", "ref"):
        adv, ref = x["adv"].clone(), x["logp"].detach().clone() + 0.1
        (adv if field == "adv" else ref)[~x["mask"]] = float("nan")
        logp = x["logp"].clone().requires_grad_(True)
        loss, m = policy_loss(logp, x["old"], adv, x["mask"], ref_logprobs=ref, kl_coef=0.1)
        (grad,) = torch.autograd.grad(loss, logp)
        assert torch.isfinite(loss) and bool(torch.isfinite(grad).all()), field
        assert float(grad[~x["mask"]].abs().max()) == 0.0, field


def test_no_tokens_at_all(device: torch.device) -> None:
    """N = 0: min/max of an empty tensor raised in the metrics."""
    empty = torch.zeros(0, device=device)
    loss, m = policy_loss(empty.clone().requires_grad_(True), empty, empty, empty.bool())
    assert float(loss.detach()) == 0.0 and float(m["ratio_min"]) == float(m["ratio_max"]) == 0.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(kl_estimator="k4"), "kl_estimator"),
        (dict(loss_agg="mean"), "loss_agg"),
        (dict(loss_agg="seq_mean_token_sum"), "seq_ids"),
        (dict(loss_agg="token_sum_norm"), "norm_constant"),
        (dict(kl_coef=0.1), "ref_logprobs"),
        (dict(tis_cap=2.0), "rollout_logprobs"),
        (dict(clip_low=1.5), "clip_low"),
        (dict(dual_clip=0.5), "dual_clip"),
        (dict(num_tokens=0), "num_tokens"),
        # an infinite denominator made the loss and its gradient 0, silently (found by review on 2026-12-07)
        (dict(num_tokens=float("inf")), "num_tokens must be finite and > 0, got inf"),
        (dict(loss_agg="token_sum_norm", norm_constant=float("inf")), "norm_constant must be finite"),
    ],
)
def test_bad_options_raise_value_error(kwargs: dict, match: str, device: torch.device) -> None:
    x = _inputs(device, seed=6)
    with pytest.raises(ValueError, match=match):
        policy_loss(x["logp"], x["old"], x["adv"], x["mask"], **kwargs)


def test_bad_shapes_raise_value_error(device: torch.device) -> None:
    x = _inputs(device, seed=8)
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(x["logp"], x["old"], x["adv"][:-1], x["mask"])
    with pytest.raises(ValueError, match="mask must be bool"):
        policy_loss(x["logp"], x["old"], x["adv"], x["mask"].float())
    if device.type == "cpu":  # the range check needs a host sync, so it runs for CPU tensors only
        with pytest.raises(ValueError, match="seq_ids"):
            policy_loss(x["logp"], x["old"], x["adv"], x["mask"], loss_agg="seq_mean_token_sum",
                        seq_ids=x["seq_ids"] + 1000)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host-sync check needs CUDA")
def test_no_host_sync_on_cuda(device: torch.device) -> None:
    x = _inputs(device, seed=9)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        policy_loss(x["logp"], x["old"], x["adv"], x["mask"], dual_clip=3.0, ref_logprobs=x["ref"], kl_coef=0.1,
                    tis_cap=2.0, rollout_logprobs=x["rollout"], loss_agg="seq_mean_token_mean",
                    seq_ids=x["seq_ids"], weights=x["weights"])
    finally:
        torch.cuda.set_sync_debug_mode("default")
