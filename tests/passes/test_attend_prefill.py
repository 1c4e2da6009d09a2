"""qjl::attend of a prefill chunk into an empty compressed cache: causal SDPA over just the chunk.

`reference.attend_prefill` (called first by `reference.attend_nosync`, the accelerator route of every
codec for long query chunks: `kernels/triton._attend_cuda` sends Tq * G > MAX_FUSED_ROWS there) must give
the result of the general path (`reference.attend`, the ground truth, and `attend_nosync` with the
shortcut off) wherever it is taken, and must not be taken where the cache held tokens before the chunk,
where the mask is padded / additive / not causal from position 0, in CUDA-graph capture, or for
decode-sized calls.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch._dynamo.utils import counters

from qjl_compile.kernels import ops  # noqa: F401  (registers the qjl ops)
from qjl_compile.kernels import reference as ref

PRESET = {"qjl": "reference", "decoquant": "decoquant4", "rotation": "rotation-k4v3"}
B, H, D, R, L = 2, 2, 64, 64, 320


def make_layer(codec_name, dtype):
    from qjl_compile import QJLConfig
    from qjl_compile.cache import _codec_setup

    cfg = QJLConfig.preset(PRESET[codec_name], head_dim=D, num_layers=2, residual=R)
    codec, consts, params = _codec_setup(cfg, 0, D)
    st = ref.make_state(codec, B, H, L, D, R, consts, params, dtype, torch.float16, "cpu")
    return st, consts, [codec.id, R, L, *params]


def hf_mask(Tq, n, pad=None):
    """HF's static-cache bool mask (B, 1, Tq, L): row i sees positions <= n - Tq + i; left padding."""
    pos = torch.arange(L)
    m = (pos[None, :] <= (n - Tq + torch.arange(Tq))[:, None]).expand(B, 1, Tq, L).clone()
    for b, p in enumerate(pad or []):
        m[b, :, :, :p] = False
    return m


def taken():
    return counters["qjl"]["attend_prefill_causal"]


def general(q, st, consts, k, v, mask, causal, meta, monkeypatch):
    """The existing paths: reference.attend (fp32 ground truth) and attend_nosync without the shortcut."""
    a = ref.attend(q, st, consts, k, v, mask, causal, 0.15, meta)
    with monkeypatch.context() as mp:
        mp.setenv("QJL_GROUPED_PREFILL", "off")
        before = taken()
        b = ref.attend_nosync(q, st, consts, k, v, mask, causal, 0.15, meta)
        assert taken() == before
    return a, b


def tol(dtype):
    return dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("codec_name", list(PRESET))
@pytest.mark.parametrize("G", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("masking", ["causal", "hf-mask"])
def test_empty_cache_prefill_takes_causal_sdpa(codec_name, G, dtype, masking, monkeypatch):
    """A 200-token chunk into an empty cache (3 blocks get compressed by the append, one 8-token ring rest):
    the shortcut is taken and equals the general path."""
    torch.manual_seed(G + (dtype == torch.bfloat16))
    st, consts, meta = make_layer(codec_name, dtype)
    T = 200
    k, v = torch.randn(B, H, T, D, dtype=dtype), torch.randn(B, H, T, D, dtype=dtype)
    torch.ops.qjl.append(st, consts, k, v, meta)
    q = torch.randn(B, H * G, T, D, dtype=dtype)
    mask = None if masking == "causal" else hf_mask(T, T)
    a, b = general(q, st, consts, k, v, mask, masking == "causal", meta, monkeypatch)
    before = taken()
    out = ref.attend_nosync(q, st, consts, k, v, mask, masking == "causal", 0.15, meta)
    assert taken() == before + 1
    assert out.shape == q.shape and out.dtype == dtype
    torch.testing.assert_close(out.float(), a.float(), **tol(dtype))
    torch.testing.assert_close(out.float(), b.float(), **tol(dtype))


@pytest.mark.parametrize("codec_name", list(PRESET))
@pytest.mark.parametrize("G", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_prefill_first_chunk_shortcut_later_chunks_general(codec_name, G, dtype, monkeypatch):
    """Chunks 96, 100, 40 (HF masks): only the first is the shortcut; the later ones attend over the compressed
    past and the ring exactly as before."""
    torch.manual_seed(3 * G)
    st, consts, meta = make_layer(codec_name, dtype)
    n = 0
    for i, T in enumerate((96, 100, 40)):
        k, v = torch.randn(B, H, T, D, dtype=dtype), torch.randn(B, H, T, D, dtype=dtype)
        torch.ops.qjl.append(st, consts, k, v, meta)
        n += T
        q = torch.randn(B, H * G, T, D, dtype=dtype)
        mask = hf_mask(T, n)
        a, b = general(q, st, consts, k, v, mask, False, meta, monkeypatch)
        before = taken()
        out = ref.attend_nosync(q, st, consts, k, v, mask, False, 0.15, meta)
        assert taken() == before + (i == 0)
        torch.testing.assert_close(out.float(), a.float(), **tol(dtype))
        torch.testing.assert_close(out.float(), b.float(), **tol(dtype))


@pytest.mark.parametrize("codec_name", list(PRESET))
@pytest.mark.parametrize("G", [1, 4])
def test_left_padding_takes_the_general_path(codec_name, G, monkeypatch):
    torch.manual_seed(5)
    st, consts, meta = make_layer(codec_name, torch.float32)
    T = 150
    k, v = torch.randn(B, H, T, D), torch.randn(B, H, T, D)
    torch.ops.qjl.append(st, consts, k, v, meta)
    q = torch.randn(B, H * G, T, D)
    mask = hf_mask(T, T, pad=[0, 7])  # batch row 1 left-padded by 7 tokens
    a, b = general(q, st, consts, k, v, mask, False, meta, monkeypatch)
    before = taken()
    out = ref.attend_nosync(q, st, consts, k, v, mask, False, 0.15, meta)
    assert taken() == before
    torch.testing.assert_close(out, a, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out, b, rtol=1e-4, atol=1e-4)
    # the causal SDPA over the chunk really differs here: taking it would be a silent wrong result
    wrong = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.15, enable_gqa=G > 1)
    assert (wrong[1] - a[1]).abs().max() > 1e-2


def test_masks_that_are_not_causal_from_zero_take_the_general_path(monkeypatch):
    """An empty cache, but: a bidirectional bool mask, an additive float mask, a causal-from-zero mask over a cache
    that already held tokens (the shortcut would read the wrong keys), and a non-causal call without a mask
    (taken: every row sees all T tokens, which is what the general path computes)."""
    torch.manual_seed(6)
    G, T = 4, 130
    cases = []
    bidir = torch.zeros(B, 1, T, L, dtype=torch.bool)
    bidir[..., :T] = True
    cases.append(("bidirectional bool", 0, bidir, False, False))
    fl = torch.where(hf_mask(T, T), 0.0, float("-inf"))
    cases.append(("additive float", 0, fl, False, False))
    cases.append(("causal-from-zero mask over a non-empty cache", 40, hf_mask(T, T), False, False))
    cases.append(("no mask, not causal", 0, None, False, True))
    for name, past, mask, causal, want in cases:
        st, consts, meta = make_layer("rotation", torch.float32)
        if past:
            torch.ops.qjl.append(st, consts, torch.randn(B, H, past, D), torch.randn(B, H, past, D), meta)
        k, v = torch.randn(B, H, T, D), torch.randn(B, H, T, D)
        torch.ops.qjl.append(st, consts, k, v, meta)
        q = torch.randn(B, H * G, T, D)
        a, _ = general(q, st, consts, k, v, mask, causal, meta, monkeypatch)
        before = taken()
        out = ref.attend_nosync(q, st, consts, k, v, mask, causal, 0.15, meta)
        assert taken() == before + want, name
        torch.testing.assert_close(out, a, rtol=1e-4, atol=1e-4, msg=name)


def test_decode_sized_calls_and_capture_never_read_the_length(monkeypatch):
    """Below PREFILL_MIN_TQ query tokens the length is never read on the host (decode stays as it was); inside
    CUDA-graph capture the shortcut is refused with one warning."""
    from qjl_compile.passes import causal_prefill as cp

    torch.manual_seed(7)
    st, consts, meta = make_layer("qjl", torch.float32)
    T = ref.PREFILL_MIN_TQ - 1
    k, v = torch.randn(B, H, T, D), torch.randn(B, H, T, D)
    torch.ops.qjl.append(st, consts, k, v, meta)
    q = torch.randn(B, H * 4, T, D)

    calls = []
    real_int = torch.Tensor.__int__
    monkeypatch.setattr(torch.Tensor, "__int__", lambda self: calls.append(1) or real_int(self))
    assert ref.attend_prefill(q, st, k, v, None, True, None) is None
    assert not calls, "a decode-sized call read the cache length on the host"
    monkeypatch.undo()

    st, consts, meta = make_layer("qjl", torch.float32)
    T = 64
    k, v = torch.randn(B, H, T, D), torch.randn(B, H, T, D)
    torch.ops.qjl.append(st, consts, k, v, meta)
    q = torch.randn(B, H * 4, T, D)
    assert ref.attend_prefill(q, st, k, v, None, True, None) is not None
    from qjl_compile import diagnostics
    from qjl_compile.diagnostics import QJLFallbackWarning
    monkeypatch.setattr(cp, "_capturing", lambda t: True)
    diagnostics.reset()
    with pytest.warns(QJLFallbackWarning, match="CUDA-graph capture"):
        assert ref.attend_prefill(q, st, k, v, None, True, None) is None
    a = ref.attend(q, st, consts, k, v, None, True, None, meta)
    torch.testing.assert_close(ref.attend_nosync(q, st, consts, k, v, None, True, None, meta), a,
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("codec_name", list(PRESET))
def test_cuda_dispatcher_sends_long_prefill_chunks_to_the_shortcut(codec_name):
    """`kernels/triton._attend_cuda` (the CUDA implementation of qjl::attend, called here on CPU tensors): a
    long chunk (Tq * G > MAX_FUSED_ROWS) goes to the SDPA route, which takes the shortcut for an empty cache,
    and returns the fake's layout for HF's transposed q."""
    from qjl_compile.kernels import triton as kt

    torch.manual_seed(8)
    G, T = 4, 96
    assert T * G > kt.MAX_FUSED_ROWS
    st, consts, meta = make_layer(codec_name, torch.float32)
    k, v = torch.randn(B, H, T, D), torch.randn(B, H, T, D)
    torch.ops.qjl.append(st, consts, k, v, meta)
    q = torch.randn(B, T, H * G, D).transpose(1, 2)  # HF's layout: a transposed view
    mask = hf_mask(T, T)
    before, sdpa = taken(), kt.ROUTES["sdpa"]
    out = kt._attend_cuda(q, st, consts, k, v, mask, False, None, meta)
    assert taken() == before + 1 and kt.ROUTES["sdpa"] == sdpa + 1
    assert out.stride() == torch.empty_like(q).stride()
    torch.testing.assert_close(out, ref.attend(q, st, consts, k, v, mask, False, None, meta), rtol=1e-4, atol=1e-4)


@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize("lowering", ["eager", "aot_eager"])
@pytest.mark.parametrize("kv_heads", [1, 4])
def test_compiled_prefill_over_qjlcache_gets_the_shortcut_on_every_layer(lowering, kv_heads, monkeypatch):
    """The qjl backend's graph (the e2e harness's prefill path): a prompt into an empty QJLCache, then a later
    chunk. qjl::attend's CPU kernel is replaced (for this test) by one that takes `attend_prefill` where it
    applies, as the CUDA route does; the prompt's call on every layer takes it (HF's real mask / causal flag as the pass hands them over),
    the later chunk's never does, and the logits equal the eager QJLCache's (dequantize path) throughout."""
    import functools

    from transformers import LlamaConfig, LlamaForCausalLM

    from qjl_compile import QJLCache, QJLConfig
    from qjl_compile.backend import qjl_backend
    from qjl_compile.compat import cache_kwargs

    layers, T, T2, cap = 2, 80, 24, 160
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=512)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    qcfg = QJLConfig.for_model(cfg, residual=32)  # the 80-token prompt compresses two blocks in its append
    ids = torch.randint(1, 256, (1, T + T2))

    def run(step):
        cache = QJLCache(cfg, max_cache_len=cap, qjl_config=qcfg)
        with torch.no_grad():
            a = step(ids[:, :T], **cache_kwargs(cache)).logits
            b = step(ids[:, T:], **cache_kwargs(cache)).logits
        return a, b

    want = run(model)  # eager: update() hands HF's SDPA the dequantized K/V
    seen = []

    def cpu_attend(q, state, consts, k_new, v_new, attn_mask, is_causal, scale, meta):
        out = ref.attend_prefill(q, state, k_new, v_new, attn_mask, is_causal, scale)
        seen.append((q.shape[2], out is not None))
        if out is None:
            out = ref.attend(q, state, consts, k_new, v_new, attn_mask, is_causal, scale, meta)
        return ops.like_fake(q, out)

    lib = torch.library.Library("qjl", "IMPL")  # the CPU kernel, for this test only (destroyed below)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "overriding a previously registered kernel"
            lib.impl("attend", cpu_attend, "CPU")
        step = torch.compile(model, backend=functools.partial(qjl_backend, options={"lowering": lowering}),
                             fullgraph=True)
        got = run(step)
    finally:
        lib._destroy()
    assert seen == [(T, True)] * layers + [(T2, False)] * layers, seen
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
