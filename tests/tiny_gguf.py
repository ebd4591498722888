"""A tiny random Llama written as a llama.cpp-style GGUF file (F32 tensors; the project's own tokenizer as a gpt2 BPE
vocabulary), so that conversion can be tested in seconds, faithful or with one thing wrong."""
import json
from pathlib import Path

import numpy as np
import torch
from gguf import GGUFWriter
from transformers import AutoModelForCausalLM, LlamaConfig

import raro_fast.model

TOK = Path(raro_fast.model.__file__).parent / "tokenizer" / "tokenizer.json"


def tiny_llama(seed=0, tied=True, **kw):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=388, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=tied, max_position_embeddings=4096,
                      rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, **kw)
    return AutoModelForCausalLM.from_config(cfg).float().eval()


def _permute(w, n_head, n_head_kv=None):
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model, path, *, extra=None, drop=(), extra_tensors=None, vocab_key=True, tokenizer=True, pre="default",
               transform=None):
    """`model` as llama.cpp writes a Llama: its q and k rows permuted, tensors named `blk.N.*`; `drop` leaves
    those GGUF tensors out, `extra` adds metadata (a callable given the writer), `extra_tensors` more tensors,
    `transform` maps a GGUF tensor's array to another (a damaged file)."""
    cfg = model.config
    w = GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    if vocab_key:
        w.add_vocab_size(cfg.vocab_size)
    if extra:
        extra(w)
    if tokenizer:
        _write_tokenizer(w, pre)
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    if not cfg.tie_word_embeddings:
        names["lm_head.weight"] = "output.weight"
    per = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
           "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
           "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for i in range(cfg.num_hidden_layers):
        for hf, gg in per.items():
            names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{gg}.weight"
    for hf, gg in names.items():
        if gg in drop:
            continue
        a = sd[hf]
        if gg.endswith("attn_q.weight"):
            a = _permute(a, cfg.num_attention_heads, cfg.num_attention_heads)
        elif gg.endswith("attn_k.weight"):
            a = _permute(a, cfg.num_attention_heads, cfg.num_key_value_heads)
        if transform and gg in transform:
            a = transform[gg](a)
        w.add_tensor(gg, np.ascontiguousarray(a))
    for name, a in (extra_tensors or {}).items():
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _write_tokenizer(w, pre="default"):
    t = json.loads(TOK.read_text())
    vocab = {**t["model"]["vocab"], **{a["content"]: a["id"] for a in t["added_tokens"]}}
    tokens = [None] * len(vocab)
    for k, i in vocab.items():
        tokens[i] = k
    types = [3 if i < 3 else (4 if i >= 384 else 1) for i in range(len(tokens))]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([" ".join(m) for m in t["model"]["merges"]])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    w.add_add_bos_token(False)
