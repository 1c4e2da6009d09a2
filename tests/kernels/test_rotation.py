"""Rotation + Lloyd-Max codec (codec id 2): codebooks, rotation, packing, fused paths, statistics,
the qjl ops against brute force, opcheck, and QJLCache(method="rotation") in a tiny HF Llama."""
import math

import pytest
import torch
import torch.nn.functional as F

from qjl_compile.compat import cache_kwargs
from qjl_compile.kernels import decoquant as dq
from qjl_compile.kernels import ops  # noqa: F401  (torch.ops.qjl.*)
from qjl_compile.kernels import reference as ref
from qjl_compile.kernels import rotation as rot

CODEC = ref.CODECS[2]
LSQ = rot.SCALE_MODES["lsq"]


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _consts(d, kb, vb, ub=0, seed=0, salt=0):
    return rot.make_consts(d, kb, vb, ub, seed, salt)


# ----------------------------------------------------------------------------------------------
# Codebooks and rotation
# ----------------------------------------------------------------------------------------------
KNOWN = {1: [0.7979], 2: [0.4528, 1.5104], 3: [0.2451, 0.7560, 1.3440, 2.1520]}
# Max (1960) tables: 0.3634, 0.1175, 0.03454, 0.009497; the float64 Lloyd fixed point (checked by
# quadrature) has 0.0095010 at 4 bits, 4e-4 relative off Max's rounding.
KNOWN_MSE = {1: 0.3634, 2: 0.1175, 3: 0.03454, 4: 0.009497}


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_codebook_known_values(bits):
    cb = rot.codebook(bits)
    assert cb.shape == (1 << bits,) and cb.dtype == torch.float32
    assert torch.all(cb[1:] > cb[:-1])
    torch.testing.assert_close(cb, -cb.flip(0))                              # symmetric
    if bits in KNOWN:
        pos = cb[cb > 0].tolist()
        assert pos == pytest.approx(KNOWN[bits], abs=2e-4)
    assert rot.codebook_mse(bits) == pytest.approx(KNOWN_MSE[bits], rel=1e-3)
    # the MSE also from a large N(0,1) sample, coded by nearest centroid
    x = torch.randn(400_000, generator=torch.Generator().manual_seed(bits), dtype=torch.float64)
    q = cb.double()[torch.bucketize(x, rot._bounds(cb.double()))]
    assert ((x - q) ** 2).mean().item() == pytest.approx(rot.codebook_mse(bits), rel=0.02)


def test_codebook_bad_bits():
    with pytest.raises(ValueError, match="bits"):
        rot.codebook(5)


@pytest.mark.parametrize("d", [16, 64, 128])
def test_rotation_orthogonal_deterministic(d):
    P = rot.rotation(d, 42, 3)
    assert P.dtype == torch.float32 and P.shape == (d, d)
    torch.testing.assert_close(P @ P.T, torch.eye(d), atol=1e-5, rtol=0)
    assert torch.equal(P, rot.rotation(d, 42, 3))
    assert not torch.allclose(P, rot.rotation(d, 42, 4))
    assert not torch.allclose(P, rot.rotation(d, 43, 3))
    # not the QJL sketch of the same (seed, salt), and not QR-biased (det sign varies over salts)
    assert not torch.allclose(P, ref.sketch(d, d, 42, 3) / math.sqrt(d), atol=1e-3)
    if d == 16:
        dets = {round(torch.linalg.det(rot.rotation(d, 1, s).double()).item()) for s in range(12)}
        assert dets == {-1, 1}


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_pack_roundtrip(bits):
    c = torch.randint(0, 1 << bits, (3, 5, 64))
    p = dq.pack(c, bits)
    assert p.dtype == torch.uint8 and p.shape[-1] == 64 * bits // 8
    assert torch.equal(dq.unpack(p, bits), c.to(torch.int32))


# ----------------------------------------------------------------------------------------------
# Quantization quality
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_mse_matches_lloyd_max(bits):
    """Gaussian vectors (any scale): the relative error per coordinate is the Lloyd-Max MSE.

    Coordinates of a rotated vector are sqrt(D) * (a uniform point on the sphere), a little
    lighter-tailed than N(0,1), so the measured MSE sits slightly below the Gaussian one.
    """
    d = 128
    x = torch.randn(4, 512, d, generator=torch.Generator().manual_seed(bits)) * 3.0
    P, cb = rot.rotation(d, 0), rot.codebook(bits)
    for mode, tol in ((rot.SCALE_MODES["norm"], 0.06), (LSQ, 0.06)):
        codes, a = rot.quantize(x, P, cb, mode, torch.float32)
        xh = rot.dequantize(codes, a, P, cb)
        mse = ((xh - x).norm(dim=-1) ** 2 / x.norm(dim=-1) ** 2).mean().item()
        assert mse == pytest.approx(rot.codebook_mse(bits), rel=tol), (mode, mse)


def test_scale_modes():
    """lsq is the best scale per vector; match keeps the norm exactly."""
    d = 64
    x = torch.randn(2000, d) * torch.rand(2000, 1) * 5
    P = rot.rotation(d, 1)
    for bits in (1, 2, 3):
        cb = rot.codebook(bits)
        err = {}
        for name, mode in rot.SCALE_MODES.items():
            codes, a = rot.quantize(x, P, cb, mode, torch.float32)
            xh = rot.dequantize(codes, a, P, cb)
            err[name] = (xh - x).norm(dim=-1)
            if name == "match":
                torch.testing.assert_close(xh.norm(dim=-1), x.norm(dim=-1), rtol=1e-4, atol=1e-5)
        assert torch.all(err["lsq"] <= err["norm"] + 1e-4) and torch.all(err["lsq"] <= err["match"] + 1e-4)


def test_centering_helps_with_a_shared_mean():
    """Keys with a common mean direction (as in real models): centering per block cuts the error."""
    d, R = 64, 32
    cons = _consts(d, 3, 3)
    g = torch.Generator().manual_seed(4)
    k = torch.randn(1, 2, 128, d, generator=g) + 2.0 * torch.randn(1, 2, 1, d, generator=g)
    err = []
    for center in (0, 1):
        params = [3, 3, 0, LSQ, 0, center, R]
        kh, _ = CODEC.decompress(CODEC.compress(k, k, cons, params), cons, params)
        err.append(_rel(kh, k))
    assert err[1] < 0.6 * err[0], err
    # 16/R bits per value for the stored mean
    st = ref.make_state(CODEC, 1, 1, 256, d, R, cons, [3, 3, 0, LSQ, 0, 1, R], torch.float16, torch.float16, "cpu")
    nb = sum(t.numel() * t.element_size() for t in st[3:])
    assert 8 * nb / (2 * 256 * d) == pytest.approx((3 + 3 + 2 * 16 / d + 16 / R) / 2)


def test_zero_vector():
    P, cb = rot.rotation(32, 0), rot.codebook(2)
    x = torch.zeros(3, 32)
    codes, a = rot.quantize(x, P, cb)
    assert torch.equal(rot.dequantize(codes, a, P, cb), x)


@pytest.mark.slow
def test_unbiased_inner_products_many_seeds():
    _unbiased(300)


def test_unbiased_inner_products():
    _unbiased(150)


def _unbiased(n_seeds):
    """Unbiased variant: over random (Pi, S), the score's mean is the true <q, k> (within 4 SE);
    the MSE-only variant at the same b-1 bits is biased (shrinks scores)."""
    d, kb = 64, 2
    g = torch.Generator().manual_seed(7)
    k = torch.randn(16, d, generator=g)
    q = k + 0.5 * torch.randn(16, d, generator=g)  # correlated: <q,k> large, bias visible
    truth = (q * k).sum(-1).double()
    est, est_mse = [], []
    for s in range(n_seeds):
        cons = _consts(d, kb, 2, 1, seed=s)
        params = [kb, 2, 1, rot.SCALE_MODES["norm"], 0]
        bufs = CODEC.compress(k[None, None], torch.zeros(1, 1, 16, d), cons, params, side_dtype=torch.float32)
        est.append(torch.diagonal(CODEC.scores(q[None, None], bufs, cons, params)[0, 0]).double())
        kh = rot.dequantize(bufs[0], bufs[1], cons[0], cons[1])[0, 0]
        est_mse.append((q * kh).sum(-1).double())
    e = torch.stack(est)
    se = e.std(0) / math.sqrt(n_seeds)
    z = ((e.mean(0) - truth) / se).abs()
    assert z.max() < 4.5, z
    e_mse = torch.stack(est_mse)
    z_mse = (e_mse.mean(0) - truth) / (e_mse.std(0) / math.sqrt(n_seeds))
    assert (z_mse < -4).float().mean() > 0.5  # 1-bit MSE with the norm scale shrinks <q,k>


# ----------------------------------------------------------------------------------------------
# The codec: buffers, fused scores and values
# ----------------------------------------------------------------------------------------------
CASES = [(4, 4, 0, LSQ, 0), (3, 2, 0, LSQ, 0), (2, 1, 0, 0, 0), (1, 3, 0, 1, 0), (4, 2, 1, LSQ, 0),
         (3, 3, 1, 0, 4), (4, 4, 0, LSQ, 5), (4, 3, 0, LSQ, 0, 3, 32), (3, 2, 1, LSQ, 4, 1, 16),
         (2, 2, 0, LSQ, 0, 2, 64)]


@pytest.mark.parametrize("params", CASES)
def test_fused_scores_and_values(params):
    kb, vb, ub, _, sink = params[:5]
    d = 48
    cons = _consts(d, kb, vb, ub, seed=3)
    g = torch.Generator().manual_seed(sum(params))
    k, v = torch.randn(2, 3, 64, d, generator=g), torch.randn(2, 3, 64, d, generator=g)
    k[..., 5] *= 10
    k, v = k + 2.0, v - 1.0  # a shared mean direction (what centering removes)
    bufs = CODEC.compress(k, v, cons, params)
    specs = CODEC.specs(d, cons, params)
    assert [tuple(b.shape[2:]) for b in bufs] == [(64 // s.per, *s.tail) for s in specs]
    assert [b.dtype for b in bufs] == [torch.float16 if s.dtype == "side" else s.dtype for s in specs]
    if sink:  # what the cache keeps of the head-only buffers
        bufs = [b[:, :, :sink] if s.head else b for b, s in zip(bufs, specs)]
    kh, vh = CODEC.decompress(bufs, cons, params)
    q = torch.randn(2, 3, 5, d, generator=g)
    torch.testing.assert_close(CODEC.scores(q, bufs, cons, params), q @ kh.transpose(-1, -2), atol=2e-4, rtol=1e-4)
    # values: accumulate in the rotated space, rotate back once == p @ decompressed V
    p = torch.softmax(torch.randn(2, 3, 5, 64, generator=g), -1)
    vr = CODEC.values_rotated(bufs, cons, params)
    acc = (p[..., sink:] @ vr[:, :, sink:]) @ cons[0]          # rotate back once
    if sink:
        acc = acc + p[..., :sink] @ v[:, :, :sink].half().float()   # exact sink rows
        torch.testing.assert_close(kh[:, :, :sink], k[:, :, :sink].half().float())
    want = p @ vh
    torch.testing.assert_close(acc, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(CODEC.values(bufs, cons, params), vh)
    # reconstruction error in line with the bits (sink rows exact)
    mse_bits = kb - ub
    assert _rel(kh[:, :, sink:], k[:, :, sink:]) < 1.5 * math.sqrt(rot.codebook_mse(mse_bits)) + 0.02
    assert _rel(vh[:, :, sink:], v[:, :, sink:]) < 1.3 * math.sqrt(rot.codebook_mse(vb)) + 0.02


def test_bad_params_and_consts():
    cons = _consts(64, 4, 4)
    with pytest.raises(ValueError, match="key_bits"):
        CODEC.specs(64, cons, [5, 4, 0, 2, 0])
    with pytest.raises(ValueError, match=r"\[key_bits, value_bits"):
        CODEC.specs(64, cons, [4, 4])
    with pytest.raises(ValueError, match="unbiased"):
        CODEC.specs(64, _consts(64, 2, 4, 1), [1, 4, 1, 2, 0])
    with pytest.raises(ValueError, match="consts do not match"):
        CODEC.specs(64, cons, [3, 4, 0, 2, 0])
    with pytest.raises(ValueError, match="residual sketch"):
        CODEC.specs(64, _consts(64, 3, 4, 0), [4, 4, 1, 2, 0])
    with pytest.raises(ValueError, match="scale_mode"):
        CODEC.specs(64, cons, [4, 4, 0, 7, 0])
    with pytest.raises(ValueError, match="center"):
        CODEC.specs(64, cons, [4, 4, 0, 2, 0, 8, 32])
    with pytest.raises(ValueError, match="fragment order need head_dim"):   # VFRAG off its shapes
        CODEC.specs(64, _consts(64, 4, 2), [4, 2, 0, 2, 0, rot.VFRAG, 32])


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("bits", [3, 4])
def test_fragment_order_round_trip_and_places(d, bits):
    # every code of a 32-token group lands in the (lane, nibble word, nibble) of the CUDA kernel's value
    # A fragment, and frag_unpack inverts it; fresh random codes each run
    idx = torch.randint(0, 1 << bits, (2, 3, 96, d))
    p = rot.frag_pack(idx, bits)
    assert p.shape == (2, 3, 96, d * bits // 8) and p.dtype == torch.uint8
    assert torch.equal(rot.frag_unpack(p, bits), idx.int())
    one = torch.zeros(32, d, dtype=torch.int64)
    for _ in range(20):
        j, c, v = int(torch.randint(32, ())), int(torch.randint(d, ())), int(torch.randint(1, 1 << bits, ()))
        one.zero_()
        one[j, c] = v
        words = rot.frag_pack(one, bits).reshape(-1).view(torch.int32).to(torch.int64) & 0xFFFFFFFF
        tt, k, t, a = j // 16, (j // 8) % 2, (j // 2) % 4, j % 2
        g, i, h = c // (d // 8), (c % (d // 8)) // 2, c % 2
        lane, q, n = 4 * g + t, tt * (d // 16) + i, 4 * k + 2 * a + h
        wl = words[lane * (d * bits // 32):(lane + 1) * (d * bits // 32)]
        assert int(words.count_nonzero()) == int((wl != 0).sum()) > 0     # only this lane's words
        if bits == 4:
            assert int(wl[q] >> (4 * n)) & 15 == v
        else:
            blk, r = divmod(q, 4)
            w3 = wl[3 * blk:3 * blk + 3]
            got = (int(w3[r] >> (4 * n)) & 7) if r < 3 else sum(((int(w3[u] >> (4 * n + 3)) & 1) << u) for u in range(3))
            assert got == v


@pytest.mark.parametrize("kb,vb,ub", [(4, 4, 0), (3, 3, 0), (4, 2, 0), (2, 2, 0), (4, 3, 1)])
@pytest.mark.parametrize("d", [64, 128])
def test_bits_per_value(kb, vb, ub, d):
    R, L = 128, 1024
    cons = _consts(d, kb, vb, ub)
    st = ref.make_state(CODEC, 1, 1, L, d, R, cons, [kb, vb, ub, LSQ, 0], torch.float16, torch.float16, "cpu")
    nbytes = sum(t.numel() * t.element_size() for t in st[3:])
    assert 8 * nbytes / (2 * L * d) == pytest.approx((kb + vb + (1 + ub) * 16 / d + 16 / d) / 2)
    # a sink adds its rows once, independent of L
    st2 = ref.make_state(CODEC, 1, 1, L, d, R, cons, [kb, vb, ub, LSQ, 4], torch.float16, torch.float16, "cpu")
    extra = sum(t.numel() * t.element_size() for t in st2[3:]) - nbytes
    assert extra == 2 * 4 * d * 2


# ----------------------------------------------------------------------------------------------
# The qjl ops with the rotation codec
# ----------------------------------------------------------------------------------------------
def _setup(B, H, D, R, L, params, dtype=torch.float32, side=torch.float16):
    kb, vb, ub = params[:3]
    cons = _consts(D, kb, vb, ub, seed=5)
    st = ref.make_state(CODEC, B, H, L, D, R, cons, params, dtype, side, "cpu")
    return st, cons, [2, R, L, *params]


def _expected_kv(allk, allv, n, T, R, L, cons, params):
    """Brute force: the compressed prefix decoded from one compress() of it (the codec is per
    token, so blocks do not matter; sinks exact), the rest exact."""
    B, H, _, D = allk.shape
    c1 = n // R * R
    cl = min(c1, n - T)
    K = torch.zeros(B, H, L, D)
    V = torch.zeros(B, H, L, D)
    if cl:
        specs = CODEC.specs(D, cons, params)
        bufs = CODEC.compress(allk[:, :, :c1], allv[:, :, :c1], cons, params)
        bufs = [b[:, :, :s.head] if s.head else b for b, s in zip(bufs, specs)]
        kc, vc = CODEC.decompress(bufs, cons, params)
        K[:, :, :cl], V[:, :, :cl] = kc[:, :, :cl], vc[:, :, :cl]
    K[:, :, cl:n], V[:, :, cl:n] = allk[:, :, cl:n].float(), allv[:, :, cl:n].float()
    return K, V


@pytest.mark.parametrize("params", [[4, 3, 0, LSQ, 0], [3, 2, 1, LSQ, 3, 3, 32], [2, 4, 0, 0, 40, 1, 32]])
def test_ops_append_dequantize_attend(params):
    B, H, G, D, R, L = 2, 2, 3, 32, 32, 160
    st, cons, meta = _setup(B, H, D, R, L, params)
    g = torch.Generator().manual_seed(11)
    allk = torch.empty(B, H, 0, D)
    allv = torch.empty(B, H, 0, D)
    for T in [5, 40, 1, 30, 20, 1, 33, 1]:
        k = torch.randn(B, H, T, D, generator=g)
        k[..., 3] *= 15
        v = torch.randn(B, H, T, D, generator=g)
        torch.ops.qjl.append(st, cons, k, v, meta)
        allk, allv = torch.cat([allk, k], 2), torch.cat([allv, v], 2)
        n = allk.shape[2]
        assert int(st[0]) == n
        Kx, Vx = _expected_kv(allk, allv, n, T, R, L, cons, meta[3:])
        K, V = torch.ops.qjl.dequantize(st, cons, k, v, meta)
        torch.testing.assert_close(K, Kx, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(V, Vx, atol=1e-4, rtol=1e-4)
        q = torch.randn(B, H * G, T, D, generator=g)
        pos = torch.arange(L)
        qpos = n - T + torch.arange(T)
        mask = (pos[None, :] <= qpos[:, None]) & (pos[None, :] < n)
        Kg, Vg = K.repeat_interleave(G, 1), V.repeat_interleave(G, 1)
        want = F.scaled_dot_product_attention(q, Kg, Vg, attn_mask=mask)
        got = torch.ops.qjl.attend(q, st, cons, k, v, None, True, None, meta)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        sc = 0.5 / math.sqrt(D)
        got_m = torch.ops.qjl.attend(q, st, cons, k, v, mask[None, None], False, sc, meta)
        want_m = F.scaled_dot_product_attention(q, Kg, Vg, attn_mask=mask, scale=sc)
        torch.testing.assert_close(got_m, want_m, atol=1e-4, rtol=1e-4)
    assert allk.shape[2] == 131
    sink = params[4]
    if sink:  # the sink rows are the first tokens, exact (side dtype)
        torch.testing.assert_close(st[-2][:, :, :sink].float(), allk[:, :, :sink].half().float())
        assert st[-2].shape[2] == sink  # head-only: no rows past the sink


def test_ops_bf16_cache():
    st, cons, meta = _setup(1, 2, 64, 32, 96, [4, 4, 0, LSQ, 2], torch.bfloat16)
    k = torch.randn(1, 2, 70, 64, dtype=torch.bfloat16)
    v = torch.randn(1, 2, 70, 64, dtype=torch.bfloat16)
    torch.ops.qjl.append(st, cons, k, v, meta)
    K, V = torch.ops.qjl.dequantize(st, cons, k[:, :, -1:], v[:, :, -1:], meta)
    assert K.dtype == torch.bfloat16
    assert _rel(K[:, :, :64], k[:, :, :64]) < 0.15 and _rel(V[:, :, :64], v[:, :, :64]) < 0.15
    assert torch.equal(K[:, :, 64:70], k[:, :, 64:])


def test_opcheck():
    B, H, G, D, R, L = 1, 2, 2, 32, 32, 256
    for params in ([4, 2, 0, LSQ, 0], [3, 3, 1, LSQ, 4]):
        st, cons, meta = _setup(B, H, D, R, L, params)
        torch.ops.qjl.append(st, cons, torch.randn(B, H, 40, D), torch.randn(B, H, 40, D), meta)
        k1, v1 = torch.randn(B, H, 3, D), torch.randn(B, H, 3, D)
        torch.library.opcheck(torch.ops.qjl.append.default, (st, cons, k1, v1, meta))
        torch.library.opcheck(torch.ops.qjl.dequantize.default, (st, cons, k1, v1, meta))
        q = torch.randn(B, H * G, 3, D)
        torch.library.opcheck(torch.ops.qjl.attend.default, (q, st, cons, k1, v1, None, True, None, meta))


# ----------------------------------------------------------------------------------------------
# Config and QJLCache
# ----------------------------------------------------------------------------------------------
def test_config_fields_and_presets():
    from qjl_compile import QJLConfig

    for name in ("rotation4", "rotation3", "rotation-k4v3", "rotation-k4v2", "rotation-k4v3-match"):
        c = QJLConfig.preset(name, head_dim=64, num_layers=30)
        assert c.method == "rotation"
    assert QJLConfig.preset("rotation-k4v3-match", head_dim=64, num_layers=30).rotation_scale == "match"
    c = QJLConfig(method="rotation", rotation_key_bits=3, rotation_value_bits=2, rotation_initial_bits=4,
                  initial_layers=2)
    assert c.rotation_bits(0) == (4, 4) and c.rotation_bits(1) == (4, 4) and c.rotation_bits(2) == (3, 2)
    for kw, field in [(dict(rotation_key_bits=5), "rotation_key_bits"), (dict(rotation_value_bits=0), "rotation_value_bits"),
                      (dict(rotation_initial_bits=7), "rotation_initial_bits"),
                      (dict(rotation_scale="x"), "rotation_scale"), (dict(sink_tokens=-1), "sink_tokens"),
                      (dict(sink_tokens=200), "sink_tokens"),
                      (dict(rotation_unbiased=True, rotation_key_bits=1), "rotation_key_bits"),
                      (dict(rotation_unbiased=1), "rotation_unbiased"),
                      (dict(rotation_transform="dct"), "rotation_transform")]:
        with pytest.raises(ValueError, match=field):
            QJLConfig(method="rotation", **kw)
    with pytest.raises(ValueError, match="sink_tokens"):
        QJLConfig(method="qjl", sink_tokens=4)


def test_hadamard_transform_setup():
    # rotation_transform="hadamard": every layer's Pi is H diag(s) / sqrt(d) with its own signs, the reference
    # codes with it like any rotation, and a head_dim that is not a power of two is refused with the fix
    from qjl_compile import QJLConfig
    from qjl_compile.cache import _codec_setup

    cfg = QJLConfig.preset("rotation-k4v3-match", head_dim=64, num_layers=4, rotation_transform="hadamard")
    pis = [_codec_setup(cfg, i, 64, "cpu")[1][0] for i in (0, 1)]
    assert all(rot.hadamard_signs(p) is not None for p in pis) and not torch.equal(pis[0], pis[1])
    assert rot.hadamard_signs(_codec_setup(QJLConfig.preset("rotation-k4v3-match", head_dim=64, num_layers=4,
                                                            rotation_transform="haar"), 1, 64, "cpu")[1][0]) is None
    # the GPU presets take it where head_dim allows; the others keep Haar
    assert QJLConfig.preset("rotation-k4v3-match", head_dim=64).rotation_transform == "hadamard"
    assert QJLConfig.preset("rotation4", head_dim=128).rotation_transform == "hadamard"
    assert QJLConfig.preset("rotation-k4v3-match", head_dim=96).rotation_transform == "haar"
    assert QJLConfig.preset("rotation-mixed-35w8", head_dim=64).rotation_transform == "haar"
    with pytest.raises(ValueError, match="rotation_transform='haar'"):
        _codec_setup(QJLConfig(method="rotation", rotation_transform="hadamard"), 0, 96, "cpu")


def test_cache_setup_per_layer():
    from qjl_compile import QJLConfig
    from qjl_compile.cache import _codec_setup

    cfg = QJLConfig(method="rotation", rotation_key_bits=3, rotation_value_bits=2, rotation_initial_bits=4,
                    initial_layers=1, rotation_unbiased=True, sink_tokens=4, seed=9, rotation_value_layout="mma")
    c0, k0, p0 = _codec_setup(cfg, 0, 64)
    c1, k1, p1 = _codec_setup(cfg, 1, 64)
    # layer 0: 4-bit values at head_dim 64 are stored in fragment order; 2-bit ones stay rows
    assert c0 is CODEC and p0 == [4, 4, 1, LSQ, 4, rot.VFRAG, 128] and p1 == [3, 2, 1, LSQ, 4, 0, 128]
    auto = QJLConfig(method="rotation", rotation_key_bits=4, rotation_value_bits=3)       # "auto": per device
    assert _codec_setup(auto, 0, 64)[2][5] == 0 and _codec_setup(auto, 0, 64, "cpu")[2][5] == 0
    rows = QJLConfig(method="rotation", rotation_key_bits=4, rotation_value_bits=3, rotation_value_layout="rows")
    mma = QJLConfig(method="rotation", rotation_key_bits=4, rotation_value_bits=3, rotation_value_layout="mma")
    assert _codec_setup(rows, 0, 64)[2][5] == 0 and _codec_setup(mma, 0, 80)[2][5] == 0   # head_dim 80: rows
    if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0):
        assert _codec_setup(auto, 0, 64, "cuda")[2][5] == rot.VFRAG
    # "auto" keeps rows for layers the CUDA kernel does not serve (the Triton fallback would gather):
    # decided before any device query, so this holds on a machine without CUDA too
    from qjl_compile.cache import _value_frag
    for kw in (dict(rotation_key_bits=3), dict(rotation_unbiased=True), dict(rotation_center="kv"),
               dict(rotation_key_outliers=1)):
        c = QJLConfig(method="rotation", **{"rotation_key_bits": 4, "rotation_value_bits": 3, **kw})
        assert not _value_frag(c, 64, c.rotation_key_bits, 3, "cuda"), kw
    assert k0[1].numel() == 8 and k1[1].numel() == 4 and k1[2].numel() == 4 and k1[3].shape == (64, 64)
    assert not torch.allclose(k0[0], k1[0])                     # a rotation per layer
    assert torch.equal(k1[0], _codec_setup(cfg, 1, 64)[1][0])   # deterministic


def test_cache_in_tiny_llama():
    """QJLCache(method="rotation") in a random HF Llama, decoded in chunks crossing R: logits close
    to the exact cache, closer with more bits, and closer than the QJL reference preset.
    Measured max |diff| / max |logit| on this model: K4V4 ~0.14, K3V3 ~0.29, QJL reference ~0.68."""
    from transformers import DynamicCache

    from qjl_compile import QJLCache, QJLConfig
    from qjl_compile.models import tiny_llama

    model = tiny_llama(layers=2, hidden=128, heads=4, kv_heads=2)
    ids = torch.randint(1, 512, (2, 160), generator=torch.Generator().manual_seed(0))

    def run(cache):
        with torch.no_grad():
            return torch.cat([model(ids[:, i:i + 40], **cache_kwargs(cache, model)).logits for i in range(0, 160, 40)], 1)

    want = run(DynamicCache(config=model.config))
    scale = want.abs().max()
    err = {}
    for name, kw in [("rotation4", {}), ("rotation3", {}), ("rotation4", dict(sink_tokens=4)), ("reference", {})]:
        cfg = QJLConfig.for_model(model.config, name, residual=32, **kw)
        cache = QJLCache(model.config, 224, cfg)
        err[(name, bool(kw))] = ((run(cache) - want).abs().max() / scale).item()
        if name == "rotation4" and not kw:  # (cache.codec_bits counts a sink buffer per position)
            mem = cache.memory()
            assert mem["v_bits"] == pytest.approx(int(name[-1]) + 16 / 32)
    assert err[("rotation4", False)] < 0.3, err
    assert err[("rotation4", True)] < 0.3, err
    assert err[("rotation4", False)] < err[("rotation3", False)] < err[("reference", False)], err
    # the prefill of a fresh cache is exact whatever the codec
    cache = QJLCache(model.config, 224, QJLConfig.for_model(model.config, "rotation3", residual=32))
    with torch.no_grad():
        torch.testing.assert_close(model(ids, **cache_kwargs(cache, model)).logits,
                                   model(ids, **cache_kwargs(DynamicCache(config=model.config), model)).logits,
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("preset", ["rotation4", "rotation-k4v3-match"])
def test_value_layout_is_lossless_in_a_model(preset):
    # the fragment order only permutes the stored bits: a model decoding through either layout gives the
    # same logits, bit for bit (head_dim 64, chunks crossing R); "auto" on the CPU stores rows
    from qjl_compile import QJLCache, QJLConfig
    from qjl_compile.models import tiny_llama

    model = tiny_llama(layers=2, hidden=128, heads=2, kv_heads=1)
    ids = torch.randint(1, 512, (1, 150), generator=torch.Generator().manual_seed(1))
    out, metas = {}, {}
    for layout in ("rows", "mma"):
        cache = QJLCache(model.config, 192, QJLConfig.for_model(model.config, preset, residual=32,
                                                                 rotation_value_layout=layout))
        with torch.no_grad():
            out[layout] = torch.cat([model(ids[:, i:i + 50], **cache_kwargs(cache, model)).logits
                                     for i in range(0, 150, 50)], 1)
        metas[layout] = cache.layers[-1].meta
    assert metas["mma"][8] & rot.VFRAG and not metas["rows"][8] & rot.VFRAG
    assert torch.equal(out["rows"], out["mma"])
    auto = QJLCache(model.config, 192, QJLConfig.for_model(model.config, preset, residual=32))
    with torch.no_grad():
        model(ids[:, :40], **cache_kwargs(auto, model))
    assert not auto.layers[-1].meta[8] & rot.VFRAG
