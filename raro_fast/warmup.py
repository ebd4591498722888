"""Format warm-up of the embedded default model: the "base ability to answer in format" and to check arithmetic.

A model built from random weights cannot read a prompt, so RARO would have nothing to start from. A real run
starts from an instruct checkpoint that already reasons and follows formats; the embedded default gets the
smallest stand-in for that: a few thousand steps of next-token training on synthetic conversations in the
formats it will be asked for:
  - policy: the steps of the expression the puzzle was made from (`search_trace`, with no dead ends) in <think>,
    the expression in <answer>;
  - critic: both candidate answers evaluated step by step (`evaluation_trace`: steps, then "value vs target") in
    <think>, then a verdict (the correct one; tie when both or neither are correct), against other answers shaped
    like a policy's (`_candidate_answer`);
  - optionally (`warmup.arithmetic_fraction`) arithmetic drills: true steps "a op b=c" of random expressions, each
    set against a stated number ("make 10: 2*5=10; 10 vs 10: ok."), the facts a critic checks, which a 0.8M model
    otherwise gets wrong; never the solution of one of the task's puzzles.
All warm-up puzzles are made backwards (random numbers, a random expression, its value as the target) and never
are the task's (`task_exclusion`): for a task with one target, by default no warm-up puzzle makes that target, so
what RARO learns about it comes from the game between policy and critic (at the price, measured in
docs/experiments.md section 2, of a critic that learns the target is never right); otherwise only the task's own
puzzles are left out. The same rule (`_is_left_out`) holds for every expression the corpus shows, not only the
puzzles: a critic's other answer and every sub-expression of a drill that uses as many numbers as a puzzle has
are drawn again when they would be a left-out puzzle's solution. The expert demonstrations stay answers-only
either way.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from fractions import Fraction

import torch
from tqdm import tqdm

from raro_fast import prompts
from raro_fast.config import WarmupConfig
from raro_fast.rollout.embedded import EmbeddedEngine
from raro_fast.rollout.engine import SamplingParams
from raro_fast.tasks.countdown import (CountdownConfig, Puzzle, Step, _leaves, _value, compared, evaluate,
                                       evaluation_trace, expression_step_values, forward_puzzle, parse, question_text,
                                       random_expression, search_trace, split_puzzles, step_text, to_string, verify)


@dataclass
class WarmupExample:
    input_ids: list[int]
    prompt_len: int


def _candidate_answer(numbers: tuple[int, ...], expert: str, rng: random.Random) -> str:
    """The other answer of a warm-up critic pair: 20% the expert's own (both right: tie); 40% the expert's
    expression with its numbers permuted, which keeps the expert's shape (12-(11-9) -> 9-(11-12)); 40% the numbers
    joined by + - * (rarely right). The verdict is computed from both answers, never assumed. The permuted ones are
    the hard negatives: a critic that only saw joined numbers judged expert-shaped wrong answers like 13-(2-8)
    right, and RARO's policy learnt to write them (held-out accuracy 0.16 -> 0.03 in 40 steps while a verifier's
    verdict took it to 0.22). How hard they are depends on the puzzles. Measured by review (20,000 draws): on the
    default job's warm-up puzzles (3 numbers, targets 1-30 but 10) a permuted answer is still right about half
    the time (a+b+c, a*b*c keep their value; 22% are the same text), so about 45% of critic pairs end in a tie and
    expert-shaped wrong answers are about 19% of them; on the 24-game's 4 numbers, 26% of permuted answers are
    right. The shipped base was warmed up on this corpus."""
    r = rng.random()
    if r < 0.2:
        return expert
    nums = list(numbers)
    rng.shuffle(nums)
    if r < 0.6:
        return to_string(_with_leaves(parse(expert), iter(nums)))
    expr = str(nums[0])
    for n in nums[1:]:
        expr = f"{expr}{rng.choice('+-*')}{n}"
    return expr


MAX_REDRAWS = 1000  # draws of one shown expression before the corpus builder gives up (ValueError)


def _shown_candidate(numbers: tuple[int, ...], expert: str, rng: random.Random, redraw: random.Random,
                     task: CountdownConfig, unseen: dict) -> str:
    """`_candidate_answer` that is never a left-out puzzle's solution (the numbers are the warm-up puzzle's, so
    e.g. 5+3+2 for a puzzle of 2, 3 and 5 in a task whose target is 10). A left-out draw is drawn again from
    `redraw`, a generator of the sequence's own, so that `rng`, and with it every other sequence, stays as it was."""
    other = _candidate_answer(numbers, expert, rng)
    for _ in range(MAX_REDRAWS):
        if not _any_left_out(_subexpressions(parse(other)), task, unseen):
            return other
        other = _candidate_answer(numbers, expert, redraw)
    raise ValueError(f"warm-up: no other answer for the critic over {numbers} that is not a solution of a task "
                     f"puzzle in {MAX_REDRAWS} draws")


def _with_leaves(node, leaves):
    """`node` with its numbers replaced, left to right, by `leaves`."""
    if isinstance(node, int):
        return next(leaves)
    op, left, right = node
    return (op, _with_leaves(left, leaves), _with_leaves(right, leaves))


def _batch_role(batch_index: int, cfg: WarmupConfig) -> str:
    r = random.Random(f"{cfg.seed}/role/{batch_index}").random()
    if r < cfg.critic_fraction:
        return "critic"
    return "arithmetic" if r < cfg.critic_fraction + cfg.arithmetic_fraction else "policy"


ARITHMETIC_PROMPT = "Practice arithmetic."
ARITHMETIC_EXPRESSIONS = 4  # a drill about as long as a critic trace: both stay on the fast attention path


def arithmetic_drill(task: CountdownConfig, cfg: WarmupConfig, rng: random.Random, unseen: dict) -> str:
    """Random expressions over the task's numbers (2 to one more than a puzzle has), all four operators, each after
    a number to make and checked against it in the traces' own words ("make 10: 2*5=10; 10 vs 10: ok.", "make 25:
    7+2=9; 9 vs 25: no."): the facts a critic must get right, many to a sequence instead of four.

    The number to make is the value itself half the time, else any number of the targets' range, the task's
    targets among them: the critic learns to copy the stated target and compare it with the value for every value,
    where a warm-up whose critic traces never compared with the task's target taught it that 10 is never 10
    ("18-8=10; 10 vs 10: no", docs/experiments.md, section 2). No drill shows a solution of one of the task's
    puzzles (`unseen`, as for the warm-up's puzzles): no expression or sub-expression over as many numbers as a
    puzzle has makes what the warm-up leaves out, however its steps are read (a drill shows steps, not the
    expression: `_readings`); such an expression is drawn again."""
    lines: list[str] = []
    for _ in range(MAX_REDRAWS * ARITHMETIC_EXPRESSIONS):
        if len(lines) == ARITHMETIC_EXPRESSIONS:
            break
        numbers = [rng.randint(task.min_number, task.max_number) for _ in range(rng.randint(2, task.num_numbers + 1))]
        node = random_expression(numbers, rng, ops="+-*/")
        value = evaluate(to_string(node))
        step_values = expression_step_values(node)
        if _any_left_out(_readings(step_values), task, unseen):
            continue
        steps = " ".join(map(step_text, step_values))
        if rng.random() < 0.5 and value is not None and value.denominator == 1:
            against = int(value)
        else:
            # From the lowest of the warm-up's and the task's targets: with warmup.min_target above task.target the
            # task's target was stated only when a value made it, always "ok" (found by review).
            against = rng.randint(min(cfg.min_target, task.target), max(cfg.max_target, task.target, task.max_target))
        if value is None:  # as a critic trace ends one (`evaluation_trace`)
            lines.append(f"make {against}: {steps} divides by zero.")
        else:
            lines.append(f"make {against}: {steps}; {compared(value, against, ok=value == against)}")
    if len(lines) < ARITHMETIC_EXPRESSIONS:
        raise ValueError(f"warm-up: arithmetic drills kept only {len(lines)} of {ARITHMETIC_EXPRESSIONS} expressions "
                         f"in {MAX_REDRAWS * ARITHMETIC_EXPRESSIONS} draws: all others showed a solution of a task puzzle")
    return " ".join(lines)


def _is_left_out(numbers, value, unseen: dict, task: CountdownConfig) -> bool:
    """Whether `numbers` making `value` is a puzzle the warm-up must not show (see `task_exclusion`): as many
    numbers as a puzzle has, each in the task's range, making (leave_out target) the task's target or (otherwise)
    one of the task's puzzles."""
    if value is None or value.denominator != 1 or len(numbers) != task.num_numbers:
        return False
    if not all(task.min_number <= n <= task.max_number for n in numbers):
        return False
    if "exclude_target" in unseen:
        return int(value) == unseen["exclude_target"]
    return Puzzle(tuple(numbers), int(value)).key in unseen["exclude"]


def _any_left_out(shown, task: CountdownConfig, unseen: dict) -> bool:
    """Whether any (numbers, value) of `shown` is left out (`_is_left_out`)."""
    return any(_is_left_out(numbers, value, unseen, task) for numbers, value in shown)


def _subexpressions(node):
    """(numbers, value) of every operation of an expression tree: what its text and its steps show."""
    if isinstance(node, int):
        return
    yield _leaves(node), _value(node)
    yield from _subexpressions(node[1])
    yield from _subexpressions(node[2])


def _readings(steps: list[Step]) -> set[tuple[tuple[int, ...], Fraction]]:
    """Every (numbers, value) that steps written without their expression can be read as computing. Each operand is
    either the value of an earlier step not yet used, when it is that value, or a number given (a whole number >= 0,
    as a step writes a number without brackets); every reading is followed, the expression's own among them. Only
    the latest unused step used to count, and `2+13=15 4+1=5 15-5=10`, which a reader takes for 2+13-5 = 10, was
    kept though (2, 5, 13) making 10 is a task puzzle (found by review)."""
    found: set[tuple[tuple[int, ...], Fraction]] = set()

    def operand(x: Fraction, stack: tuple):
        for j in range(len(stack) - 1, -1, -1):
            if stack[j][1] == x:
                yield stack[j][0], stack[:j] + stack[j + 1 :]
        if x >= 0 and x.denominator == 1:
            yield (int(x),), stack

    def follow(i: int, stack: tuple) -> None:
        if i == len(steps):
            return
        _op, a, b, c = steps[i]
        for b_numbers, rest in operand(b, stack):
            for a_numbers, rest2 in operand(a, rest):
                numbers = tuple(sorted(a_numbers + b_numbers))
                if c is not None:  # an undefined value is no operand (its expression's other steps still come)
                    found.add((numbers, c))
                follow(i + 1, rest2 + ((numbers, c),))

    follow(0, ())
    return found


def task_exclusion(task: CountdownConfig, leave_out: str = "target") -> dict:
    """What the warm-up never shows (`forward_puzzle`'s exclusions). A task with one target, by default: that
    target, so every fact the model has about it comes from the game (but the critic then learns that the value is
    never right: docs/experiments.md, section 2). Otherwise the task's puzzles (number multiset and target); its
    target values stay, as in any pretrained model's arithmetic."""
    if not task.max_target and leave_out == "target":
        return {"exclude_target": task.target}
    train, heldout = split_puzzles(task)
    return {"exclude": frozenset(p.key for p in train + heldout)}


def warmup_corpus(task: CountdownConfig, cfg: WarmupConfig, tokenizer, count: int, batch_size: int = 1) -> list[WarmupExample]:
    rng = random.Random(cfg.seed)
    corpus = []
    unseen = task_exclusion(task, cfg.leave_out)
    if cfg.min_target > cfg.max_target or all(t == unseen.get("exclude_target")
                                              for t in range(cfg.min_target, cfg.max_target + 1)):
        raise ValueError(f"warmup.min_target/max_target: no usable warm-up target in {cfg.min_target}.."
                         f"{cfg.max_target}" + (f" (the task's target {task.target} is left out, warmup.leave_out "
                                                f"target)" if "exclude_target" in unseen else "") + "; widen the range")
    for i in range(count):
        try:
            puzzle, expert = forward_puzzle(
                rng, num_numbers=task.num_numbers, min_number=task.min_number, max_number=task.max_number,
                min_target=cfg.min_target, max_target=cfg.max_target, **unseen,
            )
        except ValueError as e:
            raise ValueError(f"warmup.min_target/max_target: no usable warm-up puzzle with a target in "
                             f"{cfg.min_target}..{cfg.max_target} ({e}); widen the range") from e
        numbers, target = puzzle.numbers, puzzle.target
        question = question_text(numbers, target)
        # Whole batches share a role: critic sequences are twice as long, and mixing them pads policy ones.
        role = _batch_role(i // batch_size, cfg)
        if role == "arithmetic":
            messages = [{"role": "user", "content": ARITHMETIC_PROMPT}]
            completion = arithmetic_drill(task, cfg, rng, unseen)
        elif role == "critic":
            other = _shown_candidate(numbers, expert, rng, random.Random(f"{cfg.seed}/candidate/{i}"), task, unseen)
            first, second = (expert, other) if rng.random() < 0.5 else (other, expert)
            ok1, ok2 = verify(numbers, target, first), verify(numbers, target, second)
            verdict = "tie" if ok1 == ok2 else ("1" if ok1 else "2")
            think = f"1: {evaluation_trace(numbers, target, first)} 2: {evaluation_trace(numbers, target, second)}"
            messages = prompts.critic_messages(question, first, second)
            completion = prompts.format_completion(think, verdict)
        else:
            messages = prompts.policy_messages(question)
            # No dead ends: a tiny model learns the step format faster from the working chain alone.
            completion = prompts.format_completion(search_trace(numbers, target, rng=rng, max_attempts=0, solution=expert), expert)
        prompt_ids = prompts.render_prompt(tokenizer, messages)
        # as the conversation reads the reply (review: a SentencePiece tokenizer began it with a `▁` on its own)
        completion_ids = prompts.reply_ids(tokenizer, completion, messages) + [tokenizer.eos_token_id]
        corpus.append(WarmupExample(prompt_ids + completion_ids, len(prompt_ids)))
    return corpus


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bfloat16 matrix products natively (so autocast to it is faster, not emulated)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":  # private helpers, present in torch >= 2.1; absent means no
        checks = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
        return any(check is not None and check() for check in checks)
    return False


def format_warmup(model, tokenizer, task: CountdownConfig, cfg: WarmupConfig, *, device: torch.device, progress: bool) -> list[float]:
    """Train `model` in place on the warm-up corpus; returns the loss per step."""
    if cfg.steps <= 0:
        return []
    corpus = warmup_corpus(task, cfg, tokenizer, cfg.steps * cfg.batch_size, batch_size=cfg.batch_size)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.98))
    # A linear ramp over the first 20 steps (a tenth of a warm-up shorter than 200: over 20 steps, a 10-step one
    # peaked at 16% of its lr, found by review), times a cosine decay over all of them.
    ramp = max(1, min(20, cfg.steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / ramp) * 0.5 * (1 + math.cos(math.pi * min(s, cfg.steps) / cfg.steps))
    )
    pad = tokenizer.pad_token_id
    bf16 = cfg.precision == "bfloat16" or (cfg.precision == "auto" and native_bf16(device))
    attention = model.config._attn_implementation
    losses = []
    bar = tqdm(range(cfg.steps), desc="format warm-up", disable=not progress, dynamic_ncols=True)
    for step in bar:
        batch = corpus[step * cfg.batch_size : (step + 1) * cfg.batch_size]
        width = max(len(e.input_ids) for e in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, e in enumerate(batch):
            n = len(e.input_ids)
            ids[i, :n] = torch.tensor(e.input_ids)
            labels[i, e.prompt_len : n] = ids[i, e.prompt_len : n]
            mask[i, :n] = 1
        if device.type == "cpu" and attention == "sdpa":
            model.set_attn_implementation(cpu_attention(width))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(out.loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)  # drawn beside its own step's count
    model.set_attn_implementation(attention)
    model.eval()
    return losses


EAGER_UP_TO = 256


def cpu_attention(width: int) -> str:
    """The faster attention for a padded batch `width` tokens long on a CPU. A padding mask sends SDPA down a slow
    path, so for short sequences plain matmul-softmax attention wins; for long ones its [L, L] scores cost more.
    Measured on the default model, one thread, bf16 (seconds per step of 32): width ~106: eager 0.18, SDPA 0.32;
    ~220: 0.39 vs 0.54; ~375: 1.65 vs 1.12."""
    return "eager" if width <= EAGER_UP_TO else "sdpa"


FORMAT_PROBE_QUESTIONS = 16


@torch.no_grad()
def format_rates(model, tokenizer, examples: list, *, max_new_tokens: int, critic_max_new_tokens: int) -> dict[str, float]:
    """How often the model answers in the two formats (greedy, on up to 16 of `examples`): `policy` = the fraction
    of policy completions with a complete <answer> that ended before their token limit, `critic` = the fraction of
    such verdicts that are 1, 2 or tie when it
    compares the expert's answer with the policy's (or with the expert's own, where the policy gave none). Leaves
    the model trainable, as it found it."""
    examples = examples[:FORMAT_PROBE_QUESTIONS]
    trainable = [p.requires_grad for p in model.parameters()]
    engine = EmbeddedEngine.from_tokenizer(model, tokenizer, batch_size=len(examples))
    greedy = dict(temperature=0.0, n=1, seed=0)
    policy = engine.generate([prompts.render_prompt(tokenizer, prompts.policy_messages(ex.question)) for ex in examples],
                             SamplingParams(max_new_tokens=max_new_tokens, **greedy))
    # a completion cut off at its limit counts as no answer, as training reads it (it counted; found by review)
    answers = [None if c[0].truncated else prompts.parse_answer(c[0].text) for c in policy]
    critic = engine.generate([prompts.render_prompt(tokenizer, prompts.critic_messages(ex.question, ex.answer, a or ex.answer))
                              for ex, a in zip(examples, answers, strict=True)],
                             SamplingParams(max_new_tokens=critic_max_new_tokens, **greedy))
    for p, flag in zip(model.parameters(), trainable, strict=True):
        p.requires_grad_(flag)
    n = max(1, len(examples))
    return {"policy": sum(a is not None for a in answers) / n,
            "critic": sum(not c[0].truncated and prompts.parse_verdict(c[0].text) is not None for c in critic) / n}
