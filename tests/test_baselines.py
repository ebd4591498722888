"""Baselines on the shared trainer: SFT through the clipped-surrogate update is exactly NLL on the expert
answers; RLVR's rewards are the verifier's, with GRPO groups."""

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from raro_fast.modes.dpo import DpoMode, dpo_advantages, dpo_pairs
from raro_fast.modes.rationalization import rationalization_samples
from raro_fast.modes.rl_logit import (expert_continuation, reasoning_prefix_length, rl_logit_rollouts,
                                      score_expert_answers)
from raro_fast.modes.rlvr import rlvr_rollouts
from raro_fast.modes.sft import sft_samples
from raro_fast.config import LossConfig, load_config
from raro_fast.distributed import Dist
from raro_fast.model.hf import build_embedded_model, load_project_tokenizer
from raro_fast.model.policy import PolicyModel
from raro_fast.model.varlen import use_varlen_attention
from raro_fast.packing import plan_micro_batches
from raro_fast.tasks import make_task
from raro_fast.update import recompute_logprobs, update_step
from test_raro_game import ScriptedEngine


@pytest.fixture(scope="module")
def setting():
    cfg = load_config(["--raro.group_size", "4", "--task.countdown.num_train", "30", "--task.countdown.num_heldout", "5"])
    return cfg, load_project_tokenizer(), make_task(cfg.task)


@pytest.mark.parametrize("run_temperature", [1.0, 0.5, 0.0])
def test_sft_update_gradient_is_nll_gradient(setting, run_temperature):
    """At temperature 1 whatever rollout.temperature is: at 0.5 the update's gradient was the tempered NLL's (twice
    as long), at 0 the first update stopped with 'temperature must be > 0' (found by review)."""
    cfg, tok, task = setting
    examples = task.examples("train")[:5]
    samples = sft_samples(examples, tokenizer=tok).samples
    for uid, s in enumerate(samples):
        s.uid = uid
    model = build_embedded_model(tok, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64,
                                 max_position=256, seed=0)
    use_varlen_attention(model)
    policy = PolicyModel(model)
    mbs = plan_micro_batches(samples, max_tokens_per_micro_batch=256, world_size=1, rank=0)
    recompute_logprobs(policy, mbs, temperature=run_temperature)
    opt = torch.optim.SGD(policy.parameters(), lr=0.0)  # lr 0: read the gradient, leave the weights
    update_step(policy, opt, mbs, loss_cfg=LossConfig(loss_agg="token_mean"), temperature=run_temperature,
                norm_constant=1.0, grad_clip=0.0)
    g_update = {n: p.grad.clone() for n, p in policy.named_parameters()}
    policy.zero_grad()
    for mb in mbs:
        mb.temperatures = None  # the plain model's own likelihood, at temperature 1
    nll = sum(-(policy(mb, temperature=1.0)[0] * (mb.targets != -100)).sum() for mb in mbs) / mbs[0].num_tokens
    nll.backward()
    for n, p in policy.named_parameters():
        torch.testing.assert_close(g_update[n], p.grad, rtol=1e-5, atol=1e-7)
    # The expert completion is the answer only, in the policy format.
    text = tok.decode(samples[0].input_ids[samples[0].prompt_len :], skip_special_tokens=True)
    assert text == f"<think></think><answer>{examples[0].answer}</answer>"


def test_rlvr_rewards_are_the_verifiers(setting):
    cfg, tok, task = setting
    examples = [e for e in task.examples("train") if sum(e.meta["numbers"]) != e.meta["target"]][:2]
    out = rlvr_rollouts(examples, engine=ScriptedEngine(tok, task), tokenizer=tok, task=task, cfg=cfg, seed=0)
    # Scripted samples per question: expert (1), wrong (0), no tag (0), truncated expert (0: truncated counts as no answer).
    assert out.stats["reward/policy_mean"] == [1.0, 0.0, 0.0, 0.0] * 2
    advs = [s.advantage for s in out.samples]
    assert advs == pytest.approx([0.75, -0.25, -0.25] * 2)  # truncated sample filtered from the loss
    assert all(s.role == "policy" and s.loss_weight == 1.0 for s in out.samples)
    assert [s.reward for s in out.samples] == [1.0, 0.0, 0.0] * 2 and [s.group for s in out.samples] == [0] * 3 + [1] * 3
    assert out.stats["policy/truncated_rate"] == [0.0, 0.0, 0.0, 1.0] * 2
    assert out.stats["policy/answer_rate"] == [1.0, 1.0, 0.0, 0.0] * 2


class _Engine:
    """Answers every prompt with scripted texts (one per sample, cycling); records the prompts."""

    def __init__(self, tok, texts, truncated=()):
        self.tok, self.texts, self.truncated, self.prompts, self.params = tok, texts, set(truncated), [], []
        self.weight_version = 2

    def generate(self, prompt_list, params):
        from raro_fast.rollout.engine import Completion

        self.params.append(params)
        out, k = [], 0
        for p in prompt_list:
            self.prompts.append(self.tok.decode(p))
            group = []
            for _ in range(params.n):
                text = self.texts[k % len(self.texts)]
                cut = k in self.truncated
                ids = self.tok(text, add_special_tokens=False)["input_ids"] + ([] if cut else [self.tok.eos_token_id])
                group.append(Completion(token_ids=ids, logprobs=[-0.1 * (j + 1) for j in range(len(ids))],
                                        finish_reason="length" if cut else "stop", text=text,
                                        weight_version=self.weight_version, prompt_ids=list(p)))
                k += 1
            out.append(group)
        return out


def test_rationalization_trains_on_the_models_reasoning_before_the_expert_answer(setting):
    cfg, tok, task = setting
    examples = task.examples("train")[:2]
    engine = _Engine(tok, ["<think>4 times 6</think><answer>whatever</answer>", "<think>never closed"])
    out = rationalization_samples(examples, engine=engine, tokenizer=tok, cfg=cfg, seed=0)
    assert all(f"The correct final answer is {ex.answer}." in p for ex, p in zip(examples, engine.prompts))
    texts = [tok.decode(s.input_ids[s.prompt_len :], skip_special_tokens=True) for s in out.samples]
    assert texts == [f"<think>4 times 6</think><answer>{examples[0].answer}</answer>",
                     f"<think></think><answer>{examples[1].answer}</answer>"]
    assert out.stats["rationalization/fallback_rate"] == [0.0, 1.0]
    # the trained prompt is the plain policy prompt: the answer hint is not in it
    assert all("The correct final answer" not in tok.decode(s.input_ids[: s.prompt_len]) for s in out.samples)
    assert all(s.advantage == 1.0 for s in out.samples)


def test_reasoning_prefix_length_is_the_shortest_prefix_closing_think(setting):
    _, tok, _ = setting
    ids = tok("<think>a b</think><answer>7</answer>", add_special_tokens=False)["input_ids"]
    n = reasoning_prefix_length(ids, tok.decode)
    assert tok.decode(ids[:n]) == "<think>a b</think>"
    assert reasoning_prefix_length(tok("<think>open", add_special_tokens=False)["input_ids"], tok.decode) is None


def test_rl_logit_rewards_are_the_models_likelihood_of_the_expert_answer(setting):
    cfg, tok, task = setting
    examples = task.examples("train")[:2]
    texts = ["<think>try 4*6</think><answer>1+1</answer>", "<think>x</think><answer>2</answer>",
             "<think>no end", "<think>cut</think><answer>3</answer>"]
    engine = _Engine(tok, texts, truncated={3, 7})
    out = rl_logit_rollouts(examples, engine=engine, tokenizer=tok, cfg=cfg, seed=0, group_offset=100)
    assert out.stats["rl_logit/reasoning_rate"] == [1.0, 1.0, 0.0, 0.0] * 2
    assert len(out.samples) == len(out.scoring) == 4
    for s, sc, ex in zip(out.samples, out.scoring, [examples[0]] * 2 + [examples[1]] * 2):
        trained = tok.decode(s.input_ids[s.prompt_len :])
        assert trained in ("<think>try 4*6</think>", "<think>x</think>")
        assert len(s.rollout_logprobs) == s.num_targets and s.weight_version == 2
        assert sc.input_ids[: len(s.input_ids)] == s.input_ids and sc.prompt_len == len(s.input_ids)
        assert tok.decode(sc.input_ids[sc.prompt_len :], skip_special_tokens=True) == f"<answer>{ex.answer}</answer>"
        # </think> and <answer> are single tokens here: nothing spills past </think>, the expert ids are the whole answer's
        assert sc.input_ids[sc.prompt_len :] == tok(f"<answer>{ex.answer}</answer>{tok.eos_token}",
                                                    add_special_tokens=False)["input_ids"]
        assert s.group == sc.group in (100, 101)
    assert out.stats["rl_logit/misaligned_rate"] == [0.0] * 4
    model = build_embedded_model(tok, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64,
                                 max_position=256, seed=1)
    use_varlen_attention(model)
    policy = PolicyModel(model)
    stats = score_expert_answers(policy, out.samples, out.scoring, d=Dist(rank=0, world_size=1, local_rank=0,
                                 device=torch.device("cpu")), max_tokens_per_micro_batch=256,
                                 std_normalize=False)
    # reference: each scoring sequence alone, unpacked (plain sdpa copy of the same weights), float64 log-softmax
    model = build_embedded_model(tok, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64,
                                 max_position=256, seed=1)
    rewards = []
    for sc in out.scoring:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([sc.input_ids])).logits[0].double()
        lp = torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(sc.input_ids[1:])[:, None])[:, 0]
        rewards.append(lp[sc.prompt_len - 1 :].mean().item())
    assert stats["reward/policy_mean"] == pytest.approx(sum(rewards) / 4, abs=1e-5)
    want = [rewards[0] - (rewards[0] + rewards[1]) / 2, rewards[1] - (rewards[0] + rewards[1]) / 2,
            rewards[2] - (rewards[2] + rewards[3]) / 2, rewards[3] - (rewards[2] + rewards[3]) / 2]
    assert [s.advantage for s in out.samples] == pytest.approx(want, abs=1e-5)
    assert [s.reward for s in out.samples] == pytest.approx(rewards, abs=1e-5)  # what rollouts.jsonl logs
    assert rewards[0] != rewards[1]  # the reasoning changes the reward: the advantages are not trivially zero


@pytest.fixture(scope="module")
def bpe_tokenizer():
    """A byte-level BPE in which </think> is several tokens and the one that closes it merges what follows, as in
    Qwen2.5- or SmolLM2-style vocabularies: `</think><answer>` -> `</`, `think`, `><`, `answer`, `>`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = ["<think>8+2=10</think><answer>8+2</answer>", "<div><span>a</span></div>", "<think>hm</think>!!"] * 50
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|im_end|>", "<|im_start|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|im_end|>")
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return tok


def test_rl_logit_finds_the_reasoning_where_the_tokenizer_marks_the_tags_special(setting):
    """Its decode skipped special tokens: with `</think>` marked special no reasoning was ever found closed, and every
    sample was dropped as unfinished (reasoning_rate 0, nothing trained, no error). Found by review on 2026-12-07."""
    from raro_fast import prompts

    cfg, tok, task = setting
    special = load_project_tokenizer()
    special.add_special_tokens({"additional_special_tokens": list(prompts.FORMAT_TAGS)})
    examples = task.examples("train")[:1]
    texts = ["<think>try 4*6</think><answer>1+1</answer>", "<think>x</think><answer>2</answer>"]
    runs = [rl_logit_rollouts(examples, engine=_Engine(t, texts), tokenizer=t, cfg=cfg, seed=0, group_offset=0)
            for t in (tok, special)]
    assert runs[1].stats["rl_logit/reasoning_rate"] == [1.0] * 4
    assert [sc.input_ids for sc in runs[1].scoring] == [sc.input_ids for sc in runs[0].scoring]


def test_rl_logit_scores_the_expert_answer_after_a_think_token_that_spills_into_it(setting, bpe_tokenizer):
    """The token closing </think> can hold the `<` of `<answer>`: the kept reasoning ends in `><`, and the whole
    expert answer after it used to be scored as `</think><<answer>...`, text the model never writes. Now only the
    rest of the answer is scored; a reasoning whose spill no answer can follow (`>!!`) is left out and counted."""
    cfg, _, _ = setting
    tok = bpe_tokenizer
    pieces = lambda ids: [tok.decode([i]) for i in ids]  # noqa: E731
    assert "><" in pieces(tok("</think><answer>", add_special_tokens=False)["input_ids"])
    texts = ["<think>8+2=10</think><answer>8+2</answer>", "<think>hm</think>!!<answer>8+2</answer>"]
    assert ">!!" in pieces(tok(texts[1], add_special_tokens=False)["input_ids"])
    from raro_fast.tasks.base import Example

    ex = Example(id="q0", question="Make 10 from 8 2 5", answer="8+2", meta={})
    out = rl_logit_rollouts([ex], engine=_Engine(tok, texts), tokenizer=tok, cfg=cfg, seed=0, group_offset=0)
    assert out.stats["rl_logit/reasoning_rate"] == [1.0] * 4
    assert out.stats["rl_logit/misaligned_rate"] == [0.0, 1.0, 0.0, 1.0]
    assert len(out.samples) == len(out.scoring) == 2
    for s, sc in zip(out.samples, out.scoring):
        assert tok.decode(s.input_ids[s.prompt_len :]) == "<think>8+2=10</think><"  # the sampled tokens, as sampled
        assert sc.input_ids[: len(s.input_ids)] == s.input_ids and sc.prompt_len == len(s.input_ids)
        assert tok.decode(sc.input_ids[s.prompt_len :]) == "<think>8+2=10</think><answer>8+2</answer><|im_end|>"
        rest = tok("answer>8+2</answer><|im_end|>", add_special_tokens=False)["input_ids"]
        assert sc.input_ids[sc.prompt_len :] == rest


@pytest.mark.parametrize("separator", ["", " "])
def test_rl_logit_scores_the_expert_answer_as_a_sentencepiece_tokenizer_writes_it_after_the_reasoning(setting, separator):
    """Tokenized on its own, the rest of the expert answer started with a `▁` of its own under a SentencePiece
    tokenizer (Llama-2's, Mistral's): the reward scored `</think> <answer>` (or `<answer >`) where the model writes
    `</think><answer>`, a token it never writes (found by review on 2026-12-07). It is tokenized after the reasoning
    now: the scored sequence is the one the model writes when it answers as the expert."""
    from test_prompts import metaspace_tokenizer

    from raro_fast.tasks.base import Example

    cfg, _, _ = setting
    tok = metaspace_tokenizer(special_tags=False)
    tok.chat_template = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}[assistant] {% endif %}")
    written = f"<think>3*5+7 = 22 yes</think>{separator}<answer>3*5+7</answer>"
    ex = Example(id="q", question="Make 22", answer="3*5+7", meta={})
    out = rl_logit_rollouts([ex], engine=_Engine(tok, [written]), tokenizer=tok, cfg=cfg, seed=0, group_offset=0)
    assert out.stats["rl_logit/misaligned_rate"] == [0.0] * cfg.raro.group_size
    prompt_len = out.samples[0].prompt_len  # the scored sequence's own prompt_len counts the reasoning in
    assert out.scoring[0].input_ids[prompt_len:] == tok(written, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def test_rl_logit_scores_a_special_tokens_text_in_the_expert_answer_as_plain_text(setting):
    """An expert answer that spells `<|im_end|>` out was scored with an end of turn inside it (the reward took in
    log p(EOS | "ab")); SFT, rationalization and DPO read it as text. Found by review on 2026-12-07."""
    from raro_fast.modes.base import expert_completion_ids
    from raro_fast.tasks.base import Example

    cfg, tok, _ = setting
    ex = Example(id="q", question="Write two words", answer="ab<|im_end|>cd", meta={})
    out = rl_logit_rollouts([ex], engine=_Engine(tok, ["<think>x</think><answer>y</answer>"]), tokenizer=tok, cfg=cfg,
                            seed=0, group_offset=0)
    sc = out.scoring[0]
    scored = sc.input_ids[sc.prompt_len:]
    assert scored.count(tok.eos_token_id) == 1 and scored[-1] == tok.eos_token_id
    target = expert_completion_ids(tok, ex.answer)
    assert scored == target[len(target) - len(scored):]  # SFT's target after its (empty) reasoning
    assert tok.decode(scored) == "<answer>ab<|im_end|>cd</answer><|im_end|>"


def test_the_expert_answer_tokenized_alone_where_tokens_merge_still_reads_special_tokens_as_text(bpe_tokenizer):
    """Where the reasoning's end and the answer merge into one token (`><` here), the answer is tokenized alone, and
    a special token's text in it is still plain text there (a planted bug that read it as the token survived)."""
    from raro_fast import prompts

    tok = bpe_tokenizer
    end = tok.convert_tokens_to_ids("<|im_end|>")
    head = prompts.text_ids(tok, "</think>")
    assert prompts.text_ids(tok, "</think><answer>a")[:len(head)] != head  # they merge: the path alone
    ids = prompts.text_ids_after(tok, "</think>", "<answer>a<|im_end|>b</answer>")
    assert end not in ids and tok.decode(ids) == "<answer>a<|im_end|>b</answer>"


def test_expert_continuation_drops_the_spill_and_keeps_a_whitespace_separator():
    expert = "<answer>7</answer><eos>"
    assert expert_continuation("<think>r</think>", expert) == expert
    assert expert_continuation("<think>r</think><", expert) == "answer>7</answer><eos>"
    assert expert_continuation("<think>r</think>\n\n<ans", expert) == "wer>7</answer><eos>"
    assert expert_continuation("<think>r</think>\n", expert) == expert  # scored as `</think>\n<answer>...`
    assert expert_continuation("<think>r</think>!", expert) is None
    assert expert_continuation("<think>r</think><b", expert) is None


def test_dpo_pairs_pair_the_expert_with_each_other_sample(setting):
    cfg, tok, task = setting
    ex = task.examples("train")[0]
    texts = [f"<think>a</think><answer>{ex.answer}</answer>", "<think>b</think><answer>1+2</answer>",
             "<think>c</think>no tag", "<think>d</think><answer>9</answer>"]
    engine = _Engine(tok, texts, truncated={3})
    out = dpo_pairs([ex], engine=engine, tokenizer=tok, task=task, cfg=cfg, seed=0, group_offset=40)
    assert out.stats["dpo/pair_rate"] == [0.0, 1.0, 1.0, 0.0]  # expert's own answer and truncated: no pair
    assert [(s.group, s.preference) for s in out.samples] == [(40, 1), (40, -1), (41, 1), (41, -1)]
    chosen = [tok.decode(s.input_ids[s.prompt_len :], skip_special_tokens=True) for s in out.samples[::2]]
    assert chosen == [f"<think></think><answer>{ex.answer}</answer>"] * 2
    assert [tok.decode(s.input_ids[s.prompt_len :], skip_special_tokens=True) for s in out.samples[1::2]] == texts[1:3]
    assert all(s.rollout_logprobs is None for s in out.samples)
    assert [s.weight_version for s in out.samples[1::2]] == [2, 2]  # the rejected are sampled: their policy's version
    # Both scored at temperature 1 whatever the rollouts sampled at: DPO compares the models' own likelihoods (at
    # rollout.temperature 0.5 the margins and gradient were twice as large). Found by review on 2026-12-07.
    assert [s.temperature for s in out.samples] == [1.0] * 4


def test_dpo_update_gradient_is_the_dpo_loss_gradient(setting):
    cfg, tok, task = setting
    ex = task.examples("train")[:2]
    engine = _Engine(tok, ["<think>b</think><answer>1+2</answer>", "<think>cc</think><answer>7*3</answer>"])
    samples = dpo_pairs(ex, engine=engine, tokenizer=tok, task=task, cfg=cfg, seed=0, group_offset=0).samples
    for uid, s in enumerate(samples):
        s.uid = uid
    make = lambda seed: build_embedded_model(tok, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,  # noqa: E731
                                             intermediate_size=64, max_position=256, seed=seed)
    policy, ref = PolicyModel(make(0)), PolicyModel(make(5))  # a reference that differs: margins are not 0
    use_varlen_attention(policy.lm)
    use_varlen_attention(ref.lm)
    mbs = plan_micro_batches(samples, max_tokens_per_micro_batch=160, world_size=1, rank=0)
    assert len(mbs) > 1  # pairs split across micro-batches: the sequence sums must still meet
    recompute_logprobs(policy, mbs, temperature=1.0)
    recompute_logprobs(ref, mbs, temperature=1.0, field="ref_logprobs")
    beta = 0.3
    pairs, stats = dpo_advantages(samples, mbs, d=Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")), beta=beta)
    assert pairs == len(samples) // 2 == 8
    opt = torch.optim.SGD(policy.parameters(), lr=0.0)
    update_step(policy, opt, mbs, loss_cfg=LossConfig(loss_agg="token_sum_norm"), temperature=1.0,
                norm_constant=float(pairs), grad_clip=0.0)
    g_update = {n: p.grad.clone() for n, p in policy.named_parameters()}
    policy.zero_grad()
    seq = {}
    for mb in mbs:  # per-sequence log-prob sums under the policy, with gradient
        lp = policy(mb)[0]
        m = mb.targets != -100
        for j, uid in enumerate(mb.uids.tolist()):
            seq[uid] = (lp * (m & (mb.seq_ids == j))).sum()
    with torch.no_grad():
        ref_seq = {}
        for mb in mbs:
            m = mb.targets != -100
            for j, uid in enumerate(mb.uids.tolist()):
                ref_seq[uid] = (mb.ref_logprobs * (m & (mb.seq_ids == j))).sum()
    losses = []
    for c, r in zip(samples[::2], samples[1::2]):
        margin = (seq[c.uid] - ref_seq[c.uid]) - (seq[r.uid] - ref_seq[r.uid])
        losses.append(-torch.nn.functional.logsigmoid(beta * margin))
    loss = torch.stack(losses).mean()
    assert stats["dpo/loss"] == pytest.approx(loss.item(), rel=1e-5)
    margins = [(seq[c.uid] - ref_seq[c.uid] - seq[r.uid] + ref_seq[r.uid]).item() for c, r in zip(samples[::2], samples[1::2])]
    assert stats["dpo/margin"] == pytest.approx(sum(margins) / len(margins), rel=1e-4, abs=1e-6)
    assert stats["dpo/accuracy"] == sum(m > 0 for m in margins) / len(margins)
    loss.backward()
    for n, p in policy.named_parameters():  # fp32, summed in another order: ~1e-7 absolute noise on O(1e-2) grads
        torch.testing.assert_close(g_update[n], p.grad, rtol=1e-4, atol=1e-6)
    assert any(g.abs().max() > 0 for g in g_update.values())


def _dpo_samples(setting) -> list:
    """Four (expert, policy sample) pairs of one training question, with uids."""
    cfg, tok, task = setting
    engine = _Engine(tok, ["<think>b</think><answer>1+2</answer>", "<think>cc</think><answer>7*3</answer>"])
    samples = dpo_pairs(task.examples("train")[:1], engine=engine, tokenizer=tok, task=task, cfg=cfg, seed=0,
                        group_offset=0).samples
    for uid, s in enumerate(samples):
        s.uid = uid
    return samples


def test_dpo_loss_plan_writes_the_advantages_onto_the_samples(setting):
    """The samples carry the advantages DPO trains with (rollouts.jsonl logs them); they stayed 0.0 while only the
    micro-batches had the real ±beta·sigmoid(-beta·margin)."""
    cfg, tok, task = setting
    samples = _dpo_samples(setting)
    make = lambda seed: PolicyModel(build_embedded_model(tok, hidden_size=32, num_layers=1, num_heads=2,  # noqa: E731
                                                         num_kv_heads=1, intermediate_size=64, max_position=256,
                                                         seed=seed))
    mbs = plan_micro_batches(samples, max_tokens_per_micro_batch=160, world_size=1, rank=0)
    recompute_logprobs(make(0), mbs, temperature=1.0)
    recompute_logprobs(make(5), mbs, temperature=1.0, field="ref_logprobs")  # another reference: margins not 0
    # another aggregation configured: DPO's loss is still the token sum over the number of pairs
    r = SimpleNamespace(cfg=load_config(["--loss.loss_agg", "token_mean"]),
                        d=Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
    loss_cfg, plan = DpoMode().loss_plan(r, samples, [(mbs, 1.0)], {})
    assert loss_cfg.loss_agg == "token_sum_norm" and plan == [(mbs, 4.0)]
    trained = {}  # uid -> the advantage its tokens carry in the micro-batches
    for mb in mbs:
        m = mb.targets != -100
        for uid, a in zip(mb.uids[mb.seq_ids][m].tolist(), mb.advantages[m].tolist()):
            trained.setdefault(uid, set()).add(a)
    assert all(len(v) == 1 for v in trained.values()) and len(trained) == len(samples) == 8
    assert all((mb.advantages[mb.targets == -100] == 0).all() for mb in mbs)  # prompt positions carry nothing
    assert [s.advantage for s in samples] == pytest.approx([trained[s.uid].pop() for s in samples], rel=1e-6)
    for c, rej in zip(samples[::2], samples[1::2]):
        assert c.preference == 1 and c.advantage > 0 and rej.advantage == -c.advantage


def test_dpo_rounds_are_the_ones_the_run_started_with(tmp_path):
    """train.steps may change on resume; DPO's rounds are fixed at the run's first step and saved with its
    checkpoints. Recomputed from the new steps, a run of 10 steps in 2 rounds extended to 20 resumed at step 7 with
    the initial model as its reference instead of the round-2 one saved at step 5."""
    def cfg(steps, *extra):
        return load_config(["--train.mode", "dpo", "--dpo.rounds", "2", "--train.steps", str(steps),
                            "--train.output_dir", str(tmp_path), *extra])

    mode, r = DpoMode(), SimpleNamespace(cfg=cfg(10), mode_state={})
    mode.start_step(r, 0)  # the run's first step (no refresh there)
    ck = tmp_path / "checkpoints" / "step_000007"
    ck.mkdir(parents=True)
    (ck / "trainer_state.json").write_text(json.dumps({"step": 7, "mode_state": r.mode_state}))
    with pytest.raises(ValueError, match="missing"):  # a resume from the initial model would not be exact
        mode.reference_dir(cfg(10, "--resume"), ck)
    ref = tmp_path / "dpo_reference" / "step_000005"
    ref.mkdir(parents=True)
    (ref / "config.json").write_text("{}")
    assert mode.reference_dir(cfg(10, "--resume"), ck) == ref
    assert mode.reference_dir(cfg(20, "--resume"), ck) == ref  # extended: still round 2's reference
    assert mode.reference_dir(cfg(8, "--resume"), ck) == ref  # shortened likewise (recomputed: round 2 at 4)


class _RoundsTrainer:
    """What DpoMode.start_step reads."""

    def __init__(self, cfg, mode_state):
        self.cfg, self.mode_state = cfg, mode_state
        self.d = Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
        self.model, self.hf_model, self.tokenizer = torch.nn.Linear(1, 1), None, None
        self.loads = 0  # reference refreshes from the policy's weights
        self.ref_model = SimpleNamespace(load_state_dict=lambda state: setattr(self, "loads", self.loads + 1))


@pytest.fixture
def dpo_rounds(tmp_path, monkeypatch):
    """(config of a DPO run in tmp_path, runner of DpoMode.start_step over steps, checkpoint writer)."""
    from raro_fast.modes import dpo

    saved = []

    def save(hf_model, tokenizer, path, state_dict):
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text("{}")
        saved.append(int(path.name.removeprefix("step_")))

    monkeypatch.setattr(dpo, "save_pretrained_atomic", save)
    monkeypatch.setattr(dpo, "full_state_dict", lambda model: {})

    def cfg(steps, rounds, *extra):
        return load_config(["--train.mode", "dpo", "--dpo.rounds", str(rounds), "--train.steps", str(steps),
                            "--train.output_dir", str(tmp_path), *extra])

    def run(r, steps):
        """The steps among `steps` at which the reference is refreshed (and saved)."""
        saved.clear()
        for step in steps:
            dpo.DpoMode().start_step(r, step)
        return list(saved)

    def checkpoint(step, mode_state):
        path = tmp_path / "checkpoints" / f"step_{step:06d}"
        path.mkdir(parents=True)
        (path / "trainer_state.json").write_text(json.dumps({"step": step, "mode_state": mode_state}))
        return path

    return cfg, run, checkpoint


def test_dpo_makes_exactly_the_rounds_asked_for(dpo_rounds):
    """Round k starts at ceil(k·steps / rounds). A fixed length ceil(steps / rounds) made 10 steps in 6 rounds
    5 rounds of 2 (refreshes at 2, 4, 6, 8)."""
    cfg, run, checkpoint = dpo_rounds
    r = _RoundsTrainer(cfg(10, 6), {})
    assert run(r, range(10)) == [2, 4, 5, 7, 9]  # rounds [0,2) [2,4) [4,5) [5,7) [7,9) [9,10)
    assert r.loads == 5  # each saved reference is also the one the run trains against
    ck = checkpoint(6, r.mode_state)
    ref = lambda step: ck.parent.parent / "dpo_reference" / f"step_{step:06d}"  # noqa: E731
    assert DpoMode().reference_dir(cfg(10, 6, "--resume"), ck) == ref(5)
    # resumed at a round start: start_step refreshes the reference there, none was saved for it
    assert DpoMode().reference_dir(cfg(10, 6, "--resume"), checkpoint(7, r.mode_state)) is None
    # extended on resume: the split of the run's start goes on (round 7 starts at 10, round 8 at ceil(70 / 6) = 12)
    assert DpoMode().reference_dir(cfg(20, 6, "--resume"), ck) == ref(5)
    resumed = _RoundsTrainer(cfg(20, 6, "--resume"), json.loads(json.dumps(r.mode_state)))  # as saved
    assert run(resumed, range(6, 13)) == [7, 9, 10, 12]


@pytest.mark.parametrize("saved", [{"dpo_round_length": 2}, {}], ids=["kept_length", "before_any_kept"])
def test_a_dpo_run_saved_with_a_round_length_resumes_with_it(dpo_rounds, saved):
    """Checkpoints from before the rounds were exact kept a fixed length (or, older still, nothing: the length came
    from the config, ceil(10 / 6) = 2): they resume with the boundaries they ran with, 4 and 6 and 8, not 5 and 7."""
    cfg, run, checkpoint = dpo_rounds
    ck = checkpoint(5, saved)
    ref = ck.parent.parent / "dpo_reference" / "step_000004"  # saved by the run that wrote the checkpoint
    ref.mkdir(parents=True)
    (ref / "config.json").write_text("{}")
    assert DpoMode().reference_dir(cfg(10, 6, "--resume"), ck) == ref
    r = _RoundsTrainer(cfg(10, 6, "--resume"), dict(saved))
    assert run(r, range(5, 10)) == [6, 8]
    assert r.mode_state == {"dpo_round_length": 2}


def test_modes_sample_at_the_rollout_settings_and_rlvr_keeps_std_normalize(setting):
    """The run's temperature, top_p, length and seed reach the engine (a fixed seed would repeat every step's
    samples), and RLVR's advantages follow loss.std_normalize rather than the default."""
    _, tok, task = setting
    from raro_fast.rollout.engine import SamplingParams

    cfg = load_config(["--raro.group_size", "4", "--task.countdown.num_train", "30", "--task.countdown.num_heldout", "5",
                       "--rollout.temperature", "0.7", "--rollout.top_p", "0.9", "--rollout.max_new_tokens", "77",
                       "--loss.std_normalize", "true"])
    examples = task.examples("train")[:2]
    texts = [f"<think>a</think><answer>{examples[0].answer}</answer>", "<think>b</think><answer>1+2</answer>"] + \
            ["<think>c</think><answer>9</answer>"] * 2
    engine = _Engine(tok, texts)
    out = rlvr_rollouts(examples[:1], engine=engine, tokenizer=tok, task=task, cfg=cfg, seed=11)
    rationalization_samples(examples, engine=engine, tokenizer=tok, cfg=cfg, seed=12)
    assert engine.params == [SamplingParams(max_new_tokens=77, temperature=0.7, top_p=0.9, n=4, seed=11),
                             SamplingParams(max_new_tokens=77, temperature=0.7, top_p=0.9, n=1, seed=12)]
    # rewards 1, 0, 0, 0: mean 1/4, sample std 1/2 (hand-computed)
    assert [s.reward for s in out.samples] == [1.0, 0.0, 0.0, 0.0]
    assert [s.advantage for s in out.samples] == pytest.approx([1.5, -0.5, -0.5, -0.5], abs=1e-5)


def test_sampled_sequence_keeps_the_completions_tokens_logprobs_and_version():
    """The engine's log-probs must stay aligned with the completion tokens they were sampled with (the importance
    ratio and TIS read them), and the sampling temperature and reward must reach the sequence."""
    from raro_fast.modes.base import sampled_sequence
    from raro_fast.rollout.engine import Completion

    c = Completion(token_ids=[7, 8, 9], logprobs=[-0.5, -1.25, -2.0], finish_reason="stop", text="x",
                   weight_version=3, prompt_ids=[1, 2])
    s = sampled_sequence(c, advantage=-0.75, role="critic", group=5, weight=0.5, temperature=0.6, reward=0.25)
    assert (s.input_ids, s.prompt_len, s.rollout_logprobs) == ([1, 2, 7, 8, 9], 2, [-0.5, -1.25, -2.0])
    assert (s.advantage, s.role, s.group, s.loss_weight) == (-0.75, "critic", 5, 0.5)
    assert (s.weight_version, s.temperature, s.reward, s.uid) == (3, 0.6, 0.25, -1)


def test_rank_rollout_counts_generated_tokens_and_skips_missing_values():
    """Prompt tokens are not generated ones (rollout/generated_tokens feeds perf/rollout_tokens_per_s), and a None
    statistic (no data) must not count as a value in the step's mean."""
    from raro_fast.modes.base import RankRollout
    from raro_fast.rollout.engine import Completion

    c = lambda n: Completion(token_ids=[5] * n, logprobs=[0.0] * n, finish_reason="stop", text="", prompt_ids=[1] * 9)  # noqa: E731
    out = RankRollout()
    groups = [[c(3), c(4)], [c(6)]]
    assert out.generated(groups) is groups
    out.add("policy/answer_accuracy", None)
    out.add("policy/answer_accuracy", True)
    assert out.stats == {"rollout/generated_tokens": [13.0], "policy/answer_accuracy": [1.0]}


def test_each_modes_norm_constant_and_reference():
    """Dr.GRPO's constant is the planned sequences of a step times max_new_tokens: one per question for the
    supervised modes, group_size per question for the sampled ones, two (chosen, rejected) per sample for DPO. Only
    a KL anchor (or DPO) keeps a reference model."""
    from raro_fast.modes.rationalization import RationalizationMode
    from raro_fast.modes.rl_logit import RlLogitMode
    from raro_fast.modes.rlvr import RlvrMode
    from raro_fast.modes.sft import SftMode

    cfg = load_config(["--raro.questions_per_step", "3", "--raro.group_size", "4", "--rollout.max_new_tokens", "50"])
    constants = {m.name: m.role_constants(cfg)["policy"] for m in
                 (SftMode(), RationalizationMode(), RlvrMode(), RlLogitMode(), DpoMode())}
    assert constants == {"sft": 150.0, "rationalization": 150.0, "rlvr": 600.0, "rl_logit": 600.0, "dpo": 1200.0}
    assert not RlvrMode().needs_reference(cfg)
    assert RlvrMode().needs_reference(load_config(["--loss.kl_coef", "0.01"]))
    assert DpoMode().needs_reference(cfg)


def test_sft_samples_one_group_per_question_and_count_the_answer_tokens(setting):
    _, tok, task = setting
    examples = task.examples("train")[:3]
    out = sft_samples(examples, tokenizer=tok)
    assert [s.group for s in out.samples] == [0, 1, 2]
    assert out.stats["policy/response_length"] == [float(len(s.input_ids) - s.prompt_len) for s in out.samples]
    assert all(s.prompt_len < len(s.input_ids) for s in out.samples)


def test_sequence_sums_skip_a_padding_micro_batch(setting):
    """A rank with fewer micro-batches runs filler ones (uid -1): counted, their token would land on the last
    sequence or fail the index."""
    from raro_fast.modes.base import sequence_sums
    from raro_fast.packing import SequenceSample, _filler

    samples = [SequenceSample(input_ids=[3, 4, 5, 6], prompt_len=2, advantage=0.0, role="policy", group=0, uid=0,
                              old_logprobs=[-0.5, -1.5]),
               SequenceSample(input_ids=[3, 7, 8], prompt_len=1, advantage=0.0, role="policy", group=1, uid=1,
                              old_logprobs=[-2.0, -0.25])]
    mbs = plan_micro_batches(samples, max_tokens_per_micro_batch=64, world_size=1, rank=0)
    mbs.append(_filler(samples, num_sequences=mbs[0].num_sequences, num_tokens=mbs[0].num_tokens))
    sums, counts = sequence_sums(mbs, 2, ["old_logprobs", None], d=Dist(rank=0, world_size=1, local_rank=0,
                                                                        device=torch.device("cpu")))
    assert sums.tolist() == [-2.0, -2.25] and counts.tolist() == [2.0, 2.0]


def test_a_rationalization_whose_text_tokenizes_past_the_budget_falls_back_to_no_reasoning(setting):
    """The reasoning is trained as text tokenized again, and a text's tokens can outnumber the sampled ones (a lone
    UTF-8 continuation byte decodes to U+FFFD, three tokens here): 48 sampled tokens came back as 221 and the run
    stopped at packing, past the check at start (found by review on 2026-12-07). Such a reasoning falls back to none,
    counted, as an unclosed one does; one that fits is kept."""
    from dataclasses import replace

    cfg, tok, task = setting
    examples = task.examples("train")[:2]
    lone = tok.convert_tokens_to_ids("¡")  # byte 0xA1 alone: no character
    grown = [tok.convert_tokens_to_ids("<think>")] + [lone] * 45 + [tok.convert_tokens_to_ids("</think>")]

    class Grown(_Engine):
        def generate(self, prompt_list, params):
            outs = super().generate(prompt_list, params)
            first = outs[0][0]
            outs[0][0] = replace(first, token_ids=grown + [tok.eos_token_id], logprobs=[-0.1] * 48,
                                 text=tok.decode(grown))
            return outs

    engine = Grown(tok, ["<think>4 times 6</think><answer>whatever</answer>"])
    plain = rationalization_samples(examples, engine=engine, tokenizer=tok, cfg=cfg, seed=0)
    budget = max(len(s.input_ids) for s in plain.samples[1:]) + 48
    assert len(plain.samples[0].input_ids) > budget > len(grown) + 48  # it grew past what 48 tokens could take
    small = replace(cfg, train=replace(cfg.train, max_tokens_per_micro_batch=budget))
    out = rationalization_samples(examples, engine=engine, tokenizer=tok, cfg=small, seed=0)
    assert out.stats["rationalization/fallback_rate"] == [1.0, 0.0]
    texts = [tok.decode(s.input_ids[s.prompt_len :], skip_special_tokens=True) for s in out.samples]
    assert texts == [f"<think></think><answer>{examples[0].answer}</answer>",
                     f"<think>4 times 6</think><answer>{examples[1].answer}</answer>"]
    assert all(len(s.input_ids) <= budget for s in out.samples)
    # the model's positions bound it too, from the trainer's model where the engine does not say (SGLang's: review)
    exact = replace(cfg, train=replace(cfg.train, max_tokens_per_micro_batch=len(plain.samples[0].input_ids)))
    kept = rationalization_samples(examples, engine=engine, tokenizer=tok, cfg=exact, seed=0, positions=10**6)
    assert kept.stats["rationalization/fallback_rate"] == [0.0, 0.0]  # one that fills the budget exactly is kept
    roomy = rationalization_samples(examples, engine=engine, tokenizer=tok, cfg=small, seed=0, positions=10**6)
    assert roomy.stats["rationalization/fallback_rate"] == [1.0, 0.0]  # the smaller of positions and budget bounds
    positioned = rationalization_samples(examples, engine=engine, tokenizer=tok, cfg=cfg, seed=0, positions=budget)
    assert positioned.stats["rationalization/fallback_rate"] == [1.0, 0.0]
    assert [s.input_ids for s in positioned.samples] == [s.input_ids for s in out.samples]
    from types import SimpleNamespace

    from raro_fast.modes.rationalization import RationalizationMode

    trainer = SimpleNamespace(engine=engine, tokenizer=tok, cfg=cfg,
                              hf_model=SimpleNamespace(config=SimpleNamespace(max_position_embeddings=budget)))
    wired = RationalizationMode().rollouts(trainer, examples, step=0, seed=0)
    assert wired.stats["rationalization/fallback_rate"] == [1.0, 0.0]
    # and what packed training computes: a model's sliding attention window (found by review: the run stopped)
    windowed = rationalization_samples(examples, engine=engine, tokenizer=tok, cfg=cfg, seed=0, positions=10**6,
                                       packed_limit=budget)
    assert [s.input_ids for s in windowed.samples] == [s.input_ids for s in out.samples]
    trainer.hf_model.config = SimpleNamespace(max_position_embeddings=10**6, sliding_window=budget)
    wired = RationalizationMode().rollouts(trainer, examples, step=0, seed=0)
    assert wired.stats["rationalization/fallback_rate"] == [1.0, 0.0]


def test_rationalization_keeps_an_empty_or_unopened_reasoning(setting):
    """A reasoning that closes </think> is the model's own even when empty or when the text starts inside <think>
    (the opening tag in the prompt): only one that never closes is a fallback. The generated tokens are counted."""
    cfg, tok, task = setting
    examples = task.examples("train")[:4]
    texts = ["<think></think><answer>1</answer>", "</think><answer>2</answer>", "so 4*6</think><answer>x</answer>",
             "<think>  spaced\n</think><answer>3</answer>"]
    engine = _Engine(tok, texts)
    out = rationalization_samples(examples, engine=engine, tokenizer=tok, cfg=cfg, seed=0)
    trained = [tok.decode(s.input_ids[s.prompt_len :], skip_special_tokens=True) for s in out.samples]
    assert trained == [f"<think>{r}</think><answer>{ex.answer}</answer>" for r, ex in zip(["", "", "so 4*6", "spaced"], examples)]
    assert out.stats["rationalization/fallback_rate"] == [0.0] * 4
    # each scripted completion is its text's tokens and the end token
    assert out.stats["rollout/generated_tokens"] == [float(sum(len(tok(t, add_special_tokens=False)["input_ids"]) + 1
                                                               for t in texts))]


def test_no_examples_on_a_rank_asks_the_engine_for_nothing(setting):
    cfg, tok, task = setting
    engine = _Engine(tok, ["<think>a</think><answer>1</answer>"])
    outs = [rlvr_rollouts([], engine=engine, tokenizer=tok, task=task, cfg=cfg, seed=0),
            rationalization_samples([], engine=engine, tokenizer=tok, cfg=cfg, seed=0),
            rl_logit_rollouts([], engine=engine, tokenizer=tok, cfg=cfg, seed=0, group_offset=0),
            dpo_pairs([], engine=engine, tokenizer=tok, task=task, cfg=cfg, seed=0, group_offset=0)]
    assert engine.params == [] and all(not o.samples and not o.scoring and not o.stats for o in outs)


def test_a_dpo_run_saved_before_its_rounds_were_kept_and_extended_keeps_its_round_length(dpo_rounds):
    """Found by review: a checkpoint with no mode_state (before the rounds were kept) took its round length from
    this command's train.steps: a 4-step run of 2 rounds (length 2) extended to 8 steps on resume got length 4,
    trained step 3 against the initial model instead of the round's reference saved at step 2, and refreshed at 4
    only. Its length comes from the train.steps it was saved with."""
    from raro_fast.config import to_dict

    cfg, run, _ = dpo_rounds
    tmp = cfg(4, 2).train.output_dir
    ck = Path(tmp) / "checkpoints" / "step_000003"
    ck.mkdir(parents=True)
    state = {"step": 3, "config": to_dict(cfg(4, 2))}  # as saved before mode_state existed
    (ck / "trainer_state.json").write_text(json.dumps(state))
    ref = Path(tmp) / "dpo_reference" / "step_000002"
    ref.mkdir(parents=True)
    (ref / "config.json").write_text("{}")
    assert DpoMode().reference_dir(cfg(8, 2, "--resume"), ck) == ref
    kept = DpoMode().resumed_state(state)  # what setup hands the run
    assert kept == {"dpo_round_length": 2}
    assert run(_RoundsTrainer(cfg(8, 2, "--resume"), kept), range(3, 8)) == [4, 6]


def test_dpo_at_the_reference_has_zero_margins_and_needs_whole_pairs(setting):
    """Policy = reference (a round's first step): every margin is 0, so the loss is log 2, each advantage is
    ±beta/2, and no pair counts as won. A pair missing its rejected member is refused, not trained half."""
    cfg, tok, task = setting
    samples = _dpo_samples(setting)
    model = PolicyModel(build_embedded_model(tok, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                                             intermediate_size=64, max_position=256, seed=0))
    mbs = plan_micro_batches(samples, max_tokens_per_micro_batch=160, world_size=1, rank=0)
    recompute_logprobs(model, mbs, temperature=1.0)
    recompute_logprobs(model, mbs, temperature=1.0, field="ref_logprobs")
    d = Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    pairs, stats = dpo_advantages(samples, mbs, d=d, beta=0.3)
    assert pairs == 4 and stats["dpo/margin"] == 0.0 and stats["dpo/accuracy"] == 0.0
    assert stats["dpo/loss"] == pytest.approx(0.6931471805599453, rel=1e-9)
    assert [s.advantage for s in samples] == pytest.approx([0.15, -0.15] * 4, rel=1e-12)
    with pytest.raises(ValueError, match="exactly one chosen and one rejected"):
        dpo_advantages(samples[:-1] + [dataclasses.replace(samples[-1], preference=1)], mbs, d=d, beta=0.3)


def test_dpo_does_not_pair_the_expert_answer_against_its_own_spelling_with_spaces(setting):
    """An expert answer stored with surrounding whitespace (a dataset's) is still the answer the policy wrote:
    pairing them would push the policy away from the expert's own answer."""
    cfg, tok, task = setting
    from raro_fast.tasks.base import Example

    ex = task.examples("train")[0]
    padded = Example(id=ex.id, question=ex.question, answer=f" {ex.answer}\n", meta=ex.meta)
    engine = _Engine(tok, [f"<think>a</think><answer>{ex.answer}</answer>", "<think>b</think><answer>1+2</answer>"])
    out = dpo_pairs([padded], engine=engine, tokenizer=tok, task=task, cfg=cfg, seed=0, group_offset=0)
    assert out.stats["dpo/pair_rate"] == [0.0, 1.0, 0.0, 1.0]


def test_the_separator_the_model_wrote_after_think_is_kept_before_the_scored_answer():
    """In a byte-level BPE (SmolLM2's) `</think>\\n<answer>` is `... > Ċ < answer`: the expert answer was scored from
    a `<` right after the bare `>`, without the model's newline, about 10 nats that the same reasoning without a
    separator did not pay. Found by review on 2026-12-07."""
    from raro_fast.modes.rl_logit import separator_end

    vocab = ["<think>", "r", "</", "think", ">", "\n", " ", " <", "<", "answer", "><", "<eos>", "x", " x"]
    decode = lambda ids: "".join(vocab[i] for i in ids if vocab[i] != "<eos>")  # noqa: E731
    ids = lambda *words: [vocab.index(w) for w in words]  # noqa: E731
    expert = "<answer>7</answer><eos>"

    def scored_after(*words):
        tokens = ids(*words)
        n = separator_end(tokens, reasoning_prefix_length(tokens, decode), decode, expert)
        return decode(tokens[:n]), expert_continuation(decode(tokens[:n]), expert)

    # newline, space or both in tokens of their own: kept in the reasoning, the whole answer scored after them
    assert scored_after("<think>", "r", "</", "think", ">", "\n", "<", "answer") == ("<think>r</think>\n", expert)
    assert scored_after("<think>", "r", "</", "think", ">", "\n", " ", "<") == ("<think>r</think>\n ", expert)
    # a token that starts with whitespace holds the answer's start: spill, as `><` always was
    assert scored_after("<think>", "r", "</", "think", ">", " <", "answer") == ("<think>r</think> <",
                                                                              "answer>7</answer><eos>")
    assert scored_after("<think>", "r", "</", "think", "><", "answer") == ("<think>r</think><", "answer>7</answer><eos>")
    # no separator: as before; the end of turn is not a separator; text that is not the answer stays misaligned
    assert scored_after("<think>", "r", "</", "think", ">", "<", "answer") == ("<think>r</think>", expert)
    assert scored_after("<think>", "r", "</", "think", ">", "\n", "<eos>") == ("<think>r</think>\n", expert)
    assert scored_after("<think>", "r", "</", "think", ">", "\n", "x")[1] == expert  # x is what the model wrote next
    assert scored_after("<think>", "r", "</", "think", ">", " x") == ("<think>r</think>", expert)  # not the answer's start


def test_a_dpo_save_keeps_the_references_its_kept_checkpoints_resume_with_and_deletes_the_rest(tmp_path):
    """Rounds of 6 steps in 3 start at 0, 2 and 4. With checkpoints 4 and 5 kept, step 5's resume needs the round-3
    reference (step 4); step 4's is a round start (refreshed on resume) and round 2's (step 2) is needed by none, so
    deleted (mutation review: no unit test named which references stay)."""
    from raro_fast.modes.dpo import ROUND_SPLIT

    for name in ("checkpoints/step_000004", "checkpoints/step_000005", "checkpoints/.step_000006.tmp",
                 "dpo_reference/step_000002", "dpo_reference/step_000004"):
        (tmp_path / name).mkdir(parents=True)
    r = SimpleNamespace(cfg=SimpleNamespace(train=SimpleNamespace(output_dir=str(tmp_path))),
                        mode_state={ROUND_SPLIT: {"steps": 6, "rounds": 3}})
    DpoMode().saved(r)
    assert sorted(p.name for p in (tmp_path / "dpo_reference").iterdir()) == ["step_000004"]
    (tmp_path / "checkpoints" / "step_000005").rmdir()  # only step 4 left, a round start: nothing needed
    DpoMode().saved(r)
    assert sorted(p.name for p in (tmp_path / "dpo_reference").iterdir()) == []


@pytest.mark.parametrize("is_main", [True, False])
def test_a_save_calls_the_modes_saved_hook_on_rank_0_after_the_checkpoint_is_written(monkeypatch, is_main):
    """train.save is where DPO's old references get deleted: the hook runs after the checkpoint (and its pruning) is
    written, on rank 0 only (mutation review: the call could go with only an end-to-end DPO run noticing)."""
    from raro_fast import train

    events = []
    monkeypatch.setattr(train.checkpoint, "save_checkpoint", lambda *a, **k: events.append("checkpoint"))
    cfg = load_config(["--train.mode", "dpo"])
    sync = SimpleNamespace(sync=lambda: None)
    r = SimpleNamespace(cfg=cfg, replay=SimpleNamespace(state_dict=lambda: {}), data_sha256="", tokens_sha256={},
                        initial_weights_sha256="", initial_model_files_sha256="",
                        d=SimpleNamespace(world_size=1, is_main=is_main), mode_state={},
                        skipped_in_a_row=0, warned_uniform=False, log=sync, rollout_log=sync, model=None, hf_model=None,
                        tokenizer=None, optimizer=None, mode=SimpleNamespace(saved=lambda run: events.append("saved")))
    train.save(r, 4)
    assert events == (["checkpoint", "saved"] if is_main else ["checkpoint"])
