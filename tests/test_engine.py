"""The embedded engine: its sampled-token log-probs are the model's (teacher-forced) log-probs at the sampling
temperature; finish reasons, stop tokens, seeding and weight updates behave as the interface says."""
import random
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from raro_fast.rollout.embedded import EmbeddedEngine
from raro_fast.rollout.engine import SamplingParams

PAD, EOS, VOCAB = 0, 1, 61


def tiny_model(seed=0):
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=128)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()


def engine_for(model, batch_size=4):
    return EmbeddedEngine(model, pad_token_id=PAD, eos_token_ids=[EOS], decode=lambda ids: " ".join(map(str, ids)),
                          batch_size=batch_size)


def random_prompts(n, rng):
    return [[rng.randrange(2, VOCAB) for _ in range(rng.randrange(2, 9))] for _ in range(n)]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_match_teacher_forcing(temperature):
    rng = random.Random(1)
    model = tiny_model()
    eng = engine_for(model)
    prompts = random_prompts(5, rng)
    outs = eng.generate(prompts, SamplingParams(max_new_tokens=12, temperature=temperature, n=3, seed=5))
    assert len(outs) == 5 and all(len(o) == 3 for o in outs)
    with torch.no_grad():
        for p, comps in zip(prompts, outs):
            for c in comps:
                assert c.prompt_ids == p
                assert len(c.token_ids) == len(c.logprobs) >= 1
                ids = torch.tensor([p + c.token_ids])
                logits = model(input_ids=ids).logits[0].double() / temperature
                ref = torch.log_softmax(logits, -1)[len(p) - 1 : -1].gather(-1, ids[0, len(p):, None]).squeeze(-1)
                got = torch.tensor(c.logprobs, dtype=torch.float64)
                # fp32 model, batched with left padding vs one sequence alone: agreement to fp32 rounding.
                torch.testing.assert_close(got, ref, atol=2e-5, rtol=0)
                if c.finish_reason == "stop":
                    assert c.token_ids[-1] == EOS and EOS not in c.token_ids[:-1]
                else:
                    assert c.finish_reason == "length" and len(c.token_ids) == 12 and EOS not in c.token_ids


def test_generation_passes_no_deprecated_transformers_argument():
    # transformers 5.24 renamed past_key_values -> cache and removes the old name in 5.40: fail now, not then
    eng = engine_for(tiny_model())
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=r".*deprecated", category=FutureWarning)
        (c,) = eng.generate([[2, 3, 4]], SamplingParams(max_new_tokens=4, seed=0))[0]
    assert len(c.token_ids) >= 1


def test_seed_reproducible_and_greedy_deterministic():
    rng = random.Random(2)
    eng = engine_for(tiny_model())
    prompts = random_prompts(3, rng)
    a = eng.generate(prompts, SamplingParams(max_new_tokens=8, n=2, seed=11))
    b = eng.generate(prompts, SamplingParams(max_new_tokens=8, n=2, seed=11))
    assert [[c.token_ids for c in o] for o in a] == [[c.token_ids for c in o] for o in b]
    g1 = eng.generate(prompts, SamplingParams(max_new_tokens=8, temperature=0.0))
    g2 = eng.generate(prompts[::-1], SamplingParams(max_new_tokens=8, temperature=0.0))
    assert [o[0].token_ids for o in g1] == [o[0].token_ids for o in g2[::-1]]  # batch order does not matter


def test_update_weights_sets_version_and_weights():
    src, dst = tiny_model(0), tiny_model(1)
    eng = engine_for(dst)
    eng.update_weights(src.state_dict().items(), version=7)
    assert eng.weight_version == 7
    for (n1, p1), (n2, p2) in zip(src.state_dict().items(), dst.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    prompts = random_prompts(2, random.Random(3))
    out = eng.generate(prompts, SamplingParams(max_new_tokens=4, temperature=0.0))
    assert all(c.weight_version == 7 for o in out for c in o)
    with pytest.raises(KeyError, match="no parameter named 'bogus'"):
        eng.update_weights([("bogus", torch.zeros(1))], version=8)
    with pytest.raises(KeyError, match="no new value"):
        eng.update_weights(list(src.state_dict().items())[:3], version=8)
