"""The support experiment over training seeds: several `raro_fast.analyze` reports (one per seed, the same models
by name) as one table of mean ± sd over seeds and one plot of mean pass@k with the min..max band. From the repo root:
    python experiments/support_seeds.py OUT_PNG REPORT.json [REPORT.json ...]
prints the markdown table and writes the plot."""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

# Support categories are against the first model (the base has none).
# (name, value of a model's report at k, decimals)
COLUMNS = [("pass@1", lambda m, k: m["pass_at_k"]["1"], 3), ("pass@K", lambda m, k: m["pass_at_k"][str(k)], 3),
           *((c, lambda m, k, c=c: m.get("categories", {}).get(c), 1) for c in "PSE"),
           ("answer entropy@N", lambda m, k: m["answer_entropy"], 3)]


def read_reports(paths: list[str]) -> list[dict]:
    reports = []
    for path in paths:
        try:
            report = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not a readable analyze report ({e})") from None
        if "models" not in report or "k" not in report:
            raise ValueError(f"{path}: not an analyze report (no 'models' or 'k')")
        reports.append(report)
    if len({r["k"] for r in reports}) != 1 or len({tuple(r["models"]) for r in reports}) != 1:
        raise ValueError("the reports differ in k or in the models they name; give one report per seed of one grid")
    # Found by review: answer entropy over 4 samples was averaged with entropy over 2 (it rises with the count), and
    # reports drawn at other temperatures or on other problems could not be told apart.
    if len({r.get("answer_entropy_samples") for r in reports}) != 1:
        raise ValueError("the reports take answer entropy over different numbers of samples "
                         f"({', '.join(str(r.get('answer_entropy_samples')) for r in reports)}), which do not compare")
    drawn = [_drawn_by(r) for r in reports if "config" in r]
    if any(d != drawn[0] for d in drawn):
        raise ValueError(f"the reports were drawn with other settings ({drawn[0]} against "
                         f"{next(d for d in drawn if d != drawn[0])}); give one report per seed of one grid")
    return reports


def _drawn_by(report: dict) -> dict:
    """What draws a report's samples besides its models (report.json's config; reports from before have none)."""
    a = report["config"]["analysis"]
    return {"task": report["config"]["task"], **{k: a[k] for k in ("split", "num_problems", "temperature", "top_p",
                                                                     "max_new_tokens", "entropy_samples")}}


def _cell(values: list, digits: int) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {sd:.{digits}f}"


def table(reports: list[dict]) -> str:
    k = reports[0]["k"]
    n = reports[0].get("answer_entropy_samples", k)  # the samples each answer entropy is over (said, review)
    head = [name.replace("K", str(k)).replace("@N", f"@{n}") for name, _, _ in COLUMNS]
    lines = [f"| model | {' | '.join(head)} |", "|---" * (len(COLUMNS) + 1) + "|"]
    for model in reports[0]["models"]:
        cells = [_cell([get(r["models"][model], k) for r in reports], digits) for _, get, digits in COLUMNS]
        lines.append(f"| {model} | {' | '.join(cells)} |")
    return "\n".join(lines)


def plot(reports: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for model in reports[0]["models"]:
        ks = sorted(int(k) for k in reports[0]["models"][model]["pass_at_k"])
        rows = [[r["models"][model]["pass_at_k"][str(k)] for k in ks] for r in reports]
        ax.plot(ks, [statistics.mean(c) for c in zip(*rows)], marker=".", label=model)
        ax.fill_between(ks, [min(c) for c in zip(*rows)], [max(c) for c in zip(*rows)], alpha=0.15)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k")
    ax.set_ylabel("pass@k")
    ax.set_title(f"pass@k, mean of {len(reports)} seeds (band: min..max)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        reports = read_reports(argv[1:])
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table(reports))
    plot(reports, argv[0])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
