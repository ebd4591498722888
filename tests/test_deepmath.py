"""DeepMath task: \\boxed extraction, math-verify equivalences, the hash split, filters and bad-input errors."""
import json
import re
import subprocess
import sys
import threading
import time
import types

import pytest

from raro_fast.tasks import TASKS, get_task
from raro_fast.tasks.base import Example
from raro_fast.tasks.deepmath import (
    SAMPLE_PATH, DeepMathConfig, DeepMathTask, extract_answer, last_boxed, math_answer_classes, math_equal,
)
from raro_fast.tasks.records import in_heldout


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def problems(n, start=0):
    return [{"question": f"What is {i} + {i}?", "final_answer": str(2 * i), "difficulty": 1 + i % 9}
            for i in range(start, start + n)]


def ex(answer):
    return Example(id="x", question="q", answer=answer)


# --- extraction ---------------------------------------------------------------------------------------------------

def test_boxed_nested_braces():
    assert extract_answer(r"so \boxed{\frac{1}{2}} done") == r"\frac{1}{2}"
    assert extract_answer(r"\boxed{\frac{\sqrt{2}}{2}}") == r"\frac{\sqrt{2}}{2}"
    assert extract_answer(r"\boxed{\{1, 2\}}") == r"\{1, 2\}"  # escaped braces are content, not grouping
    assert extract_answer(r"\boxed{a \boxed{b} c}") == r"a \boxed{b} c"  # the box inside is part of the content
    # An escaped brace with no escaped partner (a set or a piecewise function opened by \left\{, closed by \right.)
    # must not count: the box would never close.
    assert extract_answer(r"\boxed{\left\{x \mid x > 0\right.}") == r"\left\{x \mid x > 0\right."


def test_last_boxed_wins():
    assert extract_answer(r"first \boxed{3}, then \boxed{ 4 }.") == "4"
    # A box after the closed answer tag is not the answer: the tag's content is (the box used to override it).
    assert extract_answer(r"<answer>\boxed{7}</answer> \boxed{8}") == "7"


def test_boxed_beats_answer_tag_and_tag_is_fallback():
    assert extract_answer(r"<think>x</think><answer>The answer is \boxed{12}</answer>") == "12"
    assert extract_answer("<think>x</think><answer> 5/6 </answer>") == "5/6"
    assert extract_answer("<think>no answer at all</think>") is None
    assert extract_answer(None) is None
    # A box in the reasoning is a step, not the final answer (it used to beat the tag: 3, scored and judged).
    assert extract_answer(r"<think>Guess \boxed{3}, no.</think><answer>4</answer>") == "4"
    assert extract_answer(r"<think>\boxed{3}</think><answer>so \boxed{4}</answer>") == "4"
    assert extract_answer(r"<think>\boxed{3}</think><answer>4") is None  # cut off in the answer
    assert extract_answer(r"<answer>\boxed{3}</answer><answer>4</answer>") == "4"  # the last tag, not the first box


def test_a_boxed_answer_keeps_the_answer_tags_rules():
    """Found by review: the box was read past the tag's rules. An unclosed tag still gave its box, and a box holding
    `</think>` went, tag and all, into the critic's prompt."""
    assert extract_answer(r"<think>x</think><answer>\boxed{4") is None
    assert extract_answer(r"<think>x</think><answer>\boxed{4}") is None  # the tag never closed: cut off
    assert extract_answer(r"<answer>\boxed{4 </think> 4 vs 4: ok. Answer 1 is the expert's.}</answer>") is None
    assert extract_answer(r"\boxed{4 </think> yes}") is None  # no tag: the box alone, by the same rule
    assert extract_answer(r"<think>\boxed{3}</think> so \boxed{4}") == "4"  # no tag: the last box, as before
    assert extract_answer(r"<answer>4 </think></answer>") is None  # the tag's own rule, unchanged
    # A box in the reasoning is a step, as a tag there is (found by review on 2026-12-07: the first gave 3)
    assert extract_answer(r"<think>so x = \boxed{3}, now check") is None  # the turn ended in its reasoning
    assert extract_answer(r"<think>so x = \boxed{3}") is None
    assert extract_answer(r"<think>a</think>b \boxed{3} <think>c</think>") is None  # inside a later reasoning
    assert extract_answer(r"<think>a</think> so \boxed{3}") == "3"


def test_unclosed_or_empty_box_is_no_answer():
    assert extract_answer(r"\boxed{3} and finally \boxed{4") is None  # cut off: 3 was not the final word
    assert extract_answer(r"<answer>\boxed{}</answer>") is None
    assert extract_answer(r"<answer>2</answer> \boxed{}") == "2"  # after the tag: not the answer
    assert last_boxed("nothing here") is None


def test_task_uses_boxed_extraction():
    task = DeepMathTask(DeepMathConfig())
    assert task.extract_answer(r"<answer>\boxed{\frac{3}{4}}</answer>") == r"\frac{3}{4}"


# --- verification -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("gold, predicted, expected", [
    (r"\frac{1}{2}", "0.5", True),
    ("2", "3", False),
    (r"\frac{\sqrt{2}}{2}", r"\sqrt{2}/2", True),
    (r"\frac{3}{4}", "3/4", True),
    ("(0, 1]", "(0,1]", True),
    ("(0, 1]", "[0, 1]", False),
    ("x^2 + 2x + 1", "(x+1)^2", True),
    (r"5\sqrt{2}", r"\sqrt{50}", True),
    (r"\frac{1}{2}", "garbage", False),
    (r"\frac{1}{2}", "", False),
    (r"\frac{1}{2}", None, False),
    ("2", "2" * 2000, False),  # over MAX_ANSWER_CHARS: not parsed at all
    (r"\frac{1}{2}", "1/" + " " * 997 + "2", True),  # MAX_ANSWER_CHARS long: still read
    # Found by review: an unmatched } closed the answer's box early (3}+1 read as 3), and math-verify's rounding to
    # six decimals made small numbers equal.
    ("3", "3}+1", False),
    ("1", "1}0", False),
    ("3", "3\\", False),
    (r"\{1,2\}", r"\{1, 2\}", True),
    (r"\left\{1\right\}", r"\{1\}", True),
    ("0.0000005", "0.0000001", False),
    ("0.000001", "0.0000014", False),
    (r"\frac{1}{3}", "0.333333", True),
    (r"\frac{2}{3}", "0.666667", True),
    ("0.5", "0.5000001", True),
    ("x<3", r"(-\infty,3)", True),  # math-verify's verify is not symmetric (gold first): swapped, this is False
    # Found by review on 2026-12-07: an infinity never equalled itself (inf - inf is nan); an equation, a set of one
    # and a percentage skipped the check of six significant digits; a full stop after the answer made it no number.
    (r"\infty", r"\infty", True),
    (r"\infty", r"+\infty", True),
    (r"\infty", r"-\infty", False),
    ("10^{400}", "10^{400}", True),
    ("0.0000001", "x=0.0000005", False),
    ("0.0000001", r"\{0.0000005\}", False),
    ("0.0000001", r"0.00005\%", False),
    ("0.0000001", r"0.00001\%", True),
    ("3", "x=3", True),
    # equations that are no number are math-verify's to judge (they were given their right side's value: review)
    ("2x+3y=6", "4x+6y=12", True),
    ("x+1=3", "x=2", True),
    ("50", r"50\%", True),  # math-verify reads a percentage both ways, and so does the check
    ("0.5", r"50\%", True),
    ("42", "42.", True),
    ("42", "42;", True),
    ("42", "4.", False),
    # Found by review on 2026-12-07: math-verify reads Yes as E*s*y and YES as e*s*y, and a full stop after a word
    # as no answer; answers in words compare as words
    ("Yes", "YES", True),
    ("Yes", "Yes.", True),
    ("No", "No.", True),
    (r"\text{Yes}", "yes", True),
    ("No", "Yes", False),
    ("Yes", "1", False),
    ("7", "Yes", False),
    ("Does not exist", "DNE", True),
    ("x", "X", True),  # not words: math-verify's, as before
    # math-verify compares equations as an unordered set: a pair in the other order than the variables' was right
    ("x = 3, y = -1", "(-1, 3)", False),
    ("x = 3, y = -1", "(3, -1)", True),
    ("a=2, b=5", "(5, 2)", False),
    ("a=2, b=5", "(2, 5)", True),
    ("x = 3, y = -1", "y = -1, x = 3", True),
    (r"x = \frac{1}{2}, y = 2", "(0.5, 2)", True),
    (r"a = \frac{1}{3}, b = 2", "(0.333333, 2)", True),  # as math-verify compares numbers, not exactly
    (r"x = \frac{\sqrt{2}}{2}, y = 1", "(0.707107, 1)", True),
    # in the order the gold writes its variables, not their names' (found by review: (4, 1, 2, 3) was right for
    # x = 1, y = 2, z = 3, w = 4, and (1, 2, 3, 4) wrong)
    ("x = 1, y = 2, z = 3, w = 4", "(1, 2, 3, 4)", True),
    ("x = 1, y = 2, z = 3, w = 4", "(4, 1, 2, 3)", False),
    ("n = 5, k = 2", "(5, 2)", True),
    ("n = 5, k = 2", "(2, 5)", False),
    (r"x_1 = 2, x_{2} = 3", "(2, 3)", True),
    (r"x_1 = 2, x_{2} = 3", "(3, 2)", False),
    (r"\beta = 1, \alpha = 2", "(1, 2)", True),
    (r"\beta = 1, \alpha = 2", "(2, 1)", False),
    # a wrapper the word rule does not read is math-verify's, as before; one it reads compares as words
    ("Yes", r"\textit{Yes}", True),
    ("Yes", r"\mathbf{YES}", True),
    (r"\text{Yes}", r"$\text{yes}$", True),
    ("Yes", r"\(\text{Yes.}\)", True),
    (r"\text{Even}", r"\textit{odd}", False),
])
def test_math_equal(gold, predicted, expected):
    assert math_equal(gold, predicted) is expected


def test_verify_through_task_never_raises():
    task = DeepMathTask(DeepMathConfig())
    assert task.verify(ex(r"\frac{1}{2}"), "0.5") is True
    assert task.verify(ex("2"), "3") is False
    assert task.verify(ex("2"), None) is False
    assert task.verify(ex("2"), r"\frac{1}{") is False
    assert task.verify(ex("2"), r"}}}\left(\right") is False


def test_answer_classes_group_what_math_verify_finds_equal():
    task = DeepMathTask(DeepMathConfig())
    answers = ["0.5", r"\frac{1}{2}", None, "3", "1/2", r"50\%", " 3 ", r"\frac{6}{2}", "x=3", "[0,1)", r"[0, 1)",
               r"\sqrt{2}/2", r"\frac{\sqrt{2}}{2}", "garbage((", "garbage((", "2+3i", "3i+2", "2" * 2000, "0.500001"]
    assert task.answer_classes(answers) == [0, 0, None, 1, 0, 0, 1, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 7]
    # An equation first: the number that equals its right-hand side joins it, checked pairwise.
    assert math_answer_classes(["x=3", "3", "4"]) == [0, 0, 1]
    # The classes agree with math_equal on every pair of these answers (both ways round).
    parsed = [a for a in answers[:17] if a is not None and not a.startswith("garbage")]
    classes = dict(zip(parsed, math_answer_classes(parsed)))
    for a in parsed:
        for b in parsed:
            assert (classes[a] == classes[b]) == (math_equal(a, b) and math_equal(b, a)), (a, b)


def test_answer_classes_of_a_thousand_numbers_take_no_pairwise_checks(monkeypatch):
    import raro_fast.tasks.deepmath as deepmath

    calls = []

    def counted(*args, **kwargs):
        calls.append(args)
        return math_equal(*args, **kwargs)

    monkeypatch.setattr(deepmath, "math_equal", counted)
    answers = [str(i % 250) for i in range(1000)] + [f"\\frac{{{2 * i}}}{{2}}" for i in range(250)]
    classes = math_answer_classes(answers)
    assert classes == [i % 250 for i in range(1000)] + list(range(250))
    # One check for each new spelling of a value already seen, with that value's class only: 250, not 500 * 250 / 2.
    assert len(calls) == 250 and all(a == str(int(b.split("{")[1].rstrip("}")) // 2) for a, b in calls)


def test_numbers_that_round_alike_are_not_one_answer():
    # The rounded value used to decide alone: 10^{-9} joined 0, and integers past 2^53 joined their neighbours, so a
    # majority vote over ["10^{-9}", "0", "0"] picked 10^{-9}, which the verifier rejects.
    assert math_answer_classes(["10^{-9}", "0", "0", r"\frac{0}{5}"]) == [0, 1, 1, 1]
    assert math_answer_classes(["18446744073709551616", "18446744073709551615", "18446744073709551615"]) == [0, 1, 1]
    assert math_answer_classes(["0.5000001", "0.5", r"\frac{1}{2}"]) == [0, 0, 0]  # math-verify's own rounding
    # Found by review on 2026-12-07: each spelling of an infinity was its own answer; an equation or a percentage
    # of another number joined a class at math-verify's six decimals.
    assert math_answer_classes([r"\infty", r"+\infty", r"-\infty"]) == [0, 0, 1]
    assert math_answer_classes(["0.0000001", "x=0.0000005", r"0.00005\%", r"\{0.0000001\}"]) == [0, 1, 2, 0]
    assert math_answer_classes([r"50\%", "0.5", "50"]) == [0, 0, 0]


def test_a_big_sum_is_valued_within_the_timeout_not_summed_exactly():
    """sympy's doit() summed 100,000 fractions exactly, outside math-verify's timeout: answer classes of one sampled
    `\\sum` hung for minutes (found by review on 2026-12-07)."""
    start = time.monotonic()
    assert math_answer_classes(["3", r"\sum_{k=1}^{100000} \frac{1}{k}"]) == [0, 1]
    assert time.monotonic() - start < 60


def test_an_over_long_answer_is_never_parsed(monkeypatch):
    """Past MAX_ANSWER_CHARS an answer is wrong unparsed: sympy can take unbounded time, with no timer off the main
    thread. Neither the verifier nor the answer classes may hand it to math-verify; the classes did, as the gold
    side of the next answer's comparison."""
    import raro_fast.tasks.deepmath as deepmath

    real, parsed = deepmath._parse_latex, []
    monkeypatch.setattr(deepmath, "_parse_latex", lambda text, timeout: parsed.append(text) or real(text, timeout))
    long = "2" * 2000
    assert math_answer_classes([long, "2", long]) == [0, 1, 0]
    assert not math_equal("2", long)
    assert "2" in parsed and long not in parsed


def test_a_parse_timeout_is_not_remembered(monkeypatch):
    # math-verify returns [] on a timeout; cached, one slow moment judged that answer wrong for the whole process.
    import math_verify.parser as parser

    real, stalls = parser.extract_target_from_pred, []

    def stalls_once(pred, *args, **kwargs):
        if "\\frac{7}{9}" in pred and not stalls:
            stalls.append(pred)
            time.sleep(1.5)
        return real(pred, *args, **kwargs)

    monkeypatch.setattr(parser, "extract_target_from_pred", stalls_once)
    assert not math_equal(r"\frac{14}{18}", r"\frac{7}{9}", timeout_seconds=1) and stalls
    assert math_equal(r"\frac{14}{18}", r"\frac{7}{9}", timeout_seconds=1)


def test_verify_off_the_main_thread():
    # math-verify's timer uses signals, which only the main thread may set; elsewhere it must run without one.
    results = []
    worker = threading.Thread(target=lambda: results.extend([math_equal(r"\frac{1}{2}", "0.5"), math_equal("2", "3")]))
    worker.start()
    worker.join()
    assert results == [True, False]


def test_sample_answers_verify_against_themselves():
    task = DeepMathTask(DeepMathConfig())
    examples = task.examples("train") + task.examples("heldout")
    assert len(examples) == 52
    assert all(task.verify(e, e.answer) for e in examples)
    assert {type(e.meta["difficulty"]) for e in examples} == {float}


# --- split --------------------------------------------------------------------------------------------------------

def test_split_disjoint_complete_and_deterministic():
    cfg = DeepMathConfig()
    a, b = DeepMathTask(cfg), DeepMathTask(DeepMathConfig())
    train, heldout = a.examples("train"), a.examples("heldout")
    assert {e.question for e in train}.isdisjoint(e.question for e in heldout)
    assert len(train) + len(heldout) == 52
    assert len(heldout) == 3
    assert [e.id for e in train] == [e.id for e in b.examples("train")]
    assert [e.id for e in heldout] == [e.id for e in b.examples("heldout")]
    assert len({e.id for e in train + heldout}) == 52


def test_split_stable_when_the_file_grows(tmp_path):
    small = DeepMathTask(DeepMathConfig(path=write_jsonl(tmp_path / "a.jsonl", problems(200)), heldout_fraction=0.3))
    big = DeepMathTask(DeepMathConfig(path=write_jsonl(tmp_path / "b.jsonl", problems(50, start=200) + problems(200)),
                                      heldout_fraction=0.3))
    big_heldout = {e.question for e in big.examples("heldout")}
    big_train = {e.question for e in big.examples("train")}
    assert {e.question for e in small.examples("heldout")} <= big_heldout
    assert {e.question for e in small.examples("train")} <= big_train
    assert 30 < len(small.examples("heldout")) < 90  # about 60 of 200


def test_seed_changes_the_split(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", problems(200))
    h0 = {e.id for e in DeepMathTask(DeepMathConfig(path=path, seed=0)).examples("heldout")}
    h1 = {e.id for e in DeepMathTask(DeepMathConfig(path=path, seed=1)).examples("heldout")}
    assert h0 != h1


def test_no_heldout(tmp_path):
    task = DeepMathTask(DeepMathConfig(path=write_jsonl(tmp_path / "a.jsonl", problems(20)), heldout_fraction=0.0))
    assert len(task.examples("train")) == 20 and task.examples("heldout") == []


def test_bad_split_name():
    with pytest.raises(ValueError, match="split must be one of"):
        DeepMathTask(DeepMathConfig()).examples("test")


# --- filters and limits -------------------------------------------------------------------------------------------

def test_difficulty_filter_and_max_examples(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", problems(90))  # difficulties 1..9, ten of each
    task = DeepMathTask(DeepMathConfig(path=path, min_difficulty=3, max_difficulty=4.5, heldout_fraction=0.0))
    assert sorted({e.meta["difficulty"] for e in task.examples("train")}) == [3.0, 4.0]
    assert len(task.examples("train")) == 20
    first = DeepMathTask(DeepMathConfig(path=path, max_examples=7, heldout_fraction=0.0)).examples("train")
    assert [e.question for e in first] == [f"What is {i} + {i}?" for i in range(7)]
    capped = DeepMathTask(DeepMathConfig(path=path, min_difficulty=9, max_examples=3, heldout_fraction=0.0))
    assert [e.question for e in capped.examples("train")] == [f"What is {i} + {i}?" for i in (8, 17, 26)]


def test_difficulty_bounds_are_inclusive(tmp_path):
    """min_difficulty == max_difficulty keeps the rows of exactly that difficulty (a bound is not a strict one)."""
    path = write_jsonl(tmp_path / "a.jsonl", problems(90))  # difficulties 1..9, ten of each
    task = DeepMathTask(DeepMathConfig(path=path, min_difficulty=4, max_difficulty=4, heldout_fraction=0.0))
    assert [e.question for e in task.examples("train")] == [f"What is {i} + {i}?" for i in range(3, 90, 9)]


def test_filter_that_keeps_nothing(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", problems(9))
    with pytest.raises(ValueError, match=r"a\.jsonl: no row has a difficulty in \[10, None\]"):
        DeepMathTask(DeepMathConfig(path=path, min_difficulty=10))


def test_answer_alias_and_numbers(tmp_path):
    # q4-q6: the same answer as a number and as its alias's text, read either way (the check wrote the number
    # 0.00001 as "1e-05", and the loader writes 1e20 without its exponent)
    path = write_jsonl(tmp_path / "a.jsonl", [{"question": "q1", "answer": "7"}, {"question": "q2", "final_answer": 8},
                                              {"question": "q3", "final_answer": "9", "answer": "9"},
                                              {"question": "q4", "final_answer": 0.00001, "answer": "0.00001"},
                                              {"question": "q5", "final_answer": "1e-05", "answer": 0.00001},
                                              {"question": "q6", "final_answer": 1e20, "answer": "1e+20"}])
    task = DeepMathTask(DeepMathConfig(path=path, heldout_fraction=0.0))
    assert [(e.question, e.answer, e.meta["difficulty"]) for e in task.examples("train")] == [
        ("q1", "7", None), ("q2", "8", None), ("q3", "9", None), ("q4", "0.00001", None), ("q5", "1e-05", None),
        ("q6", "1" + "0" * 20, None)]


def test_a_final_answer_written_in_a_box_is_its_content(tmp_path):
    """A policy's boxed answer is read without its box: a boxed gold answer kept it, so the critic's prompt showed
    `\\boxed{7}` beside `7` (telling it which answer was the expert's), and DPO paired the expert's own completion
    against itself (found by review on 2026-12-07)."""
    path = write_jsonl(tmp_path / "a.jsonl", [{"question": "q1", "final_answer": r"\boxed{7}"},
                                              {"question": "q2", "final_answer": r" \boxed{\frac{1}{2}} "}])
    task = DeepMathTask(DeepMathConfig(path=path, heldout_fraction=0.0))
    assert [e.answer for e in task.examples("train")] == ["7", r"\frac{1}{2}"]
    assert task.extract_answer(r"<think></think><answer>\boxed{7}</answer>") == task.examples("train")[0].answer
    # an empty box is no answer, as a policy's is: the row could never verify (found by review)
    for empty in (r"\boxed{}", r"\boxed { }"):
        path = write_jsonl(tmp_path / "b.jsonl", [{"question": "q1", "final_answer": "7"},
                                                  {"question": "q2", "final_answer": empty}])
        with pytest.raises(ValueError, match=rf"b.jsonl:2: field 'final_answer' {re.escape(repr(empty))} is an empty "
                                             r"box: no answer"):
            DeepMathTask(DeepMathConfig(path=path, heldout_fraction=0.0)).examples("train")


@pytest.mark.parametrize("answer,back", [(r"\boxed{1} + \boxed{2}", "2"), (r"\boxed{3}\text{ m}", "3"),
                                         (r"$\boxed{3}$", "3"), ("a</answer>b", "a"), ("<think>7", None),
                                         ("7</ANSWER>8", "7")])
def test_a_final_answer_that_reads_back_otherwise_when_the_policy_writes_it_is_refused(tmp_path, answer, back):
    """The expert's answer, written by the policy exactly, must read back as itself: with two boxes, a box beside
    other text or a format tag in it, SFT taught an answer that reads back otherwise (and does not verify: `\boxed{1}
    + \boxed{2}` read back as 2), the critic saw the raw text beside the policy's copy, and DPO paired the expert's
    completion with itself (found by review on 2026-12-07). Refused, naming the row."""
    path = write_jsonl(tmp_path / "a.jsonl", [{"question": "q1", "final_answer": "7"},
                                              {"question": "q2", "final_answer": answer}])
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}:2: field 'final_answer' {re.escape(repr(answer))} "
                                         rf"reads back as {re.escape(repr(back))} when the policy writes it"):
        DeepMathTask(DeepMathConfig(path=path, heldout_fraction=0.0)).examples("train")


def test_a_final_answer_longer_than_answers_are_compared_by_is_refused(tmp_path):
    """A gold answer past MAX_ANSWER_CHARS was loaded, and no answer, the expert's own included, ever verified."""
    from raro_fast.tasks.deepmath import MAX_ANSWER_CHARS

    long = "+".join(["1"] * 501)
    assert len(long) == MAX_ANSWER_CHARS + 1
    path = write_jsonl(tmp_path / "a.jsonl", [{"question": "q1", "final_answer": "7"},
                                              {"question": "q2", "final_answer": long}])
    with pytest.raises(ValueError, match=r":2: field 'final_answer' has 1001 characters, more than the 1000"):
        DeepMathTask(DeepMathConfig(path=path, heldout_fraction=0.0)).examples("train")
    fits = long[2:]  # 999 characters; 1000 with a sign: as long as an answer compared may be
    path = write_jsonl(tmp_path / "b.jsonl", [{"question": "q1", "final_answer": "7"},
                                              {"question": "q2", "final_answer": "-" + fits}])
    task = DeepMathTask(DeepMathConfig(path=path, heldout_fraction=0.0))
    gold = task.examples("train")[1].answer
    assert len(gold) == MAX_ANSWER_CHARS and task.verify(task.examples("train")[1], gold)


def test_answers_in_words_are_one_answer_whatever_their_case_or_full_stop():
    assert math_answer_classes(["Yes", "Yes.", "yes", "YES", "No", "No.", r"\text{no}", "5"]) == [0, 0, 0, 0, 1, 1, 1, 2]


def test_a_numeric_answer_keeps_every_digit_it_was_written_with(tmp_path):
    """A float holds 17 significant digits: 18446744073709551616.0 was read as 18446744073709552000, and every right
    answer was judged wrong (found by review on 2026-12-07)."""
    (tmp_path / "a.jsonl").write_text('{"question": "q1", "final_answer": 18446744073709551616.0}\n'
                                      '{"question": "q2", "final_answer": 3.14159265358979323846}\n'
                                      '{"question": "q3", "final_answer": ' + "9" * 400 + '}\n')
    task = DeepMathTask(DeepMathConfig(path=str(tmp_path / "a.jsonl"), heldout_fraction=0.0))
    answers = [e.answer for e in task.examples("train")]
    assert answers == ["18446744073709551616.0", "3.14159265358979323846", "9" * 400]
    assert task.verify(task.examples("train")[0], "18446744073709551616")


def test_a_numeric_answer_is_written_without_an_exponent(tmp_path):
    # str(0.00001) is "1e-05", which math-verify reads as e - 5: every right answer was judged wrong.
    path = write_jsonl(tmp_path / "a.jsonl", [{"question": f"q{i}", "final_answer": v}
                                              for i, v in enumerate([0.00001, 1e16, 2.5, 10**30, -0.125])])
    task = DeepMathTask(DeepMathConfig(path=path, heldout_fraction=0.0))
    golds = [e.answer for e in task.examples("train")]
    assert golds == ["0.00001", "10000000000000000", "2.5", "1" + "0" * 30, "-0.125"]
    assert [task.verify(e, a) for e, a in zip(task.examples("train"), ["10^{-5}", "10^{16}", r"\frac{5}{2}",
                                                                        "10^{30}", r"-\frac{1}{8}"])] == [True] * 5


@pytest.mark.parametrize("kwargs, message", [
    ({"heldout_fraction": 1.0}, "task.deepmath.heldout_fraction must be in"),
    ({"heldout_fraction": -0.1}, "task.deepmath.heldout_fraction must be in"),
    ({"max_examples": -1}, "task.deepmath.max_examples must be >= 0"),
    ({"min_difficulty": 5, "max_difficulty": 2}, "min_difficulty .5. is above max_difficulty .2."),
    ({"verify_timeout_seconds": -1}, "verify_timeout_seconds must be >= 0"),
])
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DeepMathConfig(**kwargs)


# --- bad input ----------------------------------------------------------------------------------------------------

def test_missing_field_names_file_line_and_field(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps({"question": "a", "final_answer": "1"}) + "\n\n"  # a blank line 2 is skipped
                    + json.dumps({"question": "b"}) + "\n")
    with pytest.raises(ValueError) as e:
        DeepMathTask(DeepMathConfig(path=str(path)))
    assert str(e.value) == f"{path}:3: field 'final_answer' missing"


@pytest.mark.parametrize("line, message", [
    ('{"question": "b", "final_answer": "1"', r"x\.jsonl:2: not valid JSON \(Expecting ',' delimiter at column 38\)"),
    ('["b", "1"]', r"x\.jsonl:2: expected a JSON object, got list"),
    ('{"final_answer": "1"}', r"x\.jsonl:2: field 'question' missing"),
    ('{"question": "  ", "final_answer": "1"}', r"x\.jsonl:2: field 'question' is empty"),
    ('{"question": "b", "final_answer": ["1"]}', r"x\.jsonl:2: field 'final_answer' must be a string, got list"),
    ('{"question": "b", "final_answer": "1", "difficulty": "hard"}', r"x\.jsonl:2: field 'difficulty' must be a number, got str"),
    # JSON's true is a Python bool, an int: taken as a number it would be difficulty 1.0 and the answer "True".
    ('{"question": "b", "final_answer": "1", "difficulty": true}', r"x\.jsonl:2: field 'difficulty' must be a number, got bool"),
    ('{"question": "b", "final_answer": true}', r"x\.jsonl:2: field 'final_answer' must be a string, got bool"),
    ('{"question": "b", "final_answer": "1", "answer": "2"}', r"x\.jsonl:2: fields 'final_answer' and 'answer'"),
    ('{"question": "a", "final_answer": "1"}', r"x\.jsonl:2: field 'question' repeats the question of .*x\.jsonl:1"),
    # Found by review: these came without the file and line, or were taken silently.
    # Found by review on 2026-12-07: a traceback (OverflowError), and a gold that no answer could ever equal.
    pytest.param('{"question": "b", "final_answer": "1", "difficulty": ' + "9" * 400 + "}",
                 r"x\.jsonl:2: field 'difficulty' is too large for a number", id="huge difficulty"),
    pytest.param('{"question": "b", "final_answer": "\\\\frac{1}{2"}',
                 r"x\.jsonl:2: the final answer '.*frac\{1\}\{2' has unbalanced braces", id="unbalanced gold"),
    pytest.param('{"question": "b", "final_answer": "1", "final_answer": "2"}',
                 r"x\.jsonl:2: key 'final_answer' is given twice", id="a key twice"),
    pytest.param('{"question": "b", "final_answer": ' + "9" * 5000 + "}",
                 r"x\.jsonl:2: not a JSON record this reader takes \(ValueError: Exceeds the limit", id="huge int"),
    pytest.param('{"question": "b", "final_answer": "1", "x": ' + "[" * 100000 + "]" * 100000 + "}",
                 r"x\.jsonl:2: not a JSON record this reader takes \(RecursionError", id="deep nesting"),
    pytest.param('{"question": "b\\ud800", "final_answer": "1"}',
                 r"x\.jsonl:2: field 'question' holds '\\ud800', not a character", id="lone surrogate"),
    # Python's json reads these; a NaN difficulty passed every filter, an Infinity answer became "inf".
    ('{"question": "b", "final_answer": NaN}', r"x\.jsonl:2: NaN is not a JSON number"),
    ('{"question": "b", "final_answer": "1", "difficulty": -Infinity}', r"x\.jsonl:2: -Infinity is not a JSON number"),
])
def test_bad_rows(tmp_path, line, message):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps({"question": "a", "final_answer": "1"}) + "\n" + line + "\n")
    with pytest.raises(ValueError, match=message):
        DeepMathTask(DeepMathConfig(path=str(path)))


def test_a_question_repeated_with_other_spacing_is_refused(tmp_path):
    """The split could hold out one copy and train on the other (found by review)."""
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps({"question": "What is 2+2?", "final_answer": "4"}) + "\n"
                    + json.dumps({"question": "What is  2+2?\n", "final_answer": "4"}) + "\n")
    with pytest.raises(ValueError, match=r"x\.jsonl:2: field 'question' repeats the question of .*x\.jsonl:1"):
        DeepMathTask(DeepMathConfig(path=str(path)))


def test_not_utf8(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"question": "a", "final_answer": "1"}\n{"question": "\xff", "final_answer": "1"}\n')
    with pytest.raises(ValueError, match=r"x\.jsonl:2: not UTF-8 text"):
        DeepMathTask(DeepMathConfig(path=str(path)))


def test_a_byte_order_mark_and_windows_line_ends_are_read(tmp_path):
    """A file saved by a Windows editor: its BOM was "not valid JSON" at line 1 (the YAML reader took it)."""
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"question": "a", "final_answer": "1"}\r\n{"question": "b", "final_answer": "2"}\r\n')
    task = DeepMathTask(DeepMathConfig(path=str(path), heldout_fraction=0.5))
    assert sorted(ex.question for split in ("train", "heldout") for ex in task.examples(split)) == ["a", "b"]


def test_difficulty_needed_by_the_filter(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"question": "a", "final_answer": "1", "difficulty": 3},
                                              {"question": "b", "final_answer": "1"}])
    with pytest.raises(ValueError, match=r"x\.jsonl:2: field 'difficulty' missing \(needed by task\.deepmath\.max_difficulty\)"):
        DeepMathTask(DeepMathConfig(path=path, max_difficulty=5))


def test_empty_missing_and_unknown_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match=r"empty\.jsonl: the file holds no rows"):
        DeepMathTask(DeepMathConfig(path=str(empty)))
    with pytest.raises(ValueError, match=r"^task\.deepmath\.path: .*nope\.jsonl: no such file"):  # the setting to fix
        DeepMathTask(DeepMathConfig(path=str(tmp_path / "nope.jsonl")))
    csv = tmp_path / "x.csv"
    csv.write_text("question,final_answer\n")
    with pytest.raises(ValueError, match=r"x\.csv: unsupported file type '\.csv'; use \.jsonl or \.parquet"):
        DeepMathTask(DeepMathConfig(path=str(csv)))


def test_the_file_type_is_read_from_its_suffix_in_any_case(tmp_path):
    path = write_jsonl(tmp_path / "A.JSONL", problems(3))
    task = DeepMathTask(DeepMathConfig(path=path, heldout_fraction=0.0))
    assert [e.answer for e in task.examples("train")] == ["0", "2", "4"]


def test_all_heldout_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", problems(1))
    seed = next(s for s in range(100) if in_heldout("What is 0 + 0?", 0.9, s))  # one that holds the question out
    with pytest.raises(ValueError, match="all 1 examples fell in the held-out split"):
        DeepMathTask(DeepMathConfig(path=path, heldout_fraction=0.9, seed=seed))


# --- Parquet ------------------------------------------------------------------------------------------------------

def test_parquet_without_pyarrow_says_how_to_install(tmp_path, monkeypatch):
    path = tmp_path / "x.parquet"
    path.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # makes `import pyarrow...` raise ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ValueError) as e:  # was an ImportError: a traceback from the trainer, not its one-line error
        DeepMathTask(DeepMathConfig(path=str(path)))
    assert str(e.value) == (f"{path}: reading Parquet files needs pyarrow, which is not installed. Install it with "
                            "`pip install 'raro-fast[parquet]'` (or `pip install pyarrow`), or convert the file to JSONL.")


class FakeParquetFile:
    """Just what the loader uses of pyarrow.parquet.ParquetFile, over in-memory rows."""

    rows: list = []
    columns_read = None
    arrow_types: dict = {}  # column -> pyarrow's name of its type; "string" where not given

    def __init__(self, path):
        self.schema_arrow = types.SimpleNamespace(
            names=sorted({k for r in self.rows for k in r}),
            field=lambda name: types.SimpleNamespace(type=self.arrow_types.get(name, "string")))

    def read(self, columns=None):
        FakeParquetFile.columns_read = columns
        rows = [{k: r.get(k) for k in columns} for r in self.rows]
        return types.SimpleNamespace(to_pylist=lambda: rows)


@pytest.fixture
def fake_pyarrow(monkeypatch):
    parquet = types.ModuleType("pyarrow.parquet")
    parquet.ParquetFile = FakeParquetFile
    pyarrow = types.ModuleType("pyarrow")
    pyarrow.parquet = parquet
    monkeypatch.setitem(sys.modules, "pyarrow", pyarrow)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", parquet)
    return FakeParquetFile


def test_parquet_rows_and_row_numbers(tmp_path, fake_pyarrow):
    path = tmp_path / "x.parquet"
    path.write_bytes(b"PAR1")
    fake_pyarrow.rows = [{"question": "q1", "final_answer": "1", "difficulty": 2.5, "r1_solution_1": "long"},
                         {"question": "q2", "final_answer": "2", "difficulty": 3.0, "r1_solution_1": "long"}]
    task = DeepMathTask(DeepMathConfig(path=str(path), heldout_fraction=0.0))
    assert [(e.question, e.answer, e.meta["difficulty"]) for e in task.examples("train")] == [("q1", "1", 2.5), ("q2", "2", 3.0)]
    assert fake_pyarrow.columns_read == ["question", "final_answer", "difficulty"]  # the solutions are not read
    fake_pyarrow.rows = [{"question": "q1", "final_answer": "1"}, {"question": "q2", "final_answer": None}]
    with pytest.raises(ValueError) as e:
        DeepMathTask(DeepMathConfig(path=str(path)))
    assert str(e.value) == f"{path}: row 1: field 'final_answer' missing"
    # Parquet has NaN and infinities (JSONL's reader refuses them): a NaN difficulty passed every filter.
    for row, message in (({"difficulty": float("nan")}, "field 'difficulty' is nan, not a finite number"),
                         ({"final_answer": float("inf")}, "field 'final_answer' is inf, not a finite number")):
        fake_pyarrow.rows = [{"question": "q1", "final_answer": "1", "difficulty": 2},
                             {"question": "q2", "final_answer": "2", "difficulty": 2, **row}]
        with pytest.raises(ValueError) as e:
            DeepMathTask(DeepMathConfig(path=str(path), min_difficulty=1))
        assert str(e.value) == f"{path}: row 1: {message}"


def test_an_answer_column_of_32_bit_floats_is_refused_not_read_with_other_digits(tmp_path, fake_pyarrow):
    """A float32 1234.5678 comes back from pyarrow as 1234.5677490234375: that was the gold answer, and the right
    answer was judged wrong (found by review). 64-bit floats keep their digits, and a float32 difficulty is fine."""
    path = tmp_path / "x.parquet"
    path.write_bytes(b"PAR1")
    fake_pyarrow.rows = [{"question": "q1", "final_answer": 1234.5678, "difficulty": 2.5}]
    fake_pyarrow.arrow_types = {"final_answer": "float", "difficulty": "float"}
    with pytest.raises(ValueError) as e:
        DeepMathTask(DeepMathConfig(path=str(path), heldout_fraction=0.0))
    assert str(e.value).startswith(f"{path}: column 'final_answer' holds float (16/32-bit) numbers")
    fake_pyarrow.arrow_types = {"final_answer": "double", "difficulty": "float"}
    task = DeepMathTask(DeepMathConfig(path=str(path), heldout_fraction=0.0))
    assert task.examples("train")[0].answer == "1234.5678"
    fake_pyarrow.arrow_types = {}


def test_pyarrow_names_a_32_bit_float_column_as_the_loader_expects(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="pyarrow (the parquet extra) is not installed")
    import pyarrow.parquet as pq

    path = tmp_path / "x.parquet"
    pq.write_table(pa.table({"question": ["q1"], "final_answer": pa.array([1234.5678], pa.float32())}), path)
    with pytest.raises(ValueError, match="column 'final_answer' holds float"):
        DeepMathTask(DeepMathConfig(path=str(path), heldout_fraction=0.0))


# --- registry -----------------------------------------------------------------------------------------------------

def test_registered():
    assert TASKS["deepmath"] == (DeepMathTask, DeepMathConfig)
    task = get_task("deepmath", DeepMathConfig(path=str(SAMPLE_PATH)))
    assert task.name == "deepmath" and task.examples("train")[0].id.startswith("deepmath:")


def test_an_answer_whose_value_takes_minutes_to_evaluate_is_not_a_number(tmp_path):
    """\\sum_{k=1}^{10^9} \\sin(k^2) parsed in a second and then evalf ran for minutes outside math-verify's timer,
    stalling majority@n and the answer entropy (found by review). Run apart, so that a regression fails, not hangs."""
    script = (
        "from raro_fast.tasks.deepmath import _real_values, math_answer_classes\n"
        "assert _real_values(r'\\sum_{k=1}^{10^{9}} \\sin(k^{2})', 5) == ()\n"
        "assert _real_values(r'\\int_0^1 x\\,dx', 5) == ()\n"
        "assert _real_values(r'\\frac{1}{2}', 5) == (0.5,)\n"
        "print(math_answer_classes(['3', r'\\sum_{k=1}^{10^{9}} \\sin(k^{2})', '3.0'], timeout_seconds=5))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[0, 1, 0]"


def test_an_unevaluated_sum_is_no_number_even_where_it_would_value_at_once():
    # Left unevaluated by the parser, a sum, product or limit is no plain number however small (without the check,
    # the timer alone let a quick one through: \sum_{k=1}^{3} k became 6.0, a slow one none)
    from raro_fast.tasks.deepmath import _real_values

    assert _real_values(r"\sum_{k=1}^{3} k", 5) == ()
    assert _real_values(r"\prod_{k=1}^{3} k", 5) == ()
    assert _real_values(r"6", 5) == (6.0,)


def test_a_value_that_evaluates_past_the_timeout_is_no_number():
    # evalf runs under math-verify's timer too: sin(10^200000) needs 200000 digits (about 18 s here without the timer,
    # where it came back as -0.772143); with a 1 s timer it is no number
    from raro_fast.tasks.deepmath import _real_values

    started = time.monotonic()
    assert _real_values(r"\sin(10^{200000})", 1) == ()
    assert time.monotonic() - started < 10


@pytest.mark.parametrize("gold, predicted, expected", [
    ("Yes", "{Yes}", True),  # a wrapper the word rule does not read: math-verify's (which equals them), not False
    ("Yes", r"\boxed{Yes}", True),
    ("Yes", "$YES$", True),  # inside $...$ still words (math-verify reads e*s*y against E*s*y)
    ("Yes", r"\(\text{YES}\)", True),
    # the pair is read in the order the gold writes its variables, whatever order sympy stores the equations in
    ("y = 1, x = 1+1", "(1, 2)", True),
    ("y = 1, x = 1+1", "(2, 1)", False),
    ("x = 2, x = 3", "(3, 2)", True),  # two values of one variable (two roots) have no order
    ("ab", "ba", True),  # letters that are no answer in words are math-verify's product, not words compared
    # a pair that reads as an open interval (first below second) is a pair too
    ("a = 2, b = 1", "(1, 2)", False),
])
def test_math_equal_falls_back_to_math_verify_and_orders_as_written(gold, predicted, expected):
    """Mutation review: each of these passed test_math_equal: comparing as words when only one side is in words,
    any letters as words, words inside $...$ not read, the equations read in stored order, and two values of one
    variable read as an ordered pair."""
    assert math_equal(gold, predicted) is expected
