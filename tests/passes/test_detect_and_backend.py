"""Uncompressed-cache detection (warn once, graph unchanged), the pass manager, backend options and registration."""
import functools
import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, StaticCache

from qjl_compile.backend import parse_options, qjl_backend
from qjl_compile.passes import PassManager, run_passes, select_passes
from qjl_compile.passes import detect_uncompressed
from qjl_compile.passes.fx_utils import is_qjl_op, is_sdpa
from qjl_compile.compat import cache_kwargs


def tiny(layers=2):
    cfg = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def _compile_steps(model, cache, ids):
    graphs = []

    def obs(stage, gm, ctx):
        if stage == "input":
            graphs.append(gm.code)
        if stage == "detect_uncompressed_cache":
            graphs.append(gm.code)

    step = torch.compile(model, backend=functools.partial(qjl_backend, options={"lowering": "eager"}, observer=obs),
                         fullgraph=True)
    with torch.no_grad():
        a = step(ids, **cache_kwargs(cache)).logits
        b = step(ids[:, :1], **cache_kwargs(cache)).logits
    return graphs, torch.cat([a[:, -1:], b], 1)


def test_uncompressed_caches_warn_once_and_compile_unchanged():
    model = tiny()
    ids = torch.randint(0, 256, (1, 12))
    detect_uncompressed.reset_warning()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out = {}
        for name, make in (("DynamicCache", lambda: DynamicCache(config=model.config)),
                           ("StaticCache", lambda: StaticCache(config=model.config, max_cache_len=32))):
            torch._dynamo.reset()
            counters.clear()
            graphs, logits = _compile_steps(model, make(), ids)
            assert counters["qjl"]["fuse_attention"] == 0, name
            # every attention of both steps (prefill, decode) recognised
            assert counters["qjl"]["uncompressed_cache_attention"] == 2 * 2, name
            # the graph is unchanged by the passes
            assert graphs[0] == graphs[1] and graphs[2] == graphs[3], name
            with torch.no_grad():
                c = make()
                ref = torch.cat([model(ids, **cache_kwargs(c)).logits[:, -1:],
                                 model(ids[:, :1], **cache_kwargs(c)).logits], 1)
            torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)
            out[name] = logits
    msgs = [str(w.message) for w in rec if "uncompressed Hugging Face" in str(w.message)]
    assert len(msgs) == 1, msgs
    assert "DynamicCache" in msgs[0] and "QJLCache" in msgs[0] and "qjl_compile.compile" in msgs[0]


def test_plain_sdpa_not_reported():
    def f(q, k, v):
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        # a cat over the sequence axis of computed tensors is not a cache
        return a + torch.nn.functional.scaled_dot_product_attention(q, torch.cat([k * 2, k], 2), torch.cat([v, v], 2))

    detect_uncompressed.reset_warning()
    q, k = torch.randn(1, 2, 3, 16), torch.randn(1, 2, 3, 16)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out = torch.compile(f, backend="qjl", options={"lowering": "eager"}, fullgraph=True)(q, k, k)
    torch.testing.assert_close(out, f(q, k, k))
    assert counters["qjl"]["fuse_attention"] == 0 and counters["qjl"]["uncompressed_cache_attention"] == 0
    assert not [w for w in rec if "uncompressed" in str(w.message)]


# ----------------------------------------------------------------------------------------------
# pass manager
# ----------------------------------------------------------------------------------------------
def test_pass_manager_order_observer_and_errors():
    gm = torch.fx.symbolic_trace(lambda x: torch.nn.functional.scaled_dot_product_attention(x, x, x))
    seen = []
    ctx = run_passes(gm, observer=lambda stage, g, c: seen.append(stage), graph_name="g")
    assert seen == ["input", "fuse_qjl_attention", "detect_uncompressed_cache", "grouped_sdpa"]
    assert ctx.graph_name == "g" and counters["qjl"]["graphs"] == 1
    assert [p.name for p in select_passes(["detect_uncompressed_cache"])] == ["detect_uncompressed_cache"]
    with pytest.raises(ValueError, match="unknown pass"):
        select_passes(["nope"])
    p = select_passes()[0]
    with pytest.raises(ValueError, match="duplicate"):
        PassManager([p, p])
    assert any(is_sdpa(n) for n in gm.graph.nodes) and not any(is_qjl_op(n, "attend") for n in gm.graph.nodes)


# ----------------------------------------------------------------------------------------------
# backend options and registration
# ----------------------------------------------------------------------------------------------
def test_parse_options():
    assert parse_options()["lowering"] == "inductor"
    p = parse_options("reduce-overhead")
    assert p["inductor"] == {"triton.cudagraphs": True} and p["mode"] == "reduce-overhead"
    p = parse_options(None, {"lowering": "inductor", "mode": "max-autotune-no-cudagraphs", "epilogue_fusion": False})
    assert p["inductor"]["epilogue_fusion"] is False and p["mode"] == "max-autotune-no-cudagraphs"
    assert parse_options("reduce-overhead", {"lowering": "aot_eager"})["inductor"] == {}
    assert parse_options(None, {"passes": ["fuse_qjl_attention"]})["passes"] == ["fuse_qjl_attention"]
    for bad, match in [({"lowering": "tvm"}, "lowering"), ({"nonsense_key": 1}, "unknown option"),
                       ({"lowering": "eager", "epilogue_fusion": False}, "need lowering='inductor'"),
                       ({"passes": ["x"]}, "unknown pass"), ({"mode": "fastest"}, "unknown mode")]:
        with pytest.raises(ValueError, match=match):
            parse_options(None, bad)


def test_registered_on_import_and_lookup():
    from torch._dynamo.backends.registry import lookup_backend

    assert "qjl" in torch._dynamo.list_backends()
    assert lookup_backend("qjl") is qjl_backend


def test_entry_point_without_import():
    """backend="qjl" resolves through the torch_dynamo_backends entry point in a fresh process."""
    code = ("import sys, torch\n"
            "f = torch.compile(lambda x: x * 2, backend='qjl', options={'lowering': 'eager'})\n"
            "assert f(torch.ones(2)).sum().item() == 4\n"
            "assert 'qjl_compile.backend' in sys.modules\n"
            "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]
