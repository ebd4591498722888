"""linear_policy_loss against float64 full logits -> log-probs -> the float64 reference loss.

Tolerances: the log-probs are fp32 from fp32-accumulated logits (as in test_linear_logprobs), so the loss, a
weighted mean of O(1) per-token terms, matches at rtol 1e-4. Gradients carry two roundings to the input
dtype (d(logits) and the result), compared as relative Frobenius error: fp32 2e-5, fp16 2e-3, bf16 1e-2.
"""
from __future__ import annotations

import pytest
import torch
from kernel_helpers import reference_logprobs, reference_policy_loss

from raro_kernels import linear_logprobs, linear_policy_loss, policy_loss

GRAD_RTOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double().cpu() - ref).norm() / ref.norm())


def _make(n: int, h: int, v: int, dtype: torch.dtype, device: torch.device, seed: int, temperature: float,
          logit_scale: float = 2.0):
    """Inputs of a batch; logit_scale: the logits' standard deviation (larger: more peaked softmax)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(v, h, generator=g) * (logit_scale / h**0.5)
    targets = torch.randint(0, v, (n,), generator=g)
    targets[torch.randperm(n, generator=g)[:3]] = -100
    with torch.no_grad():  # old log-probs near the current ones, so ratios straddle the clip range
        lp, _ = reference_logprobs(hidden.to(dtype).double(), weight.to(dtype).double(), targets,
                                   temperature=temperature)
    old = (lp + torch.randn(n, generator=g).double() * 0.3).float()
    # Six sequences of uneven length, one of a single token.
    starts = torch.tensor([n // 10, n // 10 + 1, n // 3, (2 * n) // 3, (4 * n) // 5])
    x = {
        "hidden": hidden.to(dtype), "weight": weight.to(dtype), "targets": targets, "old": old,
        "adv": torch.randn(n, generator=g), "mask": torch.rand(n, generator=g) > 0.2,
        "ref": old + torch.randn(n, generator=g) * 0.2, "rollout": old + torch.randn(n, generator=g) * 0.3,
        "seq_ids": torch.bucketize(torch.arange(n), starts, right=True), "weights": torch.rand(n, generator=g) + 0.5,
    }
    return {k: v.to(device) for k, v in x.items()}


OPTIONS = dict(
    clip_low=0.2, clip_high=0.28, dual_clip=3.0, kl_coef=0.05, kl_estimator="k3", tis_cap=2.0,
    loss_agg="seq_mean_token_mean",
)


def _run(x, backend: str, temperature: float | torch.Tensor, entropy_coef: float, *, loss_scale: float = 1.0,
         options: dict = OPTIONS, **extra):
    """(loss, metrics, gradients of loss_scale * loss)."""
    hidden = x["hidden"].clone().requires_grad_(True)
    weight = x["weight"].clone().requires_grad_(True)
    loss, metrics = linear_policy_loss(
        hidden, weight, x["targets"], x["old"], x["adv"], x["mask"], temperature=temperature,
        return_entropy=True, entropy_coef=entropy_coef, ref_logprobs=x["ref"], rollout_logprobs=x["rollout"],
        seq_ids=x["seq_ids"], weights=x["weights"], backend=backend, **options, **extra,
    )
    return loss, metrics, torch.autograd.grad(loss * loss_scale if loss_scale != 1.0 else loss, (hidden, weight))


def _reference(x, temperature: float | torch.Tensor, entropy_coef: float, options: dict = OPTIONS):
    h64 = x["hidden"].cpu().double().requires_grad_(True)
    w64 = x["weight"].cpu().double().requires_grad_(True)
    lp, ent = reference_logprobs(h64, w64, x["targets"].cpu(), temperature=temperature)
    c = {k: v.cpu() for k, v in x.items()}
    mask = c["mask"] & (c["targets"] != -100)
    loss = reference_policy_loss(
        lp, c["old"], c["adv"], mask, ref=c["ref"], rollout=c["rollout"], seq_ids=c["seq_ids"],
        weights=c["weights"], entropy=ent, entropy_coef=entropy_coef, **options,
    )
    return loss, lp, ent, mask, torch.autograd.grad(loss, (h64, w64))


STRATEGIES = {  # one pass with several token chunks (fp32 grad-weight accumulator), one chunk, two passes
    "one_pass_chunks": dict(one_pass=True, chunk_tokens=16),
    "one_pass_single": dict(one_pass=True),
    "two_pass": dict(one_pass=False, chunk_cols=256),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_matches_float64_reference(backend: str, dtype: torch.dtype, strategy: str, device) -> None:
    if backend == "torch" and strategy != "two_pass":
        pytest.skip("the torch backend always runs two passes")
    x = _make(41, 40, 700, dtype, device, seed=41 * 700 + len(strategy), temperature=0.8)
    loss, metrics, (dh, dw) = _run(x, backend, 0.8, 0.01, **STRATEGIES[strategy])
    ref_loss, ref_lp, ref_ent, mask, (ref_dh, ref_dw) = _reference(x, 0.8, 0.01)
    torch.testing.assert_close(loss.cpu().double(), ref_loss.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(metrics["logprobs"].cpu().double(), ref_lp.detach(), rtol=1e-5, atol=1e-4)
    expected_entropy = ref_ent.detach()[mask].mean()
    torch.testing.assert_close(metrics["entropy"].cpu().double(), expected_entropy, rtol=1e-5, atol=1e-5)
    assert dh.dtype == dtype and dw.dtype == dtype
    assert _rel_err(dh, ref_dh) < GRAD_RTOL[dtype], _rel_err(dh, ref_dh)
    assert _rel_err(dw, ref_dw) < GRAD_RTOL[dtype], _rel_err(dw, ref_dw)


@pytest.mark.parametrize("loss_scale", [65536.0, 1024.0])
@pytest.mark.parametrize("strategy", [*STRATEGIES, "two_pass_one_slice"])
def test_fp16_gradients_under_a_loss_scale(backend: str, strategy: str, loss_scale: float, device) -> None:
    """fp16 with a loss scale, as under torch.amp.GradScaler (which starts at 65536): the float64 reference's
    gradients to fp16's precision. The loss is normalised by a large constant, so the unscaled gradients (~1e-6)
    lie below fp16's normal range, as they do for batches of 10^4+ tokens. The fused loss takes its gradients at
    d(loss)=1 during the forward; it used to round them to fp16 there, flushing the small ones to 0 (and, on the
    triton backend, d(logits) before its GEMMs: relative error 3e-2 to 8e-2 at scale 1024), and to multiply them
    by the loss scale cast to fp16, which for 65536 is inf (gradients inf/NaN)."""
    if backend == "torch" and not strategy.startswith("two_pass"):
        pytest.skip("the torch backend always runs two passes")
    options = dict(OPTIONS, loss_agg="token_sum_norm", norm_constant=2.0**20)
    extra = dict(one_pass=False) if strategy == "two_pass_one_slice" else STRATEGIES[strategy]
    x = _make(64, 32, 300, torch.float16, device, seed=1616, temperature=0.8)
    _, _, (dh, dw) = _run(x, backend, 0.8, 0.01, loss_scale=loss_scale, options=options, **extra)
    _, _, _, _, (ref_dh, ref_dw) = _reference(x, 0.8, 0.01, options=options)
    assert dh.dtype == dw.dtype == torch.float16
    assert bool(dh.isfinite().all()) and bool(dw.isfinite().all())
    errors = _rel_err(dh.double() / loss_scale, ref_dh), _rel_err(dw.double() / loss_scale, ref_dw)
    assert max(errors) < GRAD_RTOL[torch.float16], errors


@pytest.mark.parametrize("strategy", [*STRATEGIES, "two_pass_one_slice"])
def test_fp16_a_token_with_a_large_ratio_keeps_the_gradients_finite(backend: str, strategy: str, device) -> None:
    """One token whose policy moved far from its old log-prob (log-ratio 12, inside the clamp at 20) with a
    negative advantage: its d(loss)/d(logit) is |A| * ratio ~ 1.6e5 times its weight. The fp16 prescale was
    1 / max weight, so the triton backend rounded ~1.6e5 to fp16 (max 65504): inf in every gradient whatever the
    loss scale, where float64 and the torch backend are finite. Found by review on 2026-12-07."""
    if backend == "torch" and not strategy.startswith("two_pass"):
        pytest.skip("the torch backend always runs two passes")
    extra = dict(one_pass=False) if strategy == "two_pass_one_slice" else STRATEGIES[strategy]
    x = _make(64, 32, 300, torch.float16, device, seed=1212, temperature=1.0)
    i = int(((x["targets"] != -100) & x["mask"]).nonzero()[0, 0])
    x["old"][i] = x["old"][i] - 12.0
    x["rollout"][i] = x["old"][i]  # the engine agreed with the old policy: TIS leaves the ratio as it is
    x["adv"][i] = -1.0
    options = dict(OPTIONS, dual_clip=None, loss_agg="token_mean")  # a dual clip would cap this token's loss
    for loss_scale in (1.0, 2.0**-10):  # a smaller scale did not help: the overflow was before it arrived
        _, _, (dh, dw) = _run(x, backend, 1.0, 0.0, loss_scale=loss_scale, options=options)
        _, _, _, _, (ref_dh, ref_dw) = _reference(x, 1.0, 0.0, options=options)
        assert bool(dh.isfinite().all()) and bool(dw.isfinite().all()), (strategy, loss_scale)
        errors = _rel_err(dh.double() / loss_scale, ref_dh), _rel_err(dw.double() / loss_scale, ref_dw)
        assert max(errors) < GRAD_RTOL[torch.float16], errors


def test_nan_inputs_at_untrained_tokens_leave_the_gradients_finite(backend: str, device) -> None:
    """A NaN advantage (or reference log-prob) at a masked-out token: the loss was finite, but its gradient there
    was 0 * NaN, and through the LM head every entry of grad weight was NaN. Found by review on 2026-12-07."""
    x = _make(40, 24, 200, torch.float32, device, seed=77, temperature=1.0)
    x["mask"][5] = False
    x["adv"][5], x["ref"][5] = float("nan"), float("nan")
    loss, metrics, (dh, dw) = _run(x, backend, 1.0, 0.0)
    clean = dict(x, adv=x["adv"].clone(), ref=x["ref"].clone())
    clean["adv"][5], clean["ref"][5] = 0.0, 0.0
    loss_clean, _, (dh_clean, dw_clean) = _run(clean, backend, 1.0, 0.0)
    assert bool(loss.isfinite()) and bool(dh.isfinite().all()) and bool(dw.isfinite().all())
    assert float(dh[5].abs().max()) == 0.0
    torch.testing.assert_close((loss, dh, dw), (loss_clean, dh_clean, dw_clean), rtol=0, atol=0)


def test_no_tokens_gives_a_zero_loss(backend: str, device) -> None:
    """N = 0 (an empty micro-batch): the metrics took min/max of an empty tensor and raised."""
    hidden = torch.randn(0, 8, device=device, requires_grad=True)
    weight = torch.randn(20, 8, device=device, requires_grad=True)
    empty = torch.zeros(0, device=device)
    loss, metrics = linear_policy_loss(hidden, weight, torch.zeros(0, dtype=torch.long, device=device), empty,
                                       empty, empty.bool(), backend=backend)
    loss.backward()
    # The weight's gradient is 0, not None: an empty rank's weight took no part in its backward (review, 2026-12-07)
    assert float(loss.detach()) == 0.0 and weight.grad is not None and float(weight.grad.abs().max()) == 0.0
    assert float(metrics["ratio_min"]) == float(metrics["ratio_max"]) == 0.0
    hidden = torch.randn(0, 8, device=device)  # nothing but the weight requires a gradient: backward() still runs
    linear_policy_loss(hidden, weight, torch.zeros(0, dtype=torch.long, device=device), empty, empty, empty.bool(),
                       backend=backend)[0].backward()


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_per_token_temperatures(backend: str, strategy: str, device) -> None:
    """A temperature per token (each one-pass chunk reads its own rows of them): the float64 reference's loss,
    log-probs and gradients at each token's temperature, in bf16."""
    if backend == "torch" and strategy != "two_pass":
        pytest.skip("the torch backend always runs two passes")
    g = torch.Generator().manual_seed(8)
    temps = (0.3 + 1.7 * torch.rand(41, generator=g)).to(device)
    x = _make(41, 40, 700, torch.bfloat16, device, seed=808, temperature=0.8)
    loss, metrics, (dh, dw) = _run(x, backend, temps, 0.01, **STRATEGIES[strategy])
    ref_loss, ref_lp, _, _, (ref_dh, ref_dw) = _reference(x, temps, 0.01)
    torch.testing.assert_close(loss.cpu().double(), ref_loss.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(metrics["logprobs"].cpu().double(), ref_lp.detach(), rtol=1e-5, atol=1e-4)
    assert _rel_err(dh, ref_dh) < GRAD_RTOL[torch.bfloat16], _rel_err(dh, ref_dh)
    assert _rel_err(dw, ref_dw) < GRAD_RTOL[torch.bfloat16], _rel_err(dw, ref_dw)


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_strided_per_token_inputs(backend: str, strategy: str, device) -> None:
    """Every per-token input (targets, old/ref/rollout log-probs, advantages, mask, weights, seq_ids) given as a
    strided view, targets also as int32: the same loss and gradients as the contiguous float64 reference."""
    if backend == "torch" and strategy != "two_pass":
        pytest.skip("the torch backend always runs two passes")
    x = _make(41, 40, 700, torch.float32, device, seed=77, temperature=0.8)
    strided = {}
    for k, v in x.items():
        if k in ("hidden", "weight"):
            strided[k] = v
            continue
        v = v.to(torch.int32) if k == "targets" else v
        other = torch.zeros_like(v) if v.dtype != torch.bool else torch.ones_like(v)  # a poisoned neighbour column
        if v.is_floating_point():
            other = torch.full_like(v, float("nan"))
        wide = torch.stack([other, v], dim=1)  # the int64 zeros beside int32 targets made them int64 (review)
        strided[k] = wide[:, 1]
        assert not strided[k].is_contiguous()
    assert strided["targets"].dtype == torch.int32
    loss, metrics, (dh, dw) = _run(strided, backend, 0.8, 0.01, **STRATEGIES[strategy])
    ref_loss, ref_lp, _, _, (ref_dh, ref_dw) = _reference(x, 0.8, 0.01)
    torch.testing.assert_close(loss.cpu().double(), ref_loss.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(metrics["logprobs"].cpu().double(), ref_lp.detach(), rtol=1e-5, atol=1e-4)
    assert _rel_err(dh, ref_dh) < GRAD_RTOL[torch.float32], _rel_err(dh, ref_dh)
    assert _rel_err(dw, ref_dw) < GRAD_RTOL[torch.float32], _rel_err(dw, ref_dw)


def test_same_as_policy_loss_of_linear_logprobs(backend: str, device) -> None:
    x = _make(33, 24, 300, torch.float32, device, seed=5, temperature=1.0)
    loss, metrics, grads = _run(x, backend, 1.0, 0.0, chunk_tokens=8)
    hidden = x["hidden"].clone().requires_grad_(True)
    weight = x["weight"].clone().requires_grad_(True)
    lp = linear_logprobs(hidden, weight, x["targets"], backend=backend).logprobs
    mask = x["mask"] & (x["targets"] != -100)
    ref_loss, ref_metrics = policy_loss(
        lp, x["old"], x["adv"], mask, ref_logprobs=x["ref"], rollout_logprobs=x["rollout"], seq_ids=x["seq_ids"],
        weights=x["weights"], **OPTIONS,
    )
    ref_grads = torch.autograd.grad(ref_loss, (hidden, weight))
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for name, value in ref_metrics.items():
        torch.testing.assert_close(metrics[name], value, rtol=1e-5, atol=1e-6, msg=name)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


def test_microbatches_with_global_counts_sum_to_full_batch(device) -> None:
    x = _make(41, 16, 200, torch.float32, device, seed=9, temperature=1.0)
    opts = dict(OPTIONS, loss_agg="token_mean")
    full, _ = linear_policy_loss(x["hidden"], x["weight"], x["targets"], x["old"], x["adv"], x["mask"],
                                 ref_logprobs=x["ref"], rollout_logprobs=x["rollout"], **opts)
    n_tok = (x["mask"] & (x["targets"] != -100)).sum()
    parts = [
        linear_policy_loss(x["hidden"][sl], x["weight"], x["targets"][sl], x["old"][sl], x["adv"][sl],
                           x["mask"][sl], ref_logprobs=x["ref"][sl], rollout_logprobs=x["rollout"][sl],
                           num_tokens=n_tok, **opts)[0]
        for sl in (slice(0, 17), slice(17, 41))
    ]
    torch.testing.assert_close(parts[0] + parts[1], full, rtol=1e-5, atol=1e-6)


def test_grad_of_one_input_only_and_no_grad(backend: str, device) -> None:
    x = _make(21, 16, 130, torch.float32, device, seed=13, temperature=1.0)
    weight = x["weight"].clone().requires_grad_(True)
    loss, _ = linear_policy_loss(x["hidden"], weight, x["targets"], x["old"], x["adv"], x["mask"], backend=backend)
    (dw,) = torch.autograd.grad(2.0 * loss, (weight,))
    w64 = x["weight"].cpu().double().requires_grad_(True)
    lp, _ = reference_logprobs(x["hidden"].cpu().double(), w64, x["targets"].cpu(), temperature=1.0)
    ref = reference_policy_loss(lp, x["old"].cpu(), x["adv"].cpu(), (x["mask"] & (x["targets"] != -100)).cpu())
    (ref_dw,) = torch.autograd.grad(2.0 * ref, (w64,))
    assert _rel_err(dw, ref_dw) < 2e-5
    with torch.no_grad():
        loss_ng, metrics = linear_policy_loss(x["hidden"], weight, x["targets"], x["old"], x["adv"], x["mask"],
                                              backend=backend)
    assert loss_ng.grad_fn is None
    torch.testing.assert_close(loss_ng, loss.detach(), rtol=1e-5, atol=1e-6)
    assert "entropy" not in metrics and metrics["logprobs"].shape == (21,)


def test_second_backward_through_one_graph_is_refused(device) -> None:
    x = _make(9, 8, 50, torch.float32, device, seed=3, temperature=1.0)
    hidden = x["hidden"].clone().requires_grad_(True)
    loss, _ = linear_policy_loss(hidden, x["weight"], x["targets"], x["old"], x["adv"], x["mask"])
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_bad_inputs_raise_value_error(device) -> None:
    x = _make(9, 8, 50, torch.float32, device, seed=1, temperature=1.0)
    args = (x["hidden"], x["weight"], x["targets"], x["old"], x["adv"], x["mask"])
    with pytest.raises(ValueError, match="hidden must be"):
        linear_policy_loss(x["hidden"][None], *args[1:])
    with pytest.raises(ValueError, match="old_logprobs"):
        linear_policy_loss(*args[:3], x["old"][:5], *args[4:])
    with pytest.raises(ValueError, match="chunk_tokens"):
        linear_policy_loss(*args, chunk_tokens=0)
    with pytest.raises(ValueError, match="kl_coef"):
        linear_policy_loss(*args, kl_coef=0.1)
    with pytest.raises(ValueError, match="shaped like targets"):
        linear_policy_loss(*args, temperature=torch.ones(8, device=device))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)  # fp16: fp32 gradients, prescale
def test_no_host_sync_on_cuda(device, dtype: torch.dtype) -> None:
    x = _make(300, 64, 1000, dtype, device, seed=2, temperature=1.0)
    hidden = x["hidden"].clone().requires_grad_(True)
    _run(x, "triton", 1.0, 0.0)  # compile first: compilation may synchronise
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, _ = linear_policy_loss(
            hidden, x["weight"], x["targets"], x["old"], x["adv"], x["mask"], return_entropy=True,
            ref_logprobs=x["ref"], rollout_logprobs=x["rollout"], seq_ids=x["seq_ids"], weights=x["weights"],
            **OPTIONS,
        )
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
