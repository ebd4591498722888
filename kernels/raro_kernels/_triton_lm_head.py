"""Triton kernels of the LM-head ops and their host functions (the "triton" backend).

The logits products run on cuBLAS with fp32 output (`torch.mm(..., out_dtype=torch.float32)`: bf16/fp16
operands, fp32 accumulation and result), one bounded slice at a time; Triton kernels do everything per row:
- `_row_stats_kernel`: online softmax statistics of one row of a logits slice (running max, sum of exp,
  entropy accumulator, target logit), merged across slices on the host. Only columns < the slice's width are
  read, so padding never adds exp(0) to the normaliser.
- `_dz_from_logits_kernel`: d(loss)/d(logits) of a row from its stored fp32 logits, the per-row lse, entropy
  and upstream gradients, written in place over them in the input dtype; cuBLAS then gives grad hidden =
  dz @ W and grad weight = dz.T @ hidden.
A second route, kept for GPUs/torch builds without fp32-output GEMMs and for comparison, fuses the logits
product into Triton: `_stats_kernel` (tl.dot tiles + online statistics, no logits written) and `_dz_kernel`
(recomputed tile -> dz). On an H100 it measured at 300-430 TFLOP/s against cuBLAS's ~775 (benchmarks/
RESULTS.md), hence cuBLAS by default. All kernels: fp32 math, 64-bit row offsets, 1-D grids (no 65,535 limit).
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from raro_kernels._common import RowStats, alloc, round_up

# Read when this module is imported, which is when Triton decorates the kernels below and reads it too.
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# "cublas": logits by cuBLAS into fp32 slices + Triton row kernels; "triton": fused tl.dot kernels.
LOGITS_GEMM = "cublas"
# Vocabulary columns per logits slice of the cuBLAS route (N x 4096 fp32 at a time).
SLICE_COLS = 4096
# The logits of one vocabulary split are reduced by one program per row block; splits give parallelism when N
# is small and keep the blocks that run at the same time on few row blocks, so their weight tiles hit in L2.
MAX_SPLITS = 16
SPLIT_ALIGN = 256
# Below this many multiply-adds, autotuning costs more than it can save: use the first config.
AUTOTUNE_MIN_MACS = 1 << 34
_INTERPRET_BLOCKS = {"BLOCK_N": 32, "BLOCK_V": 64, "BLOCK_K": 32}


def _gemm_configs(hopper: bool) -> list[triton.Config]:
    """Tile configs for the two fused-GEMM kernels. Hopper: 64-wide K steps feed wgmma, deep pipelines;
    older GPUs (Ampere/Ada, ~100-164 KB shared memory): 32-wide K steps, smaller tiles."""
    if hopper:
        shapes = [(128, 128, 64, 8, 4), (128, 256, 64, 8, 3), (64, 256, 64, 4, 4), (128, 128, 64, 4, 4)]
    else:
        shapes = [(128, 128, 32, 8, 4), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4), (128, 128, 64, 8, 3)]
    return [
        triton.Config({"BLOCK_N": n, "BLOCK_V": v, "BLOCK_K": k}, num_warps=w, num_stages=s)
        for n, v, k, w, s in shapes
    ]


@triton.jit
def _logits_tile(
    h_tile, w_tile, row_ok, col_ok, offs_k, hidden_size, stride_hk, stride_wk,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """One [BLOCK_N, BLOCK_V] tile of h @ w.T in fp32, the K loop of both fused kernels (inlined by Triton)."""
    acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
    for k0 in range(0, hidden_size, BLOCK_K):
        if EVEN_K:
            a = tl.load(h_tile + k0 * stride_hk, mask=row_ok[:, None], other=0.0)
            b = tl.load(w_tile + k0 * stride_wk, mask=col_ok[:, None], other=0.0)
        else:
            k_ok = (k0 + offs_k) < hidden_size
            a = tl.load(h_tile + k0 * stride_hk, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(w_tile + k0 * stride_wk, mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        if UPCAST:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=DOT_PRECISION)
    return acc


_even_k = triton.heuristics({"EVEN_K": lambda args: args["hidden_size"] % args["BLOCK_K"] == 0})


@_even_k
@triton.jit
def _stats_kernel(
    h_ptr, w_ptr, tgt_ptr, z_ptr, m_ptr, s_ptr, u_ptr, zt_ptr,
    n_rows, vocab, hidden_size,
    stride_hn, stride_hk, stride_wv, stride_wk, stride_zn,
    cols_per_split, num_splits, inv_temp_ptr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
    WITH_ENTROPY: tl.constexpr, STORE_Z: tl.constexpr, EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    # Split index varies fastest: programs running together share few row blocks (hidden tiles stay in L2).
    pid_s = pid % num_splits
    pid_n = pid // num_splits
    rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1).to(tl.int64)
    inv_temp = tl.load(inv_temp_ptr + rows, mask=row_ok, other=1.0)
    v_lo = pid_s * cols_per_split
    v_hi = tl.minimum(v_lo + cols_per_split, vocab)
    offs_k = tl.arange(0, BLOCK_K)
    h_tile = h_ptr + rows[:, None] * stride_hn + offs_k[None, :] * stride_hk
    # A finite start keeps (m - m_new) * s at 0 rather than -inf * 0 = NaN on the first tile.
    m = tl.full([BLOCK_N], -1.0e30, tl.float32)
    s = tl.zeros([BLOCK_N], tl.float32)
    u = tl.zeros([BLOCK_N], tl.float32)
    zt = tl.zeros([BLOCK_N], tl.float32)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < v_hi
        w_tile = w_ptr + cols.to(tl.int64)[:, None] * stride_wv + offs_k[None, :] * stride_wk
        acc = _logits_tile(h_tile, w_tile, row_ok, col_ok, offs_k, hidden_size, stride_hk, stride_wk,
                           BLOCK_N, BLOCK_V, BLOCK_K, EVEN_K, DOT_PRECISION, UPCAST)
        z = tl.where(col_ok[None, :], acc * inv_temp[:, None], float("-inf"))
        if STORE_Z:  # unscaled, like the cuBLAS route's logits: the row kernels apply inv_temp
            z_tile = z_ptr + rows[:, None] * stride_zn + cols[None, :]
            tl.store(z_tile, acc, mask=row_ok[:, None] & col_ok[None, :])
        m_new = tl.maximum(m, tl.max(z, axis=1))
        alpha = tl.exp(m - m_new)
        shifted = tl.where(col_ok[None, :], z - m_new[:, None], 0.0)
        e = tl.where(col_ok[None, :], tl.exp(shifted), 0.0)
        if WITH_ENTROPY:
            u = alpha * (u + (m - m_new) * s) + tl.sum(e * shifted, axis=1)
        s = alpha * s + tl.sum(e, axis=1)
        zt += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), axis=1)
        m = m_new
    out = pid_s.to(tl.int64) * n_rows + rows
    tl.store(m_ptr + out, m, mask=row_ok)
    tl.store(s_ptr + out, s, mask=row_ok)
    tl.store(zt_ptr + out, zt, mask=row_ok)
    if WITH_ENTROPY:
        tl.store(u_ptr + out, u, mask=row_ok)


@_even_k
@triton.jit
def _dz_kernel(
    h_ptr, w_ptr, tgt_ptr, lse_ptr, ent_ptr, glp_ptr, gent_ptr, dz_ptr,
    n_rows, n_cols, col_offset, hidden_size,
    stride_hn, stride_hk, stride_wv, stride_wk, stride_dzn, inv_temp_ptr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_N: tl.constexpr,
    WITH_ENTROPY_GRAD: tl.constexpr, EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    # Grouped tile order (as in a GEMM): tiles that run together cover GROUP_N row blocks, so the hidden and
    # weight tiles they read are shared through L2.
    num_pid_n = tl.cdiv(n_rows, BLOCK_N)
    num_pid_v = tl.cdiv(n_cols, BLOCK_V)
    per_group = GROUP_N * num_pid_v
    first_n = (pid // per_group) * GROUP_N
    group_rows = tl.minimum(num_pid_n - first_n, GROUP_N)
    pid_n = first_n + (pid % per_group) % group_rows
    pid_v = (pid % per_group) // group_rows
    rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    offs_k = tl.arange(0, BLOCK_K)
    h_tile = h_ptr + rows[:, None] * stride_hn + offs_k[None, :] * stride_hk
    w_tile = w_ptr + cols.to(tl.int64)[:, None] * stride_wv + offs_k[None, :] * stride_wk
    acc = _logits_tile(h_tile, w_tile, row_ok, col_ok, offs_k, hidden_size, stride_hk, stride_wk,
                       BLOCK_N, BLOCK_V, BLOCK_K, EVEN_K, DOT_PRECISION, UPCAST)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    g_lp = tl.load(glp_ptr + rows, mask=row_ok, other=0.0)
    tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1).to(tl.int64)
    inv_temp = tl.load(inv_temp_ptr + rows, mask=row_ok, other=1.0)
    logp = acc * inv_temp[:, None] - lse[:, None]
    p = tl.exp(logp)
    is_tgt = (cols.to(tl.int64) + col_offset)[None, :] == tgt[:, None]
    dz = tl.where(is_tgt, g_lp[:, None], 0.0) - g_lp[:, None] * p
    if WITH_ENTROPY_GRAD:
        ent = tl.load(ent_ptr + rows, mask=row_ok, other=0.0)
        g_ent = tl.load(gent_ptr + rows, mask=row_ok, other=0.0)
        dz -= g_ent[:, None] * p * (logp + ent[:, None])
    dz = dz * inv_temp[:, None]
    dz_tile = dz_ptr + rows[:, None] * stride_dzn + cols[None, :]
    tl.store(dz_tile, dz.to(dz_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _row_stats_kernel(
    z_ptr, tgt_ptr, m_ptr, s_ptr, u_ptr, zt_ptr,
    n_cols, col_offset, stride_zn, out_offset, inv_temp_ptr,
    BLOCK: tl.constexpr, WITH_ENTROPY: tl.constexpr,
):
    # One program per row of a logits slice (columns [col_offset, col_offset + n_cols) of the vocabulary).
    row = tl.program_id(0).to(tl.int64)
    inv_temp = tl.load(inv_temp_ptr + row)
    tgt = tl.load(tgt_ptr + row).to(tl.int64) - col_offset
    z_row = z_ptr + row * stride_zn
    # Per-lane running statistics, reduced across lanes at the end: no cross-lane work inside the loop.
    m = tl.full([BLOCK], -1.0e30, tl.float32)
    s = tl.zeros([BLOCK], tl.float32)
    u = tl.zeros([BLOCK], tl.float32)
    zt = tl.zeros([BLOCK], tl.float32)
    for c0 in range(0, n_cols, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        ok = cols < n_cols
        z = tl.load(z_row + cols, mask=ok, other=float("-inf")) * inv_temp
        m_new = tl.maximum(m, z)
        alpha = tl.exp(m - m_new)
        shifted = tl.where(ok, z - m_new, 0.0)
        e = tl.where(ok, tl.exp(shifted), 0.0)
        if WITH_ENTROPY:
            u = alpha * (u + (m - m_new) * s) + e * shifted
        s = alpha * s + e
        zt += tl.where(ok & (cols.to(tl.int64) == tgt), z, 0.0)
        m = m_new
    m_row = tl.max(m, axis=0)
    w = tl.exp(m - m_row)
    s_row = tl.sum(s * w, axis=0)
    out = out_offset + row
    tl.store(m_ptr + out, m_row)
    tl.store(s_ptr + out, s_row)
    tl.store(zt_ptr + out, tl.sum(zt, axis=0))
    if WITH_ENTROPY:
        tl.store(u_ptr + out, tl.sum(w * (u + (m - m_row) * s), axis=0))


@triton.jit
def _dz_from_logits_kernel(
    z_ptr, dz_ptr, tgt_ptr, lse_ptr, ent_ptr, glp_ptr, gent_ptr,
    vocab, col_offset, stride_zn, stride_dzn, inv_temp_ptr,
    BLOCK: tl.constexpr, WITH_ENTROPY_GRAD: tl.constexpr, NARROWER: tl.constexpr,
):
    # One program per row, sweeping the row left to right. dz may alias z (16-bit dz over the front half of
    # the fp32 row, NARROWER): the dz written at columns [c, c+B) covers fp32 columns [c/2, (c+B)/2), all read
    # by this program by then, and no other program touches this row. "By this program" is all its warps: a
    # thread's 16-bit store lands on fp32 columns another warp loads, and warps keep no step with each other, so
    # a barrier between each block's loads and its stores (which also keeps every warp in the same block).
    row = tl.program_id(0).to(tl.int64)
    inv_temp = tl.load(inv_temp_ptr + row)
    lse = tl.load(lse_ptr + row)
    g_lp = tl.load(glp_ptr + row)
    tgt = tl.load(tgt_ptr + row).to(tl.int64) - col_offset
    if WITH_ENTROPY_GRAD:
        ent = tl.load(ent_ptr + row)
        g_ent = tl.load(gent_ptr + row)
    for c0 in range(0, vocab, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        ok = cols < vocab
        logp = tl.load(z_ptr + row * stride_zn + cols, mask=ok, other=0.0) * inv_temp - lse
        p = tl.exp(logp)
        dz = tl.where(cols.to(tl.int64) == tgt, g_lp, 0.0) - g_lp * p
        if WITH_ENTROPY_GRAD:
            dz -= g_ent * p * (logp + ent)
        dz = dz * inv_temp
        if NARROWER:
            tl.debug_barrier()
        tl.store(dz_ptr + row * stride_dzn + cols, dz.to(dz_ptr.dtype.element_ty), mask=ok)


@functools.cache
def _autotuned(kernel_name: str, hopper: bool) -> triton.runtime.Autotuner:
    kernel = {"stats": _stats_kernel, "dz": _dz_kernel}[kernel_name]
    key = ["hidden_size", "vocab" if kernel_name == "stats" else "n_cols"]
    return triton.autotune(configs=_gemm_configs(hopper), key=key)(kernel)


def _launch_gemm_kernel(name: str, grid_for, macs: int, device: torch.device, **kwargs) -> None:
    """Launch a fused-GEMM kernel: fixed small tiles under the interpreter, the first config for small
    problems, autotuned configs (Hopper or older) otherwise. `grid_for(meta)` gives the grid."""
    kernel = {"stats": _stats_kernel, "dz": _dz_kernel}[name]
    if TRITON_INTERPRET:
        meta = dict(_INTERPRET_BLOCKS)
        kernel[grid_for(meta)](**kwargs, **meta)
        return
    hopper = torch.cuda.get_device_capability(device)[0] >= 9
    if macs < AUTOTUNE_MIN_MACS:
        cfg = _gemm_configs(hopper)[0]
        kernel[grid_for(cfg.kwargs)](**kwargs, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        return
    _autotuned(name, hopper)[grid_for](**kwargs)


def _dot_args(dtype: torch.dtype) -> dict:
    """fp32 inputs get true fp32 products (tl.dot would default to tf32), matching torch's fp32 matmul.
    Triton's interpreter (3.9) computes tl.dot of bf16 operands wrongly, so there they are widened to fp32
    first; that is exact (bf16 products fit in fp32) and the compiled kernels never do it."""
    upcast = TRITON_INTERPRET and dtype == torch.bfloat16
    return {"DOT_PRECISION": "ieee" if dtype == torch.float32 or upcast else "tf32", "UPCAST": upcast}


def default_num_splits(vocab: int) -> int:
    return max(1, min(MAX_SPLITS, triton.cdiv(vocab, 4 * SPLIT_ALIGN)))


def cublas_route(device: torch.device) -> bool:
    """Whether the logits products go to cuBLAS with fp32 output (else the fused Triton kernels)."""
    if LOGITS_GEMM != "cublas":
        return False
    return device.type != "cuda" or _mm_out_dtype_works()


def mm_fp32_(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    """out (fp32) = a @ b with fp32 accumulation and no rounding of the result to a's dtype."""
    if a.dtype == torch.float32:
        torch.mm(a, b, out=out)
    elif a.device.type == "cuda":
        torch.mm(a, b, out_dtype=torch.float32, out=out)
    else:  # CPU tensors (interpreter tests): upcast the operands
        torch.mm(a.float(), b.float(), out=out)


def mm_(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b in a's dtype (cuBLAS on CUDA). CPU tensors (interpreter tests) are made contiguous first: torch's CPU
    16-bit GEMM (oneDNN on AVX-512, torch 2.13) reads a strided view's row padding past its last column, so a NaN
    there, such as the NaN that poisoned buffers hold, turned whole rows of a gradient into NaN."""
    if a.device.type == "cpu":
        a, b = a.contiguous(), b.contiguous()
    return torch.mm(a, b, out=out)


def _rows(t: torch.Tensor | None) -> torch.Tensor | None:
    """A per-row vector as the kernels read it: `ptr + row`, so unit stride. A strided view (e.g. targets[:, 0])
    would otherwise be read at the wrong addresses, silently."""
    return None if t is None else t.contiguous()


def lm_head_stats_triton(
    hidden_NH: torch.Tensor,
    weight_VH: torch.Tensor,
    targets_N: torch.Tensor,
    *,
    inv_temp_N: torch.Tensor,
    with_entropy: bool,
    logits_out: torch.Tensor | None = None,
    slice_cols: int | None = None,
) -> RowStats:
    """Per-row lse, target logit and entropy of softmax(hidden @ weight.T * inv_temp_N[row]).

    cuBLAS route: the logits are produced N x slice_cols at a time in fp32 and reduced by `_row_stats_kernel`;
    with `logits_out` (an fp32 [N, >=V] buffer, unit column stride) the whole rows are written there and kept.
    Triton route: `_stats_kernel`, which writes no logits unless `logits_out` is given."""
    targets_N, inv_temp_N = _rows(targets_N), _rows(inv_temp_N)
    if not cublas_route(hidden_NH.device):
        return _stats_fused(hidden_NH, weight_VH, targets_N, inv_temp_N=inv_temp_N, with_entropy=with_entropy,
                            logits_out=logits_out)
    n_rows = hidden_NH.shape[0]
    vocab = weight_VH.shape[0]
    dev = hidden_NH.device
    cols = vocab if logits_out is not None else min(slice_cols or SLICE_COLS, vocab)
    n_slices = triton.cdiv(vocab, cols)
    part = alloc((4 if with_entropy else 3, n_slices, n_rows), torch.float32, dev)
    m_SN, s_SN, zt_SN = part[0], part[1], part[2]
    u_SN = part[3] if with_entropy else part[0]
    z_buf = logits_out if logits_out is not None else alloc((n_rows, round_up(cols, 4)), torch.float32, dev)
    for k, c0 in enumerate(range(0, vocab, cols)):
        c1 = min(c0 + cols, vocab)
        z_NC = z_buf[:, : c1 - c0]
        mm_fp32_(hidden_NH, weight_VH[c0:c1].t(), z_NC)
        _row_stats_kernel[(n_rows,)](
            z_NC, targets_N, m_SN, s_SN, u_SN, zt_SN, c1 - c0, c0, z_NC.stride(0), k * n_rows, inv_temp_N,
            BLOCK=256 if TRITON_INTERPRET else 1024, WITH_ENTROPY=with_entropy, num_warps=4,
        )
    return merge_split_stats(m_SN, s_SN, zt_SN, u_SN if with_entropy else None)


def _stats_fused(
    hidden_NH: torch.Tensor,
    weight_VH: torch.Tensor,
    targets_N: torch.Tensor,
    *,
    inv_temp_N: torch.Tensor,
    with_entropy: bool,
    logits_out: torch.Tensor | None = None,
    num_splits: int | None = None,
) -> RowStats:
    """The Triton route of `lm_head_stats_triton` (`_stats_kernel`)."""
    targets_N, inv_temp_N = _rows(targets_N), _rows(inv_temp_N)
    n_rows, hidden_size = hidden_NH.shape
    vocab = weight_VH.shape[0]
    dev = hidden_NH.device
    splits = num_splits or default_num_splits(vocab)
    cols_per_split = round_up(triton.cdiv(vocab, splits), SPLIT_ALIGN if num_splits is None else 1)
    splits = triton.cdiv(vocab, cols_per_split)
    part = alloc((4 if with_entropy else 3, splits, n_rows), torch.float32, dev)
    m_SN, s_SN, zt_SN = part[0], part[1], part[2]
    u_SN = part[3] if with_entropy else part[0]  # unused when WITH_ENTROPY is off
    if logits_out is not None:
        assert logits_out.dtype == torch.float32 and logits_out.stride(1) == 1 and logits_out.shape[0] == n_rows
    z = logits_out if logits_out is not None else m_SN  # a dummy pointer when STORE_Z is off
    _launch_gemm_kernel(
        "stats",
        lambda meta: (triton.cdiv(n_rows, meta["BLOCK_N"]) * splits,),
        n_rows * hidden_size * vocab,
        dev,
        h_ptr=hidden_NH, w_ptr=weight_VH, tgt_ptr=targets_N, z_ptr=z,
        m_ptr=m_SN, s_ptr=s_SN, u_ptr=u_SN, zt_ptr=zt_SN,
        n_rows=n_rows, vocab=vocab, hidden_size=hidden_size,
        stride_hn=hidden_NH.stride(0), stride_hk=hidden_NH.stride(1),
        stride_wv=weight_VH.stride(0), stride_wk=weight_VH.stride(1),
        stride_zn=z.stride(0), cols_per_split=cols_per_split, num_splits=splits, inv_temp_ptr=inv_temp_N,
        WITH_ENTROPY=with_entropy, STORE_Z=logits_out is not None,
        **_dot_args(hidden_NH.dtype),
    )
    return merge_split_stats(m_SN, s_SN, zt_SN, u_SN if with_entropy else None)


def merge_split_stats(
    m_SN: torch.Tensor, s_SN: torch.Tensor, zt_SN: torch.Tensor, u_SN: torch.Tensor | None
) -> RowStats:
    """Merge per-split (max, sum exp, entropy accumulator, target logit) into per-row statistics: the
    4 floats per token a vocabulary-parallel shard would all-reduce."""
    m_N = m_SN.amax(dim=0)
    w_SN = torch.exp(m_SN - m_N)
    s_N = (s_SN * w_SN).sum(dim=0)
    log_s_N = torch.log(s_N)
    entropy_N = None
    if u_SN is not None:
        u_N = (w_SN * (u_SN + (m_SN - m_N) * s_SN)).sum(dim=0)
        entropy_N = log_s_N - u_N / s_N
    return RowStats(m_N + log_s_N, zt_SN.sum(dim=0), entropy_N)


@functools.cache
def _mm_out_dtype_works() -> bool:
    """Whether this torch runs 16-bit GEMMs with an fp32 result on CUDA (torch.mm / torch.addmm out_dtype)."""
    try:
        a = torch.ones(2, 3, device="cuda", dtype=torch.bfloat16)
        out = torch.full((2, 2), float("nan"), device="cuda")
        torch.mm(a, a.t(), out_dtype=torch.float32, out=out)
        torch.addmm(out, a, a.t(), out_dtype=torch.float32, out=out)
        return bool(torch.all(out == 6.0))
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def addmm_fp32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b, with the product accumulated in fp32 whatever the dtype of a and b."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif acc.device.type == "cuda" and _mm_out_dtype_works():
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    elif acc.device.type == "cuda":  # older torch: one rounding of this partial product to 16 bits
        acc.add_(torch.mm(a, b))
    else:  # CPU tensors (interpreter tests): upcast the operands
        acc.addmm_(a.float(), b.float())


def accumulate_fp32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, first: bool) -> None:
    """acc = a @ b on the first call (no zero fill, no read), acc += a @ b afterwards; fp32 throughout."""
    if not first:
        addmm_fp32_(acc, a, b)
    elif a.dtype == torch.float32 or acc.device.type != "cuda" or _mm_out_dtype_works():
        mm_fp32_(a, b, acc)
    else:
        acc.copy_(torch.mm(a, b))


def lm_head_grads_triton(
    hidden_NH: torch.Tensor,
    weight_VH: torch.Tensor,
    targets_N: torch.Tensor,
    lse_N: torch.Tensor,
    entropy_N: torch.Tensor | None,
    grad_logprob_N: torch.Tensor,
    grad_entropy_N: torch.Tensor | None,
    *,
    inv_temp_N: torch.Tensor,
    need_hidden: bool,
    need_weight: bool,
    cols_per_chunk: int,
    grad_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Backward of the LM head, one vocabulary slice of `cols_per_chunk` columns at a time: dz [N, slice] (input
    dtype) from recomputed logits (cuBLAS fp32 slice + `_dz_from_logits_kernel` in place, or `_dz_kernel`),
    then cuBLAS gives grad_weight[slice] = dz.T @ hidden (written once, fp32-accumulated over all N inside the
    GEMM) and grad_hidden += dz @ weight[slice] (fp32 accumulator [N, H] when there is more than one slice, or
    when `grad_dtype` is fp32). The gradients come in `grad_dtype` (default: the input dtype); fp32 returns the
    fp32 GEMM results unrounded. Rows to skip must carry zero upstream gradients."""
    targets_N, lse_N, entropy_N, inv_temp_N = _rows(targets_N), _rows(lse_N), _rows(entropy_N), _rows(inv_temp_N)
    grad_logprob_N, grad_entropy_N = _rows(grad_logprob_N), _rows(grad_entropy_N)
    n_rows, hidden_size = hidden_NH.shape
    vocab = weight_VH.shape[0]
    dev, dtype = hidden_NH.device, hidden_NH.dtype
    grad_dtype = grad_dtype or dtype
    assert grad_dtype in (dtype, torch.float32), grad_dtype
    wide = grad_dtype != dtype  # 16-bit inputs, fp32 gradients
    cols = min(cols_per_chunk, vocab)
    n_slices = triton.cdiv(vocab, cols)
    use_cublas = cublas_route(dev)
    # Row strides keep every row 16-byte aligned for cuBLAS (fp32 logits and the 16-bit dz over them).
    if use_cublas:
        z_buf = alloc((n_rows, round_up(cols, 4)), torch.float32, dev)
    else:
        dz_buf = alloc((n_rows, round_up(cols, 8)), dtype, dev)
    grad_weight_VH = alloc(tuple(weight_VH.shape), grad_dtype, dev) if need_weight else None
    grad_hidden_NH = None
    grad_hidden32_NH = None
    if need_hidden and (n_slices > 1 or wide):
        grad_hidden32_NH = alloc((n_rows, hidden_size), torch.float32, dev)
    with_ent_grad = grad_entropy_N is not None
    for c0 in range(0, vocab, cols):
        c1 = min(c0 + cols, vocab)
        w_CH = weight_VH[c0:c1]
        if use_cublas:
            z_NC = z_buf[:, : c1 - c0]
            mm_fp32_(hidden_NH, w_CH.t(), z_NC)
            dz_NC = dz_from_logits_(
                z_NC, targets_N, lse_N, entropy_N, grad_logprob_N, grad_entropy_N, inv_temp_N=inv_temp_N, dtype=dtype,
                col_offset=c0,
            )
        else:
            dz_NC = dz_buf[:, : c1 - c0]
            _launch_gemm_kernel(
                "dz",
                lambda meta: (triton.cdiv(n_rows, meta["BLOCK_N"]) * triton.cdiv(c1 - c0, meta["BLOCK_V"]),),
                n_rows * hidden_size * (c1 - c0),
                dev,
                h_ptr=hidden_NH, w_ptr=w_CH, tgt_ptr=targets_N, lse_ptr=lse_N,
                ent_ptr=entropy_N if with_ent_grad else lse_N, glp_ptr=grad_logprob_N,
                gent_ptr=grad_entropy_N if with_ent_grad else lse_N, dz_ptr=dz_NC,
                n_rows=n_rows, n_cols=c1 - c0, col_offset=c0, hidden_size=hidden_size,
                stride_hn=hidden_NH.stride(0), stride_hk=hidden_NH.stride(1),
                stride_wv=w_CH.stride(0), stride_wk=w_CH.stride(1), stride_dzn=dz_NC.stride(0),
                inv_temp_ptr=inv_temp_N,
                GROUP_N=8, WITH_ENTROPY_GRAD=with_ent_grad, **_dot_args(dtype),
            )
        if grad_weight_VH is not None:
            if wide:
                accumulate_fp32_(grad_weight_VH[c0:c1], dz_NC.t(), hidden_NH, first=True)
            else:
                mm_(dz_NC.t(), hidden_NH, out=grad_weight_VH[c0:c1])
        if need_hidden:
            if grad_hidden32_NH is None:
                grad_hidden_NH = mm_(dz_NC, w_CH)
            else:
                accumulate_fp32_(grad_hidden32_NH, dz_NC, w_CH, first=c0 == 0)
    if grad_hidden32_NH is not None:
        grad_hidden_NH = grad_hidden32_NH.to(grad_dtype)
    return grad_hidden_NH, grad_weight_VH


def dz_from_logits_(
    logits_RV: torch.Tensor,
    targets_R: torch.Tensor,
    lse_R: torch.Tensor,
    entropy_R: torch.Tensor | None,
    grad_logprob_R: torch.Tensor,
    grad_entropy_R: torch.Tensor | None,
    *,
    inv_temp_N: torch.Tensor,
    dtype: torch.dtype,
    col_offset: int = 0,
) -> torch.Tensor:
    """Overwrite fp32 logits [R, V] (hidden @ weight.T, not yet divided by the row's temperature, 1 / inv_temp_N;
    a row-major buffer,
    row stride >= V) with d(loss)/d(logits) in `dtype`,
    in place; returns the [R, V] view of the gradient (16-bit: row stride twice the fp32 one). The buffer may be
    a vocabulary slice starting at column `col_offset` (targets are compared with col_offset + column)."""
    n_rows, vocab = logits_RV.shape
    assert logits_RV.dtype == torch.float32 and logits_RV.stride(1) == 1
    targets_R, lse_R, entropy_R, inv_temp_N = _rows(targets_R), _rows(lse_R), _rows(entropy_R), _rows(inv_temp_N)
    grad_logprob_R, grad_entropy_R = _rows(grad_logprob_R), _rows(grad_entropy_R)
    if dtype == torch.float32:
        dz_RV = logits_RV
    else:
        base = logits_RV.as_strided((n_rows, logits_RV.stride(0)), (logits_RV.stride(0), 1))
        dz_RV = base.view(dtype)[:, :vocab]
    with_ent_grad = grad_entropy_R is not None
    if n_rows > 0:
        _dz_from_logits_kernel[(n_rows,)](
            logits_RV, dz_RV, targets_R, lse_R,
            entropy_R if with_ent_grad else lse_R, grad_logprob_R,
            grad_entropy_R if with_ent_grad else lse_R,
            vocab, col_offset, logits_RV.stride(0), dz_RV.stride(0), inv_temp_N,
            BLOCK=256 if TRITON_INTERPRET else 2048, WITH_ENTROPY_GRAD=with_ent_grad, NARROWER=dtype != torch.float32,
            num_warps=8,
        )
    return dz_RV
