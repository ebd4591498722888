"""Evaluation, the only place the task's verifier decides anything (it trains nothing): the trainer's held-out
accuracy, and test-time reranking of N policy samples by the critic (RARO's critic tournament).

Command (also `raro-fast evaluate ...`):

    python -m raro_fast.evaluate --model runs/raro-countdown/final_model                 # n=8, tournament
    python -m raro_fast.evaluate --model DIR --rerank tournament --n 16 --eval.num_problems 64
    python -m raro_fast.evaluate --model DIR --rerank none --n 4 --task countdown --task.countdown.num_heldout 64

It samples n answers per problem of the split (one engine call for all), then reports side by side:
    pass@1        the first sample of each problem (accuracy of one draw),
    avg@n         the mean over the n samples (the same expectation, lower variance),
    majority@n    the most frequent extracted answer, equal answers counted together as the task says (DeepMath's
                  1/2 and 0.5 are one answer; ties: the one that occurs first),
    tournament@n  the critic tournament's pick (raro_fast/rerank.py; absent with --rerank none),
    pass@n        any of the n correct: the oracle ceiling of any reranker.
A truncated completion, or one without a final answer, counts as no answer (wrong, and out of the votes and the
tournament). It prints a markdown table and writes report.json (these numbers, counts, every problem's answers
and picks, and the config) to --eval.output_dir. A task without a verifier (poetry) has no accuracies: its
correctness counts and each problem's "correct" are null (not measured), and --eval.judge_model can judge it.

Short flags: --model (= --eval.model), --rerank (= --eval.rerank), --n (= --eval.n), --task (= --task.name; the
task's settings are --task.<name>.FIELD), --output-dir (= --eval.output_dir). `--help` lists
every setting. Runs on one process (CUDA if available); the engine is the embedded one.
"""
from __future__ import annotations

import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal


from raro_fast import prompts
from raro_fast.config import ConfigError, _help, help_text, load_config, to_dict
from raro_fast.distributed import Dist, all_gather_objects
from raro_fast.metrics import strict_json
from raro_fast.model.hf import load_pretrained, resolve_device, resolve_dtype
from raro_fast.rerank import batched_tournaments, critic_judge
from raro_fast.rollout.embedded import EmbeddedEngine
from raro_fast.rollout.engine import RolloutEngine, SamplingParams
from raro_fast.tasks import TaskConfig, make_task
from raro_fast.tasks.base import Example, Task

RERANK_METHODS = ("tournament", "none")


def sample_and_verify(examples: list[Example], params: SamplingParams, *, engine: RolloutEngine, tokenizer,
                      task: Task) -> tuple[list[list[str | None]], list[list[bool | None]]]:
    """`params.n` policy answers per example and the verifier's verdict on each (None: the task has no verifier).
    A truncated completion, or one without a final answer, is no answer (None), which the verifier rejects."""
    outs = engine.generate([prompts.render_prompt(tokenizer, prompts.policy_messages(ex.question)) for ex in examples], params)
    answers = [[task.final_answer(c.text, c.truncated) for c in comps] for comps in outs]
    return answers, [[task.verify(ex, a) for a in ans] for ex, ans in zip(examples, answers)]


def heldout_accuracy(
    examples: list[Example],
    *,
    engine: RolloutEngine,
    tokenizer,
    task: Task,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    d: Dist,
    top_p: float = 1.0,
) -> float:
    """Fraction of `examples` whose sampled (greedy at temperature 0; else at `top_p`) answer the verifier accepts,
    over all ranks; None for a task without a verifier (poetry: judge it pairwise instead)."""
    scores = heldout_scores(examples, engine=engine, tokenizer=tokenizer, task=task, n=1, top_p=top_p,
                            max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, d=d)
    return None if scores is None else scores["avg@n"]


def heldout_scores(
    examples: list[Example],
    *,
    engine: RolloutEngine,
    tokenizer,
    task: Task,
    n: int,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    d: Dist,
    critic_max_new_tokens: int | None = None,
    critic_temperature: float | None = None,
    top_p: float = 1.0,
) -> dict[str, float] | None:
    """Over all ranks: avg@n, the mean accuracy of `n` sampled answers per example (the expected accuracy of one
    sample, with less variance than one answer per example); pass@n, the fraction of examples with any of them
    right; and, given `critic_max_new_tokens`, tournament@n, the fraction whose critic tournament pick (the
    shared model judging at `critic_temperature`, None: `temperature`; seeds from seed + 1 on) is right. Both roles
    sample at `top_p`. None for a task without a verifier, or for no examples."""
    mine = examples[d.rank :: d.world_size]
    right = solved = picked = 0
    unverifiable = False
    if mine:
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, n=n, seed=seed)
        answers, verdicts = sample_and_verify(mine, params, engine=engine, tokenizer=tokenizer, task=task)
        unverifiable = any(v is None for vs in verdicts for v in vs)
        right = sum(bool(v) for vs in verdicts for v in vs)
        solved = sum(any(vs) for vs in verdicts)
        if critic_max_new_tokens is not None and not unverifiable:
            picks, _ = _tournament_picks(mine, answers, engine=engine, tokenizer=tokenizer,
                                         max_new_tokens=critic_max_new_tokens, top_p=top_p, seed=seed,
                                         temperature=temperature if critic_temperature is None else critic_temperature)
            picked = sum(bool(vs[p]) for vs, p in zip(verdicts, picks))
    totals = all_gather_objects(d, (right, solved, picked, len(mine), unverifiable))
    problems = sum(t[3] for t in totals)
    if any(t[4] for t in totals) or not problems:  # no verifier, or nothing held out: no accuracy, not 0.0
        return None
    scores = {"avg@n": sum(t[0] for t in totals) / (problems * n), "pass@n": sum(t[1] for t in totals) / problems}
    if critic_max_new_tokens is not None:
        scores["tournament@n"] = sum(t[2] for t in totals) / problems
    return scores


def majority_index(classes: list[int | None]) -> int | None:
    """Index of the first occurrence of the most frequent answer class (`Task.answer_classes`; None, no answer,
    does not vote); None if no answer has a class."""
    votes = Counter(c for c in classes if c is not None)
    if not votes:
        return None
    top = max(votes.values())
    return next(i for i, c in enumerate(classes) if c is not None and votes[c] == top)


def rerank_report(
    examples: list[Example],
    *,
    engine: RolloutEngine,
    tokenizer,
    task: Task,
    n: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    critic_max_new_tokens: int,
    seed: int,
    rerank: str = "tournament",
    critic_temperature: float | None = None,
) -> dict:
    """Sample `n` answers per example and compare ways of choosing one (see the module docstring for the keys
    of "accuracy"). The critic samples at `critic_temperature` (None: the policy's temperature) with seeds from
    seed + 1 on, one per judge call. One process: no ranks."""
    if n < 1:
        raise ValueError(f"rerank_report: n must be >= 1, got {n}")
    if rerank not in RERANK_METHODS:
        raise ValueError(f"rerank_report: rerank must be one of {RERANK_METHODS}, got {rerank!r}")
    if not examples:
        raise ValueError("rerank_report: no examples to evaluate")
    t0 = time.perf_counter()
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, n=n, seed=seed)
    answers, verdicts = sample_and_verify(examples, params, engine=engine, tokenizer=tokenizer, task=task)
    verifiable = not any(v is None for vs in verdicts for v in vs)  # poetry has no verifier: no accuracies
    # Without a verifier, bool(None) would report every answer wrong; None says that correctness was not measured.
    correct = [[bool(v) for v in vs] for vs in verdicts] if verifiable else None
    majority = [majority_index(task.answer_classes(ans)) for ans in answers]
    sampling_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    picks, critic_stats = None, None
    if rerank == "tournament":
        picks, critic_stats = _tournament_picks(
            examples, answers, engine=engine, tokenizer=tokenizer, max_new_tokens=critic_max_new_tokens,
            temperature=temperature if critic_temperature is None else critic_temperature, top_p=top_p, seed=seed)
    critic_s = time.perf_counter() - t0
    counts, accuracy = _scores(answers, correct, majority, picks, n=n)
    per_question = [
        {"id": ex.id, "answers": ans, "correct": None if correct is None else correct[i], "majority": m,
         "tournament": None if picks is None else picks[i]}
        for i, (ex, ans, m) in enumerate(zip(examples, answers, majority))
    ]
    return {"n": n, "rerank": rerank, "accuracy": accuracy, "counts": counts, "critic": critic_stats,
            "timing_s": {"sampling": sampling_s, "critic": critic_s}, "per_question": per_question}


def _tournament_picks(examples: list[Example], answers: list[list[str | None]], *, engine: RolloutEngine, tokenizer,
                      max_new_tokens: int, temperature: float, top_p: float, seed: int) -> tuple[list[int], dict]:
    """The critic's single-elimination pick per example (seeds from seed + 1 on, one per judge call), and how
    often it was called and gave no decisive verdict."""
    critic = critic_judge(engine, tokenizer, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                          seed=seed + 1)
    seen: list[str | None] = []
    calls = 0

    def logged_critic(matches):
        nonlocal calls
        verdicts = critic(matches)
        calls += 1
        seen.extend(verdicts)
        return verdicts

    picks = batched_tournaments([ex.question for ex in examples], answers, logged_critic, seed=seed)
    return picks, {"judge_calls": calls, "matches": len(seen), "tie_or_invalid": sum(v not in ("1", "2") for v in seen)}


def _scores(answers: list[list[str | None]], correct: list[list[bool]] | None, majority: list[int | None],
            picks: list[int] | None, *, n: int) -> tuple[dict, dict]:
    """Counts of each way of choosing, and the accuracies. `correct` None: the task has no verifier, so the
    correctness counts are None (not measured, where 0 would read as no right answer) and there are no accuracies."""
    q = len(answers)
    counts = {
        "questions": q,
        "samples": q * n,
        "no_answer": sum(a is None for ans in answers for a in ans),
    }
    if correct is None:
        # The same keys as a verified report's, so a reader of report.json finds them, null rather than missing.
        counts.update(dict.fromkeys(
            ("correct_samples", "first_correct", "majority_correct", "tournament_correct", "any_correct")))
        return counts, {}
    counts |= {
        "correct_samples": sum(map(sum, correct)),
        "first_correct": sum(c[0] for c in correct),
        "majority_correct": sum(m is not None and c[m] for m, c in zip(majority, correct)),
        "tournament_correct": None if picks is None else sum(c[p] for p, c in zip(picks, correct)),
        "any_correct": sum(any(c) for c in correct),
    }
    accuracy = {
        "pass@1": counts["first_correct"] / q,
        "avg@n": sum(sum(c) / n for c in correct) / q,
        "majority@n": counts["majority_correct"] / q,
        "tournament@n": None if picks is None else counts["tournament_correct"] / q,
        "pass@n": counts["any_correct"] / q,
    }
    return counts, accuracy


# ----------------------------------------------------------------------------------------------------------------
# The command.


@dataclass(kw_only=True)
class EvalSettings:
    model: str = _help("Hugging Face model directory to evaluate (e.g. runs/raro-countdown/final_model).", "")
    split: Literal["train", "heldout"] = _help("Split whose problems are evaluated.", "heldout")
    num_problems: int = _help("Problems evaluated, from the start of the split (0: all).", 0)
    n: int = _help("Samples per problem (the N of avg@N, majority@N, tournament@N, pass@N).", 8)
    rerank: Literal["tournament", "none"] = _help(
        "tournament: also pick one of the n samples by the critic's single-elimination tournament; none: "
        "plain sampling, majority vote and pass@n only.", "tournament")
    temperature: float = _help("Policy sampling temperature (default: the RL rollouts' 1.0).", 1.0)
    top_p: float = _help("Nucleus sampling, for policy and critic.", 1.0)
    max_new_tokens: int = _help("Longest policy completion; a longer one is cut and counts as no answer.", 96)
    critic_temperature: float | None = _help("Critic sampling temperature (None: the policy's).", None)
    critic_max_new_tokens: int = _help("Longest critic completion; a cut one is an invalid verdict.", 96)
    seed: int = _help("Seed of the policy samples (critic: seed + 1 on) and of the tournament's answer order.", 0)
    batch_size: int = _help("Sequences (problems x their samples) per engine forward, a bound on generation memory.",
                            64)
    device: Literal["auto", "cpu", "cuda"] = _help("auto: CUDA when available, else CPU.", "auto")
    dtype: Literal["auto", "float32", "bfloat16"] = _help(
        "Model dtype: auto = bfloat16 on CUDA, float32 on CPU.", "auto")
    output_dir: str = _help("Where report.json goes.", "runs/evaluate")
    judge_model: str = _help(
        "A model directory that judges answers against the expert's, pairwise in both orders (for tasks without a "
        "verifier, e.g. poetry): win/tie/loss rates of the first sample and of the tournament pick. A problem with "
        "no answer counts as a loss. Empty: no judge.", "")
    judge_max_new_tokens: int = _help("Longest judge reply; a cut one is an invalid verdict (a tie).", 96)

    def __post_init__(self) -> None:
        for name in ("n", "max_new_tokens", "critic_max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"eval.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_problems < 0:
            raise ValueError(f"eval.num_problems must be >= 0, got {self.num_problems}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"eval.top_p must lie in (0, 1], got {self.top_p}")
        if not self.temperature >= 0:  # the engines sample greedily at any temperature <= 0: n equal answers
            raise ValueError(f"eval.temperature must be >= 0 (0: greedy), got {self.temperature}")
        if self.critic_temperature is not None and not self.critic_temperature >= 0:
            raise ValueError(f"eval.critic_temperature must be >= 0 (0: greedy), got {self.critic_temperature}")


@dataclass(kw_only=True)
class EvaluateConfig:
    eval: EvalSettings = field(default_factory=EvalSettings)
    task: TaskConfig = field(default_factory=TaskConfig)


# config.load_config expands its short flags for the training command only, so this command expands its own.
SHORT_FLAGS = {"--model": "--eval.model", "--rerank": "--eval.rerank", "--n": "--eval.n", "--task": "--task.name",
               "--output-dir": "--eval.output_dir"}


def expand_short_flags(argv: list[str]) -> list[str]:
    """`--n 8` → `--eval.n 8` (also `--n=8`); only flag positions are rewritten, never a flag's value."""
    out, i = [], 0
    while i < len(argv):
        key, eq, inline = argv[i].partition("=")
        out.append(SHORT_FLAGS.get(key, key) + eq + inline)
        if eq:
            i += 1
        else:
            out.extend(argv[i + 1 : i + 2])
            i += 2
    return out


def run(cfg: EvaluateConfig) -> dict:
    e = cfg.eval
    if not e.model:
        raise ValueError("eval.model: give the model directory to evaluate (--model DIR)")
    task = make_task(cfg.task)
    device = resolve_device(e.device, "eval.device")
    # The model before the split: a bad path fails at once, not after the puzzles are generated.
    model, tokenizer = load_pretrained(e.model, dtype=resolve_dtype(e.dtype, device), setting="eval.model")
    # The judge too, before any sampling: a judge that cannot read its prompts failed after all of it, with no
    # report and no setting named (found by review).
    judge = (load_pretrained(e.judge_model, dtype=resolve_dtype(e.dtype, device), setting="eval.judge_model")
             if e.judge_model else None)
    readers = (("eval.model", e.model, tokenizer), ("eval.judge_model", e.judge_model, judge and judge[1]))
    for setting, path, tok in readers:
        if tok is not None and getattr(tok, "chat_template", None) is None:
            raise ValueError(f"{setting}: {path!r}: its tokenizer has no chat template, and the prompts are read "
                             "through one: give a chat model, or add a chat_template to its tokenizer_config.json")
    examples = task.examples(e.split)[: e.num_problems or None]
    if not examples:
        raise ValueError(f"eval.split: the {cfg.task.name} task's {e.split!r} split has no problems")
    engine = EmbeddedEngine.from_tokenizer(model.to(device), tokenizer, batch_size=e.batch_size)
    report = rerank_report(
        examples, engine=engine, tokenizer=tokenizer, task=task, n=e.n, max_new_tokens=e.max_new_tokens,
        temperature=e.temperature, top_p=e.top_p, critic_max_new_tokens=e.critic_max_new_tokens, seed=e.seed,
        rerank=e.rerank, critic_temperature=e.critic_temperature,
    )
    if judge is not None:
        judge, judge_tok = judge
        report["judge"] = {"model": e.judge_model, **judge_report(
            examples, report["per_question"], engine=EmbeddedEngine.from_tokenizer(judge.to(device), judge_tok, batch_size=e.batch_size),
            tokenizer=judge_tok, max_new_tokens=e.judge_max_new_tokens, seed=e.seed)}
    report = {"model": e.model, "task": cfg.task.name, "split": e.split, **report, "config": to_dict(cfg)}
    out = Path(e.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(strict_json(report, indent=1))
    return report


def judge_report(examples: list[Example], per_question: list[dict], *, engine: RolloutEngine, tokenizer,
                 max_new_tokens: int, seed: int) -> dict:
    """Win/tie/loss rates against the expert, by the judge model behind `engine`, of the first sample and of the
    tournament's pick (`per_question` as in rerank_report). A problem without an answer is a loss."""
    from raro_fast.tasks.poetry import judge_pairwise

    out = {}
    picks = {"first": [0] * len(per_question), "tournament": [q["tournament"] for q in per_question]}
    if all(i is None for i in picks["tournament"]):  # --rerank none
        del picks["tournament"]
    for pick, indices in picks.items():
        chosen = [None if i is None else q["answers"][i] for q, i in zip(per_question, indices)]
        items = [(ex.question, a, ex.answer) for ex, a in zip(examples, chosen) if a is not None]
        wins = ties = invalid = 0
        if items:
            judged = judge_pairwise(engine, tokenizer, items, max_new_tokens=max_new_tokens, seed=seed)
            wins, ties, invalid = judged.wins, judged.ties, judged.invalid_verdicts
        total = len(per_question)
        # An invalid verdict (unparsable, or cut off at judge_max_new_tokens) makes its problem a tie: without the
        # count, a judge that never finished read as "tie 1.000", a measurement (found by review).
        out[pick] = {"win": wins / total, "tie": ties / total, "loss": (total - wins - ties) / total,
                     "no_answer": total - len(items), "invalid_verdicts": invalid, "verdicts": 2 * len(items)}
    return out


def markdown(report: dict) -> str:
    n, q = report["n"], report["counts"]["questions"]
    acc, counts = report["accuracy"], report["counts"]
    lines = []
    if "judge" in report:
        picks = {pick: r for pick, r in report["judge"].items() if pick != "model"}
        lines += [f"Judged against the expert by {report['judge']['model']} (both orders):", "",
                  "| selection | win | tie | loss | no answer | invalid verdicts |", "|---|---|---|---|---|---|"]
        lines += [f"| {pick} | {r['win']:.3f} | {r['tie']:.3f} | {r['loss']:.3f} | {r['no_answer']} | "
                  f"{r['invalid_verdicts']}/{r['verdicts']} |" for pick, r in picks.items()]
        if any(r["invalid_verdicts"] for r in picks.values()):
            lines += ["", "An invalid verdict (none parsable, or cut off at eval.judge_max_new_tokens) makes its "
                          "problem a tie: ties are that much less a measurement."]
        lines.append("")
    if not acc:
        return "\n".join(lines + [f"The {report.get('task', 'task')} task has no verifier: no accuracies."]) + "\n"
    rows = [
        ("first sample", "pass@1", f"{counts['first_correct']}/{q}"),
        (f"mean of {n} samples", "avg@n", f"{counts['correct_samples']}/{counts['samples']} samples"),
        (f"majority vote of {n}", "majority@n", f"{counts['majority_correct']}/{q}"),
    ]
    if acc["tournament@n"] is not None:
        rows.append((f"critic tournament of {n}", "tournament@n", f"{counts['tournament_correct']}/{q}"))
    rows.append((f"oracle: any of {n} correct", "pass@n", f"{counts['any_correct']}/{q}"))
    lines += ["| selection | accuracy | correct |", "|---|---|---|"]
    lines += [f"| {label} ({key.replace('@n', f'@{n}')}) | {acc[key]:.3f} | {frac} |" for label, key, frac in rows]
    if report["critic"] is not None:
        c = report["critic"]
        lines.append(f"\nCritic: {c['matches']} matches in {c['judge_calls']} calls, "
                     f"{c['tie_or_invalid']} tie or invalid.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(help_text("python -m raro_fast.evaluate", root=EvaluateConfig))
        print("\nShort flags: " + ", ".join(f"{k} = {v}" for k, v in SHORT_FLAGS.items()))
        return 0
    try:
        report = run(load_config(expand_short_flags(argv), root=EvaluateConfig))
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(markdown(report))
    print(f"report: {Path(report['config']['eval']['output_dir']) / 'report.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
