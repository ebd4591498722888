"""Packing: balance, budgets, equal micro-batch counts, alignment, and exactness of the packed loss and gradients
against the same batch run one sequence at a time."""
import copy
import itertools
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from raro_fast.model.varlen import packed_hidden_states, use_varlen_attention
from raro_fast.packing import SequenceSample, balanced_partition, pack, padding_stats, plan_micro_batches
from raro_kernels import linear_logprobs, policy_loss


def random_samples(n, rng, vocab=97, max_len=40, with_logprobs=True):
    out = []
    for uid in range(n):
        length = rng.randint(3, max_len)
        p = rng.randint(1, length - 1)
        m = length - p
        out.append(SequenceSample(
            input_ids=[rng.randrange(vocab) for _ in range(length)], prompt_len=p, advantage=rng.uniform(-1, 1),
            role=rng.choice(["policy", "critic"]), group=uid // 3, uid=uid, loss_weight=rng.choice([1 / 9, 8 / 9]),
            old_logprobs=[rng.uniform(-4, -0.1) for _ in range(m)] if with_logprobs else None,
            rollout_logprobs=[rng.uniform(-4, -0.1) for _ in range(m)] if with_logprobs else None,
        ))
    return out


def test_balanced_partition_near_optimal_small():
    rng = random.Random(0)
    for _ in range(20):
        costs = [rng.randint(1, 100) for _ in range(rng.randint(2, 9))]
        parts = balanced_partition(costs, 2)
        assert sorted(i for p in parts for i in p) == list(range(len(costs)))
        got = max(sum(costs[i] for i in p) for p in parts)
        best = min(max(sum(c for c, s in zip(costs, mask) if s), sum(c for c, s in zip(costs, mask) if not s))
                   for mask in itertools.product([0, 1], repeat=len(costs)))
        assert got <= best * 1.15 + 1  # KK is not always optimal, but close on small sets
    parts = balanced_partition([5.0] * 12, 4)
    assert [len(p) for p in parts] == [3, 3, 3, 3]
    assert balanced_partition([], 3) == [[], [], []]
    with pytest.raises(ValueError):
        balanced_partition([1.0], 0)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_plan_covers_every_sequence_once_within_budget_equal_counts(world):
    rng = random.Random(world)
    samples = random_samples(23, rng)
    budget = 64
    per_rank = [plan_micro_batches(samples, max_tokens_per_micro_batch=budget, world_size=world, rank=r)
                for r in range(world)]
    assert len({len(m) for m in per_rank}) == 1  # every rank runs the same number of micro-batches
    seen = []
    for mbs in per_rank:
        for mb in mbs:
            assert mb.input_ids.numel() <= budget
            if not mb.is_padding:
                assert sorted(set(mb.seq_ids.tolist())) == list(range(len(mb.uids)))
                seen.extend(mb.uids.tolist())
            assert mb.num_sequences == 23 and mb.num_tokens == sum(s.num_targets for s in samples)
    assert sorted(seen) == list(range(23))
    loads = [sum(mb.num_real_tokens for mb in mbs) for mbs in per_rank]
    assert max(loads) - min(loads) <= 40  # near-equal work (one sequence at most)


def _samples_of_lengths(lengths):
    return [SequenceSample(input_ids=[(7 * uid + j) % 97 for j in range(n)], prompt_len=n // 2, advantage=1.0,
                           role="policy", group=uid, uid=uid, old_logprobs=[-1.0] * (n - n // 2),
                           ref_logprobs=[-1.0] * (n - n // 2))
            for uid, n in enumerate(lengths)]


def _layout(samples, budget, world):
    """Each rank's micro-batches, as the lengths of the sequences in each ("filler" for a filler)."""
    plans = [plan_micro_batches(samples, max_tokens_per_micro_batch=budget, world_size=world, rank=r)
             for r in range(world)]
    lengths = [[("filler" if mb.is_padding else sorted(mb.cu_seqlens.diff().tolist())) for mb in mbs]
               for mbs in plans]
    return plans, lengths


def test_equal_counts_uses_filler_only_when_it_cannot_split():
    # Three sequences that each need a micro-batch of their own: the rank with one sequence cannot split it, so
    # it must run a filler to match the other rank's two micro-batches.
    plans, layout = _layout(_samples_of_lengths([40, 40, 40]), budget=60, world=2)
    assert layout in ([[[40], [40]], [[40], "filler"]], [[[40], "filler"], [[40], [40]]])
    fillers = [mb for mbs in plans for mb in mbs if mb.is_padding]
    assert len(fillers) == 1
    (f,) = fillers
    assert int((f.targets != -100).sum()) == 1 and f.num_real_tokens == 0
    assert f.loss_weights.tolist() == [0.0] * f.input_ids.numel()
    # The filler's advantage is 0, so its surrogate vanishes whatever its weight; the KL term does not (logprobs
    # away from its ref_logprobs of 0), so only the zero loss weight makes this loss, and its gradient, exactly 0.
    logprobs = torch.full(f.targets.shape, -1.5, requires_grad=True)
    loss, _ = policy_loss(logprobs, f.old_logprobs, f.advantages, f.targets != -100, ref_logprobs=f.ref_logprobs,
                          kl_coef=0.1, seq_ids=f.seq_ids, num_sequences=f.num_sequences, num_tokens=f.num_tokens,
                          weights=f.loss_weights)
    (grad,) = torch.autograd.grad(loss, logprobs)
    assert float(loss.detach()) == 0.0 and float(grad.abs().max()) == 0.0

    # One rank gets 31 + 31 = 62 tokens (two micro-batches), the other 40 + 20 = 60, which fit one: that rank
    # must split its bin in two rather than run a filler.
    plans, layout = _layout(_samples_of_lengths([40, 31, 31, 20]), budget=60, world=2)
    assert layout in ([[[31], [31]], [[40], [20]]], [[[40], [20]], [[31], [31]]])
    assert not any(mb.is_padding for mbs in plans for mb in mbs)


def test_the_plan_fills_micro_batches_to_the_budget_and_balances_rank_costs():
    """Found by mutation testing (each passed the tests before): a sequence of exactly the budget refused, bins
    filled to one token under the budget (twice the micro-batches), the wrong bin split or split unevenly, and the
    ranks balanced on length alone or merged smallest-spread first."""
    from raro_fast.packing import _split_to_count

    assert _layout(_samples_of_lengths([100]), budget=100, world=1)[1] == [[[100]]]
    assert _layout(_samples_of_lengths([50] * 4), budget=100, world=1)[1] == [[[50, 50], [50, 50]]]
    assert _split_to_count([[0, 1, 2, 3]], 2, dict.fromkeys(range(4), 5)) == [[0, 1], [2, 3]]
    assert _split_to_count([[0, 1], [2, 3]], 3, {0: 10, 1: 10, 2: 1, 3: 1}) == [[2, 3], [0], [1]]
    rng, a = random.Random(5), 2048.0
    samples = _samples_of_lengths([rng.choice([30, 200, 900, 2000]) + rng.randint(0, 50) for _ in range(24)])
    costs = []
    for r in range(4):
        mbs = plan_micro_batches(samples, max_tokens_per_micro_batch=4096, world_size=4, rank=r, cost_a=a)
        costs.append(sum(a * n + n * n for mb in mbs if not mb.is_padding for n in mb.cu_seqlens.diff().tolist()))
    assert max(costs) / min(costs) < 1.05, costs


def test_too_long_sequence_is_an_error_naming_it():
    samples = random_samples(4, random.Random(1), max_len=20)
    samples[2].input_ids = list(range(50))
    with pytest.raises(ValueError, match=r"uid=2 .* 50 tokens.*max_tokens_per_micro_batch=32"):
        plan_micro_batches(samples, max_tokens_per_micro_batch=32, world_size=1, rank=0)


def test_pack_alignment():
    s = SequenceSample(input_ids=[10, 11, 12, 13, 14], prompt_len=2, advantage=0.5, role="policy", group=0, uid=7,
                       loss_weight=0.25, old_logprobs=[-1.0, -2.0, -3.0], rollout_logprobs=[-1.5, -2.5, -3.5])
    t = SequenceSample(input_ids=[20, 21, 22], prompt_len=1, advantage=-1.0, role="critic", group=1, uid=8,
                       old_logprobs=[-4.0, -5.0], rollout_logprobs=[-4.5, -5.5])
    mb = pack([s, t], num_sequences=2, num_tokens=5)
    assert mb.input_ids.tolist() == [10, 11, 12, 13, 14, 20, 21, 22]
    assert mb.position_ids.tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    assert mb.cu_seqlens.tolist() == [0, 5, 8] and mb.max_seqlen == 5
    assert mb.targets.tolist() == [-100, 12, 13, 14, -100, 21, 22, -100]
    assert mb.old_logprobs.tolist() == [0, -1, -2, -3, 0, -4, -5, 0]
    assert mb.rollout_logprobs.tolist() == [0, -1.5, -2.5, -3.5, 0, -4.5, -5.5, 0]
    assert mb.advantages.tolist() == [0, 0.5, 0.5, 0.5, 0, -1, -1, 0]
    assert mb.loss_weights.tolist() == [0, 0.25, 0.25, 0.25, 0, 1, 1, 0]
    assert mb.seq_ids.tolist() == [0] * 5 + [1] * 3 and mb.uids.tolist() == [7, 8]
    stats = padding_stats([s, t], [mb])
    assert stats["packed_padding_fraction"] == 0.0 and stats["padded_padding_fraction"] == pytest.approx(0.2)
    bad = SequenceSample(input_ids=[1, 2, 3], prompt_len=1, advantage=0, role="policy", group=0, uid=3, old_logprobs=[0.0])
    with pytest.raises(ValueError, match="uid=3: old_logprobs has 1 values for 2"):
        pack([bad], num_sequences=1, num_tokens=2)


def tiny_qwen(seed=0):
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=128)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").float()
    use_varlen_attention(model)
    return model


def _loss(model, mb, agg):
    hidden = packed_hidden_states(model.model, mb)
    lp = linear_logprobs(hidden, model.get_output_embeddings().weight, mb.targets).logprobs
    loss, _ = policy_loss(lp, mb.old_logprobs, mb.advantages, mb.targets != -100, loss_agg=agg, seq_ids=mb.seq_ids,
                          num_sequences=mb.num_sequences, num_tokens=mb.num_tokens, norm_constant=300.0,
                          weights=mb.loss_weights, clip_low=0.2, clip_high=0.28)
    return loss


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_sum", "seq_mean_token_mean", "token_sum_norm"])
def test_packed_step_equals_unpacked(agg):
    rng = random.Random(11)
    samples = random_samples(7, rng, max_len=30)
    model = tiny_qwen()
    n_seq, n_tok = len(samples), sum(s.num_targets for s in samples)

    def grads_of(batches):
        model.zero_grad(set_to_none=True)
        total = sum(_loss(model, mb, agg) for mb in batches)
        total.backward()
        return total.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    packed = plan_micro_batches(samples, max_tokens_per_micro_batch=64, world_size=1, rank=0)
    assert len(packed) >= 2
    single = [pack([s], num_sequences=n_seq, num_tokens=n_tok) for s in samples]
    loss_p, g_p = grads_of(packed)
    loss_s, g_s = grads_of(single)
    # fp32 throughout; sums in different orders: agreement to ~1e-6 relative.
    torch.testing.assert_close(loss_p, loss_s, rtol=1e-5, atol=1e-6)
    for n in g_p:
        torch.testing.assert_close(g_p[n], g_s[n], rtol=1e-4, atol=1e-6)
    assert loss_p.abs() > 0


def test_per_sequence_temperatures_reach_every_token_and_a_mix_is_refused():
    s = SequenceSample(input_ids=[10, 11, 12], prompt_len=1, advantage=1.0, role="policy", group=0, uid=0, temperature=1.0)
    t = SequenceSample(input_ids=[20, 21], prompt_len=1, advantage=1.0, role="critic", group=1, uid=1, temperature=0.25)
    assert pack([s, t], num_sequences=2, num_tokens=3).temperatures.tolist() == [1.0, 1.0, 1.0, 0.25, 0.25]
    s.temperature = t.temperature = None
    assert pack([s, t], num_sequences=2, num_tokens=3).temperatures is None
    t.temperature = 0.25
    with pytest.raises(ValueError, match="uid=0: no sampling temperature, packed with sequences that carry one"):
        pack([s, t], num_sequences=2, num_tokens=3)


def test_policy_model_log_probs_and_entropy_at_each_sequences_temperature_match_float64():
    from raro_fast.model.policy import PolicyModel

    model = tiny_qwen(seed=5)
    # a copy of the config: from_config would switch the model's own attention to sdpa too
    reference = AutoModelForCausalLM.from_config(copy.deepcopy(model.config), attn_implementation="sdpa").double()
    reference.load_state_dict(model.state_dict())
    assert model.config._attn_implementation == "raro_varlen"
    rng = random.Random(4)
    samples = random_samples(4, rng, with_logprobs=False)
    for s, temp in zip(samples, (1.0, 0.3, 0.3, 1.7)):
        s.temperature = temp
    mb = pack(samples, num_sequences=4, num_tokens=sum(x.num_targets for x in samples))
    logprobs, entropy = PolicyModel(model)(mb, temperature=1.0, return_entropy=True)
    start = 0
    for s in samples:
        n, p = len(s.input_ids), s.prompt_len
        with torch.no_grad():
            logits = reference(input_ids=torch.tensor([s.input_ids])).logits[0] / s.temperature
        logp = torch.log_softmax(logits, -1)
        want = logp[p - 1 : n - 1].gather(1, torch.tensor(s.input_ids[p:])[:, None])[:, 0]
        want_h = -(logp.exp() * logp).sum(-1)[p - 1 : n - 1]
        torch.testing.assert_close(logprobs[start + p - 1 : start + n - 1].double(), want, rtol=0, atol=2e-5)
        torch.testing.assert_close(entropy[start + p - 1 : start + n - 1].double(), want_h, rtol=0, atol=2e-5)
        start += n
    # and the gradient flows through the per-token scale (finite, non-zero)
    logprobs.sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)


def policy_and_critic_batch():
    """A model with logits of O(10) (as a trained model's, so a temperature error shows) and a packed batch of two
    policy samples at 1.0 and two critic samples at 0.3, each carrying its temperature."""
    model = tiny_qwen(seed=6)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(30)
    samples = random_samples(4, random.Random(5), with_logprobs=False)
    for s, temp in zip(samples, (1.0, 0.3, 0.3, 1.0)):
        s.temperature = temp
    return model, pack(samples, num_sequences=4, num_tokens=sum(x.num_targets for x in samples))


def logprobs_at_token_temperatures(hidden, weight, mb):
    """float64 log-probs of mb's targets from these hidden states and head, each token at its own temperature;
    and the mask of scored tokens."""
    logits = hidden.double() @ weight.double().T / mb.temperatures[:, None]
    return torch.log_softmax(logits, -1).gather(1, mb.targets.clamp(min=0)[:, None])[:, 0], mb.targets != -100


def test_policy_model_in_bf16_divides_the_fp32_logits_by_each_tokens_temperature():
    """bf16 with RARO's critic at 0.3 beside the policy at 1: log-probs within fp32 accumulation (1e-4) of the
    float64 softmax of the model's own bf16 hidden states and head, each token at its temperature. Scaling the
    bf16 hidden states by T/T_t (the way before) rounded the factor and every element: 0.36 off here."""
    from raro_fast.model.policy import PolicyModel

    model, mb = policy_and_critic_batch()
    model = model.bfloat16()
    with torch.no_grad():
        logprobs, _ = PolicyModel(model)(mb, temperature=1.0)
        hidden = packed_hidden_states(model.model, mb)
    want, keep = logprobs_at_token_temperatures(hidden, model.get_output_embeddings().weight, mb)
    assert float((logprobs.double() - want)[keep].abs().max()) < 1e-4
    assert float(want[keep].abs().max()) > 1.0  # not a near-uniform distribution that any scale would match


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_sum", "seq_mean_token_mean", "token_sum_norm"])
def test_a_batch_with_no_completion_token_trains_nothing_instead_of_stopping(agg):
    """Such a (mini-)batch carried the counts 0 to the loss kernel, which stopped the run naming no sequence (a PPO
    mini-batch that drew only these did too). Its loss is 0 now; a mixed batch keeps its normalisers."""
    from raro_fast.config import LossConfig
    from raro_fast.update import _micro_batch_loss

    def sample(uid, n):
        return SequenceSample(input_ids=list(range(1, 5 + n)), prompt_len=4, advantage=0.5, role="policy", group=0,
                              uid=uid, old_logprobs=[-1.0] * n)

    for mb in plan_micro_batches([sample(0, 0), sample(1, 0)], max_tokens_per_micro_batch=64, world_size=2, rank=0):
        logprobs = (mb.old_logprobs - 0.3).requires_grad_()
        loss, _ = _micro_batch_loss(logprobs, mb, mb.targets != -100, LossConfig(loss_agg=agg), 1.0)
        loss.backward()
        assert loss.item() == 0.0 and torch.all(logprobs.grad == 0)
    mixed = plan_micro_batches([sample(0, 0), sample(1, 3)], max_tokens_per_micro_batch=64, world_size=1, rank=0)
    assert [(mb.num_sequences, mb.num_tokens) for mb in mixed] == [(1, 3)]


@pytest.mark.parametrize("field", ["old_logprobs", "rollout_logprobs", "ref_logprobs"])
def test_sequences_with_and_without_a_log_prob_field_are_refused_naming_one(field):
    """A mix made the field None for every micro-batch holding one that lacked it: which sequences the engine-gap
    metric and truncated importance sampling saw followed the packing."""
    have = SequenceSample(input_ids=[1, 2, 3, 4], prompt_len=2, advantage=1.0, role="policy", group=0, uid=0,
                          **{field: [-1.0, -2.0]})
    lack = SequenceSample(input_ids=[1, 2, 5], prompt_len=2, advantage=-1.0, role="policy", group=0, uid=7)
    with pytest.raises(ValueError, match=f"uid=7 has no {field}"):
        plan_micro_batches([have, lack], max_tokens_per_micro_batch=64, world_size=1, rank=0)
    assert len(plan_micro_batches([lack], max_tokens_per_micro_batch=64, world_size=1, rank=0)) == 1
