from raro_fast import prompts
from raro_fast.config import WarmupConfig
from raro_fast.tasks.countdown import CountdownConfig
from raro_fast.model.hf import load_project_tokenizer
from raro_fast.tasks.countdown import split_puzzles, verify
from raro_fast.warmup import warmup_corpus


def test_warmup_corpus_is_well_formed_and_never_uses_task_puzzles():
    tok = load_project_tokenizer()
    task = CountdownConfig(num_train=100, num_heldout=20)
    corpus = warmup_corpus(task, WarmupConfig(critic_fraction=0.5), tok, 256, batch_size=16)
    n_policy = n_critic = 0
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
        else:
            n_policy += 1
            nums = tuple(int(x) for x in question.removeprefix("Using ").split(" each")[0].split(", "))
            target = int(question.rsplit("make ", 1)[1].split(".")[0])
            assert (tuple(sorted(nums)), target) not in task_keys
            assert verify(nums, target, prompts.parse_answer(completion))
    assert n_policy > 50 and n_critic > 50


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
    assert 0.15 < draws.count(expert) / len(draws) < 0.4  # 20% by choice, plus permutations that give it back
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
