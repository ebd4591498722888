"""Optional Liger-Kernel modules in the trainer's model: swapped in as modules holding the very same parameters
(names and storage unchanged), and numerically the model they replace — RoPE under the Triton CPU interpreter,
all three on CUDA. Liger's RMSNorm and SwiGLU kernels do not run under the interpreter (an InterpreterError in
Liger's kernels), so on CPU only their wiring is checked."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from raro_fast.model.varlen import packed_hidden_states, use_varlen_attention
from raro_fast.packing import pack
from test_varlen import CONFIGS, random_sequences

pytest.importorskip("liger_kernel")
from raro_fast.model.liger import LigerRopeAttention, use_liger_kernels  # noqa: E402

CUDA = torch.cuda.is_available()
# Liger's kernels are Triton kernels: CPU tensors need the interpreter, which a CUDA machine need not have on.
KERNEL_DEVICE = "cuda" if CUDA else "cpu"


def pair(family, device):
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(CONFIGS[family](), attn_implementation="sdpa").float().to(device)
    fused = AutoModelForCausalLM.from_config(CONFIGS[family](), attn_implementation="sdpa").float().to(device)
    fused.load_state_dict(ref.state_dict())
    for m in (ref, fused):
        use_varlen_attention(m)
    return ref, fused


def packed_batch(device):
    seqs = random_sequences(4, min_len=5, max_len=29)
    return pack(seqs, num_sequences=4, num_tokens=sum(s.num_targets for s in seqs)).to(device)


def logprobs_and_grads(model, mb):
    model.zero_grad()
    hidden = packed_hidden_states(model.model, mb)
    lp = torch.log_softmax(model.lm_head(hidden).float(), -1).gather(-1, mb.targets.clamp_min(0)[:, None]).squeeze(-1)
    lp = torch.where(mb.targets != -100, lp, 0.0)
    (lp * torch.linspace(0.5, 1.5, lp.numel(), device=lp.device)).sum().backward()
    return lp.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_swapped_modules_keep_names_and_storage(family):
    ref, fused = pair(family, "cpu")
    before = {k: v.data_ptr() for k, v in fused.state_dict().items()}
    assert use_liger_kernels(fused) == ["rms_norm", "swiglu", "rope"]
    after = {k: v.data_ptr() for k, v in fused.state_dict().items()}
    assert before == after  # same names, same Parameter objects: checkpoints and weight sync see the same model
    layer = fused.model.layers[0]
    assert type(layer.input_layernorm).__name__ == "LigerRMSNorm" and type(fused.model.norm).__name__ == "LigerRMSNorm"
    assert type(layer.mlp).__name__ == "LigerSwiGLUMLP" and isinstance(layer.self_attn, LigerRopeAttention)
    assert layer.input_layernorm.variance_epsilon == ref.model.layers[0].input_layernorm.variance_epsilon


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_liger_rope_equals_transformers_rope(family):
    ref, fused = pair(family, KERNEL_DEVICE)
    use_liger_kernels(fused, rms_norm=False, swiglu=False, rope=True)
    mb = packed_batch(KERNEL_DEVICE)
    lp_ref, g_ref = logprobs_and_grads(ref, mb)
    lp, g = logprobs_and_grads(fused, mb)
    torch.testing.assert_close(lp, lp_ref, rtol=0, atol=1e-5)  # fp32: only summation order differs
    for n in g_ref:
        torch.testing.assert_close(g[n], g_ref[n], rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not CUDA, reason="Liger's RMSNorm and SwiGLU kernels need a GPU (they fail under the interpreter)")
@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_all_liger_modules_equal_the_model_on_cuda(family):
    ref, fused = pair(family, "cuda")
    use_liger_kernels(fused)
    mb = packed_batch("cuda")
    lp_ref, g_ref = logprobs_and_grads(ref, mb)
    lp, g = logprobs_and_grads(fused, mb)
    torch.testing.assert_close(lp, lp_ref, rtol=0, atol=1e-4)
    for n in g_ref:
        torch.testing.assert_close(g[n], g_ref[n], rtol=1e-3, atol=1e-4)


def test_the_swapped_norms_keep_the_models_epsilon():
    """Llama 2 and SmolLM2 normalise with eps 1e-5; Liger's default, and the configs above, have 1e-6."""
    from transformers import LlamaConfig

    model = AutoModelForCausalLM.from_config(LlamaConfig(**{**CONFIGS["llama"]().to_dict(), "rms_norm_eps": 1e-5}))
    use_liger_kernels(model, swiglu=False, rope=False)
    norms = [m for m in model.modules() if type(m).__name__ == "LigerRMSNorm"]
    assert len(norms) == 2 * 2 + 1 and all(n.variance_epsilon == 1e-5 for n in norms)


def test_a_kv_cache_and_a_non_silu_mlp_are_refused():
    """The RoPE attention never writes a KV cache: a generation through it would read an empty cache at every
    step with no error. Liger's SwiGLU MLP computes silu(gate) * up whatever the config's activation is."""
    from transformers import LlamaConfig

    _, fused = pair("llama", "cpu")
    use_liger_kernels(fused, rms_norm=False, swiglu=False, rope=True)
    with pytest.raises(ValueError, match="no KV cache"):
        fused(input_ids=torch.tensor([[1, 2, 3]]), use_cache=True)
    gelu = AutoModelForCausalLM.from_config(LlamaConfig(**{**CONFIGS["llama"]().to_dict(), "hidden_act": "gelu"}))
    with pytest.raises(ValueError, match="SwiGLU MLP needs hidden_act 'silu', not 'gelu'"):
        use_liger_kernels(gelu)
    assert use_liger_kernels(gelu, swiglu=False) == ["rms_norm", "rope"]  # the MLP stays the model's own


def test_unsupported_family_and_missing_liger_say_so(monkeypatch):
    from transformers import GPT2Config

    model = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="supported for \\('qwen2', 'llama'\\) models, not 'gpt2'"):
        use_liger_kernels(model)
    import sys

    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", None)
    with pytest.raises(ValueError, match="pip install liger-kernel"):
        use_liger_kernels(model)
