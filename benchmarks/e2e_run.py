"""e2e benchmark, part 2: running one configuration (prefill, decode steps, serving at a KV budget,
time to first token) and the longest-prompt search. See benchmarks/e2e.py for the command line."""
from __future__ import annotations

import gc
import math
import os
import statistics
import sys
import time

import torch

from e2e_modes import (COMPRESSED, Mode, capacity, cache_bytes, compile_fn, fill_cache, fmt_tokens, fp16_bytes,
                       make_cache, weight_bytes)

_HERE = os.path.dirname(os.path.abspath(__file__))
GiB = 1 << 30
MiB = 1 << 20


def _load_timer():
    """benchmarks/timer.py (the shared timer), by file path: the repo root must not go on sys.path,
    where its qjl_compile/ folder would shadow the installed package (kernels/ maps into it)."""
    try:
        from benchmarks.timer import bench, copy_bandwidth, env_header
        return bench, copy_bandwidth, env_header
    except ImportError:
        import importlib.util
        path = os.path.join(_HERE, "timer.py")
        if not os.path.isfile(path):
            return None, None, None
        spec = importlib.util.spec_from_file_location("_qjl_bench_timer", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod.bench, mod.copy_bandwidth, mod.env_header


bench, copy_bandwidth, env_header = _load_timer()

# ---------------------------------------------------------------------------------------------
# running
def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def cleanup(device):
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def reset_compiled():
    try:
        torch._dynamo.reset()
    except Exception:  # noqa: BLE001
        pass


def forward(fn, ids, cache):
    from qjl_compile.compat import cache_kwargs
    return fn(input_ids=ids, **cache_kwargs(cache), use_cache=True, logits_to_keep=1)


def peak_bytes(device):
    return torch.cuda.max_memory_allocated() if device == "cuda" else None


def timer_now(device):
    sync(device)
    return time.perf_counter()


class Progress:
    def __init__(self, enabled):
        self.enabled = enabled

    def bar(self, **kw):
        from tqdm.auto import tqdm
        return tqdm(disable=not self.enabled, mininterval=5.0, file=sys.stderr, dynamic_ncols=True, **kw)


def run_prefill(fn, cache, ids, chunk, device, progress, desc):
    """Chunked prefill through `fn`; returns (seconds, last logits)."""
    B, T = ids.shape
    C = min(chunk, T)
    t0 = timer_now(device)
    out = None
    with progress.bar(total=T, desc=desc, unit="tok", leave=False) as bar:
        for s in range(0, T, C):
            out = forward(fn, ids[:, s: s + C], cache)
            bar.update(min(C, T - s))
    return timer_now(device) - t0, out.logits


def decode_steps(mode: Mode, fn, cache, first_tok, n_steps, args, device):
    """(median ms per step, per-step list, compile+warm-up seconds, steps timed)."""
    st = {"tok": first_tok}

    def step():
        if mode.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        out = forward(fn, st["tok"], cache)
        st["tok"] = out.logits[:, -1:].argmax(-1)

    warm = 2 if mode.decode != "eager" else 1
    t0 = timer_now(device)
    for _ in range(warm):
        step()
    warm_s = timer_now(device) - t0
    left = n_steps - warm
    if mode.slow:
        t1 = timer_now(device)
        step()  # one more untimed step: its time sizes the timed run
        one = timer_now(device) - t1
        warm += 1
        left = min(n_steps - warm, args.slow_steps)
        if args.slow_seconds and one * left > args.slow_seconds:
            left = max(4, int(args.slow_seconds / max(one, 1e-6)))
    left = max(2, min(left, n_steps - warm))
    if device == "cuda":
        t0 = time.perf_counter()
        ms = bench(step, warmup=1, rep=left - 1 if left > 1 else 1, flush_l2=False)
        per = None
        timed = left - 1 if left > 1 else 1
        st["wall_ms"] = (time.perf_counter() - t0) * 1e3 / (timed + 1)
    else:
        per = []
        for _ in range(left):
            t = time.perf_counter()
            step()
            per.append((time.perf_counter() - t) * 1e3)
        ms = statistics.median(per)
        timed = left
    return ms, per, warm_s, timed, st.get("wall_ms")


_ACCEL_ERR = getattr(torch, "AcceleratorError", None) or RuntimeError
CUDA_BROKEN: list[str] = []  # a sticky device error ends the GPU work of the run (results so far are kept)


def _is_fatal(e: Exception) -> bool:
    return isinstance(e, _ACCEL_ERR) and ("illegal" in str(e) or "CUDA error" in str(e))


def pass_counters() -> dict:
    """The qjl backend's counters so far (which rewrites happened: fuse_attention, grouped_sdpa, ...)."""
    from torch._dynamo.utils import counters
    return {k: v for k, v in counters["qjl"].items() if v}


def run_one(model, mode: Mode, B: int, T: int, args, device, progress, fill: str | None = None) -> dict:
    """Prefill (or a synthetic fill) of B prompts of T tokens, then decode steps; one result row.

    `fill` overrides ``--fill`` ("synthetic": random K/V written into the cache, no prefill)."""
    from torch._dynamo.utils import counters

    row = dict(mode=mode.key, label=mode.label, batch=B, prompt=T, new_tokens=args.new_tokens,
               layers=model.config.num_hidden_layers, weights_bytes=weight_bytes(model))
    cap = capacity(T, args.new_tokens)
    cache = pf = dec = None
    base = 0
    counters["qjl"].clear()
    fill = fill or args.fill
    try:
        cleanup(device)
        base = torch.cuda.memory_allocated() if device == "cuda" else 0
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        cache = make_cache(mode, model, B, cap)
        synthetic = fill == "synthetic" or (fill == "auto" and B * T > args.prefill_token_limit)
        g = torch.Generator(device="cpu").manual_seed(B * 100003 + T)
        ids = torch.randint(1, model.config.vocab_size, (B, T), generator=g).to(model.device)
        with torch.no_grad():
            if synthetic:
                t0 = timer_now(device)
                fill_cache(mode, cache, model, B, T, random=True, chunk=args.chunk)
                row["fill_s"] = timer_now(device) - t0
                row["prefill_s"] = None
                row["note"] = "synthetic fill (random K/V written to the cache, no prefill)"
                first = ids[:, -1:]
            else:
                pf = compile_fn(model, mode, "prefill")
                # warm-up (and, for the qjl passes, tracing) on one chunk, then start again
                t0 = timer_now(device)
                if mode.cache in ("dynamic", "hqq"):
                    forward(pf, ids[:, : min(args.chunk, T)], make_cache(mode, model, B, cap))
                else:
                    forward(pf, ids[:, : min(args.chunk, T)], cache)
                    cache.reset()
                row["prefill_warmup_s"] = timer_now(device) - t0
                cleanup(device)
                row["prefill_s"], logits = run_prefill(pf, cache, ids, args.chunk, device, progress,
                                                       f"{mode.key} B={B} T={T} prefill")
                first = logits[:, -1:].argmax(-1)
                del logits
            dec = compile_fn(model, mode, "decode")
            ms, per, warm_s, timed, wall = decode_steps(mode, dec, cache, first, args.new_tokens, args, device)
        row.update(decode_ms=ms, tokens_per_s=B * 1e3 / ms, decode_warmup_s=warm_s, steps_timed=timed,
                   pass_counters=pass_counters())
        if wall is not None:
            row["wall_ms_per_step"] = wall  # host clock over the timed steps (CUDA events give decode_ms)
        if per is not None:
            row["step_ms"] = per
        row["kv_bytes"] = cache_bytes(mode, cache)
        held = cap if mode.cache in ("static",) + COMPRESSED else int(cache.get_seq_length())
        row["kv_capacity_tokens"] = held
        row["kv_fp16_bytes_same_capacity"] = fp16_bytes(model, B, held)
        row["kv_ratio_vs_fp16"] = row["kv_fp16_bytes_same_capacity"] / max(row["kv_bytes"], 1)
        if mode.cache in COMPRESSED:
            mem = cache.memory()
            row["bits_per_value"] = mem["bits_per_value"]
            row["codec_bits"] = mem["codec_bits"]
        if device == "cuda":
            row["peak_bytes"] = torch.cuda.max_memory_allocated()
            row["peak_above_weights_bytes"] = row["peak_bytes"] - base
        row["status"] = "ok"
    except torch.OutOfMemoryError as e:
        row["status"] = "OOM"
        row["error"] = str(e).splitlines()[0][:300]
    except Exception as e:  # noqa: BLE001 - report and go on with the next mode
        row["status"] = "error"
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:400] if str(e) else ''}"
        if _is_fatal(e):
            row["status"] = "CUDA error"
            CUDA_BROKEN.append(f"B={B} T={T} {mode.key}: {row['error']}")
    finally:
        del cache, pf, dec
        try:
            reset_compiled()
            cleanup(device)
        except Exception as e:  # noqa: BLE001
            if _is_fatal(e) and not CUDA_BROKEN:
                CUDA_BROKEN.append(f"after B={B} T={T} {mode.key}: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
    if mode.note and "note" not in row:
        row["note"] = mode.note
    return row


# ---------------------------------------------------------------------------------------------
# longest prompt in a memory budget
def probe(model, mode: Mode, B: int, T: int, args, device, budget: int) -> tuple[bool, int, int]:
    """Allocate the cache for T prompt + new tokens, put T - C tokens in it, run one prefill
    chunk of C tokens through the mode's prefill path. (fits, peak bytes)."""
    C = min(args.budget_chunk, T)
    cache = pf = None
    cleanup(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        cache = make_cache(mode, model, B, capacity(T, args.new_tokens))
        with torch.no_grad():
            fill_cache(mode, cache, model, B, T - C, random=False, chunk=args.chunk)
            if device == "cuda":
                pf = compile_fn(model, mode, "prefill")
                ids = torch.randint(1, model.config.vocab_size, (B, C), device=model.device)
                forward(pf, ids, cache)
        sync(device)
        cb = cache_bytes(mode, cache)
        if device == "cuda":
            peak = torch.cuda.max_memory_allocated()
        else:  # CPU: weights + the cache's own allocation (no allocator statistics, no forward)
            peak = weight_bytes(model) + cb
        return peak <= budget, peak, cb
    except torch.OutOfMemoryError:
        return False, -1, 0
    finally:
        del cache, pf
        reset_compiled()
        cleanup(device)



def max_context(model, mode: Mode, B: int, args, device, budget: int, deadline: float) -> dict:
    """Largest prompt (multiple of the probe chunk) whose probe fits the budget.

    Peak memory is close to linear in the prompt length (cache, HF's chunk x L mask, dequantized
    K/V), so the search is a secant one: the first step uses the cache's own bytes per token, later
    steps the slope through the last two measured peaks; every candidate is probed (measured), and
    the answer is the largest prompt that was seen to fit, with the smallest that was seen not to.
    """
    C = args.budget_chunk
    out = dict(mode=mode.key, batch=B, budget_bytes=budget, chunk=C, probes=[])
    pts = []  # (T, peak) with a measured peak

    def fits(T):
        t0 = time.time()
        ok, peak, cb = probe(model, mode, B, T, args, device, budget)
        out["probes"].append((T, ok, peak, round(time.time() - t0, 2)))
        if peak > 0:
            pts.append((T, peak))
        return ok, peak, cb

    T0 = C * max(1, math.ceil(2048 / C))  # above the residual window: the codec buffers exist
    ok, p0, cb0 = fits(T0)
    if not ok:
        out.update(max_prompt=0, status="nothing fits" if p0 > 0 else "OOM at the smallest prompt")
        return out
    lo, hi = T0, None
    slope = max(cb0 / capacity(T0, args.new_tokens), 1.0)
    for _ in range(args.budget_probes - 1):
        if time.time() > deadline:
            break
        if len(pts) >= 2:
            (ta, pa), (tb, pb) = sorted(pts[-2:])
            if tb > ta and pb > pa:
                slope = (pb - pa) / (tb - ta)
        base_p = dict(pts)[lo]  # from the largest prompt seen to fit
        T = int((lo + (budget - base_p) / slope) // C * C)
        gran = max(C, lo // 200 // C * C)
        if hi is not None and hi - lo <= gran:
            break
        T = max(T, lo + gran)
        if hi is not None:
            T = min(T, hi - gran)
        T = min(T, args.max_search_tokens)
        if T <= lo:
            break
        ok, _, _ = fits(T)
        if ok:
            lo = T
        else:
            hi = T if hi is None else min(hi, T)
    gran = max(C, lo // 200 // C * C)
    status = "ok" if hi is not None and hi - lo <= gran else ("no upper bound found" if hi is None else
                                                               f"within {fmt_tokens(hi - lo)} tokens")
    out.update(max_prompt=lo, upper=hi, status=status)
    return out




# ---------------------------------------------------------------------------------------------
# serving: the largest batch of --serve-prompt requests a KV budget holds, and its decode speed
def full_depth_cache_bytes(model, mode: Mode, B: int, cap: int) -> int:
    """Allocated bytes of the mode's cache for B requests of capacity `cap` at the model's full depth."""
    cache = make_cache(mode, model, B, cap, cfg=model.full_config)
    try:
        return cache_bytes(mode, cache)
    finally:
        del cache


def batch_for_budget(model, mode: Mode, T: int, args, device, budget: int) -> dict:
    """Largest batch whose full-depth cache (T prompt + new tokens per request) fits `budget` bytes.

    The cache's bytes are affine in the batch (per-request buffers + shared constants such as the
    sketch matrices): measured at B=1 and B=2, then ``B = (budget - shared) // per_request``."""
    cap = capacity(T, args.new_tokens)
    cleanup(device)
    b1 = full_depth_cache_bytes(model, mode, 1, cap)
    cleanup(device)
    b2 = full_depth_cache_bytes(model, mode, 2, cap)
    cleanup(device)
    per, shared = b2 - b1, max(0, 2 * b1 - b2)
    B = int((budget - shared) // per) if per > 0 else 0
    return dict(per_request_bytes=per, shared_bytes=shared, batch_fit=B,
                batch=min(B, args.serve_max_batch) if args.serve_max_batch else B,
                full_layers=model.full_config.num_hidden_layers, capacity=cap)


def run_serving(model, mode: Mode, args, device, progress) -> dict:
    """Decode tokens/s at the largest batch of ``--serve-prompt``-token requests whose full-depth
    cache fits ``--kv-budget-gib`` (random K/V written into the cache; no prefill)."""
    budget = int(args.kv_budget_gib * GiB)
    T = args.serve_prompt
    if mode.cache in ("dynamic", "hqq"):
        return dict(mode=mode.key, label=mode.label, prompt=T, status="n/a",
                    error="the cache grows with the sequence (nothing preallocated to size the batch by)")
    try:
        fit = batch_for_budget(model, mode, T, args, device, budget)
    except torch.OutOfMemoryError as e:
        return dict(mode=mode.key, label=mode.label, prompt=T, status="OOM", error=str(e).splitlines()[0][:300])
    if fit["batch"] < 1:
        return dict(mode=mode.key, label=mode.label, prompt=T, status="nothing fits", **fit)
    row = run_one(model, mode, fit["batch"], T, args, device, progress, fill="synthetic")
    row.update(fit, kv_budget_bytes=budget, section="serve")
    if fit["batch"] < fit["batch_fit"]:
        row["note"] = f"batch capped at --serve-max-batch {args.serve_max_batch} (the budget holds {fit['batch_fit']})"
    return row


# ---------------------------------------------------------------------------------------------
# time to first token
def run_ttft(model, mode: Mode, T: int, args, device, progress) -> dict:
    """Seconds from a B=1 prompt of T tokens to its first token through the mode's prefill path
    (cache writes, and for QJLCache the compression, included), after one untimed run of the same shape."""
    from torch._dynamo.utils import counters

    row = dict(mode=mode.key, label=mode.label, batch=1, prompt=T, section="ttft",
               layers=model.config.num_hidden_layers)
    counters["qjl"].clear()
    C = args.ttft_chunk or T
    cap = capacity(T, args.new_tokens)
    cache = pf = None
    try:
        cleanup(device)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        g = torch.Generator(device="cpu").manual_seed(T + 7)
        ids = torch.randint(1, model.config.vocab_size, (1, T), generator=g).to(model.device)
        pf = compile_fn(model, mode, "prefill")
        with torch.no_grad():
            times = []
            cache = make_cache(mode, model, 1, cap)
            for i in range(1 + args.ttft_reps):
                if i:  # the same cache object again (its buffers are graph inputs: no retrace)
                    if mode.cache in ("dynamic", "hqq"):
                        cache = make_cache(mode, model, 1, cap)
                    else:
                        cache.reset()
                t0 = timer_now(device)
                _, logits = run_prefill(pf, cache, ids, C, device, progress, f"{mode.key} TTFT T={T}")
                first = logits[:, -1:].argmax(-1).cpu()  # the first token on the host
                times.append(timer_now(device) - t0)
                del logits, first
        row.update(ttft_s=min(times[1:]), warmup_s=times[0], ttft_all_s=times[1:], chunk=C, status="ok",
                   pass_counters=pass_counters())
        if device == "cuda":
            row["peak_bytes"] = torch.cuda.max_memory_allocated()
    except torch.OutOfMemoryError as e:
        row.update(status="OOM", error=str(e).splitlines()[0][:300])
    except Exception as e:  # noqa: BLE001 - report and go on with the next mode
        row.update(status="error", error=f"{type(e).__name__}: {str(e).splitlines()[0][:400] if str(e) else ''}")
        if _is_fatal(e):
            row["status"] = "CUDA error"
            CUDA_BROKEN.append(f"TTFT T={T} {mode.key}: {row['error']}")
    finally:
        del cache, pf
        reset_compiled()
        cleanup(device)
    return row
