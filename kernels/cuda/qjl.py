"""Launcher of the CUDA C++ QJL decode attention (kernels/cuda/qjl_decode.cu).

Three launches per call, all sized from static shapes (CUDA-graph safe, no host sync):
``qjl_prep`` (S q per query row as 16-bit fixed point in fragment order), ``qjl_split`` (one CTA
per (batch * kv head, split), each warp its own partial softmax; the last split takes the exact
tokens) and ``qjl_combine``. The fragment K order is `mma_perm`; the sketch columns used by the
outlier correction are stored in it once per sketch (`sketch_planes`).
"""
from __future__ import annotations

import ctypes
import math

import torch

from .. import reference as ref
from ..checks import check_attend, check_qjl, late_constants, mask_args
from . import allow_dynamic_smem, available, launch, module, pdl_supported, sm_count

# the combine's exact keys staged by cp.async (decode_common.cuh KST): None = where the combine grid (B * H * M
# CTAs) fits one CTA per SM. H100 (RESULTS "Session of 2026-12-06"): k4v3-match (Hadamard) 20.2 -> 18.5 us at B=1 4k,
# 31.9 -> 31.3 at 32k, 73.1 -> 72.6 at 128k, but 124.9 -> 129.0 at B=16 16k (512 combine CTAs, whose 34 KB each
# take shared memory from the split under PDL); QJL 21.2 -> 20.6 at 4k, 157.4 -> 160.3 at B=16
STAGE_KEYS = None
TIMELINE = False         # benchmarks/timeline.py: build with TL=1 (per-event %globaltimer stamps, decode_common.cuh)
KERNELS = ("qjl_prep", "qjl_split", "qjl_combine")
LOG2E = 1.4426950408889634
FMA_SHIFTS = False        # measured per codec (RESULTS.md); the shared header's FMAOFF
STAGES = 3             # cp.async stages per warp (H200 measurement: benchmarks/RESULTS.md)
MIN_BLOCKS = 3         # CTAs per SM the register budget is sized for (162 registers at the reference shape)
QSTEP = 32767          # fixed-point range of S q and the sketch columns (two int8 planes)
_PLANES: dict = {}


class Unsupported(NotImplementedError):
    """The CUDA C++ kernel does not cover this call; the message says why (the caller falls back)."""


def mma_perm(m: int) -> list[int]:
    """Sketch row at each K position of the int8 m16n8k32 fragments (chunk c = k // 32).

    Thread t of a fragment row holds the token's words WPL t .. WPL t + WPL - 1 (WPL = m / 128) and
    builds its operand registers as (word >> s) & 0x01010101, so K position 4 t + e (+16) of chunk c
    is bit 8 e + s of word WPL t + c // 4, s = 2 (c % 4) (+1): no bit crosses threads.
    """
    if m % 128:
        raise ValueError(f"mma_perm: m={m} must be a multiple of 128")
    wpl = m // 128
    out = []
    for c in range(m // 32):
        for kk in range(32):
            hi, t, e = kk // 16, (kk % 16) // 4, kk % 4
            out.append(32 * (wpl * t + c // 4) + 8 * e + 2 * (c % 4) + hi)
    return out


def sketch_planes(S: torch.Tensor):
    """(perm int32 (m,), columns uint8 (D, m/32, 4, 16), column sums int32 (D,), step) for sketch S.

    Columns of S in `mma_perm` order as QSTEP-level fixed point, split into an s8 high and a u8 low
    plane and laid out as the B operand of m16n8k32 for thread t of a fragment column:
    16 bytes = (b0 hi, b1 hi, b0 lo, b1 lo). Cached per sketch tensor (sketches are never mutated);
    `prepare` fills the cache when a layer is allocated, outside any CUDA-graph capture.
    """
    key = (S.data_ptr(), S.device, tuple(S.shape))
    hit = _PLANES.get(key)
    if hit is not None:
        return hit[1]
    late_constants(S.device)
    m, D = S.shape
    perm = torch.tensor(mma_perm(m), dtype=torch.long)
    Sp = S.detach().double().cpu()[perm]                                   # (m, D) in K order
    step = float(Sp.abs().max()) / QSTEP or 1.0
    Q = torch.round(Sp / step).clamp(-QSTEP, QSTEP).to(torch.int32)
    colsum = Q.sum(0).to(torch.int32)
    hi = (Q >> 8).to(torch.int8).view(torch.uint8)
    lo = (Q & 255).to(torch.uint8)
    nch = m // 32
    planes = torch.stack([hi.T.reshape(D, nch, 2, 4, 4), lo.T.reshape(D, nch, 2, 4, 4)], 2)  # (D, c, plane, half, t, e)
    planes = planes.permute(0, 1, 4, 2, 3, 5).contiguous()                 # (D, c, t, [plane, half, e])
    val = (perm.to(torch.int32).to(S.device), planes.to(S.device), colsum.to(S.device), step)
    _PLANES[key] = (S, val)
    return val


def sketch_rows(S: torch.Tensor) -> torch.Tensor:
    """S's rows in `mma_perm` order, fp32 contiguous on S's device (the prep kernel reads them
    coalesced, without an index load). Cached per sketch tensor like `sketch_planes`."""
    key = ("rows", S.data_ptr(), S.device, tuple(S.shape))
    hit = _PLANES.get(key)
    if hit is not None:
        return hit[1]
    late_constants(S.device)
    perm = torch.tensor(mma_perm(S.shape[0]), dtype=torch.long, device=S.device)
    val = S.detach().float()[perm].contiguous()
    _PLANES[key] = (S, val)
    return val


def prepare(consts) -> None:
    for i, S in enumerate(consts):
        if S.shape[0] and S.shape[0] % 128 == 0:
            sketch_planes(S)
            if i == 0:
                sketch_rows(S)


class _Args(ctypes.Structure):
    _fields_ = ([("q", ctypes.c_void_p)] + [(f"sq{c}", ctypes.c_int64) for c in "bht"]
                + [("len", ctypes.c_void_p), ("rk", ctypes.c_void_p), ("rv", ctypes.c_void_p)]
                + [(f"sr{c}", ctypes.c_int64) for c in "bht"]
                + [("kn", ctypes.c_void_p), ("vn", ctypes.c_void_p)] + [(f"sn{c}", ctypes.c_int64) for c in "bht"]
                + [(f, ctypes.c_void_p) for f in ("kbits", "knorm", "kobits", "konorm", "kidx", "vcode", "vscale",
                                                  "vzero", "sqf", "sqsum", "sqsig", "scol", "scsum", "socol",
                                                  "socsum", "mask")]
                + [(f"sm{c}", ctypes.c_int64) for c in "bhtl"]
                + [("opart", ctypes.c_void_p), ("lse", ctypes.c_void_p)]
                + [(f, ctypes.c_float) for f in ("sig_s", "sig_so", "qk_scale", "c_in", "c_out")]
                + [(f, ctypes.c_int32) for f in ("H", "G", "Tq", "T", "M", "LC", "chunk", "nsplit", "mask_kind",
                                                 "causal")])


def unsupported(q, state, consts, meta) -> str:
    """Why `qjl_attend_cuda` cannot take this call ("" if it can). Shapes/dtypes only."""
    if len(meta) > 8 and int(meta[8]):
        return "rotation-coded values (QJLConfig.qjl_value_codec='rotation') are not implemented in the CUDA C++ kernel"
    if len(meta) > 7 and int(meta[7]):
        return "exact outlier channels (QJLConfig.qjl_exact_outliers=True) are not implemented in the CUDA C++ kernel"
    if len(meta) > 6 and int(meta[6]):
        return "key centering (QJLConfig.qjl_center=True) is not implemented in the CUDA C++ kernel"
    ok, why = available()
    if not ok:
        return why
    if not q.is_cuda:
        return "q is not on a CUDA device"
    if torch.cuda.get_device_capability(q.device) < (8, 0):
        return f"needs compute capability >= 8.0, got {torch.cuda.get_device_capability(q.device)}"
    _, R, L, o, vb, vg = (int(x) for x in meta[:6])
    D = state[1].shape[-1]
    m, mo = consts[0].shape[0], consts[1].shape[0]
    G = q.shape[1] // state[1].shape[1]
    if q.dtype not in (torch.float16, torch.bfloat16) or q.dtype != state[1].dtype:
        return f"q/cache dtype {q.dtype}/{state[1].dtype}: the CUDA kernel takes fp16 or bf16, the same for both"
    if state[4].dtype != torch.float16:
        return f"side data in {state[4].dtype}: the CUDA kernel reads fp16 norms/scales (QJLConfig side_dtype)"
    if G * q.shape[2] > 8:
        return f"{G * q.shape[2]} query rows per kv head (GQA group x query tokens) > 8"
    if D not in (64, 128):
        return f"head_dim {D} not in (64, 128)"
    if m % 128 or (mo and mo % 128) or (o > 0) != (mo > 0):
        return f"sketch sizes m={m}, m_out={mo} must be multiples of 128 (m_out = 0 iff no outliers)"
    if o > 8:
        return f"{o} outlier channels > 8"
    if R + q.shape[2] > 1024:
        return f"residual window {R} + {q.shape[2]} query tokens > 1024 exact tokens (the combine's score table)"
    if vb not in (2, 4) or (D // 8) * vb // 8 not in (2, 4, 8) or vg % (D // 8):
        return f"value_bits={vb}, value_group={vg} at head_dim {D} (needs 2/4 bits and groups of >= {D // 8})"
    return ""


def stage_bytes(D, m, mo, vb, vg) -> int:
    """Shared memory of one 32-token group in the cp.async pipeline (ST_SIZE in qjl_decode.cu)."""
    return 32 * (m // 8) + 32 * (mo // 8) + 64 + 64 + 16 + 32 * (D * vb // 8) + 2 * 64 * (D // vg)


def dyn_smem(nw, stages, D, m, mo, o, vb, vg) -> int:
    """Dynamic shared memory of qjl_split: the stages of every warp, which the CTA's merge reuses
    for the warps' partial outputs (NW x 8 x D fp32) once the loop is done."""
    if not stages:
        return 0
    return max(nw * stages * stage_bytes(D, m, mo, vb, vg), nw * 8 * D * 4)


def _config(B, H, LC):
    """(warps per CTA, splits) from static shapes (CUDA-graph safe).

    H200 rows (benchmarks/results/attend-cuda-v5c.json, Llama-3-8B shape): with 8 kv heads, 32
    splits beat 16 and 64 at 32k (50 vs 57 / 62 us) and 128k (106 vs 142 / 113 us); with 128
    (batch x kv heads), 5 splits beat 16, 32 and 64 (213 vs 244 / 286 / 373 us at 16k).
    So: about 4 CTAs per SM of work, at most 32 splits, at least 128 tokens per split.
    """
    nw = 4
    nsplit = max(1, min(32, -(-4 * 132 // (B * H)), LC // (32 * nw)))
    return nw, nsplit


def split_plan(LC: int, nsplit: int, nw: int) -> tuple[int, int]:
    """(tokens per split, splits): chunks of whole 32-token groups per warp covering LC positions."""
    step = 32 * nw
    chunk = max(step, -(-(-(-LC // nsplit)) // step) * step)
    return chunk, max(1, -(-LC // chunk))


def qjl_attend_cuda(q, state, consts, k_new, v_new, attn_mask=None, is_causal=False, scale=None, meta=None,
                    nsplit=None, num_warps=None, min_blocks=None, sq_smem=None, stages=None, pack=None,
                    fma_shifts=None, pdl=None, stage_keys=None):
    """Fused QJL decode attention, CUDA C++ (semantics of kernels.reference.attend).

    Parameters
    ----------
    q : Tensor
        (B, Hq, Tq, D) fp16/bf16 on CUDA, Hq = G * H, G * Tq <= 8.
    state, consts, meta
        QJL layer state (kernels/reference.py), [S (m, D), S_out (m_out, D)] fp32, [0, R, L, o, vb, vg].
    k_new, v_new : Tensor
        (B, H, T, D) this step's tokens, attended exactly.
    attn_mask : Tensor, optional
        Bool (True = attend) or additive float, broadcastable to (B, Hq, Tq, L).
    is_causal : bool
        Without a mask, query i sees positions <= length - Tq + i.
    scale : float, optional
        Score scale, default 1/sqrt(D).
    nsplit, num_warps : int, optional
        Launch overrides (default `_config`).
    min_blocks : int, optional
        ``__launch_bounds__`` minimum resident CTAs per SM (caps registers; default MIN_BLOCKS).
    sq_smem : bool, optional
        Keep the S q fragments in shared memory (default) instead of registers.
    stages : int, optional
        Groups in flight per warp through shared memory (cp.async; 0 = plain loads; default STAGES).
    pack : bool, optional
        Both 8-bit planes of S q in one MMA operand (needs <= 4 query rows per kv head; default: when
        they are).
    fma_shifts : bool, optional
        Operand-building shifts as integer multiplies (FMA pipe) instead of SHF (ALU pipe); default
        FMA_SHIFTS.
    pdl : bool, optional
        Launch the split and the combine with programmatic dependent launch (each may start while the
        kernel before it runs; sm_90+); default `pdl_supported` (on, unless ``QJL_CUDA_PDL=0``).
    stage_keys : bool, optional
        The combine copies its first 136 exact keys into shared memory by cp.async, all in flight at once,
        before scoring them; default STAGE_KEYS (None: where the B * H * M
        combine CTAs fit one per SM).

    Returns
    -------
    Tensor
        (B, Hq, Tq, D) in q's dtype, laid out like ``torch.empty_like(q)``.

    Raises
    ------
    Unsupported
        With the reason, when the shapes/dtypes are outside what the kernel covers (`unsupported`).
    """
    B, H, R, D, L, m, mo, o, vb, vg, LC = check_qjl(state, consts, meta, "qjl_attend_cuda")
    q, k_new, v_new, Tq, T, G = check_attend(q, state, k_new, v_new, B, H, D, "qjl_attend_cuda")
    why = unsupported(q, state, consts, meta)
    if why:
        raise Unsupported(why)
    M = G * Tq
    if R + T > 1024:
        raise Unsupported(f"residual window {R} + {T} new tokens > 1024 exact tokens (the combine's score table)")
    if attn_mask is not None and attn_mask.is_floating_point() and attn_mask.dtype != torch.float32:
        attn_mask = attn_mask.float()        # the kernel reads fp32 additive masks (a copy of the unexpanded mask)
    kind, mt, ms = mask_args(attn_mask, q)
    nw, ns = _config(B, H, LC)
    nw = num_warps or nw
    ns = nsplit or ns
    chunk, ns = split_plan(LC, ns, nw)
    if ns > 1024:
        raise Unsupported(f"{ns} splits > 1024 (the combine's weight table); pass a smaller nsplit")
    causal = bool(is_causal) and attn_mask is None
    defines = dict(D=D, MS=m, MO=mo, NO=o, VB=vb, VG=vg, RR=R, NW=nw, QDT=int(q.dtype == torch.bfloat16),
                   MK=kind, CAUSAL=int(causal), CAUSAL_C=int(causal and T < Tq))
    defines["MINB"] = int(min_blocks or MIN_BLOCKS)
    pk = (M <= 4) if pack is None else bool(pack)
    if pk and M > 4:
        raise ValueError(f"pack=True needs <= 4 query rows per kv head, got {M}")
    defines["PK"] = int(pk)
    defines["FMAOFF"] = int(FMA_SHIFTS if fma_shifts is None else bool(fma_shifts))
    if sq_smem is not None:
        defines["SQ_SMEM"] = int(sq_smem)
    nst = STAGES if stages is None else int(stages)
    defines["STAGES"] = nst
    kst = STAGE_KEYS if stage_keys is None else bool(stage_keys)
    if kst is None:
        kst = B * H * M <= sm_count(q.device)
    defines["KST"] = int(kst)
    if TIMELINE:
        defines["TL"] = 1
    dyn = dyn_smem(nw, nst, D, m, mo, o, vb, vg)
    fns = module("qjl_decode", defines, KERNELS, q.device)
    _, scol, scsum, sig_s = sketch_planes(consts[0])
    srows = sketch_rows(consts[0])
    if mo:
        _, socol, socsum, sig_so = sketch_planes(consts[1])
    else:
        socol, socsum, sig_so = scol, scsum, 1.0
    BH = B * H
    dev = q.device
    nch = m // 32
    sqf = torch.empty(BH * nch * 32 * (8 if pk else 16), dtype=torch.uint8, device=dev)
    sqsum = torch.empty(BH * 8, dtype=torch.int32, device=dev)
    sqsig = torch.empty(BH * 8, dtype=torch.float32, device=dev)
    nslot = ns
    opart = torch.empty(BH * nslot * 8 * D, dtype=torch.float32, device=dev)
    lse = torch.empty(BH * nslot * 8, dtype=torch.float32, device=dev)
    out = torch.empty_like(q)
    stream = torch.cuda.current_stream(dev)
    P, I64, I32, F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_float
    launch(fns["qjl_prep"], (BH, nch), (256,),
           [P(q.data_ptr()), *(I64(s) for s in q.stride()[:3]), P(srows.data_ptr()),
            P(sqf.data_ptr()), P(sqsig.data_ptr()), I32(H), I32(G), I32(Tq), I32(M)], stream)
    rk, rv = state[1], state[2]
    sc = float(scale) if scale is not None else 1.0 / math.sqrt(D)
    a = _Args(q.data_ptr(), *q.stride()[:3], state[0].data_ptr(), rk.data_ptr(), rv.data_ptr(), *rk.stride()[:3],
              k_new.data_ptr(), v_new.data_ptr(), *k_new.stride()[:3],
              *(t.data_ptr() for t in state[3:11]),
              sqf.data_ptr(), sqsum.data_ptr(), sqsig.data_ptr(), scol.data_ptr(), scsum.data_ptr(),
              socol.data_ptr(), socsum.data_ptr(), mt.data_ptr(), *ms,
              opart.data_ptr(), lse.data_ptr(),
              sig_s, sig_so, sc * LOG2E, ref.qjl_const(m, D), ref.qjl_const(mo, D) if mo else 0.0,
              H, G, Tq, T, M, LC, chunk, ns, kind, int(causal))
    if dyn:
        allow_dynamic_smem(fns["qjl_split"], dyn)
    dep = pdl_supported(dev.index if dev.index is not None else torch.cuda.current_device()) if pdl is None else bool(pdl)
    launch(fns["qjl_split"], (BH, ns), (nw * 32,), [a], stream, shared=dyn, pdl=dep)
    csm = 136 * D * 2 if kst else 0                        # KST: the exact keys (decode_common.cuh CH_E rows)
    if csm:
        allow_dynamic_smem(fns["qjl_combine"], csm)
    launch(fns["qjl_combine"], (BH, M), (D,), [a, P(out.data_ptr()), *(I64(s) for s in out.stride()[:3])], stream,
           shared=csm, pdl=dep)
    return out
