"""Packed per-token log-probs (varlen attention) equal per-sequence log-probs of the unpacked model."""
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
