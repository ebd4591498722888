"""LM-head log-probs and loss: forward and forward+backward time and peak extra memory, side by side.

Rows per shape (bf16, V = 151,936 on CUDA):
- floor: the three cuBLAS products alone (logits = h W^T; grad h = dZ W; grad W = dZ^T h) on preallocated
  [N, V] buffers; forward floor = the first product alone. Every other row is reported as a ratio to it.
- eager: logits -> log_softmax (fp32) -> gather; torch.compile of the same function;
- Liger-Kernel's fused linear cross entropy and Cut-Cross-Entropy (reduction="sum"), where installed;
- raro linear_logprobs (+ entropy), raro linear_policy_loss one-pass (6NHV) and two-pass (8NHV).
Peak extra memory = peak allocated during one forward+backward minus what was allocated before (inputs); it
includes the returned gradients (grad h and grad W in bf16, which every method must produce); "beyond grads"
subtracts them and is given as a percentage of the fp32 logits N x V x 4 bytes. The last column is each method's
max |log-prob - float64 reference| on the first 1024 tokens (the cross-entropy methods: -loss, reduction "none"):
the precision that fp32 logits buy, beside the speed.
On a machine without CUDA it runs a small smoke version (CPU, torch backend) in a few seconds.
Set RARO_BENCH_SHAPES="4096x3584,16384x1536" to restrict the CUDA shapes (N x H).
"""
from __future__ import annotations

import gc
import os
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from harness import Measurement, device_description, measure

from raro_kernels import linear_logprobs, linear_policy_loss

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CUDA_SHAPES = [(n, h, 151936) for n in (4096, 16384, 65536) for h in (1536, 3584)]
CPU_SHAPES = [(257, 64, 1000)]


@dataclass
class Inputs:
    hidden: torch.Tensor  # [N, H], requires grad
    weight: torch.Tensor  # [V, H], requires grad
    targets: torch.Tensor
    old: torch.Tensor
    adv: torch.Tensor
    mask: torch.Tensor


def _shapes() -> list[tuple[int, int, int]]:
    if DEVICE.type != "cuda":
        return CPU_SHAPES
    spec = os.environ.get("RARO_BENCH_SHAPES")
    if not spec:
        return CUDA_SHAPES
    return [(int(a), int(b), 151936) for a, b in (s.split("x") for s in spec.split(","))]


def _inputs(n: int, h: int, v: int) -> Inputs:
    dtype = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
    g = torch.Generator(device=DEVICE).manual_seed(n + h)
    hidden = torch.randn(n, h, device=DEVICE, generator=g).to(dtype).requires_grad_(True)
    weight = (torch.randn(v, h, device=DEVICE, generator=g) / h**0.5).to(dtype).requires_grad_(True)
    targets = torch.randint(0, v, (n,), device=DEVICE, generator=g)
    old = -torch.rand(n, device=DEVICE, generator=g) * 10 - 8
    return Inputs(hidden, weight, targets, old, torch.randn(n, device=DEVICE, generator=g), targets >= 0)


def _eager_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = hidden @ weight.T
    return torch.log_softmax(logits.float(), dim=-1).gather(1, targets[:, None]).squeeze(1)


_compiled_logprobs = None


def _compiled(hidden, weight, targets):
    global _compiled_logprobs
    if _compiled_logprobs is None:
        _compiled_logprobs = torch.compile(_eager_logprobs, dynamic=True)
    return _compiled_logprobs(hidden, weight, targets)


def _grads(loss: torch.Tensor, x: Inputs) -> None:
    torch.autograd.grad(loss, (x.hidden, x.weight))


Method = tuple[Callable[[Inputs], object] | None, Callable[[Inputs], object] | None]


def _methods() -> dict[str, Method]:
    """name -> (forward-only fn, forward+backward fn); forward-only runs under no_grad on detached inputs."""
    methods: dict[str, Method] = {
        "eager": (lambda x: _eager_logprobs(x.hidden, x.weight, x.targets),
                  lambda x: _grads(_eager_logprobs(x.hidden, x.weight, x.targets).sum(), x)),
    }
    if DEVICE.type == "cuda":
        methods["torch.compile"] = (lambda x: _compiled(x.hidden, x.weight, x.targets),
                                    lambda x: _grads(_compiled(x.hidden, x.weight, x.targets).sum(), x))
        try:
            from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy as liger

            methods["liger FLCE"] = (lambda x: liger(x.hidden, x.weight, x.targets, reduction="sum"),
                                     lambda x: _grads(liger(x.hidden, x.weight, x.targets, reduction="sum"), x))
        except ImportError:
            pass
        try:
            from cut_cross_entropy import linear_cross_entropy as cce

            methods["cut-cross-entropy"] = (lambda x: cce(x.hidden, x.weight, x.targets, reduction="sum"),
                                            lambda x: _grads(cce(x.hidden, x.weight, x.targets, reduction="sum"), x))
        except ImportError:
            pass
    methods["raro linear_logprobs"] = (
        lambda x: linear_logprobs(x.hidden, x.weight, x.targets),
        lambda x: _grads(linear_logprobs(x.hidden, x.weight, x.targets).logprobs.sum(), x),
    )
    methods["raro linear_logprobs +entropy"] = (
        lambda x: linear_logprobs(x.hidden, x.weight, x.targets, return_entropy=True),
        lambda x: _grads(_sum_both(linear_logprobs(x.hidden, x.weight, x.targets, return_entropy=True)), x),
    )
    variants = (("1-pass", True, None), ("1-pass chunk 4096", True, 4096), ("2-pass", False, None))
    for label, one_pass, chunk in variants:
        methods[f"raro linear_policy_loss {label}"] = (
            None,
            lambda x, one_pass=one_pass, chunk=chunk: _grads(
                linear_policy_loss(x.hidden, x.weight, x.targets, x.old, x.adv, x.mask, one_pass=one_pass,
                                   chunk_tokens=chunk)[0], x
            ),
        )
    return methods


ACCURACY_ROWS = 1024  # tokens whose log-probs are checked against float64 (their fp64 logits: 1.2 GB at V = 151,936)


def _per_token_logprobs() -> dict[str, Callable[[Inputs], torch.Tensor]]:
    """name -> per-token log-probs [N] fp32 of the method (no grad), for the accuracy column; the cross-entropy
    methods give them as -loss with reduction="none"."""
    fns: dict[str, Callable[[Inputs], torch.Tensor]] = {
        "eager": lambda x: _eager_logprobs(x.hidden, x.weight, x.targets),
        "torch.compile": lambda x: _compiled(x.hidden, x.weight, x.targets),
        "raro linear_logprobs": lambda x: linear_logprobs(x.hidden, x.weight, x.targets).logprobs,
        "raro linear_logprobs +entropy": lambda x: linear_logprobs(x.hidden, x.weight, x.targets,
                                                                   return_entropy=True).logprobs,
    }
    for label, one_pass, chunk in (("1-pass", True, None), ("1-pass chunk 4096", True, 4096), ("2-pass", False, None)):
        fns[f"raro linear_policy_loss {label}"] = lambda x, one_pass=one_pass, chunk=chunk: linear_policy_loss(
            x.hidden, x.weight, x.targets, x.old, x.adv, x.mask, one_pass=one_pass, chunk_tokens=chunk)[1]["logprobs"]
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy as liger

        fns["liger FLCE"] = lambda x: -liger(x.hidden, x.weight, x.targets, reduction="none").float()
    except ImportError:
        pass
    try:
        from cut_cross_entropy import linear_cross_entropy as cce

        fns["cut-cross-entropy"] = lambda x: -cce(x.hidden, x.weight, x.targets, reduction="none").float()
    except ImportError:
        pass
    return fns


def _max_error_vs_float64(fn: Callable[[Inputs], torch.Tensor], x: Inputs) -> str:
    """max |log-prob - float64 reference| over the first ACCURACY_ROWS tokens, the method run on those rows."""
    rows = min(ACCURACY_ROWS, x.hidden.shape[0])
    h, w, t = x.hidden.detach()[:rows], x.weight.detach(), x.targets[:rows]
    sub = Inputs(h, w, t, x.old[:rows], x.adv[:rows], x.mask[:rows])
    try:
        with torch.no_grad():
            ours = fn(sub).double()
            ref = torch.log_softmax(h.double() @ w.double().T, dim=-1).gather(1, t[:, None]).squeeze(1)
    except Exception as e:  # a method that cannot give per-token values says so in the table
        return f"n/a ({type(e).__name__})"
    return f"{(ours - ref).abs().max().item():.1e}"


def _sum_both(out) -> torch.Tensor:
    return out.logprobs.sum() + out.entropy.sum()


def _floor(n: int, h: int, v: int, x: Inputs) -> tuple[Callable[[], object], Callable[[], object]]:
    g = torch.Generator(device=DEVICE).manual_seed(7)
    logits = torch.empty(n, v, device=DEVICE, dtype=x.hidden.dtype)
    dlogits = torch.randn(n, v, device=DEVICE, dtype=x.hidden.dtype, generator=g)  # random, never zeros
    dh = torch.empty(n, h, device=DEVICE, dtype=x.hidden.dtype)
    dw = torch.empty(v, h, device=DEVICE, dtype=x.hidden.dtype)
    hd, wd = x.hidden.detach(), x.weight.detach()

    def fwd() -> None:
        torch.mm(hd, wd.T, out=logits)

    def fwd_bwd() -> None:
        torch.mm(hd, wd.T, out=logits)
        torch.mm(dlogits, wd, out=dh)
        torch.mm(dlogits.T, hd, out=dw)

    return fwd, fwd_bwd


def _try_measure(fn: Callable[[], object], reps: int) -> Measurement | str:
    try:
        return measure(fn, device=DEVICE, reps=reps)
    except torch.OutOfMemoryError:
        return "OOM"
    finally:
        gc.collect()
        if DEVICE.type == "cuda":
            torch.cuda.empty_cache()


def _fmt_ms(m: Measurement | str | None) -> str:
    return "-" if m is None else m if isinstance(m, str) else f"{m.median_ms:.2f}"


def _fmt_ratio(m: Measurement | str | None, floor: Measurement) -> str:
    return "-" if m is None or isinstance(m, str) else f"{m.median_ms / floor.median_ms:.2f}x"


def test_bench_lm_head(bench_table) -> None:
    methods = _methods()
    accuracy = _per_token_logprobs()
    columns = ["N x H x V", "method", "fwd ms", "fwd/floor", "fwd+bwd ms", "fwd+bwd/floor", "peak extra MB",
               "beyond grads % fp32 logits", "max |logprob - fp64|"]
    rows = []
    for n, h, v in _shapes():
        x = _inputs(n, h, v)
        reps = 3 if n * h * v > 2e13 else 5
        floor_fwd_fn, floor_fb_fn = _floor(n, h, v, x)
        floor_fwd = measure(floor_fwd_fn, device=DEVICE, reps=reps)
        floor_fb = measure(floor_fb_fn, device=DEVICE, reps=reps)
        del floor_fwd_fn, floor_fb_fn
        gc.collect()
        if DEVICE.type == "cuda":
            torch.cuda.empty_cache()
        label = f"{n} x {h} x {v}"
        rows.append([label, "floor: 3 cuBLAS GEMMs", _fmt_ms(floor_fwd), "1.00x", _fmt_ms(floor_fb), "1.00x", "-", "-",
                     "-"])
        grads_bytes = (n * h + v * h) * x.hidden.element_size()
        for name, (fwd, fwd_bwd) in methods.items():
            m_fwd = None
            if fwd is not None:
                detached = Inputs(x.hidden.detach(), x.weight.detach(), x.targets, x.old, x.adv, x.mask)

                def run_fwd(fwd=fwd, detached=detached):
                    with torch.no_grad():
                        return fwd(detached)

                m_fwd = _try_measure(run_fwd, reps)
            m_fb = _try_measure(lambda fwd_bwd=fwd_bwd: fwd_bwd(x), reps)
            mem = beyond = "-"
            if isinstance(m_fb, Measurement) and m_fb.peak_extra_bytes is not None:
                mem = f"{m_fb.peak_extra_bytes / 2**20:.0f}"
                beyond = f"{100 * max(m_fb.peak_extra_bytes - grads_bytes, 0) / (n * v * 4):.2f}"
            error = _max_error_vs_float64(accuracy[name], x) if name in accuracy else "-"
            rows.append([label, name, _fmt_ms(m_fwd), _fmt_ratio(m_fwd, floor_fwd), _fmt_ms(m_fb),
                         _fmt_ratio(m_fb, floor_fb), mem, beyond, error])
            print(rows[-1], flush=True)  # progress, in case a run is cut short
        del x
        gc.collect()
    dtype = "bf16" if DEVICE.type == "cuda" else "fp32 (CPU smoke)"
    bench_table(f"LM head log-probs / loss, {dtype}, {device_description()}", columns, rows)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="memory accounting needs CUDA")
def test_bench_forward_memory(bench_table) -> None:
    """Peak extra memory of the no-grad forward (old/ref log-prob recompute) with entropy."""
    rows = []
    for n, h, v in _shapes()[:2]:
        x = _inputs(n, h, v)
        hd, wd = x.hidden.detach(), x.weight.detach()
        m = measure(lambda: linear_logprobs(hd, wd, x.targets, return_entropy=True), device=DEVICE, reps=3)
        rows.append([f"{n} x {h} x {v}", f"{m.median_ms:.2f}", f"{m.peak_extra_bytes / 2**20:.1f}",
                     f"{100 * m.peak_extra_bytes / (n * v * 4):.3f}"])
    bench_table("raro linear_logprobs forward (no grad, with entropy)", ["N x H x V", "ms", "peak extra MB",
                "% fp32 logits"], rows)
