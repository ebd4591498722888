"""The RARO game on one rank with a scripted engine: pairing, verdict → rewards, over-length filtering, GRPO groups,
replay mixing and role weights are exactly as the method says."""
import json
import random
from dataclasses import replace
from types import SimpleNamespace

import pytest

from raro_fast import prompts
from raro_fast.config import load_config
from raro_fast.model.hf import load_project_tokenizer
from raro_fast.modes.raro import raro_rollouts
from raro_fast.replay import CriticPair
from raro_fast.rollout.engine import Completion, check_prompts
from raro_fast.tasks import make_task
from raro_fast.tasks.countdown import verify


class ScriptedEngine:
    """Policy: sample j of each question answers [expert, wrong, no tag, truncated][j % 4]. Critic, per `critic`:
    "verifier" (picks the correct answer, tie if both or neither are), "contrarian" (picks the policy's answer
    whenever it differs from the expert's, else tie), "ramble" (runs past its limit: truncated, no verdict), "ramble_half" (critic samples 0, 2, ... ramble,
    1, 3, ... answer as the verifier), "tie_cut" (says tie, then runs on past its limit: truncated with a tag that
    parses), or a fixed verdict text. Records each call's temperature, top_p and seed."""

    weight_version = 3

    def __init__(self, tokenizer, task, critic="verifier", no_tag_text="<think>no answer</think>"):
        self.tok, self.task, self.critic, self.no_tag_text = tokenizer, task, critic, no_tag_text
        self.by_question = {ex.question: ex for split in ("train", "heldout") for ex in task.examples(split)}
        self.calls = []
        self.generated_tokens = 0

    def _complete(self, prompt_ids, text, truncated=False):
        ids = self.tok(text, add_special_tokens=False)["input_ids"] + ([] if truncated else [self.tok.eos_token_id])
        self.generated_tokens += len(ids)
        return Completion(token_ids=ids, logprobs=[-0.5] * len(ids), finish_reason="length" if truncated else "stop",
                          text=text, weight_version=self.weight_version, prompt_ids=list(prompt_ids))

    def generate(self, prompt_list, params):
        if hasattr(self, "model"):  # as the real engines do: refuse what runs past the model's positions
            check_prompts(prompt_list, params, self.model.config)
        self.calls.append((len(prompt_list), params.n))
        self.temperatures = getattr(self, "temperatures", []) + [params.temperature]
        self.top_ps = getattr(self, "top_ps", []) + [params.top_p]
        self.seeds = getattr(self, "seeds", []) + [params.seed]
        out = []
        for p in prompt_list:
            text = self.tok.decode(p, skip_special_tokens=False)
            user = text.split("<|im_start|>user\n", 1)[1].split("<|im_end|>")[0]
            if "Answer 1:" in user:
                q, a1, a2 = (line.split(": ", 1)[1] for line in user.split("\n")[:3])
                ex = self.by_question[q]
                ok1, ok2 = (verify(ex.meta["numbers"], ex.meta["target"], a) for a in (a1, a2))
                right = "tie" if ok1 == ok2 else "1" if ok1 else "2"
                expert = "1" if a1 == ex.answer else "2"
                comps = []
                for k in range(params.n):
                    if self.critic == "ramble" or (self.critic == "ramble_half" and k % 2 == 0):
                        comps.append(self._complete(p, "<think>" + "and " * 20, truncated=True))
                        continue
                    if self.critic == "tie_cut":
                        comps.append(self._complete(p, "<think>x</think><answer>tie</answer> and " * 3, truncated=True))
                        continue
                    v = {"verifier": right, "ramble_half": right, "contrarian": "tie" if a1 == a2 else "2" if expert == "1" else "1"}.get(
                        self.critic, self.critic)
                    comps.append(self._complete(p, f"<think>x</think><answer>{v}</answer>"))
                out.append(comps)
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
                        comps.append(self._complete(p, self.no_tag_text))
                    else:
                        comps.append(self._complete(p, prompts.format_completion("t", ex.answer), truncated=True))
                out.append(comps)
        return out


@pytest.fixture(scope="module")
def setting():
    cfg = load_config(["--raro.group_size", "4", "--task.countdown.num_train", "30", "--task.countdown.num_heldout", "5"])
    tok = load_project_tokenizer()
    task = make_task(cfg.task)
    # Puzzles whose numbers do not happen to sum to the target (then the scripted "wrong" answer would be right).
    examples = [e for e in task.examples("train") if sum(e.meta["numbers"]) != e.meta["target"]][:3]
    return cfg, tok, task, examples


def play(cfg, tok, task, examples, critic="verifier", replay=(), fresh_cap=None, args=(), train_policy=True,
         no_tag_text="<think>no answer</think>", context=None, packed_limit=None, game_seed=0):
    """One rank's step of the game against the scripted engine; returns (rollout, replay sizes asked for)."""
    if args:
        cfg = load_config(["--raro.group_size", "4", "--task.countdown.num_train", "30", "--task.countdown.num_heldout",
                           "5", *args])
    asked = []

    def draw(n):
        asked.append(n)
        return list(replay)[:n]

    engine = ScriptedEngine(tok, task, critic=critic, no_tag_text=no_tag_text)
    if context is not None:
        engine.model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=context))
    out = raro_rollouts(examples, engine=engine, tokenizer=tok, task=task, cfg=cfg,
                        rng=random.Random(game_seed), seed=1, draw_replay=draw,
                        fresh_cap=None if fresh_cap is None else lambda judged: min(judged, fresh_cap),
                        train_policy=train_policy, packed_limit=packed_limit)
    out.engine_temperatures = engine.temperatures
    out.engine_generated_tokens = engine.generated_tokens
    out.engine_seeds = engine.seeds
    out.engine_top_ps = engine.top_ps
    out.engine_ns = [n for _, n in engine.calls]
    return out, asked


def by_role(out, role):
    return [s for s in out.samples if s.role == role]


def test_a_pair_the_critic_has_no_room_to_read_is_not_judged_and_its_answer_earns_0(setting):
    """A long policy answer beside a long expert answer made a critic prompt that, with the critic's reply, ran past
    the model's positions: the engine refused it and the run stopped mid-step (found by review). Such a pair is not
    judged now: its answer earns 0, as no answer does, nothing of it is replayed, and the step says how many."""
    cfg, tok, task, examples = setting
    policy_room = max(len(prompts.render_prompt(tok, prompts.policy_messages(e.question))) for e in examples)
    context = policy_room + cfg.rollout.max_new_tokens  # room for the policy, none for any critic prompt
    replay = [CriticPair("r", examples[0].question, "1+2", examples[0].answer)]
    out, _ = play(cfg, tok, task, examples, replay=replay, context=context)
    assert by_role(out, "critic") == [] and out.new_pairs == []
    assert out.stats["critic/unreadable_rate"] == [1.0] * (2 * len(examples))  # the expert's and the wrong answer
    assert {s.reward for s in by_role(out, "policy")} == {0.0}
    assert out.stats["critic/replay_pairs"] == [0]
    roomy, _ = play(cfg, tok, task, examples, replay=replay, context=4096)  # room for all: the game as before
    plain, _ = play(cfg, tok, task, examples, replay=replay)
    assert [s.reward for s in roomy.samples] == [s.reward for s in plain.samples]
    assert roomy.stats["critic/unreadable_rate"] == [0.0] * (2 * len(examples))


def test_rewards_groups_and_filtering_with_a_verifier_critic(setting):
    cfg, tok, task, examples = setting
    out, _ = play(cfg, tok, task, examples)
    rc = cfg.raro
    # Per question: expert answer → tie → tau_pol; wrong → critic picks expert → 0; no tag → 0; truncated → 0.
    rewards = [rc.tau_pol, 0.0, 0.0, 0.0]
    mean = sum(rewards) / 4
    policy = by_role(out, "policy")
    assert len(policy) == 3 * 3  # the truncated sample of each group is filtered out of the loss
    for i in range(3):
        advs = [s.advantage for s in policy if s.group == i]
        assert advs == pytest.approx([r - mean for r in rewards[:3]])
    assert all(s.loss_weight == rc.lambda_pol for s in policy)
    assert out.stats["reward/policy_mean"] == pytest.approx(rewards * 3)
    # Judged pairs: the two answered samples per question; the verdicts: tie for expert-vs-expert.
    assert len(out.new_pairs) == 6
    assert rc.critic_samples_per_pair == 4
    assert sum(out.stats["critic/tie_rate"]) == 3 * 4  # 3 tie pairs x 4 critic samples
    assert sum(out.stats["critic/accuracy"]) == 3 * 4  # the other 3 pairs: expert picked, every sample
    # Diagnostics: among decisive verdicts the critic is always right; it agrees with the verifier everywhere;
    # a right answer earns tau_pol and a wrong one 0.
    assert out.stats["critic/decisive_accuracy"] == [1.0] * 12
    assert out.stats["critic/oracle_agreement"] == [1.0] * 24
    assert out.stats["reward/policy_mean_correct"] == pytest.approx([rc.tau_pol] * 3)
    assert out.stats["reward/policy_mean_incorrect"] == [0.0] * 3
    critic = by_role(out, "critic")
    assert len(critic) == 6 * 4 and all(s.loss_weight == rc.lambda_crit for s in critic)
    # A verifier critic is consistent within a pair: every sample gets the same reward → zero advantage.
    assert all(s.advantage == 0 for s in critic)
    # Each GRPO group is one question's policy samples or one pair's verdicts, never both: the rollout log and the
    # cross-rank renumbering key on the number, so a shared one would merge a question with a pair.
    assert not {s.group for s in policy} & {s.group for s in critic}
    for s in out.samples:
        assert s.input_ids[: s.prompt_len] and len(s.rollout_logprobs) == s.num_targets


def test_fresh_pairs_put_the_expert_at_either_position(setting):
    # A critic that always says "1" picks whatever sits first, so the policy earns 1 exactly where its answer was
    # put first. With the expert always first, "always 1" would be a perfect critic that never reads the answers.
    cfg, tok, task, examples = setting
    out, _ = play(cfg, tok, task, examples, critic="1")
    rewards = out.stats["reward/policy_mean"]
    judged = [r for k, r in enumerate(rewards) if k % 4 in (0, 1)]  # samples 2 and 3 have no answer: not judged
    assert set(judged) == {0.0, 1.0} and len(judged) == 6
    # 4 verdicts per pair, pairs in the order judged: "1" is right exactly where the policy was not paid
    accuracy = out.stats["critic/accuracy"]
    assert [accuracy[4 * p: 4 * p + 4] for p in range(6)] == [[1.0 - r] * 4 for r in judged]


def test_replayed_pairs_put_the_expert_at_either_position(setting):
    # As for fresh pairs: a replayed pair is shown in a new random order, else "always 1" is right on every replay.
    cfg, tok, task, examples = setting
    ex = examples[0]
    replay = [CriticPair(ex.id, ex.question, "1+1", ex.answer)] * 30
    out, asked = play(cfg, tok, task, examples, critic="1", replay=replay, args=["--raro.replay_ratio", "0.75"])
    assert asked == [18]
    first_replayed = len(examples) + 6  # after the questions' groups and the 6 fresh pairs'
    groups = {}
    for s in by_role(out, "critic"):
        if s.group >= first_replayed:
            groups.setdefault(s.group, []).append(s.reward)
    assert len(groups) == 18
    # "1" earns the critic 1 where the expert sits first, 0 where it sits second; the same within a pair
    assert {tuple(r) for r in groups.values()} == {(1.0,) * 4, (0.0,) * 4}


def test_each_engine_call_of_a_step_gets_its_own_seed(setting):
    # A seed shared by two calls gives them one random stream: a replayed pair that is also a fresh one would get
    # verdicts copied from the fresh ones rather than new samples.
    cfg, tok, task, examples = setting
    out, _ = play(cfg, tok, task, examples, replay=[CriticPair("r", examples[0].question, "1+2", examples[0].answer)])
    assert out.engine_seeds == [1, 2, 3]  # play's seed 1: policy, fresh verdicts, replayed verdicts


def test_the_rollout_log_holds_each_trained_sequence_as_text_with_its_reward(setting, tmp_path):
    from types import SimpleNamespace

    from raro_fast.metrics import MetricsLog
    from raro_fast.train import log_rollouts

    cfg, tok, task, examples = setting
    out, _ = play(cfg, tok, task, examples, critic="ramble_half")
    run = SimpleNamespace(cfg=load_config(["--train.log_rollouts_every", "5"]), d=SimpleNamespace(is_main=True),
                          tokenizer=tok, rollout_log=MetricsLog(tmp_path / "rollouts.jsonl", enabled=True, resume_step=None))
    log_rollouts(run, out.samples, 4)  # not a logged step
    assert (tmp_path / "rollouts.jsonl").read_text() == ""
    log_rollouts(run, out.samples, 5)
    rows = [json.loads(line) for line in (tmp_path / "rollouts.jsonl").read_text().splitlines()]
    assert len(rows) == len(out.samples) and {r["step"] for r in rows} == {5}
    rc = cfg.raro
    policy = [r for r in rows if r["role"] == "policy"]
    for i, ex in enumerate(examples):
        group = [r for r in policy if r["group"] == i]
        assert [r["completion"] for r in group] == [prompts.format_completion("t", ex.answer) + tok.eos_token,
                                                    prompts.format_completion("t", "+".join(map(str, ex.meta["numbers"])))
                                                    + tok.eos_token, "<think>no answer</think>" + tok.eos_token]
        assert all(ex.question in r["prompt"] for r in group)
        # half the critic's verdicts ramble (invalid, not counted): the valid half decides
        assert [r["reward"] for r in group] == [rc.tau_pol, 0.0, 0.0]
    critic = [r for r in rows if r["role"] == "critic"]
    assert len(critic) == 6 * 4
    # the rambling half is truncated, in the loss with reward 0; the other half is right: 1, or tau_crit on a tie
    assert sorted({r["reward"] for r in critic}) == [0.0, rc.tau_crit, 1.0]
    assert all(r["completion"].startswith("<think>and and") for r in critic if r["reward"] == 0.0)
    for g in {r["group"] for r in critic}:
        members = [r for r in critic if r["group"] == g]
        mean = sum(r["reward"] for r in members) / len(members)
        assert [r["advantage"] for r in members] == pytest.approx([r["reward"] - mean for r in members], abs=1e-12)
        assert all("Answer 1: " in r["prompt"] and "Answer 2: " in r["prompt"] for r in members)


def test_group_numbers_name_one_group_of_the_step_across_ranks(setting, monkeypatch):
    # Found by review: each rank numbers its groups from 0, so in rollouts.jsonl group 0 was two ranks' questions.
    from types import SimpleNamespace

    from raro_fast import train
    from raro_fast.replay import ReplayBuffer

    cfg, tok, task, examples = setting
    parts = [play(cfg, tok, task, half, critic="ramble_half")[0] for half in (examples[:2], examples[2:])]
    before = [[s.group for s in p.samples] for p in parts]
    monkeypatch.setattr(train, "all_gather_objects", lambda d, obj: parts)
    samples, _, _ = train.gather_samples(SimpleNamespace(d=None, replay=ReplayBuffer(10)), parts[0], step=0)
    owner = {}
    for rank, p in enumerate(parts):
        for s in p.samples:
            assert owner.setdefault(s.group, rank) == rank  # no group number on two ranks
    first = max(before[0]) + 1
    assert [s.group for s in parts[0].samples] == before[0]  # rank 0's numbers are kept
    assert [s.group for s in parts[1].samples] == [g + first for g in before[1]]
    assert len(samples) == sum(len(b) for b in before)


def test_critic_trains_on_every_fresh_pair_plus_replay_at_the_ratio(setting):
    """Fix 3: all 6 fresh judged pairs are critic training pairs (not 4 of a fixed 8), and replay is asked for
    at replay_ratio of them: 0.5 → as many as fresh, 0.75 → three times as many; a cap bounds the fresh ones."""
    cfg, tok, task, examples = setting
    ex = examples[0]
    replay = [CriticPair(ex.id, ex.question, "1+1", ex.answer)] * 30
    out, asked = play(cfg, tok, task, examples, replay=replay)
    assert asked == [6] and out.stats["critic/fresh_pairs"] == [6] and out.stats["critic/replay_pairs"] == [6]
    assert len(by_role(out, "critic")) == (6 + 6) * 4
    out, asked = play(cfg, tok, task, examples, replay=replay, args=["--raro.replay_ratio", "0.75"])
    assert asked == [18] and len(by_role(out, "critic")) == (6 + 18) * 4
    out, asked = play(cfg, tok, task, examples, replay=replay, fresh_cap=4)
    assert asked == [4] and out.stats["critic/fresh_pairs"] == [4] and len(by_role(out, "critic")) == (4 + 4) * 4
    out, asked = play(cfg, tok, task, examples, replay=replay, args=["--raro.replay_ratio", "0"])
    assert asked == [0] and out.stats["critic/replay_pairs"] == [0]


def test_the_fresh_pair_cap_keeps_a_random_draw_and_the_critic_samples_its_own_count_at_the_nucleus(setting):
    """Found by mutation testing: a cap that kept the first pairs judged (the critic trained on question 0 only), a
    critic sampled `group_size` times instead of `critic_samples_per_pair`, and its calls at top_p 1 instead of
    rollout.top_p all passed the game's tests."""
    cfg, tok, task, examples = setting

    def pair_of(sample):  # the question and the two answers a critic sequence judged, in either order
        user = tok.decode(sample.input_ids[: sample.prompt_len]).split("<|im_start|>user\n", 1)[1]
        question, a1, a2 = (line.split(": ", 1)[1] for line in user.split("<|im_end|>")[0].split("\n")[:3])
        return question, frozenset((a1, a2))

    every = {pair_of(s) for s in by_role(play(cfg, tok, task, examples)[0], "critic")}
    assert len(every) == 6  # 3 questions: the expert's answer and a wrong one judged
    kept = [{pair_of(s) for s in by_role(play(cfg, tok, task, examples, fresh_cap=2, game_seed=g)[0], "critic")}
            for g in range(12)]
    assert all(len(k) == 2 for k in kept) and set().union(*kept) == every
    ex = examples[0]
    out, _ = play(cfg, tok, task, examples, replay=[CriticPair("r", ex.question, "1+2", ex.answer)] * 8,
                  args=["--raro.critic_samples_per_pair", "2", "--rollout.top_p", "0.9"])
    engine_calls = out.engine_seeds  # one per call: policy, fresh verdicts, replayed pairs
    assert len(engine_calls) == 3 and out.engine_top_ps == [0.9, 0.9, 0.9]
    assert out.engine_ns == [4, 2, 2] and len(by_role(out, "critic")) == (6 + 6) * 2


def test_replayed_pairs_get_critic_rollouts_and_tie_rewards(setting):
    cfg, tok, task, _ = setting
    ex = task.examples("train")[0]
    replay = [CriticPair(ex.id, ex.question, ex.answer, ex.answer), CriticPair(ex.id, ex.question, "1+1", ex.answer)]
    out, _ = play(cfg, tok, task, [ex], critic="tie", replay=replay, fresh_cap=0)
    critic = by_role(out, "critic")
    assert len(critic) == 0  # a cap of 0 fresh pairs asks for 0 replayed ones too
    out, _ = play(cfg, tok, task, [ex], critic="tie", replay=replay, fresh_cap=2)
    critic = by_role(out, "critic")
    assert len(critic) == (2 + 2) * 4 and out.stats["critic/replay_pairs"] == [2]
    assert out.stats["reward/critic_mean"] == pytest.approx([cfg.raro.tau_crit] * 16)
    # Every policy answer got a tie → tau_pol for the answered ones.
    assert out.stats["reward/policy_mean"] == pytest.approx([cfg.raro.tau_pol, cfg.raro.tau_pol, 0, 0])
    assert "critic/decisive_accuracy" not in out.stats  # no decisive verdict: no value, not a 0


def test_a_wrong_answer_that_breaks_the_critic_earns_nothing(setting):
    """Fix 2: half of each pair's critic samples ramble past their limit. A wrong answer used to earn tau_pol from
    each broken verdict (0.3 here, like half a tie); now only valid verdicts count (0: the expert is picked), and
    the rambling critic samples stay in the critic's loss with reward 0 (advantage -0.5 against the valid ones)."""
    cfg, tok, task, examples = setting
    rc = cfg.raro
    out, _ = play(cfg, tok, task, examples, critic="ramble_half")
    assert out.stats["reward/policy_mean"] == pytest.approx([rc.tau_pol, 0.0, 0.0, 0.0] * 3)
    assert out.stats["critic/invalid_rate"] == [1.0, 0.0] * 12
    critic = by_role(out, "critic")
    assert len(critic) == 6 * 4  # truncated critic samples kept
    # rewards per pair [0, 1, 0, 1] (wrong answer: expert picked) or [0, tau_crit, 0, tau_crit] (right: tie)
    tau = rc.tau_crit
    assert sorted(s.advantage for s in critic) == pytest.approx([-0.5] * 6 + [-tau / 2] * 6 + [tau / 2] * 6 + [0.5] * 6)
    # The old rule, kept behind a setting: tau_pol per broken verdict, truncated critic samples filtered.
    old, _ = play(cfg, tok, task, examples, critic="ramble_half", args=["--raro.invalid_verdicts", "tie"])
    assert old.stats["reward/policy_mean"] == pytest.approx([rc.tau_pol, rc.tau_pol / 2, 0.0, 0.0] * 3)
    assert len(by_role(old, "critic")) == 6 * 2


def test_std_normalize_reaches_both_roles_groups(setting):
    cfg, tok, task, examples = setting
    t, tc = cfg.raro.tau_pol, cfg.raro.tau_crit
    out, _ = play(cfg, tok, task, examples, critic="ramble_half", args=["--loss.std_normalize", "true"])
    # Policy rewards per question [t, 0, 0, 0]: mean t/4, sample std (n - 1) sqrt(3t^2/4 / 3) = t/2.
    sd = t / 2 + 1e-6
    for i in range(3):
        assert [s.advantage for s in by_role(out, "policy") if s.group == i] == pytest.approx(
            [(3 * t / 4) / sd, -(t / 4) / sd, -(t / 4) / sd])  # the truncated 4th is not in the loss
    # Critic rewards per pair [0, 1, 0, 1] or [0, tc, 0, tc]: deviations +-x/2, sample std x/sqrt(3).
    expected = []
    for x in (1.0, tc):
        a = (x / 2) / (x / 3 ** 0.5 + 1e-6)
        expected += [-a] * 6 + [a] * 6
    assert sorted(s.advantage for s in by_role(out, "critic")) == pytest.approx(sorted(expected))


def test_a_truncated_verdict_is_invalid_even_if_its_tag_parses(setting):
    # README: a truncated verdict does not count, whatever its text; a tag before the cut is still a reply that
    # ran past its limit, and paying for it would reward rambling on after the verdict.
    cfg, tok, task, examples = setting
    out, _ = play(cfg, tok, task, examples, critic="tie_cut")
    assert out.stats["critic/invalid_rate"] == [1.0] * 24
    assert out.stats["critic/tie_rate"] == [0.0] * 24
    assert out.stats["reward/policy_mean"] == [0.0, 0.0] * 3  # the judged answers have no valid verdict: no reward
    critic = by_role(out, "critic")
    assert len(critic) == 24 and {s.reward for s in critic} == {0.0}  # a tie would have paid tau_crit
    assert out.stats["reward/critic_mean"] == [0.0] * 24


def test_an_answer_whose_verdicts_are_all_invalid_gets_zero_advantage(setting):
    cfg, tok, task, examples = setting
    out, _ = play(cfg, tok, task, examples, critic="ramble")
    assert out.stats["reward/policy_mean"] == [0.0, 0.0] * 3  # only the unanswered samples have a reward
    # ... yet they stay in the loss (advantage 0), counted in its token normalisation like any trained sample
    assert len(by_role(out, "policy")) == 3 * 3
    assert all(s.advantage == 0 for s in by_role(out, "policy"))
    assert "reward/policy_mean_correct" not in out.stats and "critic/decisive_accuracy" not in out.stats
    old, _ = play(cfg, tok, task, examples, critic="ramble", args=["--raro.invalid_verdicts", "tie"])
    tau = cfg.raro.tau_pol
    assert [s.advantage for s in by_role(old, "policy")][:3] == pytest.approx([tau / 2, tau / 2, -tau / 2])


def test_oracle_critic_sets_the_policy_reward_and_the_model_critic_is_still_measured(setting):
    cfg, tok, task, examples = setting
    rc = cfg.raro
    model, _ = play(cfg, tok, task, examples, critic="contrarian")
    assert model.stats["reward/policy_mean"] == pytest.approx([rc.tau_pol, 1.0, 0.0, 0.0] * 3)  # fooled every time
    assert model.stats["reward/policy_mean_incorrect"] == [1.0] * 3  # a wrong answer earns more than a right one
    oracle, _ = play(cfg, tok, task, examples, critic="contrarian", args=["--raro.critic", "oracle"])
    assert oracle.stats["reward/policy_mean"] == pytest.approx([rc.tau_pol, 0.0, 0.0, 0.0] * 3)
    assert oracle.stats["critic/decisive_accuracy"] == [0.0] * 12  # the model critic's own verdicts
    assert sorted(oracle.stats["critic/oracle_agreement"]) == [0.0] * 12 + [1.0] * 12
    # and it is rewarded by them, as without the oracle: tie on the right answers, 0 for picking a wrong one
    assert sorted(oracle.stats["reward/critic_mean"]) == pytest.approx([0.0] * 12 + [rc.tau_crit] * 12)
    assert oracle.stats["reward/critic_mean"] == model.stats["reward/critic_mean"]
    # What the model critic would have paid right and wrong answers, not what the oracle paid: logged from the
    # oracle's, the gap read +0.6 for a critic fooled every time (found by review on 2026-12-07).
    for key in ("reward/policy_mean_correct", "reward/policy_mean_incorrect"):
        assert oracle.stats[key] == model.stats[key]


def test_no_verifier_no_accuracy(setting):
    """A task without a verifier reports no answer accuracy and no correct/incorrect rewards (null, not 0)."""
    cfg, tok, task, examples = setting

    class Unverified(type(task)):
        has_verifier = False

        def verify(self, example, answer):
            return None

    blind = Unverified(task.cfg)
    out, _ = play(cfg, tok, blind, examples)
    for key in ("policy/answer_accuracy", "reward/policy_mean_correct", "critic/oracle_agreement"):
        assert key not in out.stats
    assert len(out.stats["reward/policy_mean"]) == 12


@pytest.mark.parametrize("blank", ["<think>t</think><answer></answer>", "<think>t</think><answer> \n </answer>"])
def test_an_empty_answer_tag_is_no_answer_and_is_not_judged(setting, blank):
    """On a task whose answers are free text (the base class's parse, as Poetry's and DeepMath's), an empty tag
    used to be the answer "": the critic judged it against the expert, and a tie paid it tau_pol."""
    cfg, tok, task, examples = setting

    class FreeText(type(task)):
        has_verifier = False

        def extract_answer(self, completion):
            return prompts.parse_answer(completion)

        def verify(self, example, answer):
            return None

    out, _ = play(cfg, tok, FreeText(task.cfg), examples, critic="tie", no_tag_text=blank)
    assert len(out.new_pairs) == 2 * 3  # the expert's answer and the sum, per question; never ""
    assert all(p.policy_answer for p in out.new_pairs)
    assert out.stats["policy/answer_rate"] == [True, True, False, False] * 3
    # Every judged answer is called a tie (tau_pol); the blank one, like no tag, earns 0.
    assert out.stats["reward/policy_mean"] == pytest.approx([cfg.raro.tau_pol, cfg.raro.tau_pol, 0.0, 0.0] * 3)


@pytest.mark.parametrize("train_policy", [True, False])
def test_every_generated_token_is_counted_trained_or_not(setting, train_policy):
    """perf/rollout_tokens_per_s counted the trained sequences' tokens: not the truncated policy samples, nor any
    policy sample while the critic leads, nor the fresh pairs over the cap."""
    cfg, tok, task, examples = setting
    replay = [CriticPair("r", examples[0].question, "1+2", examples[0].answer)]
    out, _ = play(cfg, tok, task, examples, replay=replay, fresh_cap=2, train_policy=train_policy)
    trained = sum(s.num_targets for s in out.samples)
    policy, fresh_verdicts, replay_verdicts = out.stats["rollout/generated_tokens"]
    assert policy == sum(out.stats["policy/response_length"]) and replay_verdicts > 0
    assert policy + fresh_verdicts + replay_verdicts == out.engine_generated_tokens > trained


def test_critic_lead_steps_judge_the_policy_but_train_only_the_critic(setting):
    cfg, tok, task, examples = setting
    out, _ = play(cfg, tok, task, examples, train_policy=False)
    full, _ = play(cfg, tok, task, examples)
    assert by_role(out, "policy") == [] and len(by_role(out, "critic")) == len(by_role(full, "critic")) == 24
    assert out.stats == full.stats  # the same game, logged the same way


def mode_calls(monkeypatch, cfg, world_size, *, step=0, replay=None):
    """The arguments RaroMode.rollouts hands the game on each rank of `world_size` (the game itself not played)."""
    from types import SimpleNamespace

    from raro_fast.modes import raro as raro_mode
    from raro_fast.modes.base import RankRollout

    calls = []
    monkeypatch.setattr(raro_mode, "raro_rollouts", lambda examples, **kw: calls.append(kw) or RankRollout())
    for rank in range(world_size):
        run = SimpleNamespace(cfg=cfg, d=SimpleNamespace(rank=rank, world_size=world_size), engine=None,
                              tokenizer=None, task=None, replay=replay, hf_model=None)
        raro_mode.RaroMode().rollouts(run, [], step=step, seed=0)
    return calls


@pytest.mark.parametrize("cap,judged", [
    (5, [9, 9, 9]), (1, [3, 3]), (4, [5, 5]), (4, [4, 0]), (4, [1, 6]), (7, [0, 2, 9]), (10, [3, 2]), (3, [0, 0]),
    (9, [9]), (4, [9]),
])
def test_the_fresh_pair_cap_is_dealt_out_over_the_ranks_in_full(monkeypatch, cap, judged):
    """critic_pairs_per_step is over all ranks, dealt out once every rank's judged count is known (all-gathered),
    the same on every rank. Split evenly before, a rank with more judged pairs than its share dropped them while
    another's went unused: (4, [4, 0]) kept 2 pairs on two ranks where one rank keeps 4. Found by review on
    2026-12-07. 0: no cap."""
    from raro_fast.modes import raro as raro_mode

    monkeypatch.setattr(raro_mode, "all_gather_objects", lambda d, n: judged)
    cfg = load_config(["--raro.critic_pairs_per_step", str(cap)])
    for step in range(5):
        kept = [c["fresh_cap"](n) for c, n in zip(mode_calls(monkeypatch, cfg, len(judged), step=step), judged)]
        assert sum(kept) == min(cap, sum(judged)) and all(0 <= k <= n for k, n in zip(kept, judged))
        assert kept == [c["fresh_cap"](n) for c, n in zip(mode_calls(monkeypatch, cfg, len(judged), step=step), judged)]
    cfg = load_config(["--raro.critic_pairs_per_step", "0"])
    assert [c["fresh_cap"] for c in mode_calls(monkeypatch, cfg, 2)] == [None, None]


def test_the_fresh_pair_cap_keeps_every_pair_as_likely_whichever_rank_judged_it():
    """Equal shares kept a pair judged on a rank that judged 40 with probability 0.8, and one on a rank that judged
    128 with 0.25, where one rank keeps each with 64/168 = 0.38 (found by review on 2026-12-07)."""
    from raro_fast.modes.raro import deal_cap

    draws = [deal_cap(64, [40, 128], random.Random(i)) for i in range(2000)]
    for rank, n in enumerate((40, 128)):
        assert sum(d[rank] for d in draws) / (2000 * n) == pytest.approx(64 / 168, abs=0.01)
    assert deal_cap(64, [40, 20], random.Random(0)) == [40, 20] and deal_cap(5, [9], random.Random(0)) == [5]


def test_ranks_replay_disjoint_pairs_of_the_shared_buffer(monkeypatch):
    # The buffer is the same on every rank; only a generator seeded alike on every rank deals one shuffle out.
    from raro_fast.replay import ReplayBuffer

    from raro_fast.modes import raro as raro_mode

    buf = ReplayBuffer(8)
    buf.extend([CriticPair(f"id{i}", f"q{i}", f"a{i}", f"e{i}") for i in range(8)])
    # every rank's demand is gathered (a collective): a rank may take more than its fraction of the buffer, and
    # together they take min(demand, buffer) as one rank would (two ranks asking [6, 2] replayed [4, 2]: review)
    for demands, want in (([4, 4], [4, 4]), ([6, 2], [6, 2]), ([8, 0], [8, 0]), ([9, 3], None)):
        monkeypatch.setattr(raro_mode, "all_gather_objects", lambda d, n, demands=demands: demands)
        for step in range(3):
            calls = mode_calls(monkeypatch, load_config([]), 2, step=step, replay=buf)
            drawn = [c["draw_replay"](n) for c, n in zip(calls, demands)]
            assert sum(map(len, drawn)) == min(sum(demands), 8) and not set(drawn[0]) & set(drawn[1]), step
            if want is not None:
                assert [len(d) for d in drawn] == want


def test_a_rank_without_questions_still_takes_part_in_the_steps_collectives():
    """The fresh-pair cap and the replay draw all-gather every rank's count: a rank dealt no question calls both,
    in the game's order, or the others would wait for it until the timeout."""
    from raro_fast.modes.raro import raro_rollouts

    calls = []
    raro_rollouts([], engine=None, tokenizer=None, task=None, cfg=load_config([]), rng=random.Random(0), seed=0,
                  fresh_cap=lambda n: calls.append(("cap", n)) or 0,
                  draw_replay=lambda n: calls.append(("replay", n)) or [])
    assert calls == [("cap", 0), ("replay", 0)]


def test_the_critic_leads_for_exactly_critic_lead_steps(monkeypatch):
    cfg = load_config(["--raro.critic_lead_steps", "1"])
    assert [mode_calls(monkeypatch, cfg, 1, step=s)[0]["train_policy"] for s in (0, 1, 2)] == [False, True, True]
    assert mode_calls(monkeypatch, load_config([]), 1, step=0)[0]["train_policy"]  # 0: the policy trains at once


def test_the_critic_samples_at_its_own_temperature_and_its_sequences_say_so(setting):
    cfg, tok, task, examples = setting
    plain, _ = play(cfg, tok, task, examples, replay=[CriticPair("r", examples[0].question, "1+2", examples[0].answer)])
    assert plain.engine_temperatures == [1.0, 1.0, 1.0]  # policy, fresh verdicts, replayed pairs
    assert {s.temperature for s in plain.samples} == {None}  # one temperature: the run's, carried by none
    own, _ = play(cfg, tok, task, examples, args=("--rollout.temperature", "0.9", "--rollout.critic_temperature", "0.3"),
                  replay=[CriticPair("r", examples[0].question, "1+2", examples[0].answer)])
    assert own.engine_temperatures == [0.9, 0.3, 0.3]
    assert {s.temperature for s in by_role(own, "policy")} == {0.9}
    assert {s.temperature for s in by_role(own, "critic")} == {0.3}
    # everything else is the same game
    assert [s.advantage for s in own.samples] == [s.advantage for s in plain.samples]


def test_heldout_scores_average_samples_and_count_problems_with_any_right(setting):
    """avg@n is right answers / (problems x n), pass@n problems with any right, tournament@n problems whose critic
    tournament pick is right; greedy accuracy is n = 1. The scripted policy's samples are [right, wrong, no answer,
    truncated]: avg@4 = 1/4, avg@8 = 2/8, pass@4 = 1; a critic that checks picks the right one, a contrarian the
    wrong one (answers without a final answer are out of the bracket)."""
    import torch

    from raro_fast.distributed import Dist
    from raro_fast.evaluate import heldout_accuracy, heldout_scores

    cfg, tok, task, examples = setting
    d = Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    engine = ScriptedEngine(tok, task)
    common = dict(engine=engine, tokenizer=tok, task=task, max_new_tokens=40, temperature=1.0, seed=0, d=d)
    assert heldout_scores(examples, n=4, **common) == {"avg@n": 0.25, "pass@n": 1.0}
    assert heldout_scores(examples, n=8, **common) == {"avg@n": 0.25, "pass@n": 1.0}
    assert heldout_scores(examples, n=2, **common) == {"avg@n": 0.5, "pass@n": 1.0}  # [right, wrong]
    assert heldout_accuracy(examples, **common) == 1.0  # the first sample only
    assert engine.calls == [(len(examples), 4), (len(examples), 8), (len(examples), 2), (len(examples), 1)]
    for critic, picked in (("verifier", 1.0), ("contrarian", 0.0)):
        engine = ScriptedEngine(tok, task, critic=critic)
        scores = heldout_scores(examples, n=4, critic_max_new_tokens=40, **{**common, "engine": engine})
        assert scores == {"avg@n": 0.25, "pass@n": 1.0, "tournament@n": picked}, critic
    # The critic judges at its own temperature where one is set (as in training, rollout.critic_temperature).
    heldout_scores(examples, n=4, critic_max_new_tokens=40, critic_temperature=0.3, **{**common, "engine": engine})
    assert engine.temperatures[-2:] == [1.0, 0.3]  # the policy's samples, then the one round (two answers parse)
    # ... and both at the nucleus the rollouts use (rollout.top_p): it was always 1.0
    heldout_scores(examples, n=4, critic_max_new_tokens=40, top_p=0.9, **{**common, "engine": engine})
    assert engine.top_ps[-2:] == [0.9, 0.9]
    # Nothing held out: no accuracy at all (it was 0.0, logged and averaged as a real zero).
    assert heldout_scores([], n=4, **common) is None and heldout_accuracy([], **common) is None


def test_every_heldout_number_samples_at_the_rollouts_nucleus(setting):
    """A sampled evaluation (train.eval_temperature > 0) drew heldout_accuracy at top_p 1 and avg@n at
    rollout.top_p: two distributions logged side by side. Found by review on 2026-12-07."""
    from types import SimpleNamespace

    import torch

    from raro_fast.config import load_config
    from raro_fast.distributed import Dist
    from raro_fast.train import evaluate

    _, tok, task, examples = setting
    cfg = load_config(["--train.eval_temperature", "0.6", "--rollout.top_p", "0.9", "--train.eval_samples", "2",
                       "--train.eval_tournament", "false"])
    engine = ScriptedEngine(tok, task)
    run = SimpleNamespace(cfg=cfg, engine=engine, tokenizer=tok, task=task, eval_examples=examples,
                          d=Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
    record = evaluate(run, step=5)
    assert engine.calls == [(len(examples), 1), (len(examples), 2)]
    assert engine.top_ps == [0.9, 0.9] and engine.temperatures == [0.6, cfg.rollout.temperature]
    assert record["eval/heldout_accuracy"] == 1.0 and record["eval/heldout_avg_at_n"] == 0.5


def test_a_rank_without_questions_still_takes_part_in_dealing_the_cap(setting):
    """Dealing the fresh-pair cap is a collective: a rank with no question this step calls it too (with 0), or
    the ranks that have questions would wait for it forever."""
    cfg, tok, task, _ = setting
    asked = []
    out = raro_rollouts([], engine=None, tokenizer=tok, task=task, cfg=cfg, rng=random.Random(0), seed=1,
                        fresh_cap=lambda judged: asked.append(judged) or 0, draw_replay=lambda n: [])
    assert asked == [0] and out.samples == []


def _critic_prompt_lengths(tok, examples):
    """The critic prompt's tokens for each fresh pair the scripted engine's answers make, in the order judged."""
    lengths = []
    for ex in examples:
        for answer in (ex.answer, "+".join(map(str, ex.meta["numbers"]))):  # samples 0 and 1: expert, wrong
            both = {len(prompts.render_prompt(tok, prompts.critic_messages(ex.question, *order)))
                    for order in ((ex.answer, answer), (answer, ex.answer))}
            assert len(both) == 1  # either order: one length
            lengths += both
    return lengths


def test_a_critic_prompt_that_fills_the_context_exactly_is_judged_and_one_position_less_is_not(setting):
    """The bound of `readable` is the engine's: a prompt whose reply ends at the last position is judged (as
    check_prompts accepts it), and only the critic's max_new_tokens more than the prompt counts, not the prompt alone."""
    cfg, tok, task, examples = setting
    lengths = _critic_prompt_lengths(tok, examples)
    assert lengths == [132, 132, 135, 135, 135, 135]
    room = max(lengths) + cfg.rollout.critic_max_new_tokens
    exact, _ = play(cfg, tok, task, examples, context=room)
    plain, _ = play(cfg, tok, task, examples)
    assert exact.stats["critic/unreadable_rate"] == [0.0] * 6
    assert [s.reward for s in exact.samples] == [s.reward for s in plain.samples]
    short, _ = play(cfg, tok, task, examples, context=room - 1)  # the two longer questions' pairs no longer fit
    assert short.stats["critic/unreadable_rate"] == [0.0, 0.0, 1.0, 1.0, 1.0, 1.0]
    rc = cfg.raro
    assert short.stats["reward/policy_mean"] == [rc.tau_pol, 0.0, 0.0, 0.0] + [0.0] * 8
    assert len(short.new_pairs) == 2 and len(by_role(short, "critic")) == 2 * rc.critic_samples_per_pair


def test_a_critic_sequence_one_micro_batch_cannot_hold_is_not_judged(setting):
    """The micro-batch budget bounds a critic sequence as the positions do: one that could outgrow it (a long
    policy answer beside a long expert answer) stopped the run at packing, in whichever step first sampled it
    (found by review on 2026-12-07). A prompt whose longest reply fills the budget exactly is judged."""
    cfg, tok, task, examples = setting
    room = max(_critic_prompt_lengths(tok, examples)) + cfg.rollout.critic_max_new_tokens
    budget = lambda n: replace(cfg, train=replace(cfg.train, max_tokens_per_micro_batch=n))  # noqa: E731
    exact, _ = play(budget(room), tok, task, examples)
    plain, _ = play(cfg, tok, task, examples)
    assert exact.stats["critic/unreadable_rate"] == [0.0] * 6
    assert [s.reward for s in exact.samples] == [s.reward for s in plain.samples]
    short, _ = play(budget(room - 1), tok, task, examples, context=4096)  # the positions leave room: the budget does not
    assert short.stats["critic/unreadable_rate"] == [0.0, 0.0, 1.0, 1.0, 1.0, 1.0]
    assert len(short.new_pairs) == 2 and len(by_role(short, "critic")) == 2 * cfg.raro.critic_samples_per_pair
    # a replayed pair as well (a resume may have raised critic_max_new_tokens since it was stored)
    ex = examples[0]
    replay = [CriticPair("long", ex.question, "1+2" * 200, ex.answer), CriticPair("short", ex.question, "1+2", ex.answer)]
    out, _ = play(budget(room), tok, task, examples, replay=replay, context=10**6)
    assert out.stats["critic/replay_pairs"] == [1]


def test_a_critic_sequence_past_what_packed_training_computes_is_not_judged(setting, monkeypatch):
    """A model with a sliding attention window (Mistral, Phi-3, Gemma 3) or length-dependent rotary frequencies
    bounds a trained sequence as the budget does: a critic sequence past it stopped the run at the first update
    that met one (found by review). The mode hands the game the model's own limit."""
    from raro_fast.modes import raro as raro_mode

    cfg, tok, task, examples = setting
    room = max(_critic_prompt_lengths(tok, examples)) + cfg.rollout.critic_max_new_tokens
    exact, _ = play(cfg, tok, task, examples, packed_limit=room, context=10**6)
    assert exact.stats["critic/unreadable_rate"] == [0.0] * 6
    short, _ = play(cfg, tok, task, examples, packed_limit=room - 1, context=10**6)
    assert short.stats["critic/unreadable_rate"] == [0.0, 0.0, 1.0, 1.0, 1.0, 1.0]
    handed = []
    monkeypatch.setattr(raro_mode, "raro_rollouts", lambda *a, **k: handed.append(k["packed_limit"]))
    trainer = SimpleNamespace(cfg=cfg, d=SimpleNamespace(rank=0, world_size=1), engine=None, tokenizer=tok,
                              task=task, replay=None, hf_model=SimpleNamespace(config=SimpleNamespace(
                                  sliding_window=300, max_position_embeddings=4096)))
    raro_mode.RaroMode().rollouts(trainer, examples, step=0, seed=0)
    trainer.hf_model.config.sliding_window = None
    raro_mode.RaroMode().rollouts(trainer, examples, step=0, seed=0)
    assert handed == [300, None]


def test_a_replayed_pair_the_critic_has_no_room_to_read_is_not_replayed(setting):
    """A pair stored when it fitted may not fit now (a resume may have lengthened critic_max_new_tokens): it is left
    out of the replay, the others are judged, and the fresh pairs' unreadable_rate does not count it."""
    cfg, tok, task, examples = setting
    ex = examples[0]
    room = max(_critic_prompt_lengths(tok, examples)) + cfg.rollout.critic_max_new_tokens
    replay = [CriticPair("long", ex.question, "1+2" * 200, ex.answer), CriticPair("short", ex.question, "1+2", ex.answer)]
    out, asked = play(cfg, tok, task, examples, replay=replay, context=room)
    assert asked == [6]
    assert out.stats["critic/replay_pairs"] == [1] and out.stats["critic/unreadable_rate"] == [0.0] * 6
    assert len(by_role(out, "critic")) == (6 + 1) * cfg.raro.critic_samples_per_pair


def test_each_replayed_pair_is_rewarded_by_its_own_verdicts(setting):
    """The replayed pairs are shown in random orders, and each pair's verdicts are scored against its own order:
    a verifier critic is right on every replayed pair."""
    cfg, tok, task, examples = setting
    replay = [CriticPair(ex.id, ex.question, "+".join(map(str, ex.meta["numbers"])), ex.answer)
              for ex in examples for _ in range(2)]
    out, asked = play(cfg, tok, task, examples, replay=replay)
    assert asked == [6] and out.stats["critic/replay_pairs"] == [6]
    n = cfg.raro.critic_samples_per_pair
    replayed = [s for s in by_role(out, "critic") if s.group >= len(examples) + 6]
    assert len(replayed) == 6 * n
    assert {s.reward for s in replayed} == {1.0}  # the critic's reward for naming the expert's answer
