"""`QJLCache`: a transformers `Cache` whose layers store K/V compressed (QJL or DecoQuant).

Hybrid models (``config.layer_types`` mixing "full_attention" and "sliding_attention": Gemma 2/3,
gpt-oss, Qwen2 with ``max_window_layers``) get one compressed layer per full-attention layer and, per
sliding-window layer, transformers' own static sliding-window layer (`QJLSlidingLayer`, a
``StaticSlidingWindowLayer``: bounded at the window, exact, static addresses). The backend rewrites
only attention over the compressed layers; attention over the exact sliding layers is counted as
intentionally exact (``counters["qjl"]["sliding_exact"]``), never reported as a fallback.

Storage is allocated once at `max_cache_len` (static addresses), the length lives in a device
tensor, and `update()` is two ops: `qjl::append` (store/compress) then `qjl::dequantize` (the
K/V any HF attention path can consume, the estimator's result by construction). Under
`torch.compile(backend="qjl")` the pass replaces dequantize + SDPA by `qjl::attend`.
"""
from __future__ import annotations

import weakref

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, StaticSlidingWindowLayer
from transformers.utils import is_torchdynamo_compiling

from . import diagnostics, tp
from .config import QJLConfig
from .kernels import reference as ref
from .kernels import ops  # noqa: F401  (registers torch.ops.qjl)


def _value_frag(cfg: QJLConfig, d: int, kb: int, vb: int, device) -> bool:
    """Whether this rotation layer stores its value codes in MMA-fragment order (config
    rotation_value_layout; "auto": where the CUDA C++ kernel reads them, a layer it serves (4-bit keys,
    no QJL residual, no value centering, no outlier tokens) on a CUDA device of compute capability >=
    8.0; the Triton fallback reads them through gathers, ~1.5x slower at 128k)."""
    from .kernels import rotation as rot
    if cfg.rotation_value_layout == "rows" or d not in rot.FRAG_DIMS or vb not in rot.FRAG_BITS or cfg.residual % 32:
        return False
    if cfg.rotation_value_layout == "mma":
        return True
    if (kb != 4 or cfg.rotation_unbiased or cfg.rotation_center in ("v", "kv")
            or cfg.rotation_key_outliers or cfg.rotation_value_outliers):
        return False
    dev = torch.device(device) if device is not None else None
    return dev is not None and dev.type == "cuda" and _cuda_sm80(dev.index if dev.index is not None else -1)


@torch.compiler.assume_constant_result
def _cuda_sm80(index: int) -> bool:
    # a constant to Dynamo: a cache's lazy first update may run while it traces a compiled prefill
    return torch.cuda.get_device_capability(index if index >= 0 else torch.cuda.current_device()) >= (8, 0)


def _codec_setup(cfg: QJLConfig, layer_idx: int, d: int, device=None):
    """(codec, consts on CPU, params) for one layer (`device`: where the cache will live, for the
    layouts that depend on it)."""
    codec = ref.CODECS[{"qjl": 0, "decoquant": 1, "rotation": 2}[cfg.method]]
    if cfg.method == "qjl":
        m, mo = cfg.sketch_dims(layer_idx)
        consts = [ref.sketch(d, m, cfg.seed, 2 * layer_idx), ref.sketch(d, mo, cfg.seed, 2 * layer_idx + 1)]
        params = [cfg.outliers, cfg.value_bits, cfg.value_group] + ([cfg.residual] if cfg.qjl_center else [])
        if cfg.qjl_exact_outliers or cfg.qjl_value_codec == "rotation" or cfg.qjl_key_scale != "unbiased":
            # [o, vb, vg, center, exact(, value_rotation)]: outlier channels stored exactly / values rotation-coded
            params = params[:3] + [cfg.residual if cfg.qjl_center else 0, int(cfg.qjl_exact_outliers)]
        if cfg.qjl_value_codec == "rotation":
            from .kernels import rotation as rot
            consts += [rot.rotation(d, cfg.seed, 1000 + layer_idx), rot.codebook(cfg.value_bits)]
        if cfg.qjl_value_codec == "rotation" or cfg.qjl_key_scale != "unbiased":
            params.append(int(cfg.qjl_value_codec == "rotation"))
        if cfg.qjl_key_scale != "unbiased":
            params.append(ref.QJL_KEY_SCALES[cfg.qjl_key_scale])
    elif cfg.method == "rotation":
        from .kernels import rotation as rot
        kb, vb = cfg.rotation_bits(layer_idx)
        ub = int(cfg.rotation_unbiased)
        if cfg.rotation_transform == "hadamard" and (d < 2 or d & (d - 1)):
            raise ValueError(f"QJLConfig(rotation_transform='hadamard') needs a power-of-two head_dim, this model "
                             f"has {d}; use rotation_transform='haar'")
        consts = rot.make_consts(d, kb, vb, ub, cfg.seed, layer_idx, key_grid=cfg.rotation_key_grid,
                                 transform=cfg.rotation_transform)
        from .config import ROTATION_CENTERS
        frag = _value_frag(cfg, d, kb, vb, device)
        params = [kb, vb, ub, rot.SCALE_MODES[cfg.rotation_scale], cfg.sink_tokens,
                  ROTATION_CENTERS[cfg.rotation_center] | (rot.VFRAG if frag else 0), cfg.residual]  # block = R
        if cfg.rotation_key_outliers or cfg.rotation_value_outliers:   # opt-in (issue 17): exact outlier tokens
            params += [cfg.rotation_key_outliers, cfg.rotation_value_outliers]
    else:
        consts, params = [], [cfg.decoquant_bits, cfg.residual]  # block = R
    return codec, consts, params


FULL, SLIDING = "full_attention", "sliding_attention"

# model types whose attention adds per-head sink logits (gpt-oss): transformers' SDPA path drops them
_SINK_MODELS = ("gpt_oss",)


def layer_types_of(config) -> list[str]:
    """Per-layer attention type: ``config.layer_types`` if set; else all sliding when the config has an
    active ``sliding_window`` (Mistral/Qwen2 style), else all full attention."""
    n = config.num_hidden_layers
    types = getattr(config, "layer_types", None)
    if types is not None:
        return list(types)
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True) is not False:
        return [SLIDING] * n
    return [FULL] * n


def check_model_config(config) -> None:
    """Raise ValueError naming why a model cannot use the compressed cache."""
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError("QJLCache serves decoder-only models; this config is encoder-decoder "
                         f"({type(config).__name__}). Use the model's default cache.")
    for f in ("num_hidden_layers", "num_attention_heads"):
        if not hasattr(config, f):
            raise ValueError(f"QJLCache needs a Llama-style config with `{f}`; {type(config).__name__} has none")
    types = layer_types_of(config)
    bad = sorted({t for t in types if t not in (FULL, SLIDING)})
    if bad:
        raise ValueError(f"QJLCache compresses full-attention layers and keeps sliding-window layers exact; this "
                         f"model has {bad} layers, which it cannot hold. Use transformers' own cache for it.")
    if FULL not in types:
        raise ValueError(f"QJLCache: every layer of this model is sliding-window attention (sliding_window="
                         f"{getattr(config, 'sliding_window', None)}): the cache is bounded by the window already and "
                         "QJLCache has no full-attention layer to compress. Use transformers' StaticCache for it.")
    if SLIDING in types and not getattr(config, "sliding_window", None):
        raise ValueError("QJLCache: the config has sliding_attention layers but no sliding_window size")
    impl = getattr(config, "_attn_implementation", None)
    if impl == "sdpa" and getattr(config, "attn_logit_softcapping", None) is not None:
        raise ValueError(f"QJLCache: attn_logit_softcapping={config.attn_logit_softcapping} with "
                         "attn_implementation='sdpa': SDPA (and the fused qjl.attend) has no logit soft-capping, so "
                         "the scores would be computed without it. Use attn_implementation='eager' (correct over the "
                         "compressed cache; the compiled step then leaves that attention unfused and says so) or a "
                         "config with attn_logit_softcapping=None.")
    if impl == "sdpa" and getattr(config, "model_type", None) in _SINK_MODELS:
        raise ValueError(f"QJLCache: {config.model_type} attention adds learned sink logits, which SDPA (and the "
                         "fused qjl.attend) does not support, so they would be dropped. Use attn_implementation="
                         "'eager' (correct over the compressed cache; the compiled step leaves that attention "
                         "unfused and says so).")


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def kv_heads_of(config) -> int | None:
    return getattr(config, "num_key_value_heads", None) or getattr(config, "num_attention_heads", None)


_BUILD_FIX = "build the cache from the model that uses it: QJLCache(model.config, max_cache_len=...)"


def _tp_hint(got: int, built: int | None) -> str:
    """The fix when a head-count mismatch looks like tensor parallelism the cache was not told about."""
    if not built or got >= built or built % got:
        return ""
    return (f" ({got} = {built} / {built // got}: tensor parallelism? Build the cache from the config of the model "
            f"loaded with tp_plan=/distributed_config= (it records the TP size), or pass QJLCache(..., "
            f"tp_size={built // got}).)")


class QJLLayer(CacheLayerMixin):
    """One attention layer's compressed cache. State layout: kernels/reference.py."""

    is_compileable = True
    is_sliding = False
    is_croppable = False

    def __init__(self, cfg: QJLConfig, layer_idx: int, max_cache_len: int, head_dim: int,
                 kv_heads: int | None = None):
        super().__init__()
        cfg.check_head_dim(head_dim)
        self.cfg, self.layer_idx, self.max_cache_len, self.head_dim = cfg, layer_idx, max_cache_len, head_dim
        self.kv_heads = kv_heads  # from the config the cache was built for (None: not checked)
        self.codec, self.consts, params = _codec_setup(cfg, layer_idx, head_dim)
        self.meta = [self.codec.id, cfg.residual, max_cache_len, *params]
        self.state: list[torch.Tensor] = []
        self.seen = 0  # host mirror of state[0], kept in eager only: overflow check without a sync

    def lazy_initialization(self, key_states, value_states) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        if self.cfg.method == "rotation" and self.cfg.rotation_value_layout == "auto":   # the layout follows the device
            from .kernels import rotation as rot
            if _value_frag(self.cfg, self.head_dim, int(self.meta[3]), int(self.meta[4]), self.device):
                self.meta[8] = int(self.meta[8]) | rot.VFRAG      # params center (meta = [id, R, L, *params])
        B, H, _, D = key_states.shape
        if D != self.head_dim:
            raise ValueError(f"QJLCache layer {self.layer_idx} got keys with head_dim {D}, but the cache was built "
                             f"for head_dim {self.head_dim} (its sketches are sized for it): a cache made for another "
                             f"model? {_BUILD_FIX}")
        if self.kv_heads is not None and H != self.kv_heads:
            raise ValueError(f"QJLCache layer {self.layer_idx} got keys with {H} key/value heads, but the cache was "
                             f"built for {self.kv_heads}: a cache made for another model? {_BUILD_FIX}"
                             f"{_tp_hint(H, self.kv_heads)}")
        if self.device.type != "cpu" and self.cfg.method == "qjl" and self.cfg.qjl_value_codec == "rotation":
            raise ValueError("QJLConfig(qjl_value_codec='rotation') is implemented in the reference (CPU) codec only: "
                             "the Triton / CUDA C++ QJL kernels decode min/max values. Use it on the CPU (accuracy "
                             "studies), or qjl_value_codec='minmax' on the GPU.")
        if self.device.type != "cpu" and self.cfg.method == "qjl" and self.cfg.qjl_exact_outliers:
            raise ValueError("QJLConfig(qjl_exact_outliers=True) is implemented in the reference (CPU) codec only: the "
                             "Triton / CUDA C++ kernels sketch the outlier channels. Use it on the CPU (accuracy "
                             "studies), or qjl_exact_outliers=False on the GPU.")
        self.consts = [c.to(self.device) for c in self.consts]
        self.state = ref.make_state(self.codec, B, H, self.max_cache_len, D, self.cfg.residual, self.consts,
                                    self.meta[3:], self.dtype, self.cfg.torch_side_dtype, self.device)
        from .kernels import triton as qjl_triton
        if self.device.type == "cuda" and not is_torchdynamo_compiling():
            # derived kernel constants, built ahead of any CUDA-graph capture. Not while Dynamo traces a lazy
            # first update (a compiled prefill over a fresh cache): the import and data_ptr keys would break
            # the graph there, splitting every layer's update from its attention; the kernels then build them
            # at their first (eager, uncaptured) launch instead
            qjl_triton.prepare(self.codec.id, self.consts, self.dtype)
        if self.device.type != "cpu" and not (self.device.type == "cuda" and qjl_triton.has_kernels(self.codec.id)):
            # without device kernels the codec's reference append reads the length on the host,
            # which a CUDA graph cannot capture: keep HF from auto-compiling with this cache
            self.is_compileable = False
        if not is_torchdynamo_compiling():
            for t in self.state + self.consts:
                torch._dynamo.mark_static_address(t)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        T = key_states.shape[-2]
        if not is_torchdynamo_compiling():
            if diagnostics.in_compiled_step():
                diagnostics.warn_once("eager-update", (
                    f"qjl_compile: QJLCache.update (layer {self.layer_idx}) ran eagerly inside the qjl-compiled "
                    "decode step: Dynamo did not trace it (graph break or skipped frame; TORCH_LOGS=graph_breaks "
                    "says where), so this attention is computed over dequantized K/V, uncompiled. Fix: remove "
                    "the graph break (e.g. hooks or prints in the attention), or report it to qjl-compile."))
            if self.seen + T > self.max_cache_len:
                raise ValueError(f"QJLCache overflow at layer {self.layer_idx}: {self.seen} tokens stored + {T} new "
                                 f"> max_cache_len={self.max_cache_len}. Create the cache with a larger "
                                 f"max_cache_len (or call cache.reset()).")
            self.seen += T
        torch.ops.qjl.append(self.state, self.consts, key_states, value_states, self.meta)
        return torch.ops.qjl.dequantize(self.state, self.consts, key_states, value_states, self.meta)

    def get_mask_sizes(self, *args, **kwargs) -> tuple[int, int]:
        return self.max_cache_len, 0

    def get_seq_length(self):
        return self.state[0] if self.is_initialized else 0

    def get_max_length(self) -> int:
        return self.max_cache_len

    def reset(self) -> None:
        for t in self.state:
            t.zero_()
        self.seen = 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            idx = beam_idx.to(self.device)
            for t in self.state[1:]:  # in place: addresses stay static
                t.copy_(t.index_select(0, idx))

    def offload(self):
        raise ValueError("QJLCache does not support offloading; it is already compressed")

    def prefetch(self):
        return None

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError("QJLCache cannot crop (compressed blocks cannot be un-flushed): assisted/speculative "
                         "decoding is not supported with it; use generate() without an assistant model.")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise ValueError("QJLCache is preallocated for one batch size: create it with batch_size = batch * "
                         "num_beams / num_return_sequences instead of expanding it.")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise ValueError("QJLCache cannot drop batch rows (static storage); create a new cache per batch.")

    # -- memory accounting --------------------------------------------------------------------
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state + self.consts)

    def codec_bits(self) -> tuple[float, float]:
        """Bits per stored K and V value in the compressed region (all side buffers counted)."""
        specs = self.codec.specs(self.head_dim, self.consts, self.meta[3:])
        bits = {"k": 0.0, "v": 0.0}
        for s, t in zip(specs, self.state[3:]):
            if s.head:  # a fixed-size head buffer (attention sinks) is not a per-token rate
                continue
            per_pos = t[0, 0].numel() * t.element_size() * 8 / (t.shape[2] * s.per)  # per position and head
            bits["v" if s.name.startswith("v") else "k"] += per_pos / self.head_dim
        return bits["k"], bits["v"]


# the exact K/V buffers of QJLCache sliding layers: the detection pass recognises them in a graph (through
# Dynamo's graph inputs) and counts their attention as intentionally exact, not as an uncompressed cache
_EXACT_BUFFERS: "weakref.WeakValueDictionary[int, torch.Tensor]" = weakref.WeakValueDictionary()


def is_exact_buffer(t) -> bool:
    """True if `t` is the key or value buffer of a `QJLSlidingLayer` (identity, not equality)."""
    return isinstance(t, torch.Tensor) and _EXACT_BUFFERS.get(id(t)) is t


class QJLSlidingLayer(StaticSlidingWindowLayer):
    """A sliding-window layer of a hybrid model inside a `QJLCache`: transformers' own
    ``StaticSlidingWindowLayer`` (storage bounded at min(window, max_cache_len), static addresses,
    exact K/V), with the QJLCache rules for what static storage cannot do (crop, batch resizing) and an
    in-place beam reorder."""

    is_croppable = False

    def __init__(self, layer_idx: int, max_cache_len: int, sliding_window: int, head_dim: int,
                 kv_heads: int | None = None):
        super().__init__(max_cache_len=max_cache_len, sliding_window=sliding_window)
        self.layer_idx, self.head_dim, self.kv_heads, self.sliding_window = layer_idx, head_dim, kv_heads, sliding_window

    def lazy_initialization(self, key_states, value_states) -> None:
        B, H, _, D = key_states.shape
        if D != self.head_dim or (self.kv_heads is not None and H != self.kv_heads):
            raise ValueError(f"QJLCache sliding layer {self.layer_idx} got keys with {H} heads x head_dim {D}, but the "
                             f"cache was built for {self.kv_heads} x {self.head_dim}: a cache made for another model? "
                             f"{_BUILD_FIX}{_tp_hint(H, self.kv_heads)}")
        super().lazy_initialization(key_states, value_states)
        self.dtype = key_states.dtype
        for t in (self.keys, self.values):
            _EXACT_BUFFERS[id(t)] = t

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            idx = beam_idx.to(self.device)
            for t in (self.keys, self.values):  # in place: addresses stay static
                t.copy_(t.index_select(0, idx))

    def offload(self):
        raise ValueError("QJLCache does not support offloading")

    def prefetch(self):
        return None

    def crop(self, tokens_to_remove: int) -> None:
        QJLLayer.crop(self, tokens_to_remove)

    def batch_repeat_interleave(self, repeats: int) -> None:
        QJLLayer.batch_repeat_interleave(self, repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        QJLLayer.batch_select_indices(self, indices)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values))

    def values_held(self) -> int:
        """K and V values the storage holds (both): 2 * B * H * min(window, max_cache_len) * D."""
        return self.keys.numel() + self.values.numel()


class QJLCache(Cache):
    """Compressed KV cache for Llama-family models.

    Parameters
    ----------
    config : transformers.PretrainedConfig
        The model's config (decoder-only). Full-attention layers are compressed; sliding-window layers
        of a hybrid config (``layer_types``) are kept exact in a `QJLSlidingLayer` bounded at the window.
    max_cache_len : int
        Tokens the cache can hold (prompt + generated); storage is allocated for all of them
        (sliding layers: min(sliding_window, max_cache_len)).
    qjl_config : QJLConfig, optional
        Defaults to ``QJLConfig.for_model(config, "reference")``.
    batch_size, device, dtype : optional
        With all three, storage is allocated now; otherwise on the first update.
    tp_size : int, optional
        Tensor-parallel size. Default: what transformers recorded on the config of a model loaded with
        ``tp_plan=``/``distributed_config=`` (``config.distributed_config.tp_size``), else 1. Under TP each
        rank's cache holds only that rank's ``num_key_value_heads / tp_size`` KV heads (qjl_compile/tp.py);
        `memory()` reports this rank and the total over ranks.
    """

    def __init__(self, config, max_cache_len: int, qjl_config: QJLConfig | None = None,
                 batch_size: int | None = None, device=None, dtype=None, *, tp_size: int | None = None):
        check_model_config(config)
        if not isinstance(max_cache_len, int) or max_cache_len < 1:
            raise ValueError(f"max_cache_len must be a positive int, got {max_cache_len!r}")
        self.qjl_config = qjl_config or QJLConfig.for_model(config)
        self.max_cache_len = max_cache_len
        d = head_dim_of(config)
        self.tp_size = tp.tp_size_of(config) if tp_size is None else int(tp_size)
        kv = tp.kv_heads_per_rank(config, kv_heads_of(config), self.tp_size)  # this rank's heads
        self.layer_types = layer_types_of(config)
        layers = [QJLLayer(self.qjl_config, i, max_cache_len, d, kv) if t == FULL else
                  QJLSlidingLayer(i, max_cache_len, config.sliding_window, d, kv)
                  for i, t in enumerate(self.layer_types)]
        super().__init__(layers=layers)
        self.model_config = config
        if batch_size is not None and device is not None and dtype is not None:
            self.early_initialization(batch_size, kv, d, dtype, torch.device(device))

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if not 0 <= layer_idx < len(self.layers):
            raise ValueError(f"QJLCache has {len(self.layers)} layers (built from a config with num_hidden_layers="
                             f"{len(self.layers)}) but attention layer {layer_idx} wrote to it: the cache was made "
                             f"for another model. Fix: {_BUILD_FIX}")
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    @property
    def compressed_layers(self) -> list[QJLLayer]:
        """The compressed (full-attention) layers."""
        return [l for l in self.layers if isinstance(l, QJLLayer)]

    @property
    def sliding_layers(self) -> list[QJLSlidingLayer]:
        """The exact sliding-window layers (hybrid models; empty otherwise)."""
        return [l for l in self.layers if isinstance(l, QJLSlidingLayer)]

    def check_model(self, config) -> None:
        """Raise ValueError if this cache was built for a model shaped unlike `config` (layers, layer types,
        heads, head_dim, sliding window)."""
        got = (len(self.layers), tp.kv_heads_per_rank(config, kv_heads_of(config), self.tp_size), head_dim_of(config))
        first = self.compressed_layers[0]
        have = (len(self.layers), first.kv_heads, first.head_dim)
        n = getattr(config, "num_hidden_layers", got[0])
        if n != len(self.layers) or (have[1] is not None and got[1] != have[1]) or got[2] != have[2]:
            per = f" per rank (tp_size={self.tp_size})" if self.tp_size > 1 else ""
            raise ValueError(f"QJLCache built for {len(self.layers)} layers x {have[1]} kv heads{per} x head_dim "
                             f"{have[2]} used with a model of {n} layers x {got[1]} kv heads{per} x head_dim {got[2]}. Fix: "
                             f"{_BUILD_FIX}")
        types = layer_types_of(config)
        windows = {l.sliding_window for l in self.sliding_layers}
        if types != self.layer_types or (windows and windows != {getattr(config, "sliding_window", None)}):
            raise ValueError(f"QJLCache built for layer types {self.layer_types} (sliding_window {sorted(windows)}) used "
                             f"with a model whose layers are {types} (sliding_window "
                             f"{getattr(config, 'sliding_window', None)}). Fix: {_BUILD_FIX}")

    def storage(self):
        """(batch, dtype, device) of the allocated storage, or None before the first update."""
        l = self.compressed_layers[0]
        return (l.state[1].shape[0], l.dtype, l.device) if l.is_initialized else None

    # -- host-side length (no device sync): eager updates count it, and so does qjl_compile's compiled step
    def host_length(self) -> int:
        """Tokens stored, as the host knows them (eager updates and `qjl_compile.compile`'s compiled steps)."""
        return self.compressed_layers[0].seen

    def check_room(self, T: int) -> None:
        """Raise ValueError before anything is written if `T` more tokens do not fit."""
        n = self.host_length()
        if n + T > self.max_cache_len:
            raise ValueError(f"QJLCache overflow: {n} tokens stored + {T} new > max_cache_len={self.max_cache_len}. "
                             f"Create the cache with a larger max_cache_len (or call cache.reset()).")

    def advance_host_length(self, n: int) -> None:
        for l in self.compressed_layers:
            l.seen = n

    # transformers 5.x before 5.16's removal keeps a read-only, deprecated `Cache.max_cache_len`
    # property; own the attribute so __init__ can set it on every version.
    @property
    def max_cache_len(self) -> int:
        return self._max_cache_len

    @max_cache_len.setter
    def max_cache_len(self, value: int) -> None:
        self._max_cache_len = value

    def memory(self) -> dict:
        """Bytes allocated vs a 16-bit cache of the same capacity, and real bits per value.

        Top level: ``allocated_bytes`` / ``fp16_bytes`` / ``saved_bytes`` / ``ratio`` over every layer
        (the fp16 reference is what transformers' StaticCache allocates for this model at 16 bits: full
        layers at max_cache_len, sliding layers at min(window, max_cache_len)); ``bits_per_value``,
        ``k_bits``, ``v_bits``, ``codec_bits`` are the compressed layers' rates (``bits_per_value`` counts
        every allocated buffer, residual ring and sketches included, over the capacity; ``k_bits``/``v_bits``
        are the codec's rate on compressed tokens). ``by_type`` breaks the bytes down per layer type:
        ``{"full_attention": {...}, "sliding_attention": {...}}`` with ``layers``, ``allocated_bytes``,
        ``fp16_bytes``, ``saved_bytes`` (sliding layers are kept exact: they save nothing at 16 bits).
        Under tensor parallelism every figure above is this rank's (its own KV heads); ``tp`` holds
        ``size``, ``rank``, ``kv_heads_per_rank``, ``total_allocated_bytes`` and ``total_fp16_bytes`` (all
        ranks; ``size`` 1 without TP). Bits per value are the same per rank and in total.
        """
        live = [l for l in self.compressed_layers if l.is_initialized]
        if not live:
            raise ValueError("QJLCache.memory(): the cache is not allocated yet (run a forward or pass "
                             "batch_size/device/dtype)")
        alloc = sum(l.nbytes() for l in live)
        vals = sum(2 * l.state[1].shape[0] * l.state[1].shape[1] * l.max_cache_len * l.head_dim for l in live)
        kb = [l.codec_bits() for l in live]
        k_bits = sum(b[0] for b in kb) / len(kb)
        v_bits = sum(b[1] for b in kb) / len(kb)
        by_type = {FULL: {"layers": len(live), "allocated_bytes": alloc, "fp16_bytes": vals * 2,
                          "saved_bytes": vals * 2 - alloc, "max_cache_len": self.max_cache_len}}
        sl = [l for l in self.sliding_layers if l.is_initialized]
        s_alloc = sum(l.nbytes() for l in sl)
        s_fp16 = sum(2 * l.values_held() for l in sl)
        if self.sliding_layers:
            by_type[SLIDING] = {"layers": len(sl), "allocated_bytes": s_alloc, "fp16_bytes": s_fp16,
                                "saved_bytes": s_fp16 - s_alloc, "window": self.sliding_layers[0].max_cache_len}
        total, ref16 = alloc + s_alloc, vals * 2 + s_fp16
        # tensor parallelism: the figures above are this rank's; every rank allocates the same shapes (its
        # kv_heads / tp_size heads: whole heads, checked at construction), so the total is tp_size times them
        # (qjl_compile.tp.gather_memory collects every rank's own figures to check that)
        tpi = {"size": self.tp_size, "rank": tp.rank() if self.tp_size > 1 else 0,
               "kv_heads_per_rank": live[0].state[1].shape[1],
               "total_allocated_bytes": total * self.tp_size, "total_fp16_bytes": ref16 * self.tp_size}
        return {"allocated_bytes": total, "fp16_bytes": ref16, "saved_bytes": ref16 - total, "ratio": ref16 / total,
                "bits_per_value": 8 * alloc / vals, "k_bits": k_bits, "v_bits": v_bits,
                "codec_bits": (k_bits + v_bits) / 2, "by_type": by_type, "tp": tpi}

    def reset(self):
        for l in self.layers:
            l.reset()
