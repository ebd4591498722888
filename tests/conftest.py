"""Test-session set-up shared by every folder of tests.

Triton reads TRITON_INTERPRET when its kernels are decorated (the first import of raro_kernels' Triton module),
and any test module may trigger that first; so the CPU interpreter is switched on here, before any test module is
imported. CPU tensors still take the PyTorch path unless a kernel test forces backend="triton".
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
