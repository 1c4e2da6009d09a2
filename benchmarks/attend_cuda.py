"""CUDA C++ decode attention (QJL; rotation codec with --presets) vs the Triton kernels vs bf16 SDPA.

Llama-3-8B attention shape (32 q / 8 kv heads, d=128), bf16, decode q_len=1, the QJL "reference"
preset past the initial layers (m=256, m_out=128, o=8, 2-bit values, R=128). CUDA-graph replay,
L2 flushed, medians of CUDA events (benchmarks/timer.py).

    python benchmarks/attend_cuda.py [--sizes 1x4096,1x32768,1x131072,16x16384] [--out results/x.json]
        [--presets rotation4,rotation-k4v3-match]   (other codecs' presets: Triton and CUDA C++ rows)
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kbench import D, DTYPE, H, HQ, codec_bytes, fill, preset_fill, preset_setup, qjl_bytes, qjl_setup  # noqa: E402
from timer import bench, copy_bandwidth, env_header  # noqa: E402

from qjl_compile.config import QJLConfig  # noqa: E402
from qjl_compile.kernels import reference as ref  # noqa: E402


def call_args(B, L, kw):
    """(attn_mask, is_causal, launcher kwargs) of a variant: mask=f32 / bool is HF's decode mask
    (B, 1, 1, L) with every position visible (what the e2e decode passes), instead of is_causal."""
    kw = dict(kw)
    m = kw.pop("mask", None)
    if m is None:
        return None, True, kw
    am = torch.ones(B, 1, 1, L, dtype=torch.bool, device="cuda")
    return (am if m == "bool" else torch.zeros(B, 1, 1, L, device="cuda")), False, kw


def preset_rows(B, L, names, copy_gbs, ms_sdpa, variants=(("default", {}),)):
    """Per preset (another codec): its Triton kernel and, where it covers the preset, the CUDA C++
    kernel, on one layer's cache (a layer past the initial ones), same q / timer as the QJL rows."""
    from qjl_compile.kernels import triton as qjl_triton
    from qjl_compile.kernels.cuda import qjl as cq
    out = []
    gen = torch.Generator(device="cuda").manual_seed(2)
    q = torch.randn(B, HQ, 1, D, generator=gen, device="cuda").to(DTYPE)
    for name in names:
        st, consts, meta, kern = preset_setup(name, B, L, "cuda")
        preset_fill(st, consts, meta, L - 1, "cuda", gen=gen)
        k1 = torch.randn(B, H, 1, D, generator=gen, device="cuda").to(DTYPE)
        v1 = torch.randn(B, H, 1, D, generator=gen, device="cuda").to(DTYPE)
        torch.ops.qjl.append(st, consts, k1, v1, meta)
        want = None
        if B * L <= 16 * 16384:
            want = ref.attend(q, st, consts, k1, v1, None, True, None, meta).float()
        nb = codec_bytes(st, consts, meta, L, B)
        cands = []
        tri = qjl_triton._kernel(int(meta[0]), 1)
        if tri is not None:
            cands.append(("triton", lambda tri=tri: tri(q, st, consts, k1, v1, None, True, None, meta)))
        spec = qjl_triton.CPP_KERNELS.get(int(meta[0]))
        why = "no CUDA C++ kernel for this codec"
        if spec is not None:
            import importlib
            mod = importlib.import_module(f"qjl_compile.kernels.cuda.{spec[0]}")
            why = mod.unsupported(q, st, consts, meta)
            if not why:
                fn = getattr(mod, spec[1])
                for vname, kw in variants:
                    am, causal, kw = call_args(B, L, kw)
                    cands.append(("cuda" if vname == "default" else f"cuda {vname}",
                                  lambda fn=fn, kw=kw, am=am, causal=causal: fn(q, st, consts, k1, v1, am, causal, None, meta, **kw)))
        if why:
            print(f"{name}: CUDA C++ kernel not run ({why})")
        for impl, fn in cands:
            try:
                o = fn()
            except cq.Unsupported as e:
                print(f"{name} {impl}: {e}")
                continue
            e = float("nan") if want is None else ((o.float() - want).norm() / want.norm()).item()
            ms = bench(fn, graph=True)
            out.append(dict(B=B, L=L, impl=f"{name} {impl}", us=ms * 1e3, MB=nb / 1e6,
                            pct_copy=100 * nb / ms / 1e6 / copy_gbs, speedup=ms_sdpa / ms, err=e))
        del st
        torch.cuda.empty_cache()
    return out


def rows_for(B, L, copy_gbs, variants, presets=(), pvariants=(("default", {}),)):
    from qjl_compile.kernels.cuda.qjl import qjl_attend_cuda
    from qjl_compile.kernels.triton.qjl_append import qjl_append_
    from qjl_compile.kernels.triton.qjl_attend import qjl_attend
    out = []
    q = torch.randn(B, HQ, 1, D, device="cuda", dtype=DTYPE)
    k = torch.randn(B, H, L, D, device="cuda", dtype=DTYPE)
    v = torch.randn_like(k)
    qg = q.reshape(B, H, HQ // H, D)
    kvb = 2 * B * H * L * D * 2
    ms_g = bench(lambda: F.scaled_dot_product_attention(qg, k, v), graph=True)
    ms_e = bench(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), graph=True)
    ms_sdpa = min(ms_g, ms_e)     # the faster of grouped query rows and enable_gqa (backends differ by size)
    out.append(dict(B=B, L=L, impl="sdpa bf16", us=ms_sdpa * 1e3, MB=kvb / 1e6, pct_copy=100 * kvb / ms_sdpa / 1e6 / copy_gbs,
                    speedup=1.0, err=0.0))
    del k, v
    torch.cuda.empty_cache()
    if not variants:                                  # --no-qjl
        return out + (preset_rows(B, L, presets, copy_gbs, ms_sdpa, pvariants) if presets else [])
    cfg = QJLConfig.preset("reference", head_dim=D)
    st, consts, meta = qjl_setup(B, L, cfg)
    fill(st, consts, meta, L - 1)
    k1 = torch.randn(B, H, 1, D, device="cuda", dtype=DTYPE)
    v1 = torch.randn_like(k1)
    qjl_append_(st, consts, k1, v1, meta)
    nb = qjl_bytes(st, L, B)
    want = None
    if B * L <= 16 * 16384:
        want = ref.attend(q, st, consts, k1, v1, None, True, None, meta).float()

    def err(o):
        return float("nan") if want is None else ((o.float() - want).norm() / want.norm()).item()

    cands = [("triton v4", lambda: qjl_attend(q, st, consts, k1, v1, None, True, None, meta))]
    for name, kw in variants:
        am, causal, kw = call_args(B, L, kw)
        cands.append((f"cuda {name}", lambda kw=kw, am=am, causal=causal: qjl_attend_cuda(q, st, consts, k1, v1, am, causal,
                                                                                      None, meta, **kw)))
    for name, fn in cands:
        o = fn()
        e = err(o)
        ms = bench(fn, graph=True)
        out.append(dict(B=B, L=L, impl=name, us=ms * 1e3, MB=nb / 1e6, pct_copy=100 * nb / ms / 1e6 / copy_gbs,
                        speedup=ms_sdpa / ms, err=e))
    del st
    torch.cuda.empty_cache()
    if presets:
        out += preset_rows(B, L, presets, copy_gbs, ms_sdpa, pvariants)
    return out


# variant key -> (launcher keyword, value type)
VARIANT_KEYS = {"nw": ("num_warps", int), "ns": ("nsplit", int), "st": ("stages", int), "sqsmem": ("sq_smem", int),
                "minb": ("min_blocks", int), "pk": ("pack", bool), "fo": ("fma_shifts", bool), "fq": ("fuse_q", bool),
                "ki": ("key_int8", bool), "pdl": ("pdl", bool), "pipe": ("pipe", bool), "early": ("early", bool),
                "smask": ("stage_mask", bool), "had": ("hadamard", bool), "sk": ("stage_keys", bool)}


def parse_variants(text):
    """'default;ns=64 minb=4' -> [(name, launcher keyword arguments)]; mask=f32 / bool: HF's decode mask
    (B, 1, 1, L), all visible, instead of is_causal (`call_args`)."""
    variants = []
    for v in text.split(";"):
        kw = {}
        for tok in v.split():
            if tok == "default":
                continue
            key, val = tok.split("=")
            if key == "mask":
                if val not in ("f32", "bool"):
                    raise SystemExit(f"mask={val!r}: f32 or bool")
                kw["mask"] = val
            elif key in VARIANT_KEYS:
                name, typ = VARIANT_KEYS[key]
                kw[name] = bool(int(val)) if typ is bool else int(val)
            else:
                raise SystemExit(f"unknown variant key {key!r} ({', '.join(VARIANT_KEYS)}, mask)")
        variants.append((v, kw))
    return variants


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1x4096,1x32768,1x131072,16x16384")
    ap.add_argument("--variants", default="default;minb=4 st=2", help="';'-separated launch variants")
    ap.add_argument("--out", default=None)
    ap.add_argument("--presets", default="", help="','-separated presets of other codecs to time (Triton and CUDA C++)")
    ap.add_argument("--preset-variants", default="default", help="';'-separated launch variants of the other codecs' CUDA kernels (nw, ns, st, minb)")
    ap.add_argument("--no-qjl", action="store_true", help="skip the QJL rows (SDPA and --presets only)")
    ap.add_argument("--once", default=None, help="BxL: build that state and run the CUDA kernel three times (for ncu)")
    a = ap.parse_args(argv)
    variants = parse_variants(a.variants)
    pvariants = parse_variants(a.preset_variants)
    if a.once and a.presets:                       # ncu of another codec's CUDA C++ kernel
        from qjl_compile.kernels.cuda.rot import rotation_attend_cuda
        B, L = (int(x) for x in a.once.split("x"))
        st, consts, meta, _ = preset_setup(a.presets.split(",")[0], B, L, "cuda")
        preset_fill(st, consts, meta, L - 1, "cuda")
        q = torch.randn(B, HQ, 1, D, device="cuda", dtype=DTYPE)
        k1 = torch.randn(B, H, 1, D, device="cuda", dtype=DTYPE)
        torch.ops.qjl.append(st, consts, k1, k1, meta)
        for _ in range(3):
            rotation_attend_cuda(q, st, consts, k1, k1, None, True, None, meta)
        torch.cuda.synchronize()
        return
    if a.once:
        from qjl_compile.kernels.cuda.qjl import qjl_attend_cuda
        B, L = (int(x) for x in a.once.split("x"))
        st, consts, meta = qjl_setup(B, L, QJLConfig.preset("reference", head_dim=D))
        fill(st, consts, meta, L - 1)
        q = torch.randn(B, HQ, 1, D, device="cuda", dtype=DTYPE)
        k1 = torch.randn(B, H, 1, D, device="cuda", dtype=DTYPE)
        torch.ops.qjl.append(st, consts, k1, k1, meta)
        for _ in range(3):
            qjl_attend_cuda(q, st, consts, k1, k1, None, True, None, meta, **dict(variants[0][1]))
        torch.cuda.synchronize()
        return
    print(env_header())
    copy_gbs = copy_bandwidth()
    print(f"copy bandwidth {copy_gbs:.0f} GB/s")
    rows = []
    for s in a.sizes.split(","):
        B, L = (int(x) for x in s.split("x"))
        rows += rows_for(B, L, copy_gbs, [] if a.no_qjl else variants, [p for p in a.presets.split(",") if p], pvariants)
    from tabulate import tabulate
    print(tabulate([[r["B"], r["L"], r["impl"], f"{r['us']:.1f}", f"{r['MB']:.1f}", f"{r['pct_copy']:.0f}%",
                     f"{r['speedup']:.2f}x", f"{r['err']:.1e}"] for r in rows],
                   headers=["B", "L", "impl", "us", "MB read", "% copy bw", "vs SDPA", "rel err"]))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(dict(env=env_header(), copy_gbs=copy_gbs, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
