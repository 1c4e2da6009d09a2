"""Rotation + Lloyd-Max codec (codec 2, kernels/rotation.py) on the GPU: append and fused attend.

Append (`rotation_append_`), two launches sized from static shapes (T, R, B*H) only:

- `_compress`: one program per (unit, b * kv head) of the largest block that T new tokens can
  complete, unit = the centering block when centering is on, else 32 tokens; which units are live
  is decided on the device from state[0]. A live program computes the unit's mean key/value
  (centering: stored rotated, Pi mu, in the side dtype), then per 32 tokens rotates
  (x - mu) with Pi (fp32 dot), codes every coordinate with the Lloyd-Max boundaries, packs the
  indices LSB-first (3 bits: 8 codes per 3 bytes), stores the per-vector scale (norm / match / lsq)
  and, for unbiased keys, the packed signs of S r and ||r|| of the residual
  r = (k - mu) - a c @ Pi. Attention-sink positions are also stored exact (side dtype).
- `_ring` (qjl_append's): the new tokens that stay exact go to the ring.

Then ``state[0] += T`` on the device. No host sync: it captures in a CUDA graph.

Attend (`rotation_attend`), flash-decoding like qjl_attend (DESIGN.md 4b): one program per
(b * kv head, block of query rows, split of positions), rows = GQA group x query tokens.
A program with compressed positions rotates its queries once (Pi q, and S q for unbiased keys),
then per tile of BT tokens decodes the key indices to codebook values in the dot dtype (a 2^b
entry table read through L1) and scores
    s_j = a_j <Pi q, c_j> + <Pi q, Pi mu_block> (+ c(m) ||r_j|| <S q, sign(S r_j)>)
with one tl.dot; values are accumulated in the rotated space (p_j a_j cv_j + p_j Pi mu_v) and
rotated back once (acc @ Pi) before the exact part: sink tokens, the ring and this step's new
tokens, in the original space. Each split writes its normalized partial output and log-sum-exp;
qjl_attend's `_combine` merges them. Lengths come from state[0] on the device.

Every option of the codec runs in these kernels (bits 1-4, scale modes, centering of keys and/or
values, sinks, unbiased keys); the launchers raise ValueError, naming the option, only for shapes
the tiles cannot serve: head_dim not a multiple of 16 or > 256, a centering block that is not a
multiple of 32 dividing R, or a residual sketch with m not a multiple of 8 in [16, 1024].
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .. import reference as ref
from .. import rotation as rot
from ..checks import late_constants
from .qjl_append import _SIDE, _ring, _sketch_signs
from .qjl_attend import (LOG2E, _ONE, _TL, _attend_exact, _combine, _interpret, _mask_scores, _p2, _signs_t,
                         _softmax_step, _store_partial, check_attend, check_device, mask_args, sketch_t)


# ----------------------------------------------------------------------------------------------
# shared pieces
# ----------------------------------------------------------------------------------------------
@triton.jit
def _unpack(ptr, rows, ok, BT: tl.constexpr, NB: tl.constexpr, BITS: tl.constexpr,
            D: tl.constexpr, DP: tl.constexpr):
    """Packed indices of tokens `rows` -> (BT, DP) int32 (LSB first; 3 bits: 8 codes per 3 bytes)."""
    if BITS == 3:
        g = tl.arange(0, DP // 8)
        base = ptr + rows[:, None] * NB + g[None, :] * 3
        m = ok[:, None] & (g[None, :] < D // 8)
        w = tl.load(base, mask=m, other=0).to(tl.int32)
        w = w | (tl.load(base + 1, mask=m, other=0).to(tl.int32) << 8)
        w = w | (tl.load(base + 2, mask=m, other=0).to(tl.int32) << 16)
        c = (w[:, :, None] >> (tl.arange(0, 8) * 3)[None, None, :]) & 7
    else:
        PER: tl.constexpr = 8 // BITS
        bi = tl.arange(0, DP // PER)
        by = tl.load(ptr + rows[:, None] * NB + bi[None, :], mask=ok[:, None] & (bi[None, :] < NB), other=0)
        c = (by.to(tl.int32)[:, :, None] >> (tl.arange(0, PER) * BITS)[None, None, :]) & ((1 << BITS) - 1)
    return tl.reshape(c, (BT, DP))


@triton.jit
def _store_codes(OUT, row, idx, BITS: tl.constexpr, D: tl.constexpr, DP: tl.constexpr):
    """(32, DP) int32 indices -> packed rows `row` of OUT (inverse of `_unpack`)."""
    NB: tl.constexpr = D * BITS // 8
    if BITS == 3:
        c = tl.reshape(idx, (32, DP // 8, 8))
        w = tl.sum(c << (tl.arange(0, 8) * 3)[None, None, :], 2)
        g = tl.arange(0, DP // 8)
        m = (g < D // 8)[None, :]
        base = OUT + row[:, None] * NB + g[None, :] * 3
        tl.store(base, (w & 255).to(tl.uint8), mask=m)
        tl.store(base + 1, ((w >> 8) & 255).to(tl.uint8), mask=m)
        tl.store(base + 2, ((w >> 16) & 255).to(tl.uint8), mask=m)
    else:
        PER: tl.constexpr = 8 // BITS
        c = tl.reshape(idx, (32, DP // PER, PER))
        pk = tl.sum(c << (tl.arange(0, PER) * BITS)[None, None, :], 2).to(tl.uint8)
        pb = tl.arange(0, DP // PER)
        tl.store(OUT + row[:, None] * NB + pb[None, :], pk, mask=(pb < NB)[None, :])


@triton.jit
def _unpack_frag(ptr, rows, ok, BT: tl.constexpr, BITS: tl.constexpr, D: tl.constexpr):
    """As `_unpack` for value codes in fragment order (rotation.frag_pack): token j = 16 tt + 8 k + 2 t + a
    and channel c = (D/8) g + 2 i + h of a 32-token group sit in lane 4 g + t, nibble word tt (D/16) + i,
    nibble 4 k + 2 a + h; a lane holds D*BITS/32 int32 words (3 bits: 4 nibble words in 3, the fourth's
    bits in bit 3 of the others' nibbles). Gathers: the fallback path, the CUDA kernel reads whole lanes."""
    NT: tl.constexpr = D // 16
    WL: tl.constexpr = D * BITS // 32
    c = tl.arange(0, D)
    j = rows % 32
    base = (rows // 32) * (32 * WL)                                          # int32 words
    lane = 4 * (c // (D // 8))[None, :] + ((j // 2) % 4)[:, None]
    q = (j // 16)[:, None] * NT + ((c % (D // 8)) // 2)[None, :]
    nb = 4 * ((j // 8) % 2)[:, None] + 2 * (j % 2)[:, None] + (c % 2)[None, :]
    wp = ptr.to(tl.pointer_type(tl.int32)) + base[:, None] + lane * WL
    m = ok[:, None] & (c < D)[None, :]
    if BITS == 4:
        w = tl.load(wp + q, mask=m, other=0)
        out = (w >> (4 * nb)) & 15
    else:
        blk = q // 4
        r = q % 4
        sh = 4 * nb
        # nibble words 0-2 of a block: one word; word 3: bit 3 of the same nibble in all three
        w = tl.load(wp + 3 * blk + tl.where(r == 3, 0, r), mask=m, other=0)
        m3 = m & (r == 3)
        w1 = tl.load(wp + 3 * blk + 1, mask=m3, other=0)
        w2 = tl.load(wp + 3 * blk + 2, mask=m3, other=0)
        hi = ((w >> (sh + 3)) & 1) | (((w1 >> (sh + 3)) & 1) << 1) | (((w2 >> (sh + 3)) & 1) << 2)
        out = tl.where(r == 3, hi, (w >> sh) & 7)
    return out


@triton.jit
def _store_codes_frag(OUT, row0, idx, BITS: tl.constexpr, D: tl.constexpr):
    """(32, D) int32 codes of the 32-token group starting at row `row0` -> fragment order (inverse of
    `_unpack_frag`; rotation.frag_pack is the reference)."""
    NT: tl.constexpr = D // 16
    WL: tl.constexpr = D * BITS // 32
    x = tl.reshape(idx, (2, 2, 4, 2, 8, NT, 2))                   # tt, k, t, a, g, i, h
    x = tl.permute(x, (4, 2, 0, 5, 1, 3, 6))                       # g, t, tt, i, k, a, h
    sh = 4 * tl.arange(0, 8)
    wp = OUT.to(tl.pointer_type(tl.int32)) + (row0 // 32) * (32 * WL)
    lane = tl.arange(0, 32)
    if BITS == 4:
        nib = tl.reshape(x, (32, 2 * NT, 8))
        w = tl.sum(nib << sh[None, None, :], 2)
        tl.store(wp + lane[:, None] * WL + tl.arange(0, 2 * NT)[None, :], w)
    else:
        nib = tl.reshape(x, (32, NT // 2, 4, 8))                   # lane, block, r, nibble
        r = tl.arange(0, 4)[None, None, :, None]
        n3 = tl.sum(tl.where(r == 3, nib, 0), 2)                   # lane, block, nibble
        wr = nib | (((n3[:, :, None, :] >> r) & 1) << 3)
        w = tl.sum(wr << sh[None, None, None, :], 3)                # lane, block, r
        blk = tl.arange(0, NT // 2)[None, :, None]
        rr = tl.arange(0, 4)[None, None, :]
        tl.store(wp + lane[:, None, None] * WL + 3 * blk + rr, w, mask=rr < 3)


@triton.jit
def _to_side(x, SIDE: tl.constexpr, EMU: tl.constexpr):
    """fp32 -> side dtype, round to nearest even. EMU: by hand for bf16, because the triton 3.9
    interpreter truncates fp32 -> bf16 (CPU tests only; GPUs round in hardware)."""
    if EMU:
        b = x.to(tl.int32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & -65536
        return b.to(tl.float32, bitcast=True).to(SIDE)
    return x.to(SIDE)


@triton.jit
def _quantize(x, PiT, d_ok, BD, CB, sqrt_d, NLEV: tl.constexpr, SMODE: tl.constexpr, PREC: tl.constexpr):
    """rotation.quantize of 32 vectors x (32, DP) fp32 -> (indices int32, codebook values fp32, scale fp32).

    PiT (DP, DP) fp32 = Pi^T (zero padded); BD: the NLEV - 1 decision boundaries; CB: centroids.
    """
    r = tl.dot(x, PiT, input_precision=PREC)                                # Pi x, row per token
    nrm = tl.sqrt(tl.sum(x * x, 1))
    y = r * (sqrt_d / tl.maximum(nrm, 1e-30))[:, None]
    idx = tl.zeros(y.shape, tl.int32)
    for i in tl.static_range(NLEV - 1):                                      # torch.bucketize(y, bounds)
        idx += (y > tl.load(BD + i)).to(tl.int32)
    c = tl.where(d_ok[None, :], tl.load(CB + idx), 0.0)
    if SMODE == 0:
        a = nrm / sqrt_d
    elif SMODE == 1:
        a = nrm / tl.sqrt(tl.sum(c * c, 1))
    else:
        a = tl.sum(r * c, 1) / tl.sum(c * c, 1)
    a = tl.where(nrm > 0, a, 0.0)
    return idx, c, a, r


@triton.jit
def _block_mean(SRC_R, SRC_N, off_r0, off_n0, srt, skt, p0, n, c0, d_ok, PiT, MEAN, mrow,
                UNIT: tl.constexpr, DP: tl.constexpr, SIDE: tl.constexpr, EMU: tl.constexpr):
    """Mean of UNIT tokens from p0 (ring or new), stored rotated (Pi mu, side dtype).

    Returns mu_dec = (Pi mu)_side @ Pi (DP,) fp32, what rotation._center subtracts."""
    dd = tl.arange(0, DP)
    acc = tl.zeros([DP], tl.float32)
    for s0 in range(0, UNIT, 32):
        tok = p0 + s0 + tl.arange(0, 32)
        in_ring = tok < n
        m_r = in_ring[:, None] & d_ok[None, :]
        m_n = (~in_ring)[:, None] & d_ok[None, :]
        x = tl.where(m_r, tl.load(SRC_R + off_r0 + (tok - c0)[:, None] * srt + dd[None, :], mask=m_r, other=0.0),
                     tl.load(SRC_N + off_n0 + (tok - n)[:, None] * skt + dd[None, :], mask=m_n, other=0.0))
        acc += tl.sum(x.to(tl.float32), 0)
    mu = acc / UNIT
    mu_rot = _to_side(tl.sum(PiT * mu[:, None], 0), SIDE, EMU)                          # (Pi mu)_e
    tl.store(MEAN + mrow + dd, mu_rot, mask=d_ok)
    return tl.sum(PiT * mu_rot.to(tl.float32)[None, :], 1)                  # (mu_rot @ Pi)_d


# ----------------------------------------------------------------------------------------------
# append
# ----------------------------------------------------------------------------------------------
@triton.jit
def _compress(
    K, V, skb, skh, skt,                     # new tokens (B, H, T, D)
    RK, RV, srb, srh, srt,                   # ring (B, H, R, D)
    LEN,
    KIDX, KSCALE, KQJL, KRES, KMEAN, VIDX, VSCALE, VMEAN, KSINK, VSINK,
    PI, BDK, CBK, BDV, CBV, PS_T,            # Pi (D, D), boundaries, codebooks, Pi S^T (D, m): fp32
    H, T, LC, sqrt_d,
    R: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, KB: tl.constexpr, VB: tl.constexpr,
    UB: tl.constexpr, M: tl.constexpr, MC: tl.constexpr, SMODE: tl.constexpr, NS: tl.constexpr,
    CK: tl.constexpr, CV: tl.constexpr, UNIT: tl.constexpr, SIDE: tl.constexpr, PREC: tl.constexpr,
    NLK: tl.constexpr, NLV: tl.constexpr, EMU: tl.constexpr, VFR: tl.constexpr,
):
    gi = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    n = tl.load(LEN).to(tl.int32)
    c0 = n // R * R
    c1 = (n + T) // R * R
    p0 = c0 + gi * UNIT
    if (p0 < c1) & (p0 + UNIT <= LC):
        dd = tl.arange(0, DP)
        d_ok = dd < D
        PiT = tl.load(PI + dd[None, :] * D + dd[:, None], mask=d_ok[:, None] & d_ok[None, :], other=0.0)
        off_r0 = b * srb + h * srh
        off_n0 = b * skb + h * skh
        mrow = (bh * (LC // UNIT) + p0 // UNIT) * D
        mu_k = tl.zeros([DP], tl.float32)
        mu_v = tl.zeros([DP], tl.float32)
        if CK:
            mu_k = _block_mean(RK, K, off_r0, off_n0, srt, skt, p0, n, c0, d_ok, PiT, KMEAN, mrow, UNIT, DP, SIDE, EMU)
        if CV:
            mu_v = _block_mean(RV, V, off_r0, off_n0, srt, skt, p0, n, c0, d_ok, PiT, VMEAN, mrow, UNIT, DP, SIDE, EMU)
        for s0 in range(0, UNIT, 32):
            tok = p0 + s0 + tl.arange(0, 32)
            in_ring = tok < n
            m_r = in_ring[:, None] & d_ok[None, :]
            m_n = (~in_ring)[:, None] & d_ok[None, :]
            off_r = off_r0 + (tok - c0)[:, None] * srt + dd[None, :]
            off_n = off_n0 + (tok - n)[:, None] * skt + dd[None, :]
            row = bh * LC + tok
            k = tl.where(m_r, tl.load(RK + off_r, mask=m_r, other=0.0), tl.load(K + off_n, mask=m_n, other=0.0))
            v = tl.where(m_r, tl.load(RV + off_r, mask=m_r, other=0.0), tl.load(V + off_n, mask=m_n, other=0.0))
            if NS > 0:                                       # attention sinks: exact copies
                sm = (tok < NS)[:, None] & d_ok[None, :]
                so = (bh * NS + tok)[:, None] * D + dd[None, :]
                tl.store(KSINK + so, _to_side(k.to(tl.float32), SIDE, EMU), mask=sm)
                tl.store(VSINK + so, _to_side(v.to(tl.float32), SIDE, EMU), mask=sm)
            xk = k.to(tl.float32) - mu_k[None, :]
            ik, ck, ak, rk = _quantize(xk, PiT, d_ok, BDK, CBK, sqrt_d, NLK, SMODE, PREC)
            if VFR and KB == 4:                              # kernel layout: 4-bit codes sign-magnitude
                _store_codes(KIDX, row, ik ^ (7 * (ik >> 3)), KB, D, DP)
            else:
                _store_codes(KIDX, row, ik, KB, D, DP)
            ak_s = _to_side(ak, SIDE, EMU)
            tl.store(KSCALE + row, ak_s)
            if UB:                                           # 1-bit QJL sketch of the residual
                # x - Pi^T (a c) = Pi^T (Pi x - a c): its norm and sketch in rotated space with
                # PS_T = Pi S^T, so no second (transposed) Pi operand in shared memory
                res = rk - ck * ak_s.to(tl.float32)[:, None]
                tl.store(KRES + row, _to_side(tl.sqrt(tl.sum(res * res, 1)), SIDE, EMU))
                _sketch_signs(res, PS_T, KQJL, row, M, DP, D, MC, PREC)
            xv = v.to(tl.float32) - mu_v[None, :]
            iv, cv, av, _ = _quantize(xv, PiT, d_ok, BDV, CBV, sqrt_d, NLV, SMODE, PREC)
            if VFR:
                _store_codes_frag(VIDX, bh * LC + p0 + s0, iv ^ (7 * (iv >> 3)) if VB == 4 else iv, VB, D)
            else:
                _store_codes(VIDX, row, iv, VB, D, DP)
            tl.store(VSCALE + row, _to_side(av, SIDE, EMU))


# ----------------------------------------------------------------------------------------------
# attend
# ----------------------------------------------------------------------------------------------
@triton.jit
def _attend_split(
    Q, sqb, sqh, sqt,
    LEN,
    RK, RV, srb, srh, srt,
    KNEW, VNEW, snb, snh, snt,
    KIDX, KSCALE, KQJL, KRES, KMEAN, VIDX, VSCALE, VMEAN, KSINK, VSINK,
    PI, CBK, CBV, ST,                                  # in the dot dtype: Pi (D, D), codebooks, S^T (D, m)
    MASK, smb, smh, smt, sml,
    OPART, LSE, SQS,                                   # SQS: (programs, MP, BM) scratch for S q
    H, Tq, T, LC, CHUNK, NSPLIT,
    qk_scale, c_res,
    G: tl.constexpr, R: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
    KB: tl.constexpr, VB: tl.constexpr, UB: tl.constexpr, M: tl.constexpr, MP: tl.constexpr,
    MC: tl.constexpr, CK: tl.constexpr, CV: tl.constexpr, BLK: tl.constexpr, NS: tl.constexpr,
    BM: tl.constexpr, BT: tl.constexpr, BN: tl.constexpr,
    MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr, DT: tl.constexpr, ONE: tl.constexpr, VFR: tl.constexpr,
):
    bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    sp = tl.program_id(2)
    b = bh // H
    h = bh % H
    Mr = G * Tq

    n = tl.load(LEN).to(tl.int32)
    c1 = n // R * R
    cl = tl.minimum(c1, n - T)
    lo = sp * CHUNK
    hi = tl.minimum(lo + CHUNK, n)

    ri = tl.arange(0, BM)
    r = pid_m * BM + ri
    rows_ok = r < Mr
    g = r // Tq
    t = r % Tq
    qh = h * G + g
    qpos = n - Tq + t
    dd = tl.arange(0, DP)
    d_ok = dd < D
    q_row = Q + b * sqb + qh * sqh + t * sqt
    q = tl.load(q_row[:, None] + dd[None, :], mask=rows_ok[:, None] & d_ok[None, :], other=0.0).to(DT)

    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, DP], tl.float32)

    hi_c = tl.minimum(hi, cl)
    if lo < hi_c:
        pi_m = d_ok[:, None] & d_ok[None, :]
        piT = tl.load(PI + dd[None, :] * D + dd[:, None], mask=pi_m, other=0.0)
        pq = tl.dot(q, piT)                                                     # Pi q, once
        pq_dt = pq.to(DT)
        if UB:
            ms = tl.arange(0, MP)
            sq = tl.dot(q, tl.load(ST + dd[:, None] * M + ms[None, :], mask=d_ok[:, None] & (ms[None, :] < M),
                                   other=0.0))
            sqs = SQS + ((bh * tl.num_programs(1) + pid_m) * NSPLIT + sp) * (MP * BM)
            tl.store(sqs + ms[None, :] * BM + ri[:, None], sq.to(DT))            # read back in m-chunks
            tl.debug_barrier()
        tok = tl.arange(0, BT)
        NBK: tl.constexpr = D * KB // 8
        NBV: tl.constexpr = D * VB // 8
        for p0 in range(lo, hi_c, BT):
            pos = p0 + tok
            ok = pos < hi_c
            rows = bh * LC + pos
            ik = _unpack(KIDX, rows, ok, BT, NBK, KB, D, DP)
            if VFR and KB == 4:
                ik = ik ^ (7 * (ik >> 3))
            ck = tl.load(CBK + ik, mask=d_ok[None, :], other=0.0)             # (BT, DP) codebook values
            s = tl.dot(pq_dt, tl.trans(ck))                                    # (BM, BT)
            ak = tl.load(KSCALE + rows, mask=ok, other=0.0).to(tl.float32)
            s = s * ak[None, :]
            if CK:                                   # a tile lies in one centering block (BLK % BT == 0)
                mk = tl.load(KMEAN + (bh * (LC // BLK) + p0 // BLK) * D + dd, mask=d_ok, other=0.0)
                s += tl.sum(pq * mk.to(tl.float32)[None, :], 1)[:, None]
            if UB:
                raw = tl.zeros([BM, BT], tl.float32)
                for c0 in tl.static_range(0, MP, MC):
                    mc = c0 + tl.arange(0, MC)
                    sg = _signs_t(KQJL, rows, ok, BT, M // 8, c0, MC, DT, ONE)  # (BT, MC)
                    sqc = tl.load(sqs + mc[None, :] * BM + ri[:, None])          # (BM, MC)
                    raw = tl.dot(sqc, tl.trans(sg), acc=raw)
                rn = tl.load(KRES + rows, mask=ok, other=0.0).to(tl.float32)
                s += raw * (c_res * rn)[None, :]
            s = _mask_scores(s * qk_scale, pos, hi_c, rows_ok, b, qh, t, qpos,
                             MASK, smb, smh, smt, sml, MASK_KIND, CAUSAL)
            if NS > 0:                               # sink positions are attended exact below
                s = tl.where((pos >= NS)[None, :], s, float("-inf"))
            p, m_i, l_i, acc = _softmax_step(s, m_i, l_i, acc)
            av = tl.load(VSCALE + rows, mask=ok, other=0.0).to(tl.float32)
            if VFR:
                iv = _unpack_frag(VIDX, rows, ok, BT, VB, D)
                if VB == 4:
                    iv = iv ^ (7 * (iv >> 3))
            else:
                iv = _unpack(VIDX, rows, ok, BT, NBV, VB, D, DP)
            cv = tl.load(CBV + iv, mask=d_ok[None, :], other=0.0)
            acc = tl.dot((p * av[None, :]).to(DT), cv, acc=acc)
            if CV:
                mv = tl.load(VMEAN + (bh * (LC // BLK) + p0 // BLK) * D + dd, mask=d_ok, other=0.0)
                acc += tl.sum(p, 1)[:, None] * mv.to(tl.float32)[None, :]
        # back to the original space once: acc @ Pi, acc split hi + lo so fp32 survives the dot dtype
        pi = tl.load(PI + dd[:, None] * D + dd[None, :], mask=pi_m, other=0.0)
        a_hi = acc.to(DT)
        acc = tl.dot(a_hi, pi) + tl.dot((acc - a_hi.to(tl.float32)).to(DT), pi)

    if NS > 0:                                       # sink tokens: exact (side dtype)
        hi_s = tl.minimum(hi_c, NS)
        for p0 in range(lo, hi_s, BN):
            pos = p0 + tl.arange(0, BN)
            ok = pos < hi_s
            m2 = ok[:, None] & d_ok[None, :]
            off = (bh * NS + pos)[:, None] * D + dd[None, :]
            k = tl.load(KSINK + off, mask=m2, other=0.0)
            s = tl.dot(q, tl.trans(k.to(DT)))
            s = _mask_scores(s * qk_scale, pos, hi_s, rows_ok, b, qh, t, qpos,
                             MASK, smb, smh, smt, sml, MASK_KIND, CAUSAL)
            p, m_i, l_i, acc = _softmax_step(s, m_i, l_i, acc)
            v = tl.load(VSINK + off, mask=m2, other=0.0)
            acc = tl.dot(p.to(DT), v.to(DT), acc=acc)

    lo_e = tl.maximum(lo, cl)
    if lo_e < hi:
        m_i, l_i, acc = _attend_exact(q, m_i, l_i, acc, lo_e, hi, n, T, c1, b, h, qh, t, qpos, rows_ok, dd, d_ok,
                                      RK, RV, srb, srh, srt, KNEW, VNEW, snb, snh, snt,
                                      MASK, smb, smh, smt, sml, qk_scale, BN, MASK_KIND, CAUSAL, DT)

    _store_partial(OPART, LSE, m_i, l_i, acc, bh * NSPLIT + sp, Mr, r, rows_ok, dd, DP)


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------
_DERIVED: dict = {}
_OOR: dict = {}        # launch key -> tokens per iteration (bt) that fit in shared memory


def _derived(consts, dtype: torch.dtype) -> dict:
    """Kernel constants derived from rotation consts, cached per (Pi storage, dtype).

    Pi, codebooks and sketch in `dtype` (the attend's dot dtype) and fp32 (append), and the
    Lloyd-Max decision boundaries. The sources are kept alive in the entry, so a cached address
    is never reused by another tensor. `prepare` fills this at cache allocation (not in a capture).
    """
    Pi, cbk, cbv, S = consts
    key = (Pi.data_ptr(), cbk.data_ptr(), cbv.data_ptr(), Pi.device, dtype)
    hit = _DERIVED.get(key)
    if hit is None:
        late_constants(Pi.device)
        f32 = [c.to(torch.float32).contiguous() for c in (Pi, cbk, cbv)]
        hit = dict(src=(Pi, cbk, cbv, S), pi=f32[0].to(dtype), cbk=f32[1].to(dtype), cbv=f32[2].to(dtype),
                   pi32=f32[0], cbk32=f32[1], cbv32=f32[2],
                   bdk=rot._bounds(f32[1]).contiguous(), bdv=rot._bounds(f32[2]).contiguous())
        if S.shape[0]:
            hit["st"] = sketch_t(S, dtype)
            hit["pst32"] = (Pi.double() @ S.double().t()).to(torch.float32).contiguous()   # append, rotated space
        _DERIVED[key] = hit
    return hit


def _dot_dtype(dtype: torch.dtype) -> torch.dtype:
    if _interpret() and dtype == torch.bfloat16:
        return torch.float32            # the interpreter's bf16 tl.dot is wrong (triton 3.9); CPU only
    return dtype


def prepare(consts, dtype: torch.dtype) -> None:
    """Build the derived constants for `dtype` ahead of any CUDA-graph capture (kernels.triton.prepare)."""
    _derived(consts, torch.float32)
    _derived(consts, _dot_dtype(dtype))


def check_rotation(state, consts, meta, what):
    """Checks of a rotation layer state; returns (dims dict, named buffers dict)."""
    if int(meta[0]) != 2:
        raise NotImplementedError(f"{what}: this kernel serves codec 2 (rotation), got codec {meta[0]}")
    codec = ref.CODECS[2]
    R, L, params = int(meta[1]), int(meta[2]), list(meta[3:])
    kb, vb, ub, sm, sink, center, block = rot.parse(params)
    if rot.outlier_tokens(params) != (0, 0):
        raise NotImplementedError(f"{what}: exact outlier tokens (rotation params key_outliers/value_outliers = "
                                  f"{list(rot.outlier_tokens(params))}, QJLConfig.rotation_key_outliers/"
                                  f"rotation_value_outliers) are not implemented in the fused Triton rotation "
                                  f"kernels; use them with the CPU reference (kernels/rotation.py)")
    if len(consts) != 4:
        raise ValueError(f"{what}: rotation consts are [Pi, codebook_k, codebook_v, S], got {len(consts)} tensors")
    rk = state[1]
    B, H, Rr, D = rk.shape
    if Rr != R or R % 32:
        raise ValueError(f"{what}: ring has {Rr} slots but meta R={R} (must match, multiple of 32)")
    if D % 16 or D > 256:
        raise ValueError(f"{what}: head_dim={D} must be a multiple of 16 <= 256 (tile shapes)")
    if center and (block % 32 or R % block):
        raise ValueError(f"{what}: option center={center} needs a centering block that is a multiple of 32 "
                         f"dividing R={R}, got block={block} (the cache passes block=R)")
    m = consts[3].shape[0]
    if ub and (m % 8 or m < 16 or m > 1024):
        raise ValueError(f"{what}: option unbiased=1 needs a residual sketch with m a multiple of 8 in "
                         f"[16, 1024], got m={m}")
    specs = codec.specs(D, consts, params)
    if len(state) != 3 + len(specs):
        raise ValueError(f"{what}: rotation state for params {params} has {3 + len(specs)} tensors, got {len(state)}")
    LC = L // R * R
    bufs = {}
    for s, tns in zip(specs, state[3:]):
        rows = (min(LC, s.head) if s.head else LC) // s.per
        shp = (B, H, rows, *s.tail)
        if tuple(tns.shape) != shp or not tns.is_contiguous():
            raise ValueError(f"{what}: buffer {s.name} must be contiguous {shp}, got {tuple(tns.shape)} "
                             f"(contiguous={tns.is_contiguous()})")
        bufs[s.name] = tns
    if state[2].shape != rk.shape or state[0].numel() != 1:
        raise ValueError(f"{what}: state[0] must be a scalar length and state[2] match state[1]")
    side = bufs["kscale"].dtype
    if side not in _SIDE:
        raise ValueError(f"{what}: side dtype {side} unsupported")
    dims = dict(B=B, H=H, R=R, D=D, L=L, LC=LC, kb=kb - ub, vb=vb, ub=ub, sm=sm, ns=min(LC, sink) if sink else 0,
                ck=center & 1, cv=(center >> 1) & 1, block=block, m=m, side=side, vfrag=int(rot.value_frag(params)))
    return dims, bufs


def _ptrs(bufs):
    """Buffers in the kernels' argument order; absent ones replaced by a dummy (dead code)."""
    d = bufs["kidx"]
    return [bufs.get(n, d) for n in ("kidx", "kscale", "kqjl", "kres", "kmean", "vidx", "vscale", "vmean",
                                     "ksink", "vsink")]


def rotation_append_(state, consts, k, v, meta):
    """Append T tokens to one rotation-codec layer cache in place (semantics of reference.append_).

    Parameters
    ----------
    state : list of Tensor
        Rotation cache state (mutated): length, ring K/V (B, H, R, D), the codec buffers of
        `RotationCodec.specs` in order.
    consts : list of Tensor
        [Pi (D, D), codebook_k (2^bk,), codebook_v (2^vb,), S (m, D)] fp32 (rotation.make_consts).
    k, v : Tensor
        (B, H, T, D) new keys (after RoPE) and values, in the ring's dtype.
    meta : list of int
        [2, R, L, key_bits, value_bits, unbiased, scale_mode, sink, center, block].

    Notes
    -----
    Codes equal the reference's up to fp32 rounding of the rotation (an index can differ where a
    rotated coordinate lies within ~1e-6 of a Lloyd-Max boundary, a side value by one rounding
    step). No overflow check (it would need a host sync): callers check length + T <= L.
    """
    dims, bufs = check_rotation(state, consts, meta, "rotation_append_")
    check_device(k, v, state[0], state[1], consts[0], what="rotation_append_")
    B, H, R, D, LC = dims["B"], dims["H"], dims["R"], dims["D"], dims["LC"]
    rk, rv = state[1], state[2]
    if k.dim() != 4 or k.shape != v.shape or tuple(k.shape[:2]) != (B, H) or k.shape[3] != D:
        raise ValueError(f"rotation_append_: k/v must be (B={B}, H={H}, T, D={D}), got {tuple(k.shape)} / {tuple(v.shape)}")
    if k.dtype != rk.dtype or v.dtype != rk.dtype or rk.dtype not in _TL:
        raise ValueError(f"rotation_append_: k/v dtype {k.dtype}/{v.dtype} must equal the ring's {rk.dtype}")
    if rk.stride(-1) != 1 or rk.stride() != rv.stride():
        raise ValueError("rotation_append_: ring buffers must be contiguous in D and share strides")
    T = k.shape[2]
    if T == 0:
        return
    if k.stride(-1) != 1 or v.stride() != k.stride():
        k, v = k.contiguous(), v.contiguous()
    DP = _p2(D)
    c = _derived(consts, torch.float32)
    unit = dims["block"] if (dims["ck"] or dims["cv"]) else 32
    nunits = (R - 1 + T) // R * R // unit                         # most units T tokens can complete
    if nunits:
        m = dims["m"]
        _compress[(nunits, B * H)](
            k, v, k.stride(0), k.stride(1), k.stride(2),
            rk, rv, rk.stride(0), rk.stride(1), rk.stride(2),
            state[0], *_ptrs(bufs),
            c["pi32"], c["bdk"], c["cbk32"], c["bdv"], c["cbv32"], c.get("pst32", c["pi32"]),
            H, T, LC, math.sqrt(D),
            R=R, D=D, DP=DP, KB=dims["kb"], VB=dims["vb"], UB=dims["ub"], M=max(m, 16),
            MC=min(64, _p2(max(m, 16))), SMODE=dims["sm"], NS=dims["ns"], CK=dims["ck"], CV=dims["cv"],
            UNIT=unit, SIDE=_SIDE[dims["side"]], NLK=1 << dims["kb"], NLV=1 << dims["vb"],
            EMU=_interpret() and dims["side"] == torch.bfloat16, VFR=dims["vfrag"],
            PREC="ieee" if _interpret() else "tf32x3",     # tf32x3: ~fp32 accuracy on tensor cores
            # shared memory at D=128 (sm_90 compile): 16-bit 197 KB at 2 stages (229 KB at 3, at the
            # 227 KB limit); fp32 164 KB at 1 stage (295 KB at 3)
            num_warps=8, num_stages=2 if k.element_size() < 4 else 1,
        )
    BS = 32
    _ring[(triton.cdiv(R, BS), B * H)](
        k, v, k.stride(0), k.stride(1), k.stride(2), rk, rv, rk.stride(0), rk.stride(1), rk.stride(2),
        state[0], H, T, R=R, D=D, DP=DP, BS=BS, num_warps=4)
    state[0].add_(T)


def _config(B, H, n_mb, L, cuda):
    """Static launch configuration from shapes only (no run-time autotune: CUDA-graph safe).

    A program that reaches compressed tokens reads Pi twice (2 D^2 dot-dtype values, 64 KB at
    D=128 bf16), so a split covers at least 512 positions to keep that under the codes it reads.
    """
    target = 4 * 132 if cuda else 4
    nsplit = max(1, min(triton.cdiv(target, B * H * n_mb), triton.cdiv(L, 512)))
    if not cuda:
        return dict(bt=32, num_warps=4, nsplit=nsplit)
    # H100, benchmarks/kernels.py variant rows (rotation-k4v3 / rotation4, bf16, d=128):
    # B=1 L=4k: bt=128 w8 39/36 us vs bt=64 w4 49/43; B=1 L=128k (66 splits): bt=32 w4 321/282 vs
    # 374/303; B=16 L=16k (5 splits): bt=64 w4 544/466, every other tile slower
    if B * H * L <= 65536:
        return dict(bt=128, num_warps=8, nsplit=nsplit)
    if nsplit >= 16:
        return dict(bt=32, num_warps=4, nsplit=nsplit)
    return dict(bt=64, num_warps=4, nsplit=nsplit)


def rotation_attend(q, state, consts, k_new, v_new, attn_mask=None, is_causal=False, scale=None, meta=None,
                    nsplit=None, bt=None, num_warps=None):
    """Fused attention over one rotation-codec layer's cache, after `append` (reference.attend).

    Parameters
    ----------
    q : Tensor
        (B, Hq, Tq, D) fp16/bf16/fp32, Hq = G * H, G * Tq <= 64 rows per kv head intended
        (kernels.triton sends longer chunks to the PyTorch path).
    state : list of Tensor
        Rotation cache state (kernels/reference.py), length in state[0] read on the device.
    consts : list of Tensor
        [Pi (D, D), codebook_k, codebook_v, S (m, D)] fp32.
    k_new, v_new : Tensor
        (B, H, T, D) this step's tokens, attended exactly.
    attn_mask : Tensor, optional
        Bool (True = attend) or additive float, broadcastable to (B, Hq, Tq, L).
    is_causal : bool
        Without a mask, query i sees positions <= length - Tq + i.
    scale : float, optional
        Score scale, default 1/sqrt(D).
    meta : list of int
        [2, R, L, key_bits, value_bits, unbiased, scale_mode, sink, center, block].
    nsplit : int, optional
        Number of position splits (default from static shapes).
    bt : int, optional
        Compressed tokens per tile (16, 32, 64 or 128; divides the centering block). On CUDA,
        at least 64 when more than 16 query rows share a kv head (smaller tiles miscompute there).
    num_warps : int, optional
        Warps per split program.

    Returns
    -------
    Tensor
        (B, Hq, Tq, D) in q's dtype.

    Notes
    -----
    Scores and values use the codebooks and Pi rounded to the dot dtype (q's; fp32 -> tf32 on
    tensor cores), so the result matches reference.attend to the dtype's precision.
    """
    dims, bufs = check_rotation(state, consts, meta, "rotation_attend")
    check_device(q, k_new, v_new, state[0], state[1], attn_mask, consts[0], what="rotation_attend")
    B, H, R, D, L, LC = dims["B"], dims["H"], dims["R"], dims["D"], dims["L"], dims["LC"]
    q, k_new, v_new, Tq, T, G = check_attend(q, state, k_new, v_new, B, H, D, "rotation_attend")
    Mr = G * Tq
    rk, rv = state[1], state[2]

    mask_kind, mt, ms = mask_args(attn_mask, q)

    dot_dt = _dot_dtype(q.dtype)
    c = _derived(consts, dot_dt)
    BM = 16 if Mr <= 16 else (32 if Mr <= 32 else 64)
    n_mb = triton.cdiv(Mr, BM)
    cfg = _config(B, H, n_mb, L, q.is_cuda)
    bt = bt or cfg["bt"]
    if BM > 16 and q.is_cuda:
        # H100, triton 3.6: with 64-row blocks, tiles of 16 or 32 tokens gave NaN / wrong rows (the
        # interpreter is right on the same case), 64-token tiles are right; 32-row blocks untested
        bt = max(bt, 64)
    if dims["ck"] or dims["cv"]:
        while dims["block"] % bt:
            bt //= 2
    if bt not in (16, 32, 64, 128):
        raise ValueError(f"rotation_attend: bt={bt} must be 16, 32, 64 or 128")
    num_warps = num_warps or cfg["num_warps"]
    ns0 = nsplit or cfg["nsplit"]
    DP = _p2(D)
    m = dims["m"]
    MP = _p2(max(m, 16))
    out = torch.empty_like(q)
    sc = float(scale) if scale is not None else 1.0 / math.sqrt(D)
    # a tile that needs more shared memory than the GPU has (large BM with bt=128) is retried
    # with half the tokens per iteration
    def oor_key(bt0=bt):    # built only once a launch has failed (not per call)
        return (q.device.index, bt0, num_warps, BM, D, G, mask_kind, dot_dt, tuple(sorted(dims.items())))

    if _OOR:
        bt = _OOR.get(oor_key(), bt)
    key = None
    while True:
        chunk = triton.cdiv(triton.cdiv(L, ns0), bt) * bt
        ns = triton.cdiv(L, chunk)
        opart = torch.empty(B * H, ns, Mr, DP, device=q.device, dtype=torch.float32)
        lse = torch.empty(B * H, ns, Mr, device=q.device, dtype=torch.float32)
        sqs = (torch.empty(B * H * n_mb * ns, MP, BM, device=q.device, dtype=dot_dt) if dims["ub"] else opart)
        try:
            _attend_split[(B * H, n_mb, ns)](
                q, q.stride(0), q.stride(1), q.stride(2),
                state[0],
                rk, rv, rk.stride(0), rk.stride(1), rk.stride(2),
                k_new, v_new, k_new.stride(0), k_new.stride(1), k_new.stride(2),
                *_ptrs(bufs),
                c["pi"], c["cbk"], c["cbv"], c.get("st", c["pi"]),
                mt, *ms,
                opart, lse, sqs,
                H, Tq, T, LC, chunk, ns, sc * LOG2E, ref.qjl_const(m, D) if m else 0.0,
                G=G, R=R, D=D, DP=DP, KB=dims["kb"], VB=dims["vb"], UB=dims["ub"], M=max(m, 16), MP=MP,
                MC=min(64, MP), CK=dims["ck"], CV=dims["cv"], BLK=dims["block"], NS=dims["ns"],
                BM=BM, BT=bt, BN=32, MASK_KIND=mask_kind, CAUSAL=bool(is_causal), DT=_TL[dot_dt],
                ONE=_ONE.get(dot_dt, 0), VFR=dims["vfrag"], num_warps=num_warps, num_stages=2)
            break
        except triton.runtime.errors.OutOfResources:
            if bt <= 16:
                raise
            key = key or oor_key()
            bt //= 2
            _OOR[key] = bt
    _combine[(B * H, n_mb)](opart, lse, out, out.stride(0), out.stride(1), out.stride(2), H, Tq, ns,
                            G=G, D=D, DP=DP, BM=BM, num_warps=4)
    return out
