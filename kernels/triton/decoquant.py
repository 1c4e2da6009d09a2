"""DecoQuant kernels (codec 1): cache append (factor + quantize full blocks) and fused decode attend.

Codec math: kernels/decoquant.py. Per block of BLOCK tokens, X (BLOCK, D) is read as
X' (BLOCK*D/16, 16) = A @ Bm, A = U S^(1/2) quantized per token (symmetric absmax, b bits),
Bm = S^(1/2) V^T (16 x 16) kept in the side dtype.

Append (`decoquant_append_`), three launches sized from static shapes (T, R, BLOCK, B*H) only:

- `_flush` (keys, then values): one program per (factorization block, b * kv head) of the most
  blocks T new tokens can complete; liveness comes from state[0] on the device. A live program
  accumulates the fp64 Gram matrix X'^T X' over its block (ring or new tokens), diagonalizes it
  with a parallel-ordered cyclic Jacobi eigensolver in registers (fp64, 8 disjoint rotations per
  step), then recomputes A = X' V S^(-1/2) tile by tile and quantizes it exactly like the
  reference (fp32 absmax, scale rounded to the side dtype first, IEEE division, round half even).
  torch.linalg.eigh is not used: on CUDA it checks its info tensor on the host (a sync, so not
  capturable) and would need the live-block count on the host.
- `_ring` (shared with QJL): copies the new tokens that stay exact into ring slots.

then ``state[0] += T`` on the device: no host sync, capturable in a CUDA graph.

Codes vs the reference: an eigenvector is defined up to sign, and LAPACK's and Jacobi's signs
differ, so a factor direction r may come out as (-A[:, r], -Bm[r]): the same X', codes negated
(the quantizer is odd-symmetric). Up to that per-direction sign the codes, scales and Bm equal
the reference's except where fp64 rounding differences meet a rounding tie (rare, one step).

Attend (`decoquant_attend`): flash-decoding over position splits (split boundaries on block
boundaries). Per factorization block the query transform T(q) = q_c @ Bm_k^T (section 4b) is one
small dot shared by every token of the block; score_t = scale_t * <T(q), codes_t>. Values are
accumulated in code space per block, sum_t p_t scale_t codes_t, and mapped through the block's
value Bm once at the block's end. Then the exact ring + new tokens, one online softmax; each
split writes a normalized partial output + log-sum-exp, merged by QJL's `_combine`.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .. import decoquant as dq  # noqa: F401  (registers codec 1 in reference.CODECS)
from .qjl_append import _SIDE, _ring, _round_half_even
from .qjl_attend import (LOG2E, _TL, _attend_exact, _combine, _interpret, _mask_scores_t, _p2, _store_partial,
                         check_device, mask_args)

REL_EPS = 1e-13     # kernels/decoquant.factor: directions below this share of the top eigenvalue drop
MAX_SWEEPS = 16     # Jacobi sweeps cap; fp64 16 x 16 converges in ~6-8 (quadratic convergence)


# ----------------------------------------------------------------------------------------------
# append
# ----------------------------------------------------------------------------------------------
@triton.jit
def _eigh16(A, MAXSWEEP: tl.constexpr):
    """Symmetric (16, 16) fp64 -> (eigenvalues (16,) descending, eigenvectors (16, 16) as columns).

    Cyclic Jacobi in round-robin (tournament) order: each of the 15 steps of a sweep applies 8
    disjoint rotations at once, A <- J^T A J, V <- V J, as dense 16 x 16 products (registers only).
    Stops when the off-diagonal mass is below 1e-28 of the total (off-diagonal norm ~1e-14 of
    ||A||, just above fp64 rounding, so it always gets there), or after MAXSWEEP sweeps.
    """
    i = tl.arange(0, 16)
    eye = i[:, None] == i[None, :]
    V = tl.where(eye, 1.0, 0.0).to(tl.float64)
    sq = A * A
    tot = tl.sum(tl.sum(sq, 1), 0)
    off = tl.sum(tl.sum(tl.where(eye, 0.0, sq), 1), 0)
    sweep = 0
    while (sweep < MAXSWEEP) & (off > 1e-28 * tot):
        for s in range(15):
            # round s pairs 0 with s + 1, and i, j >= 1 with (i - 1) + (j - 1) = 2s mod 15
            y = (2 * s + 30 - (i - 1)) % 15
            partner = tl.where(i == 0, s + 1, tl.where(y == i - 1, 0, y + 1))
            pm = i[None, :] == partner[:, None]                         # pm[i, j]: j is i's partner
            lo = i < partner
            Ap = tl.where(pm, A, 0.0)
            d = tl.sum(tl.where(eye, A, 0.0), 1)
            dp = tl.sum(tl.where(pm, d[None, :], 0.0), 1)               # d[partner(i)]
            # both members of a pair use A[lo, hi] so they compute the same rotation bit for bit
            apq = tl.where(lo, tl.sum(Ap, 1), tl.sum(Ap, 0))
            nz = apq != 0.0
            theta = tl.where(lo, dp - d, d - dp) / (2.0 * tl.where(nz, apq, 1.0))   # (a_qq - a_pp) / 2a_pq
            t = 1.0 / (tl.abs(theta) + tl.sqrt(theta * theta + 1.0))
            t = tl.where(nz, tl.where(theta >= 0.0, t, -t), 0.0)
            c = 1.0 / tl.sqrt(t * t + 1.0)
            J = tl.where(eye, c[:, None], tl.where(pm, tl.where(lo, t * c, -t * c)[:, None], 0.0))
            A = tl.sum(J[:, :, None] * tl.sum(A[:, :, None] * J[None, :, :], 1)[:, None, :], 0)
            V = tl.sum(V[:, :, None] * J[None, :, :], 1)
        sq = A * A
        off = tl.sum(tl.sum(tl.where(eye, 0.0, sq), 1), 0)
        sweep += 1
    d = tl.sum(tl.where(eye, A, 0.0), 1)
    # descending order, ties by index: rank[i] = #{j : d_j > d_i or (d_j == d_i and j < i)}
    before = (d[None, :] > d[:, None]) | ((d[None, :] == d[:, None]) & (i[None, :] < i[:, None]))
    rank = tl.sum(before.to(tl.int32), 1)
    P = rank[:, None] == i[None, :]                                     # P[i, r]: d_i goes to slot r
    lam = tl.sum(tl.where(P, d[:, None], 0.0), 0)
    vec = tl.sum(V[:, :, None] * tl.where(P, 1.0, 0.0).to(tl.float64)[None, :, :], 1)
    return lam, vec


@triton.jit
def _rows(X, RX, sxt, srt, pos, ch, ok, n, c0):
    """Exact values at positions `pos` (RB,), channels `ch` (RB, 16) -> fp64; ring below n, else new."""
    in_ring = pos < n
    m_r = ok & in_ring[:, None]
    m_n = ok & (~in_ring)[:, None]
    xr = tl.load(RX + (pos - c0)[:, None] * srt + ch, mask=m_r, other=0.0)
    xn = tl.load(X + (pos - n)[:, None] * sxt + ch, mask=m_n, other=0.0)
    return tl.where(m_r, xr, xn).to(tl.float64)


@triton.jit
def _pack_store(CODE, rows, ok, c, D: tl.constexpr, DP: tl.constexpr, BITS: tl.constexpr, TB: tl.constexpr):
    """Codes c (TB, DP) int32 in [0, 2^BITS) -> packed bytes of tokens `rows` (decoquant.pack layout)."""
    NB: tl.constexpr = D * BITS // 8
    if BITS == 3:                       # 8 codes -> one 24-bit word -> 3 bytes, LSB first
        c3 = tl.reshape(c, (TB, DP // 8, 8))
        word = tl.sum(c3 << (tl.arange(0, 8) * 3)[None, None, :], 2)
        g = tl.arange(0, DP // 8)
        k = tl.arange(0, 4)
        by = ((word[:, :, None] >> (k * 8)[None, None, :]) & 0xFF).to(tl.uint8)
        m = ok[:, None, None] & (g[None, :, None] < D // 8) & (k[None, None, :] < 3)
        tl.store(CODE + rows[:, None, None] * NB + g[None, :, None] * 3 + k[None, None, :], by, mask=m)
    else:
        PER: tl.constexpr = 8 // BITS
        c2 = tl.reshape(c, (TB, DP // PER, PER))
        by = tl.sum(c2 << (tl.arange(0, PER) * BITS)[None, None, :], 2).to(tl.uint8)
        pb = tl.arange(0, DP // PER)
        tl.store(CODE + rows[:, None] * NB + pb[None, :], by, mask=ok[:, None] & (pb[None, :] < NB))


@triton.jit
def _flush(
    X, sxb, sxh, sxt,                        # new tokens (B, H, T, D): keys or values
    RX, srb, srh, srt,                       # the matching ring (B, H, R, D)
    LEN, CODE, SCALE, BMAT,                  # codes (B,H,LC,D*b/8), scale (B,H,LC), Bm (B,H,LC/BLOCK,16,16)
    H, T, LC,
    R: tl.constexpr, BLOCK: tl.constexpr, D: tl.constexpr, DC: tl.constexpr, DCP: tl.constexpr,
    TB: tl.constexpr, BITS: tl.constexpr, SIDE: tl.constexpr, MAXSWEEP: tl.constexpr, REL: tl.constexpr,
):
    j = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    n = tl.load(LEN).to(tl.int32)
    c0 = n // R * R
    c1 = (n + T) // R * R
    p0 = c0 + j * BLOCK
    if (p0 < c1) & (p0 + BLOCK <= LC):
        RB: tl.constexpr = TB * DCP                                     # X' rows per tile
        DP: tl.constexpr = DCP * 16
        rr = tl.arange(0, RB)
        jj = tl.arange(0, 16)
        tr = rr // DCP                                                  # token of a row, in the tile
        cc = rr % DCP                                                   # its 16-channel chunk
        ch = cc[:, None] * 16 + jj[None, :]
        c_ok = (cc < DC)[:, None] & (jj < 16)[None, :]
        xb = X + b * sxb + h * sxh
        rb = RX + b * srb + h * srh

        gram = tl.zeros([16, 16], tl.float64)
        for t0 in range(0, BLOCK, TB):
            t = t0 + tr
            x = _rows(xb, rb, sxt, srt, p0 + t, ch, c_ok & (t < BLOCK)[:, None], n, c0)
            gram += tl.sum(x[:, :, None] * x[:, None, :], 0)
        lam, vec = _eigh16(gram, MAXSWEEP)
        lam = tl.maximum(lam, 0.0)
        keep = lam > REL * tl.max(lam, 0)
        rs = tl.sqrt(tl.where(keep, tl.sqrt(lam), 1.0))                # S^(1/2), guarded
        bm = tl.where(keep[:, None], rs[:, None] * tl.trans(vec), 0.0)  # S^(1/2) V^T
        blk = bh * (LC // BLOCK) + p0 // BLOCK
        # rounded as the reference: fp32 first, then the side dtype
        tl.store(BMAT + blk * 256 + jj[:, None] * 16 + jj[None, :], bm.to(tl.float32).to(SIDE))

        QMAX: tl.constexpr = (1 << (BITS - 1)) - 1
        ti = tl.arange(0, TB)
        for t0 in range(0, BLOCK, TB):
            t = t0 + tr
            x = _rows(xb, rb, sxt, srt, p0 + t, ch, c_ok & (t < BLOCK)[:, None], n, c0)
            a = tl.sum(x[:, :, None] * vec[None, :, :], 1) / rs[None, :]
            a = tl.where(keep[None, :], a, 0.0).to(tl.float32)          # A rows, as the reference's .float()
            a = tl.reshape(a, (TB, DP))                                 # per token: D/16 x 16 entries
            amax = tl.max(tl.abs(a), 1)
            sc = tl.math.div_rn(amax, tl.full([TB], QMAX, tl.float32)).to(SIDE)
            sf = sc.to(tl.float32)[:, None]
            q = _round_half_even(tl.math.div_rn(a, tl.broadcast_to(tl.maximum(sf, 1e-30), (TB, DP))))
            q = tl.where(sf > 0, q, 0.0)
            code = (tl.minimum(tl.maximum(q, -QMAX * 1.0), QMAX * 1.0) + QMAX).to(tl.int32)
            tok_ok = t0 + ti < BLOCK
            rows = bh * LC + p0 + t0 + ti
            tl.store(SCALE + rows, sc, mask=tok_ok)
            _pack_store(CODE, rows, tok_ok, code, D, DP, BITS, TB)


# ----------------------------------------------------------------------------------------------
# attend
# ----------------------------------------------------------------------------------------------
@triton.jit
def _codes(CODE, rows, ok, D: tl.constexpr, DP: tl.constexpr, BITS: tl.constexpr, BT: tl.constexpr,
           DT: tl.constexpr):
    """Packed codes of tokens `rows` -> (BT, DP) signed codes (code - qmax) in DT, 0 past D."""
    NB: tl.constexpr = D * BITS // 8
    QMAX: tl.constexpr = (1 << (BITS - 1)) - 1
    if BITS == 3:
        g = tl.arange(0, DP // 8)
        k = tl.arange(0, 4)
        m = ok[:, None, None] & (g[None, :, None] < D // 8) & (k[None, None, :] < 3)
        by = tl.load(CODE + rows[:, None, None] * NB + g[None, :, None] * 3 + k[None, None, :], mask=m, other=0)
        word = tl.sum(by.to(tl.int32) << (k * 8)[None, None, :], 2)                    # (BT, DP/8)
        c = (word[:, :, None] >> (tl.arange(0, 8) * 3)[None, None, :]) & 7
    else:
        PER: tl.constexpr = 8 // BITS
        pb = tl.arange(0, DP // PER)
        by = tl.load(CODE + rows[:, None] * NB + pb[None, :], mask=ok[:, None] & (pb[None, :] < NB), other=0)
        c = (by.to(tl.int32)[:, :, None] >> (tl.arange(0, PER) * BITS)[None, None, :]) & ((1 << BITS) - 1)
    c = tl.reshape(c, (BT, DP)) - QMAX
    dd = tl.arange(0, DP)
    return tl.where((dd < D)[None, :], c, 0).to(DT)


@triton.jit
def _attend_split(
    Q, sqb, sqh, sqt,
    LEN,
    RK, RV, srb, srh, srt,
    KNEW, VNEW, snb, snh, snt,
    KCODE, KSCALE, KB, VCODE, VSCALE, VBM,
    MASK, smb, smh, smt, sml,
    OPART, LSE,
    H, Tq, T, LC, CHUNK, NSPLIT, qk_scale,
    G: tl.constexpr, R: tl.constexpr, BLOCK: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
    DCP: tl.constexpr, BITS: tl.constexpr, BM: tl.constexpr, BT: tl.constexpr, BN: tl.constexpr,
    MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr, DT: tl.constexpr,
):
    """One (b * kv head, block of query rows, split of positions) program; splits start on blocks."""
    bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    sp = tl.program_id(2)
    b = bh // H
    h = bh % H
    M = G * Tq

    n = tl.load(LEN).to(tl.int32)
    c1 = n // R * R
    cl = tl.minimum(c1, n - T)
    lo = sp * CHUNK
    hi = tl.minimum(lo + CHUNK, n)

    r = pid_m * BM + tl.arange(0, BM)
    rows_ok = r < M
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
        q2 = tl.reshape(q, (BM * DCP, 16))                              # rows (query, 16-channel chunk)
        jj = tl.arange(0, 16)
        tok = tl.arange(0, BT)
        for k0 in range(lo, hi_c, BLOCK):                               # factorization blocks
            bmo = (bh * (LC // BLOCK) + k0 // BLOCK) * 256
            bkT = tl.load(KB + bmo + jj[:, None] + jj[None, :] * 16).to(DT)             # [j, r] = Bm_k[r, j]
            tq = tl.reshape(tl.dot(q2, bkT), (BM, DP))                                  # T(q) = q_c Bm_k^T
            tqT = tl.trans(tq).to(DT)                                                   # (DP, BM)
            bacc = tl.zeros([BM, DP], tl.float32)                       # sum_t p_t scale_t codes_t
            for p0 in range(k0, tl.minimum(k0 + BLOCK, hi_c), BT):
                pos = p0 + tok
                tok_ok = pos < hi_c
                rows = bh * LC + pos
                ck = _codes(KCODE, rows, tok_ok, D, DP, BITS, BT, DT)
                ks = tl.load(KSCALE + rows, mask=tok_ok, other=0.0).to(tl.float32)
                sT = tl.dot(ck, tqT) * (ks * qk_scale)[:, None]                        # (BT, BM)
                sT = _mask_scores_t(sT, pos, hi_c, rows_ok, b, qh, t, qpos,
                                    MASK, smb, smh, smt, sml, MASK_KIND, CAUSAL)
                m_new = tl.maximum(m_i, tl.max(sT, 0))
                m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.exp2(m_i - m_use)
                pT = tl.exp2(sT - m_use[None, :])
                l_i = l_i * alpha + tl.sum(pT, 0)
                m_i = m_new
                acc = acc * alpha[:, None]
                bacc = bacc * alpha[:, None]
                cv = _codes(VCODE, rows, tok_ok, D, DP, BITS, BT, DT)
                vs = tl.load(VSCALE + rows, mask=tok_ok, other=0.0).to(tl.float32)
                bacc = tl.dot(tl.trans(pT * vs[:, None]).to(DT), cv, acc=bacc)
            bv = tl.load(VBM + bmo + jj[:, None] * 16 + jj[None, :]).to(DT)             # Bm_v[r, j]
            vb = tl.dot(tl.reshape(bacc, (BM * DCP, 16)).to(DT), bv)
            acc += tl.reshape(vb, (BM, DP))

    lo_e = tl.maximum(lo, cl)
    if lo_e < hi:
        m_i, l_i, acc = _attend_exact(q, m_i, l_i, acc, lo_e, hi, n, T, c1, b, h, qh, t, qpos, rows_ok, dd, d_ok,
                                      RK, RV, srb, srh, srt, KNEW, VNEW, snb, snh, snt,
                                      MASK, smb, smh, smt, sml, qk_scale, BN, MASK_KIND, CAUSAL, DT)

    _store_partial(OPART, LSE, m_i, l_i, acc, bh * NSPLIT + sp, M, r, rows_ok, dd, DP)


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------
def check_decoquant(state, meta, what):
    """Shared checks of a DecoQuant layer state; returns (B, H, R, D, L, bits, block, LC)."""
    if int(meta[0]) != 1:
        raise NotImplementedError(f"{what}: this is the DecoQuant (codec 1) kernel, got codec {meta[0]}")
    if len(meta) != 5:
        raise ValueError(f"{what}: DecoQuant meta must be [1, R, L, bits, block], got {list(meta)}")
    if len(state) != 9:
        raise ValueError(f"{what}: a DecoQuant state has 9 tensors, got {len(state)}")
    _, R, L, bits, block = (int(x) for x in meta)
    rk = state[1]
    if rk.dim() != 4:
        raise ValueError(f"{what}: state[1] must be the (B, H, R, D) key ring, got {tuple(rk.shape)}")
    B, H, Rr, D = rk.shape
    if Rr != R:
        raise ValueError(f"{what}: ring has {Rr} slots but meta R={R}")
    if bits not in dq.BITS:
        raise ValueError(f"{what}: bits={bits} unsupported, use one of {dq.BITS}")
    if D % 16 or D > 256:
        raise ValueError(f"{what}: head_dim={D} must be a multiple of 16 and <= 256")
    if block < 16 or block % 16 or R % block:
        raise ValueError(f"{what}: block={block} must be a multiple of 16 that divides R={R}")
    LC = L // R * R
    expect = []
    for _ in range(2):
        expect += [(B, H, LC, D * bits // 8), (B, H, LC), (B, H, LC // block, 16, 16)]
    for i, (tns, shp) in enumerate(zip(state[3:], expect)):
        if tuple(tns.shape) != shp or not tns.is_contiguous():
            raise ValueError(f"{what}: state[{i + 3}] must be contiguous {shp}, got {tuple(tns.shape)} "
                             f"(contiguous={tns.is_contiguous()})")
    for i in (3, 6):
        if state[i].dtype != torch.uint8 or state[i + 1].dtype not in _SIDE or state[i + 2].dtype != state[i + 1].dtype:
            raise ValueError(f"{what}: codes must be uint8 and scale/Bm one of fp16/bf16/fp32, got "
                             f"{state[i].dtype}/{state[i + 1].dtype}/{state[i + 2].dtype}")
    if state[2].shape != rk.shape or state[0].numel() != 1:
        raise ValueError(f"{what}: state[0] must be a scalar length and state[2] match state[1]")
    if rk.stride(-1) != 1 or rk.stride() != state[2].stride():
        raise ValueError(f"{what}: ring buffers must be contiguous in D and share strides")
    return B, H, R, D, L, bits, block, LC


def _check_kv(k, v, B, H, D, dtype, what, names="k/v"):
    if k.dim() != 4 or k.shape != v.shape or tuple(k.shape[:2]) != (B, H) or k.shape[3] != D:
        raise ValueError(f"{what}: {names} must be (B={B}, H={H}, T, D={D}), got {tuple(k.shape)} / {tuple(v.shape)}")
    if k.dtype != dtype or v.dtype != dtype or dtype not in _TL:
        raise ValueError(f"{what}: {names} dtype {k.dtype}/{v.dtype} must equal the ring's {dtype} "
                         f"(fp16/bf16/fp32)")


def decoquant_append_(state, consts, k, v, meta):
    """Append T tokens to one DecoQuant layer cache in place (semantics of reference.append_).

    Parameters
    ----------
    state : list of Tensor
        DecoQuant cache state (mutated): length, ring K/V (B, H, R, D), then kcodes
        (B, H, LC, D*b/8) uint8, kscale (B, H, LC), kB (B, H, LC/block, 16, 16), vcodes, vscale, vB.
    consts : list of Tensor
        Unused (DecoQuant has no constant tensors); accepted for the common op signature.
    k, v : Tensor
        (B, H, T, D) new keys (after RoPE) and values, in the ring's dtype.
    meta : list of int
        [1, R, L, bits, block], block a multiple of 16 dividing R.

    Notes
    -----
    No overflow check (it would need a host sync): callers check length + T <= L on the host.
    Past the codec buffers nothing is written, and the length still grows.
    """
    B, H, R, D, L, bits, block, LC = check_decoquant(state, meta, "decoquant_append_")
    check_device(k, v, state[0], state[1], what="decoquant_append_")
    rk, rv = state[1], state[2]
    _check_kv(k, v, B, H, D, rk.dtype, "decoquant_append_")
    T = k.shape[2]
    if T == 0:
        return
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    DC = D // 16
    DCP = _p2(DC)
    nblk = (R - 1 + T) // R * (R // block)                      # most blocks T tokens can complete
    if nblk:
        for x, rx, i in ((k, rk, 3), (v, rv, 6)):
            _flush[(nblk, B * H)](
                x, x.stride(0), x.stride(1), x.stride(2), rx, rx.stride(0), rx.stride(1), rx.stride(2),
                state[0], state[i], state[i + 1], state[i + 2], H, T, LC,
                R=R, BLOCK=block, D=D, DC=DC, DCP=DCP, TB=max(1, 32 // DCP), BITS=bits,
                SIDE=_SIDE[state[i + 1].dtype], MAXSWEEP=MAX_SWEEPS, REL=REL_EPS,
                num_warps=8)                               # fp64 (32, 16, 16) Gram tiles: 32 doubles a thread
    if k.stride() != v.stride():                                # _ring indexes both with k's strides
        k, v = k.contiguous(), v.contiguous()
    BS = 32
    _ring[(triton.cdiv(R, BS), B * H)](
        k, v, k.stride(0), k.stride(1), k.stride(2), rk, rv, rk.stride(0), rk.stride(1), rk.stride(2),
        state[0], H, T, R=R, D=D, DP=_p2(D), BS=BS, num_warps=4)
    state[0].add_(T)


def _nsplit(B, H, n_mb, L, block, cuda):
    """Position splits from static shapes only (no autotune: CUDA-graph safe)."""
    target = 4 * 132 if cuda else 4
    return max(1, min(triton.cdiv(target, B * H * n_mb), triton.cdiv(L, max(256, block))))


def decoquant_attend(q, state, consts, k_new, v_new, attn_mask=None, is_causal=False, scale=None, meta=None,
                     nsplit=None, num_warps=4):
    """Fused DecoQuant attention over one layer's cache, after `append` (semantics of reference.attend).

    Parameters
    ----------
    q : Tensor
        (B, Hq, Tq, D) fp16/bf16/fp32, Hq = G * H. Rows G * Tq per kv head; any count works, the
        dispatcher sends more than 64 (chunked prefill) to SDPA instead.
    state : list of Tensor
        DecoQuant cache state (see `decoquant_append_`), length in state[0] read on the device.
    consts : list of Tensor
        Unused.
    k_new, v_new : Tensor
        (B, H, T, D) this step's tokens (already appended), attended exactly.
    attn_mask : Tensor, optional
        Bool (True = attend) or additive float, broadcastable to (B, Hq, Tq, L).
    is_causal : bool
        Without a mask, query i sees positions <= length - Tq + i.
    scale : float, optional
        Score scale, default 1/sqrt(D).
    meta : list of int
        [1, R, L, bits, block].
    nsplit : int, optional
        Position splits (default from static shapes); rounded so splits start on blocks.
    num_warps : int
        Warps per split program.

    Returns
    -------
    Tensor
        (B, Hq, Tq, D) in q's dtype.
    """
    B, H, R, D, L, bits, block, LC = check_decoquant(state, meta, "decoquant_attend")
    check_device(q, k_new, v_new, state[0], state[1], attn_mask, what="decoquant_attend")
    if q.dim() != 4 or q.shape[0] != B or q.shape[-1] != D or q.shape[1] % H:
        raise ValueError(f"decoquant_attend: q must be (B={B}, Hq, Tq, D={D}) with Hq a multiple of H={H}, "
                         f"got {tuple(q.shape)}")
    if q.dtype not in _TL:
        raise ValueError(f"decoquant_attend: q dtype {q.dtype} must be fp16/bf16/fp32")
    _check_kv(k_new, v_new, B, H, D, state[1].dtype, "decoquant_attend", "k_new/v_new")
    Hq, Tq, T = q.shape[1], q.shape[2], k_new.shape[2]
    G = Hq // H
    M = G * Tq
    q = q if q.stride(-1) == 1 else q.contiguous()
    if k_new.stride(-1) != 1 or v_new.stride() != k_new.stride():
        k_new, v_new = k_new.contiguous(), v_new.contiguous()
    rk, rv = state[1], state[2]

    mask_kind, mt, ms = mask_args(attn_mask, q)

    dot_dt = q.dtype
    if _interpret() and dot_dt == torch.bfloat16:
        dot_dt = torch.float32          # the interpreter's bf16 tl.dot is wrong (triton 3.9); CPU only
    BM = 16 if M <= 16 else 32
    n_mb = triton.cdiv(M, BM)
    ns = nsplit or _nsplit(B, H, n_mb, L, block, q.is_cuda)
    chunk = triton.cdiv(triton.cdiv(L, ns), block) * block
    ns = triton.cdiv(L, chunk)
    DP = _p2(D)
    out = torch.empty_like(q)
    sc = float(scale) if scale is not None else 1.0 / math.sqrt(D)
    opart = torch.empty(B * H, ns, M, DP, device=q.device, dtype=torch.float32)
    lse = torch.empty(B * H, ns, M, device=q.device, dtype=torch.float32)
    _attend_split[(B * H, n_mb, ns)](
        q, q.stride(0), q.stride(1), q.stride(2),
        state[0],
        rk, rv, rk.stride(0), rk.stride(1), rk.stride(2),
        k_new, v_new, k_new.stride(0), k_new.stride(1), k_new.stride(2),
        *state[3:9],
        mt, *ms,
        opart, lse,
        H, Tq, T, LC, chunk, ns, sc * LOG2E,
        G=G, R=R, BLOCK=block, D=D, DP=DP, DCP=DP // 16, BITS=bits, BM=BM,
        BT=32 if block % 32 == 0 else 16, BN=32, MASK_KIND=mask_kind, CAUSAL=bool(is_causal),
        DT=_TL[dot_dt], num_warps=num_warps, num_stages=2)
    _combine[(B * H, n_mb)](opart, lse, out, out.stride(0), out.stride(1), out.stride(2), H, Tq, ns,
                            G=G, D=D, DP=DP, BM=BM, num_warps=4)
    return out
