"""qjl ops (reference implementation) against a brute-force model of the cache."""
import itertools

import pytest
import torch
import torch.nn.functional as F

from qjl_compile.kernels import ops  # noqa: F401
from qjl_compile.kernels import reference as ref

QJL = ref.CODECS[0]


def make(B, H, D, L, R=64, m=128, mo=64, o=4, vb=2, vg=32, dtype=torch.float32, seed=0):
    S, So = ref.sketch(D, m, seed, 0), ref.sketch(D, mo, seed, 1)
    params = [o, vb, vg]
    st = ref.make_state(QJL, B, H, L, D, R, [S, So], params, dtype, torch.float16, "cpu")
    return st, [S, So], [0, R, L, *params]


def brute(all_k, all_v, consts, meta, T):
    """Expected (K, V) after appending all tokens: full blocks compressed in one go, rest exact."""
    R, L, params = meta[1], meta[2], meta[3:]
    k, v = torch.cat(all_k, 2), torch.cat(all_v, 2)
    n = k.shape[2]
    c1 = min(n // R * R, n - T)
    K, V = k.clone(), v.clone()
    if n // R * R:
        c = n // R * R
        kc, vc = QJL.decompress(QJL.compress(k[:, :, :c], v[:, :, :c], consts, params), consts, params)
        K[:, :, :c1], V[:, :, :c1] = kc[:, :, :c1].to(k.dtype), vc[:, :, :c1].to(v.dtype)
    pad = (0, 0, 0, L - n)
    return F.pad(K, pad), F.pad(V, pad)


STEPS = [[5, 1, 1, 30, 1, 40, 1], [64, 1, 63, 1], [130, 1, 1], [31, 1, 1, 33, 64, 2]]


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("B,H,D,dtype", [(1, 1, 64, torch.float32), (2, 3, 128, torch.bfloat16),
                                         (3, 2, 64, torch.float16)])
def test_append_dequantize_matches_brute_force(steps, B, H, D, dtype):
    torch.manual_seed(hash((tuple(steps), B, D)) % 1000)
    st, consts, meta = make(B, H, D, L=260, dtype=dtype)
    ks, vs = [], []
    for T in steps:
        k, v = torch.randn(B, H, T, D, dtype=dtype), torch.randn(B, H, T, D, dtype=dtype)
        ks.append(k), vs.append(v)
        torch.ops.qjl.append(st, consts, k, v, meta)
        K, V = torch.ops.qjl.dequantize(st, consts, k, v, meta)
        eK, eV = brute(ks, vs, consts, meta, T)
        n = sum(x.shape[2] for x in ks)
        assert int(st[0]) == n
        tol = dict(rtol=2e-2, atol=2e-2) if dtype != torch.float32 else dict(rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(K, eK, **tol)
        torch.testing.assert_close(V, eV, **tol)
        assert torch.equal(K[:, :, n - T:n], k)  # the step's own tokens are exact


def hf_mask(B, Tq, L, n, pad=None):
    """HF-style bool mask (B, 1, Tq, L): causal to the cache end, optional left padding."""
    pos = torch.arange(L)
    qpos = n - Tq + torch.arange(Tq)
    m = (pos[None, :] <= qpos[:, None]).expand(B, 1, Tq, L).clone()
    if pad is not None:
        for b, p in enumerate(pad):
            m[b, :, :, :p] = False
    return m


@pytest.mark.parametrize("G,D,Tq,masked", [(1, 64, 1, False), (3, 64, 5, True), (4, 128, 1, True),
                                           (8, 64, 3, False)])
def test_attend_equals_sdpa_over_dequantize(G, D, Tq, masked):
    torch.manual_seed(G * 7 + Tq)
    B, H, L = 2, 2, 200
    st, consts, meta = make(B, H, D, L)
    for T in (70, 60, Tq):
        k, v = torch.randn(B, H, T, D), torch.randn(B, H, T, D)
        torch.ops.qjl.append(st, consts, k, v, meta)
    n = int(st[0])
    q = torch.randn(B, H * G, Tq, D)
    mask = hf_mask(B, Tq, L, n, pad=[0, 3]) if masked else None
    out = torch.ops.qjl.attend(q, st, consts, k, v, mask, True, 0.3, meta)
    K, V = torch.ops.qjl.dequantize(st, consts, k, v, meta)
    K, V = K.repeat_interleave(G, 1), V.repeat_interleave(G, 1)
    m = mask if masked else hf_mask(B, Tq, L, n)
    exp = F.scaled_dot_product_attention(q, K, V, attn_mask=m, scale=0.3)
    torch.testing.assert_close(out, exp, rtol=1e-4, atol=1e-4)


def test_additive_float_mask():
    torch.manual_seed(9)
    B, H, G, D, L = 1, 2, 2, 64, 100
    st, consts, meta = make(B, H, D, L)
    k, v = torch.randn(B, H, 80, D), torch.randn(B, H, 80, D)
    torch.ops.qjl.append(st, consts, k, v, meta)
    q = torch.randn(B, H * G, 80, D)
    fm = torch.zeros(B, 1, 80, L).masked_fill(~hf_mask(B, 80, L, 80), float("-inf"))
    a = torch.ops.qjl.attend(q, st, consts, k, v, fm, False, None, meta)
    b = torch.ops.qjl.attend(q, st, consts, k, v, None, True, None, meta)
    torch.testing.assert_close(a, b)


def test_overflow_raises_before_writing():
    st, consts, meta = make(1, 1, 64, L=100)
    torch.ops.qjl.append(st, consts, torch.randn(1, 1, 90, 64), torch.randn(1, 1, 90, 64), meta)
    before = [t.clone() for t in st]
    with pytest.raises(ValueError, match="max_cache_len=100"):
        torch.ops.qjl.append(st, consts, torch.randn(1, 1, 11, 64), torch.randn(1, 1, 11, 64), meta)
    assert all(torch.equal(a, b) for a, b in zip(before, st))


@pytest.mark.parametrize("bad,match", [
    (lambda k: k.half(), "dtype"),
    (lambda k: k[:, :, :, :32].contiguous(), "do not fit"),
])
def test_bad_inputs(bad, match):
    st, consts, meta = make(1, 1, 64, L=100)
    k = bad(torch.randn(1, 1, 3, 64))
    with pytest.raises(ValueError, match=match):
        torch.ops.qjl.append(st, consts, k, k.clone(), meta)


def test_opcheck_all_ops():
    torch.manual_seed(5)
    B, H, G, D, L = 2, 2, 2, 64, 160
    st, consts, meta = make(B, H, D, L)
    k, v = torch.randn(B, H, 70, D), torch.randn(B, H, 70, D)
    torch.ops.qjl.append(st, consts, k, v, meta)
    k1, v1 = torch.randn(B, H, 1, D), torch.randn(B, H, 1, D)
    # append is not idempotent: opcheck runs it several times, so give it room and a fresh copy
    torch.library.opcheck(torch.ops.qjl.append.default, ([t.clone() for t in st], consts, k1, v1, meta))
    torch.ops.qjl.append(st, consts, k1, v1, meta)
    torch.library.opcheck(torch.ops.qjl.dequantize.default, (st, consts, k1, v1, meta))
    q = torch.randn(B, H * G, 1, D)
    mask = hf_mask(B, 1, L, int(st[0]))
    for args in itertools.product([None, mask], [False, True]):
        torch.library.opcheck(torch.ops.qjl.attend.default, (q, st, consts, k1, v1, *args, None, meta))


@pytest.mark.parametrize("codec_name", ["qjl", "decoquant", "rotation", "rotation-sink"])
@pytest.mark.parametrize("steps", [[5, 1], [64, 1, 1], [130, 60, 3]])
@pytest.mark.parametrize("block", [None, 64])
def test_dequantize_nosync_equals_dequantize(codec_name, steps, block):
    """The accelerator path (no host read of the length) gives the reference's result."""
    from qjl_compile import QJLConfig
    from qjl_compile.cache import _codec_setup

    extra = {"sink_tokens": 8} if codec_name == "rotation-sink" else {}
    cfg = QJLConfig.preset({"qjl": "reference", "decoquant": "decoquant4", "rotation": "rotation-k4v3",
                            "rotation-sink": "rotation-k4v3"}[codec_name],
                           head_dim=64, num_layers=2, residual=64, **extra)
    codec, consts, params = _codec_setup(cfg, 0, 64)
    B, H, D, L = 2, 2, 64, 260
    st = ref.make_state(codec, B, H, L, D, 64, consts, params, torch.float32, torch.float16, "cpu")
    meta = [codec.id, 64, L, *params]
    for T in steps:
        k, v = torch.randn(B, H, T, D), torch.randn(B, H, T, D)
        torch.ops.qjl.append(st, consts, k, v, meta)
        a = ref.dequantize(st, consts, k, v, meta)
        b = ref.dequantize_nosync(st, consts, k, v, meta, block=block)   # 64: one block per window
        torch.testing.assert_close(b[0], a[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b[1], a[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("codec_name", ["qjl", "decoquant", "rotation"])
@pytest.mark.parametrize("Tq,G,masked", [(1, 4, False), (70, 2, True), (33, 1, False), (5, 3, "per-head")])
def test_attend_nosync_equals_attend(codec_name, Tq, G, masked):
    """The accelerator fallback (long chunks, codecs without a kernel) gives the reference's result."""
    from qjl_compile import QJLConfig
    from qjl_compile.cache import _codec_setup

    cfg = QJLConfig.preset({"qjl": "reference", "decoquant": "decoquant4", "rotation": "rotation-k4v3"}[codec_name],
                           head_dim=64, num_layers=2, residual=64)
    codec, consts, params = _codec_setup(cfg, 0, 64)
    B, H, D, L = 2, 2, 64, 300
    st = ref.make_state(codec, B, H, L, D, 64, consts, params, torch.float32, torch.float16, "cpu")
    meta = [codec.id, 64, L, *params]
    for T in (100, Tq):
        k, v = torch.randn(B, H, T, D), torch.randn(B, H, T, D)
        torch.ops.qjl.append(st, consts, k, v, meta)
    q = torch.randn(B, H * G, Tq, D)
    mask = hf_mask(B, Tq, L, int(st[0]), pad=[0, 5]) if masked else None
    if masked == "per-head":   # an additive mask that differs per query head
        mask = torch.where(mask, torch.randn(B, H * G, Tq, L), float("-inf"))
    a = ref.attend(q, st, consts, k, v, mask, not masked, 0.2, meta)
    b = ref.attend_nosync(q, st, consts, k, v, mask, not masked, 0.2, meta)
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
