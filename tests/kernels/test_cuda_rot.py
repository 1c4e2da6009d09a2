"""CUDA C++ rotation-codec decode attention (kernels/cuda/rot_decode.cu): the register lookup and
fragment layout emulated on CPU, sm_90 compiles without a GPU, and the kernel against
kernels/reference.py on a GPU."""
import os
import re
import subprocess

import pytest
import torch

from qjl_compile.kernels import reference as ref
from qjl_compile.kernels import rotation as rot
from qjl_compile.kernels.cuda import available
from qjl_compile.kernels.cuda import rot as cr
from qjl_compile.kernels.cuda.qjl import Unsupported

from kernel_env import CUDA, INTERP, assert_pdl_same_bits, capture_decode, decode_mask, gpu

nvrtc_ok = pytest.mark.skipif(not available()[0], reason=available()[1] or "NVRTC available")
needs_gpu = pytest.mark.skipif(not CUDA or INTERP or not available()[0], reason="needs CUDA and cuda-bindings")
M32 = 0xFFFFFFFF


# ---------------------------------------------------------------------------------------------
# CPU: the lookup (lut8) and the fragment layouts, emulated instruction by instruction
# ---------------------------------------------------------------------------------------------
def prmt(a, b, s):
    """PTX prmt.b32 (default mode): byte i of the result is byte s[4i+2:4i] of {b, a}, or its
    sign replicated when s[4i+3] is set."""
    src = ((b & M32) << 32) | (a & M32)
    out = 0
    for i in range(4):
        sel = (s >> (4 * i)) & 0xF
        byte = (src >> (8 * (sel & 7))) & 0xFF
        if sel & 8:
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << (8 * i)
    return out


def lut8(x, tb, s0, s1, sm=False):
    """rot_decode.cu lut8, op for op (sm: VFRAG, codes stored sign-magnitude)."""
    ng = ~x & 0x88888888
    m = (~x & 0x77777777) if sm else (x ^ ((ng - (ng >> 3)) & M32)) & 0x77777777
    mh = m >> 16
    la, lb = prmt(tb[0], tb[1], m), prmt(tb[0], tb[1], mh)
    ha, hb = prmt(tb[2], tb[3], m), prmt(tb[2], tb[3], mh)
    ng4 = (ng << 4) & M32
    ha ^= prmt(ng4, ng, 0x5140) & 0x80808080
    hb ^= prmt(ng4, ng, 0x7362) & 0x80808080
    return [prmt(la, ha, s0), prmt(la, ha, s1), prmt(lb, hb, s0), prmt(lb, hb, s1)]


def halves(w):
    return [torch.tensor([w & 0xFFFF], dtype=torch.int32).to(torch.int16).view(torch.float16).item(),
            torch.tensor([w >> 16], dtype=torch.int32).to(torch.int16).view(torch.float16).item()]


@pytest.mark.parametrize("bits", [4])
def test_lookup_decodes_every_code(bits):
    cb = rot.codebook(bits)
    tb = cr.lut_words(cb)
    assert not isinstance(tb, str), tb
    cb16 = cb.to(torch.float16).tolist()
    gen = torch.Generator().manual_seed(bits)
    words = [int(w) for w in torch.randint(0, 2 ** 32, (200,), generator=gen, dtype=torch.int64)]
    words += [0x76543210, 0xFEDCBA98, 0, M32]
    for x in words:
        codes = [(x >> (4 * i)) & 15 for i in range(8)]
        # keys: (c0, c1), (c2, c3), (c4, c5), (c6, c7) of one token
        got = sum((halves(h) for h in lut8(x, tb, 0x5140, 0x7362)), [])
        assert got == [cb16[c] for c in codes], hex(x)
        # values: the word interleaves two tokens byte by byte -> (A c, B c) pairs
        got = sum((halves(h) for h in lut8(x, tb, 0x6240, 0x7351)), [])
        want = [cb16[codes[i]] for i in (0, 2, 1, 3, 4, 6, 5, 7)]
        assert got == want, hex(x)
        # the kernel layout (VFRAG) stores sm_relabel(c)
        xs = sum(int(rot.sm_relabel(torch.tensor(c))) << (4 * i) for i, c in enumerate(codes))
        assert sum((halves(h) for h in lut8(xs, tb, 0x6240, 0x7351, sm=True)), []) == want, hex(x)
        assert sum((halves(h) for h in lut8(xs, tb, 0x5140, 0x7362, sm=True)), []) == [cb16[c] for c in codes]


def spread3(x):
    """rot_decode.cu spread3, op for op (sel = LOP3 (a & m) | (b & ~m))."""
    def sel(a, b, m):
        return ((a & m) | (b & ~m)) & M32
    x = sel(x, x << 4, 0x00000FFF)
    x = sel(x, x << 2, 0x003F003F)
    x = sel(x, x << 1, 0x07070707)
    return x & 0x77777777


def lut3(x, tb, s0, s1):
    xh = x >> 16
    la, lb = prmt(tb[0], tb[1], x), prmt(tb[0], tb[1], xh)
    ha, hb = prmt(tb[2], tb[3], x), prmt(tb[2], tb[3], xh)
    return [prmt(la, ha, s0), prmt(la, ha, s1), prmt(lb, hb, s0), prmt(lb, hb, s1)]


def load_codes3(row: bytes, off: int, cw: int):
    """rot_decode.cu load_codes3: the 3-bit codes of CPL = 8 cw channels at byte `off` -> cw nibble words."""
    if cw == 2:
        h0, h1, h2 = (row[off + i] | (row[off + i + 1] << 8) for i in (0, 2, 4))
        return [spread3(prmt(h0, h1, 0x2410)), spread3(prmt(h1, h2, 0x2541))]
    return [spread3(row[off] | (row[off + 1] << 8) | (row[off + 2] << 16))]


@pytest.mark.parametrize("D", [64, 128])
def test_3bit_values_decode_every_code(D):
    from qjl_compile.kernels import decoquant as dq
    # any 8-entry codebook works (no symmetry): a shuffled one, and the real Lloyd-Max one
    for cb in (rot.codebook(3), rot.codebook(3)[torch.randperm(8, generator=torch.Generator().manual_seed(D))]):
        tb = cr.lut_words(cb)
        assert not isinstance(tb, str), tb
        cb16 = cb.to(torch.float16).tolist()
        gen = torch.Generator().manual_seed(D)
        codes = torch.randint(0, 8, (2, D), generator=gen, dtype=torch.int32)
        codes[0, :8] = torch.arange(8)
        packed = dq.pack(codes, 3)                  # the codec's layout: (2, D * 3 / 8) bytes
        cpl, cw = D // 8, D // 64
        for g in range(8):                          # lane group g: channels cpl g .. cpl (g + 1)
            wa = load_codes3(bytes(packed[0].tolist()), cpl * 3 // 8 * g, cw)
            wb = load_codes3(bytes(packed[1].tolist()), cpl * 3 // 8 * g, cw)
            for w in range(cw):
                for hf in range(2):                 # as the kernel: interleave the tokens, look up (A c, B c)
                    x = prmt(wa[w], wb[w], 0x7362 if hf else 0x5140)
                    got = sum((halves(h) for h in lut3(x, tb, 0x6240, 0x7351)), [])
                    ch = [cpl * g + 8 * w + 4 * hf + j for j in range(4)]
                    want = sum(([cb16[codes[0, c]], cb16[codes[1, c]]] for c in ch), [])
                    assert got == want, (g, w, hf)


def test_shifts_as_multiplies():
    # FMAOFF=1 (decode_common.cuh shr_ / shl_, lut8's n7): mul.hi / mul.lo by powers of two, and
    # 7 ng / 8 by mul.hi with 0xE0000000, equal the shifts they replace on every input they get
    gen = torch.Generator().manual_seed(1)
    for x in [int(w) for w in torch.randint(0, 2 ** 32, (2000,), generator=gen, dtype=torch.int64)] + [0, M32]:
        for k in (1, 2, 4, 6, 16):
            assert (x * (1 << (32 - k))) >> 32 == x >> k
            assert (x * (1 << k)) & M32 == (x << k) & M32
        ng = ~x & 0x88888888
        assert (ng * 0xE0000000) >> 32 == ng - (ng >> 3)


def test_spread3_on_every_bit_pattern():
    gen = torch.Generator().manual_seed(0)
    for x in [int(w) for w in torch.randint(0, 2 ** 24, (500,), generator=gen)] + [0xFFFFFF, 0]:
        assert spread3(x) == sum(((x >> (3 * i)) & 7) << (4 * i) for i in range(8)), hex(x)


def test_value_words_interleave_two_tokens():
    gen = torch.Generator().manual_seed(3)
    a, b = (int(w) for w in torch.randint(0, 2 ** 32, (2,), generator=gen, dtype=torch.int64))
    x0, x1 = prmt(a, b, 0x5140), prmt(a, b, 0x7362)
    nib = lambda w, i: (w >> (4 * i)) & 15  # noqa: E731
    # x0: channels 0..3 of both tokens as (A c0, A c1, B c0, B c1, A c2, A c3, B c2, B c3)
    assert [nib(x0, i) for i in range(8)] == [nib(a, 0), nib(a, 1), nib(b, 0), nib(b, 1),
                                              nib(a, 2), nib(a, 3), nib(b, 2), nib(b, 3)]
    assert [nib(x1, i) for i in range(8)] == [nib(a, 4), nib(a, 5), nib(b, 4), nib(b, 5),
                                              nib(a, 6), nib(a, 7), nib(b, 6), nib(b, 7)]


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("vb", [3, 4])
def test_fragment_order_values_reach_their_mma_slots(D, vb):
    # rot_decode.cu VFRAG, emulated: a lane's words -> nibble words (3 bits: masks and frag3 with the
    # mul.hi / mad.hi of FMAOFF) -> lut3/lut8's nibble n = 4k + 2a + h is the code of channel
    # (D/8) g + 2i + h, token 16 tt + 8k + 2t + a: the A fragment (a0..a3) of M-tile i in tile tt
    idx = torch.randint(0, 1 << vb, (64, D))
    words = rot.frag_pack(idx, vb).reshape(2, 32, -1).view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    nt, vw = D // 16, D * vb // 32
    hi = lambda a, b: (a * b) >> 32  # noqa: E731
    for grp in range(2):
        for lane in range(32):
            g, t = lane // 4, lane % 4
            w = [int(x) for x in words[grp].reshape(-1)[lane * vw:(lane + 1) * vw].tolist()]
            for tt in range(2):
                tw = w[tt * vw // 2:(tt + 1) * vw // 2]            # the tile's words, read where used
                assert (4 * (lane * vw + tt * vw // 2)) % (16 if vw // 2 % 4 == 0 else 8 if vw // 2 % 2 == 0 else 4) == 0
                nwd = []
                if vb == 4:
                    nwd = tw
                else:
                    for jb in range(nt // 4):
                        w0, w1, w2 = tw[3 * jb:3 * jb + 3]
                        a0, a1, a2 = w0 & 0x88888888, w1 & 0x88888888, w2 & 0x88888888
                        f3 = hi(a2, 1 << 31) + hi(a1, 1 << 30) + hi(a0, 1 << 29)
                        assert f3 == (a0 >> 3) | (a1 >> 2) | (a2 >> 1)
                        nwd += [w0 & 0x77777777, w1 & 0x77777777, w2 & 0x77777777, f3]
                for i in range(nt):
                    x = nwd[i]
                    for n in range(8):
                        k, a, h = n // 4, (n // 2) % 2, n % 2
                        want = int(idx[32 * grp + 16 * tt + 8 * k + 2 * t + a, (D // 8) * g + 2 * i + h])
                        assert (x >> (4 * n)) & 15 == want


@pytest.mark.parametrize("D", [64, 128])
def test_key_fragments_cover_every_channel_once(D):
    # A (token rows) and B (Pi q) agree on the K order: thread t, k-step ks, half -> channels
    cpt, nk = D // 4, D // 16
    seen = []
    for t in range(4):
        for ks in range(nk):
            for sub in range(4):                  # a0/b0 hold +0, +1; a2/b1 hold +2, +3
                seen.append(cpt * t + 4 * ks + sub)
    assert sorted(seen) == list(range(D))
    # word w of thread t holds channels cpt t + 8 w .. + 7, i.e. k-steps 2w (first 4) and 2w + 1
    for t in range(4):
        for w in range(cpt // 8):
            assert [cpt * t + 4 * (2 * w) + s for s in range(4)] + [cpt * t + 4 * (2 * w + 1) + s for s in range(4)] \
                == list(range(cpt * t + 8 * w, cpt * t + 8 * w + 8))


def lut_i8(x, t0, t1, sg=0x80808080, sm=False):
    """rot_decode.cu lut_i8, op for op (sm: VFRAG, codes stored sign-magnitude)."""
    ps = x & 0x88888888
    m = (x & 0x77777777) if sm else (x ^ ((ps - (ps >> 3)) & M32)) & 0x77777777
    return [prmt(t0, t1, m) ^ prmt(sg, sg, x), prmt(t0, t1, m >> 16) ^ prmt(sg, sg, x >> 16)]


@pytest.mark.parametrize("D", [64, 128])
def test_pi_fragments_hold_every_entry_once(D):
    # the fused Pi q's A operand: every (row, col) of 16 Pi in exactly one (m-tile, k-step, lane, register,
    # half), where the m16n8k16 A layout puts it, and hi + lo = 16 Pi to ~2^-22
    Pi = rot.rotation(D, 5)
    fr = cr.pi_fragments(Pi)
    assert fr.shape == (2, D // 16, D // 16, 32, 4) and fr.dtype == torch.int32
    half = torch.stack([fr & 0xFFFF, (fr >> 16) & 0xFFFF], -1).to(torch.int16).view(torch.float16).double()
    rec = torch.zeros(2, D, D, dtype=torch.float64)
    seen = torch.zeros(D, D, dtype=torch.int32)
    for mt in range(D // 16):
        for ks in range(D // 16):
            for lane in range(32):
                g, t = lane // 4, lane % 4
                for reg in range(4):
                    for hf in range(2):
                        r = 16 * mt + g + 8 * (reg % 2)
                        c = 16 * ks + 2 * t + 8 * (reg // 2) + hf
                        rec[:, r, c] = half[:, mt, ks, lane, reg, hf]
                        seen[r, c] += 1
    assert bool((seen == 1).all())
    err = (rec[0] + rec[1] - 16 * Pi.double()).abs().max().item()
    assert err < 2 ** -22 * 16, err


def test_grid_codebook():
    g = rot.grid_codebook(4)
    s = rot.grid_step(g)
    assert s is not None and abs(s - 0.04516) < 1e-4
    u = g.double() / s
    assert float((u - 0.5 - (u - 0.5).round()).abs().max()) < 1e-4 and float(u.abs().max()) <= rot.GRID_HALF + 1e-4
    assert torch.equal(g, -g.flip(0)) and bool((g[1:] > g[:-1]).all())
    # the MSE it costs, against the exact centroids: +0.44% (nearest-level quantizer of N(0, 1))
    assert 1.0 < rot._mse(g.tolist()) / rot.codebook_mse(4) < 1.006
    assert abs(rot._mse(rot.codebook(4).tolist()) - rot.codebook_mse(4)) < 1e-9
    assert rot.grid_step(rot.codebook(4)) is None           # the exact centroids are off the grid
    assert torch.equal(rot.make_consts(64, 4, 3, 0, 0, 0)[1], g)
    assert torch.equal(rot.make_consts(64, 4, 3, 0, 0, 0, key_grid=False)[1], rot.codebook(4))
    assert torch.equal(rot.make_consts(64, 3, 3, 0, 0, 0)[1], rot.codebook(3))   # only 4-bit keys move


def test_int8_lookup_decodes_every_code():
    # KI8: every code of every nibble position -> the u8 level cb / s + 63.5 (codes >= 8 by the XOR)
    g = rot.grid_codebook(4)
    w8 = cr.int8_words(g)
    assert not isinstance(w8, str), w8
    (t0, t1), s = w8
    lv = [int(round(float(c) / s + rot.GRID_HALF)) for c in g.double()]
    assert all(0 <= v <= 127 for v in lv) and [127 - v for v in lv] == lv[::-1]
    gen = torch.Generator().manual_seed(3)
    words = [int(w) for w in torch.randint(0, 2 ** 32, (300,), generator=gen, dtype=torch.int64)]
    words += [0x76543210, 0xFEDCBA98, 0, M32]
    for x in words:
        codes = [(x >> (4 * i)) & 15 for i in range(8)]
        o = lut_i8(x, t0, t1)
        got = [(o[i // 4] >> (8 * (i % 4))) & 0xFF for i in range(8)]
        assert got == [lv[c] for c in codes], hex(x)
        # the kernel layout stores sm_relabel(c): the same levels from one mask
        xs = sum(int(rot.sm_relabel(torch.tensor(c))) << (4 * i) for i, c in enumerate(codes))
        o = lut_i8(xs, t0, t1, sm=True)
        assert [(o[i // 4] >> (8 * (i % 4))) & 0xFF for i in range(8)] == [lv[c] for c in codes], hex(x)
    assert "off the int8 grid" in cr.int8_words(rot.codebook(4))
    assert "8-entry" in cr.int8_words(rot.codebook(3))


def test_int8_query_digits_and_offset_are_exact():
    # rot_prep's digits Q = 256 hi + lo (hi, lo s8) and the split's int32 score
    # 512 sum B hi + 2 sum B lo - 127 sum Q = 2 sum (B - 63.5) Q, at the extremes of every range
    gen = torch.Generator().manual_seed(4)
    for trial in range(50):
        Q = torch.randint(-32000, 32001, (128,), generator=gen, dtype=torch.int64)
        if trial == 0:
            Q[:64], Q[64:] = 32000, -32000
        hi = torch.div(Q + 128, 256, rounding_mode="floor")
        lo = Q - 256 * hi
        assert int(lo.min()) >= -128 and int(lo.max()) <= 127 and int(hi.abs().max()) <= 127
        B = torch.randint(0, 128, (128,), generator=gen, dtype=torch.int64)
        if trial == 0:
            B[:] = 127
        s_hi, s_lo = int((B * hi).sum()), int((B * lo).sum())
        val = 512 * s_hi + (2 * s_lo - 127 * int(Q.sum()))
        assert val == int(((2 * B - 127) * Q).sum())
        for v in (s_hi * 512, 2 * s_lo - 127 * int(Q.sum()), val, 2 * (256 * s_hi + s_lo)):
            assert abs(v) < 2 ** 31           # every int32 intermediate of the kernel


def test_asymmetric_codebook_is_refused():
    cb = rot.codebook(4).clone()
    cb[0] -= 0.01
    why = cr.lut_words(cb)
    assert isinstance(why, str) and "symmetric" in why
    assert "16-entry" in cr.lut_words(rot.codebook(2))


def test_unsupported_reasons_on_cpu():
    D, R, L = 128, 128, 1024
    params = [4, 4, 0, 1, 0, 1, R]
    consts = rot.make_consts(D, 4, 4, 0, 0, 0)
    st = ref.make_state(ref.CODECS[2], 1, 2, L, D, R, consts, params, torch.bfloat16, torch.float16, "cpu")
    q = torch.zeros(1, 8, 1, D, dtype=torch.bfloat16)
    meta = [2, R, L, *params]
    why = cr.unsupported(q, st, consts, meta)
    assert why and (("CUDA" in why) or ("cuda-bindings" in why) or ("NVRTC" in why))
    for bad, words in (([4, 2, 0, 1, 0, 1, R], "value_bits=2"), ([3, 3, 0, 1, 0, 1, R], "key_bits=3"),
                       ([4, 4, 1, 1, 0, 1, R], "unbiased"),
                       ([4, 3, 0, 1, 100, 1, R], "sink"), ([4, 4, 0, 1, 0, 3, R], "value centering"),
                       ([4, 4, 0, 1, 0, 1, R, 1, 0], "outlier tokens")):
        assert words in cr.unsupported(q, st, consts, [2, R, L, *bad])
    with pytest.raises(Unsupported):
        cr.rotation_attend_cuda(q, st, consts, q[:, :2], q[:, :2], None, True, None, meta)


def _cuobjdump():
    import os
    triton = pytest.importorskip("triton")
    p = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(p):
        pytest.skip("no cuobjdump in the triton wheel")
    return p


CONFIGS = [dict(D=128, KB=4, VB=4, RR=128, NW=4, QDT=1, MK=4, CAUSAL=0, CAUSAL_C=0, CK=1, BLK=128, MINB=3, STAGES=3, FMAOFF=1),
           dict(D=128, KB=4, VB=4, RR=128, NW=4, QDT=0, MK=0, CAUSAL=1, CAUSAL_C=0, CK=0, BLK=128, MINB=3, STAGES=3,
                FUSEQ=1),
           dict(D=64, KB=4, VB=4, RR=64, NW=4, QDT=1, MK=1, CAUSAL=0, CAUSAL_C=0, CK=1, BLK=64, MINB=3, STAGES=2),
           dict(D=64, KB=4, VB=4, RR=32, NW=4, QDT=0, MK=2, CAUSAL=0, CAUSAL_C=1, CK=1, BLK=32, MINB=3, STAGES=3),
           dict(D=128, KB=4, VB=4, RR=128, NW=4, QDT=1, MK=3, CAUSAL=0, CAUSAL_C=0, CK=0, BLK=128, MINB=3, STAGES=3),
           # rotation-k4v3-match: 3-bit values, 4 sinks, centered keys (and its 4-bit first layers)
           dict(D=128, KB=4, VB=3, RR=128, NW=4, QDT=1, MK=4, CAUSAL=0, CAUSAL_C=0, CK=1, BLK=128, MINB=3, STAGES=3,
                NSINK=4, FMAOFF=1),
           dict(D=64, KB=4, VB=3, RR=64, NW=4, QDT=0, MK=1, CAUSAL=0, CAUSAL_C=1, CK=1, BLK=64, MINB=3, STAGES=3,
                NSINK=4, FMAOFF=1),
           dict(D=128, KB=4, VB=3, RR=128, NW=8, QDT=1, MK=4, CAUSAL=0, CAUSAL_C=0, CK=1, BLK=128, MINB=2, STAGES=3,
                NSINK=4, FMAOFF=1),
           dict(D=128, KB=4, VB=4, RR=128, NW=4, QDT=1, MK=0, CAUSAL=1, CAUSAL_C=0, CK=1, BLK=128, MINB=3, STAGES=3,
                NSINK=4),
           # keys on int8 MMAs (grid codebook): both digits in one MMA (<= 4 rows), or two
           dict(D=128, KB=4, VB=3, RR=128, NW=8, QDT=1, MK=0, CAUSAL=0, CAUSAL_C=0, CK=1, BLK=128, MINB=2, STAGES=3,
                NSINK=4, FMAOFF=1, KI8=1, PK=1),
           dict(D=128, KB=4, VB=4, RR=128, NW=4, QDT=0, MK=2, CAUSAL=0, CAUSAL_C=0, CK=0, BLK=128, MINB=3, STAGES=3,
                FMAOFF=1, KI8=1, PK=0),
           dict(D=64, KB=4, VB=3, RR=64, NW=4, QDT=1, MK=1, CAUSAL=0, CAUSAL_C=1, CK=1, BLK=64, MINB=3, STAGES=3,
                NSINK=4, FMAOFF=0, KI8=1, PK=1),
           # value codes in fragment order (VFRAG), 3 and 4 bits, both head dims
           dict(D=128, KB=4, VB=3, RR=128, NW=8, QDT=1, MK=0, CAUSAL=1, CAUSAL_C=0, CK=1, BLK=128, MINB=2, STAGES=2,
                NSINK=4, FMAOFF=1, KI8=1, PK=1, VFRAG=1),
           dict(D=128, KB=4, VB=4, RR=128, NW=8, QDT=1, MK=4, CAUSAL=0, CAUSAL_C=0, CK=1, BLK=128, MINB=2, STAGES=2,
                FMAOFF=1, KI8=1, PK=1, VFRAG=1),
           dict(D=128, KB=4, VB=4, RR=128, NW=8, QDT=1, MK=0, CAUSAL=1, CAUSAL_C=0, CK=1, BLK=128, MINB=2, STAGES=2,
                NSINK=4, FMAOFF=1, KI8=1, PK=1, VFRAG=1),     # rotation4 at 128k: at the 128-register cap
           dict(D=64, KB=4, VB=3, RR=64, NW=4, QDT=0, MK=2, CAUSAL=0, CAUSAL_C=0, CK=0, BLK=64, MINB=3, STAGES=2,
                FMAOFF=0, KI8=1, PK=0, VFRAG=1),
           dict(D=64, KB=4, VB=4, RR=64, NW=4, QDT=1, MK=0, CAUSAL=1, CAUSAL_C=1, CK=1, BLK=64, MINB=3, STAGES=2,
                NSINK=4, FMAOFF=1, VFRAG=1),
           # the software-pipelined loop (PIPE: values of the group before beside the keys, 3 stages)
           dict(D=128, KB=4, VB=3, RR=128, NW=4, QDT=1, MK=0, CAUSAL=1, CAUSAL_C=0, CK=1, BLK=128, MINB=3, STAGES=3,
                NSINK=4, FMAOFF=1, KI8=1, PK=1, VFRAG=1, PIPE=1),
           dict(D=128, KB=4, VB=4, RR=128, NW=8, QDT=1, MK=4, CAUSAL=0, CAUSAL_C=0, CK=1, BLK=128, MINB=2, STAGES=3,
                FMAOFF=1, KI8=1, PK=1, VFRAG=1, PIPE=1),
           dict(D=64, KB=4, VB=3, RR=64, NW=4, QDT=0, MK=1, CAUSAL=0, CAUSAL_C=1, CK=0, BLK=64, MINB=3, STAGES=4,
                NSINK=4, FMAOFF=0, KI8=0, PK=0, VFRAG=1, PIPE=1),
           # the block means staged before the dependency wait (EARLY), with and without PIPE / FUSEQ
           dict(D=128, KB=4, VB=3, RR=128, NW=8, QDT=1, MK=0, CAUSAL=1, CAUSAL_C=0, CK=1, BLK=128, MINB=2, STAGES=2,
                NSINK=4, FMAOFF=1, KI8=1, PK=1, VFRAG=1, EARLY=1),
           dict(D=64, KB=4, VB=4, RR=64, NW=4, QDT=0, MK=3, CAUSAL=0, CAUSAL_C=0, CK=1, BLK=64, MINB=3, STAGES=3,
                FMAOFF=1, KI8=0, PK=0, VFRAG=1, PIPE=1, EARLY=1),
           dict(D=128, KB=4, VB=3, RR=128, NW=4, QDT=1, MK=0, CAUSAL=1, CAUSAL_C=0, CK=1, BLK=128, MINB=3, STAGES=2,
                NSINK=4, FMAOFF=1, FUSEQ=1, KI8=1, PK=1, EARLY=1),
           # HF's decode mask staged with the groups (MKS), bool and fp32
           dict(D=128, KB=4, VB=3, RR=128, NW=8, QDT=1, MK=4, CAUSAL=0, CAUSAL_C=0, CK=1, BLK=128, MINB=2, STAGES=2,
                NSINK=4, FMAOFF=1, KI8=1, PK=1, VFRAG=1, MKS=1),
           dict(D=64, KB=4, VB=4, RR=64, NW=4, QDT=0, MK=3, CAUSAL=0, CAUSAL_C=0, CK=1, BLK=64, MINB=3, STAGES=2,
                FMAOFF=1, KI8=0, PK=0, VFRAG=0, MKS=1),
           # Pi q on the tensor cores in the split (FUSEQ) with int8 keys, both warp counts
           dict(D=128, KB=4, VB=3, RR=128, NW=8, QDT=1, MK=4, CAUSAL=0, CAUSAL_C=0, CK=1, BLK=128, MINB=2, STAGES=2,
                NSINK=4, FMAOFF=1, FUSEQ=1, KI8=1, PK=1),
           dict(D=128, KB=4, VB=3, RR=128, NW=4, QDT=1, MK=0, CAUSAL=1, CAUSAL_C=0, CK=1, BLK=128, MINB=3, STAGES=2,
                NSINK=4, FMAOFF=1, FUSEQ=1, KI8=1, PK=0),
           # a randomized Hadamard Pi (HAD): Pi q by butterflies in the split, the combine without Pi
           dict(D=128, KB=4, VB=3, RR=128, NW=8, QDT=1, MK=4, CAUSAL=0, CAUSAL_C=0, CK=1, BLK=128, MINB=2, STAGES=2,
                NSINK=4, FMAOFF=1, FUSEQ=1, HAD=1, KI8=1, PK=1, VFRAG=1, MKS=1),
           dict(D=128, KB=4, VB=3, RR=128, NW=4, QDT=1, MK=0, CAUSAL=1, CAUSAL_C=0, CK=1, BLK=128, MINB=3, STAGES=2,
                NSINK=4, FMAOFF=1, FUSEQ=1, HAD=1, KI8=1, PK=0, VFRAG=1),
           dict(D=64, KB=4, VB=4, RR=64, NW=4, QDT=0, MK=2, CAUSAL=0, CAUSAL_C=0, CK=0, BLK=64, MINB=3, STAGES=2,
                FMAOFF=1, FUSEQ=1, HAD=1, KI8=0, PK=0, KST=1),
           # the combine's exact keys staged by cp.async (KST), with a dense Pi and a Hadamard one
           dict(D=128, KB=4, VB=3, RR=128, NW=8, QDT=1, MK=4, CAUSAL=0, CAUSAL_C=0, CK=1, BLK=128, MINB=2, STAGES=2,
                NSINK=4, FMAOFF=1, KI8=1, PK=1, VFRAG=1, MKS=1, KST=1),
           dict(D=128, KB=4, VB=3, RR=128, NW=8, QDT=1, MK=4, CAUSAL=0, CAUSAL_C=0, CK=1, BLK=128, MINB=2, STAGES=2,
                NSINK=4, FMAOFF=1, FUSEQ=1, HAD=1, KI8=1, PK=1, VFRAG=1, MKS=1, KST=1)]


def _assert_pdl(path, k, split_waits=True):
    # programmatic dependent launch: prep and split signal their dependents (PREEXIT), split and
    # combine wait for the kernel before them (ACQBULK) before reading its output (a split that computes
    # its query transform itself, FUSEQ, is the call's first kernel and waits for nothing)
    sass = subprocess.run([_cuobjdump(), "-sass", str(path)], capture_output=True, text=True, check=True).stdout
    fn = dict(re.findall(r"Function : (\w+)\n(.*?)(?=\n\s+Function : |\Z)", sass, re.S))
    assert "PREEXIT" in fn[f"{k}_prep"] and "PREEXIT" in fn[f"{k}_split"], "griddepcontrol.launch_dependents missing"
    assert ("ACQBULK" in fn[f"{k}_split"]) == split_waits and "ACQBULK" in fn[f"{k}_combine"], "griddepcontrol.wait"


@nvrtc_ok
@pytest.mark.parametrize("defines", CONFIGS,
                         ids=lambda d: f"D{d['D']}v{d['VB']}mk{d['MK']}ck{d['CK']}q{d['QDT']}s{d.get('NSINK', 0)}nw{d['NW']}"
                                       f"i{d.get('KI8', 0)}{d.get('PK', 0)}f{d.get('FUSEQ', 0)}h{d.get('HAD', 0)}k{d.get('KST', 0)}v{d.get('VFRAG', 0)}p{d.get('PIPE', 0)}e{d.get('EARLY', 0)}m{d.get('MKS', 0)}")
def test_compiles_for_sm90(defines, tmp_path):
    from qjl_compile.kernels.cuda import compile_source
    path = tmp_path / "k.cubin"
    path.write_bytes(compile_source("rot_decode", defines, "sm_90"))
    res = subprocess.run([_cuobjdump(), "-res-usage", str(path)], capture_output=True, text=True, check=True).stdout
    regs = dict(re.findall(r"Function (\w+):\s+REG:\d+ STACK:(\d+)", res))
    assert set(regs) == set(cr.KERNELS), res
    assert regs["rot_split"] == "0", f"rot_split spills at {defines}: {res}"
    sass = subprocess.run([_cuobjdump(), "-sass", "-fun", "rot_split", str(path)], capture_output=True,
                          text=True, check=True).stdout
    assert "HMMA" in sass and "MOVM" in sass and "PRMT" in sass, "the MMA/lookup path is not in the machine code"
    assert ("IMMA" in sass) == bool(defines.get("KI8")), "keys on int8 MMAs exactly with KI8"
    _assert_pdl(path, "rot", not defines.get("FUSEQ"))


@pytest.mark.parametrize("D,kb,vb", [(128, 4, 4), (64, 4, 4), (128, 4, 3), (64, 4, 3)])
@pytest.mark.parametrize("mke", [0, 1, 4])                 # no staged mask, bool, fp32 (MKS)
def test_stage_bytes_match_the_kernel_layout(D, kb, vb, mke):
    import os
    src = os.path.join(os.path.dirname(cr.__file__), "rot_decode.cu")
    vals, env = {}, dict(D=D, KB=kb, VB=vb, MKE=mke)
    for line in open(src):
        m = re.match(r"#define (ST_\w+) (.+?)\s*(//.*)?$", line)
        if m:
            e = m.group(2)
            for k, v in {**env, **vals}.items():
                e = re.sub(rf"\b{k}\b", str(v), e)
            vals[m.group(1)] = eval(e.replace("/", "//"))
    assert vals["ST_SIZE"] == cr.stage_bytes(D, kb, vb, mke)
    assert all(v % 16 == 0 for v in vals.values()), vals


# ---------------------------------------------------------------------------------------------
# GPU: kernel vs reference
# ---------------------------------------------------------------------------------------------
def _state(B, H, L, D, R, center, n, dtype, seed, vb=4, sink=0, key_grid=True, transform="haar"):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    params = [4, vb, 0, 1, sink, center, R]
    consts = [c.cuda() for c in rot.make_consts(D, 4, vb, 0, seed, 0, key_grid=key_grid, transform=transform)]
    meta = [2, R, L, *params]
    st = ref.make_state(ref.CODECS[2], B, H, L, D, R, consts, params, dtype, torch.float16, "cuda")
    scale = torch.linspace(0.3, 2.5, D, device="cuda")
    bias = torch.randn(D, generator=gen, device="cuda")       # a shared mean direction (what centering removes)
    done = 0
    while done < n:
        T = min(4096, n - done)
        k = (torch.randn(B, H, T, D, generator=gen, device="cuda") * scale + bias).to(dtype)
        v = torch.randn(B, H, T, D, generator=gen, device="cuda").to(dtype)
        ref.append_(st, consts, k, v, meta)
        done += T
    return st, consts, meta, gen


GRID = [  # B, H, G, Tq, D, R, center, n, L, dtype[, value bits, sinks]
    (1, 2, 4, 1, 128, 128, 1, 1000, 1024, torch.bfloat16),
    (3, 2, 1, 1, 128, 128, 0, 1313, 2048, torch.float16),
    (2, 1, 8, 1, 64, 64, 1, 777, 800, torch.bfloat16),
    (1, 3, 2, 2, 128, 128, 1, 3000, 4096, torch.float16),
    (2, 2, 4, 2, 64, 32, 1, 129, 320, torch.bfloat16),
    (1, 8, 4, 1, 128, 128, 1, 20000, 20480, torch.bfloat16),
    (1, 1, 3, 1, 128, 64, 0, 500, 640, torch.float16),
    (2, 2, 5, 1, 128, 128, 1, 100, 256, torch.bfloat16),       # nothing compressed yet
    # rotation-k4v3-match's codec: 3-bit values, 4 exact sinks (and the 4-bit first layers with sinks)
    (1, 2, 4, 1, 128, 128, 1, 1000, 1024, torch.bfloat16, 3, 4),
    (2, 3, 1, 2, 64, 64, 1, 777, 800, torch.float16, 3, 4),
    (1, 8, 4, 1, 128, 128, 1, 20000, 20480, torch.bfloat16, 3, 4),
    (1, 1, 3, 1, 128, 32, 0, 301, 320, torch.float16, 3, 0),
    (2, 2, 4, 1, 128, 128, 1, 3000, 4096, torch.bfloat16, 4, 4),
    # value codes in fragment order (center bit 4: the config default for 3- and 4-bit values)
    (1, 2, 4, 1, 128, 128, 5, 1000, 1024, torch.bfloat16, 3, 4),
    (2, 3, 1, 2, 64, 64, 5, 777, 800, torch.float16, 3, 4),
    (1, 8, 4, 1, 128, 128, 5, 20000, 20480, torch.bfloat16, 3, 4),
    (1, 1, 3, 1, 128, 32, 4, 301, 320, torch.float16, 3, 0),
    (2, 2, 4, 1, 128, 128, 5, 3000, 4096, torch.bfloat16, 4, 4),
    (2, 1, 8, 1, 64, 64, 5, 777, 800, torch.bfloat16),
    (1, 2, 8, 1, 128, 128, 1, 130, 512, torch.bfloat16, 3, 7),   # just past the first flush, odd sink count
]


@gpu
@needs_gpu
@pytest.mark.parametrize("case", GRID, ids=lambda c: f"B{c[0]}H{c[1]}G{c[2]}Tq{c[3]}D{c[4]}R{c[5]}c{c[6]}n{c[7]}"
                                                   + (f"v{c[10]}s{c[11]}" if len(c) > 10 else ""))
@pytest.mark.parametrize("mask", ["none", "bool_pos", "float_pos", "bool_row"])
def test_cuda_attend_matches_reference(case, mask):
    B, H, G, Tq, D, R, center, n, L, dtype = case[:10]
    vb, sink = case[10:] if len(case) > 10 else (4, 0)
    st, consts, meta, gen = _state(B, H, L, D, R, center, n - Tq, dtype, seed=n + G, vb=vb, sink=sink)
    kn = torch.randn(B, H, Tq, D, generator=gen, device="cuda").to(dtype)
    vn = torch.randn(B, H, Tq, D, generator=gen, device="cuda").to(dtype)
    ref.append_(st, consts, kn, vn, meta)
    q = (torch.randn(B, H * G, Tq, D, generator=gen, device="cuda") * 2).to(dtype)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)             # HF's layout: a transposed view
    am, causal = decode_mask(mask, B, H * G, Tq, L, n, gen, dtype)
    out = cr.rotation_attend_cuda(q, st, consts, kn, vn, am, causal, None, meta)
    want = ref.attend(q, st, consts, kn, vn, am, causal, None, meta)
    assert out.shape == q.shape and out.stride() == torch.empty_like(q).stride() and out.dtype == q.dtype
    assert torch.isfinite(out).all()
    rel = ((out.float() - want.float()).norm() / want.float().norm()).item()
    assert rel < (1e-2 if dtype == torch.bfloat16 else 4e-3), rel


HAD_GRID = [GRID[i] for i in (0, 2, 3, 4, 5, 9, 14, 15, 16, 19)]


@gpu
@needs_gpu
@pytest.mark.parametrize("case", HAD_GRID, ids=lambda c: f"B{c[0]}H{c[1]}G{c[2]}Tq{c[3]}D{c[4]}R{c[5]}c{c[6]}n{c[7]}"
                                                       + (f"v{c[10]}s{c[11]}" if len(c) > 10 else ""))
@pytest.mark.parametrize("mask", ["none", "float_pos", "bool_row"])
def test_cuda_attend_hadamard_matches_reference(case, mask):
    # a randomized Hadamard Pi (HAD): Pi q by butterflies in the split, Pi^T in the combine, no rot_prep
    B, H, G, Tq, D, R, center, n, L, dtype = case[:10]
    vb, sink = case[10:] if len(case) > 10 else (4, 0)
    st, consts, meta, gen = _state(B, H, L, D, R, center, n - Tq, dtype, seed=n + G + 5, vb=vb, sink=sink,
                                   transform="hadamard")
    assert cr.derived(consts)[4] is not None
    kn = torch.randn(B, H, Tq, D, generator=gen, device="cuda").to(dtype)
    vn = torch.randn(B, H, Tq, D, generator=gen, device="cuda").to(dtype)
    ref.append_(st, consts, kn, vn, meta)
    q = (torch.randn(B, H * G, Tq, D, generator=gen, device="cuda") * 2).to(dtype)
    am, causal = decode_mask(mask, B, H * G, Tq, L, n, gen, dtype)
    want = ref.attend(q, st, consts, kn, vn, am, causal, None, meta)
    tol = 1e-2 if dtype == torch.bfloat16 else 4e-3
    for kw in (dict(), dict(hadamard=False), dict(stage_keys=True)):   # butterflies, the dense path on the same Pi
        out = cr.rotation_attend_cuda(q, st, consts, kn, vn, am, causal, None, meta, **kw)
        assert out.shape == q.shape and out.dtype == q.dtype and torch.isfinite(out).all()
        rel = ((out.float() - want.float()).norm() / want.float().norm()).item()
        assert rel < tol, (kw, rel)


@gpu
@needs_gpu
def test_hadamard_refused_for_a_dense_pi():
    st, consts, meta, gen = _state(1, 2, 1024, 128, 128, 1, 999, torch.bfloat16, seed=3)
    assert cr.derived(consts)[4] is None
    q = torch.randn(1, 8, 1, 128, generator=gen, device="cuda").to(torch.bfloat16)
    kn = torch.randn(1, 2, 1, 128, generator=gen, device="cuda").to(torch.bfloat16)
    ref.append_(st, consts, kn, kn, meta)
    with pytest.raises(Unsupported, match="hadamard=True"):
        cr.rotation_attend_cuda(q, st, consts, kn, kn, None, True, None, meta, hadamard=True)


def test_hadamard_rotation_is_detected():
    # rotation(transform="hadamard") is orthogonal, H diag(s) / sqrt(d); the kernel's detector finds its
    # signs, and no Haar matrix (nor a Hadamard with a row sign flipped) passes for one
    for d in (64, 128):
        P = rot.rotation(d, 7, 3, "hadamard")
        assert torch.allclose(P @ P.T, torch.eye(d), atol=1e-5)
        sg = rot.hadamard_signs(P)
        assert sg is not None and torch.allclose(P, rot.sylvester(d).float() * sg[None, :])
        assert rot.hadamard_signs(rot.rotation(d, 7, 3)) is None
        Q = P.clone()
        Q[5] *= -1
        assert rot.hadamard_signs(Q) is None
        assert not torch.equal(P, rot.rotation(d, 7, 4, "hadamard"))      # a layer's own signs
    with pytest.raises(ValueError, match="power-of-two"):
        rot.rotation(96, 0, 0, "hadamard")


def test_mask_staging_rule():
    # MKS takes HF's per-position decode mask only where every group's 32 values are one aligned,
    # in-bounds 16-byte-multiple copy; anything else keeps the in-loop loads
    from qjl_compile.kernels.checks import mask_args
    q = torch.zeros(2, 8, 1, 128)
    for dt, L, ok in [(torch.bool, 1024, True), (torch.float32, 1024, True), (torch.bool, 1000, False),
                      (torch.float32, 1000, True)]:
        am = torch.zeros(2, 1, 1, L, dtype=dt)
        kind, mt, ms = mask_args(am, q)
        assert kind in (3, 4)
        assert cr.mask_stageable(kind, mt, ms, 896) == ok, (dt, L)
    kind, mt, ms = mask_args(torch.zeros(2, 1, 1, 2048, dtype=torch.bool)[..., ::2], q)      # strided positions
    assert not cr.mask_stageable(kind, mt, ms, 896)
    kind, mt, ms = mask_args(torch.zeros(2, 1, 1, 512), q)                                   # shorter than LC
    assert not cr.mask_stageable(kind, mt, ms, 896)
    kind, mt, ms = mask_args(torch.zeros(2, 8, 1, 1024, dtype=torch.bool), q)                # per row: kind 1
    assert not cr.mask_stageable(kind, mt, ms, 896)


def test_launch_config_rule():
    # 8 warps per CTA where a split has >= 2048 tokens (B=1 128k, B=16 16k), 4 below (32k)
    assert cr._config(1, 8, 131072) == (8, 32, 2)
    assert cr._config(16, 8, 16384)[0] == 8
    assert cr._config(1, 8, 32768) == (4, 32, cr.MIN_BLOCKS)
    assert cr._config(1, 8, 4096)[0] == 4
    assert cr.dyn_smem(4, 2, 128, 4, 3, 0) == 4 * 2 * cr.stage_bytes(128, 4, 3)
    assert cr.dyn_smem(8, 2, 128, 4, 3, 34, True) == 8 * 2 * cr.stage_bytes(128, 4, 3) + 34 * 32 + 34 * 128 * 2


@gpu
@needs_gpu
@pytest.mark.parametrize("vb,sink", [(3, 4), (4, 0)])
@pytest.mark.parametrize("kw", [dict(num_warps=8), dict(fuse_q=True), dict(fuse_q=True, key_int8=False),
                                dict(fuse_q=True, num_warps=8), dict(fma_shifts=False), dict(num_warps=8, fuse_q=False),
                                dict(key_int8=False), dict(key_int8=False, num_warps=8), dict(exact_codebook=True),
                                dict(pdl=False), dict(stage_keys=True), dict(stage_keys=True, num_warps=8)],
                         ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()))
def test_launch_variants_match_reference(vb, sink, kw):
    B, H, G, D, L, n = 1, 4, 4, 128, 8192, 7000
    kw = dict(kw)
    exact = kw.pop("exact_codebook", False)               # Lloyd-Max centroids off the grid: the fp16 key path
    st, consts, meta, gen = _state(B, H, L, D, 128, 5, n - 1, torch.bfloat16, seed=11, vb=vb, sink=sink,
                                   key_grid=not exact)
    kn = torch.randn(B, H, 1, D, generator=gen, device="cuda").to(torch.bfloat16)
    vn = torch.randn_like(kn)
    ref.append_(st, consts, kn, vn, meta)
    q = (torch.randn(B, H * G, 1, D, generator=gen, device="cuda") * 2).to(torch.bfloat16)
    if exact:
        assert cr.derived(consts)[3] is None
        with pytest.raises(Unsupported, match="off the int8 grid"):
            cr.rotation_attend_cuda(q, st, consts, kn, vn, None, True, None, meta, key_int8=True)
    out = cr.rotation_attend_cuda(q, st, consts, kn, vn, None, True, None, meta, **kw)
    want = ref.attend(q, st, consts, kn, vn, None, True, None, meta)
    assert ((out.float() - want.float()).norm() / want.float().norm()).item() < 1e-2


def _step(case, seed_add):
    """A GRID case's cache filled up to this step, its new tokens appended (keys as values too) and a query."""
    B, H, G, Tq, D, R, center, n, L, dtype = case[:10]
    vb, sink = case[10:] if len(case) > 10 else (4, 0)
    st, consts, meta, gen = _state(B, H, L, D, R, center, n - Tq, dtype, seed=n + seed_add, vb=vb, sink=sink)
    kn = torch.randn(B, H, Tq, D, generator=gen, device="cuda").to(dtype)
    ref.append_(st, consts, kn, kn, meta)
    q = (torch.randn(B, H * G, Tq, D, generator=gen, device="cuda") * 2).to(dtype)
    return q, st, consts, kn, meta, gen


@gpu
@needs_gpu
@pytest.mark.parametrize("case", [c for c in GRID if c[6] & 4], ids=lambda c: f"B{c[0]}H{c[1]}G{c[2]}Tq{c[3]}D{c[4]}n{c[7]}")
@pytest.mark.parametrize("nw", [None, 8])
def test_pipelined_loop_and_early_means_give_the_same_bits(case, nw):
    # PIPE reorders no arithmetic: the values of group i - 1 are still added before group i's rescale,
    # and the first iteration adds P = 0 (exact zeros), so every bit must agree with the plain loop
    q, st, consts, kn, meta, gen = _step(case, seed_add=3)
    off = cr.rotation_attend_cuda(q, st, consts, kn, kn, None, True, None, meta, pipe=False, num_warps=nw)
    on = cr.rotation_attend_cuda(q, st, consts, kn, kn, None, True, None, meta, pipe=True, num_warps=nw)
    assert torch.equal(on, off)
    # the block means staged early (key-centered cases) read the same bytes, from shared memory
    early = cr.rotation_attend_cuda(q, st, consts, kn, kn, None, True, None, meta, pipe=False, num_warps=nw, early=True)
    assert torch.equal(early, off)
    want = ref.attend(q, st, consts, kn, kn, None, True, None, meta)
    assert ((on.float() - want.float()).norm() / want.float().norm()).item() < 1e-2


@gpu
@needs_gpu
@pytest.mark.parametrize("case", [GRID[0], GRID[2], GRID[13], GRID[16], GRID[-1]],
                         ids=lambda c: f"B{c[0]}H{c[1]}G{c[2]}D{c[4]}c{c[6]}n{c[7]}")
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_staged_mask_gives_the_same_bits(case, kind):
    # MKS reads the same mask values from the stage instead of global memory: every bit must agree
    B, R, n, L, dtype = case[0], case[5], case[7], case[8], case[9]
    q, st, consts, kn, meta, gen = _step(case, seed_add=5)
    keep = (torch.arange(L, device="cuda") < n) & (torch.rand(B, 1, 1, L, generator=gen, device="cuda") > 0.1)
    keep[..., n - 1] = True
    am = keep if kind == "bool" else torch.where(keep, 0.0, float("-inf")).to(dtype)
    from qjl_compile.kernels.checks import mask_args
    assert cr.mask_stageable(*mask_args(am if kind == "bool" else am.float(), q), L // R * R)   # the launcher's fp32 copy
    off = cr.rotation_attend_cuda(q, st, consts, kn, kn, am, False, None, meta, stage_mask=False)
    on = cr.rotation_attend_cuda(q, st, consts, kn, kn, am, False, None, meta, stage_mask=True)
    assert torch.equal(on, off)
    with pytest.raises(Unsupported, match="stage_mask=True"):        # no mask to stage: refused, not ignored
        cr.rotation_attend_cuda(q, st, consts, kn, kn, None, True, None, meta, stage_mask=True)


@gpu
@needs_gpu
@pytest.mark.parametrize("L,n", [(4096, 3000), (131072, 131000)])
def test_dependent_launch_gives_the_same_bits(L, n):
    # PDL only moves when the split and the combine may start: every output bit must agree with the
    # serialized launch, at a size with one wave of CTAs and at one whose combine waits on a full split
    B, H, G, D = 1, 8, 4, 128
    st, consts, meta, gen = _state(B, H, L, D, 128, 5, n - 1, torch.bfloat16, seed=21, vb=3, sink=4)
    assert_pdl_same_bits(cr.rotation_attend_cuda, st, consts, meta, gen, B, H, G, D)


@gpu
@needs_gpu
def test_eight_warp_default_at_64k():
    # B=1, H=1, 64k: 32 splits of 2048 tokens, so the default launch takes 8 warps per CTA
    B, H, G, D, L, n = 1, 1, 4, 128, 65536, 65536
    assert cr._config(B, H, L)[0] == 8
    st, consts, meta, gen = _state(B, H, L, D, 128, 5, n - 1, torch.bfloat16, seed=12, vb=3, sink=4)
    kn = torch.randn(B, H, 1, D, generator=gen, device="cuda").to(torch.bfloat16)
    ref.append_(st, consts, kn, kn, meta)
    q = torch.randn(B, H * G, 1, D, generator=gen, device="cuda").to(torch.bfloat16)
    out = cr.rotation_attend_cuda(q, st, consts, kn, kn, None, True, None, meta)
    want = ref.attend(q, st, consts, kn, kn, None, True, None, meta)
    assert ((out.float() - want.float()).norm() / want.float().norm()).item() < 1e-2


@gpu
@needs_gpu
def test_large_queries_keep_precision():
    # Pi q is stored in fp16 scaled by a power of two: |q| of 1e5 must not overflow, 1e-3 not underflow
    B, H, G, D, L = 1, 2, 4, 128, 2048
    st, consts, meta, gen = _state(B, H, L, D, 128, 1, 1500, torch.bfloat16, seed=5)
    kn = torch.randn(B, H, 1, D, generator=gen, device="cuda").to(torch.bfloat16)
    ref.append_(st, consts, kn, kn, meta)
    for s in (1e-3, 3e3):
        q = (torch.randn(B, H * G, 1, D, generator=gen, device="cuda") * s).to(torch.bfloat16)
        out = cr.rotation_attend_cuda(q, st, consts, kn, kn, None, True, 1.0 / s / D ** 0.5 * 3, meta)
        want = ref.attend(q, st, consts, kn, kn, None, True, 1.0 / s / D ** 0.5 * 3, meta)
        assert ((out.float() - want.float()).norm() / want.float().norm()).item() < 1e-2, s


@gpu
@needs_gpu
def test_cuda_attend_in_a_cuda_graph():
    B, H, G, D, L = 2, 4, 4, 128, 4096
    st, consts, meta, gen = _state(B, H, L, D, 128, 5, 3000, torch.bfloat16, seed=7)
    kk = torch.randn(B, H, 1, D, generator=gen, device="cuda").to(torch.bfloat16)
    vv = torch.randn_like(kk)
    qq = torch.randn(B, H * G, 1, D, generator=gen, device="cuda").to(torch.bfloat16)
    from qjl_compile.kernels.triton.rotation import rotation_append_
    g, out = capture_decode(rotation_append_, cr.rotation_attend_cuda, st, consts, kk, vv, qq, meta)
    outs, wants = [], []
    for _ in range(200):                      # crosses a residual flush (R = 128)
        kk.copy_(torch.randn(B, H, 1, D, generator=gen, device="cuda"))
        vv.copy_(torch.randn(B, H, 1, D, generator=gen, device="cuda"))
        qq.copy_(torch.randn(B, H * G, 1, D, generator=gen, device="cuda"))
        g.replay()
        want = ref.attend(qq, st, consts, kk, vv, None, True, None, meta)
        outs.append(out.float().clone())
        wants.append(want.float())
    o, w = torch.stack(outs), torch.stack(wants)
    assert ((o - w).norm() / w.norm()).item() < 1e-2
    assert int(st[0]) == 3200


@gpu
@needs_gpu
def test_dispatch_takes_the_cuda_kernel():
    from qjl_compile.kernels import triton as qjl_triton
    B, H, G, D, L = 1, 2, 4, 128, 2048
    st, consts, meta, gen = _state(B, H, L, D, 128, 1, 1500, torch.bfloat16, seed=9)
    q = torch.randn(B, H * G, 1, D, generator=gen, device="cuda").to(torch.bfloat16)
    kn = torch.randn(B, H, 1, D, generator=gen, device="cuda").to(torch.bfloat16)
    torch.ops.qjl.append(st, consts, kn, kn, meta)
    before = qjl_triton.ROUTES.copy()
    out = torch.ops.qjl.attend(q, st, consts, kn, kn, None, True, None, meta)
    assert qjl_triton.ROUTES["cuda"] == before.get("cuda", 0) + 1
    want = ref.attend(q, st, consts, kn, kn, None, True, None, meta)
    assert ((out.float() - want.float()).norm() / want.float().norm()).item() < 1e-2


def test_benchmark_variants_parse():
    # benchmarks/attend_cuda.py's launch variants map onto the launchers' keywords; typos are refused
    import importlib.util
    import os
    import sys
    bdir = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks")
    # the script puts benchmarks/ on sys.path for its siblings kbench / timer: undo that afterwards
    saved_path, saved = list(sys.path), {k: sys.modules.pop(k) for k in ("kbench", "timer") if k in sys.modules}
    try:
        spec = importlib.util.spec_from_file_location("attend_cuda_bench", os.path.join(bdir, "attend_cuda.py"))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path[:] = saved_path
        for k in ("kbench", "timer"):
            sys.modules.pop(k, None)
        sys.modules.update(saved)
    got = mod.parse_variants("default;nw=8 st=3;mask=f32 smask=1 early=1;pipe=0 pdl=1")
    assert got == [("default", {}), ("nw=8 st=3", {"num_warps": 8, "stages": 3}),
                   ("mask=f32 smask=1 early=1", {"mask": "f32", "stage_mask": True, "early": True}),
                   ("pipe=0 pdl=1", {"pipe": False, "pdl": True})]
    import inspect
    params = inspect.signature(cr.rotation_attend_cuda).parameters
    for key in ("nw", "ns", "st", "minb", "fo", "fq", "ki", "pdl", "pipe", "early", "smask"):
        assert mod.VARIANT_KEYS[key][0] in params, key
    with pytest.raises(SystemExit, match="unknown variant key"):
        mod.parse_variants("nwarps=8")
    with pytest.raises(SystemExit, match="f32 or bool"):
        mod.parse_variants("mask=f16")


@nvrtc_ok
def test_sass_count_tool_finds_the_group_loop():
    # benchmarks/sass_count.py: the hot loop of the default split is the 32-token group loop (its MMAs:
    # 8 IMMA for int8 keys, 16 HMMA for the values), and the pipes add up to the loop
    import importlib.util
    _cuobjdump()
    spec = importlib.util.spec_from_file_location(
        "sass_count", os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "sass_count.py"))
    sc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sc)
    src, fun, defines = sc.CONFIGS["rot-128k"]
    r = sc.count(src, fun, defines)
    assert r["opcodes"].get("IMMA") == 8 and r["opcodes"].get("HMMA") == 16, r["opcodes"]
    assert sum(r["pipes"].values()) == r["instructions"] > 300 and r["stack"] == 0
    assert sc.pipe_of("PRMT") == "alu" and sc.pipe_of("IMAD") == "fma" and sc.pipe_of("UIADD3") == "uniform"
    with pytest.raises(ValueError, match="no loop"):
        sc.loop_mix("/*0000*/ IADD3 R1, R1, 1 ;\n/*0010*/ EXIT ;")


@nvrtc_ok
@pytest.mark.parametrize("name", ["rot_decode", "qjl_decode"])
def test_timeline_stamps_only_when_asked(name, tmp_path):
    # benchmarks/timeline.py builds with TL=1; every other build must not carry the stamps
    from qjl_compile.kernels.cuda import compile_source
    qjl = dict(D=128, MS=256, MO=128, NO=8, VB=2, VG=32, RR=128, NW=4, QDT=1, MK=3, CAUSAL=0, CAUSAL_C=0)
    base = CONFIGS[-1] if name == "rot_decode" else qjl        # rot: the HAD default (prologue stamps 11, 12)
    found = {}
    for tl in (0, 1):
        path = tmp_path / f"k{tl}.cubin"
        path.write_bytes(compile_source(name, dict(base, **({"TL": 1} if tl else {})), "sm_90"))
        sass = subprocess.run([_cuobjdump(), "-sass", str(path)], capture_output=True, text=True, check=True).stdout
        found[tl] = {f: "GLOBALTIMER" in body for f, body in
                     re.findall(r"Function : (\w+)\n(.*?)(?=\n\s+Function : |\Z)", sass, re.S)}
    assert not any(found[0].values()), found[0]
    assert all(found[1].values()) and len(found[1]) == 3, found[1]
