"""A checkpoint round trip without a training run: what `save_checkpoint` writes (weights, optimizer state, RNG) is
what a resume gets back, bit for bit; the folder keeps the newest two; and it is on disk before anything relies on it.
The end-to-end resume tests never look at what was pruned, and their runs draw nothing from the global RNG."""
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

from raro_fast import checkpoint
from raro_fast.distributed import Dist
from raro_fast.model.hf import build_embedded_model, load_project_tokenizer
from raro_fast.model.policy import PolicyModel

D = Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def _model_and_optimizer(seed):
    tok = load_project_tokenizer()
    hf = build_embedded_model(tok, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64,
                              max_position=64, seed=seed)
    model = PolicyModel(hf)
    return tok, hf, model, torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.8, 0.95), weight_decay=0.1)


def _adam_step(model, optimizer, scale):
    optimizer.zero_grad()
    loss = sum((p * (scale + i)).square().sum() for i, p in enumerate(model.parameters()))
    loss.backward()
    optimizer.step()


def test_a_checkpoint_restores_the_optimizer_and_rng_exactly_and_keeps_the_newest_two(tmp_path):
    tok, hf, model, optimizer = _model_and_optimizer(seed=0)
    root = checkpoint.checkpoint_root(tmp_path)
    (root / "step_000009").mkdir(parents=True)  # left by a run this one resumed before: not newer, pruned too
    for step in (1, 2, 3):
        _adam_step(model, optimizer, scale=0.5 * step)
        torch.manual_seed(100 + step)
        final = checkpoint.save_checkpoint(tmp_path, step, model=model, hf_model=hf, tokenizer=tok,
                                           optimizer=optimizer, trainer_state={"step": step}, d=D)
    assert final == root / "step_000003" and (root / "latest").read_text() == "step_000003\n"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000002", "step_000003"]
    assert checkpoint.damage(final) is None
    assert checkpoint.load_trainer_state(final) == {"step": 3, checkpoint.FORMAT_KEY: 2}
    # Saving a step again (a resume from an older checkpoint redoes it) replaces the folder, not fails on it.
    checkpoint.save_checkpoint(tmp_path, 3, model=model, hf_model=hf, tokenizer=tok, optimizer=optimizer,
                               trainer_state={"step": 3, "again": True}, d=D)
    assert checkpoint.load_trainer_state(final) == {"step": 3, "again": True, checkpoint.FORMAT_KEY: 2}
    assert checkpoint.damage(final) is None
    draws = torch.rand(5)  # what the uninterrupted run draws next
    saved_state = {id(p): {k: v.clone() for k, v in optimizer.state[p].items()} for p in model.parameters()}
    weights = {k: v.clone() for k, v in hf.state_dict().items()}

    _, _, fresh, fresh_optimizer = _model_and_optimizer(seed=1)
    torch.manual_seed(7)
    checkpoint.restore_optimizer_and_rng(final, model=fresh, optimizer=fresh_optimizer, d=D)
    assert torch.equal(torch.rand(5), draws)
    for p, q in zip(model.parameters(), fresh.parameters(), strict=True):
        got, want = fresh_optimizer.state[q], saved_state[id(p)]
        assert got.keys() == want.keys() == {"step", "exp_avg", "exp_avg_sq"}
        assert all(torch.equal(got[k], want[k]) for k in want)
    on_disk = load_file(str(final / "model" / "model.safetensors"))
    assert all(torch.equal(on_disk[k], weights[k]) for k in on_disk) and len(on_disk) >= 3


def test_a_save_before_the_first_step_changes_no_update_and_resumes_to_the_same_one(tmp_path):
    """DCP's optimizer state dict fills an empty state by taking a step of zero gradients, which Adam counts: a run
    that saved before anything trained (a step whose samples were all truncated) took a first real update 0.74x as
    large as the same run without the save, and its resume did the same (found by review)."""
    tok, hf, model, optimizer = _model_and_optimizer(seed=0)
    _, _, unsaved, unsaved_optimizer = _model_and_optimizer(seed=0)
    final = checkpoint.save_checkpoint(tmp_path, 1, model=model, hf_model=hf, tokenizer=tok, optimizer=optimizer,
                                       trainer_state={"step": 1}, d=D)
    assert not optimizer.state and load_file(str(final / "optimizer.safetensors")) == {}
    # its groups name the parameters as DCP's own state dict does (which a resume after training loads)
    _, _, other, other_optimizer = _model_and_optimizer(seed=0)
    dcp = get_optimizer_state_dict(other, other_optimizer, options=StateDictOptions(full_state_dict=True))
    assert json.loads((final / "optimizer.json").read_text()) == json.loads(json.dumps(dcp["param_groups"]))
    _, _, resumed, resumed_optimizer = _model_and_optimizer(seed=0)
    checkpoint.restore_optimizer_and_rng(final, model=resumed, optimizer=resumed_optimizer, d=D)
    assert not resumed_optimizer.state
    for m, o in ((model, optimizer), (unsaved, unsaved_optimizer), (resumed, resumed_optimizer)):
        _adam_step(m, o, scale=0.5)
    moved = [(p - q).abs().max() for p, q in zip(unsaved.parameters(), _model_and_optimizer(seed=0)[2].parameters())]
    assert max(moved) > 0  # the step moved the weights
    for other in (model, resumed):
        assert all(torch.equal(p, q) for p, q in zip(other.parameters(), unsaved.parameters(), strict=True))
    assert optimizer.state[next(model.parameters())]["step"] == 1


def test_a_checkpoint_is_on_disk_before_latest_names_it_and_an_older_one_is_pruned(tmp_path, request):
    """Renames alone survive a process kill, not a power cut: the new folder and `latest` naming it could reach the
    disk before the files' contents, with the intact older checkpoint already pruned: nothing left to resume from."""
    tok, hf, model, optimizer = _model_and_optimizer(seed=0)
    save = lambda step: checkpoint.save_checkpoint(tmp_path, step, model=model, hf_model=hf, tokenizer=tok,
                                                   optimizer=optimizer, trainer_state={"step": step}, d=D)
    save(1), save(2)
    events = request.getfixturevalue("disk_events")  # from here on
    final = save(3)
    root = Path(os.path.realpath(final.parent))
    tmp, latest = root / ".step_000003.tmp", root / "latest"
    renamed = events.index(("replace", str(tmp), str(root / "step_000003")))
    named = events.index(("replace", str(root / ".latest.tmp"), str(latest)))
    pruned = events.index(("replace", str(root / "step_000001"), str(root / ".step_000001.old")))
    assert ("rmtree", str(root / ".step_000001.old")) in events[pruned:]  # out of step_* before it is deleted
    synced = {e[1]: i for i, e in enumerate(events) if e[0] == "fsync"}  # the last sync of each path
    when = lambda path: synced.get(str(path), math.inf)
    written = [tmp / p.relative_to(final) for p in final.rglob("*")]
    assert len(written) >= 8 and [p for p in [*written, tmp] if not when(p) < renamed] == []
    assert when(root / ".latest.tmp") < named < when(root) < pruned


def _small_run(tmp_path, model_dir, *flags):
    """(output folder, its training flags, their config, the model, tokenizer, PolicyModel, optimizer): a run of the
    saved tiny model on 8 puzzles, for checkpoints written by hand."""
    from raro_fast.config import load_config
    from raro_fast.model.hf import load_pretrained

    out = tmp_path / "run"
    args = ["--model.path", str(model_dir), "--train.output_dir", str(out), "--task.countdown.num_train", "8",
            "--task.countdown.num_heldout", "2", "--train.progress", "false", *flags]
    hf, tok = load_pretrained(model_dir, dtype=torch.float32)
    model = PolicyModel(hf)
    return out, args, load_config(args), hf, tok, model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def test_setup_resumes_the_saved_replay_buffer_step_mode_state_and_logs(tmp_path, saved_embedded_model,
                                                                         monkeypatch):
    """What the loop restores from trainer_state.json, checked in the process: the end-to-end resume test's tiny
    model never answers, so its replay buffer stays empty and a resume that dropped the buffer passed it."""
    from raro_fast import train
    from raro_fast.config import load_config, to_dict

    out, args, cfg, hf, tok, model, optimizer = _small_run(tmp_path, saved_embedded_model, "--optim.lr", "3e-4")
    _adam_step(model, optimizer, scale=0.5)
    pairs = [{"example_id": f"e{i}", "question": f"q{i}", "policy_answer": f"{i} + 1", "expert_answer": f"{i} * 2"}
             for i in range(3)]
    state = {"step": 2, "replay": {"capacity": cfg.raro.replay_size, "items": pairs}, "world_size": 1,
             "config": to_dict(cfg), "mode_state": {"round_steps": 5}, "skipped_in_a_row": 2, "warned_uniform": True}
    checkpoint.save_checkpoint(out, 2, model=model, hf_model=hf, tokenizer=tok, optimizer=optimizer,
                               trainer_state=state, d=D)
    entropies = {1: 2.5, 2: 2.0, 3: 1.0}  # killed after step 3
    (out / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "policy/entropy": entropies.get(s)}) + "\n"
                                               for s in range(4)))
    (out / "rollouts.jsonl").write_text("".join(f'{{"step": {s}}}\n' for s in (1, 2, 3)))
    r = train.setup(load_config([*args, "--resume", "--train.stop_after", "1"]), D)
    assert r.start_step == 2 and r.mode_state == {"round_steps": 5} and r.engine.weight_version == 2
    assert r.replay.state_dict() == state["replay"]
    assert [g["lr"] for g in r.optimizer.param_groups] == [3e-4]  # the command's, not the checkpoint's 1e-3
    assert [rec["step"] for rec in r.log.read()] == [0, 1, 2]
    assert [rec["step"] for rec in r.rollout_log.read()] == [1, 2]
    assert r.first_entropy == 2.5  # the run's start, not the resumed step's: the uniform-policy warning compares it
    # two non-finite steps before the checkpoint count toward the stop, and the warning is not given twice
    assert r.skipped_in_a_row == 2 and r.warned_uniform
    # train.stop_after counts this process's steps: one step after the resumed step 2, not "stop once at step 1"
    trained = []

    def train_step(run, step):
        trained.append(step)
        return {"step": step + 1, "update/skipped": False}

    monkeypatch.setattr(train, "train_step", train_step)
    monkeypatch.setattr(train, "finish", lambda run: trained.append("finished"))
    with pytest.raises(SystemExit, match="stopping after 1 steps"):
        train.run(r)
    assert trained == [2]
    r.skipped_in_a_row, r.warned_uniform = 1, False
    train.save(r, 3)
    saved = checkpoint.load_trainer_state(out / "checkpoints" / "step_000003")
    assert (saved["skipped_in_a_row"], saved["warned_uniform"]) == (1, False)


def test_the_steps_demonstrations_deal_out_each_epoch_once():
    """The data position is step x questions_per_step, a pure function of the step (what a resume relies on): the
    steps' demonstrations, in order, are one permutation of the training set per epoch, none skipped."""
    from raro_fast.train import examples_for_step

    data = [f"ex{i}" for i in range(5)]
    drawn = [x for step in range(5) for x in examples_for_step(data, step, 2, seed=3)]  # two epochs
    assert sorted(drawn[:5]) == sorted(drawn[5:]) == data and drawn[:5] != drawn[5:]
    assert examples_for_step(data, 3, 2, seed=3) == drawn[6:8]


def test_a_checkpoint_without_its_manifest_is_damaged_and_a_deletion_cut_short_leaves_no_step_folder(tmp_path,
                                                                                                   monkeypatch):
    """Found by review: a checkpoint with no manifest passed as one from before manifests, and loaded a changed
    optimizer state; a run killed while deleting a step folder (pruned, or replaced when a step is saved again)
    left it half deleted under its step's name."""
    import shutil

    tok, hf, model, optimizer = _model_and_optimizer(seed=0)
    save = lambda step: checkpoint.save_checkpoint(tmp_path, step, model=model, hf_model=hf, tokenizer=tok,
                                                   optimizer=optimizer, trainer_state={"step": step}, d=D)
    root = checkpoint.checkpoint_root(tmp_path)
    save(1), save(2)
    optimizer_file = root / "step_000002" / "optimizer.safetensors"
    optimizer_file.write_bytes(optimizer_file.read_bytes()[:-1] + b"\x01")
    (root / "step_000002" / checkpoint.MANIFEST).unlink()
    assert checkpoint.damage(root / "step_000002") == f"{root / 'step_000002' / checkpoint.MANIFEST} is missing"
    said = []
    assert checkpoint.resume_point(tmp_path, warn=said.append) == root / "step_000001"
    assert any("step_000002 is damaged" in s for s in said)
    # A checkpoint from before manifests (no format key) is checked for its files only, as before.
    state = root / "step_000001" / "trainer_state.json"
    state.write_text(json.dumps({"step": 1}))
    (root / "step_000001" / checkpoint.MANIFEST).unlink()
    assert checkpoint.damage(root / "step_000001") is None

    real_rmtree = shutil.rmtree

    def killed(path, **kwargs):  # the process dies inside the deletion, after its first file
        if not Path(path).exists():
            return
        next(p for p in Path(path).rglob("*") if p.is_file()).unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        checkpoint._remove(root / "step_000002")
    monkeypatch.setattr(checkpoint.shutil, "rmtree", real_rmtree)
    assert not (root / "step_000002").exists() and (root / ".step_000002.old").is_dir()
    assert sorted(p.name for p in root.glob("step_*")) == ["step_000001"]
    save(3)  # the next save deletes what was left
    assert sorted(p.name for p in root.glob("step_*")) == ["step_000001", "step_000003"]
    assert not (root / ".step_000002.old").exists()
    # A save killed before its rename left a whole checkpoint at .step_N.tmp; only a later save of step N removed
    # it, and a run that never saves step N again kept it for good (found by review): the next save's pruning
    # and a resume's remove it.
    shutil.copytree(root / "step_000003", root / ".step_000004.tmp")
    save(5)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000003", "step_000005"]
    shutil.copytree(root / "step_000003", root / ".step_000006.tmp")
    checkpoint.prune(root, root / "step_000005")
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000003", "step_000005"]


def test_a_resume_refuses_other_data_and_names_the_steps_its_metrics_lost(tmp_path, saved_embedded_model,
                                                                          monkeypatch, capsys):
    """Found by review: a data file grown or replaced between a kill and the resume gave every later step other
    demonstrations, with no error (the checkpoint kept the path only); metrics that never reached the disk before
    a power cut (the checkpoint did) left a gap in the run's records, silently. The logs are synced before each
    checkpoint now."""
    from raro_fast import metrics, train
    from raro_fast.config import load_config

    out = tmp_path / "run"
    args = ["--model.path", str(saved_embedded_model), "--train.output_dir", str(out), "--task.countdown.num_train",
            "8", "--task.countdown.num_heldout", "2", "--train.progress", "false"]
    cfg = load_config(args)
    r = train.setup(cfg, D)
    assert r.start_step == 0
    events = []
    monkeypatch.setattr(metrics, "fsync_path", lambda path: events.append(("fsync", path.name)))
    real_save = checkpoint.save_checkpoint
    monkeypatch.setattr(checkpoint, "save_checkpoint", lambda *a, **k: events.append(("checkpoint",)) or real_save(*a, **k))
    r.log.write({"step": 0})
    r.log.write({"step": 1})
    r.rollout_log.write({"step": 1})
    train.save(r, 2)
    monkeypatch.undo()
    assert events == [("fsync", "metrics.jsonl"), ("fsync", "rollouts.jsonl"), ("checkpoint",)]
    saved = checkpoint.load_trainer_state(out / "checkpoints" / "step_000002")
    assert saved["data_sha256"] == train.data_digest(r.train_examples, r.eval_examples)
    # step 2's record never reached the disk
    capsys.readouterr()
    r = train.setup(load_config([*args, "--resume"]), D)
    assert r.start_step == 2
    said = capsys.readouterr().out
    assert f"{out / 'metrics.jsonl'} has no record of 1 step(s) up to the checkpoint's step 2 (2)" in said
    assert [rec["step"] for rec in r.log.read()] == [0, 1]

    state_file = out / "checkpoints" / "step_000002" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["data_sha256"] = "0" * 64  # what another data file gives
    state_file.write_text(json.dumps(state))
    checkpoint.write_manifest(state_file.parent)
    with pytest.raises(ValueError, match=r"train.resume: .*step_000002 was trained on other data than task.countdown"):
        train.setup(load_config([*args, "--resume"]), D)
    del state["data_sha256"]  # a checkpoint from before digests: not compared
    state_file.write_text(json.dumps(state))
    checkpoint.write_manifest(state_file.parent)
    assert train.setup(load_config([*args, "--resume"]), D).start_step == 2


def test_a_resume_says_when_the_run_now_makes_other_tokens_of_its_data(tmp_path, saved_embedded_model, monkeypatch,
                                                                      capsys):
    """Found by review: an upgrade between a kill and the resume that tokenized otherwise (last session's turn end
    for Phi-3-like tokenizers, targets read as the conversation reads them) trained the resumed steps on other
    tokens than the run's first, without a word. Each checkpoint records what the run makes of its first
    demonstration; a resume that makes other tokens of it says which, and goes on."""
    from raro_fast import prompts, train
    from raro_fast.config import load_config

    out = tmp_path / "run"
    args = ["--model.path", str(saved_embedded_model), "--train.output_dir", str(out), "--task.countdown.num_train",
            "8", "--task.countdown.num_heldout", "2", "--train.progress", "false"]
    r = train.setup(load_config(args), D)
    train.save(r, 2)
    saved = checkpoint.load_trainer_state(out / "checkpoints" / "step_000002")["tokens_sha256"]
    assert sorted(saved) == ["critic prompt", "expert target", "policy prompt", "target read back", "turn ends"]
    capsys.readouterr()
    assert train.setup(load_config([*args, "--resume"]), D).tokens_sha256 == saved  # reloaded from the checkpoint
    assert "other tokens" not in capsys.readouterr().out

    monkeypatch.setattr(prompts, "POLICY_SYSTEM", prompts.POLICY_SYSTEM + " Be brief.")
    r = train.setup(load_config([*args, "--resume"]), D)
    said = capsys.readouterr().out
    assert r.start_step == 2 and "warning: train.resume" in said
    assert "(the policy prompt of its first demonstration differ" in said and "steps from 3 on" in said
    monkeypatch.undo()
    real_reply_ids = prompts.reply_ids
    monkeypatch.setattr(prompts, "reply_ids", lambda tok, text, messages=None: real_reply_ids(tok, text, messages)[1:])
    train.setup(load_config([*args, "--resume"]), D)
    assert "(the expert target, target read back of its first demonstration differ" in capsys.readouterr().out


def test_a_resume_at_the_runs_last_step_evaluates_it(tmp_path, saved_embedded_model, monkeypatch):
    """Found by review: a run that planned 6 steps, killed after its checkpoint at step 3 and resumed with
    train.steps 3, trained nothing and never evaluated step 3 (its record, from the longer run, had none): the
    summary reported step 0's accuracy as the final one."""
    from raro_fast import train
    from raro_fast.config import load_config

    out = tmp_path / "run"
    args = ["--model.path", str(saved_embedded_model), "--train.output_dir", str(out), "--task.countdown.num_train",
            "8", "--task.countdown.num_heldout", "2", "--train.progress", "false", "--train.eval_every", "0"]
    r = train.setup(load_config([*args, "--train.steps", "6"]), D)
    train.save(r, 3)
    records = [{"step": 0, "eval/heldout_accuracy": 0.25}, {"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0},
               {"step": 3, "loss": 3.0}]
    (out / "metrics.jsonl").write_text("".join(json.dumps(rec) + "\n" for rec in records))
    evaluated, finished = [], []
    monkeypatch.setattr(train, "evaluate", lambda run, step: evaluated.append(step) or {"eval/heldout_accuracy": 0.5})
    monkeypatch.setattr(train, "train_step", lambda run, step: pytest.fail("nothing is left to train"))
    monkeypatch.setattr(train, "finish", lambda run: finished.append(run.log.read()))
    train.run(train.setup(load_config([*args, "--train.steps", "3", "--resume"]), D))
    assert evaluated == [3]
    assert finished == [records[:3] + [{"step": 3, "loss": 3.0, "eval/heldout_accuracy": 0.5}]]


def test_only_step_folders_are_checkpoints_and_their_steps_are_numbers(tmp_path):
    """Found by review: a user's copy `step_000004.bak` beside the checkpoints was one, by its name: the next save
    pruned the real step_000004 and kept the copy, and a resume's pruning deleted a copy of the newest; by name,
    step 1000000 was older than step 999999."""
    tok, hf, model, optimizer = _model_and_optimizer(seed=0)
    root = checkpoint.checkpoint_root(tmp_path)

    def save(step):
        return checkpoint.save_checkpoint(tmp_path, step, model=model, hf_model=hf, tokenizer=tok,
                                          optimizer=optimizer, trainer_state={"step": step}, d=D)

    save(2), save(4)
    shutil.copytree(root / "step_000004", root / "step_000004.bak")
    save(6)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000004", "step_000004.bak", "step_000006"]
    shutil.copytree(root / "step_000006", root / "step_000006.bak")
    checkpoint.prune(root, root / "step_000006")  # what a resume does
    assert (root / "step_000006.bak").is_dir() and checkpoint.resume_point(tmp_path) == root / "step_000006"
    (root / "latest").unlink()  # the newest by number, not by name
    save(999999), save(1000000)
    (root / "latest").unlink()
    assert checkpoint.resume_point(tmp_path, warn=lambda _: None) == root / "step_1000000"
    assert [p.name for p in checkpoint.step_folders(root)] == ["step_999999", "step_1000000"]


def test_a_run_saves_what_model_dtype_auto_became_and_a_resume_elsewhere_is_refused(tmp_path, saved_embedded_model,
                                                                                   monkeypatch):
    """Found by review: `model.dtype auto` was saved as "auto", so a run started on a GPU (bfloat16) and resumed on
    a CPU (float32) passed the settings check and trained on in another dtype, without a word."""
    from raro_fast import train
    from raro_fast.config import load_config

    out = tmp_path / "run"
    args = ["--model.path", str(saved_embedded_model), "--train.output_dir", str(out), "--task.countdown.num_train",
            "8", "--task.countdown.num_heldout", "2", "--train.progress", "false"]
    with monkeypatch.context() as m:  # what `auto` is on a GPU
        m.setattr(train, "resolve_dtype", lambda name, device: torch.bfloat16 if name == "auto" else torch.float32)
        r = train.setup(load_config(args), D)
    assert json.loads((out / "config.json").read_text())["model"]["dtype"] == "bfloat16"
    train.save(r, 2)
    with pytest.raises(ValueError, match=r"model.dtype: 'bfloat16' -> 'float32'"):
        train.setup(load_config([*args, "--resume"]), D)
    state_file = out / "checkpoints" / "step_000002" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["config"]["model"]["dtype"] = "auto"  # saved before `auto` was resolved: what it became is unknown
    state_file.write_text(json.dumps(state))
    checkpoint.write_manifest(state_file.parent)
    assert train.setup(load_config([*args, "--resume"]), D).start_step == 2


def test_a_resume_refuses_an_initial_model_saved_again_where_its_reference_is_rebuilt(tmp_path, saved_embedded_model):
    """The KL anchor (and DPO's first reference) is rebuilt on resume from the initial model's path. A model saved
    there again between the kill and the resume (an SFT stage writing to the same folder) anchored the run to
    another model with no error: step 3's ref_kl was 0.0 uninterrupted and 0.265 resumed. Each checkpoint now
    records the initial weights' digest. Found by review on 2026-12-07."""
    import shutil

    from raro_fast import train
    from raro_fast.config import load_config
    from raro_fast.model.hf import weights_digest

    base = tmp_path / "base"
    shutil.copytree(saved_embedded_model, base)
    out = tmp_path / "run"
    args = ["--model.path", str(base), "--train.output_dir", str(out), "--task.countdown.num_train", "8",
            "--task.countdown.num_heldout", "2", "--train.progress", "false", "--train.mode", "rlvr",
            "--loss.kl_coef", "0.1"]
    r = train.setup(load_config(args), D)
    assert r.initial_weights_sha256 == weights_digest(base)
    train.save(r, 2)
    assert checkpoint.load_trainer_state(out / "checkpoints" / "step_000002")["initial_weights_sha256"] == \
        r.initial_weights_sha256
    assert train.setup(load_config([*args, "--resume"]), D).start_step == 2  # the same model: resumes
    weights = base / "model.safetensors"
    original = weights.read_bytes()
    tensors = load_file(weights)
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 0.01
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"is not the one the run started from \(weights SHA-256 .* rebuilds its "
                                         r"reference model"):
        train.setup(load_config([*args, "--resume"]), D)
    # the same weights under another config: logits off by up to 6 on the shipped base (review, 2026-12-07)
    weights.write_bytes(original)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 0.1}))
    with pytest.raises(ValueError, match=r"started from \(config and tokenizer files SHA-256 .* at the start\), and"):
        train.setup(load_config([*args, "--resume"]), D)
    # without a reference model nothing is rebuilt from that path, and nothing is hashed
    plain = [*args[:-2], "--train.output_dir", str(tmp_path / "plain")]
    assert train.setup(load_config(plain), D).initial_weights_sha256 is None


def test_a_cached_base_is_warmed_up_again_when_the_model_at_its_path_changes(tmp_path, saved_embedded_model):
    """base_model/'s recipe held model.path's string only: a model saved there again kept the stale base, even
    under train.overwrite. Found by review on 2026-12-07."""
    import shutil

    from raro_fast import output_dir
    from raro_fast.config import load_config

    base = tmp_path / "base"
    shutil.copytree(saved_embedded_model, base)
    cfg = load_config(["--model.path", str(base), "--warmup.checkpoint_steps", "2",
                       "--train.output_dir", str(tmp_path / "run")])
    before = output_dir.base_recipe(cfg)
    weights = base / "model.safetensors"
    tensors = load_file(weights)
    name = next(iter(tensors))
    tensors[name] = tensors[name] * 2
    save_file(tensors, weights, metadata={"format": "pt"})
    after = output_dir.base_recipe(cfg)
    assert before["model.path"] == after["model.path"]
    assert before["model.path weights sha256"] != after["model.path weights sha256"]
    # and its config or tokenizer: the same weights read otherwise (found by review)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "rope_theta": 77.0}))
    again = output_dir.base_recipe(cfg)
    assert again["model.path weights sha256"] == after["model.path weights sha256"]
    assert again["model.path files sha256"] != after["model.path files sha256"]


def test_a_killed_saves_leftovers_are_cleared_and_its_previous_folder_taken_back(tmp_path):
    """Found by review: killed between its two renames, a save left the previous folder only at `.NAME.old` (no
    final_model at all), and killed before them a whole model's copy at `.NAME.XXXXXXXX`; no later save removed
    either, and the `.old` stayed where the folder was missing."""
    from raro_fast.model.hf import _recover_killed_save, save_pretrained_atomic

    tok, hf, _, _ = _model_and_optimizer(seed=0)
    final = tmp_path / "final_model"
    (tmp_path / ".final_model.old").mkdir()
    (tmp_path / ".final_model.old" / "config.json").write_text("{}")
    _recover_killed_save(final)  # the last whole folder is back under its name
    assert (final / "config.json").read_text() == "{}" and not (tmp_path / ".final_model.old").exists()
    final.rename(tmp_path / ".final_model.old")
    for leftover in (".final_model.k3v9_x0a", ".final_model.zz11yy22"):
        (tmp_path / leftover).mkdir()
    (tmp_path / ".other.k3v9_x0a").mkdir()  # another folder's: not this save's to remove
    (tmp_path / ".final_model.notes").mkdir()  # not a temporary folder's name
    save_pretrained_atomic(hf, tok, final)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".final_model.notes", ".other.k3v9_x0a", "final_model"]
    assert (final / "model.safetensors").is_file()


def test_a_resume_prunes_what_a_run_killed_in_its_last_pruning_kept(tmp_path, saved_embedded_model):
    """A run killed inside its last save's pruning kept a checkpoint too many and a half-deleted one for good: a
    resume of the finished run saves nothing, so nothing pruned again (found by review)."""
    from raro_fast import train
    from raro_fast.config import load_config, to_dict

    out, args, cfg, hf, tok, model, optimizer = _small_run(tmp_path, saved_embedded_model, "--train.steps", "3")
    for step in (1, 2, 3):
        state = {"step": step, "replay": {"capacity": cfg.raro.replay_size, "items": []}, "world_size": 1,
                 "config": to_dict(cfg), "mode_state": {}}
        checkpoint.save_checkpoint(out, step, model=model, hf_model=hf, tokenizer=tok, optimizer=optimizer,
                                   trainer_state=state, d=D, keep=0)
    root = checkpoint.checkpoint_root(out)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000001", "step_000002", "step_000003"]  # keep=0
    (root / ".step_000000.old").mkdir()
    (out / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in range(4)))
    r = train.setup(load_config([*args, "--resume"]), D)
    assert r.start_step == 3
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000002", "step_000003"]


def test_a_save_killed_while_removing_the_previous_folder_leaves_it_to_the_next_save(tmp_path):
    """Killed after both renames, inside the deletion of `.NAME.old`: the new folder is whole under its name, and
    the next save keeps it until its own rename, deletes the leftover, and does not take the stale one back."""
    from raro_fast.model.hf import _recover_killed_save, save_pretrained_atomic

    tok, hf, _, _ = _model_and_optimizer(seed=0)
    final = tmp_path / "final_model"
    save_pretrained_atomic(hf, tok, final, extra_files={"marker.txt": "new"})
    (tmp_path / ".final_model.old").mkdir()
    (tmp_path / ".final_model.old" / "marker.txt").write_text("stale")
    _recover_killed_save(final)
    assert (final / "marker.txt").read_text() == "new" and (tmp_path / ".final_model.old" / "marker.txt").is_file()
    save_pretrained_atomic(hf, tok, final, extra_files={"marker.txt": "newer"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final_model"]
    assert (final / "marker.txt").read_text() == "newer"


def test_a_link_left_at_the_old_name_is_removed_as_a_link_and_its_folder_kept(tmp_path):
    """A symlinked folder saved over (before links were resolved) was moved aside as the link `.NAME.old`: the next
    save removes the link, not the folder it names, and saves (rmtree cannot remove a link: the rename over it then
    stopped in NotADirectoryError)."""
    from raro_fast.model.hf import save_pretrained_atomic

    tok, hf, _, _ = _model_and_optimizer(seed=0)
    final = tmp_path / "final_model"
    save_pretrained_atomic(hf, tok, final)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "keep.txt").write_text("mine")
    (tmp_path / ".final_model.old").symlink_to(tmp_path / "elsewhere")
    save_pretrained_atomic(hf, tok, final, extra_files={"marker.txt": "new"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "final_model"]
    assert (tmp_path / "elsewhere" / "keep.txt").read_text() == "mine" and (final / "marker.txt").read_text() == "new"


def test_only_a_temporary_folders_exact_name_is_taken_for_a_killed_saves_leftover(tmp_path):
    """mkdtemp's names are `.NAME.` and 8 characters: a longer name of the same letters is someone's folder."""
    from raro_fast.model.hf import _recover_killed_save

    for name in (".final_model.k3v9_x0a", ".final_model.k3v9_x0a1", ".final_model.snapshot_2", ".final_model.k3v9_x0"):
        (tmp_path / name).mkdir()
    (tmp_path / "final_model").mkdir()
    _recover_killed_save(tmp_path / "final_model")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".final_model.k3v9_x0", ".final_model.k3v9_x0a1",
                                                           ".final_model.snapshot_2", "final_model"]
