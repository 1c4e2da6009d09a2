"""QJL cache append (codec 0): compress every residual block that fills, then refill the ring.

Two launches on the current stream, sized from static shapes (T, R, B*H) only:

- `_compress`: one program per (32-token group, b * kv head) of the largest block that T new
  tokens can complete; which groups are live is decided on the device from state[0]. Each
  live program gathers its 32 keys/values (ring or new tokens), picks the group's o outlier
  channels, projects the inlier/outlier parts with the sketches (fp32), packs the signs
  LSB-first, stores norms, and quantizes the values to b bits per 32... channel group.
- `_ring`: copies the new tokens that stay exact into ring slots (after `_compress` has read
  the old ring, hence the second launch).

Then ``state[0] += T`` (a device op). No host sync, so it captures in a CUDA graph.

Overflow (length + T > L) cannot be checked here without a sync: the cache layer checks it on
the host. If it happens anyway, positions past the codec buffers are dropped (never written
out of bounds) and the length still grows.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import reference as ref
from ..checks import qjl_key_fit
from .qjl_attend import _TL, _interpret, _p2, check_device, check_qjl, qjl_center, sketch_t

_SIDE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


@triton.jit
def _round_half_even(x):
    f = tl.floor(x)
    d = x - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    up = (d > 0.5) | ((d == 0.5) & odd)
    return tl.where(up, f + 1.0, f)


@triton.jit
def _pack_signs(x, PB: tl.constexpr):
    """(32, PB * 8) fp32 projections -> (32, PB) uint8 of (x >= 0), LSB first."""
    b = tl.reshape((x >= 0).to(tl.int32), (32, PB, 8))
    w = (1 << tl.arange(0, 8))
    return tl.sum(b * w[None, None, :], 2).to(tl.uint8)


@triton.jit
def _sketch_signs(x, S_T, OUT, row_ptr, M: tl.constexpr, DP: tl.constexpr, D: tl.constexpr,
                  MC: tl.constexpr, PREC: tl.constexpr, FIT: tl.constexpr = False):
    """Store packed sign(x @ S^T) of 32 tokens, chunks of MC sketch rows. x: (32, DP) fp32.
    FIT: returns u = sign(x S^T) S (32, DP), the decoded direction (a fitted key norm needs it)."""
    dd = tl.arange(0, DP)
    u = x * 0.0
    for m0 in range(0, M, MC):            # a runtime loop: keeps one sketch chunk live at a time
        mm = m0 + tl.arange(0, MC)
        if (D == DP) and (M % MC == 0):
            st = tl.load(S_T + dd[:, None] * M + mm[None, :])
        else:
            st = tl.load(S_T + dd[:, None] * M + mm[None, :], mask=(dd[:, None] < D) & (mm[None, :] < M), other=0.0)
        proj = tl.dot(x, st, input_precision=PREC)                           # (32, MC)
        pk = _pack_signs(proj, MC // 8)
        pb = m0 // 8 + tl.arange(0, MC // 8)
        tl.store(OUT + row_ptr[:, None] * (M // 8) + pb[None, :], pk, mask=(pb < M // 8)[None, :])
        if FIT:   # rows past M are zero in st, so their signs add nothing
            u += tl.dot(tl.where(proj >= 0, 1.0, -1.0), tl.trans(st), input_precision=PREC)
    return u


@triton.jit
def _compress(
    K, V, skb, skh, skt,                     # new tokens (B, H, T, D)
    RK, RV, srb, srh, srt,                   # ring (B, H, R, D)
    LEN,
    KBITS, KNORM, KOBITS, KONORM, KIDX, VCODE, VSCALE, VZERO, KMEAN,
    S_T, SO_T,                               # (D, m), (D, m_out) fp32
    H, T, LC,
    R: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, MS: tl.constexpr, MO: tl.constexpr,
    NO: tl.constexpr, VB: tl.constexpr, VG: tl.constexpr, NGVP: tl.constexpr,
    MC: tl.constexpr, MOC: tl.constexpr, SIDE: tl.constexpr, PREC: tl.constexpr,
    CENTER: tl.constexpr, RP: tl.constexpr, FIT: tl.constexpr, CQ,
):
    gi = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    n = tl.load(LEN).to(tl.int32)
    c0 = n // R * R
    c1 = (n + T) // R * R
    p0 = c0 + gi * 32
    if (p0 < c1) & (p0 + 32 <= LC):
        tok = p0 + tl.arange(0, 32)
        dd = tl.arange(0, DP)
        d_ok = dd < D
        in_ring = tok < n
        m_r = in_ring[:, None] & d_ok[None, :]
        m_n = (~in_ring)[:, None] & d_ok[None, :]
        off_r = b * srb + h * srh + (tok - c0)[:, None] * srt + dd[None, :]
        off_n = b * skb + h * skh + (tok - n)[:, None] * skt + dd[None, :]
        v = tl.where(m_r, tl.load(RV + off_r, mask=m_r, other=0.0), tl.load(V + off_n, mask=m_n, other=0.0))
        v = v.to(tl.float32)
        row = bh * LC + tok                                             # token rows of the codec buffers

        # values: per token and VG-channel group, min/max to VB bits (scale/zero rounded first)
        g3 = tl.arange(0, NGVP)
        gok = g3 < D // VG
        v3 = tl.reshape(v, (32, NGVP, VG))
        v_ok = tl.reshape(m_r | m_n, (32, NGVP, VG))
        mn = tl.min(tl.where(v_ok, v3, float("inf")), 2)
        mx = tl.max(tl.where(v_ok, v3, float("-inf")), 2)
        QMAX: tl.constexpr = (1 << VB) - 1
        sc = ((mx - mn) / QMAX).to(SIDE)
        zr = mn.to(SIDE)
        sm = gok[None, :]
        so = row[:, None] * (D // VG) + g3[None, :]
        tl.store(VSCALE + so, sc, mask=sm)
        tl.store(VZERO + so, zr, mask=sm)
        scf = sc.to(tl.float32)[:, :, None]
        c = _round_half_even((v3 - zr.to(tl.float32)[:, :, None]) / tl.maximum(scf, 1e-30))
        c = tl.where(scf > 0, c, 0.0)
        c = tl.minimum(tl.maximum(c, 0.0), QMAX * 1.0).to(tl.int32)
        PER: tl.constexpr = 8 // VB
        NBP: tl.constexpr = NGVP * VG // PER
        c = tl.reshape(c, (32, NBP, PER))
        sh = tl.arange(0, PER) * VB
        pk = tl.sum(c << sh[None, None, :], 2).to(tl.uint8)              # (32, NBP)
        pb = tl.arange(0, NBP)
        NB: tl.constexpr = D * VB // 8
        tl.store(VCODE + row[:, None] * NB + pb[None, :], pk, mask=(pb < NB)[None, :])

        k = tl.where(m_r, tl.load(RK + off_r, mask=m_r, other=0.0), tl.load(K + off_n, mask=m_n, other=0.0))
        k = k.to(tl.float32)                                            # (32, DP)
        if CENTER:
            # key centering: the mean key of this group's R-token block (every group of the block
            # recomputes it; the block's first group stores it), rounded to the side dtype as stored
            bs = p0 // R * R
            bt = bs + tl.arange(0, RP)
            b_ok = bt < bs + R
            br = b_ok & (bt < n)
            mbr = br[:, None] & d_ok[None, :]
            mbn = (b_ok & (bt >= n))[:, None] & d_ok[None, :]
            kb = tl.where(mbr, tl.load(RK + b * srb + h * srh + (bt - c0)[:, None] * srt + dd[None, :], mask=mbr,
                                       other=0.0),
                          tl.load(K + b * skb + h * skh + (bt - n)[:, None] * skt + dd[None, :], mask=mbn, other=0.0))
            mean = (tl.sum(kb.to(tl.float32), 0) / R).to(SIDE)          # (DP,)
            if p0 == bs:
                tl.store(KMEAN + (bh * (LC // R) + bs // R) * D + dd, mean, mask=d_ok)
            k = tl.where(m_r | m_n, k - mean.to(tl.float32)[None, :], 0.0)
        # outliers: the NO channels of largest L2 norm over the group, stored sorted ascending
        if NO > 0:
            cn = tl.sum(k * k, 0)                                       # (DP,)
            cn = tl.where(d_ok, cn, -1.0)
            sel = dd < 0
            for _ in tl.static_range(NO):
                a = tl.argmax(tl.where(sel, -2.0, cn), 0)
                sel = sel | (dd == a)
            rank = tl.cumsum(sel.to(tl.int32), 0) - 1
            tl.store(KIDX + (bh * (LC // 32) + p0 // 32) * NO + rank, dd.to(tl.uint8), mask=sel)
            k_out = tl.where(sel[None, :], k, 0.0)
            k_in = k - k_out
        else:
            k_out = k * 0.0
            k_in = k
        nin = tl.sqrt(tl.sum(k_in * k_in, 1))
        u = _sketch_signs(k_in, S_T, KBITS, row, MS, DP, D, MC, PREC, FIT > 0)
        if FIT > 0:   # QJLConfig.qjl_key_scale (reference.qjl_fit_norm): the decoded direction's own norm
            if NO > 0:
                u = tl.where(sel[None, :], 0.0, u)
            u = u * CQ
            uu = tl.maximum(tl.sum(u * u, 1), 1e-30)
            if FIT == 1:
                nfit = nin / tl.sqrt(uu)
            else:
                nfit = tl.sum(k_in * u, 1) / uu
            nin = tl.where(nin > 0, nfit, 0.0)
        tl.store(KNORM + row, nin.to(SIDE))
        if MO > 0:
            tl.store(KONORM + row, tl.sqrt(tl.sum(k_out * k_out, 1)).to(SIDE))
            _sketch_signs(k_out, SO_T, KOBITS, row, MO, DP, D, MOC, PREC, False)


@triton.jit
def _ring(K, V, skb, skh, skt, RK, RV, srb, srh, srt, LEN, H, T,
          R: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, BS: tl.constexpr):
    """Ring slots [0, R): position c1 + slot takes new token (c1 + slot - n) where that is new."""
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    n = tl.load(LEN).to(tl.int32)
    c1 = (n + T) // R * R
    slot = tl.program_id(0) * BS + tl.arange(0, BS)
    pos = c1 + slot
    ok = (slot < R) & (pos >= n) & (pos < n + T)
    dd = tl.arange(0, DP)
    m = ok[:, None] & (dd < D)[None, :]
    src = b * skb + h * skh + (pos - n)[:, None] * skt + dd[None, :]
    dst = b * srb + h * srh + slot[:, None] * srt + dd[None, :]
    tl.store(RK + dst, tl.load(K + src, mask=m), mask=m)
    tl.store(RV + dst, tl.load(V + src, mask=m), mask=m)


def qjl_append_(state, consts, k, v, meta):
    """Append T tokens to one QJL layer cache in place (semantics of reference.append_).

    Parameters
    ----------
    state : list of Tensor
        QJL cache state (mutated): length, ring K/V (B, H, R, D), codec buffers.
    consts : list of Tensor
        [S (m, D), S_out (m_out, D)] fp32.
    k, v : Tensor
        (B, H, T, D) new keys (after RoPE) and values, in the ring's dtype.
    meta : list of int
        [0, R, L, o, value_bits, value_group].

    Notes
    -----
    No overflow check (it would need a host sync): callers check length + T <= L on the host.
    """
    B, H, R, D, L, m, mo, o, vb, vg, LC = check_qjl(state, consts, meta, "qjl_append_")
    center = qjl_center(meta)          # QJLConfig.qjl_center: state[11] holds the block means
    fit = qjl_key_fit(meta)            # QJLConfig.qjl_key_scale: 0 unbiased, 1 match, 2 lsq
    check_device(k, v, state[0], state[1], consts[0], what="qjl_append_")
    rk, rv = state[1], state[2]
    if k.dim() != 4 or k.shape != v.shape or tuple(k.shape[:2]) != (B, H) or k.shape[3] != D:
        raise ValueError(f"qjl_append_: k/v must be (B={B}, H={H}, T, D={D}), got {tuple(k.shape)} / {tuple(v.shape)}")
    if k.dtype != rk.dtype or v.dtype != rk.dtype or rk.dtype not in _TL:
        raise ValueError(f"qjl_append_: k/v dtype {k.dtype}/{v.dtype} must equal the ring's {rk.dtype}")
    if rk.stride(-1) != 1 or rk.stride() != rv.stride():
        raise ValueError("qjl_append_: ring buffers must be contiguous in D and share strides")
    side = state[4].dtype
    if side not in _SIDE:
        raise ValueError(f"qjl_append_: side dtype {side} unsupported")
    T = k.shape[2]
    if T == 0:
        return
    if k.stride(-1) != 1 or v.stride() != k.stride():
        k, v = k.contiguous(), v.contiguous()
    DP = _p2(D)
    S_T = sketch_t(consts[0], torch.float32)
    SO_T = sketch_t(consts[1], torch.float32) if mo else S_T
    ngroups = (R - 1 + T) // R * R // 32                          # most groups T tokens can complete
    if ngroups:
        _compress[(ngroups, B * H)](
            k, v, k.stride(0), k.stride(1), k.stride(2),
            rk, rv, rk.stride(0), rk.stride(1), rk.stride(2),
            state[0], *state[3:11], state[11] if center else state[4], S_T, SO_T, H, T, LC,
            R=R, D=D, DP=DP, MS=m, MO=mo, NO=o, VB=vb, VG=vg, NGVP=_p2(D // vg),
            MC=min(64, _p2(m)), MOC=min(64, _p2(max(mo, 16))), SIDE=_SIDE[side],
            PREC="ieee" if _interpret() else "tf32x3",     # tf32x3: ~fp32 accuracy on tensor cores
            CENTER=bool(center), RP=_p2(R), FIT=fit, CQ=ref.qjl_const(m, D),
            num_warps=8,                                    # 4 warps spill (ptxas report, sm_90)
        )
    BS = 32
    _ring[(triton.cdiv(R, BS), B * H)](
        k, v, k.stride(0), k.stride(1), k.stride(2), rk, rv, rk.stride(0), rk.stride(1), rk.stride(2),
        state[0], H, T, R=R, D=D, DP=DP, BS=BS, num_warps=4)
    state[0].add_(T)
