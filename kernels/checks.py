"""Input checks shared by every attend launcher (Triton and CUDA C++); no triton import here."""
from __future__ import annotations

import contextlib
import warnings

import torch

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def mask_args(attn_mask, q):
    """(kind, tensor, strides) of an attention mask for the attend kernels, without copying it.

    kind: 0 none, 1 bool (True = attend), 2 additive float, 3 / 4 the same with one value per
    position shared by every query row (decode with HF's (B, 1, 1, L) mask): loaded once per tile
    of positions instead of once per (row, position). Broadcast dims get stride 0; a bool mask is
    reinterpreted as uint8 (a view), never materialized at (B, Hq, Tq, L).
    """
    B, Hq, Tq = q.shape[0], q.shape[1], q.shape[2]
    if attn_mask is None:
        return 0, q, (0, 0, 0, 0)
    if attn_mask.device != q.device:
        raise ValueError(f"attend: attn_mask on {attn_mask.device}, q on {q.device}")
    am = attn_mask.view(torch.uint8) if attn_mask.dtype == torch.bool else attn_mask
    while am.dim() < 4:
        am = am.unsqueeze(0)
    am = am.expand(B, Hq, Tq, am.shape[-1])
    ms = tuple(am.stride())
    if am.shape[-1] == 1:
        ms = ms[:3] + (0,)
    kind = 1 if attn_mask.dtype == torch.bool else 2
    if ms[1] == 0 and (Tq == 1 or ms[2] == 0):
        kind += 2
    return kind, am, ms


def check_attend(q, state, k_new, v_new, B, H, D, what):
    """Shared checks of an attend launcher's inputs; returns (q, k_new, v_new, Tq, T, G) with q and
    the new tokens made contiguous in D."""
    if q.dim() != 4 or q.shape[0] != B or q.shape[-1] != D or q.shape[1] % H:
        raise ValueError(f"{what}: q must be (B={B}, Hq, Tq, D={D}) with Hq a multiple of H={H}, "
                         f"got {tuple(q.shape)}")
    if q.dtype not in DTYPES or k_new.dtype != state[1].dtype or v_new.dtype != state[1].dtype:
        raise ValueError(f"{what}: q dtype {q.dtype} must be fp16/bf16/fp32 and k_new/v_new match the "
                         f"ring's {state[1].dtype}")
    if k_new.shape != v_new.shape or k_new.dim() != 4 or tuple(k_new.shape[:2]) != (B, H) or k_new.shape[3] != D:
        raise ValueError(f"{what}: k_new/v_new must be (B={B}, H={H}, T, D={D}), got "
                         f"{tuple(k_new.shape)} / {tuple(v_new.shape)}")
    rk, rv = state[1], state[2]
    if rk.stride(-1) != 1 or rk.stride() != rv.stride():
        raise ValueError(f"{what}: ring buffers must be contiguous in D and share strides")
    q = q if q.stride(-1) == 1 else q.contiguous()
    if k_new.stride(-1) != 1 or v_new.stride() != k_new.stride():
        k_new, v_new = k_new.contiguous(), v_new.contiguous()
    return q, k_new, v_new, q.shape[2], k_new.shape[2], q.shape[1] // H


def qjl_center(meta) -> bool:
    """True if a QJL meta asks for key centering (7th entry = R; QJLConfig.qjl_center). Old
    6-entry metas are plain QJL."""
    return len(meta) > 6 and int(meta[6]) != 0


def qjl_key_fit(meta) -> int:
    """QJLConfig.qjl_key_scale of a QJL meta (10th entry): 0 unbiased, 1 match, 2 lsq (only append reads it)."""
    return int(meta[9]) if len(meta) > 9 else 0


def check_qjl(state, consts, meta, what):
    """Shared checks of a QJL layer state; returns (B, H, R, D, L, m, mo, o, vb, vg, LC)."""
    if int(meta[0]) != 0:
        raise NotImplementedError(f"{what}: this is the QJL (codec 0) kernel, got codec {meta[0]} "
                                  "(kernels/triton KERNELS dispatches by codec)")
    if len(meta) > 8 and int(meta[8]):
        raise NotImplementedError(f"{what}: rotation-coded values (QJLConfig.qjl_value_codec='rotation') are "
                                  "implemented in the reference (CPU) codec only; the fused kernels decode min/max values")
    if len(meta) > 7 and int(meta[7]):
        raise NotImplementedError(f"{what}: exact outlier channels (QJLConfig.qjl_exact_outliers) are implemented in "
                                  "the reference (CPU) codec only; the fused kernels sketch the outlier channels")
    if not 6 <= len(meta) <= 10 or (len(meta) > 6 and int(meta[6]) not in (0, int(meta[1]))) or (
            len(meta) > 9 and int(meta[9]) not in (0, 1, 2)):
        raise ValueError(f"{what}: QJL meta must be [0, R, L, o, value_bits, value_group] or the same + [center(, "
                         f"exact, value_rotation, key_scale)] (center = 0 or R: QJLConfig.qjl_center; key_scale 0-2: "
                         f"QJLConfig.qjl_key_scale), got {list(meta)}")
    center = qjl_center(meta)
    if len(state) != 11 + center or len(consts) != 2:
        raise ValueError(f"{what}: QJL state has {11 + center} tensors and consts 2, got {len(state)} and {len(consts)}")
    _, R, L, o, vb, vg = (int(x) for x in meta[:6])
    rk = state[1]
    B, H, Rr, D = rk.shape
    m, mo = consts[0].shape[0], consts[1].shape[0]
    if Rr != R or R % 32:
        raise ValueError(f"{what}: ring has {Rr} slots but meta R={R} (must match, multiple of 32)")
    if D % 16 or D > 256 or D % vg or vg < 8 or vg & (vg - 1):
        raise ValueError(f"{what}: head_dim={D} must be a multiple of 16 <= 256 and divisible by "
                         f"value_group={vg} (a power of two >= 8)")
    if m % 8 or m < 16 or mo % 8 or (mo and mo < 16) or vb not in (2, 4, 8) or o > min(D - 1, 64):
        raise ValueError(f"{what}: need m, m_out multiples of 8 (>= 16 or m_out=0), value_bits in "
                         f"(2, 4, 8), o < head_dim; got m={m}, m_out={mo}, value_bits={vb}, o={o}")
    if consts[0].shape[1] != D or consts[1].shape[-1] != D and mo:
        raise ValueError(f"{what}: sketches must be (m, {D}), got {tuple(consts[0].shape)} / {tuple(consts[1].shape)}")
    LC = L // R * R
    expect = [(B, H, LC, m // 8), (B, H, LC), (B, H, LC, mo // 8), (B, H, LC), (B, H, LC // 32, o),
              (B, H, LC, D * vb // 8), (B, H, LC, D // vg), (B, H, LC, D // vg)]
    if center:
        expect.append((B, H, LC // R, D))          # kmean: one mean key per block
    for i, (tns, shp) in enumerate(zip(state[3:], expect)):
        if tuple(tns.shape) != shp or not tns.is_contiguous():
            raise ValueError(f"{what}: state[{i + 3}] must be contiguous {shp}, got {tuple(tns.shape)} "
                             f"(contiguous={tns.is_contiguous()})")
    if state[2].shape != rk.shape or state[0].numel() != 1:
        raise ValueError(f"{what}: state[0] must be a scalar length and state[2] match state[1]")
    return B, H, R, D, L, m, mo, o, vb, vg, LC


_PREPARING = [False]
_LATE_WARNED = [False]
LATE_CONSTANTS = (
    "qjl: a cache layer's derived kernel constants are being built by its first fused call, not when the layer "
    "was allocated: the layer was allocated while torch.compile traced (a QJLCache made without batch_size and "
    "device, first filled by a compiled forward). Without CUDA graphs that only costs this one build; under CUDA "
    "graphs (mode='reduce-overhead') the build lands in the graph's memory pool and fails (\"tensor(s) in the "
    "cudagraph pool not tracked as outputs\"), and so would the cache's own buffers. Fix: allocate the layers up "
    "front, QJLCache(config, max_cache_len, qjl_config, batch_size=B, device=..., dtype=...), as "
    "qjl_compile.compile's generate does.")


@contextlib.contextmanager
def preparing():
    """Around `kernels.triton.prepare`: the derived-constant caches it fills miss by design there."""
    old, _PREPARING[0] = _PREPARING[0], True
    try:
        yield
    finally:
        _PREPARING[0] = old


def late_constants(device) -> None:
    """A derived-constant cache missed: say once (`LATE_CONSTANTS`) when that was outside `preparing`
    on CUDA, where the miss may sit in a CUDA-graph warm-up."""
    if device.type == "cuda" and not _PREPARING[0] and not _LATE_WARNED[0]:
        _LATE_WARNED[0] = True
        warnings.warn(LATE_CONSTANTS, stacklevel=3)
