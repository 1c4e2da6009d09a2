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


def capture_decode(append, attend, st, consts, kk, vv, qq, meta):
    """Capture one decode step (append, then attend) of a codec's kernels in a CUDA graph.

    Warm-up runs on a side stream (it compiles the kernels) and its append is undone, so the
    state is as given when the graph is captured. Returns (graph, output tensor of the graph).
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    snap = [x.clone() for x in st]
    with torch.cuda.stream(side):
        append(st, consts, kk, vv, meta)
        attend(qq, st, consts, kk, vv, None, True, None, meta)
    torch.cuda.current_stream().wait_stream(side)
    for x, y in zip(st, snap):
        x.copy_(y)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        append(st, consts, kk, vv, meta)
        out = attend(qq, st, consts, kk, vv, None, True, None, meta)
    return g, out


def assert_pdl_same_bits(attend, st, consts, meta, gen, B, H, G, D):
    """One decode step through `attend` with programmatic dependent launch on (three times) and off:
    PDL only moves when the split and the combine may start, so every output bit must agree."""
    kn = torch.randn(B, H, 1, D, generator=gen, device="cuda").to(torch.bfloat16)
    from qjl_compile.kernels import reference as ref
    ref.append_(st, consts, kn, kn, meta)
    q = torch.randn(B, H * G, 1, D, generator=gen, device="cuda").to(torch.bfloat16)
    off = attend(q, st, consts, kn, kn, None, True, None, meta, pdl=False)
    for _ in range(3):
        assert torch.equal(attend(q, st, consts, kn, kn, None, True, None, meta, pdl=True), off)


def decode_mask(mask, B, Hq, Tq, L, n, gen, dtype):
    """(attn_mask, is_causal) of a decode test: "none" (causal), or a random HF-style mask over the n
    valid positions with the newest always visible: "bool_pos" / "float_pos" per position (B, 1, 1, L),
    "bool_row" per query row as well (B, Hq, Tq, L); float masks additive in `dtype`."""
    if mask == "none":
        return None, True
    keep = (torch.arange(L, device="cuda") < n) & (torch.rand(B, 1, 1, L, generator=gen, device="cuda") > 0.1)
    if mask == "bool_row":
        keep = keep & (torch.rand(B, Hq, Tq, L, generator=gen, device="cuda") > 0.2)
    keep[..., n - 1] = True
    return (keep if mask.startswith("bool") else torch.where(keep, 0.0, float("-inf")).to(dtype)), False
