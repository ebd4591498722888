"""Attention within packed sequences, for any Hugging Face decoder that uses transformers' attention interface
(Qwen2, Llama, Mistral, ...).

`transformers.AttentionInterface.register` is the library's documented extension point: the model calls our
function with the per-sequence boundaries we pass to its forward (`cu_seq_lens_q` etc., the names of
transformers' FlashAttentionKwargs). Backends, first available wins: flash-attn's `flash_attn_varlen_func`
(CUDA, fp16/bf16, if installed), `torch.nn.attention.varlen.varlen_attn` (CUDA, torch >= 2.9), and causal SDPA
over sequences of similar length padded into one batch (CPU, or anything else). No attention ever crosses a
sequence boundary.
"""
from __future__ import annotations

import inspect
import math
from functools import lru_cache

import torch
import torch.nn.functional as F

VARLEN_ATTENTION = "raro_varlen"
# The attention keyword that carries a micro-batch's shared prompts (`PackedMicroBatch.expand`, `.kept_rows`).
SHARED_ROWS = "raro_shared_rows"


@lru_cache(maxsize=1)
def _flash_attn_varlen():
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


@lru_cache(maxsize=1)
def _torch_varlen():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None, frozenset()
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def _repeat_kv(x_THD: torch.Tensor, groups: int) -> torch.Tensor:
    return x_THD if groups == 1 else x_THD.repeat_interleave(groups, dim=1)


def varlen_causal_attention(q_THD, k_THD, v_THD, cu_seqlens: torch.Tensor, max_seqlen: int, scale: float) -> torch.Tensor:
    """Causal attention restricted to each sequence; q [T, Hq, D], k/v [T, Hkv, D] → [T, Hq, D]."""
    groups = q_THD.shape[1] // k_THD.shape[1]
    if q_THD.is_cuda:
        out = _fused_varlen(q_THD, k_THD, v_THD, cu_seqlens, max_seqlen, scale, groups)
        if out is not None:
            return out
    # One SDPA call per bucket of similar lengths, padded at the end, instead of one per sequence (a packed row
    # holds tens of them; the calls' overhead dominated on CPU). Exact: under the causal mask a real position only
    # attends to positions before it, which are all real; the padded rows are computed and dropped.
    # Gathers are index_select, whose backward is an index_add: advanced indexing's backward (an accumulating
    # index_put) took as long as the attention itself on the default job's micro-batches.
    # Grouped KV heads go to SDPA as they are (enable_gqa): no repeated copies of k and v, and their gradients are
    # summed inside the kernel.
    T, H, D = q_THD.shape
    gathers, where = _bucket_gathers(tuple(cu_seqlens.tolist()), T, q_THD.device)
    padded = [torch.cat([x, x.new_zeros(1, *x.shape[1:])]) for x in (q_THD, k_THD, v_THD)]  # row T: all zeros
    outs = []
    for index, batch, length in gathers:
        q, k, v = (x.index_select(0, index).view(batch, length, *x.shape[1:]).transpose(1, 2) for x in padded)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=groups > 1)
        outs.append(attended.transpose(1, 2).reshape(batch * length, H, D))
    outs.append(q_THD.new_zeros(1, H, D))  # what a row outside every sequence reads
    return torch.cat(outs).index_select(0, where)


@lru_cache(maxsize=8)
def _bucket_gathers(bounds: tuple[int, ...], total: int, device: torch.device):
    """Per bucket of `_length_buckets`: the flat [B * L] index of its tokens in the packed row (padding points at
    row `total`, the zero row appended after the row's tokens), B and L; and `where`, for each packed row, its
    position in the buckets' outputs laid end to end (rows outside every sequence point past them, at a zero row).
    Cached: every layer of a forward asks for the same boundaries."""
    starts, lengths = bounds[:-1], [e - s for s, e in zip(bounds[:-1], bounds[1:])]
    gathers, offset = [], 0
    where = torch.full((total,), -1, dtype=torch.long)
    for bucket in _length_buckets(lengths):
        longest = max(lengths[i] for i in bucket)
        index = torch.full((len(bucket), longest), total, dtype=torch.long)
        for row, i in enumerate(bucket):
            index[row, : lengths[i]] = torch.arange(starts[i], starts[i] + lengths[i])
            where[starts[i] : starts[i] + lengths[i]] = offset + row * longest + torch.arange(lengths[i])
        gathers.append((index.flatten().to(device), len(bucket), longest))
        offset += len(bucket) * longest
    where[where < 0] = offset
    return gathers, where.to(device)


# A bucket's padded area may exceed its tokens by this factor: few calls, little attention spent on padding.
BUCKET_SLACK = 1.3


def _length_buckets(lengths: list[int]) -> list[list[int]]:
    """Indices of the non-empty sequences, by increasing length, cut into buckets whose padded size (longest x
    count) stays within BUCKET_SLACK of their tokens."""
    buckets, current, tokens = [], [], 0
    for i in sorted((i for i, n in enumerate(lengths) if n), key=lengths.__getitem__):
        if current and lengths[i] * (len(current) + 1) > BUCKET_SLACK * (tokens + lengths[i]):
            buckets.append(current)
            current, tokens = [], 0
        current.append(i)
        tokens += lengths[i]
    return buckets + [current] if current else buckets


def _fused_varlen(q_THD, k_THD, v_THD, cu_seqlens, max_seqlen, scale, groups) -> torch.Tensor | None:
    """One fused kernel over the whole packed row (CUDA), or None where none takes these inputs."""
    flash = _flash_attn_varlen()
    # flash-attn's kernels take fp16/bf16 only (an fp32 trainer would fail inside them); GQA needs no repeat there.
    if flash is not None and q_THD.dtype in (torch.float16, torch.bfloat16):
        return flash(q_THD, k_THD, v_THD, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, softmax_scale=scale, causal=True)
    varlen, params = _torch_varlen()
    if varlen is None:
        return None
    kwargs = {}
    if "scale" in params:
        kwargs["scale"] = scale
    elif not math.isclose(scale, q_THD.shape[-1] ** -0.5, rel_tol=1e-6):  # 1/sqrt(128) and 128**-0.5: 1 ulp apart
        return None  # torch 2.10's varlen_attn takes no scale, only head_dim ** -0.5: the exact path applies this one
    if "is_causal" in params:
        kwargs["is_causal"] = True
    else:
        kwargs["window_size"] = (-1, 0)
    k_in, v_in = k_THD, v_THD
    if "enable_gqa" in params:
        kwargs["enable_gqa"] = groups > 1
    else:
        k_in, v_in = _repeat_kv(k_THD, groups), _repeat_kv(v_THD, groups)
    try:
        return varlen(q_THD, k_in, v_in, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **kwargs)
    except RuntimeError:
        return None  # e.g. an fp32 input the flash kernel does not take: the caller runs the exact loop


def _attention(module, query, key, value, attention_mask, *, scaling=None, dropout=0.0, sliding_window=None, **kwargs):
    """transformers attention-interface signature: query [1, Hq, T, D], key/value [1, Hkv, T, D] → ([1, T, Hq, D], None)."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        raise ValueError(f"{VARLEN_ATTENTION} attention needs cu_seq_lens_q (call it through packed_hidden_states)")
    if query.shape[0] != 1:
        raise ValueError(f"{VARLEN_ATTENTION} attention takes one packed row, got batch {query.shape[0]}")
    if sliding_window is not None and sliding_window < int(kwargs.get("max_length_q", 0)):
        raise ValueError(f"{VARLEN_ATTENTION}: sliding-window attention is not supported")
    _refuse_what_changes_the_scores(dropout, kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))
    shared = kwargs.get(SHARED_ROWS)
    if shared is not None:
        # Attention runs on the whole packed row, each sequence with its own copy of its prompt's queries, keys and
        # values (so any varlen kernel applies); the index_select's backward adds every copy's key and value
        # gradients into the one computed prompt. Only the first copy's outputs are kept: the same numbers.
        expand, kept = shared
        q, k, v = (x.index_select(0, expand) for x in (q, k, v))
    out = varlen_causal_attention(q, k, v, cu, int(kwargs["max_length_q"]), scale)
    if shared is not None:
        out = out.index_select(0, kept)
    return out.unsqueeze(0), None


# Attention arguments some models pass that this plain causal softmax does not compute; ignored, they gave other
# hidden states with no error (Gemma 2's score soft-capping, gpt-oss's attention sinks).
_UNSUPPORTED = {"softcap": "attention-score soft-capping (Gemma 2's attn_logit_softcapping)",
                "s_aux": "attention sinks (gpt-oss)"}


def _refuse_what_changes_the_scores(dropout: float, kwargs: dict) -> None:
    for name, what in _UNSUPPORTED.items():
        if kwargs.get(name) is not None:
            raise ValueError(f"{VARLEN_ATTENTION}: the model asks for {what}, which packed attention does not "
                             f"compute; this model cannot be trained here")
    if dropout:
        raise ValueError(f"{VARLEN_ATTENTION}: attention dropout {dropout} is not applied by packed attention; set "
                         f"attention_dropout to 0 in the model's config.json")


def check_varlen_supported(model) -> None:
    """Refuse at load what `_attention` would refuse at the first update, minutes of generation later."""
    configs = [model.config, getattr(model.config, "text_config", None)]
    for cfg in filter(None, configs):
        if getattr(cfg, "attn_logit_softcapping", None) is not None:
            _refuse_what_changes_the_scores(0.0, {"softcap": cfg.attn_logit_softcapping})
        if getattr(cfg, "attention_dropout", 0.0):
            _refuse_what_changes_the_scores(cfg.attention_dropout, {})
    if any(name.rsplit(".", 1)[-1] == "sinks" for name, _ in model.named_parameters()):
        _refuse_what_changes_the_scores(0.0, {"s_aux": True})


def _no_mask(*args, **kwargs):
    # Boundaries come from cu_seqlens; a dense T x T mask would only cost memory.
    return None


def register_varlen_attention() -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN_ATTENTION, _attention)
    AttentionMaskInterface.register(VARLEN_ATTENTION, _no_mask)
    return VARLEN_ATTENTION


def use_varlen_attention(model) -> None:
    """Switch a loaded HF model to the varlen attention (the trainer's copy; the rollout engine keeps sdpa)."""
    check_varlen_supported(model)
    register_varlen_attention()
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(VARLEN_ATTENTION)
    else:
        model.config._attn_implementation = VARLEN_ATTENTION


def packed_hidden_states(body, mb, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Final (normed) hidden states [T, H] of the decoder `body` (e.g. `model.model`) on packed micro-batch `mb`, or
    only those of `rows`. Where the micro-batch shares prompts, the decoder computes the rows `mb.kept_rows` only
    (its linear layers, norms and MLPs run once per shared prompt) and every row reads its hidden state there."""
    ids, positions, shared = mb.input_ids, mb.position_ids, {}
    if mb.kept_rows is not None:
        attention = getattr(body.config, "_attn_implementation", None)
        if attention != VARLEN_ATTENTION:  # another attention ignores the shared rows: every completion misplaced
            raise ValueError(f"a micro-batch with shared prompts needs the {VARLEN_ATTENTION} attention (the model "
                             f"uses {attention!r}; use_varlen_attention switches it)")
        ids, positions = ids.index_select(0, mb.kept_rows), positions.index_select(0, mb.kept_rows)
        shared = {SHARED_ROWS: (mb.expand, mb.kept_rows)}
    out = body(
        input_ids=ids[None],
        position_ids=positions[None],
        cu_seq_lens_q=mb.cu_seqlens,
        cu_seq_lens_k=mb.cu_seqlens,
        max_length_q=mb.max_seqlen,
        max_length_k=mb.max_seqlen,
        use_cache=False,
        **shared,
    )
    hidden = out.last_hidden_state[0]
    if mb.kept_rows is not None:
        rows = mb.expand if rows is None else mb.expand.index_select(0, rows)
    return hidden if rows is None else hidden.index_select(0, rows)
