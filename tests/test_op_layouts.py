"""Every route of every qjl op returns exactly its fake's shape, dtype and strides (issue 14).

Inductor plans a compiled graph from the fake (meta) implementation; a real implementation that
returns another layout fails as "incorrect fake kernel" (stride mismatch) or, worse, is read with
the wrong strides. The routes, enumerated on CPU tensors (the CUDA routes are plain Python
functions over torch ops / Triton launchers, so they run on CPU, Triton under TRITON_INTERPRET=1):

    qjl::attend      CPU reference op | CUDA dispatcher `_attend_cuda`: fused Triton kernel (few query
                     rows) and SDPA over the sync-free dequantization (many rows, ref.attend_nosync)
    qjl::dequantize  CPU reference (host-read length) | sync-free (every other device)
    qjl::append      returns nothing, as its fake

q is given the way HF hands it to attention: a (B, T, Hq, D) projection viewed as (B, Hq, T, D).
"""
import os

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: launchers run on CPU

from qjl_compile import QJLConfig  # noqa: E402
from qjl_compile.cache import _codec_setup  # noqa: E402
from qjl_compile.kernels import ops  # noqa: E402,F401
from qjl_compile.kernels import reference as ref  # noqa: E402
from qjl_compile.kernels import triton as qjl_triton  # noqa: E402

PRESETS = {"qjl": "reference", "decoquant": "decoquant4", "rotation": "rotation-k4v3"}
B, H, D, R, L = 3, 2, 64, 64, 320
INTERP = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def layer(codec_name, dtype, past=150, new=1):
    """One layer's state on CPU after a compressed past (`past` tokens, >= one block) and `new` tokens."""
    cfg = QJLConfig.preset(PRESETS[codec_name], head_dim=D, num_layers=2, residual=R)
    codec, consts, params = _codec_setup(cfg, 0, D)
    st = ref.make_state(codec, B, H, L, D, R, consts, params, dtype, torch.float16, "cpu")
    meta = [codec.id, R, L, *params]
    g = torch.Generator().manual_seed(0)
    for T in (past, new):
        k = torch.randn(B, H, T, D, generator=g).to(dtype)
        v = torch.randn(B, H, T, D, generator=g).to(dtype)
        assert torch.ops.qjl.append(st, consts, k, v, meta) is None
    return st, consts, k, v, meta


def hf_query(Tq, G, dtype):
    """(B, Hq, Tq, D) as HF makes it: view(B, Tq, Hq, D).transpose(1, 2), not contiguous."""
    q = torch.randn(B, Tq, H * G, D).to(dtype).transpose(1, 2)
    assert Tq == 1 or not q.is_contiguous()
    return q


def hf_mask(Tq, n, kind):
    """HF's static-cache mask over L for a left-padded batch (row 1 padded by 5), bool or additive."""
    pos = torch.arange(L)
    q_pos = n - Tq + torch.arange(Tq)
    m = (pos[None, :] <= q_pos[:, None]) & (pos[None, :] < n)
    m = m[None, None].repeat(B, 1, 1, 1)
    m[1, :, :, :5] = False
    if kind == "float":
        return torch.zeros(m.shape).masked_fill(~m, torch.finfo(torch.float32).min)
    return m


def fake_of(op, *args):
    """Run `op`'s registered fake on fake copies of `args` (tensors, lists of tensors)."""
    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        def conv(a):
            if isinstance(a, torch.Tensor):
                return mode.from_tensor(a)
            if isinstance(a, (list, tuple)):
                return type(a)(conv(x) for x in a)
            return a
        return op(*[conv(a) for a in args])


def significant(t):
    """Strides of the dims with more than one element (a size-1 dim's stride is never used)."""
    return tuple(st if n > 1 else None for n, st in zip(t.shape, t.stride()))


def assert_like(real, fake, route):
    assert real.shape == fake.shape, f"{route}: shape {tuple(real.shape)} != fake {tuple(fake.shape)}"
    assert real.dtype == fake.dtype, f"{route}: dtype {real.dtype} != fake {fake.dtype}"
    assert significant(real) == significant(fake), f"{route}: strides {real.stride()} != fake {fake.stride()}"


# (query tokens, GQA group): rows = Tq * G per kv head; > MAX_FUSED_ROWS takes the SDPA route on CUDA
CASES = [(1, 7), (4, 2), (300 - 150, 7), (33, 2)]


@pytest.mark.parametrize("codec_name", list(PRESETS))
@pytest.mark.parametrize("Tq,G", CASES)
@pytest.mark.parametrize("dtype,mask", [(torch.float32, "causal"), (torch.bfloat16, "bool"),
                                        (torch.bfloat16, "float")])
def test_attend_routes_return_the_fake_layout(codec_name, Tq, G, dtype, mask):
    st, consts, k, v, meta = layer(codec_name, dtype, past=150, new=Tq)
    n = int(st[0])
    q = hf_query(Tq, G, dtype)
    m = None if mask == "causal" else hf_mask(Tq, n, mask)
    args = (q, st, consts, k, v, m, mask == "causal", None, meta)
    fake = fake_of(torch.ops.qjl.attend.default, *args)
    assert significant(fake) == significant(torch.empty_like(q))  # the fake: q's layout, (B, T, Hq, D) memory

    cpu = torch.ops.qjl.attend(*args)
    assert_like(cpu, fake, "CPU reference op")

    fused = qjl_triton._kernel(meta[0], 1) is not None and Tq * G <= qjl_triton.MAX_FUSED_ROWS
    if fused and not INTERP:
        pytest.skip("the fused Triton route runs on CPU tensors only under TRITON_INTERPRET=1")
    route = "CUDA fused Triton kernel" if fused else "CUDA SDPA over sync-free dequantization"
    cuda = qjl_triton._attend_cuda(*args)
    assert_like(cuda, fake, route)
    torch.testing.assert_close(cuda.float(), cpu.float(), rtol=2e-2, atol=2e-2)

    # the raw SDPA fallback really returns another layout for HF's q: the dispatcher is what fixes it
    raw = ref.attend_nosync(*args)
    torch.testing.assert_close(raw.float(), cpu.float(), rtol=2e-2, atol=2e-2)
    if Tq > 1:
        assert significant(raw) != significant(fake), "ref.attend_nosync changed layout: update this test's premise"


@pytest.mark.parametrize("codec_name", list(PRESETS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dequantize_routes_return_the_fake_layout(codec_name, dtype):
    st, consts, k, v, meta = layer(codec_name, dtype, past=150, new=3)
    fake = fake_of(torch.ops.qjl.dequantize.default, st, consts, k, v, meta)
    routes = {"CPU reference op": torch.ops.qjl.dequantize(st, consts, k, v, meta),
              "sync-free (non-CPU devices)": ref.dequantize_nosync(st, consts, k, v, meta)}
    for name, (K, V) in routes.items():
        assert_like(K, fake[0], f"{name} K")
        assert_like(V, fake[1], f"{name} V")


def test_like_fake_copies_only_when_needed():
    q = hf_query(5, 2, torch.float32)
    right = torch.empty_like(q).copy_(q)
    assert ops.like_fake(q, right) is right
    wrong = q.contiguous()
    fixed = ops.like_fake(q, wrong)
    assert fixed.stride() == right.stride() and fixed.stride() != wrong.stride() and torch.equal(fixed, wrong)
    cast = ops.like_fake(q, q.double().contiguous())
    assert cast.dtype == q.dtype and cast.stride() == right.stride()
