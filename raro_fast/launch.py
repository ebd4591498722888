"""`raro-fast train [torchrun options] [training options]`: training through torchrun's own launcher, in-process.

    raro-fast train --nproc_per_node=2 --config configs/countdown-easy.yaml --train.steps 40

Options without a dot (`--nproc_per_node`, `--nnodes`, `--master_port`, `--standalone`, ...) go to torchrun; the
training's own (`--config`, `--section.field` and its aliases `--model`, `--resume`, `--output-dir`) go to
`raro_fast.train`. With no torchrun option the training runs in this process, as `python -m raro_fast.train` does.

Why not torchrun itself: when a rank stops with a clear error (a bad setting, a damaged checkpoint), torchrun
follows it with ~30 lines of ChildFailedError that repeat nothing useful. Here that becomes one line naming the
rank and its exit code; the rank's own message is already above it.
"""
from __future__ import annotations

import sys

from raro_fast.config import ALIASES, parse_command_line

PROG = "raro-fast train [torchrun options]"

# The training's options without a dot: its aliases among them (`--output-dir` went to torchrun, which refused it).
TRAINING_FLAGS = {"--config", "-h", "--help", *ALIASES}


def split_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """(torchrun's options, the training's options). A value follows its option into the same list."""
    launcher, training, target = [], [], None
    for arg in argv:
        # An option: "--name" or a dash and a letter ("-h"; torchrun's "-r" and "-t", which followed the option
        # before them into the training's list); "-1" or "-.5" is a value (a negative number)
        if arg.startswith("--") or (len(arg) > 1 and arg[0] == "-" and arg[1].isalpha()):
            name = arg.split("=", 1)[0]
            target = training if "." in name or name in TRAINING_FLAGS else launcher
        (target if target is not None else training).append(arg)
    return launcher, training


def unknown_launcher_option(launcher: list[str]) -> str | None:
    """What is wrong with the first of `launcher` that torchrun's parser does not take, or None. A training setting
    typed without its section (`--output_dir`) went to torchrun, whose 19-line usage named no training key (review).
    torchrun's own parser decides (`-t3`, `--nproc_per 2` are its); where it fails otherwise, torchrun says why."""
    import contextlib
    import io

    from torch.distributed.run import get_args_parser

    from raro_fast.config import iter_fields

    try:
        with contextlib.redirect_stderr(io.StringIO()):
            _, unknown = get_args_parser().parse_known_args([*launcher, "raro_fast.train"])
    except SystemExit:
        return None
    name = next((u.split("=", 1)[0] for u in unknown if u.startswith("-")), None)
    if name is None:
        return None
    leaf = name.lstrip("-").replace("-", "_")
    near = [dotted for dotted, *_ in iter_fields() if dotted.rsplit(".", 1)[-1] == leaf]
    hint = f"did you mean {' or '.join('--' + n for n in near)}?" if near else (
        "training settings look like --section.field, torchrun's are listed by `torchrun --help`")
    return f"{name} is neither a torchrun option nor a training setting; {hint}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    launcher, training = split_args(argv)
    # --help and a refused setting: answered here, once, before torch is imported or a rank is started
    if isinstance(cfg := parse_command_line(training, PROG), int):
        return cfg
    if not launcher:
        from raro_fast import train

        return train.train_from_config(cfg)
    if (wrong := unknown_launcher_option(launcher)) is not None:
        print(f"raro-fast train: {wrong}", file=sys.stderr)
        return 2
    import logging

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    # Its "failed (exitcode: N) local_rank: R" line says what the one line below says.
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)

    try:
        run(parse_args([*launcher, "-m", "raro_fast.train", *training]))
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        print(f"raro-fast train: rank {rank} stopped with exit code {failure.exitcode} (its message is above)",
              file=sys.stderr)
        return failure.exitcode if failure.exitcode > 0 else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
