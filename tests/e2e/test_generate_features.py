"""HF generate features with QJLCache, eager and compiled: each matches the reference path or is
refused with an error that says what to do (issue 8)."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import qjl_compile
from qjl_compile import QJLCache, QJLConfig
from qjl_compile.compat import cache_kwargs

# m >> d and 8-bit values: the compressed path is numerically close to exact, so greedy tokens
# must equal the fp16 cache's and any mix-up (padding, beams, stale entries) shows as a mismatch.
HUGE = QJLConfig(sketch_dim=8192, sketch_dim_initial=8192, outlier_sketch_dim=4096,
                 outlier_sketch_dim_initial=4096, value_bits=8, residual=32)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      pad_token_id=0, eos_token_id=255, bos_token_id=1)
    m = LlamaForCausalLM(cfg).eval()
    m.generation_config.pad_token_id = 0
    return m


def left_padded():
    torch.manual_seed(1)
    ids = torch.randint(3, 250, (2, 40))
    am = torch.ones_like(ids)
    ids[0, :7], am[0, :7] = 0, 0
    return ids, am


def test_left_padding_batch_matches_fp16(model):
    ids, am = left_padded()
    kw = dict(attention_mask=am, max_new_tokens=12, do_sample=False)
    ref = model.generate(ids, **kw)
    out = model.generate(ids, **cache_kwargs(QJLCache(model.config, 64, HUGE)), **kw)
    assert torch.equal(out, ref)


def test_beam_search_reorders_the_cache(model):
    ids, am = left_padded()
    kw = dict(attention_mask=am, max_new_tokens=10, do_sample=False, num_beams=3)
    ref = model.generate(ids, **kw)
    out = model.generate(ids, **cache_kwargs(QJLCache(model.config, 64, HUGE)), **kw)
    assert torch.equal(out, ref)


def test_sampling_same_seed_same_tokens(model):
    ids, am = left_padded()
    kw = dict(attention_mask=am, max_new_tokens=10, do_sample=True, top_k=20)
    torch.manual_seed(3)
    ref = model.generate(ids, **kw)
    torch.manual_seed(3)
    out = model.generate(ids, **cache_kwargs(QJLCache(model.config, 64, HUGE)), **kw)
    assert torch.equal(out, ref)


def test_assisted_decoding_is_refused_with_the_fix(model):
    """Plain generate: our crop() refuses, or (transformers >= 5.2x) transformers itself refuses first
    because the cache says it is not croppable; after qjl_compile.compile ours refuses up front."""
    ids, am = left_padded()
    cache = QJLCache(model.config, 64, HUGE)
    assert cache.is_croppable is False
    with pytest.raises(ValueError, match="assisted/speculative decoding is not supported|requires a cache that "
                                         "can be cropped"):
        model.generate(ids[1:], attention_mask=am[1:], **cache_kwargs(cache),
                       assistant_model=model, max_new_tokens=8, do_sample=False)
    m = qjl_compile.compile(model, HUGE, options={"lowering": "aot_eager"})
    try:
        for kw in ({}, cache_kwargs(QJLCache(model.config, 64, HUGE))):
            with pytest.raises(ValueError, match="assisted/speculative decoding is not supported.*without an "
                                                 "assistant model"):
                m.generate(ids[1:], attention_mask=am[1:], assistant_model=model, max_new_tokens=8,
                           do_sample=False, **kw)
    finally:
        qjl_compile.uncompile(model)


def test_compiled_generate_left_padding_and_reuse(model):
    ids, am = left_padded()
    kw = dict(attention_mask=am, max_new_tokens=10, do_sample=False)
    ref = model.generate(ids, **kw)
    m = qjl_compile.compile(model, HUGE, options={"lowering": "aot_eager"})
    try:
        a = m.generate(ids, **kw)
        b = m.generate(ids, **kw)  # the cache is reset and reused, not stale
        assert torch.equal(a, ref) and torch.equal(b, ref)
    finally:
        qjl_compile.uncompile(model)
    assert "forward" not in model.__dict__ and "generate" not in model.__dict__
