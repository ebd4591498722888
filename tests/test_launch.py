"""`raro-fast train`: torchrun's options and the training's are told apart, and a rank's clear error is not
followed by torchrun's ChildFailedError block."""
import os
import subprocess
import sys

import pytest

from raro_fast.launch import split_args


def test_options_without_a_dot_go_to_torchrun_with_their_values():
    launcher, training = split_args(["--nproc_per_node=2", "--master_port", "29511", "--standalone", "--config", "a.yaml",
                                     "--train.steps", "3", "--model", "m", "--resume", "--rollout.temperature=0.5"])
    assert launcher == ["--nproc_per_node=2", "--master_port", "29511", "--standalone"]
    assert training == ["--config", "a.yaml", "--train.steps", "3", "--model", "m", "--resume", "--rollout.temperature=0.5"]
    assert split_args(["--help"]) == ([], ["--help"])
    # every alias of a training setting is the training's (`--output-dir` went to torchrun)
    assert split_args(["--standalone", "--output-dir", "r", "--resume"]) == (["--standalone"], ["--output-dir", "r", "--resume"])
    assert split_args(["--output-dir=r"]) == ([], ["--output-dir=r"])
    # a negative value stays with its option
    assert split_args(["--nnodes", "1", "--loss.kl_coef", "-1"]) == (["--nnodes", "1"], ["--loss.kl_coef", "-1"])
    # -h is the training's wherever it stands; a stray word before any option goes to the training, which names it
    assert split_args(["--standalone", "-h"]) == (["--standalone"], ["-h"])
    assert split_args(["stray", "--nnodes", "1"]) == (["--nnodes", "1"], ["stray"])
    # torchrun's short options are torchrun's wherever they stand (after a training option they went with it, and
    # the training refused "-t" as its own); a negative number is still a value
    argv = ["--nproc_per_node=2", "--config", "a.yaml", "-t", "3", "-r", "1", "--loss.clip_low", "-.5"]
    assert split_args(argv) == (["--nproc_per_node=2", "-t", "3", "-r", "1"], ["--config", "a.yaml", "--loss.clip_low", "-.5"])


def test_a_rank_killed_by_a_signal_exits_nonzero_in_one_line(monkeypatch, capsys):
    """torchrun reports a signal as a negative exit code; returned as it is, -9 would be exit status 247."""
    import torch.distributed.run
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from raro_fast import launch

    def killed(config, **_):
        raise ChildFailedError("raro_fast.train", {1: ProcessFailure(local_rank=1, pid=1, exitcode=-9, error_file="")})

    monkeypatch.setattr(torch.distributed.run, "run", killed)
    assert launch.main(["--nproc_per_node=2", "--train.steps", "1"]) == 1
    assert "raro-fast train: rank 1 stopped with exit code -9 (its message is above)" in capsys.readouterr().err


def test_an_unknown_command_is_named(capsys):
    from raro_fast.cli import main

    assert main(["trian"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("raro-fast: unknown command 'trian'\nusage: raro-fast <command>") and "convert-gguf" in err
    assert main(["--help"]) == 0 and "usage: raro-fast" in capsys.readouterr().out


def test_a_ranks_clear_error_ends_in_one_line_not_torchruns_block(tmp_path):
    cmd = [sys.executable, "-m", "raro_fast.cli", "train", "--nproc_per_node=1", "--standalone",
           "--model.path", str(tmp_path / "missing"),
           "--train.output_dir", str(tmp_path / "run")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 2, out.stderr[-3000:]
    assert out.stderr.count(f"error: model.path: '{tmp_path / 'missing'}'") == 1
    assert "raro-fast train: rank 0 stopped with exit code 2 (its message is above)" in out.stderr
    assert "ChildFailedError" not in out.stderr and "Traceback" not in out.stderr


def test_a_training_setting_without_its_section_is_named_not_handed_to_torchrun(monkeypatch, capsys):
    """`--output_dir` went to torchrun, whose 19-line usage named no training key (found by review)."""
    import torch.distributed.run

    from raro_fast import launch

    monkeypatch.setattr(torch.distributed.run, "run", lambda *a, **k: pytest.fail("torchrun was started"))
    assert launch.main(["--nproc_per_node=2", "--output_dir", "/x", "--train.steps", "0"]) == 2
    assert capsys.readouterr().err == ("raro-fast train: --output_dir is neither a torchrun option nor a training "
                                       "setting; did you mean --train.output_dir?\n")
    assert launch.main(["--nproc_per_node=2", "--frobnicate"]) == 2
    assert "--frobnicate is neither a torchrun option nor a training setting; training settings look like " \
           "--section.field" in capsys.readouterr().err
    # whatever torchrun's parser takes passes: spellings, attached values, abbreviations (refused at first: review)
    for ok in (["--nproc-per-node=2", "--master_port", "29511", "--standalone", "-t", "3"], ["-t3", "-r3"],
               ["--nproc_per", "2"], ["--rdzv-conf", "a=b", "--tee=3", "--nnodes=1:2"]):
        assert launch.unknown_launcher_option(ok) is None, ok
