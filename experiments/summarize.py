"""Table and curves of a grid of runs named MODE-sSEED (experiments/*.sh): held-out accuracy per mode, mean and
spread over seeds, at the last step that every run reached; each mode's gain over its own step 0; the critic's
diagnostics of the RARO runs; and whether RARO met the targets of docs/experiments.md.

    python experiments/summarize.py ROOT [--out DIR] [--title TEXT] [--evals EVALS]

The held-out measure is avg@n (`train.eval_samples`) where every run logged it from step 0, else the greedy
accuracy (`--measure` chooses). Writes DIR/replication.md (also printed), DIR/replication_curves.png and, for RARO runs, DIR/critic_curves.png
(DIR defaults to ROOT). With --evals, also a table of the final models' sampled evaluations: EVALS/MODE-sSEED/
report.json and EVALS/base/report.json, written by `raro_fast.evaluate` (avg@n: the mean accuracy of n samples per
puzzle, a lower-variance measure than one greedy answer; majority@n; the critic tournament's pick; pass@n).
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
from collections import defaultdict
from pathlib import Path

RUN_NAME = re.compile(r"^(?P<mode>.+)-s(?P<seed>\d+)$")
# The held-out measures a run logs at each evaluation: avg@n (the mean accuracy of n samples per puzzle,
# `train.eval_samples`) where every run has it, else the greedy accuracy (one answer per puzzle, noisier).
MEASURES = {"avg@n": "eval/heldout_avg_at_n", "greedy": "eval/heldout_accuracy"}
# Run means of the critic's diagnostics (RARO modes only): whether its reward carried signal.
DIAGNOSTICS = (("critic decisive acc.", "critic/decisive_accuracy"), ("agrees with verifier", "critic/oracle_agreement"),
               ("reward right", "reward/policy_mean_correct"), ("reward wrong", "reward/policy_mean_incorrect"),
               ("gap", "reward/policy_gap"), ("tie rate", "critic/tie_rate"))
# The rewards of right and wrong answers and their gap are averaged over the same steps, those with a gap (both
# kinds of answer judged), as raro_fast.metrics.critic_signal does: each over the steps of its own key counted a
# step with wrong answers only in "reward wrong" and not in "gap", so the printed gap was not right minus wrong.
PAIRED = {"reward/policy_mean_correct", "reward/policy_mean_incorrect", "reward/policy_gap"}


def read_runs(root: Path) -> dict[str, dict[int, list[dict]]]:
    """{mode: {seed: records}} for every ROOT/MODE-sSEED/metrics.jsonl, seeds in numeric order (the paths' text
    order put s10 before s2, and the per-seed columns of one table came in two orders)."""
    runs: dict[str, dict[int, list[dict]]] = defaultdict(dict)
    folders: dict[tuple[str, int], str] = {}
    for path in sorted(root.glob("*/metrics.jsonl")):
        m = RUN_NAME.match(path.parent.name)
        if not m:
            continue
        key = (m["mode"], int(m["seed"]))
        if key in folders:  # MODE-s01 and MODE-s1: one would silently replace the other
            raise ValueError(f"{path.parent}: the same mode and seed as {root / folders[key]}")
        folders[key] = path.parent.name
        runs[m["mode"]][int(m["seed"])] = read_metrics(path)
    if not runs:
        raise ValueError(f"{root}: no MODE-sSEED/metrics.jsonl runs found")
    return {mode: dict(sorted(seeds.items())) for mode, seeds in sorted(runs.items())}


def read_metrics(path: Path) -> list[dict]:
    """The records of one metrics.jsonl; a line that is not JSON is an error naming the file and line."""
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        try:
            # NaN/Infinity read as missing, as the trainer writes them (statistics.stdev stopped on a NaN: review)
            records.append(json.loads(line, parse_constant=lambda name: None))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not a JSON record ({e})") from None
    return records


def measure_of(runs: dict[str, dict[int, list[dict]]]) -> str:
    """avg@n if every run logged it at step 0 and later, else greedy."""
    every = [recs for seeds in runs.values() for recs in seeds.values()]
    logged = [sorted(r["step"] for r in recs if r.get(MEASURES["avg@n"]) is not None) for recs in every]
    return "avg@n" if all(len(s) > 1 and s[0] == 0 for s in logged) else "greedy"


def accuracy_curve(records: list[dict], measure: str = "greedy") -> dict[int, float]:
    key = MEASURES[measure]
    return {r["step"]: r[key] for r in records if r.get(key) is not None}


def all_null(records: list[dict], key: str) -> bool:
    """A run that logged `key` and never a value: its task has no verifier (poetry), or it had no held-out problems.
    Its empty curve was blamed on the evaluation schedule (found by review)."""
    return any(key in r for r in records) and all(r.get(key) is None for r in records)


NULL_REASON = "every value logged is null (a task without a verifier, such as poetry, or no held-out problems)"


def _mean_sd(xs: list[float]) -> str:
    if not xs:
        return "-"
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs):.3f} ± {sd:.3f}"


def summarize(runs: dict[str, dict[int, list[dict]]], measure: str = "greedy") -> tuple[str, int]:
    curves = {mode: {seed: accuracy_curve(recs, measure) for seed, recs in seeds.items()} for mode, seeds in runs.items()}
    what = ("avg@n (mean accuracy of the n samples per puzzle)" if measure == "avg@n"
            else "greedy accuracy (fraction of puzzles solved)")
    # Compared only at steps that every run evaluated: runs on other evaluation schedules must average the same
    # steps (taken from the union of steps, each run averaged whichever of them it had).
    for mode, seeds in runs.items():
        for seed, records in seeds.items():
            if all_null(records, MEASURES[measure]):
                raise ValueError(f"{mode}-s{seed}: no held-out {MEASURES[measure]} to compare: {NULL_REASON}")
    common = sorted(set.intersection(*(set(c) for seeds in curves.values() for c in seeds.values())))
    if not common:
        raise ValueError("the runs share no evaluation step; give them the same train.eval_every")
    trained = [s for s in common if s > 0]  # step 0 is the base's (with 3 evaluations it was in the window: review)
    if not trained:
        raise ValueError("the runs share no evaluation after step 0; give them the same train.eval_every")
    last, window = common[-1], trained[-3:]
    lines = [
        f"Held-out {what}, mean ± sd over seeds; compared at step {last}, the "
        f"last step every run evaluated; 'last {len(window)} evals' averages steps {', '.join(map(str, window))} of "
        "each run first (less noise from one evaluation).", "",
        "| mode | seeds | base (step 0) | step " + str(last) + " | last " + str(len(window)) + " evals | per seed at step "
        + str(last) + " | train answer acc. (last 10 steps) |",
        "|---|---|---|---|---|---|---|",
    ]
    tails: dict[str, dict[int, float]] = {}
    for mode in sorted(curves):
        seeds = curves[mode]
        base = [c[0] for c in seeds.values() if 0 in c]
        at_last = [seeds[s][last] for s in sorted(seeds) if last in seeds[s]]
        tails[mode] = {s: statistics.mean(c[x] for x in window if x in c) for s, c in seeds.items()}
        tail = list(tails[mode].values())
        upto = [[r for r in recs if r["step"] <= last][-10:] for recs in runs[mode].values()]  # at `last`, like the rest
        train = [statistics.mean(r["policy/answer_accuracy"] for r in recs if r.get("policy/answer_accuracy") is not None)
                 for recs in upto if any(r.get("policy/answer_accuracy") is not None for r in recs)]
        lines.append(f"| {mode} | {len(seeds)} | {_mean_sd(base)} | {_mean_sd(at_last)} | {_mean_sd(tail)} | "
                     f"{' / '.join(f'{x:.3f}' for x in at_last)} | {_mean_sd(train)} |")
    if {"raro", "rlvr"} <= set(tails):
        raro, rlvr, note = paired(tails, "raro", "rlvr")
        if rlvr:
            lines += ["", f"RARO / RLVR (last {len(window)} evals{note}): {raro / rlvr:.2f}"]
    gains = {mode: {s: tails[mode][s] - c[0] for s, c in seeds.items() if 0 in c} for mode, seeds in curves.items()}
    lines += ["", f"Gain over each run's own step 0 (last {len(window)} evals minus step 0), mean ± sd over seeds:", "",
              "| mode | gain | per seed | seeds that gained |", "|---|---|---|---|"]
    for mode in sorted(gains):
        g = list(gains[mode].values())
        lines.append(f"| {mode} | {_mean_sd(g)} | {' / '.join(f'{x:+.3f}' for x in g)} | "
                     f"{sum(x > 0 for x in g)} of {len(g)} |")
    # A run without a step-0 evaluation (its record lost to a power cut, a log cut by hand) has no gain: said, not
    # dropped silently from the gains and the targets while the seeds column still counted it.
    unbased = [f"{mode} seed {s}" for mode in sorted(curves) for s, c in sorted(curves[mode].items()) if 0 not in c]
    if unbased:
        lines += ["", f"Not in the gains or targets (no step-0 evaluation): {', '.join(unbased)}."]
    diag_modes = [m for m in sorted(runs) if any(r.get(DIAGNOSTICS[0][1]) is not None
                                                for recs in runs[m].values() for r in recs)]
    if diag_modes:
        lines += ["", f"The critic up to step {last} (mean over steps, then mean ± sd over seeds); rewards are the "
                  "policy's RARO reward of answers the verifier accepts (right) or rejects (wrong), these and their "
                  "gap over the steps that judged both:", "",
                  "| mode | " + " | ".join(name for name, _ in DIAGNOSTICS) + " |",
                  "|---|" + "---|" * len(DIAGNOSTICS)]
        for mode in diag_modes:
            # up to `last`, like the held-out table: runs of other lengths are compared over the same steps
            upto = [[r for r in recs if r["step"] <= last] for recs in runs[mode].values()]
            # The paired rewards over the same seeds: those that judged both kinds, or every seed where none did (a
            # seed without such a step counted in right and wrong and not in the gap: found by review)
            judged_both = [recs for recs in upto if any(r.get("reward/policy_gap") is not None for r in recs)]
            cells = []
            for _, key in DIAGNOSTICS:
                pool = (judged_both or upto) if key in PAIRED else upto
                vals = [m for recs in pool if (m := _run_mean(_steps_of(recs, key), key)) is not None]
                cells.append(_mean_sd(vals) + (f" ({len(vals)} of {len(upto)} seeds)" if vals and len(vals) < len(upto)
                                               else ""))
            lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    lines += targets(tails, gains)
    return "\n".join(lines) + "\n", last


def paired(tails: dict[str, dict[int, float]], a: str, b: str) -> tuple[float, float, str]:
    """Means of modes a and b over the seeds both have (a ratio of means over different seeds compares other
    draws), and a note naming those seeds where either mode has others."""
    shared = sorted(tails[a].keys() & tails[b].keys())
    if not shared:
        raise ValueError(f"modes {a} and {b} share no seed")
    note = "" if len(shared) == len(tails[a]) == len(tails[b]) else f", seeds {', '.join(map(str, shared))} only"
    return (statistics.mean(tails[a][s] for s in shared), statistics.mean(tails[b][s] for s in shared), note)


def _steps_of(records: list[dict], key: str) -> list[dict]:
    """The steps a diagnostic is averaged over: for the paired rewards, those with a gap (see PAIRED); where no step
    has one (no right answer judged: a fooled critic matters most there), the rewards over every step, and no gap
    (they were blank too)."""
    if key not in PAIRED:
        return records
    both = [r for r in records if r.get("reward/policy_gap") is not None]
    return both if both or key == "reward/policy_gap" else records


def _run_mean(records: list[dict], key: str) -> float | None:
    vals = [r[key] for r in records if r.get(key) is not None]
    return statistics.mean(vals) if vals else None


def targets(tails: dict[str, dict[int, float]], gains: dict[str, dict[int, float]]) -> list[str]:
    """The three targets of docs/experiments.md, each met or not, on the last-evals means, for every RARO mode of the
    grid (raro and its variants, raro_*; not the oracle-critic diagnostic). A variant raro_X is held against
    sft_X where the grid has it (the same demonstrations: raro_varied against sft_varied), else against sft. Each
    comparison with RLVR or SFT is over the seeds both modes have."""
    variants = [m for m in sorted(tails) if (m == "raro" or m.startswith("raro_")) and m != "raro_oracle"]
    if not variants or not {"rlvr", "sft"} <= set(tails):
        return []
    lines = ["", "Targets:", ""]
    for mode in variants:
        g = list(gains[mode].values())
        ours, rlvr, vs_rlvr = paired(tails, mode, "rlvr")
        own_sft = "sft" + mode[len("raro"):]
        ref = own_sft if own_sft in tails else "sft"
        ours_s, sft, vs_sft = paired(tails, mode, ref)
        checks = [
            (f"{mode} >= 0.9 x RLVR: {ours:.3f} vs {0.9 * rlvr:.3f}{vs_rlvr}", ours >= 0.9 * rlvr),
            (f"{mode} > {'SFT' if ref == 'sft' else ref}: {ours_s:.3f} vs {sft:.3f}{vs_sft}", ours_s > sft),
            # One seed has no spread to beat (its sd printed as 0 made any gain pass): not judged.
            (f"{mode} above its own base by more than the seed spread: gain {statistics.mean(g):+.3f} vs sd "
             f"{statistics.stdev(g):.3f}", statistics.mean(g) > statistics.stdev(g)) if len(g) > 1 else
            (f"{mode} above its own base by more than the seed spread: {len(g)} seed with a base, no spread",
             None),
        ]
        lines += [f"- {'n/a' if ok is None else 'met' if ok else 'NOT met'}: {text}" for text, ok in checks]
    return lines


EVAL_KEYS = ("avg@n", "majority@n", "tournament@n", "pass@n")


def read_evals(evals: Path) -> tuple[dict[int | None, dict], dict[str, dict[int, dict]]]:
    """({seed: the base's accuracies}, {mode: {seed: accuracies}}) from EVALS/*/report.json: EVALS/base-sSEED is
    the base of that seed's runs, EVALS/base (seed None) the base of every seed without its own."""
    bases, modes = {}, defaultdict(dict)
    first: tuple[Path, dict] | None = None  # what the first report evaluated, which every other must share
    for path in sorted(evals.glob("*/report.json")):
        try:
            report = json.loads(path.read_text())
            acc = {**report["accuracy"], "n": report["n"], "temperature": _eval_temperature(report)}
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not a report of raro_fast.evaluate ({e!r})") from None
        if not report["accuracy"]:  # a KeyError in eval_table (found by review)
            raise ValueError(f"{path}: the {report.get('task', '?')} task has no verifier, so the report holds no "
                             "accuracies to tabulate (its judge's win rates, if it was judged, are under \"judge\" in that file)")
        # Reports of another task, data or split went into one table, gains over a base of another task among them
        # (found by review)
        evaluated = _evaluated(report)
        if first is None:
            first = path, evaluated
        elif (differ := [k for k in evaluated if evaluated[k] != first[1][k]]):
            k = differ[0]
            # each value beside its own file (found by review: "there" and "here" named them the wrong way round)
            raise ValueError(f"{path}: evaluated other problems ({k}: {evaluated[k]!r}) than {first[0]} "
                             f"({first[1][k]!r}); compare reports of one task, data and split")
        m = RUN_NAME.match(path.parent.name)
        if path.parent.name == "base":
            bases[None] = acc
        elif m and m["mode"] == "base":
            bases[int(m["seed"])] = acc
        elif m:
            modes[m["mode"]][int(m["seed"])] = acc
    if not modes:
        raise ValueError(f"{evals}: no MODE-sSEED/report.json evaluations found")
    return bases, modes


def _evaluated(report: dict) -> dict:
    """What a report's problems were: its task, the task's settings (data, split seed, sizes), its split and how
    many questions; None where an older report does not say."""
    config = report.get("config") if isinstance(report.get("config"), dict) else {}
    task = report.get("task")
    counts = report.get("counts") if isinstance(report.get("counts"), dict) else {}
    settings = (config.get("task") or {}).get(task) if isinstance(task, str) else None
    if isinstance(settings, dict):  # only what picks the problems: a verifier's timeout or the experts' form do not,
        # and one data file is named by a relative path in one report and an absolute one in another (review)
        settings = {k: (Path(v).name if k == "path" and isinstance(v, str) else v) for k, v in settings.items()
                    if k not in ("verify_timeout_seconds", "expert_form")}
    return {"task": task, "split": report.get("split"), "questions": counts.get("questions"), "task settings": settings}


def _eval_temperature(report: dict) -> float | None:
    """The sampling temperature a raro_fast.evaluate report was made at (its config's eval.temperature); None for a
    report that does not record it."""
    config = report.get("config")
    t = config.get("eval", {}).get("temperature") if isinstance(config, dict) else None
    return t if isinstance(t, (int, float)) and not isinstance(t, bool) else None


def eval_table(bases: dict[int | None, dict], modes: dict[str, dict[int, dict]]) -> str:
    """Mean ± sd over seeds of each evaluation, and avg@n's gain over each seed's own base."""
    accs = [acc for seeds in [*modes.values(), bases] for acc in seeds.values()]
    ns = {acc["n"] for acc in accs}
    n = ns.pop() if len(ns) == 1 else "n"
    # The header said "at temperature 1" whatever the reports were sampled at; it names a temperature only where
    # every report records one.
    temps = {acc.get("temperature") for acc in accs}
    at = "" if not temps or None in temps else " at temperature" + ("s " if len(temps) > 1 else " ") + ", ".join(
        f"{t:g}" for t in sorted(temps))
    lines = [f"Final models, {n} samples per held-out puzzle{at} (raro_fast.evaluate), mean ± sd over "
             "seeds; avg@n is the expected accuracy of one sample, far less noisy than one greedy answer per puzzle.", "",
             "| model | seeds | " + " | ".join(k.replace("@n", f"@{n}") for k in EVAL_KEYS) + " | avg gain over base | "
             "avg per seed |", "|---|---|" + "---|" * (len(EVAL_KEYS) + 2)]
    if bases:
        seeds = [bases[s] for s in sorted(bases, key=lambda s: -1 if s is None else s)]
        lines.append(f"| base | {len(seeds)} | " + " | ".join(_mean_sd([a[k] for a in seeds if a.get(k) is not None])
                                                        for k in EVAL_KEYS) + " | | "
                     + " / ".join(f"{a['avg@n']:.3f}" for a in seeds) + " |")
    for mode in sorted(modes):
        seeds = sorted(modes[mode])
        accs = [modes[mode][s] for s in seeds]
        cells = [_mean_sd([a[k] for a in accs if a.get(k) is not None]) for k in EVAL_KEYS]
        own = [bases.get(s, bases.get(None)) for s in seeds]
        gain = _mean_sd([a["avg@n"] - b["avg@n"] for a, b in zip(accs, own) if b]) if all(own) else "-"
        lines.append(f"| {mode} | {len(accs)} | " + " | ".join(cells) + f" | {gain} | "
                     + " / ".join(f"{a['avg@n']:.3f}" for a in accs) + " |")
    return "\n".join(lines) + "\n"


def plot(runs: dict[str, dict[int, list[dict]]], path: Path, title: str = "Countdown", measure: str = "greedy") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for mode in sorted(runs):
        curves = [accuracy_curve(recs, measure) for recs in runs[mode].values()]
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        mean = [statistics.mean(c[s] for c in curves) for s in steps]
        lo = [min(c[s] for c in curves) for s in steps]
        hi = [max(c[s] for c in curves) for s in steps]
        line, = ax.plot(steps, mean, marker="o", ms=3, label=f"{mode} ({len(curves)} seeds)")
        ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.15)
    ax.set_xlabel("training step")
    ax.set_ylabel(f"held-out accuracy ({measure})")
    ax.set_title(f"{title}: mean over seeds, band = min..max", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_critic(runs: dict[str, dict[int, list[dict]]], path: Path, window: int = 5) -> bool:
    """Per RARO run, the policy's reward of wrong answers and the critic's agreement with the verifier over the
    steps (running means of `window` steps): a wrong-answer reward that rises while agreement falls is a critic
    being exploited. False (no plot) when no run logged them."""
    panels = (("reward of wrong answers", "reward/policy_mean_incorrect"),
              ("critic agrees with the verifier", "critic/oracle_agreement"))
    modes = [m for m in sorted(runs) if any(r.get(panels[0][1]) is not None for recs in runs[m].values() for r in recs)]
    if not modes:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, (name, key) in zip(axes, panels):
        for i, mode in enumerate(modes):
            for seed, recs in sorted(runs[mode].items()):
                pts = [(r["step"], r[key]) for r in recs if r.get(key) is not None]
                smooth = [statistics.mean(v for _, v in pts[max(0, j - window + 1) : j + 1]) for j in range(len(pts))]
                ax.plot([s for s, _ in pts], smooth, color=f"C{i}", alpha=0.5 + 0.5 * (seed == 0), lw=1.2,
                        label=f"{mode} s{seed}")
        ax.set_title(f"{name} ({window}-step running mean)", fontsize=9)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", type=Path)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--title", default="Countdown", help="what the runs trained on, for the plot's title")
    ap.add_argument("--evals", type=Path, default=None, help="folder of raro_fast.evaluate reports, one per run")
    ap.add_argument("--measure", choices=("auto", *MEASURES), default="auto",
                    help="the held-out measure of the tables and targets; auto: avg@n where every run logged it")
    args = ap.parse_args()
    out = args.out or args.root
    out.mkdir(parents=True, exist_ok=True)
    try:
        runs = read_runs(args.root)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    measure = measure_of(runs) if args.measure == "auto" else args.measure
    if measure == "avg@n" and measure_of(runs) != "avg@n":
        raise SystemExit(f"error: --measure avg@n: not every run under {args.root} logged {MEASURES['avg@n']} "
                         "(train.eval_samples) at step 0 and later")
    try:  # modes that share no seed or evaluation step ended in a traceback (found by review)
        table, _ = summarize(runs, measure)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if args.evals:
        try:
            table += "\n" + eval_table(*read_evals(args.evals))
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
    (out / "replication.md").write_text(table)
    plot(runs, out / "replication_curves.png", args.title, measure)
    print(table)
    print(f"curves: {out / 'replication_curves.png'}")
    if plot_critic(runs, out / "critic_curves.png"):
        print(f"critic: {out / 'critic_curves.png'}")


if __name__ == "__main__":
    main()
