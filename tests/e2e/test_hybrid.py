"""Hybrid attention models (issue 18): QJLCache compresses the full-attention layers and keeps the
sliding-window ones exact (transformers' StaticSlidingWindowLayer); the backend rewrites only the
attentions over compressed layers, counts the sliding ones as intentionally exact, and leaves
attentions it cannot fuse (soft-capping, sinks) unrewritten with one warning naming why.

Tiny random configs (hidden 64, 4 q / 2 kv heads, head_dim 32, layers [sliding, full],
window 32). Prompt 24 < window: the sliding layers take the index_copy_ path first, and the decode
steps cross the window (roll path) and the compressed layers' first flush (R = 32). Eager = QJLCache
update (dequantized K/V) + the model's attention; compiled = the qjl backend, aot_eager lowering.
Same estimator both ways: measured max |diff| of the logits <= 1e-6; bound 2e-4 as in test_compile.
"""
import warnings

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import (Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, GptOssConfig,
                          GptOssForCausalLM, MistralConfig, Qwen2Config, Qwen2ForCausalLM)

import qjl_compile
from qjl_compile import QJLCache, QJLConfig, diagnostics
from qjl_compile.cache import QJLLayer, QJLSlidingLayer
from qjl_compile.compat import cache_kwargs

CFG = QJLConfig(sketch_dim=128, sketch_dim_initial=128, outlier_sketch_dim=64, outlier_sketch_dim_initial=64,
                residual=32)
TYPES = ["sliding_attention", "full_attention"]
W, PROMPT, STEPS, L = 32, 24, 10, 64
ATOL = 2e-4
COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=32, max_position_embeddings=512, sliding_window=W)


def _make(cls, cfg, impl):
    cfg._attn_implementation = impl
    torch.manual_seed(0)
    return cls(cfg).eval()


def gemma3(impl="sdpa"):
    # query_pre_attn_scalar != head_dim (the SDPA scale), per-layer RoPE (local 10k / global 1M theta)
    return _make(Gemma3ForCausalLM, Gemma3TextConfig(**COMMON, layer_types=TYPES, query_pre_attn_scalar=48), impl)


def gemma2(impl="eager", softcap=0.05):  # small: the tiny random scores are capped for real
    cfg = Gemma2Config(**COMMON, layer_types=TYPES, query_pre_attn_scalar=48, attn_logit_softcapping=softcap)
    return _make(Gemma2ForCausalLM, cfg, impl)


def qwen2(impl="sdpa"):
    c = {k: v for k, v in COMMON.items() if k != "head_dim"}  # head_dim = hidden / heads = 32
    cfg = Qwen2Config(**{**c, "num_attention_heads": 2, "num_key_value_heads": 1}, use_sliding_window=True,
                      max_window_layers=1)  # layers >= max_window_layers slide: [full, sliding]
    return _make(Qwen2ForCausalLM, cfg, impl)


def gptoss(impl="eager"):
    cfg = GptOssConfig(**{**COMMON, "intermediate_size": 64}, layer_types=TYPES, num_local_experts=4,
                       num_experts_per_tok=2)
    m = _make(GptOssForCausalLM, cfg, impl)
    with torch.no_grad():
        for mod in m.modules():
            if hasattr(mod, "sinks"):
                mod.sinks.normal_()  # random sinks, so dropping them would change the logits
    return m


def _tokens():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (1, PROMPT), generator=g), torch.randint(0, 256, (STEPS, 1, 1), generator=g)


def _run(model, fwd):
    ids, steps = _tokens()
    cache = QJLCache(model.config, max_cache_len=L, qjl_config=CFG)
    out = []
    with torch.no_grad():
        out.append(model(ids, **cache_kwargs(cache)).logits[:, -1:])
        for t in steps:
            out.append(fwd(t, **cache_kwargs(cache)).logits[:, -1:])
    return torch.cat(out, 1), cache


def _eager_vs_compiled(model):
    eager, _ = _run(model, model)
    diagnostics.reset()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        comp, cache = _run(model, torch.compile(model, backend="qjl", options={"lowering": "aot_eager"}))
    return eager, comp, cache, [str(x.message) for x in w if issubclass(x.category, UserWarning)]


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def test_hybrid_cache_layout_and_memory_by_layer_type():
    m = gemma3()
    cache = QJLCache(m.config, max_cache_len=256, qjl_config=CFG, batch_size=2, device="cpu", dtype=torch.bfloat16)
    assert [type(l) for l in cache.layers] == [QJLSlidingLayer, QJLLayer]
    assert [l.keys.shape for l in cache.sliding_layers] == [(2, 2, W, 32)]  # bounded at the window
    mem = cache.memory()
    full, sl = mem["by_type"]["full_attention"], mem["by_type"]["sliding_attention"]
    assert (full["layers"], sl["layers"], sl["window"]) == (1, 1, W)
    assert sl["allocated_bytes"] == sl["fp16_bytes"] == 2 * 2 * (2 * 2 * W * 32)  # K,V x bytes x B H W D
    assert sl["saved_bytes"] == 0
    assert full["fp16_bytes"] == 2 * 2 * (2 * 2 * 256 * 32) and full["saved_bytes"] > 0
    assert mem["allocated_bytes"] == full["allocated_bytes"] + sl["allocated_bytes"]
    assert mem["saved_bytes"] == full["saved_bytes"]
    assert mem["bits_per_value"] == pytest.approx(8 * full["allocated_bytes"] / (full["fp16_bytes"] / 2))


@pytest.mark.parametrize("family", ["gemma3", "qwen2"])
def test_hybrid_compiled_matches_eager_and_fuses_only_full_layers(family):
    model = {"gemma3": gemma3, "qwen2": qwen2}[family]()
    full = [i for i, t in enumerate(model.config.layer_types) if t == "full_attention"]
    eager, comp, cache, warned = _eager_vs_compiled(model)
    assert (comp - eager).abs().max().item() < ATOL
    c = counters["qjl"]
    assert c["fuse_attention"] == len(full) * c["graphs"] > 0     # every compressed layer, every graph
    assert c["sliding_exact"] == (len(TYPES) - len(full)) * c["graphs"]  # the rest: intentionally exact
    assert c["unfused"] == 0 and c["uncompressed_cache_attention"] == 0
    assert warned == [], warned  # neither "uncompressed cache" nor "not fused"
    # the sliding layers really slid: they hold the window's newest keys, exact
    assert all(l.cumulative_length_int == PROMPT + STEPS > W for l in cache.sliding_layers)


def test_the_scale_matters_here():
    """Gemma 3's query_pre_attn_scalar (48, head_dim 32) is the SDPA scale argument: with the default scale the
    logits differ, so the compiled-vs-eager match above shows the scale reaches qjl.attend."""
    a, b = gemma3(), gemma3()
    for mod in b.modules():
        if hasattr(mod, "scaling") and hasattr(mod, "q_proj"):
            assert mod.scaling == pytest.approx(48 ** -0.5)
            mod.scaling = 32 ** -0.5
    assert (_run(a, a)[0] - _run(b, b)[0]).abs().max().item() > 1e-3


@pytest.mark.parametrize("family,word", [("gemma2", "soft-capping"), ("gptoss", "sink")])
def test_unsupported_score_features_are_left_alone_and_said_once(family, word):
    model = {"gemma2": gemma2, "gptoss": gptoss}[family]()
    eager, comp, _, warned = _eager_vs_compiled(model)
    assert (comp - eager).abs().max().item() < ATOL  # correct (dequantized K/V), just not fused
    c = counters["qjl"]
    assert c["fuse_attention"] == 0 and c["uncompressed_cache_attention"] == 0 and c["unfused"] > 0
    ours = [w for w in warned if "not fused" in w]
    assert len(ours) == 1 and word in ours[0], warned  # once, naming the limitation
    assert not any("uncompressed" in w for w in warned)


def test_dropping_the_feature_would_be_visible():
    """The sinks and soft-capping matter on these tiny models, so a silent drop would fail the tests above."""
    for make, off in ((gemma2, lambda m: setattr(m.config, "attn_logit_softcapping", None)),
                      (gptoss, lambda m: [p.data.fill_(-1e4) for n, p in m.named_parameters() if "sinks" in n])):
        m = make()
        ref, _ = _run(m, m)
        off(m)
        for mod in m.modules():
            if hasattr(mod, "attn_logit_softcapping"):
                mod.attn_logit_softcapping = m.config.attn_logit_softcapping
        other, _ = _run(m, m)
        assert (ref - other).abs().max().item() > 1e-3


def _sdpa(cfg):
    cfg._attn_implementation = "sdpa"  # what transformers 5.17 picks for Gemma 2 (its SDPA drops the soft-cap)
    return cfg


@pytest.mark.parametrize("make,word", [
    (lambda: _sdpa(Gemma2Config(**COMMON, layer_types=TYPES, attn_logit_softcapping=50.0)), "soft-capping"),
    (lambda: _sdpa(GptOssConfig(**COMMON, layer_types=TYPES)), "sink"),
    (lambda: MistralConfig(**{**COMMON, "head_dim": None}), "every layer of this model is sliding"),
])
def test_refused_with_the_limitation_named(make, word):
    with pytest.raises(ValueError, match=word):
        QJLCache(make(), max_cache_len=L, qjl_config=CFG)


def test_qjl_compile_refuses_softcap_over_sdpa():
    m = gemma2()
    m.config._attn_implementation = "sdpa"
    with pytest.raises(ValueError, match="soft-capping"):
        qjl_compile.compile(m, CFG, options={"lowering": "aot_eager"})


def test_cache_for_another_layer_pattern_is_refused():
    cache = QJLCache(gemma3().config, max_cache_len=L, qjl_config=CFG)
    other = Gemma3TextConfig(**COMMON, layer_types=["full_attention", "sliding_attention"])
    with pytest.raises(ValueError, match="layer types"):
        cache.check_model(other)


@pytest.mark.parametrize("beams", [1, 2])
def test_qjl_compile_generate_on_a_hybrid_model(beams):
    """generate through qjl_compile.compile (compiled decode step) = generate over a QJLCache eagerly."""
    model = gemma3()
    ids, _ = _tokens()
    kw = dict(max_new_tokens=10, do_sample=False, num_beams=beams)
    with torch.no_grad():
        ref = model.generate(ids, **cache_kwargs(QJLCache(model.config, L, CFG, batch_size=beams, device="cpu",
                                                          dtype=torch.float32)), **kw)
    m = qjl_compile.compile(gemma3(), CFG, options={"lowering": "aot_eager"})
    diagnostics.reset()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        with torch.no_grad():
            out = m.generate(ids, **kw)
    assert torch.equal(out, ref)
    assert m._qjl_compile.compiled_calls == 9  # every decode step
    assert counters["qjl"]["fuse_attention"] > 0 and counters["qjl"]["sliding_exact"] > 0
    assert not [str(x.message) for x in w if issubclass(x.category, diagnostics.QJLFallbackWarning)
                or "uncompressed" in str(x.message)]
