"""Never fall back silently (issue 14): when generate will not run the qjl-compiled decode step, or
attention over a QJLCache stays uncompiled (a pass skipped it, a graph break, a non-SDPA attention),
one QJLFallbackWarning per reason says why and what to do; the normal path says nothing. Also: the
project's own calls raise no FutureWarning on the installed transformers, and a cache built for
another model is refused with a ValueError that names the fix."""
import logging
import warnings

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import qjl_compile
from qjl_compile import QJLCache, QJLConfig, diagnostics
from qjl_compile.cache import QJLLayer
from qjl_compile.compat import CACHE_NAMES, cache_kwarg, cache_kwargs
from qjl_compile.diagnostics import QJLFallbackWarning

CFG = QJLConfig(sketch_dim=128, sketch_dim_initial=256, initial_layers=1, outlier_sketch_dim=64,
                outlier_sketch_dim_initial=64, residual=32)
AOT = {"lowering": "aot_eager"}
NEW = 6

pytestmark = pytest.mark.usefixtures("fresh_dynamo")


@pytest.fixture(autouse=True)
def fresh_warnings():
    diagnostics.reset()
    yield
    diagnostics.reset()


def tiny(layers=2, attn="sdpa", heads=4, kv=2, hidden=256):
    cfg = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=512, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=512)
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    m = LlamaForCausalLM(cfg).eval()
    m.generation_config.pad_token_id = 0
    return m


def ids(B=1, T=40):
    return torch.randint(1, 256, (B, T), generator=torch.Generator().manual_seed(1))


class HFLog(logging.Handler):
    """Collects what transformers logs (its logger does not propagate to pytest's caplog)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())

    def __enter__(self):
        from transformers.utils import logging as hf_logging
        clear = getattr(getattr(hf_logging, "warning_once", None), "cache_clear", None)
        if clear is not None:
            clear()  # warning_once remembers messages for the whole process
        logging.getLogger("transformers").addHandler(self)
        return self

    def __exit__(self, *exc):
        logging.getLogger("transformers").removeHandler(self)


def fallbacks(record):
    return [str(w.message) for w in record if issubclass(w.category, QJLFallbackWarning)]


# ----------------------------------------------------------------------------------------------
# the normal path: compiled step used, both cache spellings, nothing to say
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spelling", ["none", *CACHE_NAMES])
def test_compiled_generate_runs_the_qjl_step_and_says_nothing(spelling):
    model = tiny()
    x = ids()
    ref = model.generate(x, max_new_tokens=NEW, do_sample=False,
                         **cache_kwargs(QJLCache(model.config, max_cache_len=64, qjl_config=CFG)))
    m = qjl_compile.compile(tiny(), CFG, options=AOT)
    kw = {} if spelling == "none" else {spelling: QJLCache(m.config, max_cache_len=64, qjl_config=CFG)}
    with warnings.catch_warnings(record=True) as rec, HFLog() as hf:
        warnings.simplefilter("always")
        out = m.generate(x, max_new_tokens=NEW, do_sample=False, **kw)
    assert torch.equal(out, ref)
    assert not fallbacks(rec), fallbacks(rec)
    assert not [w for w in rec if issubclass(w.category, FutureWarning)], [str(w.message) for w in rec]
    assert not [ln for ln in hf.lines if "deprecated" in ln or "compile" in ln.lower()], hf.lines
    # prefill eager, the NEW - 1 decode steps through the compiled forward: one graph, every layer fused
    assert m._qjl_compile.compiled_calls == NEW - 1
    assert counters["qjl"]["fuse_attention"] == 2 and counters["qjl"]["unfused"] == 0


def test_both_spellings_at_once_are_refused():
    m = qjl_compile.compile(tiny(), CFG, options=AOT)
    a, b = (QJLCache(m.config, max_cache_len=64, qjl_config=CFG) for _ in range(2))
    with pytest.raises(TypeError, match="pass the cache once"):
        m.generate(ids(), max_new_tokens=2, cache=a, past_key_values=b)


def test_direct_decode_loop_after_qjl_compile_is_compiled():
    """model(ids, cache=QJLCache) after qjl_compile.compile: prefill eager, later calls compiled."""
    import inspect

    model = tiny()
    m = qjl_compile.compile(tiny(), CFG, options=AOT)
    # generate reads attention_mask / position_ids / logits_to_keep support off this signature
    assert inspect.signature(m.forward) == inspect.signature(type(m).forward.__get__(m))
    a, b = (QJLCache(model.config, max_cache_len=64, qjl_config=CFG) for _ in range(2))
    x = ids()
    with torch.no_grad():
        ra, rb = model(x, **cache_kwargs(a)).logits, m(x, **cache_kwargs(b)).logits
        assert m._qjl_compile.compiled_calls == 0
        for t in range(3):
            tok = ra[:, -1:].argmax(-1)
            ra, rb = model(tok, **cache_kwargs(a)).logits, m(tok, **cache_kwargs(b)).logits
            assert (ra - rb).abs().max() < 2e-4
    assert m._qjl_compile.compiled_calls == 3 and b.host_length() == 43
    with pytest.raises(ValueError, match="overflow"):  # the host-side check covers compiled steps too
        m(torch.zeros(1, 30, dtype=torch.long), **cache_kwargs(b))


# ----------------------------------------------------------------------------------------------
# generate will not run the compiled step: say so once, with the fix
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,match", [
    (lambda m: cache_kwargs(DynamicCache(config=m.config)), r"DynamicCache.*Fix: pass no cache"),
    (lambda m: {"use_cache": False}, r"use_cache=False.*Fix: drop use_cache=False"),
    (lambda m: {"cache_implementation": "static"}, r"cache_implementation='static'.*Fix: drop cache_implementation"),
])
def test_generate_without_the_qjl_step_warns_once(kw, match):
    m = qjl_compile.compile(tiny(), CFG, options=AOT)
    for i in range(2):
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            m.generate(ids(), max_new_tokens=3, do_sample=False, **kw(m))
        said = fallbacks(rec)
        if i == 0:
            assert len(said) == 1 and __import__("re").search(match, said[0]), said
            assert "uncompressed" in said[0]
        else:
            assert not said, said  # once per reason
    assert m._qjl_compile.compiled_calls == 0


def test_compile_config_is_ignored_with_a_warning():
    from transformers import CompileConfig

    m = qjl_compile.compile(tiny(), CFG, options=AOT)
    with pytest.warns(QJLFallbackWarning, match="compile_config=.*ignored"):
        m.generate(ids(), max_new_tokens=3, do_sample=False, compile_config=CompileConfig(backend="eager"))
    assert m._qjl_compile.compiled_calls == 2


# ----------------------------------------------------------------------------------------------
# attention over a QJLCache that stays uncompiled
# ----------------------------------------------------------------------------------------------
def _decode_compiled(model, steps=2):
    cache = QJLCache(model.config, max_cache_len=64, qjl_config=CFG)
    ref_cache = QJLCache(model.config, max_cache_len=64, qjl_config=CFG)
    step = torch.compile(model, backend="qjl", options=AOT)
    x = ids()
    with torch.no_grad():
        model(x, **cache_kwargs(cache)), model(x, **cache_kwargs(ref_cache))
        for _ in range(steps):
            tok = torch.randint(1, 256, (1, 1))
            a = step(tok, **cache_kwargs(cache)).logits
            b = model(tok, **cache_kwargs(ref_cache)).logits
            assert (a - b).abs().max() < 2e-4  # still correct: the dequantized K/V path
    return cache


def test_eager_attention_over_qjlcache_warns():
    with pytest.warns(QJLFallbackWarning, match=r"not fused.*feed an attention that is not SDPA.*Fix: use "
                                                r"attn_implementation='sdpa'") as rec:
        _decode_compiled(tiny(attn="eager"))
    assert len(fallbacks(rec)) == 1
    assert counters["qjl"]["fuse_attention"] == 0 and counters["qjl"]["unfused"] >= 2


def test_graph_break_between_update_and_attention_warns():
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    def sdpa_after_break(module, query, key, value, attention_mask, **kw):
        torch._dynamo.graph_break()
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kw)

    AttentionInterface.register("qjl_test_sdpa_break", sdpa_after_break)
    ALL_MASK_ATTENTION_FUNCTIONS.register("qjl_test_sdpa_break", sdpa_mask)
    with pytest.warns(QJLFallbackWarning, match=r"not fused.*leave the graph \(a graph break between "
                                                r"QJLCache.update and the attention\)"):
        _decode_compiled(tiny(attn="qjl_test_sdpa_break"))
    assert counters["qjl"]["fuse_attention"] == 0


def test_update_skipped_by_dynamo_inside_the_compiled_step_warns(monkeypatch):
    monkeypatch.setattr(QJLLayer, "update", torch._dynamo.disable(QJLLayer.update))
    model = tiny()
    ref = model.generate(ids(), max_new_tokens=4, do_sample=False,
                         **cache_kwargs(QJLCache(model.config, max_cache_len=64, qjl_config=CFG)))
    m = qjl_compile.compile(tiny(), CFG, options=AOT)
    with pytest.warns(QJLFallbackWarning, match=r"QJLCache.update \(layer 0\) ran eagerly inside the qjl-compiled"):
        out = m.generate(ids(), max_new_tokens=4, do_sample=False)
    assert torch.equal(out, ref)


def test_no_warning_when_every_attention_is_fused():
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        _decode_compiled(tiny())
    assert not fallbacks(rec) and counters["qjl"]["fuse_attention"] == 2


# ----------------------------------------------------------------------------------------------
# the project's own calls: the installed transformers' spelling
# ----------------------------------------------------------------------------------------------
def test_project_calls_raise_no_future_warning(tmp_path):
    from qjl_compile import cli, demo, evaluate

    model = tiny()
    x = ids(T=48)
    with warnings.catch_warnings(), HFLog() as hf:
        warnings.simplefilter("error", FutureWarning)
        cache = QJLCache(model.config, max_cache_len=64, qjl_config=CFG)
        assert len(demo._generate(model, x, cache, 4)) == 4
        score = evaluate.score_window(model, x, lambda mm, n: QJLCache(mm.config, max_cache_len=n, qjl_config=CFG),
                                      prefill=32, chunk=8)
        assert score.nll.numel() == 48 - 32 - 1
        assert cli.main(["inspect", "--tiny-layers", "2", "--phase", "both", "--out", str(tmp_path),
                         "--config", "residual=32", "sketch_dim=64"]) == 0
    assert not [ln for ln in hf.lines if "deprecated" in ln], hf.lines
    assert cache_kwarg() in CACHE_NAMES


# ----------------------------------------------------------------------------------------------
# a cache built for another model
# ----------------------------------------------------------------------------------------------
def test_cache_for_another_model_is_refused():
    small, big = tiny(layers=2), tiny(layers=3)
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"QJLCache has 2 layers .* attention layer 2 wrote to it.*another "
                                             r"model.*QJLCache\(model.config"):
            big(ids(), **cache_kwargs(QJLCache(small.config, max_cache_len=64, qjl_config=CFG)))
        other_heads = tiny(kv=4)
        with pytest.raises(ValueError, match=r"got keys with 4 key/value heads.*built for 2"):
            other_heads(ids(), **cache_kwargs(QJLCache(small.config, max_cache_len=64, qjl_config=CFG)))
        other_dim = tiny(heads=2, kv=2)  # head_dim 128
        with pytest.raises(ValueError, match=r"head_dim 128.*built for head_dim 64"):
            other_dim(ids(), **cache_kwargs(QJLCache(small.config, max_cache_len=64, qjl_config=CFG)))
    m = qjl_compile.compile(big, CFG, options=AOT)
    with pytest.raises(ValueError, match=r"QJLCache built for 2 layers .* model of 3 layers"):
        m.generate(ids(), max_new_tokens=2, **cache_kwargs(QJLCache(small.config, max_cache_len=64, qjl_config=CFG)))


def test_late_kernel_constants_warn_once_with_the_fix():
    # a derived-constant cache miss on CUDA outside kernels.triton.prepare (a layer allocated while
    # Dynamo traced) says once how to allocate up front; prepare's own misses say nothing. Device
    # objects only: no GPU needed
    from qjl_compile.kernels import checks
    old = checks._LATE_WARNED[0]
    try:
        checks._LATE_WARNED[0] = False
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            with checks.preparing():
                checks.late_constants(torch.device("cuda", 0))
            checks.late_constants(torch.device("cpu"))
            assert not rec
            checks.late_constants(torch.device("cuda", 0))
            checks.late_constants(torch.device("cuda", 0))
        assert len(rec) == 1 and "batch_size=B, device=..., dtype=..." in str(rec[0].message)
        assert "reduce-overhead" in str(rec[0].message)
    finally:
        checks._LATE_WARNED[0] = old
