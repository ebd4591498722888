"""Packed per-token log-probs (varlen attention) equal per-sequence log-probs of the unpacked model."""
import math
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from raro_fast.model.varlen import packed_hidden_states, use_varlen_attention
from raro_fast.packing import SequenceSample, pack

CONFIGS = {
    "qwen2": lambda: Qwen2Config(vocab_size=89, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                 num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=128),
    "llama": lambda: LlamaConfig(vocab_size=89, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                                 tie_word_embeddings=False),
}


def random_sequences(count: int, *, min_len: int, max_len: int, seed: int = 1) -> list[SequenceSample]:
    """Random token sequences (vocabulary 89) with a random prompt/completion split each."""
    rng = random.Random(seed)
    seqs = []
    for uid in range(count):
        n = rng.randint(min_len, max_len)
        seqs.append(SequenceSample(input_ids=[rng.randrange(89) for _ in range(n)], prompt_len=rng.randint(1, n - 1),
                                   advantage=0.0, role="policy", group=0, uid=uid))
    return seqs


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


# On CUDA, fp32 inputs take the exact per-sequence loop after torch's varlen kernel refuses them: with grouped
# KV heads (qwen2: 6 query heads, 2 KV heads) that path once repeated K/V twice.
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_packed_logprobs_and_grads_equal_per_sequence(family, device):
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(CONFIGS[family](), attn_implementation="sdpa").float().to(device)
    packed_model = AutoModelForCausalLM.from_config(CONFIGS[family](), attn_implementation="sdpa").float().to(device)
    packed_model.load_state_dict(ref.state_dict())
    use_varlen_attention(packed_model)
    seqs = random_sequences(5, min_len=4, max_len=31)
    mb = pack(seqs, num_sequences=5, num_tokens=sum(s.num_targets for s in seqs)).to(device)
    hidden = packed_hidden_states(packed_model.model, mb)
    logits = packed_model.lm_head(hidden).float()
    lp_packed = torch.log_softmax(logits, -1).gather(-1, mb.targets.clamp_min(0)[:, None]).squeeze(-1)
    lp_packed = torch.where(mb.targets != -100, lp_packed, 0.0)

    ref_parts = []
    for s in seqs:
        ids = torch.tensor([s.input_ids], device=device)
        out = torch.log_softmax(ref(input_ids=ids).logits[0].float(), -1)
        tgt = torch.tensor(s.input_ids[1:] + [0], device=device)
        lp = out.gather(-1, tgt[:, None]).squeeze(-1)
        mask = torch.zeros(len(s.input_ids), dtype=torch.bool, device=device)
        mask[s.prompt_len - 1 : len(s.input_ids) - 1] = True
        ref_parts.append(torch.where(mask, lp, 0.0))
    lp_ref = torch.cat(ref_parts)
    # fp32 models, same weights, different kernels (per-sequence loop vs full sdpa): ~1e-6.
    torch.testing.assert_close(lp_packed, lp_ref, rtol=0, atol=2e-5)

    lp_packed.sum().backward()
    lp_ref.sum().backward()
    for (n1, p1), (n2, p2) in zip(packed_model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"{family} {n1}: {m}")


def test_position_ids_restart_at_each_sequence():
    """Plain RoPE only sees relative positions, so the test above passes whatever positions a packed row is given.
    Dynamic NTK RoPE rescales its frequencies once a position passes max_position_embeddings (16 here): each
    sequence is shorter than that, the packed row (35 tokens) is not, so positions counted along the row instead of
    from each sequence's start give other hidden states (1e-3 away)."""
    def config():
        return LlamaConfig(vocab_size=89, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
                           rope_scaling={"rope_type": "dynamic", "factor": 4.0})  # rope_parameters in 5.x

    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(config(), attn_implementation="eager").double().eval()
    packed = AutoModelForCausalLM.from_config(config()).double().eval()
    packed.load_state_dict(ref.state_dict())
    use_varlen_attention(packed)
    seqs = random_sequences(4, min_len=5, max_len=14)
    mb = pack(seqs, num_sequences=4, num_tokens=sum(s.num_targets for s in seqs))
    assert mb.input_ids.numel() > 16 > max(len(s.input_ids) for s in seqs)
    with torch.no_grad():
        got = packed_hidden_states(packed.model, mb)
        want = torch.cat([ref.model(input_ids=torch.tensor([s.input_ids])).last_hidden_state[0] for s in seqs])
    # float64 models; RoPE's cos/sin are float32 in transformers, hence not 1e-12
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    """Stand-in with flash-attn 2.8.3's signature and documented contract (flash_attn/flash_attn_interface.py and
    its CUDA checks), computed in float64: q [total, Hq, D], k/v [total, Hkv, D] with Hq % Hkv == 0 (query head i
    reads KV head i // (Hq / Hkv)), int32 cu_seqlens, fp16/bf16 only, causal mask aligned bottom-right."""
    assert q.dtype in (torch.float16, torch.bfloat16), "FlashAttention only support fp16 and bf16 data type"
    assert k.dtype == v.dtype == q.dtype and cu_seqlens_q.dtype == cu_seqlens_k.dtype == torch.int32
    assert q.dim() == k.dim() == v.dim() == 3 and q.shape[1] % k.shape[1] == 0
    assert dropout_p == 0.0 and window_size == (-1, -1) and softcap == 0.0 and alibi_slopes is None
    flash_attn_varlen_func.calls += 1
    groups = q.shape[1] // k.shape[1]
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    out = torch.zeros(q.shape, dtype=torch.float64)
    bq, bk = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    assert max_seqlen_q == max(b - a for a, b in zip(bq, bq[1:])) and max_seqlen_k == max(b - a for a, b in zip(bk, bk[1:]))
    for (q0, q1), (k0, k1) in zip(zip(bq, bq[1:]), zip(bk, bk[1:])):
        qs = q[q0:q1].double().transpose(0, 1)
        ks = k[k0:k1].double().repeat_interleave(groups, 1).transpose(0, 1)
        vs = v[k0:k1].double().repeat_interleave(groups, 1).transpose(0, 1)
        scores = qs @ ks.transpose(1, 2) * scale
        if causal:
            lq, lk = q1 - q0, k1 - k0
            scores = scores.masked_fill(torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq).logical_not(), float("-inf"))
        out[q0:q1] = (scores.softmax(-1) @ vs).transpose(0, 1)
    return out.to(q.dtype)


def _reference_attention(q, k, v, cu, scale):
    """Causal attention per sequence in float64, written out (no library attention)."""
    groups = q.shape[1] // k.shape[1]
    out = torch.empty(q.shape, dtype=torch.float64)
    b = cu.tolist()
    for s, e in zip(b, b[1:]):
        for h in range(q.shape[1]):
            qh, kh, vh = q[s:e, h].double(), k[s:e, h // groups].double(), v[s:e, h // groups].double()
            w = (qh @ kh.T * scale).masked_fill(torch.ones(e - s, e - s, dtype=torch.bool).triu(1), float("-inf"))
            out[s:e, h] = w.softmax(-1) @ vh
    return out


def test_flash_attn_gets_its_documented_arguments_and_half_precision_only(monkeypatch):
    """The CUDA fused path, run on CPU against a stand-in with flash-attn's own signature and contract (flash-attn
    is not installed on any machine here): boundaries, scale, causality and grouped KV heads reach it as it
    documents them, and fp32 inputs, which its kernels refuse, never go to it."""
    from raro_fast.model import varlen

    monkeypatch.setattr(varlen, "_flash_attn_varlen", lambda: flash_attn_varlen_func)
    monkeypatch.setattr(varlen, "_torch_varlen", lambda: (None, frozenset()))
    flash_attn_varlen_func.calls = 0
    g = torch.Generator().manual_seed(3)
    lengths = [5, 1, 9, 3]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    q, k, v = (torch.randn(sum(lengths), h, 8, generator=g) for h in (4, 2, 2))
    scale = 0.3
    want = _reference_attention(q, k, v, cu, scale)
    for dtype in (torch.bfloat16, torch.float16):
        got = varlen._fused_varlen(q.to(dtype), k.to(dtype), v.to(dtype), cu, max(lengths), scale, groups=2)
        torch.testing.assert_close(got.double(), want, rtol=0, atol=3e-2)
    assert flash_attn_varlen_func.calls == 2
    assert varlen._fused_varlen(q, k, v, cu, max(lengths), scale, groups=2) is None
    assert flash_attn_varlen_func.calls == 2
    # The per-sequence loop that fp32 (and CPU) runs agrees with the same reference.
    torch.testing.assert_close(varlen.varlen_causal_attention(q.double(), k.double(), v.double(), cu, max(lengths), scale),
                               want, rtol=1e-12, atol=1e-12)


def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
    """Stand-in with torch 2.13's `torch.nn.attention.varlen.varlen_attn` signature and documented contract, computed
    in float64: window_size (left, right) bounds how far back and ahead a query sees (-1: no bound), so (-1, 0) is
    causal and the default (-1, -1) is not; grouped KV heads only with enable_gqa."""
    assert return_aux is None and seqused_k is None and block_table is None and num_splits is None
    assert enable_gqa or query.shape[1] == key.shape[1], "query and key heads differ without enable_gqa"
    varlen_attn.calls += 1
    groups = query.shape[1] // key.shape[1]
    scale = scale if scale is not None else query.shape[-1] ** -0.5
    b = cu_seq_q.tolist()
    assert cu_seq_k.tolist() == b and max_q == max_k == max(e - s for s, e in zip(b, b[1:]))
    out = torch.zeros(query.shape, dtype=torch.float64)
    for s, e in zip(b, b[1:]):
        i = torch.arange(e - s)
        seen = torch.ones(e - s, e - s, dtype=torch.bool)
        if window_size[0] >= 0:
            seen &= i[None, :] >= i[:, None] - window_size[0]
        if window_size[1] >= 0:
            seen &= i[None, :] <= i[:, None] + window_size[1]
        qs = query[s:e].double().transpose(0, 1)
        ks, vs = (x[s:e].double().repeat_interleave(groups, 1).transpose(0, 1) for x in (key, value))
        scores = (qs @ ks.transpose(1, 2) * scale).masked_fill(~seen, float("-inf"))
        out[s:e] = (scores.softmax(-1) @ vs).transpose(0, 1)
    return out.to(query.dtype)


def varlen_attn_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    """torch 2.10's signature: causality as is_causal, no grouped KV heads, and no scale (always head_dim ** -0.5)."""
    assert query.shape[1] == key.shape[1], "query and key heads differ: this form has no enable_gqa"
    return varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, return_aux=return_aux,
                       window_size=(-1, 0) if is_causal else (-1, -1))


def test_torch_varlen_gets_a_causal_window_and_its_grouped_heads_as_documented(monkeypatch):
    """The CUDA path through torch's own varlen kernel, run on CPU against stand-ins with its signatures: a window
    of (-1, -1), its default, would let every token attend to the whole sequence after it, and grouped KV heads go
    in as enable_gqa, or repeated head by head (query head i reads KV head i // groups) where it has none. torch
    2.10's takes no scale (passing one was a TypeError at the first update): a model whose scale is not
    head_dim ** -0.5 takes the exact path there instead."""
    import inspect

    from raro_fast.model import varlen

    installed, params = varlen._torch_varlen()
    if installed is not None and "window_size" in params:  # the stand-in keeps the installed torch's signature
        assert params == frozenset(inspect.signature(varlen_attn).parameters)
    monkeypatch.setattr(varlen, "_flash_attn_varlen", lambda: None)
    g = torch.Generator().manual_seed(6)
    lengths = [5, 1, 9, 3]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    q, k, v = (torch.randn(sum(lengths), h, 8, generator=g, dtype=torch.float64) for h in (4, 2, 2))
    # 1 / sqrt(8), as some models compute their scale, is 1 ulp from 8 ** -0.5: the same scale, still fused
    for form, scale, calls in [(varlen_attn, 0.3, 1), (varlen_attn, 8 ** -0.5, 1), (varlen_attn_2_10, 8 ** -0.5, 1),
                               (varlen_attn_2_10, 1 / math.sqrt(8), 1), (varlen_attn_2_10, 0.3, 0)]:
        monkeypatch.setattr(varlen, "_torch_varlen", lambda: (form, frozenset(inspect.signature(form).parameters)))
        varlen_attn.calls = 0
        got = varlen._fused_varlen(q, k, v, cu, max(lengths), scale, groups=2)
        assert varlen_attn.calls == calls, (form.__name__, scale)
        if calls:
            torch.testing.assert_close(got, _reference_attention(q, k, v, cu, scale), rtol=1e-12, atol=1e-12,
                                       msg=lambda m: f"{form.__name__}: {m}")
        else:
            assert got is None


def test_the_models_attention_scale_is_applied_and_a_sliding_window_refused():
    """transformers passes each model's own `scaling` (Gemma's query_pre_attn_scalar ** -0.5, not head_dim ** -0.5),
    and a sliding window shorter than the longest sequence, which packed attention does not apply."""
    from raro_fast.model import varlen

    g = torch.Generator().manual_seed(7)
    lengths = [6, 9, 2]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    query, key, value = (torch.randn(1, h, sum(lengths), 8, generator=g, dtype=torch.float64) for h in (4, 2, 2))
    kwargs = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=9, max_length_k=9)
    out, _ = varlen._attention(None, query, key, value, None, scaling=0.7, **kwargs)
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))
    torch.testing.assert_close(out[0], _reference_attention(q, k, v, cu, 0.7), rtol=1e-12, atol=1e-12)
    out, _ = varlen._attention(None, query, key, value, None, sliding_window=64, **kwargs)  # wider: full causal
    torch.testing.assert_close(out[0], _reference_attention(q, k, v, cu, 8 ** -0.5), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="sliding-window attention is not supported"):
        varlen._attention(None, query, key, value, None, sliding_window=4, **kwargs)


def test_bucketed_attention_values_and_gradients_equal_the_reference_float64():
    """The CPU path pads sequences of similar length into one SDPA call per bucket: values and gradients equal a
    per-sequence float64 reference, with lengths spread over several buckets, a length 1 and an empty sequence."""
    from raro_fast.model import varlen

    g = torch.Generator().manual_seed(4)
    lengths = [7, 0, 1, 30, 12, 29, 3, 31, 8]
    assert len(varlen._length_buckets(lengths)) > 2
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    q, k, v = (torch.randn(sum(lengths), h, 8, generator=g, dtype=torch.float64, requires_grad=True) for h in (4, 2, 2))
    weights = torch.randn(sum(lengths), 4, 8, generator=g, dtype=torch.float64)
    got = varlen.varlen_causal_attention(q, k, v, cu, max(lengths), 0.3)
    grads = torch.autograd.grad((got * weights).sum(), (q, k, v))
    want = _reference_attention(q, k, v, cu, 0.3)
    want_grads = torch.autograd.grad((want * weights).sum(), (q, k, v))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_length_buckets_cover_every_sequence_once_within_the_slack():
    from raro_fast.model.varlen import BUCKET_SLACK, _length_buckets

    import random as _random

    rng = _random.Random(0)
    for _ in range(200):
        lengths = [rng.choice([0, rng.randint(1, 40), rng.randint(150, 230)]) for _ in range(rng.randint(1, 40))]
        buckets = _length_buckets(lengths)
        assert sorted(i for b in buckets for i in b) == [i for i, n in enumerate(lengths) if n]
        for b in buckets:
            assert len(b) == 1 or max(lengths[i] for i in b) * len(b) <= BUCKET_SLACK * sum(lengths[i] for i in b)


def test_rows_after_the_last_sequence_read_zero_and_pass_no_gradient():
    """A packed row longer than its sequences (cu_seqlens ending before T): the rows outside every sequence come
    out exactly zero (the old path left them as uninitialised memory), and the real rows are unchanged."""
    from raro_fast.model import varlen

    g = torch.Generator().manual_seed(5)
    lengths = [6, 2, 9]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    T = sum(lengths) + 4
    q, k, v = (torch.randn(T, h, 8, generator=g, dtype=torch.float64, requires_grad=True) for h in (4, 2, 2))
    got = varlen.varlen_causal_attention(q, k, v, cu, max(lengths), 0.3)
    assert torch.equal(got[sum(lengths):], torch.zeros(4, 4, 8, dtype=torch.float64))
    torch.testing.assert_close(got[: sum(lengths)], _reference_attention(q, k, v, cu, 0.3)[: sum(lengths)], rtol=1e-12,
                               atol=1e-12)
    grads = torch.autograd.grad(got.sum(), (q, k, v))
    for grad in grads:
        assert torch.equal(grad[sum(lengths):], torch.zeros_like(grad[sum(lengths):]))


def _gemma2(**overrides):
    from transformers import Gemma2Config

    return Gemma2Config(**{**dict(vocab_size=89, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=64,
                                  query_pre_attn_scalar=8, max_position_embeddings=128, attn_logit_softcapping=50.0,
                                  final_logit_softcapping=None), **overrides})


def _scores_scaled_up(model):
    """q and k weights x30: scores large enough that a soft-cap of 50 changes them (a random init's do not)."""
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(30)
            layer.self_attn.k_proj.weight.mul_(30)
    return model


def test_attention_it_does_not_compute_is_refused_not_dropped():
    """Gemma 2 passes `softcap` and gpt-oss `s_aux` (sinks) through the attention interface's kwargs; dropped, they
    gave hidden states 0.3-3.4 away from the model's own with no error. Refused when the model is switched to packed
    attention, and by the attention itself for a model switched some other way."""
    from raro_fast.model import varlen

    torch.manual_seed(0)
    capped = _scores_scaled_up(AutoModelForCausalLM.from_config(_gemma2(), attn_implementation="eager").float())
    with pytest.raises(ValueError, match="soft-capping .Gemma 2's attn_logit_softcapping."):
        use_varlen_attention(capped)
    varlen.register_varlen_attention()
    capped.set_attn_implementation(varlen.VARLEN_ATTENTION)  # past the check: the attention refuses it itself
    mb = pack(random_sequences(3, min_len=4, max_len=9), num_sequences=3, num_tokens=40)
    with pytest.raises(ValueError, match="soft-capping"):
        packed_hidden_states(capped.model, mb)
    with pytest.raises(ValueError, match="attention dropout 0.1 is not applied"):
        use_varlen_attention(AutoModelForCausalLM.from_config(
            Qwen2Config(**{**CONFIGS["qwen2"]().to_dict(), "attention_dropout": 0.1})))
    try:
        from transformers import GptOssConfig
    except ImportError:
        return
    sinks = AutoModelForCausalLM.from_config(GptOssConfig(
        vocab_size=89, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, sliding_window=64, num_local_experts=2, num_experts_per_tok=1,
        max_position_embeddings=128, layer_types=["full_attention"] * 2))
    with pytest.raises(ValueError, match="attention sinks .gpt-oss."):
        use_varlen_attention(sinks)


def test_gemma2_without_soft_capping_packs_exactly():
    """The control: the same model with its score cap off goes through packed attention as the model computes it."""
    torch.manual_seed(0)
    ref = _scores_scaled_up(AutoModelForCausalLM.from_config(_gemma2(attn_logit_softcapping=None),
                                                             attn_implementation="eager").float().eval())
    packed = AutoModelForCausalLM.from_config(_gemma2(attn_logit_softcapping=None)).float().eval()
    packed.load_state_dict(ref.state_dict())
    use_varlen_attention(packed)
    seqs = random_sequences(3, min_len=5, max_len=12)
    mb = pack(seqs, num_sequences=3, num_tokens=sum(s.num_targets for s in seqs))
    with torch.no_grad():
        got = packed_hidden_states(packed.model, mb)
        want = torch.cat([ref.model(input_ids=torch.tensor([s.input_ids])).last_hidden_state[0] for s in seqs])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def _tiny(name: str, **fields):
    import transformers

    cls = getattr(transformers, name, None)
    if cls is None:
        pytest.skip(f"this transformers has no {name}")
    base = dict(vocab_size=89, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cls(**{**base, **fields}))


@pytest.mark.parametrize("name,fields,what", [
    ("Lfm2Config", dict(layer_types=["conv", "full_attention"], block_auto_adjust_ff_dim=False), "conv"),
    ("GraniteMoeHybridConfig", dict(layer_types=["mamba", "attention"], mamba_n_heads=8, mamba_d_head=8,
                                    mamba_d_state=8, mamba_n_groups=1, mamba_chunk_size=8), "(linear_attention|mamba)"),
    ("Llama4TextConfig", dict(head_dim=8, intermediate_size_mlp=64, num_local_experts=2, attention_chunk_size=8),
     "chunked"),
])
def test_models_that_mix_tokens_outside_the_attention_are_refused(name, fields, what):
    """LFM2's convolutions, Granite-4.0-H's Mamba layers and Llama 4's chunked attention run across the sequences of
    a packed row (only the attention reads the boundaries): accepted, every sequence after a row's first got other
    log-probs (up to 0.4). Found by review on 2026-12-07."""
    with pytest.raises(ValueError, match=f"raro_varlen: the model has .*{what}.*cannot be trained here"):
        use_varlen_attention(_tiny(name, **fields))


def test_a_rotary_embedding_that_depends_on_the_longest_position_refuses_sequences_past_its_limit():
    """Phi-3's longrope (and dynamic NTK) picks its frequencies by the longest position in the packed row: a short
    sequence beside one past original_max_position_embeddings got the long-context frequencies (1e-2 in
    log-probs). Within the limit the packed row is exact; past it the update stops, naming the limit. Found by
    review on 2026-12-07."""
    from raro_fast.model.varlen import length_dependent_rope_limit

    assert length_dependent_rope_limit(CONFIGS["qwen2"]()) is None
    rope = dict(rope_type="longrope", short_factor=[1.0] * 4, long_factor=[4.0] * 4,
                original_max_position_embeddings=16)
    try:
        model = _tiny("Phi3Config", max_position_embeddings=64, original_max_position_embeddings=16,
                      rope_parameters=rope, pad_token_id=0)
    except (TypeError, ValueError):  # transformers 4.x: rope_scaling, with "type"
        model = _tiny("Phi3Config", max_position_embeddings=64, original_max_position_embeddings=16,
                      rope_scaling={"type": "longrope", "short_factor": [1.0] * 4, "long_factor": [4.0] * 4},
                      pad_token_id=0)
    assert length_dependent_rope_limit(model.config) == 16
    use_varlen_attention(model)
    short = random_sequences(3, min_len=4, max_len=16)
    packed_hidden_states(model.model, pack(short, num_sequences=3, num_tokens=60))
    long = random_sequences(1, min_len=20, max_len=20, seed=2)
    with pytest.raises(ValueError, match="a packed sequence of 20 tokens, over 16: .*longrope"):
        packed_hidden_states(model.model, pack(short + long, num_sequences=4, num_tokens=60))


@pytest.mark.parametrize("name,fields,what", [
    ("XGLMConfig", dict(d_model=32, ffn_dim=48, num_layers=2, attention_heads=4, dropout=0.0, attention_dropout=0.0,
                        activation_dropout=0.0), "an attention of its own"),
    ("Gemma3TextConfig", dict(head_dim=8, use_bidirectional_attention=True), "bidirectional attention"),
])
def test_attention_the_packed_rows_would_not_reach_is_refused(name, fields, what):
    """XGLM's attention never asks transformers' interface, so its causal mask spanned the whole packed row; Gemma 3
    with bidirectional attention was computed causally. Both accepted, with other log-probs (found by review on
    2026-12-07)."""
    if name == "XGLMConfig":
        import transformers

        model = AutoModelForCausalLM.from_config(transformers.XGLMConfig(vocab_size=89, **fields))
    else:
        model = _tiny(name, **fields)
    with pytest.raises(ValueError, match=f"raro_varlen: the model has {what}.*cannot be trained here"):
        use_varlen_attention(model)


def test_dropout_the_training_forward_would_apply_is_refused():
    """Starcoder2's residual and embedding dropout ran in the trainer's forward (train mode) and not in the engine's:
    the ratio was off 1 by noise (found by review on 2026-12-07). Zero dropout is fine."""
    fields = dict(attention_dropout=0.0, residual_dropout=0.1, embedding_dropout=0.1, bos_token_id=0, eos_token_id=1)
    with pytest.raises(ValueError, match=r"raro_varlen: the model's config sets dropout \(embedding_dropout, "
                                         r"residual_dropout\).*set them to 0"):
        use_varlen_attention(_tiny("Starcoder2Config", **fields))
    use_varlen_attention(_tiny("Starcoder2Config", **{**fields, "residual_dropout": 0.0, "embedding_dropout": 0.0}))


def test_values_narrower_than_queries_pack_exactly():
    """Multi-head latent attention (DeepSeek-V2/V3, MiniCPM3): value heads of another width than query and key
    heads. The output was shaped by the queries' width and the first update stopped in a shape error (found by
    review on 2026-12-07); packed, each sequence is computed as alone, shared prompts too."""
    model = _tiny("DeepseekV3Config", moe_intermediate_size=16, num_key_value_heads=4, q_lora_rank=None,
                  kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=6, n_routed_experts=4,
                  num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=2).double()
    seqs = random_sequences(4, min_len=3, max_len=20)
    with torch.no_grad():
        want = torch.cat([model.model(input_ids=torch.tensor([s.input_ids])).last_hidden_state[0] for s in seqs])
        use_varlen_attention(model)
        got = packed_hidden_states(model.model, pack(seqs, num_sequences=4, num_tokens=60))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_each_layer_types_rotary_and_dynamic_ntks_own_length_set_the_limit():
    """Gemma 3 keeps a rotary per layer type: a dynamic one was never read, and a short sequence packed beside a long
    one got the long one's frequencies. Dynamic NTK grows past max_position_embeddings, as transformers' update
    does, not past original_max_position_embeddings (found by review on 2026-12-07)."""
    from raro_fast.model.varlen import length_dependent_rope_limit

    model = _tiny("Gemma3TextConfig", head_dim=8, max_position_embeddings=16, rope_parameters={
        "full_attention": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}})
    assert length_dependent_rope_limit(model.config) == 16
    use_varlen_attention(model)
    short, long = random_sequences(1, min_len=5, max_len=5), random_sequences(1, min_len=24, max_len=24, seed=2)
    with pytest.raises(ValueError, match="a packed sequence of 24 tokens, over 16"):
        packed_hidden_states(model.model, pack(short + long, num_sequences=2, num_tokens=40))
    llama = _tiny("LlamaConfig", max_position_embeddings=16, rope_parameters={
        "rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0, "original_max_position_embeddings": 32})
    assert length_dependent_rope_limit(llama.config) == 16


@pytest.mark.parametrize("name, make, window", [
    ("qwen2 sliding", lambda T: T.Qwen2Config(use_sliding_window=True, sliding_window=6, max_window_layers=0), 6),
    ("qwen2 full", lambda T: T.Qwen2Config(sliding_window=6), None),  # use_sliding_window off: no window
    ("mistral", lambda T: T.MistralConfig(sliding_window=6), 6),
    ("mistral none", lambda T: T.MistralConfig(sliding_window=None), None),
    ("gemma3 local", lambda T: T.Gemma3TextConfig(sliding_window=6, head_dim=16), 6),
    ("gemma3 all full", lambda T: T.Gemma3TextConfig(sliding_window=6, head_dim=16, num_hidden_layers=2,
                                                     layer_types=["full_attention"] * 2), None),
    ("llama", lambda T: T.LlamaConfig(), None),
])
def test_the_packed_length_limit_is_where_packed_attention_refuses_a_sequence(name, make, window):
    """`varlen.attention_window` reads the config as the model's attention does: a window on layers that slide
    (a window set beside full-attention layers is none), checked against a packed forward that refuses a sequence
    past it (found by review: such a model stopped at its first long update, after minutes of rollouts)."""
    import transformers

    from raro_fast.model.policy import PolicyModel
    from raro_fast.model.varlen import packed_length_limit
    from raro_fast.packing import SequenceSample, plan_micro_batches

    cfg = make(transformers)
    for key, value in dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           num_key_value_heads=1, intermediate_size=64, max_position_embeddings=64).items():
        setattr(cfg, key, value)
    assert (packed_length_limit(cfg) or (None,))[0] == window
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    use_varlen_attention(model)
    for length in (6, 7):
        sample = SequenceSample(input_ids=list(range(3, 3 + length)), prompt_len=2, advantage=1.0, role="policy",
                                group=0, uid=0)
        (mb,) = plan_micro_batches([sample], max_tokens_per_micro_batch=64, world_size=1, rank=0)
        if window is not None and length > window:
            with pytest.raises(ValueError, match="sliding-window attention is not supported"):
                PolicyModel(model)(mb)
        else:
            PolicyModel(model)(mb)
