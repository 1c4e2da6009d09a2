"""Rotation + Lloyd-Max codec (TurboQuant-style, arXiv 2504.19874) as codec id 2 (DESIGN.md 4b).

Per layer a seeded Haar-random orthogonal Pi (D x D, fp32).  A vector x (a key or a value) is
rotated, y = Pi x / ||x|| * sqrt(D), whose coordinates are ~N(0, 1) for any x; each coordinate
is coded by the b-bit Lloyd-Max (MSE-optimal) codebook of the standard normal, and one scale
a per vector is stored beside the packed indices:

    x_hat = a * Pi^T codebook[idx]          (x_hat as a row vector: a * codebook[idx] @ Pi)

Scale modes (params ``scale_mode``), all one side-dtype number per vector:
    0 "norm"   a = ||x|| / sqrt(D)                   (the paper's decoder)
    1 "match"  a = ||x|| / ||codebook[idx]||         (||x_hat|| == ||x||)
    2 "lsq"    a = <Pi x, c> / ||c||^2, c = codebook[idx]   (least squares: the closest x_hat on
               the ray of c; never worse than 0/1 per vector).  Default; measured in the tests
               and on SmolLM2 (see the module's ``SCALE_MODES`` note and the issue report).

Fused attention (section 4b): T(q) = Pi q once per step and query head, then
    score_j = a_j * <Pi q, codebook_k[idx_j]>
and values are accumulated in the rotated space, o = (sum_j p_j a_j codebook_v[idx_j]) @ Pi,
rotated back once at the end.

Unbiased keys (params ``unbiased`` = 1, TurboQuant "prod"): b-1 bits as above, plus a 1-bit QJL
sketch of the residual r = k - k_hat_mse (m = D rows, `reference.sketch`) and ||r||:
    score_j = a_j <Pi q, c_j> + qjl_const(m, D) ||r_j|| <S q, sign(S r_j)>     (unbiased)
so T(q) = [Pi q, S q] (one (D + m) x D transform).

Attention sink (params ``sink`` = s > 0): the first s positions of the sequence are also stored
exact (side dtype) in a head-only buffer (`Spec.head`: rows for positions [0, s) only), and
scores/values use them in place of their codes.  Cost: 2 * s * D side values per (batch, head),
independent of the cache length.

Exact outlier tokens (params ``key_outliers`` = tk > 0 / ``value_outliers`` = tv > 0, opt-in, issue 17;
KVQuant-style dense-and-sparse at token level): per `block` tokens (the cache passes block = R) and
(batch, kv head), the tk keys (tv values) whose coded vector has the largest squared error
||x - x_hat||^2 are also stored exact (side dtype) with their offset in the block (int16); keys(),
values() and scores() use them in place of their codes (the codes stay stored, the format of every
other buffer is unchanged). Cost: t * (16 D + 16) / (block * D) bits per key (value) value, counted
from the buffers. Only the reference implements it; the fused GPU kernels refuse it.

The kernel layout (params ``center`` bit VFRAG = 4, QJLConfig.rotation_value_layout "mma", or "auto"
on a CUDA device; head_dim 64 or 128, 3- or 4-bit values): ``vidx`` holds the same bits permuted within
each 32-token group into the order of the CUDA kernel's value MMA fragments (`frag_pack`), and 4-bit
codes (keys and values) are stored sign-magnitude (`sm_relabel`); every reader (this reference, the
Triton and CUDA kernels) decodes it (`code_indices`).

Buffers (`specs`, rows indexed by position // per):
    kidx  (per 1, (D*bk/8,) uint8)   bk = key_bits - unbiased, LSB-first (3 bits: 8 codes / 3 bytes)
    kscale (per 1, () side)
    [kqjl (per 1, (m/8,) uint8), kres (per 1, () side)]       unbiased only
    vidx  (per 1, (D*bv/8,) uint8),  vscale (per 1, () side)
    [ksink, vsink (head s, (D,) side)]                         sink only
    [kout (per block, (tk, D) side), kopos (per block, (tk,) int16)]  key_outliers only
    [vout (per block, (tv, D) side), vopos (per block, (tv,) int16)]  value_outliers only
Bits per value: K: key_bits + 16/D (+ 16/D unbiased), V: value_bits + 16/D.

params = [key_bits, value_bits, unbiased, scale_mode, sink(, center, block(, key_outliers, value_outliers))]
consts = [Pi (D, D), codebook_k (2^bk,), codebook_v (2^bv,), S (m, D) (m = 0 unless unbiased)]
         all fp32; `make_consts` builds them.
"""
from __future__ import annotations

import functools
import math

import torch

from . import decoquant as dq
from . import reference as ref
from .reference import Codec, Spec

BITS = (1, 2, 3, 4)
SCALE_MODES = {"norm": 0, "match": 1, "lsq": 2}
NPARAMS = 7
NPARAMS_OUTLIERS = 9   # the opt-in form with exact outlier tokens (`outlier_tokens`)
VFRAG = 4              # bit of params `center`: value codes stored in MMA-fragment order (`frag_pack`)
FRAG_DIMS = (64, 128)
FRAG_BITS = (3, 4)


# ----------------------------------------------------------------------------------------------
# Value codes in MMA-fragment order (params center & VFRAG; QJLConfig.rotation_value_layout="mma")
# ----------------------------------------------------------------------------------------------
def _frag_dims(shape, bits):
    *lead, n, d = shape
    if d not in FRAG_DIMS or bits not in FRAG_BITS or n % 32:
        raise ValueError(f"rotation codec: value codes in fragment order need head_dim in {FRAG_DIMS}, "
                         f"value_bits in {FRAG_BITS} and whole 32-token groups; got head_dim={d}, "
                         f"value_bits={bits}, {n} tokens (QJLConfig(rotation_value_layout='rows') stores rows)")
    return lead, n, d


def frag_pack(idx: torch.Tensor, bits: int) -> torch.Tensor:
    """(..., N, D) codes -> (..., N, D*bits/8) uint8, each 32-token group in the order the CUDA kernel's
    value MMAs read it (rot_decode.cu VFRAG), so a lane turns its own words into A fragments with no
    shuffle and no 3-bit unpacking across bytes.

    Token j = 16 tt + 8 k + 2 t + a and channel c = (D/8) g + 2 i + h (i < D/16) of a group go to
    lane 4 g + t, nibble word q = tt (D/16) + i, nibble n = 4 k + 2 a + h. A lane's D*bits/32 words are
    contiguous (lane-major; the group's bytes are split into its 32 rows as they come). 4 bits: the
    nibble words themselves. 3 bits: every 4 nibble words N0..N3 as 3 words, W_r = N_r (3-bit fields)
    with bit r of N3's codes in bit 3 of each nibble (exactly 3 bits a code)."""
    lead, n, d = _frag_dims(idx.shape, bits)
    nt = d // 16
    x = idx.to(torch.int64).reshape(*lead, n // 32, 2, 2, 4, 2, 8, nt, 2)   # grp, tt, k, t, a, g, i, h
    L = len(lead)
    x = x.permute(*range(L + 1), L + 5, L + 3, L + 1, L + 6, L + 2, L + 4, L + 7)
    nib = x.reshape(*lead, n // 32, 32, 2 * nt, 8)                         # grp, lane, q, n
    sh = 4 * torch.arange(8, device=idx.device, dtype=torch.int64)
    if bits == 3:
        b4 = nib.reshape(*lead, n // 32, 32, nt // 2, 4, 8)
        r = torch.arange(3, device=idx.device, dtype=torch.int64)[:, None]
        nib = b4[..., :3, :] | (((b4[..., 3:, :] >> r) & 1) << 3)          # grp, lane, block, 3, n
        nib = nib.reshape(*lead, n // 32, 32, 3 * nt // 2, 8)
    words = (nib << sh).sum(-1)                                             # grp, lane, word (< 2^32)
    by = (words[..., None] >> (8 * torch.arange(4, device=idx.device, dtype=torch.int64))) & 0xFF
    return by.to(torch.uint8).reshape(*lead, n, d * bits // 8)


def frag_unpack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `frag_pack`: (..., N, D*bits/8) uint8 -> (..., N, D) int32."""
    *lead, n, nb = codes.shape
    d = nb * 8 // bits
    _frag_dims((*lead, n, d), bits)
    nt = d // 16
    by = codes.to(torch.int64).reshape(*lead, n // 32, 32, -1, 4)
    words = (by << (8 * torch.arange(4, device=codes.device, dtype=torch.int64))).sum(-1)   # grp, lane, word
    nib = (words[..., None] >> (4 * torch.arange(8, device=codes.device, dtype=torch.int64))) & 15
    if bits == 3:
        w3 = nib.reshape(*lead, n // 32, 32, nt // 2, 3, 8)
        r = torch.arange(3, device=codes.device, dtype=torch.int64)[:, None]
        n3 = ((w3 >> 3) << r).sum(-2, keepdim=True)                          # bit r from word r
        nib = torch.cat([w3 & 7, n3], -2).reshape(*lead, n // 32, 32, 2 * nt, 8)
    x = nib.reshape(*lead, n // 32, 8, 4, 2, nt, 2, 2, 2)                   # grp, g, t, tt, i, k, a, h
    L = len(lead)
    x = x.permute(*range(L + 1), L + 3, L + 5, L + 2, L + 6, L + 1, L + 4, L + 7)   # grp, tt, k, t, a, g, i, h
    return x.reshape(*lead, n, d).to(torch.int32)


def value_frag(params) -> bool:
    """Whether the cache is in the kernel layout (params center & VFRAG): value codes in fragment order
    and 4-bit codes in sign-magnitude order (`sm_relabel`)."""
    return len(params) >= NPARAMS and bool(int(params[5]) & VFRAG)


def sm_relabel(idx: torch.Tensor) -> torch.Tensor:
    """4-bit codes of a symmetric codebook, c <-> c ^ (7 * bit3(c)) (its own inverse): bit 3 stays the
    half (c >= 8: positive), bits 0-2 become the index of the code's mirror image below 8 when c >= 8.
    Stored so, the CUDA kernel's lookup masks bits 0-2 instead of recomputing them (lut_i8 / lut8:
    2 of 11 integer ops per 8 codes)."""
    return idx ^ (7 * (idx >> 3))


def code_indices(codes: torch.Tensor, bits: int, params, values: bool) -> torch.Tensor:
    """Codebook indices (..., N, D) int32 of stored key or value codes, whatever the layout."""
    kernel = value_frag(params)
    idx = frag_unpack(codes, bits) if kernel and values else dq.unpack(codes, bits)
    return sm_relabel(idx) if kernel and bits == 4 else idx


def store_codes(idx: torch.Tensor, bits: int, params, values: bool) -> torch.Tensor:
    """Inverse of `code_indices`: indices -> stored uint8 codes in the params' layout."""
    kernel = value_frag(params)
    if kernel and bits == 4:
        idx = sm_relabel(idx)
    return frag_pack(idx, bits) if kernel and values else dq.pack(idx.to(torch.int32), bits)


# ----------------------------------------------------------------------------------------------
# Lloyd-Max codebooks for N(0, 1)
# ----------------------------------------------------------------------------------------------
def _phi(x: float) -> float:
    return math.exp(-0.5 * x * x) / math.sqrt(2 * math.pi) if math.isfinite(x) else 0.0


def _Phi(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0))) if math.isfinite(x) else (1.0 if x > 0 else 0.0)


@functools.lru_cache(maxsize=None)
def _lloyd_max(bits: int) -> tuple[tuple[float, ...], float]:
    """(centroids ascending, MSE) of the b-bit Lloyd-Max quantizer of N(0,1), float64.

    Lloyd iteration: boundaries at midpoints, centroids at the conditional means
    E[X | t_i < X < t_{i+1}] = (phi(t_i) - phi(t_{i+1})) / (Phi(t_{i+1}) - Phi(t_i)).
    The MSE is 1 - sum_i p_i c_i^2 (centroids are conditional means).
    """
    if bits not in BITS:
        raise ValueError(f"rotation codec: bits={bits} unsupported, use one of {BITS}")
    k = 1 << bits
    c = [math.sqrt(2) * _erfinv(2 * (i + 0.5) / k - 1) for i in range(k)]  # quantile start
    for _ in range(100_000):
        t = [-math.inf] + [(c[i] + c[i + 1]) / 2 for i in range(k - 1)] + [math.inf]
        new = [(_phi(t[i]) - _phi(t[i + 1])) / (_Phi(t[i + 1]) - _Phi(t[i])) for i in range(k)]
        delta = max(abs(a - b) for a, b in zip(new, c))
        c = new
        if delta < 1e-15:
            break
    t = [-math.inf] + [(c[i] + c[i + 1]) / 2 for i in range(k - 1)] + [math.inf]
    p = [_Phi(t[i + 1]) - _Phi(t[i]) for i in range(k)]
    mse = 1.0 - sum(pi * ci * ci for pi, ci in zip(p, c))
    return tuple(c), mse


def _erfinv(y: float) -> float:
    return float(torch.erfinv(torch.tensor(y, dtype=torch.float64)))


def codebook(bits: int) -> torch.Tensor:
    """The b-bit Lloyd-Max centroids for N(0,1), ascending, (2^b,) fp32."""
    return torch.tensor(_lloyd_max(bits)[0], dtype=torch.float64).float()


def codebook_mse(bits: int) -> float:
    """Expected squared error per N(0,1) coordinate of the b-bit codebook."""
    return _lloyd_max(bits)[1]


TRANSFORMS = ("haar", "hadamard")


def rotation(d: int, seed: int, salt: int = 0, transform: str = "haar") -> torch.Tensor:
    """Random orthogonal (d, d) fp32, deterministic in (seed, salt). "haar": Haar-random, QR of a
    Gaussian with the sign fix (R's diagonal made positive). "hadamard": the randomized Hadamard
    transform H diag(s) / sqrt(d) (Sylvester H, random signs s; d a power of two), which the CUDA C++
    kernel applies by butterflies instead of reading a (d, d) matrix (`hadamard_signs`). Drawn from a
    generator separate from `reference.sketch`'s (offset salt stream), so a layer's Pi and its QJL
    residual sketch are independent."""
    g = torch.Generator(device="cpu").manual_seed(int(seed) * 1_000_003 + 500_009 + int(salt))
    if transform == "haar":
        return ref.haar(d, g).to(torch.float32).contiguous()
    if transform != "hadamard":
        raise ValueError(f"rotation transform {transform!r}: one of {TRANSFORMS}")
    if d < 2 or d & (d - 1):
        raise ValueError(f"transform='hadamard' needs a power-of-two head_dim, got {d}; use 'haar'")
    s = torch.randint(0, 2, (d,), generator=g, dtype=torch.float64) * 2 - 1
    return (sylvester(d) * s[None, :] / math.sqrt(d)).to(torch.float32).contiguous()


def sylvester(d: int) -> torch.Tensor:
    """The Sylvester Hadamard matrix (d, d) fp64, H_ij = (-1)^popcount(i & j), d a power of two."""
    i = torch.arange(d)
    bits = (i[:, None] & i[None, :]).to(torch.int64)
    par = torch.zeros_like(bits)
    while bool(bits.any()):
        par ^= bits & 1
        bits >>= 1
    return (1 - 2 * par).to(torch.float64)


def hadamard_signs(Pi: torch.Tensor) -> torch.Tensor | None:
    """s / sqrt(d) (d,) fp32 if Pi = H diag(s) / sqrt(d) (a `rotation(..., transform="hadamard")`), to
    fp32 rounding, else None."""
    d = Pi.shape[-1]
    if Pi.dim() != 2 or Pi.shape[0] != d or d < 2 or d & (d - 1):
        return None
    m = Pi.detach().double().cpu() * math.sqrt(d)
    s = m[0].sign()                                      # H's first row is all ones
    if not bool((m - sylvester(d) * s[None, :]).abs().max() < 1e-5):
        return None
    return (s / math.sqrt(d)).to(torch.float32)


GRID_HALF = 63.5          # u8 levels B - 63.5, B in [0, 127]: negation is B ^ 0x7F (rot_decode.cu, KI8)


@functools.lru_cache(maxsize=None)
def _grid(bits: int) -> tuple[float, ...]:
    c = _lloyd_max(bits)[0]
    best = None
    for i in range(1500):
        s = c[-1] / GRID_HALF * (0.3 + 0.75 * i / 1500)
        g = [min(max(math.floor(x / s) + 0.5, -GRID_HALF), GRID_HALF) * s for x in c]
        m = _mse(g)
        if best is None or m < best[0]:
            best = (m, g)
    return tuple(best[1])


def grid_codebook(bits: int) -> torch.Tensor:
    """The b-bit Lloyd-Max codebook moved onto the half-integer grid s (k + 1/2), |k + 1/2| <= 63.5,
    with the step s that keeps the N(0, 1) quantization MSE lowest (1-D search), (2^b,) fp32. The CUDA
    C++ rotation kernel scores such keys on int8 tensor-core MMAs (u8 level B = level / s + 63.5, so a
    negation is B ^ 0x7F); 4-bit: MSE 0.009543 against 0.009501 (+0.44%), step 0.04516."""
    return torch.tensor(_grid(bits), dtype=torch.float64).float()


def _mse(levels) -> float:
    """Expected squared error per N(0, 1) coordinate of the nearest-level quantizer over `levels`:
    sum_i E[(X - l_i)^2; t_i < X < t_i+1] with E[X^2; a < X < b] = P - (b phi(b) - a phi(a))."""
    lv = sorted(levels)
    t = [-math.inf] + [(lv[i] + lv[i + 1]) / 2 for i in range(len(lv) - 1)] + [math.inf]
    tot = 0.0
    for i, li in enumerate(lv):
        a, b = t[i], t[i + 1]
        p = _Phi(b) - _Phi(a)
        xa = a * _phi(a) if math.isfinite(a) else 0.0
        xb = b * _phi(b) if math.isfinite(b) else 0.0
        tot += p - (xb - xa) - 2 * li * (_phi(a) - _phi(b)) + li * li * p
    return tot


def grid_step(cb: torch.Tensor) -> float | None:
    """s if `cb` is symmetric and every level an odd multiple of s / 2 within 63.5 s (the grid of
    `grid_codebook`, to fp32 rounding), else None."""
    c = cb.detach().double().cpu()
    if c.numel() < 2 or not torch.equal(c, -c.flip(0)) or not bool((c > 0).any()):
        return None
    lo = float(c[c > 0].min())
    for k in range(64):
        s = lo / (k + 0.5)
        u = c / s - 0.5
        if float(u.abs().max()) <= GRID_HALF + 0.5 + 1e-6 and float((u - u.round()).abs().max()) < 1e-4:
            return s
    return None


def make_consts(d: int, key_bits: int, value_bits: int, unbiased: bool, seed: int, salt: int = 0,
                key_grid: bool = True, transform: str = "haar"):
    """consts for one layer: [Pi, codebook_k, codebook_v, S] (S has m = d rows if unbiased, else 0).
    key_grid: 4-bit key codebooks on the int8 grid (`grid_codebook`), which the CUDA C++ kernel scores
    on int8 MMAs; False keeps the exact Lloyd-Max centroids (the kernel then runs its fp16 path).
    transform: Pi's kind (`rotation`)."""
    kb = key_bits - int(bool(unbiased))
    S = ref.sketch(d, d, seed, 2 * salt + 1) if unbiased else torch.zeros(0, d)
    cbk = codebook(kb)
    if key_grid and kb == 4:
        cbk = grid_codebook(kb)
    return [rotation(d, seed, salt, transform), cbk, codebook(value_bits), S]


# ----------------------------------------------------------------------------------------------
# Quantize / dequantize one set of vectors
# ----------------------------------------------------------------------------------------------
def _bounds(cb: torch.Tensor) -> torch.Tensor:
    return (cb[1:] + cb[:-1]) / 2


def quantize(x: torch.Tensor, Pi: torch.Tensor, cb: torch.Tensor, scale_mode: int = 2,
             side_dtype=torch.float16):
    """(..., N, D) -> packed indices (..., N, D*b/8) uint8, scale a (..., N) side dtype.

    b = log2(len(cb)). Index = nearest centroid of y = Pi x / ||x|| * sqrt(D) (coordinate-wise).
    """
    bits = int(cb.numel()).bit_length() - 1
    xf = x.float()
    d = xf.shape[-1]
    rot = xf @ Pi.T                                                     # Pi x, (..., N, D)
    norm = xf.norm(dim=-1, keepdim=True)
    y = rot * (math.sqrt(d) / norm.clamp_min(1e-30))
    idx = torch.bucketize(y, _bounds(cb).to(y.device))                  # nearest centroid
    c = cb.to(y.device)[idx]
    if scale_mode == 0:
        a = norm / math.sqrt(d)
    elif scale_mode == 1:
        a = norm / c.norm(dim=-1, keepdim=True)
    elif scale_mode == 2:
        a = (rot * c).sum(-1, keepdim=True) / c.pow(2).sum(-1, keepdim=True)
    else:
        raise ValueError(f"rotation codec: scale_mode={scale_mode} unknown, use one of {SCALE_MODES}")
    a = torch.where(norm > 0, a, 0.0).squeeze(-1)
    return dq.pack(idx.to(torch.int32), bits), a.to(side_dtype)


def rotated(codes: torch.Tensor, scale: torch.Tensor, cb: torch.Tensor, params=None, values: bool = False) -> torch.Tensor:
    """Decoded vectors in the rotated space, a * codebook[idx], (..., N, D) fp32 (x_hat = this @ Pi).
    params / values: the layout of the stored codes (`code_indices`; None: rows)."""
    bits = int(cb.numel()).bit_length() - 1
    idx = code_indices(codes, bits, params, values) if params is not None else dq.unpack(codes, bits)
    return cb.to(codes.device)[idx.long()] * scale.float().unsqueeze(-1)


def dequantize(codes, scale, Pi, cb) -> torch.Tensor:
    """x_hat = a * codebook[idx] @ Pi, (..., N, D) fp32."""
    return rotated(codes, scale, cb) @ Pi


def quantize_unbiased(x, Pi, cb, S, scale_mode=2, side_dtype=torch.float16):
    """MSE codes (len(cb) levels) + 1-bit QJL sketch of the residual.

    -> codes, scale, sketch bits (..., N, m/8) uint8, residual norm (..., N) side.
    The residual is taken against the stored (rounded) scale, so the estimate stays unbiased.
    """
    codes, scale = quantize(x, Pi, cb, scale_mode, side_dtype)
    r = x.float() - dequantize(codes, scale, Pi, cb)
    return codes, scale, ref.pack_bits(r @ S.T >= 0), r.norm(dim=-1).to(side_dtype)


def residual_keys(bits, rnorm, S) -> torch.Tensor:
    """The QJL residual's 'dequantized' key: c(m) ||r|| S^T sign(S r), (..., N, D) fp32."""
    m, d = S.shape
    return ref.qjl_const(m, d) * rnorm.float().unsqueeze(-1) * (ref.signs(bits) @ S)


# ----------------------------------------------------------------------------------------------
# The codec
# ----------------------------------------------------------------------------------------------
def parse(params):
    """params -> (key_bits, value_bits, unbiased, scale_mode, sink, center, block), validated.

    The 5-entry form [key_bits, value_bits, unbiased, scale_mode, sink] means center = 0."""
    if len(params) == NPARAMS - 2:
        params = [*params, 0, 1]
    if len(params) == NPARAMS_OUTLIERS:   # the outlier entries are read by `outlier_tokens`
        outlier_tokens(params)
        params = list(params)[:NPARAMS]
    if len(params) != NPARAMS:
        raise ValueError(f"rotation codec: params must be [key_bits, value_bits, unbiased, scale_mode, sink, "
                         f"center, block], got {list(params)}")
    kb, vb, ub, sm, sink, center, block = (int(p) for p in params)
    if center & ~(3 | VFRAG):
        raise ValueError(f"rotation codec: center={center} must be a bit mask (1 keys, 2 values, "
                         f"{VFRAG} value codes in fragment order)")
    center &= 3
    if kb not in BITS or vb not in BITS:
        raise ValueError(f"rotation codec: key_bits={kb}, value_bits={vb}: each must be one of {BITS}")
    if ub not in (0, 1) or (ub and kb < 2):
        raise ValueError(f"rotation codec: unbiased={ub} must be 0 or 1, and needs key_bits >= 2 (got {kb})")
    if sm not in SCALE_MODES.values():
        raise ValueError(f"rotation codec: scale_mode={sm} unknown, use one of {SCALE_MODES}")
    if sink < 0:
        raise ValueError(f"rotation codec: sink={sink} must be >= 0")
    if center not in (0, 1, 2, 3) or block < 1:
        raise ValueError(f"rotation codec: center={center} must be a bit mask (1 keys, 2 values) and "
                         f"block={block} >= 1")
    return kb, vb, ub, sm, sink, center, block


def outlier_tokens(params) -> tuple[int, int]:
    """(key_outliers, value_outliers): exact tokens per block; (0, 0) for the 5- and 7-entry forms."""
    if len(params) != NPARAMS_OUTLIERS:
        return 0, 0
    tk, tv, block = int(params[7]), int(params[8]), int(params[6])
    if tk < 0 or tv < 0 or tk > block or tv > block or block > 32767:
        raise ValueError(f"rotation codec: key_outliers={tk}, value_outliers={tv} must be in [0, block={block}] "
                         f"(block <= 32767: offsets are int16)")
    return tk, tv


def _pick_outliers(x, x_hat, t, block, side_dtype):
    """Per `block` tokens, the t tokens of largest ||x - x_hat||^2: (exact (..., N/block, t, D) side,
    offsets in the block (..., N/block, t) int16, ascending)."""
    *lead, n, d = x.shape
    if n % block:
        raise ValueError(f"rotation codec: {n} tokens is not a multiple of the outlier block {block}")
    err = (x.float() - x_hat).pow(2).sum(-1).reshape(*lead, n // block, block)
    pos = err.topk(t, dim=-1).indices.sort(dim=-1).values                     # (..., nb, t)
    xb = x.float().reshape(*lead, n // block, block, d)
    ex = torch.gather(xb, -2, pos.unsqueeze(-1).expand(*pos.shape, d))
    return ex.to(side_dtype), pos.to(torch.int16)


def _put_outliers(x, out, block):
    """x (..., N, D) with the exact outlier rows `out` = (exact, offsets) written in; N <= rows * block."""
    ex, pos = out
    *lead, n, d = x.shape
    nb = ex.shape[-3]
    if nb == 0 or ex.shape[-2] == 0:
        return x
    xb = x[..., : nb * block, :].reshape(*lead, nb, block, d).clone()
    xb.scatter_(-2, pos.long().unsqueeze(-1).expand(*pos.shape, d), ex.float())
    return torch.cat([xb.reshape(*lead, nb * block, d), x[..., nb * block:, :]], dim=-2)


def _center(x, Pi, block, side_dtype):
    """Per `block` tokens, the mean vector, stored rotated (Pi mu, side dtype); returns (x - mu, mu_rot)."""
    *lead, n, d = x.shape
    if n % block:
        raise ValueError(f"rotation codec: {n} tokens is not a multiple of the centering block {block}")
    mu = x.float().reshape(*lead, n // block, block, d).mean(-2)
    mu_rot = (mu @ Pi.T).to(side_dtype)
    mu_dec = (mu_rot.float() @ Pi).repeat_interleave(block, dim=-2)
    return x.float() - mu_dec, mu_rot


class RotationCodec(Codec):
    """Rotation + Lloyd-Max keys and values.

    params = [key_bits, value_bits, unbiased, scale_mode, sink, center, block] (the cache passes
    block = R); consts = [Pi, codebook_k, codebook_v, S] (see `make_consts`)."""
    id = 2
    name = "rotation"

    def specs(self, d, consts, params):
        kb, vb, ub, _, sink, center, block = parse(params)
        if d % 8:
            raise ValueError(f"rotation codec: head_dim={d} must be a multiple of 8")
        Pi, cbk, cbv, S = consts
        if tuple(Pi.shape) != (d, d) or cbk.numel() != 1 << (kb - ub) or cbv.numel() != 1 << vb:
            raise ValueError(f"rotation codec: consts do not match params {list(params)} and head_dim {d} "
                             f"(Pi {tuple(Pi.shape)}, codebooks {cbk.numel()}/{cbv.numel()}); use make_consts")
        m = S.shape[0]
        if ub and (m == 0 or m % 8 or S.shape[1] != d):
            raise ValueError(f"rotation codec: unbiased keys need a residual sketch (m, {d}), m a multiple of 8, "
                             f"got {tuple(S.shape)}")
        out = [Spec("kidx", 1, (d * (kb - ub) // 8,), torch.uint8), Spec("kscale", 1, (), "side")]
        if ub:
            out += [Spec("kqjl", 1, (m // 8,), torch.uint8), Spec("kres", 1, (), "side")]
        if center & 1:
            out += [Spec("kmean", block, (d,), "side")]
        if value_frag(params):
            _frag_dims((32, d), vb)
        out += [Spec("vidx", 1, (d * vb // 8,), torch.uint8), Spec("vscale", 1, (), "side")]
        if center & 2:
            out += [Spec("vmean", block, (d,), "side")]
        if sink:
            out += [Spec("ksink", 1, (d,), "side", head=sink), Spec("vsink", 1, (d,), "side", head=sink)]
        tk, tv = outlier_tokens(params)
        if tk:
            out += [Spec("kout", block, (tk, d), "side"), Spec("kopos", block, (tk,), torch.int16)]
        if tv:
            out += [Spec("vout", block, (tv, d), "side"), Spec("vopos", block, (tv,), torch.int16)]
        return out

    def compress(self, k, v, consts, params, side_dtype=torch.float16):
        kb, vb, ub, sm, sink, center, block = parse(params)
        Pi, cbk, cbv, S = consts
        xk, mk = _center(k, Pi, block, side_dtype) if center & 1 else (k, None)
        xv, mv = _center(v, Pi, block, side_dtype) if center & 2 else (v, None)
        if ub:
            out = list(quantize_unbiased(xk, Pi, cbk, S, sm, side_dtype))
        else:
            out = list(quantize(xk, Pi, cbk, sm, side_dtype))
        if value_frag(params) and kb - ub == 4:
            out[0] = store_codes(dq.unpack(out[0], 4), 4, params, False)
        out += [mk] if mk is not None else []
        vc, vs = quantize(xv, Pi, cbv, sm, side_dtype)
        if value_frag(params):
            vc = store_codes(dq.unpack(vc, vb), vb, params, True)
        out += [vc, vs]
        out += [mv] if mv is not None else []
        if sink:  # the whole block; append_ keeps the rows of a head-only buffer that exist
            out += [k.to(side_dtype), v.to(side_dtype)]
        tk, tv = outlier_tokens(params)
        if tk or tv:   # chosen by the error of the decoded vectors (codes, scale, mean; QJL residual included)
            # (sinks are not used here: compress does not know where its block starts, so the selection
            # is the same for every block; in block 0 a sink token may take an outlier slot)
            parts = self._split(out, params[:NPARAMS])
            if tk:
                kh = self._rot(parts[0], cbk, block, params) @ Pi
                if parts[0][2] is not None:
                    kh = kh + residual_keys(parts[0][2][0], parts[0][2][1], S)
                out += list(_pick_outliers(k, kh, tk, block, side_dtype))
            if tv:
                vh = self._rot(parts[1], cbv, block, params, True) @ Pi
                out += list(_pick_outliers(v, vh, tv, block, side_dtype))
        return out

    # -- decode ----------------------------------------------------------------------------
    @staticmethod
    def _split(bufs, params):
        """-> (codes, scale, (qjl bits, res norm) or None, mean or None) for K and V, sinks or None."""
        _, _, ub, _, sink, center, _ = parse(params)
        i = 0

        def take(n):
            nonlocal i
            out = bufs[i:i + n]
            i += n
            return out

        kc, ks = take(2)
        kq = tuple(take(2)) if ub else None
        km = take(1)[0] if center & 1 else None
        vc, vs = take(2)
        vm = take(1)[0] if center & 2 else None
        sinks = take(2) if sink else None
        return (kc, ks, kq, km), (vc, vs, None, vm), sinks

    @staticmethod
    def _outliers(bufs, params):
        """-> ((exact keys, offsets) or None, (exact values, offsets) or None): the buffers after the sinks."""
        tk, tv = outlier_tokens(params)
        if not (tk or tv):
            return None, None
        i = len(bufs) - 2 * (bool(tk) + bool(tv))
        ko = tuple(bufs[i:i + 2]) if tk else None
        vo = tuple(bufs[i + 2 * bool(tk): i + 2 * bool(tk) + 2]) if tv else None
        return ko, vo

    @staticmethod
    def _rot(part, cb, block, params=None, values=False):
        """Decoded vectors in the rotated space: Pi mu_block + a_j codebook[idx_j], (B, H, N, D) fp32."""
        codes, scale, _, mean = part
        x = rotated(codes, scale, cb, params, values)
        if mean is not None:
            x = x + mean.float().repeat_interleave(block, dim=-2)[..., : x.shape[-2], :]
        return x

    def keys_rotated(self, bufs, consts, params):
        """MSE part of the keys in the rotated space (sinks and the QJL residual not included)."""
        kp, _, _ = self._split(bufs, params)
        return self._rot(kp, consts[1], parse(params)[6], params)

    def keys(self, bufs, consts, params):
        kp, _, sinks = self._split(bufs, params)
        k = self.keys_rotated(bufs, consts, params) @ consts[0]
        if kp[2] is not None:
            k = k + residual_keys(kp[2][0], kp[2][1], consts[3])
        ko, _ = self._outliers(bufs, params)
        if ko is not None:
            k = _put_outliers(k, ko, parse(params)[6])
        return _with_sink(k, sinks, 0)

    def values_rotated(self, bufs, consts, params):
        """Pi mu_block + a_j codebook_v[idx_j], (B, H, N, D): what the fused kernel accumulates
        (rotate back once); sinks not included."""
        _, vp, _ = self._split(bufs, params)
        return self._rot(vp, consts[2], parse(params)[6], params, True)

    def values(self, bufs, consts, params):
        _, _, sinks = self._split(bufs, params)
        v = self.values_rotated(bufs, consts, params) @ consts[0]
        _, vo = self._outliers(bufs, params)
        if vo is not None:
            v = _put_outliers(v, vo, parse(params)[6])
        return _with_sink(v, sinks, 1)

    def decompress(self, bufs, consts, params):
        return self.keys(bufs, consts, params), self.values(bufs, consts, params)

    def transform(self, q, consts, params):
        """T(q) = [Pi q, S q]: (..., Q, D + m) fp32 (m = 0 unless unbiased)."""
        Pi, _, _, S = consts
        return q.float() @ torch.cat([Pi, S.to(Pi.device)]).T

    def scores(self, q, bufs, consts, params):
        """Fused score path: q (..., Q, D) -> (..., Q, N), equal to q @ keys(...)^T.

        score_j = <Pi q, Pi mu_b + a_j c_j> (+ c(m) ||r_j|| <S q, sign(S r_j)>), sinks exact.
        """
        kp, _, sinks = self._split(bufs, params)
        Pi, _, _, S = consts
        d, m = Pi.shape[0], S.shape[0]
        tq = self.transform(q, consts, params)
        s = tq[..., :d] @ self.keys_rotated(bufs, consts, params).transpose(-1, -2)
        if kp[2] is not None:
            raw = tq[..., d:] @ ref.signs(kp[2][0]).transpose(-1, -2)
            s = s + ref.qjl_const(m, d) * raw * kp[2][1].float().unsqueeze(-2)
        ko, _ = self._outliers(bufs, params)
        if ko is not None and ko[0].shape[-3]:   # exact q . k of each block's outlier tokens
            ex, pos = ko
            block, nb, t = parse(params)[6], ex.shape[-3], ex.shape[-2]
            so = torch.einsum("...qd,...btd->...qbt", q.float(), ex.float())           # (..., Q, nb, t)
            sb = s[..., : nb * block].reshape(*s.shape[:-1], nb, block).clone()
            sb.scatter_(-1, pos.long().unsqueeze(-3).expand(*so.shape), so)
            s = torch.cat([sb.reshape(*s.shape[:-1], nb * block), s[..., nb * block:]], dim=-1)
        if sinks is not None and sinks[0].shape[-2]:
            ns = sinks[0].shape[-2]
            s = torch.cat([q.float() @ sinks[0].float().transpose(-1, -2), s[..., ns:]], dim=-1)
        return s


def cb_rows(codes, cb, params=None, values=False):
    """codebook[idx] per token, (..., N, D) fp32 (no scale); params / values: the layout (`code_indices`)."""
    bits = int(cb.numel()).bit_length() - 1
    idx = code_indices(codes, bits, params, values) if params is not None else dq.unpack(codes, bits)
    return cb.to(codes.device)[idx.long()]


def _with_sink(x, sinks, i):
    if sinks is None or not sinks[i].shape[-2]:
        return x
    ns = sinks[i].shape[-2]
    return torch.cat([sinks[i].float(), x[..., ns:, :]], dim=-2)


ref.register_codec(RotationCodec())
