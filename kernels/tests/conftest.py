"""Kernel tests run every Triton kernel: on CUDA when present, else on CPU through Triton's interpreter.

TRITON_INTERPRET must be in the environment before the Triton kernels are decorated, which happens when
`raro_kernels._triton_lm_head` is first imported (lazily, on the first Triton call), so it is set here, at
collection time, before any test runs. CPU tensors keep using the PyTorch path unless a test forces
backend="triton", so tests elsewhere that import raro_kernels first are unaffected.
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import raro_kernels._common as kernels_common  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def _poison_allocations(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every buffer the ops allocate starts as NaN, so an element a kernel fails to write shows up."""
    monkeypatch.setattr(kernels_common, "POISON_ALLOCATIONS", True)


@pytest.fixture
def device() -> torch.device:
    return DEVICE


def _triton_available() -> bool:
    return kernels_common.HAVE_TRITON and (DEVICE.type == "cuda" or kernels_common.triton_interpret())


if os.environ.get("RARO_KERNELS_REQUIRE_TRITON") == "1" and not _triton_available():
    # CI sets this: there, a Triton path that cannot run is a broken install, not a reason to skip half the tests.
    raise pytest.UsageError("RARO_KERNELS_REQUIRE_TRITON=1 but the Triton kernels cannot run here: "
                            f"{kernels_common.TRITON_IMPORT_ERROR or 'no CUDA and TRITON_INTERPRET is not 1'}")
_needs_triton = pytest.mark.skipif(not _triton_available(), reason="triton unavailable (no CUDA, no interpreter)")


@pytest.fixture(params=["torch", pytest.param("triton", marks=_needs_triton),
                        pytest.param("triton-fused-gemm", marks=_needs_triton)])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The `backend=` argument to pass: the PyTorch path, the Triton path (cuBLAS logits + Triton row kernels),
    and the Triton path with the logits products fused into Triton kernels too."""
    if request.param == "triton-fused-gemm":
        import raro_kernels._triton_lm_head as triton_lm_head

        monkeypatch.setattr(triton_lm_head, "LOGITS_GEMM", "triton")
        return "triton"
    return request.param
