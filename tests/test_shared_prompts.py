"""Shared prompts (`train.share_prompts`): sequences of one micro-batch that start with the same prompt have the
decoder compute that prompt once, and the LM head runs on trained rows only. Every per-token value the trainer
reads must be what the whole sequences give: checked against a float64 model run one sequence at a time."""
import copy
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from raro_fast.model.policy import PolicyModel
from raro_fast.model.varlen import use_varlen_attention
from raro_fast.packing import SequenceSample, pack, plan_micro_batches
from test_packing import tiny_qwen

VOCAB = 97


def grouped_samples(rng, *, groups, members, prompt_len=(4, 20), completion_len=(1, 12), singles=0):
    """`groups` prompts with `members` completions each (different lengths), and `singles` sequences of their own
    prompt, shuffled; each carries a temperature of 0.3 or 1.0, as RARO's critic and policy samples do."""
    out = []
    for g in range(groups + singles):
        prompt = [rng.randrange(3, VOCAB) for _ in range(rng.randint(*prompt_len))]
        temperature = rng.choice([0.3, 1.0])
        for _ in range(members if g < groups else 1):
            completion = [rng.randrange(3, VOCAB) for _ in range(rng.randint(*completion_len))]
            out.append(SequenceSample(input_ids=prompt + completion, prompt_len=len(prompt),
                                      advantage=rng.uniform(-1, 1), role="critic", group=g, uid=len(out),
                                      temperature=temperature))
    rng.shuffle(out)
    return out


def count(samples):
    return dict(num_sequences=len(samples), num_tokens=sum(s.num_targets for s in samples))


def test_each_row_reads_a_computed_row_of_the_same_token_and_position_and_each_prompt_is_computed_once():
    samples = grouped_samples(random.Random(0), groups=3, members=4, singles=2)
    mb = pack(samples, **count(samples), share_prompts=True)
    plain = pack(samples, **count(samples))
    for field in ("input_ids", "position_ids", "cu_seqlens", "targets", "advantages", "seq_ids", "temperatures"):
        assert torch.equal(getattr(mb, field), getattr(plain, field)), field  # the row itself is unchanged
    assert plain.kept_rows is None and plain.expand is None and plain.trained_rows is None
    read = mb.kept_rows[mb.expand]  # the computed row each row reads
    assert torch.equal(mb.input_ids[read], mb.input_ids) and torch.equal(mb.position_ids[read], mb.position_ids)
    repeated = sum(len(s.input_ids[: s.prompt_len]) for s in samples) - sum(
        len(p) for p in {tuple(s.input_ids[: s.prompt_len]) for s in samples})
    assert mb.kept_rows.numel() == mb.input_ids.numel() - repeated > 0
    assert torch.equal(mb.kept_rows, mb.kept_rows.sort().values)  # a prompt's first copy, where it stands
    first_copy = {}
    for s, start in zip(samples, mb.cu_seqlens[:-1].tolist()):
        n, p = len(s.input_ids), s.prompt_len
        first = first_copy.setdefault(tuple(s.input_ids[:p]), start)
        assert read[start : start + p].tolist() == list(range(first, first + p))
        assert read[start + p : start + n].tolist() == list(range(start + p, start + n))  # completions: their own
    assert torch.equal(mb.trained_rows, torch.nonzero(mb.targets != -100)[:, 0])


def test_without_a_repeated_prompt_every_row_is_computed_and_the_head_still_skips_untrained_rows():
    samples = grouped_samples(random.Random(1), groups=0, members=1, singles=4)
    mb = pack(samples, **count(samples), share_prompts=True)
    assert mb.kept_rows is None and mb.expand is None
    assert torch.equal(mb.trained_rows, torch.nonzero(mb.targets != -100)[:, 0])
    # prompts that differ in their last token only, or where one prompt is the other's start, are not one prompt
    # (a planted key of the prompt less its last token read the other's last row: found by mutation testing)
    near = [SequenceSample(input_ids=ids, prompt_len=p, advantage=1.0, role="policy", group=i, uid=i)
            for i, (ids, p) in enumerate([([5, 6, 7, 8, 20, 21], 4), ([5, 6, 7, 9, 22, 23], 4), ([5, 6, 7, 8, 24], 3)])]
    mb = pack(near, **count(near), share_prompts=True)
    assert mb.kept_rows is None and mb.expand is None


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                      max_position_embeddings=128)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").float()
    use_varlen_attention(model)
    return model


@pytest.mark.parametrize("make_model", [tiny_qwen, tiny_llama], ids=["qwen2-tied", "llama-untied"])
def test_shared_prompts_give_every_sequences_own_log_probs_entropies_and_gradient(make_model):
    """Log-probs and entropies at every trained row, 0 elsewhere, and the gradient of a weighted sum of both, all
    as a float64 copy of the model gives running each whole sequence on its own, at its own temperature."""
    rng = random.Random(2)
    samples = grouped_samples(rng, groups=3, members=4, singles=2)
    model = make_model(seed=3)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8)  # peaked distributions: an off-by-one row shows
    # a copy of the config: from_config would switch the model's own to sdpa, which reads no shared rows
    reference = AutoModelForCausalLM.from_config(copy.deepcopy(model.config), attn_implementation="sdpa").double()
    reference.load_state_dict(model.state_dict())
    mb = pack(samples, **count(samples), share_prompts=True)
    assert mb.kept_rows.numel() < 0.7 * mb.input_ids.numel()
    T = mb.input_ids.numel()
    g = torch.Generator().manual_seed(4)
    c_lp, c_ent = torch.randn(T, generator=g, dtype=torch.float64), torch.randn(T, generator=g, dtype=torch.float64)

    logprobs, entropy = PolicyModel(model)(mb, temperature=1.0, return_entropy=True)
    ((logprobs.double() * c_lp).sum() + (entropy.double() * c_ent).sum()).backward()

    trained = mb.targets != -100
    assert torch.equal(logprobs[~trained], torch.zeros_like(logprobs[~trained]))
    assert torch.equal(entropy[~trained], torch.zeros_like(entropy[~trained]))
    want_lp, want_ent, total = torch.zeros(T, dtype=torch.float64), torch.zeros(T, dtype=torch.float64), 0.0
    for s, start in zip(samples, mb.cu_seqlens[:-1].tolist()):
        n, p = len(s.input_ids), s.prompt_len
        logp = torch.log_softmax(reference(input_ids=torch.tensor([s.input_ids])).logits[0] / s.temperature, -1)
        rows = slice(start + p - 1, start + n - 1)
        want_lp[rows] = logp[p - 1 : n - 1].gather(1, torch.tensor(s.input_ids[p:])[:, None])[:, 0]
        want_ent[rows] = -(logp.exp() * logp).sum(-1)[p - 1 : n - 1]
        total = total + (want_lp[rows] * c_lp[rows]).sum() + (want_ent[rows] * c_ent[rows]).sum()
    total.backward()
    torch.testing.assert_close(logprobs.double(), want_lp.detach(), rtol=0, atol=2e-5)
    torch.testing.assert_close(entropy.double(), want_ent.detach(), rtol=0, atol=2e-5)
    want_grads = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        want = want_grads[name].grad
        assert float(want.abs().max()) > 0, name
        # fp32 sums of gradients up to 142 (the untied embedding's): a small element is off by 2e-6 of the largest
        torch.testing.assert_close(p.grad.double(), want, rtol=1e-4, atol=4e-6 * float(want.abs().max()), msg=name)


def test_on_cpu_later_copies_query_their_completions_only_and_give_what_the_whole_row_gives_float64():
    """On CPU a prompt's later copies run no query of their prompt (its outputs were the first copy's, thrown
    away): only their completions' queries, against the prompt's computed keys and their own. Values and gradients
    equal the whole-row attention's (the GPU path) in float64; empty completions, lone sequences and GQA included;
    and the SDPA calls see only the computed rows' queries."""
    import torch.nn.functional as F

    from raro_fast.model import varlen

    samples = grouped_samples(random.Random(5), groups=4, members=4, singles=3, completion_len=(0, 12))
    assert any(len(s.input_ids) == s.prompt_len for s in samples)
    mb = pack(samples, **count(samples), share_prompts=True)
    K = mb.kept_rows.numel()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(K, h, 8, generator=g, dtype=torch.float64, requires_grad=True) for h in (4, 2, 2))
    weights = torch.randn(K, 4, 8, generator=g, dtype=torch.float64)
    queries = []
    sdpa = F.scaled_dot_product_attention

    def counting(query, *args, **kwargs):
        queries.append(query.shape[0] * query.shape[2])
        return sdpa(query, *args, **kwargs)

    plan = varlen.SharedRows(mb.expand, mb.kept_rows, mb.cu_seqlens).plan
    assert plan.tails and plan.wholes
    with pytest.MonkeyPatch.context() as m:
        m.setattr(varlen.F, "scaled_dot_product_attention", counting)
        new = varlen.shared_prompt_attention(q, k, v, plan, 0.3)
    got = torch.autograd.grad((new * weights).sum(), (q, k, v))
    whole = varlen.varlen_causal_attention(*(x.index_select(0, mb.expand) for x in (q, k, v)), mb.cu_seqlens,
                                           mb.max_seqlen, 0.3).index_select(0, mb.kept_rows)
    want = torch.autograd.grad((whole * weights).sum(), (q, k, v))
    torch.testing.assert_close(new, whole, rtol=0, atol=1e-12)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    # padded query rows included, within the buckets' slack of the computed rows (the whole row: all T of them)
    assert K <= sum(queries) <= varlen.BUCKET_SLACK * K < mb.input_ids.numel()


@pytest.mark.parametrize("world", [1, 2])
def test_the_plan_keeps_a_prompts_sequences_together_within_the_budget(world):
    samples = grouped_samples(random.Random(5), groups=6, members=4, singles=5)
    budget = 96
    per_rank = [plan_micro_batches(samples, max_tokens_per_micro_batch=budget, world_size=world, rank=r,
                                   share_prompts=True) for r in range(world)]
    assert len({len(m) for m in per_rank}) == 1
    by_uid = {s.uid: s for s in samples}
    where, seen = {}, []
    for r, mbs in enumerate(per_rank):
        for i, mb in enumerate(mbs):
            assert mb.input_ids.numel() <= budget
            for uid in mb.uids.tolist():
                where.setdefault(tuple(by_uid[uid].input_ids[: by_uid[uid].prompt_len]), set()).add((r, i))
            seen.extend(mb.uids.tolist())
    assert sorted(seen) == list(range(len(samples)))
    for prompt, places in where.items():
        members = [s for s in samples if tuple(s.input_ids[: s.prompt_len]) == prompt]
        if sum(len(s.input_ids) for s in members) <= budget:
            assert len(places) == 1, prompt  # all in one micro-batch: the prompt computed once


def test_a_prompt_whose_sequences_exceed_the_budget_is_cut_into_runs_that_fit():
    samples = grouped_samples(random.Random(6), groups=1, members=10, prompt_len=(20, 20), completion_len=(8, 12))
    mbs = plan_micro_batches(samples, max_tokens_per_micro_batch=100, world_size=1, rank=0, share_prompts=True)
    assert len(mbs) >= 3 and all(mb.input_ids.numel() <= 100 for mb in mbs)
    assert sorted(uid for mb in mbs for uid in mb.uids.tolist()) == list(range(10))
    assert all(mb.kept_rows is not None for mb in mbs if len(mb.uids) > 1)


def test_shared_prompts_under_another_attention_are_refused_not_misread():
    """Only the packed attention reads the shared rows; sdpa would run the computed rows as one sequence."""
    samples = grouped_samples(random.Random(7), groups=2, members=3)
    model = tiny_qwen(seed=0)
    model.set_attn_implementation("sdpa")
    with pytest.raises(ValueError, match="shared prompts needs the raro_varlen attention .* uses 'sdpa'"):
        PolicyModel(model)(pack(samples, **count(samples), share_prompts=True))


def test_few_large_groups_still_spread_over_every_rank():
    """Two prompts of 8 sequences each on 4 ranks: each group is cut to a rank's share of the tokens, so no rank
    runs only a filler while another trains two groups' worth."""
    rng = random.Random(8)
    samples = grouped_samples(rng, groups=2, members=8, prompt_len=(100, 100), completion_len=(50, 50))
    per_rank = [plan_micro_batches(samples, max_tokens_per_micro_batch=1200, world_size=4, rank=r, share_prompts=True)
                for r in range(4)]
    assert not any(mb.is_padding for mbs in per_rank for mb in mbs)
    assert [sum(mb.input_ids.numel() for mb in mbs) for mbs in per_rank] == [4 * 150] * 4
    assert all(mb.kept_rows is not None for mbs in per_rank for mb in mbs)  # still shared within each rank


def test_an_untied_head_gets_a_zero_gradient_from_a_micro_batch_with_nothing_to_train():
    """With no trained row the head still sees every row, as without sharing: FSDP2 reduces only the gradients
    that exist, so a head without one on one rank would leave the ranks' reductions unmatched."""
    samples = [SequenceSample(input_ids=[5, 6, 7, 8], prompt_len=4, advantage=0.0, role="policy", group=0, uid=i)
               for i in range(2)]
    model = tiny_llama(seed=1)
    mb = pack(samples, num_sequences=2, num_tokens=0, share_prompts=True)
    assert mb.trained_rows.numel() == 0 and mb.kept_rows is not None
    logprobs, _ = PolicyModel(model)(mb)
    logprobs.sum().backward()
    grad = model.get_output_embeddings().weight.grad
    assert grad is not None and float(grad.abs().max()) == 0.0
    assert torch.equal(logprobs, torch.zeros(8))
