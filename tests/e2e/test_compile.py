"""Compiled (backend "qjl") vs eager on a tiny random Llama with QJLCache.

Model: 2 layers, hidden 256, 4 q / 2 kv heads, head_dim 64, vocab 256; QJLConfig with R = 32 so
the 40-token prompt is stored compressed (32) + exact ring (8), and 20 decode steps cross the next
flush at 64. Eager = dequantize + SDPA (the estimator's "dequantized key" identity); compiled =
qjl.attend (scores in the sketch domain). Both are the same estimator, so they agree to fp32
rounding: measured max |diff| of the logits ~2e-5 (logit scale ~1); bound used: 2e-4 absolute.
"""
import re

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import LlamaConfig, LlamaForCausalLM

import qjl_compile
from qjl_compile import QJLCache, QJLConfig
from qjl_compile.compat import cache_kwargs, output_cache

LAYERS = 2
CFG = QJLConfig(sketch_dim=128, sketch_dim_initial=256, initial_layers=1, outlier_sketch_dim=64,
                outlier_sketch_dim_initial=64, residual=32)
ATOL = 2e-4
PROMPT, STEPS, L = 40, 20, 96


def tiny():
    cfg = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=LAYERS,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def model():
    return tiny()


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def _tokens(B=1):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (B, PROMPT), generator=g), torch.randint(0, 256, (STEPS, B, 1), generator=g)


def _run(fwd, prefill_fwd, model, ids, steps, early_init=False):
    """Prefill + decode steps; returns (B, 1 + steps, vocab) logits of each step's last position."""
    kw = dict(batch_size=ids.shape[0], device="cpu", dtype=torch.float32) if early_init else {}
    cache = QJLCache(model.config, max_cache_len=L, qjl_config=CFG, **kw)
    out = []
    with torch.no_grad():
        out.append(prefill_fwd(ids, **cache_kwargs(cache)).logits[:, -1:])
        for t in steps:
            out.append(fwd(t, **cache_kwargs(cache)).logits[:, -1:])
    return torch.cat(out, 1)


def _split_top(s):
    """Split an argument list at top-level commas."""
    out, depth, cur = [], 0, ""
    for ch in s:
        depth += ch in "([" and 1 or (-1 if ch in ")]" else 0)
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return out + [cur.strip()]


def _unique_graphs():
    return counters["stats"]["unique_graphs"]


def test_aot_eager_matches_eager_prefill_and_20_steps(model):
    ids, steps = _tokens(B=2)
    ref = _run(model, model, model, ids, steps)
    step = torch.compile(model, backend="qjl", options={"lowering": "aot_eager"}, fullgraph=True)
    got = _run(step, step, model, ids, steps)
    diff = (got - ref).abs().max().item()
    print(f"aot_eager vs eager: max |logit diff| = {diff:.3g} over prefill + {STEPS} decode steps")
    assert diff < ATOL
    # one prefill graph (lazy cache: HF's empty-cache slice + enable_gqa path) + one decode graph
    # (static mask + repeat_kv): every layer rewritten in both, and the 20 steps never recompile
    assert counters["qjl"]["fuse_attention"] == 2 * LAYERS
    assert counters["qjl"]["dequantize_erased"] == 2 * LAYERS
    assert _unique_graphs() == 2


def test_dynamic_shapes_chunks(model):
    """dynamic=True: one graph serves chunks of 5, 7 and 6 tokens (chunked prefill / multi-token steps)."""
    ids, steps = _tokens()
    flat = steps.reshape(1, -1)
    chunks, i = [], 0
    # sizes (and storage offsets: clone) unlike any cache dim, or duck sizing ties them to one and specializes
    for n in (5, 7, 6):
        chunks.append(flat[:, i:i + n].clone())
        i += n
    ref = _run(model, model, model, ids, chunks, early_init=True)
    step = torch.compile(model, backend="qjl", options={"lowering": "aot_eager"}, fullgraph=True, dynamic=True)
    got = _run(step, model, model, ids, chunks, early_init=True)
    assert (got - ref).abs().max().item() < ATOL
    assert counters["qjl"]["fuse_attention"] >= LAYERS and counters["qjl"]["fuse_attention_skipped"] == 0
    assert _unique_graphs() == 1


def test_inductor_cpu_in_place_append(model):
    """Inductor lowering: same logits, one in-place append per layer per step, no copy of cache buffers."""
    from torch._inductor.utils import run_and_get_code

    ids, steps = _tokens()
    ref = _run(model, model, model, ids, steps[:4], early_init=True)
    step = torch.compile(model, backend="qjl", fullgraph=True)
    cache = QJLCache(model.config, max_cache_len=L, qjl_config=CFG, batch_size=1, device="cpu", dtype=torch.float32)
    out = []
    with torch.no_grad():
        out.append(model(ids, **cache_kwargs(cache)).logits[:, -1:])
        res, codes = run_and_get_code(lambda: step(steps[0], **cache_kwargs(cache)))
        out.append(res.logits)
        for t in steps[1:4]:
            out.append(step(t, **cache_kwargs(cache)).logits)
    got = torch.cat(out, 1)
    diff = (got - ref).abs().max().item()
    print(f"inductor vs eager: max |logit diff| = {diff:.3g} over 4 decode steps")
    assert diff < ATOL
    assert counters["qjl"]["fuse_attention"] == LAYERS and _unique_graphs() == 1
    code = "\n".join(codes)
    call = code[code.index("def call("):]
    call = re.split(r"\ndef (get_args|benchmark_compiled_module)\(", call)[0]
    appends = re.findall(r"torch\.ops\.qjl\.append\.default\(\[(.*?)\], \[", call)
    assert len(appends) == LAYERS, appends
    assert "qjl.dequantize" not in call and len(re.findall(r"torch\.ops\.qjl\.attend\.default\(", call)) == LAYERS
    for state in appends:
        items = _split_top(state)
        # state[0] is the 0-d length, read by HF before the first append (positions, mask): Inductor may
        # hand append a fresh 8-byte copy of it; every other buffer must be the graph input itself,
        # touched only by append and attend (no clone, no copy back)
        for buf in items[1:]:
            assert re.fullmatch(r"arg\d+_1", buf), f"cache buffer passed as {buf!r}: not in place"
            uses = [ln.strip() for ln in call.splitlines() if re.search(rf"\b{buf}\b", ln)]
            bad = [u for u in uses if not ("= args" in u or u.startswith(("assert_size_stride", "del "))
                                           or "torch.ops.qjl.append.default(" in u
                                           or "torch.ops.qjl.attend.default(" in u)]
            assert not bad, f"{buf} touched outside append/attend: {bad}"


def test_generate_after_qjl_compile(model):
    ids, _ = _tokens()
    cache = QJLCache(model.config, max_cache_len=64, qjl_config=CFG)
    ref = model.generate(ids, max_new_tokens=STEPS, do_sample=False, **cache_kwargs(cache), output_scores=True,
                         return_dict_in_generate=True)
    m = qjl_compile.compile(tiny(), CFG, options={"lowering": "aot_eager"})
    try:
        out = m.generate(ids, max_new_tokens=STEPS, do_sample=False, output_scores=True, return_dict_in_generate=True)
        assert isinstance(output_cache(out), QJLCache)
        assert output_cache(out).max_cache_len == 64  # prompt 40 + 20 new - 1, rounded up to R = 32
        assert torch.equal(out.sequences, ref.sequences)
        diff = max((a - b).abs().max().item() for a, b in zip(out.scores, ref.scores))
        assert diff < ATOL
        # the decode step ran compiled (prefill stays eager, as in transformers): one graph, all layers fused,
        # and every one of the STEPS - 1 decode forwards went through it
        assert counters["qjl"]["fuse_attention"] == LAYERS and _unique_graphs() == 1
        assert m._qjl_compile.compiled_calls == STEPS - 1
        m.generate(ids, max_new_tokens=STEPS, do_sample=False)  # same size: cache reused, no recompile
        assert _unique_graphs() == 1
        qjl_compile.compile(m, CFG, max_cache_len=50, options={"lowering": "aot_eager"})
        with pytest.raises(ValueError, match="needs 59 cache positions.*max_cache_len=50"):
            m.generate(ids, max_new_tokens=STEPS)
    finally:
        torch._dynamo.reset()


def test_hf_compile_config_backend_qjl(model):
    """transformers' own auto-compile path with CompileConfig(backend="qjl") and a user QJLCache."""
    from transformers import CompileConfig

    ids, _ = _tokens()
    ref = model.generate(ids, max_new_tokens=8, do_sample=False,
                         **cache_kwargs(QJLCache(model.config, max_cache_len=64, qjl_config=CFG)))
    m = tiny()
    cc = CompileConfig(backend="qjl", mode=None, fullgraph=True, options={"lowering": "aot_eager"})
    cc._compile_all_devices = True  # transformers auto-compiles only on accelerators otherwise
    out = m.generate(ids, max_new_tokens=8, do_sample=False, compile_config=cc,
                     **cache_kwargs(QJLCache(m.config, max_cache_len=64, qjl_config=CFG)))
    assert torch.equal(out, ref)
    assert counters["qjl"]["fuse_attention"] == LAYERS


def test_compile_argument_errors(model):
    with pytest.raises(TypeError, match="unexpected"):
        qjl_compile.compile(model, bogus=1)
    with pytest.raises(ValueError, match="always uses backend='qjl'"):
        qjl_compile.compile(model, backend="inductor")
    with pytest.raises(ValueError, match="lowering"):
        qjl_compile.compile(model, options={"lowering": "tvm"})
    with pytest.raises(ValueError, match="value_group"):
        qjl_compile.compile(model, QJLConfig(value_group=128))
