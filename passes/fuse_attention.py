"""Central pass: scaled_dot_product_attention over the QJL cache -> ``qjl::attend``.

Pattern (what QJLLayer.update + HF's sdpa_attention_forward trace to)::

    qjl.append(state, consts, k, v, meta)                  # mutates the cache
    K, V = qjl.dequantize(state, consts, k, v, meta)       # (B, H, L, D) each
    K' = repeat_kv(K) | K | K[:, :, :Tq]                   # expand/reshape, enable_gqa, contiguous/clone
    out = scaled_dot_product_attention(q, K', V', attn_mask=..., scale=..., is_causal=...)

becomes ``out = qjl.attend(q, state, consts, k, v, attn_mask, is_causal, scale, meta)`` inserted at
the attention's position (after append: Inductor re-inplaces the mutating append only when no
read of the cache precedes it), and the dequantize and repeat nodes are erased once dead, so the
full-precision (B, H, L, D) key/value is never materialized.

Guards (each failing one is logged at debug level and recorded as the site's reason):
key and value are outputs 0 and 1 of the same dequantize, through the same GQA repeat; dropout
0; the query's heads are a multiple of the cache's; and the mask semantics match ``attend``:
either a mask over the static length L (HF's static-cache mask, which hides positions >= length),
or no mask with is_causal and the key sliced to the query length (HF's empty-cache prefill
shortcut, where length == Tq). An SDPA with no mask over the whole static length would attend to
empty slots, which ``attend`` never does, so it is left alone.
"""
from __future__ import annotations

import logging

import torch
from torch import fx

from .fx_utils import bind_op, bind_sdpa, is_sdpa, layer_of, layer_of_state, replace_call, same, shape, trace_kv, val
from .manager import PassContext, bump, erase_dead

log = logging.getLogger("qjl_compile.passes.fuse_attention")

class FuseQJLAttention:
    """SDPA over ``qjl.dequantize`` outputs -> ``qjl.attend`` (counter ``qjl/fuse_attention``)."""

    name = "fuse_qjl_attention"

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> int:
        graph = gm.graph
        changed = 0
        for node in list(graph.nodes):
            if not is_sdpa(node):
                continue
            changed += self._one(graph, node, ctx)
        return changed

    # ------------------------------------------------------------------------------------------
    def _skip(self, site, node, why: str) -> int:
        site.reason = why
        bump("fuse_attention_skipped")
        log.debug("%s: attention %s (layer %s) left alone: %s", self.name, node.name, site.layer, why)
        return 0

    def _one(self, graph: fx.Graph, node: fx.Node, ctx: PassContext) -> int:
        a = bind_sdpa(node)
        ks, vs = trace_kv(a["key"]), trace_kv(a["value"])
        kd, vd = ks.dequantize, vs.dequantize
        if kd is None and vd is None:
            # not ours; the detection pass may still recognise an uncompressed HF cache here
            site = ctx.site(node, layer_of(node))
            site.reason = site.reason or "key/value do not come from qjl.dequantize"
            log.debug("%s: %s not fed by the QJL cache (key from %s)", self.name, node.name,
                      ks.base.name if ks.base is not None else "?")
            return 0
        layer = layer_of(node)
        if layer is None:
            st = bind_op(kd or vd).get("state")
            if isinstance(st, (list, tuple)) and st and isinstance(st[0], fx.Node):
                layer = layer_of_state(st[0])
        site = ctx.site(node, layer)
        site.matched = self._describe(ks, a)
        site.source = (kd or vd).name
        if not ks.ok or not vs.ok:
            return self._skip(site, node, f"unrecognised key/value chain: {ks.why or vs.why}")
        if kd is not vd:
            return self._skip(site, node, "key and value come from different dequantize calls (or only one from the cache)")
        if ks.output_index != 0 or vs.output_index != 1:
            return self._skip(site, node, "key/value are not dequantize outputs 0/1 in that order")
        if ks.groups != vs.groups:
            return self._skip(site, node, f"key repeated x{ks.groups} but value x{vs.groups}")
        if (ks.slice_len is None) != (vs.slice_len is None) or (
                ks.slice_len is not None and not same(ks.slice_len, vs.slice_len)):
            return self._skip(site, node, "key and value sliced differently")
        for k in ("dropout_p", "is_causal", "enable_gqa"):
            if isinstance(a[k], fx.Node):
                return self._skip(site, node, f"{k} is a traced value, not a constant")
        if a["dropout_p"] != 0:
            return self._skip(site, node, f"dropout_p={a['dropout_p']} (the fused op has no dropout)")
        sc = a["scale"]
        if isinstance(sc, fx.Node):
            # dynamic=True turns module float attributes into graph inputs (x.item() -> SymFloat)
            if not isinstance(val(sc), (float, torch.SymFloat)):
                return self._skip(site, node, f"scale {sc.name} is a traced non-float value")
        elif sc is not None and not isinstance(sc, (int, float)):
            return self._skip(site, node, f"scale {sc!r} is not a number")

        q = a["query"]
        qs, base = shape(q), shape(ks.base)
        if qs is None or base is None or len(qs) != 4:
            return self._skip(site, node, "query has no 4-D fake value")
        B, H, L, D = base
        Hk = H * ks.groups
        if not isinstance(qs[1], int) or qs[1] % H or (not a["enable_gqa"] and qs[1] != Hk) or qs[1] % Hk:
            return self._skip(site, node, f"query heads {qs[1]} do not map onto {H} cache heads x{ks.groups}")
        if not same(qs[3], D):
            return self._skip(site, node, f"query head_dim {qs[3]} != cache head_dim {D}")

        mask, is_causal = a["attn_mask"], bool(a["is_causal"])
        if ks.slice_len is not None:
            if mask is not None or not is_causal:
                return self._skip(site, node, "key sliced to a prefix but the attention is not mask-free causal")
            if not same(ks.slice_len, qs[2]):
                return self._skip(site, node, "key sliced to a length other than the query's")
        elif mask is None:
            return self._skip(site, node, "no mask over the full static length: SDPA would attend to empty "
                                          "cache slots (the fused op attends only to stored tokens)")
        else:
            if is_causal:
                return self._skip(site, node, "both attn_mask and is_causal set")
            ms = shape(mask)
            if ms is None or len(ms) > 4 or len(ms) < 1:
                return self._skip(site, node, "mask has no fake value or is not <= 4-D")
            want = (B, qs[1], qs[2], L)[-len(ms):]
            if not all(same(m, 1) or same(m, w) for m, w in zip(ms, want)):
                return self._skip(site, node, f"mask shape {tuple(ms)} does not broadcast to (B, Hq, Tq, L={L})")

        d = bind_op(kd)
        args = (q, d["state"], d["consts"], d["k_new"], d["v_new"], mask, is_causal, a["scale"], d["meta"])
        target = torch.ops.qjl.attend.default
        new = replace_call(graph, node, target, args, q)
        erased = erase_dead(graph, list(reversed(ks.chain)) + list(reversed(vs.chain)) + [ks.base, vs.base, kd])
        if kd not in erased:
            site.reason = "rewritten; dequantize kept: it has other users"
            bump("dequantize_kept")
            log.debug("%s: %s rewritten but %s still has users %s", self.name, new.name, kd.name, list(kd.users))
        else:
            bump("dequantize_erased")
        bump("fuse_attention")
        site.became = f"qjl.attend ({new.name})"
        log.debug("%s: %s -> %s (layer %s, %d dead nodes erased)", self.name, node.name, new.name, layer,
                  len(erased))
        return 1

    @staticmethod
    def _describe(ks, a) -> str:
        parts = ["qjl.dequantize"]
        if ks.groups > 1:
            parts.append(f"repeat_kv x{ks.groups}")
        if a["enable_gqa"] is True:
            parts.append("enable_gqa")
        if ks.slice_len is not None:
            parts.append("prefix slice (empty-cache prefill)")
        parts.append("mask" if a["attn_mask"] is not None else ("causal" if a["is_causal"] is True else "no mask"))
        return " + ".join(parts)
