"""Countdown: reach a target from given integers with + - * / and parentheses, each number used exactly once.

The default is the easy Countdown the embedded model can learn on a CPU: three integers from 1 to 13, target 10
(164 solvable number multisets: 100 training demonstrations, 64 held out). The paper's 24-game is four integers,
target 24 (configs/countdown-24.yaml). Arithmetic is exact (fractions): 8/(3-8/3) is 24. Expressions are parsed by a small recursive-descent parser, never `eval`. Expert demonstrations are
final expressions only, as in the paper; the search traces below exist only for the embedded model's format
warm-up (raro_fast/warmup.py), on puzzles with other targets.
"""
from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field
from fractions import Fraction
from functools import lru_cache
from math import comb
from typing import Literal, Sequence, get_args

from raro_fast import prompts
from raro_fast.tasks.base import Example, Task, classes_by_key

MAX_EXPRESSION_CHARS = 256
_ENUMERATE_LIMIT = 200_000  # multisets; beyond this the generator samples instead of enumerating
ExpertForm = Literal["canonical", "varied"]


@dataclass(kw_only=True)
class CountdownConfig:
    num_numbers: int = field(default=3, metadata={"help": "Integers per puzzle (the 24-game: 4)."})
    min_number: int = field(default=1, metadata={"help": "Smallest integer in a puzzle."})
    max_number: int = field(default=13, metadata={"help": "Largest integer in a puzzle."})
    target: int = field(default=10, metadata={"help": "The value to reach (the 24-game: 24); with max_target, the "
                                                       "smallest target."})
    max_target: int = field(default=0, metadata={
        "help": "0: every puzzle has `target`. Else each puzzle has its own target in target..max_target, one per "
                "number multiset (the Countdown of the RL literature, e.g. TinyZero's, varies the target)."})
    num_train: int = field(default=100, metadata={"help": "Training demonstrations (distinct puzzles)."})
    num_heldout: int = field(default=64, metadata={"help": "Held-out puzzles, never sharing a number multiset with training."})
    seed: int = field(default=0, metadata={"help": "Seed of the puzzle split."})
    expert_form: ExpertForm = field(default="canonical", metadata={
        "help": "How the expert demonstrations are written. canonical: the solver's one expression per puzzle, in "
                "its house style (smaller operands and natural steps first). varied: for each puzzle one of all its "
                "expressions with whole, non-negative steps, drawn at random (seeded): operands in any order, any "
                "bracketing, as different people would write them, so no style singles the expert out."})

    def __post_init__(self) -> None:
        if self.expert_form not in get_args(ExpertForm):
            raise ValueError(f"task.countdown.expert_form must be one of {', '.join(get_args(ExpertForm))}, got "
                             f"{self.expert_form!r}")
        if self.num_numbers < 2:
            raise ValueError(f"task.countdown.num_numbers must be >= 2, got {self.num_numbers}")
        if not 0 <= self.min_number <= self.max_number:
            raise ValueError(
                f"task.countdown.min_number/max_number: need 0 <= min_number <= max_number, got {self.min_number}, {self.max_number}"
            )
        if self.max_target and self.max_target < self.target:
            raise ValueError(f"task.countdown.max_target must be 0 (one target) or >= target, got {self.max_target} "
                             f"with target {self.target}")
        if self.num_train < 1 or self.num_heldout < 0:
            raise ValueError(f"task.countdown.num_train must be >= 1 and task.countdown.num_heldout >= 0, got {self.num_train}, {self.num_heldout}")


@dataclass(frozen=True)
class Puzzle:
    numbers: tuple[int, ...]
    target: int

    @property
    def key(self) -> tuple[tuple[int, ...], int]:
        return tuple(sorted(self.numbers)), self.target


# ---------------------------------------------------------------------------------------------------------------
# Expressions: a tiny AST, parsing and printing.

# A node is an int (a leaf) or a tuple (op, left, right).
_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}
# The look-alikes a tokenizer may give for the four operators (the en dash, the asterisk operator and the middle dot
# were refused while ×, ÷ and the minus sign counted: a right answer hung on the glyph; found by review).
_ALIASES = {"×": "*", "÷": "/", "−": "-", "–": "-", "∗": "*", "·": "*", "⋅": "*"}


def _apply(op: str, a: Fraction, b: Fraction) -> Fraction | None:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    return None if b == 0 else a / b


def to_string(node) -> str:
    """Infix text with only the parentheses precedence needs."""
    if isinstance(node, int):
        return str(node)
    op, left, right = node
    ls, rs = to_string(left), to_string(right)
    if not isinstance(left, int) and _PREC[left[0]] < _PREC[op]:
        ls = f"({ls})"
    if not isinstance(right, int) and (_PREC[right[0]] < _PREC[op] or (_PREC[right[0]] == _PREC[op] and op in "-/")):
        rs = f"({rs})"
    return f"{ls}{op}{rs}"


class _ParseError(Exception):
    pass


def _tokens(text: str) -> list[str]:
    out, i = [], 0
    while i < len(text):
        ch = _ALIASES.get(text[i], text[i])
        if ch.isspace():
            i += 1
        elif ch in "+-*/()":
            out.append(ch)
            i += 1
        elif "0" <= ch <= "9":
            j = i
            while j < len(text) and "0" <= text[j] <= "9":
                j += 1
            literal = text[i:j]
            if len(literal) > 1 and literal[0] == "0":
                raise _ParseError(f"number with a leading zero: {literal}")
            out.append(literal)
            i = j
        else:
            raise _ParseError(f"unexpected character {ch!r}")
    return out


def parse(text: str):
    """AST of `text`, or raise _ParseError. Grammar: expr := term (("+"|"-") term)*; term := factor (("*"|"/")
    factor)*; factor := INTEGER | "(" expr ")". There is no unary minus: the puzzle gives positive integers."""
    toks = _tokens(text)
    pos = 0

    def peek():
        return toks[pos] if pos < len(toks) else None

    def take():
        nonlocal pos
        pos += 1
        return toks[pos - 1]

    def expr():
        node = term()
        while peek() in ("+", "-"):
            node = (take(), node, term())
        return node

    def term():
        node = factor()
        while peek() in ("*", "/"):
            node = (take(), node, factor())
        return node

    def factor():
        tok = peek()
        if tok is None:
            raise _ParseError("unexpected end")
        if tok == "(":
            take()
            node = expr()
            if peek() != ")":
                raise _ParseError("missing )")
            take()
            return node
        if tok.isdigit():
            return int(take())
        raise _ParseError(f"unexpected {tok!r}")

    try:
        node = expr()
    except RecursionError:  # three frames per "(": 255 of them, read deep in a caller's stack, are too many
        raise _ParseError("brackets nested too deeply") from None
    if pos != len(toks):
        raise _ParseError(f"unexpected {toks[pos]!r}")
    return node


def _leaves(node) -> list[int]:
    return [node] if isinstance(node, int) else _leaves(node[1]) + _leaves(node[2])


Step = tuple[str, Fraction, Fraction, "Fraction | None"]  # (op, a, b, c) of "a op b=c"; c None: division by zero


def _value(node, steps: list[Step] | None = None) -> Fraction | None:
    """Exact value (None on division by zero); `steps` collects each operation in evaluation order."""
    if isinstance(node, int):
        return Fraction(node)
    op, left, right = node
    a, b = _value(left, steps), _value(right, steps)
    if a is None or b is None:
        return None
    c = _apply(op, a, b)
    if steps is not None:
        steps.append((op, a, b, c))
    return c


def expression_step_values(node) -> list[Step]:
    """The evaluation of an expression tree, operation by operation in order: what `expression_steps` writes."""
    steps: list[Step] = []
    _value(node, steps)
    return steps


def step_text(step: Step) -> str:
    op, a, b, c = step
    return f"{_operand(a)}{op}{_operand(b)}=" + ("undefined" if c is None else _fmt(c))


def expression_steps(node) -> list[str]:
    """The evaluation of an expression tree as the traces write it: "a op b=c" per operation, in order."""
    return [step_text(step) for step in expression_step_values(node)]


def _fmt(x: Fraction) -> str:
    return str(x.numerator) if x.denominator == 1 else f"{x.numerator}/{x.denominator}"


def _operand(x: Fraction) -> str:
    # A fraction or a negative number as an operand is bracketed: "12/(6/7)", not the different "12/6/7".
    return _fmt(x) if x.denominator == 1 and x >= 0 else f"({_fmt(x)})"


def evaluate(expression: str) -> Fraction | None:
    """Exact value of an expression, or None if it does not parse or divides by zero."""
    if not isinstance(expression, str) or len(expression) > MAX_EXPRESSION_CHARS:
        return None
    try:
        return _value(parse(expression))
    except _ParseError:
        return None


def _check(numbers, target, expression) -> tuple[object, str | None]:
    """(ast, None) when `expression` solves the puzzle, else (ast or None, the reason it does not)."""
    if not isinstance(expression, str) or not expression.strip():
        return None, "no expression"
    if len(expression) > MAX_EXPRESSION_CHARS:
        return None, "expression too long"
    try:
        node = parse(expression)
    except _ParseError:
        return None, "not a valid expression"
    used, given = sorted(_leaves(node)), sorted(numbers)
    if used != given:
        extra = [n for n in set(used) if used.count(n) > given.count(n)]
        missing = [n for n in set(given) if given.count(n) > used.count(n)]
        if extra:
            n = extra[0]
            return node, f"uses {n} " + ("too often" if n in given else "which is not given")
        return node, f"does not use {missing[0]}"
    value = _value(node)
    if value is None:
        return node, "divides by zero"
    if value != target:
        return node, f"makes {_fmt(value)}, not {target}"
    return node, None


def verify(numbers, target, expression) -> bool:
    """True iff `expression` uses exactly the given numbers (each once), only + - * / and parentheses, and equals
    `target` exactly. Never raises: any other input is False."""
    try:
        return _check(tuple(numbers), target, expression)[1] is None
    except (TypeError, ValueError, RecursionError):
        return False


# ---------------------------------------------------------------------------------------------------------------
# Solving.


def _combine(a: Fraction, b: Fraction):
    """Every (op, left is a?, value) obtainable from a and b in either order, in a fixed order that tries
    non-negative differences and whole quotients first (so the solver's answers read naturally)."""
    big_first = a >= b
    yield "+", True, a + b
    yield "*", True, a * b
    yield "-", big_first, abs(a - b)
    quotients = [(True, a / b)] if b != 0 else []
    quotients += [(False, b / a)] if a != 0 else []
    quotients.sort(key=lambda q: q[1].denominator != 1)
    for a_first, v in quotients:
        yield "/", a_first, v
    if a != b:
        yield "-", not big_first, -abs(a - b)


@lru_cache(maxsize=200_000)
def _reachable(values: tuple[Fraction, ...], target: Fraction) -> bool:
    if len(values) == 1:
        return values[0] == target
    for i, j in itertools.combinations(range(len(values)), 2):
        rest = values[:i] + values[i + 1 : j] + values[j + 1 :]
        for _op, _first, v in _combine(values[i], values[j]):
            if _reachable(tuple(sorted(rest + (v,))), target):
                return True
    return False


def _solve_nodes(items: list[tuple[Fraction, object]], target: Fraction):
    if len(items) == 1:
        return items[0][1] if items[0][0] == target else None
    for i, j in itertools.combinations(range(len(items)), 2):
        (a, na), (b, nb) = items[i], items[j]
        rest = items[:i] + items[i + 1 : j] + items[j + 1 :]
        for op, a_first, v in _combine(a, b):
            if _reachable(tuple(sorted([x for x, _ in rest] + [v])), target):
                node = (op, na, nb) if a_first else (op, nb, na)
                return _solve_nodes(rest + [(v, node)], target)
    return None


def solve_ast(numbers, target):
    items = [(Fraction(n), int(n)) for n in sorted(numbers)]
    return _solve_nodes(items, Fraction(target))


def solve(numbers, target) -> str | None:
    """A valid expression for the puzzle (deterministic), or None if there is none."""
    node = solve_ast(numbers, target)
    return None if node is None else to_string(node)


def _trees_by_value(leaves: tuple[int, ...], mask: int, memo: dict) -> dict[Fraction, list[tuple[object, bool]]]:
    """{value: [(node, natural), ...]} for every expression tree over the leaves in `mask` (a bit set), each used
    once, operands in either order; `natural`: every step's value is a whole number >= 0. Built from the trees of
    every split of `mask` in two, each subset's trees computed once."""
    if mask in memo:
        return memo[mask]
    out: dict[Fraction, list[tuple[object, bool]]] = {}
    if mask & (mask - 1) == 0:
        leaf = leaves[mask.bit_length() - 1]
        out[Fraction(leaf)] = [(leaf, True)]
    else:
        for left, right in _splits(mask):
            for a, lefts in _trees_by_value(leaves, left, memo).items():
                for b, rights in _trees_by_value(leaves, right, memo).items():
                    for op in "+-*/":
                        v = _apply(op, a, b)
                        if v is None:
                            continue
                        step = v >= 0 and v.denominator == 1
                        out.setdefault(v, []).extend(((op, na, nb), step and nat_a and nat_b)
                                                     for na, nat_a in lefts for nb, nat_b in rights)
    memo[mask] = out
    return out


def _splits(mask: int):
    """Every ordered pair (left, right) of non-empty bit sets that partition `mask`."""
    sub = (mask - 1) & mask
    while sub:
        yield sub, mask ^ sub
        sub = (sub - 1) & mask


@lru_cache(maxsize=4096)
def solutions(numbers: tuple[int, ...], target: int, *, natural: bool = False) -> tuple[str, ...]:
    """Every distinct expression text (as `to_string` prints it) that makes `target` with each number once, sorted;
    with `natural`, only those whose every step is a whole number >= 0."""
    leaves = tuple(int(n) for n in sorted(numbers))
    full, memo, want, found = (1 << len(leaves)) - 1, {}, Fraction(target), set()
    whole_target = want >= 0 and want.denominator == 1
    if len(leaves) == 1:
        return (str(leaves[0]),) if want == leaves[0] else ()
    for left, right in _splits(full):  # the last step only where it makes the target: most trees are never built
        rights_by_value = _trees_by_value(leaves, right, memo)
        for a, lefts in _trees_by_value(leaves, left, memo).items():
            for b, rights in rights_by_value.items():
                for op in "+-*/":
                    if _apply(op, a, b) != want:
                        continue
                    found.update(to_string((op, na, nb)) for na, nat_a in lefts for nb, nat_b in rights
                                 if not natural or (whole_target and nat_a and nat_b))
    return tuple(sorted(found))


def expert_answer(numbers, target, form: str, seed: int) -> str | None:
    """The demonstration's expression in the given `form` (see CountdownConfig.expert_form)."""
    if form == "canonical":
        return _within_limit(solve(numbers, target), numbers, target)
    key = tuple(sorted(numbers))
    choices = solutions(key, target, natural=True) or solutions(key, target)
    answer = random.Random(f"{seed}:{key}:{target}").choice(choices) if choices else None
    return _within_limit(answer, numbers, target)


def _within_limit(answer: str | None, numbers, target) -> str | None:
    """A demonstration longer than `verify` reads would be refused as its own answer: say so at start."""
    if answer is not None and len(answer) > MAX_EXPRESSION_CHARS:
        raise ValueError(f"task: the expert answer to {list(numbers)} -> {target} has {len(answer)} characters, more "
                         f"than the {MAX_EXPRESSION_CHARS} an answer may have; use fewer numbers")
    return answer


# ---------------------------------------------------------------------------------------------------------------
# Puzzles and splits.


def question_text(numbers, target) -> str:
    return f"Using {', '.join(map(str, numbers))} each exactly once with + - * / and parentheses, make {target}."


def generate_puzzles(
    *, num: int, num_numbers: int = 4, min_number: int = 1, max_number: int = 13, target: int = 24, seed: int = 0,
    max_target: int = 0,
) -> list[Puzzle]:
    """`num` distinct solvable puzzles (distinct number multisets), deterministic in `seed`, each with its numbers
    in a shuffled order; with `max_target`, each multiset's target is drawn from those in target..max_target it
    can make. Raises ValueError if fewer exist."""
    rng = random.Random(seed)
    span = max_number - min_number + 1
    space = comb(span + num_numbers - 1, num_numbers)
    targets = range(target, max(target, max_target) + 1)
    wanted = f"make {target}" if len(targets) == 1 else f"make a target in {target}..{max_target}"

    def draw(key: tuple[int, ...]) -> Puzzle | None:
        values = tuple(Fraction(n) for n in key)
        made = [t for t in targets if _reachable(values, Fraction(t))]
        return _shuffled(key, rng.choice(made), rng) if made else None

    out: list[Puzzle] = []
    if space <= _ENUMERATE_LIMIT:
        keys = list(itertools.combinations_with_replacement(range(min_number, max_number + 1), num_numbers))
        rng.shuffle(keys)
        for key in keys:
            puzzle = draw(key)
            if puzzle is not None:
                out.append(puzzle)
                if len(out) == num:
                    return out
        raise ValueError(
            f"task: only {len(out)} solvable puzzles of {num_numbers} numbers in {min_number}..{max_number} "
            f"{wanted}; asked for {num}"
        )
    seen: set[tuple[int, ...]] = set()
    tries = 0
    while len(out) < num:
        tries += 1
        if tries > 50 * num + 1000:
            raise ValueError(f"task: could not find {num} solvable puzzles that {wanted} (found {len(out)})")
        key = tuple(sorted(rng.randint(min_number, max_number) for _ in range(num_numbers)))
        if key in seen:
            continue
        seen.add(key)
        puzzle = draw(key)
        if puzzle is not None:
            out.append(puzzle)
    return out


def _shuffled(key: tuple[int, ...], target: int, rng: random.Random) -> Puzzle:
    nums = list(key)
    rng.shuffle(nums)
    return Puzzle(tuple(nums), target)


def split_puzzles(cfg: CountdownConfig) -> tuple[list[Puzzle], list[Puzzle]]:
    """(train, heldout): one draw of distinct multisets, held-out first; so they never share a puzzle."""
    return _split(cfg.num_train, cfg.num_heldout, cfg.num_numbers, cfg.min_number, cfg.max_number, cfg.target, cfg.seed,
                  cfg.max_target)


@lru_cache(maxsize=16)
def _split(num_train, num_heldout, num_numbers, min_number, max_number, target, seed, max_target):
    puzzles = generate_puzzles(
        num=num_train + num_heldout,
        num_numbers=num_numbers,
        min_number=min_number,
        max_number=max_number,
        target=target,
        seed=seed,
        max_target=max_target,
    )
    return puzzles[num_heldout:], puzzles[:num_heldout]


class CountdownTask(Task):
    name = "countdown"

    def __init__(self, cfg: CountdownConfig) -> None:
        self.cfg = cfg
        self._splits: dict[str, list[Example]] | None = None

    def examples(self, split: str) -> list[Example]:
        self.check_split(split)
        if self._splits is None:
            train, heldout = split_puzzles(self.cfg)
            self._splits = {"train": [self._example(p) for p in train], "heldout": [self._example(p) for p in heldout]}
        return list(self._splits[split])

    def _example(self, p: Puzzle) -> Example:
        key = "-".join(map(str, sorted(p.numbers)))
        return Example(
            id=f"countdown:{key}:{p.target}",
            question=question_text(p.numbers, p.target),
            answer=expert_answer(p.numbers, p.target, self.cfg.expert_form, self.cfg.seed),
            meta={"numbers": list(p.numbers), "target": p.target},
        )

    def extract_answer(self, completion: str) -> str | None:
        """The last answer tag's content if it is an arithmetic expression (integers, + - * / and parentheses, by
        the grammar of `parse`; neither the numbers nor the value are checked), else None: text beside an
        expression is no answer. The critic reads the answer, and a RARO policy learned to write `7+7-4 mak10)`, the
        expert's expression with a claim that it makes the target, which its critic paid more than the expert's
        own answer (docs/experiments.md, section 13)."""
        answer = prompts.parse_answer(completion)
        return answer if answer is not None and _is_expression(answer) else None

    def verify(self, example: Example, answer: str | None) -> bool:
        return answer is not None and verify(example.meta["numbers"], example.meta["target"], answer)

    def answer_classes(self, answers: Sequence[str | None]) -> list[int | None]:
        """The same expression is one answer however it is spaced or parenthesised (`(8+2)` and `8 + 2`); an
        expression that does not parse is its text without whitespace."""
        return classes_by_key(answers, _expression_key)


def _is_expression(text: str) -> bool:
    if len(text) > MAX_EXPRESSION_CHARS:
        return False
    try:
        parse(text)
    except _ParseError:
        return False
    return True


def _expression_key(answer: str) -> str:
    if len(answer) <= MAX_EXPRESSION_CHARS:  # the parser recurses per parenthesis: bound it as `verify` does
        try:
            return to_string(parse(answer))
        except _ParseError:
            pass
    # marked as text: "1 0+5", which does not parse, was keyed "10+5", the class of the expression 10+5
    return "text:" + "".join(answer.split())


# ---------------------------------------------------------------------------------------------------------------
# Reasoning traces for the format warm-up of the embedded model (never for the task's own puzzles).


def search_trace(numbers, target, *, rng: random.Random, max_attempts: int = 2, solution: str | None = None) -> str:
    """A short solver-style search: up to `max_attempts` dead ends, then the chain that works (`solution` if
    given, else the solver's). Every step written is true arithmetic ("a op b=c"); dead ends end with "no", the
    last chain with "yes"."""
    parts = []
    for _ in range(rng.randint(0, max_attempts)):
        steps: list[Step] = []
        if _value(random_expression(numbers, rng), steps) != target and steps and steps[-1][3] is not None:
            parts.append(" ".join(map(step_text, steps)) + " no.")
    node = parse(solution) if solution is not None else solve_ast(numbers, target)
    if node is None:
        return " ".join(parts + ["no solution."])
    parts.append(" ".join(expression_steps(node)) + " yes.")
    return " ".join(parts)


def random_expression(numbers, rng: random.Random, ops: str = "+-*"):
    """A random expression tree over all of `numbers` (an AST; `to_string` prints it). The default operators
    keep every intermediate a whole number, which keeps warm-up traces easy to read."""
    items: list[object] = list(numbers)
    rng.shuffle(items)
    while len(items) > 1:
        a, b = items.pop(rng.randrange(len(items))), items.pop(rng.randrange(len(items)))
        items.append((rng.choice(ops), a, b))
    return items[0]


FORWARD_TRIES = 100_000  # draws before forward_puzzle gives up: at the defaults about 1 in 3 is kept


def forward_puzzle(rng: random.Random, *, num_numbers: int, min_number: int, max_number: int,
                   min_target: int, max_target: int, exclude_target: int | None = None,
                   exclude: frozenset = frozenset(), max_tries: int = FORWARD_TRIES) -> tuple[Puzzle, str]:
    """A puzzle made backwards: random numbers, a random expression over them, and its value as the target
    (kept when a whole number in [min_target, max_target] other than `exclude_target`, and not a puzzle whose
    `key` is in `exclude`). Solvable by construction, with its solution, and no search needed. Raises ValueError
    when the range holds no target but `exclude_target`, or when `max_tries` draws keep none (no number of the
    range can make a target in it, or all that can are excluded)."""
    if not any(t != exclude_target for t in range(min_target, max_target + 1)):
        raise ValueError(f"no target in {min_target}..{max_target}" + (
            f" other than the excluded {exclude_target}" if exclude_target is not None else ""))
    for _ in range(max_tries):
        numbers = tuple(rng.randint(min_number, max_number) for _ in range(num_numbers))
        node = random_expression(numbers, rng, ops="+-*/")
        value = _value(node)
        if value is not None and value.denominator == 1 and min_target <= value <= max_target and value != exclude_target:
            puzzle = Puzzle(numbers, int(value))
            if puzzle.key not in exclude:
                return puzzle, to_string(node)
    raise ValueError(f"no puzzle of {num_numbers} numbers in {min_number}..{max_number} with a target in "
                     f"{min_target}..{max_target}" + (f" other than {exclude_target}" if exclude_target is not None else "")
                     + (" and not one of the excluded puzzles" if exclude else "") + f" in {max_tries} random draws")


def evaluation_trace(numbers, target, expression: str) -> str:
    """How a careful reader checks a candidate: its steps, then its value set against the target ("21-11=10; 10 vs
    10: ok.", "9+8=17; 17 vs 10: no."), or why it is not a valid answer. The target is copied next to the value
    before the verdict, so the verdict is an equality check of two numbers side by side, which a small model learns
    for every value at once. Warm-up puzzles never have the task's target: a trace that said only "ok." or "makes
    10, not 12." taught the critic that a value of 10 is never right, and it rejected the task's right answers
    ("18-8=10 makes 10, not 10.")."""
    node, problem = _check(tuple(numbers), target, expression)
    head = " ".join(expression_steps(node)) if node is not None else ""
    if problem in ("no expression", "expression too long", "not a valid expression") or problem and problem.startswith(
            ("uses", "does not")):
        return f"{problem}."
    if problem == "divides by zero":
        return f"{head} {problem}."
    value = _value(node)
    return f"{head}; {compared(value, target, ok=problem is None)}"


def compared(value: Fraction, target: int, *, ok: bool) -> str:
    """The last words of a check: a value set against the target, then the verdict ("10 vs 10: ok.")."""
    return f"{_fmt(value)} vs {target}: {'ok' if ok else 'no'}."
