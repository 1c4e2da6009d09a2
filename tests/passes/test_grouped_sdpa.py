"""repeat_kv + SDPA over an HF StaticCache -> grouped SDPA without the K/V copy (passes/grouped_sdpa.py).

Compiled (qjl backend, aot_eager lowering) logits against eager ones on tiny random Llama models with
GQA groups 1, 2, 4, both replacement forms, and the patterns that must not be rewritten.
"""
import functools

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters
from transformers import LlamaConfig, LlamaForCausalLM, StaticCache

from qjl_compile.backend import qjl_backend
from qjl_compile.compat import cache_kwargs
from qjl_compile.passes import grouped_sdpa
from qjl_compile.passes.fx_utils import is_sdpa, shape

pytestmark = pytest.mark.usefixtures("fresh_dynamo")
PREFILL_OP = torch.ops.qjl_passes.static_prefill_sdpa.default

HEADS, LAYERS, CAP = 4, 2, 64


def tiny(kv_heads):
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=LAYERS,
                      num_attention_heads=HEADS, num_key_value_heads=kv_heads, max_position_embeddings=512)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


class Graphs:
    """Observer keeping every graph after the last pass."""

    def __init__(self):
        self.gms = []

    def __call__(self, stage, gm, ctx):
        if stage == "grouped_sdpa":
            self.gms.append((gm, dict(ctx.sites)))


def run_steps(model, step, ids, n_decode=3):
    """Prefill 8 tokens (empty cache), a 4-token chunk (mask over the static length), then decode."""
    cache = StaticCache(config=model.config, max_cache_len=CAP)
    outs = [step(ids[:, :8], **cache_kwargs(cache)).logits[:, -1:], step(ids[:, 8:12], **cache_kwargs(cache)).logits]
    tok = outs[-1][:, -1:].argmax(-1)
    for _ in range(n_decode):
        lg = step(tok, **cache_kwargs(cache)).logits
        outs.append(lg)
        tok = lg[:, -1:].argmax(-1)
    return torch.cat(outs, 1)


def compiled_vs_eager(kv_heads, batch=1):
    model = tiny(kv_heads)
    ids = torch.randint(0, 256, (batch, 12), generator=torch.Generator().manual_seed(1))
    obs = Graphs()
    step = torch.compile(model, backend=functools.partial(qjl_backend, options={"lowering": "aot_eager"},
                                                          observer=obs), fullgraph=True)
    with torch.no_grad():
        got = run_steps(model, step, ids)
        ref = run_steps(model, model, ids)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    return obs


def _targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("kv_heads", [4, 2, 1])  # GQA groups 1, 2, 4
def test_hf_static_cache_logits_match_eager(kv_heads):
    obs = compiled_vs_eager(kv_heads)
    groups = HEADS // kv_heads
    # graphs: empty-cache prefill, the masked chunk, the decode step (recompiles once for Tq=1)
    assert len(obs.gms) == 3
    if groups == 1:
        assert counters["qjl"]["grouped_sdpa"] == 0  # MHA: HF repeats nothing, nothing to remove
        return
    # the masked chunk and the decode step are rewritten; the empty-cache prefill too where HF repeats K/V there
    # (transformers 5.17; 5.24 already calls SDPA with enable_gqa and no mask on an empty cache)
    n = counters["qjl"]["grouped_sdpa"]
    assert n in (2 * LAYERS, 3 * LAYERS)
    # CPU: the fused kernel takes grouped heads; decode -> gqa, prefill chunks -> the per-call causal/masked op
    assert counters["qjl"]["grouped_sdpa_gqa"] == LAYERS and counters["qjl"]["grouped_sdpa_prefill"] == n - LAYERS
    # at run time: the masked 4-token chunk (cache not empty) took the masked path in every layer
    assert counters["qjl"]["static_prefill_masked"] == LAYERS
    assert counters["qjl"]["static_prefill_causal"] == (LAYERS if n == 3 * LAYERS else 0)
    for gm, _ in obs.gms:  # no K/V repeat left anywhere: nothing 5-D (repeat_kv's (B, Hkv, G, L, D) expand)
        assert not [n for n in gm.graph.nodes if len(shape(n) or ()) == 5]
    (chunk_gm, chunk_sites), (decode_gm, decode_sites) = obs.gms[1:]
    assert _targets(chunk_gm).count(PREFILL_OP) == LAYERS and not any(is_sdpa(n) for n in chunk_gm.graph.nodes)
    assert all(s.became.startswith("grouped SDPA, prefill") for s in chunk_sites.values())
    assert _targets(decode_gm).count(grouped_sdpa.grouped_sdpa_gqa) == LAYERS
    assert not any(is_sdpa(n) for n in decode_gm.graph.nodes)
    assert all(s.became.startswith("grouped SDPA, gqa") for s in decode_sites.values())


def test_rows_form_and_unfused_prefill(monkeypatch):
    """QJL_GROUPED_SDPA=rows: the decode step as G query rows per kv head; with no fused grouped kernel
    the masked prefill chunk keeps its repeat (the rows form needs Tq = 1)."""
    monkeypatch.setenv("QJL_GROUPED_SDPA", "rows")
    monkeypatch.setattr(grouped_sdpa, "fused_gqa_backend", lambda *a: 0)
    obs = compiled_vs_eager(1, batch=2)  # G = 4
    assert counters["qjl"]["grouped_sdpa_rows"] == LAYERS and counters["qjl"]["grouped_sdpa_gqa"] == 0
    chunk_gm, chunk_sites = obs.gms[1]
    assert sum(is_sdpa(n) for n in chunk_gm.graph.nodes) == LAYERS
    assert all("no fused SDPA kernel takes grouped heads" in s.reason for s in chunk_sites.values())
    decode_gm, _ = obs.gms[2]
    assert _targets(decode_gm).count(grouped_sdpa.grouped_sdpa_rows) == LAYERS


def test_bad_form_setting(monkeypatch):
    monkeypatch.setenv("QJL_GROUPED_SDPA", "fast")
    with pytest.raises(ValueError, match="auto"):
        grouped_sdpa.form_setting()


# ----------------------------------------------------------------------------------------------
# the pattern on its own: which masks / repeats match
B, HKV, G, L, D = 2, 2, 4, 32, 16


def _static_step(mask_kind):
    def f(keys, values, k, v, q, pos, mask):
        keys.index_copy_(2, pos, k)
        values.index_copy_(2, pos, v)
        if mask_kind == "causal":
            kk = keys[:, :, None].expand(B, HKV, G, L, D).reshape(B, HKV * G, L, D)
            vv = values[:, :, None].expand(B, HKV, G, L, D).reshape(B, HKV * G, L, D)
            return F.scaled_dot_product_attention(q, kk, vv, is_causal=True)
        if mask_kind == "mha":
            return F.scaled_dot_product_attention(q[:, :HKV], keys, values, attn_mask=mask)
        return grouped_sdpa.pattern(q, keys, values, mask, None, G)
    return f


def _inputs(mask_shape):
    g = torch.Generator().manual_seed(0)
    keys, values = torch.randn(B, HKV, L, D, generator=g), torch.randn(B, HKV, L, D, generator=g)
    k, v = torch.randn(B, HKV, 1, D, generator=g), torch.randn(B, HKV, 1, D, generator=g)
    q = torch.randn(B, HKV * G, 1, D, generator=g)
    pos = torch.tensor([20])
    mask = torch.arange(L).expand(*mask_shape[:-1], L) <= 20
    mask = mask & (torch.rand(mask_shape, generator=g) > 0.2)  # values need not be a prefix: the rewrite is exact
    return keys, values, k, v, q, pos, mask


@pytest.mark.parametrize("mask_shape,mask_kind,rewritten", [
    ((B, 1, 1, L), "mask", True),           # HF's static-cache decode mask
    ((1, 1, 1, L), "mask", True),           # broadcast over the batch
    ((B, HKV * G, 1, L), "mask", False),    # a mask per head: not the static-cache mask
    ((B, 1, 1, L), "causal", False),        # no mask, is_causal over the whole static length
    ((B, 1, 1, L), "mha", False),           # no repeat
])
@pytest.mark.parametrize("form", ["auto", "rows"])
def test_pattern_guards(monkeypatch, mask_shape, mask_kind, rewritten, form):
    monkeypatch.setenv("QJL_GROUPED_SDPA", form)
    f = _static_step(mask_kind)
    inp = _inputs(mask_shape)
    ref = f(*[x.clone() for x in inp])
    obs = Graphs()
    got = torch.compile(f, backend=functools.partial(qjl_backend, options={"lowering": "aot_eager"}, observer=obs),
                        fullgraph=True)(*[x.clone() for x in inp])
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert counters["qjl"]["grouped_sdpa"] == int(rewritten)
    if rewritten:
        assert counters["qjl"][f"grouped_sdpa_{'gqa' if form == 'auto' else 'rows'}"] == 1
    elif mask_kind == "mask":
        (gm, sites), = obs.gms
        assert any("not the static-cache mask" in s.reason for s in sites.values())


def test_computed_kv_not_a_cache():
    """A repeat of computed tensors (no buffer written in place) is not HF's cache: left alone."""
    q, k, v = torch.randn(1, 4, 1, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    m = torch.ones(1, 1, 1, 6, dtype=torch.bool)
    f = functools.partial(grouped_sdpa.pattern, groups=2)
    out = torch.compile(lambda *a: f(*a), backend="qjl", options={"lowering": "aot_eager"}, fullgraph=True)(
        q, k * 2, v, m, None)
    torch.testing.assert_close(out, f(q, k * 2, v, m, None))
    assert counters["qjl"]["grouped_sdpa"] == 0
