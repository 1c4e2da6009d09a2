"""`QJLConfig`: every knob of the compressed cache, validated on construction.

Sketch sizes are absolute numbers of rows (m). The named presets are written for the
reference setting (head_dim 128, 32 layers) and scaled to the model they are used with, so
`QJLConfig.preset("reference", head_dim=64, num_layers=30)` keeps the reference's bits per
channel and its share of "initial" layers.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

METHODS = ("qjl", "decoquant", "rotation")
ROTATION_SCALES = ("norm", "match", "lsq")
ROTATION_CENTERS = {"none": 0, "k": 1, "v": 2, "kv": 3}
_SIDE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class QJLConfig:
    """Configuration of a compressed KV cache.

    Parameters
    ----------
    method : {"qjl", "decoquant", "rotation"}
        Key/value codec. All share the cache, the residual window and the ops. "rotation" is
        random rotation + Lloyd-Max codebooks (TurboQuant-style, kernels/rotation.py).
    sketch_dim : int
        m, rows of the QJL key sketch for layers >= ``initial_layers`` (multiple of 8).
    sketch_dim_initial : int
        m for the first ``initial_layers`` layers (the reference uses a larger sketch there).
    initial_layers : int
        How many leading layers use ``sketch_dim_initial`` / ``outlier_sketch_dim_initial``.
    outliers : int
        o, channels per 32-token group split off as outliers (0 disables the outlier path).
    outlier_sketch_dim, outlier_sketch_dim_initial : int
        m_out, rows of the outlier sketch (multiple of 8; ignored when ``outliers == 0``).
    value_bits : int
        Bits per value code (QJL: 2, 4 or 8; 2, 3 or 4 with ``qjl_value_codec="rotation"``; DecoQuant
        uses ``decoquant_bits`` for K and V).
    value_group : int
        Channels sharing one value scale/zero (divides head_dim).
    residual : int
        R, the newest tokens kept exact; a full window is compressed as one block. Multiple of 32.
    decoquant_bits : int
        DecoQuant code width for A (2, 3, 4 or 8).
    rotation_key_bits, rotation_value_bits : int
        Rotation codec: bits per key / value coordinate (1-4; keys >= 2 with ``rotation_unbiased``).
    rotation_initial_bits : int
        Rotation codec: the first ``initial_layers`` layers use at least this many bits for keys
        and values (0 = no difference).
    rotation_unbiased : bool
        Rotation codec: keys use key_bits - 1 Lloyd-Max bits plus a 1-bit QJL sketch of the
        residual (unbiased inner products, TurboQuant "prod").
    rotation_scale : {"norm", "match", "lsq"}
        Rotation codec: the per-vector scale stored with the codes (kernels/rotation.py).
    rotation_center : {"none", "k", "v", "kv"}
        Rotation codec: subtract the per-block (R tokens) mean key / value before coding and store
        it (side dtype, D values per block and head: 16/R bits per value). Keys of real models
        share a large mean direction, so centering keys is worth about one bit.
    qjl_center : bool
        QJL codec: per compressed block (R tokens) and (batch, kv head), subtract the block's mean
        key before the outlier split and the 1-bit sketch, store the mean (side dtype, D values per
        block: 16/R bits per key value, counted) and add q . mean exactly to the scores. The QJL
        estimator's variance grows with the whole key norm, and real keys share a large mean.
        Triton append supports it; the fused attend kernels do not (a centered cache attends
        through the sync-free SDPA route on CUDA, said once in the log).
    qjl_exact_outliers : bool
        QJL codec: the ``outliers`` channels of each 32-token group are stored exactly (side dtype,
        16 bits each) instead of through the outlier sketch (``outlier_sketch_dim`` is then unused, no
        outlier norm): at 4 channels of head_dim 64 that is 64 bits a key against the sketch's 64 + 16,
        and no estimation error on the channels that carry the largest share of the key norm. The
        reference (CPU) implements it; on CUDA the cache refuses it (the Triton/CUDA kernels sketch
        the outliers).
    qjl_value_codec : {"minmax", "rotation"}
        QJL codec: how values are coded. "minmax" (QJL's own): asymmetric per ``value_group``
        channels, fp16 scale and zero per group (value_bits + 32 / value_group bits a value).
        "rotation": as the rotation codec codes them, a random rotation, a Lloyd-Max codebook of
        ``value_bits`` bits and one "match" scale per token (value_bits + 16 / head_dim bits;
        ``value_group`` unused): at head_dim 64, 2.25 bits for about half the attention-output error
        of 2-bit min/max (3 bits), 3.25 bits for an eighth (benchmarks/RESULTS.md, issue 17 round 7).
        Reference (CPU) only for now; on CUDA the cache refuses it.
    qjl_key_scale : {"unbiased", "match", "lsq"}
        QJL codec: the norm stored with each key's sign bits. "unbiased": ||k|| (the paper's
        estimator, E[score] = q . k); "match": chosen so the decoded key has the key's norm; "lsq":
        the multiple of the decoded direction nearest the key (kernels/reference.py `qjl_key_scale`).
        The same buffers and scores, so every attend kernel runs it unchanged; the reference and the
        Triton append compute it (one more (32 x m) x (m x D) product per 32 tokens).
    qjl_layer_sketch_dims : tuple of int
        QJL codec: per-layer key sketch rows (one entry per layer, multiples of 8) overriding
        ``sketch_dim`` / ``sketch_dim_initial``; () = off. A fixed schedule from per-layer sensitivity on
        tune windows (``benchmarks/layer_bits.py --codec qjl``); presets write it for head_dim 128 and
        scale it like the other sketch sizes.
    rotation_initial_keys_only : bool
        Rotation codec: ``rotation_initial_bits`` raises only the keys of the first
        ``initial_layers`` layers (values keep ``rotation_value_bits``).
    rotation_layer_key_bits : tuple of int
        Rotation codec: per-layer key bits (one entry per layer, 1-4) overriding
        ``rotation_key_bits`` / ``rotation_initial_bits`` for keys; () = off. A fixed schedule
        (e.g. picked from a per-layer sensitivity sweep on tuning windows): bits are per layer, so
        every kernel runs it unchanged.
    rotation_layer_value_bits : tuple of int
        Rotation codec: per-layer value bits (one entry per layer, 1-4) overriding
        ``rotation_value_bits`` / ``rotation_initial_bits`` for values; () = off. Like
        ``rotation_layer_key_bits``: a fixed schedule, every kernel runs it unchanged (issue 17:
        schedules picked from per-layer sensitivity measured on the tune windows only).
    rotation_key_outliers, rotation_value_outliers : int
        Rotation codec, opt-in (issue 17): per compressed block (R tokens) and kv head, this many keys
        (values) with the largest coding error are also stored exact (side dtype, plus an int16
        offset): t * (16 D + 16) / (R D) bits per key (value) value, counted. 0 = off (today's format).
        Reference only: the fused Triton kernels refuse it (NotImplementedError), so a cache with it
        runs on the CPU reference.
    rotation_key_grid : bool
        Rotation codec, 4-bit keys: the Lloyd-Max codebook moved onto a half-integer grid of 128 levels
        (kernels/rotation.py ``grid_codebook``, +0.44% quantization MSE) so the CUDA C++ kernel scores
        keys on int8 tensor-core MMAs. False: the exact centroids (that kernel then runs its fp16 path).
    rotation_transform : {"haar", "hadamard"}
        Rotation codec: the random rotation Pi. "haar": Haar-random orthogonal (a dense d x d matrix).
        "hadamard": the randomized Hadamard transform H diag(s) / sqrt(d) (random signs s; head_dim a
        power of two), which the CUDA C++ kernel applies to the query and the output by butterflies in
        its split and combine kernels, so a decode call has no separate query-rotation launch and reads
        no d x d matrix (issue 15: a fixed cost per call). The other kernels use Pi as a matrix either way.
    rotation_value_layout : {"auto", "mma", "rows"}
        Rotation codec: how the value codes of each 32-token group are laid out. "mma": in the order of
        the CUDA C++ kernel's value MMA fragments (kernels/rotation.py ``frag_pack``: the same bits, no
        3-bit unpacking across bytes in the kernel; H200 k4v3-match 70.9 against 76.5 us at 128k), for
        head_dim 64 / 128 and 3- or 4-bit values with R a multiple of 32; other layers keep "rows"
        (codes per token, channel order). "auto" (default): "mma" for the layers that kernel serves (4-bit
        keys, no QJL residual, no value centering, no outlier tokens) in a cache on a CUDA device of
        compute capability >= 8.0, "rows" elsewhere (the Triton fallback and the CPU reference read
        both; Triton reads "mma" through gathers, ~1.5x slower).
    sink_tokens : int
        The first ``sink_tokens`` positions are kept exact (attention sink); rotation codec only.
    seed : int
        Seed of every random sketch; the same seed gives the same cache on any device.
    side_dtype : {"float16", "bfloat16", "float32"}
        Storage dtype of norms, scales and zeros.
    """

    method: str = "qjl"
    sketch_dim: int = 256
    sketch_dim_initial: int = 512
    initial_layers: int = 15
    outliers: int = 8
    outlier_sketch_dim: int = 128
    outlier_sketch_dim_initial: int = 256
    value_bits: int = 2
    value_group: int = 32
    residual: int = 128
    decoquant_bits: int = 4
    rotation_key_bits: int = 4
    rotation_value_bits: int = 4
    rotation_initial_bits: int = 0
    rotation_unbiased: bool = False
    rotation_scale: str = "lsq"
    rotation_center: str = "none"
    qjl_center: bool = False
    qjl_exact_outliers: bool = False
    qjl_value_codec: str = "minmax"
    qjl_key_scale: str = "unbiased"
    qjl_layer_sketch_dims: tuple = ()
    rotation_initial_keys_only: bool = False
    rotation_layer_key_bits: tuple = ()
    rotation_layer_value_bits: tuple = ()
    rotation_key_outliers: int = 0
    rotation_value_outliers: int = 0
    rotation_key_grid: bool = True
    rotation_value_layout: str = "auto"
    rotation_transform: str = "haar"
    sink_tokens: int = 0
    seed: int = 42
    side_dtype: str = "float16"
    group: int = field(default=32, init=False)  # outlier token group, fixed by the method

    def __post_init__(self):
        def bad(name, allowed):
            raise ValueError(f"QJLConfig.{name}={getattr(self, name)!r} is invalid: allowed {allowed}")

        if self.method not in METHODS:
            bad("method", f"one of {METHODS}")
        for name in ("sketch_dim", "sketch_dim_initial"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 8 or v % 8 or v > 8192:
                bad(name, "a multiple of 8 in [8, 8192]")
        for name in ("outlier_sketch_dim", "outlier_sketch_dim_initial"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0 or v % 8 or v > 8192 or (
                    self.outliers and v == 0 and self.qjl_exact_outliers is not True):
                bad(name, "a multiple of 8 in [8, 8192] (0 only with outliers=0 or qjl_exact_outliers=True)")
        if not isinstance(self.initial_layers, int) or self.initial_layers < 0:
            bad("initial_layers", "an integer >= 0")
        if not isinstance(self.outliers, int) or not 0 <= self.outliers <= 64:
            bad("outliers", "an integer in [0, 64] (and < head_dim)")
        if self.qjl_key_scale not in ("unbiased", "match", "lsq"):
            bad("qjl_key_scale", '"unbiased", "match" or "lsq"')
        if self.qjl_key_scale != "unbiased" and self.method != "qjl":
            bad("qjl_key_scale", '"unbiased" unless method=\'qjl\' (the rotation codec has rotation_scale)')
        if self.qjl_value_codec not in ("minmax", "rotation"):
            bad("qjl_value_codec", '"minmax" or "rotation"')
        if self.qjl_value_codec == "rotation" and self.method != "qjl":
            bad("qjl_value_codec", '"minmax" unless method=\'qjl\' (the rotation codec codes its values itself)')
        if self.qjl_value_codec == "rotation":
            if self.value_bits not in (2, 3, 4):
                bad("value_bits", "2, 3 or 4 with qjl_value_codec='rotation' (the Lloyd-Max codebooks)")
        elif self.value_bits not in (2, 4, 8):
            bad("value_bits", "2, 4 or 8")
        if self.decoquant_bits not in (2, 3, 4, 8):
            bad("decoquant_bits", "2, 3, 4 or 8")
        if not isinstance(self.value_group, int) or self.value_group < 8 or self.value_group & (self.value_group - 1):
            bad("value_group", "a power of two >= 8 that divides head_dim")
        if not isinstance(self.residual, int) or self.residual < 32 or self.residual % 32 or self.residual > 4096:
            bad("residual", "a multiple of 32 in [32, 4096]")
        if self.side_dtype not in _SIDE_DTYPES:
            bad("side_dtype", f"one of {tuple(_SIDE_DTYPES)}")
        for name in ("rotation_key_bits", "rotation_value_bits"):
            if getattr(self, name) not in (1, 2, 3, 4):
                bad(name, "an integer in [1, 4]")
        if self.rotation_initial_bits not in (0, 1, 2, 3, 4):
            bad("rotation_initial_bits", "0 (off) or an integer in [1, 4]")
        if not isinstance(self.rotation_unbiased, bool):
            bad("rotation_unbiased", "True or False")
        if not isinstance(self.rotation_key_grid, bool):
            bad("rotation_key_grid", "True or False")
        if self.rotation_value_layout not in ("auto", "mma", "rows"):
            bad("rotation_value_layout", "'auto', 'mma' or 'rows'")
        if self.rotation_transform not in ("haar", "hadamard"):
            bad("rotation_transform", "'haar' or 'hadamard'")
        if self.rotation_unbiased and min(self.rotation_key_bits, self.rotation_initial_bits or 4) < 2:
            bad("rotation_key_bits", "an integer in [2, 4] with rotation_unbiased=True (1 bit goes to the QJL residual)")
        if self.rotation_scale not in ROTATION_SCALES:
            bad("rotation_scale", f"one of {ROTATION_SCALES}")
        if self.rotation_center not in ROTATION_CENTERS:
            bad("rotation_center", f"one of {tuple(ROTATION_CENTERS)}")
        if not isinstance(self.rotation_initial_keys_only, bool):
            bad("rotation_initial_keys_only", "True or False")
        if not isinstance(self.qjl_center, bool):
            bad("qjl_center", "True or False")
        if self.qjl_center and self.method != "qjl":
            bad("qjl_center", "False unless method='qjl' (the rotation codec has rotation_center)")
        if not isinstance(self.qjl_layer_sketch_dims, tuple) or any(
                not isinstance(v, int) or v < 8 or v % 8 or v > 8192 for v in self.qjl_layer_sketch_dims):
            bad("qjl_layer_sketch_dims", "a tuple of multiples of 8 in [8, 8192] (one per layer) or ()")
        if self.qjl_layer_sketch_dims and self.method != "qjl":
            bad("qjl_layer_sketch_dims", "() unless method='qjl'")
        if not isinstance(self.qjl_exact_outliers, bool) or (self.qjl_exact_outliers and (
                self.method != "qjl" or not self.outliers)):
            bad("qjl_exact_outliers", "False, or True with method='qjl' and outliers > 0")
        if not isinstance(self.rotation_layer_key_bits, tuple) or any(
                b not in (1, 2, 3, 4) for b in self.rotation_layer_key_bits):
            bad("rotation_layer_key_bits", "a tuple of ints in [1, 4] (one per layer) or ()")
        if not isinstance(self.rotation_layer_value_bits, tuple) or any(
                b not in (1, 2, 3, 4) for b in self.rotation_layer_value_bits):
            bad("rotation_layer_value_bits", "a tuple of ints in [1, 4] (one per layer) or ()")
        if (self.rotation_layer_key_bits or self.rotation_layer_value_bits) and self.method != "rotation":
            bad("rotation_layer_key_bits" if self.rotation_layer_key_bits else "rotation_layer_value_bits",
                "() unless method='rotation' (per-layer bits are a rotation-codec schedule)")
        if self.rotation_unbiased and any(b < 2 for b in self.rotation_layer_key_bits):
            bad("rotation_layer_key_bits", "entries >= 2 with rotation_unbiased=True")
        for name in ("rotation_key_outliers", "rotation_value_outliers"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= self.residual:
                bad(name, "an integer in [0, residual] (exact tokens per R-token block)")
            if v and self.method != "rotation":
                bad(name, "0 unless method='rotation' (exact outlier tokens are a rotation-codec option)")
        if not isinstance(self.sink_tokens, int) or not 0 <= self.sink_tokens <= self.residual:
            bad("sink_tokens", "an integer in [0, residual]")
        if self.sink_tokens and self.method != "rotation":
            bad("sink_tokens", "0 unless method='rotation' (only the rotation codec keeps sink tokens exact)")

    # -- per-layer / per-model resolution -------------------------------------------------
    @property
    def torch_side_dtype(self) -> torch.dtype:
        return _SIDE_DTYPES[self.side_dtype]

    def sketch_dims(self, layer_idx: int) -> tuple[int, int]:
        """(m, m_out) for one layer; m_out is 0 when outliers are off."""
        first = layer_idx < self.initial_layers
        m = self.sketch_dim_initial if first else self.sketch_dim
        if self.qjl_layer_sketch_dims:
            if layer_idx >= len(self.qjl_layer_sketch_dims):
                raise ValueError(f"QJLConfig.qjl_layer_sketch_dims has {len(self.qjl_layer_sketch_dims)} entries, the "
                                 f"model has more layers (layer {layer_idx}): one entry per layer")
            m = self.qjl_layer_sketch_dims[layer_idx]
        mo = (self.outlier_sketch_dim_initial if first else self.outlier_sketch_dim) if self.outliers else 0
        if self.qjl_exact_outliers:
            mo = 0     # the outlier channels are stored, not sketched
        return m, mo

    def rotation_bits(self, layer_idx: int) -> tuple[int, int]:
        """(key_bits, value_bits) of the rotation codec for one layer."""
        kb, vb = self.rotation_key_bits, self.rotation_value_bits
        if layer_idx < self.initial_layers and self.rotation_initial_bits:
            kb = max(kb, self.rotation_initial_bits)
            vb = vb if self.rotation_initial_keys_only else max(vb, self.rotation_initial_bits)
        if self.rotation_layer_key_bits:
            if layer_idx >= len(self.rotation_layer_key_bits):
                raise ValueError(f"QJLConfig.rotation_layer_key_bits has {len(self.rotation_layer_key_bits)} "
                                 f"entries, the model has more layers (layer {layer_idx}): one entry per layer")
            kb = self.rotation_layer_key_bits[layer_idx]
        if self.rotation_layer_value_bits:
            if layer_idx >= len(self.rotation_layer_value_bits):
                raise ValueError(f"QJLConfig.rotation_layer_value_bits has {len(self.rotation_layer_value_bits)} "
                                 f"entries, the model has more layers (layer {layer_idx}): one entry per layer")
            vb = self.rotation_layer_value_bits[layer_idx]
        return kb, vb

    def check_head_dim(self, head_dim: int) -> None:
        """Raise ValueError if this config cannot serve ``head_dim``."""
        if head_dim % 16 or head_dim > 256:
            raise ValueError(f"head_dim={head_dim} is not supported: it must be a multiple of 16 and <= 256")
        if head_dim % self.value_group:
            raise ValueError(
                f"QJLConfig.value_group={self.value_group} does not divide head_dim={head_dim}: "
                f"pick a power of two <= {head_dim}")
        if self.outliers >= head_dim:
            raise ValueError(f"QJLConfig.outliers={self.outliers} must be < head_dim={head_dim}")

    def short(self) -> str:
        """The fields that differ from the defaults, e.g. for table captions."""
        base = QJLConfig()
        diff = [f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self)
                if f.init and getattr(self, f.name) != getattr(base, f.name)]
        return f"method={self.method}" + ("" if not diff else ", " + ", ".join(d for d in diff if not d.startswith("method=")))

    def replace(self, **kw) -> "QJLConfig":
        return dataclasses.replace(self, **kw)

    # -- presets ----------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, head_dim: int = 128, num_layers: int = 32, **overrides) -> "QJLConfig":
        """A named preset scaled to a model.

        Parameters
        ----------
        name : str
            One of ``QJLConfig.presets()``.
        head_dim, num_layers : int
            The model's; sketch sizes scale with head_dim/128, ``initial_layers`` with
            num_layers/32 (the reference's proportions); a per-layer bit schedule written for
            another depth is resampled by relative depth (layer i takes entry i * n // num_layers).
            Presets with ``rotation_transform="hadamard"`` take "haar" for a head_dim that is not a
            power of two.
        **overrides
            Any field, applied last.
        """
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}: choose one of {sorted(PRESETS)}")
        base = dict(PRESETS[name])
        r = head_dim / 128

        def m(v):
            return max(8, int(round(v * r / 8)) * 8)

        for k in ("sketch_dim", "sketch_dim_initial", "outlier_sketch_dim", "outlier_sketch_dim_initial"):
            if k in base and base[k]:
                base[k] = m(base[k])
        if "initial_layers" in base:
            base["initial_layers"] = int(round(base["initial_layers"] * num_layers / 32))
        for k in ("rotation_layer_key_bits", "rotation_layer_value_bits", "qjl_layer_sketch_dims"):
            if base.get(k) and len(base[k]) != num_layers:   # by relative depth: layer i <- entry i*n/L
                n = len(base[k])
                base[k] = tuple(base[k][i * n // num_layers] for i in range(num_layers))
        if base.get("qjl_layer_sketch_dims"):
            base["qjl_layer_sketch_dims"] = tuple(m(v) for v in base["qjl_layer_sketch_dims"])
        if base.get("rotation_transform") == "hadamard" and head_dim & (head_dim - 1):
            base["rotation_transform"] = "haar"             # no Hadamard matrix of that order
        base.update(overrides)
        return cls(**base)

    @staticmethod
    def presets() -> list[str]:
        return sorted(PRESETS)

    @classmethod
    def for_model(cls, model_config, preset: str = "reference", **overrides) -> "QJLConfig":
        """Preset scaled to a transformers config (reads head_dim and num_hidden_layers)."""
        hd = getattr(model_config, "head_dim", None) or model_config.hidden_size // model_config.num_attention_heads
        return cls.preset(preset, head_dim=hd, num_layers=model_config.num_hidden_layers, **overrides)


# Written for head_dim 128 / 32 layers; `preset()` scales them.
PRESETS: dict[str, dict] = {
    # The QJL reference code's shipped defaults (Llama-2): m=512 for 15 of 32 layers, 256 after.
    "reference": dict(method="qjl", sketch_dim=256, sketch_dim_initial=512, initial_layers=15,
                      outliers=8, outlier_sketch_dim=128, outlier_sketch_dim_initial=256,
                      value_bits=2, value_group=32, residual=128),
    # Fewer bits: one sketch size everywhere, smaller outlier sketch.
    "low": dict(method="qjl", sketch_dim=128, sketch_dim_initial=128, initial_layers=0,
                outliers=4, outlier_sketch_dim=64, outlier_sketch_dim_initial=64,
                value_bits=2, value_group=32, residual=128),
    # More accuracy: bigger sketches and 4-bit values.
    "high": dict(method="qjl", sketch_dim=512, sketch_dim_initial=1024, initial_layers=15,
                 outliers=8, outlier_sketch_dim=256, outlier_sketch_dim_initial=256,
                 value_bits=4, value_group=32, residual=128),
    # issue 17: the reference with key centering (per-block mean key stored, +16/R bits per key value)
    "reference-center": dict(method="qjl", sketch_dim=256, sketch_dim_initial=512, initial_layers=15,
                             outliers=8, outlier_sketch_dim=128, outlier_sketch_dim_initial=256,
                             value_bits=2, value_group=32, residual=128, qjl_center=True),
    # issue 17 round 7: the reference with the key norm fitted to the decoded direction (the same bits and
    # buffers; the Triton append computes it and every attend kernel reads it unchanged: runs on the GPU)
    "reference-match": dict(method="qjl", sketch_dim=256, sketch_dim_initial=512, initial_layers=15,
                            outliers=8, outlier_sketch_dim=128, outlier_sketch_dim_initial=256,
                            value_bits=2, value_group=32, residual=128, qjl_key_scale="match"),
    "high-center": dict(method="qjl", sketch_dim=512, sketch_dim_initial=1024, initial_layers=15,
                        outliers=8, outlier_sketch_dim=256, outlier_sketch_dim_initial=256,
                        value_bits=4, value_group=32, residual=128, qjl_center=True),
    # one 512-row sketch (of 128 dims; 256 at head_dim 64) in every layer, centered, 2-bit values
    "m512-center": dict(method="qjl", sketch_dim=512, sketch_dim_initial=512, initial_layers=0,
                        outliers=8, outlier_sketch_dim=128, outlier_sketch_dim_initial=128,
                        value_bits=2, value_group=32, residual=128, qjl_center=True),
    # issue 17, chosen on the tune windows for "QJL within 10% at <= 4.5 bits" (missed; RESULTS.md):
    # 4 outlier channels instead of 8 (lower key error at the same m), and 4-bit values of 64-channel
    # groups with no outlier sketch (the 2-bit values alone cost about a quarter of QJL's error)
    "m512-center-o4": dict(method="qjl", sketch_dim=512, sketch_dim_initial=512, initial_layers=0,
                           outliers=4, outlier_sketch_dim=128, outlier_sketch_dim_initial=128,
                           value_bits=2, value_group=32, residual=128, qjl_center=True),
    # the same with the 4 outlier channels stored exactly instead of sketched (0.125 bits/value fewer)
    "m512-center-o4x": dict(method="qjl", sketch_dim=512, sketch_dim_initial=512, initial_layers=0,
                            outliers=4, outlier_sketch_dim=128, outlier_sketch_dim_initial=128,
                            value_bits=2, value_group=32, residual=128, qjl_center=True, qjl_exact_outliers=True),
    # 6 exact outlier channels (chosen on the tune windows among the <= 4.5-bit exact-outlier variants:
    # 6 channels, a 288-row sketch, per-layer sketch schedules; RESULTS round 6)
    "m512-center-o6x": dict(method="qjl", sketch_dim=512, sketch_dim_initial=512, initial_layers=0,
                            outliers=6, outlier_sketch_dim=128, outlier_sketch_dim_initial=128,
                            value_bits=2, value_group=32, residual=128, qjl_center=True, qjl_exact_outliers=True),
    # + values coded as the rotation codec codes them (3 bits + one scale a token) and the key norm fitted
    # so the decoded key keeps the key's norm; the sketch shrunk to stay <= 4.5 bits (4.45 at head_dim 64).
    # Chosen on the tune windows among 13 <= 4.5-bit variants by the smallest worst-kind change (RESULTS round 7)
    "m480-center-o6x-v3rot-match": dict(method="qjl", sketch_dim=480, sketch_dim_initial=480, initial_layers=0,
                                        outliers=6, outlier_sketch_dim=128, outlier_sketch_dim_initial=128,
                                        value_bits=3, value_group=32, residual=128, qjl_center=True,
                                        qjl_exact_outliers=True, qjl_value_codec="rotation", qjl_key_scale="match"),
    "m480-center-v4": dict(method="qjl", sketch_dim=480, sketch_dim_initial=480, initial_layers=0,
                           outliers=0, outlier_sketch_dim=0, outlier_sketch_dim_initial=0,
                           value_bits=4, value_group=64, residual=128, qjl_center=True),
    "decoquant4": dict(method="decoquant", decoquant_bits=4, residual=128),
    "decoquant3": dict(method="decoquant", decoquant_bits=3, residual=128),
    "decoquant2": dict(method="decoquant", decoquant_bits=2, residual=128),
    # Rotation + Lloyd-Max (TurboQuant-style). Codec bits/value at head_dim 64: b + 0.25 (one fp16
    # scale per vector) + 0.125 on keys (per-block mean, R=128); sinks add 2 * sink * 16 bits per
    # head once. Options chosen by measurement (SmolLM2-135M, pydoc, 4k windows; issue 9 report):
    # key centering helps at every rate, value centering hurts, unbiased keys hurt, sink and 4-bit
    # initial layers help at <= 3 bits for V.
    # the GPU presets take the randomized Hadamard rotation (the CUDA C++ kernel's HAD path: H100 4-14% faster
    # decode; accuracy equal to Haar within the seed spread, RESULTS round 8); Haar where head_dim is not 2^k
    "rotation4": dict(method="rotation", rotation_key_bits=4, rotation_value_bits=4, rotation_center="k",
                      residual=128, rotation_transform="hadamard"),
    "rotation-k4v3": dict(method="rotation", rotation_key_bits=4, rotation_value_bits=3, rotation_center="k",
                          rotation_initial_bits=4, initial_layers=2, sink_tokens=4, residual=128),
    # the same with the "match" scale (stored scale reproduces each vector's norm) instead of
    # least squares: +0.88% vs +1.20% perplexity at 4k, same bits (.rot sweep, second session)
    "rotation-k4v3-match": dict(method="rotation", rotation_key_bits=4, rotation_value_bits=3, rotation_center="k",
                                rotation_initial_bits=4, initial_layers=2, sink_tokens=4, residual=128,
                                rotation_scale="match", rotation_transform="hadamard"),
    "rotation3": dict(method="rotation", rotation_key_bits=3, rotation_value_bits=3, rotation_center="k",
                      rotation_initial_bits=4, initial_layers=2, sink_tokens=4, residual=128),
    # issue 17 candidates for <= 3.5 bits: the "match" scale at K3/V3, and 4-bit keys (only keys)
    # in the first 4 / 8 of 32 layers (scaled to the model), 3 bits elsewhere
    "rotation3-match": dict(method="rotation", rotation_key_bits=3, rotation_value_bits=3, rotation_center="k",
                            rotation_initial_bits=4, initial_layers=2, sink_tokens=4, residual=128,
                            rotation_scale="match"),
    "rotation-k3v3-k4first4": dict(method="rotation", rotation_key_bits=3, rotation_value_bits=3,
                                   rotation_center="k", rotation_initial_bits=4, rotation_initial_keys_only=True,
                                   initial_layers=4, sink_tokens=4, residual=128, rotation_scale="match"),
    "rotation-k3v3-k4first8": dict(method="rotation", rotation_key_bits=3, rotation_value_bits=3,
                                   rotation_center="k", rotation_initial_bits=4, rotation_initial_keys_only=True,
                                   initial_layers=8, sink_tokens=4, residual=128, rotation_scale="match"),
    # issue 17: per-layer K/V bits (2-4) from a per-layer sensitivity measurement on the TUNE windows
    # only (2 pydoc + 2 pysrc windows of SmolLM2-135M, 30 layers: attention-output error of each
    # layer with its keys or values coded at 2/3/4 bits, then greedy allocation of the bit budget;
    # benchmarks/RESULTS.md, Accuracy). Written for 30 layers, resampled by depth for other models.
    # Bits per layer only: every kernel runs them unchanged.
    "rotation-mixed-345": dict(method="rotation", rotation_key_bits=3, rotation_value_bits=3, rotation_center="k",
                               sink_tokens=4, residual=128, rotation_scale="match",
                               rotation_layer_key_bits=(2, 3, 3, 4, 4, 4, 4, 4, 4, 4, 4, 2, 3, 2, 4, 3, 2, 4, 4, 3,
                                                        4, 3, 3, 4, 4, 3, 4, 2, 3, 3),
                               rotation_layer_value_bits=(3, 3, 3, 3, 3, 3, 3, 4, 4, 3, 3, 2, 2, 2, 3, 3, 2, 3, 4, 2,
                                                          4, 3, 3, 4, 4, 2, 3, 2, 3, 2)),
    "rotation-mixed-35": dict(method="rotation", rotation_key_bits=3, rotation_value_bits=3, rotation_center="k",
                              sink_tokens=4, residual=128, rotation_scale="match",
                              rotation_layer_key_bits=(2, 3, 3, 4, 4, 4, 4, 4, 4, 4, 4, 2, 3, 2, 4, 4, 2, 4, 4, 3,
                                                       4, 3, 3, 4, 4, 3, 4, 2, 3, 3),
                              rotation_layer_value_bits=(3, 3, 3, 3, 3, 3, 3, 4, 4, 3, 3, 2, 2, 2, 3, 3, 2, 4, 4, 2,
                                                         4, 3, 3, 4, 4, 3, 3, 2, 3, 2)),
    # the same measurement from 8 tune windows (4 pydoc + 4 pysrc; `layer_bits.py --budget 3.5
    # --n-windows 4`, 3.496 bits/value): held-out +0.93% pydoc / +1.72% pysrc against rotation-mixed-35's
    # +1.22% / +2.12% in the same run (RESULTS.md Accuracy, round 5)
    "rotation-mixed-35w8": dict(method="rotation", rotation_key_bits=3, rotation_value_bits=3, rotation_center="k",
                                sink_tokens=4, residual=128, rotation_scale="match",
                                rotation_layer_key_bits=(2, 3, 3, 4, 4, 4, 4, 4, 4, 4, 4, 2, 3, 3, 4, 3, 3, 4, 4, 3,
                                                         4, 3, 3, 4, 4, 3, 4, 2, 4, 3),
                                rotation_layer_value_bits=(3, 3, 3, 3, 3, 3, 3, 4, 4, 3, 3, 2, 2, 2, 3, 3, 2, 3, 4, 2,
                                                           4, 3, 3, 4, 4, 2, 3, 2, 3, 2)),
    # the same measurement, only upgrades from K3/V3 (no 2-bit layers)
    "rotation-k3v3-sched": dict(method="rotation", rotation_key_bits=3, rotation_value_bits=3, rotation_center="k",
                                sink_tokens=4, residual=128, rotation_scale="match",
                                rotation_layer_key_bits=(3, 3, 3, 4, 3, 4, 3, 4, 4, 4, 4, 3, 3, 3, 3, 3, 3, 3, 4, 3,
                                                         4, 3, 3, 4, 4, 3, 3, 3, 3, 3),
                                rotation_layer_value_bits=(3, 3, 3, 3, 3, 3, 3, 4, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3,
                                                           3, 3, 3, 3, 3, 3, 3, 3, 3, 3)),
    "rotation-k4v2": dict(method="rotation", rotation_key_bits=4, rotation_value_bits=2, rotation_center="k",
                          rotation_initial_bits=4, initial_layers=2, sink_tokens=4, residual=128),
}
