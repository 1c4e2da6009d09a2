"""Triton DecoQuant kernels (codec 1: append, fused attend) against kernels/reference.py.

CPU (CI): the launchers run under the Triton interpreter (TRITON_INTERPRET=1, set here when no
GPU is present) on small shapes; the append's in-kernel fp64 Jacobi eigensolver is slow there
(~1 s per block), so the CPU cases keep B * H * flushed blocks small. GPU (`-m gpu`; skipped
without CUDA): the full grid, a long decode across flushes, dispatch through torch.ops.qjl, and
CUDA-graph capture/replay of a decode step.

Codes are compared to the reference up to the sign of each factor direction: eigenvectors are
defined up to sign and the kernel's Jacobi solver and LAPACK pick differently; a flipped
direction negates that direction's code column and Bm row (the same X'). Up to that sign, codes,
scales and Bm must match (a code may differ by one step where fp64 rounding meets a tie).
"""

import pytest
import torch

from kernel_env import CUDA, DEV, INTERP, OUT_TOL, capture_decode, gpu, needs_cuda, needs_kernel  # noqa: E402,F401  (sets TRITON_INTERPRET)

triton = pytest.importorskip("triton")

from qjl_compile.kernels import decoquant as dq  # noqa: E402
from qjl_compile.kernels import ops  # noqa: E402,F401
from qjl_compile.kernels import reference as ref  # noqa: E402
from qjl_compile.kernels.triton.decoquant import decoquant_append_, decoquant_attend  # noqa: E402

CODEC = ref.CODECS[1]


def make(B, H, D, L, R, bits, block=None, dtype=torch.float16, side=torch.float16, dev=DEV):
    meta = [1, R, L, bits, block or R]
    st = ref.make_state(CODEC, B, H, L, D, R, [], meta[3:], dtype, side, dev)
    return st, [], meta


def rel(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def kv(B, H, T, D, gen, dtype, outlier=True):
    """Random keys/values; keys get two large channels (what DecoQuant's Bm absorbs)."""
    k = torch.randn(B, H, T, D, generator=gen)
    if outlier:
        k[..., 1] *= 12
        k[..., D // 2 + 3] *= -6
    return k.to(DEV, dtype), torch.randn(B, H, T, D, generator=gen).to(DEV, dtype)


def aligned_buffers(st_t, st_r, meta, c):
    """For keys and values: (kernel signed codes, reference signed codes, kernel scale, reference
    scale, kernel Bm, reference Bm) over the first c positions, with each of the kernel's factor
    directions sign-matched to the reference's."""
    bits, block = meta[3], meta[4]
    out = []
    for i in (3, 6):
        bm_t, bm_r = (s[i + 2][:, :, : c // block].double().cpu() for s in (st_t, st_r))
        sgn = torch.where((bm_t * bm_r).sum(-1) < 0, -1.0, 1.0)                  # (B, H, nb, 16) per row
        ct = dq._codes_blocked(st_t[i][:, :, :c].cpu(), bits, block).double()    # (B, H, nb, blk, DC, 16)
        cr = dq._codes_blocked(st_r[i][:, :, :c].cpu(), bits, block).double()
        out.append((ct * sgn[:, :, :, None, None, :], cr, st_t[i + 1][:, :, :c].double().cpu(),
                    st_r[i + 1][:, :, :c].double().cpu(), bm_t * sgn[..., None], bm_r))
    return out


def check_state(st_t, st_r, meta):
    """Kernel-built state vs reference state (see the module docstring for what may differ)."""
    R, bits, block = meta[1], meta[3], meta[4]
    n = int(st_r[0])
    assert int(st_t[0]) == n
    c = n // R * R
    rest = n - c
    assert torch.equal(st_t[1][:, :, :rest].cpu(), st_r[1][:, :, :rest].cpu())
    assert torch.equal(st_t[2][:, :, :rest].cpu(), st_r[2][:, :, :rest].cpu())
    if not c:
        return
    side_ulp = torch.finfo(st_r[4].dtype).eps
    for name, (ct, cr, sct, scr, bt, br) in zip("KV", aligned_buffers(st_t, st_r, meta, c)):
        diff = (ct - cr).abs()
        assert diff.max() <= 1, f"{name}: a code differs by {diff.max()} steps"
        assert (diff > 0).double().mean() <= 2e-3, f"{name}: {(diff > 0).double().mean():.2e} of codes differ"
        torch.testing.assert_close(sct, scr, rtol=1.01 * side_ulp, atol=0)
        if side_ulp > 1e-6:  # fp32 side values keep last-bit differences of the two eigensolvers
            assert (sct != scr).double().mean() <= 2e-2, f"{name}: scales differ"
        torch.testing.assert_close(bt, br, rtol=1.01 * side_ulp, atol=1e-3 * br.abs().max().item())
        # decoded blocks, each state's own buffers: the sign choice leaves X' = A Bm unchanged
        i = 3 if name == "K" else 6
        xt, xr = (dq.dequantize(*(x.cpu() for x in s[i: i + 3]), bits, block)[:, :, :c] for s in (st_t, st_r))
        assert rel(xt, xr) < 2e-3, f"{name}: decoded blocks differ by {rel(xt, xr):.2e}"


def masks(kind, B, Hq, Tq, L, n, dev, gen):
    if kind is None:
        return None
    pos = torch.arange(L, device=dev)
    qpos = n - Tq + torch.arange(Tq, device=dev)
    causal = pos[None, :] <= qpos[:, None]                                  # (Tq, L)
    keep = torch.rand(B, 1, 1, L, generator=gen).to(dev) > 0.1              # padding-like holes
    bm = causal[None, None] & keep
    if kind == "bool":
        return bm
    bias = torch.randn(B, Hq, 1, L, generator=gen).to(dev) * 0.5
    return torch.where(bm, bias, float("-inf")).float()


def run_case(B, H, G, D, L, R, bits, dtype, steps, mask_kind, causal, block=None, side=torch.float16,
             seed=0, tq=None, kw=None):
    """Append `steps` tokens by both paths; after each step check the state and the attention.

    tq: query tokens per step (default: the step's T, as a prefill chunk / decode step would).
    """
    kw = kw or {}
    gen = torch.Generator().manual_seed(seed)
    st_r, consts, meta = make(B, H, D, L, R, bits, block, dtype, side)
    st_t = [x.clone() for x in st_r]
    n = 0
    for T in steps:
        k, v = kv(B, H, T, D, gen, dtype)
        ref.append_(st_r, consts, k, v, meta)
        decoquant_append_(st_t, consts, k, v, meta)
        n += T
        check_state(st_t, st_r, meta)
        Tq = tq or T
        q = (torch.randn(B, H * G, Tq, D, generator=gen) * 0.5).to(DEV, dtype)
        am = masks(mask_kind, B, H * G, Tq, L, n, DEV, gen)
        scale = 0.1 if mask_kind == "float" else None
        want = ref.attend(q, st_r, consts, k, v, am, causal, scale, meta)
        got = decoquant_attend(q, st_r, consts, k, v, am, causal, scale, meta, **kw)  # same state: kernel only
        assert got.dtype == q.dtype and got.shape == q.shape
        assert torch.isfinite(got).all()
        e = rel(got, want)
        assert e < OUT_TOL[dtype], f"attend rel err {e:.2e} at n={n}, T={T}"
        # end to end on the kernel-built state
        got2 = decoquant_attend(q, st_t, consts, k, v, am, causal, scale, meta, **kw)
        e2 = rel(got2, ref.attend(q, st_t, consts, k, v, am, causal, scale, meta))
        assert e2 < OUT_TOL[dtype], f"attend (kernel state) rel err {e2:.2e} at n={n}, T={T}"
    return st_t, st_r, meta


# ---- CPU (interpreter) grid: small shapes, every path once -----------------------------------
SMALL = [
    # B, H, G, D,  L,   R,  bits, dtype,          steps,            mask,    causal, block, tq
    (1, 1, 2, 64, 100, 32, 4, torch.float16, [31, 1, 1, 33], None, True, None, None),
    (2, 1, 4, 32, 96, 32, 3, torch.bfloat16, [5, 30, 1], "bool", False, None, None),
    (1, 1, 1, 32, 80, 32, 2, torch.float32, [40, 1], "float", False, 16, None),
    (1, 1, 3, 48, 70, 32, 8, torch.float16, [33, 2], None, True, None, 3),
    (1, 1, 4, 128, 40, 32, 4, torch.float16, [32, 1], None, False, None, None),
]


@needs_kernel
@pytest.mark.parametrize("case", SMALL, ids=lambda c: f"B{c[0]}G{c[2]}D{c[3]}b{c[6]}-{str(c[7])[6:]}-{c[9]}"
                         f"{'-causal' if c[10] else ''}{'-blk' + str(c[11]) if c[11] else ''}")
def test_small(case):
    B, H, G, D, L, R, bits, dtype, steps, mk, causal, block, tq = case
    run_case(B, H, G, D, L, R, bits, dtype, steps, mk, causal, block=block, tq=tq)


def _ref_state(B, H, D, L, R, bits, n, dtype, seed=0, block=None, side=torch.float16):
    """A reference-built state after a prompt of n - 1 tokens and one decode token (cheap on CPU:
    the attend kernel is what is tested)."""
    gen = torch.Generator().manual_seed(seed)
    st, consts, meta = make(B, H, D, L, R, bits, block, dtype, side)
    k, v = kv(B, H, n - 1, D, gen, dtype)
    ref.append_(st, consts, k, v, meta)
    k, v = kv(B, H, 1, D, gen, dtype)
    ref.append_(st, consts, k, v, meta)
    return st, consts, meta, k, v, gen


@needs_kernel
@pytest.mark.parametrize("n", [31, 32, 33, 63, 64, 65, 97])
@pytest.mark.parametrize("kw", [dict(), dict(nsplit=1), dict(nsplit=3)], ids=["auto", "ns1", "ns3"])
def test_attend_lengths_and_splits(n, kw):
    """Attend over reference-built states at and around the block boundaries, one or many splits."""
    B, H, G, D, L, R = 1, 2, 4, 32, 128, 32
    st, consts, meta, k, v, gen = _ref_state(B, H, D, L, R, 4, n, torch.float16, seed=n)
    q = torch.randn(B, H * G, 1, D, generator=gen).to(DEV, torch.float16)
    want = ref.attend(q, st, consts, k, v, None, True, None, meta)
    got = decoquant_attend(q, st, consts, k, v, None, True, None, meta, **kw)
    assert rel(got, want) < OUT_TOL[torch.float16]


@needs_kernel
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("G,tq", [(1, 5), (8, 1), (4, 16)])
def test_attend_bits_rows(bits, G, tq):
    """Every code width; GQA groups and query rows up to 64 per kv head (one and two row blocks)."""
    B, H, D, L, R = 2, 1, 64, 96, 32
    st, consts, meta, k, v, gen = _ref_state(B, H, D, L, R, bits, 70, torch.float32, seed=bits, block=16)
    q = torch.randn(B, H * G, tq, D, generator=gen).to(DEV, torch.float32)
    am = masks("bool", B, H * G, tq, L, 70, DEV, gen)
    for mask, causal in ((None, True), (am, False), (None, False)):
        want = ref.attend(q, st, consts, k, v, mask, causal, None, meta)
        got = decoquant_attend(q, st, consts, k, v, mask, causal, None, meta)
        assert rel(got, want) < OUT_TOL[torch.float32], (mask is not None, causal)


@needs_kernel
@pytest.mark.parametrize("kind", ["zero", "rank1"])
def test_degenerate_blocks(kind):
    """All-zero and rank-1 blocks: dropped directions give zero A columns / Bm rows, as the reference."""
    B, H, D, L, R = 1, 1, 32, 64, 32
    st_r, consts, meta = make(B, H, D, L, R, 4)
    st_t = [x.clone() for x in st_r]
    if kind == "zero":
        k = torch.zeros(B, H, 33, D)
    else:
        # X' (tokens * D/16, 16) of rank 1: k[t, 16c + j] = a_t beta_c w_j, small integers (exact in fp16)
        g = torch.Generator().manual_seed(1)
        a, beta, w = (torch.randint(-3, 4, (s,), generator=g).float() for s in (33, D // 16, 16))
        k = (a[:, None] * (beta.repeat_interleave(16) * w.repeat(D // 16))[None, :]).expand(B, H, 33, D)
    k, v = k.to(DEV, torch.float16), k.flip(-1).to(DEV, torch.float16)
    ref.append_(st_r, consts, k, v, meta)
    decoquant_append_(st_t, consts, k, v, meta)
    check_state(st_t, st_r, meta)
    if kind == "zero":
        assert (st_t[5] == 0).all() and (st_t[4] == 0).all()
    else:
        assert (st_t[5][0, 0, 0, 1:].float().abs() == 0).all()                  # one direction kept
    q = torch.randn(B, 2, 1, D).to(DEV, torch.float16)
    assert rel(decoquant_attend(q, st_t, consts, k[:, :, -1:], v[:, :, -1:], None, True, None, meta),
               ref.attend(q, st_r, consts, k[:, :, -1:], v[:, :, -1:], None, True, None, meta)) < 5e-3


@needs_kernel
def test_fully_masked_rows_are_zero():
    st, consts, meta, k, v, gen = _ref_state(1, 1, 32, 100, 32, 4, 40, torch.float16)
    q = torch.randn(1, 2, 1, 32, generator=gen).to(DEV, torch.float16)
    am = torch.zeros(1, 2, 1, 100, dtype=torch.bool, device=DEV)
    am[:, 0, :, :10] = True
    want = ref.attend(q, st, consts, k, v, am, False, None, meta)
    got = decoquant_attend(q, st, consts, k, v, am, False, None, meta)
    assert (got[:, 1] == 0).all()
    assert rel(got, want) < 5e-3


def test_launcher_errors():
    dev = DEV if (CUDA or INTERP) else "cpu"
    st, consts, meta = make(1, 2, 32, 64, 32, 4, dev=dev)
    k = torch.randn(1, 2, 3, 32, dtype=torch.float16, device=dev)
    if CUDA or INTERP:
        with pytest.raises(ValueError, match="q must be"):
            decoquant_attend(torch.randn(1, 3, 1, 32, dtype=torch.float16, device=dev), st, consts, k, k, None,
                             True, None, meta)
    with pytest.raises(ValueError, match="dtype"):
        decoquant_append_(st, consts, k.float(), k.float(), meta)
    with pytest.raises(ValueError, match=r"\(B=1, H=2"):
        decoquant_append_(st, consts, k[:, :1], k[:, :1], meta)
    with pytest.raises(NotImplementedError, match="codec"):
        decoquant_append_(st, consts, k, k, [0] + meta[1:])
    with pytest.raises(ValueError, match="block"):
        decoquant_append_(st, consts, k, k, meta[:4] + [24])
    with pytest.raises(ValueError, match="state"):
        decoquant_append_(st[:8], consts, k, k, meta)
    assert int(st[0]) == 0                                              # nothing written before raising
    if not INTERP:
        st, consts, meta = make(1, 2, 32, 64, 32, 4, dev="cpu")
        k = torch.randn(1, 2, 3, 32, dtype=torch.float16)
        with pytest.raises(ValueError, match="CUDA"):
            decoquant_append_(st, consts, k, k, meta)


# ---- GPU: full grid --------------------------------------------------------------------------
FULL_STEPS = [[1, 126, 1, 1, 31, 33, 1], [128, 1, 3, 124, 1], [200, 57, 1, 31, 32, 1], [300, 5, 1]]
BITS = [2, 3, 4, 8]


@gpu
@needs_cuda
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("G", [1, 4, 8])
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_full_grid(D, G, B, dtype):
    """One run per point; bits, steps and the mask kind rotate over the grid so each meets all."""
    i = [64, 128].index(D) + 2 * [1, 4, 8].index(G) + 6 * [1, 3].index(B)
    j = i + [torch.float16, torch.bfloat16, torch.float32].index(dtype)
    mk, causal = [(None, True), ("bool", False), ("float", False)][j % 3]
    run_case(B, 2, G, D, 800, 128, BITS[j % 4], dtype, FULL_STEPS[i % 4], mk, causal, seed=j)


@gpu
@needs_cuda
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("D", [64, 128])
def test_full_bits(bits, D):
    run_case(2, 2, 4, D, 600, 128, bits, torch.bfloat16, [129, 1, 255, 2], "bool", False, seed=bits)
    run_case(1, 2, 8, D, 600, 128, bits, torch.float16, [100, 60, 8], None, True, block=32, tq=8)  # 64 rows


@gpu
@needs_cuda
def test_side_dtypes():
    run_case(1, 2, 4, 128, 400, 128, 4, torch.bfloat16, [130, 1, 127, 1], None, True, side=torch.bfloat16)
    run_case(1, 2, 4, 128, 400, 128, 4, torch.float32, [130, 1, 127, 1], None, True, side=torch.float32)


@gpu
@needs_cuda
@pytest.mark.parametrize("n", [4095, 4096, 4097])
def test_long_prompt(n):
    """Many blocks in one flush and many splits: a prompt near L, then a decode step."""
    run_case(1, 8, 4, 128, 4224, 128, 4, torch.bfloat16, [n - 1, 1], None, True)


@gpu
@needs_cuda
def test_long_decode_across_flushes():
    """A short prompt, then 400 one-token decode steps (three flushes), states and outputs checked."""
    run_case(2, 2, 4, 128, 1024, 128, 4, torch.bfloat16, [100] + [1] * 400, None, True)


@gpu
@needs_cuda
def test_dispatch_through_ops():
    from qjl_compile.kernels import triton as kt
    assert kt.has_kernels(1) and kt._kernel(1, 0) is decoquant_append_ and kt._kernel(1, 1) is decoquant_attend
    st, consts, meta = make(2, 2, 128, 512, 128, 4, dtype=torch.bfloat16)
    st_r = [x.clone() for x in st]
    gen = torch.Generator().manual_seed(5)
    k, v = kv(2, 2, 300, 128, gen, torch.bfloat16)
    torch.ops.qjl.append(st, consts, k, v, meta)
    ref.append_(st_r, consts, k, v, meta)
    check_state(st, st_r, meta)
    for Tq, G in ((16, 4), (300, 4)):                 # fused kernel (64 rows), SDPA path (1200 rows)
        q = torch.randn(2, 2 * G, Tq, 128, device="cuda", dtype=torch.bfloat16)
        kn, vn = k[:, :, -Tq:], v[:, :, -Tq:]
        got = torch.ops.qjl.attend(q, st, consts, kn, vn, None, True, None, meta)
        want = ref.attend(q, st, consts, kn, vn, None, True, None, meta)
        assert rel(got, want) < 2 * OUT_TOL[torch.bfloat16], Tq


@gpu
@needs_cuda
def test_cuda_graph_decode_step():
    """append + attend captured once, replayed for 100 decode steps (crossing a flush at 256)."""
    B, H, G, D, L, R = 2, 2, 4, 128, 1024, 128
    st, consts, meta = make(B, H, D, L, R, 4, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(7)
    k0, v0 = kv(B, H, 200, D, gen, torch.bfloat16)
    decoquant_append_(st, consts, k0, v0, meta)
    st_r = [x.clone() for x in st]
    kk = torch.zeros(B, H, 1, D, device="cuda", dtype=torch.bfloat16)
    vv = torch.zeros(B, H, 1, D, device="cuda", dtype=torch.bfloat16)
    qq = torch.zeros(B, H * G, 1, D, device="cuda", dtype=torch.bfloat16)
    g, out = capture_decode(decoquant_append_, decoquant_attend, st, consts, kk, vv, qq, meta)
    for step in range(100):
        k, v = kv(B, H, 1, D, gen, torch.bfloat16)
        q = torch.randn(B, H * G, 1, D, generator=gen).to("cuda", torch.bfloat16)
        kk.copy_(k), vv.copy_(v), qq.copy_(q)
        g.replay()
        ref.append_(st_r, consts, k, v, meta)
        want = ref.attend(q, st_r, consts, k, v, None, True, None, meta)
        assert int(st[0]) == int(st_r[0]) == 201 + step
        assert rel(out, want) < 2 * OUT_TOL[torch.bfloat16], step
    check_state(st, st_r, meta)
