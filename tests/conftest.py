"""Test-session set-up shared by every folder of tests.

Triton reads TRITON_INTERPRET when its kernels are decorated (the first import of raro_kernels' Triton module),
and any test module may trigger that first; so the CPU interpreter is switched on here, before any test module is
imported. CPU tensors still take the PyTorch path unless a kernel test forces backend="triton".

The test command runs one pytest worker per core (`pytest -n auto`): each worker computes on its share of the
cores, and a test that opens a process group takes a `free_port` (or torchrun's `--standalone`), never a fixed one.
"""
import os
import socket

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under `pytest -n N` the workers share the cores: N workers at torch's default of one thread per core each would
# oversubscribe them (OpenMP threads then spin against each other).
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _workers))

import pytest  # noqa: E402


@pytest.fixture(scope="module")
def saved_embedded_model(tmp_path_factory):
    """A tiny embedded model saved as a Hugging Face directory (random weights: for loading, not for answers)."""
    from raro_fast.model.hf import build_embedded_model, load_project_tokenizer, save_pretrained_atomic

    tok = load_project_tokenizer()
    # positions for a policy prompt (70 tokens) and its completion: the engines refuse to sample past them
    model = build_embedded_model(tok, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64,
                                 max_position=256, seed=0)
    path = tmp_path_factory.mktemp("m") / "model"
    save_pretrained_atomic(model, tok, path)
    return path


@pytest.fixture
def free_port() -> int:
    """A TCP port nothing listens on: tests that open a process group each get their own, so tests running side by
    side (`pytest -n`) never meet on one."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def disk_events(monkeypatch) -> list[tuple[str, ...]]:
    """What reaches the disk, in order, from the moment the fixture is used: ("fsync", path), ("replace", src, dst)
    and ("rmtree", path), real paths; each call still does its work. For tests of what a power cut could leave."""
    import os
    import shutil

    events: list[tuple[str, ...]] = []
    real_fsync, real_replace, real_rmtree = os.fsync, os.replace, shutil.rmtree

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.path.realpath(src), os.path.realpath(dst)))
        real_replace(src, dst)

    def rmtree(path, **kwargs):
        events.append(("rmtree", os.path.realpath(path)))
        real_rmtree(path, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    return events
