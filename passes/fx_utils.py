"""Small FX helpers shared by the passes: node predicates, argument binding, shape checks,
and the walk from an attention's key/value back to where the cache produced it.

The passes run on the graph Dynamo hands a backend (torch-level: ``torch._C._nn.scaled_dot_product_attention``,
``call_method`` expand/reshape, ``operator.getitem``), and also accept the aten spellings so they
can be reused on a pre-dispatch/aten graph.
"""
from __future__ import annotations

import inspect
import logging
import operator
import re
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import fx

_log = logging.getLogger("qjl_compile.passes")

aten = torch.ops.aten

# ----------------------------------------------------------------------------------------------
# predicates
# ----------------------------------------------------------------------------------------------
_SDPA_TARGETS = {torch._C._nn.scaled_dot_product_attention, torch.nn.functional.scaled_dot_product_attention}
_SDPA_ATEN = {aten.scaled_dot_product_attention.default}
_SDPA_NAMES = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}


def is_sdpa(node: fx.Node) -> bool:
    return node.op == "call_function" and (node.target in _SDPA_TARGETS or node.target in _SDPA_ATEN)


def is_qjl_op(node: Any, name: str) -> bool:
    """True if `node` calls ``torch.ops.qjl.<name>`` (packet or overload)."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    t = node.target
    if isinstance(t, torch._ops.OpOverloadPacket):
        return t._qualified_op_name == f"qjl::{name}"
    if isinstance(t, torch._ops.OpOverload):
        return t._schema.name == f"qjl::{name}"
    return False


def bind_sdpa(node: fx.Node) -> dict:
    """SDPA call -> {query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa}.

    torch's signature: (query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
    scale=None, enable_gqa=False); everything after `value` is keyword-only in the Python API
    but may be positional in an FX graph.
    """
    out = dict(_SDPA_DEFAULTS)
    pos = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    for name, a in zip(pos, node.args):
        out[name] = a
    out.update(node.kwargs)
    return out


def bind_op(node: fx.Node) -> dict:
    """Bind a qjl op call's args/kwargs to its schema's argument names."""
    t = node.target
    schema = (t.default if isinstance(t, torch._ops.OpOverloadPacket) else t)._schema
    names = [a.name for a in schema.arguments]
    out = dict(zip(names, node.args))
    out.update(node.kwargs)
    return out


def val(node: Any):
    """The fake value of a node: Dynamo graphs keep it in meta['example_value'], aten graphs in meta['val']."""
    if not isinstance(node, fx.Node):
        return node
    v = node.meta.get("val", None)
    if v is None:
        v = node.meta.get("example_value", None)
    return v


def shape(node: Any) -> Optional[tuple]:
    v = val(node)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def same(a, b) -> bool:
    """Sizes equal for sure (ints or SymInts)."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    try:
        from torch.fx.experimental.symbolic_shapes import statically_known_true
        return bool(statically_known_true(a == b))
    except Exception:  # pragma: no cover - very old torch
        return False


def same_shape(a, b) -> bool:
    return a is not None and b is not None and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))


_LAYER_RE = re.compile(r"layers\W*(?:_modules\W*)?(\d+)")


def layer_of(node: fx.Node) -> Optional[int]:
    """Index of the decoder layer a node was traced in (from nn_module_stack / names), if known."""
    stack = node.meta.get("nn_module_stack") or {}
    for key, v in reversed(list(stack.items())):
        path = v[0] if isinstance(v, tuple) else str(v)
        m = _LAYER_RE.search(str(path)) or _LAYER_RE.search(str(key))
        if m:
            return int(m.group(1))
    return None


def layer_of_state(node: fx.Node) -> Optional[int]:
    """Layer index from the name of a cache placeholder (e.g. l_kwargs_past_key_values_layers_3_state_0_)."""
    m = _LAYER_RE.search(node.name)
    return int(m.group(1)) if m else None


def describe(node: Any) -> str:
    if not isinstance(node, fx.Node):
        return repr(node)
    if node.op == "call_function":
        t = node.target
        name = getattr(t, "__name__", None) or str(t)
        if isinstance(t, (torch._ops.OpOverloadPacket, torch._ops.OpOverload)):
            name = str(t)
        return f"{name}"
    if node.op == "call_method":
        return f".{node.target}()"
    return f"{node.op} {node.name}"


# ----------------------------------------------------------------------------------------------
# key/value provenance: walk back through the repeat/view chain
# ----------------------------------------------------------------------------------------------
_IDENTITY_METHODS = {"contiguous", "clone", "detach"}
_IDENTITY_FUNCS = {torch.clone, torch.Tensor.contiguous, torch.Tensor.clone, torch.Tensor.detach, torch.detach,
                   aten.clone.default, aten.contiguous.default, aten.detach.default, aten.alias.default}
_EXPAND = {"expand", torch.Tensor.expand, aten.expand.default}
_RESHAPE = {"reshape", "view", torch.reshape, torch.Tensor.reshape, torch.Tensor.view,
            aten.reshape.default, aten.view.default, aten._unsafe_view.default}
_UNSQUEEZE = {"unsqueeze", torch.unsqueeze, torch.Tensor.unsqueeze, aten.unsqueeze.default}
_REPEAT_INTERLEAVE = {"repeat_interleave", torch.repeat_interleave, torch.Tensor.repeat_interleave,
                      aten.repeat_interleave.self_int}
_SLICE = {aten.slice.Tensor}


def _kind(node: fx.Node) -> Optional[str]:
    if node.op == "call_method":
        t = node.target
    elif node.op == "call_function":
        t = node.target
    else:
        return None
    try:
        if t in _IDENTITY_METHODS or t in _IDENTITY_FUNCS:
            return "identity"
        if t in _EXPAND:
            return "expand"
        if t in _RESHAPE:
            return "reshape"
        if t in _UNSQUEEZE:
            return "unsqueeze"
        if t in _REPEAT_INTERLEAVE:
            return "repeat_interleave"
        if t in _SLICE:
            return "slice"
    except TypeError:  # unhashable target
        return None
    if t is operator.getitem:
        return "getitem"
    return None


@dataclass
class KVSource:
    """Where an attention input comes from, once the repeat/view chain is peeled off."""
    base: Optional[fx.Node]            # first node that is not a view/repeat (getitem of dequantize, cat, ...)
    chain: list = field(default_factory=list)  # nodes between base (exclusive) and the attention (inclusive), base first
    groups: int = 1                    # GQA repeat factor G the chain applies (1 = none)
    slice_len: Any = None              # length kept by a dim-2 prefix slice (HF's empty-cache prefill), or None
    ok: bool = True                    # chain understood and shape-consistent
    why: str = ""                      # reason when not ok
    steps: list = field(default_factory=list)  # human-readable chain, base first

    @property
    def dequantize(self) -> Optional[fx.Node]:
        b = self.base
        if b is not None and b.op == "call_function" and b.target is operator.getitem and is_qjl_op(b.args[0], "dequantize"):
            return b.args[0]
        return None

    @property
    def output_index(self) -> Optional[int]:
        return self.base.args[1] if self.dequantize is not None else None


def _getitem_index_kind(node: fx.Node, in_shape) -> tuple[str, Any]:
    """Classify tensor indexing x[idx]: ('unsqueeze2', None), ('slice2', stop) or ('other', None)."""
    idx = node.args[1]
    if not isinstance(idx, tuple):
        idx = (idx,)
    full = slice(None, None, None)
    # drop trailing full slices / Ellipsis at the end
    items = list(idx)
    while items and (items[-1] == full or items[-1] is Ellipsis):
        items.pop()
    if len(items) == 3 and items[0] == full and items[1] == full and items[2] is None:
        return "unsqueeze2", None
    if len(items) == 3 and items[0] == full and items[1] == full and isinstance(items[2], slice):
        s = items[2]
        if s.start in (None, 0) and s.step in (None, 1):
            return "slice2", s.stop
    return "other", None


def trace_kv(node: Any, max_depth: int = 16) -> KVSource:
    """Peel HF's repeat_kv (x[:, :, None].expand(B, H, G, L, D).reshape(B, H*G, L, D)), repeat_interleave,
    contiguous/clone and the empty-cache prefill slice x[:, :, :Tq] off an attention input.

    The chain is validated on the fake shapes (meta), so only a real GQA repeat (head j reads kv
    head j // G) is accepted; anything else stops the walk and `ok` is False with a reason.
    """
    if not isinstance(node, fx.Node):
        return KVSource(None, ok=False, why=f"not a graph value: {node!r}")
    chain = []
    cur = node
    for _ in range(max_depth):
        k = _kind(cur)
        if k is None:
            break
        if k == "getitem":
            src = cur.args[0]
            if not isinstance(src, fx.Node) or not isinstance(val(src), torch.Tensor):
                break  # getitem of a tuple/list (e.g. dequantize's outputs): the base
        chain.append(cur)
        cur = cur.args[0]
        if not isinstance(cur, fx.Node):
            return KVSource(None, ok=False, why="chain input is not a graph value")
    chain.reverse()
    src = KVSource(cur, chain=chain)
    src.steps = [describe(n) for n in chain]
    # validate forward
    s = shape(cur)
    if s is None:
        src.ok, src.why = False, f"no fake value on {cur.name}"
        return src
    if len(s) != 4:
        src.ok, src.why = False, f"base {cur.name} is {len(s)}-D, expected (B, H, L, D)"
        return src
    B, H, L, D = s
    stage, G = 0, 1  # 0: 4-D, 1: 5-D unsqueezed at dim 2, 2: 5-D expanded
    for n in chain:
        k = _kind(n)
        out = shape(n)
        if out is None:
            src.ok, src.why = False, f"no fake value on {n.name}"
            return src
        if k == "identity":
            prev = shape(n.args[0])
            if not same_shape(prev, out):
                src.ok, src.why = False, f"{n.name} changes the shape"
                return src
            continue
        if k in ("getitem", "slice"):
            if k == "getitem":
                what, stop = _getitem_index_kind(n, shape(n.args[0]))
            else:
                dim = n.args[1] if len(n.args) > 1 else 0
                st = n.args[2] if len(n.args) > 2 else None
                step = n.args[4] if len(n.args) > 4 else 1
                what = "slice2" if dim in (2, -2) and st in (None, 0) and step == 1 else "other"
            if what == "unsqueeze2" and stage == 0 and G == 1 and same_shape(out, (B, H, 1, L, D)):
                stage = 1
                continue
            prev = shape(n.args[0])
            if what == "slice2" and stage == 0 and src.slice_len is None and len(out) == 4 \
                    and same(out[0], prev[0]) and same(out[1], prev[1]) and same(out[3], prev[3]):
                src.slice_len = out[2]
                continue
            src.ok, src.why = False, f"indexing {n.name} is not a GQA unsqueeze or a prefix slice of the sequence"
            return src
        if k == "unsqueeze":
            dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
            if dim in (2, -3) and stage == 0 and G == 1 and same_shape(out, (B, H, 1, L, D)):
                stage = 1
                continue
            src.ok, src.why = False, f"{n.name}: unsqueeze not at the head axis"
            return src
        if k == "expand":
            if stage == 1 and len(out) == 5 and same_shape((out[0], out[1], out[3], out[4]), (B, H, L, D)) \
                    and isinstance(out[2], int):
                stage, G = 2, out[2]
                continue
            src.ok, src.why = False, f"{n.name}: expand is not a GQA repeat"
            return src
        if k == "reshape":
            if stage == 2 and same_shape(out, (B, H * G, L, D)):
                stage = 0
                continue
            if stage == 0 and same_shape(out, shape(n.args[0])):
                continue
            src.ok, src.why = False, f"{n.name}: reshape is not the GQA head merge"
            return src
        if k == "repeat_interleave":
            reps = n.args[1] if len(n.args) > 1 else n.kwargs.get("repeats")
            dim = n.args[2] if len(n.args) > 2 else n.kwargs.get("dim")
            if stage == 0 and G == 1 and dim in (1, -3) and isinstance(reps, int) and same_shape(out, (B, H * reps, L, D)):
                G = reps
                continue
            src.ok, src.why = False, f"{n.name}: repeat_interleave is not over the head axis"
            return src
    if stage != 0:
        src.ok, src.why = False, "GQA repeat chain incomplete"
        return src
    src.groups = G
    return src


# ----------------------------------------------------------------------------------------------
# what an eager (matmul + softmax) attention does to the scores of dequantized keys
# ----------------------------------------------------------------------------------------------
_SOFTMAX = {"softmax", torch.softmax, torch.nn.functional.softmax, torch.Tensor.softmax, aten._softmax.default,
            aten.softmax.int}
_TANH = {"tanh", torch.tanh, torch.Tensor.tanh, aten.tanh.default}
_CAT = {torch.cat, torch.concat, torch.concatenate, aten.cat.default}


def _in(t, table) -> bool:
    try:
        return t in table
    except TypeError:
        return False


def score_features(dequantize: fx.Node, limit: int = 64) -> set[str]:
    """Walk forward from the keys of a ``qjl.dequantize`` (output 0) up to the softmax and name what the
    scores go through that ``qjl.attend`` cannot do: "softcap" (tanh on the scores: logit soft-capping,
    Gemma 2's attn_logit_softcapping) and "sinks" (a logit column concatenated to the scores before the
    softmax: gpt-oss's attention sinks). "eager" is always added when a softmax is reached (the attention
    is a matmul/softmax one, not SDPA). Empty if the keys reach no softmax within `limit` nodes."""
    keys = [u for u in dequantize.users if u.target is operator.getitem and len(u.args) > 1 and u.args[1] == 0]
    seen, todo, found = set(), list(keys), set()
    while todo and len(seen) < limit:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        t = n.target if n.op in ("call_function", "call_method") else None
        if t is not None and _in(t, _SOFTMAX):
            found.add("eager")
            continue  # the probabilities and everything after them are not the scores
        if t is not None and _in(t, _TANH):
            found.add("softcap")
        if t is not None and _in(t, _CAT):
            found.add("sinks")
        todo.extend(n.users)
    if "eager" not in found:
        return set()
    return found


_META_SKIP = ("source_fn_stack", "original_aten", "from_node")


def fake_call(target, args, like: fx.Node):
    """Run `target` on the fake values of `args` (for node.meta); None if that is not possible."""
    def to_val(a):
        if isinstance(a, fx.Node):
            return val(a)
        if isinstance(a, (list, tuple)):
            return type(a)(to_val(x) for x in a)
        return a

    fv = val(like)
    mode = getattr(fv, "fake_mode", None)
    if mode is None:
        return None
    try:
        with mode:
            return target(*[to_val(a) for a in args])
    except Exception as e:  # noqa: BLE001 - meta is best effort, the op's fake impl is tested elsewhere
        _log.debug("fake run of %s failed (%s); reusing the attention's meta", target, e)
        return None


def replace_call(graph: fx.Graph, node: fx.Node, target, args, like: fx.Node) -> fx.Node:
    """Put ``target(*args)`` where `node` was: its meta (the fake value recomputed from `like`'s fake
    mode where possible), all its uses; `node` is erased. Returns the new node."""
    with graph.inserting_before(node):
        new = graph.call_function(target, args)
    for k, v in node.meta.items():
        if k not in _META_SKIP:
            new.meta[k] = v
    fv = fake_call(target, args, like)
    if fv is not None:
        for k in ("val", "example_value"):
            if k in node.meta:
                new.meta[k] = fv
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    return new
