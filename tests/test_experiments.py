"""experiments/summarize.py: the replication table from a grid of MODE-sSEED runs, with exact values."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
import summarize  # noqa: E402


def _write(root: Path, name: str, accs: dict[int, float], train_acc: float | None = None,
           extra: dict | None = None) -> None:
    (root / name).mkdir(parents=True)
    lines = []
    for step in range(0, max(accs) + 1):
        rec = {"step": step}
        if step in accs:
            rec["eval/heldout_accuracy"] = accs[step]
        if step and train_acc is not None:
            rec["policy/answer_accuracy"] = train_acc
        if step and extra:
            rec.update(extra)
        lines.append(json.dumps(rec))
    (root / name / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def test_table_compares_modes_at_the_last_common_step(tmp_path):
    _write(tmp_path, "raro-s0", {0: 0.1, 10: 0.2, 20: 0.3, 30: 0.5}, train_acc=0.25)
    with (tmp_path / "raro-s0" / "metrics.jsonl").open("a") as f:  # steps past the compared one do not count
        f.write(json.dumps({"step": 31, "policy/answer_accuracy": 1.0}) + "\n")
    _write(tmp_path, "raro-s1", {0: 0.3, 10: 0.4, 20: 0.5}, train_acc=0.75)
    _write(tmp_path, "rlvr-s0", {0: 0.2, 10: 0.6, 20: 0.8})
    (tmp_path / "not-a-run").mkdir()
    table, last = summarize.summarize(summarize.read_runs(tmp_path))
    assert last == 20  # raro-s1 and rlvr-s0 stop at 20, raro-s0's step 30 is not compared
    rows = {}
    for line in table.splitlines():  # the first table's row of each mode
        if line.startswith("| r"):
            rows.setdefault(line.split(" | ")[0].strip("| "), line)
    # raro: base (0.1, 0.3) -> 0.200 ± 0.141; step 20 (0.3, 0.5) -> 0.400 ± 0.141; the last evals after step 0
    # (10, 20; step 0, the base's, was in the window of three: found by review on 2026-12-07): seed 0 mean 0.25,
    # seed 1 mean 0.45 -> 0.350 ± 0.141; train acc 0.500 ± 0.354
    assert "'last 2 evals' averages steps 10, 20 of each run" in table
    assert rows["raro"].startswith("| raro | 2 | 0.200 ± 0.141 | 0.400 ± 0.141 | 0.350 ± 0.141 | 0.300 / 0.500 | "
                                   "0.500 ± 0.354 |")
    assert rows["rlvr"].startswith("| rlvr | 1 | 0.200 ± 0.000 | 0.800 ± 0.000 | 0.700 ± 0.000 | 0.800 | - |")
    # over the seeds both modes have: raro's seed 0 (0.25) against rlvr's (0.7); over raro's two seeds it said 0.50
    assert "RARO / RLVR (last 2 evals, seeds 0 only): 0.36" in table
    # gains over each run's own step 0: raro 0.25 - 0.1, 0.45 - 0.3; rlvr 0.7 - 0.2
    assert "| raro | 0.150 ± 0.000 | +0.150 / +0.150 | 2 of 2 |" in table
    assert "| rlvr | 0.500 ± 0.000 | +0.500 | 1 of 1 |" in table


def test_runs_on_other_evaluation_schedules_are_compared_at_the_same_steps(tmp_path):
    # The same curve, evaluated every 10 and every 20 steps: the window is the steps both have after step 0 (20, 40;
    # the union's 20, 30, 40 gave raro an average of its two of them, 0.100 against 0.167).
    curve = {s: (0.3 if s == 30 else 0.1) for s in range(0, 41, 10)}
    _write(tmp_path, "rlvr-s0", curve)
    _write(tmp_path, "raro-s0", {s: a for s, a in curve.items() if s % 20 == 0})
    table, last = summarize.summarize(summarize.read_runs(tmp_path))
    assert last == 40 and "averages steps 20, 40 of each run" in table
    assert "RARO / RLVR (last 2 evals): 1.00" in table
    with pytest.raises(ValueError, match="share no evaluation after step 0"):
        summarize.summarize({"a": {0: [{"step": 0, "eval/heldout_accuracy": 0.1}]}})
    with pytest.raises(ValueError, match="share no evaluation step"):
        summarize.summarize({"a": {0: [{"step": 5, "eval/heldout_accuracy": 0.1}]},
                             "b": {0: [{"step": 10, "eval/heldout_accuracy": 0.1}]}})


def test_critic_diagnostics_and_targets(tmp_path):
    diag = {"critic/decisive_accuracy": 0.8, "critic/oracle_agreement": 0.7, "reward/policy_mean_correct": 0.6,
            "reward/policy_mean_incorrect": 0.2, "reward/policy_gap": 0.4, "critic/tie_rate": 0.5}
    _write(tmp_path, "raro-s0", {0: 0.1, 10: 0.3}, extra=diag)
    _write(tmp_path, "raro-s1", {0: 0.1, 10: 0.2}, extra={**diag, "critic/decisive_accuracy": 0.6})
    _write(tmp_path, "rlvr-s0", {0: 0.1, 10: 0.3})
    _write(tmp_path, "sft-s0", {0: 0.1, 10: 0.1})
    _write(tmp_path, "raro_lp3-s0", {0: 0.1, 10: 0.4})  # a RARO variant: held to the same targets
    _write(tmp_path, "raro_oracle-s0", {0: 0.1, 10: 0.5})  # the diagnostic is not
    table, _ = summarize.summarize(summarize.read_runs(tmp_path))
    assert "| raro | 0.700 ± 0.141 | 0.700 ± 0.000 | 0.600 ± 0.000 | 0.200 ± 0.000 | 0.400 ± 0.000 | 0.500 ± 0.000 |" in table
    assert "| rlvr | " in table and table.count("| rlvr |") == 2  # accuracy and gain tables, no diagnostics
    # raro last evals (step 10, the one after step 0): 0.3 and 0.2; rlvr and sft have seed 0 only, so raro is
    # compared on its seed 0: 0.3 against 0.9 x 0.3 and against 0.1; its gains 0.2, 0.1 (sd 0.071) are its own
    assert "- met: raro >= 0.9 x RLVR: 0.300 vs 0.270, seeds 0 only" in table
    assert "- met: raro > SFT: 0.300 vs 0.100, seeds 0 only" in table
    assert "- met: raro above its own base by more than the seed spread: gain +0.150 vs sd 0.071" in table
    assert "- met: raro_lp3 >= 0.9 x RLVR: 0.400 vs 0.270" in table
    # one seed has no spread to beat: not judged (its sd of 0 made any gain pass). Found by review on 2026-12-07.
    assert "- n/a: raro_lp3 above its own base by more than the seed spread: 1 seed with a base, no spread" in table
    assert "raro_oracle >=" not in table


def test_critic_rewards_and_gap_are_averaged_over_the_same_steps(tmp_path):
    # Found by review: each column averaged the steps where its own key was logged, so a step with wrong answers
    # only (no gap) counted in "reward wrong" and not in "gap", and the row's gap was not right minus wrong.
    _write(tmp_path, "raro-s0", {0: 0.1, 3: 0.2})
    recs = [{"step": 0, "eval/heldout_accuracy": 0.1},
            {"step": 1, "critic/decisive_accuracy": 0.8, "reward/policy_mean_correct": 0.6,
             "reward/policy_mean_incorrect": 0.2, "reward/policy_gap": 0.4},
            {"step": 2, "critic/decisive_accuracy": 0.6, "reward/policy_mean_correct": None,
             "reward/policy_mean_incorrect": 0.5, "reward/policy_gap": None},
            {"step": 3, "critic/decisive_accuracy": 0.7, "reward/policy_mean_correct": 0.9,
             "reward/policy_mean_incorrect": None, "reward/policy_gap": None, "eval/heldout_accuracy": 0.2}]
    (tmp_path / "raro-s0" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    table, _ = summarize.summarize(summarize.read_runs(tmp_path))
    # decisive accuracy over its own three steps; right, wrong and gap over step 1, the one step with both
    assert "| raro | 0.700 ± 0.000 | - | 0.600 ± 0.000 | 0.200 ± 0.000 | 0.400 ± 0.000 | - |" in table
    # No step judged both kinds (a policy that never solves a puzzle, a critic that may be fooled): the rewards
    # over every step, no gap (all three were blank). Found by review on 2026-12-07.
    del recs[1]
    (tmp_path / "raro-s0" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    table, _ = summarize.summarize(summarize.read_runs(tmp_path))
    assert "| raro | 0.650 ± 0.000 | - | 0.900 ± 0.000 | 0.500 ± 0.000 | - | - |" in table


def test_the_paired_critic_rewards_cover_the_same_seeds_and_say_how_many(tmp_path):
    """A seed with no step that judged both kinds counted in right and wrong (over all its steps) and not in the gap,
    so the row's gap was not right minus wrong, with nothing said (found by review on 2026-12-07)."""
    both = {"reward/policy_mean_correct": 0.5, "reward/policy_mean_incorrect": 0.1, "reward/policy_gap": 0.4,
            "critic/decisive_accuracy": 0.8}
    _write(tmp_path, "raro-s0", {0: 0.1, 10: 0.2}, extra=both)
    _write(tmp_path, "raro-s1", {0: 0.1, 10: 0.2}, extra={"reward/policy_mean_incorrect": 0.3,
                                                             "critic/decisive_accuracy": 0.6})
    table, _ = summarize.summarize(summarize.read_runs(tmp_path))
    row = next(line for line in table.splitlines() if line.startswith("| raro | 0.700"))
    assert row == ("| raro | 0.700 ± 0.141 | - | 0.500 ± 0.000 (1 of 2 seeds) | 0.100 ± 0.000 (1 of 2 seeds) | "
                   "0.400 ± 0.000 (1 of 2 seeds) | - |")


def test_a_non_finite_value_in_a_metrics_file_is_read_as_missing(tmp_path):
    """The trainer writes null; a NaN written otherwise stopped in statistics.stdev (found by review on 2026-12-07)."""
    _write(tmp_path, "raro-s0", {0: 0.1, 10: 0.2})
    _write(tmp_path, "raro-s1", {0: 0.1, 10: 0.3})
    with (tmp_path / "raro-s1" / "metrics.jsonl").open("a") as f:
        f.write('{"step": 10, "critic/decisive_accuracy": NaN}\n')
    assert summarize.read_metrics(tmp_path / "raro-s1" / "metrics.jsonl")[-1]["critic/decisive_accuracy"] is None
    table, _ = summarize.summarize(summarize.read_runs(tmp_path))
    assert "| raro | 2 | 0.100 ± 0.000 | 0.250 ± 0.071 |" in table


def test_support_sh_refuses_flags_in_the_place_of_k_and_out():
    """`support.sh ROOT 60 --analysis.temperature 0.7` read the flag as K and its value as OUT (found by review on
    2026-12-07)."""
    out = subprocess.run(["bash", str(ROOT / "experiments" / "support.sh"), "/nonexistent", "60",
                          "--analysis.temperature", "0.7"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "K must be a number and OUT a folder, got '--analysis.temperature' '0.7'" in out.stderr


def test_a_run_without_a_step_0_evaluation_is_named_not_dropped_from_the_gains(tmp_path):
    """Found by review on 2026-12-07: the seeds column counted it, the gains and targets left it out silently."""
    for seed, accs in ((0, {0: 0.1, 10: 0.13}), (1, {5: 0.1, 10: 0.01}), (2, {0: 0.1, 10: 0.12})):
        _write(tmp_path, f"raro-s{seed}", accs)
    lines = (tmp_path / "raro-s1" / "metrics.jsonl").read_text().splitlines()
    (tmp_path / "raro-s1" / "metrics.jsonl").write_text("\n".join(lines[1:]) + "\n")  # its step-0 record lost
    table, _ = summarize.summarize(summarize.read_runs(tmp_path))
    assert "| raro | 3 |" in table and "2 of 2 |" in table
    assert "Not in the gains or targets (no step-0 evaluation): raro seed 1." in table


def test_a_raro_variant_is_held_against_the_sft_of_its_own_setting(tmp_path):
    # Found by review: raro_varied (varied demonstrations) was held against sft (canonical ones), not sft_varied.
    _write(tmp_path, "rlvr-s0", {0: 0.1, 10: 0.3})
    _write(tmp_path, "sft-s0", {0: 0.1, 10: 0.3})
    _write(tmp_path, "sft_varied-s0", {0: 0.1, 10: 0.1})
    _write(tmp_path, "raro-s0", {0: 0.1, 10: 0.2})
    _write(tmp_path, "raro_varied-s0", {0: 0.1, 10: 0.2})
    _write(tmp_path, "raro_lp3-s0", {0: 0.1, 10: 0.2})
    table, _ = summarize.summarize(summarize.read_runs(tmp_path))
    assert "- NOT met: raro > SFT: 0.200 vs 0.300" in table
    assert "- met: raro_varied > sft_varied: 0.200 vs 0.100" in table
    assert "- NOT met: raro_lp3 > SFT: 0.200 vs 0.300" in table  # no sft_lp3: the plain SFT


def test_seeds_in_numeric_order_and_diagnostics_up_to_the_compared_step(tmp_path):
    # Found by review: seeds came in the paths' text order (s0, s1, s10, s2) in the gain column and numeric order in
    # the step column, so a reader matching them by position gave s2 the gain of s10; and the critic table averaged
    # steps past the compared one.
    for seed, final in ((0, 0.2), (1, 0.3), (2, 0.4), (10, 0.9)):
        _write(tmp_path, f"raro-s{seed}", {0: 0.1, 10: final}, extra={"critic/decisive_accuracy": 0.5})
    with (tmp_path / "raro-s10" / "metrics.jsonl").open("a") as f:  # a longer run: its later steps are not compared
        f.write("".join(json.dumps({"step": s, "critic/decisive_accuracy": 1.0}) + "\n" for s in (11, 12)))
    runs = summarize.read_runs(tmp_path)
    assert list(runs["raro"]) == [0, 1, 2, 10]
    table, last = summarize.summarize(runs)
    assert last == 10 and "| 0.200 / 0.300 / 0.400 / 0.900 |" in table
    assert "| +0.100 / +0.200 / +0.300 / +0.800 |" in table  # step 10 - step 0, in the same order
    assert "The critic up to step 10" in table and "| raro | 0.500 ± 0.000 |" in table
    _write(tmp_path, "raro-s01", {0: 0.1})
    with pytest.raises(ValueError, match=r"raro-s1: the same mode and seed as .*raro-s01"):
        summarize.read_runs(tmp_path)


def test_bad_record_names_file_and_line(tmp_path):
    _write(tmp_path, "sft-s0", {0: 0.1})
    with open(tmp_path / "sft-s0" / "metrics.jsonl", "a") as f:
        f.write("{not json\n")
    with pytest.raises(ValueError, match=r"sft-s0/metrics.jsonl:2: not a JSON record"):
        summarize.read_runs(tmp_path)
    with pytest.raises(ValueError, match="no MODE-sSEED"):
        summarize.read_runs(tmp_path / "sft-s0")


def test_command_writes_table_and_plot(tmp_path):
    _write(tmp_path, "sft-s0", {0: 0.1, 10: 0.2})
    _write(tmp_path, "sft-s1", {0: 0.3, 10: 0.1})
    out = tmp_path / "out"
    subprocess.run([sys.executable, str(ROOT / "experiments" / "summarize.py"), str(tmp_path), "--out", str(out)],
                   check=True, capture_output=True)
    assert (out / "replication.md").read_text().count("| sft | 2 |") == 1
    assert (out / "replication_curves.png").stat().st_size > 5000
    assert not (out / "critic_curves.png").exists()  # no RARO diagnostics in these runs


def test_critic_curves_plot(tmp_path):
    _write(tmp_path, "raro-s0", {0: 0.1, 10: 0.2}, extra={"reward/policy_mean_incorrect": 0.3,
                                                          "critic/oracle_agreement": 0.6})
    assert summarize.plot_critic(summarize.read_runs(tmp_path), tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 5000


@pytest.mark.parametrize("tags_special", [False, True])
def test_critic_probe_pools_every_demonstration_with_exact_values(monkeypatch, tmp_path, tags_special):
    """With a scripted engine whose critic is the verifier (policy samples: expert, wrong, no tag, truncated), every
    training demonstration is played once: right answers earn tau_pol (a tie against the expert), wrong ones 0.
    A tokenizer that marks the format's tags special keeps them in the saved samples (they were decoded with
    `skip_special_tokens`, which dropped them)."""
    import critic_probe
    from test_raro_game import ScriptedEngine

    from raro_fast.model.hf import load_project_tokenizer
    from raro_fast.prompts import FORMAT_TAGS
    from raro_fast.tasks import make_task
    from raro_fast.config import load_config

    argv = ["--task.countdown.num_train", "12", "--task.countdown.num_heldout", "4"]
    tok, task = load_project_tokenizer(), make_task(load_config(argv).task)
    if tags_special:
        tok.add_special_tokens({"additional_special_tokens": list(FORMAT_TAGS)})
        assert "<answer>" in tok.all_special_tokens

    class Model:
        def eval(self):
            return self

    monkeypatch.setattr(critic_probe, "load_pretrained", lambda *a, **k: (Model(), tok))
    monkeypatch.setattr(critic_probe.EmbeddedEngine, "from_tokenizer",
                        classmethod(lambda cls, *a, **k: ScriptedEngine(tok, task, "verifier")))
    base = tmp_path / "base_model"
    assert critic_probe.main([str(base), *argv, "--out", str(tmp_path / "probe.json")]) == 0
    report = json.loads((tmp_path / "probe.json").read_text())
    # 8 samples a question: 2 expert answers, 2 scripted wrong ones (a few of which happen to verify), 4 unjudged
    assert report["judged_right"] + report["judged_wrong"] == 12 * 4 and report["judged_right"] >= 12 * 2
    assert report["policy/answer_accuracy"] == round(report["judged_right"] / (12 * 8), 3)
    assert report["critic/decisive_accuracy"] == 1.0 and report["critic/oracle_agreement"] == 1.0
    assert report["reward/policy_mean_correct"] == 0.6 and report["reward/policy_mean_incorrect"] == 0.0
    assert report["reward/policy_gap"] == 0.6
    saved = (tmp_path / "base_model_critic_samples.txt").read_text()
    assert "<answer>" in saved and "</answer>" in saved and "<think>" in saved


def _report(root: Path, name: str, acc: dict, n: int = 16) -> None:
    (root / name).mkdir(parents=True)
    (root / name / "report.json").write_text(json.dumps({"n": n, "accuracy": acc}))


def test_reports_of_other_problems_are_not_one_table(tmp_path):
    """A base evaluated on Countdown beside runs evaluated on DeepMath made one table, with gains over the other
    task's base (found by review on 2026-12-07)."""
    def report(name, task, path="dm.jsonl", split="heldout", questions=8, timeout=5):
        (tmp_path / name).mkdir(parents=True, exist_ok=True)
        (tmp_path / name / "report.json").write_text(json.dumps({
            "n": 4, "accuracy": {"avg@n": 0.1}, "task": task, "split": split, "counts": {"questions": questions},
            "config": {"task": {"name": task, "countdown": {"seed": 0},
                                "deepmath": {"path": path, "verify_timeout_seconds": timeout}}}}))

    report("raro-s0", "deepmath")
    report("rlvr-s0", "deepmath", path="dm.jsonl")
    assert set(summarize.read_evals(tmp_path)[1]) == {"raro", "rlvr"}
    report("base", "countdown")
    with pytest.raises(ValueError, match=r"raro-s0/report.json: evaluated other problems \(task: 'deepmath'\) than "
                                         r".*base/report.json \('countdown'\)"):
        summarize.read_evals(tmp_path)
    report("base", "deepmath", path="/data/dm.jsonl", timeout=20)  # named another way, timed otherwise: the same problems
    assert set(summarize.read_evals(tmp_path)[1]) == {"raro", "rlvr"}
    report("base", "deepmath", path="other.jsonl")
    with pytest.raises(ValueError, match=r"raro-s0/report.json: .*\(task settings: \{'path': 'dm.jsonl'\}\) than .*base/report.json "
                                         r"\(\{'path': 'other.jsonl'\}\)"):
        summarize.read_evals(tmp_path)
    report("base", "deepmath", split="train")
    with pytest.raises(ValueError, match=r"\(split: 'heldout'\) than .*base/report.json \('train'\)"):
        summarize.read_evals(tmp_path)


def test_sampled_evaluations_table(tmp_path):
    _report(tmp_path, "base", {"avg@n": 0.1, "majority@n": 0.2, "tournament@n": 0.15, "pass@n": 0.5})
    _report(tmp_path, "raro-s0", {"avg@n": 0.2, "majority@n": 0.3, "tournament@n": 0.25, "pass@n": 0.6})
    _report(tmp_path, "raro-s1", {"avg@n": 0.3, "majority@n": 0.3, "tournament@n": 0.35, "pass@n": 0.6})
    _report(tmp_path, "rlvr-s0", {"avg@n": 0.4, "majority@n": 0.5, "tournament@n": None, "pass@n": 0.7})
    (tmp_path / "notes").mkdir()
    table = summarize.eval_table(*summarize.read_evals(tmp_path))
    assert "| model | seeds | avg@16 | majority@16 | tournament@16 | pass@16 |" in table
    assert "| base | 1 | 0.100 ± 0.000 | 0.200 ± 0.000 | 0.150 ± 0.000 | 0.500 ± 0.000 | | 0.100 |" in table
    # raro: avg (0.2, 0.3) -> 0.250 ± 0.071, gains over the base 0.1, 0.2 -> 0.150 ± 0.071
    assert ("| raro | 2 | 0.250 ± 0.071 | 0.300 ± 0.000 | 0.300 ± 0.071 | 0.600 ± 0.000 | 0.150 ± 0.071 | "
            "0.200 / 0.300 |") in table
    assert "| rlvr | 1 | 0.400 ± 0.000 | 0.500 ± 0.000 | - | 0.700 ± 0.000 | 0.300 ± 0.000 | 0.400 |" in table
    # A base per seed: each seed's gain is over its own base.
    _report(tmp_path, "base-s1", {"avg@n": 0.25, "majority@n": 0.2, "tournament@n": 0.15, "pass@n": 0.5})
    table = summarize.eval_table(*summarize.read_evals(tmp_path))
    assert "| base | 2 | 0.175 ± 0.106 |" in table
    assert "| 0.600 ± 0.000 | 0.075 ± 0.035 | 0.200 / 0.300 |" in table  # raro: 0.2 - 0.1, 0.3 - 0.25
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "report.json").write_text("{")
    with pytest.raises(ValueError, match="bad/report.json: not a report"):
        summarize.read_evals(tmp_path)
    # A poetry evaluation (no verifier: `accuracy` is {}) was a KeyError in eval_table (found by review)
    (tmp_path / "bad" / "report.json").unlink()
    (tmp_path / "poetry-s0").mkdir()
    (tmp_path / "poetry-s0" / "report.json").write_text(json.dumps({"n": 4, "accuracy": {}, "task": "poetry"}))
    # ... and its judge's win rates are in report.json, the one file raro_fast.evaluate writes (it said report.md)
    with pytest.raises(ValueError, match=r"poetry-s0/report.json: the poetry task has no verifier, so the report "
                                         r"holds no accuracies .*are under \"judge\" in that file\)$"):
        summarize.read_evals(tmp_path)


def test_sampled_evaluations_table_names_the_temperature_the_reports_were_made_at(tmp_path):
    # Found by review: the header said "at temperature 1" whatever temperature the evaluations sampled at.
    def report(name, temperature):
        (tmp_path / name).mkdir(parents=True, exist_ok=True)
        config = {} if temperature is None else {"config": {"eval": {"temperature": temperature}}}
        (tmp_path / name / "report.json").write_text(json.dumps({"n": 8, "accuracy": {"avg@n": 0.2}, **config}))

    report("base", 0.6)
    report("raro-s0", 0.6)
    assert "8 samples per held-out puzzle at temperature 0.6 (raro_fast" in summarize.eval_table(
        *summarize.read_evals(tmp_path))
    report("raro-s1", None)  # a report that does not record it: the table says nothing of temperature
    table = summarize.eval_table(*summarize.read_evals(tmp_path))
    assert "8 samples per held-out puzzle (raro_fast" in table and "temperature" not in table


def test_reward_signal_report_exact_values():
    import reward_signal

    rows = [  # group 0: one right answer, three wrong (one never answered); group 1: two wrong
        {"group": 0, "correct": True, "rewards": [0.6, 0.6], "failure": None},
        {"group": 0, "correct": False, "rewards": [0.0, 0.0], "failure": "value"},
        {"group": 0, "correct": False, "rewards": [1.0, 1.0], "failure": "numbers, hits target"},
        {"group": 0, "correct": False, "rewards": None, "failure": "parse"},
        {"group": 1, "correct": False, "rewards": [0.6, 0.0], "failure": "value"},
        {"group": 1, "correct": False, "rewards": [0.0, 0.0], "failure": "value"},
    ]
    out = reward_signal.report(rows, verdicts=2, tau_pol=0.6)
    assert (out["answers"], out["judged"], out["accuracy"]) == (6, 5, round(1 / 6, 3))
    # Advantages with both verdicts: group 0 (0.6, 0, 1, 0) - 0.4, group 1 (0.3, 0) - 0.15; against correct (1,0,0,0,0,0):
    # sum a*c = 0.2, sum a^2 = 0.765, sum (c - 1/6)^2 = 5/6.
    assert out["advantage_correctness_corr"]["k=2"] == round(0.2 / (0.765 * 5 / 6) ** 0.5, 3) == 0.25
    # The oracle: 0.6 for the right answer, 0 for the others: advantages (0.45, -0.15, -0.15, -0.15, 0, 0).
    assert out["advantage_correctness_corr"]["oracle"] == round(0.45 / (0.27 * 5 / 6) ** 0.5, 3) == 0.949
    wrong = out["wrong_answers"]
    # Four judged wrong answers: per-verdict variances 0, 0, 0.18, 0; means 0, 1, 0.3, 0 (variance 0.2225).
    assert wrong["n"] == 4 and wrong["mean_reward"] == 0.325
    assert wrong["verdict_variance_within_answer"] == 0.045
    assert wrong["variance_between_answers_systematic"] == round(0.2225 - 0.045 / 2, 4)
    assert out["right_answers"] == {"n": 1, "mean_reward": 0.6}
    assert out["wrong_answers_by_failure"] == {"numbers, hits target": {"n": 1, "mean_reward": 1.0},
                                               "value": {"n": 3, "mean_reward": 0.1}}


def test_reward_signal_splits_right_answers_by_whether_they_read_as_the_experts():
    import reward_signal

    rows = [  # all right; one written as the expert did (spaces aside), two in another form, one not judged
        {"group": 0, "correct": True, "rewards": [0.6, 0.6], "answer": "4 + 2+4", "expert": "4+2+4"},
        {"group": 0, "correct": True, "rewards": [0.0, 0.6], "answer": "2+4+4", "expert": "4+2+4"},
        {"group": 1, "correct": True, "rewards": [0.0, None], "answer": "11-5+4", "expert": "11-(5-4)"},
        {"group": 1, "correct": True, "rewards": None, "answer": "11-(5-4)", "expert": "11-(5-4)"},
        {"group": 1, "correct": False, "rewards": [1.0, 1.0], "answer": "11-(5-4)+1", "expert": "11-(5-4)"},
    ]
    out = reward_signal.report(rows, verdicts=2, tau_pol=0.6)
    assert out["right_answers_by_form"] == {"other_form": {"n": 2, "mean_reward": 0.15},
                                           "same_text_as_expert": {"n": 1, "mean_reward": 0.6}}
    assert "right_answers_by_form" not in reward_signal.report(rows[4:], verdicts=2, tau_pol=0.6)  # no right answer


def test_reward_signal_names_why_a_countdown_answer_fails():
    from types import SimpleNamespace

    import reward_signal

    ex = SimpleNamespace(meta={"numbers": [1, 2, 3], "target": 6})
    assert [reward_signal._countdown_failure(ex, a) for a in ("1+2+3", "1*2-3", "2*3", "1+2+3+3", "1+", None)] == [
        None, "value", "numbers, hits target", "numbers, misses target", "parse", "parse"]
    # the right numbers and no value: not an answer that fails to parse (it was labelled "parse")
    assert reward_signal._countdown_failure(SimpleNamespace(meta={"numbers": [2, 2, 5], "target": 6}),
                                            "5/(2-2)") == "divides by zero"


def test_table_uses_avg_at_n_where_every_run_logged_it(tmp_path):
    def write(name, greedy, avg):
        (tmp_path / name).mkdir()
        recs = [{"step": s, "eval/heldout_accuracy": g, **({} if a is None else {"eval/heldout_avg_at_n": a})}
                for s, g, a in zip((0, 10, 20), greedy, avg)]
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))

    write("raro-s0", (0.1, 0.5, 0.5), (0.10, 0.12, 0.14))
    write("rlvr-s0", (0.1, 0.2, 0.2), (0.10, 0.20, 0.30))
    runs = summarize.read_runs(tmp_path)
    assert summarize.measure_of(runs) == "avg@n"
    table, last = summarize.summarize(runs, "avg@n")
    assert last == 20 and "Held-out avg@n" in table
    # the last evals after step 0 (10, 20) averaged: RARO (0.12 + 0.14) / 2 / ((0.2 + 0.3) / 2)
    assert "RARO / RLVR (last 2 evals): 0.52" in table
    greedy, _ = summarize.summarize(runs, "greedy")
    assert "RARO / RLVR (last 2 evals): 2.50" in greedy
    write("sft-s0", (0.1, 0.1, 0.1), (None, None, None))  # a run without samples: the greedy score for all
    assert summarize.measure_of(summarize.read_runs(tmp_path)) == "greedy"


def test_measure_avg_at_n_without_samples_names_the_setting(tmp_path):
    _write(tmp_path, "sft-s0", {0: 0.1, 10: 0.2})
    res = subprocess.run([sys.executable, str(ROOT / "experiments" / "summarize.py"), str(tmp_path), "--measure",
                          "avg@n"], capture_output=True, text=True)
    assert res.returncode != 0
    assert "eval/heldout_avg_at_n" in res.stderr and "train.eval_samples" in res.stderr and str(tmp_path) in res.stderr


def test_reward_signal_bad_model_dir_is_one_line_naming_it(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "experiments" / "reward_signal.py"), str(tmp_path / "nope")],
                         capture_output=True, text=True)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        f"error: reward_signal MODEL_DIR: {str(tmp_path / 'nope')!r} is not a directory (expected a Hugging Face "
        "model directory)"]


def test_smollm2_gpu_script_says_what_is_missing(tmp_path):
    script = ROOT / "experiments" / "smollm2_gpu.sh"
    env = dict(os.environ, SMOLLM2_PARTS=str(tmp_path / "parts"), SMOLLM2_STASH=str(tmp_path / "stash"),
               OUT=str(tmp_path / "out"))
    usage = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env)
    assert usage.returncode == 2 and usage.stderr.startswith("usage: experiments/smollm2_gpu.sh prepare | stage | run")
    stage = subprocess.run(["bash", str(script), "stage"], capture_output=True, text=True, env=env)
    assert stage.returncode == 2 and "neither" in stage.stderr and "carry .device/smollm2/part-a (1st call)" in stage.stderr
    parts = tmp_path / "parts"
    parts.mkdir()
    (parts / "part-c").write_bytes(b"third.")
    run = subprocess.run(["bash", str(script), "run"], capture_output=True, text=True, env=env)
    assert run.returncode == 2 and "SHA256 is missing; carry .device/smollm2/SHA256" in run.stderr
    (parts / "SHA256").write_text("0" * 64 + "\n")
    run = subprocess.run(["bash", str(script), "run"], capture_output=True, text=True, env=env)
    assert run.returncode == 2 and "part-a is not here" in run.stderr
    # two staging calls, each carrying one part, keep them for the third
    for name, data in (("part-a", b"first, "), ("part-b", b"second, ")):
        (parts / name).write_bytes(data)
        assert subprocess.run(["bash", str(script), "stage"], capture_output=True, text=True, env=env).returncode == 0
        (parts / name).unlink()
    run = subprocess.run(["bash", str(script), "run"], capture_output=True, text=True, env=env)
    assert run.returncode == 2 and "the joined GGUF's SHA-256 is" in run.stderr and "expected " + "0" * 64 in run.stderr
    assert (tmp_path / "stash" / "SmolLM2-135M-Instruct.Q4_1.gguf").read_bytes() == b"first, second, third."


def test_smollm2_gpu_parts_each_fit_a_device_call_with_the_tree(tmp_path):
    """The device carries 64 MiB a call, tree included: two halves of 50 MB were each over it with the tree (found
    by review). `prepare` splits the 98 MB file in three."""
    if shutil.which("split") is None:
        pytest.skip("no split")
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(os.urandom(1 << 20) * 94)  # 94 MiB, as the GGUF (93.8 MiB)
    subprocess.run(["split", "-n", "3", "-a", "1", str(gguf), str(tmp_path / "part-")], check=True)
    tracked = subprocess.run(["git", "ls-files", "-z"], capture_output=True, cwd=ROOT, check=True).stdout.split(b"\0")
    tree = sum((ROOT / p.decode()).stat().st_size for p in tracked if p and (ROOT / p.decode()).is_file())
    sizes = [p.stat().st_size for p in sorted(tmp_path.glob("part-*"))]
    assert len(sizes) == 3 and all(tree + size < 60 * 2**20 for size in sizes), (tree, sizes)
    assert 'split -n 3 -a 1 "$gguf" "$dir/part-"' in (ROOT / "experiments" / "smollm2_gpu.sh").read_text()


def test_evaluate_grid_evaluates_again_only_a_model_that_changed(tmp_path):
    """A grid extended in place (--resume to more steps) rewrites final_model: its old report was kept."""
    calls = tmp_path / "calls"
    stub = tmp_path / "bin" / "python3"  # stands in for `python3 -m raro_fast.evaluate`: logs, writes a report
    stub.parent.mkdir()
    stub.write_text('#!/bin/bash\nout=""; while (( $# )); do [[ $1 == --output-dir ]] && out=$2; shift; done\n'
                    f'echo "$out" >> {calls}; mkdir -p "$out"; echo {{}} > "$out/report.json"\n')
    stub.chmod(0o755)
    model = tmp_path / "grid" / "raro-s0" / "final_model"
    model.mkdir(parents=True)
    (model / "model.safetensors").write_bytes(b"v1")
    env = {**os.environ, "PATH": f"{stub.parent}:{os.environ['PATH']}"}
    run = lambda: subprocess.run(["bash", str(ROOT / "experiments" / "evaluate_grid.sh"), str(tmp_path / "grid")],  # noqa: E731
                                 env=env, check=True, capture_output=True)
    run()
    run()
    assert calls.read_text().count("raro-s0") == 1  # the second pass found it done
    os.utime(model / "model.safetensors", (2e9, 2e9))  # the weights are rewritten after the report
    run()
    assert calls.read_text().count("raro-s0") == 2
    # Found by review: a pass with another N or other evaluate flags kept the report of the first pass.
    os.utime(model / "model.safetensors", (1e9, 1e9))
    run()
    assert calls.read_text().count("raro-s0") == 2  # nothing changed: done
    subprocess.run(["bash", str(ROOT / "experiments" / "evaluate_grid.sh"), str(tmp_path / "grid"), "--",
                    "--eval.max_new_tokens", "48"], env=env, check=True, capture_output=True)
    assert calls.read_text().count("raro-s0") == 3
    subprocess.run(["bash", str(ROOT / "experiments" / "evaluate_grid.sh"), str(tmp_path / "grid"), "--",
                    "--eval.max_new_tokens", "48"], env={**env, "N": "8"}, check=True, capture_output=True)
    assert calls.read_text().count("raro-s0") == 4
    subprocess.run(["bash", str(ROOT / "experiments" / "evaluate_grid.sh"), str(tmp_path / "grid"), "--",
                    "--eval.max_new_tokens", "48"], env={**env, "N": "8"}, check=True, capture_output=True)
    assert calls.read_text().count("raro-s0") == 4


def test_support_script_splits_the_models_between_two_samplers_and_reports_on_all(tmp_path):
    """MODES names the trained runs; each model is sampled by one of two processes, and the report names them all."""
    calls = tmp_path / "calls"
    stub = tmp_path / "bin" / "python3"  # stands in for `python3 -m raro_fast.analyze`: logs its models and output
    stub.parent.mkdir()
    stub.write_text('#!/bin/bash\nwhile (( $# )); do case $1 in --analysis.models) m=$2;; --analysis.output_dir) o=$2;; '
                    f'esac; shift; done\necho "$o $m" >> {calls}; mkdir -p "$o/samples/$(basename "$o")"\n')
    stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{stub.parent}:{os.environ['PATH']}", "SEED": "1", "BASE": "builtin:b",
           "MODES": "sft raro rlvr raro_oracle"}
    out = tmp_path / "sup"
    subprocess.run(["bash", str(ROOT / "experiments" / "support.sh"), "/R", "final", "8", str(out)], env=env,
                   check=True, capture_output=True)
    runs = dict(line.split(" ", 1) for line in calls.read_text().splitlines())
    f = "/R/{}-s1/final_model".format
    assert runs[f"{out}.a"] == f"base=builtin:b,sft={f('sft')},raro={f('raro')}"
    assert runs[f"{out}.b"] == f"rlvr={f('rlvr')},raro_oracle={f('raro_oracle')}"
    assert runs[str(out)] == f"base=builtin:b,sft={f('sft')},raro={f('raro')},rlvr={f('rlvr')},raro_oracle={f('raro_oracle')}"
    assert {p.name for p in (out / "samples").iterdir()} >= {"sup.a", "sup.b"}  # both caches merged for the report
    calls.unlink()
    del env["MODES"], env["BASE"]
    subprocess.run(["bash", str(ROOT / "experiments" / "support.sh"), "/R", "60", "8", str(tmp_path / "s2")], env=env,
                   check=True, capture_output=True)
    step = "/R/{}-s1/checkpoints/step_000060/model".format
    assert calls.read_text().splitlines()[-1] == (f"{tmp_path / 's2'} base=/R/bases/base-s1/base_model,"
                                                  f"sft={step('sft')},raro={step('raro')},rlvr={step('rlvr')}")


def _support_stub(tmp_path: Path, fail_on: str = "") -> Path:
    """A python3 that stands in for raro_fast.analyze: logs `OUTPUT_DIR MODELS`, refuses fewer than two models as
    analyze does, and fails for an output directory ending in `fail_on` (after writing its samples)."""
    stub = tmp_path / "bin" / "python3"
    stub.parent.mkdir()
    stub.write_text('#!/bin/bash\nwhile (( $# )); do case $1 in --analysis.models) m=$2;; --analysis.output_dir) o=$2;; '
                    f'esac; shift; done\necho "$o $m" >> {tmp_path / "calls"}; mkdir -p "$o/samples/$(basename "$o")"\n'
                    '[[ $m == *,* ]] || { echo "give at least two models" >&2; exit 2; }\n'
                    + (f'[[ $o == *{fail_on} ]] && exit 1\n' if fail_on else "") + "exit 0\n")
    stub.chmod(0o755)
    return stub


@pytest.mark.parametrize("modes", ["raro", "sft raro"])
def test_support_script_with_one_or_two_modes_samples_in_one_process(tmp_path, modes):
    # Found by review: two or three models were split two and one (one and one), and analyze refuses one model.
    stub = _support_stub(tmp_path)
    env = {**os.environ, "PATH": f"{stub.parent}:{os.environ['PATH']}", "BASE": "builtin:b", "MODES": modes}
    out = tmp_path / "sup"
    subprocess.run(["bash", str(ROOT / "experiments" / "support.sh"), "/R", "final", "8", str(out)], env=env,
                   check=True, capture_output=True)
    models = ",".join(["base=builtin:b", *(f"{m}=/R/{m}-s0/final_model" for m in modes.split())])
    assert (tmp_path / "calls").read_text().splitlines() == [f"{out} {models}"]


def test_support_script_stops_when_a_sampler_fails(tmp_path):
    # Found by review: `wait $a && wait $b` under set -e went on to the report when the first sampler failed.
    stub = _support_stub(tmp_path, fail_on=".a")
    env = {**os.environ, "PATH": f"{stub.parent}:{os.environ['PATH']}", "BASE": "builtin:b"}
    out = tmp_path / "sup"
    res = subprocess.run(["bash", str(ROOT / "experiments" / "support.sh"), "/R", "final", "8", str(out)], env=env,
                         capture_output=True, text=True)
    assert res.returncode != 0 and f"{out}.a.log" in res.stderr
    calls = [line.split(" ", 1)[0] for line in (tmp_path / "calls").read_text().splitlines()]
    assert sorted(calls) == [f"{out}.a", f"{out}.b"]  # both samplers ran to their end, no report after them


def _grid_script_calls(tmp_path: Path, script: str) -> tuple[list[list[str]], list[list[str]]]:
    """The run_grid.sh and summarize.py command lines of experiments/SCRIPT, run with stand-ins for both (and for
    evaluate_grid.sh)."""
    here = tmp_path / "experiments"
    (here / "grids").mkdir(parents=True)
    (here / script).write_text((ROOT / "experiments" / script).read_text())
    for grid in (ROOT / "experiments" / "grids").glob("*.txt"):
        (here / "grids" / grid.name).write_text(grid.read_text())
    log = tmp_path / "log"
    for stand_in in ("run_grid.sh", "evaluate_grid.sh"):
        (here / stand_in).write_text(f'#!/bin/bash\n{{ printf "{stand_in}"; printf "\\t%s" "$@"; echo; }} >> {log}\n')
        (here / stand_in).chmod(0o755)
    stub = tmp_path / "bin" / "python3"
    stub.parent.mkdir()
    stub.write_text(f'#!/bin/bash\n{{ printf "python3"; printf "\\t%s" "$@"; echo; }} >> {log}\n')
    stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{stub.parent}:{os.environ['PATH']}"}
    subprocess.run(["bash", str(here / script), str(tmp_path / "R")], env=env, check=True, capture_output=True)
    calls = [line.split("\t") for line in log.read_text().splitlines()]
    return [c[1:] for c in calls if c[0] == "run_grid.sh"], [c[1:] for c in calls if c[0] == "python3"]


def _grid_configs(call: list[str], tmp_path: Path) -> list:
    from raro_fast.config import load_config

    root, _limit, grid, *common = call
    lines = [ln.split() for ln in Path(grid).read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    return [load_config(common + [f.replace("{root}", root) for f in flags[1:]]) for flags in lines]


def test_cpu_script_evaluates_greedy_only_as_section_1_did(tmp_path):
    # Found by review: train.eval_samples defaults to 8 now, so a rerun logged avg@8 and summarize.py tabled it,
    # where section 1 shows greedy accuracy (and its wall time has no sampled evaluations).
    grids, summaries = _grid_script_calls(tmp_path, "cpu.sh")
    assert len(grids) == 2 and len(summaries) == 1
    cfgs = [cfg for call in grids for cfg in _grid_configs(call, tmp_path)]
    assert len(cfgs) == 15 and {cfg.train.eval_samples for cfg in cfgs} == {0}


def test_shipped_base_script_makes_section_8s_greedy_table_at_40_steps(tmp_path):
    (grid,), (summary,) = _grid_script_calls(tmp_path, "shipped_base.sh")
    cfgs = _grid_configs(grid, tmp_path)
    assert len(cfgs) == 15 and {(c.train.steps, c.train.eval_samples) for c in cfgs} == {(40, 8)}
    assert summary[summary.index("--measure") + 1] == "greedy"


def test_support_seeds_table_and_plot_exact_values(tmp_path):
    import support_seeds

    def report(seed_shift):
        model = lambda p1, pk, cats, h: {"pass_at_k": {"1": p1, "2": pk}, "answer_entropy": h,  # noqa: E731
                                          **({"categories": cats} if cats else {})}
        return {"k": 2, "support_vs": "base", "models": {
            "base": model(0.5, 0.75, None, 1.0),
            "raro": model(0.25 + seed_shift, 0.5, {"P": 3 + seed_shift * 8, "S": 1, "E": 2}, 0.5)}}

    paths = []
    for i, shift in enumerate((0.0, 0.25)):
        paths.append(tmp_path / f"r{i}.json")
        paths[-1].write_text(json.dumps(report(shift)))
    png = tmp_path / "p.png"
    assert support_seeds.main([str(png), *map(str, paths)]) == 0
    table = support_seeds.table(support_seeds.read_reports([str(p) for p in paths]))
    assert "| raro | 0.375 ± 0.177 | 0.500 ± 0.000 | 4.0 ± 1.4 | 1.0 ± 0.0 | 2.0 ± 0.0 | 0.500 ± 0.000 |" in table
    assert "| base | 0.500 ± 0.000 | 0.750 ± 0.000 | - | - | - | 1.000 ± 0.000 |" in table and png.stat().st_size > 5000
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**report(0.0), "k": 4}))
    with pytest.raises(ValueError, match="differ in k"):
        support_seeds.read_reports([str(paths[0]), str(other)])
    assert support_seeds.main([str(png), str(tmp_path / "missing.json")]) == 2
    # Found by review on 2026-12-07: answer entropies over other sample counts were averaged together, under a
    # header that named no count; reports drawn at another temperature could not be told apart.
    assert "| answer entropy@2 |" in table
    other.write_text(json.dumps({**report(0.0), "answer_entropy_samples": 1}))
    with pytest.raises(ValueError, match=r"answer entropy over different numbers of samples \(None, 1\)"):
        support_seeds.read_reports([str(paths[0]), str(other)])
    config = {"task": {"name": "countdown"}, "analysis": {"split": "heldout", "num_problems": 64, "temperature": 0.6,
                                                          "top_p": 0.95, "max_new_tokens": 96, "entropy_samples": 8}}
    paths[0].write_text(json.dumps({**report(0.0), "config": config}))
    other.write_text(json.dumps({**report(0.0), "config": {**config, "analysis": {**config["analysis"],
                                                                                  "temperature": 1.0}}}))
    with pytest.raises(ValueError, match="drawn with other settings"):
        support_seeds.read_reports([str(paths[0]), str(other)])
    assert len(support_seeds.read_reports([str(p) for p in paths])) == 2  # a report from before configs is compared


@pytest.mark.parametrize("grid", sorted((ROOT / "experiments" / "grids").glob("*.txt")), ids=lambda p: p.name)
def test_every_grid_line_is_a_valid_training_command(grid, tmp_path):
    """A typo in a grid's flags would surface only when that run starts, an hour into a grid."""
    from raro_fast.config import load_config

    lines = [ln.split(None, 1) for ln in grid.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert lines, f"{grid}: no runs"
    names = [ln[0] for ln in lines]
    assert len(set(names)) == len(names), f"{grid}: a run name repeats"
    for name, flags in lines:
        cfg = load_config(flags.replace("{root}", str(tmp_path)).split() + ["--train.output_dir", str(tmp_path / name)])
        assert summarize.RUN_NAME.match(name), f"{grid}: {name} is not MODE-sSEED"
        assert name.endswith(f"-s{cfg.train.seed}") or "--train.seed" not in flags, \
            f"{grid}: {name} has seed {cfg.train.seed}"


def test_panels_plot_runs_side_by_side_and_name_a_missing_run(tmp_path):
    import panels

    for name, wrong in (("old-s0", 0.3), ("fixed-s0", 0.05)):
        _write(tmp_path, name, {0: 0.2, 20: 0.25}, extra={"reward/policy_mean_incorrect": wrong})
        rows = [json.loads(ln) for ln in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        for r in rows:
            if "eval/heldout_accuracy" in r:
                r["eval/heldout_avg_at_n"] = r["eval/heldout_accuracy"]
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "p.png"
    assert panels.main([str(tmp_path), str(out), "from seed 0=old-s0,fixed-s0"]) == 0
    assert out.stat().st_size > 5000
    assert panels.running_mean([1, 2, 3], [0.0, 1.0, 2.0], 2) == ([1, 2, 3], [0.0, 0.5, 1.5])
    with pytest.raises(SystemExit, match="nope/metrics.jsonl: no such metrics file"):
        panels.main([str(tmp_path), str(out), "x=nope"])
    # a run with no avg@n drew an empty line with a legend entry (found by review on 2026-12-07)
    _write(tmp_path, "greedy-s0", {0: 0.2, 20: 0.25})
    with pytest.raises(SystemExit, match="greedy-s0/metrics.jsonl: no held-out avg@n"):  # one line, no traceback
        panels.main([str(tmp_path), str(out), "x=old-s0,greedy-s0"])
    assert panels.main([str(tmp_path), str(out), "no title"]) == 2
    # a poetry run logs its held-out keys as null: the message blamed train.eval_samples (found by review)
    (tmp_path / "poetry-s0").mkdir()
    (tmp_path / "poetry-s0" / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "eval/heldout_accuracy": None, "eval/heldout_avg_at_n": None}) + "\n" for s in (0, 20)))
    with pytest.raises(SystemExit, match=r"poetry-s0/metrics.jsonl: no held-out avg@n to plot: every value logged is "
                                         r"null \(a task without a verifier"):
        panels.main([str(tmp_path), str(out), "x=poetry-s0"])


def test_summarize_names_a_run_without_a_verifier_and_ends_a_grid_it_cannot_compare_in_one_line(tmp_path):
    """Found by review on 2026-12-07: a poetry run's held-out values (all null) were blamed on the evaluation
    schedule, and modes that share no seed ended the command in a traceback."""
    _write(tmp_path, "raro-s0", {0: 0.1, 10: 0.2})
    _write(tmp_path, "rlvr-s1", {0: 0.1, 10: 0.3})
    command = [sys.executable, str(ROOT / "experiments" / "summarize.py"), str(tmp_path), "--measure", "greedy"]
    out = subprocess.run(command, capture_output=True, text=True)
    assert out.returncode == 1 and out.stderr == "error: modes raro and rlvr share no seed\n", out.stderr
    shutil.rmtree(tmp_path / "rlvr-s1")
    _write(tmp_path, "poetry-s0", {0: None, 10: None})
    with pytest.raises(ValueError, match=r"^poetry-s0: no held-out eval/heldout_accuracy to compare: every value "
                                         r"logged is null \(a task without a verifier"):
        summarize.summarize(summarize.read_runs(tmp_path))


def test_reports_of_other_numbers_of_questions_are_not_one_table(tmp_path):
    """The same task, data and split cut to another number of questions (eval.max_questions) are other problems
    (mutation review: a report of 8 questions and one of 64 made one table with no test failing)."""
    def report(name, questions):
        (tmp_path / name).mkdir(parents=True, exist_ok=True)
        (tmp_path / name / "report.json").write_text(json.dumps({
            "n": 4, "accuracy": {"avg@n": 0.1}, "task": "countdown", "split": "heldout",
            "counts": {"questions": questions}, "config": {"task": {"name": "countdown", "countdown": {"seed": 0}}}}))

    report("base", 8)
    report("raro-s0", 8)
    assert set(summarize.read_evals(tmp_path)[1]) == {"raro"}
    report("raro-s0", 64)
    with pytest.raises(ValueError, match=r"raro-s0/report.json: evaluated other problems \(questions: 64\) than "
                                         r".*base/report.json \(8\)"):
        summarize.read_evals(tmp_path)


def test_panels_name_a_run_that_never_logged_avg_at_n_as_one_without_eval_samples(tmp_path):
    """A run that logged no avg@n key at all (train.eval_samples 0) is told so; only a run that logged it as null
    every time is a task without a verifier (mutation review: either message passed the panels test)."""
    import panels

    _write(tmp_path, "greedy-s0", {0: 0.2, 20: 0.25})
    with pytest.raises(SystemExit, match=r"greedy-s0/metrics.jsonl: no held-out avg@n \(eval/heldout_avg_at_n\) to "
                                         r"plot; was it trained with train.eval_samples 0\?"):
        panels.main([str(tmp_path), str(tmp_path / "p.png"), "x=greedy-s0"])
    assert not summarize.all_null([], "eval/heldout_avg_at_n")
    assert not summarize.all_null([{"step": 0, "eval/heldout_accuracy": 0.2}], "eval/heldout_avg_at_n")
    assert summarize.all_null([{"step": 0, "eval/heldout_avg_at_n": None}, {"step": 1}], "eval/heldout_avg_at_n")
    assert not summarize.all_null([{"step": 0, "eval/heldout_avg_at_n": None}, {"step": 1, "eval/heldout_avg_at_n": 0.5}],
                                  "eval/heldout_avg_at_n")
