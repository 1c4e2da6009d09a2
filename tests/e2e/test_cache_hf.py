"""QJLCache inside Hugging Face Llama: forward, decode loop, generate, refusals, memory report."""
import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from qjl_compile import QJLCache, QJLConfig
from qjl_compile.compat import cache_kwargs

HUGE = QJLConfig(sketch_dim=8192, sketch_dim_initial=8192, outlier_sketch_dim=4096,
                 outlier_sketch_dim_initial=4096, value_bits=8, residual=32)


def tiny(layers=2, heads=4, kv=2, hidden=256, **kw):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=1024, **kw)
    return LlamaForCausalLM(cfg).eval()


def decode(model, cache, ids, steps):
    """Prefill then greedy decode driven by the fp16 reference tokens; returns per-step logits."""
    out = []
    with torch.no_grad():
        logits = model(ids, **cache_kwargs(cache)).logits[:, -1:]
        out.append(logits)
        for t in steps:
            out.append(model(t, **cache_kwargs(cache)).logits[:, -1:])
    return torch.cat(out, 1)


@pytest.mark.parametrize("kv", [1, 2, 4])
def test_logits_close_to_fp16_cache(kv):
    model = tiny(kv=kv)
    ids = torch.randint(0, 256, (2, 45))
    ref_cache = DynamicCache(config=model.config)
    with torch.no_grad():
        ref0 = model(ids, **cache_kwargs(ref_cache)).logits[:, -1:]
        steps, cur = [], ref0.argmax(-1)
        for _ in range(24):  # crosses the R=32 flush boundary
            steps.append(cur)
            cur = model(cur, **cache_kwargs(ref_cache)).logits[:, -1:].argmax(-1)
    ref_logits = decode(model, DynamicCache(config=model.config), ids, steps)
    tight = decode(model, QJLCache(model.config, 128, HUGE), ids, steps)
    loose = decode(model, QJLCache(model.config, 128, QJLConfig.for_model(model.config, residual=32)), ids, steps)
    scale = ref_logits.abs().max()
    # huge sketch (m = 128 d) and 8-bit values: the estimator is nearly exact
    assert (tight - ref_logits).abs().max() < 0.02 * scale
    # reference preset: measured max |diff| ~ 0.1-0.2 of the logit range on this random model
    assert (loose - ref_logits).abs().max() < 0.5 * scale
    assert (tight - ref_logits).abs().max() < (loose - ref_logits).abs().max()


def test_prefill_is_exact():
    model = tiny()
    ids = torch.randint(0, 256, (1, 100))  # longer than R: stored compressed, attended exactly
    with torch.no_grad():
        a = model(ids, **cache_kwargs(QJLCache(model.config, 128, QJLConfig(residual=32)))).logits
        b = model(ids, **cache_kwargs(DynamicCache(config=model.config))).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_generate_and_reuse_after_reset():
    model = tiny()
    ids = torch.randint(0, 256, (1, 20))
    cache = QJLCache(model.config, 64, HUGE)
    kw = dict(max_new_tokens=12, do_sample=False, attention_mask=torch.ones_like(ids))
    a = model.generate(ids, **cache_kwargs(cache), **kw)
    ref = model.generate(ids, **kw)
    assert torch.equal(a, ref)
    cache.reset()
    assert int(cache.get_seq_length()) == 0
    b = model.generate(ids, **cache_kwargs(cache), **kw)
    assert torch.equal(a, b)


def test_generate_to_exactly_max_cache_len_then_overflow():
    model = tiny()
    ids = torch.randint(0, 256, (1, 20))
    cache = QJLCache(model.config, 32, QJLConfig(residual=32))
    out = model.generate(ids, **cache_kwargs(cache), max_new_tokens=13, do_sample=False,
                         attention_mask=torch.ones_like(ids))
    assert out.shape[1] == 33 and int(cache.get_seq_length()) == 32  # last token is not fed back
    with torch.no_grad(), pytest.raises(ValueError, match="max_cache_len=32"):
        model(out[:, -1:], **cache_kwargs(cache))
        model(out[:, -1:], **cache_kwargs(cache))


def test_memory_report_counts_buffers():
    model = tiny(layers=1, kv=2, hidden=256)  # head_dim 64
    cfg = QJLConfig(sketch_dim=128, sketch_dim_initial=128, outliers=8, outlier_sketch_dim=64,
                    outlier_sketch_dim_initial=64, value_bits=2, residual=128)
    cache = QJLCache(model.config, 4096, cfg, batch_size=1, device="cpu", dtype=torch.float16)
    mem = cache.memory()
    # per token and kv head: 16 B inlier bits + 8 B outlier bits + 2 + 2 B norms + 8/32 B indices
    assert mem["k_bits"] == pytest.approx((16 + 8 + 4 + 8 / 32) * 8 / 64)
    # 2-bit codes + fp16 scale and zero per 32 channels
    assert mem["v_bits"] == pytest.approx(2 + 2 * 16 / 32)
    assert mem["fp16_bytes"] == 2 * 2 * 4096 * 64 * 2
    assert 3.5 < mem["ratio"] < 4.2 and mem["allocated_bytes"] < mem["fp16_bytes"]


def test_refuses_all_sliding_other_layer_types_and_encoder_decoder():
    # hybrid full/sliding configs are served (tests/e2e/test_hybrid.py); these are not
    cfg = tiny().config
    cfg.layer_types, cfg.sliding_window = ["sliding_attention"] * 2, 32
    with pytest.raises(ValueError, match="every layer of this model is sliding"):
        QJLCache(cfg, 64)
    cfg.layer_types = ["full_attention", "chunked_attention"]
    with pytest.raises(ValueError, match="chunked_attention"):
        QJLCache(cfg, 64)
    cfg.layer_types, cfg.sliding_window = ["full_attention", "sliding_attention"], None
    with pytest.raises(ValueError, match="no sliding_window size"):
        QJLCache(cfg, 64)
    cfg2 = tiny().config
    cfg2.is_encoder_decoder = True
    with pytest.raises(ValueError, match="encoder-decoder"):
        QJLCache(cfg2, 64)


def test_refuses_bad_head_dim_and_config():
    cfg = tiny(heads=4, hidden=4 * 40).config  # head_dim 40
    with pytest.raises(ValueError, match="multiple of 16"):
        QJLCache(cfg, 64)
    with pytest.raises(ValueError, match=r"QJLConfig.residual=100.*multiple of 32"):
        QJLConfig(residual=100)
    with pytest.raises(ValueError, match="value_bits"):
        QJLConfig(value_bits=3)
    with pytest.raises(ValueError, match="unknown preset"):
        QJLConfig.preset("nope")


def test_dtype_mismatch_is_refused():
    model = tiny()
    cache = QJLCache(model.config, 64, batch_size=1, device="cpu", dtype=torch.float16)
    with torch.no_grad(), pytest.raises(ValueError, match="dtype"):
        model(torch.randint(0, 256, (1, 4)), **cache_kwargs(cache))


def test_presets_scale_with_model():
    c = QJLConfig.preset("reference", head_dim=64, num_layers=30)
    assert (c.sketch_dim, c.sketch_dim_initial, c.initial_layers) == (128, 256, 14)
    assert QJLConfig.preset("reference").sketch_dims(0) == (512, 256)
    assert QJLConfig.preset("reference").sketch_dims(20) == (256, 128)


@pytest.mark.parametrize("bits", [4, 8])
def test_decoquant_in_the_same_cache(bits):
    model = tiny()
    ids = torch.randint(0, 256, (2, 70))
    cfg = QJLConfig(method="decoquant", decoquant_bits=bits, residual=32)
    ref_cache, cache = DynamicCache(config=model.config), QJLCache(model.config, 128, cfg)
    with torch.no_grad():
        model(ids, **cache_kwargs(ref_cache)), model(ids, **cache_kwargs(cache))
        x = ids[:, -1:]
        a = model(x, **cache_kwargs(cache)).logits
        b = model(x, **cache_kwargs(ref_cache)).logits
    err = ((a - b).abs().max() / b.abs().max()).item()
    assert err < (0.02 if bits == 8 else 0.2), err
    mem = cache.memory()
    assert mem["k_bits"] == pytest.approx(bits + 16 / 64 + 2 * 256 * 8 / (32 * 64))  # codes + scale + Bm/block
