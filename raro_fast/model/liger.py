"""Optional Liger-Kernel modules in the trainer's model: RMSNorm, the SwiGLU MLP and RoPE (`--model.liger_kernels`).

They are swapped in as modules, from outside the model, never by patching transformers' functions: each new
module takes over the old one's parameters (the same Parameter objects under the same names), so checkpoints,
weight sync and FSDP see the model they saw before. Qwen2 and Llama families only (their attention is the one
`LigerRopeAttention` re-implements). The rollout engine keeps its own, unmodified copy.
"""
from __future__ import annotations

from torch import nn

SUPPORTED = ("qwen2", "llama")
INSTALL_HINT = "pip install liger-kernel (or raro-fast[liger])"


def _require_liger():
    try:
        import liger_kernel.transformers as lk
        from liger_kernel.transformers.rope import liger_rotary_pos_emb
    except ImportError as e:
        raise ValueError(f"model.liger_kernels=true needs Liger-Kernel, which is not installed ({e}): {INSTALL_HINT}") from None
    return lk, liger_rotary_pos_emb


class LigerRopeAttention(nn.Module):
    """The Qwen2/Llama attention block with Liger's fused RoPE; holds the original projections (same names)."""

    def __init__(self, attn: nn.Module, rope) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        self.config, self.layer_idx, self.head_dim = attn.config, attn.layer_idx, attn.head_dim
        self.scaling, self.attention_dropout, self.is_causal = attn.scaling, attn.attention_dropout, attn.is_causal
        self.num_key_value_groups = attn.num_key_value_groups
        self.sliding_window = getattr(attn, "sliding_window", None)
        self._rope = rope

    def forward(self, hidden_states, position_embeddings, attention_mask=None, past_key_values=None, cache=None,
                **kwargs):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        if past_key_values is not None or cache is not None:  # the KV cache's name before / since transformers 5.24
            raise ValueError("LigerRopeAttention serves the trainer's forward passes only (no KV cache)")
        impl = self.config._attn_implementation
        if impl not in ALL_ATTENTION_FUNCTIONS:
            raise ValueError(f"LigerRopeAttention: attention implementation {impl!r} is not registered with transformers")
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        q = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        k = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = self._rope(q, k, cos, sin)
        out, weights = ALL_ATTENTION_FUNCTIONS[impl](
            self, q, k, v, attention_mask, dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling, sliding_window=self.sliding_window, **kwargs)
        return self.o_proj(out.reshape(*hidden_states.shape[:-1], -1).contiguous()), weights


def _norm(old: nn.Module, lk) -> nn.Module:
    # casting_mode "llama": normalise in fp32, cast back, then scale by the weight, as Qwen2/Llama RMSNorm do
    new = lk.LigerRMSNorm(old.weight.shape[0], eps=old.variance_epsilon, casting_mode="llama")
    new.weight = old.weight
    return new


def _mlp(old: nn.Module, config, lk) -> nn.Module:
    new = lk.LigerSwiGLUMLP(config)
    new.gate_proj, new.up_proj, new.down_proj = old.gate_proj, old.up_proj, old.down_proj
    return new


def use_liger_kernels(model: nn.Module, *, rms_norm: bool = True, swiglu: bool = True, rope: bool = True) -> list[str]:
    """Swap Liger's modules into a Hugging Face Qwen2/Llama causal LM in place; returns what was swapped."""
    lk, liger_rope = _require_liger()
    kind = getattr(model.config, "model_type", None)
    if kind not in SUPPORTED:
        raise ValueError(f"model.liger_kernels: supported for {SUPPORTED} models, not {kind!r}")
    if swiglu and getattr(model.config, "hidden_act", "silu") != "silu":
        raise ValueError(f"model.liger_kernels: the SwiGLU MLP needs hidden_act 'silu', not {model.config.hidden_act!r}")
    for layer in model.model.layers:
        if rms_norm:
            layer.input_layernorm = _norm(layer.input_layernorm, lk)
            layer.post_attention_layernorm = _norm(layer.post_attention_layernorm, lk)
        if swiglu:
            layer.mlp = _mlp(layer.mlp, model.config, lk)
        if rope:
            layer.self_attn = LigerRopeAttention(layer.self_attn, liger_rope)
    if rms_norm:
        model.model.norm = _norm(model.model.norm, lk)
    return [name for name, on in (("rms_norm", rms_norm), ("swiglu", swiglu), ("rope", rope)) if on]

