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
import re
from functools import cached_property, lru_cache
from typing import NamedTuple

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
    gathers, where = _bucket_gathers(tuple(cu_seqlens.tolist()), q_THD.shape[0], q_THD.device)
    padded = _with_zero_row(q_THD, k_THD, v_THD)
    outs = _causal_buckets(padded, gathers, scale)
    outs.append(q_THD.new_zeros(1, q_THD.shape[1], v_THD.shape[-1]))  # what a row outside every sequence reads
    return torch.cat(outs).index_select(0, where)


def _with_zero_row(*xs: torch.Tensor) -> list[torch.Tensor]:
    return [torch.cat([x, x.new_zeros(1, *x.shape[1:])]) for x in xs]  # what padding reads


def _causal_buckets(padded: list[torch.Tensor], gathers, scale: float) -> list[torch.Tensor]:
    """One causal SDPA call per bucket of whole sequences (`_gather_runs`), each output [B * L, H, D]."""
    q_all, k_all = padded[0], padded[1]
    outs = []
    for index, batch, length in gathers:
        q, k, v = (x.index_select(0, index).view(batch, length, *x.shape[1:]).transpose(1, 2) for x in padded)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                  enable_gqa=q_all.shape[1] != k_all.shape[1])
        # [B * L, Hq, Dv]: values may be narrower than queries and keys (MLA: found by review, a shape error)
        outs.append(attended.transpose(1, 2).reshape(batch * length, q_all.shape[1], padded[2].shape[-1]))
    return outs


@lru_cache(maxsize=8)
def _bucket_gathers(bounds: tuple[int, ...], total: int, device: torch.device):
    """Per bucket of `_length_buckets`: the flat [B * L] index of its tokens in the packed row (padding points at
    row `total`, the zero row appended after the row's tokens), B and L; and `where`, for each packed row, its
    position in the buckets' outputs laid end to end (rows outside every sequence point past them, at a zero row).
    Cached: every layer of a forward asks for the same boundaries."""
    where = torch.full((total,), -1, dtype=torch.long)
    gathers, offset = _gather_runs([(s, e - s) for s, e in zip(bounds[:-1], bounds[1:])], total, where, 0, device)
    where[where < 0] = offset
    return gathers, where.to(device)


def _gather_runs(runs: list[tuple[int, int]], total: int, where: torch.Tensor, offset: int, device):
    """Buckets of the sequences `runs` (first row, length; `_length_buckets`), each as (the flat [B * L] index of its
    rows, padding at row `total`; B; L). Each row's position in the buckets' outputs, laid end to end from `offset`,
    goes into `where`; returns the buckets and the offset after them."""
    gathers = []
    for bucket in _length_buckets([n for _, n in runs]):
        longest = max(runs[i][1] for i in bucket)
        index = torch.full((len(bucket), longest), total, dtype=torch.long)
        for row, i in enumerate(bucket):
            first, n = runs[i]
            index[row, :n] = torch.arange(first, first + n)
            where[first : first + n] = offset + row * longest + torch.arange(n)
        gathers.append((index.flatten().to(device), len(bucket), longest))
        offset += len(bucket) * longest
    return gathers, offset


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


class SharedRows:
    """A micro-batch's shared prompts as the attention reads them: `expand` [T] and `kept` [Tc] of the packed
    micro-batch (`PackedMicroBatch`), and its sequence boundaries `cu_seqlens` over all T rows."""

    def __init__(self, expand: torch.Tensor, kept: torch.Tensor, cu_seqlens: torch.Tensor) -> None:
        self.expand, self.kept, self.cu_seqlens = expand, kept, cu_seqlens

    @cached_property
    def plan(self) -> "_SharedPlan":
        return _shared_plan(self.expand.tolist(), self.kept.tolist(), self.cu_seqlens.tolist(), self.kept.device)


class _SharedPlan(NamedTuple):
    # (index [B * L] into the computed rows, padding at row Tc: a zero row; B; L) per bucket of whole sequences
    wholes: list[tuple[torch.Tensor, int, int]]
    # (query index [B * Lq], key index [B * Lk], mask [B, 1, Lq, Lk], B, Lq, Lk) per bucket of tails
    tails: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int, int]]
    where: torch.Tensor  # for each computed row, its position in the buckets' outputs laid end to end


def _shared_plan(expand: list[int], kept: list[int], bounds: list[int], device) -> _SharedPlan:
    """The attention of a micro-batch with shared prompts, on the computed rows only. A sequence whose rows are all
    computed (a prompt's first copy, or a prompt of its own) is a whole sequence: causal attention, as without
    sharing. Every other sequence is a tail: only its completion's queries, which attend to its prompt's computed
    rows and to its own completion up to themselves. The queries of a prompt's later copies were computed and
    thrown away (their outputs are the first copy's): 37% of the default job's attention."""
    total = len(kept)
    wholes, tails = [], []  # (first computed row, length); (prompt's first computed row, P, completion's, C)
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        if kept[expand[start]] == start:
            wholes.append((expand[start], end - start))
            continue
        p = start
        while p < end and kept[expand[p]] != p:
            p += 1
        if p < end:  # a copy with no completion token asks nothing
            tails.append((expand[start], p - start, expand[p], end - p))
    where = torch.full((total,), -1, dtype=torch.long)
    whole_gathers, offset = _gather_runs(wholes, total, where, 0, device)
    tail_gathers = []
    for bucket in _tail_buckets([(p + c, c) for _, p, _, c in tails]):
        lq = max(tails[i][3] for i in bucket)
        lk = max(tails[i][1] + tails[i][3] for i in bucket)
        q_index = torch.full((len(bucket), lq), total, dtype=torch.long)
        k_index = torch.full((len(bucket), lk), total, dtype=torch.long)
        reach = torch.zeros(len(bucket), dtype=torch.long)
        for row, i in enumerate(bucket):
            prompt, p, completion, c = tails[i]
            q_index[row, :c] = torch.arange(completion, completion + c)
            k_index[row, :p] = torch.arange(prompt, prompt + p)
            k_index[row, p : p + c] = torch.arange(completion, completion + c)
            reach[row] = p
            where[completion : completion + c] = offset + row * lq + torch.arange(c)
        # completion query j reads keys 0 .. P + j: its prompt and its completion up to itself (padding lies after)
        mask = torch.arange(lk)[None, None, :] <= reach[:, None, None] + torch.arange(lq)[None, :, None]
        tail_gathers.append((q_index.flatten().to(device), k_index.flatten().to(device), mask[:, None].to(device),
                             len(bucket), lq, lk))
        offset += len(bucket) * lq
    if bool((where < 0).any()):
        raise AssertionError("shared-prompt attention: a computed row belongs to no sequence")
    return _SharedPlan(whole_gathers, tail_gathers, where.to(device))


def _tail_buckets(shapes: list[tuple[int, int]]) -> list[list[int]]:
    """Indices of tails (keys Lk, queries Lq each) by increasing Lk, cut into buckets whose padded area
    (max Lq x max Lk x count) stays within BUCKET_SLACK of their real areas."""
    buckets, current, area = [], [], 0
    for i in sorted(range(len(shapes)), key=lambda i: shapes[i]):
        lk, lq = shapes[i]
        if current:
            wide = max(lq, max(shapes[j][1] for j in current)) * lk * (len(current) + 1)
            if wide > BUCKET_SLACK * (area + lk * lq):
                buckets.append(current)
                current, area = [], 0
        current.append(i)
        area += lk * lq
    return buckets + [current] if current else buckets


def shared_prompt_attention(q_THD, k_THD, v_THD, plan: _SharedPlan, scale: float) -> torch.Tensor:
    """Causal attention of the computed rows [Tc, H, D] of a micro-batch with shared prompts (`_shared_plan`), by
    padded SDPA calls as `varlen_causal_attention` makes them: whole sequences causal, tails masked."""
    H, D = q_THD.shape[1:]
    padded = _with_zero_row(q_THD, k_THD, v_THD)
    outs = _causal_buckets(padded, plan.wholes, scale)
    for q_index, k_index, mask, batch, lq, lk in plan.tails:
        q = padded[0].index_select(0, q_index).view(batch, lq, H, D).transpose(1, 2)
        k, v = (x.index_select(0, k_index).view(batch, lk, *x.shape[1:]).transpose(1, 2) for x in padded[1:])
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                                  enable_gqa=q_THD.shape[1] != k_THD.shape[1])
        outs.append(attended.transpose(1, 2).reshape(batch * lq, H, v_THD.shape[-1]))
    return torch.cat(outs).index_select(0, plan.where)


def _attention(module, query, key, value, attention_mask, *, scaling=None, dropout=0.0, sliding_window=None, **kwargs):
    """transformers attention-interface signature: query [1, Hq, T, D], key/value [1, Hkv, T, D] → ([1, T, Hq, D], None)."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:  # packed_hidden_states passes them: a decoder that drops them on the way (StableLM) is refused
        raise ValueError(f"{VARLEN_ATTENTION}: the model's decoder does not pass the sequence boundaries "
                         "(cu_seq_lens_q) on to its attention, so packed sequences cannot be told apart; this model "
                         "cannot be trained here (or a call bypassed packed_hidden_states)")
    if query.shape[0] != 1:
        raise ValueError(f"{VARLEN_ATTENTION} attention takes one packed row, got batch {query.shape[0]}")
    if sliding_window is not None and sliding_window < int(kwargs.get("max_length_q", 0)):
        raise ValueError(f"{VARLEN_ATTENTION}: sliding-window attention is not supported")
    _refuse_what_changes_the_scores(dropout, kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))
    shared = kwargs.get(SHARED_ROWS)
    if shared is not None and not q.is_cuda:
        return shared_prompt_attention(q, k, v, shared.plan, scale).unsqueeze(0), None
    if shared is not None:
        # On a GPU the attention runs on the whole packed row, each sequence with its own copy of its prompt's
        # queries, keys and values, so any varlen kernel applies; the index_select's backward adds every copy's
        # key and value gradients into the one computed prompt. Only the first copy's outputs are kept.
        q, k, v = (x.index_select(0, shared.expand) for x in (q, k, v))
    out = varlen_causal_attention(q, k, v, cu, int(kwargs["max_length_q"]), scale)
    if shared is not None:
        out = out.index_select(0, shared.kept)
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


# Config fields of dropout the model applies in training (a classifier's or summary head's are not the LM's).
_DROPOUT = re.compile(r"^(?!classifier|summary).*(dropout|pdrop)")
# Layer kinds packed attention computes within each sequence; any other kind in `config.layer_types` is refused.
_ATTENTION_LAYER_TYPES = {"full_attention", "sliding_attention"}
# Modules that mix tokens outside the attention (a short convolution, a state-space scan, linear attention): in a
# packed row they run across sequence boundaries, since only the attention reads cu_seq_lens.
_TOKEN_MIXERS = re.compile(r"Mamba|ShortConv|GatedDeltaNet|LinearAttention|Rwkv|RWKV|SSM")


def check_varlen_supported(model) -> None:
    """Refuse at load what packed attention would compute otherwise than one sequence alone: what `_attention`
    refuses at the first update, minutes of generation later, and what it never sees. Found by review (LFM2's
    convolutions, Granite-4.0-H's and Bamba's Mamba layers, Llama 4's chunked attention and position-dependent
    attention temperature were accepted, and every sequence after a row's first got other log-probs; so were
    XGLM, whose attention never asks transformers' interface, Gemma 3 with bidirectional attention, and dropout
    outside the attention, which the training forward applied and the engine does not)."""
    configs = [model.config, getattr(model.config, "text_config", None)]
    for cfg in filter(None, configs):
        if getattr(cfg, "use_bidirectional_attention", False):
            _refuse("bidirectional attention (use_bidirectional_attention)")
        dropouts = sorted(name for name, value in vars(cfg).items() if _DROPOUT.search(name)
                          and name != "attention_dropout" and isinstance(value, (int, float)) and value > 0)
        if dropouts:
            raise ValueError(f"{VARLEN_ATTENTION}: the model's config sets dropout ({', '.join(dropouts)}), which the "
                             "training forward would apply and the rollout engine does not (the policy ratio would be "
                             "off 1 from noise); set them to 0 in the model's config.json")
        if getattr(cfg, "attn_logit_softcapping", None) is not None:
            _refuse_what_changes_the_scores(0.0, {"softcap": cfg.attn_logit_softcapping})
        if getattr(cfg, "attention_dropout", 0.0):
            _refuse_what_changes_the_scores(cfg.attention_dropout, {})
        other = sorted(set(getattr(cfg, "layer_types", None) or ()) - _ATTENTION_LAYER_TYPES)
        if other:
            _refuse(f"layers of kind {', '.join(other)} (config.layer_types)")
        if getattr(cfg, "attention_chunk_size", None):
            _refuse(f"chunked attention (attention_chunk_size {cfg.attention_chunk_size}), which lives in the mask "
                    "packed attention does not build")
        if getattr(cfg, "attn_temperature_tuning", False):
            _refuse("attention temperature tuning by position (attn_temperature_tuning), which counts positions "
                    "along the packed row")
    mixers = sorted({type(m).__name__ for m in model.modules()
                     if isinstance(m, torch.nn.Conv1d) or _TOKEN_MIXERS.search(type(m).__name__)})
    if mixers:
        _refuse(f"token mixing outside the attention ({', '.join(mixers)}), which would run across the sequences "
                "of a packed row")
    if any(name.rsplit(".", 1)[-1] == "sinks" for name, _ in model.named_parameters()):
        _refuse_what_changes_the_scores(0.0, {"s_aux": True})
    # Last: the more telling reasons above come first (transformers 4.56 marks Granite's Mamba hybrid this way too)
    if getattr(type(model), "_supports_attention_backend", True) is False:
        _refuse("an attention of its own that does not go through transformers' attention interface, so the packed "
                "attention is never called and its causal mask spans the whole packed row")


def _refuse(what: str) -> None:
    raise ValueError(f"{VARLEN_ATTENTION}: the model has {what}; packed sequences would not be computed as each "
                     "alone, so this model cannot be trained here")


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


def _rope_params(config) -> dict:
    """The rotary embedding's settings: `rope_parameters` (transformers 5) or `rope_scaling` (4.x)."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    return params if isinstance(params, dict) else {}


def rope_type(config) -> str | None:
    """The rotary embedding's type ("default", "linear", "longrope", ...), or None where the config names none."""
    params = _rope_params(config)
    return params.get("rope_type", params.get("type"))


def attention_window(config) -> int | None:
    """The sliding window some of the model's layers attend within (Mistral, Phi-3, Gemma 3's local layers, Qwen2
    with use_sliding_window), or None. `_attention` refuses a sequence longer than it."""
    for each in filter(None, (config, getattr(config, "text_config", None))):
        window = getattr(each, "sliding_window", None)
        types = getattr(each, "layer_types", None)
        if isinstance(window, int) and window > 0 and (types is None or "sliding_attention" in types):
            return window
    return None


def packed_length_limit(config) -> tuple[int, str] | None:
    """The longest sequence packed training computes as the model alone would, and why; None: no limit short of
    the model's positions. Checked at start against what a run can make (`train.check_context`), and where a
    sequence's length is known only mid-run, the pair or reasoning past it is left out as one past the positions
    is: it stopped the run at the first update that met one (found by review)."""
    if config is None:
        return None
    found = [(n, why) for n, why in (
        (attention_window(config), "its sliding attention window (config.sliding_window), which packed attention "
                                   "does not compute"),
        (length_dependent_rope_limit(getattr(config, "text_config", None) or config),
         "where its rotary frequencies start to change with the longest sequence (longrope, dynamic NTK), which "
         "packed sequences would share")) if n]
    return min(found, default=None)


def length_dependent_rope_limit(config) -> int | None:
    """The sequence length past which this model's rotary frequencies change with the longest position seen
    (Phi-3's longrope, dynamic NTK), or None for a rotary embedding that does not. Within one packed row the
    longest sequence sets them for all: a short sequence beside a long one got the long-context frequencies (found
    by review: 1e-2 in log-probs on Phi-3 longrope). Each layer type's rotary counts (Gemma 3 keeps one per type:
    none was read), and dynamic NTK grows past max_position_embeddings, as transformers' update does (the original
    length was read: review)."""
    params = _rope_params(config)
    limits = []
    for each in [v for v in params.values() if isinstance(v, dict)] or [params]:
        kind = each.get("rope_type", each.get("type"))
        if kind == "longrope":
            limits.append(int(each.get("original_max_position_embeddings")
                              or getattr(config, "original_max_position_embeddings", None)
                              or config.max_position_embeddings))
        elif kind == "dynamic":
            limits.append(int(config.max_position_embeddings))
    return min(limits, default=None)


def packed_hidden_states(body, mb, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Final (normed) hidden states [T, H] of the decoder `body` (e.g. `model.model`) on packed micro-batch `mb`, or
    only those of `rows`. Where the micro-batch shares prompts, the decoder computes the rows `mb.kept_rows` only
    (its linear layers, norms and MLPs run once per shared prompt) and every row reads its hidden state there."""
    limit = length_dependent_rope_limit(body.config)
    if limit is not None and mb.max_seqlen > limit:
        raise ValueError(f"a packed sequence of {mb.max_seqlen} tokens, over {limit}: this model's rotary embedding "
                         f"takes its frequencies from the longest position in the packed row (longrope, dynamic NTK), "
                         f"so every sequence packed beside this one would get another model's log-probs; keep prompts "
                         f"and rollout.max_new_tokens / critic_max_new_tokens within {limit} tokens")
    ids, positions, shared = mb.input_ids, mb.position_ids, {}
    if mb.kept_rows is not None:
        attention = getattr(body.config, "_attn_implementation", None)
        if attention != VARLEN_ATTENTION:  # another attention ignores the shared rows: every completion misplaced
            raise ValueError(f"a micro-batch with shared prompts needs the {VARLEN_ATTENTION} attention (the model "
                             f"uses {attention!r}; use_varlen_attention switches it)")
        ids, positions = ids.index_select(0, mb.kept_rows), positions.index_select(0, mb.kept_rows)
        shared = {SHARED_ROWS: SharedRows(mb.expand, mb.kept_rows, mb.cu_seqlens)}
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
