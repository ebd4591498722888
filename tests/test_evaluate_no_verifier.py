"""`evaluate` on a task without a verifier (poetry): report.json and the printed summary say that correctness was
not measured (null counts, null per-question "correct", no accuracies) rather than reporting zero right answers;
and a verifiable task's report is byte-for-byte what it was."""
import json
from types import SimpleNamespace

import pytest

from raro_fast import evaluate, prompts
from raro_fast.evaluate import rerank_report
from raro_fast.metrics import strict_json
from raro_fast.model.hf import load_project_tokenizer
from raro_fast.rollout.engine import Completion
from raro_fast.tasks import get_task
from raro_fast.tasks.base import Example
from raro_fast.tasks.countdown import CountdownConfig
from raro_fast.tasks.poetry import PoetryConfig

CORRECTNESS_COUNTS = ("correct_samples", "first_correct", "majority_correct", "tournament_correct", "any_correct")


@pytest.fixture(scope="module")
def tok():
    return load_project_tokenizer()


class ScriptedEngine:
    """Policy: `policy(question)` gives the (text, truncated) samples. Critic: always prefers answer 1."""

    weight_version = 0

    def __init__(self, tok, policy):
        self.tok, self.policy = tok, policy

    def _completion(self, prompt_ids, text, truncated=False):
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        return Completion(token_ids=ids, logprobs=[0.0] * len(ids), finish_reason="length" if truncated else "stop",
                          text=text, prompt_ids=list(prompt_ids))

    def generate(self, prompt_list, params):
        out = []
        for p in prompt_list:
            text = self.tok.decode(p, skip_special_tokens=False)
            user = text.split("<|im_start|>user\n", 1)[1].split("<|im_end|>")[0]
            if "\nAnswer 1: " in user:
                out.append([self._completion(p, prompts.format_completion("x", "1"))] * params.n)
            else:
                script = self.policy(user)
                assert len(script) == params.n
                out.append([self._completion(p, text, truncated) for text, truncated in script])
        return out


def _poems(question):
    """Three samples: two poems (distinct, so the tournament plays) and one cut off (no answer)."""
    return [(prompts.format_completion("t", "a poem"), False), (prompts.format_completion("t", "another poem"), False),
            (prompts.format_completion("t", "cut"), True)]


def _assert_not_measured(report, *, questions, n):
    assert report["accuracy"] == {}
    assert report["counts"] == {"questions": questions, "samples": questions * n, "no_answer": questions,
                                **dict.fromkeys(CORRECTNESS_COUNTS)}
    assert [q["correct"] for q in report["per_question"]] == [None] * questions
    assert all(q["answers"] == ["a poem", "another poem", None] for q in report["per_question"])
    written = json.loads(strict_json(report))
    assert all(written["counts"][k] is None for k in CORRECTNESS_COUNTS)


@pytest.mark.parametrize("rerank", ["tournament", "none"])
def test_a_report_without_a_verifier_says_correctness_was_not_measured(tok, rerank):
    task = get_task("poetry", PoetryConfig())
    exs = task.examples("heldout")[:2]
    report = rerank_report(exs, engine=ScriptedEngine(tok, _poems), tokenizer=tok, task=task, n=3, max_new_tokens=32,
                           temperature=1.0, top_p=1.0, critic_max_new_tokens=8, seed=0, rerank=rerank)
    _assert_not_measured(report, questions=2, n=3)
    # The choices are still made and recorded (the judge scores them); only their correctness is unknown.
    assert [q["majority"] for q in report["per_question"]] == [0, 0]
    picks = [q["tournament"] for q in report["per_question"]]
    assert all(p in (0, 1) for p in picks) if rerank == "tournament" else picks == [None, None]
    table = evaluate.markdown({**report, "task": "poetry"})
    assert table == "The poetry task has no verifier: no accuracies.\n"


def test_evaluate_command_without_a_verifier(tok, tmp_path, capsys, monkeypatch):
    """The command end to end (model loading replaced by the scripted engine): report.json on disk and the printed
    summary carry no zero counts of right answers."""
    engine = ScriptedEngine(tok, _poems)
    monkeypatch.setattr(evaluate, "load_pretrained",
                        lambda path, **kw: (SimpleNamespace(to=lambda device: None), tok))
    monkeypatch.setattr(evaluate, "EmbeddedEngine", SimpleNamespace(from_tokenizer=lambda *a, **kw: engine))
    out = tmp_path / "eval"
    assert evaluate.main(["--model", str(tmp_path), "--task", "poetry", "--n", "3", "--eval.num_problems", "2",
                          "--eval.device", "cpu", "--output-dir", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    _assert_not_measured(report, questions=2, n=3)
    summary, report_line = capsys.readouterr().out.split("report: ")
    assert summary == "The poetry task has no verifier: no accuracies.\n\n"
    assert report_line == f"{out / 'report.json'}\n"


def test_a_judge_without_a_chat_template_is_refused_before_any_sampling(tok, tmp_path, monkeypatch):
    """A judge model whose tokenizer has no chat template failed after every sample and tournament, with no report
    and no setting named (found by review on 2026-12-07). Refused at start, naming eval.judge_model."""
    import copy

    bare = copy.deepcopy(tok)
    bare.chat_template = None
    monkeypatch.setattr(evaluate, "load_pretrained", lambda path, **kw: (SimpleNamespace(to=lambda device: None),
                                                                       bare if path == "judge" else tok))
    monkeypatch.setattr(evaluate, "EmbeddedEngine", SimpleNamespace(
        from_tokenizer=lambda *a, **kw: pytest.fail("sampled before the judge was checked")))
    from raro_fast.config import load_config

    argv = ["--model", str(tmp_path), "--task", "poetry", "--eval.judge_model", "judge", "--eval.device", "cpu"]
    with pytest.raises(ValueError, match=r"^eval.judge_model: 'judge': its tokenizer has no chat template"):
        evaluate.run(load_config(evaluate.expand_short_flags(argv), root=evaluate.EvaluateConfig))


# ----------------------------------------------------------------------------------------------------------------
# A verifiable task: the report as before the fix, byte for byte.


def _countdown_examples():
    return [Example(id="a", question="Using 3, 4 each exactly once with + - * / and parentheses, make 7.",
                    answer="3+4", meta={"numbers": [3, 4], "target": 7}),
            Example(id="b", question="Using 2, 5 each exactly once with + - * / and parentheses, make 10.",
                    answer="2*5", meta={"numbers": [2, 5], "target": 10})]


def _countdown_samples(question):
    answers = {"7.": ["3*4", "3+4", "(3+4)"], "10.": ["2+5", "2+5", "5*2"]}[question.rsplit(" ", 1)[1]]
    return [(prompts.format_completion("t", a), i == 1 and a == "2+5") for i, a in enumerate(answers)]


def _golden_report(rerank):
    """What the code before the fix wrote, key order and types included (true, not 1), timings zeroed."""
    tournament = rerank == "tournament"
    return {
        "n": 3, "rerank": rerank,
        "accuracy": {"pass@1": 0.0, "avg@n": 0.5, "majority@n": 0.5, "tournament@n": 1.0 if tournament else None,
                     "pass@n": 1.0},
        "counts": {"questions": 2, "samples": 6, "no_answer": 1, "correct_samples": 3, "first_correct": 0,
                   "majority_correct": 1, "tournament_correct": 2 if tournament else None, "any_correct": 2},
        "critic": {"judge_calls": 2, "matches": 3, "tie_or_invalid": 0} if tournament else None,
        "timing_s": {"sampling": 0.0, "critic": 0.0},
        "per_question": [
            {"id": "a", "answers": ["3*4", "3+4", "(3+4)"], "correct": [False, True, True], "majority": 1,
             "tournament": 2 if tournament else None},
            {"id": "b", "answers": ["2+5", None, "5*2"], "correct": [False, False, True], "majority": 0,
             "tournament": 2 if tournament else None},
        ],
    }


def _golden_markdown(rerank):
    rows = ["| selection | accuracy | correct |", "|---|---|---|",
            "| first sample (pass@1) | 0.000 | 0/2 |",
            "| mean of 3 samples (avg@3) | 0.500 | 3/6 samples |",
            "| majority vote of 3 (majority@3) | 0.500 | 1/2 |"]
    if rerank == "tournament":
        rows.append("| critic tournament of 3 (tournament@3) | 1.000 | 2/2 |")
    rows.append("| oracle: any of 3 correct (pass@3) | 1.000 | 2/2 |")
    if rerank == "tournament":
        rows.append("\nCritic: 3 matches in 2 calls, 0 tie or invalid.")
    return "\n".join(rows) + "\n"


@pytest.mark.parametrize("rerank", ["tournament", "none"])
def test_a_verifiable_report_is_unchanged(tok, rerank, monkeypatch):
    monkeypatch.setattr(evaluate.time, "perf_counter", lambda: 0.0)
    task = get_task("countdown", CountdownConfig(num_train=2, num_heldout=2))
    report = rerank_report(_countdown_examples(), engine=ScriptedEngine(tok, _countdown_samples), tokenizer=tok,
                           task=task, n=3, max_new_tokens=32, temperature=1.0, top_p=1.0, critic_max_new_tokens=8,
                           seed=0, rerank=rerank)
    # Compared as the text report.json gets (strict_json, indent=1): key order and JSON types count.
    assert strict_json(report, indent=1) == strict_json(_golden_report(rerank), indent=1)
    assert evaluate.markdown(report) == _golden_markdown(rerank)
