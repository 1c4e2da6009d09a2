"""End-to-end generation benchmark: eager vs compiled, fp16 vs compressed KV cache.

A Llama-3-8B-shaped model (random weights, bf16: hidden 4096, 32 q / 8 kv heads, head_dim 128,
intermediate 14336, vocab 128256; ``--layers`` shortens it, ``--model`` loads a local HF folder)
generates after prompts of 4k/32k/128k tokens at batch 1 and 8. Modes, all in one run on one GPU:

  eager      HF eager, DynamicCache, SDPA
  inductor   torch.compile (Inductor) + HF StaticCache, CUDA graphs (mode="reduce-overhead") on the
             decode step, prefill eager: what HF gives (it repeats K/V per query head every step)
  grouped    the strong fp16 peer: the same StaticCache, torch.compile(backend="qjl") whose grouped_sdpa
             pass turns HF's repeat_kv + SDPA into grouped SDPA (no K/V copy), Inductor, CUDA graphs;
             prefill through the passes (eager lowering)
  hqq        HF eager + transformers' QuantizedCache, HQQ 4-bit (where `hqq` is installed)
  qjl-eager  eager QJLCache (update() returns dequantized K/V: correct, not fast)
  qjl        torch.compile(backend="qjl") + QJLCache, CUDA graphs on the decode step; prefill through
             the qjl passes (fused qjl::attend over the compressed past) with eager lowering
  decoquant  as qjl with QJLConfig(method="decoquant"); CUDA graphs where its Triton kernels exist
  rotation   as qjl with the rotation + Lloyd-Max codec (preset rotation-k4v3)

Sections (in this order; ``--time-limit`` cuts the tail, the JSON is rewritten after every row):
  grid     per (batch, prompt, mode): prefill seconds (chunked, ``--chunk`` tokens a forward) or a
           synthetic fill, decode tokens/s (median step time from CUDA events, shared timer
           benchmarks/timer.py, after warm-up/compilation), peak GPU memory, KV bytes measured from
           the allocated tensors (QJLCache.memory()["allocated_bytes"]);
  ttft     (``--ttft-prompt T``) time to first token of a B=1 prompt through each mode's prefill path,
           compression included, after one untimed run of the same shape;
  serve    (``--kv-budget-gib G``) for ``--serve-prompt``-token requests, the largest batch whose cache at
           the model's full depth (32 layers for the 8B shape, even under ``--layers``) fits G GiB by the
           mode's own allocated bytes, then its decode tokens/s at that batch (synthetic fill);
  budget   (``--budget-gib``) the longest prompt each mode fits in a total memory budget.

    python benchmarks/e2e.py                       # full grid on CUDA (see --help)
    python benchmarks/e2e.py --layers 32 --batch 1 --prompts 131072 --fill synthetic --modes inductor grouped qjl
    python benchmarks/e2e.py --layers 4 --no-grid --ttft-prompt 32768 --kv-budget-gib 64
    python benchmarks/e2e.py --quick               # CPU smoke run, tiny model, seconds
    qjl-compile bench e2e [args]                   # the same file, via runpy

Modules: e2e_modes.py (modes, model, caches), e2e_run.py (running one configuration, the sections),
e2e_report.py (header, tables, targets, plots). Writes <out-dir>/e2e{,_quick}.json (with GPU name and
versions), .md (tables), _tokens.png, _bytes.png, _serve.png (matplotlib, where installed).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:  # the sibling e2e_*.py modules (runpy / qjl-compile bench do not add it)
    sys.path.insert(0, _HERE)

from e2e_modes import (COMPRESSED, GiB, LLAMA3_8B, MiB, ROTATION_PRESET, Mode, build_model, cache_bytes,  # noqa: E402,F401
                       capacity, compile_fn, fill_cache, fmt_tokens, fp16_bytes, has_cuda_kernel, head_dim,
                       hqq_available, kv_heads, make_cache, mode_table, qjl_cache_class, qjl_config, weight_bytes,
                       _COMPAT_NOTES)
from e2e_run import (CUDA_BROKEN, Progress, bench, cleanup, copy_bandwidth, decode_steps, env_header,  # noqa: E402,F401
                     forward, max_context, probe, reset_compiled, run_one, run_prefill, run_serving, run_ttft,
                     sync, _is_fatal)
from e2e_report import header, header_text, plots, tables, targets  # noqa: E402,F401

ALL_MODES = ["eager", "qjl-eager", "hqq", "inductor", "grouped", "qjl", "decoquant", "rotation"]


# ---------------------------------------------------------------------------------------------
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CPU smoke run: tiny model, short prompts, few modes")
    ap.add_argument("--model", default=None, help="local HF Llama-family folder instead of the random 8B shape")
    ap.add_argument("--layers", type=int, default=None, help="keep only the first N decoder layers (default: all)")
    ap.add_argument("--batch", type=int, nargs="+", default=None, help="batch sizes (default 1 8)")
    ap.add_argument("--prompts", type=int, nargs="+", default=None, help="prompt lengths (default 4096 32768 131072)")
    ap.add_argument("--new-tokens", type=int, default=None, help="tokens generated per run (default 128)")
    ap.add_argument("--modes", nargs="+", default=None,
                    help=f"subset of: {' '.join(ALL_MODES)} (default: all that run here)")
    ap.add_argument("--no-grid", action="store_true", help="skip the (batch, prompt) grid: only the other sections")
    ap.add_argument("--ttft-prompt", type=int, default=None,
                    help="time to first token of a B=1 prompt this long, per mode (0: skip; default 0, quick 192)")
    ap.add_argument("--ttft-chunk", type=int, default=0, help="prefill chunk of the TTFT runs (0: the whole prompt)")
    ap.add_argument("--ttft-reps", type=int, default=1, help="timed TTFT runs after the untimed one (best reported)")
    ap.add_argument("--ttft-modes", nargs="+", default=None, help="modes of the TTFT section (default: --modes)")
    ap.add_argument("--kv-budget-gib", type=float, default=None,
                    help="serving section: KV budget (GiB of cache at the model's full depth) the batch of "
                         "--serve-prompt requests must fit (0: skip; default 0, quick 0.004)")
    ap.add_argument("--serve-prompt", type=int, default=None, help="tokens per request (default 32768, quick 192)")
    ap.add_argument("--serve-max-batch", type=int, default=0, help="cap on the serving batch (0: none)")
    ap.add_argument("--serve-modes", nargs="+", default=None, help="modes of the serving section (default: --modes)")
    ap.add_argument("--chunk", type=int, default=None, help="prefill chunk (tokens per forward; default 4096)")
    ap.add_argument("--qjl-prefill", choices=("compiled", "eager"), default="compiled",
                    help="qjl/decoquant prefill: through the qjl passes (fused attend) or the eager cache")
    ap.add_argument("--qjl-budget-prefill", choices=("compiled", "eager"), default="compiled",
                    help="prefill path of the qjl/decoquant context-search probes")
    ap.add_argument("--decoquant-max-tokens", type=int, default=32768,
                    help="without their CUDA kernels, run decoquant/rotation only where batch*prompt <= this")
    ap.add_argument("--fill", choices=("auto", "prefill", "synthetic"), default="auto",
                    help="auto: real prefill unless batch*prompt > --prefill-token-limit, then random K/V are "
                         "written into the cache (prefill time not reported)")
    ap.add_argument("--prefill-token-limit", type=int, default=262144)
    ap.add_argument("--slow-steps", type=int, default=32, help="max timed decode steps of the eager "
                    "dequantizing modes (hqq, qjl-eager, decoquant without CUDA kernel)")
    ap.add_argument("--slow-seconds", type=float, default=15.0, help="and about this many seconds of them")
    ap.add_argument("--budget-gib", type=float, default=None,
                    help="memory budget for the longest-prompt search (0: skip; default 24, quick 0.02)")
    ap.add_argument("--budget-batch", type=int, default=1)
    ap.add_argument("--budget-chunk", type=int, default=None,
                    help="prefill chunk of the budget probes (default 1024, quick 64): HF's mask is chunk x L")
    ap.add_argument("--budget-modes", nargs="+", default=None, help="modes searched (default: all that ran)")
    ap.add_argument("--max-search-tokens", type=int, default=1 << 23)
    ap.add_argument("--budget-probes", type=int, default=6, help="probes per mode in the context search")
    ap.add_argument("--time-limit", type=float, default=None,
                    help="seconds: start no new run after this (results so far are written)")
    ap.add_argument("--isolate", action="store_true",
                    help="run each (batch, prompt) block and each mode's context search in its own process: "
                         "a device fault in one block cannot take the others down; results are merged")
    ap.add_argument("--report", metavar="JSON", default=None,
                    help="only re-render tables/targets/plots (into --out-dir) from an e2e JSON written earlier")
    ap.add_argument("--budget-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out-dir", default=os.path.join(_HERE, "results"))
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    q = args.quick
    args.batch = args.batch or ([1] if q else [1, 8])
    args.prompts = args.prompts or ([192, 384] if q else [4096, 32768, 131072])  # quick: > R=128 (compressed)
    args.new_tokens = args.new_tokens or (6 if q else 128)
    args.chunk = args.chunk or (64 if q else 4096)
    args.budget_chunk = args.budget_chunk or (64 if q else 1024)
    if args.budget_gib is None:
        args.budget_gib = 0.02 if q else 24.0
    if args.ttft_prompt is None:
        args.ttft_prompt = 192 if q else 0
    if args.kv_budget_gib is None:
        args.kv_budget_gib = 0.004 if q else 0.0
    args.serve_prompt = args.serve_prompt or (192 if q else 32768)
    return args


def _child_argv(args) -> list[str]:
    """The options a child process inherits (grid/budget selection and output are added per job)."""
    out = ["--new-tokens", str(args.new_tokens), "--chunk", str(args.chunk), "--qjl-prefill", args.qjl_prefill,
           "--qjl-budget-prefill", args.qjl_budget_prefill, "--decoquant-max-tokens", str(args.decoquant_max_tokens),
           "--fill", args.fill, "--prefill-token-limit", str(args.prefill_token_limit),
           "--slow-steps", str(args.slow_steps), "--slow-seconds", str(args.slow_seconds),
           "--budget-chunk", str(args.budget_chunk), "--budget-probes", str(args.budget_probes),
           "--max-search-tokens", str(args.max_search_tokens), "--seed", str(args.seed), "--child", "--no-progress"]
    if args.quick:
        out.append("--quick")
    if args.layers:
        out += ["--layers", str(args.layers)]
    if args.model:
        out += ["--model", args.model]
    if args.modes:
        out += ["--modes", *args.modes]
    return out


def run_isolated(args, t_start: float, deadline: float) -> dict:
    """--isolate: one child process per (batch, prompt) block and per context-search mode; merge."""
    import subprocess
    import tempfile

    tmp = tempfile.mkdtemp(prefix="qjl_e2e_")
    base = [sys.executable, os.path.abspath(__file__)] + _child_argv(args)
    off = ["--ttft-prompt", "0", "--kv-budget-gib", "0"]
    grid = not args.no_grid
    jobs = [("grid", args.batch[0], T, ["--batch", str(args.batch[0]), "--prompts", str(T), "--budget-gib", "0", *off])
            for T in args.prompts if grid]
    if args.ttft_prompt or args.kv_budget_gib > 0:
        extra = ["--no-grid", "--budget-gib", "0", "--ttft-prompt", str(args.ttft_prompt), "--ttft-chunk",
                 str(args.ttft_chunk), "--ttft-reps", str(args.ttft_reps), "--kv-budget-gib", str(args.kv_budget_gib),
                 "--serve-prompt", str(args.serve_prompt), "--serve-max-batch", str(args.serve_max_batch)]
        for flag, v in (("--ttft-modes", args.ttft_modes), ("--serve-modes", args.serve_modes)):
            if v:
                extra += [flag, *v]
        jobs.append(("ttft/serve", 1, "sections", extra))
    if args.budget_gib > 0:
        bm = args.budget_modes or [m for m in (args.modes or ["eager", "qjl-eager", "hqq", "inductor", "qjl"])
                                   if not (args.quick and m == "hqq")]
        jobs += [("budget", args.budget_batch, m, ["--budget-only", "--budget-gib", str(args.budget_gib),
                                                   "--budget-batch", str(args.budget_batch), "--budget-modes", m, *off])
                 for m in bm]
    jobs += [("grid", B, T, ["--batch", str(B), "--prompts", str(T), "--budget-gib", "0", *off])
             for B in args.batch[1:] for T in args.prompts if grid]
    res = dict(header=None, runs=[], budget=[], serve=[], ttft=[], skipped_modes={}, targets=[], jobs=[])
    notes: list[str] = []
    for i, (kind, B, what, extra) in enumerate(jobs):
        left = deadline - time.time()
        job = dict(kind=kind, batch=B, what=what)
        if left <= 0:
            job["status"] = "skipped (--time-limit)"
            res["jobs"].append(job)
            continue
        out = os.path.join(tmp, f"job{i}")
        cmd = base + extra + ["--out-dir", out]
        if math.isfinite(left):
            cmd += ["--time-limit", str(int(left))]
        try:
            rc = subprocess.run(cmd, timeout=None if not math.isfinite(left) else left + 120).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        job["rc"] = rc
        path = os.path.join(out, ("e2e_quick" if args.quick else "e2e") + ".json")
        if os.path.isfile(path):
            with open(path) as f:
                r = json.load(f)
            res["header"] = res["header"] or r["header"]
            res["runs"] += r.get("runs", [])
            res["budget"] += r.get("budget", [])
            res["serve"] += r.get("serve", [])
            res["ttft"] += r.get("ttft", [])
            res["skipped_modes"].update(r.get("skipped_modes", {}))
            notes += [n for n in r.get("compat_notes", []) if n not in notes]
            job["status"] = "ok" if rc == 0 else f"exit {rc} (partial results kept)"
        else:
            job["status"] = f"exit {rc}, no results"
        res["jobs"].append(job)
        print(f"[{time.time() - t_start:6.0f}s] job {i + 1}/{len(jobs)} {kind} B={B} {what}: {job['status']}",
              flush=True)
    return res, notes


def main(argv=None) -> dict:
    args = parse_args(argv)
    t_start = time.time()
    if args.report:
        with open(args.report) as f:
            res = json.load(f)
        args.quick = os.path.basename(args.report).startswith("e2e_quick")
        return finish(res, args)
    if args.isolate:
        deadline = t_start + args.time_limit if args.time_limit else float("inf")
        res, notes = run_isolated(args, t_start, deadline)
        if res["header"] is None:
            raise SystemExit("e2e --isolate: no job produced results")
        res["header"]["command"] = "python " + " ".join([os.path.relpath(__file__)] + sys.argv[1:]
                                                        if argv is None else [os.path.relpath(__file__)] + argv)
        if torch.cuda.is_available() and copy_bandwidth is not None and not args.quick:
            res["header"]["copy_GBs"] = round(copy_bandwidth(), 1)
        res["compat_notes"] = notes
        return finish(res, args)
    t_start = time.time()
    deadline = t_start + args.time_limit if args.time_limit else float("inf")
    device = "cpu" if args.quick or not torch.cuda.is_available() else "cuda"
    if device == "cpu" and not args.quick:
        print("e2e: no CUDA device; running the --quick CPU smoke configuration instead", file=sys.stderr)
        args.quick = True
        args = parse_args(["--quick"] + (argv if argv is not None else sys.argv[1:]))
    torch.manual_seed(args.seed)
    for k in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, k):
            setattr(torch._dynamo.config, k, 64)
    torch._dynamo.config.automatic_dynamic_shapes = False  # one static graph per shape, as the peer gets
    import qjl_compile  # noqa: F401  (registers the qjl ops and backend)

    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    model, desc = build_model(args, device, dtype)
    modes = mode_table(device, args)
    wanted = args.modes or (["eager", "qjl-eager", "grouped", "qjl", "hqq"] if args.quick else ALL_MODES)
    unknown = [m for m in wanted + (args.ttft_modes or []) + (args.serve_modes or []) if m not in modes]
    if unknown:
        raise SystemExit(f"unknown mode(s) {unknown}: choose from {sorted(modes)}")
    skipped = {}
    if device == "cpu" and "inductor" in wanted:
        skipped["inductor"] = "needs CUDA"
    if "hqq" in wanted and (why := hqq_available()):
        skipped["hqq"] = why
    run_modes = [modes[m] for m in wanted if m not in skipped]

    hdr = header(args, device, desc, model)
    hdr["layers"] = model.config.num_hidden_layers
    res = dict(header=hdr, runs=[], budget=[], serve=[], ttft=[], skipped_modes=skipped, targets=[])
    os.makedirs(args.out_dir, exist_ok=True)
    stem = os.path.join(args.out_dir, "e2e_quick" if args.quick else "e2e")
    progress = Progress(not args.no_progress)
    print(header_text(hdr), flush=True)
    for k, why in skipped.items():
        print(f"mode {k}: n/a ({why})", flush=True)

    def save():
        res["elapsed_s"] = time.time() - t_start
        with open(stem + ".json", "w") as f:
            json.dump(res, f, indent=1, default=str)

    # warm-up: kernels, handles
    with torch.no_grad():
        forward(model.forward, torch.ones(1, 16, dtype=torch.long, device=device), None)
    cleanup(device)
    def run_grid(batches, bar):
        for B in batches:
            for T in args.prompts:
                for m in run_modes:
                    skip = ("--time-limit reached" if time.time() > deadline else
                            f"device unusable after a CUDA error ({CUDA_BROKEN[0]})" if CUDA_BROKEN else
                            f"{m.key}: no CUDA kernel and batch*prompt > --decoquant-max-tokens "
                            f"{args.decoquant_max_tokens}"
                            if m.key in ("decoquant", "rotation") and m.slow and device == "cuda"
                            and B * T > args.decoquant_max_tokens
                            else None)
                    if skip:
                        res["runs"].append(dict(mode=m.key, label=m.label, batch=B, prompt=T, status="skipped",
                                                error=skip))
                    else:
                        row = run_one(model, m, B, T, args, device, progress)
                        res["runs"].append(row)
                        msg = (f"{row['tokens_per_s']:.1f} tok/s, prefill "
                               f"{row['prefill_s'] if row.get('prefill_s') is None else round(row['prefill_s'], 2)}"
                               f" s, KV {row['kv_bytes'] / MiB:.1f} MiB" if row["status"] == "ok" else
                               f"{row['status']}: {row.get('error', '')}")
                        print(f"[{time.time() - t_start:6.0f}s] B={B} T={T} {m.key}: {msg}", flush=True)
                    save()
                    bar.update(1)

    def run_budget():
        budget = int(args.budget_gib * GiB)
        bmodes = args.budget_modes or [m.key for m in run_modes if not (args.quick and m.key == "hqq")]
        for key in bmodes:
            m = modes[key]
            if key in skipped or time.time() > deadline or CUDA_BROKEN:
                continue
            label = m.label
            if m.cache in COMPRESSED and m.decode == "qjl":
                want = "qjl" if args.qjl_budget_prefill == "compiled" else "eager"
                if want != m.prefill:
                    m = Mode(**{**m.__dict__, "prefill": want})
                label = m.label.replace(", prefill eager", "") + (
                    " (probe prefill through the qjl passes)" if want == "qjl" else " (probe prefill eager)")
            try:
                r = max_context(model, m, args.budget_batch, args, device, budget, deadline)
            except Exception as e:  # noqa: BLE001
                r = dict(mode=key, batch=args.budget_batch, budget_bytes=budget, status=f"error: {e}"[:300])
                if _is_fatal(e):
                    CUDA_BROKEN.append(f"budget search {key}: {e}"[:300])
            r["label"] = label
            if device == "cpu":
                r["measure"] = "weights + allocated cache bytes (CPU: no allocator peak)"
            res["budget"].append(r)
            print(f"[{time.time() - t_start:6.0f}s] budget {args.budget_gib} GiB, {key}: longest prompt "
                  f"{r.get('max_prompt')} ({r.get('status')}, {len(r.get('probes', []))} probes)", flush=True)
            save()

    def run_section(name, keys, fn):
        for key in keys:
            if key in skipped:
                continue
            if time.time() > deadline or CUDA_BROKEN:
                res[name].append(dict(mode=key, label=modes[key].label, status="skipped",
                                      error="--time-limit reached" if not CUDA_BROKEN else "device unusable"))
                continue
            row = fn(modes[key])
            res[name].append(row)
            msg = (f"{row['ttft_s'] * 1e3:.0f} ms" if name == "ttft" else
                   f"B={row['batch']} (fits {row['batch_fit']}): {row['tokens_per_s']:.1f} tok/s") \
                if row.get("status") == "ok" else f"{row.get('status')}: {row.get('error', '')}"
            print(f"[{time.time() - t_start:6.0f}s] {name} {key}: {msg}", flush=True)
            save()

    # order: first batch size, TTFT, serving, the budget search, the other batch sizes (--time-limit cuts the tail)
    grid = not (args.budget_only or args.no_grid)
    with progress.bar(total=len(args.batch) * len(args.prompts) * len(run_modes), desc="e2e runs", unit="run") as bar:
        if grid:
            run_grid(args.batch[:1], bar)
        if args.ttft_prompt:
            run_section("ttft", args.ttft_modes or [m.key for m in run_modes],
                        lambda m: run_ttft(model, m, args.ttft_prompt, args, device, progress))
        if args.kv_budget_gib > 0:
            run_section("serve", args.serve_modes or [m.key for m in run_modes],
                        lambda m: run_serving(model, m, args, device, progress))
        if args.budget_gib > 0:
            run_budget()
        if grid:
            run_grid(args.batch[1:], bar)

    res["cuda_errors"] = list(CUDA_BROKEN)
    if CUDA_BROKEN:
        _COMPAT_NOTES.append("CUDA error; the rest of this process's GPU work was skipped: " + CUDA_BROKEN[0])
    res["compat_notes"] = list(_COMPAT_NOTES)
    res["elapsed_s"] = time.time() - t_start
    return finish(res, args)


def finish(res: dict, args) -> dict:
    """Targets, markdown tables, plots, JSON (in --out-dir)."""
    os.makedirs(args.out_dir, exist_ok=True)
    stem = os.path.join(args.out_dir, "e2e_quick" if args.quick else "e2e")
    res["targets"] = targets(res)
    text = header_text(res["header"]) + "\n\n" + tables(res)
    if res.get("compat_notes"):
        text += "\n\n" + "\n".join("- " + n for n in res["compat_notes"])
    with open(stem + ".md", "w") as f:
        f.write(text + "\n")
    res["plots"] = [] if args.child else plots(res, stem)
    with open(stem + ".json", "w") as f:
        json.dump(res, f, indent=1, default=str)
    if not args.child:
        print("\n" + text, flush=True)
        print(f"\nwrote {stem}.json, {stem}.md " + " ".join(res["plots"]), flush=True)
    return res


if __name__ == "__main__":
    main()
