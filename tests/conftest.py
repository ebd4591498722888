"""Test-session set-up shared by every folder of tests.

Triton reads TRITON_INTERPRET when its kernels are decorated (the first import of raro_kernels' Triton module),
and any test module may trigger that first; so the CPU interpreter is switched on here, before any test module is
imported. CPU tensors still take the PyTorch path unless a kernel test forces backend="triton".
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="module")
def saved_embedded_model(tmp_path_factory):
    """A tiny embedded model saved as a Hugging Face directory (random weights: for loading, not for answers)."""
    from raro_fast.model.hf import build_embedded_model, load_project_tokenizer, save_pretrained_atomic

    tok = load_project_tokenizer()
    model = build_embedded_model(tok, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64,
                                 max_position=64, seed=0)
    path = tmp_path_factory.mktemp("m") / "model"
    save_pretrained_atomic(model, tok, path)
    return path
