import itertools
import math
from math import comb

import pytest
import torch

from raro_fast.analysis import (
    answer_entropy, avg_at_n, default_ks, load_traces_jsonl, mean_token_entropy, pass_at_k, pass_at_k_curve,
    perplexity, support_categories, support_metrics, token_entropy,
)
from raro_fast.tasks import get_task
from raro_fast.tasks.deepmath import DeepMathConfig


def test_pass_at_k_equals_brute_force_over_subsets():
    for n in range(1, 9):
        for c in range(n + 1):
            correct = [1] * c + [0] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(range(n), k))
                brute = sum(any(correct[i] for i in s) for s in subsets) / len(subsets)
                assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12)
                assert pass_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k), abs=1e-12)


def test_pass_at_k_stable_at_8192():
    for c, k in [(1, 1), (1, 8192), (3, 4096), (100, 64), (0, 17), (8000, 100)]:
        v = pass_at_k(8192, c, k)
        assert 0.0 <= v <= 1.0 and math.isfinite(v)
        exact = 1 - comb(8192 - c, k) / comb(8192, k) if 8192 - c >= k else 1.0  # Python ints: exact
        assert v == pytest.approx(exact, abs=1e-9)
    assert pass_at_k(8192, 1, 1) == pytest.approx(1 / 8192)


@pytest.mark.parametrize("args", [(0, 0, 1), (4, 5, 1), (4, 1, 5), (4, 1, 0), (4.0, 1, 1), (4, True, 1)])
def test_pass_at_k_rejects_bad_arguments(args):
    with pytest.raises(ValueError, match="pass_at_k"):
        pass_at_k(*args)


def test_curve_and_avg():
    counts = [(8, 0), (8, 1), (8, 8)]
    curve = pass_at_k_curve(counts)
    assert list(curve) == [1, 2, 4, 8]
    assert curve[1] == pytest.approx((0 + 1 / 8 + 1) / 3)
    assert curve[8] == pytest.approx(2 / 3)
    assert default_ks(12) == [1, 2, 4, 8, 12]
    assert avg_at_n(counts) == pytest.approx((0 + 1 / 8 + 1) / 3)
    with pytest.raises(ValueError, match="exceeds"):
        pass_at_k_curve(counts, ks=[16])


def test_curve_over_unequal_sample_counts_and_avg_weighs_problems_equally():
    """Each problem keeps its own n in its estimate; the default ks stop at the fewest samples; avg@n is the mean of
    the per-problem fractions, not the pooled fraction (which would weigh the problem with more samples more)."""
    from fractions import Fraction

    curve = pass_at_k_curve([(4, 1), (8, 2)])
    assert list(curve) == [1, 2, 4]
    # exact binomials with Python integers: 1 - C(n - c, k) / C(n, k)
    exact = {k: (1 - Fraction(comb(3, k), comb(4, k)) + 1 - Fraction(comb(6, k), comb(8, k))) / 2 for k in (1, 2, 4)}
    assert exact[1] == Fraction(1, 4) and exact[4] == (1 + (1 - Fraction(comb(6, 4), comb(8, 4)))) / 2
    for k, value in exact.items():
        assert curve[k] == pytest.approx(float(value), rel=1e-12), k
    assert default_ks(8) == [1, 2, 4, 8]  # n itself once, also when it is a power of two
    assert avg_at_n([(2, 1), (4, 0)]) == pytest.approx(0.25)  # (1/2 + 0) / 2; pooled would be 1/6


def test_support_metrics_worked_example():
    m = support_metrics(P=1355, E=5, S=56, O=131)
    assert round(m["SRR"], 3) == 0.960
    assert round(m["NDR"], 4) == 0.0037
    assert round(m["SDS"], 4) == 0.0073
    assert round(m["NSCR"], 3) == -0.036
    nan = support_metrics(0, 0, 0, 5)
    assert all(math.isnan(v) for v in nan.values())
    assert math.isnan(support_metrics(0, 3, 0, 0)["SRR"]) and support_metrics(0, 3, 0, 0)["NDR"] == 1.0


def test_support_categories_constructed():
    cats, counts = support_categories([3, 0, 2, 0, 1], [1, 4, 0, 0, True])
    assert cats == ["P", "E", "S", "O", "P"]
    assert counts == {"P": 2, "S": 1, "E": 1, "O": 1}
    with pytest.raises(ValueError, match="2 base problems vs 1"):
        support_categories([1, 1], [1])


def test_answer_entropy_known_distributions():
    assert answer_entropy(["a"] * 7) == 0.0
    assert answer_entropy(["a", "b", "c", "d"]) == pytest.approx(math.log(4))
    assert answer_entropy([None, None, "x", "x"]) == pytest.approx(math.log(2))  # NA is one class
    assert answer_entropy([" 24 ", "24", None]) == pytest.approx(-(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3)))
    assert answer_entropy(["NA", None]) == pytest.approx(math.log(2))  # the text "NA" is not the unfinished class


def test_answer_entropy_counts_a_tasks_equal_answers_as_one():
    answers = ["0.5", r"\frac{1}{2}", "1/2", "3"]
    assert answer_entropy(answers) == pytest.approx(math.log(4))  # by text: four answers
    classes = get_task("deepmath", DeepMathConfig()).answer_classes(answers)
    assert answer_entropy(answers, classes) == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert answer_entropy([None, "x"], [None, 0]) == pytest.approx(math.log(2))
    with pytest.raises(ValueError, match="3 classes for 2 answers"):
        answer_entropy(["a", "b"], [0, 1, 2])


def test_token_entropy_against_float64_reference():
    g = torch.Generator().manual_seed(0)
    T, H, V = 37, 24, 101
    hidden = torch.randn(T, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.3
    targets = torch.randint(0, V, (T,), generator=g)
    targets[[0, 5, 36]] = -100
    lp, ent = token_entropy(hidden, weight, targets, temperature=0.7)
    logits = (hidden.double() @ weight.double().T) / 0.7
    logp = torch.log_softmax(logits, -1)
    ref_ent = -(logp.exp() * logp).sum(-1)
    ref_lp = logp.gather(-1, targets.clamp_min(0)[:, None]).squeeze(-1)
    keep = targets != -100
    torch.testing.assert_close(ent.double(), torch.where(keep, ref_ent, 0.0), atol=1e-4, rtol=0)  # fp32 kernel
    torch.testing.assert_close(lp.double(), torch.where(keep, ref_lp, 0.0), atol=1e-4, rtol=0)
    seq = torch.tensor([0] * 10 + [1] * 27)
    expected = (ref_ent[keep & (seq == 0)].mean() + ref_ent[keep & (seq == 1)].mean()) / 2
    assert mean_token_entropy(ent, keep, seq) == pytest.approx(float(expected), abs=1e-4)


def test_perplexity():
    assert perplexity([math.log(0.5)] * 4) == pytest.approx(2.0)
    # exp of the mean NLL is the geometric mean of 1/p: sqrt(2 * 4), not the arithmetic mean (2 + 4) / 2
    assert perplexity([math.log(0.5), math.log(0.25)]) == pytest.approx(math.sqrt(8.0), rel=1e-12)
    with pytest.raises(ValueError):
        perplexity([])


def test_load_traces_jsonl_errors_name_file_line_field(tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_text('{"problem_id": "a", "trace": "x"}\n\n{"problem_id": "b", "trace": "y"}\n')
    assert [r["problem_id"] for r in load_traces_jsonl(f)] == ["a", "b"]
    f.write_text('{"problem_id": "a", "trace": "x"}\n{"problem_id": "b"}\n')
    with pytest.raises(ValueError, match=r"t.jsonl:2: missing field 'trace'"):
        load_traces_jsonl(f)
    f.write_text('{"problem_id": 3, "trace": "x"}\n')
    with pytest.raises(ValueError, match=r"t.jsonl:1: field 'problem_id' must be a string"):
        load_traces_jsonl(f)
    f.write_text('{"problem_id": "a", "trace": "x"}\n{"problem_id": "b", "trace": "y"}\n{"problem_id": "a", "trace": "z"}\n')
    with pytest.raises(ValueError, match=r"t.jsonl:3: problem_id 'a' already has a trace \(line 1\)"):
        load_traces_jsonl(f)  # it silently replaced line 1's trace and was counted as not analysed
    f.write_text('not json\n')
    with pytest.raises(ValueError, match=r"t.jsonl:1: not valid JSON"):
        load_traces_jsonl(f)
    with pytest.raises(ValueError, match=r"cannot read"):
        load_traces_jsonl(tmp_path / "missing.jsonl")
    # bad UTF-8 named its byte only, neither file nor line (found by review on 2026-12-07)
    f.write_bytes(b'{"problem_id": "a", "trace": "x"}\n{"problem_id": "b", "trace": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"t.jsonl:2: not UTF-8 text"):
        load_traces_jsonl(f)
