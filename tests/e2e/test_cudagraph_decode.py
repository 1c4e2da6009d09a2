"""Compiled decode under CUDA graphs (mode="reduce-overhead"), per preset, on a tiny Llama at the
kernels' shape (head_dim 128, GQA 4): what benchmarks/e2e.py's qjl modes run. Teacher-forced tokens,
so eager and compiled see the same inputs and their logits must agree; the CUDA C++ presets must
take the CUDA C++ route. A kernel that allocates lasting tensors inside the op (a data_ptr-keyed
cache filled during the cudagraph warm-up) fails here with "tensor(s) in the cudagraph pool not
tracked as outputs"."""
import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

# qjl_compile before transformers, as benchmarks/e2e.py imports them
from qjl_compile import QJLCache, QJLConfig  # noqa: E402
from qjl_compile.compat import cache_kwargs  # noqa: E402
from qjl_compile.kernels import triton as qt  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402,I001

# preset -> the route qjl::attend must take on a GPU with the CUDA C++ toolchain
PRESETS = {"reference": "cuda", "rotation-k4v3-match": "cuda", "rotation4": "cuda", "decoquant4": "triton"}
PROMPT, STEPS, CAP = 300, 6, 512


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=1024, intermediate_size=1024, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=128, max_position_embeddings=2048)
    return LlamaForCausalLM(cfg).to("cuda", torch.bfloat16).eval()


def _decode(model, qcfg, fn, toks, cudagraphs):
    cache = QJLCache(model.config, CAP, qcfg, batch_size=1, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        model(input_ids=toks[:, :PROMPT], **cache_kwargs(cache), use_cache=True)
        out = []
        for i in range(STEPS):
            if cudagraphs:
                torch.compiler.cudagraph_mark_step_begin()
            o = fn(input_ids=toks[:, PROMPT + i: PROMPT + i + 1], **cache_kwargs(cache), use_cache=True)
            out.append(o.logits[:, -1].float().clone())
    return torch.stack(out), cache


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_compiled_decode_under_cudagraphs(model, preset):
    from qjl_compile.kernels.cuda import available
    qcfg = QJLConfig.preset(preset, head_dim=128, num_layers=2)
    g = torch.Generator().manual_seed(1)
    toks = torch.randint(1, 512, (1, PROMPT + STEPS), generator=g).cuda()
    ref, _ = _decode(model, qcfg, model.forward, toks, False)
    torch._dynamo.reset()
    fn = torch.compile(model.forward, backend="qjl", mode="reduce-overhead")
    before = dict(qt.ROUTES)
    got, cache = _decode(model, qcfg, fn, toks, True)
    routes = {k: v - before.get(k, 0) for k, v in qt.ROUTES.items() if v - before.get(k, 0)}
    want = PRESETS[preset] if (PRESETS[preset] != "cuda" or available()[0]) else "triton"
    assert want in routes, f"{preset}: qjl::attend routes {routes}, expected {want}"
    err = ((got - ref).norm(dim=-1) / ref.norm(dim=-1)).max().item()
    assert err < 3e-2, f"{preset}: compiled vs eager logits relative error {err:.3g}"
    # the replays read the cache the compiled steps wrote: every layer holds prompt + steps tokens
    assert int(cache.get_seq_length()) == PROMPT + STEPS


@pytest.mark.parametrize("preset", ["reference", "rotation-k4v3-match"])
def test_compiled_generate_under_cudagraphs(model, preset):
    """qjl_compile.compile(mode="reduce-overhead") + generate(): the cache is created (and its layers
    allocated) inside generate, the prefill and the decode steps compiled; greedy tokens as the eager
    compressed cache's, up to the first near-tie the two numerics may break differently."""
    import qjl_compile
    qcfg = QJLConfig.preset(preset, head_dim=128, num_layers=2)
    ids = torch.randint(1, 512, (1, PROMPT), generator=torch.Generator().manual_seed(2)).cuda()
    kw = dict(max_new_tokens=8, do_sample=False, min_new_tokens=8)
    with torch.no_grad():
        ref = model.generate(ids, **cache_kwargs(QJLCache(model.config, CAP, qcfg)), **kw)
        torch._dynamo.reset()
        before = dict(qt.ROUTES)
        m = qjl_compile.compile(model, qcfg, mode="reduce-overhead")
        try:
            got = m.generate(ids, **kw)
            got2 = m.generate(ids, **kw)            # the second request replays the recorded graphs
        finally:
            qjl_compile.uncompile(model)
    assert qt.ROUTES["cuda"] > before.get("cuda", 0)
    assert got.shape == ref.shape and torch.equal(got, got2)
    new, want = got[0, PROMPT:], ref[0, PROMPT:]
    assert bool(new[0] == want[0]), f"{preset}: first generated token {int(new[0])} vs eager {int(want[0])}"


@pytest.mark.parametrize("preset", ["reference", "rotation-k4v3-match"])
def test_lazy_cache_under_cudagraphs_names_the_fix(model, preset):
    """A cache made without batch size / device has its layers allocated while Dynamo traces the
    compiled prefill, where the kernel constants cannot be prepared; under CUDA graphs their first
    build lands in the warm-up's memory pool (as would the cache's own buffers): torch refuses. The
    user must hear the fix (allocate the layers up front) from us, not only torch's pool error."""
    from qjl_compile.kernels import checks
    qcfg = QJLConfig.preset(preset, head_dim=128, num_layers=2)
    toks = torch.randint(1, 512, (1, PROMPT + 2), generator=torch.Generator().manual_seed(3)).cuda()
    torch._dynamo.reset()
    fn = torch.compile(model.forward, backend="qjl", mode="reduce-overhead")
    cache = QJLCache(model.config, CAP, qcfg)
    checks._LATE_WARNED[0] = False
    with torch.no_grad(), pytest.warns(UserWarning, match=r"QJLCache\(config, max_cache_len, qjl_config, batch_size=B"):
        try:
            for i in range(3):               # prefill (lazy allocation inside the trace), then decode steps
                torch.compiler.cudagraph_mark_step_begin()
                ids = toks[:, :PROMPT] if i == 0 else toks[:, PROMPT + i - 1: PROMPT + i]
                fn(input_ids=ids, **cache_kwargs(cache), use_cache=True)
        except RuntimeError as e:
            assert "cudagraph pool" in str(e), e
        finally:    # a failed recording must not leave its graph trees to the next tests
            torch._dynamo.reset()
            from torch._inductor import cudagraph_trees
            cudagraph_trees.reset_cudagraph_trees()
