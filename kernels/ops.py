"""torch.library ops of the compressed cache (namespace ``qjl``).

Every op takes one layer's cache ``state`` (a list of tensors, layout in kernels/reference.py),
the layer's constant tensors ``consts`` (sketches, ...), and ``meta`` = [codec_id, R, L, *params].
The default implementation is the reference (CPU and any device); ``kernels/triton`` registers
CUDA kernels over it. Each op's fake implementation sits right under it.

    qjl::append      mutates state: store new tokens, compress full residual blocks
    qjl::dequantize  (K, V) over the whole static length, what the eager cache hands to attention
    qjl::attend      fused attention over compressed past + exact residual + new tokens
"""
from __future__ import annotations

from typing import Optional

import torch

from . import reference as ref

Tensor = torch.Tensor


def _check(state, k, v, meta):
    if len(meta) < 3:
        raise ValueError(f"qjl ops: meta must be [codec_id, R, L, *params], got {list(meta)}")
    rk = state[1]
    if k.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"qjl ops: key/value must both be (B, H, T, D), got {tuple(k.shape)} and {tuple(v.shape)}")
    B, H, _, D = rk.shape
    if (k.shape[0], k.shape[1], k.shape[3]) != (B, H, D):
        raise ValueError(f"qjl ops: key/value (B, H, T, D)={tuple(k.shape)} do not fit the cache "
                         f"(B={B}, H={H}, D={D})")
    if k.dtype != rk.dtype or v.dtype != rk.dtype:
        raise ValueError(f"qjl ops: key/value dtype {k.dtype}/{v.dtype} differs from the cache's {rk.dtype}; "
                         f"create the cache with dtype={k.dtype} or cast the model")
    if k.device != rk.device or v.device != rk.device:
        raise ValueError(f"qjl ops: key/value on {k.device} but the cache is on {rk.device}; "
                         f"create the cache on the model's device")


@torch.library.custom_op("qjl::append", mutates_args=("state",))
def append(state: list[Tensor], consts: list[Tensor], k: Tensor, v: Tensor, meta: list[int]) -> None:
    """Append T tokens to one layer's cache; compress every residual block that fills.

    Parameters
    ----------
    state : list of Tensor
        The layer's cache (mutated), see kernels/reference.py.
    consts : list of Tensor
        Codec constants (QJL: sketch (m, D) and outlier sketch (m_out, D), fp32).
    k, v : Tensor
        (B, H, T, D) new keys (after RoPE) and values, in the cache's dtype.
    meta : list of int
        [codec_id, R, L, *codec params].
    """
    _check(state, k, v, meta)
    ref.append_(state, consts, k, v, meta)


@append.register_fake
def _(state, consts, k, v, meta):
    _check(state, k, v, meta)
    return None


@torch.library.custom_op("qjl::dequantize", mutates_args=())
def dequantize(state: list[Tensor], consts: list[Tensor], k_new: Tensor, v_new: Tensor,
               meta: list[int]) -> tuple[Tensor, Tensor]:
    """(K, V), each (B, H, L, D): decompressed past, exact residual and new tokens, zeros past the end.

    Call after `append` with the same k_new/v_new. Positions >= length must be masked out by
    the caller's attention mask (as with HF's StaticCache).
    """
    _check(state, k_new, v_new, meta)
    if state[0].device.type == "cpu":
        return ref.dequantize(state, consts, k_new, v_new, meta)
    # no host sync off the CPU: eager decode and HF's own CUDA-graph auto-compile stay capturable
    return ref.dequantize_nosync(state, consts, k_new, v_new, meta)


@dequantize.register_fake
def _(state, consts, k_new, v_new, meta):
    B, H, _, D = state[1].shape
    L = int(meta[2])
    return state[1].new_empty(B, H, L, D), state[2].new_empty(B, H, L, D)


@torch.library.custom_op("qjl::attend", mutates_args=())
def attend(q: Tensor, state: list[Tensor], consts: list[Tensor], k_new: Tensor, v_new: Tensor,
           attn_mask: Optional[Tensor], is_causal: bool, scale: Optional[float], meta: list[int]) -> Tensor:
    """Fused attention over one layer's compressed cache, after `append`.

    Parameters
    ----------
    q : Tensor
        (B, Hq, Tq, D), Hq = G * H (GQA: query head h reads kv head h // G).
    state, consts, meta
        As for `append`.
    k_new, v_new : Tensor
        (B, H, T, D), this step's tokens, attended exactly.
    attn_mask : Tensor, optional
        Bool (True = attend) or additive float, broadcastable to (B, Hq, Tq, L).
    is_causal : bool
        Without a mask: query i sees positions <= length - Tq + i.
    scale : float, optional
        Score scale; default 1/sqrt(D).

    Returns
    -------
    Tensor
        (B, Hq, Tq, D) in q's dtype.
    """
    _check(state, k_new, v_new, meta)
    if q.dim() != 4 or q.shape[-1] != state[1].shape[-1] or q.shape[1] % state[1].shape[1]:
        raise ValueError(f"qjl::attend: q must be (B, Hq, Tq, D) with Hq a multiple of the cache's "
                         f"{state[1].shape[1]} kv heads and D={state[1].shape[-1]}, got {tuple(q.shape)}")
    return like_fake(q, ref.attend(q, state, consts, k_new, v_new, attn_mask, is_causal, scale, meta))


@attend.register_fake
def _(q, state, consts, k_new, v_new, attn_mask, is_causal, scale, meta):
    return torch.empty_like(q)


def like_fake(q: Tensor, out: Tensor) -> Tensor:
    """`out` in the layout of attend's fake, ``torch.empty_like(q)``: q's shape, dtype and strides.

    Every route of ``qjl::attend`` (CPU reference, CUDA fused kernels, the SDPA fallback) returns
    through this: Inductor plans the graph with the fake's strides, so a route that returns
    another layout is an "incorrect fake kernel" (HF's q is a transposed view, (B, T, Hq, D)
    memory). Returns `out` itself when it already matches, else one copy into that layout.
    """
    want = torch.empty_like(q, device="meta")
    if out.shape == want.shape and out.dtype == want.dtype and out.stride() == want.stride():
        return out
    return torch.empty_like(q).copy_(out)


# CUDA implementations: Triton kernels (kernels/triton), imported lazily so CPU-only installs work.
from .triton import register_cuda as _register_cuda  # noqa: E402

_register_cuda()
