"""The in-process rollout engines' contract (embedded, and transformers' continuous batching): sampled-token
log-probs are the model's (teacher-forced) log-probs at the sampling temperature, before top-p; n, stop tokens,
truncation, seeding, weight updates and memory release behave as the interface says. Then what only the continuous
backend has to show (greedy = the embedded engine's greedy, its kept cache) and how a backend is chosen."""
import random
import warnings
import weakref

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from raro_fast.config import RolloutConfig
from raro_fast.rollout import check_backend, make_engine, settle_backend
from raro_fast.rollout.continuous import ContinuousEngine, continuous_batching_unavailable
from raro_fast.rollout.embedded import EmbeddedEngine
from raro_fast.rollout.engine import SamplingParams

PAD, EOS, VOCAB = 0, 1, 61
BACKENDS = ["embedded", "continuous"]
CONTINUOUS_MISSING = continuous_batching_unavailable()
needs_continuous = pytest.mark.skipif(CONTINUOUS_MISSING is not None, reason=str(CONTINUOUS_MISSING))


def tiny_model(seed=0):
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=128)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()


def engine_for(model, backend="embedded", batch_size=4, **kw):
    decode = lambda ids: " ".join(map(str, ids))  # noqa: E731
    if backend == "continuous":
        if CONTINUOUS_MISSING:
            pytest.skip(CONTINUOUS_MISSING)
        return ContinuousEngine(model, pad_token_id=PAD, eos_token_ids=[EOS], decode=decode, **kw)
    return EmbeddedEngine(model, pad_token_id=PAD, eos_token_ids=[EOS], decode=decode, batch_size=batch_size)


def random_prompts(n, rng):
    return [[rng.randrange(2, VOCAB) for _ in range(rng.randrange(2, 9))] for _ in range(n)]


def token_ids(outs):
    return [[c.token_ids for c in o] for o in outs]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 1.0), (0.7, 0.8)])
def test_logprobs_match_teacher_forcing(backend, temperature, top_p):
    rng = random.Random(1)
    model = tiny_model()
    eng = engine_for(model, backend)
    prompts = random_prompts(5, rng)
    outs = eng.generate(prompts, SamplingParams(max_new_tokens=12, temperature=temperature, top_p=top_p, n=3, seed=5))
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
                # fp32 model, batched (left padding; or a paged cache) vs one sequence alone: agreement to fp32
                # rounding. With top_p < 1 still the temperature-scaled distribution's, not the truncated one's.
                torch.testing.assert_close(got, ref, atol=2e-5, rtol=0)
                if c.finish_reason == "stop":
                    assert c.token_ids[-1] == EOS and EOS not in c.token_ids[:-1]
                else:
                    assert c.finish_reason == "length" and c.truncated
                    assert len(c.token_ids) == 12 and EOS not in c.token_ids


def test_embedded_positions_are_each_sequences_own_with_absolute_position_embeddings():
    """Rotary models see only relative positions, so a prompt's positions shifted by one (or by its left padding)
    change nothing there; a model with absolute position embeddings (GPT-2) samples from the wrong distribution.
    Its log-probs must equal the teacher-forced ones of each sequence alone, positions from 0."""
    from transformers import GPT2Config

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=64, bos_token_id=EOS,
                     eos_token_id=EOS)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    prompts = random_prompts(4, random.Random(1))  # lengths 3-8: left padding differs per prompt
    outs = engine_for(model, batch_size=8).generate(prompts, SamplingParams(max_new_tokens=8, temperature=0.7, n=2,
                                                                             seed=5))
    with torch.no_grad():
        for p, comps in zip(prompts, outs):
            for c in comps:
                ids = torch.tensor([p + c.token_ids])
                ref = torch.log_softmax(model(input_ids=ids).logits[0].double() / 0.7, -1)[len(p) - 1 : -1]
                ref = ref.gather(-1, ids[0, len(p):, None]).squeeze(-1)
                torch.testing.assert_close(torch.tensor(c.logprobs, dtype=torch.float64), ref, atol=2e-5, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_stop_tokens_n_and_truncation(backend):
    eng = engine_for(tiny_model(), backend)
    prompts = random_prompts(4, random.Random(4))
    stops = tuple(range(2, 17))  # a quarter of the vocabulary: most samples stop early, some run to the limit
    outs = eng.generate(prompts, SamplingParams(max_new_tokens=6, n=5, seed=3, stop_token_ids=stops))
    assert [len(o) for o in outs] == [5] * 4
    reasons = set()
    for p, comps in zip(prompts, outs):
        for c in comps:
            assert c.prompt_ids == p and c.text == " ".join(map(str, c.token_ids))
            ends = set(stops) | {EOS}
            reasons.add(c.finish_reason)
            if c.finish_reason == "stop":
                assert c.token_ids[-1] in ends and not ends & set(c.token_ids[:-1]) and not c.truncated
            else:
                assert len(c.token_ids) == 6 and not ends & set(c.token_ids) and c.truncated
    assert reasons == {"stop", "length"}  # both cases were exercised
    (one,) = eng.generate([prompts[0]], SamplingParams(max_new_tokens=1, temperature=0.0))[0]
    assert len(one.token_ids) == 1 and len(one.logprobs) == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_empty_prompt_is_refused_naming_it(backend):
    # With no token to continue from, the embedded engine sampled from a masked pad position, with no error.
    eng = engine_for(tiny_model(), backend)
    with pytest.raises(ValueError, match=r"rollout: prompt 1 of 3 is empty"):
        eng.generate([[2, 3], [], [4]], SamplingParams(max_new_tokens=2, seed=0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["rotary", "absolute"])
def test_a_prompt_that_would_run_past_the_models_positions_is_refused_naming_it(backend, kind):
    """A rotary model sampled past max_position_embeddings silently; GPT-2's position table stopped in an IndexError
    deep inside torch. Found by review on 2026-12-07."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = (AutoModelForCausalLM.from_config(Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=16), attn_implementation="sdpa") if kind == "rotary"
             else GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=32, n_layer=1, n_head=2))).eval()
    eng = engine_for(model, backend)
    with pytest.raises(ValueError, match=r"rollout: prompt 1 of 2 has 12 tokens, and 5 new ones would run past the "
                                         r"model's 16 positions \(max_position_embeddings\); lower the max_new_tokens of what sampled it"):
        eng.generate([[2] * 11, [3] * 12], SamplingParams(max_new_tokens=5, temperature=0.0))
    # a prompt that fills the positions alone: fewer new tokens cannot help, and the message does not say they would
    with pytest.raises(ValueError, match=r"prompt 0 of 1 has 16 tokens, and 1 new ones would run past the model's 16 "
                                         r"positions \(max_position_embeddings\); the prompt alone fills them: shorten "
                                         r"that row, or use a model with a longer context"):
        eng.generate([[2] * 16], SamplingParams(max_new_tokens=1, temperature=0.0))
    out = eng.generate([[2] * 11, [3] * 12], SamplingParams(max_new_tokens=4, temperature=0.0))  # exactly 16: fine
    assert all(len(c.token_ids) <= 4 for o in out for c in o)


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": -0.5}, "temperature must be finite and >= 0"),
    ({"temperature": float("nan")}, "temperature must be finite and >= 0"),
    ({"temperature": float("inf")}, "temperature must be finite and >= 0"),  # sampled uniformly, accepted before
    ({"top_p": 0.0}, "top_p must be in"), ({"top_p": 1.5}, "top_p must be in"),
    ({"n": 0}, "n and max_new_tokens must be >= 1"), ({"max_new_tokens": 0}, "n and max_new_tokens must be >= 1"),
])
def test_sampling_params_refuse_what_every_backend_would_read_otherwise(kwargs, message):
    # A negative temperature sampled greedily in every backend, with no error.
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_generation_passes_no_deprecated_transformers_argument(backend):
    # transformers 5.24 renamed past_key_values -> cache and removes the old name in 5.40: fail now, not then
    # (and no deprecated continuous-batching setting, such as block_size, is passed either)
    eng = engine_for(tiny_model(), backend)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=r".*deprecated", category=FutureWarning)
        (c,) = eng.generate([[2, 3, 4]], SamplingParams(max_new_tokens=4, seed=0))[0]
    assert len(c.token_ids) >= 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_seed_reproducible_and_greedy_deterministic(backend):
    rng = random.Random(2)
    eng = engine_for(tiny_model(), backend)
    prompts = random_prompts(3, rng)
    torch.manual_seed(123)
    trainer_rng = torch.get_rng_state()
    a = eng.generate(prompts, SamplingParams(max_new_tokens=8, n=2, seed=11))
    assert torch.equal(torch.get_rng_state(), trainer_rng)  # a seeded call leaves the trainer's random state alone
    b = eng.generate(prompts, SamplingParams(max_new_tokens=8, n=2, seed=11))
    assert token_ids(a) == token_ids(b)
    assert token_ids(a) != token_ids(eng.generate(prompts, SamplingParams(max_new_tokens=8, n=2, seed=12)))
    g1 = eng.generate(prompts, SamplingParams(max_new_tokens=8, temperature=0.0))
    g2 = eng.generate(prompts[::-1], SamplingParams(max_new_tokens=8, temperature=0.0))
    assert [o[0].token_ids for o in g1] == [o[0].token_ids for o in g2[::-1]]  # batch order does not matter


def test_embedded_prefills_each_prompt_once_and_samples_as_if_repeated():
    """The n samples of a prompt share one prefill (its KV cache repeated n times), and sample what n copies of
    the prompt would: the same tokens from the same seed, log-probs equal to fp32 rounding."""
    model = tiny_model()
    prompts = random_prompts(6, random.Random(5))  # lengths 2-8: left padding differs per prompt
    batches = []
    hook = model.register_forward_pre_hook(lambda m, args, kw: batches.append(tuple(kw["input_ids"].shape)),
                                           with_kwargs=True)
    shared = engine_for(model, batch_size=8).generate(prompts, SamplingParams(max_new_tokens=7, n=4, seed=9))
    prefills = [b for b in batches if b[1] > 1]
    assert [b[0] for b in prefills] == [2, 2, 2]  # 8 rows a batch: 2 prompts x 4 samples, each prompt once
    assert {b[0] for b in batches if b[1] == 1} == {8}  # and the decode steps run all 8 rows
    hook.remove()
    repeated = engine_for(model, batch_size=8).generate([p for p in prompts for _ in range(4)],
                                                        SamplingParams(max_new_tokens=7, n=1, seed=9))
    flat = [c for o in shared for c in o]
    assert [c.token_ids for c in flat] == [o[0].token_ids for o in repeated]
    assert [c.prompt_ids for c in flat] == [p for p in prompts for _ in range(4)]
    assert len({tuple(c.token_ids) for c in flat}) > len(prompts)  # the copies did sample independently
    for c, (r,) in zip(flat, repeated):
        assert c.finish_reason == r.finish_reason
        assert max(abs(a - b) for a, b in zip(c.logprobs, r.logprobs)) < 1e-5
    # More samples than batch_size: still at most batch_size rows at a time (a memory bound), all n of them.
    batches.clear()
    hook = model.register_forward_pre_hook(lambda m, args, kw: batches.append(tuple(kw["input_ids"].shape)),
                                           with_kwargs=True)
    many = engine_for(model, batch_size=3).generate(prompts[:2], SamplingParams(max_new_tokens=5, n=7, seed=9))
    hook.remove()
    assert [len(o) for o in many] == [7, 7] and max(b[0] for b in batches) == 3
    assert [b[0] for b in batches if b[1] > 1] == [1, 1, 1, 1, 1, 1]  # per prompt: 3 + 3 + 1 samples


def test_embedded_drops_finished_rows_and_still_samples_each_rows_own_continuation():
    """Rows that finished leave the decode batch (cache, mask, positions) once they are a quarter of it; every
    remaining row's log-probs are still its own sequence's (teacher-forced), and each row samples what it would
    with every row kept (the random stream draws for all rows)."""
    model = tiny_model()
    prompts = random_prompts(4, random.Random(6))
    stops = tuple(range(2, 10))  # an eighth of the vocabulary: rows stop at different steps, some never
    params = SamplingParams(max_new_tokens=10, n=4, seed=8, stop_token_ids=stops)
    decoded = []
    hook = model.register_forward_pre_hook(
        lambda m, args, kw: decoded.append(kw["input_ids"].shape[0]) if kw["input_ids"].shape[1] == 1 else None,
        with_kwargs=True)
    outs = engine_for(model, batch_size=16).generate(prompts, params)
    hook.remove()
    assert decoded == sorted(decoded, reverse=True) and decoded[-1] < 16  # rows left as they finished
    lengths = [len(c.token_ids) for o in outs for c in o]
    assert min(lengths) < max(lengths) == 10  # some stopped early, some ran to the limit
    with torch.no_grad():
        for p, comps in zip(prompts, outs):
            for c in comps:
                ids = torch.tensor([p + c.token_ids])
                ref = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)[len(p) - 1 : -1]
                ref = ref.gather(-1, ids[0, len(p):, None]).squeeze(-1)
                torch.testing.assert_close(torch.tensor(c.logprobs, dtype=torch.float64), ref, atol=2e-5, rtol=0)
    kept = engine_for(model, batch_size=16)
    kept.drop_finished_at = 2.0  # never drop: every row decoded to the end, as before
    assert token_ids(kept.generate(prompts, params)) == token_ids(outs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tokens_are_drawn_from_the_tempered_nucleus_through_generate(backend):
    """Through `generate`, not the sampler alone: the first token's frequencies over many draws equal the float64
    softmax(logits / T), renormalised over the top-p nucleus. Only the reported log-probs were checked, so an engine
    that drew at T = 1 (or ignored top-p) while reporting at T passed every test (found by review on 2026-12-07)."""
    model = tiny_model()
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(6.0)  # tied head: logits of a few units, so T and top-p both matter
    prompt, draws, temperature = [5, 9, 13, 7], 4000, 0.7
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt])).logits[0, -1].double()
    tempered = torch.softmax(logits / temperature, -1)
    order = tempered.argsort(descending=True)
    before = tempered[order].cumsum(0) - tempered[order]
    nucleus = torch.zeros_like(tempered)
    nucleus[order[before < 0.8]] = tempered[order[before < 0.8]]
    nucleus /= nucleus.sum()
    tv = lambda p, q: float((p - q).abs().sum() / 2)  # noqa: E731
    # what the test tells apart: T = 1 against 0.7, and the nucleus against the whole distribution
    assert tv(tempered, torch.softmax(logits, -1)) > 0.15 and tv(nucleus, tempered) > 0.15
    eng = engine_for(model, backend, batch_size=4000)
    for top_p, want in ((1.0, tempered), (0.8, nucleus)):
        outs = eng.generate([prompt], SamplingParams(max_new_tokens=1, temperature=temperature, top_p=top_p, n=draws,
                                                     seed=3))
        counts = torch.bincount(torch.tensor([c.token_ids[0] for c in outs[0]]), minlength=VOCAB).double()
        assert tv(counts / draws, want) < 0.05, (top_p, tv(counts / draws, want))
        assert float(counts[want == 0].sum()) == 0  # nothing outside the nucleus


def test_embedded_top_p_samples_only_the_nucleus_renormalised():
    """The embedded engine's sampler on a fixed distribution: top-p keeps the most likely tokens whose mass before
    them is under top_p and draws them in proportion. The vocabulary is shuffled so the sort and the scatter back
    to token ids both matter; a nucleus sampler that kept every token passed every end-to-end test."""
    from raro_fast.rollout.embedded import _sample

    probs = torch.tensor([0.15, 0.5, 0.05, 0.3])  # most likely first: tokens 1, 3, 0, 2
    draws = 10_000
    logp = probs.log().expand(draws, -1)  # one batch row per draw
    # top_p 0.75, not 0.8: 0.5 + 0.3 = 0.8 would sit exactly on the boundary, decided by float rounding
    counts = torch.bincount(_sample(logp, 0.75, torch.Generator().manual_seed(0)), minlength=4)
    assert counts[0] == 0 and counts[2] == 0  # outside the nucleus: never drawn
    # kept tokens renormalised: 0.5 / 0.8 and 0.3 / 0.8 (about 4 standard deviations of margin)
    assert abs(counts[1] / draws - 0.625) < 0.02 and abs(counts[3] / draws - 0.375) < 0.02
    counts = torch.bincount(_sample(logp, 1.0, torch.Generator().manual_seed(0)), minlength=4)
    torch.testing.assert_close(counts / draws, probs, atol=0.02, rtol=0)  # every token, at its own probability
    assert bool((counts > 0).all())


def test_reserved_kv_layer_holds_what_concatenation_would_through_drops_repeats_and_crops():
    """ReservedKVLayer against transformers' DynamicLayer on the same updates: prefill, a row repeat, decode steps
    written in place (one buffer, no copy per step), a batch_select of rows, more steps, a crop: equal keys and
    values at every point."""
    from transformers.cache_utils import DynamicLayer

    from raro_fast.rollout.embedded import ReservedKVLayer

    g = torch.Generator().manual_seed(11)
    states = lambda b, n: (torch.randn(b, 2, n, 4, generator=g), torch.randn(b, 2, n, 4, generator=g))  # noqa: E731
    ours, theirs = ReservedKVLayer(reserve=3), DynamicLayer()

    def both(step):
        step(ours)
        step(theirs)
        assert torch.equal(ours.keys, theirs.keys) and torch.equal(ours.values, theirs.values)

    prefill = states(2, 5)
    both(lambda layer: layer.update(*prefill))
    both(lambda layer: layer.batch_repeat_interleave(3))
    pointers = set()
    for _ in range(5):  # beyond the reserve of 3: one regrowth
        new = states(6, 1)
        both(lambda layer: layer.update(*new))
        pointers.add(ours.keys.data_ptr())
    assert len(pointers) == 2 and not ours.keys.is_contiguous()
    keep = torch.tensor([0, 2, 5])
    both(lambda layer: layer.batch_select_indices(keep))
    for _ in range(2):
        new = states(3, 1)
        both(lambda layer: layer.update(*new))
    both(lambda layer: layer.crop(-2))
    new = states(3, 1)
    both(lambda layer: layer.update(*new))
    assert ours.get_seq_length() == theirs.get_seq_length() == 5 + 5 + 2 - 2 + 1


def test_reserved_kv_layer_copes_with_rows_reordered_at_the_same_batch_size():
    """A reorder that keeps the batch size (beam search's reorder_cache, a batch_select of a permutation) gives the
    layer new tensors of the buffers' very shape: the next step must not decode into the old buffers, whose rows
    are in the old order (the shape check alone misses it)."""
    from transformers.cache_utils import DynamicLayer

    from raro_fast.rollout.embedded import ReservedKVLayer

    g = torch.Generator().manual_seed(13)
    states = lambda b, n: (torch.randn(b, 2, n, 4, generator=g), torch.randn(b, 2, n, 4, generator=g))  # noqa: E731
    ours, theirs = ReservedKVLayer(reserve=4), DynamicLayer()
    for step in [lambda layer, s=states(3, 5): layer.update(*s), lambda layer, s=states(3, 1): layer.update(*s),
                 lambda layer: layer.reorder_cache(torch.tensor([2, 0, 1])),
                 lambda layer, s=states(3, 1): layer.update(*s),
                 lambda layer: layer.batch_select_indices(torch.tensor([1, 2, 0])),
                 lambda layer, s=states(3, 1): layer.update(*s)]:
        step(ours)
        step(theirs)
        assert torch.equal(ours.keys, theirs.keys) and torch.equal(ours.values, theirs.values)
    assert ours.get_seq_length() == 8


def test_reserved_cache_leaves_sliding_window_layers_as_transformers_builds_them():
    """Only full-attention layers get spare room: a sliding-window layer made a ReservedKVLayer would keep every
    position instead of its window (memory that grows with the answer, and a cache that is no longer the model's)."""
    from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

    from raro_fast.rollout.embedded import ReservedKVLayer, reserved_cache

    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      use_sliding_window=True, sliding_window=3,
                      layer_types=["full_attention", "sliding_attention", "full_attention"])
    own = DynamicCache(config=cfg).layers
    assert [type(layer) for layer in own] == [DynamicLayer, DynamicSlidingWindowLayer, DynamicLayer]
    cache = reserved_cache(cfg, max_new_tokens=6)
    assert [type(layer) for layer in cache.layers] == [ReservedKVLayer, DynamicSlidingWindowLayer, ReservedKVLayer]
    assert [layer.reserve for layer in cache.layers if isinstance(layer, ReservedKVLayer)] == [6, 6]


def test_embedded_decodes_into_a_reserved_cache_and_samples_exactly_as_with_transformers_own(monkeypatch):
    """The engine's decode steps run on ReservedKVLayers, and generation (tokens, log-probs, finish reasons) is
    the same to the last bit as with the cache transformers builds, through n > 1 and rows that leave early."""
    import raro_fast.rollout.embedded as embedded

    model = tiny_model()
    prompts = random_prompts(5, random.Random(12))
    params = SamplingParams(max_new_tokens=12, n=3, seed=4, stop_token_ids=tuple(range(2, 8)))
    caches = []
    hook = model.register_forward_pre_hook(
        lambda m, args, kw: caches.append(kw.get("cache", kw.get("past_key_values"))) if kw["input_ids"].shape[1] == 1
        else None, with_kwargs=True)
    reserved = engine_for(model, batch_size=15).generate(prompts, params)
    hook.remove()
    assert caches and all(isinstance(layer, embedded.ReservedKVLayer) for c in caches for layer in c.layers)
    monkeypatch.setattr(embedded, "reserved_cache", lambda *args: None)
    own = engine_for(model, batch_size=15).generate(prompts, params)
    flat = lambda outs: [(c.token_ids, c.logprobs, c.finish_reason) for o in outs for c in o]  # noqa: E731
    assert flat(reserved) == flat(own)
    assert len({len(c.token_ids) for o in own for c in o}) > 1  # rows did finish at different steps


@pytest.mark.parametrize("backend", BACKENDS)
def test_update_weights_sets_version_and_weights(backend):
    src, dst = tiny_model(0), tiny_model(1)
    eng = engine_for(dst, backend)
    prompts = random_prompts(4, random.Random(3))
    # (Sampled: greedy, a random tiny model with tied embeddings repeats the prompt's last token whatever its weights.)
    sampled = SamplingParams(max_new_tokens=6, n=2, seed=3)
    before = eng.generate(prompts, sampled)  # and, for the continuous engine, a kept cache the update must not upset
    eng.update_weights(src.state_dict().items(), version=7)
    assert eng.weight_version == 7
    for (n1, p1), (n2, p2) in zip(src.state_dict().items(), dst.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    out = eng.generate(prompts, sampled)
    assert all(c.weight_version == 7 for o in out for c in o)
    assert token_ids(out) != token_ids(before)
    assert token_ids(out) == token_ids(engine_for(tiny_model(0), backend).generate(prompts, sampled))
    with pytest.raises(KeyError, match="no parameter named 'bogus'"):
        eng.update_weights([("bogus", torch.zeros(1))], version=8)
    with pytest.raises(KeyError, match="no new value"):
        eng.update_weights(list(src.state_dict().items())[:3], version=8)
    # copy_ broadcasts: a [H] vector was written into every row of the embedding and the version moved on
    row = src.state_dict()["model.embed_tokens.weight"][0]
    with pytest.raises(ValueError, match=r"model.embed_tokens.weight has shape \(32,\), the engine's \(61, 32\)"):
        eng.update_weights([("model.embed_tokens.weight", row)], version=8)
    assert eng.weight_version == 7


def test_update_weights_takes_a_tied_embedding_under_either_of_its_names():
    """With tied embeddings lm_head.weight IS model.embed_tokens.weight: a sync that sends the head's name only
    updates the embedding too and is complete; only a parameter with no value under any of its names is missing."""
    src, dst = tiny_model(0), tiny_model(1)
    eng = engine_for(dst)
    sent = [(n, t) for n, t in src.state_dict().items() if n != "model.embed_tokens.weight"]
    assert "lm_head.weight" in dict(sent)
    eng.update_weights(sent, version=3)
    assert torch.equal(dst.model.embed_tokens.weight, src.model.embed_tokens.weight)
    with pytest.raises(KeyError, match=r"no new value for \['model.norm.weight'\]"):
        eng.update_weights([(n, t) for n, t in sent if n != "model.norm.weight"], version=4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_diverged_weights_raise_non_finite_logits_error_and_new_weights_recover(backend):
    """NaN weights are a NonFiniteLogitsError naming the weight version (the trainer reports a diverged run), not
    a raw traceback from sampling NaN probabilities; the continuous engine refuses before its loop runs the model
    (on CUDA the sampling is a device-side assert that takes the process down). Finite weights then sample again."""
    from raro_fast.rollout.engine import NonFiniteLogitsError

    src, model = tiny_model(0), tiny_model(1)
    eng = engine_for(model, backend)
    params = SamplingParams(max_new_tokens=4, n=2, seed=0)
    eng.generate([[2, 3, 4]], params)  # a kept manager (continuous) that the bad weights then meet
    diverged = {k: v.clone() for k, v in src.state_dict().items()}
    diverged["model.norm.weight"][5] = float("nan")  # one channel of the last norm: every logit NaN
    eng.update_weights(diverged.items(), version=4)
    forwards = []
    hook = model.register_forward_pre_hook(lambda *args: forwards.append(1))
    with pytest.raises(NonFiniteLogitsError, match=r"weight version 4\)"):
        eng.generate([[2, 3, 4], [5, 6]], params)
    hook.remove()
    if backend == "continuous":
        assert forwards == []
    eng.update_weights(src.state_dict().items(), version=5)
    out = eng.generate([[2, 3, 4]], params)
    assert [c.weight_version for c in out[0]] == [5, 5]
    assert token_ids(out) == token_ids(engine_for(tiny_model(0), backend).generate([[2, 3, 4]], params))
    # An engine built on such weights refuses as well, before its loop runs the model (the continuous engine
    # assumed finite weights until the first update: found by review on 2026-12-07)
    model.load_state_dict(diverged)
    fresh, forwards = engine_for(model, backend), []
    hook = model.register_forward_pre_hook(lambda *args: forwards.append(1))
    with pytest.raises(NonFiniteLogitsError, match=r"weight version 0\)"):
        fresh.generate([[2, 3, 4]], params)
    hook.remove()
    assert backend != "continuous" or forwards == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_release_then_resume_still_generates(backend):
    eng = engine_for(tiny_model(), backend)
    prompts = random_prompts(3, random.Random(5))
    params = SamplingParams(max_new_tokens=6, n=2, seed=9)
    first = eng.generate(prompts, params)
    with pytest.raises(ValueError, match="memory tags"):
        eng.release_memory(("optimizer",))
    eng.release_memory(("kv_cache",))
    eng.resume_memory(("kv_cache",))
    assert token_ids(eng.generate(prompts, params)) == token_ids(first)


# --- The continuous backend alone -------------------------------------------------------------------------------


@needs_continuous
def test_continuous_greedy_equals_the_embedded_engines_on_the_shipped_base():
    # The shipped base answers Countdown in the chat format, so its greedy outputs are long, varied and end on
    # its end token: a real test of token-for-token agreement (random tiny models repeat one token).
    from raro_fast import prompts as chat
    from raro_fast.model.hf import load_pretrained
    from raro_fast.tasks import TaskConfig, make_task

    model, tok = load_pretrained("builtin:countdown-easy", dtype=torch.float32)
    questions = [ex.question for ex in make_task(TaskConfig()).examples("heldout")[:6]]
    prompts = [chat.render_prompt(tok, chat.policy_messages(q)) for q in questions]
    params = SamplingParams(max_new_tokens=48, temperature=0.0)
    emb = EmbeddedEngine.from_tokenizer(model, tok).generate(prompts, params)
    con = ContinuousEngine.from_tokenizer(model, tok).generate(prompts, params)
    assert token_ids(con) == token_ids(emb)
    assert [o[0].finish_reason for o in con] == [o[0].finish_reason for o in emb]
    assert {o[0].finish_reason for o in con} == {"stop"} and len({tuple(o[0].token_ids) for o in con}) > 1
    for e, c in zip(emb, con):
        torch.testing.assert_close(torch.tensor(c[0].logprobs), torch.tensor(e[0].logprobs), atol=2e-5, rtol=0)


@needs_continuous
def test_continuous_release_frees_its_cache_and_the_next_call_builds_one():
    eng = engine_for(tiny_model(), "continuous")
    params = SamplingParams(max_new_tokens=4, n=2, seed=1)
    eng.generate([[2, 3, 4]], params)
    # Kept between calls where transformers can queue a call while its loop waits (5.24); else built per call.
    assert eng.holds_kv_cache == eng.keep_cache
    manager = weakref.ref(eng._manager) if eng.keep_cache else lambda: None
    eng.release_memory(("kv_cache", "weights"))
    assert not eng.holds_kv_cache and manager() is None  # the manager, and the cache it owned, are gone
    eng.resume_memory(("weights", "kv_cache"))
    assert not eng.holds_kv_cache  # rebuilt lazily, sized for the next call
    eng.generate([[2, 3, 4]], params)
    assert eng.holds_kv_cache == eng.keep_cache


@needs_continuous
def test_continuous_kept_and_per_call_managers_sample_the_same():
    # keep_cache=False is the path for transformers without ContinuousBatchingManager.pause (5.17): a manager per
    # call, its requests queued before its loop starts. Both queue a whole call before the first batch.
    prompts = random_prompts(6, random.Random(6))
    calls = [SamplingParams(max_new_tokens=10, temperature=0.9, n=3, seed=4),
             # more requests (a cache block each, 256 tokens a block) than the kept cache holds: rebuilt
             SamplingParams(max_new_tokens=20, temperature=0.6, n=4, seed=5),
             SamplingParams(max_new_tokens=10, temperature=0.0)]  # other sampling settings: rebuilt
    kept, per_call = engine_for(tiny_model(), "continuous"), engine_for(tiny_model(), "continuous", keep_cache=False)
    for params in calls:
        assert token_ids(kept.generate(prompts, params)) == token_ids(per_call.generate(prompts, params))
    assert kept.holds_kv_cache == kept.keep_cache and not per_call.holds_kv_cache


@needs_continuous
def test_continuous_engine_from_a_saved_model(saved_embedded_model):
    # What the trainer does for rollout.backend=continuous: no in-process copy given, the engine loads the weights.
    from raro_fast.model.hf import load_project_tokenizer

    tok = load_project_tokenizer()
    cfg = RolloutConfig(backend="continuous")
    eng = make_engine(cfg, None, tok, model_path=str(saved_embedded_model), dtype="float32",
                      device=torch.device("cpu"), rank=0, seed=0, end_ids=[tok.eos_token_id])
    assert isinstance(eng, ContinuousEngine) and cfg.backend == "continuous"
    (c,) = eng.generate([tok("12 + 3")["input_ids"]], SamplingParams(max_new_tokens=5, seed=0))[0]
    assert 1 <= len(c.token_ids) <= 5


# --- Choosing a backend ----------------------------------------------------------------------------------------


def test_auto_picks_the_embedded_engine_on_cpu_and_cuda_and_says_why(capsys):
    for device in ("cpu", "cuda"):
        cfg = RolloutConfig()
        assert cfg.backend == "auto"  # the default
        check_backend(cfg, torch.device(device), "float32")
        assert cfg.backend == "embedded"
        (line,) = capsys.readouterr().out.splitlines()
        assert line.startswith("rollout.backend=auto: embedded (")


def test_continuous_on_a_transformers_without_it_falls_back_to_embedded_in_one_line():
    # `settle_backend` is given the installed transformers' verdict, here an old one's.
    old = lambda: "transformers 5.0.0 has no continuous batching (model.generate_batch); it needs >= 5.17"  # noqa: E731
    for device in ("cpu", "cuda"):
        assert settle_backend("continuous", torch.device(device), old) == (
            "embedded", "rollout.backend=continuous: transformers 5.0.0 has no continuous batching "
                        "(model.generate_batch); it needs >= 5.17; using the embedded engine instead")
    assert settle_backend("continuous", torch.device("cpu"), lambda: None) == ("continuous", None)
    assert settle_backend("embedded", torch.device("cpu"), old) == ("embedded", None)
    assert settle_backend("sglang", torch.device("cuda"), old) == ("sglang", None)


def test_check_backend_runs_the_embedded_engine_where_continuous_batching_cannot_run(monkeypatch, capsys):
    """`check_backend` settles rollout.backend=continuous too, not only auto: on a transformers without continuous
    batching the run falls back with one line, instead of failing when the engine is built."""
    import raro_fast.rollout as rollout

    monkeypatch.setattr(rollout, "_continuous_missing", lambda: "transformers 5.0.0 has no continuous batching")
    cfg = RolloutConfig(backend="continuous")
    check_backend(cfg, torch.device("cpu"), "float32")
    assert cfg.backend == "embedded"
    assert capsys.readouterr().out == ("rollout.backend=continuous: transformers 5.0.0 has no continuous batching; "
                                       "using the embedded engine instead\n")


@pytest.mark.parametrize("backend", BACKENDS)
def test_make_engine_passes_the_configured_batch_size_and_end_tokens(backend):
    """The embedded engine decodes at most rollout.batch_size rows at a time (the memory bound the setting is for),
    and the continuous one stops at the `end_ids` it is given, not the tokenizer's defaults."""
    from raro_fast.model.hf import load_project_tokenizer

    if backend == "continuous" and CONTINUOUS_MISSING:
        pytest.skip(CONTINUOUS_MISSING)
    tok = load_project_tokenizer()
    model = tiny_model()
    cfg = RolloutConfig(backend=backend, batch_size=3)
    eng = make_engine(cfg, model, tok, model_path="unused", dtype="float32", device=torch.device("cpu"), rank=0,
                      seed=0, end_ids=[7, 11])
    if backend == "embedded":
        assert isinstance(eng, EmbeddedEngine) and eng.batch_size == 3
    else:
        assert isinstance(eng, ContinuousEngine) and eng.eos_token_ids == [7, 11]


@needs_continuous
def test_the_installed_transformers_runs_continuous_batching(capsys):
    cfg = RolloutConfig(backend="continuous")
    check_backend(cfg, torch.device("cpu"), "float32")
    assert cfg.backend == "continuous" and capsys.readouterr().out == ""
