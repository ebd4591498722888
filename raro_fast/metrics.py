"""What a run shows: a progress bar, one JSON line of metrics per step, a PNG of the curves, a summary table."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterable

from raro_fast.durable import fsync_path, replace_durably, write_text_atomic

# Curves drawn at the end, one panel each: (title, metric keys).
PLOT_PANELS = [
    ("rewards", ["reward/policy_mean", "reward/critic_mean"]),
    ("policy reward of right vs wrong answers (verifier, logged only)",
     ["reward/policy_mean_correct", "reward/policy_mean_incorrect", "reward/policy_gap"]),
    ("critic", ["critic/tie_rate", "critic/decisive_accuracy", "critic/oracle_agreement", "critic/invalid_rate"]),
    ("held-out accuracy", ["eval/heldout_accuracy", "eval/heldout_avg_at_n", "eval/heldout_pass_at_n",
                           "eval/heldout_tournament_at_n"]),
    ("train answer accuracy (verifier, not trained on)", ["policy/answer_accuracy"]),
    ("lengths (tokens)", ["policy/response_length", "critic/response_length"]),
    ("trainer-engine log-prob gap", ["logprob/gap_mean_abs", "logprob/gap_max_abs"]),
    ("entropy and NLL (nats per token)", ["policy/entropy", "critic/entropy", "policy/nll"]),
    ("time per stage (s)", ["timing_s/gen", "timing_s/old_log_prob", "timing_s/update_actor", "timing_s/update_weights"]),
    # a DPO run's own numbers were neither plotted nor tabulated (found by review)
    ("DPO pairs", ["dpo/loss", "dpo/margin", "dpo/accuracy", "dpo/pair_rate"]),
]


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def strict_json(obj: Any, **kwargs: Any) -> str:
    """JSON that any strict parser reads: NaN and infinities are written as null (json.dumps writes a bare NaN)."""
    return json.dumps(_finite(obj), allow_nan=False, **kwargs)


class MetricsLog:
    """Appends JSON records, each with its step, to a .jsonl file (metrics.jsonl: one a step; rollouts.jsonl: one a
    trained sequence). On resume, records past the resumed step are dropped, so the file always reads as one
    uninterrupted run.

    `main`: whether this process owns the file (the main rank; by default, whether it is `enabled`). The owner
    cuts an existing file back to the resumed step (`resume_step`; None: a run from scratch keeps nothing) even
    when it writes nothing itself: a resume with the log off (train.log_rollouts_every 0) would otherwise leave
    the killed run's records of later steps, and a further resume with the log on would keep them as this run's."""

    def __init__(self, path: str | os.PathLike, *, enabled: bool, resume_step: int | None,
                 main: bool | None = None) -> None:
        self.path = Path(path)
        self.enabled = enabled
        self.kept_steps: list[int | None] = []  # on resume, the steps of the records kept
        if not (enabled or (main and self.path.exists())):
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None or not self.path.exists():
            write_text_atomic(self.path, "")
            return
        # Read a line at a time, and cut rather than rewrite: the whole file was read and rewritten on every resume,
        # a peak of 4x its size in memory (rollouts.jsonl grows with every step; found by review).
        last = end = 0  # the offsets after the last record kept and after the last line read
        in_order = True  # no record kept after one dropped: the records kept are the file's first `last` bytes
        for line, step, keep in self._records(resume_step):
            end += len(line)
            if keep:
                in_order, last = in_order and last == end - len(line), end
                self.kept_steps.append(step)
        if in_order:
            if last < end or (last and not self._ends_line(last)):
                self._cut(last)
            return
        # Records kept after one dropped (a file written out of step order): written beside and renamed. Rewritten in
        # place, a resume killed mid-write left the first lines only, and the next resume took the cut line for the
        # one being written when killed: the run's history lost, silently.
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with tmp.open("wb") as out:
            out.writelines(line.rstrip(b"\n") + b"\n" for line, _, keep in self._records(resume_step) if keep)
        replace_durably(tmp, self.path)

    def _records(self, resume_step: int):
        """(line, its step, whether the record is kept: its step at most `resume_step`) for each line of the file; a
        line that is not a record is an error unless it is the last (the one being written when the run was killed:
        dropped)."""
        with self.path.open("rb") as f:
            bad = None
            for number, line in enumerate(f, 1):
                if bad is not None:
                    raise bad
                try:
                    rec = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    bad = ValueError(f"{self.path}:{number}: not a JSON record ({e}); cannot resume this run's metrics")
                    yield line, None, False
                    continue
                yield line, rec.get("step"), rec.get("step", math.inf) <= resume_step

    def _ends_line(self, offset: int) -> bool:
        with self.path.open("rb") as f:
            f.seek(offset - 1)
            return f.read(1) == b"\n"

    def _cut(self, size: int) -> None:
        """Truncate the file to `size` bytes, ending in a newline: one call, so a resume killed inside it leaves
        either the whole file or the cut one, never a part."""
        os.truncate(self.path, size)
        if size and not self._ends_line(size):
            with self.path.open("ab") as f:
                f.write(b"\n")
        fsync_path(self.path)

    def sync(self) -> None:
        """Put the records written so far on disk: a checkpoint's step must not be ahead of its metrics after a
        power cut (appends are not synced; a checkpoint is)."""
        if self.path.exists():
            fsync_path(self.path)

    def write(self, record: dict[str, Any]) -> None:
        self.write_all([record])

    def write_all(self, records: Iterable[dict[str, Any]]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.writelines(strict_json(record, sort_keys=True) + "\n" for record in records)

    def update(self, step: int, fields: dict[str, Any]) -> None:
        """Add `fields` to the record of `step` (the file's last), rewritten beside and renamed."""
        if not self.enabled:
            return
        records = self.read()
        if not records or records[-1].get("step") != step:
            records.append({"step": step})
        records[-1].update(fields)
        write_text_atomic(self.path, "".join(strict_json(record, sort_keys=True) + "\n" for record in records))

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def plot_panels(records: list[dict[str, Any]]) -> list[tuple[str, list[str]]]:
    """The panels of PLOT_PANELS that `records` logged, each with the keys it logged."""
    panels = [(t, [k for k in keys if any(k in r for r in records)]) for t, keys in PLOT_PANELS]
    return [(t, keys) for t, keys in panels if keys]


def plot_curves(records: list[dict[str, Any]], path: str | os.PathLike, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = plot_panels(records)
    if not panels:
        return
    cols = 2
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(11, 3.2 * rows), squeeze=False)
    for ax, (panel_title, keys) in zip(axes.flat, panels):
        for key in keys:
            pts = [(r["step"], r[key]) for r in records if key in r and r[key] is not None]
            if pts:
                xs, ys = zip(*pts)
                # Short labels where they stay unique within the panel (policy/entropy vs critic/entropy do not).
                short = [k.split("/", 1)[-1] for k in keys]
                label = key.split("/", 1)[-1] if len(set(short)) == len(short) else key
                ax.plot(xs, ys, marker="o" if len(pts) < 30 else None, ms=3, label=label)
        ax.set_title(panel_title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
        else:  # e.g. critic panels of an SFT run
            ax.text(0.5, 0.5, "no data in this run", ha="center", va="center", transform=ax.transAxes, color="gray")
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary_table(records: list[dict[str, Any]], window: int = 5) -> str:
    """A fixed-width table of the main metrics: held-out accuracy at the first and the last evaluation; every other
    metric as its mean over the first and the last `window` steps that report it (one step is too noisy to read)."""
    keys = [
        "eval/heldout_accuracy",
        "eval/heldout_avg_at_n",
        "eval/heldout_tournament_at_n",
        "policy/answer_accuracy",
        "reward/policy_mean",
        "reward/critic_mean",
        "reward/policy_gap",
        "critic/tie_rate",
        "critic/decisive_accuracy",
        "critic/oracle_agreement",
        "critic/invalid_rate",
        "dpo/loss",
        "dpo/margin",
        "dpo/accuracy",
        "policy/response_length",
        "policy/truncated_rate",
        "logprob/gap_mean_abs",
        "perf/throughput",
        "timing_s/step",
    ]
    body = []  # (metric, values averaged, first, last)
    for key in keys:
        vals = [r[key] for r in records if r.get(key) is not None]
        if not vals:
            continue
        k = 1 if key.startswith("eval/") else max(1, min(window, len(vals) // 2))
        body.append((key, k, _fmt(sum(vals[:k]) / k), _fmt(sum(vals[-k:]) / k)))
    # The header says how many steps the averages take (fewer than `window` in a short run); a metric reported on
    # fewer steps than the others says its own count. Held-out rows are one evaluation each (see above).
    n = max((k for key, k, _, _ in body if not key.startswith("eval/")), default=1)
    label = lambda word: word if n == 1 else f"{word} ({n})"
    rows = [("metric", label("first"), label("last"))]
    # found by review: the held-out rows sat under "first (5)" unlabelled, though each is one evaluation
    rows += [(key if k == n else f"{key} ({k}{' eval' if key.startswith('eval/') else ''})", a, b)
             for key, k, a, b in body]
    w0 = max(len(r[0]) for r in rows)
    lines = [f"{a:<{w0}}  {b:>10}  {c:>10}" for a, b, c in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def critic_signal(records: list[dict[str, Any]], *, oracle: bool = False) -> str | None:
    """One sentence on whether the critic's reward carried signal over the run (means over steps), or None when
    the run logged no critic diagnostics (not RARO). The rewards of right and wrong
    answers are averaged over the same steps, those that had both, so the gap printed is their difference (a step
    with wrong answers only counted in the one and not in the other). A run with no such step (no right answer
    judged at all, the case where a fooled critic matters most) still gets its sentence, with the wrong answers'
    reward alone: it returned None there, and the run ended without a word on its critic."""

    def mean(key: str, rows=records) -> float | None:
        vals = [r[key] for r in rows if r.get(key) is not None]
        return sum(vals) / len(vals) if vals else None

    decisive, ties = mean("critic/decisive_accuracy"), mean("critic/tie_rate")
    if ties is None:
        return None
    if decisive is None:  # found by review: a critic that only tied (or only rambled) got no sentence at all
        head = (f"critic, means over steps: no decisive verdict (tie rate {ties:.2f}, invalid rate "
                f"{mean('critic/invalid_rate') or 0.0:.2f}); ")
    else:
        head = (f"critic, means over steps: picked the expert in {decisive:.2f} of its decisive verdicts (chance "
                f"0.50), tie rate {ties:.2f}; ")
    # Under `raro.critic oracle` the verifier paid the policy; the rewards logged are what the critic would have paid.
    whose, verifier = (("the critic would have paid", "the verifier set the policy's reward (raro.critic oracle)")
                       if oracle else ("the policy's reward was", "the verifier is only logged"))
    both = [r for r in records if r.get("reward/policy_gap") is not None]
    if not both:
        wrong, right = mean("reward/policy_mean_incorrect"), mean("reward/policy_mean_correct")
        if wrong is None and right is None:  # a task without a verifier (poetry), or no answer judged at all:
            # the critic's own numbers stand (the sentence used to be dropped; found by review)
            return head + "no policy answer was verified right or wrong (no reward gap measured)"
        paid = " and ".join(f"{v:.3f} for {what} answers" for what, v in (("right", right), ("wrong", wrong))
                            if v is not None)
        return head + f"{whose} {paid}, and no step judged both kinds (no gap; {verifier})"
    gap = mean("reward/policy_gap", both)
    right, wrong = mean("reward/policy_mean_correct", both), mean("reward/policy_mean_incorrect", both)
    return head + (f"{whose} {right:.3f} for right answers and {wrong:.3f} for wrong ones (gap {gap:+.3f}; "
                   f"{verifier})")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
