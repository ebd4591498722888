import re
from fractions import Fraction

import pytest

from raro_fast import prompts
from raro_fast.config import WarmupConfig
from raro_fast.tasks.countdown import CountdownConfig
from raro_fast.model.hf import load_project_tokenizer
from raro_fast.tasks.countdown import evaluate, split_puzzles, verify
from raro_fast.warmup import warmup_corpus


def test_warmup_corpus_is_well_formed_and_never_uses_task_puzzles():
    tok = load_project_tokenizer()
    task = CountdownConfig(num_train=100, num_heldout=20)
    corpus = warmup_corpus(task, WarmupConfig(critic_fraction=0.5), tok, 256, batch_size=16)
    n_policy = n_critic = 0
    verdicts = []
    task_keys = {p.key for ps in split_puzzles(task) for p in ps}
    for ex in corpus:
        prompt = tok.decode(ex.input_ids[: ex.prompt_len])
        completion = tok.decode(ex.input_ids[ex.prompt_len :], skip_special_tokens=True)
        assert ex.input_ids[-1] == tok.eos_token_id
        assert f"make {task.target}." not in prompt  # never the task's target
        question = prompt.split("user\n", 1)[1]
        if "Answer 1:" in prompt:
            n_critic += 1
            q, a1, a2 = question.split("\n")[:3]
            q = q.removeprefix("Question: ")
            nums = tuple(int(x) for x in q.removeprefix("Using ").split(" each")[0].split(", "))
            target = int(q.rsplit("make ", 1)[1].rstrip(".").split("<")[0])
            a1, a2 = a1.removeprefix("Answer 1: "), a2.removeprefix("Answer 2: ").split("<")[0]
            ok1, ok2 = verify(nums, target, a1), verify(nums, target, a2)
            assert prompts.parse_verdict(completion) == ("tie" if ok1 == ok2 else "1" if ok1 else "2")
            verdicts.append(prompts.parse_verdict(completion))
        else:
            n_policy += 1
            nums = tuple(int(x) for x in question.removeprefix("Using ").split(" each")[0].split(", "))
            target = int(question.rsplit("make ", 1)[1].split(".")[0])
            assert (tuple(sorted(nums)), target) not in task_keys
            assert verify(nums, target, prompts.parse_answer(completion))
    assert n_policy > 50 and n_critic > 50
    # the expert's answer is first or second at random: a critic whose right answer always came first would learn
    # its position, not the arithmetic (33 and 45 of 78 decisive verdicts)
    assert min(verdicts.count("1"), verdicts.count("2")) > 0.3 * (n_critic - verdicts.count("tie"))


def test_critic_candidates_include_expert_shaped_hard_negatives():
    """Besides the expert's own answer and joined numbers, the other answer of a warm-up critic pair is often the
    expert's expression with its numbers permuted: the same shape, usually wrong (here: a negative inner step)."""
    import random
    import re

    from raro_fast.warmup import _candidate_answer

    rng = random.Random(0)
    expert, numbers = "12-(11-9)", (12, 11, 9)
    draws = [_candidate_answer(numbers, expert, rng) for _ in range(2000)]
    same_shape = [d for d in draws if d != expert and re.fullmatch(r"\d+-\(\d+-\d+\)", d)]
    # 20% by choice, plus the sixth of the 40% permuted that gives it back (three distinct numbers): 0.27
    assert 0.22 < draws.count(expert) / len(draws) < 0.31
    assert 0.2 < len(same_shape) / len(draws) < 0.45
    wrong = [d for d in same_shape if not verify(numbers, 10, d)]  # 9-(11-12) is right, 11-(9-12) is not
    assert "11-(9-12)" in wrong and len(wrong) > len(same_shape) / 2
    assert all(sorted(map(int, re.findall(r"\d+", d))) == sorted(numbers) for d in draws)


def test_arithmetic_drills_are_true_steps_and_comparisons_in_the_traces_words_at_the_fraction_asked():
    import re
    from fractions import Fraction

    from raro_fast.warmup import ARITHMETIC_EXPRESSIONS, ARITHMETIC_PROMPT

    tok = load_project_tokenizer()
    task = CountdownConfig()
    corpus = warmup_corpus(task, WarmupConfig(critic_fraction=0.4, arithmetic_fraction=0.3), tok, 50 * 32, batch_size=32)
    drills = [tok.decode(e.input_ids[e.prompt_len :], skip_special_tokens=True) for e in corpus
              if ARITHMETIC_PROMPT in tok.decode(e.input_ids[: e.prompt_len])]
    assert 0.15 < len(drills) / len(corpus) < 0.45  # whole batches draw their role: 50 draws at 0.3
    number = r"\(?-?\d+(?:/\d+)?\)?"
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a / b}
    checked, verdicts = 0, []
    for text in drills:
        expressions = re.split(r"(?<=\.) (?=make )", text)
        assert len(expressions) == ARITHMETIC_EXPRESSIONS, text
        for expression in expressions:
            head, _, rest = expression.partition(": ")
            stated = re.fullmatch(r"make (-?\d+)", head)[1]
            steps, _, comparison = rest.partition("; ")
            c = None
            for step in steps.removesuffix(" divides by zero.").split():
                m = re.fullmatch(rf"({number})([-+*/])({number})=(undefined|-?\d+(?:/\d+)?)", step)
                assert m, step
                a, op, b, c = Fraction(m[1].strip("()")), m[2], Fraction(m[3].strip("()")), m[4]
                assert c == "undefined" if (op == "/" and b == 0) else Fraction(c) == ops[op](a, b), step
                checked += 1
            if "undefined" in steps:
                assert expression.endswith(" divides by zero.") and not comparison, expression
                continue
            # the value set against the number stated first, as a critic sets it against the target; right verdicts
            m = re.fullmatch(r"(-?\d+(?:/\d+)?) vs (-?\d+): (ok|no)\.", comparison)
            assert m and m[1] == c and m[2] == stated, expression
            assert (m[3] == "ok") == (Fraction(m[1]) == int(m[2])), expression
            verdicts.append((m[1], m[2], m[3]))
            # never a solution of a task puzzle: three numbers (two steps) never make the task's target
            assert not (len(steps.split()) == task.num_numbers - 1 and c == str(task.target)), expression
    assert checked > 1000
    # the operators a critic meets, and the negative and fractional steps the policy's exploits were made of
    joined = " ".join(drills)
    assert all(op in joined for op in "+-*/") and "=-" in joined and re.search(r"=\d+/\d+", joined)
    # about half are a value against itself, and the task's target is compared both ways: 10 is 10, 9 is not 10
    assert 0.3 < sum(v == "ok" for *_, v in verdicts) / len(verdicts) < 0.6
    assert ("10", "10", "ok") in verdicts and any(t == "10" and v == "no" for _, t, v in verdicts)


def test_with_varied_targets_the_warmup_leaves_out_the_tasks_puzzles_not_its_target_values():
    """A warm-up that never shows the task's one target taught the critic that a value of 10 is never right
    ("18-8=10; 10 vs 10: no"); with a target per puzzle, the task's own puzzles are what it leaves out."""
    import re

    tok = load_project_tokenizer()
    task = CountdownConfig(target=10, max_target=30)
    task_keys = {p.key for ps in split_puzzles(task) for p in ps}
    corpus = warmup_corpus(task, WarmupConfig(), tok, 3000, batch_size=1)
    keys, targets = set(), set()
    for ex in corpus:
        prompt = tok.decode(ex.input_ids[: ex.prompt_len])
        m = re.search(r"Using ([\d, ]+) each exactly once .* make (\d+)\.", prompt)
        numbers, target = tuple(sorted(int(x) for x in m[1].split(", "))), int(m[2])
        keys.add((numbers, target))
        targets.add(target)
    assert not keys & task_keys
    assert {p.target for ps in split_puzzles(task) for p in ps} <= targets  # every target value the task uses
    fixed = CountdownConfig()  # one target: by default that value is what stays out
    assert all("make 10." not in tok.decode(e.input_ids[: e.prompt_len]) for e in warmup_corpus(fixed, WarmupConfig(), tok, 500))
    # ... or, with warmup.leave_out puzzles, the task's puzzles: other multisets may make 10
    fewer = CountdownConfig(num_train=60)  # 164 multisets make 10: 40 are left to the warm-up
    fewer_keys = {p.key for ps in split_puzzles(fewer) for p in ps}
    seen = []
    for e in warmup_corpus(fewer, WarmupConfig(leave_out="puzzles"), tok, 3000):
        m = re.search(r"Using ([\d, ]+) each exactly once .* make (\d+)\.", tok.decode(e.input_ids[: e.prompt_len]))
        seen.append((tuple(sorted(int(x) for x in m[1].split(", "))), int(m[2])))
    assert not set(seen) & fewer_keys and sum(target == 10 for _, target in seen) > 10


# A step as the traces write it: "a op b=c", an operand in brackets when negative or a fraction (never a number given).
_STEP = re.compile(r"(\d+|\(-?\d+(?:/\d+)?\))([-+*/])(\d+|\(-?\d+(?:/\d+)?\))=(undefined|-?\d+(?:/\d+)?)")


def _step_chains(text: str) -> list[list[tuple[str, str, str, str]]]:
    """Runs of consecutive steps in a completion (tags dropped): a critic's check of one answer, a policy's chain,
    one drill expression."""
    chains, chain = [], []
    for token in re.sub(r"<[^>]*>", " ", text).split() + [""]:
        m = _STEP.fullmatch(token.removesuffix(";"))
        if m:
            chain.append(m.groups())
        elif chain:
            chains.append(chain)
            chain = []
    return chains


def _chain_readings(chain) -> set:
    """Every (sorted numbers, value) a run of steps can be read as computing, its expression not shown: an operand is
    the value of any earlier unused step (when it is that value) or a number given (written without brackets)."""
    found = set()

    def options(text, stack):
        value = Fraction(text.strip("()"))
        for j, (numbers, v) in enumerate(stack):
            if v == value:
                yield numbers, stack[:j] + stack[j + 1 :]
        if not text.startswith("("):
            yield (int(text),), stack

    def follow(i, stack):
        if i == len(chain):
            return
        a, _op, b, c = chain[i]
        value = None if c == "undefined" else Fraction(c)
        for b_numbers, rest in options(b, stack):
            for a_numbers, rest2 in options(a, rest):
                numbers = tuple(sorted(a_numbers + b_numbers))
                if value is not None:
                    found.add((numbers, value))
                follow(i + 1, rest2 + ((numbers, value),))

    follow(0, ())
    return found


def _expression_shows(text: str) -> set:
    """(sorted numbers, value) of an expression and each of its sub-expressions."""
    from raro_fast.tasks.countdown import evaluate, parse, to_string

    def walk(node):
        if isinstance(node, int):
            return [node]
        leaves = walk(node[1]) + walk(node[2])
        shown.add((tuple(sorted(leaves)), evaluate(to_string(node))))
        return leaves

    shown: set = set()
    walk(parse(text))
    return shown


def _corpus_shows(tok, corpus) -> list[tuple[str, set]]:
    """For each sequence, its text and every (numbers, value) it shows: its puzzle, the expressions in its prompt
    and answer with their sub-expressions, and every reading of the steps in its completion."""
    out = []
    for e in corpus:
        prompt = tok.decode(e.input_ids[: e.prompt_len])
        completion = tok.decode(e.input_ids[e.prompt_len :], skip_special_tokens=True)
        shown = set()
        q = re.search(r"Using ([\d, ]+) each exactly once .* make (\d+)\.", prompt)
        if q:
            shown.add((tuple(sorted(int(x) for x in q[1].split(", "))), Fraction(int(q[2]))))
        critic = re.findall(r"Answer [12]: ([^\n<]+)", prompt)  # a critic's answer is its verdict, a policy's an expression
        for expression in critic or re.findall(r"<answer>(.*?)</answer>", completion):
            shown |= _expression_shows(expression.strip())
        for chain in _step_chains(completion):
            shown |= _chain_readings(chain)
        out.append((prompt + completion, shown))
    return out


def test_the_leak_check_reads_steps_as_a_reader_would():
    # a drill's 9/(1+11-2) shows 1, 2 and 11 making 10; a critic's 5+3+2 shows 2, 3 and 5 making 10
    assert ((1, 2, 11), 10) in _chain_readings(_step_chains("make 7: 1+11=12 12-2=10 9/10=9/10; 9/10 vs 7: no.")[0])
    chains = _step_chains("<think>1: 2*5=10 10*3=30; 30 vs 30: ok. 2: 5+3=8 8+2=10; 10 vs 30: no.</think>")
    assert ((2, 3, 5), 10) in _chain_readings(chains[1]) and ((2, 3, 5), 30) in _chain_readings(chains[0])
    assert ((2, 3, 5), 10) in _expression_shows("5+3+2") and ((1, 2, 11), 10) in _expression_shows("9/(1+11-2)")
    # an operand may be any earlier step's value, not only the latest's: 2+13-5 makes 10 from 2, 5 and 13 (review)
    assert ((2, 5, 13), 10) in _chain_readings(_step_chains("make 10: 2+13=15 4+1=5 15-5=10; 10 vs 10: ok.")[0])
    from raro_fast.warmup import _readings

    steps = [("+", Fraction(2), Fraction(13), Fraction(15)), ("+", Fraction(4), Fraction(1), Fraction(5)),
             ("-", Fraction(15), Fraction(5), Fraction(10))]
    assert ((2, 5, 13), 10) in _readings(steps)  # the warm-up's own check (it read the latest step only)
    # after a division by zero the expression's other steps still come
    assert ((1, 2, 4), 7) in _chain_readings(_step_chains("3-3=0 5/0=undefined 1+2=3 3+4=7 divides by zero.")[0])


@pytest.mark.parametrize("task,cfg", [
    (CountdownConfig(), WarmupConfig()),  # the defaults: critic traces and policy traces
    (CountdownConfig(), WarmupConfig(arithmetic_fraction=0.3)),
    (CountdownConfig(num_train=60), WarmupConfig(leave_out="puzzles", arithmetic_fraction=0.3)),
    (CountdownConfig(max_target=30), WarmupConfig(arithmetic_fraction=0.3)),  # a target per puzzle: its puzzles
], ids=["defaults", "target-drills", "puzzles-drills", "target-per-puzzle-drills"])
def test_no_sequence_shows_a_left_out_puzzle_or_its_solution(task, cfg):
    """What the warm-up leaves out (a one-target task's target by default: any puzzle-sized multiset of the task's
    numbers making it; else the task's puzzles, numbers and target) is never shown: no puzzle, no expression or
    sub-expression over as many numbers as a puzzle has (a critic's other answer worked through 5+3=8 8+2=10 for a
    puzzle of 2, 3, 5; a drill's 9/(1+11-2) held 1+11-2=10), however a run of steps is read."""
    tok = load_project_tokenizer()
    keys = {(numbers, Fraction(target)) for ps in split_puzzles(task) for numbers, target in (p.key for p in ps)}

    def left_out(numbers, value):
        if len(numbers) != task.num_numbers or not all(task.min_number <= n <= task.max_number for n in numbers):
            return False
        if not task.max_target and cfg.leave_out == "target":
            return value == task.target
        return (numbers, value) in keys

    corpus = warmup_corpus(task, cfg, tok, 40 * 32, batch_size=32)
    checked = 0
    for text, shown in _corpus_shows(tok, corpus):
        checked += sum(len(numbers) == task.num_numbers for numbers, _ in shown)
        leaks = [(numbers, value) for numbers, value in shown if value is not None and left_out(numbers, value)]
        assert not leaks, (leaks, text)
    assert checked > len(corpus)


def test_a_critics_redrawn_answer_leaves_the_rest_of_the_corpus_as_it_was():
    """Only the sequences whose other answer was a left-out solution change: the redraw has a generator of its own."""
    from raro_fast.warmup import _candidate_answer, _shown_candidate, task_exclusion

    import random

    task = CountdownConfig()
    unseen = task_exclusion(task)
    rng, same = random.Random(3), random.Random(3)
    redrawn = 0
    for i in range(300):
        numbers, expert = (2, 3, 5), "2*5+3"  # 13: joined numbers 5+3+2 make the task's 10
        kept = _shown_candidate(numbers, expert, rng, random.Random(i), task, unseen)
        first = _candidate_answer(numbers, expert, same)
        assert rng.getstate() == same.getstate()
        assert evaluate(kept) != task.target
        assert (kept == first) == (evaluate(first) != task.target)
        redrawn += kept != first
    assert redrawn > 5


@pytest.mark.timeout(60)
@pytest.mark.parametrize("task,cfg", [
    (CountdownConfig(), WarmupConfig(min_target=10, max_target=10)),  # only the task's target, which is left out
    (CountdownConfig(), WarmupConfig(min_target=3000, max_target=4000)),  # no 3 numbers up to 13 make these
    (CountdownConfig(), WarmupConfig(min_target=10, max_target=10, leave_out="puzzles")),  # all 164 are the task's
], ids=["only-the-target", "out-of-reach", "all-puzzles-left-out"])
def test_a_target_range_with_no_usable_puzzle_is_refused_not_a_hang(task, cfg):
    with pytest.raises(ValueError, match=r"warmup\.min_target/max_target"):
        warmup_corpus(task, cfg, load_project_tokenizer(), 4)


def test_the_warm_up_trains_on_completions_only_and_a_one_step_warm_up_takes_its_whole_learning_rate(capsys):
    """At learning rate 0 each step's loss is the mean next-token loss of its own sequences' completions, computed
    here sequence by sequence, unpadded, in float64: a warm-up that also learnt the prompt (the critic's prompt holds
    both answers), read past a sequence's end or took other sequences would give other numbers. Then one step at
    lr 0.01: Adam's first update is lr times the schedule's first factor, 1/20 of the linear ramp, on every weight."""
    import copy

    import torch

    from raro_fast.model.hf import build_embedded_model
    from raro_fast.warmup import format_warmup

    tok = load_project_tokenizer()
    task = CountdownConfig()

    def tiny():
        return build_embedded_model(tok, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64,
                                    max_position=512, seed=0)

    cfg = WarmupConfig(steps=2, batch_size=3, lr=0.0, precision="float32", critic_fraction=0.5, seed=5)
    model = tiny()
    reference = copy.deepcopy(model).double()
    losses = format_warmup(model, tok, task, cfg, device=torch.device("cpu"), progress=True)
    # its progress line shows step k's loss beside the count k (found by review: beside k - 1)
    drawn = re.findall(r"format warm-up:.*?\b(\d)/2\b.*?loss=([\d.]+)", capsys.readouterr().err.replace("\r", "\n"))
    assert drawn and all(int(k) >= 1 and v == f"{losses[int(k) - 1]:.3f}" for k, v in drawn), drawn
    corpus = warmup_corpus(task, cfg, tok, 6, batch_size=3)
    assert len({len(e.input_ids) for e in corpus}) > 1  # padded batches
    want = []
    for batch in (corpus[:3], corpus[3:]):
        nll = tokens = 0
        for e in batch:
            ids = torch.tensor([e.input_ids])
            with torch.no_grad():
                logprobs = torch.log_softmax(reference(input_ids=ids).logits[0], -1)
            nll -= logprobs[e.prompt_len - 1 : -1].gather(1, ids[0, e.prompt_len :, None]).sum().item()
            tokens += len(e.input_ids) - e.prompt_len
        want.append(nll / tokens)
    assert losses == pytest.approx(want, rel=1e-6)

    model = tiny()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    format_warmup(model, tok, task, WarmupConfig(steps=1, batch_size=3, lr=0.01, precision="float32"),
                  device=torch.device("cpu"), progress=False)
    for n, p in model.named_parameters():
        moved = (p.detach() - start[n]).abs()
        # Adam: lr * g / (|g| + eps), at the full lr: the ramp is a tenth of a short warm-up (it was 20 steps, so this
        # step moved by lr / 20 and a 10-step warm-up peaked at 16% of its lr; found by review on 2026-12-07)
        assert moved.max().item() == pytest.approx(0.01, rel=1e-3), n


def test_drills_reach_past_a_puzzles_size_and_state_a_task_target_beyond_the_warm_up_range():
    """Drills take 2 to one more than a puzzle's numbers (so up to 3 steps here), and the number to make ranges up
    to the task's target even when it lies above warmup.max_target: a critic must also see "37 vs 40: no"."""
    from raro_fast.warmup import ARITHMETIC_PROMPT

    tok = load_project_tokenizer()
    task = CountdownConfig(target=40)
    corpus = warmup_corpus(task, WarmupConfig(critic_fraction=0.0, arithmetic_fraction=1.0, max_target=30), tok, 200)
    drills = [tok.decode(e.input_ids[e.prompt_len :], skip_special_tokens=True) for e in corpus]
    assert all(ARITHMETIC_PROMPT in tok.decode(e.input_ids[: e.prompt_len]) for e in corpus)
    expressions = [x for text in drills for x in re.split(r"(?<=\.) (?=make )", text)]
    steps = [len(x.partition(": ")[2].partition(";")[0].removesuffix(" divides by zero.").split()) for x in expressions]
    assert set(steps) == {1, 2, 3}
    assert any(re.search(r" vs 40: no\.$", x) for x in expressions)
    # with a target per puzzle, up to the task's highest (it stopped at task.target, 10 here)
    task = CountdownConfig(target=10, max_target=45)
    corpus = warmup_corpus(task, WarmupConfig(critic_fraction=0.0, arithmetic_fraction=1.0, max_target=30), tok, 100)
    drills = " ".join(tok.decode(e.input_ids[e.prompt_len :], skip_special_tokens=True) for e in corpus)
    assert max(int(n) for n in re.findall(r" vs (\d+): no\.", drills)) > 40  # a stated number, not the value
    # ... and down to it when it lies below warmup.min_target: it was stated only when a value made it, always
    # "ok", the reverse of the bias drills exist to fix. Found by review on 2026-12-07.
    corpus = warmup_corpus(CountdownConfig(target=10),
                           WarmupConfig(critic_fraction=0.0, arithmetic_fraction=1.0, min_target=11), tok, 200)
    drills = " ".join(tok.decode(e.input_ids[e.prompt_len :], skip_special_tokens=True) for e in corpus)
    assert re.search(r" vs 10: no\.", drills)


def test_what_the_warm_up_leaves_out_is_a_puzzle_sized_multiset_in_the_tasks_range():
    """Fewer or more numbers than a puzzle has, or a number outside the task's range, is no puzzle of the task: a
    drill's 2*5=10 stays in the corpus (it teaches that 10 is 10), as does a whole that is not a whole number."""
    from raro_fast.warmup import _is_left_out, task_exclusion

    task = CountdownConfig()  # three numbers from 1 to 13, target 10
    unseen = task_exclusion(task)
    assert unseen == {"exclude_target": 10}
    assert _is_left_out((2, 3, 5), Fraction(10), unseen, task) and _is_left_out((1, 1, 13), Fraction(10), unseen, task)
    for numbers, value in [((2, 5), 10), ((1, 2, 3, 4), 10), ((1, 2, 14), 10), ((0, 5, 5), 10), ((2, 3, 5), 11),
                           ((2, 3, 7), Fraction(21, 2))]:
        assert not _is_left_out(numbers, Fraction(value), unseen, task), numbers
    puzzles = task_exclusion(task, "puzzles")
    train, heldout = split_puzzles(task)
    for p in (train[0], heldout[-1]):  # held-out puzzles as much as training ones
        assert _is_left_out(p.numbers, Fraction(p.target), puzzles, task)


def test_each_warm_up_step_is_taken_on_a_gradient_clipped_to_norm_1(monkeypatch):
    """The gradient Adam steps on has norm at most 1, and exactly 1 where the raw gradient was longer, as a
    randomly initialised model's is: a warm-up without clipping, or clipping at another norm, fails."""
    import torch

    from raro_fast.model.hf import build_embedded_model
    from raro_fast.warmup import format_warmup

    stepped, raw = [], []
    adam_step, clip = torch.optim.AdamW.step, torch.nn.utils.clip_grad_norm_

    def recording_step(self, *args, **kwargs):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        stepped.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
        return adam_step(self, *args, **kwargs)

    def recording_clip(*args, **kwargs):
        raw.append(float(clip(*args, **kwargs)))
        return raw[-1]

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)
    tok = load_project_tokenizer()
    model = build_embedded_model(tok, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64,
                                 max_position=512, seed=0)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20)  # a gradient far longer than 1 at every step
    format_warmup(model, tok, CountdownConfig(), WarmupConfig(steps=3, batch_size=2, lr=0.01, precision="float32"),
                  device=torch.device("cpu"), progress=False)
    assert len(stepped) == 3
    assert min(raw) > 2.0, raw
    assert stepped == pytest.approx([1.0] * 3, rel=1e-5), (stepped, raw)


@pytest.mark.parametrize("steps,ramp", [(10, 1), (40, 4), (400, 20)])
def test_the_warmup_ramps_its_learning_rate_over_a_tenth_of_a_short_warmup(monkeypatch, steps, ramp):
    import math

    import torch

    from raro_fast import warmup

    class Seen(Exception):
        pass

    def schedule(self, opt, fn):  # the schedule only: no batch is trained
        raise Seen([fn(s) for s in range(steps)])

    monkeypatch.setattr(warmup, "warmup_corpus", lambda *a, **k: [])
    monkeypatch.setattr(torch.optim.lr_scheduler.LambdaLR, "__init__", schedule)
    with pytest.raises(Seen) as seen:
        warmup.format_warmup(torch.nn.Linear(2, 2), None, CountdownConfig(), WarmupConfig(steps=steps), device=torch.device("cpu"),
                             progress=False)
    want = [min(1.0, (s + 1) / ramp) * 0.5 * (1 + math.cos(math.pi * s / steps)) for s in range(steps)]
    assert seen.value.args[0] == pytest.approx(want) and max(seen.value.args[0]) > 0.9


@pytest.mark.parametrize("finish", ["stop", "length"])
def test_format_rates_count_no_answer_cut_off_at_its_limit(monkeypatch, finish):
    """A completion cut off at its token limit is no answer and no verdict to training, whatever tags it wrote so
    far; format_rates (and base_model/format_rates.json) counted it (found by review on 2026-12-07)."""
    from types import SimpleNamespace

    import torch

    from raro_fast import warmup
    from raro_fast.rollout.engine import Completion

    calls = []

    class Scripted:
        def generate(self, batch, params):
            calls.append(batch)
            text = "<think>5+5=10</think><answer>5+5</answer>" if len(calls) == 1 else "<answer>1</answer>"
            return [[Completion([7, 8], [-0.5, -0.5], finish, text)] for _ in batch]

    monkeypatch.setattr(warmup, "EmbeddedEngine", SimpleNamespace(from_tokenizer=lambda *a, **k: Scripted()))
    tok = load_project_tokenizer()
    examples = [SimpleNamespace(question=f"Use 5, 5 and {n} to make 10.", answer="5+5") for n in (1, 2, 3)]
    model = torch.nn.Linear(2, 2)
    rates = warmup.format_rates(model, tok, examples, max_new_tokens=8, critic_max_new_tokens=8)
    want = 1.0 if finish == "stop" else 0.0
    assert rates == {"policy": want, "critic": want} and len(calls) == 2
