"""Rewrite pass: HF's uncompressed StaticCache attention -> grouped-query SDPA without the K/V copy.

Pattern (`pattern`: what HF's ``repeat_kv`` + ``sdpa_attention_forward`` trace to over a StaticCache)::

    keys.index_copy_(2, cache_position, k)                       # the static cache buffer, written in place
    K = keys[:, :, None].expand(B, Hkv, G, L, D).reshape(B, Hkv*G, L, D)    # a full copy per step
    out = scaled_dot_product_attention(q, K, V, attn_mask=mask, scale=s)   # mask (B|1, 1, Tq|1, L)

becomes one of two exact replacements (plain functions below, called from the graph):

* `grouped_sdpa_gqa`: ``sdpa(q, keys, values, attn_mask=mask, scale=s, enable_gqa=True)``, chosen where
  the installed torch runs a fused kernel for grouped heads with this mask on this device (probed once
  per configuration with ``torch._fused_sdp_choice`` on small tensors of the same dtypes / heads);
* `grouped_sdpa_rows`: the G query heads of a kv head as G query rows, ``q (B, Hq, 1, D) ->
  (B, Hkv, G, D)``, the same SDPA without GQA, the output viewed back to (B, Hq, 1, D). Exact for a
  decode step (Tq = 1) whose mask broadcasts over heads: every one of the G rows takes the same mask row.

Neither materialises the repeated (B, Hq, L, D) key/value. Guards (a failing one is recorded as the
site's reason and logged at debug level): key and value are the same G > 1 repeat of two buffers that
the graph writes in place (HF's StaticCache, as `detect_uncompressed.classify` recognises it), neither
sliced; dropout 0, no is_causal, constant flags; a mask whose shape broadcasts to (B, 1, Tq, L) (the
static-cache mask: one row per query position over the whole static length, the same for every head);
query heads Hkv * G. A prefill chunk (Tq > 1) where no fused kernel takes grouped heads is left as it
is (the rows form would need the mask repeated G times). A prefill chunk (Tq > 1, bool mask) where the
grouped form applies becomes `causal_prefill.static_prefill_sdpa` instead: per call, causal SDPA over the
filled prefix when the mask is that of an empty cache (HF's eager shortcut, which tracing disables), else
the masked grouped SDPA (``QJL_GROUPED_PREFILL=off`` keeps the masked form; see causal_prefill.py). Exact sliding-window layers of a QJLCache are
left to that cache's design. ``QJL_GROUPED_SDPA=auto|gqa|rows`` picks the form (default auto: gqa where
fused, else rows for decode). Counters: ``qjl/grouped_sdpa`` and ``qjl/grouped_sdpa_{gqa,rows,prefill}``.
"""
from __future__ import annotations

import functools
import logging
import os

import torch
import torch.nn.functional as F
from torch import fx

from . import causal_prefill
from .detect_uncompressed import classify, is_qjl_sliding
from .fx_utils import bind_sdpa, is_sdpa, layer_of, replace_call, same, shape, trace_kv, val
from .manager import PassContext, bump, erase_dead

log = logging.getLogger("qjl_compile.passes.grouped_sdpa")

FORMS = ("auto", "gqa", "rows")
BACKEND_NAMES = {0: "math", 1: "flash", 2: "efficient", 3: "cudnn", 4: "overrideable"}  # torch's SDPBackend
# ----------------------------------------------------------------------------------------------
# pattern and replacements (plain functions; the replacements are what the rewritten graph calls)
def pattern(q, keys, values, mask, scale, groups: int):
    """HF's attention over a StaticCache: repeat_kv (a copy of K/V per query head), then SDPA.

    q (B, Hkv*G, Tq, D); keys/values (B, Hkv, L, D); mask broadcasting to (B, 1, Tq, L).
    """
    B, H, L, D = keys.shape
    k = keys[:, :, None].expand(B, H, groups, L, D).reshape(B, H * groups, L, D)
    v = values[:, :, None].expand(B, H, groups, L, values.shape[-1]).reshape(B, H * groups, L, values.shape[-1])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def grouped_sdpa_gqa(q, keys, values, mask, scale):
    """SDPA with grouped heads (head j reads kv head j // G): (B, Hq, Tq, Dv), no K/V copy."""
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale, enable_gqa=True)


def grouped_sdpa_rows(q, keys, values, mask, scale, groups: int):
    """The G query heads of each kv head as G query rows (exact for Tq = 1 and a head-broadcast mask).

    q (B, Hkv*G, 1, D) -> (B, Hkv, G, D); SDPA over keys/values (B, Hkv, L, D) with the same mask
    (its single query row broadcasts over the G rows); out (B, Hkv, G, Dv) -> (B, Hkv*G, 1, Dv).
    """
    qg = q.unflatten(1, (-1, groups)).flatten(2, 3)
    out = F.scaled_dot_product_attention(qg, keys, values, attn_mask=mask, scale=scale)
    return out.unflatten(2, (groups, -1)).flatten(1, 2)


# ----------------------------------------------------------------------------------------------
def form_setting() -> str:
    f = os.environ.get("QJL_GROUPED_SDPA", "auto").strip().lower() or "auto"
    if f not in FORMS:
        raise ValueError(f"QJL_GROUPED_SDPA={f!r} is invalid: choose one of {FORMS}")
    return f


@functools.lru_cache(maxsize=None)
def fused_gqa_backend(device: str, dtype: torch.dtype, hq: int, hkv: int, d: int, dv: int, tq: int,
                      mask_dtype: torch.dtype) -> int:
    """The SDPA backend torch picks for grouped heads with a (1, 1, tq, 256) mask here (0 = math, the
    unfused one, which repeats K/V itself); probed once per configuration on small real tensors."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    try:
        with unset_fake_temporarily():  # real tensors even while a compile's fake mode is active
            return _probe(device, dtype, hq, hkv, d, dv, tq, mask_dtype)
    except Exception as e:  # noqa: BLE001 - an old torch without enable_gqa: treat as unfused
        log.debug("grouped_sdpa: probing enable_gqa on %s failed (%s); taking it as unfused", device, e)
        return 0


def _probe(device, dtype, hq, hkv, d, dv, tq, mask_dtype) -> int:
    q = torch.zeros(1, hq, tq, d, dtype=dtype, device=device)
    k = torch.zeros(1, hkv, 256, d, dtype=dtype, device=device)
    v = torch.zeros(1, hkv, 256, dv, dtype=dtype, device=device)
    m = torch.zeros(1, 1, tq, 256, dtype=mask_dtype, device=device)
    return int(torch._fused_sdp_choice(q, k, v, m, 0.0, False, scale=None, enable_gqa=True))


class GroupedSDPA:
    """repeat_kv + SDPA over an HF StaticCache -> grouped SDPA (counter ``qjl/grouped_sdpa``)."""

    name = "grouped_sdpa"

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> int:
        form = form_setting()
        changed = 0
        for node in list(gm.graph.nodes):
            if is_sdpa(node):
                changed += self._one(gm.graph, node, ctx, form)
        return changed

    def _skip(self, site, node, why: str) -> int:
        if site is not None:
            site.reason = f"{site.reason}; grouped SDPA: {why}" if site.reason else f"grouped SDPA: {why}"
        bump("grouped_sdpa_skipped")
        log.debug("%s: %s left alone: %s", self.name, node.name, why)
        return 0

    def _one(self, graph: fx.Graph, node: fx.Node, ctx: PassContext, form: str) -> int:
        a = bind_sdpa(node)
        ks, vs = trace_kv(a["key"]), trace_kv(a["value"])
        if ks.base is None or vs.base is None or ks.dequantize is not None or is_qjl_sliding(ks):
            return 0  # not an uncompressed HF cache (QJL sites are the fusion pass's)
        kind_k, kind_v = classify(ks), classify(vs)
        if not (kind_k or "").startswith("StaticCache"):
            return 0
        site = ctx.site(node, layer_of(node))
        if not ks.ok or not vs.ok:
            return self._skip(site, node, f"unrecognised key/value chain: {ks.why or vs.why}")
        if not (kind_v or "").startswith("StaticCache") or ks.base is vs.base:
            return self._skip(site, node, "value is not a second static cache buffer")
        if ks.groups != vs.groups:
            return self._skip(site, node, f"key repeated x{ks.groups} but value x{vs.groups}")
        G = ks.groups
        if G == 1:
            return self._skip(site, node, "no GQA repeat (nothing to remove)")
        if ks.slice_len is not None or vs.slice_len is not None:
            return self._skip(site, node, "key/value sliced to a prefix")
        for k in ("dropout_p", "is_causal", "enable_gqa"):
            if isinstance(a[k], fx.Node):
                return self._skip(site, node, f"{k} is a traced value, not a constant")
        if a["dropout_p"] != 0 or a["is_causal"] or a["enable_gqa"]:
            return self._skip(site, node, "dropout, is_causal or enable_gqa set (not HF's static-cache call)")
        q, mask = a["query"], a["attn_mask"]
        qs, kb, vb = shape(q), shape(ks.base), shape(vs.base)
        if qs is None or kb is None or vb is None or len(qs) != 4:
            return self._skip(site, node, "query/key/value have no 4-D fake values")
        B, H, L, D = kb
        if not isinstance(qs[1], int) or qs[1] != H * G or not same(qs[3], D) or not same(vb[2], L):
            return self._skip(site, node, f"query {tuple(qs)} does not map onto cache {tuple(kb)} x{G}")
        Tq = qs[2]
        ms = shape(mask) if isinstance(mask, fx.Node) else None
        if ms is None or not 1 <= len(ms) <= 4:
            return self._skip(site, node, "no static-cache mask (a tensor broadcasting to (B, 1, Tq, L))")
        want = (B, 1, Tq, L)[-len(ms):]
        if not all(same(m, w) or (same(m, 1) and i != len(ms) - 1) for i, (m, w) in enumerate(zip(ms, want))):
            return self._skip(site, node, f"mask {tuple(ms)} is not the static-cache mask (B|1, 1, Tq|1, L={L})")
        decode = isinstance(Tq, int) and Tq == 1
        qv, mv = val(q), val(mask)
        tq_probe = min(Tq, 64) if isinstance(Tq, int) else 16  # the kernel choice does not depend on Tq
        fused = fused_gqa_backend(str(qv.device), qv.dtype, qs[1], H, D, vb[3], tq_probe, mv.dtype)
        grouped = form == "gqa" or (form == "auto" and fused) or (form == "rows" and not decode and fused)
        if grouped and not decode and mv.dtype == torch.bool and causal_prefill.setting() == "auto":
            # a prefill chunk: causal SDPA over the filled prefix when the cache was empty (decided per call)
            target, how = torch.ops.qjl_passes.static_prefill_sdpa.default, "prefill"
            args = (q, ks.base, vs.base, mask, a["scale"], G)
        elif grouped:
            target, args, how = grouped_sdpa_gqa, (q, ks.base, vs.base, mask, a["scale"]), "gqa"
        elif decode:
            target, args, how = grouped_sdpa_rows, (q, ks.base, vs.base, mask, a["scale"], G), "rows"
        else:
            return self._skip(site, node, f"prefill chunk (Tq={Tq}) and no fused SDPA kernel takes grouped heads "
                                          f"with a mask on {qv.device} here (repeat_kv kept)")
        new = replace_call(graph, node, target, args, q)
        erased = erase_dead(graph, list(reversed(ks.chain)) + list(reversed(vs.chain)))
        site.matched = site.matched if site.matched != "-" else (kind_k or "StaticCache")
        picked = BACKEND_NAMES.get(fused, str(fused))
        site.became = f"grouped SDPA, {how} ({new.name}; torch's kernel for enable_gqa here: {picked})"
        bump("grouped_sdpa")
        bump(f"grouped_sdpa_{how}")
        bump(f"grouped_sdpa_probe_{picked}")
        log.debug("%s: %s -> %s %s (layer %s, G=%d, %d repeat nodes erased)", self.name, node.name, how, new.name,
                  site.layer, G, len(erased))
        return 1
