"""The RARO game on one rank with a scripted engine: pairing, verdict → rewards, over-length filtering, GRPO groups,
replay mixing and role weights are exactly as the method says."""
import random

import pytest

from raro_fast import prompts
from raro_fast.config import load_config
from raro_fast.model.hf import load_project_tokenizer
from raro_fast.raro import raro_rollouts
from raro_fast.replay import CriticPair
from raro_fast.rollout.engine import Completion
from raro_fast.tasks import make_task
from raro_fast.tasks.countdown import verify


class ScriptedEngine:
    """Policy: sample j of each question answers [expert, wrong, no tag, truncated][j % 4]. Critic: a verifier
    (picks the correct answer, tie if both or neither are), or a fixed verdict."""

    weight_version = 3

    def __init__(self, tokenizer, task, critic="verifier"):
        self.tok, self.task, self.critic = tokenizer, task, critic
        self.by_question = {ex.question: ex for split in ("train", "heldout") for ex in task.examples(split)}
        self.calls = []

    def _complete(self, prompt_ids, text, truncated=False):
        ids = self.tok(text, add_special_tokens=False)["input_ids"] + ([] if truncated else [self.tok.eos_token_id])
        return Completion(token_ids=ids, logprobs=[-0.5] * len(ids), finish_reason="length" if truncated else "stop",
                          text=text, weight_version=self.weight_version, prompt_ids=list(prompt_ids))

    def generate(self, prompt_list, params):
        self.calls.append((len(prompt_list), params.n))
        out = []
        for p in prompt_list:
            text = self.tok.decode(p, skip_special_tokens=False)
            user = text.split("<|im_start|>user\n", 1)[1].split("<|im_end|>")[0]
            if "Answer 1:" in user:
                q, a1, a2 = (line.split(": ", 1)[1] for line in user.split("\n")[:3])
                ex = self.by_question[q]
                ok1, ok2 = (verify(ex.meta["numbers"], ex.meta["target"], a) for a in (a1, a2))
                v = self.critic if self.critic != "verifier" else ("tie" if ok1 == ok2 else "1" if ok1 else "2")
                out.append([self._complete(p, f"<think>x</think><answer>{v}</answer>") for _ in range(params.n)])
            else:
                ex = self.by_question[user]
                comps = []
                for j in range(params.n):
                    kind = j % 4
                    if kind == 0:
                        comps.append(self._complete(p, prompts.format_completion("t", ex.answer)))
                    elif kind == 1:
                        comps.append(self._complete(p, prompts.format_completion("t", "+".join(map(str, ex.meta["numbers"])))))
                    elif kind == 2:
                        comps.append(self._complete(p, "<think>no answer</think>"))
                    else:
                        comps.append(self._complete(p, prompts.format_completion("t", ex.answer), truncated=True))
                out.append(comps)
        return out


@pytest.fixture(scope="module")
def setting():
    cfg = load_config(["--raro.group_size", "4", "--raro.critic_samples_per_pair", "2", "--task.countdown.num_train", "30",
                       "--task.countdown.num_heldout", "5"])
    return cfg, load_project_tokenizer(), make_task(cfg.task)


def test_rewards_groups_and_filtering_with_a_verifier_critic(setting):
    cfg, tok, task = setting
    examples = task.examples("train")[:3]
    # Skip puzzles whose numbers happen to sum to the target (then the "wrong" answer would be right).
    examples = [e for e in task.examples("train") if sum(e.meta["numbers"]) != 24][:3]
    eng = ScriptedEngine(tok, task)
    out = raro_rollouts(examples, [], engine=eng, tokenizer=tok, task=task, cfg=cfg, rng=random.Random(0), seed=1,
                        critic_fresh_pairs=4)
    rc = cfg.raro
    # Per question: expert answer → tie → tau_pol; wrong → critic picks expert → 0; no tag → 0; truncated → 0.
    rewards = [rc.tau_pol, 0.0, 0.0, 0.0]
    mean = sum(rewards) / 4
    policy = [s for s in out.samples if s.role == "policy"]
    assert len(policy) == 3 * 3  # the truncated sample of each group is filtered out of the loss
    for i in range(3):
        advs = [s.advantage for s in policy if s.group == i]
        assert advs == pytest.approx([r - mean for r in rewards[:3]])
    assert all(s.loss_weight == rc.lambda_pol for s in policy)
    assert out.stats["reward/policy_mean"] == pytest.approx(rewards * 3)
    # Judged pairs: the two answered samples per question; the critic verdicts: tie for expert-vs-expert.
    assert len(out.new_pairs) == 6
    assert sum(out.stats["critic/tie_rate"]) == 3 * 2  # 3 tie pairs x 2 critic samples
    assert sum(out.stats["critic/accuracy"]) == 3 * 2  # the other 3 pairs: expert picked, both samples
    critic = [s for s in out.samples if s.role == "critic"]
    assert len(critic) == 4 * 2 and all(s.loss_weight == rc.lambda_crit for s in critic)
    # A verifier critic is consistent within a pair: both samples get the same reward → zero advantage.
    assert all(s.advantage == 0 for s in critic)
    for s in out.samples:
        assert s.input_ids[: s.prompt_len] and len(s.rollout_logprobs) == s.num_targets


def test_replayed_pairs_get_critic_rollouts_and_tie_rewards(setting):
    cfg, tok, task = setting
    ex = task.examples("train")[0]
    replay = [CriticPair(ex.id, ex.question, ex.answer, ex.answer), CriticPair(ex.id, ex.question, "1+1", ex.answer)]
    eng = ScriptedEngine(tok, task, critic="tie")
    out = raro_rollouts([ex], replay, engine=eng, tokenizer=tok, task=task, cfg=cfg, rng=random.Random(1), seed=2,
                        critic_fresh_pairs=0)
    critic = [s for s in out.samples if s.role == "critic"]
    assert len(critic) == 2 * 2  # two replayed pairs, two critic samples each
    assert out.stats["critic/replay_pairs"] == [2]
    assert out.stats["reward/critic_mean"] == pytest.approx([cfg.raro.tau_crit] * 4)
    # Every policy answer got a tie → tau_pol for the answered ones.
    assert out.stats["reward/policy_mean"] == pytest.approx([cfg.raro.tau_pol, cfg.raro.tau_pol, 0, 0])


def test_unparseable_verdict_rule(setting):
    cfg, tok, task = setting
    ex = task.examples("train")[1]
    out = raro_rollouts([ex], [], engine=ScriptedEngine(tok, task, critic="maybe"), tokenizer=tok, task=task, cfg=cfg,
                        rng=random.Random(2), seed=3, critic_fresh_pairs=2)
    assert out.stats["critic/invalid_rate"] == [1.0] * 4
    assert out.stats["reward/policy_mean"][:2] == pytest.approx([cfg.raro.tau_pol] * 2)
    assert out.stats["reward/critic_mean"] == [0.0] * 4
