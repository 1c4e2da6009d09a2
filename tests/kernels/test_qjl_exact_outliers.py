"""QJL with the outlier channels stored exactly (QJLConfig.qjl_exact_outliers, issue 17): reference
math (the scores are the dequantized keys' inner products, the outlier channels come back exact),
lower score error than the outlier sketch it replaces at fewer bits, bit accounting, and the
refusals of the fused kernels and of a CUDA cache."""
import pytest
import torch

from kernel_env import DEV  # noqa: F401  (sets TRITON_INTERPRET without a GPU)
from qjl_compile.config import QJLConfig
from qjl_compile.kernels import checks
from qjl_compile.kernels import reference as ref

QJL = ref.CODECS[0]


def make(B, H, D, L, R, m, mo, o, center, exact, seed=0):
    S = ref.sketch(D, m, seed, 0)
    So = ref.sketch(D, mo, seed, 1) if mo else torch.zeros(0, D)
    params = [o, 2, 16] + ([R if center else 0, 1] if exact else ([R] if center else []))
    st = ref.make_state(QJL, B, H, L, D, R, [S, So], params, torch.float32, torch.float16, "cpu")
    return st, [S, So], [0, R, L, *params]


def _keys(B, H, N, D, gen):
    # a few heavy channels per head, as real keys have, plus a shared offset
    k = torch.randn(B, H, N, D, generator=gen) + 2.0 * torch.randn(1, H, 1, D, generator=gen)
    k[..., :3] *= 8.0
    return k


@pytest.mark.parametrize("center", [False, True])
def test_exact_outliers_identity_and_channels(center):
    gen = torch.Generator().manual_seed(1)
    B, H, D, R, o = 1, 2, 32, 32, 4
    st, consts, meta = make(B, H, D, 96, R, 64, 0, o, center, True)
    k, v = _keys(B, H, 70, D, gen), torch.randn(B, H, 70, D, generator=gen)
    ref.append_(st, consts, k, v, meta)
    bufs = ref._rows(st[3:], QJL.specs(D, consts, meta[3:]), 64)
    assert bufs[3].shape == (B, H, 64, 0) and bufs[-1].shape == (B, H, 64, o)
    khat = QJL.keys(bufs, consts, meta[3:])
    idx = bufs[4].long().repeat_interleave(ref.GROUP, dim=-2)              # (B, H, 64, o)
    torch.testing.assert_close(khat.gather(-1, idx), k[:, :, :64].gather(-1, idx), atol=2e-2, rtol=2e-3)
    q = torch.randn(B, H, 5, D, generator=gen)
    torch.testing.assert_close(QJL.scores(q, bufs, consts, meta[3:]), q @ khat.transpose(-1, -2),
                               atol=2e-3, rtol=1e-4)
    qa = torch.randn(B, H * 2, 3, D, generator=gen)
    a = ref.attend(qa, st, consts, k[:, :, -3:], v[:, :, -3:], None, True, None, meta)
    b = ref.attend_nosync(qa, st, consts, k[:, :, -3:], v[:, :, -3:], None, True, None, meta)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_exact_outliers_cut_the_score_error():
    """Against the outlier sketch of the same size in bits (o * 16 rows), exact channels must give a
    lower score error: they remove that sketch's variance, which the heavy channels dominate."""
    gen = torch.Generator().manual_seed(2)
    B, H, D, R, N, o = 1, 2, 64, 64, 256, 4
    k = _keys(B, H, N, D, gen)
    q = torch.randn(B, H, 16, D, generator=gen)
    exact = q @ k.transpose(-1, -2)
    errs = {}
    for ex in (False, True):
        st, consts, meta = make(B, H, D, N, R, 128, 0 if ex else 16 * o, o, True, ex)
        ref.append_(st, consts, k, torch.zeros_like(k), meta)
        bufs = ref._rows(st[3:], QJL.specs(D, consts, meta[3:]), N)
        errs[ex] = (QJL.scores(q, bufs, consts, meta[3:]) - exact).pow(2).mean().item()
    assert errs[True] < 0.7 * errs[False], errs


def test_exact_outliers_bits_and_config():
    from transformers import LlamaConfig

    from qjl_compile import QJLCache

    mc = LlamaConfig(hidden_size=128, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=2,
                     intermediate_size=64, vocab_size=64, max_position_embeddings=1024)
    base = QJLConfig.preset("m512-center-o4", head_dim=64, num_layers=2)
    mem = {x: QJLCache(mc, 1024, base.replace(qjl_exact_outliers=x), batch_size=1, device="cpu",
                       dtype=torch.float16).memory() for x in (False, True)}
    # the outlier sketch (64 rows at head_dim 64) and its norm (16 bits) go, 4 exact fp16 channels come
    d = 64
    assert mem[True]["k_bits"] == pytest.approx(mem[False]["k_bits"] - (64 + 16) / d + 4 * 16 / d)
    assert mem[True]["v_bits"] == mem[False]["v_bits"]
    assert QJLConfig.preset("m512-center-o4x", head_dim=64, num_layers=2) == base.replace(qjl_exact_outliers=True)
    with pytest.raises(ValueError, match="qjl_exact_outliers"):
        QJLConfig(outliers=0, outlier_sketch_dim=0, outlier_sketch_dim_initial=0, qjl_exact_outliers=True)
    with pytest.raises(ValueError, match="qjl_exact_outliers"):
        QJLConfig(method="rotation", qjl_exact_outliers=True)
    assert QJLConfig(outlier_sketch_dim=0, outlier_sketch_dim_initial=0, qjl_exact_outliers=True).sketch_dims(0)[1] == 0
    with pytest.raises(ValueError, match="reference \\(CPU\\) codec only"):
        QJLCache(mc, 1024, base.replace(qjl_exact_outliers=True), batch_size=1, device="meta", dtype=torch.float16)


def test_fused_kernels_refuse_exact_outliers():
    from qjl_compile.kernels.cuda import qjl as cq

    st, consts, meta = make(1, 1, 64, 256, 128, 128, 0, 4, True, True)
    assert "qjl_exact_outliers" in cq.unsupported(torch.zeros(1, 1, 1, 64), st, consts, meta)
    with pytest.raises(NotImplementedError, match="qjl_exact_outliers"):
        checks.check_qjl(st, consts, meta, "t")


def test_layer_sketch_dims_schedule():
    from transformers import LlamaConfig

    from qjl_compile import QJLCache

    c = QJLConfig.preset("m512-center-o4x", head_dim=64, num_layers=4)
    sched = c.replace(qjl_layer_sketch_dims=(64, 128, 256, 512))
    assert [sched.sketch_dims(i)[0] for i in range(4)] == [64, 128, 256, 512]
    with pytest.raises(ValueError, match="one entry per layer"):
        sched.sketch_dims(4)
    with pytest.raises(ValueError, match="qjl_layer_sketch_dims"):
        QJLConfig(qjl_layer_sketch_dims=(100,))
    with pytest.raises(ValueError, match="qjl_layer_sketch_dims"):
        QJLConfig(method="rotation", qjl_layer_sketch_dims=(128,))
    # a preset's schedule is written for head_dim 128 and 32 layers: scaled and resampled by depth
    from qjl_compile import config as qc
    qc.PRESETS["_t"] = dict(qc.PRESETS["m512-center-o4x"], qjl_layer_sketch_dims=(128,) * 16 + (1024,) * 16)
    try:
        p = QJLConfig.preset("_t", head_dim=64, num_layers=4)
        assert p.qjl_layer_sketch_dims == (64, 64, 512, 512)
    finally:
        del qc.PRESETS["_t"]
    # bits follow the rows: the mean key sketch of 240 rows at head_dim 64 costs 240/64 bits
    mc = LlamaConfig(hidden_size=128, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=4,
                     intermediate_size=64, vocab_size=64, max_position_embeddings=1024)
    mem = {s: QJLCache(mc, 1024, cfg, batch_size=1, device="cpu", dtype=torch.float16).memory()
           for s, cfg in (("flat", c), ("sched", sched))}
    assert mem["sched"]["k_bits"] == pytest.approx(mem["flat"]["k_bits"] + (240 - 256) / 64)
