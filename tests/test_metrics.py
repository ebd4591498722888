import json
import random

import pytest

from raro_fast.metrics import MetricsLog, critic_signal, plot_curves, plot_panels, strict_json, summary_table


def _records(n, rng):
    return [{"step": s, "reward/policy_mean": rng.random(), "critic/tie_rate": rng.random(),
             "eval/heldout_accuracy": rng.random() if s % 3 == 0 else None, "timing_s/gen": rng.random()}
            for s in range(n)]


def test_metrics_log_resume_drops_steps_after_checkpoint(tmp_path):
    rng = random.Random(0)
    recs = _records(6, rng)
    log = MetricsLog(tmp_path / "m.jsonl", enabled=True, resume_step=None)
    for r in recs:
        log.write(r)
    assert log.read() == [json.loads(json.dumps(r, sort_keys=True)) for r in recs]
    resumed = MetricsLog(tmp_path / "m.jsonl", enabled=True, resume_step=3)
    assert [r["step"] for r in resumed.read()] == [0, 1, 2, 3]
    fresh = MetricsLog(tmp_path / "m.jsonl", enabled=True, resume_step=None)
    assert fresh.read() == []  # a new run starts a new file
    off = MetricsLog(tmp_path / "other.jsonl", enabled=False, resume_step=None)
    off.write({"step": 1})
    assert not (tmp_path / "other.jsonl").exists()


def test_a_resume_with_the_log_off_still_cuts_it_back(tmp_path):
    """A resume with train.log_rollouts_every 0 writes no rollouts, but the killed run's records past the resumed
    step must still go: a later resume with the log on kept them as if this run had trained those steps."""
    path = tmp_path / "rollouts.jsonl"
    log = MetricsLog(path, enabled=True, resume_step=None)  # the first run logs steps 10, 20, 30, killed after 30
    log.write_all({"step": s, "completion": f"first run {s}"} for s in (10, 20, 30))
    MetricsLog(path, enabled=False, resume_step=20, main=False)  # another rank neither writes nor cuts
    assert [r["step"] for r in log.read()] == [10, 20, 30]
    off = MetricsLog(path, enabled=False, resume_step=20, main=True)  # resumed from step 20 with the log off
    off.write({"step": 30, "completion": "not logged"})
    assert [r["completion"] for r in log.read()] == ["first run 10", "first run 20"]
    MetricsLog(path, enabled=False, resume_step=None, main=True)  # a resume that found no checkpoint: from scratch
    assert log.read() == []
    MetricsLog(tmp_path / "never.jsonl", enabled=False, resume_step=None, main=True)  # no file made for nothing
    assert not (tmp_path / "never.jsonl").exists()


def test_summary_table_labels_the_number_of_steps_it_averages():
    rng = random.Random(2)
    recs = _records(4, rng)  # four steps: the means are over the first and last two
    header = summary_table(recs).splitlines()[0].split()
    assert header == ["metric", "first", "(2)", "last", "(2)"]
    rewards = [r["reward/policy_mean"] for r in recs]
    line = next(l for l in summary_table(recs).splitlines() if l.startswith("reward/policy_mean"))
    assert line.split()[1:] == [f"{sum(rewards[:2]) / 2:.4g}", f"{sum(rewards[-2:]) / 2:.4g}"]
    assert summary_table(recs[:3]).splitlines()[0].split() == ["metric", "first", "last"]  # one value each
    recs = _records(12, rng)
    for r in recs[:-4]:
        del r["critic/tie_rate"]  # reported on four steps only: its own count, by its name
    table = summary_table(recs).splitlines()
    assert table[0].split() == ["metric", "first", "(5)", "last", "(5)"]
    assert any(l.startswith("critic/tie_rate (2) ") for l in table)
    assert any(l.startswith("reward/policy_mean ") for l in table)
    # each held-out row is one evaluation, and says so under "first (5)" (found by review on 2026-12-07)
    recs[0]["eval/heldout_accuracy"], recs[-1]["eval/heldout_accuracy"] = 0.25, 0.5
    assert any(l.split() == ["eval/heldout_accuracy", "(1", "eval)", "0.25", "0.5"] for l in summary_table(recs).splitlines())


def test_plot_and_summary(tmp_path):
    rng = random.Random(1)
    recs = _records(12, rng)
    plot_curves(recs, tmp_path / "c.png", title="t")
    data = (tmp_path / "c.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    table = summary_table(recs)
    rewards = [r["reward/policy_mean"] for r in recs]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5  # means over the first and last five steps
    line = next(l for l in table.splitlines() if l.startswith("reward/policy_mean"))
    assert line.split()[1:] == [f"{first:.4g}", f"{last:.4g}"]
    evals = [r["eval/heldout_accuracy"] for r in recs if r["eval/heldout_accuracy"] is not None]
    line = next(l for l in table.splitlines() if l.startswith("eval/heldout_accuracy"))
    assert line.split()[1:] == ["(1", "eval)", f"{evals[0]:.4g}", f"{evals[-1]:.4g}"]


def test_a_line_cut_by_a_kill_is_dropped_on_resume_and_other_damage_named(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0}\n{"step": 1}\n{"step": 2, "lo')  # killed while writing step 2
    MetricsLog(path, enabled=True, resume_step=1)
    assert path.read_text() == '{"step": 0}\n{"step": 1}\n'
    path.write_text('{"step": 0}\nnot json\n{"step": 1}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a JSON record"):
        MetricsLog(path, enabled=True, resume_step=1)


def test_a_resume_cuts_the_log_in_place_reading_a_line_at_a_time_and_a_kill_leaves_it_whole(tmp_path, monkeypatch):
    """Each resume read the whole file into memory and rewrote it, a peak of about 4x its size (rollouts.jsonl grows
    with every step; found by review): the records past the resumed step are now cut off where they start, and a
    file with nothing to cut is left as it is. Records out of step order (nothing the trainer writes) are still
    rewritten beside the file and renamed: rewritten in place, a resume killed mid-write left its first lines, and
    the next resume took the cut line for the one being written when killed (found by review)."""
    import os
    from pathlib import Path

    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path, enabled=True, resume_step=None)
    log.write_all({"step": s, "loss": 0.5 + s} for s in range(41))
    before, inode = path.read_bytes(), os.stat(path).st_ino

    def no_whole_read(self, *args, **kwargs):
        raise AssertionError(f"{self} read whole")

    monkeypatch.setattr(Path, "read_text", no_whole_read)
    monkeypatch.setattr(Path, "read_bytes", no_whole_read)
    log = MetricsLog(path, enabled=True, resume_step=50)  # nothing past step 50: untouched
    assert log.kept_steps == list(range(41))
    log = MetricsLog(path, enabled=True, resume_step=30)
    monkeypatch.undo()
    assert os.stat(path).st_ino == inode and path.read_bytes() == b"".join(before.splitlines(keepends=True)[:31])
    assert [r["step"] for r in log.read()] == list(range(31)) == log.kept_steps
    path.write_bytes(before + b'{"loss": 1.0, "st')  # killed inside a record's write: cut off too
    assert MetricsLog(path, enabled=True, resume_step=40).kept_steps == list(range(41)) and path.read_bytes() == before
    path.write_bytes(before[:-1])  # a last record without its newline is ended, so the next one is a line of its own
    MetricsLog(path, enabled=True, resume_step=40).write({"step": 41})
    assert path.read_bytes() == before + b'{"step": 41}\n'

    path.write_bytes(before + b'{"step": 3}\n')  # out of order: a record kept after ones dropped
    real_replace = os.replace

    def killed(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        MetricsLog(path, enabled=True, resume_step=30)
    monkeypatch.setattr(os, "replace", real_replace)
    assert path.read_bytes() == before + b'{"step": 3}\n'
    log = MetricsLog(path, enabled=True, resume_step=30)
    assert [r["step"] for r in log.read()] == [*range(31), 3] == log.kept_steps


def test_non_finite_numbers_are_written_as_null(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl", enabled=True, resume_step=None)
    log.write({"step": 1, "loss": float("nan"), "grad_norm": float("inf"), "nested": [1.5, float("-inf")]})
    line = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in line and "Infinity" not in line
    assert json.loads(line) == {"step": 1, "loss": None, "grad_norm": None, "nested": [1.5, None]}
    assert strict_json({"a": float("nan")}) == '{"a": null}'  # report.json of evaluate and analyze


def test_the_critic_sentence_takes_right_wrong_and_gap_over_the_same_steps():
    # Found by review: a step with wrong answers only (no gap) counted in "wrong" and not in the gap, so the
    # sentence printed right 0.600, wrong 0.300 and gap +0.500.
    records = [{"step": 1, "critic/decisive_accuracy": 0.5, "critic/tie_rate": 0.2, "reward/policy_mean_correct": None,
                "reward/policy_mean_incorrect": 0.5, "reward/policy_gap": None},
               {"step": 2, "critic/decisive_accuracy": 0.7, "critic/tie_rate": 0.4, "reward/policy_mean_correct": 0.6,
                "reward/policy_mean_incorrect": 0.1, "reward/policy_gap": 0.5}]
    line = critic_signal(records)
    assert "0.600 for right answers and 0.100 for wrong ones (gap +0.500;" in line
    assert "decisive verdicts" in line and "in 0.60 of" in line and "tie rate 0.30" in line
    assert line.endswith("the policy's reward was 0.600 for right answers and 0.100 for wrong ones (gap +0.500; the "
                         "verifier is only logged)")
    # Under the oracle the verifier paid the policy: the sentence said it was only logged (review, 2026-12-07)
    assert critic_signal(records, oracle=True).endswith(
        "the critic would have paid 0.600 for right answers and 0.100 for wrong ones (gap +0.500; the verifier set "
        "the policy's reward (raro.critic oracle))")


def test_the_critic_sentence_is_said_when_no_step_judged_a_right_answer():
    """A run whose policy never solved a puzzle (a fooled critic matters most there): no step has a gap, and the
    run ended without a word on its critic. Found by review on 2026-12-07."""
    records = [{"step": s, "critic/decisive_accuracy": 0.3, "critic/tie_rate": 0.5, "reward/policy_mean_correct": None,
                "reward/policy_mean_incorrect": 0.6, "reward/policy_gap": None} for s in (1, 2, 3, 4)]
    line = critic_signal(records)
    assert "in 0.30 of its decisive verdicts" in line and "tie rate 0.50" in line
    assert "0.600 for wrong answers, and no step judged both kinds (no gap;" in line
    assert critic_signal([{"step": 1, "critic/decisive_accuracy": None}]) is None  # no critic diagnostics at all


def test_the_critic_sentence_is_said_for_a_task_without_a_verifier():
    """A poetry RARO run logs its critic's decisive accuracy and tie rate but no verified rewards: the sentence was
    dropped, and the run ended without a word on its critic (found by review on 2026-12-07)."""
    records = [{"step": s, "critic/decisive_accuracy": a, "critic/tie_rate": t, "reward/policy_mean_correct": None,
                "reward/policy_mean_incorrect": None, "reward/policy_gap": None}
               for s, a, t in ((1, 0.25, 0.5), (2, 0.75, 0.25))]
    assert critic_signal(records) == ("critic, means over steps: picked the expert in 0.50 of its decisive verdicts "
                                      "(chance 0.50), tie rate 0.38; no policy answer was verified right or wrong (no "
                                      "reward gap measured)")


def test_the_critic_sentence_is_said_for_a_critic_that_never_picked_a_side():
    """A critic collapsed into ties (or rambling) had no decisive accuracy on any step, and the run ended without a
    word on it: the case the sentence is for (found by review on 2026-12-07)."""
    records = [{"step": s, "critic/decisive_accuracy": None, "critic/tie_rate": 0.75, "critic/invalid_rate": 0.25,
                "reward/policy_mean_correct": 0.6, "reward/policy_mean_incorrect": 0.6, "reward/policy_gap": 0.0}
               for s in (1, 2, 3)]
    assert critic_signal(records) == ("critic, means over steps: no decisive verdict (tie rate 0.75, invalid rate 0.25); "
                                      "the policy's reward was 0.600 for right answers and 0.600 for wrong ones (gap "
                                      "+0.000; the verifier is only logged)")


def test_the_runs_last_lines_say_why_there_is_no_heldout_accuracy():
    """With no held-out problems the run used to say the task had no verifier, under the critic's sentence that the
    verifier's own verdicts had made."""
    from raro_fast.config import load_config
    from raro_fast.train import heldout_summary

    cfg = load_config(["--train.eval_samples", "4"])
    critic = {"critic/decisive_accuracy": 0.8, "critic/tie_rate": 0.1, "reward/policy_gap": 0.5,
              "reward/policy_mean_correct": 0.7, "reward/policy_mean_incorrect": 0.2}
    unmeasured = [{"step": 0, "eval/heldout_accuracy": None}, {"step": 1, **critic, "eval/heldout_accuracy": None}]
    lines = heldout_summary(unmeasured, cfg, problems=0)
    assert lines[0].startswith("critic, means over steps: picked the expert in 0.80") and lines[1:] == ["held-out accuracy: none (no held-out problems)"]
    assert heldout_summary(unmeasured, cfg, problems=5)[1:] == ["held-out accuracy: none (the countdown task has no verifier)"]
    measured = [{"step": 0, "eval/heldout_accuracy": 0.25, "eval/heldout_avg_at_n": 0.2, "eval/heldout_tournament_at_n": 0.3},
                {"step": 1, "eval/heldout_accuracy": 0.5, "eval/heldout_avg_at_n": None},
                {"step": 2, "eval/heldout_accuracy": 0.75, "eval/heldout_avg_at_n": 0.6, "eval/heldout_tournament_at_n": 0.5}]
    assert heldout_summary(measured, cfg, problems=8) == [
        "held-out accuracy: 0.750 (start 0.250) on 8 problems: +4 solved",
        "held-out avg@4 (mean accuracy of 4 samples per problem at temperature 1): 0.600 (start 0.200)",
        "held-out tournament@4 (the critic picks one of the 4 samples, no verifier): 0.500 (start 0.300)"]
    # A resume that lost records: no evaluation left was an IndexError, and a later first one read as the start
    # (found by review on 2026-12-07).
    assert heldout_summary([{"step": 5, "loss": 0.1}], cfg, problems=8) == [
        "held-out accuracy: none logged (metrics.jsonl holds no evaluation)"]
    assert heldout_summary(measured[1:], cfg, problems=8)[0] == (
        "held-out accuracy: 0.750 (first logged 0.500, at step 1) on 8 problems: +2 solved")


def test_a_dpo_runs_own_numbers_are_plotted_and_tabulated(tmp_path):
    """dpo/loss, margin and accuracy were in neither curves.png nor the summary table (found by review on
    2026-12-07)."""
    recs = [{"step": s, "loss": 0.7, "dpo/loss": 0.69 - 0.01 * s, "dpo/margin": 0.1 * s, "dpo/accuracy": 0.5,
             "dpo/pair_rate": 0.75} for s in range(1, 5)]
    assert ("DPO pairs", ["dpo/loss", "dpo/margin", "dpo/accuracy", "dpo/pair_rate"]) in plot_panels(recs)
    assert not [t for t, _ in plot_panels([{"step": 1, "reward/policy_mean": 0.2}]) if t == "DPO pairs"]
    table = {line.split()[0]: line.split()[1:] for line in summary_table(recs).splitlines()[2:]}
    assert table["dpo/loss"] == ["0.675", "0.655"] and table["dpo/margin"] == ["0.15", "0.35"]
    plot_curves(recs, tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 5000


def test_a_resume_whose_log_was_never_written_starts_it_empty(tmp_path):
    """A resume with a log on that the killed run never wrote (train.log_rollouts_every turned on at the resume):
    the file is made empty, nothing is read (mutation review: without the `exists` check, FileNotFoundError)."""
    path = tmp_path / "rollouts.jsonl"
    log = MetricsLog(path, enabled=True, resume_step=4)
    assert path.is_file() and log.read() == [] and log.kept_steps == []
    log.write({"step": 5})
    assert [r["step"] for r in log.read()] == [5]


def test_a_resume_drops_a_record_without_a_step(tmp_path):
    """A record that names no step is not known to be at or before the resumed step: dropped, and the records kept
    after it rewritten beside the file (mutation review: read as step 0, it was kept)."""
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 0}\n{"note": "no step"}\n{"step": 1}\n{"step": 5}\n')
    log = MetricsLog(path, enabled=True, resume_step=3)
    assert log.read() == [{"step": 0}, {"step": 1}] and log.kept_steps == [0, 1]
    assert path.read_text() == '{"step": 0}\n{"step": 1}\n'


def test_a_resume_before_every_record_cuts_the_log_to_nothing(tmp_path):
    """Every record is after the resumed step: the file is cut to no bytes, with no newline added (mutation review:
    an empty file has no last byte to look at)."""
    path = tmp_path / "rollouts.jsonl"
    path.write_text('{"step": 10}\n{"step": 20}\n')
    log = MetricsLog(path, enabled=True, resume_step=5)
    assert path.read_bytes() == b"" and log.kept_steps == []


def test_records_kept_out_of_order_are_rewritten_each_on_its_line(tmp_path):
    """A file out of step order whose last record, kept, had no newline (killed after its last byte): rewritten
    with one, so the next record starts a line of its own (mutation review: the two were one line, and the next
    resume refused the file)."""
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 7}\n{"step": 2}')
    log = MetricsLog(path, enabled=True, resume_step=3)
    log.write({"step": 4})
    assert [r["step"] for r in log.read()] == [2, 4] and log.kept_steps == [2]


def test_a_panel_plots_a_key_some_records_logged():
    """The step-0 record (the base's evaluation) logs no training numbers: a key counts if any record logged it
    (mutation review: a key every record must log left a DPO run's panel out)."""
    recs = [{"step": 0, "eval/heldout_accuracy": 0.1},
            *({"step": s, "dpo/loss": 0.6, "reward/policy_mean": 0.2} for s in (1, 2))]
    panels = dict(plot_panels(recs))
    assert panels["DPO pairs"] == ["dpo/loss"] and panels["rewards"] == ["reward/policy_mean"]


def test_a_log_rewritten_on_resume_is_on_disk_before_its_rename_and_the_rename_after(tmp_path, monkeypatch):
    """Records out of step order are rewritten beside the file: its contents synced before the rename, and the
    folder after it, as every durable rename (mutation review: a plain os.replace there passed every test)."""
    import os

    from raro_fast import durable

    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 7}\n{"step": 2}\n')
    events, real_fsync, real_replace = [], durable.fsync_path, os.replace
    monkeypatch.setattr(durable, "fsync_path", lambda p: (events.append(("fsync", p.name)), real_fsync(p)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", os.path.basename(a))), real_replace(a, b)))
    MetricsLog(path, enabled=True, resume_step=3)
    assert events == [("fsync", ".m.jsonl.tmp"), ("replace", ".m.jsonl.tmp"), ("fsync", tmp_path.name)]
    assert path.read_text() == '{"step": 2}\n'


def test_a_line_that_is_not_utf8_is_named_with_its_line_number(tmp_path):
    """A damaged line of bytes that are no UTF-8 is refused as any other damage, naming the file and line (mutation
    review: without UnicodeDecodeError caught, the resume ended in a traceback from json)."""
    path = tmp_path / "m.jsonl"
    path.write_bytes(b'{"step": 0}\n{"step": 1, "x": "\xff\xfe"}\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"m.jsonl:2: not a JSON record"):
        MetricsLog(path, enabled=True, resume_step=1)
    path.write_bytes(b'{"step": 0}\n{"step": 1, "x": "\xe5\xae')  # the last line, cut: dropped
    assert MetricsLog(path, enabled=True, resume_step=1).kept_steps == [0] and path.read_bytes() == b'{"step": 0}\n'
