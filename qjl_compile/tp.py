"""Tensor parallelism: how many key/value heads each rank's `QJLCache` holds.

Under transformers' tensor parallelism (``from_pretrained(..., tp_plan="auto")`` or
``distributed_config=DistributedConfig(tp_size=N)``, launched with ``torchrun``), the "colwise" plan on
``k_proj``/``v_proj`` gives every rank ``num_key_value_heads / tp_size`` whole KV heads: the attention
module of rank r sees heads ``[r*h, (r+1)*h)`` only, and ``o_proj`` ("rowwise") all-reduces the
attention output. The compressed cache follows that split: each rank compresses and attends over its
own heads (no K/V ever crosses ranks), with the same sketches/rotations as one process (they depend
on the seed and the layer only, never on the rank or the head), so every rank computes exactly the
slice a single process would.

transformers records the split on the model's config (``config.distributed_config``, 5.17 .. 5.24),
which is what `QJLCache(model.config, ...)` reads; ``QJLCache(..., tp_size=N)`` states it explicitly.
"""
from __future__ import annotations

_KEY_PROJECTIONS = ("k_proj", "qkv_proj", "query_key_value")


def tp_size_of(config) -> int:
    """The tensor-parallel size transformers recorded on `config` (``config.distributed_config.tp_size``), else 1."""
    dc = getattr(config, "distributed_config", None)
    n = getattr(dc, "tp_size", None) if dc is not None else None
    return int(n) if n else 1


def tp_plan_of(config) -> dict:
    """The TP plan of the model `config` belongs to: the model's ``base_model_tp_plan`` with a
    ``distributed_config.tp_plan`` dict laid over it (an empty dict: no plan, as in transformers)."""
    base = dict(getattr(config, "base_model_tp_plan", None) or {})
    dc = getattr(config, "distributed_config", None)
    override = getattr(dc, "tp_plan", None) if dc is not None else None
    if isinstance(override, dict):
        return {} if not override else {**base, **override}
    return base


def shards_kv_heads(plan: dict) -> bool:
    """True if `plan` splits the key projection by output columns (so every rank holds a subset of KV heads)."""
    return any(k.rsplit(".", 1)[-1] in _KEY_PROJECTIONS and "colwise" in str(v) and "gather" not in str(v)
               for k, v in plan.items())


def kv_heads_per_rank(config, kv_heads: int, tp_size: int | None = None) -> int:
    """KV heads one rank's attention sees.

    Parameters
    ----------
    config : the model's config (its TP plan decides whether heads are split at all)
    kv_heads : int, the model's ``num_key_value_heads``
    tp_size : int, optional; default `tp_size_of(config)`

    Raises
    ------
    ValueError if the plan splits heads and `tp_size` does not divide `kv_heads` (a rank would hold
    part of a head, which no per-head codec can store).
    """
    tp = tp_size_of(config) if tp_size is None else int(tp_size)
    if tp < 1:
        raise ValueError(f"QJLCache: tp_size must be >= 1, got {tp_size!r}")
    if tp == 1 or not shards_kv_heads(tp_plan_of(config)):
        return kv_heads
    if kv_heads % tp:
        divisors = [n for n in range(1, kv_heads + 1) if kv_heads % n == 0]
        raise ValueError(f"QJLCache under tensor parallelism: the model has {kv_heads} key/value heads, which "
                         f"tp_size={tp} ranks cannot split into whole heads (each rank's compressed cache holds whole "
                         f"KV heads). Fix: launch with a tp_size that divides {kv_heads} ({divisors}: torchrun "
                         f"--nproc-per-node N, DistributedConfig(tp_size=N)), or keep k_proj/v_proj unsharded in the "
                         f"tp_plan.")
    return kv_heads // tp


def rank() -> int:
    """This process's rank in the default torch.distributed group (0 without one)."""
    import torch.distributed as dist
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def gather_memory(cache) -> list[dict]:
    """Every rank's ``cache.memory()``, in rank order (a collective: call it on every rank of the group)."""
    import torch.distributed as dist
    mem = cache.memory()
    if not (dist.is_available() and dist.is_initialized()):
        return [mem]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, mem)
    return out
