"""Peer row for issue 15: FlashInfer decode over an fp8 (e4m3) paged KV cache, next to bf16 SDPA.

What a vLLM user would run instead of compressing: ``--kv-cache-dtype fp8`` with the FlashInfer
backend. Llama-3-8B attention shape (32 q / 8 kv heads, d=128), bf16 query, decode q_len=1, paged
cache (page 16, HND layout, one 5-D tensor [pages, 2, kv_heads, page, d] as vLLM hands it to
FlashInfer), per-tensor k_scale / v_scale passed to ``run()`` as floats (vLLM's
``layer._k_scale_float``). FlashInfer's ``BatchDecodeWithPagedKVCacheWrapper`` is planned once per
size with ``use_cuda_graph=True`` and fixed buffers; ``run()`` is timed with the shared timer
(benchmarks/timer.py: warm-up, L2 flushed, median of CUDA events, CUDA-graph replay; plain launches
only if capture fails, recorded per row). Each row also reports the peer's own error against SDPA
over the dequantized fp8 K/V (fp32 math and bf16 SDPA), the fp8 bytes read and the bandwidth.

    python benchmarks/peer_fp8.py --sizes 1x4096,1x32768,1x131072,16x16384 --out results/fp8.json

FlashInfer is not on the GPU machine: carry it as wheels (see ``--help`` and ``wheels`` below).
flashinfer-python 0.7.2 is 62.2 MiB, too big to travel with the tree under the 64 MiB limit, so
``--slim-wheel`` rewrites it without the sources of kernels this benchmark never builds
(``flashinfer/data/csrc/<subdir>/``, the cudnn_frost MoE artifacts); everything importable stays.

Nothing GPU-specific (torch, flashinfer, the timer) is imported at module import time.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import json
import math
import os
import sys
import time
import zipfile

HQ, H, D = 32, 8, 128            # Llama-3-8B: query heads, kv heads, head dim
PAGE = 16                        # vLLM's default block size
FP8_MAX = 448.0                  # largest finite float8_e4m3fn
DEFAULT_SIZES = "1x4096,1x32768,1x131072,16x16384"
DEVICE = "cuda"                  # a module constant so the CPU tests can drive the data path

MISSING = (
    "flashinfer is not importable ({err}).\n"
    "Fix: carry the wheels to the GPU machine and put them on PYTHONPATH:\n"
    "  here:  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 "
    "--implementation cp --platform manylinux_2_28_x86_64 -d /tmp/fiw flashinfer-python==0.7.2 "
    "apache-tvm-ffi==0.1.15.post2\n"
    "         python3 benchmarks/peer_fp8.py --slim-wheel /tmp/fiw/flashinfer_python-0.7.2-py3-none-any.whl .whl\n"
    "         cp /tmp/fiw/apache_tvm_ffi-*.whl .whl/\n"
    "  there: python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade "
    "--target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PYTHONPATH\n"
    "(the GPU machine already has the rest flashinfer imports: nvidia-ml-py, einops, click, ninja, "
    "numpy, packaging, requests, tabulate, tqdm, cuda-bindings, nvcc)"
)


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """``"1x4096,16x16384"`` -> ``[(1, 4096), (16, 16384)]`` (batch, context length)."""
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        try:
            b, l = part.split("x")
            b, l = int(b), int(l)
        except ValueError:
            raise argparse.ArgumentTypeError(f"size {part!r} is not BxL (e.g. 1x4096)") from None
        if b < 1 or l < 1:
            raise argparse.ArgumentTypeError(f"size {part!r}: B and L must be positive")
        out.append((b, l))
    if not out:
        raise argparse.ArgumentTypeError("no sizes given")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=parse_sizes, default=parse_sizes(DEFAULT_SIZES),
                   help=f"comma-separated BxL (default {DEFAULT_SIZES})")
    p.add_argument("--out", help="write the JSON here")
    p.add_argument("--page-size", type=int, default=PAGE)
    p.add_argument("--variants", default="tc,cc",
                   help="tc: tensor-core decode (FlashInfer's fa2 prefill kernel at q_len 1; what "
                        "recent vLLM's FlashInfer backend plans for decode); cc: the CUDA-core decode "
                        "kernel (older vLLM picked it for GQA <= 4, i.e. Llama-3-8B). Comma-separated")
    p.add_argument("--no-sdpa", action="store_true", help="skip the bf16 SDPA row")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--rep", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--slim-wheel", nargs=2, metavar=("SRC_WHL", "DEST_DIR"),
                   help="write a copy of the flashinfer-python wheel without the kernel sources "
                        "this benchmark does not build, then exit (no GPU, no torch needed)")
    return p


# ---------------------------------------------------------------------------------------------
# carrying the wheel

def _drop(name: str) -> bool:
    """Files of the flashinfer-python wheel the fp8 decode path never reads.

    The JIT builds (batch decode / fa2 batch prefill, bf16 q, e4m3 kv) use the top-level
    ``flashinfer/data/csrc`` files (templates, bindings, tvm_ffi_utils.h), ``data/include``,
    ``data/cccl`` (and ``data/cutlass``, ``data/spdlog`` on the include path); the
    ``data/csrc/<subdir>/`` trees are other kernels' sources (sampling, MoE, MLA, KDA, ...).
    """
    parts = name.split("/")
    if len(parts) > 4 and parts[:3] == ["flashinfer", "data", "csrc"]:
        return True
    if name.startswith("flashinfer/fused_moe/backends/cudnn_frost/artifacts/"):
        return True
    return False


def slim_wheel(src: str, dest_dir: str) -> str:
    """Rewrite ``src`` into ``dest_dir`` (same file name) without :func:`_drop`'s files; RECORD
    is regenerated so ``pip install`` sees a consistent wheel. Returns the new path."""
    os.makedirs(dest_dir, exist_ok=True)
    dst = os.path.join(dest_dir, os.path.basename(src))
    if os.path.abspath(dst) == os.path.abspath(src):
        raise SystemExit("--slim-wheel: DEST_DIR must differ from the source wheel's folder")
    kept, dropped = 0, 0
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst + ".tmp", "w", zipfile.ZIP_DEFLATED,
                                                       compresslevel=9) as zout:
        record_name = next(n for n in zin.namelist() if n.endswith(".dist-info/RECORD"))
        record = []
        for info in zin.infolist():
            if info.filename == record_name or info.is_dir():
                continue
            if _drop(info.filename):
                dropped += 1
                continue
            data = zin.read(info)
            zout.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            record.append(f"{info.filename},sha256={digest},{len(data)}")
            kept += 1
        record.append(f"{record_name},,")
        zout.writestr(record_name, "\n".join(record) + "\n")
    os.replace(dst + ".tmp", dst)
    print(f"{dst}: kept {kept} files, dropped {dropped}, "
          f"{os.path.getsize(src) / 2**20:.1f} MiB -> {os.path.getsize(dst) / 2**20:.1f} MiB")
    return dst


def import_flashinfer():
    """The flashinfer module, or SystemExit naming the fix (carry the wheels)."""
    try:
        import flashinfer
        from flashinfer import BatchDecodeWithPagedKVCacheWrapper  # noqa: F401
    except Exception as e:  # ImportError, or a missing dependency raising something else
        raise SystemExit(MISSING.format(err=f"{type(e).__name__}: {e}")) from None
    return flashinfer


# ---------------------------------------------------------------------------------------------
# the benchmark (GPU)

def _quantize(x, torch):
    """Per-tensor e4m3 quantization as vLLM's fp8 KV cache does: scale = amax / 448."""
    scale = float(x.abs().amax().float()) / FP8_MAX
    return (x.float() / scale).to(torch.float8_e4m3fn), scale


def make_case(B, L, page, seed, torch):
    """bf16 q, paged fp8 KV [pages, 2, H, page, D] (HND) with shuffled page order, scales."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    ppr = -(-L // page)                                   # pages per request
    npages = B * ppr
    q = torch.randn(B, HQ, D, device=DEVICE, dtype=torch.bfloat16, generator=g)
    kv = torch.empty(npages, 2, H, page, D, device=DEVICE, dtype=torch.float8_e4m3fn)
    scales = []
    for j in (0, 1):                                      # K then V, one tensor at a time
        x = torch.randn(npages, H, page, D, device=DEVICE, dtype=torch.bfloat16, generator=g)
        xq, s = _quantize(x, torch)
        kv[:, j] = xq
        scales.append(s)
        del x, xq
    perm = torch.randperm(npages, device=DEVICE, generator=g).to(torch.int32)
    indptr = torch.arange(0, npages + 1, ppr, device=DEVICE, dtype=torch.int32)
    last = torch.full((B,), L - (ppr - 1) * page, device=DEVICE, dtype=torch.int32)
    return q, kv, perm, indptr, last, scales[0], scales[1]


def gather_dequant(kv, perm, B, L, k_scale, v_scale, torch, dtype):
    """Dense [B, H, L, D] K and V of ``dtype`` from the paged fp8 cache (the fp8 values times
    their scale, computed in fp32)."""
    page = kv.shape[3]
    ppr = perm.numel() // B
    pages = kv[perm.long()]                                # [B*ppr, 2, H, page, D]
    pages = pages.view(B, ppr, 2, H, page, D).permute(2, 0, 3, 1, 4, 5).reshape(2, B, H, ppr * page, D)
    k = (pages[0, :, :, :L].float() * k_scale).to(dtype)
    v = (pages[1, :, :, :L].float() * v_scale).to(dtype)
    return k, v


def sdpa_row(B, L, q, k, v, bench, copy_gbs, torch, warmup, rep):
    F = torch.nn.functional
    q4 = q.view(B, HQ, 1, D)
    qg = q.view(B, H, HQ // H, D)
    ms_g = bench(lambda: F.scaled_dot_product_attention(qg, k, v), warmup=warmup, rep=rep, graph=True)
    ms_e = bench(lambda: F.scaled_dot_product_attention(q4, k, v, enable_gqa=True), warmup=warmup,
                 rep=rep, graph=True)
    ms = min(ms_g, ms_e)          # as benchmarks/attend_cuda.py: the faster of the two spellings
    nb = 2 * B * H * L * D * 2
    return dict(B=B, L=L, impl="sdpa bf16", us=ms * 1e3, kv_bytes=nb, TBps=nb / ms / 1e9,
                pct_copy=100 * nb / ms / 1e6 / copy_gbs, graph=True, rel_err_fp32=0.0)


def fp8_row(B, L, variant, case, want32, want_bf16, args, bench, copy_gbs, torch, flashinfer):
    q, kv, perm, indptr, last, k_scale, v_scale = case
    page = kv.shape[3]
    ws = torch.zeros(128 << 20, dtype=torch.uint8, device=DEVICE)
    indptr_buf = torch.empty_like(indptr)
    indices_buf = torch.empty_like(perm)
    last_buf = torch.empty_like(last)
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
        ws, kv_layout="HND", use_cuda_graph=True, use_tensor_cores=(variant == "tc"),
        paged_kv_indptr_buffer=indptr_buf, paged_kv_indices_buffer=indices_buf,
        paged_kv_last_page_len_buffer=last_buf)
    t0 = time.perf_counter()
    wrapper.plan(indptr, perm, last, HQ, H, D, page, pos_encoding_mode="NONE",
                 q_data_type=torch.bfloat16, kv_data_type=torch.float8_e4m3fn,
                 o_data_type=torch.bfloat16)
    plan_s = time.perf_counter() - t0             # the first plan of a variant includes its JIT build
    out = torch.empty_like(q)

    def fn():
        return wrapper.run(q, kv, k_scale=k_scale, v_scale=v_scale, out=out)

    o = fn().float()
    torch.cuda.synchronize()
    e32 = ((o - want32).norm() / want32.norm()).item()
    ebf = ((o - want_bf16).norm() / want_bf16.norm()).item()
    graph, note = True, ""
    try:
        ms = bench(fn, warmup=args.warmup, rep=args.rep, graph=True)
    except Exception as e:                      # capture refused: time plain launches, say so
        torch.cuda.synchronize()
        graph, note = False, f"graph capture failed ({type(e).__name__}: {e}); plain launches"
        ms = bench(fn, warmup=args.warmup, rep=args.rep, graph=False)
    nb = 2 * B * H * L * D                      # fp8 K + V bytes read
    resolved = getattr(wrapper, "resolved_backend", "?")
    row = dict(B=B, L=L, impl=f"flashinfer fp8 {'tc' if variant == 'tc' else 'cuda-core'}",
               backend=resolved, us=ms * 1e3, kv_bytes=nb, TBps=nb / ms / 1e9,
               pct_copy=100 * nb / ms / 1e6 / copy_gbs, graph=graph, rel_err_fp32=e32,
               rel_err_bf16_sdpa=ebf, max_abs_err=(o - want32).abs().max().item(),
               k_scale=k_scale, v_scale=v_scale, page_size=page, plan_s=plan_s)
    if note:
        row["note"] = note
    del wrapper, ws
    return row


def _timer():
    """benchmarks/timer.py (the shared timer), loaded by path: no sys.path change."""
    if "timer" in sys.modules:
        return sys.modules["timer"]
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "timer", os.path.join(os.path.dirname(os.path.abspath(__file__)), "timer.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sys.modules["timer"] = mod
    return mod


def run(args) -> dict:
    import platform

    flashinfer = import_flashinfer()            # first: the fix it names is what the GPU run needs
    import torch
    if not torch.cuda.is_available():
        raise SystemExit("peer_fp8: needs a CUDA GPU (FlashInfer has no CPU path)")
    t = _timer()
    bench, copy_bandwidth, env_header = t.bench, t.copy_bandwidth, t.env_header

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in ("tc", "cc")]
    if bad:
        raise SystemExit(f"--variants: unknown {bad} (tc, cc)")
    F = torch.nn.functional
    copy_gbs = copy_bandwidth()
    rows = []
    p = torch.cuda.get_device_properties(0)
    res = dict(
        gpu=p.name, sms=p.multi_processor_count, env=env_header(), torch=torch.__version__,
        flashinfer=getattr(flashinfer, "__version__", "?"), cuda=torch.version.cuda,
        python=platform.python_version(), copy_GBps=copy_gbs,
        shape=dict(q_heads=HQ, kv_heads=H, head_dim=D, q_dtype="bfloat16", kv_dtype="float8_e4m3fn",
                   kv_layout="HND", page_size=args.page_size, q_len=1, page_order="shuffled (randperm)",
                   scales="per-tensor k_scale/v_scale = amax/448, floats to run(); v_scale is "
                          "applied by FlashInfer as a separate `out *= v_scale` after the kernel"),
        timer="benchmarks/timer.py bench(): warm-up, L2 flushed, median of CUDA events, graph replay",
        bytes="kv_bytes: fp8 K+V (B*8*L*128*2) for flashinfer, bf16 K+V for sdpa; TBps = kv_bytes/time",
        errors="rel_err_fp32: ||o - ref||/||ref||, ref = fp32 SDPA over the dequantized fp8 K/V; "
               "rel_err_bf16_sdpa: against bf16 SDPA over the same K/V",
        complete=False, rows=rows)

    def add(r):
        rows.append(r)
        print(_fmt(r), flush=True)
        if args.out:                              # after every row: a killed run keeps what it measured
            _dump(res, args.out)
    for B, L in args.sizes:
        case = make_case(B, L, args.page_size, args.seed, torch)
        q, kv, perm, indptr, last, k_scale, v_scale = case
        k32, v32 = gather_dequant(kv, perm, B, L, k_scale, v_scale, torch, torch.float32)
        want32 = F.scaled_dot_product_attention(q.float().view(B, HQ, 1, D), k32, v32,
                                                enable_gqa=True).view(B, HQ, D)
        del k32, v32
        k, v = gather_dequant(kv, perm, B, L, k_scale, v_scale, torch, torch.bfloat16)
        want_bf16 = F.scaled_dot_product_attention(q.view(B, HQ, 1, D), k, v,
                                                   enable_gqa=True).view(B, HQ, D).float()
        if not args.no_sdpa:
            r = sdpa_row(B, L, q, k, v, bench, copy_gbs, torch, args.warmup, args.rep)
            r["rel_err_fp32"] = ((want_bf16 - want32).norm() / want32.norm()).item()
            add(r)
        del k, v
        torch.cuda.empty_cache()
        for var in variants:
            try:
                r = fp8_row(B, L, var, case, want32, want_bf16, args, bench, copy_gbs, torch, flashinfer)
            except Exception as e:              # one failing variant must not lose the others
                r = dict(B=B, L=L, impl=f"flashinfer fp8 {var}", error=f"{type(e).__name__}: {e}")
            add(r)
            torch.cuda.empty_cache()
        del case, q, kv, perm
        torch.cuda.empty_cache()
    res["complete"] = True
    return res


def _dump(res: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(res, f, indent=1)
    os.replace(path + ".tmp", path)


def _fmt(r: dict) -> str:
    if "error" in r:
        return f"{r['B']:>3} {r['L']:>7}  {r['impl']:<26} ERROR {r['error']}"
    err = r.get("rel_err_fp32", float("nan"))
    g = "" if r.get("graph", True) else "  (no graph)"
    if "plan_s" in r:
        g += f"  plan {r['plan_s']:.1f} s"
    return (f"{r['B']:>3} {r['L']:>7}  {r['impl']:<26} {r['us']:9.1f} us  {r['kv_bytes'] / 1e6:8.1f} MB"
            f"  {r['TBps']:5.2f} TB/s ({r['pct_copy']:5.1f}% copy)  err {err:.2e}{g}")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.slim_wheel:
        slim_wheel(*args.slim_wheel)
        return 0
    print(f"{'B':>3} {'L':>7}  {'impl':<26} {'time':>12}  {'bytes':>11}  bandwidth", flush=True)
    res = run(args)
    # speedup of each fp8 row over the same size's SDPA row
    sdpa = {(r["B"], r["L"]): r["us"] for r in res["rows"] if r.get("impl") == "sdpa bf16"}
    for r in res["rows"]:
        if "us" in r and (r["B"], r["L"]) in sdpa:
            r["speedup_vs_sdpa"] = sdpa[(r["B"], r["L"])] / r["us"]
    print(f"\n{res['env']}, flashinfer {res['flashinfer']}, copy {res['copy_GBps'] / 1e3:.2f} TB/s")
    print("| B | L | impl | us | x SDPA | TB/s | rel err (fp32 ref) |\n|---|---|---|---|---|---|---|")
    for r in res["rows"]:
        if "us" in r:
            print(f"| {r['B']} | {r['L']} | {r['impl']} | {r['us']:.1f} | {r.get('speedup_vs_sdpa', math.nan):.2f} "
                  f"| {r['TBps']:.2f} | {r.get('rel_err_fp32', math.nan):.1e} |")
        else:
            print(f"| {r['B']} | {r['L']} | {r['impl']} | error: {r['error'][:80]} | | | |")
    if args.out:
        _dump(res, args.out)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
