"""Fused QJL attention over the compressed cache (codec 0), flash-decoding style.

One program per (batch * kv head, block of query rows, split of positions). Rows are the GQA
group's query heads times the query tokens, so the query sketch S q is computed once per
program and shared by the group. A split walks its range of positions: compressed tokens first,
NG 32-token groups per iteration with tokens on the MMA M side (scores from packed signs with
the per-group outlier correction, values dequantized on the fly), then the exact tokens (residual
ring + this step's new tokens). Each split writes a normalized partial output and its log-sum-exp
(base 2); `_combine` merges the splits.

Lengths come from ``state[0]`` on the device; the grid is sized from static shapes only, so a
call never syncs with the host and captures in a CUDA graph.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .. import reference as ref
from ..checks import check_attend, check_qjl, late_constants, mask_args, qjl_center  # noqa: F401  (re-exported for the codecs)

LOG2E = 1.4426950408889634


@triton.jit
def _mask_scores(s, pos, limit, rows_ok, b, qh, t, qpos, MASK, smb, smh, smt, sml,
                 MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr):
    """Scores (BM, BN) in log2 units -> -inf where a row must not see a position."""
    ok = rows_ok[:, None] & (pos[None, :] < limit)
    mp = MASK + b * smb + qh[:, None] * smh + t[:, None] * smt + pos[None, :] * sml
    if MASK_KIND == 3:  # bool, one value per position
        ok = ok & (tl.load(MASK + b * smb + pos * sml, mask=pos < limit, other=0) != 0)[None, :]
    elif MASK_KIND == 4:
        s = s + tl.load(MASK + b * smb + pos * sml, mask=pos < limit, other=0.0).to(tl.float32)[None, :] * 1.4426950408889634
    elif MASK_KIND == 1:  # bool, True = attend
        ok = ok & (tl.load(mp, mask=ok, other=0) != 0)
    elif MASK_KIND == 2:  # additive float
        s = s + tl.load(mp, mask=ok, other=0.0).to(tl.float32) * 1.4426950408889634
    elif CAUSAL:
        ok = ok & (pos[None, :] <= qpos[:, None])
    return tl.where(ok, s, float("-inf"))


@triton.jit
def _softmax_step(s, m_i, l_i, acc):
    """Online softmax: fold scores s (BM, BN) into (m_i, l_i); rescale acc. Returns p too."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    return p, m_new, l_i, acc * alpha[:, None]


@triton.jit
def _mask_scores_t(s, pos, limit, rows_ok, b, qh, t, qpos, MASK, smb, smh, smt, sml,
                   MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr):
    """_mask_scores on transposed scores (BT tokens, BM rows)."""
    ok = rows_ok[None, :] & (pos[:, None] < limit)
    mp = MASK + b * smb + qh[None, :] * smh + t[None, :] * smt + pos[:, None] * sml
    if MASK_KIND == 3:
        ok = ok & (tl.load(MASK + b * smb + pos * sml, mask=pos < limit, other=0) != 0)[:, None]
    elif MASK_KIND == 4:
        s = s + tl.load(MASK + b * smb + pos * sml, mask=pos < limit, other=0.0).to(tl.float32)[:, None] * 1.4426950408889634
    elif MASK_KIND == 1:
        ok = ok & (tl.load(mp, mask=ok, other=0) != 0)
    elif MASK_KIND == 2:
        s = s + tl.load(mp, mask=ok, other=0.0).to(tl.float32) * 1.4426950408889634
    elif CAUSAL:
        ok = ok & (pos[:, None] <= qpos[None, :])
    return tl.where(ok, s, float("-inf"))


@triton.jit
def _attend_exact(q, m_i, l_i, acc, lo_e, hi, n, T, c1, b, h, qh, t, qpos, rows_ok, dd, d_ok,
                  RK, RV, srb, srh, srt, KNEW, VNEW, snb, snh, snt,
                  MASK, smb, smh, smt, sml, qk_scale,
                  BN: tl.constexpr, MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr, DT: tl.constexpr):
    """Fold the exact positions [lo_e, hi) into (m_i, l_i, acc): residual-ring slots (position p at
    slot p - c1) below n - T, this step's new tokens from n - T. Shared by every codec's attend."""
    n_old = n - T
    ring = RK + b * srb + h * srh
    ringv = RV + b * srb + h * srh
    new = KNEW + b * snb + h * snh
    newv = VNEW + b * snb + h * snh
    for p0 in range(lo_e, hi, BN):
        pos = p0 + tl.arange(0, BN)
        ok = pos < hi
        in_ring = pos < n_old
        m_r = (ok & in_ring)[:, None] & d_ok[None, :]
        m_n = (ok & (pos >= n_old))[:, None] & d_ok[None, :]
        off_r = (pos - c1)[:, None] * srt + dd[None, :]
        off_n = (pos - n_old)[:, None] * snt + dd[None, :]
        k = tl.where(m_r, tl.load(ring + off_r, mask=m_r, other=0.0), tl.load(new + off_n, mask=m_n, other=0.0))
        s = tl.dot(q, tl.trans(k.to(DT)))
        s = _mask_scores(s * qk_scale, pos, hi, rows_ok, b, qh, t, qpos,
                         MASK, smb, smh, smt, sml, MASK_KIND, CAUSAL)
        p, m_i, l_i, acc = _softmax_step(s, m_i, l_i, acc)
        v = tl.where(m_r, tl.load(ringv + off_r, mask=m_r, other=0.0), tl.load(newv + off_n, mask=m_n, other=0.0))
        acc = tl.dot(p.to(DT), v.to(DT), acc=acc)
    return m_i, l_i, acc


@triton.jit
def _store_partial(OPART, LSE, m_i, l_i, acc, base, M, r, rows_ok, dd, DP: tl.constexpr):
    """Write a split's normalized partial output and its log-sum-exp (base 2) for `_combine`."""
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    o = acc / l_safe[:, None]
    lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf"))
    tl.store(OPART + (base * M + r[:, None]) * DP + dd[None, :], o, mask=rows_ok[:, None])
    tl.store(LSE + base * M + r, lse, mask=rows_ok)


@triton.jit
def _kperm(c0: tl.constexpr, MC: tl.constexpr, PAIR: tl.constexpr):
    """Sketch rows in the K order of `_signs_t`'s tile: position 32 b + 2 i + h -> row 32 b + 16 h + i."""
    p = tl.arange(0, MC)
    if PAIR:
        return c0 + (p // 32) * 32 + (p % 2) * 16 + (p % 32) // 2
    return c0 + p


@triton.jit
def _signs_t(ptr, rows, ok, BT: tl.constexpr, NB: tl.constexpr, c0: tl.constexpr, MC: tl.constexpr,
             DT: tl.constexpr, ONE: tl.constexpr, PAIR: tl.constexpr = 0):
    """Sign bits c0 .. c0+MC of tokens `rows` -> (BT, MC) tile of +-1 in DT.

    ONE != 0 (fp16/bf16): +-1 built as bit patterns (ONE | sign << 15), no int->float conversion.
    """
    bi = c0 // 8 + tl.arange(0, MC // 8)
    by = tl.load(ptr + rows[:, None] * NB + bi[None, :], mask=ok[:, None] & (bi[None, :] < NB), other=0)
    if PAIR:
        # two signs per 32-bit word, the MMA operand's register format: word i of a 32-row block
        # holds rows i and i + 16 (bits i, i + 16 of the block's 4 bytes) -> sign bits 15 and 31,
        # so one shift and one LOP3 make two elements; the other operand is loaded in the same
        # K order (`_kperm`)
        wi = c0 // 32 + tl.arange(0, MC // 32)
        u = tl.load(ptr.to(tl.pointer_type(tl.uint32)) + rows[:, None] * (NB // 4) + wi[None, :],
                    mask=ok[:, None] & (wi[None, :] < NB // 4), other=0)
        sh = (15 - tl.arange(0, 16)).to(tl.uint32)
        w = (((~u)[:, :, None] << sh[None, None, :]) & 0x80008000) | (ONE * 0x10001)   # (BT, MC/32, 16)
        lo = (w & 0xFFFF).to(tl.uint16).to(DT, bitcast=True)
        hi = (w >> 16).to(tl.uint16).to(DT, bitcast=True)
        return tl.reshape(tl.join(lo, hi), (BT, MC))
    if ONE != 0:
        nb = (~by).to(tl.uint16)                                                   # bit 0 -> -1
        sh = (15 - tl.arange(0, 8)).to(tl.uint16)
        w = ((nb[:, :, None] << sh[None, None, :]) & 0x8000) | ONE                 # (BT, MC/8, 8)
        return tl.reshape(w, (BT, MC)).to(DT, bitcast=True)
    bit = (by.to(tl.int32)[:, :, None] >> tl.arange(0, 8)[None, None, :]) & 1
    return tl.reshape(bit * 2 - 1, (BT, MC)).to(DT)


@triton.jit
def _signs_g(ptr, rows3, ok3, NG: tl.constexpr, NB: tl.constexpr, c0: tl.constexpr, MC: tl.constexpr,
             DT: tl.constexpr, ONE: tl.constexpr):
    """_signs_t for tokens `rows3` (NG, 32) -> (NG, 32, MC) tile of +-1 in DT (one 32-token group per
    batch entry of a 3-D dot)."""
    bi = c0 // 8 + tl.arange(0, MC // 8)
    m = ok3[:, :, None] & (bi[None, None, :] < NB)
    by = tl.load(ptr + rows3[:, :, None] * NB + bi[None, None, :], mask=m, other=0)
    if ONE != 0:
        nb = (~by).to(tl.uint16)
        sh = (15 - tl.arange(0, 8)).to(tl.uint16)
        w = ((nb[:, :, :, None] << sh[None, None, None, :]) & 0x8000) | ONE            # (NG, 32, MC/8, 8)
        return tl.reshape(w, (NG, 32, MC)).to(DT, bitcast=True)
    bit = (by.to(tl.int32)[:, :, :, None] >> tl.arange(0, 8)[None, None, None, :]) & 1
    return tl.reshape(bit * 2 - 1, (NG, 32, MC)).to(DT)


@triton.jit
def _attend_split(
    Q, sqb, sqh, sqt,
    LEN,
    RK, RV, srb, srh, srt,
    KNEW, VNEW, snb, snh, snt,
    KBITS, KNORM, KOBITS, KONORM, KIDX,
    VCODE, VSCALE, VZERO,
    ST, SOT,
    MASK, smb, smh, smt, sml,
    OPART, LSE, SQS,                                   # SQS: (programs, MSP, BM) scratch for S q
    H, Tq, T, LC, CHUNK, NSPLIT,
    qk_scale, c_in, c_out,
    G: tl.constexpr, R: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
    MS: tl.constexpr, MSP: tl.constexpr, MO: tl.constexpr, MOP: tl.constexpr,
    NO: tl.constexpr, OP: tl.constexpr, VB: tl.constexpr, VG: tl.constexpr, NGVP: tl.constexpr,
    NBV: tl.constexpr, VSB: tl.constexpr, PER: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, KC: tl.constexpr,
    NG: tl.constexpr, MC: tl.constexpr, MOC: tl.constexpr,
    MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr, DT: tl.constexpr, ONE: tl.constexpr,
    CORR: tl.constexpr = 0, PAIR: tl.constexpr = 0,
):
    """NG 32-token groups (BT = 32 NG tokens) per iteration, tokens on the MMA M side (v3).

    Per iteration, with sg the +-1 signs (BT, m) and idx_g the group's outlier channels:
      rawT  (BT, BM)     = sg @ (S q)^T                       one 2-D dot, chunked over m by MC
      A     (NG, 32, OP) = sg_g @ S^T[idx_g]^T                batched: the inlier correction per key
      Bo    (NG, 32, OP) = osg_g @ S_out^T[idx_g]^T           batched: the outlier sketch
      sT = c_in nrm * rawT + (c_out onrm * Bo - c_in nrm * A) @ q[idx_g]^T
    which equals qjl_scores' S(q mask_in) . sg + S_out(q mask_out) . osg, but the per-group
    terms are (32 x o) instead of (rows x m), so the live registers do not grow with NG.
    S q is computed once and kept in a scratch (L1-resident) so it can be read in m-chunks.

    CORR=1 (v4, the default on CUDA) scores each sign tile once, against per-group query sketches:
      B_in  (NG, m, BM)  = (S q)^T - S^T[idx_g] @ q[idx_g]^T      batched K=o dots, per m-chunk
      B_out (NG, mo, BM) = S_out^T[idx_g] @ q[idx_g]^T
      sT = c_in nrm * (sg_g @ B_in) + c_out onrm * (osg_g @ B_out)
    PAIR=1 builds the sign tiles as 32-bit words holding two signs (see `_signs_t`).
    """
    bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    sp = tl.program_id(2)
    b = bh // H
    h = bh % H
    M = G * Tq
    BT: tl.constexpr = NG * 32

    n = tl.load(LEN).to(tl.int32)
    c1 = n // R * R
    cl = tl.minimum(c1, n - T)
    lo = sp * CHUNK
    hi = tl.minimum(lo + CHUNK, n)

    ri = tl.arange(0, BM)
    r = pid_m * BM + ri
    rows_ok = r < M
    g = r // Tq
    t = r % Tq
    qh = h * G + g
    qpos = n - Tq + t
    dd = tl.arange(0, DP)
    d_ok = dd < D
    q_row = Q + b * sqb + qh * sqh + t * sqt

    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, DP], tl.float32)

    hi_c = tl.minimum(hi, cl)
    if lo < hi_c:
        ms = tl.arange(0, MSP)
        sq = tl.zeros([BM, MSP], tl.float32)
        for k0 in tl.static_range(0, DP, KC):
            kk = k0 + tl.arange(0, KC)
            qk = tl.load(q_row[:, None] + kk[None, :], mask=rows_ok[:, None] & (kk[None, :] < D), other=0.0)
            sk = tl.load(ST + kk[:, None] * MS + ms[None, :], mask=(kk[:, None] < D) & (ms[None, :] < MS), other=0.0)
            sq = tl.dot(qk.to(DT), sk.to(DT), acc=sq)
        sqs = SQS + ((bh * tl.num_programs(1) + pid_m) * NSPLIT + sp) * (MSP * BM)
        tl.store(sqs + ms[None, :] * BM + ri[:, None], sq.to(DT))                   # (S q)^T
        tl.debug_barrier()
        NG_ROWS = LC // 32
        bh_tok = bh * LC
        gi = tl.arange(0, NG)
        tk = tl.arange(0, 32)
        oi = tl.arange(0, OP)
        tok = tl.arange(0, BT)
        if NO > 0:
            idx_n = tl.load(KIDX + (bh * NG_ROWS + lo // 32 + gi[:, None]) * NO + oi[None, :],
                            mask=(oi[None, :] < NO) & (lo + gi[:, None] * 32 < hi_c), other=0).to(tl.int32)
        for p0 in range(lo, hi_c, BT):
            pos = p0 + tok
            tok_ok = pos < hi_c
            rows = bh_tok + pos
            pos3 = p0 + gi[:, None] * 32 + tk[None, :]                                  # (NG, 32)
            ok3 = pos3 < hi_c
            if NO > 0:
                idx = idx_n
                g_ok = p0 + BT + gi[:, None] * 32 < hi_c
                idx_n = tl.load(KIDX + (bh * NG_ROWS + (p0 + BT) // 32 + gi[:, None]) * NO + oi[None, :],
                                mask=(oi[None, :] < NO) & g_ok, other=0).to(tl.int32)  # prefetch
                o_ok = oi < NO
            if (NO > 0) and (CORR == 1):
                # per group g, the query sketches themselves: B_in = S q - S[:, idx_g] q[idx_g] and
                # B_out = S_out[:, idx_g] q[idx_g] ((m, BM) each, built by K=o dots), then one pass over
                # each sign tile: s = c_in nrm (sg_g @ B_in) + c_out onrm (osg_g @ B_out)
                rows3 = bh_tok + pos3
                qsel = tl.load(q_row[None, None, :] + idx[:, :, None],
                               mask=o_ok[None, :, None] & rows_ok[None, None, :], other=0.0).to(DT)  # (NG, OP, BM)
                raw = tl.zeros([NG, 32, BM], tl.float32)
                for c0 in tl.static_range(0, MSP, MC):
                    mc = c0 + tl.arange(0, MC)
                    ssel = tl.load(ST + idx[:, None, :] * MS + mc[None, :, None],
                                   mask=o_ok[None, None, :] & (mc[None, :, None] < MS), other=0.0).to(DT)
                    sqc = tl.load(sqs + mc[:, None] * BM + ri[None, :]).to(tl.float32)          # (MC, BM)
                    b_in = sqc[None, :, :] - tl.dot(ssel, qsel)                               # (NG, MC, BM)
                    sg = _signs_g(KBITS, rows3, ok3, NG, MS // 8, c0, MC, DT, ONE)              # (NG, 32, MC)
                    raw = tl.dot(sg, b_in.to(DT), acc=raw)
                nrm3 = tl.load(KNORM + rows3, mask=ok3, other=0.0).to(tl.float32)
                s3 = raw * (c_in * nrm3)[:, :, None]
                if MO > 0:
                    rawo = tl.zeros([NG, 32, BM], tl.float32)
                    for c0 in tl.static_range(0, MOP, MOC):
                        mc = c0 + tl.arange(0, MOC)
                        osel = tl.load(SOT + idx[:, None, :] * MO + mc[None, :, None],
                                       mask=o_ok[None, None, :] & (mc[None, :, None] < MO), other=0.0).to(DT)
                        b_out = tl.dot(osel, qsel)                                            # (NG, MOC, BM)
                        osg = _signs_g(KOBITS, rows3, ok3, NG, MO // 8, c0, MOC, DT, ONE)
                        rawo = tl.dot(osg, b_out.to(DT), acc=rawo)
                    onrm3 = tl.load(KONORM + rows3, mask=ok3, other=0.0).to(tl.float32)
                    s3 += rawo * (c_out * onrm3)[:, :, None]
                sT = tl.reshape(s3, (BT, BM))
            else:
                nrm = tl.load(KNORM + rows, mask=tok_ok, other=0.0).to(tl.float32)
                rawT = tl.zeros([BT, BM], tl.float32)
                if NO > 0:
                    qselT = tl.load(q_row[None, None, :] + idx[:, :, None],
                                    mask=o_ok[None, :, None] & rows_ok[None, None, :], other=0.0).to(tl.float32)
                    A = tl.zeros([NG, 32, OP], tl.float32)
                for c0 in tl.static_range(0, MSP, MC):
                    mc = _kperm(c0, MC, PAIR)
                    sg = _signs_t(KBITS, rows, tok_ok, BT, MS // 8, c0, MC, DT, ONE, PAIR)          # (BT, MC)
                    sqc = tl.load(sqs + mc[:, None] * BM + ri[None, :])                     # (MC, BM)
                    rawT = tl.dot(sg, sqc, acc=rawT)
                    if NO > 0:
                        ssel = tl.load(ST + idx[:, None, :] * MS + mc[None, :, None],
                                       mask=o_ok[None, None, :] & (mc[None, :, None] < MS), other=0.0).to(DT)
                        A = tl.dot(tl.reshape(sg, (NG, 32, MC)), ssel, acc=A)            # (NG, 32, OP)
                sT = rawT * (c_in * nrm)[:, None]
                if NO > 0:
                    nrm3 = tl.load(KNORM + bh_tok + pos3, mask=ok3, other=0.0).to(tl.float32)
                    W = A * (-c_in * nrm3)[:, :, None]
                    if MO > 0:
                        Bo = tl.zeros([NG, 32, OP], tl.float32)
                        for c0 in tl.static_range(0, MOP, MOC):
                            mc = _kperm(c0, MOC, PAIR)
                            osg = _signs_t(KOBITS, rows, tok_ok, BT, MO // 8, c0, MOC, DT, ONE, PAIR)
                            osel = tl.load(SOT + idx[:, None, :] * MO + mc[None, :, None],
                                           mask=o_ok[None, None, :] & (mc[None, :, None] < MO), other=0.0).to(DT)
                            Bo = tl.dot(tl.reshape(osg, (NG, 32, MOC)), osel, acc=Bo)
                        onrm3 = tl.load(KONORM + bh_tok + pos3, mask=ok3, other=0.0).to(tl.float32)
                        W += Bo * (c_out * onrm3)[:, :, None]
                    corr = tl.dot(W, qselT)                                                 # (NG, 32, BM)
                    sT += tl.reshape(corr, (BT, BM))
            sT = _mask_scores_t(sT * qk_scale, pos, hi_c, rows_ok, b, qh, t, qpos,
                                MASK, smb, smh, smt, sml, MASK_KIND, CAUSAL)
            m_new = tl.maximum(m_i, tl.max(sT, 0))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_use)
            pT = tl.exp2(sT - m_use[None, :])
            l_i = l_i * alpha + tl.sum(pT, 0)
            m_i = m_new
            acc = acc * alpha[:, None]
            # values: codes (BT, D) -> code * scale + zero per VG-channel group
            vb_i = tl.arange(0, VSB)
            cb = tl.load(VCODE + rows[:, None] * NBV + vb_i[None, :],
                         mask=tok_ok[:, None] & (vb_i[None, :] < NBV), other=0)
            sh = tl.arange(0, PER) * VB
            gv = tl.arange(0, NGVP)
            sm = tok_ok[:, None] & (gv[None, :] < D // VG)
            sc = tl.load(VSCALE + rows[:, None] * (D // VG) + gv[None, :], mask=sm, other=0.0).to(tl.float32)
            zr = tl.load(VZERO + rows[:, None] * (D // VG) + gv[None, :], mask=sm, other=0.0).to(tl.float32)
            if ONE != 0:   # code c -> fp16 bit pattern 0x6400 | c == 1024 + c exactly
                cd = ((cb.to(tl.int16)[:, :, None] >> sh[None, None, :].to(tl.int16)) & ((1 << VB) - 1)) | 0x6400
                cd = tl.reshape(cd, (BT, NGVP, VG)).to(tl.float16, bitcast=True).to(tl.float32)
                zr = zr - 1024.0 * sc
            else:
                cd = (cb.to(tl.int32)[:, :, None] >> sh[None, None, :]) & ((1 << VB) - 1)
                cd = tl.reshape(cd, (BT, NGVP, VG)).to(tl.float32)
            v = tl.reshape(cd * sc[:, :, None] + zr[:, :, None], (BT, DP))
            acc = tl.dot(tl.trans(pT).to(DT), v.to(DT), acc=acc)

    lo_e = tl.maximum(lo, cl)
    if lo_e < hi:
        q = tl.load(q_row[:, None] + dd[None, :], mask=rows_ok[:, None] & d_ok[None, :], other=0.0).to(DT)
        m_i, l_i, acc = _attend_exact(q, m_i, l_i, acc, lo_e, hi, n, T, c1, b, h, qh, t, qpos, rows_ok, dd, d_ok,
                                      RK, RV, srb, srh, srt, KNEW, VNEW, snb, snh, snt,
                                      MASK, smb, smh, smt, sml, qk_scale, BN, MASK_KIND, CAUSAL, DT)

    _store_partial(OPART, LSE, m_i, l_i, acc, bh * NSPLIT + sp, M, r, rows_ok, dd, DP)


@triton.jit
def _combine(OPART, LSE, OUT, sob, soh, sot, H, Tq, NSPLIT,
             G: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, BM: tl.constexpr):
    """Merge the splits' partial outputs with their log-sum-exp; write (B, Hq, Tq, D) once."""
    bh = tl.program_id(0)
    r = tl.program_id(1) * BM + tl.arange(0, BM)
    M = G * Tq
    ok = r < M
    dd = tl.arange(0, DP)
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, DP], tl.float32)
    for sp in range(0, NSPLIT):
        base = bh * NSPLIT + sp
        lse = tl.load(LSE + base * M + r, mask=ok, other=float("-inf"))
        o = tl.load(OPART + (base * M + r[:, None]) * DP + dd[None, :], mask=ok[:, None], other=0.0)
        m_new = tl.maximum(m_i, lse)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        a = tl.exp2(m_i - m_use)
        w = tl.exp2(lse - m_use)
        l_i = l_i * a + w
        acc = acc * a[:, None] + o * w[:, None]
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]       # fully masked rows -> 0
    b = bh // H
    qh = (bh % H) * G + r // Tq
    t = r % Tq
    ptr = OUT + b * sob + qh * soh + t * sot
    tl.store(ptr[:, None] + dd[None, :], out.to(OUT.dtype.element_ty), mask=ok[:, None] & (dd[None, :] < D))


# ----------------------------------------------------------------------------------------------
# launcher
# ----------------------------------------------------------------------------------------------
_TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
_CT_CACHE: dict = {}
_FAST = True
# sign tiles built two signs per 32-bit word (the MMA register format): 30% fewer instructions per
# token in an sm_90 compile with triton 3.9, no gain measured on the H100 with triton 3.6 (NOTES)
_PAIR = 0
_OOR: dict = {}        # launch key -> groups per iteration that fit in shared memory
_ONE = {torch.float16: 0x3C00, torch.bfloat16: 0x3F80}


def _interpret() -> bool:
    import os
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _p2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def sketch_t(S: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """S (m, D) fp32 -> S^T (D, m) contiguous in `dtype`, cached per sketch tensor (kept alive).

    Sketches are never mutated, so the key is the storage (no `_version`: inference tensors have
    none). `kernels.triton.prepare` fills this cache when the cache layer is allocated, so no
    entry is first allocated inside a CUDA-graph capture (it would live in the graph's pool).
    """
    key = (S.data_ptr(), S.device, dtype, tuple(S.shape))
    hit = _CT_CACHE.get(key)
    if hit is None:
        late_constants(S.device)
        hit = (S, S.t().to(dtype).contiguous())
        _CT_CACHE[key] = hit
    return hit[1]


def prepare(consts, dtype: torch.dtype) -> None:
    """Fill the sketch_t cache for QJL `consts` (see kernels.triton.prepare)."""
    for S in consts:
        if S.shape[0]:
            sketch_t(S, torch.float32)
            if dtype in (torch.float16, torch.bfloat16):
                sketch_t(S, dtype)


def check_device(*ts, what="qjl triton"):
    for t in ts:
        if t is not None and not t.is_cuda and not _interpret():
            raise ValueError(f"{what}: tensors must be on a CUDA device (or set TRITON_INTERPRET=1), "
                             f"got {t.device}")


def _config(B, H, n_mb, L, cuda):
    """Static launch configuration from shapes only (no run-time autotune: CUDA-graph safe).

    H100, triton 3.6 (benchmarks/RESULTS.md "Attend v4", kernels-v4.json): the per-group query
    sketches (corr=1) are faster at every size (B=1 L=128k: 549 us vs 596); 4 groups / 4 warps
    where a kv head's positions are split 16 ways or more (B=1 L>=16k: 549 vs 561 us at 128k),
    8 groups / 8 warps for small problems and few splits (B=1 L=4k 38.2 vs 42.4 us; B=16 L=16k
    1040 vs 1087 us).
    """
    target = 4 * 132 if cuda else 4
    nsplit = max(1, min(triton.cdiv(target, B * H * n_mb), triton.cdiv(L, 256)))
    if not cuda:
        return dict(ng=2, num_warps=4, nsplit=nsplit, corr=1)
    if B * H * L <= 65536 or nsplit < 16:
        return dict(ng=8, num_warps=8, nsplit=nsplit, corr=1)
    return dict(ng=4, num_warps=4, nsplit=nsplit, corr=1)


def qjl_attend(q, state, consts, k_new, v_new, attn_mask=None, is_causal=False, scale=None, meta=None,
               nsplit=None, fast=None, num_warps=None, ng=None, corr=None, pair=None):
    """Fused QJL attention over one layer's cache, after `append` (semantics of reference.attend).

    Parameters
    ----------
    q : Tensor
        (B, Hq, Tq, D) fp16/bf16/fp32, Hq = G * H.
    state : list of Tensor
        QJL cache state (kernels/reference.py), length in state[0] read on the device.
    consts : list of Tensor
        [S (m, D), S_out (m_out, D)] fp32.
    k_new, v_new : Tensor
        (B, H, T, D) this step's tokens, attended exactly.
    attn_mask : Tensor, optional
        Bool (True = attend) or additive float, broadcastable to (B, Hq, Tq, L).
    is_causal : bool
        Without a mask, query i sees positions <= length - Tq + i.
    scale : float, optional
        Score scale, default 1/sqrt(D).
    meta : list of int
        [0, R, L, o, value_bits, value_group].
    nsplit : int, optional
        Number of position splits (default from static shapes).
    fast : bool, optional
        Bit-pattern decoding of signs and value codes (default on for fp16/bf16).
    num_warps : int, optional
        Warps per split program (default from `_config`).
    ng : int, optional
        32-token groups per loop iteration (default from `_config`).
    corr : {0, 1}, optional
        Outlier correction: 0 subtracts per-key terms sg_g S^T[idx_g] after one pass over the
        signs with S q; 1 builds per-group query sketches S q - S[:, idx_g] q[idx_g] and
        S_out[:, idx_g] q[idx_g] and scores each sign tile once (default from `_config`).
    pair : bool, optional
        Build sign tiles two signs per 32-bit word (fp16/bf16, sketch sizes multiples of 32).

    Returns
    -------
    Tensor
        (B, Hq, Tq, D) in q's dtype.
    """
    B, H, R, D, L, m, mo, o, vb, vg, LC = check_qjl(state, consts, meta, "qjl_attend")
    if qjl_center(meta):
        raise NotImplementedError("qjl_attend: key centering (QJLConfig.qjl_center=True) is not implemented in the "
                                  "fused Triton QJL attend kernel; qjl::attend on CUDA routes a centered cache to "
                                  "the sync-free SDPA path (reference.attend_nosync)")
    check_device(q, k_new, v_new, state[0], state[1], attn_mask, consts[0], what="qjl_attend")
    q, k_new, v_new, Tq, T, G = check_attend(q, state, k_new, v_new, B, H, D, "qjl_attend")
    M = G * Tq
    rk, rv = state[1], state[2]

    mask_kind, mt, ms = mask_args(attn_mask, q)

    dot_dt = q.dtype
    if _interpret() and dot_dt == torch.bfloat16:
        dot_dt = torch.float32          # the interpreter's bf16 tl.dot is wrong (triton 3.9); CPU only
    DT = _TL[dot_dt]
    ST = sketch_t(consts[0], dot_dt)
    SOT = sketch_t(consts[1], dot_dt) if mo else ST
    if fast is None:
        fast = _FAST
    fast = fast and dot_dt in (torch.float16, torch.bfloat16)
    BM = 16 if M <= 16 else 32
    n_mb = triton.cdiv(M, BM)
    cfg = _config(B, H, n_mb, L, q.is_cuda)
    ng = ng or cfg["ng"]
    num_warps = num_warps or cfg["num_warps"]
    if nsplit is None:
        nsplit = cfg["nsplit"]
    DP = _p2(D)
    out = torch.empty_like(q)
    sc = float(scale) if scale is not None else 1.0 / math.sqrt(D)
    c_in = ref.qjl_const(m, D)
    c_out = ref.qjl_const(mo, D) if mo else 0.0
    MSP, MOP = _p2(m), _p2(max(mo, 16))
    kw = dict(G=G, R=R, D=D, DP=DP, MS=m, MSP=MSP, MO=mo, MOP=MOP,
              NO=o, OP=max(16, _p2(o)), VB=vb, VG=vg, NGVP=_p2(D // vg),
              NBV=D * vb // 8, VSB=_p2(D // vg) * vg * vb // 8, PER=8 // vb,
              BM=BM, BN=32, KC=min(32, DP), MASK_KIND=mask_kind, CAUSAL=bool(is_causal), DT=DT,
              num_stages=2, MC=min(64, MSP), MOC=min(64, MOP), ONE=_ONE.get(dot_dt, 0) if fast else 0)
    kw["CORR"] = cfg["corr"] if corr is None else int(corr)
    kw["PAIR"] = int(bool(_PAIR if pair is None else pair) and kw["ONE"] != 0 and m % 32 == 0 and kw["MC"] % 32 == 0
                     and (mo == 0 or (mo % 32 == 0 and kw["MOC"] % 32 == 0)))
    # a tile that needs more shared memory than the GPU has (it depends on the mask kind, dtype and
    # shapes) is retried with fewer groups per iteration; the working choice is remembered
    def oor_key(ng0=ng):    # built only once a launch has failed (not per call)
        return (q.device.index, ng0, num_warps, tuple(sorted(kw.items())))

    if _OOR:
        ng = _OOR.get(oor_key(), ng)
    key = None
    while True:
        step = 32 * ng
        ns = nsplit if nsplit is not None else cfg["nsplit"]
        chunk = triton.cdiv(triton.cdiv(L, ns), step) * step
        ns = triton.cdiv(L, chunk)
        opart = torch.empty(B * H, ns, M, DP, device=q.device, dtype=torch.float32)
        lse = torch.empty(B * H, ns, M, device=q.device, dtype=torch.float32)
        sqs = torch.empty(B * H * n_mb * ns, MSP, BM, device=q.device, dtype=dot_dt)    # S q scratch
        try:
            _attend_split[(B * H, n_mb, ns)](
                q, q.stride(0), q.stride(1), q.stride(2),
                state[0],
                rk, rv, rk.stride(0), rk.stride(1), rk.stride(2),
                k_new, v_new, k_new.stride(0), k_new.stride(1), k_new.stride(2),
                *state[3:11],
                ST, SOT,
                mt, *ms,
                opart, lse, sqs,
                H, Tq, T, LC, chunk, ns, sc * LOG2E, c_in, c_out,
                NG=ng, num_warps=num_warps, **kw)
            break
        except triton.runtime.errors.OutOfResources:
            if ng == 1:
                raise
            key = key or oor_key()
            ng //= 2
            _OOR[key] = ng
    nsplit = ns
    _combine[(B * H, n_mb)](opart, lse, out, out.stride(0), out.stride(1), out.stride(2), H, Tq, nsplit,
                            G=G, D=D, DP=DP, BM=BM, num_warps=4)
    return out
