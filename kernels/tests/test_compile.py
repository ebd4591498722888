"""The public functions inside torch.compile(fullgraph=True): traced without graph breaks, with the values and
gradients of eager mode; `torch.library.opcheck` on the custom ops (schema, fake implementation, autograd
registration). A new user's first try found `linear_logprobs` stopping the trace at the data-dependent target
range check."""
from __future__ import annotations

import pytest
import torch
from kernel_helpers import reference_logprobs

from raro_kernels import linear_logprobs, linear_policy_loss, policy_loss


def _inputs(device, *, lead=(3, 7), hidden_size=16, vocab=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(*lead, hidden_size, generator=g) * 2).to(device).requires_grad_(True)
    weight = torch.randn(vocab, hidden_size, generator=g).to(device).requires_grad_(True)
    targets = torch.randint(0, vocab, lead, generator=g)
    targets.view(-1)[:2] = -100  # ignored positions inside the traced graph too
    return hidden, weight, targets.to(device)


def _loss(hidden, weight, targets, temperature=0.7, backend=None):
    # backend=None is the device's default (torch on CPU): a test that takes the `backend` fixture must pass it on,
    # or every variant compiles the same path
    out = linear_logprobs(hidden, weight, targets, temperature=temperature, return_entropy=True, backend=backend)
    # different weights per position and per output, so a swapped or dropped gradient shows
    w = torch.linspace(-1.0, 2.0, targets.numel(), device=targets.device).reshape(targets.shape)
    return (out.logprobs * w).sum() + (out.entropy * w.flip(-1)).sum(), out


def test_linear_logprobs_compiles_fullgraph_with_eager_values_and_gradients(device, backend):
    torch._dynamo.reset()
    hidden, weight, targets = _inputs(device)
    compiled = torch.compile(lambda h, w, t: _loss(h, w, t, 0.7, backend), fullgraph=True, backend="aot_eager")
    loss_c, out_c = compiled(hidden, weight, targets)
    grads_c = torch.autograd.grad(loss_c, (hidden, weight))
    loss_e, out_e = _loss(hidden, weight, targets, 0.7, backend)
    grads_e = torch.autograd.grad(loss_e, (hidden, weight))
    torch.testing.assert_close(out_c.logprobs, out_e.logprobs, rtol=0, atol=0)
    torch.testing.assert_close(out_c.entropy, out_e.entropy, rtol=0, atol=0)
    for gc, ge in zip(grads_c, grads_e):
        torch.testing.assert_close(gc, ge, rtol=1e-6, atol=1e-6)
    # and both are the float64 reference's
    ref_lp, ref_ent = reference_logprobs(hidden.detach(), weight.detach(), targets, temperature=0.7)
    torch.testing.assert_close(out_c.logprobs.double(), ref_lp, rtol=0, atol=2e-5)
    torch.testing.assert_close(out_c.entropy.double(), ref_ent, rtol=0, atol=2e-5)


def test_per_token_temperatures_compile_fullgraph(device, backend):
    torch._dynamo.reset()
    hidden, weight, targets = _inputs(device)
    temps = torch.linspace(0.3, 2.0, targets.numel(), device=device).reshape(targets.shape)
    compiled = torch.compile(lambda h, w, t, temp: _loss(h, w, t, temp, backend), fullgraph=True, backend="aot_eager")
    loss_c, out_c = compiled(hidden, weight, targets, temps)
    grads_c = torch.autograd.grad(loss_c, (hidden, weight))
    loss_e, out_e = _loss(hidden, weight, targets, temps, backend)
    grads_e = torch.autograd.grad(loss_e, (hidden, weight))
    torch.testing.assert_close(out_c.logprobs, out_e.logprobs, rtol=0, atol=0)
    for gc, ge in zip(grads_c, grads_e):
        torch.testing.assert_close(gc, ge, rtol=1e-6, atol=1e-6)
    ref_lp, _ = reference_logprobs(hidden.detach(), weight.detach(), targets, temperature=temps)
    torch.testing.assert_close(out_c.logprobs.double(), ref_lp, rtol=0, atol=2e-5)


def test_linear_logprobs_compiles_with_inductor_and_dynamic_shapes(device):
    """The default compiler, and a second length without a recompile failure (packed batches change N)."""
    torch._dynamo.reset()
    compiled = torch.compile(lambda h, w, t: _loss(h, w, t), fullgraph=True, dynamic=True)
    for lead in ((3, 7), (5, 11)):
        hidden, weight, targets = _inputs(device, lead=lead)
        loss_c, _ = compiled(hidden, weight, targets)
        grads_c = torch.autograd.grad(loss_c, (hidden, weight))
        loss_e, _ = _loss(hidden, weight, targets)
        grads_e = torch.autograd.grad(loss_e, (hidden, weight))
        torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-5)
        for gc, ge in zip(grads_c, grads_e):
            torch.testing.assert_close(gc, ge, rtol=1e-5, atol=1e-5)


def test_policy_loss_compiles_fullgraph_with_eager_values():
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(1)
    logprobs = (torch.randn(40, generator=g) - 2).requires_grad_(True)
    old, adv = logprobs.detach() + 0.3 * torch.randn(40, generator=g), torch.randn(40, generator=g)
    mask = torch.rand(40, generator=g) > 0.3
    kwargs = dict(clip_low=0.2, clip_high=0.28, dual_clip=3.0, loss_agg="token_mean")
    loss_c, metrics_c = torch.compile(lambda *a: policy_loss(*a, **kwargs), fullgraph=True, backend="aot_eager")(
        logprobs, old, adv, mask)
    loss_e, metrics_e = policy_loss(logprobs, old, adv, mask, **kwargs)
    torch.testing.assert_close(loss_c, loss_e, rtol=0, atol=0)
    assert metrics_c.keys() == metrics_e.keys()
    (gc,), (ge,) = torch.autograd.grad(loss_c, logprobs), torch.autograd.grad(loss_e, logprobs)
    torch.testing.assert_close(gc, ge, rtol=0, atol=0)


def test_transposed_weight_and_hidden_compile_with_inductor(device):
    """hidden and weight given as transposed views (a head stored [H, V] and used as W.t()): the backward op's
    fake implementation gave the gradients the inputs' strides while the real op returns contiguous ones, and
    inductor asserted the strides at run time ("expected ... stride 8==1"). The compiled gradients are eager's."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(4)
    w_hv = (torch.randn(16, 50, generator=g) / 4).to(device).requires_grad_(True)  # stored [H, V]
    h_hn = torch.randn(16, 21, generator=g).to(device).requires_grad_(True)  # stored [H, N]
    targets = torch.randint(0, 50, (21,), generator=g).to(device)
    targets[5] = -100

    def f(h_hn, w_hv, targets):
        # the second uses of hidden and weight (as a tied embedding would be) make inductor generate a kernel
        # that adds the op's gradient to theirs, reading it at the strides the fake promised
        return _loss(h_hn.t(), w_hv.t(), targets)[0] + 0.1 * (w_hv * w_hv).sum() + 0.1 * (h_hn * h_hn).sum()

    assert not w_hv.t().is_contiguous() and not h_hn.t().is_contiguous()
    # No compile cache: its key does not cover the fake implementation, so a graph compiled against an older
    # fake would be reused (a stale one failed this test after the fix, a good one would hide a regression).
    import torch._inductor.config as inductor_config

    with inductor_config.patch(force_disable_caches=True):
        loss_c = torch.compile(f, fullgraph=True, backend="inductor")(h_hn, w_hv, targets)
        grads_c = torch.autograd.grad(loss_c, (h_hn, w_hv))
    loss_e = f(h_hn, w_hv, targets)
    grads_e = torch.autograd.grad(loss_e, (h_hn, w_hv))
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-5)
    for gc, ge in zip(grads_c, grads_e):
        torch.testing.assert_close(gc, ge, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("transposed", [False, True], ids=["contiguous", "transposed"])
@pytest.mark.parametrize("with_entropy", [True, False])
def test_opcheck_linear_logprobs_ops(device, backend, with_entropy, transposed):
    """opcheck compares each fake implementation's outputs (shape, dtype, strides) with the real op's; with
    `transposed`, hidden and weight are transposed views, whose strides a fake must not copy."""
    hidden, weight, targets = _inputs(device, lead=(9,))
    if transposed:
        hidden, weight = hidden.detach().t().contiguous().t(), weight.detach().t().contiguous().t()
        assert hidden.stride(0) == 1 and weight.stride(0) == 1
    inv_temp = torch.linspace(0.6, 1.8, 9, device=device)  # one per row
    torch.library.opcheck(torch.ops.raro_kernels.linear_logprobs.default,
                          (hidden, weight, targets, inv_temp, with_entropy, -100, backend, 16))
    with torch.no_grad():
        _, _, lse, raw_entropy = torch.ops.raro_kernels.linear_logprobs.default(
            hidden, weight, targets, inv_temp, with_entropy, -100, backend, 16)
    g = torch.randn(9, device=device)
    torch.library.opcheck(torch.ops.raro_kernels.linear_logprobs_backward.default,
                          (hidden.detach(), weight.detach(), targets, lse, raw_entropy, g,
                           g.flip(0) if with_entropy else g.new_empty(0), inv_temp, True, True, backend, 16))


def test_out_of_range_targets_are_still_refused_in_eager_mode(device):
    if device.type != "cpu":
        pytest.skip("the range check needs a host sync, so it runs for CPU tensors only")
    hidden, weight, targets = _inputs(device, lead=(4,))
    targets[2] = 50
    with pytest.raises(ValueError, match=r"targets\[2\] = 50 is outside \[0, 50\)"):
        linear_logprobs(hidden, weight, targets)
    # Named where the caller's tensor has it: the flat index, 7, is no position of a [2, 5] tensor (review, 2026-12-07)
    hidden, weight, targets = _inputs(device, lead=(2, 5))
    targets[1, 2] = 50
    with pytest.raises(ValueError, match=r"targets\[1, 2\] = 50 is outside \[0, 50\)"):
        linear_logprobs(hidden, weight, targets)


@pytest.mark.parametrize("loss_agg", ["token_mean", "seq_mean_token_mean"])
def test_linear_policy_loss_compiles_fullgraph_with_eager_values_and_gradients(device, backend, loss_agg):
    """Traced, the fused loss runs as the loss on `linear_logprobs` (two passes); eager, in one pass on Triton. Same
    value and gradients, with every option that adds a term: KL, truncated importance weights, entropy bonus."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(2)
    n, hidden_size, vocab = 30, 16, 50
    hidden = torch.randn(n, hidden_size, generator=g).to(device).requires_grad_(True)
    weight = torch.randn(vocab, hidden_size, generator=g).to(device).requires_grad_(True)
    targets = torch.randint(0, vocab, (n,), generator=g)
    targets[3] = -100
    with torch.no_grad():
        lp = linear_logprobs(hidden, weight, targets.to(device)).logprobs.cpu()
    per_token = dict(old_logprobs=lp + 0.2 * torch.randn(n, generator=g), advantages=torch.randn(n, generator=g),
                     mask=torch.rand(n, generator=g) > 0.2, ref_logprobs=lp + 0.1 * torch.randn(n, generator=g),
                     rollout_logprobs=lp + 0.1 * torch.randn(n, generator=g), seq_ids=torch.arange(n) // 7)
    per_token = {k: v.to(device) for k, v in per_token.items()}
    options = dict(temperature=0.8, kl_coef=0.05, tis_cap=2.0, entropy_coef=0.01, dual_clip=3.0, loss_agg=loss_agg,
                   backend=backend)

    def run(h, w, t, tok):
        return linear_policy_loss(h, w, t, tok["old_logprobs"], tok["advantages"], tok["mask"],
                                  ref_logprobs=tok["ref_logprobs"], rollout_logprobs=tok["rollout_logprobs"],
                                  seq_ids=tok["seq_ids"], **options)

    loss_c, metrics_c = torch.compile(run, fullgraph=True, backend="aot_eager")(hidden, weight, targets.to(device), per_token)
    grads_c = torch.autograd.grad(loss_c, (hidden, weight))
    loss_e, metrics_e = run(hidden, weight, targets.to(device), per_token)
    grads_e = torch.autograd.grad(loss_e, (hidden, weight))
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(metrics_c["logprobs"], metrics_e["logprobs"], rtol=1e-6, atol=1e-6)
    assert metrics_c.keys() == metrics_e.keys()
    for gc, ge in zip(grads_c, grads_e):
        torch.testing.assert_close(gc, ge, rtol=1e-5, atol=1e-6)


def test_compiled_policy_loss_keeps_a_nan_weight_at_an_untrained_token_out_of_the_gradient():
    """Traced, the entropy term's `where(mask, scale * entropy, 0)` is the backward: a NaN token weight at an
    untrained token went in as 0 * NaN and made every gradient NaN, where eager mode stays finite. Found by review
    on 2026-12-07."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(5)
    n, hidden_size, vocab = 8, 16, 37
    hidden = torch.randn(n, hidden_size, generator=g, requires_grad=True)
    weight = torch.randn(vocab, hidden_size, generator=g, requires_grad=True)
    targets = torch.randint(0, vocab, (n,), generator=g)
    old, advantages = torch.randn(n, generator=g) - 3, torch.randn(n, generator=g)
    mask = torch.ones(n, dtype=torch.bool)
    mask[5] = False
    weights = torch.ones(n)
    weights[5] = float("nan")  # an untrained token's weight, never initialised

    def run(h, w):
        return linear_policy_loss(h, w, targets, old, advantages, mask, weights=weights, entropy_coef=0.01)[0]

    eager = torch.autograd.grad(run(hidden, weight), (hidden, weight))
    compiled = torch.autograd.grad(torch.compile(run, fullgraph=True, backend="aot_eager")(hidden, weight),
                                   (hidden, weight))
    for e, c in zip(eager, compiled):
        assert torch.isfinite(e).all() and torch.isfinite(c).all()
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6)
