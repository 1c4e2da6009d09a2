"""Tensor-parallel decode: same greedy tokens as one device, and decode tokens/s at long context.

A Llama-3-8B-shaped model (random weights, 32 layers, 32 q / 8 kv heads, d=128, bf16) is sharded by
transformers' own tensor parallelism (``from_pretrained(dir, tp_plan="auto")``): every rank holds 4 of
the 8 KV heads, its QJLCache compresses only those, ``o_proj``/``down_proj`` all-reduce the hidden
states and nothing else crosses ranks. Modes, each on the same TP model:

  fp16       HF StaticCache (16-bit K/V), decode step torch.compile'd by Inductor, CUDA graphs   <- the peer
  qjl        qjl_compile.compile(model) (QJLCache, reference preset), CUDA graphs on the decode step
  rotation   the same with the rotation + Lloyd-Max codec (preset rotation-k4v3)
  decoquant  the same with DecoQuant (preset decoquant4)

Per mode:
  * tokens: greedy decode of ``--check-new`` tokens after a ``--check-prompt``-token random prompt, on the
    TP model and on the unsharded model on rank 0's device alone (same checkpoint): tokens equal or not,
    the first step where they differ, and the single-device top-1/top-2 logit margin there (random weights
    give near-ties that a different reduction order can flip; the fp16 row is the yardstick for that);
  * speed: the cache filled with ``--context`` random K/V tokens per rank (synthetic fill: no 128k
    prefill), then decode steps timed (CUDA events, benchmarks/timer.py; median, rank 0, max over ranks);
  * cache bytes per rank and in total (QJLCache.memory()["tp"], StaticCache tensors).

GPU (2 GPUs, NCCL; NVLink multicast stays off, as the machine's notes require: this script sets
NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1 and refuses other values):

    torchrun --nproc-per-node 2 benchmarks/tp.py                        # 32 layers, 128k, every mode
    torchrun --nproc-per-node 2 benchmarks/tp.py --modes fp16,qjl --context 32768

CPU smoke run (gloo, tiny Llama, seconds):

    torchrun --nproc-per-node 2 benchmarks/tp.py --quick

The random checkpoint is written once (rank 0, safetensors) under ``--checkpoint`` and reused.
Writes <out-dir>/tp{,_quick}.json and .md (rank 0).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from datetime import timedelta

# NVLink multicast off before anything loads NCCL / symmetric memory (KINDS.md: it can take the host's GPUs down)
_NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
for _k, _v in _NO_MULTICAST.items():
    if os.environ.get(_k, _v) != _v:
        sys.exit(f"benchmarks/tp.py: {_k}={os.environ[_k]!r} would turn NVLink multicast on; this benchmark runs "
                 f"only with {_k}={_v} (unset it or set it to {_v})")
    os.environ[_k] = _v

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

_HERE = os.path.dirname(os.path.abspath(__file__))
LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=500000.0,
                 max_position_embeddings=1 << 22, tie_word_embeddings=False, rms_norm_eps=1e-5)
TINY = dict(vocab_size=320, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, max_position_embeddings=1 << 16, tie_word_embeddings=False)
MODES = ("fp16", "qjl", "rotation", "decoquant")
PRESETS = {"rotation": "rotation-k4v3", "decoquant": "decoquant4"}


def _timer():
    import importlib.util
    spec = importlib.util.spec_from_file_location("_qjl_bench_timer", os.path.join(_HERE, "timer.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def log(msg: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"[tp {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# setup
def init(args) -> torch.device:
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", rank))
    if world < 2:
        sys.exit("benchmarks/tp.py runs under torchrun with 2 or more processes: torchrun --nproc-per-node 2 "
                 "benchmarks/tp.py [--quick]")
    if args.device == "cuda":
        if torch.cuda.device_count() < world:
            sys.exit(f"benchmarks/tp.py: {world} ranks but {torch.cuda.device_count()} CUDA devices; use --quick "
                     f"(CPU, gloo) or fewer ranks")
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        dist.init_process_group("nccl", device_id=device, timeout=timedelta(hours=1))
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=timedelta(hours=1))
    torch.set_num_threads(args.threads)
    return device


def make_checkpoint(args, dtype) -> str:
    """Rank 0 writes the random checkpoint once (seeded); every rank waits for it."""
    from transformers import LlamaConfig, LlamaForCausalLM
    path = args.checkpoint or os.path.join(os.environ.get("TMPDIR", "/tmp"),
                                           "qjl_tp_tiny" if args.quick else f"qjl_tp_llama3_8b_{args.layers or 32}l")
    done = os.path.join(path, "DONE")
    if dist.get_rank() == 0 and not os.path.exists(done):
        shape = dict(TINY if args.quick else LLAMA3_8B)
        shape["num_hidden_layers"] = args.layers or shape["num_hidden_layers"]
        cfg = LlamaConfig(**shape, attn_implementation="sdpa")
        t0 = time.time()
        prev = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device("cuda" if args.device == "cuda" else "cpu"):
                torch.manual_seed(args.seed)
                model = LlamaForCausalLM(cfg)
        finally:
            torch.set_default_dtype(prev)
        model.save_pretrained(path)
        del model
        open(done, "w").close()
        log(f"random checkpoint written to {path} in {time.time() - t0:.0f} s")
    dist.barrier()
    return path


def load(path, dtype, device, tp: bool):
    from transformers import AutoModelForCausalLM
    kw = dict(dtype=dtype, attn_implementation="sdpa", local_files_only=True)
    if tp:
        from transformers.distributed import DistributedConfig
        return AutoModelForCausalLM.from_pretrained(
            path, distributed_config=DistributedConfig(tp_size=dist.get_world_size()), **kw).eval()
    return AutoModelForCausalLM.from_pretrained(path, **kw).to(device).eval()


def qjl_config(model, mode):
    from qjl_compile import QJLConfig
    cfg = model.config
    if mode == "qjl":
        return QJLConfig.for_model(cfg)
    return QJLConfig.preset(PRESETS[mode], head_dim=cfg.head_dim, num_layers=cfg.num_hidden_layers)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------
# one mode: a decode setup (forward fn + cache) that greedy() and timing share
class Setup:
    def __init__(self, model, mode, cap, args, device):
        import qjl_compile
        from qjl_compile import QJLCache
        from transformers import StaticCache
        self.model, self.mode, self.device = model, mode, device
        self.cudagraphs = device.type == "cuda" and not args.no_cudagraphs
        cfg = model.config
        if mode == "fp16":
            # per-rank heads under TP, as transformers' own generate() sizes a StaticCache
            heads = cfg.num_key_value_heads // (getattr(model, "_tp_size", None) or 1)
            self.cache = StaticCache(config=cfg, max_cache_len=cap)
            self.cache.early_initialization(1, heads, cfg.head_dim, model.dtype, device)
            self.prefill_fn = model.forward
            self.decode_fn = torch.compile(model.forward, mode="reduce-overhead" if self.cudagraphs else None,
                                           **({} if device.type == "cuda" else {"backend": args.cpu_backend}))
        else:
            opts = {} if device.type == "cuda" else {"options": {"lowering": args.cpu_lowering}}
            qjl_compile.compile(model, qjl_config(model, mode), mode="reduce-overhead" if self.cudagraphs else None,
                                **opts)
            self.cache = QJLCache(cfg, max_cache_len=cap, qjl_config=model._qjl_compile.config, batch_size=1,
                                  device=device, dtype=model.dtype)  # this rank's KV heads (config records TP)
            self.prefill_fn = self.decode_fn = model.forward  # qjl_compile's dispatcher: decode steps compiled

    def forward(self, fn, ids):
        from qjl_compile.compat import cache_kwargs
        if self.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        return fn(input_ids=ids, **cache_kwargs(self.cache), use_cache=True, logits_to_keep=1).logits[:, -1]

    def close(self):
        import qjl_compile
        if self.mode != "fp16":
            qjl_compile.uncompile(self.model)
        self.cache = None
        torch._dynamo.reset()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # synthetic fill: T random K/V tokens in every layer, this rank's heads (the cache's own shapes)
    def fill(self, T, chunk):
        g = torch.Generator(device=self.device).manual_seed(1234 + (dist.get_rank() if dist.is_initialized() else 0))
        for layer in self.cache.layers:
            if self.mode == "fp16":
                B, H, _, D = layer.keys.shape
            else:
                B, H, _, D = layer.state[1].shape
            done = 0
            while done < T:
                n = min(chunk, T - done)
                k = torch.randn(B, H, n, D, generator=g, device=self.device).to(self.model.dtype)
                v = torch.randn(B, H, n, D, generator=g, device=self.device).to(self.model.dtype)
                if self.mode == "fp16":
                    layer.keys[:, :, done:done + n] = k
                    layer.values[:, :, done:done + n] = v
                else:
                    torch.ops.qjl.append(layer.state, layer.consts, k, v, layer.meta)
                done += n
            if self.mode == "fp16":
                if not hasattr(layer, "cumulative_length"):
                    raise RuntimeError("benchmarks/tp.py: this transformers' StaticLayer has no cumulative_length; "
                                       "the synthetic fill needs it (use --context 0 for tokens only)")
                layer.cumulative_length.fill_(T)
        if self.mode != "fp16":
            self.cache.advance_host_length(T)

    def cache_bytes(self) -> tuple[int, int]:
        """(this rank, all ranks) bytes of the cache's tensors."""
        if self.mode == "fp16":
            mine = sum(t.numel() * t.element_size() for l in self.cache.layers for t in (l.keys, l.values))
        else:
            mine = self.cache.memory()["allocated_bytes"]
        tot = torch.tensor([mine], dtype=torch.float64, device=self.device)
        dist.all_reduce(tot)
        return int(mine), int(tot.item())


def greedy(setup: Setup, prompt, n):
    """(tokens, top1-top2 logit margins) of n greedy steps after the prompt."""
    logits = setup.forward(setup.prefill_fn, prompt)
    toks, margins = [], []
    for _ in range(n):
        top = logits.float().topk(2, dim=-1)
        margins.append(float(top.values[0, 0] - top.values[0, 1]))
        tok = top.indices[:, :1]
        toks.append(int(tok))
        logits = setup.forward(setup.decode_fn, tok)
    return toks, margins


def time_decode(setup: Setup, args, timer):
    tok = torch.zeros(1, 1, dtype=torch.long, device=setup.device)
    state = {"tok": tok}

    def step():
        state["tok"] = setup.forward(setup.decode_fn, state["tok"]).argmax(-1, keepdim=True)

    for _ in range(args.warmup):
        step()
    sync(setup.device)
    if setup.device.type == "cuda":
        ms = timer.bench(step, warmup=1, rep=args.steps, flush_l2=False)
    else:
        per = []
        for _ in range(args.steps):
            t = time.perf_counter()
            step()
            per.append((time.perf_counter() - t) * 1e3)
        ms = statistics.median(per)
    worst = torch.tensor([ms], dtype=torch.float64, device=setup.device)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return ms, float(worst.item())


# ---------------------------------------------------------------------------------------------
def run(args) -> dict:
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    device = init(args)
    timer = _timer()
    rank, world = dist.get_rank(), dist.get_world_size()
    path = make_checkpoint(args, dtype)
    modes = [m.strip() for m in args.modes.split(",")]
    bad = sorted(set(modes) - set(MODES))
    if bad:
        sys.exit(f"benchmarks/tp.py: unknown modes {bad}; choose from {MODES}")
    g = torch.Generator().manual_seed(args.seed + 1)
    res = {"argv": sys.argv[1:], "world_size": world, "device": timer.env_header() if device.type == "cuda" else "cpu",
           "backend": dist.get_backend(), "checkpoint": path, "dtype": args.dtype,
           "multicast_env": {k: os.environ[k] for k in _NO_MULTICAST}, "modes": {}}

    # one capacity for every cache (reference and TP, tokens and speed): the same static shapes everywhere
    need = max(args.check_prompt + args.check_new, args.context + args.warmup + args.steps + 2)
    cap = -(-need // 256) * 256 + 256

    # 1. the single-device reference: rank 0 alone, unsharded model, short prompt
    ref = {}
    if rank == 0 and not args.no_reference:
        model = load(path, dtype, device, tp=False)
        prompt = torch.randint(0, model.config.vocab_size, (1, args.check_prompt), generator=g).to(device)
        for mode in modes:
            s = Setup(model, mode, cap, args, device)
            try:
                ref[mode] = greedy(s, prompt, args.check_new)
            except Exception as e:  # noqa: BLE001  (reported in the results, per mode)
                ref[mode] = " ".join(repr(e).split())[:500]
            finally:
                s.close()
        del model
        log(f"single-device reference done: {sorted(ref)}")
    dist.barrier()

    # 2. the TP model: tokens against the reference, then speed at --context
    model = load(path, dtype, device, tp=True)
    res["model"] = {k: getattr(model.config, k) for k in ("num_hidden_layers", "hidden_size", "num_attention_heads",
                                                          "num_key_value_heads", "head_dim", "vocab_size")}
    g = torch.Generator().manual_seed(args.seed + 1)  # the same prompt as the reference
    prompt = torch.randint(0, model.config.vocab_size, (1, args.check_prompt), generator=g).to(device)
    for mode in modes:
        row: dict = {}
        t0 = time.time()
        s = None
        try:
            s = Setup(model, mode, cap, args, device)  # one compile per mode: tokens, then speed on the same cache
            toks, _ = greedy(s, prompt, args.check_new)
            row["tokens_tp"] = toks
            if rank == 0 and mode in ref:
                r = ref[mode]
                if isinstance(r, str):
                    row["reference_error"] = r
                else:
                    diff = [i for i, (a, b) in enumerate(zip(toks, r[0])) if a != b]
                    row.update(tokens_1dev=r[0], same_tokens=not diff, first_diff=diff[0] if diff else None,
                               margin_at_first_diff=r[1][diff[0]] if diff else None, min_margin=min(r[1]))
            if args.context:
                s.cache.reset()  # same storage (static addresses): the compiled step is reused
                s.fill(args.context, args.fill_chunk)
                ms, worst = time_decode(s, args, timer)
                mine, total = s.cache_bytes()
                row.update(context=args.context, step_ms=ms, step_ms_max_rank=worst, tokens_per_s=1e3 / ms,
                           cache_bytes_rank=mine, cache_bytes_total=total)
                if mode != "fp16":
                    mem = s.cache.memory()
                    row.update(k_bits=mem["k_bits"], v_bits=mem["v_bits"],
                               kv_heads_per_rank=mem["tp"]["kv_heads_per_rank"])
        except Exception as e:  # noqa: BLE001  (one mode failing keeps the others; the error is in the table)
            row["error"] = " ".join(f"{type(e).__name__}: {e}".split())[:500]
        finally:
            if s is not None:
                s.close()
            torch._dynamo.reset()
        row["seconds"] = time.time() - t0
        res["modes"][mode] = row
        log(f"{mode}: {json.dumps({k: v for k, v in row.items() if not k.startswith('tokens')})}")
    dist.barrier()
    return res


def table(res: dict) -> str:
    lines = [f"TP x{res['world_size']} ({res['backend']}), {res['device']}, {res['dtype']} "
             f"(mode fp16 = the uncompressed cache at that dtype), {res.get('model')}", "",
             "| mode | same tokens as 1 device | first diff (1-dev margin there) | decode tok/s | step ms (max rank) "
             "| cache / rank | cache total | K / V bits |", "|---|---|---|---|---|---|---|---|"]
    for m, r in res["modes"].items():
        if "error" in r:
            lines.append(f"| {m} | error: {r['error'][:120]} | | | | | | |")
            continue
        same = r.get("same_tokens", "n/a")
        fd = "" if r.get("first_diff") is None else f"{r['first_diff']} ({r['margin_at_first_diff']:.3g})"
        sp = "| | |"  # tokens only (--context 0)
        if "step_ms" in r:
            sp = (f"{r['tokens_per_s']:.1f} | {r['step_ms']:.3f} ({r['step_ms_max_rank']:.3f}) | "
                  f"{r['cache_bytes_rank'] / 2**20:.1f} MiB | {r['cache_bytes_total'] / 2**20:.1f} MiB")
        bits = f"{r['k_bits']:.2f} / {r['v_bits']:.2f}" if "k_bits" in r else "16 / 16"
        lines.append(f"| {m} | {same} | {fd} | {sp} | {bits} |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="CPU smoke run: tiny Llama, gloo, 1k context")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--layers", type=int, default=None, help="default 32 (tiny: 2)")
    p.add_argument("--context", type=int, default=None,
                   help="tokens in the cache when decode is timed (default 131072; --quick 1024); 0: tokens only")
    p.add_argument("--check-prompt", type=int, default=None,
                   help="prompt tokens of the greedy check (default 512; quick 160: more than the 128-token residual "
                        "window, so the codecs compress)")
    p.add_argument("--check-new", type=int, default=None, help="greedy tokens compared (default 32; quick 8)")
    p.add_argument("--steps", type=int, default=None, help="timed decode steps (default 50; quick 5)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--fill-chunk", type=int, default=8192)
    p.add_argument("--dtype", default=None, choices=("bf16", "fp16", "fp32"), help="default bf16 (quick fp32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", default=None, help="folder for the random checkpoint (written once)")
    p.add_argument("--no-reference", action="store_true", help="skip the single-device greedy reference")
    p.add_argument("--no-cudagraphs", action="store_true")
    p.add_argument("--cpu-lowering", default="aot_eager", help="qjl backend lowering on CPU (default aot_eager)")
    p.add_argument("--cpu-backend", default="aot_eager", help="torch.compile backend of the fp16 peer on CPU")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out-dir", default=os.path.join(_HERE, "results"))
    a = p.parse_args(argv)
    a.device = "cpu" if a.quick else "cuda"
    d = dict(context=1024, check_prompt=160, check_new=8, steps=5, dtype="fp32") if a.quick else \
        dict(context=131072, check_prompt=512, check_new=32, steps=50, dtype="bf16")
    for k, v in d.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    return a


def main(argv=None) -> dict:
    args = parse_args(argv)
    with torch.no_grad():  # as generate() runs: the fused qjl ops have no backward
        res = run(args)
    if dist.get_rank() == 0:
        os.makedirs(args.out_dir, exist_ok=True)
        stem = os.path.join(args.out_dir, "tp_quick" if args.quick else "tp")
        with open(stem + ".json", "w") as f:
            json.dump(res, f, indent=1)
        with open(stem + ".md", "w") as f:
            f.write(table(res))
        print(table(res))
    dist.destroy_process_group()
    return res


if __name__ == "__main__":
    main()
