"""Where the Triton kernel tests run, shared by tests/kernels/test_triton_*.py.

Imported before triton: without a GPU it sets TRITON_INTERPRET=1, so the launchers run in the
Triton interpreter on CPU (CI); with CUDA the same tests run the compiled kernels.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

INTERP = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA and not INTERP else "cpu"
needs_kernel = pytest.mark.skipif(not (CUDA or INTERP), reason="needs CUDA or TRITON_INTERPRET=1")
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA or INTERP, reason="needs CUDA (not the interpreter)")
OUT_TOL = {torch.float16: 5e-3, torch.bfloat16: 2e-2, torch.float32: 5e-3}  # ||out - ref|| / ||ref||
