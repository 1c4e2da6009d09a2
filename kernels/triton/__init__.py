"""Triton kernels of the compressed cache, registered as the CUDA implementation of the qjl ops.

Importing this package never imports triton: `register_cuda()` (called by kernels/ops.py)
registers thin wrappers that import the launchers on first CUDA call, so CPU-only machines
and machines without triton keep the reference implementation.

    qjl_attend.py   fused attention over the compressed cache (QJL, codec 0), split combine, and
                    the pieces every codec's attend shares (mask handling, exact-token loop)
    qjl_append.py   append: compress full residual blocks, refill the ring
    decoquant.py    DecoQuant (codec 1): append (in-kernel Jacobi eigh per block) + fused attend
    rotation.py     rotation + Lloyd-Max (codec 2): append + fused attend in the rotated space
"""
from __future__ import annotations

import collections
import functools
import importlib
import logging
import os

import torch

log = logging.getLogger(__name__)
_REGISTERED = False
# query rows (Tq * GQA group) up to which qjl::attend uses the fused decode kernel
MAX_FUSED_ROWS = 64


@functools.cache
def _have_triton() -> bool:
    try:
        import triton  # noqa: F401
        return True
    except Exception:  # pragma: no cover - triton missing or broken
        return False


# codec id -> (append module, append fn, attend module, attend fn) in this package; imported on
# the first CUDA call. A codec missing here runs the PyTorch path on CUDA (reference append,
# sync-free attend). Row limit: above `max_rows` query rows per kv head (chunked prefill) the
# attend takes SDPA over the sync-free dequantization instead of the decode kernel.
KERNELS = {
    0: ("qjl_append", "qjl_append_", "qjl_attend", "qjl_attend"),
    1: ("decoquant", "decoquant_append_", "decoquant", "decoquant_attend"),
    2: ("rotation", "rotation_append_", "rotation", "rotation_attend"),
}


# which implementation served qjl::attend on CUDA (counted per call; tests and benchmarks read it)
ROUTES: collections.Counter = collections.Counter()
# codec id -> module of kernels/cuda with `unsupported(q, state, consts, meta)` and the launcher
CPP_KERNELS = {0: ("qjl", "qjl_attend_cuda"), 2: ("rot", "rotation_attend_cuda")}
_NOTED: set = set()


def attend_kernel_choice() -> str:
    """``QJL_ATTEND_KERNEL``: "auto" (default: CUDA C++ where it covers the call, else Triton),
    "triton" (never the CUDA C++ kernel), "cuda" (the CUDA C++ kernel or an error saying why)."""
    v = os.environ.get("QJL_ATTEND_KERNEL", "auto").strip().lower() or "auto"
    if v not in ("auto", "triton", "cuda"):
        raise ValueError(f"QJL_ATTEND_KERNEL={v!r}: choose auto, triton or cuda")
    return v


def _attend_cpp(q, state, consts, k_new, v_new, attn_mask, is_causal, scale, meta):
    """The CUDA C++ decode kernel's output, or None (after saying once why) to take Triton."""
    choice = attend_kernel_choice()
    spec = CPP_KERNELS.get(int(meta[0]))
    if choice == "triton":
        return None
    if spec is None:
        why = f"codec {meta[0]} has no CUDA C++ attend kernel yet"
    else:
        mod = importlib.import_module(f"{__package__.rsplit('.', 1)[0]}.cuda.{spec[0]}")
        why = mod.unsupported(q, state, consts, meta)
        if not why:
            ROUTES["cuda"] += 1
            return getattr(mod, spec[1])(q, state, consts, k_new, v_new, attn_mask, is_causal, scale, meta)
    if choice == "cuda":
        raise ValueError(f"qjl::attend: QJL_ATTEND_KERNEL=cuda but the CUDA C++ kernel cannot take this call: {why}")
    if why not in _NOTED:
        _NOTED.add(why)
        log.warning("qjl::attend: CUDA C++ decode kernel not used (%s); running the Triton kernel", why)
    return None


@functools.cache
def _kernel(codec: int, which: int):
    """The launcher of `codec` (which: 0 append, 1 attend), resolved once per process."""
    spec = KERNELS.get(codec)
    if spec is None or not _have_triton():
        return None
    mod = importlib.import_module(f"{__name__}.{spec[2 * which]}")
    return getattr(mod, spec[2 * which + 1])


def _append_cuda(state, consts, k, v, meta):
    from .. import ops, reference as ref
    ops._check(state, k, v, meta)
    fn = _kernel(int(meta[0]), 0)
    if fn is None:
        return ref.append_(state, consts, k, v, meta)
    fn(state, consts, k, v, meta)


def _attend_cuda(q, state, consts, k_new, v_new, attn_mask, is_causal, scale, meta):
    from .. import ops, reference as ref
    ops._check(state, k_new, v_new, meta)
    if q.dim() != 4 or q.shape[-1] != state[1].shape[-1] or q.shape[1] % state[1].shape[1]:
        raise ValueError(f"qjl::attend: q must be (B, Hq, Tq, D) with Hq a multiple of the cache's "
                         f"{state[1].shape[1]} kv heads and D={state[1].shape[-1]}, got {tuple(q.shape)}")
    G = q.shape[1] // state[1].shape[1]
    fn = _kernel(int(meta[0]), 1)
    if fn is not None and int(meta[0]) == 0 and len(meta) > 6 and int(meta[6]):
        # QJL key centering (QJLConfig.qjl_center) has no fused attend kernel (Triton or CUDA C++)
        fn = None
        if "qjl-center" not in _NOTED:
            _NOTED.add("qjl-center")
            log.warning("qjl::attend: QJL key centering (QJLConfig.qjl_center=True) has no fused attend kernel; "
                        "running SDPA over the sync-free dequantization (reference.attend_nosync): correct, "
                        "CUDA-graph safe, O(cache) per step")
    if fn is None or q.shape[2] * G > MAX_FUSED_ROWS:
        # the fused kernels are decode kernels (a few query rows per kv head); long chunks (chunked
        # prefill) and codecs without a kernel take SDPA over the device-side dequantization
        out = ref.attend_nosync(q, state, consts, k_new, v_new, attn_mask, is_causal, scale, meta)
        ROUTES["sdpa"] += 1
    else:
        out = _attend_cpp(q, state, consts, k_new, v_new, attn_mask, is_causal, scale, meta)
        if out is None:
            out = fn(q, state, consts, k_new, v_new, attn_mask, is_causal, scale, meta)
            ROUTES["triton"] += 1
    # every route returns the fake's layout (empty_like(q)), or Inductor rejects the op (issue 14)
    return ops.like_fake(q, out)


def register_cuda() -> bool:
    """Register the Triton kernels as the CUDA implementation of qjl::append / qjl::attend."""
    global _REGISTERED
    if _REGISTERED:
        return True
    try:
        torch.library.register_kernel("qjl::append", "cuda", _append_cuda)
        torch.library.register_kernel("qjl::attend", "cuda", _attend_cuda)
    except Exception as e:  # pragma: no cover - never break CPU-only imports
        log.warning("qjl: Triton CUDA kernels not registered (%s); the reference runs on CUDA", e)
        return False
    _REGISTERED = True
    return True


def has_kernels(codec: int) -> bool:
    """True if codec `codec` has Triton append + attend kernels (so its decode step is graph-safe)."""
    return codec in KERNELS and _have_triton()


def prepare(codec: int, consts, dtype: torch.dtype) -> None:
    """Build a codec's derived kernel constants (e.g. transposed sketches) ahead of time.

    Called by the cache when it allocates a layer on CUDA, outside any graph capture: derived
    tensors first made during a CUDA-graph capture would sit in the graph's private pool.
    Calls `prepare(consts, dtype)` of the codec's attend module where it has one.
    """
    if not consts or not consts[0].is_cuda:
        return
    from ..checks import preparing
    with preparing():
        _prepare(codec, consts, dtype)


def _prepare(codec, consts, dtype):
    if codec in CPP_KERNELS and attend_kernel_choice() != "triton":
        from ..cuda import available
        if available()[0]:
            importlib.import_module(f"{__package__.rsplit('.', 1)[0]}.cuda.{CPP_KERNELS[codec][0]}").prepare(consts)
    if not has_kernels(codec):
        return
    mod = importlib.import_module(f"{__name__}.{KERNELS[codec][2]}")
    if hasattr(mod, "prepare"):
        mod.prepare(consts, dtype)
