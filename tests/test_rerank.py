"""Critic reranking at test time: the tournament's bracket, position-bias and tie rules on scripted judges; one
judge (engine) call per round across all questions; rerank_report's numbers on a scripted engine; the evaluate
command end to end on a tiny embedded checkpoint."""
import json
import random
from collections import Counter

import pytest
import torch

from raro_fast import cli, evaluate, prompts
from raro_fast.evaluate import expand_short_flags, majority_index, rerank_report
from raro_fast.model.hf import build_embedded_model, load_project_tokenizer, save_pretrained_atomic
from raro_fast.rerank import batched_tournaments, critic_judge, tournament_pick
from raro_fast.rollout.engine import Completion
from raro_fast.tasks import get_task
from raro_fast.tasks.countdown import CountdownConfig


class RecordingJudge:
    """A judge from a rule on (answer_1, answer_2) to a verdict; records every call's matches."""

    def __init__(self, rule):
        self.rule = rule
        self.calls: list[list[tuple[str, str, str]]] = []

    def __call__(self, matches):
        self.calls.append(list(matches))
        return [self.rule(a1, a2) for _, a1, a2 in matches]


def prefer(best):
    return lambda a1, a2: "1" if a1 == best else "2" if a2 == best else "tie"


def prefer_higher(a1, a2):  # answers are decimal strings; never a tie between different answers
    return "1" if int(a1) > int(a2) else "2"


def shown_pairs(call, answers):
    """The (index, index) pairs a judge call saw, each sorted, for answers that are all distinct."""
    return sorted(tuple(sorted((answers.index(a1), answers.index(a2)))) for _, a1, a2 in call)


# ----------------------------------------------------------------------------------------------------------------
# The bracket.


@pytest.mark.parametrize("n", range(1, 10))
def test_a_judge_that_knows_the_right_answer_picks_it_from_every_position(n):
    for pos in range(n):
        answers = [f"wrong{i}" for i in range(n)]
        answers[pos] = "right"
        for seed in range(3):
            judge = RecordingJudge(prefer("right"))
            assert tournament_pick("q", answers, judge=judge, seed=seed) == pos
            # At most two calls a round: the matches, then the rematches of ties between two wrong answers.
            assert len(judge.calls) <= max(1, 2 * (n - 1).bit_length())


def test_bracket_pairs_neighbours_in_index_order_and_the_odd_one_out_gets_a_bye():
    answers = ["10", "11", "12", "13", "14"]
    judge = RecordingJudge(prefer_higher)
    assert tournament_pick("q", answers, judge=judge) == 4
    assert [shown_pairs(c, answers) for c in judge.calls] == [[(0, 1), (2, 3)], [(1, 3)], [(3, 4)]]
    judge = RecordingJudge(lambda a1, a2: "2" if prefer_higher(a1, a2) == "1" else "1")  # prefers the lower
    assert tournament_pick("q", answers, judge=judge) == 0
    assert [shown_pairs(c, answers) for c in judge.calls] == [[(0, 1), (2, 3)], [(0, 2)], [(0, 4)]]


def test_unparsed_answers_lose_without_a_match():
    judge = RecordingJudge(prefer("right"))
    assert tournament_pick("q", [None, "a", None], judge=judge) == 1
    assert tournament_pick("q", [None, None, None], judge=judge) == 0  # nothing parsed: index 0, no answer
    assert judge.calls == []
    assert tournament_pick("q", [None, "w", None, "right", None], judge=judge) == 3
    assert [[(a1, a2) for _, a1, a2 in c] for c in judge.calls] in ([[("w", "right")]], [[("right", "w")]])


def test_identical_answers_need_no_match():
    judge = RecordingJudge(prefer("x"))
    assert tournament_pick("q", ["x", "x", "x"], judge=judge) == 0 and judge.calls == []
    assert tournament_pick("q", ["y", "x", "x"], judge=judge) == 1  # (y, x) judged; then x vs x unjudged
    assert len(judge.calls) == 1 and len(judge.calls[0]) == 1


@pytest.mark.parametrize("verdict", ["tie", None, "maybe"])
def test_a_tie_or_invalid_verdict_is_rematched_swapped_then_the_lower_index_wins(verdict):
    for n in range(2, 10):
        answers = [str(100 + i) for i in range(n)]
        judge = RecordingJudge(lambda a1, a2: verdict)
        assert tournament_pick("q", answers, judge=judge, seed=n) == 0
        rounds = (n - 1).bit_length()
        assert len(judge.calls) == 2 * rounds
        for first, rematch in zip(judge.calls[::2], judge.calls[1::2]):
            assert rematch == [(q, a2, a1) for q, a1, a2 in first]


def test_a_tie_decided_by_the_rematch():
    seen = set()

    def tie_once(a1, a2):  # tie on first sight of a pair, then the answer shown first
        key = frozenset((a1, a2))
        if key in seen:
            return "1"
        seen.add(key)
        return "tie"

    judge = RecordingJudge(tie_once)
    pick = tournament_pick("q", ["a", "b"], judge=judge, seed=5)
    (_, first_shown_1, first_shown_2), = judge.calls[0]
    (_, rematch_1, _), = judge.calls[1]
    assert rematch_1 == first_shown_2 and ["a", "b"][pick] == first_shown_2 != first_shown_1


def test_position_bias_is_spread_by_a_seeded_fair_coin():
    always_1 = RecordingJudge(lambda a1, a2: "1")
    # Each match goes to the answer shown first: the pick of two is the one the coin put first.
    for seed in range(20):
        always_1.calls.clear()
        pick = tournament_pick("q", ["a", "b"], judge=always_1, seed=seed)
        assert ["a", "b"][pick] == always_1.calls[0][0][1]
    # A purely position-biased critic picks uniformly, not always the first sample (as a fixed order would).
    answers = [str(i) for i in range(8)]
    picks = Counter(tournament_pick("q", answers, judge=always_1, seed=s) for s in range(400))
    assert set(picks) == set(range(8)) and all(25 <= c <= 75 for c in picks.values()), picks  # 50 expected
    # Deterministic in the seed and the question, whether batched or alone; another seed, another draw.
    questions = [f"question {i}" for i in range(30)]
    batched = batched_tournaments(questions, [answers] * 30, always_1, seed=7)
    assert batched == [tournament_pick(q, answers, judge=always_1, seed=7) for q in questions]
    assert batched == batched_tournaments(questions, [answers] * 30, always_1, seed=7)
    assert batched != batched_tournaments(questions, [answers] * 30, always_1, seed=8)
    # Each question draws its own coins: one stream shared by all questions gave every question the same pick.
    assert len(set(batched)) > 1


def test_one_judge_call_per_round_across_all_questions():
    answer_lists = [[str(10 + i) for i in range(k)] for k in (9, 5, 2, 1)]
    judge = RecordingJudge(prefer_higher)
    assert batched_tournaments(["a", "b", "c", "d"], answer_lists, judge) == [8, 4, 1, 0]
    # Rounds: 9 → 5 → 3 → 2 → 1, 5 → 3 → 2 → 1, 2 → 1, and 1 plays none:
    # 4 calls holding 4+2+1, 2+1, 1+1 and 1 matches.
    assert [len(c) for c in judge.calls] == [7, 3, 2, 1]
    assert [sorted({q for q, _, _ in c}) for c in judge.calls] == [["a", "b", "c"], ["a", "b"], ["a", "b"], ["a"]]


def test_bad_tournament_inputs():
    judge = RecordingJudge(prefer("x"))
    with pytest.raises(ValueError, match="2 questions but 1 answer lists"):
        batched_tournaments(["a", "b"], [["x"]], judge)
    with pytest.raises(ValueError, match="question 1 has no answers"):
        batched_tournaments(["a", "b"], [["x"], []], judge)
    with pytest.raises(ValueError, match="1 verdicts for 2 matches"):
        batched_tournaments(["a"], [["1", "2", "3", "4"]], lambda matches: ["1"])


# ----------------------------------------------------------------------------------------------------------------
# Through an engine: the critic prompt, one generate call per round, and rerank_report's numbers.


@pytest.fixture(scope="module")
def tok():
    return load_project_tokenizer()


@pytest.fixture(scope="module")
def task():
    return get_task("countdown", CountdownConfig(num_train=10, num_heldout=8))


def _user_text(tok, prompt_ids):
    text = tok.decode(prompt_ids, skip_special_tokens=False)
    return text.split("<|im_start|>user\n", 1)[1].split("<|im_end|>")[0]


class ScriptedEngine:
    """Policy: the scripted (text, truncated) samples of each question. Critic: `critic(question, a1, a2)`."""

    weight_version = 0

    def __init__(self, tok, policy_script=None, critic=None):
        self.tok, self.policy_script, self.critic = tok, policy_script or {}, critic
        self.calls = []  # (number of prompts, params) per generate call

    def _completion(self, prompt_ids, text, truncated=False):
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        return Completion(token_ids=ids, logprobs=[0.0] * len(ids), finish_reason="length" if truncated else "stop",
                          text=text, prompt_ids=list(prompt_ids))

    def generate(self, prompt_list, params):
        self.calls.append((len(prompt_list), params))
        out = []
        for p in prompt_list:
            user = _user_text(self.tok, p)
            if "\nAnswer 1: " in user:
                q, a1, a2 = (line.split(": ", 1)[1] for line in user.split("\n")[:3])
                out.append([self._completion(p, prompts.format_completion("x", self.critic(q, a1, a2)))] * params.n)
            else:
                script = self.policy_script[user]
                assert len(script) == params.n
                out.append([self._completion(p, text, truncated) for text, truncated in script])
        return out


def test_critic_judge_makes_one_engine_call_per_round(tok):
    answer_lists = [[str(10 + i) for i in range(k)] for k in (9, 5, 2, 1)]
    engine = ScriptedEngine(tok, critic=lambda q, a1, a2: prefer_higher(a1, a2))
    judge = critic_judge(engine, tok, max_new_tokens=17, temperature=0.5, seed=40, top_p=0.9)
    assert batched_tournaments(["a", "b", "c", "d"], answer_lists, judge) == [8, 4, 1, 0]
    assert [size for size, _ in engine.calls] == [7, 3, 2, 1]
    assert [(p.n, p.max_new_tokens, p.temperature, p.top_p, p.seed) for _, p in engine.calls] == [
        (1, 17, 0.5, 0.9, 40 + i) for i in range(4)]
    # A truncated or unparseable critic output is an invalid verdict.
    engine = ScriptedEngine(tok, critic=lambda q, a1, a2: "3")
    assert critic_judge(engine, tok, max_new_tokens=8, temperature=1.0, seed=0)([("q", "a", "b")]) == [None]

    class CutOff(ScriptedEngine):  # the verdict tag is complete, but the critic hit max_new_tokens after it
        def _completion(self, prompt_ids, text, truncated=False):
            return super()._completion(prompt_ids, text, truncated=True)

    engine = CutOff(tok, critic=lambda q, a1, a2: "1")
    assert critic_judge(engine, tok, max_new_tokens=8, temperature=1.0, seed=0)([("q", "a", "b")]) == [None]


def _bounded_engine(tok):
    """A scripted critic preferring the higher answer, whose engine refuses what runs past its model's positions
    (set them with `engine.model.config.max_position_embeddings`), as the real engines do."""
    from types import SimpleNamespace

    from raro_fast.rollout.engine import check_prompts

    class Bounded(ScriptedEngine):
        model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=0))

        def generate(self, prompt_list, params):
            check_prompts(prompt_list, params, self.model.config)
            return super().generate(prompt_list, params)

    return Bounded(tok, critic=lambda q, a1, a2: prefer_higher(a1, a2))


def test_a_match_the_critic_has_no_room_to_judge_is_invalid_and_others_are_judged(tok):
    """Two long answers made a critic prompt that, with the reply, ran past the model's positions: the engine's
    refusal stopped the evaluation (found by review). That match is an invalid verdict; the others are judged."""
    engine = _bounded_engine(tok)
    matches = [("q", "1", "2"), ("q", "1" * 60, "2" * 60), ("q", "3", "2")]
    short = len(prompts.render_prompt(tok, prompts.critic_messages("q", "3", "2")))
    engine.model.config.max_position_embeddings = short + 8  # room for the short matches' replies only
    assert critic_judge(engine, tok, max_new_tokens=8, temperature=1.0, seed=0)(matches) == ["2", None, "1"]
    assert [size for size, _ in engine.calls] == [2]
    engine.model.config.max_position_embeddings = 1  # room for none: no engine call at all
    assert critic_judge(engine, tok, max_new_tokens=8, temperature=1.0, seed=0)(matches) == [None] * 3
    assert [size for size, _ in engine.calls] == [2]


def test_majority_index():
    assert majority_index([None, 0, 1, 1, 0]) == 1  # classes 0 and 1 both twice: 0 occurs first
    assert majority_index([0, None, 1, 1]) == 2
    assert majority_index([None, None]) is None
    assert majority_index([3]) == 0


def test_majority_vote_counts_equal_answers_together(tok):
    """DeepMath's 1/2, 0.5 and \\frac{1}{2} are one answer: three votes, against two for 3 (by their text, 3 won)."""
    from raro_fast.tasks.deepmath import DeepMathConfig

    task = get_task("deepmath", DeepMathConfig())
    ex = task.examples("heldout")[0]
    ex = type(ex)(id="half", question=ex.question, answer="\\frac{1}{2}")
    answers = ["3", "1/2", "0.5", "3", "\\frac{1}{2}"]
    engine = ScriptedEngine(tok, {ex.question: [(prompts.format_completion("t", a), False) for a in answers]})
    report = rerank_report([ex], engine=engine, tokenizer=tok, task=task, n=5, max_new_tokens=32, temperature=1.0,
                           top_p=1.0, critic_max_new_tokens=8, seed=0, rerank="none")
    assert report["per_question"][0]["majority"] == 1
    assert report["counts"]["majority_correct"] == 1


def _constructed(task):
    """Four problems, four samples each, with known correctness (W* wrong, R right, R2 right and different)."""
    exs = task.examples("heldout")[:4]
    right = [ex.answer for ex in exs]

    def s(answer, truncated=False):
        return (prompts.format_completion("t", answer), truncated)

    no_tag = ("<think>no answer</think>", False)
    scripts = [
        [s("1+1"), s(right[0]), s("1+1"), s(right[0], truncated=True)],  # majority wrong, tournament right
        [s(right[1]), s(right[1]), s("1+2"), no_tag],                    # all methods right
        [no_tag, s("1+3"), s("1+4"), s("1+3")],                          # nothing right
        [s("1+5"), s(right[3]), s("1+6"), s(f"({right[3]})")],            # R and (R) are one answer: two votes
    ]
    return exs, {ex.question: sc for ex, sc in zip(exs, scripts)}


def test_rerank_report_exact_numbers(tok, task):
    exs, scripts = _constructed(task)
    by_question = {ex.question: ex for ex in exs}

    def verifier_critic(q, a1, a2):  # the better answer; tie when both or neither are right
        ok1, ok2 = (task.verify(by_question[q], a) for a in (a1, a2))
        return "tie" if ok1 == ok2 else "1" if ok1 else "2"

    engine = ScriptedEngine(tok, scripts, verifier_critic)
    report = rerank_report(exs, engine=engine, tokenizer=tok, task=task, n=4, max_new_tokens=32, temperature=1.0,
                           top_p=1.0, critic_max_new_tokens=16, seed=3)
    assert report["accuracy"] == pytest.approx(
        {"pass@1": 1 / 4, "avg@n": (1 / 4 + 2 / 4 + 0 + 2 / 4) / 4, "majority@n": 2 / 4, "tournament@n": 3 / 4,
         "pass@n": 3 / 4})
    assert report["counts"] == {"questions": 4, "samples": 16, "no_answer": 3, "correct_samples": 5, "first_correct": 1,
                                "majority_correct": 2, "tournament_correct": 3, "any_correct": 3}
    assert [q["tournament"] for q in report["per_question"]] == [1, 0, 1, 1]
    assert [q["majority"] for q in report["per_question"]] == [0, 0, 1, 1]
    # Round 1: four matches, the B-vs-C tie rematched; round 2: three matches, the R-vs-(R) tie rematched.
    assert report["critic"] == {"judge_calls": 4, "matches": 9, "tie_or_invalid": 4}
    assert [size for size, _ in engine.calls] == [4, 4, 1, 3, 1]
    assert engine.calls[0][1].n == 4 and engine.calls[1][1].n == 1 and engine.calls[1][1].max_new_tokens == 16
    # the policy samples at the seed, the critic's judge calls at seed + 1, seed + 2, ... (a critic at the policy's
    # own seed would draw the same random stream as the samples it judges)
    assert [p.seed for _, p in engine.calls] == [3, 4, 5, 6, 7]

    plain = ScriptedEngine(tok, scripts, verifier_critic)
    report_none = rerank_report(exs, engine=plain, tokenizer=tok, task=task, n=4, max_new_tokens=32, temperature=1.0,
                                top_p=1.0, critic_max_new_tokens=16, seed=3, rerank="none")
    assert report_none["accuracy"]["tournament@n"] is None and report_none["critic"] is None and len(plain.calls) == 1
    assert {k: v for k, v in report_none["accuracy"].items() if k != "tournament@n"} == pytest.approx(
        {k: v for k, v in report["accuracy"].items() if k != "tournament@n"})
    table = evaluate.markdown(report)
    assert "| critic tournament of 4 (tournament@4) | 0.750 | 3/4 |" in table
    assert "| mean of 4 samples (avg@4) | 0.312 | 5/16 samples |" in table
    assert "tournament" not in evaluate.markdown(report_none)
    with pytest.raises(ValueError, match="rerank must be one of"):
        rerank_report(exs, engine=plain, tokenizer=tok, task=task, n=4, max_new_tokens=32, temperature=1.0, top_p=1.0,
                      critic_max_new_tokens=16, seed=3, rerank="best")


def test_heldout_scores_count_problems_not_first_samples(tok, task):
    """pass@n is the share of problems with any right sample (not the first sample's accuracy), tournament@n the
    share of all problems whose pick is right (not of the solved ones): on two problems whose right sample is the
    second of [wrong, right, no answer, truncated right] and two with nothing right, both are 2/4."""
    from raro_fast.distributed import Dist
    from raro_fast.evaluate import heldout_scores

    exs = task.examples("heldout")[:4]
    by_question = {ex.question: ex for ex in exs}

    def s(answer, truncated=False):
        return (prompts.format_completion("t", answer), truncated)

    no_tag = ("<think>no answer</think>", False)
    scripts = {exs[0].question: [s("1+1"), s(exs[0].answer), no_tag, s(exs[0].answer, truncated=True)],
               exs[1].question: [s("1+2"), s(exs[1].answer), no_tag, s(exs[1].answer, truncated=True)],
               exs[2].question: [s("1+3"), s("1+4"), s("1+5"), s("1+6")],
               exs[3].question: [s("2+3"), s("2+4"), s("2+5"), s("2+6")]}

    def verifier_critic(q, a1, a2):
        ok1, ok2 = (task.verify(by_question[q], a) for a in (a1, a2))
        return "tie" if ok1 == ok2 else "1" if ok1 else "2"

    d = Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    scores = heldout_scores(exs, engine=ScriptedEngine(tok, scripts, verifier_critic), tokenizer=tok, task=task, n=4,
                            max_new_tokens=32, temperature=1.0, seed=0, d=d, critic_max_new_tokens=16)
    # 2 right samples of 16; a truncated sample is not right, even with the right answer in it
    assert scores == {"avg@n": 2 / 16, "pass@n": 0.5, "tournament@n": 0.5}


# ----------------------------------------------------------------------------------------------------------------
# The command, end to end on CPU.


@pytest.fixture(scope="module")
def answering_model(tmp_path_factory, tok):
    """A tiny embedded model taught, in a few seconds, to answer in format: on the first held-out problems either
    the expert's answer or a wrong one, and as critic a random verdict. Random weights would never close an
    <answer> tag, and the tournament would have nothing to judge."""
    task = get_task("countdown", CountdownConfig(num_train=10, num_heldout=4))
    exs = task.examples("heldout")
    rng = random.Random(0)
    sequences = []
    for i in range(96):
        ex = exs[i % len(exs)]
        wrong = "+".join(map(str, rng.sample(ex.meta["numbers"], len(ex.meta["numbers"]))))
        if i % 3 == 2:
            messages = prompts.critic_messages(ex.question, ex.answer, wrong)
            completion = prompts.format_completion("", rng.choice(["1", "2", "tie"]))
        else:
            messages = prompts.policy_messages(ex.question)
            completion = prompts.format_completion("", ex.answer if rng.random() < 0.5 else wrong)
        prompt_ids = prompts.render_prompt(tok, messages)
        completion_ids = tok(completion + tok.eos_token, add_special_tokens=False)["input_ids"]
        sequences.append((prompt_ids + completion_ids, len(prompt_ids)))
    model = build_embedded_model(tok, hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=128,
                                 max_position=256, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    # One thread: these tiny steps are dispatch-bound, and two threads per process stall badly when other test
    # processes share the two cores (also the same float sums on every machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _teach(model, optimizer, sequences, tok.pad_token_id, steps=100)
    finally:
        torch.set_num_threads(threads)
    path = tmp_path_factory.mktemp("models") / "answering"
    save_pretrained_atomic(model.eval(), tok, path)
    return path


def _teach(model, optimizer, sequences, pad_token_id, *, steps):
    """Next-token training on the completions of (token ids, prompt length) sequences, 16 per step."""
    torch.manual_seed(0)
    model.train()
    for step in range(steps):
        batch = [sequences[(step * 16 + j) % len(sequences)] for j in range(16)]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((len(batch), width), pad_token_id)
        labels = torch.full((len(batch), width), -100)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for j, (ids, prompt_len) in enumerate(batch):
            input_ids[j, : len(ids)] = torch.tensor(ids)
            labels[j, prompt_len : len(ids)] = torch.tensor(ids[prompt_len:])
            mask[j, : len(ids)] = 1
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _args(model, out, *extra):
    return ["--model", str(model), "--n", "4", "--task", "countdown", "--task.countdown.num_train", "10", "--task.countdown.num_heldout",
            "4", "--eval.max_new_tokens", "24", "--eval.critic_max_new_tokens", "16", "--output-dir", str(out), *extra]


def test_evaluate_command_end_to_end(answering_model, tmp_path, capsys, task):
    out = tmp_path / "tournament"
    assert cli.main(["evaluate", *_args(answering_model, out, "--rerank", "tournament")]) == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report) == {"model", "task", "split", "n", "rerank", "accuracy", "counts", "critic", "timing_s",
                           "per_question", "config"}
    assert set(report["accuracy"]) == {"pass@1", "avg@n", "majority@n", "tournament@n", "pass@n"}
    assert report["n"] == 4 and report["config"]["eval"]["rerank"] == "tournament" and len(report["per_question"]) == 4
    # The counts are those of the recorded answers, rechecked here with the verifier.
    exs = {ex.id: ex for ex in get_task("countdown", CountdownConfig(num_train=10, num_heldout=4)).examples("heldout")}
    per = report["per_question"]
    correct = [[task.verify(exs[q["id"]], a) for a in q["answers"]] for q in per]
    assert correct == [q["correct"] for q in per]
    counts = report["counts"]
    assert counts["correct_samples"] == sum(map(sum, correct)) and counts["any_correct"] == sum(map(any, correct))
    assert counts["tournament_correct"] == sum(c[q["tournament"]] for q, c in zip(per, correct))
    assert counts["no_answer"] == sum(a is None for q in per for a in q["answers"]) < 16
    for q in per:  # the pick is a parsed answer whenever there is one
        picked = q["answers"][q["tournament"]]
        assert picked is not None or set(q["answers"]) == {None}
    assert report["critic"]["matches"] > 0 and report["critic"]["judge_calls"] >= 1
    acc = report["accuracy"]
    assert all(acc[k] <= acc["pass@n"] for k in acc) and counts["correct_samples"] > 0
    assert "| critic tournament of 4 (tournament@4) |" in capsys.readouterr().out

    out_none = tmp_path / "none"
    assert evaluate.main(_args(answering_model, out_none, "--rerank", "none")) == 0
    plain = json.loads((out_none / "report.json").read_text())
    assert plain["accuracy"]["tournament@n"] is None and plain["critic"] is None
    # Same seed, same samples: reranking changes the choice, never the draws.
    assert [q["answers"] for q in plain["per_question"]] == [q["answers"] for q in per]


def test_evaluate_command_bad_arguments(tmp_path, capsys):
    assert evaluate.main(["--model", str(tmp_path), "--rerank", "best"]) == 2
    assert "'eval.rerank': 'best' is not one of ['tournament', 'none']" in capsys.readouterr().err
    assert evaluate.main(["--model", str(tmp_path), "--n", "0"]) == 2
    assert "eval.n must be >= 1, got 0" in capsys.readouterr().err
    # The engines sample greedily at a temperature <= 0: n copies of the greedy answer, reported as sampling at -1
    assert evaluate.main(["--model", str(tmp_path), "--eval.temperature", "-1"]) == 2
    assert "eval.temperature must be >= 0 (0: greedy), got -1.0" in capsys.readouterr().err
    assert evaluate.main(["--model", str(tmp_path), "--eval.critic_temperature", "-2"]) == 2
    assert "eval.critic_temperature must be >= 0 (0: greedy), got -2.0" in capsys.readouterr().err
    assert evaluate.main(["--n", "4"]) == 2
    assert "eval.model: give the model directory" in capsys.readouterr().err
    assert evaluate.main(["--model", str(tmp_path), "--task", "chess"]) == 2
    assert "'task.name': 'chess' is not one of ['countdown', 'deepmath', 'poetry']" in capsys.readouterr().err
    assert evaluate.main(["--model", str(tmp_path / "missing")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert evaluate.main(["--eval.nope", "1"]) == 2
    assert "unknown key 'eval.nope'" in capsys.readouterr().err
    assert cli.main(["evaluate", "--help"]) == 0 and "--eval.rerank" in capsys.readouterr().out


def test_short_flags_rewrite_flags_not_values():
    argv = ["--n=8", "--rerank", "none", "--task", "countdown", "--task.countdown.seed", "3", "--model", "--n"]
    assert expand_short_flags(argv) == [
        "--eval.n=8", "--eval.rerank", "none", "--task.name", "countdown", "--task.countdown.seed", "3", "--eval.model", "--n"]


def test_a_match_whose_prompt_fits_but_not_the_critics_reply_is_invalid_without_an_engine_call(tok):
    """The room counted is the prompt's and max_new_tokens' together: one position short of the reply is no room."""
    engine = _bounded_engine(tok)
    matches = [("q", "1", "2"), ("q", "3", "2")]
    short = len(prompts.render_prompt(tok, prompts.critic_messages("q", "3", "2")))
    assert short == len(prompts.render_prompt(tok, prompts.critic_messages("q", "1", "2")))
    engine.model.config.max_position_embeddings = short + 7  # the prompts fit, their 8-token replies do not
    assert critic_judge(engine, tok, max_new_tokens=8, temperature=1.0, seed=0)(matches) == [None, None]
    assert engine.calls == []
    engine.model.config.max_position_embeddings = short + 8
    assert critic_judge(engine, tok, max_new_tokens=8, temperature=1.0, seed=0)(matches) == ["2", "1"]


def test_generate_where_room_asks_only_what_fits_keeps_the_order_and_refuses_a_short_answer():
    """The prompts that fit, with max_new_tokens after them, go to the engine in one call, in order; the others are
    None in their places; an engine that answers another number of prompts than it was asked is an error, not a
    verdict given to the wrong match (mutation review: the count check could go with no test failing)."""
    from types import SimpleNamespace

    from raro_fast.rollout.engine import SamplingParams, generate_where_room

    class Echo:
        model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=10))
        drop = 0

        def __init__(self):
            self.calls = []

        def generate(self, prompt_list, params):
            self.calls.append([len(p) for p in prompt_list])
            outs = [[Completion(token_ids=[], logprobs=[], finish_reason="stop", text=str(len(p)))] for p in prompt_list]
            return outs[: len(outs) - self.drop]

    engine, params = Echo(), SamplingParams(max_new_tokens=4)
    outs = generate_where_room(engine, [[0] * 6, [0] * 7, [0] * 2], params)
    assert [None if o is None else o[0].text for o in outs] == ["6", None, "2"] and engine.calls == [[6, 2]]
    assert generate_where_room(engine, [[0] * 9], params) == [None] and engine.calls == [[6, 2]]  # no call for none
    engine.drop = 1
    with pytest.raises(RuntimeError, match="the engine answered 1 of 2 prompts"):
        generate_where_room(engine, [[0] * 6, [0] * 2], params)
