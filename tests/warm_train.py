"""`python -m raro_fast.train ARGS` as a test runs it, without paying its imports each time.

Importing raro_fast.train (torch, transformers, torch.distributed.checkpoint) takes 7 s of CPU on a two-core
machine; the end-to-end tests start about fifty training processes, so a third of the test command's CPU went to
importing the same modules again. Here each run is a fresh process forked from a server that imported them once
(multiprocessing's forkserver: it imports, and never computes, so no thread pool is forked half-made). The run
itself is the command's: `main(argv)` in its own process, its own stdout and stderr, its exit code. What it does not
run is the module's `__main__` guard, which answers --help and refused settings before those imports; that path is
tested through the real command (tests/test_config.py). Every run forked from one server shares its string-hash seed
(numpy's global random state is drawn afresh, torch's thread count set from OMP_NUM_THREADS, as a new process
would); the runs of two ranks and the killed runs of tests/test_train_e2e.py are real processes.
"""
from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import tempfile

_CONTEXT = None


def _context():
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = multiprocessing.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(["raro_fast.train"])
    return _CONTEXT


def _run_main(argv: list[str], env: dict[str, str], cwd: str, out_path: str, err_path: str) -> None:
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    for fd, path in ((1, out_path), (2, err_path)):
        target = os.open(path, os.O_WRONLY | os.O_TRUNC)
        os.dup2(target, fd)
        os.close(target)
    # the fds above are the process's own now; Python's streams are opened on them again, each write passed
    # through as PYTHONUNBUFFERED asks of the command (a run killed by a signal leaves what it printed last)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(write_through=True)
    import numpy
    import torch

    numpy.random.seed()  # from the OS, as a new process's; Python's own `random` is reseeded on fork
    if env.get("OMP_NUM_THREADS"):  # torch sized its pool when the server imported it, before this environment
        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    if env.get("PYTHONFAULTHANDLER"):
        import faulthandler

        faulthandler.enable()
    if env.get("PYTHONWARNINGS") == "ignore":
        import warnings

        warnings.simplefilter("ignore")
    from raro_fast.train import main

    code = main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(code)


def run_train(argv: list[str], *, env: dict[str, str], timeout: float, cwd=None) -> subprocess.CompletedProcess:
    """What `subprocess.run([python, -m, raro_fast.train, *argv], env=env, cwd=cwd, capture_output=True, text=True)`
    gives."""
    with tempfile.TemporaryDirectory(prefix="warm-train-") as tmp:
        out_path, err_path = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        for path in (out_path, err_path):
            open(path, "w").close()
        process = _context().Process(target=_run_main, args=(list(argv), dict(env), str(cwd or os.getcwd()), out_path,
                                                                 err_path))
        process.start()
        process.join(timeout)
        if process.is_alive():
            process.kill()
            process.join()
            raise subprocess.TimeoutExpired(["raro_fast.train", *argv], timeout)
        with open(out_path) as out, open(err_path) as err:
            return subprocess.CompletedProcess(["raro_fast.train", *argv], process.exitcode, out.read(), err.read())
