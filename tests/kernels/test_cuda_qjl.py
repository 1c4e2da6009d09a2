"""CUDA C++ QJL decode attention (kernels/cuda): layout math on CPU, sm_90 compiles without a GPU,
and the kernel against kernels/reference.py on a GPU."""
import math
import re
import subprocess

import pytest
import torch

from qjl_compile.kernels import reference as ref
from qjl_compile.kernels.cuda import available
from qjl_compile.kernels.cuda import qjl as cq

from kernel_env import CUDA, INTERP, assert_pdl_same_bits, capture_decode, decode_mask, gpu

nvrtc_ok = pytest.mark.skipif(not available()[0], reason=available()[1] or "NVRTC available")
needs_gpu = pytest.mark.skipif(not CUDA or INTERP or not available()[0], reason="needs CUDA and cuda-bindings")


@pytest.mark.parametrize("m", [128, 256, 512])
def test_mma_perm_is_the_register_expansion(m):
    perm = cq.mma_perm(m)
    assert sorted(perm) == list(range(m))
    wpl = m // 128
    # thread t of a fragment row owns words wpl*t .. wpl*t+wpl-1 of the token and builds register
    # (word >> s) & 0x01010101: its byte e is bit 8e + s. Check K positions against that rule.
    for c in range(m // 32):
        for t in range(4):
            for half in range(2):
                s = 2 * (c % 4) + half
                word = wpl * t + c // 4
                for e in range(4):
                    assert perm[c * 32 + 16 * half + 4 * t + e] == 32 * word + 8 * e + s


def test_mma_perm_refuses_other_sizes():
    with pytest.raises(ValueError, match="multiple of 128"):
        cq.mma_perm(96)


@pytest.mark.parametrize("m,d", [(256, 128), (128, 64)])
def test_sketch_planes_round_trip(m, d):
    S = ref.sketch(d, m, seed=3, salt=1)
    perm, planes, colsum, step = cq.sketch_planes(S)
    perm = perm.long().cpu()
    b = planes.cpu().reshape(d, m // 32, 4, 2, 2, 4)              # (D, c, t, plane, half, e)
    hi = b[:, :, :, 0].to(torch.int8).to(torch.int32)             # s8
    lo = b[:, :, :, 1].to(torch.int32)                            # u8
    Q = hi * 256 + lo                                             # (D, c, t, half, e)
    Q = Q.permute(0, 1, 3, 2, 4).reshape(d, m)                    # K order: c*32 + half*16 + 4t + e
    assert torch.equal(Q.sum(1).to(torch.int32), colsum.cpu())
    err = (Q.T.double() * step - S.double()[perm]).abs().max().item()
    assert err <= step / 2 + 1e-12, err


def _emulate_scores(q, bits, norm, obits, onorm, idx, S, So):
    """The kernel's score arithmetic in float64 on CPU: fixed-point S q, sign bits as 0/1,
    outlier correction through T_jc = <S[:, c], sign_j> (what qjl_split computes)."""
    m, d = S.shape
    perm, planes, colsum, step = cq.sketch_planes(S)
    sp = S.double()[perm.long()]
    sq = q.double() @ sp.T                                        # (Q, m) in K order
    sig = sq.abs().amax(-1, keepdim=True) / cq.QSTEP
    Qq = torch.round(sq / sig).clamp(-cq.QSTEP, cq.QSTEP)
    b = ref.unpack_bits(bits)[..., perm.long()].double()          # (N, m) in K order
    raw = sig.T * (2 * b @ Qq.T - Qq.sum(-1))                     # (N, Q) = <S q, sign>
    Qs = torch.round(sp / step).clamp(-cq.QSTEP, cq.QSTEP)        # (m, D)
    T = step * (2 * b @ Qs - Qs.sum(0))                           # (N, D): <S[:, c], sign_j>
    n = bits.shape[0]
    il = idx.long().repeat_interleave(32, 0)                      # (N, o)
    qsel = q.double()[:, il].permute(1, 0, 2)                     # (N, Q, o)
    c_in = ref.qjl_const(m, d)
    s = c_in * norm.double()[:, None] * (raw - torch.einsum("nqo,no->nq", qsel, T.gather(1, il)))
    if So.shape[0]:
        permo, _, _, stepo = cq.sketch_planes(So)
        spo = So.double()[permo.long()]
        Qo = torch.round(spo / stepo).clamp(-cq.QSTEP, cq.QSTEP)
        bo = ref.unpack_bits(obits)[..., permo.long()].double()
        To = stepo * (2 * bo @ Qo - Qo.sum(0))
        s = s + ref.qjl_const(So.shape[0], d) * onorm.double()[:, None] * torch.einsum("nqo,no->nq", qsel, To.gather(1, il))
    return s.T                                                    # (Q, N)


@pytest.mark.parametrize("d,m,mo,o", [(128, 256, 128, 8), (64, 128, 128, 5), (64, 256, 0, 0)])
def test_emulated_kernel_scores_match_reference(d, m, mo, o):
    g = torch.Generator().manual_seed(d + m + o)
    n = 96
    k = torch.randn(n, d, generator=g) * torch.linspace(0.2, 3, d)   # uneven channels: outliers matter
    q = torch.randn(4, d, generator=g)
    S = ref.sketch(d, m, seed=5, salt=0)
    So = ref.sketch(d, mo, seed=5, salt=1) if mo else torch.zeros(0, d)
    bits, norm, obits, onorm, idx = ref.qjl_quantize_keys(k, S, So, o)
    want = ref.qjl_scores(q, bits, norm, obits, onorm, idx, S, So).double()
    got = _emulate_scores(q, bits, norm, obits, onorm, idx, S, So)
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < 2e-4, rel            # fp16 norms are shared; the rest is 16-bit fixed point


# ---------------------------------------------------------------------------------------------
# sm_90 compiles on any machine (NVRTC needs no GPU)
# ---------------------------------------------------------------------------------------------
CONFIGS = [dict(D=128, MS=256, MO=128, NO=8, VB=2, VG=32, RR=128, NW=4, QDT=1, MK=3, CAUSAL=0, CAUSAL_C=0),
           dict(D=128, MS=256, MO=128, NO=8, VB=2, VG=32, RR=128, NW=4, QDT=1, MK=4, CAUSAL=0, CAUSAL_C=0, PK=1),
           dict(D=64, MS=128, MO=128, NO=5, VB=4, VG=32, RR=64, NW=4, QDT=0, MK=0, CAUSAL=1, CAUSAL_C=0, PK=1),
           dict(D=128, MS=512, MO=256, NO=8, VB=2, VG=32, RR=128, NW=4, QDT=0, MK=0, CAUSAL=1, CAUSAL_C=0, FMAOFF=1),
           dict(D=64, MS=256, MO=128, NO=8, VB=4, VG=32, RR=128, NW=4, QDT=0, MK=1, CAUSAL=0, CAUSAL_C=0),
           dict(D=64, MS=128, MO=0, NO=0, VB=2, VG=32, RR=32, NW=4, QDT=1, MK=2, CAUSAL=0, CAUSAL_C=1),
           dict(D=128, MS=256, MO=128, NO=5, VB=4, VG=64, RR=64, NW=4, QDT=1, MK=4, CAUSAL=0, CAUSAL_C=0),
           dict(D=128, MS=256, MO=128, NO=8, VB=2, VG=32, RR=128, NW=4, QDT=1, MK=4, CAUSAL=0, CAUSAL_C=0, PK=1,
                KST=1)]                     # the combine's exact keys staged by cp.async


def _cuobjdump():
    import os
    try:
        import triton
    except ImportError:
        pytest.skip("cuobjdump comes with the triton wheel")
    p = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(p):
        pytest.skip("no cuobjdump in the triton wheel")
    return p


def _assert_pdl(path, k, split_waits=True):
    # programmatic dependent launch: prep and split signal their dependents (PREEXIT), split and
    # combine wait for the kernel before them (ACQBULK) before reading its output (a split that computes
    # its query transform itself, FUSEQ, is the call's first kernel and waits for nothing)
    sass = subprocess.run([_cuobjdump(), "-sass", str(path)], capture_output=True, text=True, check=True).stdout
    fn = dict(re.findall(r"Function : (\w+)\n(.*?)(?=\n\s+Function : |\Z)", sass, re.S))
    assert "PREEXIT" in fn[f"{k}_prep"] and "PREEXIT" in fn[f"{k}_split"], "griddepcontrol.launch_dependents missing"
    assert ("ACQBULK" in fn[f"{k}_split"]) == split_waits and "ACQBULK" in fn[f"{k}_combine"], "griddepcontrol.wait"


@nvrtc_ok
@pytest.mark.parametrize("defines", CONFIGS, ids=lambda d: f"D{d['D']}m{d['MS']}mo{d['MO']}o{d['NO']}v{d['VB']}mk{d['MK']}pk{d.get('PK', 0)}")
def test_compiles_for_sm90(defines, tmp_path):
    from qjl_compile.kernels.cuda import compile_source
    cubin = compile_source("qjl_decode", defines, "sm_90")
    path = tmp_path / "k.cubin"
    path.write_bytes(cubin)
    res = subprocess.run([_cuobjdump(), "-res-usage", str(path)], capture_output=True, text=True, check=True).stdout
    regs = dict(re.findall(r"Function (\w+):\s+REG:\d+ STACK:(\d+)", res))
    assert set(regs) == set(cq.KERNELS), res
    if defines["MS"] <= 256:
        assert regs["qjl_split"] == "0", f"qjl_split spills at {defines}: {res}"
    sass = subprocess.run([_cuobjdump(), "-sass", "-fun", "qjl_split", str(path)], capture_output=True,
                          text=True, check=True).stdout
    assert "IMMA" in sass and "HMMA" in sass and "MOVM" in sass, "the MMA path is not in the machine code"
    _assert_pdl(path, "qjl")


@nvrtc_ok
def test_dependent_launch_config():
    # built without a GPU: the attribute that makes a launch programmatic-dependent, and its shape
    from cuda.bindings import driver
    from qjl_compile.kernels.cuda import pdl_config
    cfg = pdl_config((8, 33, 1), (128, 1, 1), 4096, driver.CUstream(0))
    assert (cfg.gridDimX, cfg.gridDimY, cfg.blockDimX, cfg.sharedMemBytes, cfg.numAttrs) == (8, 33, 128, 4096, 1)
    attr = cfg.attrs[0]
    assert attr.id == driver.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
    assert attr.value.programmaticStreamSerializationAllowed == 1


@nvrtc_ok
def test_compile_error_names_the_source():
    from qjl_compile.kernels.cuda import compile_source
    with pytest.raises(RuntimeError, match="qjl_decode.cu"):
        compile_source("qjl_decode", dict(D=128), "sm_90")        # macros missing: NVRTC's log is shown


@gpu
@needs_gpu
def test_unsupported_shapes_are_refused_with_the_reason():
    st, consts, meta, gen = _state(1, 1, 256, 128, 256, 128, 8, 2, 32, 128, 200, torch.bfloat16, seed=1)
    q = torch.randn(1, 16, 1, 128, generator=gen, device="cuda").to(torch.bfloat16)   # 16 rows per kv head
    kn = torch.zeros(1, 1, 1, 128, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(cq.Unsupported, match="query rows"):
        cq.qjl_attend_cuda(q, st, consts, kn, kn, None, True, None, meta)
    with pytest.raises(cq.Unsupported, match="dtype"):
        cq.qjl_attend_cuda(q[:, :4].float(), st, consts, kn, kn, None, True, None, meta)


def test_unsupported_reasons_on_cpu():
    st = [torch.zeros((), dtype=torch.int64), torch.zeros(1, 2, 128, 128, dtype=torch.bfloat16)] + [None] * 9
    q = torch.zeros(1, 4, 1, 128, dtype=torch.bfloat16)
    why = cq.unsupported(q, st, [torch.zeros(256, 128), torch.zeros(128, 128)], [0, 128, 1024, 8, 2, 32])
    assert why  # CPU tensors (or no NVRTC): never taken, and it says why
    assert ("CUDA" in why) or ("cuda-bindings" in why) or ("NVRTC" in why)


# ---------------------------------------------------------------------------------------------
# GPU: kernel vs reference
# ---------------------------------------------------------------------------------------------
def _state(B, H, L, D, m, mo, o, vb, vg, R, n, dtype, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    S = ref.sketch(D, m, seed, 0).cuda()
    So = ref.sketch(D, mo, seed, 1).cuda() if mo else torch.zeros(0, D, device="cuda")
    params = [o, vb, vg]
    meta = [0, R, L, *params]
    st = ref.make_state(ref.CODECS[0], B, H, L, D, R, [S, So], params, dtype, torch.float16, "cuda")
    scale = torch.linspace(0.3, 2.5, D, device="cuda")
    done = 0
    while done < n:
        T = min(4096, n - done)
        k = (torch.randn(B, H, T, D, generator=gen, device="cuda") * scale).to(dtype)
        v = torch.randn(B, H, T, D, generator=gen, device="cuda").to(dtype)
        ref.append_(st, [S, So], k, v, meta)
        done += T
    return st, [S, So], meta, gen


GRID = [  # B, H, G, Tq, D, m, mo, o, vb, vg, R, n, L, dtype
    (1, 2, 4, 1, 128, 256, 128, 8, 2, 32, 128, 1000, 1024, torch.bfloat16),
    (3, 2, 1, 1, 128, 256, 128, 8, 2, 32, 128, 1313, 2048, torch.float16),
    (2, 1, 8, 1, 64, 128, 128, 5, 4, 32, 64, 777, 800, torch.bfloat16),
    (1, 3, 2, 2, 128, 512, 256, 8, 2, 32, 128, 3000, 4096, torch.float16),
    (2, 2, 4, 2, 64, 256, 0, 0, 2, 32, 32, 129, 320, torch.bfloat16),
    (1, 8, 4, 1, 128, 256, 128, 8, 2, 32, 128, 20000, 20480, torch.bfloat16),
    (1, 1, 3, 1, 128, 512, 256, 8, 4, 64, 64, 500, 640, torch.float16),
]


@gpu
@needs_gpu
@pytest.mark.parametrize("case", GRID, ids=lambda c: f"B{c[0]}H{c[1]}G{c[2]}Tq{c[3]}D{c[4]}m{c[5]}o{c[7]}v{c[8]}n{c[11]}")
@pytest.mark.parametrize("mask", ["none", "bool_pos", "float_pos", "bool_row"])
def test_cuda_attend_matches_reference(case, mask):
    B, H, G, Tq, D, m, mo, o, vb, vg, R, n, L, dtype = case
    st, consts, meta, gen = _state(B, H, L, D, m, mo, o, vb, vg, R, n - Tq, dtype, seed=n + G)
    kn = torch.randn(B, H, Tq, D, generator=gen, device="cuda").to(dtype)
    vn = torch.randn(B, H, Tq, D, generator=gen, device="cuda").to(dtype)
    ref.append_(st, consts, kn, vn, meta)
    q = (torch.randn(B, H * G, Tq, D, generator=gen, device="cuda") * 2).to(dtype)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)             # HF's layout: a transposed view
    am, causal = decode_mask(mask, B, H * G, Tq, L, n, gen, dtype)
    want = ref.attend(q, st, consts, kn, vn, am, causal, None, meta)
    for kw in (dict(), dict(stage_keys=True)):            # KST: the combine's exact keys staged by cp.async
        out = cq.qjl_attend_cuda(q, st, consts, kn, vn, am, causal, None, meta, **kw)
        assert out.shape == q.shape and out.stride() == torch.empty_like(q).stride() and out.dtype == q.dtype
        assert torch.isfinite(out).all()
        rel = ((out.float() - want.float()).norm() / want.float().norm()).item()
        assert rel < (1e-2 if dtype == torch.bfloat16 else 4e-3), (kw, rel)


@gpu
@needs_gpu
@pytest.mark.parametrize("G", [1, 3, 4])
def test_packed_planes_match_two_plane_path(G):
    # <= 4 query rows: both S q planes in one MMA operand (PK) must give the two-MMA result
    B, H, D, L = 2, 2, 128, 2048
    st, consts, meta, gen = _state(B, H, L, D, 256, 128, 8, 2, 32, 128, 1500, torch.bfloat16, seed=11 + G)
    kn = torch.randn(B, H, 1, D, generator=gen, device="cuda").to(torch.bfloat16)
    ref.append_(st, consts, kn, kn, meta)
    q = (torch.randn(B, H * G, 1, D, generator=gen, device="cuda") * 2).to(torch.bfloat16)
    a = cq.qjl_attend_cuda(q, st, consts, kn, kn, None, True, None, meta, pack=True).float()
    b = cq.qjl_attend_cuda(q, st, consts, kn, kn, None, True, None, meta, pack=False).float()
    assert ((a - b).norm() / b.norm()).item() < 2e-3
    with pytest.raises(ValueError, match="pack=True needs <= 4"):
        q8 = torch.randn(B, H * 8, 1, D, device="cuda", dtype=torch.bfloat16)
        cq.qjl_attend_cuda(q8, st, consts, kn, kn, None, True, None, meta, pack=True)


@gpu
@needs_gpu
@pytest.mark.parametrize("L,n", [(4096, 3000), (131072, 131000)])
def test_dependent_launch_gives_the_same_bits(L, n):
    # PDL only moves when the split and the combine may start: the bits must equal the serialized launch
    B, H, G, D = 1, 8, 4, 128
    st, consts, meta, gen = _state(B, H, L, D, 256, 128, 8, 2, 32, 128, n - 1, torch.bfloat16, seed=23)
    assert_pdl_same_bits(cq.qjl_attend_cuda, st, consts, meta, gen, B, H, G, D)


@gpu
@needs_gpu
def test_cuda_attend_in_a_cuda_graph():
    B, H, G, D, L = 2, 4, 4, 128, 4096
    st, consts, meta, gen = _state(B, H, L, D, 256, 128, 8, 2, 32, 128, 3000, torch.bfloat16, seed=7)
    outs, wants = [], []
    kk = torch.randn(B, H, 1, D, generator=gen, device="cuda").to(torch.bfloat16)
    vv = torch.randn_like(kk)
    qq = torch.randn(B, H * G, 1, D, generator=gen, device="cuda").to(torch.bfloat16)
    from qjl_compile.kernels.triton.qjl_append import qjl_append_
    g, out = capture_decode(qjl_append_, cq.qjl_attend_cuda, st, consts, kk, vv, qq, meta)
    for _ in range(200):                      # crosses a residual flush (R = 128)
        kk.copy_(torch.randn(B, H, 1, D, generator=gen, device="cuda"))
        vv.copy_(torch.randn(B, H, 1, D, generator=gen, device="cuda"))
        qq.copy_(torch.randn(B, H * G, 1, D, generator=gen, device="cuda"))
        g.replay()
        want = ref.attend(qq, st, consts, kk, vv, None, True, None, meta)
        outs.append(out.float().clone())
        wants.append(want.float())
    o, w = torch.stack(outs), torch.stack(wants)
    rel = ((o - w).norm() / w.norm()).item()
    assert rel < 1e-2, rel
    assert int(st[0]) == 3200


@gpu
@needs_gpu
def test_dispatch_takes_the_cuda_kernel():
    from qjl_compile.kernels import triton as qjl_triton
    B, H, G, D, L = 1, 2, 4, 128, 2048
    st, consts, meta, gen = _state(B, H, L, D, 256, 128, 8, 2, 32, 128, 1500, torch.bfloat16, seed=9)
    q = torch.randn(B, H * G, 1, D, generator=gen, device="cuda").to(torch.bfloat16)
    kn = torch.randn(B, H, 1, D, generator=gen, device="cuda").to(torch.bfloat16)
    torch.ops.qjl.append(st, consts, kn, kn, meta)
    before = qjl_triton.ROUTES.copy()
    out = torch.ops.qjl.attend(q, st, consts, kn, kn, None, True, None, meta)
    assert qjl_triton.ROUTES["cuda"] == before.get("cuda", 0) + 1
    want = ref.attend(q, st, consts, kn, kn, None, True, None, meta)
    assert ((out.float() - want.float()).norm() / want.float().norm()).item() < 1e-2
    assert not math.isnan(out.float().sum().item())


def _macros(path):
    """#define NAME expr lines of the kernel source (only simple ones)."""
    out = {}
    for line in open(path):
        m = re.match(r"#define (ST_\w+) (.+?)\s*(//.*)?$", line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


@pytest.mark.parametrize("D,m,mo,vb,vg", [(128, 256, 128, 2, 32), (128, 512, 256, 4, 64), (64, 128, 0, 2, 32)])
def test_stage_bytes_match_the_kernel_layout(D, m, mo, vb, vg):
    import os
    src = os.path.join(os.path.dirname(cq.__file__), "qjl_decode.cu")
    env = dict(D=D, MS=m, MO=mo, VB=vb, VG=vg)
    vals = {}
    for name, expr in _macros(src).items():
        e = expr
        for k, v in {**env, **vals}.items():
            e = re.sub(rf"\b{k}\b", str(v), e)
        vals[name] = eval(e.replace("/", "//"))
    assert vals["ST_SIZE"] == cq.stage_bytes(D, m, mo, vb, vg)
    for k in ("ST_OBITS", "ST_NORM", "ST_CODE", "ST_SCALE", "ST_ZERO", "ST_SIZE"):
        assert vals[k] % 16 == 0, (k, vals[k])        # cp.async 16-byte pieces stay aligned


@pytest.mark.parametrize("B,H,LC", [(1, 8, 4096), (1, 8, 131072), (16, 8, 16384), (64, 8, 1024), (1, 1, 128)])
def test_launch_table_covers_the_cache(B, H, LC):
    nw, ns = cq._config(B, H, LC)
    assert 1 <= ns <= 32 and nw == 4
    chunk, ns2 = cq.split_plan(LC, ns, nw)
    assert chunk % (32 * nw) == 0 and chunk * ns2 >= LC and chunk * (ns2 - 1) < LC and ns2 <= ns
