"""End-to-end generation benchmark: eager vs compiled, fp16 vs compressed KV cache.

A Llama-3-8B-shaped model (random weights, bf16: hidden 4096, 32 q / 8 kv heads, head_dim 128,
intermediate 14336, vocab 128256; ``--layers`` shortens it, ``--model`` loads a local HF folder)
generates after prompts of 4k/32k/128k tokens at batch 1 and 8. Modes, all in one run on one GPU:

  eager      HF eager, DynamicCache, SDPA
  inductor   torch.compile (Inductor) + HF StaticCache, CUDA graphs (mode="reduce-overhead") on the
             decode step, prefill eager                                     <- the peer (speedups vs it)
  hqq        HF eager + transformers' QuantizedCache, HQQ 4-bit (where `hqq` is installed)
  qjl-eager  eager QJLCache (update() returns dequantized K/V: correct, not fast)
  qjl        torch.compile(backend="qjl") + QJLCache, CUDA graphs on the decode step; prefill through
             the qjl passes (fused qjl::attend over the compressed past) with eager lowering
  decoquant  as qjl with QJLConfig(method="decoquant"); CUDA graphs where its Triton kernels exist
  rotation   as qjl with the rotation + Lloyd-Max codec (preset rotation-k4v3)

Per run: prefill seconds (chunked, ``--chunk`` tokens a forward), decode tokens/s (median step time
from CUDA events, shared timer benchmarks/timer.py, after warm-up/compilation), peak GPU memory,
KV-cache bytes measured from the allocated tensors (QJLCache.memory()["allocated_bytes"]), and per
mode the longest prompt that fits ``--budget-gib`` (search over prompt length; each probe allocates
the cache and runs one prefill chunk at the end of it, peak allocation measured).

    python benchmarks/e2e.py                       # full grid on CUDA (see --help)
    python benchmarks/e2e.py --layers 8 --time-limit 500
    python benchmarks/e2e.py --quick               # CPU smoke run, tiny model, seconds
    qjl-compile bench e2e [args]                   # the same file, via runpy

Writes <out-dir>/e2e{,_quick}.json, .md (tables), _tokens.png, _bytes.png.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))


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

LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=500000.0,
                 max_position_embeddings=1 << 22, tie_word_embeddings=False, rms_norm_eps=1e-5)
GiB = 1 << 30
MiB = 1 << 20


# ---------------------------------------------------------------------------------------------
# modes
@dataclass
class Mode:
    key: str
    label: str
    cache: str        # dynamic | static | hqq | qjl | decoquant
    decode: str       # eager | inductor | qjl
    prefill: str      # eager | qjl (qjl passes, eager lowering: fused attend over the compressed past)
    cudagraphs: bool = False
    slow: bool = False  # decode steps capped by --slow-steps / --slow-seconds
    note: str = ""
    options: dict = field(default_factory=dict)  # qjl backend options (CPU: aot_eager lowering)


def mode_table(device: str, args) -> dict[str, Mode]:
    cuda = device == "cuda"
    lowering = {} if cuda else {"lowering": "aot_eager"}
    modes = {
        "eager": Mode("eager", "HF eager, DynamicCache, SDPA", "dynamic", "eager", "eager", slow=True),
        "inductor": Mode("inductor", "Inductor + StaticCache, CUDA graphs", "static", "inductor", "eager",
                         cudagraphs=True),
        "hqq": Mode("hqq", "HF eager, QuantizedCache HQQ 4-bit", "hqq", "eager", "eager", slow=True),
        "qjl-eager": Mode("qjl-eager", "eager QJLCache (dequantize path)", "qjl", "eager", "eager", slow=True),
        "qjl": Mode("qjl", "qjl backend + QJLCache" + (", CUDA graphs" if cuda else ", aot_eager (CPU)")
                    + (", prefill eager" if args.qjl_prefill == "eager" else ""),
                    "qjl", "qjl", "qjl" if args.qjl_prefill == "compiled" else "eager", cudagraphs=cuda),
        "decoquant": Mode("decoquant", "qjl backend + QJLCache(decoquant)", "decoquant", "qjl",
                          "qjl" if args.qjl_prefill == "compiled" else "eager"),
    }
    modes["rotation"] = Mode("rotation", f"qjl backend + QJLCache({ROTATION_PRESET})", "rotation", "qjl",
                             "qjl" if args.qjl_prefill == "compiled" else "eager")
    for m in modes.values():
        m.options = dict(lowering)
    for key, codec in (("decoquant", 1), ("rotation", 2)):
        dq = modes[key]
        if cuda and has_cuda_kernel(codec):
            dq.cudagraphs = True
            dq.label += ", CUDA graphs"
        elif cuda:
            dq.slow = True
            dq.label += ", no CUDA graphs"
            dq.note = f"codec {codec} has no CUDA kernel here: qjl::attend/append run the PyTorch path on the GPU"
    if not cuda:
        modes["inductor"].note = "needs CUDA (skipped in --quick)"
    return modes


def has_cuda_kernel(codec: int) -> bool:
    """True when the CUDA implementation of the qjl ops has Triton kernels for `codec`."""
    try:
        from qjl_compile.kernels import triton as kt
    except Exception:  # noqa: BLE001
        return False
    return kt.has_kernels(codec)


def hqq_available() -> str | None:
    """None if transformers' QuantizedCache(backend="hqq") can run here, else the reason."""
    try:
        from transformers.utils import is_hqq_available
        if not is_hqq_available():
            return "hqq not installed"
        import hqq.core.quantize  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return f"hqq import failed: {type(e).__name__}: {e}"
    return None


# ---------------------------------------------------------------------------------------------
# model, caches
def build_model(args, device, dtype):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if args.model:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, local_files_only=True,
                                                     attn_implementation="sdpa")
        if args.layers and args.layers < model.config.num_hidden_layers:
            model.model.layers = model.model.layers[: args.layers]
            model.config.num_hidden_layers = args.layers
            if getattr(model.config, "layer_types", None):
                model.config.layer_types = model.config.layer_types[: args.layers]
        return model.to(device).eval(), f"{args.model} ({model.config.num_hidden_layers} layers)"
    if args.quick:
        from qjl_compile.models import tiny_llama
        model = tiny_llama(layers=args.layers or 2, hidden=128, heads=4, kv_heads=2, vocab=512,
                           max_positions=1 << 20, dtype=dtype)
        return model.to(device), f"tiny Llama ({model.config.num_hidden_layers} layers, hidden 128, 4 q / 2 kv heads, d=32)"
    layers = args.layers or 32
    cfg = LlamaConfig(**{**LLAMA3_8B, "num_hidden_layers": layers}, attn_implementation="sdpa")
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            torch.manual_seed(0)
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    desc = f"Llama-3-8B shape, random weights, {layers}" + (" of 32" if layers != 32 else "") + " layers"
    return model.to(dtype).eval(), desc


def kv_heads(cfg):
    return getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads


def head_dim(cfg):
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


ROTATION_PRESET = "rotation-k4v3"


def qjl_config(model, method):
    from qjl_compile import QJLConfig
    if method in ("decoquant", "rotation"):
        return QJLConfig.preset("decoquant4" if method == "decoquant" else ROTATION_PRESET,
                                head_dim=head_dim(model.config), num_layers=model.config.num_hidden_layers)
    return QJLConfig.for_model(model.config)


_COMPAT_NOTES: list[str] = []


def qjl_cache_class():
    """QJLCache, or a subclass that lets it set ``max_cache_len`` where transformers' `Cache` still has
    the read-only deprecated ``max_cache_len`` property (5.x before its removal, e.g. 5.17): there
    ``QJLCache.__init__`` fails with "property 'max_cache_len' of 'QJLCache' object has no setter"."""
    import inspect

    from qjl_compile import QJLCache
    prop = inspect.getattr_static(QJLCache, "max_cache_len", None)  # QJLCache's own, else Cache's
    if not (isinstance(prop, property) and prop.fset is None):
        return QJLCache

    class QJLCacheCompat(QJLCache):
        max_cache_len = property(lambda self: self.__dict__["_max_cache_len"],
                                 lambda self, v: self.__dict__.__setitem__("_max_cache_len", v))

    note = ("transformers' Cache.max_cache_len is a read-only property here: QJLCache.__init__ cannot set it; "
            "the benchmark uses a subclass that adds a setter (fix belongs in qjl_compile/cache.py)")
    if note not in _COMPAT_NOTES:
        _COMPAT_NOTES.append(note)
    return QJLCacheCompat


def capacity(T: int, new_tokens: int) -> int:
    """Cache capacity: prompt + new tokens, rounded up to 256 (aligned mask rows keep SDPA on its fused
    kernels; a multiple of the residual window for QJLCache)."""
    return -(-(T + new_tokens + 1) // 256) * 256


def make_cache(mode: Mode, model, B: int, cap: int):
    from transformers import DynamicCache, QuantizedCache, StaticCache

    cfg = model.config
    if mode.cache == "dynamic":
        return DynamicCache(config=cfg)
    if mode.cache == "static":
        c = StaticCache(config=cfg, max_cache_len=cap)
        c.early_initialization(B, kv_heads(cfg), head_dim(cfg), model.dtype, model.device)
        return c
    if mode.cache == "hqq":
        return QuantizedCache(backend="hqq", config=cfg, nbits=4, axis_key=1, axis_value=1,
                              q_group_size=min(64, head_dim(cfg)), residual_length=128)
    return qjl_cache_class()(cfg, max_cache_len=cap, qjl_config=qjl_config(model, mode.cache), batch_size=B,
                    device=model.device, dtype=model.dtype)


def _walk_tensors(obj, seen, depth=0):
    if depth > 4:
        return 0
    if isinstance(obj, torch.Tensor):
        key = (obj.untyped_storage().data_ptr(), obj.untyped_storage().nbytes())
        if obj.numel() == 0 or key in seen:
            return 0
        seen.add(key)
        return obj.untyped_storage().nbytes()
    if isinstance(obj, (list, tuple)):
        return sum(_walk_tensors(o, seen, depth + 1) for o in obj)
    if isinstance(obj, dict):
        return sum(_walk_tensors(o, seen, depth + 1) for o in obj.values())
    return 0


def cache_bytes(mode: Mode, cache) -> int:
    """Bytes of every tensor the cache holds (allocations, not formulas)."""
    if mode.cache in ("qjl", "decoquant", "rotation"):
        return int(cache.memory()["allocated_bytes"])
    seen: set = set()
    return sum(_walk_tensors(vars(layer), seen) for layer in cache.layers)


def fp16_bytes(model, B, tokens) -> int:
    cfg = model.config
    return 2 * cfg.num_hidden_layers * B * kv_heads(cfg) * head_dim(cfg) * 2 * tokens


def fill_cache(mode: Mode, cache, model, B: int, T: int, random: bool, chunk: int):
    """Put T tokens in the cache without running the model (budget probes; --fill synthetic)."""
    if T <= 0:
        return
    cfg = model.config
    H, D, dt, dev = kv_heads(cfg), head_dim(cfg), model.dtype, model.device

    def kv(n):
        if random:
            return torch.randn(B, H, n, D, dtype=dt, device=dev), torch.randn(B, H, n, D, dtype=dt, device=dev)
        z = torch.zeros(B, H, n, D, dtype=dt, device=dev)
        return z, z

    if mode.cache == "static":
        for layer in cache.layers:
            if random:
                done = 0
                while done < T:
                    n = min(chunk, T - done)
                    k, v = kv(n)
                    layer.keys[:, :, done: done + n] = k
                    layer.values[:, :, done: done + n] = v
                    done += n
            layer.cumulative_length.fill_(T)
        return
    if mode.cache in ("qjl", "decoquant", "rotation"):
        for layer in cache.layers:
            if random:
                done = 0
                while done < T:
                    n = min(chunk, T - done)
                    k, v = kv(n)
                    torch.ops.qjl.append(layer.state, layer.consts, k, v, layer.meta)
                    done += n
            else:
                layer.state[0].fill_(T)
            layer.seen = T
        return
    for i in range(cfg.num_hidden_layers):  # dynamic / hqq: one update holding T tokens
        k, v = kv(T)
        cache.update(k, v, i)
        del k, v


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


def compile_fn(model, mode: Mode, what: str):
    """The forward used for prefill or decode in this mode (compiled where the mode says so)."""
    kind = mode.prefill if what == "prefill" else mode.decode
    if kind == "eager":
        return model.forward
    if kind == "inductor":
        return torch.compile(model.forward, mode="reduce-overhead" if mode.cudagraphs else None)
    # qjl backend
    if what == "prefill":  # passes only (fused attend), no Inductor compile per prompt shape
        return torch.compile(model.forward, backend="qjl", options={"lowering": "eager"})
    opts = dict(mode.options)
    if mode.cudagraphs:
        opts["mode"] = "reduce-overhead"
    return torch.compile(model.forward, backend="qjl", options=opts or None)


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


def run_one(model, mode: Mode, B: int, T: int, args, device, progress) -> dict:
    row = dict(mode=mode.key, label=mode.label, batch=B, prompt=T, new_tokens=args.new_tokens)
    cap = capacity(T, args.new_tokens)
    cache = pf = dec = None
    base = 0
    try:
        cleanup(device)
        base = torch.cuda.memory_allocated() if device == "cuda" else 0
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        cache = make_cache(mode, model, B, cap)
        synthetic = args.fill == "synthetic" or (args.fill == "auto" and B * T > args.prefill_token_limit)
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
        row.update(decode_ms=ms, tokens_per_s=B * 1e3 / ms, decode_warmup_s=warm_s, steps_timed=timed)
        if wall is not None:
            row["wall_ms_per_step"] = wall  # host clock over the timed steps (CUDA events give decode_ms)
        if per is not None:
            row["step_ms"] = per
        row["kv_bytes"] = cache_bytes(mode, cache)
        held = cap if mode.cache in ("static", "qjl", "decoquant", "rotation") else int(cache.get_seq_length())
        row["kv_capacity_tokens"] = held
        row["kv_fp16_bytes_same_capacity"] = fp16_bytes(model, B, held)
        row["kv_ratio_vs_fp16"] = row["kv_fp16_bytes_same_capacity"] / max(row["kv_bytes"], 1)
        if mode.cache in ("qjl", "decoquant", "rotation"):
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


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


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
# output
def fmt_tokens(n):
    if n is None:
        return "-"
    return f"{n / 1024:.0f}k" if n >= 1024 and n % 1024 == 0 else str(n)


def tables(res: dict) -> str:
    from tabulate import tabulate

    runs = res["runs"]
    peer = {(r["batch"], r["prompt"]): r for r in runs if r["mode"] == "inductor" and r.get("status") == "ok"}
    rows = []
    for r in runs:
        p = peer.get((r["batch"], r["prompt"]))
        ok = r.get("status") == "ok"
        sp = f"{r['tokens_per_s'] / p['tokens_per_s']:.2f}x" if ok and p else "-"
        kvx = f"{p['kv_bytes'] / r['kv_bytes']:.2f}x" if ok and p and r.get("kv_bytes") else "-"
        rows.append([
            r["batch"], fmt_tokens(r["prompt"]), r["label"],
            f"{r['prefill_s']:.2f}" if ok and r.get("prefill_s") is not None else ("synthetic" if ok else "-"),
            f"{r['tokens_per_s']:.1f}" if ok else r.get("status"),
            f"{r['decode_ms']:.2f}" if ok else "-",
            sp,
            f"{r['peak_bytes'] / GiB:.1f}" if ok and r.get("peak_bytes") else "-",
            (f"{r['kv_bytes'] / MiB:.0f}" if r['kv_bytes'] >= 100 * MiB else f"{r['kv_bytes'] / MiB:.3g}") if ok else "-",
            f"{r['kv_ratio_vs_fp16']:.2f}x" if ok else "-",
            kvx,
            r.get("steps_timed", "-"),
        ])
    head = ["B", "prompt", "mode", "prefill s", "decode tok/s", "ms/step", "tok/s vs inductor",
            "peak GiB", "KV MiB", "fp16/KV (same cap.)", "inductor KV / KV", "steps"]
    out = [tabulate(rows, head, tablefmt="github")]
    notes = sorted({f"- {r['label']}: {r['note']}" for r in runs if r.get("note")} |
                   {f"- {r['label']} B={r['batch']} T={r['prompt']}: {r['status']}: {r.get('error', '')}"
                    for r in runs if r.get("status") not in ("ok", None)})
    if notes:
        out.append("\n".join(notes))
    if res.get("budget"):
        bpeer = next((b for b in res["budget"] if b["mode"] == "inductor" and b.get("max_prompt")), None)
        brows = []
        for b in res["budget"]:
            x = f"{b['max_prompt'] / bpeer['max_prompt']:.2f}x" if bpeer and b.get("max_prompt") else "-"
            brows.append([b["label"], b["batch"], f"{b['budget_bytes'] / GiB:.3g}", fmt_tokens(b.get("max_prompt")),
                          x, len(b.get("probes", [])), b.get("status")])
        out.append(tabulate(brows, ["mode", "B", "budget GiB", "longest prompt", "vs inductor", "probes", "search"],
                            tablefmt="github"))
    if res.get("targets"):
        trows = [[t["target"], t.get("value"), {True: "met", False: "NOT met", None: "n/a"}[t.get("met")],
                  t.get("where", "")] for t in res["targets"]]
        out.append(tabulate(trows, ["target", "measured", "", "where"], tablefmt="github"))
    return "\n\n".join(out)


def targets(res: dict) -> list[dict]:
    ok = [r for r in res["runs"] if r.get("status") == "ok"]

    def get(mode, B, T):
        return next((r for r in ok if r["mode"] == mode and r["batch"] == B and r["prompt"] == T), None)

    out = []
    Ts = sorted({r["prompt"] for r in ok if r["batch"] == 1})
    longest = max((T for T in Ts if get("qjl", 1, T) and get("inductor", 1, T)), default=None)
    if longest:
        q, p = get("qjl", 1, longest), get("inductor", 1, longest)
        v = q["tokens_per_s"] / p["tokens_per_s"]
        out.append(dict(target="compiled QJL decode >= 1.4x Inductor StaticCache tok/s (longest prompt)",
                        value=f"{v:.2f}x", met=v >= 1.4, where=f"B=1, {fmt_tokens(longest)}"))
        v = p["kv_bytes"] / q["kv_bytes"]
        out.append(dict(target="KV bytes >= 4x smaller than fp16 StaticCache (same capacity)",
                        value=f"{v:.2f}x", met=v >= 4, where=f"B=1, {fmt_tokens(longest)}"))
    else:
        out.append(dict(target="compiled QJL decode >= 1.4x Inductor StaticCache tok/s", value=None, met=None,
                        where="no run of both qjl and inductor"))
        # the same QJLCache serves qjl-eager: its allocation answers the bytes target
        longest = max((T for T in Ts if get("qjl-eager", 1, T) and get("inductor", 1, T)), default=None)
        if longest:
            q, p = get("qjl-eager", 1, longest), get("inductor", 1, longest)
            v = p["kv_bytes"] / q["kv_bytes"]
            out.append(dict(target="KV bytes >= 4x smaller than fp16 StaticCache (same capacity)",
                            value=f"{v:.2f}x", met=v >= 4, where=f"B=1, {fmt_tokens(longest)} (QJLCache of qjl-eager)"))
        else:
            q = next((r for r in ok if r["mode"] in ("qjl", "qjl-eager")), None)
            if q:
                v = q["kv_ratio_vs_fp16"]
                out.append(dict(target="KV bytes >= 4x smaller than fp16 (same capacity)", value=f"{v:.2f}x",
                                met=v >= 4, where=f"B={q['batch']}, {fmt_tokens(q['prompt'])}"))
    b = {x["mode"]: x for x in res.get("budget", []) if x.get("max_prompt")}
    if "qjl" in b and "inductor" in b:
        v = b["qjl"]["max_prompt"] / b["inductor"]["max_prompt"]
        out.append(dict(target=">= 3x longer context than fp16 StaticCache at a fixed budget", value=f"{v:.2f}x",
                        met=v >= 3, where=f"{b['qjl']['budget_bytes'] / GiB:.1f} GiB, B={b['qjl']['batch']}"))
    else:
        out.append(dict(target=">= 3x longer context at a fixed budget", value=None, met=None,
                        where="no context search of both qjl and inductor"))
    if "qjl-eager" in b and "inductor" in b:
        v = b["qjl-eager"]["max_prompt"] / b["inductor"]["max_prompt"]
        out.append(dict(target="(eager QJLCache: longer context at a fixed budget)", value=f"{v:.2f}x",
                        met=v >= 3, where=f"{b['qjl-eager']['budget_bytes'] / GiB:.1f} GiB, B=1"))
    T32 = 32768 if get("qjl", 1, 32768) and get("qjl-eager", 1, 32768) else \
        max((T for T in Ts if get("qjl", 1, T) and get("qjl-eager", 1, T)), default=None)
    if T32:
        v = get("qjl", 1, T32)["tokens_per_s"] / get("qjl-eager", 1, T32)["tokens_per_s"]
        out.append(dict(target="compiled QJL >= 2x eager QJLCache decode at 32k", value=f"{v:.2f}x", met=v >= 2,
                        where=f"B=1, {fmt_tokens(T32)}"))
    else:
        out.append(dict(target="compiled QJL >= 2x eager QJLCache decode at 32k", value=None, met=None,
                        where="no run of both qjl and qjl-eager"))
    return out



def _log_axes(ax, ylabel: str, title: str) -> None:
    """Log-log axes over prompt length, shared by both plots."""
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)

def plots(res: dict, stem: str) -> list[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # noqa: BLE001
        return []
    ok = [r for r in res["runs"] if r.get("status") == "ok"]
    labels = {r["mode"]: r["label"] for r in ok}
    batches = sorted({r["batch"] for r in ok})
    files = []
    fig, axes = plt.subplots(1, max(1, len(batches)), figsize=(6 * max(1, len(batches)), 4.5), squeeze=False)
    for ax, B in zip(axes[0], batches):
        for m in labels:
            pts = sorted((r["prompt"], r["tokens_per_s"]) for r in ok if r["mode"] == m and r["batch"] == B)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=labels[m])
        _log_axes(ax, "decode tokens/s", f"batch {B}")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(res["header"]["model"], fontsize=9)
    fig.tight_layout()
    files.append(stem + "_tokens.png")
    fig.savefig(files[-1], dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    B0 = batches[0] if batches else 1
    for m in labels:
        pts = sorted((r["prompt"], r["kv_bytes"] / MiB) for r in ok if r["mode"] == m and r["batch"] == B0)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=labels[m])
    _log_axes(ax, "KV cache MiB (allocated)", f"KV cache bytes, batch {B0}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    files.append(stem + "_bytes.png")
    fig.savefig(files[-1], dpi=110)
    plt.close(fig)
    return files


def header(args, device, model_desc, model) -> dict:
    import transformers
    h = dict(device=env_header() if env_header else platform.platform(),
             transformers=transformers.__version__, torch=torch.__version__,
             python=platform.python_version(), model=model_desc, dtype=str(model.dtype).replace("torch.", ""),
             weights_bytes=weight_bytes(model), chunk=args.chunk, new_tokens=args.new_tokens,
             command="python " + " ".join([os.path.relpath(__file__)] + sys.argv[1:]))
    try:
        import triton
        h["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        pass
    try:
        from importlib.metadata import version
        h["hqq"] = version("hqq")
    except Exception:  # noqa: BLE001
        pass
    if device == "cuda" and copy_bandwidth is not None and not args.child:
        h["copy_GBs"] = round(copy_bandwidth(), 1)
    return h


def header_text(h: dict) -> str:
    s = [f"device: {h['device']}", f"transformers {h['transformers']}" + (f", hqq {h['hqq']}" if "hqq" in h else ""),
         f"model: {h['model']}, {h['dtype']}, weights {h['weights_bytes'] / GiB:.2f} GiB",
         f"prefill chunk {h['chunk']} tokens, {h['new_tokens']} new tokens"]
    if "copy_GBs" in h:
        s.append(f"measured copy bandwidth {h['copy_GBs']} GB/s")
    s.append(f"command: {h['command']}")
    return "\n".join(s)


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
                    help="subset of: inductor qjl eager qjl-eager hqq decoquant rotation (default: all that run here)")
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
    jobs = [("grid", args.batch[0], T, ["--batch", str(args.batch[0]), "--prompts", str(T), "--budget-gib", "0"])
            for T in args.prompts]
    if args.budget_gib > 0:
        bm = args.budget_modes or [m for m in (args.modes or ["eager", "qjl-eager", "hqq", "inductor", "qjl"])
                                   if not (args.quick and m == "hqq")]
        jobs += [("budget", args.budget_batch, m, ["--budget-only", "--budget-gib", str(args.budget_gib),
                                                   "--budget-batch", str(args.budget_batch), "--budget-modes", m])
                 for m in bm]
    jobs += [("grid", B, T, ["--batch", str(B), "--prompts", str(T), "--budget-gib", "0"])
             for B in args.batch[1:] for T in args.prompts]
    res = dict(header=None, runs=[], budget=[], skipped_modes={}, targets=[], jobs=[])
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
    wanted = args.modes or (["eager", "qjl-eager", "qjl", "hqq"] if args.quick else
                            ["eager", "qjl-eager", "hqq", "inductor", "qjl", "decoquant", "rotation"])
    unknown = [m for m in wanted if m not in modes]
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
    res = dict(header=hdr, runs=[], budget=[], skipped_modes=skipped, targets=[])
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
            if m.cache in ("qjl", "decoquant", "rotation") and m.decode == "qjl":
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

    # order: first batch size, then the budget search, then the other batch sizes (--time-limit cuts the tail)
    with progress.bar(total=len(args.batch) * len(args.prompts) * len(run_modes), desc="e2e runs", unit="run") as bar:
        if not args.budget_only:
            run_grid(args.batch[:1], bar)
        if args.budget_gib > 0:
            run_budget()
        if not args.budget_only:
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
