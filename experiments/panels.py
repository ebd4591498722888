"""Runs side by side, one panel per group: held-out avg@n per evaluation (top row) and the reward of wrong answers,
a 10-step running mean (bottom row), for runs that share a starting point (docs/experiments.md, section 12).

    python experiments/panels.py ROOT OUT.png "TITLE=RUN,RUN,..." ["TITLE=RUN,..." ...]

RUN names a directory ROOT/RUN with a metrics.jsonl; a missing run is an error naming it."""
from __future__ import annotations

import sys
from pathlib import Path

from summarize import MEASURES, NULL_REASON, accuracy_curve, all_null, read_metrics

WINDOW = 10


def read(path: Path) -> list[dict]:
    if not path.is_file():
        raise SystemExit(f"{path}: no such metrics file")
    return read_metrics(path)


def running_mean(steps: list[int], values: list[float], window: int) -> tuple[list[int], list[float]]:
    means = []
    for i in range(len(values)):
        recent = values[max(0, i - window + 1):i + 1]
        means.append(sum(recent) / len(recent))
    return steps, means


def main(argv: list[str]) -> int:
    if len(argv) < 3 or any("=" not in g for g in argv[2:]):
        print(__doc__)
        return 2
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    root, out = Path(argv[0]), Path(argv[1])
    groups = [(g.split("=", 1)[0], g.split("=", 1)[1].split(",")) for g in argv[2:]]
    fig, axes = plt.subplots(2, len(groups), figsize=(4.2 * len(groups), 6.4), squeeze=False, sharex=True)
    for col, (title, runs) in enumerate(groups):
        for i, run in enumerate(runs):
            rows = read(root / run / "metrics.jsonl")
            curve = accuracy_curve(rows, "avg@n")
            if not curve and all_null(rows, MEASURES["avg@n"]):
                raise SystemExit(f"{root / run / 'metrics.jsonl'}: no held-out avg@n to plot: {NULL_REASON}")
            if not curve:  # an empty line with a legend entry looked like a plotted run
                raise SystemExit(f"{root / run / 'metrics.jsonl'}: no held-out avg@n (eval/heldout_avg_at_n) to plot; "
                                 "was it trained with train.eval_samples 0?")
            color = f"C{i}"  # one colour per run in both rows, also where a run (RLVR) logs no critic reward
            axes[0][col].plot(list(curve), list(curve.values()), marker="o", label=run, color=color)
            wrong = [(r["step"], r["reward/policy_mean_incorrect"]) for r in rows
                     if r.get("reward/policy_mean_incorrect") is not None]
            if wrong:
                axes[1][col].plot(*running_mean(*map(list, zip(*wrong)), WINDOW), label=run, color=color)
        axes[0][col].set_title(title, fontsize=10)
        axes[1][col].set_xlabel("training step")
        axes[0][col].legend(fontsize=8)
        axes[0][col].grid(alpha=0.3)
        axes[1][col].grid(alpha=0.3)
    axes[0][0].set_ylabel("held-out avg@n")
    axes[1][0].set_ylabel(f"reward of wrong answers ({WINDOW}-step mean)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
