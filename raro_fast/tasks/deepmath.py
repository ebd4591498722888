"""DeepMath: math problems with a short final answer, read from a local DeepMath-103K style file.

Each row has `question`, `final_answer` (or its alias `answer`) and an optional numeric `difficulty`; other fields
(solutions, topic, ...) are ignored. Files are JSONL or Parquet (Parquet needs pyarrow). With no `path` the task
reads a small sample shipped with the package, so it runs with no arguments.

The split is by a hash of the question text: a question always lands in the same split, whatever else the file
holds, so the splits never share a question and a row keeps its split when the file grows. Answers are checked by
math-verify (only for evaluation; RARO never trains on a verifier).

Files are read by records.py (shared with poetry.py).
"""
from __future__ import annotations

import math
import re
import threading
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

from raro_fast import prompts
from raro_fast.tasks.base import Example, FileTask
from raro_fast.tasks.records import hash_split, read_records, repeat_key, stable_id, text_field

SAMPLE_PATH = Path(__file__).parent / "data" / "deepmath_sample.jsonl"

# Longer predicted answers are wrong without being parsed: sympy can take unbounded time on big inputs, and off the
# main thread there is no timeout to stop it.
MAX_ANSWER_CHARS = 1000


@dataclass(kw_only=True)
class DeepMathConfig:
    path: str = field(default=str(SAMPLE_PATH), metadata={
        "help": "Local .jsonl or .parquet file with `question`, `final_answer` (or `answer`) and optional `difficulty` "
                "per row (DeepMath-103K style). Default: a small sample shipped with the package."})
    heldout_fraction: float = field(default=0.1, metadata={
        "help": "Share of questions held out (chosen by a hash of the question, so stable when the file grows)."})
    max_examples: int = field(default=0, metadata={
        "help": "Use only the first this many rows left after the difficulty filter, in file order (0: all)."})
    min_difficulty: float | None = field(default=None, metadata={
        "help": "Keep rows with difficulty >= this (None: no lower bound). Every row then needs a difficulty."})
    max_difficulty: float | None = field(default=None, metadata={
        "help": "Keep rows with difficulty <= this (None: no upper bound). Every row then needs a difficulty."})
    seed: int = field(default=0, metadata={"help": "Seed of the held-out hash: another seed holds out other questions."})
    verify_timeout_seconds: int = field(default=5, metadata={
        "help": "Seconds math-verify may spend on one parse or comparison (0: no limit). Its timer is a SIGALRM "
                "alarm, so it applies on the main thread only; elsewhere answers are checked without a timer."})

    def __post_init__(self) -> None:
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise ValueError(f"task.deepmath.heldout_fraction must be in [0, 1), got {self.heldout_fraction}")
        if self.max_examples < 0:
            raise ValueError(f"task.deepmath.max_examples must be >= 0 (0: all), got {self.max_examples}")
        if self.min_difficulty is not None and self.max_difficulty is not None and self.min_difficulty > self.max_difficulty:
            raise ValueError(f"task.deepmath.min_difficulty ({self.min_difficulty}) is above max_difficulty ({self.max_difficulty})")
        if self.verify_timeout_seconds < 0:
            raise ValueError(f"task.deepmath.verify_timeout_seconds must be >= 0, got {self.verify_timeout_seconds}")


# ---------------------------------------------------------------------------------------------------------------
# Reading local files (shared with poetry.py). Every error names the file, the row and the field.


def _final_answer(record: dict[str, Any], where: str) -> str:
    has_final, has_alias = record.get("final_answer") is not None, record.get("answer") is not None
    if not has_final and has_alias:
        return text_field(record, where, "answer", allow_numbers=True).strip()
    answer = text_field(record, where, "final_answer", allow_numbers=True).strip()
    # The same answer if it reads the same either as the loader writes numbers (0.00001, where str() gives "1e-05")
    # or as str() writes them ("1e-05" beside the number 1e-05).
    if has_alias and str(record["final_answer"]).strip() != str(record["answer"]).strip() and \
            text_field(record, where, "answer", allow_numbers=True).strip() != answer:
        raise ValueError(f"{where}: fields 'final_answer' and 'answer' (its alias) both given, and they differ")
    return answer


def _unboxed(answer: str) -> str:
    """A final answer written as one \\boxed{...} is its content, as a policy's boxed answer is read (found by
    review: the box stayed, so the critic's prompt showed `\\boxed{7}` beside the policy's `7` and told it which
    answer was the expert's, and DPO paired the expert's own completion against itself)."""
    found = _last_box(answer)
    return found[0] if found is not None and found[1] == 0 and found[2] == len(answer) else answer


def _difficulty(record: dict[str, Any], where: str, needed_by: str | None) -> float | None:
    value = record.get("difficulty")
    if value is None:
        if needed_by:
            raise ValueError(f"{where}: field 'difficulty' missing (needed by {needed_by})")
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where}: field 'difficulty' must be a number, got {type(value).__name__}")
    try:
        value = float(value)
    except OverflowError:  # an integer past a float's range (found by review: a traceback)
        raise ValueError(f"{where}: field 'difficulty' is too large for a number") from None
    if not math.isfinite(value):  # a NaN compares False both ways and passed every difficulty filter
        raise ValueError(f"{where}: field 'difficulty' is {value}, not a finite number")
    return float(value)


def load_examples(cfg: DeepMathConfig) -> dict[str, list[Example]]:
    """{"train": [...], "heldout": [...]} from `cfg.path`; every row is checked, and a bad one is a ValueError."""
    needed_by = ("task.deepmath.min_difficulty" if cfg.min_difficulty is not None
                 else "task.deepmath.max_difficulty" if cfg.max_difficulty is not None else None)
    first_seen: dict[str, str] = {}
    kept: list[Example] = []
    for where, record in read_records(cfg.path, columns=("question", "final_answer", "answer", "difficulty"),
                                      text_columns=("question", "final_answer", "answer")):
        question = text_field(record, where, "question").strip()
        answer = _unboxed(_final_answer(record, where))
        if _matching_brace(answer + "}", 0) != len(answer):  # found by review: no answer could ever verify
            raise ValueError(f"{where}: the final answer {answer[:80]!r} has unbalanced braces")
        if re.fullmatch(r"\\boxed\s*\{\s*\}", answer):
            # an empty box: a policy's \boxed{} is no answer, so the row could never verify (found by review)
            raise ValueError(f"{where}: field 'final_answer' {answer!r} is an empty box: no answer")
        # The expert's answer as the policy writes it must read back as itself, and verify (found by review: a tag
        # in it, two boxes, or `$\boxed{3}$` read back otherwise: SFT taught an answer no reward pays, the critic
        # saw the raw text beside the policy's copy, and an answer past MAX_ANSWER_CHARS never verified).
        back = extract_answer(prompts.format_completion("", answer))
        if back != answer:
            raise ValueError(f"{where}: field 'final_answer' {answer[:80]!r} reads back as {back!r} when the policy "
                             "writes it (<answer>...</answer>): write the answer alone, as a policy should")
        if len(answer) > MAX_ANSWER_CHARS:
            raise ValueError(f"{where}: field 'final_answer' has {len(answer)} characters, more than the "
                             f"{MAX_ANSWER_CHARS} an answer is compared by: no answer could verify")
        difficulty = _difficulty(record, where, needed_by)
        # A repeated question would get the id of its first copy (and could carry another answer): refuse it.
        spaced = repeat_key(question)
        if spaced in first_seen:
            raise ValueError(f"{where}: field 'question' repeats the question of {first_seen[spaced]}")
        first_seen[spaced] = where
        if cfg.min_difficulty is not None and difficulty < cfg.min_difficulty:
            continue
        if cfg.max_difficulty is not None and difficulty > cfg.max_difficulty:
            continue
        kept.append(Example(id=stable_id("deepmath", question), question=question, answer=answer,
                            meta={"difficulty": difficulty, "source": where}))
    if not kept:
        raise ValueError(f"{cfg.path}: no row has a difficulty in [{cfg.min_difficulty}, {cfg.max_difficulty}]")
    return hash_split(kept, max_examples=cfg.max_examples, heldout_fraction=cfg.heldout_fraction, seed=cfg.seed,
                      path=cfg.path, fraction_setting="task.deepmath.heldout_fraction")


# ---------------------------------------------------------------------------------------------------------------
# Answers.

_BOXED_RE = re.compile(r"\\boxed\s*\{")


def _matching_brace(text: str, start: int) -> int:
    """Index of the "}" closing the group whose content starts at `start`, or -1. A backslash escapes the next
    character, so \\{ and \\} (literal braces in LaTeX) do not count."""
    depth, i = 1, start
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return -1


def last_boxed(text: str) -> str | None:
    """Stripped content of the last top-level \\boxed{...} (nested braces, and boxes inside it, are part of the
    content). None if there is no box, if it is empty, or if the last box is never closed: the output was cut off
    there, so an earlier box was not the model's final word."""
    found = _last_box(text)
    return None if found is None else found[0]


def _last_box(text: str) -> tuple[str, int, int] | None:
    """`last_boxed`'s content, and where the whole box starts and ends in `text`."""
    if not isinstance(text, str):
        return None
    content, pos, start = None, 0, 0
    while (m := _BOXED_RE.search(text, pos)) is not None:
        end = _matching_brace(text, m.end())
        if end < 0:
            return None
        content, pos, start = text[m.end() : end], end + 1, m.start()
    if content is None or not content.strip():
        return None
    return content.strip(), start, pos


_ANSWER_OPEN_RE = re.compile(r"<answer>", re.IGNORECASE)
# Two real numbers math-verify calls equal must also agree this closely, relative to their size: 1/3 and 0.333333
# do (1e-6), 0.000001 and 0.0000014 do not.
RELATIVE_TOLERANCE = 2e-6
# A full stop or semicolon after a number's last digit, closing the answer.
_SENTENCE_STOP_RE = re.compile(r"(?<=\d)\s*[.;]\s*$")


def extract_answer(completion: str) -> str | None:
    """The final answer: the answer tag's content by the rules of `prompts.parse_answer` (its last \\boxed{...}
    if it holds one), or, in a text with no answer tag, its last \\boxed{...}. A box in the reasoning before the
    answer tag is a step, not the answer (it used to win over the tag: `<think>... \\boxed{3}</think><answer>4
    </answer>` gave 3). A box read past the tag skipped the tag's rules (found by review): a box after a closed
    tag overrode it, an unclosed tag still gave its box, and a box holding `</think>` put that text, tag and all,
    in the critic's prompt. A box that holds a think tag is no answer, as a tag that holds one is."""
    if not isinstance(completion, str):
        return None
    if _ANSWER_OPEN_RE.search(completion):
        answer = prompts.parse_answer(completion)
        if answer is None or not _BOXED_RE.search(answer):
            return answer
        completion = answer
    found = _last_box(completion)
    # A box in the reasoning is a step, as an answer tag there is (found by review: `<think>so x = \\boxed{3}, now
    # check`, a turn that ended in its reasoning, answered 3).
    if found is None or prompts.has_think_tag(found[0]) or prompts.inside_reasoning(completion, found[1], found[2]):
        return None
    return found[0]


@lru_cache(maxsize=16384)
def _parse_latex(text: str, timeout_seconds: int | None) -> tuple:
    import math_verify  # imported on first use: it pulls in sympy, slow to import and unused by other tasks

    # Wrapped in \boxed{} so math-verify reads the whole text as one LaTeX answer: bare, it misses forms such as
    # \sqrt{2}/2, intervals and \infty. A timeout raises, so that it is not cached: math-verify's own [] on a
    # timeout, cached, judged that text wrong for the rest of the process after one slow moment.
    if _matching_brace(text + "}", 0) != len(text):  # an unmatched } closed the box early: "3}+1" read as 3
        return ()
    text = _SENTENCE_STOP_RE.sub("", text)  # "42." ends a sentence; boxed, math-verify read it as no number (review)
    try:
        return tuple(math_verify.parse(f"\\boxed{{{text}}}", parsing_timeout=timeout_seconds, raise_on_error=True))
    except Exception:  # a text that does not parse will not parse next time either (TimeoutException is no Exception)
        return ()


# Answers in words. math-verify reads `Yes` as the product E*s*y (e is Euler's number) and `YES` as e*s*y, and a
# full stop after a word as no answer, so `YES` and `Yes.` were wrong against `Yes` and other answers in a majority
# vote (found by review). These compare as words, whatever their case, spacing, \text{} or full stop.
TEXT_ANSWERS = frozenset({"yes", "no", "true", "false", "none", "always", "never", "possible", "impossible",
                          "undefined", "does not exist", "dne", "converges", "diverges", "finite", "infinite", "even",
                          "odd"})
_WORDS_RE = re.compile(r"^(?:\\(?:text|textbf|textit|textsf|textrm|textnormal|mathrm|mathbf|mathit|mathsf|mbox|emph)"
                       r"\s*\{\s*(?P<boxed>[A-Za-z]+(?:\s+[A-Za-z]+)*)\s*[.;!]?\s*\}|(?P<bare>[A-Za-z]+(?:\s+[A-Za-z]+)*))\s*[.;!]?$")
_MATH_DELIMITERS_RE = re.compile(r"^\s*(?:\$(?P<dollar>.*)\$|\\\((?P<paren>.*)\\\))\s*$", re.DOTALL)


def text_answer(text: str) -> str | None:
    """The answer in TEXT_ANSWERS that `text` writes (lower case, single spaces), or None."""
    text = text.strip()
    if (inline := _MATH_DELIMITERS_RE.match(text)) is not None:  # $\text{Yes}$, \(\text{Yes}\)
        text = (inline["dollar"] if inline["dollar"] is not None else inline["paren"]).strip()
    m = _WORDS_RE.match(text)
    if m is None:
        return None
    words = " ".join((m["boxed"] or m["bare"]).split()).casefold()
    words = "does not exist" if words == "dne" else words
    return words if words in TEXT_ANSWERS else None


def math_equal(gold: str, predicted: str | None, *, timeout_seconds: int = 5) -> bool:
    """Whether `predicted` is mathematically equal to `gold` (both bare LaTeX final answers), by math-verify.
    Never raises: a missing, over-long or unparsable answer is False, and so is a timeout."""
    from math_verify import verify
    from math_verify.errors import TimeoutException  # a BaseException, so `except Exception` would miss it

    if not isinstance(predicted, str) or not predicted.strip() or len(predicted) > MAX_ANSWER_CHARS:
        return False
    words = text_answer(gold), text_answer(predicted)
    if None not in words:  # both in words; otherwise math-verify's, as before (a wrapper the rule does not know)
        return words[0] == words[1]
    # math-verify's timer is signal.alarm, which Python allows only on the main thread.
    on_main_thread = threading.current_thread() is threading.main_thread()
    timeout = timeout_seconds if timeout_seconds > 0 and on_main_thread else None
    try:
        gold_parsed = _parse_latex(gold.strip(), timeout)
        predicted_parsed = _parse_latex(predicted.strip(), timeout)
        if not gold_parsed or not predicted_parsed:
            return False
        if not verify(list(gold_parsed), list(predicted_parsed), timeout_seconds=timeout):
            return False
        if _swapped_values(gold.strip(), gold_parsed[0], predicted_parsed[0], timeout):
            return False
    except (Exception, TimeoutException):
        return False
    # math-verify rounds numbers to six decimals, so 0.0000001 equalled 0.0000005: two numbers must also agree to
    # the sixth significant digit (found by review), whichever reading of a percentage math-verify took
    golds, preds = _real_values(gold.strip(), timeout, digits=None), _real_values(predicted.strip(), timeout, digits=None)
    return not golds or not preds or any(abs(a - b) <= RELATIVE_TOLERANCE * max(abs(a), abs(b))
                                         for a in golds for b in preds)


def _swapped_values(gold_text: str, gold, predicted, timeout: int | None) -> bool:
    """Whether a pair or tuple answer gives other values than a gold answer of equations (x = 3, y = -1), read in
    the order the gold text writes its variables. math-verify compares such a gold answer as an unordered set, so
    (-1, 3) was right for x = 3, y = -1 (found by review); where that order cannot be read, as math-verify does.
    (The variables' names in alphabetical order, as first written here, made (1, 2, 3, 4) wrong for x = 1, y = 2,
    z = 3, w = 4 and (4, 1, 2, 3) right: found by review.)"""
    import sympy
    from math_verify import verify

    if not isinstance(gold, sympy.FiniteSet) or not all(
            isinstance(e, sympy.Eq) and isinstance(e.lhs, sympy.Symbol) for e in gold.args):
        return False
    if isinstance(predicted, sympy.Tuple):
        values = list(predicted.args)
    elif isinstance(predicted, sympy.Interval):  # (a, b) with a < b reads as an open interval
        values = [predicted.start, predicted.end]
    else:
        return False
    written = {e.lhs.name: _written_at(gold_text, e.lhs.name) for e in gold.args}
    if len(values) != len(gold.args) or len(written) != len(gold.args) or None in written.values():
        return False
    equations = sorted(gold.args, key=lambda e: written[e.lhs.name])
    # each value as math-verify compares numbers (0.333333 for 1/3), not exactly
    return any(not verify(e.rhs, v, timeout_seconds=timeout) for e, v in zip(equations, values))


def _written_at(text: str, name: str) -> int | None:
    """Where `text` first writes `name =` (sympy's name of a variable: x, x_1 as x_1 or x_{1}, alpha as \\alpha),
    or None."""
    stem, _, index = name.partition("_")
    pattern = re.escape(stem) + (rf"_\{{?{re.escape(index)}\}}?" if index else "")
    found = re.search(rf"(?<![A-Za-z])\\?{pattern}\s*=", text)
    return None if found is None else found.start()


def _real_values(text: str, timeout_seconds: int | None, digits: int | None = 6) -> tuple[float, ...]:
    """The value of an answer that parses to a finite real number (1/2, 0.5, \\sqrt{2}/2, and so x=0.5 and
    \\{0.5\\}, which math-verify equals to 0.5), rounded to `digits` decimals (math-verify's six; None: not
    rounded); a percentage has two, 50\\% is 0.5 and 50 (math-verify equals it to both). Empty for anything else
    (sets, intervals, expressions with a variable, infinities). Rounded, only a key to find candidates by: 10^{-9}
    and 0 round alike, and so do integers past 2^53. Found by review: an equation, a one-element set and a
    percentage had no value, so their numbers were compared at math-verify's six decimals; and an infinity's
    value (\\infty, 10^{400}) never equalled itself."""
    import sympy
    from math_verify.errors import TimeoutException
    from math_verify.utils import timeout

    try:
        parsed = _parse_latex(text, timeout_seconds)
        expr = parsed[0] if parsed else None
        if isinstance(expr, sympy.Eq):  # x = 0.5 is a number; 2x+3y=6 is not (it equals 4x+6y=12: review)
            number = [s for s, other in ((expr.rhs, expr.lhs), (expr.lhs, expr.rhs)) if s.is_number and other.is_Symbol]
            expr = number[0] if number else expr
        if isinstance(expr, sympy.FiniteSet) and len(expr) == 1:
            expr = next(iter(expr))
        if not getattr(expr, "is_number", False):
            return ()
        # A percentage is 50*UnevaluatedExpr(1/100): that alone is unwrapped (doit() summed \\sum_{k=1}^{100000}
        # exactly, outside any timeout: found by review)
        expr = expr.replace(lambda x: isinstance(x, sympy.UnevaluatedExpr), lambda x: x.args[0])
        # A sum, product, integral or limit left unevaluated is no plain number, and its evalf ran for minutes
        # (\sum_{k=1}^{10^9} \sin(k^2)) outside math-verify's timer, stalling majority@n (found by review); any
        # other evaluation runs under the timer too.
        if expr.has(sympy.Sum, sympy.Product, sympy.Integral, sympy.Limit, sympy.Derivative):
            return ()
        value = timeout(timeout_seconds)(lambda: complex(expr.evalf()))()
    except (Exception, TimeoutException):  # sympy raises many kinds on odd input: then it is not a plain number
        return ()
    if value.imag or not math.isfinite(value.real):  # complex, infinite or nan
        return ()
    values = (value.real, value.real * 100) if text.rstrip().endswith("%") else (value.real,)
    return values if digits is None else tuple(round(v, digits) for v in values)


def math_answer_classes(answers: Sequence[str | None], *, timeout_seconds: int = 5) -> list[int | None]:
    """Class numbers by first appearance (None for no answer) where math-verify's equal answers share one:
    \\frac{1}{2}, 0.5 and 1/2 are one answer. An answer is compared by `math_equal` with the first member of each
    class it could equal: a real number only with the classes of numbers of the same rounded value (a thousand
    numeric samples cost a thousand parses and about as many comparisons, not half a million) and with those that
    are not numbers (x=3 and 3 are one answer); anything else with every class. A spelling seen before is not
    compared again. An answer that does not parse, or is longer than MAX_ANSWER_CHARS, is its own text. The rounded
    value alone used to decide, and put 10^{-9} with 0, so a majority vote picked the wrong one."""
    on_main_thread = threading.current_thread() is threading.main_thread()
    timeout = timeout_seconds if timeout_seconds > 0 and on_main_thread else None
    by_text: dict[str, int] = {}
    by_value: dict[float, list[int]] = {}
    firsts: list[tuple[str, bool]] = []  # each class's first member, and whether it is a number
    comparable: list[int] = []  # the classes whose first member is short enough to parse
    out: list[int | None] = []
    for answer in answers:
        if answer is None:
            out.append(None)
            continue
        text = answer.strip()
        if text not in by_text:
            # An over-long answer is never parsed, here nor as the gold side of a later comparison: its own class.
            short = len(text) <= MAX_ANSWER_CHARS
            values = _real_values(text, timeout) if text and short else ()
            if not short:
                candidates = []
            elif not values:
                candidates = comparable
            else:  # numbers of different rounded values are different answers
                candidates = [c for v in values for c in by_value.get(v, [])]
                candidates += [c for c in comparable if not firsts[c][1]]
            cls = next((c for c in candidates if math_equal(firsts[c][0], text, timeout_seconds=timeout_seconds)),
                       None)
            if cls is None:
                cls = len(firsts)
                firsts.append((text, bool(values)))
                if short:
                    comparable.append(cls)
                for v in values:
                    by_value.setdefault(v, []).append(cls)
            by_text[text] = cls
        out.append(by_text[text])
    return out


class DeepMathTask(FileTask):
    name = "deepmath"

    load = staticmethod(load_examples)

    def extract_answer(self, completion: str) -> str | None:
        return extract_answer(completion)

    def verify(self, example: Example, answer: str | None) -> bool:
        return math_equal(example.answer, answer, timeout_seconds=self.cfg.verify_timeout_seconds)

    def answer_classes(self, answers: Sequence[str | None]) -> list[int | None]:
        return math_answer_classes(answers, timeout_seconds=self.cfg.verify_timeout_seconds)
