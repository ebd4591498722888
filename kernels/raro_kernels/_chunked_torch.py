"""The PyTorch backend of the LM-head ops: the same function as the Triton kernels, tile by tile.

Logits exist only as one fp32 tile of `rows_per_chunk x cols_per_chunk` (plus a few elementwise temporaries of
that size); the softmax statistics are merged across vocabulary tiles online, as the Triton kernel does. Used
for CPU tensors (where it is also the reference the trainer's CPU tests run) and, on request, for CUDA ones.
"""
from __future__ import annotations

import torch

from raro_kernels._common import RowStats, alloc

DEFAULT_ROWS_PER_CHUNK = 1024
DEFAULT_COLS_PER_CHUNK = 4096


def _target_in_tile(targets_R: torch.Tensor, col0: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask of rows whose target lies in [col0, col0+cols), the target's column index within the tile)."""
    inside_R = (targets_R >= col0) & (targets_R < col0 + cols)
    index_R = (targets_R - col0).clamp(0, cols - 1)
    return inside_R, index_R


def lm_head_stats_torch(
    hidden_NH: torch.Tensor,
    weight_VH: torch.Tensor,
    targets_N: torch.Tensor,
    *,
    inv_temp_N: torch.Tensor,
    with_entropy: bool,
    rows_per_chunk: int = DEFAULT_ROWS_PER_CHUNK,
    cols_per_chunk: int = DEFAULT_COLS_PER_CHUNK,
) -> RowStats:
    """logsumexp, target logit and (optionally) entropy of softmax(hidden @ weight.T * inv_temp_N[row]), per row."""
    n_rows, vocab = hidden_NH.shape[0], weight_VH.shape[0]
    dev = hidden_NH.device
    lse_N = alloc((n_rows,), torch.float32, dev)
    target_logit_N = alloc((n_rows,), torch.float32, dev)
    entropy_N = alloc((n_rows,), torch.float32, dev) if with_entropy else None
    for r0 in range(0, n_rows, rows_per_chunk):
        r1 = min(r0 + rows_per_chunk, n_rows)
        h_RH = hidden_NH[r0:r1].float()
        tgt_R = targets_N[r0:r1]
        inv_R1 = inv_temp_N[r0:r1, None]
        # Running max m, sum of exp(z - m) s, and u = sum of exp(z - m) * (z - m): keeping u relative to the
        # running max makes entropy = log s - u / s free of the cancellation that lse - E[z] would suffer.
        m_R = torch.full((r1 - r0,), float("-inf"), dtype=torch.float32, device=dev)
        s_R = torch.zeros(r1 - r0, dtype=torch.float32, device=dev)
        u_R = torch.zeros(r1 - r0, dtype=torch.float32, device=dev)
        zt_R = torch.zeros(r1 - r0, dtype=torch.float32, device=dev)
        for c0 in range(0, vocab, cols_per_chunk):
            c1 = min(c0 + cols_per_chunk, vocab)
            z_RC = (h_RH @ weight_VH[c0:c1].float().T) * inv_R1
            m_new_R = torch.maximum(m_R, z_RC.amax(dim=1))
            alpha_R = torch.exp(m_R - m_new_R)  # 0 on the first tile, where m = -inf
            shifted_RC = z_RC - m_new_R[:, None]
            e_RC = torch.exp(shifted_RC)
            if with_entropy:
                # (m - m_new) * s is -inf * 0 on the first tile; s = 0 there, so the term is 0.
                carry_R = torch.where(s_R > 0, u_R + (m_R - m_new_R) * s_R, torch.zeros_like(u_R))
                u_R = alpha_R * carry_R + (e_RC * shifted_RC).sum(dim=1)
            s_R = alpha_R * s_R + e_RC.sum(dim=1)
            m_R = m_new_R
            inside_R, index_R = _target_in_tile(tgt_R, c0, c1 - c0)
            picked_R = z_RC.gather(1, index_R[:, None]).squeeze(1)
            zt_R = zt_R + torch.where(inside_R, picked_R, torch.zeros_like(picked_R))
        log_s_R = torch.log(s_R)
        lse_N[r0:r1] = m_R + log_s_R
        target_logit_N[r0:r1] = zt_R
        if entropy_N is not None:
            entropy_N[r0:r1] = log_s_R - u_R / s_R
    return RowStats(lse_N, target_logit_N, entropy_N)


def lm_head_grads_torch(
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
    rows_per_chunk: int = DEFAULT_ROWS_PER_CHUNK,
    cols_per_chunk: int = DEFAULT_COLS_PER_CHUNK,
    grad_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of sum(g_lp * logprob + g_ent * entropy) w.r.t. hidden and weight, recomputing the logits.

    With p = softmax(z), z = logits * inv_temp (the row's): d logp[t] / dz = onehot(t) - p and
    d entropy / dz = -p (log p + H), then d/dlogits = inv_temp * d/dz. Rows to be skipped (ignored targets) must
    carry g_lp = g_ent = 0.
    Gradients accumulate in fp32 and are cast once to `grad_dtype` (default: the input dtype).
    """
    n_rows, vocab = hidden_NH.shape[0], weight_VH.shape[0]
    dev = hidden_NH.device
    grad_dtype = grad_dtype or hidden_NH.dtype
    grad_hidden_NH = alloc(tuple(hidden_NH.shape), grad_dtype, dev) if need_hidden else None
    grad_weight32_VH = (
        torch.zeros(weight_VH.shape, dtype=torch.float32, device=dev) if need_weight else None
    )
    for r0 in range(0, n_rows, rows_per_chunk):
        r1 = min(r0 + rows_per_chunk, n_rows)
        h_RH = hidden_NH[r0:r1].float()
        tgt_R = targets_N[r0:r1]
        lse_R = lse_N[r0:r1, None]
        g_lp_R = grad_logprob_N[r0:r1, None]
        inv_R1 = inv_temp_N[r0:r1, None]
        grad_h32_RH = torch.zeros_like(h_RH) if need_hidden else None
        for c0 in range(0, vocab, cols_per_chunk):
            c1 = min(c0 + cols_per_chunk, vocab)
            w_CH = weight_VH[c0:c1].float()
            logp_RC = (h_RH @ w_CH.T) * inv_R1 - lse_R
            p_RC = torch.exp(logp_RC)
            dz_RC = -g_lp_R * p_RC
            inside_R, index_R = _target_in_tile(tgt_R, c0, c1 - c0)
            dz_RC.scatter_add_(1, index_R[:, None], torch.where(inside_R[:, None], g_lp_R, 0.0))
            if grad_entropy_N is not None:
                assert entropy_N is not None
                dz_RC -= grad_entropy_N[r0:r1, None] * p_RC * (logp_RC + entropy_N[r0:r1, None])
            dz_RC *= inv_R1
            if grad_h32_RH is not None:
                grad_h32_RH.addmm_(dz_RC, w_CH)
            if grad_weight32_VH is not None:
                grad_weight32_VH[c0:c1].addmm_(dz_RC.T, h_RH)
        if grad_hidden_NH is not None:
            grad_hidden_NH[r0:r1] = grad_h32_RH
    grad_weight_VH = None if grad_weight32_VH is None else grad_weight32_VH.to(grad_dtype)
    return grad_hidden_NH, grad_weight_VH
