"""Where one CUDA C++ decode-attention call spends its time: a %globaltimer timeline of its three kernels.

Kernel durations under programmatic dependent launch overlap (a kernel is scheduled while the one
before it runs, and waits), so ncu's per-kernel times do not add up to the call. Here the kernels are
built with TL=1 (kernels/cuda/decode_common.cuh): thread 0 of every CTA stamps the events below, and
per event the earliest and the latest stamp over all CTAs are kept. CUDA-graph replay with L2 flushed,
as attend_cuda.py times a call; medians over --rep replays, in microseconds from the first prep CTA's
start. The instrumentation costs a few atomics per CTA: read the shape of the timeline, time with
attend_cuda.py.

    python benchmarks/timeline.py [--sizes 1x4096,1x131072] [--presets rotation-k4v3-match,qjl]
        [--mask f32] [--rep 30] [--json out.json]

(preset "qjl" is the QJL reference preset, run through kernels/cuda/qjl.py.)
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kbench import D, DTYPE, H, HQ, preset_fill, preset_setup  # noqa: E402
from timer import _flush_l2, env_header  # noqa: E402

EVENTS = ("prep start", "prep end", "split start", "split after wait", "split loop start", "split loop end",
          "split end", "combine start", "combine before wait", "combine after wait", "combine end",
          "split streams issued", "split Pi q ready")    # 11, 12: rot_split's prologue (FUSEQ / HAD for 12)


def _tl_buffers():
    """(device pointer of qjl_tl) of every loaded module built with TL=1."""
    from qjl_compile.kernels import cuda as kc
    from qjl_compile.kernels.cuda import _check
    from cuda.bindings import driver
    out = []
    for key, fns in kc._MODULES.items():
        if ("TL", 1) in key[1]:
            ptr, _ = _check(driver.cuModuleGetGlobal(fns["_module"], b"qjl_tl"), "cuModuleGetGlobal(qjl_tl)")
            out.append(int(ptr))
    return out


def _reset(ptrs, stream):
    from cuda.bindings import driver
    from qjl_compile.kernels.cuda import _check
    hs = driver.CUstream(stream.cuda_stream)
    for p in ptrs:   # [0, 16): earliest stamps (all ones), [16, 32): latest (zero)
        _check(driver.cuMemsetD32Async(driver.CUdeviceptr(p), 0xFFFFFFFF, 32, hs), "cuMemsetD32Async")
        _check(driver.cuMemsetD32Async(driver.CUdeviceptr(p + 128), 0, 32, hs), "cuMemsetD32Async")


def _read(ptrs):
    from cuda.bindings import driver
    from qjl_compile.kernels.cuda import _check
    rows = []
    for p in ptrs:
        buf = (ctypes.c_uint64 * 32)()
        _check(driver.cuMemcpyDtoH(ctypes.addressof(buf), driver.CUdeviceptr(p), 256), "cuMemcpyDtoH")
        rows.append(list(buf))
    return rows


def setup(name, B, L, mask):
    """(call, kernel module) for one layer's cache of preset `name` at (B, L)."""
    from qjl_compile.kernels import triton as qjl_triton
    import importlib
    gen = torch.Generator(device="cuda").manual_seed(2)
    q = torch.randn(B, HQ, 1, D, generator=gen, device="cuda").to(DTYPE)
    st, consts, meta, _ = preset_setup("reference" if name == "qjl" else name, B, L, "cuda")
    preset_fill(st, consts, meta, L - 1, "cuda", gen=gen)
    k1 = torch.randn(B, H, 1, D, generator=gen, device="cuda").to(DTYPE)
    v1 = torch.randn(B, H, 1, D, generator=gen, device="cuda").to(DTYPE)
    torch.ops.qjl.append(st, consts, k1, v1, meta)
    spec = qjl_triton.CPP_KERNELS.get(int(meta[0]))
    if spec is None:
        raise SystemExit(f"{name}: no CUDA C++ kernel for this codec")
    mod = importlib.import_module(f"qjl_compile.kernels.cuda.{spec[0]}")
    why = mod.unsupported(q, st, consts, meta)
    if why:
        raise SystemExit(f"{name}: the CUDA C++ kernel does not run it ({why})")
    am, causal = None, True
    if mask:
        am = torch.zeros(B, 1, 1, L, device="cuda") if mask == "f32" else torch.ones(B, 1, 1, L, dtype=torch.bool, device="cuda")
        causal = False
    fn = getattr(mod, spec[1])
    return (lambda: fn(q, st, consts, k1, v1, am, causal, None, meta)), mod


def timeline(call, rep):
    """Per event: (median earliest, median latest) stamp in us from the first prep start; + replay us."""
    for _ in range(3):
        call()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        call()
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        call()
    ptrs = _tl_buffers()
    if not ptrs:
        raise SystemExit("no module built with TL=1 was loaded")
    stream = torch.cuda.current_stream()
    lo = {k: [] for k in range(len(EVENTS))}
    hi = {k: [] for k in range(len(EVENTS))}
    wall, res = [], []
    for _ in range(rep):
        _flush_l2()
        _reset(ptrs, stream)
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        g.replay()
        e1.record()
        torch.cuda.synchronize()
        wall.append(e0.elapsed_time(e1) * 1e3)
        rows = [r for r in _read(ptrs) if r[2] != 2 ** 64 - 1]   # the module this call ran
        if len(rows) != 1:
            raise SystemExit(f"expected one instrumented module to run, found {len(rows)}")
        r = rows[0]
        t0 = r[0] if r[0] != 2 ** 64 - 1 else r[2]
        stamps = sorted({v for v in r if 0 < v < 2 ** 64 - 1})
        res.append(min((b - a for a, b in zip(stamps, stamps[1:]) if b > a), default=0))
        for k in range(len(EVENTS)):
            if r[k] != 2 ** 64 - 1:
                lo[k].append((r[k] - t0) / 1e3)
                hi[k].append((r[16 + k] - t0) / 1e3)
    med = statistics.median
    ev = {EVENTS[k]: (med(lo[k]), med(hi[k])) for k in range(len(EVENTS)) if lo[k]}
    return ev, med(wall), min(res)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1x4096,1x131072")
    ap.add_argument("--presets", default="rotation-k4v3-match,qjl")
    ap.add_argument("--mask", choices=("f32", "bool"), default=None, help="HF's (B, 1, 1, L) decode mask")
    ap.add_argument("--rep", type=int, default=30)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("timeline.py needs a CUDA GPU")
    from qjl_compile.kernels.cuda import qjl as cq, rot as cr
    cq.TIMELINE = cr.TIMELINE = True
    print(env_header())
    out = []
    for size in args.sizes.split(","):
        B, L = (int(x) for x in size.split("x"))
        for name in args.presets.split(","):
            call, _ = setup(name, B, L, args.mask)
            ev, wall, res = timeline(call, args.rep)
            print(f"\n{name}  B={B} L={L}  graph replay {wall:.1f} us (with the stamps)  timer resolution {res} ns")
            print(f"  {'event':22s} {'first':>8s} {'last':>8s}   (us from the first prep CTA's start)")
            for k, (a, b) in sorted(ev.items(), key=lambda kv: kv[1][0]):
                print(f"  {k:22s} {a:8.2f} {b:8.2f}")
            out.append(dict(preset=name, B=B, L=L, replay_us=wall, resolution_ns=res,
                            events={k: dict(first=a, last=b) for k, (a, b) in ev.items()}))
            torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), header=env_header(), rows=out), f, indent=1)


if __name__ == "__main__":
    main()
