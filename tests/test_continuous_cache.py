"""How the continuous engine sizes and keeps its paged KV cache: one block per started page of each request's
prompt + max_new_tokens, a kept manager reused while it fits, and a manager whose call failed never reused."""
import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from raro_fast.rollout.continuous import ContinuousEngine, _page_size, continuous_batching_unavailable
from raro_fast.rollout.engine import NonFiniteLogitsError, SamplingParams

PAD, EOS, VOCAB = 0, 1, 61
MISSING = continuous_batching_unavailable()
pytestmark = pytest.mark.skipif(MISSING is not None, reason=str(MISSING))


def kept_engine():
    torch.manual_seed(0)
    # Positions up to two pages: a prompt crossing a page boundary must fit the model.
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      max_position_embeddings=2 * _page_size())
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    eng = ContinuousEngine(model, pad_token_id=PAD, eos_token_ids=[EOS], decode=lambda ids: str(ids))
    if not eng.keep_cache:
        pytest.skip("this transformers has no ContinuousBatchingManager.pause: no manager is kept between calls")
    return eng


def cache_blocks(eng):
    return eng._manager.batch_processor.cache.num_blocks


def test_cache_holds_a_block_per_started_page_of_each_request():
    """Rounded down (or summed over the call before rounding) the cache is too small for the call, and the engine
    falls back to a cache sized from free memory, its scheduler running the call in waves."""
    page = _page_size()
    long, short = [2 + i % 50 for i in range(page - 4)], [5, 6, 7]
    params = SamplingParams(max_new_tokens=10, temperature=0.8, n=2, seed=3)
    eng = kept_engine()
    eng.generate([long, short], params)
    # long: page + 6 tokens, 2 blocks; short: 13 tokens, 1 block; each twice (n=2).
    assert eng._manager_blocks == 6 and cache_blocks(eng) == 6


def test_a_kept_manager_is_reused_while_it_fits_and_rebuilt_for_a_bigger_call():
    """A rebuild per call would throw away the cache (and any CUDA graph) each step; no rebuild for a bigger call
    would leave it to a cache too small to hold the call at once."""
    params = SamplingParams(max_new_tokens=6, temperature=0.8, n=2, seed=3)
    eng = kept_engine()
    eng.generate([[2, 3, 4], [5, 6]], params)  # 4 blocks
    first = eng._manager
    eng.generate([[7, 8], [9, 10, 11]], params)  # 4 blocks again: fits
    assert eng._manager is first
    eng.generate([[2, 3]], SamplingParams(max_new_tokens=6, temperature=0.6, n=3, seed=4))  # 3 blocks: fits
    assert eng._manager is first
    eng.generate([[2, 3], [4], [5]], params)  # 6 blocks
    assert eng._manager is not first and eng._manager_blocks == 6 and cache_blocks(eng) == 6


def test_a_manager_whose_call_failed_is_not_reused():
    """After a failed call its manager (with whatever state the failure left in its cache and scheduler) must be
    gone, and the next call must run on a new one."""
    params = SamplingParams(max_new_tokens=4, temperature=0.8, n=2, seed=1)
    eng = kept_engine()
    eng.generate([[2, 3, 4]], params)
    first = eng._manager
    norm = eng.model.model.norm.weight
    good = norm.clone()
    with torch.no_grad():
        # Finite weights whose logits overflow to inf - inf = NaN: the engine's weight check lets the call into the
        # loop, which fails there, and only the loop's error text says the logits were not finite.
        norm.fill_(3e38)
    with pytest.raises(NonFiniteLogitsError, match="non-finite next-token logits"):
        eng.generate([[2, 3, 4]], params)
    assert not eng.holds_kv_cache
    with torch.no_grad():
        norm.copy_(good)
    out = eng.generate([[2, 3, 4]], params)
    assert eng._manager is not None and eng._manager is not first
    fresh = kept_engine().generate([[2, 3, 4]], params)
    assert [c.token_ids for c in out[0]] == [c.token_ids for c in fresh[0]]


def test_a_kept_manager_is_rebuilt_for_another_top_p_and_samples_only_from_its_nucleus():
    """The reported log-probs are recomputed without top-p, so they cannot show it: a manager kept from a top_p=1.0
    call (or built without its top-p processor) samples from the whole distribution, silently."""
    eng = kept_engine()
    prompts = [[2 + i, 9, 30 + 3 * i] for i in range(6)]
    eng.generate(prompts, SamplingParams(max_new_tokens=4, temperature=1.0, seed=1))
    top_p = 0.3
    outs = eng.generate(prompts, SamplingParams(max_new_tokens=8, temperature=1.0, top_p=top_p, seed=2))
    outside = 0
    for prompt, (c,) in zip(prompts, outs):
        with torch.no_grad():
            logits = eng.model(input_ids=torch.tensor([prompt + c.token_ids])).logits[0].double()
        probs = torch.softmax(logits[len(prompt) - 1 : -1], dim=-1)
        for row, token in zip(probs, c.token_ids):
            above = row[row > row[token]].sum().item()  # the mass of tokens ranked above the sampled one
            outside += above > top_p + 1e-4
    assert outside == 0


def test_releasing_the_kv_cache_alone_drops_the_manager_and_releasing_weights_keeps_it():
    """The trainer releases ("kv_cache",) before its update step: a cache still held there is memory the update
    does not get. Weights stay (the engine shares the process), so releasing them alone keeps the cache."""
    eng = kept_engine()
    params = SamplingParams(max_new_tokens=4, temperature=0.8, n=2, seed=1)
    eng.generate([[2, 3, 4]], params)
    first = eng._manager
    eng.release_memory(("weights",))
    assert eng._manager is first
    eng.release_memory(("kv_cache",))
    assert not eng.holds_kv_cache


def test_a_prompt_longer_than_a_page_samples_the_same_on_a_kept_manager_as_on_a_new_one():
    """A prompt whose first page is full, sampled twice on one kept manager, draws what a new engine draws. With
    block sharing (prefix caching) on, the second call found that page cached, cut its prefill otherwise, and drew
    other tokens from the same seed."""
    import random

    rng = random.Random(0)
    prompts = [[2 + rng.randrange(50) for _ in range(_page_size() + 20)], [2 + rng.randrange(50) for _ in range(30)]]
    params = SamplingParams(max_new_tokens=12, temperature=1.0, n=3, seed=7)
    eng = kept_engine()
    first, second = eng.generate(prompts, params), eng.generate(prompts, params)
    new = kept_engine().generate(prompts, params)

    def drawn(outputs):
        return [[(c.token_ids, c.logprobs) for c in per_prompt] for per_prompt in outputs]

    assert drawn(first) == drawn(new) and drawn(second) == drawn(new)
    assert len({tuple(c.token_ids) for c in new[0]}) > 1  # sampled, not one greedy answer thrice


def test_a_second_engine_on_one_model_samples_with_its_own_settings_and_the_first_still_works():
    """transformers keeps one manager per model and hands it back with the settings it was built with: a second
    engine at top-p 1 sampled the first one's top-p 0.3 nucleus, and reported log-probs of it. Found by review on
    2026-12-07."""
    first = kept_engine()
    model = first.model
    fresh = kept_engine  # the same weights (seeded), a model of its own
    prompts = [[2 + i, 9, 30 + 3 * i] for i in range(6)]
    nucleus, whole = (SamplingParams(max_new_tokens=6, temperature=1.0, top_p=p, seed=3, n=4) for p in (0.3, 1.0))
    first.generate(prompts, nucleus)
    second = ContinuousEngine(model, pad_token_id=PAD, eos_token_ids=[EOS], decode=lambda ids: str(ids))
    got = second.generate(prompts, whole)
    want = fresh().generate(prompts, whole)
    assert [[(c.token_ids, c.logprobs) for c in g] for g in got] == [[(c.token_ids, c.logprobs) for c in g] for g in want]
    again = first.generate(prompts, nucleus)  # its manager was replaced: it builds its own again
    want = fresh().generate(prompts, nucleus)
    assert [[c.token_ids for c in g] for g in again] == [[c.token_ids for c in g] for g in want]
