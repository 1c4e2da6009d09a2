"""QJL key centering (QJLConfig.qjl_center): reference math, Triton append (interpreter on CPU)
against the reference, bit accounting from the buffers, and the refusals/routes of the fused
attend kernels (Triton, CUDA C++) that do not implement it."""
import logging

import pytest
import torch

from kernel_env import DEV  # noqa: F401  (sets TRITON_INTERPRET without a GPU)
from qjl_compile.config import QJLConfig
from qjl_compile.kernels import checks
from qjl_compile.kernels import reference as ref

QJL = ref.CODECS[0]


def make(B, H, D, L, R, m, mo, o, center, dtype=torch.float32, dev="cpu", seed=0):
    S = ref.sketch(D, m, seed, 0).to(dev)
    So = ref.sketch(D, mo, seed, 1).to(dev) if mo else torch.zeros(0, D, device=dev)
    params = [o, 2, 16] + ([R] if center else [])
    st = ref.make_state(QJL, B, H, L, D, R, [S, So], params, dtype, torch.float16, dev)
    return st, [S, So], [0, R, L, *params]


def _keys(B, H, N, D, gen, shift=4.0):
    # real keys share a large mean direction: a common offset per head
    return torch.randn(B, H, N, D, generator=gen) + shift * torch.randn(1, H, 1, D, generator=gen)


def test_center_identity_and_mean_exact():
    """q . k_hat == the sketch-domain score (eager stays exact); the stored mean is the block's."""
    gen = torch.Generator().manual_seed(1)
    B, H, D, R = 1, 2, 32, 32
    st, consts, meta = make(B, H, D, 96, R, 64, 32, 4, center=True)
    k, v = _keys(B, H, 70, D, gen), torch.randn(B, H, 70, D, generator=gen)
    ref.append_(st, consts, k, v, meta)
    assert len(st) == 12 and st[11].shape == (B, H, 3, D)
    torch.testing.assert_close(st[11][:, :, :2].float(), k[:, :, :64].reshape(B, H, 2, R, D).mean(-2),
                               atol=2e-3, rtol=1e-3)
    bufs = ref._rows(st[3:], QJL.specs(D, consts, meta[3:]), 64)
    q = torch.randn(B, H, 5, D, generator=gen)
    khat = QJL.keys(bufs, consts, meta[3:])
    torch.testing.assert_close(QJL.scores(q, bufs, consts, meta[3:]), q @ khat.transpose(-1, -2),
                               atol=1e-3, rtol=1e-4)
    # attend (sketch-domain scores) == SDPA over the dequantized K/V (eager path)
    qa = torch.randn(B, H * 2, 3, D, generator=gen)
    kn, vn = k[:, :, -3:], v[:, :, -3:]
    a = ref.attend(qa, st, consts, kn, vn, None, True, None, meta)
    b = ref.attend_nosync(qa, st, consts, kn, vn, None, True, None, meta)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_center_cuts_error_on_offset_keys():
    """With a large shared key mean, centering must cut the score error (the variance term
    grows with the norm the sketch sees); with plain QJL the offset dominates it."""
    gen = torch.Generator().manual_seed(2)
    B, H, D, R, N = 1, 2, 64, 64, 256
    k = _keys(B, H, N, D, gen, shift=3.0)
    q = torch.randn(B, H, 16, D, generator=gen)
    exact = q @ k.transpose(-1, -2)
    errs = {}
    for center in (False, True):
        st, consts, meta = make(B, H, D, N, R, 64, 32, 4, center)
        ref.append_(st, consts, k, torch.zeros_like(k), meta)
        bufs = ref._rows(st[3:], QJL.specs(D, consts, meta[3:]), N)
        errs[center] = (QJL.scores(q, bufs, consts, meta[3:]) - exact).pow(2).mean().item()
    assert errs[True] < 0.5 * errs[False], errs


def test_center_bits_counted():
    """The block means are counted: 16/R bits more per key value, values unchanged."""
    from transformers import LlamaConfig

    from qjl_compile import QJLCache

    mc = LlamaConfig(hidden_size=128, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=2,
                     intermediate_size=64, vocab_size=64, max_position_embeddings=1024)
    base = QJLConfig.for_model(mc, "reference")
    mem = {c: QJLCache(mc, 1024, base.replace(qjl_center=c), batch_size=1, device="cpu",
                       dtype=torch.float16).memory() for c in (False, True)}
    assert mem[True]["k_bits"] == pytest.approx(mem[False]["k_bits"] + 16 / base.residual)
    assert mem[True]["v_bits"] == mem[False]["v_bits"]
    with pytest.raises(ValueError, match="qjl_center"):
        QJLConfig(method="rotation", qjl_center=True)


def test_check_qjl_old_and_new_meta():
    st, consts, meta = make(1, 1, 32, 64, 32, 32, 16, 2, center=False)
    assert len(meta) == 6 and not checks.qjl_center(meta)
    checks.check_qjl(st, consts, meta, "t")
    stc, consts, metac = make(1, 1, 32, 64, 32, 32, 16, 2, center=True)
    assert checks.qjl_center(metac)
    checks.check_qjl(stc, consts, metac, "t")
    with pytest.raises(ValueError, match="12 tensors"):
        checks.check_qjl(st, consts, metac, "t")
    with pytest.raises(ValueError, match="center"):
        checks.check_qjl(stc, consts, metac[:6] + [5], "t")


def test_cuda_cpp_refuses_center():
    from qjl_compile.kernels.cuda import qjl as cq

    stc, consts, metac = make(1, 1, 64, 256, 128, 128, 128, 2, center=True)
    why = cq.unsupported(torch.zeros(1, 1, 1, 64), stc, consts, metac)
    assert "qjl_center" in why


triton = pytest.importorskip("triton")


@pytest.mark.parametrize("steps", [[45, 1, 50, 3], [130]])
def test_triton_append_center_matches_reference(steps):
    from qjl_compile.kernels.triton.qjl_append import qjl_append_

    gen = torch.Generator().manual_seed(3)
    B, H, D, R = 1, 2, 32, 32
    st_r, consts, meta = make(B, H, D, 160, R, 32, 16, 4, center=True, dtype=torch.float16)
    st_t = [x.clone() for x in st_r]
    ks = []
    for T in steps:
        k = _keys(B, H, T, D, gen).half()
        v = torch.randn(B, H, T, D, generator=gen).half()
        ks.append(k)
        ref.append_(st_r, consts, k, v, meta)
        qjl_append_(st_t, consts, k, v, meta)
    n = int(st_r[0])
    c = n // R * R
    assert int(st_t[0]) == n and c
    specs = QJL.specs(D, consts, meta[3:])
    t = [x[:, :, : c // s.per] for x, s in zip(st_t[3:], specs)]
    r = [x[:, :, : c // s.per] for x, s in zip(st_r[3:], specs)]
    torch.testing.assert_close(t[8].float(), r[8].float(), atol=2e-3, rtol=1e-3)   # block means
    assert torch.equal(t[4], r[4]), "outlier channels (picked on centered keys) differ"
    torch.testing.assert_close(t[1].float(), r[1].float(), rtol=2e-3, atol=2e-3)   # inlier norms
    flips = (ref.unpack_bits(t[0]) != ref.unpack_bits(r[0])).float().mean().item()
    assert flips < 2e-3, flips                                                   # only near-0 projections
    # the kernel-built state scores like the reference state
    q = torch.randn(B, H * 2, 1, D, generator=gen).half()
    kn, vn = st_r[1][:, :, :0], st_r[2][:, :, :0]
    a = ref.attend(q, st_t, consts, kn, vn, None, False, None, meta).float()
    b = ref.attend(q, st_r, consts, kn, vn, None, False, None, meta).float()
    assert ((a - b).norm() / b.norm()).item() < 2e-2


def test_triton_attend_refuses_center_and_dispatch_routes(caplog):
    from qjl_compile.kernels import triton as kt
    from qjl_compile.kernels.triton.qjl_attend import qjl_attend

    gen = torch.Generator().manual_seed(4)
    B, H, D, R = 1, 1, 32, 32
    st, consts, meta = make(B, H, D, 96, R, 32, 16, 2, center=True, dtype=torch.float16)
    k = _keys(B, H, 40, D, gen).half()
    v = torch.randn(B, H, 40, D, generator=gen).half()
    ref.append_(st, consts, k, v, meta)
    q = torch.randn(B, 2, 1, D, generator=gen).half()
    kn, vn = k[:, :, -1:], v[:, :, -1:]
    with pytest.raises(NotImplementedError, match="qjl_center"):
        qjl_attend(q, st, consts, kn, vn, None, True, None, meta)
    kt._NOTED.discard("qjl-center")
    before = kt.ROUTES["sdpa"]
    with caplog.at_level(logging.WARNING, logger=kt.__name__):
        out = kt._attend_cuda(q, st, consts, kn, vn, None, True, None, meta)
        kt._attend_cuda(q, st, consts, kn, vn, None, True, None, meta)
    assert kt.ROUTES["sdpa"] == before + 2
    assert sum("qjl_center" in r.getMessage() for r in caplog.records) == 1       # said once
    want = ref.attend(q, st, consts, kn, vn, None, True, None, meta)
    torch.testing.assert_close(out.float(), want.float(), atol=2e-3, rtol=2e-3)


def test_triton_append_center_without_outliers_matches_reference():
    """m480-center-v4's layout (issue 17): centering, no outlier channels, no outlier sketch (m_out=0)."""
    from qjl_compile.kernels.triton.qjl_append import qjl_append_

    gen = torch.Generator().manual_seed(5)
    B, H, D, R = 1, 2, 32, 32
    st_r, consts, meta = make(B, H, D, 96, R, 32, 0, 0, center=True, dtype=torch.float16)
    assert consts[1].shape == (0, D)
    st_t = [x.clone() for x in st_r]
    k = _keys(B, H, 70, D, gen).half()
    v = torch.randn(B, H, 70, D, generator=gen).half()
    ref.append_(st_r, consts, k, v, meta)
    qjl_append_(st_t, consts, k, v, meta)
    assert int(st_t[0]) == 70
    torch.testing.assert_close(st_t[11][:, :, :2].float(), st_r[11][:, :, :2].float(), atol=2e-3, rtol=1e-3)
    flips = (ref.unpack_bits(st_t[3][:, :, :64]) != ref.unpack_bits(st_r[3][:, :, :64])).float().mean().item()
    assert flips < 2e-3, flips
    torch.testing.assert_close(st_t[4][:, :, :64].float(), st_r[4][:, :, :64].float(), rtol=2e-3, atol=2e-3)
