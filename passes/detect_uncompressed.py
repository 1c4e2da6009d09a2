"""Detection pass: attention over an uncompressed Hugging Face cache. Reports, never rewrites.

Recognised (through the same GQA repeat / enable_gqa / contiguous chain the fusion pass peels):
- DynamicCache: the key is ``torch.cat([past_keys, new_keys], dim=-2)``;
- StaticCache: the key is a cache buffer written in place earlier in the graph by
  ``index_copy_`` (or, on devices without it, index assignment ``keys[:, :, pos] = ...``).
The first time one is found in a process, one warning names the fix (QJLCache /
``qjl_compile.compile``); each site is counted in ``counters["qjl"]["uncompressed_cache_attention"]``.

Attention over the exact sliding-window layers of a hybrid `QJLCache` (a ``StaticSlidingWindowLayer``,
whose buffers the graph receives as inputs) is not an uncompressed cache: it is left exact by design,
recorded as such on its site and counted in ``counters["qjl"]["sliding_exact"]``, never warned about.
"""
from __future__ import annotations

import logging
import operator
import warnings

import torch
from torch import fx

from .fx_utils import bind_sdpa, is_sdpa, layer_of, trace_kv
from .manager import PassContext, bump

log = logging.getLogger("qjl_compile.passes.detect_uncompressed")

_CAT = {torch.cat, torch.concat, torch.concatenate, torch.ops.aten.cat.default}
_INDEX_COPY = {"index_copy_", torch.Tensor.index_copy_, torch.ops.aten.index_copy_.default,
               torch.ops.aten.index_copy.default}
_SETITEM = {operator.setitem, "__setitem__", torch.Tensor.__setitem__, torch.ops.aten.index_put_.default,
            torch.ops.aten.index_put.default}

_EMPTY = {torch.tensor, torch.empty, torch.zeros}

_warned = False

MESSAGE = ("qjl backend: attention over an uncompressed Hugging Face {kind} was compiled over the "
           "full-precision cache ({n} site(s), first at layer {layer}). To store the cache compressed, pass "
           "{kw}=qjl_compile.QJLCache(model.config, max_cache_len=...) or use "
           "qjl_compile.compile(model) before generate().")


def reset_warning() -> None:
    """Let the next detection warn again (the warning is issued once per process)."""
    global _warned
    _warned = False


def _is(target, table) -> bool:
    try:
        return target in table
    except TypeError:
        return False


def _written_in_place(node: fx.Node) -> str | None:
    """'index_copy_' / 'setitem' if some node writes into `node` in place, else None."""
    for u in node.users:
        if u.op not in ("call_function", "call_method") or not u.args or u.args[0] is not node:
            continue
        if _is(u.target, _INDEX_COPY):
            return "index_copy_"
        if _is(u.target, _SETITEM):
            return "setitem"
    return None


def _root_input(node, depth: int = 8):
    """The graph input a key is read from (through first arguments: slices, cat's first part), or None."""
    cur = node
    for _ in range(depth):
        if not isinstance(cur, fx.Node):
            return None
        if cur.op in ("placeholder", "get_attr"):
            return cur
        if cur.op not in ("call_function", "call_method") or not cur.args:
            return None
        a0 = cur.args[0]
        cur = a0[0] if isinstance(a0, (list, tuple)) and a0 else a0
    return None


def is_qjl_sliding(src) -> bool:
    """True if the traced key source reads the buffer of a QJLCache sliding-window layer (kept exact)."""
    from ..cache import is_exact_buffer

    root = _root_input(src.base)
    if root is None or root.op != "placeholder":
        return False
    try:
        example = root.meta["grapharg"].example  # Dynamo's graph input: the real tensor
    except Exception:  # noqa: BLE001 - no grapharg (not a Dynamo graph) or its example is gone
        return False
    return is_exact_buffer(example)


SLIDING_NOTE = "sliding-window layer: kept exact by QJLCache (bounded at the window), by design"


def classify(src) -> str | None:
    """'DynamicCache (torch.cat)' / 'StaticCache (index_copy_)' / None for a traced key source."""
    b = src.base
    if b is None:
        return None
    if b.op == "call_function" and _is(b.target, _CAT):
        dim = b.args[1] if len(b.args) > 1 else b.kwargs.get("dim", 0)
        parts = b.args[0] if b.args else b.kwargs.get("tensors", ())
        # DynamicLayer: cat([stored keys (a graph input), new keys]); first step: stored = torch.tensor([])
        first = parts[0] if isinstance(parts, (list, tuple)) and len(parts) == 2 else None
        stored = isinstance(first, fx.Node) and (first.op in ("placeholder", "get_attr") or (
            first.op == "call_function" and _is(first.target, _EMPTY)))
        if dim in (-2, 2) and stored:
            return "DynamicCache (torch.cat)"
        return None
    how = _written_in_place(b)
    if how is not None:
        return f"StaticCache ({how})"
    return None


class DetectUncompressedCache:
    """Warn once per process about attention over DynamicCache/StaticCache; the graph is unchanged."""

    name = "detect_uncompressed_cache"

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> int:
        global _warned
        found = []
        for node in gm.graph.nodes:
            if not is_sdpa(node):
                continue
            a = bind_sdpa(node)
            src = trace_kv(a["key"])
            if is_qjl_sliding(src):
                site = ctx.site(node, layer_of(node))
                site.matched = "QJLCache sliding window (exact)"
                site.became = "unchanged (exact)"
                site.reason = SLIDING_NOTE
                bump("sliding_exact")
                log.debug("%s: %s attends over an exact QJLCache sliding layer (layer %s)", self.name, node.name,
                          site.layer)
                continue
            kind = classify(src)
            if kind is None:
                continue
            site = ctx.site(node, layer_of(node))
            site.matched = kind
            site.became = "unchanged"
            site.reason = "uncompressed HF cache: use QJLCache / qjl_compile.compile"
            bump("uncompressed_cache_attention")
            found.append((kind, site.layer))
            log.debug("%s: %s attends over %s (layer %s)", self.name, node.name, kind, site.layer)
        if found and not _warned:
            _warned = True
            kind, layer = found[0]
            from ..compat import cache_kwarg
            warnings.warn(MESSAGE.format(kind=kind, n=len(found), layer=layer, kw=cache_kwarg()), UserWarning,
                          stacklevel=2)
        return 0
