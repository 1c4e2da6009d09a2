"""Launcher of the CUDA C++ rotation-codec decode attention (kernels/cuda/rot_decode.cu).

Three launches per call, sized from static shapes (CUDA-graph safe, no host sync), the last two
with programmatic dependent launch on sm_90 (their independent prologues overlap the kernel before): ``rot_prep``
(Pi q per query row in fp16, scaled by a power of two), ``rot_split`` (one CTA per (batch * kv head,
split), each warp its own partial softmax over the compressed tokens, values summed in the rotated
basis) and ``rot_combine`` (the partials rotated back by Pi and merged with the exact tokens). With
``fuse_q=True`` every split CTA computes Pi q itself on the tensor cores (`pi_fragments`) and
``rot_prep`` is skipped.

Codes become MMA operands by register lookup, which needs symmetric codebooks (true of the
Lloyd-Max codebooks of N(0, 1) the codec uses, checked per layer); see rot_decode.cu. Keys: where
the 4-bit key codebook lies on the half-integer grid of `rotation.grid_codebook` (the default,
``QJLConfig.rotation_key_grid``), u8 levels into int8 MMAs with Pi q as two s8 digits (``KI8``,
H200: 84.1 against 88.3 us at B=1 128k); otherwise fp16 operands (``key_int8=False``). Values:
fp16 operands. A cache in the kernel layout (params center bit ``rotation.VFRAG``: value codes in
MMA-fragment order, 4-bit codes sign-magnitude; QJLConfig ``rotation_value_layout``) builds ``VFRAG``:
each lane's own words are its value fragments (H200 k4v3-match 69.1 against 76.6 us at B=1 128k).
"""
from __future__ import annotations

import ctypes
import math

import torch

from .. import rotation as rot
from ..checks import check_attend, late_constants, mask_args
from . import allow_dynamic_smem, available, launch, module, pdl_supported, sm_count
from .qjl import Unsupported, split_plan

KERNELS = ("rot_prep", "rot_split", "rot_combine")
LOG2E = 1.4426950408889634
STAGES = 2               # cp.async stages per warp (H200, attend-rot-v5.json: 38.5 vs 39.6 us at 32k, 81.6 vs
                         # 82.9 at 128k against 3; 4 stages 92.3 at 128k: one CTA per SM fits)
MIN_BLOCKS = 3
KEY_BITS = (4,)
VALUE_BITS = (3, 4)
MAX_SINK = 64
FMA_SHIFTS = True
PIPE = False             # software-pipelined split loop (rot_decode.cu PIPE), PIPE_STAGES cp.async stages
PIPE_STAGES = 3
# block means staged before the dependency wait (rot_decode.cu EARLY): H200 attend-opts.json, within +-1% of
# off at 4k..128k, 1% slower at B=16 16k: off
EARLY = False
# HF's decode mask staged with the cache groups (rot_decode.cu MKS): H200 attend-opts.json, k4v3-match with
# the (B, 1, 1, L) fp32 mask 68.0 -> 65.9 us at 128k, 129.1 -> 123.4 at B=16 16k, 34.9 -> 33.1 at 32k (no mask: 64.9)
STAGE_MASK = True
# the combine's exact keys staged by cp.async (decode_common.cuh KST): None = where the combine grid (B * H * M
# CTAs) fits one CTA per SM. H100 (RESULTS "Session of 2026-12-06"): k4v3-match (Hadamard) 20.2 -> 18.5 us at B=1 4k,
# 31.9 -> 31.3 at 32k, 73.1 -> 72.6 at 128k, but 124.9 -> 129.0 at B=16 16k (512 combine CTAs, whose 34 KB each
# take shared memory from the split under PDL); QJL 21.2 -> 20.6 at 4k, 157.4 -> 160.3 at B=16
STAGE_KEYS = None
CH_E = 136               # exact tokens the combine stages at a time (decode_common.cuh)
TIMELINE = False         # benchmarks/timeline.py: build with TL=1 (per-event %globaltimer stamps, decode_common.cuh)
HADAMARD = True          # Pi a randomized Hadamard transform (QJLConfig.rotation_transform): Pi q by butterflies in
                         # the split, Pi^T o' in the combine (rot_decode.cu HAD), no rot_prep launch, no Pi read
FUSE_Q = False           # Pi q in every split CTA on the tensor cores: slower than rot_prep under PDL (H200, attend-fq.json:
                         # k4v3-match 24.5 / 37.5 / 80.7 / 151.8 us against 23.2 / 36.0 / 79.8 / 149.5 at 4k / 32k / 128k / B=16 16k)
_DERIVED: dict = {}


def _word(b4):
    return b4[0] | (b4[1] << 8) | (b4[2] << 16) | (b4[3] << 24)


def lut_words(cb: torch.Tensor) -> list[int] | str:
    """The 4 lookup words of a codebook in fp16, or why the kernel cannot use it.

    16 entries (4-bit): lo bytes of magnitudes 0-3, 4-7, hi bytes 0-3, 4-7 (the codebook must be
    symmetric: the sign is applied apart). 8 entries (3-bit): lo bytes of entries 0-3, 4-7, hi bytes
    0-3, 4-7 (any codebook: the code is the byte selector)."""
    c = cb.detach().float().cpu().to(torch.float16)
    bits = c.view(torch.int16).to(torch.int32) & 0xFFFF
    if c.numel() == 8:
        lo = [b & 0xFF for b in bits.tolist()]
        hi = [b >> 8 for b in bits.tolist()]
        return [_word(lo[:4]), _word(lo[4:]), _word(hi[:4]), _word(hi[4:])]
    if c.numel() != 16:
        return f"a {c.numel()}-entry codebook (the kernel decodes 8- and 16-entry, 3- and 4-bit ones)"
    neg = (bits ^ 0x8000)
    if not torch.equal(bits[:8], neg.flip(0)[:8]) or bool((c[8:] <= 0).any()):
        return "a codebook that is not symmetric (cb[15 - c] == -cb[c] in fp16); the register lookup needs that"
    mag = bits[8:].tolist()                              # magnitude index j = code - 8 (codes >= 8)
    lo = [m & 0xFF for m in mag]
    hi = [m >> 8 for m in mag]
    return [_word(lo[:4]), _word(lo[4:]), _word(hi[:4]), _word(hi[4:])]


def int8_words(cb: torch.Tensor) -> tuple[list[int], float] | str:
    """KI8's 2 table words and grid step of a 16-entry key codebook on the grid of
    `rotation.grid_codebook`, or why the int8 path cannot take it. Byte i of the table is the u8 level
    P_i = cb_i / s + 63.5 of code i < 8, XOR 0x80 (rot_decode.cu lut_i8 XORs it back, or with 0xFF for
    code 15 - i: the negation 127 - P_i)."""
    if cb.numel() != 16:
        return f"a {cb.numel()}-entry key codebook (the int8 path decodes 4-bit keys)"
    s = rot.grid_step(cb)
    if s is None:
        return ("a key codebook off the int8 grid (QJLConfig(rotation_key_grid=True) puts 4-bit keys on it); "
                "the fp16 path runs instead")
    p = [int(round(float(v) / s + rot.GRID_HALF)) for v in cb.detach().double().cpu()[:8]]
    u = [v ^ 0x80 for v in p]
    return [_word(u[:4]), _word(u[4:])], s


def pi_fragments(Pi: torch.Tensor) -> torch.Tensor:
    """16 Pi (D, D) as fp16 hi + lo (hi + lo = 16 Pi to ~2^-22; the factor 16 keeps lo out of fp16's
    subnormals), laid out as the A fragments of m16n8k16 MMAs for y = Pi x: int32 (2, D/16, D/16, 32, 4)
    = (hi/lo, m-tile, k-step, lane, register). Lane (g, t)'s registers hold the fp16 pairs of rows
    (g, g + 8) x columns (2t, 2t + 1) and (2t + 8, 2t + 9) of the 16 x 16 tile, low half first: the
    split (FUSEQ) loads one 16-byte word per lane, tile and part."""
    D = Pi.shape[0]
    p = Pi.detach().double().cpu() * 16
    hi = p.to(torch.float16)
    lo = (p - hi.double()).to(torch.float16)
    lane = torch.arange(32)
    g, t = lane // 4, lane % 4
    reg = torch.arange(4)
    row = g[:, None] + 8 * (reg[None, :] % 2)                 # (32, 4): a0 g, a1 g+8, a2 g, a3 g+8
    col = 2 * t[:, None] + 8 * (reg[None, :] // 2)            # a0/a1 cols 2t, a2/a3 cols 2t+8
    mt = torch.arange(D // 16)[:, None, None, None]
    ks = torch.arange(D // 16)[None, :, None, None]
    r_ = 16 * mt + row[None, None]                            # (D/16, D/16, 32, 4)
    c_ = 16 * ks + col[None, None]
    out = []
    for part in (hi, lo):
        bits = part.view(torch.int16).to(torch.int32) & 0xFFFF
        out.append(bits[r_, c_] | (bits[r_, c_ + 1] << 16))
    return torch.stack(out).to(torch.int32)


def derived(consts):
    """(Pi fp32 contiguous, `pi_fragments` int32, lut int32 (15,), key grid step s or None, Hadamard
    signs s / sqrt(D) fp32 (D,) or None) of a layer's consts, cached per Pi/codebook storage (the second
    element is the reason instead, when the kernel cannot take it; s None: the int8 key path cannot, the
    fp16 one runs; signs None: Pi is not a randomized Hadamard transform, `rotation.hadamard_signs`).
    `prepare` fills it when a layer is allocated, outside any CUDA-graph capture."""
    Pi, cbk, cbv = consts[0], consts[1], consts[2]
    key = (Pi.data_ptr(), cbk.data_ptr(), cbv.data_ptr(), Pi.device)
    hit = _DERIVED.get(key)
    if hit is not None:
        return hit[1]
    late_constants(Pi.device)
    wk, wv = lut_words(cbk), lut_words(cbv)
    if isinstance(wk, str) or isinstance(wv, str):
        val = (None, wk if isinstance(wk, str) else wv, None, None, None)
    else:
        w8 = int8_words(cbk)
        step = None if isinstance(w8, str) else w8[1]
        # the last 4: multipliers the split reads at run time, so that ptxas keeps its multiplies by
        # them on the FMA pipe (as constants it turns them into LEAs / LEA.HIs, ALU like the lookups)
        words = wk + wv + ([0, 0] if step is None else w8[0]) + [0x80808080, 1 << 30, 1 << 31, 512, 2]
        words = [w - (1 << 32) if w >= 1 << 31 else w for w in words]
        pf = Pi.detach().float()
        sg = rot.hadamard_signs(pf)
        val = (pf.contiguous(), pi_fragments(pf).to(Pi.device),
               torch.tensor(words, dtype=torch.int32, device=Pi.device), step,
               None if sg is None else sg.to(Pi.device))
    _DERIVED[key] = ((Pi, cbk, cbv), val)
    return val


def prepare(consts) -> None:
    if len(consts) >= 3 and consts[0].dim() == 2:
        derived(consts)


class _Args(ctypes.Structure):
    _fields_ = ([("q", ctypes.c_void_p)] + [(f"sq{c}", ctypes.c_int64) for c in "bht"]
                + [("len", ctypes.c_void_p), ("rk", ctypes.c_void_p), ("rv", ctypes.c_void_p)]
                + [(f"sr{c}", ctypes.c_int64) for c in "bht"]
                + [("kn", ctypes.c_void_p), ("vn", ctypes.c_void_p)] + [(f"sn{c}", ctypes.c_int64) for c in "bht"]
                + [(f, ctypes.c_void_p) for f in ("kidx", "kscale", "kmean", "vidx", "vscale", "qr", "qrs", "pi",
                                                  "pif", "lut", "qi", "qsig")]
                + [("kstep", ctypes.c_float)]
                + [(f, ctypes.c_void_p) for f in ("ksink", "vsink", "mask")]
                + [(f"sm{c}", ctypes.c_int64) for c in "bhtl"]
                + [("opart", ctypes.c_void_p), ("lse", ctypes.c_void_p), ("qk_scale", ctypes.c_float)]
                + [(f, ctypes.c_int32) for f in ("H", "G", "Tq", "T", "M", "LC", "chunk", "nsplit", "nblk")])


def unsupported(q, state, consts, meta) -> str:
    """Why `rotation_attend_cuda` cannot take this call ("" if it can). Shapes/dtypes only."""
    try:
        kb, vb, ub, _, sink, center, block = rot.parse(list(meta[3:]))
    except ValueError as e:
        return str(e)
    if rot.outlier_tokens(list(meta[3:])) != (0, 0):
        return (f"exact outlier tokens per block (key_outliers, value_outliers = "
                f"{list(rot.outlier_tokens(list(meta[3:])))}) are not implemented in the CUDA C++ kernel")
    if ub:
        return "unbiased keys (a QJL residual) are not implemented in the CUDA C++ kernel"
    if kb not in KEY_BITS or vb not in VALUE_BITS:
        return (f"key_bits={kb}, value_bits={vb}: the CUDA C++ kernel decodes key bits {KEY_BITS}, "
                f"value bits {VALUE_BITS}")
    if sink > MAX_SINK:
        return f"{sink} exact sink tokens > {MAX_SINK} (the CUDA C++ kernel's combine attends them per call)"
    if center & 2:
        return "value centering is not implemented in the CUDA C++ kernel"
    ok, why = available()
    if not ok:
        return why
    if not q.is_cuda:
        return "q is not on a CUDA device"
    if torch.cuda.get_device_capability(q.device) < (8, 0):
        return f"needs compute capability >= 8.0, got {torch.cuda.get_device_capability(q.device)}"
    rk = state[1]
    D, R = rk.shape[-1], int(meta[1])
    G = q.shape[1] // rk.shape[1]
    if q.dtype not in (torch.float16, torch.bfloat16) or q.dtype != rk.dtype:
        return f"q/cache dtype {q.dtype}/{rk.dtype}: the CUDA kernel takes fp16 or bf16, the same for both"
    if state[4].dtype != torch.float16:
        return f"side data in {state[4].dtype}: the CUDA kernel reads fp16 scales (QJLConfig side_dtype)"
    if G * q.shape[2] > 8:
        return f"{G * q.shape[2]} query rows per kv head (GQA group x query tokens) > 8"
    if D not in (64, 128):
        return f"head_dim {D} not in (64, 128)"
    if center and (block % 32 or R % block):
        return f"centering block {block} must be a multiple of 32 dividing R={R}"
    if R + q.shape[2] + sink > 1024:
        return (f"residual window {R} + {q.shape[2]} query tokens + {sink} sinks > 1024 exact tokens "
                f"(the combine's score table)")
    if len(consts) < 3 or consts[0].shape != (D, D):
        return f"consts must be [Pi ({D}, {D}), codebook_k, codebook_v, S]"
    why = derived(consts)[1]
    return why if isinstance(why, str) else ""


def stage_bytes(D, kb, vb, mke=0) -> int:
    """Shared memory of one 32-token group in the cp.async ring (ST_SIZE in rot_decode.cu); ``mke``:
    bytes per token of a staged per-position mask (MKS: 1 bool, 4 fp32)."""
    return 32 * (D * kb // 8) + 64 + 32 * (D * vb // 8) + 64 + 32 * mke


def dyn_smem(nw, stages, D, kb, vb, nblk, early=False, mke=0) -> int:
    """The stages of every warp plus the per-block q' . mu table (nblk x 8 fp32) and, with ``early``,
    the split's block means (nblk x D fp16), which the CTA's merge reuses for the warps' partial outputs
    (NW x 8 x D fp32) once the loop is done."""
    return max(nw * stages * stage_bytes(D, kb, vb, mke) + nblk * 32 + (nblk * D * 2 if early else 0),
               nw * 8 * D * 4)


def mask_stageable(kind, mt, ms, LC) -> bool:
    """Whether a per-position mask (kind 3 / 4: HF's (B, 1, 1, L) decode mask) can be staged with the
    cache groups by cp.async (MKS): unit position stride, 16-byte aligned rows, long enough for every
    group of the compressed part (LC positions, a multiple of 32)."""
    if kind not in (3, 4):
        return False
    e = 1 if kind == 3 else 4
    return (ms[3] == 1 and mt.data_ptr() % 16 == 0 and (ms[0] * e) % 16 == 0 and mt.shape[-1] >= LC
            and LC % 32 == 0)


def _config(B, H, LC):
    """(warps per CTA, splits, CTAs per SM for ``__launch_bounds__``) from static shapes (CUDA-graph
    safe): the QJL kernel's split rule (about 4 CTAs per SM of work, at most 32 splits, at least 128
    tokens per split), then 8 warps per CTA where a split has >= 2048 tokens. H200, attend-rot-v3.json:
    8 warps (2 CTAs per SM) 87.7 vs 92.9 us at B=1 128k and 166.9 vs 168.7 at B=16 16k; at 32k (1024
    tokens a split) 42.3 vs 41.6, so 4 warps there."""
    nw = 4
    nsplit = max(1, min(32, -(-4 * 132 // (B * H)), LC // (32 * nw)))
    if LC // nsplit >= 2048:
        return 8, nsplit, 2
    return nw, nsplit, MIN_BLOCKS


def rotation_attend_cuda(q, state, consts, k_new, v_new, attn_mask=None, is_causal=False, scale=None, meta=None,
                         nsplit=None, num_warps=None, min_blocks=None, stages=None, fma_shifts=None, fuse_q=None,
                         key_int8=None, pdl=None, pipe=None, early=None, stage_mask=None, hadamard=None,
                         stage_keys=None):
    """Fused rotation-codec decode attention, CUDA C++ (semantics of kernels.reference.attend).

    Parameters
    ----------
    q : Tensor
        (B, Hq, Tq, D) fp16/bf16 on CUDA, Hq = G * H, G * Tq <= 8.
    state, consts, meta
        Rotation layer state (kernels/reference.py), [Pi (D, D), codebook_k, codebook_v, S] fp32,
        [2, R, L, key_bits, value_bits, unbiased, scale_mode, sink, center, block].
    k_new, v_new : Tensor
        (B, H, T, D) this step's tokens, attended exactly.
    attn_mask : Tensor, optional
        Bool (True = attend) or additive float, broadcastable to (B, Hq, Tq, L).
    is_causal : bool
        Without a mask, query i sees positions <= length - Tq + i.
    scale : float, optional
        Score scale, default 1/sqrt(D).
    nsplit, num_warps, min_blocks, stages : int, optional
        Launch overrides (splits, warps per CTA, ``__launch_bounds__`` CTAs per SM, cp.async stages).
    fma_shifts : bool, optional
        The lookups' shifts as integer multiplies (FMA pipe) instead of SHF (ALU pipe, the busiest);
        default FMA_SHIFTS.
    fuse_q : bool, optional
        Pi q computed by every split CTA on the tensor cores (no ``rot_prep`` launch); default FUSE_Q.
    key_int8 : bool, optional
        Keys on int8 MMAs (needs a key codebook on the grid, ``rotation_key_grid``); default: wherever
        the codebook allows it. True with a codebook off the grid raises Unsupported.
    pdl : bool, optional
        Programmatic dependent launch of the split (after ``rot_prep``) and the combine (sm_90+: each
        starts its independent prologue while the kernel before it runs); default `pdl_supported`.
    pipe : bool, optional
        Software-pipelined split loop (the values of the group before beside this group's keys; needs
        the kernel layout and >= 3 stages, the default then); default PIPE where the layout allows it.
    early : bool, optional
        Key-centered layers: the split stages its block means into shared memory before it waits for
        ``rot_prep`` (same bits); default EARLY.
    hadamard : bool, optional
        Where Pi is a randomized Hadamard transform (``QJLConfig(rotation_transform="hadamard")``): the
        split computes Pi q by butterflies (no ``rot_prep`` launch) and the combine rotates back the same
        way (no Pi staging); default HADAMARD wherever Pi allows it (True with a dense Pi: Unsupported).
    stage_keys : bool, optional
        The combine copies its first 136 exact keys into shared memory by cp.async, all in flight at once,
        before scoring them (instead of a global round trip per 4 tokens a warp); default STAGE_KEYS
        (None: where the B * H * M combine CTAs fit one per SM).
    stage_mask : bool, optional
        A per-position mask (HF's (B, 1, 1, L) decode mask) copied with each cache group by cp.async
        instead of loaded in the loop, where `mask_stageable` allows it (True with a mask it does not: Unsupported);
        default STAGE_MASK.

    Returns
    -------
    Tensor
        (B, Hq, Tq, D) in q's dtype, laid out like ``torch.empty_like(q)``.

    Raises
    ------
    Unsupported
        With the reason, when the call is outside what the kernel covers (`unsupported`).
    """
    why = unsupported(q, state, consts, meta)
    if why:
        raise Unsupported(why)
    rk, rv = state[1], state[2]
    B, H, R, D = rk.shape
    L = int(meta[2])
    LC = L // R * R
    kb, vb, _, _, sink, center, block = rot.parse(list(meta[3:]))
    q, k_new, v_new, Tq, T, G = check_attend(q, state, k_new, v_new, B, H, D, "rotation_attend_cuda")
    M = G * Tq
    ns_ = min(LC, sink) if sink else 0
    if R + T + ns_ > 1024:
        raise Unsupported(f"residual window {R} + {T} new tokens + {ns_} sinks > 1024 exact tokens "
                          f"(the combine's score table)")
    ck = center & 1
    nb = 4 if ck else 3                                   # kidx, kscale, [kmean], vidx, vscale
    bufs = state[3:3 + nb + 1]
    kidx, kscale = bufs[0], bufs[1]
    kmean = bufs[2] if ck else bufs[1]
    vidx, vscale = bufs[nb - 1], bufs[nb]
    ksink = vsink = kidx                                  # a dummy pointer when there are none (NSINK = 0)
    if ns_:
        ksink, vsink = state[3 + nb + 1], state[3 + nb + 2]
        for name, tns in (("ksink", ksink), ("vsink", vsink)):
            if tuple(tns.shape) != (B, H, ns_, D) or not tns.is_contiguous() or tns.dtype != torch.float16:
                raise ValueError(f"rotation_attend_cuda: buffer {name} must be contiguous fp16 {(B, H, ns_, D)}, "
                                 f"got {tuple(tns.shape)} {tns.dtype}")
    for name, tns, shp in (("kidx", kidx, (B, H, LC, D * kb // 8)), ("kscale", kscale, (B, H, LC)),
                           ("vidx", vidx, (B, H, LC, D * vb // 8)), ("vscale", vscale, (B, H, LC))):
        if tuple(tns.shape) != shp or not tns.is_contiguous():
            raise ValueError(f"rotation_attend_cuda: buffer {name} must be contiguous {shp}, got {tuple(tns.shape)}")
    if ck and (tuple(kmean.shape) != (B, H, LC // block, D) or not kmean.is_contiguous()):
        raise ValueError(f"rotation_attend_cuda: buffer kmean must be contiguous {(B, H, LC // block, D)}, "
                         f"got {tuple(kmean.shape)}")
    if attn_mask is not None and attn_mask.is_floating_point() and attn_mask.dtype != torch.float32:
        attn_mask = attn_mask.float()        # the kernel reads fp32 additive masks
    kind, mt, ms = mask_args(attn_mask, q)
    nw, ns, minb = _config(B, H, LC)
    if num_warps and num_warps != nw:
        minb = MIN_BLOCKS if num_warps <= 4 else 2
    nw = num_warps or nw
    ns = nsplit or ns
    chunk, ns = split_plan(LC, ns, nw)
    if ns > 1024:
        raise Unsupported(f"{ns} splits > 1024 (the combine's weight table); pass a smaller nsplit")
    nblk = (chunk // block + 2) if ck else 0
    causal = bool(is_causal) and attn_mask is None
    vfrag = rot.value_frag(list(meta[3:]))
    pp = (PIPE and vfrag) if pipe is None else bool(pipe)
    if pp and not vfrag:
        raise Unsupported("pipe=True needs the kernel value layout (QJLConfig.rotation_value_layout='mma')")
    nst = (PIPE_STAGES if pp else STAGES) if stages is None else int(stages)
    if nst < 2 + pp:
        raise ValueError(f"stages={nst}: the rotation kernel streams through >= {2 + pp} cp.async stages"
                         + (" with pipe=True" if pp else ""))
    defines = dict(D=D, KB=kb, VB=vb, RR=R, NW=nw, QDT=int(q.dtype == torch.bfloat16), MK=kind,
                   CAUSAL=int(causal), CAUSAL_C=int(causal and T < Tq), CK=ck, BLK=block if ck else 128,
                   MINB=int(min_blocks or minb), STAGES=nst, NSINK=ns_,
                   FMAOFF=int(FMA_SHIFTS if fma_shifts is None else bool(fma_shifts)),
                   VFRAG=int(vfrag), PIPE=int(pp))
    pi, pif, lut, kstep, hsg = derived(consts)
    had = hsg is not None and (HADAMARD if hadamard is None else bool(hadamard))
    if hadamard and hsg is None:
        raise Unsupported("hadamard=True needs Pi = H diag(s) / sqrt(D) (QJLConfig(rotation_transform='hadamard'))")
    if had and fuse_q is False:
        raise Unsupported("fuse_q=False with a Hadamard Pi: the split computes Pi q itself; pass hadamard=False "
                          "for rot_prep")
    fq = had or (FUSE_Q if fuse_q is None else bool(fuse_q))
    defines["FUSEQ"] = int(fq)
    defines["HAD"] = int(had)
    if had:
        pi = hsg                                          # the kernels read s / sqrt(D) where Pi was
    ki8 = kstep is not None if key_int8 is None else bool(key_int8)
    if ki8 and kstep is None:
        raise Unsupported(f"key_int8=True: {int8_words(consts[1])}")
    defines.update(KI8=int(ki8), PK=int(ki8 and M <= 4))
    ea = bool(ck) and (EARLY if early is None else bool(early))
    defines["EARLY"] = int(ea)
    if stage_mask and not mask_stageable(kind, mt, ms, LC):
        raise Unsupported("stage_mask=True needs a per-position mask (B, 1, 1, L) with unit position stride, "
                          f"16-byte aligned rows and >= {LC} positions; got mask kind {kind}, strides {tuple(ms)}")
    mks = (STAGE_MASK if stage_mask is None else bool(stage_mask)) and mask_stageable(kind, mt, ms, LC)
    defines["MKS"] = int(mks)
    kst = STAGE_KEYS if stage_keys is None else bool(stage_keys)
    if kst is None:                                       # measured with HAD (34 KB; a dense Pi's combine has 64 KB more)
        kst = had and B * H * M <= sm_count(q.device)
    defines["KST"] = int(kst)
    if TIMELINE:
        defines["TL"] = 1
    mke = (1 if kind == 3 else 4) if mks else 0
    dyn = dyn_smem(nw, nst, D, kb, vb, nblk, ea, mke)
    fns = module("rot_decode", defines, KERNELS, q.device)
    BH = B * H
    dev = q.device
    opart = torch.empty(BH * ns * 8 * D, dtype=torch.float32, device=dev)
    lse = torch.empty(BH * ns * 8, dtype=torch.float32, device=dev)
    out = torch.empty_like(q)
    stream = torch.cuda.current_stream(dev)
    P, I64, I32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32
    qi = qsig = lse                                       # not read without KI8
    if fq:
        qr = qrs = opart                                  # not read (the split computes Pi q)
    else:
        qr = torch.empty(BH * 8 * D, dtype=torch.float16, device=dev)
        qrs = torch.empty(BH * 8, dtype=torch.float32, device=dev)
        if ki8:
            qi = torch.empty(BH * 16 * D, dtype=torch.int8, device=dev)
            qsig = torch.empty(BH * 8, dtype=torch.float32, device=dev)
        launch(fns["rot_prep"], (BH, D // 32), (256,),
               [P(q.data_ptr()), *(I64(s) for s in q.stride()[:3]), P(pi.data_ptr()),
                P(qr.data_ptr()), P(qrs.data_ptr()), I32(H), I32(G), I32(Tq), I32(M),
                P(qi.data_ptr()), P(qsig.data_ptr())], stream)
    sc = float(scale) if scale is not None else 1.0 / math.sqrt(D)
    a = _Args(q.data_ptr(), *q.stride()[:3], state[0].data_ptr(), rk.data_ptr(), rv.data_ptr(), *rk.stride()[:3],
              k_new.data_ptr(), v_new.data_ptr(), *k_new.stride()[:3],
              kidx.data_ptr(), kscale.data_ptr(), kmean.data_ptr(), vidx.data_ptr(), vscale.data_ptr(),
              qr.data_ptr(), qrs.data_ptr(), pi.data_ptr(), pif.data_ptr(), lut.data_ptr(), qi.data_ptr(),
              qsig.data_ptr(), float(kstep or 0.0), ksink.data_ptr(), vsink.data_ptr(),
              mt.data_ptr(), *ms,
              opart.data_ptr(), lse.data_ptr(), sc * LOG2E,
              H, G, Tq, T, M, LC, chunk, ns, nblk)
    dep = pdl_supported(dev.index if dev.index is not None else torch.cuda.current_device()) if pdl is None else bool(pdl)
    allow_dynamic_smem(fns["rot_split"], dyn)
    launch(fns["rot_split"], (BH, ns), (nw * 32,), [a], stream, shared=dyn, pdl=dep and not fq)  # fq: first kernel
    csm = (0 if had else D * D * 4) + (CH_E * D * 2 if kst else 0)   # pi (HAD: butterflies), KST: the exact keys
    if csm:
        allow_dynamic_smem(fns["rot_combine"], csm)
    launch(fns["rot_combine"], (BH, M), (D,), [a, P(out.data_ptr()), *(I64(s) for s in out.stride()[:3])], stream,
           shared=csm, pdl=dep)
    return out
