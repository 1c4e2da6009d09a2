"""The SDPA-over-dequantize -> qjl.attend rewrite, on graph level (passes only, eager lowering).

Each case compiles a small function or the tiny Llama with the `qjl` backend and lowering
"eager" (the rewritten Dynamo graph runs as is), checks what the pass did to the graph, and
compares the result with the uncompiled function (the same reference ops, so float rounding only).
"""
import functools
import operator
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters
from transformers import LlamaConfig, LlamaForCausalLM

from qjl_compile import QJLCache, QJLConfig
from qjl_compile.backend import qjl_backend
from qjl_compile.cache import QJLLayer
from qjl_compile.passes.fx_utils import is_qjl_op, is_sdpa, val
from qjl_compile import diagnostics
from qjl_compile.compat import cache_kwargs
from qjl_compile.diagnostics import QJLFallbackWarning

CFG = QJLConfig(sketch_dim=128, sketch_dim_initial=128, outlier_sketch_dim=64, outlier_sketch_dim_initial=64,
                residual=32)
D, H, L = 64, 2, 96


def tiny(layers=2, heads=4, kv=2):
    cfg = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=512)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


class Capture:
    """Backend = qjl passes + eager lowering; keeps every graph after the passes."""

    def __init__(self):
        self.graphs = []

    def observer(self, stage, gm, ctx):
        if stage == "detect_uncompressed_cache":
            self.graphs.append((gm, dict(ctx.sites)))

    @property
    def backend(self):
        return functools.partial(qjl_backend, options={"lowering": "eager"}, observer=self.observer)


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def _layer(T0=40, B=1):
    """A filled QJLLayer (T0 tokens, > R so part is compressed) and fresh k, v for one more step."""
    torch.manual_seed(1)
    layer = QJLLayer(CFG, 0, L, D)
    k0, v0 = torch.randn(B, H, T0, D), torch.randn(B, H, T0, D)
    layer.update(k0, v0)
    return layer


def _mask(n, Tq, B=1):
    """HF-style bool mask over the static length: query i sees positions <= n - Tq + i."""
    pos = torch.arange(L)
    qpos = n - Tq + torch.arange(Tq)
    return (pos[None, :] <= qpos[:, None]).expand(B, 1, Tq, L)


def repeat_kv(x, g):
    b, h, s, d = x.shape
    return x[:, :, None, :, :].expand(b, h, g, s, d).reshape(b, h * g, s, d)


def _run_both(fn, make_layer, *args):
    """(eager result, compiled result, capture) on two identically filled layers."""
    ref = fn(make_layer(), *args)
    cap = Capture()
    got = torch.compile(fn, backend=cap.backend, fullgraph=True)(make_layer(), *args)
    return ref, got, cap


def _ops(gm, name):
    return [n for n in gm.graph.nodes if is_qjl_op(n, name)]


# ----------------------------------------------------------------------------------------------
# patterns that must be rewritten
# ----------------------------------------------------------------------------------------------
def _repeat(layer, q, k, v, mask):
    K, V = layer.update(k, v)
    return F.scaled_dot_product_attention(q, repeat_kv(K, 2), repeat_kv(V, 2), attn_mask=mask, scale=0.3)


def _enable_gqa(layer, q, k, v, mask):
    K, V = layer.update(k, v)
    return F.scaled_dot_product_attention(q, K, V, attn_mask=mask, enable_gqa=True)


def _repeat_interleave_contiguous(layer, q, k, v, mask):
    K, V = layer.update(k, v)
    K = K.repeat_interleave(2, dim=1).contiguous()
    V = V.repeat_interleave(2, dim=1).contiguous()
    return F.scaled_dot_product_attention(q, K, V, attn_mask=mask)


def _float_mask_no_gqa(layer, q, k, v, mask):
    K, V = layer.update(k, v)
    fmask = torch.zeros(mask.shape, dtype=q.dtype).masked_fill(~mask, float("-inf"))
    return F.scaled_dot_product_attention(q[:, :H], K.clone(), V, attn_mask=fmask)


def _prefill_prefix_slice(layer, q, k, v, mask):
    # HF's empty-cache prefill: no mask, is_causal, key/value sliced to the query length
    K, V = layer.update(k, v)
    T = q.shape[2]
    return F.scaled_dot_product_attention(q, K[:, :, :T], V[:, :, :T], is_causal=True, enable_gqa=True)


@pytest.mark.parametrize("fn,Tq", [(_repeat, 1), (_repeat, 5), (_enable_gqa, 1), (_repeat_interleave_contiguous, 3),
                                   (_float_mask_no_gqa, 1)])
def test_rewritten_and_equal(fn, Tq):
    torch.manual_seed(2)
    q = torch.randn(1, 2 * H, Tq, D)
    k, v = torch.randn(1, H, Tq, D), torch.randn(1, H, Tq, D)
    mask = _mask(40 + Tq, Tq)
    ref, got, cap = _run_both(fn, _layer, q, k, v, mask)
    (gm, sites), = cap.graphs
    assert counters["qjl"]["fuse_attention"] == 1
    assert not _ops(gm, "dequantize") and len(_ops(gm, "attend")) == 1
    assert not any(is_sdpa(n) for n in gm.graph.nodes)
    # nothing of the cache's full (.., L, D) shape is materialized any more
    assert not any(isinstance(val(n), torch.Tensor) and val(n).dim() >= 4 and val(n).shape[-2] == L
                   for n in gm.graph.nodes if n.op != "placeholder")
    # attend sits after append (Inductor keeps the mutating append in place only then)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    assert order[_ops(gm, "attend")[0]] > order[_ops(gm, "append")[0]]
    att = _ops(gm, "attend")[0]
    assert tuple(val(att).shape) == tuple(ref.shape)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert [s.became.split()[0] for s in sites.values()] == ["qjl.attend"]


def test_prefill_prefix_slice_on_empty_cache():
    torch.manual_seed(3)
    T = 40
    q = torch.randn(1, 2 * H, T, D)
    k, v = torch.randn(1, H, T, D), torch.randn(1, H, T, D)

    def empty():
        layer = QJLLayer(CFG, 0, L, D)
        layer.lazy_initialization(k, v)
        return layer

    ref, got, cap = _run_both(_prefill_prefix_slice, empty, q, k, v, None)
    assert counters["qjl"]["fuse_attention"] == 1
    (gm, sites), = cap.graphs
    assert "prefix slice" in next(iter(sites.values())).matched
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# patterns that must be left alone
# ----------------------------------------------------------------------------------------------
def _no_mask_full_length(layer, q, k, v, mask):
    K, V = layer.update(k, v)
    return F.scaled_dot_product_attention(q, repeat_kv(K, 2), repeat_kv(V, 2))


def _swapped(layer, q, k, v, mask):
    K, V = layer.update(k, v)
    return F.scaled_dot_product_attention(q, repeat_kv(V, 2), repeat_kv(K, 2), attn_mask=mask)


def _head_permuted(layer, q, k, v, mask):
    K, V = layer.update(k, v)
    # tile instead of interleave: head j reads kv head j % H, not j // G
    return F.scaled_dot_product_attention(q, K.repeat(1, 2, 1, 1), V.repeat(1, 2, 1, 1), attn_mask=mask)


def _not_from_cache(layer, q, k, v, mask):
    layer.update(k, v)
    kk = torch.randn(1, 2 * H, L, D)
    return F.scaled_dot_product_attention(q, kk, kk, attn_mask=mask)


@pytest.mark.parametrize("fn,why", [(_no_mask_full_length, "no mask"), (_swapped, "outputs 0/1"),
                                    (_head_permuted, "do not come from qjl.dequantize"),
                                    (_not_from_cache, "do not come from qjl.dequantize")])
def test_left_alone(fn, why):
    import re

    torch.manual_seed(4)
    q = torch.randn(1, 2 * H, 1, D)
    k, v = torch.randn(1, H, 1, D), torch.randn(1, H, 1, D)
    cap = Capture()
    diagnostics.reset()
    with pytest.warns(QJLFallbackWarning, match="attention over a QJLCache is not fused.*Fix: "):
        torch.compile(fn, backend=cap.backend, fullgraph=True)(_layer(), q, k, v, _mask(41, 1))
    (gm, sites), = cap.graphs
    assert counters["qjl"]["fuse_attention"] == 0 and counters["qjl"]["unfused"] == 1
    assert not _ops(gm, "attend") and sum(is_sdpa(n) for n in gm.graph.nodes) == 1
    reasons = " ".join(s.reason for s in sites.values())
    assert re.search(why, reasons), reasons


def test_dropout_left_alone():
    q = torch.randn(1, 2 * H, 1, D)
    k, v = torch.randn(1, H, 1, D), torch.randn(1, H, 1, D)

    def f(layer, q, k, v, mask):
        K, V = layer.update(k, v)
        return F.scaled_dot_product_attention(q, repeat_kv(K, 2), repeat_kv(V, 2), attn_mask=mask, dropout_p=0.1)

    cap = Capture()
    diagnostics.reset()
    with pytest.warns(QJLFallbackWarning, match=r"dropout_p=0.1.*Fix: call model.eval\(\)"):
        torch.compile(f, backend=cap.backend, fullgraph=True)(_layer(), q, k, v, _mask(41, 1))
    (gm, sites), = cap.graphs
    assert counters["qjl"]["fuse_attention"] == 0
    assert "dropout" in next(iter(sites.values())).reason


def test_dequantize_kept_when_used_elsewhere():
    q = torch.randn(1, 2 * H, 1, D)
    k, v = torch.randn(1, H, 1, D), torch.randn(1, H, 1, D)

    def f(layer, q, k, v, mask):
        K, V = layer.update(k, v)
        return F.scaled_dot_product_attention(q, repeat_kv(K, 2), repeat_kv(V, 2), attn_mask=mask), K.sum()

    ref = f(_layer(), q, k, v, _mask(41, 1))
    cap = Capture()
    diagnostics.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("error", QJLFallbackWarning)  # the attention is fused: nothing to warn about
        got = torch.compile(f, backend=cap.backend, fullgraph=True)(_layer(), q, k, v, _mask(41, 1))
    (gm, sites), = cap.graphs
    assert counters["qjl"]["fuse_attention"] == 1 and counters["qjl"]["dequantize_kept"] == 1
    assert counters["qjl"]["unfused"] == 0
    assert len(_ops(gm, "dequantize")) == 1
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# the tiny Llama: every layer rewritten, decode graph free of (B, H, L, D) K/V
# ----------------------------------------------------------------------------------------------
def test_llama_decode_graph_every_layer():
    model = tiny(layers=3)
    ids = torch.randint(0, 256, (2, 40))
    cache = QJLCache(model.config, max_cache_len=L, qjl_config=CFG)
    cap = Capture()
    step = torch.compile(model, backend=cap.backend, fullgraph=True)
    with torch.no_grad():
        model(ids, **cache_kwargs(cache))
        step(ids[:, :1], **cache_kwargs(cache))
    (gm, sites), = cap.graphs
    assert counters["qjl"]["fuse_attention"] == 3
    assert len(_ops(gm, "attend")) == 3 and len(_ops(gm, "append")) == 3 and not _ops(gm, "dequantize")
    assert sorted(s.layer for s in sites.values()) == [0, 1, 2]
    for n in gm.graph.nodes:
        v = val(n)
        if n.op != "placeholder" and isinstance(v, torch.Tensor) and v.dim() == 4:
            assert v.shape[2] != L, f"{n.name} has the cache's full length: {tuple(v.shape)}"
        if n.op == "call_function" and n.target is operator.getitem and is_qjl_op(n.args[0], "dequantize"):
            raise AssertionError("dequantize output left in the graph")
