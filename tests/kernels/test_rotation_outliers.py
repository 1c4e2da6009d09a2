"""Rotation codec, opt-in exact outlier tokens (issue 17; params key_outliers / value_outliers,
QJLConfig.rotation_key_outliers / rotation_value_outliers): reference against a direct computation,
the default format unchanged, bit accounting, the ops across flushes, and the Triton refusal."""
import math

import pytest
import torch
import torch.nn.functional as F

from qjl_compile import QJLCache, QJLConfig
from qjl_compile.kernels import ops  # noqa: F401  (torch.ops.qjl.*)
from qjl_compile.kernels import reference as ref
from qjl_compile.kernels import rotation as rot

CODEC = ref.CODECS[2]
MATCH = rot.SCALE_MODES["match"]


def _data(B, H, N, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(B, H, N, D, generator=g) + 2.0 * torch.randn(D, generator=g)   # a shared mean direction
    k = k * torch.exp(0.8 * torch.randn(B, H, N, 1, generator=g))                   # heavy-tailed token norms
    v = torch.randn(B, H, N, D, generator=g) * torch.exp(0.8 * torch.randn(B, H, N, 1, generator=g))
    return k, v


def _direct(x, x_plain, t, block):
    """Replace, per block, the t rows of largest ||x - x_plain||^2 by x (side dtype), by a loop."""
    out = x_plain.clone()
    B, H, N, _ = x.shape
    for b in range(B):
        for h in range(H):
            for s in range(0, N, block):
                err = (x[b, h, s:s + block] - x_plain[b, h, s:s + block]).pow(2).sum(-1)
                for j in torch.argsort(err, descending=True)[:t].tolist():
                    out[b, h, s + j] = x[b, h, s + j].half().float()
    return out


@pytest.mark.parametrize("params", [[3, 3, 0, MATCH, 0, 1, 32], [3, 2, 1, MATCH, 0, 0, 32], [2, 3, 0, 2, 0, 3, 64]])
@pytest.mark.parametrize("tk,tv", [(2, 0), (0, 3), (1, 1)])
def test_reference_matches_direct(params, tk, tv):
    B, H, D, N = 2, 2, 32, 128
    block = params[6]
    k, v = _data(B, H, N, D)
    consts = rot.make_consts(D, params[0], params[1], params[2], 7, 1)
    plain = CODEC.compress(k, v, consts, params)
    kp, vp = CODEC.decompress(plain, consts, params)
    full = [*params, tk, tv]
    bufs = CODEC.compress(k, v, consts, full)
    # the existing buffers are unchanged (same values, same order), the new ones appended
    assert len(bufs) == len(plain) + 2 * (bool(tk) + bool(tv))
    for a, b in zip(plain, bufs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    names = [s.name for s in CODEC.specs(D, consts, full)]
    assert names[:len(plain)] == [s.name for s in CODEC.specs(D, consts, params)]
    assert names[len(plain):] == (["kout", "kopos"] if tk else []) + (["vout", "vopos"] if tv else [])
    K, V = CODEC.decompress(bufs, consts, full)
    torch.testing.assert_close(K, _direct(k, kp, tk, block), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(V, _direct(v, vp, tv, block), atol=1e-5, rtol=1e-5)
    q = torch.randn(B, H, 5, D, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(CODEC.scores(q, bufs, consts, full), q @ K.transpose(-1, -2), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(CODEC.values(bufs, consts, full), V)


def test_outliers_cut_the_error():
    B, H, D, N = 1, 4, 64, 256
    k, v = _data(B, H, N, D, seed=5)
    consts = rot.make_consts(D, 3, 3, 0, 1, 0)
    base = [3, 3, 0, MATCH, 0, 1, 128]
    errs = {}
    for t in (0, 2, 8):
        K, V = CODEC.decompress(CODEC.compress(k, v, consts, [*base, t, t]), consts, [*base, t, t])
        errs[t] = ((K - k).pow(2).sum() / k.pow(2).sum()).item(), ((V - v).pow(2).sum() / v.pow(2).sum()).item()
    assert errs[8][0] < errs[2][0] < errs[0][0] and errs[8][1] < errs[2][1] < errs[0][1]
    assert errs[2][0] < 0.97 * errs[0][0]


def test_parse_and_bad_params():
    assert rot.outlier_tokens([3, 3, 0, 1, 4]) == (0, 0)
    assert rot.outlier_tokens([3, 3, 0, 1, 4, 1, 128]) == (0, 0)
    assert rot.outlier_tokens([3, 3, 0, 1, 4, 1, 128, 2, 1]) == (2, 1)
    assert rot.parse([3, 3, 0, 1, 4, 1, 128, 2, 1]) == rot.parse([3, 3, 0, 1, 4, 1, 128])   # 7 values, as before
    with pytest.raises(ValueError, match="key_outliers"):
        rot.parse([3, 3, 0, 1, 4, 1, 128, 200, 0])
    with pytest.raises(ValueError, match="key_outliers"):
        rot.parse([3, 3, 0, 1, 4, 1, 128, 0, -1])
    with pytest.raises(ValueError, match="params must be"):
        rot.parse([3, 3, 0, 1, 4, 1, 128, 2])
    with pytest.raises(ValueError, match="rotation_key_outliers"):
        QJLConfig(method="qjl", rotation_key_outliers=1)
    with pytest.raises(ValueError, match="rotation_value_outliers"):
        QJLConfig(method="rotation", residual=128, rotation_value_outliers=129)


def _tiny_cfg():
    from transformers import LlamaConfig
    return LlamaConfig(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                       num_hidden_layers=2, vocab_size=64, intermediate_size=64)


@pytest.mark.parametrize("tk,tv", [(0, 0), (2, 0), (1, 3)])
def test_config_meta_and_bits(tk, tv):
    mcfg = _tiny_cfg()
    D, R, L = 32, 128, 1024
    cfg = QJLConfig(method="rotation", rotation_key_bits=3, rotation_value_bits=3, rotation_center="k",
                    residual=R, sink_tokens=4, rotation_key_outliers=tk, rotation_value_outliers=tv)
    cache = QJLCache(mcfg, L, cfg, batch_size=1, device="cpu", dtype=torch.float16)
    meta = cache.compressed_layers[0].meta
    assert meta[3:] == ([3, 3, 0, 2, 4, 1, R] + ([tk, tv] if tk or tv else []))   # default: today's 7 params
    mem = cache.memory()
    base_k = 3 + 16 / D + 16 / R           # codes + scale + block mean
    base_v = 3 + 16 / D
    assert mem["k_bits"] == pytest.approx(base_k + tk * (16 * D + 16) / (R * D))
    assert mem["v_bits"] == pytest.approx(base_v + tv * (16 * D + 16) / (R * D))


def test_ops_across_flushes():
    """append in uneven steps, dequantize and attend equal one compress of the whole prefix."""
    B, H, G, D, R, L = 1, 2, 2, 32, 32, 160
    params = [3, 2, 0, MATCH, 3, 1, R, 2, 1]
    consts = rot.make_consts(D, 3, 2, 0, 0, 0)
    st = ref.make_state(CODEC, B, H, L, D, R, consts, params, torch.float32, torch.float16, "cpu")
    meta = [2, R, L, *params]
    specs = CODEC.specs(D, consts, params)
    g = torch.Generator().manual_seed(2)
    allk, allv = torch.empty(B, H, 0, D), torch.empty(B, H, 0, D)
    for T in [5, 40, 1, 30, 20, 1, 33]:
        k, v = _data(B, H, T, D, seed=T)
        torch.ops.qjl.append(st, consts, k, v, meta)
        allk, allv = torch.cat([allk, k], 2), torch.cat([allv, v], 2)
        n = allk.shape[2]
        c1, cl = n // R * R, min(n // R * R, n - T)
        Kx, Vx = torch.zeros(B, H, L, D), torch.zeros(B, H, L, D)
        if cl:
            bufs = CODEC.compress(allk[:, :, :c1], allv[:, :, :c1], consts, params)
            bufs = [b[:, :, :s.head] if s.head else b for b, s in zip(bufs, specs)]
            kc, vc = CODEC.decompress(bufs, consts, params)
            Kx[:, :, :cl], Vx[:, :, :cl] = kc[:, :, :cl], vc[:, :, :cl]
        Kx[:, :, cl:n], Vx[:, :, cl:n] = allk[:, :, cl:n], allv[:, :, cl:n]
        K, V = torch.ops.qjl.dequantize(st, consts, k, v, meta)
        torch.testing.assert_close(K, Kx, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(V, Vx, atol=1e-4, rtol=1e-4)
        q = torch.randn(B, H * G, T, D, generator=g)
        mask = (torch.arange(L)[None, :] <= (n - T + torch.arange(T))[:, None]) & (torch.arange(L)[None, :] < n)
        want = F.scaled_dot_product_attention(q, K.repeat_interleave(G, 1), V.repeat_interleave(G, 1),
                                              attn_mask=mask, scale=1 / math.sqrt(D))
        torch.testing.assert_close(torch.ops.qjl.attend(q, st, consts, k, v, None, True, None, meta), want,
                                   atol=1e-4, rtol=1e-4)
        K2, _ = ref.dequantize_nosync(st, consts, k, v, meta, block=64)      # block-wise (sync-free) path
        torch.testing.assert_close(K2, K, atol=1e-5, rtol=1e-5)


def test_triton_launchers_refuse():
    pytest.importorskip("triton")
    from qjl_compile.kernels.triton.rotation import check_rotation
    D, R, L = 32, 32, 64
    params = [3, 3, 0, MATCH, 0, 1, R, 1, 0]
    consts = rot.make_consts(D, 3, 3, 0, 0, 0)
    st = ref.make_state(CODEC, 1, 2, L, D, R, consts, params, torch.float16, torch.float16, "cpu")
    for what in ("rotation_append_", "rotation_attend"):
        with pytest.raises(NotImplementedError, match=f"{what}: exact outlier tokens .* not implemented in the "
                                                      "fused Triton rotation kernels"):
            check_rotation(st, consts, [2, R, L, *params], what)
    # today's format passes the same check
    st7 = ref.make_state(CODEC, 1, 2, L, D, R, consts, params[:7], torch.float16, torch.float16, "cpu")
    check_rotation(st7, consts, [2, R, L, *params[:7]], "rotation_attend")
