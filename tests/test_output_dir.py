"""One run per output folder: a new run refuses another run's folder (or clears it under train.overwrite), a
cached base_model is reused only for the settings it was warmed up with, and pruning never deletes the newest."""
import json
from pathlib import Path

import pytest

from raro_fast import checkpoint, output_dir
from raro_fast.config import load_config


def _cfg(out, *extra):
    # the embedded model warmed up in the run (model.path empty): the case with a base_model folder to manage
    return load_config(["--train.output_dir", str(out), "--model.path", "", *extra])


def _base(out, cfg):
    base = out / "base_model"
    base.mkdir(parents=True)
    (base / "config.json").write_text("{}")
    for name, text in output_dir.recipe_file(cfg).items():
        (base / name).write_text(text)
    return base


def test_a_new_run_refuses_a_folder_holding_another_run(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 0}\n')
    (out / "checkpoints" / "step_000004").mkdir(parents=True)
    cfg = _cfg(out)
    with pytest.raises(ValueError) as e:
        output_dir.prepare(cfg, delete=True)
    msg = str(e.value)
    assert str(out) in msg and "metrics.jsonl, checkpoints" in msg
    assert "--resume" in msg and "--train.overwrite true" in msg
    assert (out / "metrics.jsonl").exists() and (out / "checkpoints" / "step_000004").exists()  # nothing touched
    output_dir.prepare(_cfg(out, "--resume"), delete=True)  # continuing it is fine
    output_dir.prepare(_cfg(tmp_path / "elsewhere"), delete=True)  # so is a new folder


def test_overwrite_clears_the_old_run_and_keeps_a_matching_base(tmp_path):
    out = tmp_path / "run"
    cfg = _cfg(out, "--train.overwrite", "true")
    base = _base(out, cfg)
    for name in ("metrics.jsonl", "config.json", "curves.png", "rollouts.jsonl"):
        (out / name).write_text("old")
    for folder in ("checkpoints/step_000002", "dpo_reference/step_000003", "final_model"):
        (out / folder).mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    output_dir.prepare(cfg, delete=False)  # ranks other than 0 only check
    assert (out / "metrics.jsonl").exists()
    output_dir.prepare(cfg, delete=True)
    assert sorted(p.name for p in out.iterdir()) == ["base_model", "notes.txt"]  # only the run's own files went
    assert (base / "config.json").exists()


def test_a_base_warmed_up_with_other_settings_is_refused_naming_them(tmp_path):
    out = tmp_path / "run"
    _base(out, _cfg(out, "--warmup.steps", "300"))
    with pytest.raises(ValueError) as e:
        output_dir.prepare(_cfg(out), delete=True)
    assert "base_model was warmed up with other settings" in str(e.value)
    assert "warmup.steps: 300 there, 2000 now" in str(e.value)
    output_dir.prepare(_cfg(out, "--warmup.steps", "300"), delete=True)  # the same settings reuse it
    output_dir.prepare(_cfg(out, "--model.path", str(tmp_path)), delete=True)  # a given model ignores it
    output_dir.prepare(_cfg(out, "--train.overwrite", "true"), delete=True)
    assert not (out / "base_model").exists()  # warmed up again by the run


def test_a_resume_with_no_checkpoint_yet_checks_the_base_like_a_new_run(tmp_path):
    """A run killed before its first save, resumed: it starts from base_model/, so a base warmed up with other
    settings is refused (it was loaded silently), or warmed up again under train.overwrite; the run's own files stay."""
    out = tmp_path / "run"
    _base(out, _cfg(out, "--warmup.steps", "300"))
    (out / "metrics.jsonl").write_text('{"step": 0}\n')
    with pytest.raises(ValueError) as e:
        output_dir.prepare(_cfg(out, "--resume"), delete=True)
    assert "base_model was warmed up with other settings" in str(e.value)
    assert "warmup.steps: 300 there, 2000 now" in str(e.value) and "--train.overwrite true" in str(e.value)
    output_dir.prepare(_cfg(out, "--resume", "--warmup.steps", "300"), delete=True)  # its own settings: fine
    output_dir.prepare(_cfg(out, "--resume", "--train.overwrite", "true"), delete=False)  # other ranks only check
    assert (out / "base_model").exists()
    output_dir.prepare(_cfg(out, "--resume", "--train.overwrite", "true"), delete=True)
    assert not (out / "base_model").exists() and (out / "metrics.jsonl").exists()
    # with a checkpoint the weights are the checkpoint's (its settings are checked against the saved run's later)
    _base(out, _cfg(out, "--warmup.steps", "300"))
    (checkpoint.checkpoint_root(out) / "step_000002").mkdir(parents=True)
    output_dir.prepare(_cfg(out, "--resume"), delete=True)
    assert (out / "base_model").exists()


def test_a_base_without_its_recipe_is_refused(tmp_path):
    out = tmp_path / "run"
    base = _base(out, _cfg(out))
    (base / output_dir.RECIPE_FILE).unlink()
    with pytest.raises(ValueError, match="warmup_recipe.json is missing"):
        output_dir.prepare(_cfg(out), delete=True)
    (base / output_dir.RECIPE_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        output_dir.prepare(_cfg(out), delete=True)
    for text, kind in [("null", "NoneType"), ("[]", "list"), ('"x"', "str")]:  # an AttributeError from .get before
        (base / output_dir.RECIPE_FILE).write_text(text)
        with pytest.raises(ValueError, match=f"warmup_recipe.json holds {kind}, not an object"):
            output_dir.prepare(_cfg(out), delete=True)


def test_recipe_covers_what_the_base_depends_on(tmp_path):
    a = output_dir.base_recipe(_cfg(tmp_path))
    for flag, value in [("--model.embedded.hidden_size", "64"), ("--warmup.seed", "7"), ("--task.countdown.target", "12"),
                        ("--train.seed", "3")]:
        assert output_dir.base_recipe(_cfg(tmp_path, flag, value)) != a, flag
    # settings the warm-up does not read leave it reusable
    assert output_dir.base_recipe(_cfg(tmp_path, "--train.steps", "7", "--task.countdown.num_train", "50")) == a
    json.dumps(a)


def test_a_base_is_checked_in_every_section_and_for_a_real_model_warmed_up_too(tmp_path):
    """Each section of the recipe is compared (a base warmed up with another seed, width or train.seed was reused);
    a real model given warmup.checkpoint_steps is warmed up into base_model/ like the embedded one, and the puzzles
    left out of a warm-up that leaves out the task's puzzles are the split's, so its counts are the base's too."""
    out = tmp_path / "run"
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"weights")  # the recipe holds their digest
    real = ["--model.path", str(model), "--warmup.checkpoint_steps", "5"]
    assert output_dir.uses_base(_cfg(out)) and output_dir.uses_base(_cfg(out, *real))
    assert not output_dir.uses_base(_cfg(out, "--model.path", str(model)))
    _base(out, _cfg(out, *real))
    with pytest.raises(ValueError, match="checkpoint_steps: 5 there, 6 now"):
        output_dir.prepare(_cfg(out, "--model.path", str(model), "--warmup.checkpoint_steps", "6"), delete=True)
    output_dir.prepare(_cfg(out, *real), delete=True)
    output_dir.prepare(_cfg(out, *real[:2]), delete=True)  # no warm-up: the model is used as it is, base ignored
    (model / "model.safetensors").write_bytes(b"other weights")  # saved there again: the base is another's
    with pytest.raises(ValueError, match="model.path weights sha256: '[0-9a-f]+' there, '[0-9a-f]+' now"):
        output_dir.prepare(_cfg(out, *real), delete=True)
    other = tmp_path / "other"
    _base(other, _cfg(other, "--warmup.seed", "7", "--model.embedded.hidden_size", "64", "--train.seed", "3"))
    with pytest.raises(ValueError) as e:
        output_dir.prepare(_cfg(other), delete=True)
    assert ("(model.embedded.hidden_size: 64 there, 128 now; warmup.seed: 7 there, 1234 now; train.seed: 3 there, "
            "0 now)" in str(e.value))
    puzzles = output_dir.base_recipe(_cfg(out, "--warmup.leave_out", "puzzles"))
    assert puzzles["task.countdown"]["num_train"] != output_dir.base_recipe(
        _cfg(out, "--warmup.leave_out", "puzzles", "--task.countdown.num_train", "50"))["task.countdown"]["num_train"]


def test_pruning_never_deletes_the_newest_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (2, 4, 6, 8):
        (root / f"step_{step:06d}").mkdir(parents=True)
    # the newest written is step 4 (a run that resumed from 2 after 6 and 8 were left behind)
    names = [p.name for p in checkpoint.prunable(root, root / "step_000004", keep=2)]
    assert sorted(names) == ["step_000006", "step_000008"]
    names = [p.name for p in checkpoint.prunable(root, root / "step_000008", keep=2)]
    assert names == ["step_000002", "step_000004"]
    assert checkpoint.prunable(root, root / "step_000008", keep=1) == [root / f"step_{s:06d}" for s in (2, 4, 6)]
    assert checkpoint.prunable(root, root / "step_000002", keep=0) == []
    # keep more than there are: nothing goes (the count to delete is negative, not a slice end counted from the back)
    assert checkpoint.prunable(root, root / "step_000008", keep=5) == []
    assert checkpoint.prunable(root, root / "step_000008", keep=3) == [root / "step_000002"]


def _checkpoint(root, step, *, manifest=True):
    path = root / f"step_{step:06d}"
    (path / "model").mkdir(parents=True)
    for name, text in [("trainer_state.json", '{"step": %d}' % step), ("optimizer.json", "[]"),
                       ("optimizer.safetensors", "x" * 50), ("model/config.json", "{}")]:
        (path / name).write_text(text)
    if manifest:
        checkpoint.write_manifest(path)
    return path


def test_resume_point_skips_damaged_checkpoints_naming_the_file(tmp_path):
    root = checkpoint.checkpoint_root(tmp_path)
    _checkpoint(root, 2), _checkpoint(root, 4)
    (root / "latest").write_text("step_000004\n")
    said = []
    assert checkpoint.resume_point(tmp_path, warn=said.append) == root / "step_000004" and said == []
    (root / "step_000004" / "trainer_state.json").write_text('{"step": 5}')  # same size, other bytes
    assert checkpoint.resume_point(tmp_path, warn=said.append) == root / "step_000002"
    assert "step_000004 is damaged" in said[0] and "trainer_state.json does not match its SHA-256" in said[0]
    assert "resuming from step_000002" in said[1]
    good = (root / "step_000002" / "manifest.json").read_text()
    (root / "step_000002" / "manifest.json").write_text('{"optimizer.json": 3}')  # valid JSON, not a manifest
    assert "manifest.json is not a valid manifest" in checkpoint.damage(root / "step_000002")
    (root / "step_000002" / "manifest.json").write_text(good)
    (root / "step_000002" / "optimizer.json").unlink()
    with pytest.raises(ValueError) as e:
        checkpoint.resume_point(tmp_path, warn=said.append)
    assert "no intact checkpoint" in str(e.value) and "optimizer.json is missing" in str(e.value)
    assert checkpoint.resume_point(tmp_path / "fresh", warn=said.append) is None  # nothing to resume: from scratch


def test_resume_point_takes_the_one_latest_names_and_checks_every_file_it_lists(tmp_path):
    """Killed after step 4's folder was renamed into place, before `latest` was replaced: `latest` still names step 2,
    which is used (not the higher step number). The manifest covers the model folder too, and a truncated file is
    named with its sizes."""
    root = checkpoint.checkpoint_root(tmp_path)
    _checkpoint(root, 2), _checkpoint(root, 4)
    (root / "latest").write_text("step_000002\n")
    said = []
    assert checkpoint.resume_point(tmp_path, warn=said.append) == root / "step_000002" and said == []
    (root / "step_000002" / "model" / "config.json").write_text("[]")  # same size, other bytes
    assert checkpoint.resume_point(tmp_path, warn=said.append) == root / "step_000004"
    assert said == [f"train.resume: step_000002 is damaged, skipped: {root / 'step_000002' / 'model' / 'config.json'} "
                    "does not match its SHA-256 in the manifest (changed after it was written)",
                    "train.resume: resuming from step_000004, the newest intact checkpoint"]
    (root / "step_000004" / "optimizer.safetensors").write_text("x" * 10)
    assert checkpoint.damage(root / "step_000004") == (
        f"{root / 'step_000004' / 'optimizer.safetensors'} has 10 bytes, the manifest says 50 (truncated or replaced)")


def test_resume_point_without_latest_and_from_before_manifests(tmp_path):
    root = checkpoint.checkpoint_root(tmp_path)
    _checkpoint(root, 2, manifest=False), _checkpoint(root, 4, manifest=False)
    said = []
    assert checkpoint.resume_point(tmp_path, warn=said.append) == root / "step_000004"  # no latest: newest intact
    assert "latest is missing" in said[0]
    (root / "step_000004" / "optimizer.safetensors").unlink()  # old checkpoints: their files are checked
    assert checkpoint.resume_point(tmp_path, warn=said.append) == root / "step_000002"
    (root / "latest").write_text("step_000009\n")
    assert checkpoint.resume_point(tmp_path, warn=said.append) == root / "step_000002"
    assert any("names step_000009, which does not exist" in s for s in said)


def test_resume_changes_refuses_what_defines_the_run_and_allows_how_it_runs():
    from raro_fast.checkpoint import resume_changes
    from raro_fast.config import load_config, to_dict

    saved = to_dict(load_config(["--task.name", "poetry"]))
    del saved["task"]["countdown"]["expert_form"]  # a setting added after the run was saved: it has its default
    saved["task"]["deepmath"]["path"] = "/elsewhere/deepmath.jsonl"  # another task's data: not this run's
    now = to_dict(load_config(["--task.name", "poetry", "--optim.lr", "1e-5", "--rollout.batch_size", "8",
                               "--task.poetry.seed", "3", "--rollout.temperature", "0.7"]))
    now["task"]["countdown"]["expert_form"] = "varied"  # another task's setting (refused now at load_config)
    refused, allowed = resume_changes(saved, now)
    # every resume sets train.resume: reported as a change, it was noise that hid real ones (review)
    assert resume_changes(saved, {**now, "train": {**now["train"], "resume": True}}) == (refused, allowed)
    # rollout.batch_size changes the embedded engine's draws (its batches share one generator): the run's (review)
    assert refused == ["task.poetry.seed: 0 -> 3", "rollout.temperature: 1.0 -> 0.7", "rollout.batch_size: 128 -> 8"]
    assert allowed == ["optim.lr: 0.0002 -> 1e-05"]
    # A setting of the run's own section added after it was saved has its default: another value is refused (it
    # was skipped, found by review); without the defaults it is not compared.
    del saved["task"]["poetry"]["max_examples"]
    del saved["loss"]["std_normalize"]
    now = to_dict(load_config(["--task.name", "poetry", "--task.poetry.max_examples", "5", "--loss.std_normalize",
                               "true", "--optim.lr", "1e-5"]))
    assert resume_changes(saved, now, defaults=to_dict(load_config([]))) == (
        ["task.poetry.max_examples: 0 -> 5", "loss.std_normalize: False -> True"], ["optim.lr: 0.0002 -> 1e-05"])
    assert resume_changes(saved, now) == ([], ["optim.lr: 0.0002 -> 1e-05"])
    assert resume_changes(saved, to_dict(load_config(["--task.name", "poetry"])), defaults=to_dict(load_config([]))) \
        == ([], [])
    assert resume_changes(saved, to_dict(load_config(["--task.name", "poetry"]))) == ([], [])
    # another task is another run, though its own section is not compared (its data path may move)
    assert resume_changes(saved, to_dict(load_config(["--task.name", "countdown"]))) == (
        ["task.name: 'poetry' -> 'countdown'"], [])
    refused, allowed = resume_changes(saved, to_dict(load_config(
        ["--task.name", "poetry", "--train.max_tokens_per_micro_batch", "1024", "--model.gradient_checkpointing",
         "true", "--train.stop_after", "2", "--train.steps", "7", "--train.share_prompts", "false"])))
    assert refused == [] and allowed == ["model.gradient_checkpointing: False -> True", "train.steps: 80 -> 7",
                                         "train.max_tokens_per_micro_batch: 4096 -> 1024",
                                         "train.share_prompts: True -> False"]
    # one command's own settings (train.PER_COMMAND) are not the run's: never listed as a change
    assert resume_changes({**saved, "train": {**saved["train"], "stop_after": 3, "overwrite": True}}, to_dict(
        load_config(["--task.name", "poetry"]))) == ([], [])
    # How often it evaluates may change; what an evaluation measures may not (the summary compares it with step 0's).
    refused, allowed = resume_changes(saved, to_dict(load_config(
        ["--task.name", "poetry", "--train.eval_every", "5", "--train.eval_tournament", "false",
         "--train.eval_size", "8", "--train.eval_samples", "4", "--train.eval_temperature", "0.5"])))
    assert allowed == ["train.eval_every: 10 -> 5", "train.eval_tournament: True -> False"]
    assert refused == ["train.eval_size: 128 -> 8", "train.eval_temperature: 0.0 -> 0.5", "train.eval_samples: 8 -> 4"]
    # A loss setting the saved run never read, refused since: a run that set one was refused with it (at load) and
    # without it (as a change), and could not be resumed at all (found by review); dropping it is allowed, and a
    # setting the run did read stays its own.
    sft = to_dict(load_config(["--train.mode", "sft"]))
    saved_sft = {**sft, "loss": {**sft["loss"], "clip_high": 0.3, "kl_estimator": "k1"}}
    assert resume_changes(saved_sft, sft) == ([], ["loss.clip_high: 0.3 -> 0.28", "loss.kl_estimator: 'k1' -> 'k3'"])
    rlvr = to_dict(load_config(["--train.mode", "rlvr"]))
    assert resume_changes({**rlvr, "loss": {**rlvr["loss"], "clip_high": 0.3}}, rlvr) == (
        ["loss.clip_high: 0.3 -> 0.28"], [])


@pytest.mark.parametrize("flags,diff", [
    (["--task.countdown.max_target", "30"], "task.countdown.max_target 0 there, 30 now"),
    (["--task.countdown.target", "24"], "task.countdown.target 10 there, 24 now"),
    (["--task.countdown.num_numbers", "4"], "task.countdown.num_numbers 3 there, 4 now"),
])
def test_a_shipped_base_trains_only_the_task_it_was_warmed_up_for(tmp_path, flags, diff):
    """builtin:countdown-easy's warm-up showed worked solutions of puzzles with targets 1-30 but 10: on another
    Countdown task its held-out accuracy was not held out (found by review on 2026-12-07: 51 of 64 held-out puzzles
    at max_target 30 were in a fifth of its corpus)."""
    shipped = ["--train.output_dir", str(tmp_path / "run")]
    with pytest.raises(ValueError, match=f"builtin:countdown-easy: this base was warmed up for another Countdown task "
                                         f"\\({diff}\\).*--model.path ''"):
        output_dir.prepare(load_config([*shipped, *flags]), delete=True)
    output_dir.prepare(load_config([*shipped, "--task.countdown.num_train", "50", "--task.countdown.seed", "3"]),
                       delete=True)  # the same puzzles split otherwise: all left out of its warm-up
    output_dir.prepare(load_config([*shipped, "--task.name", "deepmath"]), delete=True)  # it saw no other task
    output_dir.prepare(_cfg(tmp_path / "own", *flags), delete=True)  # warmed up in the run: leaves them out


def test_an_output_dir_in_the_way_of_a_file_is_refused_before_anything_loads(tmp_path):
    """It failed when the metrics were opened, after the model loaded (and a warm-up ran), with a traceback (found
    by review on 2026-12-07)."""
    (tmp_path / "afile").write_text("x")
    for out in (tmp_path / "afile", tmp_path / "afile" / "sub"):
        with pytest.raises(ValueError, match=f"train.output_dir: {tmp_path / 'afile'} is a file, not a folder"):
            output_dir.prepare(_cfg(out), delete=True)


def test_an_output_dir_that_cannot_be_written_is_refused_before_anything_loads():
    """It failed where the metrics were opened (after the model loaded) or where the base was saved (after the
    whole warm-up), in a traceback (found by review). /proc takes no new folder, even from root."""
    for out in (Path("/proc/raro_out"), Path("/proc")):  # no folder made there; a folder that takes no file
        with pytest.raises(ValueError, match=rf"train.output_dir: cannot write in {out} \((FileNotFoundError|"
                                             r"PermissionError|OSError)"):
            output_dir.prepare(_cfg(out), delete=True)


def test_a_refused_run_leaves_no_folder_behind(tmp_path):
    """The write probe made the output folder before the run's refusals (review of the probe)."""
    out = tmp_path / "a" / "b" / "run"
    with pytest.raises(ValueError, match="task.countdown.target"):
        output_dir.prepare(load_config(["--task.countdown.target", "24", "--train.output_dir", str(out)]), delete=True)
    assert list(tmp_path.iterdir()) == []


def test_a_resume_may_move_the_tasks_data_file_and_wait_longer_for_sglang():
    """The shipped samples' default paths are absolute in the package: a re-cloned checkout could not resume a
    DeepMath or poetry run (the checkpoint's data digest guards what the file holds); and a run stopped by a slow
    SGLang server could not resume with a longer timeout. Found by review on 2026-12-07."""
    from raro_fast.checkpoint import resume_changes
    from raro_fast.config import load_config, to_dict

    for task in ("deepmath", "poetry"):
        saved = to_dict(load_config(["--task.name", task]))
        saved["task"][task]["path"] = f"/old/checkout/raro_fast/tasks/data/{task}_sample.jsonl"
        saved["rollout"].update(backend="sglang_http", sglang_timeout_s=600.0)
        refused, allowed = resume_changes(saved, to_dict(load_config(["--task.name", task, "--rollout.backend",
                                                                      "sglang_http", "--rollout.sglang_timeout_s",
                                                                      "1200"])))
        assert refused == [] and [a.split(":")[0] for a in allowed] == [f"task.{task}.path", "rollout.sglang_timeout_s"]
