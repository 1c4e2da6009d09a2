"""e2e benchmark, part 1: the modes, the model, the caches (allocation, synthetic fill, byte counts)
and the compiled forward each mode uses. See benchmarks/e2e.py for the command line."""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field

import torch

LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=500000.0,
                 max_position_embeddings=1 << 22, tie_word_embeddings=False, rms_norm_eps=1e-5)
GiB = 1 << 30
MiB = 1 << 20
COMPRESSED = ("qjl", "decoquant", "rotation")  # caches that are a QJLCache


def fmt_tokens(n):
    if n is None:
        return "-"
    return f"{n / 1024:.0f}k" if n >= 1024 and n % 1024 == 0 else str(n)


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
        "inductor": Mode("inductor", "Inductor + HF StaticCache, CUDA graphs", "static", "inductor", "eager",
                         cudagraphs=True),
        # the strong fp16 peer: the same StaticCache, attention without HF's per-head K/V copy (the
        # qjl backend's grouped_sdpa pass), Inductor + CUDA graphs; prefill through the passes too
        "grouped": Mode("grouped", "fp16 grouped SDPA, compiled" + (", CUDA graphs" if cuda else ", aot_eager (CPU)"),
                        "static", "qjl", "qjl", cudagraphs=cuda),
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
    """(model, description). ``model.full_config`` is the config at the model's full depth (the 8B
    shape: 32 layers), which the serving section sizes the cache at when ``--layers`` cuts the model."""
    model, desc = _build_model(args, device, dtype)
    if not hasattr(model, "full_config"):
        if not args.quick and not args.model:
            from transformers import LlamaConfig
            model.full_config = LlamaConfig(**LLAMA3_8B, attn_implementation="sdpa")
        else:
            model.full_config = copy.deepcopy(model.config)
    return model, desc


def _build_model(args, device, dtype):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if args.model:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, local_files_only=True,
                                                     attn_implementation="sdpa")
        model.full_config = copy.deepcopy(model.config)
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


def qjl_config(cfg, method):
    """The QJLConfig of a compressed mode for a model config."""
    from qjl_compile import QJLConfig
    if method in ("decoquant", "rotation"):
        return QJLConfig.preset("decoquant4" if method == "decoquant" else ROTATION_PRESET,
                                head_dim=head_dim(cfg), num_layers=cfg.num_hidden_layers)
    return QJLConfig.for_model(cfg)


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


def make_cache(mode: Mode, model, B: int, cap: int, cfg=None):
    """The mode's cache for batch B and capacity `cap` (`cfg`: another depth of the same model)."""
    from transformers import DynamicCache, QuantizedCache, StaticCache

    cfg = cfg or model.config
    if mode.cache == "dynamic":
        return DynamicCache(config=cfg)
    if mode.cache == "static":
        c = StaticCache(config=cfg, max_cache_len=cap)
        c.early_initialization(B, kv_heads(cfg), head_dim(cfg), model.dtype, model.device)
        return c
    if mode.cache == "hqq":
        return QuantizedCache(backend="hqq", config=cfg, nbits=4, axis_key=1, axis_value=1,
                              q_group_size=min(64, head_dim(cfg)), residual_length=128)
    return qjl_cache_class()(cfg, max_cache_len=cap, qjl_config=qjl_config(cfg, mode.cache), batch_size=B,
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
    if mode.cache in COMPRESSED:
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

    def in_chunks(write):
        done = 0
        while done < T:
            n = min(chunk, T - done)
            write(done, n, *kv(n))
            done += n

    if mode.cache == "static":
        for layer in cache.layers:
            if random:
                def put(at, n, k, v, layer=layer):
                    layer.keys[:, :, at: at + n] = k
                    layer.values[:, :, at: at + n] = v
                in_chunks(put)
            layer.cumulative_length.fill_(T)
        return
    if mode.cache in COMPRESSED:
        for layer in cache.layers:
            if random:
                in_chunks(lambda at, n, k, v, layer=layer: torch.ops.qjl.append(layer.state, layer.consts, k, v,
                                                                                 layer.meta))
            else:
                layer.state[0].fill_(T)
            layer.seen = T
        return
    for i in range(cfg.num_hidden_layers):  # dynamic / hqq: one update holding T tokens
        k, v = kv(T)
        cache.update(k, v, i)
        del k, v



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




def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())

