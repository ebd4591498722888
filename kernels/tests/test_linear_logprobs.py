"""linear_logprobs, both backends, forward and backward, against float64 full-logit references.

Tolerances, by dtype. The reference upcasts the very same inputs to float64, and both backends accumulate
the logits in fp32 (a product of two bf16/fp16 numbers is exact in fp32), so log-probs and entropies differ
only by fp32 accumulation: atol 1e-4 for every dtype. Gradients pass through d(logits) rounded to the input
dtype and come out in it, two roundings of unit 2^-24 (fp32, compared at 2e-5 relative norm: the GEMMs sum
thousands of terms), 2^-11 (fp16, 2e-3) and 2^-8 (bf16, 1e-2), as relative Frobenius error.
"""
from __future__ import annotations

import pytest
import torch
from kernel_helpers import reference_logprobs

from raro_kernels import LinearLogprobs, linear_logprobs

GRAD_RTOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (N, H, V): odd N, H not a multiple of the K block, V not a multiple of the vocab block and, in the second
# case, large enough for two vocabulary splits and several backward slices.
SHAPES = [(37, 40, 301), (45, 72, 1100)]


def _rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double().cpu() - ref).norm() / ref.norm())


def _make(n: int, h: int, v: int, dtype: torch.dtype, device: torch.device, seed: int, n_ignored: int = 3):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(v, h, generator=g) * (2.0 / h**0.5)  # logits of O(2): a peaked, non-trivial softmax
    targets = torch.randint(0, v, (n,), generator=g)
    targets[torch.randperm(n, generator=g)[:n_ignored]] = -100
    return hidden.to(device, dtype), weight.to(device, dtype), targets.to(device)


def _check(out: LinearLogprobs, hidden, weight, targets, temperature: float | torch.Tensor, *,
           grads: bool = True) -> None:
    h64 = hidden.detach().cpu().double().requires_grad_(grads)
    w64 = weight.detach().cpu().double().requires_grad_(grads)
    ref_lp, ref_ent = reference_logprobs(h64, w64, targets.cpu(), temperature=temperature)
    assert out.logprobs.dtype == torch.float32 and out.logprobs.shape == targets.shape
    torch.testing.assert_close(out.logprobs.detach().cpu().double(), ref_lp.detach(), rtol=1e-5, atol=1e-4)
    assert float(out.logprobs.detach().max()) <= 1e-5, "a log-probability above 0 (padded vocabulary counted?)"
    if out.entropy is not None:
        torch.testing.assert_close(out.entropy.detach().cpu().double(), ref_ent.detach(), rtol=1e-5, atol=1e-4)
    if not grads:
        return
    g = torch.Generator().manual_seed(1)
    g_lp = torch.randn(targets.shape, generator=g)
    g_ent = torch.randn(targets.shape, generator=g)
    total = (out.logprobs * g_lp.to(out.logprobs.device)).sum()
    ref_total = (ref_lp * g_lp.double()).sum()
    if out.entropy is not None:
        total = total + (out.entropy * g_ent.to(out.entropy.device)).sum()
        ref_total = ref_total + (ref_ent * g_ent.double()).sum()
    dh, dw = torch.autograd.grad(total, (hidden, weight))
    ref_dh, ref_dw = torch.autograd.grad(ref_total, (h64, w64))
    assert dh.dtype == hidden.dtype and dw.dtype == weight.dtype
    assert bool(torch.isfinite(dh).all()) and bool(torch.isfinite(dw).all())
    assert _rel_err(dh, ref_dh) < GRAD_RTOL[hidden.dtype], _rel_err(dh, ref_dh)
    assert _rel_err(dw, ref_dw) < GRAD_RTOL[hidden.dtype], _rel_err(dw, ref_dw)
    ignored = (targets == -100).reshape(-1)
    if out.entropy is None:  # only the log-prob path: ignored rows get exactly no gradient
        assert float(dh.reshape(-1, dh.shape[-1])[ignored].abs().max()) == 0.0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_float64_forward_and_backward(backend: str, dtype: torch.dtype, shape, device) -> None:
    n, h, v = shape
    hidden, weight, targets = _make(n, h, v, dtype, device, seed=n * v)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    out = linear_logprobs(
        hidden, weight, targets, temperature=0.7, return_entropy=True, backend=backend, chunk_cols=512
    )
    _check(out, hidden, weight, targets, 0.7)


def _token_temperatures(shape, device, seed: int) -> torch.Tensor:
    """Per-token temperatures from 0.3 to 2 (RARO's critic at 0.3 next to the policy at 1, and more)."""
    g = torch.Generator().manual_seed(seed)
    return (0.3 + 1.7 * torch.rand(shape, generator=g)).to(device)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_per_token_temperatures_match_float64(backend: str, dtype: torch.dtype, device) -> None:
    """A batch mixing temperatures: each token's log-prob and entropy at its own, and their gradients; leading
    dims and a strided temperature view too. The logits are divided in fp32, so bf16 meets the same 1e-4 as a
    single temperature does (scaling bf16 hidden states by T/T_t instead was off by up to 5e-2 here)."""
    n, h, v = SHAPES[1]
    hidden, weight, targets = _make(n, h, v, dtype, device, seed=3)
    hidden = hidden.reshape(5, 9, h).requires_grad_(True)
    weight.requires_grad_(True)
    targets = targets.reshape(5, 9)
    temps = _token_temperatures((9, 5), device, seed=4).t()  # strided: the kernels read it as contiguous rows
    out = linear_logprobs(hidden, weight, targets, temperature=temps, return_entropy=True, backend=backend,
                          chunk_cols=512)
    _check(out, hidden, weight, targets, temps)


def test_one_temperature_as_a_tensor_is_the_number_bit_for_bit(backend: str, device) -> None:
    n, h, v = SHAPES[0]
    results = []
    # 0.85: 1 / T rounded once to fp32 differs from 1 / fp32(T) (at 0.7 the two agree, so a tensor reciprocal
    # taken in fp32 went unnoticed)
    for temperature in (0.85, torch.full((n,), 0.85, dtype=torch.float64, device=device)):
        hidden, weight, targets = _make(n, h, v, torch.bfloat16, device, seed=5)
        hidden.requires_grad_(True)
        weight.requires_grad_(True)
        out = linear_logprobs(hidden, weight, targets, temperature=temperature, return_entropy=True, backend=backend)
        total = (out.logprobs * torch.linspace(-1, 1, n, device=device)).sum() + out.entropy.sum()
        results.append((out.logprobs, out.entropy, *torch.autograd.grad(total, (hidden, weight))))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_logprobs_only_leading_dims_and_strided_hidden(backend: str, device) -> None:
    b, t, h, v = 3, 11, 48, 777
    g = torch.Generator().manual_seed(2)
    wide = torch.randn(b, t, 2 * h, generator=g).to(device, torch.bfloat16)
    hidden = wide[..., :h].requires_grad_(False)  # row stride 2H: not contiguous
    hidden = hidden.detach().requires_grad_(True)
    assert not hidden.is_contiguous()
    weight = (torch.randn(v, h, generator=g) / h**0.5).to(device, torch.bfloat16).requires_grad_(True)
    targets = torch.randint(0, v, (b, t), generator=g).to(device)
    targets[0, :4] = -100
    out = linear_logprobs(hidden, weight, targets, temperature=1.3, backend=backend)
    assert out.entropy is None and out.logprobs.shape == (b, t)
    _check(out, hidden, weight, targets, 1.3)
    assert float(out.logprobs.detach()[0, :4].abs().max()) == 0.0


@pytest.mark.parametrize("layout", ["strided", "int32", "strided_int32"])
def test_strided_and_int32_targets(backend: str, layout: str, device) -> None:
    """Targets as a strided view (a column of a [N, 2] tensor) or int32: the Triton path once read a strided
    view at the wrong addresses, silently (3.9 nats off); every path must give the float64 reference."""
    n, h, v = 40, 16, 300
    hidden, weight, _ = _make(n, h, v, torch.float32, device, seed=11)
    g = torch.Generator().manual_seed(12)
    pairs = torch.randint(0, v, (n, 2), generator=g)
    pairs[::7, 0] = -100
    targets = pairs[:, 0].to(device) if layout.startswith("strided") else pairs[:, 0].contiguous().to(device)
    if layout.endswith("int32"):
        targets = pairs.to(device, torch.int32)[:, 0] if layout.startswith("strided") else targets.int()
    assert targets.is_contiguous() == (layout == "int32")
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    out = linear_logprobs(hidden, weight, targets, temperature=0.9, return_entropy=True, backend=backend,
                          chunk_cols=128)
    _check(out, hidden, weight, targets.long(), 0.9)


def test_forward_over_several_logits_slices(backend: str, device, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Triton path's forward reduces the logits SLICE_COLS columns at a time and merges the slices' statistics
    on the host; every other test here has V below one slice. A slice's statistics written over another's, or a
    target compared with the slice's own column index instead of the vocabulary's, gives wrong log-probs."""
    if backend == "triton":
        import raro_kernels._triton_lm_head as triton_lm_head

        monkeypatch.setattr(triton_lm_head, "SLICE_COLS", 128)  # V = 300: slices of 128, 128 and 44 columns
    hidden, weight, targets = _make(23, 16, 300, torch.float32, device, seed=21)
    targets[:6] = torch.tensor([0, 127, 128, 255, 256, 299], device=device)  # each slice's first and last column
    temps = _token_temperatures((23,), device, seed=22)
    out = linear_logprobs(hidden, weight, targets, temperature=temps, return_entropy=True, backend=backend,
                          chunk_cols=128)  # the torch path's tiles, too
    _check(out, hidden, weight, targets, temps, grads=False)


def test_out_of_range_targets_give_nan_where_unchecked(backend: str, device) -> None:
    """Traced (torch.compile) or on CUDA no range check runs: the op itself must turn a target outside [0, V) into
    NaN. Without that, no vocabulary column matches it, z[target] reads as 0, and -logsumexp passes for a
    plausible log-prob. The other rows, ignored ones included, keep their values."""
    hidden, weight, targets = _make(9, 16, 50, torch.float32, device, seed=23, n_ignored=0)
    targets[2], targets[5], targets[7] = 50, -5, -100
    inv_temp = torch.full((9,), 1 / 0.8, device=device)
    logprobs, entropy, _, _ = torch.ops.raro_kernels.linear_logprobs.default(
        hidden, weight, targets, inv_temp, True, -100, backend, 32)
    bad = torch.zeros(9, dtype=torch.bool)
    bad[[2, 5]] = True
    assert bool(logprobs.cpu()[bad].isnan().all())
    valid = torch.where(bad.to(device), 0, targets)
    ref_lp, ref_ent = reference_logprobs(hidden.cpu().double(), weight.cpu().double(), valid.cpu(), temperature=0.8)
    torch.testing.assert_close(logprobs.cpu()[~bad].double(), ref_lp[~bad], rtol=1e-5, atol=1e-4)
    assert float(logprobs[7]) == 0.0 and float(entropy[7]) == 0.0
    torch.testing.assert_close(entropy.cpu()[[0, 1, 3, 4, 6, 8]].double(), ref_ent[[0, 1, 3, 4, 6, 8]],
                               rtol=1e-5, atol=1e-4)


def test_ignore_index_inside_the_vocabulary(backend: str, device) -> None:
    """ignore_index may be a vocabulary id (a pad token, here 7) rather than the usual -100: exactly the tokens
    equal to it give 0 and no gradient, and a negative target is still out of range, not ignored."""
    hidden, weight, targets = _make(21, 16, 90, torch.float32, device, seed=27, n_ignored=0)
    targets[[1, 4, 9]] = 7
    targets[targets == 8] = 6  # keep ids next to the ignored one, so an off-by-one shows
    targets[[2, 3]] = torch.tensor([8, 6], device=device)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    out = linear_logprobs(hidden, weight, targets, temperature=0.9, return_entropy=True, ignore_index=7,
                          backend=backend, chunk_cols=32)
    h64 = hidden.detach().cpu().double().requires_grad_(True)
    w64 = weight.detach().cpu().double().requires_grad_(True)
    ref_lp, ref_ent = reference_logprobs(h64, w64, targets.cpu(), temperature=0.9, ignore_index=7)
    torch.testing.assert_close(out.logprobs.detach().cpu().double(), ref_lp.detach(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out.entropy.detach().cpu().double(), ref_ent.detach(), rtol=1e-5, atol=1e-4)
    w = torch.linspace(-1.0, 1.0, 21)
    dh, dw = torch.autograd.grad((out.logprobs * w.to(device)).sum() + out.entropy.sum(), (hidden, weight))
    ref_dh, ref_dw = torch.autograd.grad((ref_lp * w.double()).sum() + ref_ent.sum(), (h64, w64))
    assert _rel_err(dh, ref_dh) < 2e-5 and _rel_err(dw, ref_dw) < 2e-5
    assert float(dh[[1, 4, 9]].abs().max()) == 0.0
    with pytest.raises(ValueError, match=r"targets\[0\] = -100 is outside"):
        linear_logprobs(hidden, weight, torch.where(torch.arange(21, device=device) == 0, -100, targets),
                        ignore_index=7, backend=backend)


def test_torch_path_over_several_row_chunks(device) -> None:
    """The PyTorch path walks the rows `rows_per_chunk` at a time (1024 by default, more than any other test's N):
    statistics and both gradients of every chunk, the last one partial, each row at its own temperature."""
    from raro_kernels._chunked_torch import lm_head_grads_torch, lm_head_stats_torch

    n, h, v = 45, 16, 300
    hidden, weight, targets = _make(n, h, v, torch.float32, device, seed=24, n_ignored=0)
    targets[:6] = torch.tensor([0, 127, 128, 255, 256, 299], device=device)  # each tile's first and last column
    temps = _token_temperatures((n,), device, seed=25)
    inv_temp = (1.0 / temps.double()).float()
    chunks = dict(rows_per_chunk=16, cols_per_chunk=128)
    stats = lm_head_stats_torch(hidden, weight, targets, inv_temp_N=inv_temp, with_entropy=True, **chunks)
    h64 = hidden.cpu().double().requires_grad_(True)
    w64 = weight.cpu().double().requires_grad_(True)
    z64 = h64 @ w64.T * inv_temp.cpu().double()[:, None]
    lse64 = torch.logsumexp(z64, dim=-1)
    zt64 = z64.gather(1, targets.cpu()[:, None]).squeeze(1)
    ent64 = lse64 - (torch.softmax(z64, dim=-1) * z64).sum(-1)
    for got, ref in ((stats.lse, lse64), (stats.target_logit, zt64), (stats.entropy, ent64)):
        torch.testing.assert_close(got.cpu().double(), ref.detach(), rtol=1e-5, atol=1e-4)
    g = torch.Generator().manual_seed(26)
    g_lp, g_ent = torch.randn(n, generator=g), torch.randn(n, generator=g)
    dh, dw = lm_head_grads_torch(hidden, weight, targets, stats.lse, stats.entropy, g_lp.to(device),
                                 g_ent.to(device), inv_temp_N=inv_temp, need_hidden=True, need_weight=True, **chunks)
    ref_dh, ref_dw = torch.autograd.grad(((zt64 - lse64) * g_lp.double() + ent64 * g_ent.double()).sum(), (h64, w64))
    assert _rel_err(dh, ref_dh) < 2e-5, _rel_err(dh, ref_dh)
    assert _rel_err(dw, ref_dw) < 2e-5, _rel_err(dw, ref_dw)


def test_large_logits_stay_finite(backend: str, device) -> None:
    """Logits of several hundred: the online softmax must not overflow or lose the target. Tiles of 160 columns
    (the torch path; the backward's slices on Triton): the last one, of 13, has a maximum some 100 below the
    row's, so rescaling by a tile's own maximum instead of the running one overflows exp."""
    hidden, weight, targets = _make(19, 32, 333, torch.float32, device, seed=5)
    hidden = (hidden * 60).requires_grad_(True)
    weight.requires_grad_(True)
    out = linear_logprobs(hidden, weight, targets, return_entropy=True, backend=backend, chunk_cols=160)
    assert bool(torch.isfinite(out.logprobs).all()) and bool(torch.isfinite(out.entropy).all())
    _check(out, hidden, weight, targets, 1.0)


# The interpreter computes the dz kernels' masked padding lanes too (never stored): exp overflows there, harmlessly,
# and the inf that makes gives nan in what follows.
@pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")
def test_logits_far_below_zero(backend: str, device) -> None:
    """Every logit near -120 (one hidden unit times a weight column of -1): exp of a logit underflows fp32, so the
    softmax must be taken relative to the row's maximum, with padding columns never counted in that maximum."""
    hidden, weight, targets = _make(19, 32, 333, torch.float32, device, seed=28)
    hidden[:, 0] = 120.0
    weight[:, 0] = -1.0
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    out = linear_logprobs(hidden, weight, targets, return_entropy=True, backend=backend, chunk_cols=160)
    _check(out, hidden, weight, targets, 1.0)


def test_tied_embedding_gradients_accumulate(backend: str, device) -> None:
    """The weight feeds the hidden states (embedding) and the head: both gradient paths must add up."""
    n, h, v = 29, 24, 150
    g = torch.Generator().manual_seed(11)
    weight = (torch.randn(v, h, generator=g) * 0.4).to(device).requires_grad_(True)
    ids = torch.randint(0, v, (n,), generator=g).to(device)
    targets = torch.randint(0, v, (n,), generator=g).to(device)
    mix = torch.randn(h, h, generator=g).to(device) / h**0.5
    hidden = torch.tanh(torch.nn.functional.embedding(ids, weight) @ mix)
    out = linear_logprobs(hidden, weight, targets, return_entropy=True, backend=backend)
    (out.logprobs.sum() + 0.5 * out.entropy.sum()).backward()

    w64 = weight.detach().cpu().double().requires_grad_(True)
    h64 = torch.tanh(torch.nn.functional.embedding(ids.cpu(), w64) @ mix.cpu().double())
    lp, ent = reference_logprobs(h64, w64, targets.cpu(), temperature=1.0)
    (lp.sum() + 0.5 * ent.sum()).backward()
    assert _rel_err(weight.grad, w64.grad) < 2e-5


def test_backends_agree_and_no_grad_builds_no_graph(backend: str, device) -> None:
    # Each backend named explicitly: the default is "torch" on CPU, so comparing the default with "torch" there
    # compared the PyTorch path with itself.
    hidden, weight, targets = _make(33, 40, 500, torch.float32, device, seed=12)
    hidden.requires_grad_(True)
    with torch.no_grad():
        out = linear_logprobs(hidden, weight, targets, return_entropy=True, backend=backend)
    assert out.logprobs.grad_fn is None and out.entropy.grad_fn is None
    ref = linear_logprobs(hidden, weight, targets, return_entropy=True, backend="torch")
    torch.testing.assert_close(out.logprobs, ref.logprobs.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.entropy, ref.entropy.detach(), rtol=1e-5, atol=1e-5)
    _check(out, hidden, weight, targets, 1.0, grads=False)  # and both agree with float64, not merely each other


def test_empty_input(backend: str, device) -> None:
    hidden = torch.randn(0, 16, device=device, requires_grad=True)
    weight = torch.randn(40, 16, device=device)
    out = linear_logprobs(hidden, weight, torch.zeros(0, dtype=torch.long, device=device), backend=backend,
                          return_entropy=True)
    assert out.logprobs.shape == (0,) and out.entropy.shape == (0,)
    out.logprobs.sum().backward()
    # The weight is in the graph too (found by review on 2026-12-07: it got no gradient, and with a hidden that
    # needs none, backward() raised).
    weight.requires_grad_(True)
    out = linear_logprobs(hidden.detach().reshape(2, 0, 16), weight, torch.zeros(2, 0, dtype=torch.long,
                          device=device), backend=backend)
    out.logprobs.sum().backward()
    assert weight.grad is not None and float(weight.grad.abs().max()) == 0.0


def test_bad_inputs_raise_value_error() -> None:
    h = torch.randn(5, 8)
    w = torch.randn(30, 8)
    t = torch.randint(0, 30, (5,))
    cases = [
        (dict(hidden=h, weight=w.double(), targets=t), "dtype"),
        (dict(hidden=h, weight=torch.randn(30, 9), targets=t), "hidden size"),
        (dict(hidden=h, weight=w, targets=t[:4]), "targets shape"),
        (dict(hidden=h, weight=w, targets=t.float()), "targets must be"),
        (dict(hidden=h, weight=w, targets=t, temperature=0.0), "temperature"),
        (dict(hidden=h, weight=w, targets=t, temperature=float("inf")), "temperature must be finite and > 0, got inf"),
        (dict(hidden=h, weight=w, targets=t, temperature=torch.ones(4)), r"shaped like targets \(5,\)"),
        (dict(hidden=h, weight=w, targets=t, temperature=torch.ones(5, dtype=torch.long)), "floating point"),
        (dict(hidden=h, weight=w, targets=t, temperature=torch.tensor([1.0, 0.5, 0.0, 1.0, 1.0])),
         "finite and > 0 at every token, got 0.0 at flat index 2"),
        (dict(hidden=h, weight=w, targets=t, temperature=torch.tensor([1.0, float("nan"), 1.0, 1.0, 1.0])),
         "at flat index 1"),
        (dict(hidden=h, weight=w, targets=t, temperature=torch.tensor([1.0, 1.0, 1.0, float("inf"), 1.0])),
         "got inf at flat index 3"),
        (dict(hidden=h, weight=w, targets=t, backend="cuda"), "backend"),
        (dict(hidden=h, weight=w, targets=t, chunk_cols=0), "chunk_cols must be >= 1, got 0"),
        (dict(hidden=h, weight=w, targets=torch.tensor([0, 1, 30, 2, -100])), r"targets\[2\] = 30"),
        (dict(hidden=h[0], weight=w, targets=t[0]), "hidden must be"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            linear_logprobs(**kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("vocab", [151936, 152064, 50257, 32000])
def test_real_vocab_sizes_on_cuda(vocab: int, backend: str, device) -> None:
    hidden, weight, targets = _make(257, 128, vocab, torch.bfloat16, device, seed=vocab)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    out = linear_logprobs(hidden, weight, targets, temperature=0.9, return_entropy=True, backend=backend)
    _check(out, hidden, weight, targets, 0.9)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_peak_memory_within_stated_bound_on_cuda(device) -> None:
    """Measured: forward+backward extra memory stays under the docstring's bound, far below the logits."""
    n, h, v = 4096, 256, 32000
    hidden, weight, targets = _make(n, h, v, torch.bfloat16, device, seed=3)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    linear_logprobs(hidden, weight, targets, return_entropy=True).logprobs.sum().backward()  # warm-up
    hidden.grad = weight.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = linear_logprobs(hidden, weight, targets, return_entropy=True)
    (out.logprobs.sum() + out.entropy.sum()).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    grads = hidden.numel() * 2 + weight.numel() * 2
    # fp32 logits slice (N x 4096, dz written over it) + fp32 grad-hidden accumulator + per-row statistics
    # (<= 40 slices x 4 floats), plus the gradients themselves.
    bound = n * 4096 * 4 + n * h * 4 + 200 * n * 4 + grads + (1 << 20)
    assert extra <= bound, (extra, bound)
    assert extra < 0.2 * n * v * 4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_the_backwards_gemm_reads_no_padding_past_a_views_last_column(dtype, device) -> None:
    """The backward's dz is a view narrower than its buffer (an in-place 16-bit view over fp32 logits, or a row
    padded to 8). torch's CPU 16-bit GEMM on AVX-512 read that padding: NaN there made whole rows NaN."""
    pytest.importorskip("triton")
    from raro_kernels._triton_lm_head import mm_

    g = torch.Generator().manual_seed(3)
    buf = torch.full((33, 1560), float("nan"), dtype=dtype)
    buf[:, :777] = torch.randn(33, 777, generator=g).to(dtype)
    a = buf[:, :777].to(device)
    b = torch.randn(777, 48, generator=g).to(device, dtype)
    ref = a.double() @ b.double()
    for got in (mm_(a, b), mm_(a.t(), torch.randn(33, 48, generator=g).to(device, dtype))):
        assert bool(torch.isfinite(got).all())
    torch.testing.assert_close(mm_(a, b).double(), ref, rtol=2e-2, atol=0.5)
