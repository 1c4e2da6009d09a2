"""Prefill over an empty HF StaticCache -> causal SDPA over the filled prefix (passes/causal_prefill.py).

Under torch.compile, transformers keeps the (B, 1, Tq, L) static-length mask for the first prefill
(its is_causal shortcut is off while tracing); the grouped_sdpa pass turns that chunk's attention into
`static_prefill_sdpa`, which takes ``is_causal=True`` over K/V[:Tq] when the mask is the empty-cache
causal one and the masked grouped SDPA otherwise. Compiled (qjl backend, aot_eager and eager lowerings)
logits against eager ones on tiny random Llama and Qwen2 models; padding and a later chunk must take
the masked path.
"""
import functools

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, StaticCache

from qjl_compile.backend import qjl_backend
from qjl_compile.compat import cache_kwargs
from qjl_compile.passes import causal_prefill
from qjl_compile.passes.fx_utils import is_sdpa

pytestmark = pytest.mark.usefixtures("fresh_dynamo")
PREFILL_OP = torch.ops.qjl_passes.static_prefill_sdpa.default
LAYERS, CAP, T = 2, 64, 24


def tiny(family):
    kw = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=LAYERS,
              num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=512)
    cfg = LlamaConfig(**kw) if family == "llama" else Qwen2Config(**kw)  # Qwen2: q/k/v biases
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = (LlamaForCausalLM if family == "llama" else Qwen2ForCausalLM)(cfg).eval()
    if family == "qwen2":
        with torch.no_grad():  # non-zero biases, so the family differs in more than its name
            for layer in model.model.layers:
                for p in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    p.bias.normal_(0, 0.5)
    return model


def compiled(model, lowering="aot_eager", graphs=None):
    def observer(stage, gm, ctx):
        if stage == "grouped_sdpa" and graphs is not None:
            graphs.append(gm)
    return torch.compile(model, backend=functools.partial(qjl_backend, options={"lowering": lowering},
                                                          observer=observer), fullgraph=True)


def prefill_then_chunk(model, step, ids, attention_mask=None):
    """Prefill T tokens into an empty StaticCache, then a 4-token chunk; logits of both calls.

    The cache is allocated before the call (as the e2e benchmark does): a lazily allocated one is created
    inside the traced forward, where transformers 5.24 already drops the mask of the first prefill."""
    cfg = model.config
    cache = StaticCache(config=cfg, max_cache_len=CAP)
    cache.early_initialization(ids.shape[0], cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads,
                               torch.float32, ids.device)
    extra = {} if attention_mask is None else {"attention_mask": attention_mask[:, :T]}
    a = step(ids[:, :T], **cache_kwargs(cache), **extra).logits
    extra = {} if attention_mask is None else {"attention_mask": attention_mask[:, : T + 4]}
    b = step(ids[:, T: T + 4], **cache_kwargs(cache), **extra).logits
    return torch.cat([a, b], 1)


@pytest.mark.parametrize("lowering", ["aot_eager", "eager"])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_empty_cache_prefill_is_causal_over_prefix(family, lowering):
    model = tiny(family)
    ids = torch.randint(0, 256, (2, T + 4), generator=torch.Generator().manual_seed(1))
    graphs = []
    with torch.no_grad():
        got = prefill_then_chunk(model, compiled(model, lowering, graphs), ids)
        ref = prefill_then_chunk(model, model, ids)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    # both graphs (the empty-cache prefill, the later chunk) call the op; at run time the first took the
    # causal prefix path in every layer, the chunk (cache not empty) the masked one
    assert len(graphs) == 2
    for gm in graphs:
        assert [n.target for n in gm.graph.nodes].count(PREFILL_OP) == LAYERS
        assert not any(is_sdpa(n) for n in gm.graph.nodes)
    assert counters["qjl"]["static_prefill_causal"] == LAYERS
    assert counters["qjl"]["static_prefill_masked"] == LAYERS


def test_padding_takes_the_masked_path():
    """Left padding: the mask of the first prefill is not the empty-cache causal one -> masked SDPA."""
    model = tiny("llama")
    ids = torch.randint(0, 256, (2, T + 4), generator=torch.Generator().manual_seed(2))
    am = torch.ones(2, T + 4, dtype=torch.long)
    am[1, :5] = 0
    with torch.no_grad():
        got = prefill_then_chunk(model, compiled(model), ids, am)
        ref = prefill_then_chunk(model, model, ids, am)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[1, 5:], ref[1, 5:], rtol=1e-4, atol=1e-4)  # rows of real tokens
    assert counters["qjl"]["static_prefill_causal"] == 0
    assert counters["qjl"]["static_prefill_masked"] == 2 * LAYERS


def test_off_setting_keeps_the_masked_form(monkeypatch):
    monkeypatch.setenv("QJL_GROUPED_PREFILL", "off")
    model = tiny("llama")
    ids = torch.randint(0, 256, (1, T + 4), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = prefill_then_chunk(model, compiled(model), ids)
        ref = prefill_then_chunk(model, model, ids)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert counters["qjl"]["grouped_sdpa_prefill"] == 0
    assert counters["qjl"]["grouped_sdpa_gqa"] == 2 * LAYERS
    monkeypatch.setenv("QJL_GROUPED_PREFILL", "fast")
    with pytest.raises(ValueError, match="auto"):
        causal_prefill.setting()


def test_mask_checked_once_per_forward(monkeypatch):
    """All layers share HF's mask: one check (one pass over the mask) per forward, not one per layer."""
    calls = []
    real = causal_prefill.is_causal_from_zero
    monkeypatch.setattr(causal_prefill, "is_causal_from_zero", lambda m, tq: calls.append(tq) or real(m, tq))
    model = tiny("llama")
    ids = torch.randint(0, 256, (1, T + 4), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        prefill_then_chunk(model, compiled(model, "eager"), ids)
    assert calls == [T, 4]
    assert counters["qjl"]["static_prefill_causal"] == LAYERS


# ----------------------------------------------------------------------------------------------
# the mask check on its own
def _causal(b, tq, L):
    return (torch.arange(L)[None, :] <= torch.arange(tq)[:, None]).expand(b, 1, tq, L)


@pytest.mark.parametrize("block_elems", [1 << 27, 50])  # one block; many row blocks
def test_mask_check(monkeypatch, block_elems):
    monkeypatch.setattr(causal_prefill, "_ROWS_ELEMS", block_elems)
    tq, L = 12, 40
    ok = _causal(2, tq, L)
    assert causal_prefill.is_causal_from_zero(ok, tq)
    assert causal_prefill.is_causal_from_zero(ok[:1], tq)
    for b, i, j in [(0, 0, 0), (1, 11, 11), (1, 3, 39), (0, 7, 8), (1, 11, 12), (0, 5, 2)]:
        bad = ok.clone()
        bad[b, 0, i, j] = ~bad[b, 0, i, j]
        assert not causal_prefill.is_causal_from_zero(bad, tq), (b, i, j)
    shifted = torch.arange(L)[None, :] <= torch.arange(tq)[:, None] + 3  # a later chunk (offset 3)
    assert not causal_prefill.is_causal_from_zero(shifted.view(1, 1, tq, L), tq)
    assert not causal_prefill.is_causal_from_zero(ok.float(), tq)       # a float mask: not checked
    assert not causal_prefill.is_causal_from_zero(ok[..., :1, :], tq)   # one row broadcast over Tq
    assert not causal_prefill.is_causal_from_zero(ok[..., : tq - 1], tq)  # fewer keys than queries


def test_op_matches_masked_sdpa():
    """The op against repeat_kv + masked SDPA, on the causal path and on the masked one."""
    g = torch.Generator().manual_seed(5)
    B, Hkv, G, L, D, tq = 2, 2, 3, 32, 16, 10
    q = torch.randn(B, Hkv * G, tq, D, generator=g)
    k, v = torch.randn(B, Hkv, L, D, generator=g), torch.randn(B, Hkv, L, D, generator=g)
    rk, rv = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    for mask, path in [(_causal(1, tq, L), "static_prefill_causal"),
                       (torch.arange(L)[None, :] <= torch.arange(tq)[:, None] + 5, "static_prefill_masked")]:
        mask = mask.reshape(-1, 1, tq, L)
        counters.clear()
        got = PREFILL_OP(q, k, v, mask, 0.3, G)
        ref = torch.nn.functional.scaled_dot_product_attention(q, rk, rv, attn_mask=mask, scale=0.3)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        assert counters["qjl"][path] == 1
