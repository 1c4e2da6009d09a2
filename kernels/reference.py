"""Ground truth: the compressed-cache math in plain PyTorch (DESIGN.md sections 3-5).

Everything here is written for clarity, in fp32, and is what the Triton kernels are tested
against. Shapes: B batch, H kv heads, G = query heads per kv head, T new tokens, Tq query
tokens, D head_dim, L = max_cache_len, R residual window, m / m_out sketch rows.

Cache state (one list per layer, the layout every op takes; `Codec.specs` gives the rest):

    state[0] length  int64 ()          tokens stored (compressed + residual)
    state[1] rk      (B, H, R, D)      exact residual keys, slot = position % R
    state[2] rv      (B, H, R, D)      exact residual values
    state[3:]        codec buffers     rows indexed by position // spec.per

Semantics shared by every op: positions < (length // R) * R are compressed, the rest sit
exact in the ring. ``attend`` and ``dequantize`` run after ``append`` and read the new
tokens exact (so a prefill attends exactly to itself while it is stored compressed).

meta (list[int]): [codec_id, R, L, *codec params].
"""
from __future__ import annotations

import abc
import math
from dataclasses import dataclass

import torch

GROUP = 32  # outlier token group


# ----------------------------------------------------------------------------------------------
# QJL primitives
# ----------------------------------------------------------------------------------------------
def haar(d: int, g: torch.Generator) -> torch.Tensor:
    """Haar-random orthogonal (d, d) fp64 from `g`: QR of a Gaussian, R's diagonal made positive."""
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    nt = torch.get_num_threads()
    torch.set_num_threads(1)  # a small QR: multi-threaded LAPACK is ~1000x slower on 2-core CPUs
    try:
        q, r = torch.linalg.qr(a)
    finally:
        torch.set_num_threads(nt)
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


def sketch(d: int, m: int, seed: int, salt: int = 0) -> torch.Tensor:
    """Random JL sketch, (m, d) fp32, deterministic in (seed, salt).

    Stacks ceil(m/d) Haar-random orthogonal d x d blocks scaled by sqrt(d), so every row has
    norm sqrt(d) and rows within a block are orthogonal; keeps the first m rows.
    """
    if m == 0:   # no sketch (e.g. the outlier sketch with outliers=0)
        return torch.zeros(0, d, dtype=torch.float32)
    g = torch.Generator(device="cpu").manual_seed(int(seed) * 1_000_003 + int(salt))
    blocks = []
    for _ in range(-(-m // d)):
        blocks.append(haar(d, g).T * math.sqrt(d))
    return torch.cat(blocks)[:m].to(torch.float32).contiguous()


def qjl_const(m: int, d: int) -> float:
    """Estimator constant: E[<s,q> sign(<s,k>)] = <q,k>/(||k|| * m * c) for one sketch row s.

    A row of the scaled orthogonal sketch is uniform on the sphere of radius sqrt(d), not
    Gaussian, so E|<s,k>|/||k|| = sqrt(d) * E|u_1| = sqrt(d) * G(d/2) / (sqrt(pi) G((d+1)/2)).
    This tends to sqrt(2/pi) (the paper's sqrt(pi/2)/m) as d grows; at d=64 the paper's
    constant is 0.4% biased, this one is exact.
    """
    e_abs = math.exp(math.lgamma(d / 2) - math.lgamma((d + 1) / 2)) / math.sqrt(math.pi)
    return 1.0 / (m * math.sqrt(d) * e_abs)


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """(..., n) bool -> (..., n/8) uint8, LSB first."""
    n = bits.shape[-1]
    assert n % 8 == 0, n
    w = (1 << torch.arange(8, device=bits.device, dtype=torch.int32))
    b = bits.reshape(*bits.shape[:-1], n // 8, 8).to(torch.int32)
    return (b * w).sum(-1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor) -> torch.Tensor:
    """(..., n/8) uint8 -> (..., n) bool, LSB first."""
    sh = torch.arange(8, device=packed.device, dtype=torch.int32)
    b = (packed.to(torch.int32).unsqueeze(-1) >> sh) & 1
    return b.reshape(*packed.shape[:-1], packed.shape[-1] * 8).bool()


def signs(packed: torch.Tensor) -> torch.Tensor:
    """Packed sign bits -> +-1 fp32."""
    return unpack_bits(packed).float() * 2 - 1


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(..., n) ints in [0, 2^bits) -> (..., n*bits/8) uint8, LSB first (bits in 1, 2, 4, 8)."""
    per = 8 // bits
    c = codes.to(torch.int32).reshape(*codes.shape[:-1], codes.shape[-1] // per, per)
    sh = torch.arange(per, device=codes.device, dtype=torch.int32) * bits
    return (c << sh).sum(-1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    per = 8 // bits
    sh = torch.arange(per, device=packed.device, dtype=torch.int32) * bits
    c = (packed.to(torch.int32).unsqueeze(-1) >> sh) & ((1 << bits) - 1)
    return c.reshape(*packed.shape[:-1], packed.shape[-1] * per)


def outlier_index(k: torch.Tensor, o: int) -> torch.Tensor:
    """Per 32-token group, the o channels of largest L2 norm over the group.

    k: (..., N, D) with N % 32 == 0 -> (..., N/32, o) int64, sorted ascending.
    """
    *lead, n, d = k.shape
    g = k.float().reshape(*lead, n // GROUP, GROUP, d)
    idx = g.norm(dim=-2).topk(o, dim=-1).indices
    return idx.sort(dim=-1).values


def outlier_values(k: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """(..., N, D) keys, (..., N/32, o) channels -> (..., N, o) fp32: each key's values on its group's outlier channels."""
    return torch.gather(k.float(), -1, idx.long().repeat_interleave(GROUP, dim=-2))


def outlier_mask(idx: torch.Tensor, d: int, n: int) -> torch.Tensor:
    """(..., N/32, o) channel indices -> (..., N, D) bool, True on outlier channels."""
    *lead, ng, o = idx.shape
    m = torch.zeros(*lead, ng, d, dtype=torch.bool, device=idx.device)
    if o:
        m.scatter_(-1, idx.long(), True)
    return m.repeat_interleave(GROUP, dim=-2)


def qjl_quantize_keys(k, S, S_out, o, side_dtype=torch.float16):
    """Quantize keys with QJL.

    Parameters
    ----------
    k : (..., N, D) with N % 32 == 0
    S : (m, D) fp32 sketch;  S_out : (m_out, D) fp32 outlier sketch (m_out may be 0)
    o : outlier channels per 32-token group

    Returns
    -------
    bits (..., N, m/8) uint8, norm (..., N), obits (..., N, m_out/8) uint8, onorm (..., N),
    idx (..., N/32, o) uint8.
    """
    kf = k.float()
    n, d = kf.shape[-2:]
    if o:
        idx = outlier_index(kf, o)
        mo = outlier_mask(idx, d, n)
    else:
        idx = torch.zeros(*kf.shape[:-2], n // GROUP, 0, dtype=torch.long, device=k.device)
        mo = torch.zeros_like(kf, dtype=torch.bool)
    k_out = kf * mo
    k_in = kf - k_out
    bits = pack_bits(k_in @ S.T >= 0)
    obits = pack_bits(k_out @ S_out.T >= 0)
    return (bits, k_in.norm(dim=-1).to(side_dtype), obits, k_out.norm(dim=-1).to(side_dtype),
            idx.to(torch.uint8))


def qjl_dequantize_keys(bits, norm, obits, onorm, idx, S, S_out):
    """The key that gives the estimator's score exactly: q . k_hat == QJL estimate of q . k.

    k_hat = c(m) ||k_in|| mask_in * (S^T sign(S k_in)) + c(m_out) ||k_out|| mask_out * (S_out^T sign(S_out k_out)).
    Masking by the token group's outlier channels keeps the estimate unbiased (<q, k_in> only
    involves inlier channels) and removes the outlier channels' share of its variance.
    Returns (..., N, D) fp32.
    """
    m, d = S.shape
    n = bits.shape[-2]
    mo = outlier_mask(idx, d, n)
    k_in = qjl_const(m, d) * norm.float().unsqueeze(-1) * (signs(bits) @ S)
    k_hat = torch.where(mo, 0.0, k_in)
    if S_out.shape[0] and idx.shape[-1]:
        k_out = qjl_const(S_out.shape[0], d) * onorm.float().unsqueeze(-1) * (signs(obits) @ S_out)
        k_hat = k_hat + torch.where(mo, k_out, 0.0)
    return k_hat


def qjl_scores(q, bits, norm, obits, onorm, idx, S, S_out):
    """QJL estimate of q . k, computed in the sketch domain (what the fused kernel does).

    q : (..., Q, D);  keys as returned by `qjl_quantize_keys` over N tokens.
    Returns (..., Q, N) fp32.  Per 32-token group g the query is split like the key:
    S (q * mask_in_g) = S q - S[:, idx_g] q[idx_g], and S_out (q * mask_out_g) = S_out[:, idx_g] q[idx_g].
    """
    m, d = S.shape
    qf = q.float()
    n = bits.shape[-2]
    ng = n // GROUP
    sq = qf @ S.T                                                       # (..., Q, m)
    sg = signs(bits).reshape(*bits.shape[:-2], ng, GROUP, m)            # (..., NG, 32, m)
    o = idx.shape[-1]
    if o:
        il = idx.long()
        q_sel = torch.gather(qf.unsqueeze(-2).expand(*qf.shape[:-1], ng, d), -1,
                             il.unsqueeze(-3).expand(*il.shape[:-2], qf.shape[-2], ng, o))  # (..., Q, NG, o)
        s_sel = S.T[il]                                                 # (..., NG, o, m)
        sq_in = sq.unsqueeze(-2) - torch.einsum("...qgo,...gom->...qgm", q_sel, s_sel)
    else:
        sq_in = sq.unsqueeze(-2).expand(*sq.shape[:-1], ng, m)
    raw = torch.einsum("...qgm,...gtm->...qgt", sq_in, sg).reshape(*sq.shape[:-1], n)
    out = qjl_const(m, d) * raw * norm.float().unsqueeze(-2)
    mo = S_out.shape[0]
    if o and mo:
        so = signs(obits).reshape(*obits.shape[:-2], ng, GROUP, mo)
        sq_out = torch.einsum("...qgo,...gom->...qgm", q_sel, S_out.T[il])
        raw_o = torch.einsum("...qgm,...gtm->...qgt", sq_out, so).reshape(*sq.shape[:-1], n)
        out = out + qjl_const(mo, d) * raw_o * onorm.float().unsqueeze(-2)
    return out


def quantize_values(v, bits, group, side_dtype=torch.float16):
    """Per token, per `group` channels, asymmetric min/max to `bits` bits.

    v : (..., N, D) -> codes (..., N, D*bits/8) uint8, scale (..., N, D/group), zero (same).
    Scale and zero are rounded to `side_dtype` before coding, so codes match what is stored.
    """
    vf = v.float()
    *lead, n, d = vf.shape
    g = vf.reshape(*lead, n, d // group, group)
    mn, mx = g.amin(-1), g.amax(-1)
    qmax = (1 << bits) - 1
    scale = ((mx - mn) / qmax).to(side_dtype)
    zero = mn.to(side_dtype)
    sf = scale.float().unsqueeze(-1)
    codes = torch.where(sf > 0, torch.round((g - zero.float().unsqueeze(-1)) / sf.clamp_min(1e-30)), 0.0)
    codes = codes.clamp(0, qmax).reshape(*lead, n, d)
    return pack_codes(codes, bits), scale, zero


def dequantize_values(codes, scale, zero, bits, group):
    c = unpack_codes(codes, bits).float()
    *lead, n, d = c.shape
    g = c.reshape(*lead, n, d // group, group)
    return (g * scale.float().unsqueeze(-1) + zero.float().unsqueeze(-1)).reshape(*lead, n, d)


# ----------------------------------------------------------------------------------------------
# Codecs: how a block of exact K/V becomes the codec's buffers, and back
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Spec:
    """One codec buffer: shape (B, H, L // per, *tail), `dtype` "side" = the config's side dtype.

    head > 0: the buffer holds only positions [0, head) (shape (B, H, head // per, *tail)), e.g.
    attention-sink tokens kept exact; `append_` stores the rows of a flush that fall in it.
    """
    name: str
    per: int
    tail: tuple
    dtype: object
    head: int = 0


class Codec(abc.ABC):
    """Interface of a cache codec (reference side). Instances register in CODECS by `id`.

    A codec stores a block of exact K/V (B, H, N, D), N a multiple of the residual window R,
    as the buffers `specs` lists (rows indexed by position // spec.per), and scores/decodes them.
    """
    id: int
    name: str

    @abc.abstractmethod
    def specs(self, d: int, consts, params) -> list[Spec]:
        """The codec's buffers for head_dim d."""

    @abc.abstractmethod
    def compress(self, k, v, consts, params, side_dtype=torch.float16) -> list[torch.Tensor]:
        """Exact (B, H, N, D) keys/values -> one tensor per spec, N // spec.per rows each."""

    @abc.abstractmethod
    def decompress(self, bufs, consts, params) -> tuple[torch.Tensor, torch.Tensor]:
        """Buffers of N positions -> (K, V), (B, H, N, D) fp32."""

    def scores(self, q, bufs, consts, params) -> torch.Tensor:
        k, _ = self.decompress(bufs, consts, params)
        return q.float() @ k.transpose(-1, -2)

    def values(self, bufs, consts, params) -> torch.Tensor:
        return self.decompress(bufs, consts, params)[1]


def qjl_center_block(params) -> int:
    """Key-centering block of QJL params [o, value_bits, value_group(, center(, exact))]: 0 = off, else R."""
    return int(params[3]) if len(params) > 3 else 0


def qjl_exact_outliers(params) -> bool:
    """QJL params' 5th entry: the outlier channels stored exactly (QJLConfig.qjl_exact_outliers)."""
    return len(params) > 4 and bool(int(params[4]))


def qjl_value_rotation(params) -> bool:
    """QJL params' 6th entry: values coded as the rotation codec codes them (QJLConfig.qjl_value_codec
    = "rotation"): Pi v, Lloyd-Max codes of value_bits bits, one "match" scale per token; consts gain
    [Pi_v, codebook_v]."""
    return len(params) > 5 and bool(int(params[5]))


VROT_SCALE = 1   # rotation.SCALE_MODES["match"]: the rotation presets' value scale
QJL_KEY_SCALES = {"unbiased": 0, "match": 1, "lsq": 2}


def qjl_key_scale(params) -> int:
    """QJL params' 7th entry (QJLConfig.qjl_key_scale): how the stored key norm scales the decoded
    direction u = mask_in(S^T sign(S k_in)). 0 = ||k_in|| (the paper's unbiased estimator);
    1 = match, c ||u|| stored norm = ||k_in|| (k_hat keeps the key's norm); 2 = lsq, the multiple of u
    nearest k_in. The format is unchanged: only the stored norm differs."""
    return int(params[6]) if len(params) > 6 else 0


def qjl_fit_norm(k_in, bits, S, mode, idx, side_dtype):
    """The stored norm of `qjl_key_scale` mode 1 / 2 for inlier keys k_in (..., N, D)."""
    m, d = S.shape
    u = torch.where(outlier_mask(idx, d, k_in.shape[-2]), 0.0, signs(bits) @ S) * qjl_const(m, d)
    uu = u.pow(2).sum(-1).clamp_min(1e-30)
    if mode == 1:
        nrm = k_in.norm(dim=-1) / uu.sqrt()
    else:
        nrm = (k_in * u).sum(-1) / uu
    return torch.where(k_in.norm(dim=-1) > 0, nrm, 0.0).to(side_dtype)


def block_means(k, block, side_dtype=torch.float16):
    """(..., N, D) -> per-block mean (..., N/block, D), rounded to `side_dtype` (what is stored)."""
    *lead, n, d = k.shape
    return k.float().reshape(*lead, n // block, block, d).mean(-2).to(side_dtype)


class QJLCodec(Codec):
    """QJL keys (1-bit sketch + outliers), min/max values. params = [o, value_bits, value_group]
    or [o, value_bits, value_group, center(, exact(, value_rotation(, key_scale)))] (key_scale:
    `qjl_key_scale`, only compress reads it). value_rotation = 1 codes the
    values with a random rotation and a Lloyd-Max codebook instead (`qjl_value_rotation`, consts
    [S, S_out, Pi_v, codebook_v], one scale per token, no zero). center = R (the block size) subtracts each
    compressed block's mean key (per batch and kv head) before the outlier split and the sketch,
    stores the mean (buffer "kmean", one side-dtype D-vector per block: 16/R bits per key value)
    and adds q . mean exactly to every score of the block (k_hat = mean + QJL k_hat of the rest,
    so the dequantized-key identity still holds)."""
    id = 0
    name = "qjl"

    def specs(self, d, consts, params):
        o, vb, vg = params[:3]
        m, mo = consts[0].shape[0], consts[1].shape[0]
        ex = qjl_exact_outliers(params)
        vr = qjl_value_rotation(params)
        if vr and len(consts) != 4:
            raise ValueError(f"QJL codec: rotation-coded values take consts [S, S_out, Pi_v, codebook_v], got {len(consts)}")
        if ex and mo:
            raise ValueError(f"QJL codec: exact outlier channels take no outlier sketch, got m_out={mo}")
        out = [Spec("kbits", 1, (m // 8,), torch.uint8), Spec("knorm", 1, (), "side"),
               Spec("kobits", 1, (mo // 8,), torch.uint8), Spec("konorm", 1, (0,) if ex else (), "side"),
               Spec("kidx", GROUP, (o,), torch.uint8), Spec("vcodes", 1, (d * vb // 8,), torch.uint8),
               Spec("vscale", 1, (1,) if vr else (d // vg,), "side"), Spec("vzero", 1, (0,) if vr else (d // vg,), "side")]
        cb = qjl_center_block(params)
        if cb:
            out.append(Spec("kmean", cb, (d,), "side"))
        if ex:
            out.append(Spec("koval", 1, (o,), "side"))     # the group's outlier channels of each key, exact
        return out

    def compress(self, k, v, consts, params, side_dtype=torch.float16):
        o, vb, vg = params[:3]
        cb = qjl_center_block(params)
        S, So = consts[:2]
        extra = []
        if cb:
            mean = block_means(k, cb, side_dtype)
            k = k.float() - mean.float().repeat_interleave(cb, dim=-2)
            extra = [mean]
        bits, norm, obits, onorm, idx = qjl_quantize_keys(k, S, So, o, side_dtype)
        ks = qjl_key_scale(params)
        if ks:
            k_in = torch.where(outlier_mask(idx, k.shape[-1], k.shape[-2]), 0.0, k.float())
            norm = qjl_fit_norm(k_in, bits, S, ks, idx, side_dtype)
        if qjl_exact_outliers(params):
            extra.append(outlier_values(k, idx).to(side_dtype))
            onorm = onorm.unsqueeze(-1)[..., :0]          # (..., N, 0): no outlier norm
        if qjl_value_rotation(params):
            from . import rotation as rot
            codes, a = rot.quantize(v, consts[2], consts[3], VROT_SCALE, side_dtype)
            scale, zero = a.unsqueeze(-1), a.unsqueeze(-1)[..., :0]
        else:
            codes, scale, zero = quantize_values(v, vb, vg, side_dtype)
        return [bits, norm, obits, onorm, idx, codes, scale, zero, *extra]

    def decompress(self, bufs, consts, params):
        return self.keys(bufs, consts, params), self.values(bufs, consts, params)

    def keys(self, bufs, consts, params):
        bits, norm, obits, onorm, idx = bufs[:5]
        k = qjl_dequantize_keys(bits, norm, obits, onorm, idx, *consts[:2])
        if qjl_exact_outliers(params):
            k = k.scatter(-1, idx.long().repeat_interleave(GROUP, dim=-2), bufs[-1].float())
        cb = qjl_center_block(params)
        if cb:
            k = k + bufs[8].float().repeat_interleave(cb, dim=-2)
        return k

    def values(self, bufs, consts, params):
        vb, vg = params[1:3]
        if qjl_value_rotation(params):
            from . import rotation as rot
            return rot.dequantize(bufs[5], bufs[6][..., 0], consts[2], consts[3])
        return dequantize_values(bufs[5], bufs[6], bufs[7], vb, vg)

    def scores(self, q, bufs, consts, params):
        bits, norm, obits, onorm, idx = bufs[:5]
        s = qjl_scores(q, bits, norm, obits, onorm, idx, *consts[:2])
        if qjl_exact_outliers(params):   # + q . (the key's exact outlier channels)
            n, ng = bits.shape[-2], bits.shape[-2] // GROUP
            il = idx.long()
            qf = q.float()
            q_sel = torch.gather(qf.unsqueeze(-2).expand(*qf.shape[:-1], ng, qf.shape[-1]), -1,
                                 il.unsqueeze(-3).expand(*il.shape[:-2], qf.shape[-2], ng, il.shape[-1]))
            kov = bufs[-1].float().reshape(*bufs[-1].shape[:-2], ng, GROUP, il.shape[-1])
            s = s + torch.einsum("...qgo,...gto->...qgt", q_sel, kov).reshape(*s.shape[:-1], n)
        cb = qjl_center_block(params)
        if cb:   # exact q . mean of each token's block
            s = s + (q.float() @ bufs[8].float().transpose(-1, -2)).repeat_interleave(cb, dim=-1)
        return s


CODECS: dict[int, Codec] = {QJLCodec.id: QJLCodec()}


def register_codec(codec: Codec) -> None:
    CODECS[codec.id] = codec


def codec_of(meta) -> Codec:
    try:
        return CODECS[int(meta[0])]
    except KeyError:
        raise ValueError(f"unknown codec id {meta[0]}; known: {sorted(CODECS)}") from None


# ----------------------------------------------------------------------------------------------
# Cache-level reference ops (what kernels/ops.py registers as the CPU implementation)
# ----------------------------------------------------------------------------------------------
def _rows(bufs, specs, n):
    """Codec buffers restricted to the first n positions."""
    return [b[:, :, : n // s.per] for b, s in zip(bufs, specs)]


def _side(state):
    for t in state[3:]:
        if t.is_floating_point():
            return t.dtype
    return torch.float16


def append_(state, consts, k, v, meta) -> None:
    """Store T new tokens: exact into the ring, full R-blocks compressed. Mutates `state`.

    k, v : (B, H, T, D) in the ring's dtype. Raises before writing if L would overflow.
    """
    codec, R, L, params = codec_of(meta), int(meta[1]), int(meta[2]), list(meta[3:])
    length, rk, rv = state[0], state[1], state[2]
    n, T = int(length), k.shape[2]
    if n + T > L:
        raise ValueError(f"QJLCache overflow: {n} tokens stored + {T} new > max_cache_len={L}; "
                         f"create the cache with a larger max_cache_len")
    c0, c1 = n // R * R, (n + T) // R * R
    xk = torch.cat([rk[:, :, : n - c0], k], dim=2)           # positions [c0, n+T)
    xv = torch.cat([rv[:, :, : n - c0], v], dim=2)
    if c1 > c0:
        specs = codec.specs(k.shape[-1], consts, params)
        out = codec.compress(xk[:, :, : c1 - c0], xv[:, :, : c1 - c0], consts, params, side_dtype=_side(state))
        for buf, s, val in zip(state[3:], specs, out):
            dst = buf[:, :, c0 // s.per: c1 // s.per]  # shorter (or empty) for a head-only buffer
            dst.copy_(val[:, :, : dst.shape[2]].to(buf.dtype))
    rest = n + T - c1
    rk[:, :, :rest] = xk[:, :, c1 - c0:]
    rv[:, :, :rest] = xv[:, :, c1 - c0:]
    length.fill_(n + T)


def _exact(state, k_new, v_new, R):
    """(cL, exact K, exact V): positions [cL, n) exact, [0, cL) compressed."""
    n, T = int(state[0]), k_new.shape[2]
    c1 = n // R * R
    cl = min(c1, n - T)
    ring = max(0, n - T - c1)
    kx = torch.cat([state[1][:, :, :ring], k_new.to(state[1].dtype)], dim=2)
    vx = torch.cat([state[2][:, :, :ring], v_new.to(state[2].dtype)], dim=2)
    return n, cl, kx, vx


def dequantize(state, consts, k_new, v_new, meta):
    """Full-length K, V (B, H, L, D) as the attention sees them after `append_`.

    [0, cL) decompressed, [cL, n) exact (ring and the step's new tokens), [n, L) zero.
    """
    codec, R, L, params = codec_of(meta), int(meta[1]), int(meta[2]), list(meta[3:])
    rk = state[1]
    B, H, _, D = rk.shape
    n, cl, kx, vx = _exact(state, k_new, v_new, R)
    K = rk.new_zeros(B, H, L, D)
    V = rk.new_zeros(B, H, L, D)
    if cl:
        c1 = n // R * R
        specs = codec.specs(D, consts, params)
        kc, vc = codec.decompress(_rows(state[3:], specs, c1), consts, params)
        K[:, :, :cl], V[:, :, :cl] = kc[:, :, :cl].to(K.dtype), vc[:, :, :cl].to(V.dtype)
    K[:, :, cl:n], V[:, :, cl:n] = kx, vx
    return K, V


# positions decompressed at a time by the sync-free path: bounds its fp32 temporaries
DEQ_BLOCK = 8192


def _rows_range(bufs, specs, p0, p1):
    """Codec buffers restricted to positions [p0, p1) (multiples of every spec's `per`); a
    head-only buffer (e.g. attention sinks) goes with the block that starts at 0."""
    out = []
    for b, s in zip(bufs, specs):
        if s.head:
            out.append(b[:, :, : (min(p1, s.head) // s.per if p0 == 0 else 0)])
        else:
            out.append(b[:, :, p0 // s.per: p1 // s.per])
    return out


def dequantize_nosync(state, consts, k_new, v_new, meta, block=None):
    """`dequantize` without reading the length on the host (same result).

    Decompresses every stored row, in blocks of `block` positions (default DEQ_BLOCK) so the
    codec's fp32 temporaries stay O(block), then writes the exact window (ring + new tokens, a
    static R + T positions at a device-side offset) over it. It can run inside a CUDA graph or an
    Inductor graph on an accelerator: O(L) per call, correct, not fast (the compiled decode path
    replaces it by ``attend``). Positions past the length are 0.
    """
    codec, R, L, params = codec_of(meta), int(meta[1]), int(meta[2]), list(meta[3:])
    n, rk, rv = state[0], state[1], state[2]
    B, H, _, D = rk.shape
    T = k_new.shape[2]
    dev = rk.device
    lc = L // R * R
    cl = torch.minimum(n // R * R, n - T)
    specs = codec.specs(D, consts, params) if lc else []
    step = max(R, (block or DEQ_BLOCK) // R * R)
    if any(s.head > step for s in specs):
        step = -(-max(s.head for s in specs) // R) * R
    K = torch.zeros(B, H, L, D, dtype=rk.dtype, device=dev)
    V = torch.zeros_like(K)
    for p0 in range(0, lc, step):
        p1 = min(p0 + step, lc)
        dk, dv = codec.decompress(_rows_range(state[3:], specs, p0, p1), consts, params)[:2]
        keep = (torch.arange(p0, p1, device=dev) < cl)[:, None]             # stale rows past cl -> 0
        K[:, :, p0:p1] = torch.where(keep, dk.to(rk.dtype), 0)
        V[:, :, p0:p1] = torch.where(keep, dv.to(rk.dtype), 0)
    W = min(R + T, L)                                                        # n - cl <= R + T - 1
    ws = torch.clamp(cl, min=0, max=L - W)
    pos = ws + torch.arange(W, device=dev)                                   # (W,) window positions
    new_i = (pos - (n - T)).clamp(0, T - 1)
    for X, ring, new in ((K, rk, k_new), (V, rv, v_new)):
        x = torch.index_select(ring, 2, pos % R)
        x = torch.where((pos >= n - T)[:, None], torch.index_select(new.to(ring.dtype), 2, new_i), x)
        x = torch.where((pos < n)[:, None], x, torch.zeros((), dtype=x.dtype, device=dev))
        x = torch.where((pos < cl)[:, None], torch.index_select(X, 2, pos), x)
        X.index_copy_(2, pos, x)
    return K, V


# ---------------------------------------------------------------------------------------------
# prefill into an empty cache (issue 16, time to first token)
# query tokens from which `attend_prefill` checks for an empty cache (a host read of the length):
# below it (decode, short speculative chunks) nothing is read and the call takes the general path
PREFILL_MIN_TQ = 16


def attend_prefill(q, state, k_new, v_new, attn_mask, is_causal, scale):
    """Causal SDPA over just this step's tokens when the cache held nothing before them, else None.

    A prefill chunk that lands in an empty cache attends only to itself, exactly (`_exact`: no
    compressed rows are read, cL = 0), so the result of `attend` / `attend_nosync` equals
    ``sdpa(q, k_new, v_new, is_causal=True, enable_gqa=True)`` over the chunk's T tokens: no
    dequantization of the static length L, no (Tq, L) mask, flash-eligible, K/V never repeated.
    Codec-independent (every codec reads the new tokens exact), so the one shortcut serves all.

    Taken only when every condition holds (else None, and the caller runs its general path):

    * Tq == T >= PREFILL_MIN_TQ (decode never pays the host read below);
    * not inside CUDA-graph capture (the check reads the length on the host; warned once);
    * the stored length equals T (one host sync: the cache was empty before this append);
    * no mask (then ``is_causal`` is used as given: causal, or every row sees all T tokens), or a
      bool mask that is exactly "key j visible to row i iff j <= i" in every batch row (HF's static
      mask of an unpadded prefill from position 0; checked once per mask tensor, shared by all
      layers, see passes/causal_prefill.py). Padding, a float mask, any other mask -> None.

    ``QJL_GROUPED_PREFILL=off`` turns it off (with the StaticCache rewrite), for A/B runs.
    Counts ``qjl/attend_prefill_causal`` per call taken.
    """
    from qjl_compile.passes import causal_prefill as cp

    Tq, T = q.shape[2], k_new.shape[2]
    if Tq != T or Tq < PREFILL_MIN_TQ or cp.setting() == "off":
        return None
    if cp._capturing(q):
        from qjl_compile.diagnostics import warn_once
        warn_once("attend_prefill:capture", (
            "qjl::attend: a prefill chunk over a QJLCache runs inside CUDA-graph capture, where the empty-cache "
            "check (a host sync) is not allowed: it attends over the whole static length (correct, slower). "
            "Fix: run the prefill without CUDA graphs (it is one call per prompt)."))
        return None
    if int(state[0]) != T:                                             # a later chunk: the general path
        return None
    if attn_mask is not None:
        if not cp._causal_memo(attn_mask, Tq):
            return None
        is_causal = True
    H = state[1].shape[1]
    cp._bump("attend_prefill_causal")
    return torch.nn.functional.scaled_dot_product_attention(
        q, k_new.to(q.dtype), v_new.to(q.dtype), is_causal=bool(is_causal), scale=scale,
        enable_gqa=q.shape[1] != H)


def attend_nosync(q, state, consts, k_new, v_new, attn_mask, is_causal, scale, meta):
    """`attend` without reading the length on the host: SDPA over `dequantize_nosync`.

    Same result as `attend` (by the dequantized-key identity); capturable in a CUDA graph. The
    accelerator path for long query chunks (chunked prefill) and for codecs with no fused kernel.
    One SDPA per query head of a GQA group against the (B, H, L, D) K/V, so K/V are never
    repeated G times. A chunk of at least PREFILL_MIN_TQ tokens into an empty cache takes
    `attend_prefill` (causal SDPA over the chunk only; one host read of the length, never under
    CUDA-graph capture); decode-sized calls never read the length.
    """
    out = attend_prefill(q, state, k_new, v_new, attn_mask, is_causal, scale)
    if out is not None:
        return out
    B, Hq, Tq, D = q.shape
    K, V = dequantize_nosync(state, consts, k_new, v_new, meta)
    H, L = K.shape[1], K.shape[2]
    G = Hq // H
    n = state[0]
    pos = torch.arange(L, device=q.device)
    valid = pos < n                                                      # (L,)
    if attn_mask is not None:
        m = attn_mask & valid if attn_mask.dtype == torch.bool else attn_mask.masked_fill(~valid, float("-inf"))
    elif is_causal:
        m = valid & (pos[None, :] <= (n - Tq + torch.arange(Tq, device=q.device))[:, None])
    else:
        m = valid.expand(Tq, L)
    per_head = m.dim() == 4 and m.shape[1] == Hq and Hq > 1
    if per_head:
        m = m.unflatten(1, (H, G))                                       # (B, H, G, Tq, L)
    qg = q.unflatten(1, (H, G))                                          # (B, H, G, Tq, D)
    Kq, Vq = K.to(q.dtype), V.to(q.dtype)
    out = torch.stack([torch.nn.functional.scaled_dot_product_attention(
        qg[:, :, g], Kq, Vq, attn_mask=m[:, :, g] if per_head else m, scale=scale) for g in range(G)], dim=2)
    return out.flatten(1, 2).nan_to_num(0.0)                             # fully masked rows -> 0, as `attend`


def attend(q, state, consts, k_new, v_new, attn_mask, is_causal, scale, meta):
    """Attention of q over the cache after `append_`: estimated scores on compressed tokens,
    exact on the rest, one softmax, values decompressed.

    q : (B, Hq, Tq, D), Hq a multiple of H.  attn_mask : None, or bool/additive float
    broadcastable to (B, Hq, Tq, L) (HF's mask over the whole static length).  Without a mask,
    only stored positions count, and ``is_causal`` aligns query i with position n - Tq + i.
    Returns (B, Hq, Tq, D) in q's dtype.
    """
    codec, R, params = codec_of(meta), int(meta[1]), list(meta[3:])
    B, Hq, Tq, D = q.shape
    H = state[1].shape[1]
    G = Hq // H
    n, cl, kx, vx = _exact(state, k_new, v_new, R)
    qg = q.float().reshape(B, H, G * Tq, D)
    s = qg @ kx.float().transpose(-1, -2)                               # (B, H, G*Tq, n-cL)
    vals = vx.float()
    if cl:
        c1 = n // R * R
        specs = codec.specs(D, consts, params)
        bufs = _rows(state[3:], specs, c1)
        s = torch.cat([codec.scores(qg, bufs, consts, params)[..., :cl], s], dim=-1)
        vals = torch.cat([codec.values(bufs, consts, params)[:, :, :cl].float(), vals], dim=2)
    s = s * (scale if scale is not None else 1.0 / math.sqrt(D))
    s = s.reshape(B, H, G, Tq, n)
    if attn_mask is not None:
        am = attn_mask[..., :n].expand(B, Hq, Tq, n).reshape(B, H, G, Tq, n)
        s = s.masked_fill(~am, float("-inf")) if am.dtype == torch.bool else s + am.float()
    elif is_causal:
        pos = torch.arange(n, device=q.device)
        qpos = n - Tq + torch.arange(Tq, device=q.device)
        s = s.masked_fill(pos[None, :] > qpos[:, None], float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)                         # fully masked rows -> 0
    out = p.reshape(B, H, G * Tq, n) @ vals
    return out.reshape(B, Hq, Tq, D).to(q.dtype)


def make_state(codec: Codec, B, H, L, D, R, consts, params, dtype, side_dtype, device):
    """Allocate a zeroed cache state for one layer. Codec rows hold (L // R) * R positions."""
    lc = L // R * R
    st = [torch.zeros((), dtype=torch.int64, device=device),
          torch.zeros(B, H, R, D, dtype=dtype, device=device),
          torch.zeros(B, H, R, D, dtype=dtype, device=device)]
    for s in codec.specs(D, consts, params):
        dt = side_dtype if s.dtype == "side" else s.dtype
        rows = (min(lc, s.head) if s.head else lc) // s.per
        st.append(torch.zeros(B, H, rows, *s.tail, dtype=dt, device=device))
    return st
