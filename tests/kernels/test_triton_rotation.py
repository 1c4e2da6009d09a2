"""Triton rotation-codec kernels (codec 2: append, fused attend) against kernels/reference.py.

CPU (CI): the launchers run under the Triton interpreter (TRITON_INTERPRET=1, set here when no
GPU is present) on small shapes. GPU (`-m gpu` runs them; skipped without CUDA): the full grid,
long decodes across many flushes and splits, dispatch through torch.ops.qjl, and CUDA-graph
capture/replay of a decode step.
"""
import zlib

import pytest
import torch

from kernel_env import CUDA, DEV, INTERP, OUT_TOL, capture_decode, gpu, needs_cuda, needs_kernel  # noqa: E402,F401  (sets TRITON_INTERPRET)

triton = pytest.importorskip("triton")

from qjl_compile.kernels import ops  # noqa: E402,F401
from qjl_compile.kernels import reference as ref  # noqa: E402
from qjl_compile.kernels import rotation as rot  # noqa: E402
from qjl_compile.kernels.triton.rotation import rotation_append_, rotation_attend  # noqa: E402

CODEC = ref.CODECS[2]


def make(B, H, D, L, R, params, dtype=torch.float16, side=torch.float16, dev=DEV, seed=0):
    """params = [key_bits, value_bits, unbiased, scale_mode, sink, center] (block = R appended)."""
    params = [*params, R]
    consts = [c.to(dev) for c in rot.make_consts(D, params[0], params[1], params[2], seed, 0)]
    st = ref.make_state(CODEC, B, H, L, D, R, consts, params, dtype, side, dev)
    return st, consts, [2, R, L, *params]


def rel(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def check_state(st_t, st_r, consts, meta):
    """Kernel-built state vs reference state.

    Both rotate in fp32, but in different summation orders (GPU: the kernel's tf32x3 tensor-core
    dot vs cuBLAS), so a rotated coordinate within ~1e-6 of a Lloyd-Max boundary may land on the
    other side: its index moves to the adjacent level. That is legitimate, not a precision bug
    (an fp64 rotation flips such coordinates against either), and it cannot be tolerated away
    on the side values: with scale modes match/lsq the scale depends on the chosen codes,
    a = <Pi x, c> / ||c||^2 (or ||x|| / ||c||), and one flip between levels c_lo, c_hi moves it by
    about |c_hi^2 - c_lo^2| / (2 ||c||^2) relative (0.9% for 2-bit values at D = 128, seen on an
    H100 for rotation-k4v2; ~4% at D = 32), far more than an fp16 rounding step. So:
      - codes: few differ (a fraction bound, per coordinate and per vector), by one level only;
      - code-dependent side values (kscale, kres, vscale) and the decompressed cache are compared to
        fp16-side precision on the vectors whose codes agree; on a vector with a flip the scale
        must stay within that flip bound (x1.25 margin: a/||x|| varies a few %), the residual norm
        within the scale change times ||c||;
      - side values that do not depend on codes (means, sinks) everywhere to fp16 precision.
    """
    R, params = meta[1], meta[3:]
    n = int(st_r[0])
    assert int(st_t[0]) == n
    c = n // R * R
    rest = n - c
    assert torch.equal(st_t[1][:, :, :rest].cpu(), st_r[1][:, :, :rest].cpu())
    assert torch.equal(st_t[2][:, :, :rest].cpu(), st_r[2][:, :, :rest].cpu())
    if not c:
        return
    D = st_r[1].shape[-1]
    sm = params[3]
    specs = CODEC.specs(D, consts, params)
    cpu = [x.cpu() for x in consts]
    t = [x[:, :, : c // s.per].cpu() for x, s in zip(st_t[3:], specs)]
    r = [x[:, :, : c // s.per].cpu() for x, s in zip(st_r[3:], specs)]
    tol = dict(rtol=4e-3, atol=2e-3)
    flip, bound, bsum = {}, {}, {}                        # per side "k"/"v": (B, H, c) masks, scale bounds
    for s, a, b in zip(specs, t, r):
        if s.name in ("kidx", "vidx"):
            side = s.name[0]
            bits = params[0] - params[2] if side == "k" else params[1]
            cb = cpu[1] if side == "k" else cpu[2]
            ua = rot.code_indices(a, bits, params, side == "v").long()
            ub = rot.code_indices(b, bits, params, side == "v").long()
            diff = ua != ub
            frac = diff.float().mean().item()
            assert frac < 2e-3, f"{s.name}: {frac:.1e} of the codes differ"
            assert (ua - ub).abs().max() <= 1, f"{s.name}: a code moved by more than one level (not a boundary flip)"
            flip[side] = diff.any(-1)
            vfrac = flip[side].float().mean().item()
            assert vfrac < 1e-2, f"{s.name}: {vfrac:.1e} of the vectors have a differing code"
            ca2, cb2 = cb[ua] ** 2, cb[ub] ** 2
            shift = ((ca2 - cb2).abs() / 2).sum(-1)
            bound[side] = 1.25 * shift / torch.minimum(ca2.sum(-1), cb2.sum(-1)) if sm else torch.zeros_like(shift)
            bsum[side] = ((cb[ua] + cb[ub]).abs() / 2 * diff).sum(-1)          # sum of |boundary| flipped across
        elif s.name == "kqjl":
            frac = (ref.unpack_bits(a) != ref.unpack_bits(b)).float().mean().item()
            assert frac < 1e-2, f"kqjl: {frac:.1e} of the sketch bits differ"
    sv = {s.name: (a.float(), b.float()) for s, a, b in zip(specs, t, r)}
    for s, a, b in zip(specs, t, r):
        a, b = a.float(), b.float()
        if s.name in ("kscale", "vscale"):
            f = flip[s.name[0]]
            torch.testing.assert_close(a[~f], b[~f], **tol, msg=s.name)
            lim = bound[s.name[0]][f] * b[f].abs() + tol["atol"] + tol["rtol"] * b[f].abs()
            assert ((a[f] - b[f]).abs() <= lim).all(), f"{s.name}: beyond the boundary-flip bound on a flipped vector"
        elif s.name == "kres":
            f = flip["k"]
            torch.testing.assert_close(a[~f], b[~f], **tol, msg=s.name)
            ua = rot.cb_rows(t[0], cpu[1], params)             # kidx is the first buffer
            da = (sv["kscale"][0] - sv["kscale"][1]).abs()
            # ||r|| moves by the scale change along c, plus |r_i| on the flipped coordinate: equal on both
            # sides of boundary b_i when a = ||x|| / sqrt(D), off by 2 |b_i| |a - ||x||/sqrt(D)| <= 0.5 |b_i| |a|
            ak = sv["kscale"][1][f].abs()
            lim = 1.25 * da[f] * ua[f].norm(dim=-1) + 0.5 * ak * bsum["k"][f] + tol["atol"] + tol["rtol"] * b[f].abs()
            assert ((a[f] - b[f]).abs() <= lim).all(), "kres: beyond the boundary-flip bound on a flipped vector"
        elif s.name not in ("kidx", "vidx", "kqjl"):           # means, sinks: code-independent
            torch.testing.assert_close(a, b, **tol, msg=s.name)
    kt, vt = CODEC.decompress(t, cpu, params)
    kr, vr = CODEC.decompress(r, cpu, params)
    assert rel(kt[~flip["k"]], kr[~flip["k"]]) < 2e-3 and rel(vt[~flip["v"]], vr[~flip["v"]]) < 2e-3


def test_check_state_boundary_flip():
    """check_state itself (no kernel): it accepts a legitimate boundary flip, one value code moved to
    the adjacent level across a nonzero boundary with its lsq scale recomputed (what the H100 run of
    rotation-k4v2 produced: vscale off by ~1%), and still rejects a wrong scale or a code two levels off."""
    D, R = 64, 32
    st, consts, meta = make(1, 2, D, 100, R, PRESETS["rotation-k4v2"], dev="cpu")
    gen = torch.Generator().manual_seed(1)
    k, v = (torch.randn(1, 2, 64, D, generator=gen).half() for _ in range(2))
    ref.append_(st, consts, k, v, meta)
    names = [s.name for s in CODEC.specs(D, consts, meta[3:])]
    iv, isc = 3 + names.index("vidx"), 3 + names.index("vscale")
    Pi, cbv = consts[0], consts[2]
    x = v.float()
    rv = x @ Pi.T
    y = (x.double() @ Pi.double().T) * D ** 0.5 / x.double().norm(dim=-1, keepdim=True)
    bd = rot._bounds(cbv).double()
    dist = (y[..., None] - bd).abs()
    dist[..., bd == 0] = float("inf")                         # a flip at 0 leaves an lsq scale unchanged
    pos = divmod(int(dist.min(-1).values.argmin()), D)
    b, h, tk, d = 0, pos[0] // 64, pos[0] % 64, pos[1]
    idx = rot.dq.unpack(st[iv], 2).long()
    j = int(dist[b, h, tk, d].argmin())                        # the boundary between levels j and j + 1
    flipped = idx.clone()
    flipped[b, h, tk, d] = j if idx[b, h, tk, d] == j + 1 else j + 1
    c = cbv[flipped[b, h, tk]]
    a = (rv[b, h, tk] * c).sum() / c.pow(2).sum()
    st_t = [x.clone() for x in st]
    st_t[iv] = rot.dq.pack(flipped.int(), 2)
    st_t[isc][b, h, tk] = a.half()
    old = st[isc][b, h, tk].float()
    assert (a - old).abs() > 4e-3 * old.abs() + 2e-3          # a plain assert_close of vscale would fail
    check_state(st_t, st, consts, meta)
    bad = [x.clone() for x in st_t]
    bad[isc][b, h, (tk + 1) % 64] *= 1.01                      # an unflipped vector's scale off by 1%
    with pytest.raises(AssertionError):
        check_state(bad, st, consts, meta)
    bad = [x.clone() for x in st_t]
    bad[isc][b, h, tk] = (old + 3 * (a - old)).half()          # the flipped vector's scale beyond the bound
    with pytest.raises(AssertionError):
        check_state(bad, st, consts, meta)
    two = idx.clone()
    two[b, h, tk, d] = 3 if idx[b, h, tk, d] < 2 else 0        # two or three levels away
    bad = [x.clone() for x in st]
    bad[iv] = rot.dq.pack(two.int(), 2)
    with pytest.raises(AssertionError):
        check_state(bad, st, consts, meta)


def masks(kind, B, Hq, Tq, L, n, dev, gen):
    if kind is None:
        return None
    pos = torch.arange(L, device=dev)
    qpos = n - Tq + torch.arange(Tq, device=dev)
    causal = pos[None, :] <= qpos[:, None]                                  # (Tq, L)
    keep = torch.rand(B, 1, 1, L, generator=gen).to(dev) > 0.1              # padding-like holes
    bm = (causal[None, None] & keep)
    if kind == "bool":
        return bm
    bias = torch.randn(B, Hq, 1, L, generator=gen).to(dev) * 0.5
    return torch.where(bm, bias, float("-inf")).float()


def run_case(B, H, G, D, L, R, params, dtype, steps, mask_kind, causal, seed=0, side=torch.float16,
             kw=None, dev=DEV):
    kw = kw or {}
    gen = torch.Generator().manual_seed(seed)
    st_r, consts, meta = make(B, H, D, L, R, params, dtype, side, dev, seed)
    st_t = [x.clone() for x in st_r]
    n = 0
    for T in steps:
        # keys with a shared mean direction (as real models have): centering has work to do
        k = (torch.randn(B, H, T, D, generator=gen) + 2 * torch.randn(D, generator=gen)).to(dev, dtype)
        v = torch.randn(B, H, T, D, generator=gen).to(dev, dtype)
        ref.append_(st_r, consts, k, v, meta)
        rotation_append_(st_t, consts, k, v, meta)
        n += T
        check_state(st_t, st_r, consts, meta)
        q = (torch.randn(B, H * G, T, D, generator=gen) * 0.5).to(dev, dtype)
        am = masks(mask_kind, B, H * G, T, L, n, dev, gen)
        scale = 0.1 if mask_kind == "float" else None
        want = ref.attend(q, st_r, consts, k, v, am, causal, scale, meta)
        got = rotation_attend(q, st_r, consts, k, v, am, causal, scale, meta, **kw)  # same state: kernel only
        assert got.dtype == q.dtype and got.shape == q.shape
        assert torch.isfinite(got).all()
        e = rel(got, want)
        assert e < OUT_TOL[dtype], f"attend rel err {e:.2e} at n={n}, T={T}"
        got2 = rotation_attend(q, st_t, consts, k, v, am, causal, scale, meta, **kw)
        assert rel(got2, ref.attend(q, st_t, consts, k, v, am, causal, scale, meta)) < OUT_TOL[dtype]


# ---- CPU (interpreter) grid: small shapes, every path once -----------------------------------
# params: [key_bits, value_bits, unbiased, scale_mode, sink, center]
SMALL = [
    # B, H, G, D,  L,   R,  params,              dtype,          steps,          mask,    causal
    (1, 2, 1, 64, 170, 32, [4, 3, 0, 2, 4, 1], torch.float16, [31, 1, 1, 33, 2], None, True),
    (3, 1, 4, 32, 140, 32, [3, 2, 1, 2, 0, 3], torch.bfloat16, [5, 59, 1, 3], "bool", False),
    (1, 1, 8, 32, 130, 64, [2, 4, 0, 0, 0, 0], torch.float32, [63, 1, 2], "float", False),
    (1, 2, 4, 64, 100, 32, [4, 1, 1, 1, 3, 2], torch.float16, [33, 1, 30], None, False),
    (1, 1, 2, 32, 100, 32, [1, 2, 0, 2, 40, 0], torch.float16, [70, 3], None, True),
    # value codes in fragment order (center bit 4, the config default at head_dim 64 / 128)
    (1, 2, 1, 64, 170, 32, [4, 3, 0, 2, 4, 5], torch.float16, [31, 1, 1, 33, 2], None, True),
    (2, 1, 4, 64, 140, 64, [3, 4, 0, 1, 0, 4], torch.bfloat16, [65, 1, 2], "bool", False),
]


@needs_kernel
@pytest.mark.parametrize("case", SMALL, ids=lambda c: f"B{c[0]}H{c[1]}G{c[2]}D{c[3]}p{''.join(map(str, c[6]))}-{c[9]}")
def test_small(case):
    B, H, G, D, L, R, params, dtype, steps, mk, causal = case
    run_case(B, H, G, D, L, R, params, dtype, steps, mk, causal)


@needs_kernel
@pytest.mark.parametrize("kw", [dict(bt=16), dict(bt=32, nsplit=1), dict(nsplit=5)], ids=["bt16", "bt32-1split", "5split"])
def test_versions(kw):
    """Tile sizes and split counts (partial tiles, one split, splits in the middle of a block)."""
    run_case(1, 1, 4, 32, 230, 64, [3, 3, 0, 2, 2, 1], torch.float16, [150, 1], None, True, kw=kw)


@needs_kernel
def test_bf16_side_dtype():
    run_case(1, 1, 2, 32, 100, 32, [4, 4, 0, 1, 0, 1], torch.bfloat16, [40, 1], None, True, side=torch.bfloat16)


@needs_kernel
def test_fully_masked_rows_are_zero():
    st, consts, meta = make(1, 1, 32, 100, 32, [4, 3, 0, 2, 0, 0])
    k = torch.randn(1, 1, 40, 32).to(DEV, torch.float16)
    ref.append_(st, consts, k, k, meta)
    q = torch.randn(1, 2, 40, 32).to(DEV, torch.float16)
    am = torch.zeros(1, 2, 40, 100, dtype=torch.bool, device=DEV)
    am[:, 0, :, :10] = True
    want = ref.attend(q, st, consts, k, k, am, False, None, meta)
    got = rotation_attend(q, st, consts, k, k, am, False, None, meta)
    assert (got[:, 1] == 0).all()
    assert rel(got, want) < 5e-3


def test_launcher_errors():
    dev = DEV if (CUDA or INTERP) else "cpu"
    st, consts, meta = make(1, 2, 32, 64, 32, [4, 3, 0, 2, 0, 1], dev=dev)
    k = torch.randn(1, 2, 3, 32, dtype=torch.float16, device=dev)
    if CUDA or INTERP:
        with pytest.raises(ValueError, match="q must be"):
            rotation_attend(torch.randn(1, 3, 1, 32, dtype=torch.float16, device=dev), st, consts, k, k, None, True,
                            None, meta)
    with pytest.raises(ValueError, match="dtype"):
        rotation_append_(st, consts, k.float(), k.float(), meta)
    with pytest.raises(NotImplementedError, match="codec"):
        rotation_append_(st, consts, k, k, [0] + meta[1:])
    bad = meta[:-1] + [16]                                     # centering block 16: not a multiple of 32
    st16 = ref.make_state(CODEC, 1, 2, 64, 32, 32, consts, bad[3:], torch.float16, torch.float16, dev)
    with pytest.raises(ValueError, match="center"):
        rotation_append_(st16, consts, k, k, bad)
    with pytest.raises(ValueError, match="buffer"):
        rotation_append_(st[:3] + [x[:, :, :1] for x in st[3:]], consts, k, k, meta)
    if not INTERP:
        st, consts, meta = make(1, 2, 32, 64, 32, [4, 3, 0, 2, 0, 0], dev="cpu")
        k = torch.randn(1, 2, 3, 32, dtype=torch.float16)
        with pytest.raises(ValueError, match="CUDA"):
            rotation_append_(st, consts, k, k, meta)


# ---- GPU: full grid --------------------------------------------------------------------------
FULL_STEPS = [[1, 126, 1, 1, 31, 33, 1], [128, 1, 3, 124, 1], [200, 57, 1, 31, 32, 1], [300, 5, 1]]
PRESETS = {  # the config presets' codec params (cache: block = R, center bit 4: value codes in fragment
             # order, the default for 3- and 4-bit values), plus every option on / off
    "rotation4": [4, 4, 0, 2, 0, 5], "rotation-k4v3": [4, 3, 0, 2, 4, 5], "rotation-k4v2": [4, 2, 0, 2, 4, 1],
    "rotation-k4v3-match": [4, 3, 0, 1, 4, 5], "k4v3-rows": [4, 3, 0, 2, 4, 1], "k3v3-plain": [3, 3, 0, 2, 0, 0],
    "k3v2-unbiased-kv": [3, 2, 1, 2, 4, 3], "k2v4-norm": [2, 4, 0, 0, 0, 6], "k4v4-match-unbiased": [4, 4, 1, 1, 0, 4],
}


@gpu
@needs_cuda
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("G", [1, 4, 8])
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_full_grid(D, G, B, dtype):
    i = zlib.crc32(repr((D, G, B, str(dtype))).encode()) % 4   # stable across runs (str hash is salted)
    names = list(PRESETS)
    for j, (steps, mk, causal) in enumerate([(FULL_STEPS[i], None, True), (FULL_STEPS[(i + 1) % 4], "bool", False),
                                             (FULL_STEPS[(i + 2) % 4], "float", False)]):
        run_case(B, 2, G, D, 800, 128, PRESETS[names[(i + j) % len(names)]], dtype, steps, mk, causal, seed=i)


@gpu
@needs_cuda
@pytest.mark.parametrize("name", list(PRESETS))
def test_full_options(name):
    run_case(2, 2, 4, 128, 600, 128, PRESETS[name], torch.bfloat16, [129, 1, 255, 2], None, True)


@gpu
@needs_cuda
@pytest.mark.parametrize("kw", [dict(bt=16), dict(bt=32), dict(bt=64, num_warps=8), dict(bt=128, num_warps=8),
                                dict(nsplit=1)], ids=["bt16", "bt32", "bt64w8", "bt128w8", "1split"])
def test_gpu_versions(kw):
    run_case(2, 2, 4, 128, 1200, 128, PRESETS["rotation-k4v3"], torch.bfloat16, [700, 1, 300, 1], "bool", False, kw=kw)
    # decode steps keep the requested tile (4 rows); 16 and 64 rows (the launcher raises small tiles
    # to 64 tokens above 16 rows: an H100 gave NaN rows with bt=32 and 64 rows)
    run_case(1, 2, 4, 128, 1200, 128, PRESETS["rotation-k4v3"], torch.bfloat16, [900, 1, 1, 4, 16], None, True, kw=kw)


@gpu
@needs_cuda
@pytest.mark.parametrize("n", [4095, 4096, 4097])
def test_long_decode(n):
    """Many splits and flushes: one prompt near L, then decode steps."""
    run_case(1, 8, 4, 128, 4224, 128, PRESETS["rotation-k4v3"], torch.bfloat16, [n - 1, 1], None, True)


@gpu
@needs_cuda
def test_decode_across_flushes():
    """Token-by-token decode through three flushes (append's live unit decided on the device)."""
    run_case(1, 2, 4, 128, 1024, 128, PRESETS["k3v2-unbiased-kv"], torch.float16, [100] + [1] * 300, None, True)


@gpu
@needs_cuda
def test_dispatch_through_ops():
    st, consts, meta = make(2, 2, 128, 512, 128, PRESETS["rotation-k4v3"], dtype=torch.bfloat16)
    st_r = [x.clone() for x in st]
    k, v = (torch.randn(2, 2, 300, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    torch.ops.qjl.append(st, consts, k, v, meta)
    ref.append_(st_r, consts, k, v, meta)
    check_state(st, st_r, consts, meta)
    for Tq in (1, 16, 300):                                    # 300 * 4 rows: the PyTorch path
        q = torch.randn(2, 8, Tq, 128, device="cuda", dtype=torch.bfloat16)
        got = torch.ops.qjl.attend(q, st, consts, k[:, :, -Tq:], v[:, :, -Tq:], None, True, None, meta)
        want = ref.attend(q, st_r, consts, k[:, :, -Tq:], v[:, :, -Tq:], None, True, None, meta)
        assert rel(got, want) < 2 * OUT_TOL[torch.bfloat16], Tq


@gpu
@needs_cuda
@pytest.mark.parametrize("name", ["rotation-k4v3", "k3v2-unbiased-kv"])
def test_cuda_graph_decode_step(name):
    """append + attend captured once, replayed for 100 decode steps (crossing a flush at 256)."""
    B, H, G, D, L, R = 2, 2, 4, 128, 1024, 128
    st, consts, meta = make(B, H, D, L, R, PRESETS[name], dtype=torch.bfloat16)
    from qjl_compile.kernels import triton as qjl_triton
    qjl_triton.prepare(2, consts, torch.bfloat16)
    k0, v0 = (torch.randn(B, H, 200, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    rotation_append_(st, consts, k0, v0, meta)
    st_r = [x.clone() for x in st]
    kk, vv = (torch.zeros(B, H, 1, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    qq = torch.zeros(B, H * G, 1, D, device="cuda", dtype=torch.bfloat16)
    g, out = capture_decode(rotation_append_, rotation_attend, st, consts, kk, vv, qq, meta)
    for step in range(100):
        k, v = (torch.randn(B, H, 1, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        q = torch.randn(B, H * G, 1, D, device="cuda", dtype=torch.bfloat16)
        kk.copy_(k), vv.copy_(v), qq.copy_(q)
        g.replay()
        ref.append_(st_r, consts, k, v, meta)
        want = ref.attend(q, st_r, consts, k, v, None, True, None, meta)
        assert int(st[0]) == int(st_r[0]) == 201 + step
        assert rel(out, want) < 2 * OUT_TOL[torch.bfloat16], step
    check_state(st, st_r, consts, meta)
