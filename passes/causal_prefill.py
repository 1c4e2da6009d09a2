"""Prefill over an empty HF StaticCache: causal SDPA over the filled prefix instead of the static-length mask.

Why (issue 16, time to first token): under torch.compile, transformers never drops the causal mask
(``masking_utils._ignore_causal_mask_sdpa`` returns False while tracing), so every compiled prefill
chunk calls SDPA with a bool mask of shape (B|1, 1, Tq, L) over the whole static capacity L, and
``is_causal=False``. HF's *eager* prefill of the same empty cache drops the mask and calls
``sdpa(q, K[:, :, :Tq], V[:, :, :Tq], is_causal=True, enable_gqa=True)``
(``integrations/sdpa_attention.py``), which runs the flash kernel and skips the masked half. The
masked call cannot use flash (no attn_mask there), computes all Tq x L scores (2x the causal work
at L ~ Tq) and streams the mask: at a 32k prompt that is most of the 2x TTFT gap.

Whether the cache was empty is a runtime fact (the offset is the cache's ``cumulative_length``
tensor), so the rewrite is `static_prefill_sdpa`, an opaque op that decides per call:

* the mask is exactly "key j visible to query row i iff j <= i" for every batch row (an empty cache,
  no padding) -> ``sdpa(q, K[:, :, :Tq], V[:, :, :Tq], is_causal=True, enable_gqa=True)``, exact:
  the keys it drops are masked out in every row, and causal upper-left alignment equals the mask;
* anything else (a later chunk, padding, a float mask) -> the masked grouped SDPA, as before.

The check reads the mask once (in row blocks, one host sync) and is remembered for the same mask
tensor (all layers of a forward share HF's mask), so it costs one pass over the mask per forward.
Inside CUDA-graph capture no host sync is allowed: the masked path runs there (warned once).
``QJL_GROUPED_PREFILL=auto|off`` (default auto; off keeps the masked form, for A/B measurements).
Runtime counters: ``qjl/static_prefill_causal`` and ``qjl/static_prefill_masked`` (calls).
"""
from __future__ import annotations

import os
import weakref
from typing import Optional

import torch
import torch.nn.functional as F

SETTINGS = ("auto", "off")
_ROWS_ELEMS = 1 << 27  # mask elements compared per block (bounds the temporaries to ~256 MB)


def setting() -> str:
    s = os.environ.get("QJL_GROUPED_PREFILL", "auto").strip().lower() or "auto"
    if s not in SETTINGS:
        raise ValueError(f"QJL_GROUPED_PREFILL={s!r} is invalid: choose one of {SETTINGS}")
    return s


def is_causal_from_zero(mask: torch.Tensor, tq: int) -> bool:
    """True iff the bool `mask` (..., Tq, L) shows query row i exactly the keys 0..i, in every leading index.

    That is HF's static-cache mask of a prefill into an empty cache without padding. One host sync.
    """
    if mask.dtype != torch.bool or mask.dim() < 2 or mask.shape[-2] != tq or mask.shape[-1] < tq:
        return False
    L = mask.shape[-1]
    kv = torch.arange(L, device=mask.device)
    bad = torch.zeros((), dtype=torch.bool, device=mask.device)
    step = max(1, _ROWS_ELEMS // max(L, 1))
    for r0 in range(0, tq, step):
        rows = torch.arange(r0, min(tq, r0 + step), device=mask.device)
        bad |= (mask[..., r0: r0 + len(rows), :] != (kv[None, :] <= rows[:, None])).any()
    return not bool(bad)


_memo: dict = {}  # the last mask checked: {"ref": weakref, "key": (version, shape, stride, ptr), "ok": bool}


def _causal_memo(mask: torch.Tensor, tq: int) -> bool:
    key = (mask._version, tuple(mask.shape), tuple(mask.stride()), mask.data_ptr(), tq)
    ref = _memo.get("ref")
    if ref is not None and ref() is mask and _memo.get("key") == key:
        return _memo["ok"]
    ok = is_causal_from_zero(mask, tq)
    try:
        _memo.update(ref=weakref.ref(mask), key=key, ok=ok)
    except TypeError:  # a tensor type without weak references: no memo
        _memo.clear()
    return ok


def _capturing(t: torch.Tensor) -> bool:
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def _bump(name: str) -> None:
    from torch._dynamo.utils import counters
    counters["qjl"][name] += 1


@torch.library.custom_op("qjl_passes::static_prefill_sdpa", mutates_args=())
def static_prefill_sdpa(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                        scale: Optional[float], groups: int) -> torch.Tensor:
    """Grouped SDPA of a prefill chunk over a static cache; causal over the prefix when the cache was empty.

    Parameters
    ----------
    q : (B, Hkv*G, Tq, D) queries.
    keys, values : (B, Hkv, L, D) / (B, Hkv, L, Dv) the static cache buffers (this chunk already written).
    mask : bool (B|1, 1, Tq, L) HF's static-cache mask (True = visible).
    scale : the softmax scale (None: 1/sqrt(D)).
    groups : G, query heads per kv head.

    Returns
    -------
    (B, Hkv*G, Tq, Dv), equal to ``sdpa(q, repeat_kv(keys), repeat_kv(values), attn_mask=mask, scale=scale)``.
    """
    tq = q.shape[2]
    if _capturing(q):
        from qjl_compile.diagnostics import warn_once
        warn_once("grouped_prefill:capture", (
            "qjl backend: a prefill chunk over a StaticCache runs inside CUDA-graph capture, where the empty-cache "
            "check (a host sync) is not allowed: it runs the masked SDPA over the whole static length (correct, "
            "slower). Fix: run the prefill without CUDA graphs (it is one call per prompt)."))
        out = None
    elif tq <= keys.shape[2] and _causal_memo(mask, tq):
        _bump("static_prefill_causal")
        out = F.scaled_dot_product_attention(q, keys[:, :, :tq], values[:, :, :tq], is_causal=True, scale=scale,
                                             enable_gqa=groups > 1)
    else:
        out = None
    if out is None:
        _bump("static_prefill_masked")
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale, enable_gqa=groups > 1)
    return out.contiguous()  # the layout the fake promises (flash returns a (B, Tq, H, D)-strided view)


@static_prefill_sdpa.register_fake
def _(q, keys, values, mask, scale, groups):
    return q.new_empty(*q.shape[:-1], values.shape[-1])
