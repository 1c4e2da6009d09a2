"""Kernel benchmark: fused QJL attention vs SDPA decode, other codecs' attend, QJL append vs prefill.

Llama-3-8B attention shape (32 q heads, 8 kv heads, d=128), bf16, decode q_len=1. QJL uses the
"reference" preset past the initial layers (m=256, m_out=128, o=8, 2-bit values, R=128).
Every row is timed in the same run with benchmarks/timer.py (CUDA events, median, L2 flushed,
CUDA-graph replay so launch overhead is out of both the peer and us).

Preset rows (``--presets``): each named QJLConfig preset's cache state for one layer past the
initial ones, filled with random tokens by the codec's append (its Triton kernel, or the reference
where the codec has none), timed through ``torch.ops.qjl.attend`` (the codec's fused kernel, or
SDPA over the sync-free dequantization where it has none: see the note column). "MB read" counts
the live rows of the codec's allocated buffers plus ring, q and output (the floor; a codec
without a fused kernel reads more). "vs ref" is the time over the "reference" preset's at that size.

    python benchmarks/kbench.py [--out benchmarks/results/kernels.json] [--quick] [--presets a,b]
    python benchmarks/kbench.py --smoke        # CPU: builds and checks every preset row, no timing
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

try:
    from benchmarks.timer import bench, copy_bandwidth, env_header
except ImportError:  # run as a script
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from timer import bench, copy_bandwidth, env_header

from qjl_compile.config import QJLConfig
from qjl_compile.kernels import reference as ref


def _triton_kernels():
    """The QJL launchers; imported on use so --help and --smoke run where triton is missing."""
    from qjl_compile.kernels.triton.qjl_append import qjl_append_
    from qjl_compile.kernels.triton.qjl_attend import qjl_attend
    return qjl_append_, qjl_attend

HQ, H, D = 32, 8, 128
DTYPE = torch.bfloat16
# variants timed beside the default launch (name, qjl_attend keyword arguments)
VARIANTS = [("ng=4 w4 corr=0", dict(ng=4, num_warps=4, corr=0)),
            ("ng=4 w4 corr=1", dict(ng=4, num_warps=4, corr=1)),
            ("ng=8 w8 corr=0", dict(ng=8, num_warps=8, corr=0)),
            ("ng=8 w8 corr=1", dict(ng=8, num_warps=8, corr=1)),
            ("ng=4 w4 corr=0 paired", dict(ng=4, num_warps=4, corr=0, pair=True))]
DECODE = [(1, 4096), (1, 16384), (1, 65536), (1, 131072), (16, 4096), (16, 16384)]
PRESETS = "reference,rotation-k4v3,rotation4,decoquant4"


def qjl_setup(B, L, cfg, seed=0):
    m, mo = cfg.sketch_dims(cfg.initial_layers)          # a layer past the initial ones
    S = ref.sketch(D, m, seed, 0).cuda()
    So = ref.sketch(D, mo, seed, 1).cuda()
    params = [cfg.outliers, cfg.value_bits, cfg.value_group]
    meta = [0, cfg.residual, L, *params]
    st = ref.make_state(ref.CODECS[0], B, H, L, D, cfg.residual, [S, So], params, DTYPE,
                        cfg.torch_side_dtype, "cuda")
    return st, [S, So], meta


def fill(st, consts, meta, n, chunk=16384):
    """Store n random tokens (prompt in chunks to bound memory)."""
    B = st[1].shape[0]
    done = 0
    while done < n:
        T = min(chunk, n - done)
        k = torch.randn(B, H, T, D, device="cuda", dtype=DTYPE)
        _triton_kernels()[0](st, consts, k, torch.randn_like(k), meta)
        done += T


def qjl_bytes(st, n, B, Tq=1):
    """Bytes the fused attend must read/write: live codec rows, ring, q, new tokens, output."""
    R = st[1].shape[2]
    c = n // R * R
    tot = 0
    for t in st[3:]:
        rows = t.shape[2]
        per = (st[3].shape[2] // rows) if rows else 1
        tot += t[:, :, : c // per].numel() * t.element_size()
    tot += 2 * B * H * (n - c) * D * 2                    # ring K/V
    tot += 2 * B * HQ * Tq * D * 2                        # q in, out
    return tot


def decode_rows(B, L, cfg, copy_gbs):
    qjl_append_, qjl_attend = _triton_kernels()
    rows = []
    n = L
    kv_bytes = 2 * B * H * n * D * 2
    q = torch.randn(B, HQ, 1, D, device="cuda", dtype=DTYPE)
    peer = {}
    for name, dt in (("sdpa fp16", torch.float16), ("sdpa bf16", torch.bfloat16)):
        k = torch.randn(B, H, n, D, device="cuda", dtype=dt)
        v = torch.randn_like(k)
        qd = q.to(dt)
        qg = qd.reshape(B, H, HQ // H, D)                 # GQA as 4 query rows per kv head (Tq=1)
        ms_g = bench(lambda: F.scaled_dot_product_attention(qg, k, v), graph=True)
        ms_e = bench(lambda: F.scaled_dot_product_attention(qd, k, v, enable_gqa=True), graph=True)
        ms = min(ms_g, ms_e)
        peer[name] = ms
        rows.append(dict(B=B, L=L, impl=name, ms=ms, MB=kv_bytes / 1e6, GBs=kv_bytes / ms / 1e6,
                         pct_copy=100 * kv_bytes / ms / 1e6 / copy_gbs, speedup=None,
                         note=f"grouped-q {ms_g:.4f} ms, enable_gqa {ms_e:.4f} ms"))
        del k, v
    torch.cuda.empty_cache()
    st, consts, meta = qjl_setup(B, L, cfg)
    fill(st, consts, meta, n - 1)
    k1 = torch.randn(B, H, 1, D, device="cuda", dtype=DTYPE)
    v1 = torch.randn_like(k1)
    qjl_append_(st, consts, k1, v1, meta)
    # correctness spot check against the reference on this very state (subset of heads is enough)
    out = qjl_attend(q, st, consts, k1, v1, None, True, None, meta)
    if B * n <= 16384 * 16:
        want = ref.attend(q, st, consts, k1, v1, None, True, None, meta)
        err = ((out.float() - want.float()).norm() / want.float().norm()).item()
    else:
        err = float("nan")
    nb = qjl_bytes(st, n, B)
    ms = bench(lambda: qjl_attend(q, st, consts, k1, v1, None, True, None, meta), graph=True)
    ms_eager = bench(lambda: qjl_attend(q, st, consts, k1, v1, None, True, None, meta), graph=False)
    best_peer = min(peer.values())
    for name, kw in VARIANTS:
        o_v = qjl_attend(q, st, consts, k1, v1, None, True, None, meta, **kw)
        e_v = ((o_v.float() - want.float()).norm() / want.float().norm()).item() if err == err else float("nan")
        ms_v = bench(lambda: qjl_attend(q, st, consts, k1, v1, None, True, None, meta, **kw), graph=True)
        rows.append(dict(B=B, L=L, impl=f"qjl attend {name}", ms=ms_v, MB=nb / 1e6, GBs=nb / ms_v / 1e6,
                         pct_copy=100 * nb / ms_v / 1e6 / copy_gbs, speedup=best_peer / ms_v,
                         note=f"rel err vs reference {e_v:.1e}"))
    rows.append(dict(B=B, L=L, impl="qjl fused attend", ms=ms, MB=nb / 1e6, GBs=nb / ms / 1e6,
                     pct_copy=100 * nb / ms / 1e6 / copy_gbs, speedup=best_peer / ms,
                     note=f"eager {ms_eager:.4f} ms, rel err vs reference {err:.1e}"))
    for r in rows[:2]:
        r["speedup"] = best_peer / r["ms"]
    del st
    torch.cuda.empty_cache()
    return rows

# rotation-codec launch variants timed beside the default (name, rotation_attend keyword arguments)
ROT_VARIANTS = [("bt=32 w4", dict(bt=32, num_warps=4)),
                ("bt=64 w8", dict(bt=64, num_warps=8)),
                ("bt=128 w8", dict(bt=128, num_warps=8))]


def preset_setup(name, B, L, device, seed=0):
    """One layer's cache for preset `name` (a layer past the initial ones): (state, consts, meta, has_kernel).
    ``name:field=value[:...]`` overrides QJLConfig fields (strings as written, ints and bools parsed),
    e.g. ``rotation-k4v3-match:rotation_value_layout=rows``."""
    from qjl_compile.cache import _codec_setup
    from qjl_compile.kernels import triton as qjl_triton
    base, *ovs = name.split(":")
    kw = {}
    for o in ovs:
        k, v = o.split("=", 1)
        kw[k] = {"true": True, "false": False}.get(v.lower(), int(v) if v.lstrip("-").isdigit() else v)
    cfg = QJLConfig.preset(base, head_dim=D, **kw)
    codec, consts, params = _codec_setup(cfg, cfg.initial_layers, D, device)
    consts = [c.to(device) for c in consts]
    meta = [codec.id, cfg.residual, L, *params]
    st = ref.make_state(codec, B, H, L, D, cfg.residual, consts, params, DTYPE, cfg.torch_side_dtype, device)
    kern = device != "cpu" and qjl_triton.has_kernels(codec.id)
    if kern:
        qjl_triton.prepare(codec.id, consts, DTYPE)
    return st, consts, meta, kern


def preset_fill(st, consts, meta, n, device, chunk=16384, gen=None):
    """Store n random tokens through torch.ops.qjl.append (the codec's kernel or the reference)."""
    B = st[1].shape[0]
    done = 0
    while done < n:
        T = min(chunk, n - done)
        k = torch.randn(B, H, T, D, generator=gen, device=device).to(DTYPE)
        v = torch.randn(B, H, T, D, generator=gen, device=device).to(DTYPE)
        torch.ops.qjl.append(st, consts, k, v, meta)
        done += T


def codec_bytes(st, consts, meta, n, B, Tq=1):
    """Bytes a fused attend must read/write: the live rows of every codec buffer (rows per position
    and head-only sink buffers from the codec's specs), exact ring tokens, q and output."""
    codec, R = ref.codec_of(meta), int(meta[1])
    c = n // R * R
    tot = 0
    for t, spec in zip(st[3:], codec.specs(D, consts, meta[3:])):
        tot += t[:, :, : min(c // spec.per, t.shape[2])].numel() * t.element_size()
    tot += 2 * B * H * (n - c) * D * st[1].element_size()
    tot += 2 * B * HQ * Tq * D * st[1].element_size()
    return tot


def preset_rows(B, L, names, copy_gbs, best_peer, device="cuda", timed=True):
    """Rows of the named presets at (B, L): attend through torch.ops.qjl, vs SDPA and vs "reference"."""
    rows = []
    gen = torch.Generator(device=device).manual_seed(1)
    q = torch.randn(B, HQ, 1, D, generator=gen, device=device).to(DTYPE)
    ms_ref = None
    for name in sorted(names, key=lambda x: x != "reference"):      # the "vs ref" baseline first
        st, consts, meta, kern = preset_setup(name, B, L, device)
        preset_fill(st, consts, meta, L - 1, device, gen=gen)
        k1 = torch.randn(B, H, 1, D, generator=gen, device=device).to(DTYPE)
        v1 = torch.randn(B, H, 1, D, generator=gen, device=device).to(DTYPE)
        torch.ops.qjl.append(st, consts, k1, v1, meta)

        def att():
            return torch.ops.qjl.attend(q, st, consts, k1, v1, None, True, None, meta)

        out = att()
        if B * L <= 16384 * 16:
            want = ref.attend(q, st, consts, k1, v1, None, True, None, meta)
            err = ((out.float() - want.float()).norm() / want.float().norm()).item()
        else:
            want, err = None, float("nan")
        nb = codec_bytes(st, consts, meta, L, B)
        path = "fused kernel" if kern else ("reference" if device == "cpu" else "no kernel: SDPA over dequantize_nosync")
        note = f"{path}, rel err vs reference {err:.1e}"
        if not timed:
            rows.append(dict(B=B, L=L, impl=f"{name} attend", ms=None, MB=nb / 1e6, GBs=None, pct_copy=None,
                             speedup=None, vs_ref=None, rel_err=err, note=note))
            continue
        try:
            ms = bench(att, graph=True)
        except RuntimeError as e:                       # a path that cannot be captured: eager timing
            ms, note = bench(att, graph=False), note + f"; eager (capture failed: {str(e)[:60]})"
        if name == "reference":
            ms_ref = ms
        rows.append(dict(B=B, L=L, impl=f"{name} attend", ms=ms, MB=nb / 1e6, GBs=nb / ms / 1e6,
                         pct_copy=100 * nb / ms / 1e6 / copy_gbs, speedup=best_peer / ms,
                         vs_ref=None if ms_ref is None else ms / ms_ref, rel_err=err, note=note))
        if kern and meta[0] == 2:
            from qjl_compile.kernels.triton.rotation import rotation_attend
            for vname, kw in ROT_VARIANTS:
                def run_v():
                    return rotation_attend(q, st, consts, k1, v1, None, True, None, meta, **kw)
                o_v = run_v()
                e_v = ((o_v.float() - want.float()).norm() / want.float().norm()).item() if want is not None else float("nan")
                ms_v = bench(run_v, graph=True)
                rows.append(dict(B=B, L=L, impl=f"{name} attend {vname}", ms=ms_v, MB=nb / 1e6, GBs=nb / ms_v / 1e6,
                                 pct_copy=100 * nb / ms_v / 1e6 / copy_gbs, speedup=best_peer / ms_v,
                                 vs_ref=None if ms_ref is None else ms_v / ms_ref, rel_err=e_v,
                                 note=f"rotation_attend direct, rel err vs reference {e_v:.1e}"))
        del st, out, want
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def smoke(names):
    """CPU: build, fill and attend every preset at a tiny size through the reference ops (no timing)."""
    from tabulate import tabulate
    rows = preset_rows(1, 300, names, copy_gbs=None, best_peer=None, device="cpu", timed=False)
    for r in rows:
        if not r["rel_err"] < 1e-5:                     # the reference vs itself: must agree
            sys.exit(f"smoke: {r['impl']} rel err {r['rel_err']}")
    print(tabulate([[r["B"], r["L"], r["impl"], f"{r['MB']:.3f}", r["note"]] for r in rows],
                   headers=["B", "L", "impl", "MB read", "note"]))


def append_rows(cfg, n=32768):
    qjl_append_, _ = _triton_kernels()
    st, consts, meta = qjl_setup(1, n, cfg)
    k = torch.randn(1, H, n, D, device="cuda", dtype=DTYPE)
    v = torch.randn_like(k)

    def app():
        st[0].zero_()
        qjl_append_(st, consts, k, v, meta)

    ms_app = bench(app, warmup=3, rep=20)
    q = torch.randn(1, HQ, n, D, device="cuda", dtype=DTYPE)
    kr = k.repeat_interleave(HQ // H, 1)
    vr = v.repeat_interleave(HQ // H, 1)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        ms_pre = bench(lambda: F.scaled_dot_product_attention(q, kr, vr, is_causal=True), warmup=3, rep=20)
    nbytes = 2 * H * n * D * 2 + qjl_bytes(st, n, 1, Tq=0)
    flops_pre = 4 * HQ * n * n * D / 2
    return [dict(B=1, L=n, impl="qjl append (32k prompt)", ms=ms_app, MB=nbytes / 1e6, GBs=nbytes / ms_app / 1e6,
                 pct_copy=None, speedup=None, note=f"{100 * ms_app / ms_pre:.1f}% of prefill attention"),
            dict(B=1, L=n, impl="sdpa flash causal prefill", ms=ms_pre, MB=None, GBs=None, pct_copy=None,
                 speedup=None, note=f"{flops_pre / ms_pre / 1e9:.0f} TFLOP/s")]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "kernels.json"))
    ap.add_argument("--quick", action="store_true", help="only B=1 L=4k and B=16 L=4k")
    ap.add_argument("--sizes", default=None, help="decode sizes as BxL list, e.g. 1x4096,16x16384")
    ap.add_argument("--no-append", action="store_true", help="skip the append vs prefill rows")
    ap.add_argument("--presets", default=PRESETS,
                    help=f"QJLConfig presets timed through torch.ops.qjl.attend per size ('' for none; default {PRESETS})")
    ap.add_argument("--smoke", action="store_true", help="CPU check of the preset rows' setup (no timing, no GPU)")
    args = ap.parse_args(argv)
    names = [x for x in args.presets.split(",") if x]
    for nm in names:
        QJLConfig.preset(nm)                            # unknown names fail before any GPU work
    if args.smoke:
        return smoke(names)
    if not torch.cuda.is_available():
        sys.exit("benchmarks/kbench.py needs a CUDA GPU")
    from tabulate import tabulate
    header = env_header()
    print(header, flush=True)
    cfg = QJLConfig.preset("reference")
    copy_gbs = copy_bandwidth()
    print(f"copy bandwidth: {copy_gbs:.0f} GB/s (read + write)", flush=True)
    rows = []
    sizes = DECODE[:1] + DECODE[4:5] if args.quick else DECODE
    if args.sizes:
        sizes = [tuple(int(x) for x in bl.split("x")) for bl in args.sizes.split(",")]
    for B, L in sizes:
        t0 = time.time()
        rows += decode_rows(B, L, cfg, copy_gbs)
        if names:
            best_peer = min(r["ms"] for r in rows if r["B"] == B and r["L"] == L and r["impl"].startswith("sdpa"))
            rows += preset_rows(B, L, names, copy_gbs, best_peer)
        print(f"  B={B} L={L}: {time.time() - t0:.1f}s", flush=True)
    if not args.no_append:
        rows += append_rows(cfg)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(env=header, copy_GBs=copy_gbs, command=" ".join(["python"] + sys.argv), rows=rows), f, indent=1)
    fmt = [[r["B"], r["L"], r["impl"], f"{r['ms'] * 1e3:.1f}", "" if r["MB"] is None else f"{r['MB']:.1f}",
            "" if r["GBs"] is None else f"{r['GBs']:.0f}", "" if r["pct_copy"] is None else f"{r['pct_copy']:.0f}%",
            "" if r["speedup"] is None else f"{r['speedup']:.2f}x",
            "" if r.get("vs_ref") is None else f"{r['vs_ref']:.2f}x", r["note"]] for r in rows]
    print(f"\n{header}; copy bandwidth {copy_gbs:.0f} GB/s")
    print(tabulate(fmt, headers=["B", "L", "impl", "us", "MB read", "GB/s", "% copy", "speedup", "vs ref", "note"]))


if __name__ == "__main__":
    main()
