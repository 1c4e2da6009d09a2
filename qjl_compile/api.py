"""`qjl_compile.compile(model)`: compressed cache + compiled decode step for ``model.generate``.

After ``model = qjl_compile.compile(model)``, ``model.generate(ids, max_new_tokens=n)``:
  * allocates (or reuses) a `QJLCache` sized from the request: HF's own cache length for the call
    (prompt + max_new_tokens, times beams/return sequences in batch), rounded up to the residual
    window (transformers' ``_prepare_cache_for_generation`` hook, bound by parameter name);
  * runs the prefill eagerly (as transformers does) and every later step (decode, later prefill
    chunks) through ``torch.compile(model.forward, backend="qjl")``, compiled here once per model.

The compiled step is ours, not transformers' auto-compile (whose criteria and cache keyword moved
between 5.17 and 5.24): ``model.forward`` becomes a dispatcher that sends a call over a `QJLCache`
that already holds tokens to the compiled forward and anything else to the original forward, and
transformers' own auto-compile is switched off for requests that use a `QJLCache`
(``generation_config.disable_compile``), so the step is never compiled twice. The same holds for a
direct ``model(ids, cache=qjl_cache)`` decode loop.

A cache given to generate as ``cache=`` or ``past_key_values=`` (either spelling on every supported
transformers) is used as given: a `QJLCache` gets the compiled step; any other cache (or
``cache_implementation=``, ``use_cache=False``) decodes eagerly and uncompressed, and says so once
(`qjl_compile.diagnostics`). Assisted/speculative decoding is refused up front (the cache cannot
crop).
"""
from __future__ import annotations

import functools
import inspect
import logging
import types
from typing import Optional

import torch

from . import compat, diagnostics, tp
from .cache import QJLCache, check_model_config, head_dim_of, kv_heads_of
from .config import QJLConfig

log = logging.getLogger("qjl_compile.api")

_COMPILE_KEYS = ("fullgraph", "dynamic", "mode", "options", "backend")
_HOOK = "_prepare_cache_for_generation"
ASSISTED_MESSAGE = ("QJLCache cannot crop (compressed blocks cannot be un-flushed): assisted/speculative decoding "
                    "is not supported with it; use generate() without an assistant model (assistant_model=, "
                    "prompt_lookup_num_tokens=).")


class _State:
    def __init__(self, model, config: QJLConfig, max_cache_len: Optional[int], compile_kwargs: dict):
        self.config = config
        self.max_cache_len = max_cache_len
        self.cache: Optional[QJLCache] = None
        # originals: the class's methods unless someone (accelerate hooks, ...) put instance ones there
        self.original_prepare = getattr(model, _HOOK, None)
        self.original_forward = model.forward
        self.original_generate = model.generate
        self.compile_kwargs = compile_kwargs
        self.step = torch.compile(self.original_forward, **compile_kwargs)
        self.hook_calls = 0
        self.compiled_calls = 0  # steps that ran through the compiled forward (tests, reports)
        try:
            self.prepare_sig = inspect.signature(self.original_prepare) if self.original_prepare else None
        except (TypeError, ValueError):
            self.prepare_sig = None


def _text_config(model):
    cfg = model.config
    get = getattr(cfg, "get_text_config", None)
    return get(decoder=True) if get is not None else cfg


def _tp_size(model) -> int:
    """The model's tensor-parallel size (transformers' ``model._tp_size``, else its config's record), 1 without TP."""
    return int(getattr(model, "_tp_size", None) or tp.tp_size_of(model.config))


def uncompile(model):
    """Undo `compile`: ``model.forward``, ``model.generate`` and the cache hook are the originals again."""
    _uncompile(model)
    return model


def _uncompile(model) -> None:
    """Put back what a previous `compile` replaced on `model` (instance attributes only)."""
    prev = model.__dict__.get("_qjl_compile")
    if prev is None:
        return
    for name in ("forward", "generate", _HOOK):
        model.__dict__.pop(name, None)
    for name, orig in (("forward", prev.original_forward), ("generate", prev.original_generate),
                       (_HOOK, prev.original_prepare)):
        # an original that was itself an instance attribute (a hook someone else installed) goes back
        if orig is not None and getattr(orig, "__self__", None) is not model:
            setattr(model, name, orig)
    del model.__dict__["_qjl_compile"]


def compile(model, config: Optional[QJLConfig] = None, *, max_cache_len: Optional[int] = None,
            **compile_kwargs):
    """Make ``model.generate`` use a compressed `QJLCache` and the ``qjl``-compiled decode step.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A decoder-only Llama-family model (full attention in every layer). A model sharded by
        transformers' tensor parallelism (``tp_plan=``/``distributed_config=``, under ``torchrun``) works
        as is: call this on every rank; each rank's `QJLCache` holds its own KV heads (qjl_compile/tp.py).
    config : QJLConfig, optional
        Cache configuration; default ``QJLConfig.for_model(model.config)`` (the "reference" preset).
    max_cache_len : int, optional
        Fixed cache capacity. Default: sized per generate call from the request. With it, a
        request that needs more positions raises ValueError before anything runs.
    **compile_kwargs
        ``fullgraph`` (default False), ``dynamic`` (default None), ``mode`` (default: Inductor's
        default; "reduce-overhead" for CUDA graphs), ``options`` (backend options, e.g.
        ``{"lowering": "aot_eager"}``; see qjl_compile.backend). ``backend`` may only be "qjl".

    Returns
    -------
    The same model object (modified in place), for ``model = qjl_compile.compile(model)``.
    """
    from .backend import parse_options

    bad = sorted(set(compile_kwargs) - set(_COMPILE_KEYS))
    if bad:
        raise TypeError(f"qjl_compile.compile() got unexpected argument(s) {bad}; accepted: "
                        f"config, max_cache_len, {', '.join(_COMPILE_KEYS)}")
    if compile_kwargs.get("backend", "qjl") != "qjl":
        raise ValueError(f"qjl_compile.compile() always uses backend='qjl', got {compile_kwargs['backend']!r}; "
                         "call torch.compile yourself for another backend")
    if not hasattr(model, "generate") or not hasattr(model, "config") or not isinstance(model, torch.nn.Module):
        raise TypeError(f"qjl_compile.compile() expects a transformers generative model, got {type(model).__name__}")
    cfg = _text_config(model)
    check_model_config(cfg)
    qcfg = config if config is not None else QJLConfig.for_model(cfg)
    if not isinstance(qcfg, QJLConfig):
        raise TypeError(f"config must be a QJLConfig, got {type(qcfg).__name__}")
    qcfg.check_head_dim(head_dim_of(cfg))
    tp.kv_heads_per_rank(cfg, kv_heads_of(cfg), _tp_size(model))  # under TP: whole KV heads per rank, or the fix
    if max_cache_len is not None and (not isinstance(max_cache_len, int) or max_cache_len < 1):
        raise ValueError(f"max_cache_len must be a positive int, got {max_cache_len!r}")

    mode = compile_kwargs.get("mode")
    options = compile_kwargs.get("options")
    parse_options(mode, options)  # fail now, not at the first decode step
    if mode not in (None, "default") and options:
        # torch.compile refuses mode and options together; the backend reads options["mode"]
        options = {**options, "mode": mode}
        mode = None
    tc_kwargs = dict(backend="qjl", fullgraph=bool(compile_kwargs.get("fullgraph", False)),
                     dynamic=compile_kwargs.get("dynamic"), mode=mode, options=options)

    _uncompile(model)
    state = _State(model, qcfg, max_cache_len, tc_kwargs)
    model._qjl_compile = state
    if state.original_prepare is not None:
        setattr(model, _HOOK, types.MethodType(_prepare_cache_for_generation, model))
    else:
        diagnostics.warn_once("hook-missing", _hook_missing_message())
    model.forward = _make_forward(model, state)
    model.generate = _make_generate(model, state)
    return model


def _hook_missing_message() -> str:
    import transformers
    return (f"qjl_compile.compile: transformers {transformers.__version__} has no GenerationMixin."
            f"{_HOOK}, so generate() cannot be given a QJLCache automatically and decodes with transformers' "
            f"own cache, uncompressed and without the qjl step. Fix: pass the cache yourself, "
            f"model.generate(ids, {compat.cache_kwarg()}=qjl_compile.QJLCache(model.config, max_cache_len=...)), "
            f"and report this transformers version to qjl-compile.")


# ----------------------------------------------------------------------------------------------
# model.forward: compiled step for calls over a QJLCache that holds tokens, original otherwise
# ----------------------------------------------------------------------------------------------
def _call_tokens(args, kwargs) -> Optional[int]:
    x = kwargs.get("input_ids")
    if x is None and args:
        x = args[0]
    if x is None:
        x = kwargs.get("inputs_embeds")
    return int(x.shape[1]) if isinstance(x, torch.Tensor) and x.dim() >= 2 else None


def _find_cache(args, kwargs):
    for name in compat.CACHE_NAMES:
        c = kwargs.get(name)
        if c is not None:
            return c
    # positional: forward(input_ids, attention_mask, position_ids, <cache>, ...) on Llama-family models
    return next((a for a in args[1:] if isinstance(a, QJLCache)), None)


def _make_forward(model, st: _State):
    original = st.original_forward

    @functools.wraps(original)  # keeps the signature generate() inspects (position_ids, logits_to_keep, ...)
    def forward(*args, **kwargs):
        from transformers.utils import is_torchdynamo_compiling

        cache = _find_cache(args, kwargs)
        if not isinstance(cache, QJLCache) or is_torchdynamo_compiling():
            return original(*args, **kwargs)  # not ours, or already inside someone's torch.compile
        stored = cache.host_length()
        T = _call_tokens(args, kwargs)
        if stored == 0 or T is None:
            return original(*args, **kwargs)  # the prefill stays eager, as in transformers
        cache.check_room(T)
        with diagnostics.compiled_step():
            out = st.step(*args, **kwargs)
        cache.advance_host_length(stored + T)
        st.compiled_calls += 1
        return out

    return forward


# ----------------------------------------------------------------------------------------------
# model.generate: both cache spellings; report a transformers that never called the hook
# ----------------------------------------------------------------------------------------------
def _make_generate(model, st: _State):
    original = st.original_generate

    @functools.wraps(original)
    def generate(*args, **kwargs):
        given, cache = compat.pop_cache(kwargs)
        if given:
            kwargs[compat.cache_kwarg()] = cache
        calls = st.hook_calls
        out = original(*args, **kwargs)
        if st.original_prepare is not None and st.hook_calls == calls:
            import transformers
            diagnostics.warn_once("hook-not-called", (
                f"qjl_compile.compile: transformers {transformers.__version__}'s generate() did not call "
                f"{_HOOK}, so this request ran without a QJLCache and without the qjl-compiled step. Fix: pass "
                f"{compat.cache_kwarg()}=qjl_compile.QJLCache(model.config, max_cache_len=...) to generate(), "
                f"and report this transformers version to qjl-compile."))
        return out

    return generate


# ----------------------------------------------------------------------------------------------
# transformers' _prepare_cache_for_generation, overridden on the instance
# ----------------------------------------------------------------------------------------------
def _not_compiled(key: str, what: str, fix: str) -> None:
    diagnostics.warn_once(f"generate:{key}", (
        f"qjl_compile.compile: generate() with {what} does not use the compressed cache and the qjl-compiled "
        f"decode step: it decodes eagerly and uncompressed. Fix: {fix}"))


def _prepare_cache_for_generation(self, *args, **kwargs):
    """Instance override of transformers' `_prepare_cache_for_generation` (5.17 .. 5.24: generation_config,
    model_kwargs, generation_mode, batch_size, max_cache_length; read by name, so order changes do not matter)."""
    st: _State = self._qjl_compile
    st.hook_calls += 1
    try:
        bound = st.prepare_sig.bind(*args, **kwargs).arguments
        generation_config, model_kwargs = bound["generation_config"], bound["model_kwargs"]
        batch_size, max_cache_length = bound["batch_size"], bound["max_cache_length"]
        generation_mode = bound.get("generation_mode")
    except (AttributeError, TypeError, KeyError) as e:
        import transformers
        diagnostics.warn_once("hook-signature", (
            f"qjl_compile.compile: transformers {transformers.__version__} calls {_HOOK} with arguments qjl-compile "
            f"does not know ({e}); generate() runs with transformers' own cache, uncompressed and uncompiled. Fix: "
            f"pass {compat.cache_kwarg()}=qjl_compile.QJLCache(...) yourself and report this version."))
        return st.original_prepare(*args, **kwargs)

    def original():
        return st.original_prepare(*args, **kwargs)

    assisted = str(getattr(generation_mode, "value", generation_mode)) == "assisted_generation"
    key = compat.cache_kwarg()
    user = next((model_kwargs[n] for n in compat.CACHE_NAMES if model_kwargs.get(n) is not None), None)
    cfg = _text_config(self)
    if user is not None:
        if isinstance(user, QJLCache):
            if assisted:
                raise ValueError(ASSISTED_MESSAGE)
            user.check_model(cfg)
            _own_compile(generation_config)
        else:
            name = type(user).__name__
            _not_compiled(f"cache:{name}", f"a {name} as {key}=",
                          f"pass no cache (a QJLCache is allocated per request) or {key}=qjl_compile.QJLCache(...)")
        return original()
    if generation_config.use_cache is False:
        _not_compiled("use_cache", "use_cache=False", "drop use_cache=False (the cache is what gets compressed)")
        return original()
    if generation_config.cache_implementation is not None:
        impl = generation_config.cache_implementation
        _not_compiled(f"impl:{impl}", f"cache_implementation={impl!r}",
                      "drop cache_implementation= (qjl_compile.compile allocates a QJLCache)")
        return original()
    if assisted:
        raise ValueError(ASSISTED_MESSAGE)

    needed = int(max_cache_length)
    if getattr(generation_config, "max_cache_len", None) is not None:
        needed = max(needed, int(generation_config.max_cache_len))
    if st.max_cache_len is not None:
        if needed > st.max_cache_len:
            raise ValueError(
                f"qjl_compile: this generate call needs {needed} cache positions (prompt + max_new_tokens, "
                f"max_length={generation_config.max_length}) but the model was compiled with "
                f"max_cache_len={st.max_cache_len}; lower max_new_tokens or the prompt, or call "
                f"qjl_compile.compile(model, max_cache_len={needed}) again")
        length = st.max_cache_len
    else:
        R = st.config.residual
        length = -(-needed // R) * R
    limit = getattr(cfg, "max_position_embeddings", None)
    if limit is not None and needed > limit:
        raise ValueError(f"qjl_compile: this generate call needs {needed} positions (prompt + max_new_tokens) "
                         f"but the model's max_position_embeddings is {limit}; shorten the request")
    if limit is not None and st.max_cache_len is None:
        length = min(length, max(limit, needed))
    batch = max(generation_config.num_beams, generation_config.num_return_sequences or 1) * batch_size
    dtype = self.dtype
    device = self.device
    c = st.cache
    reusable = not generation_config.return_dict_in_generate  # a returned cache belongs to the caller
    if reusable and c is not None and c.max_cache_len == length and c.storage() == (batch, dtype, device):
        c.reset()  # same storage: static addresses kept, no recompilation
    else:
        c = QJLCache(cfg, max_cache_len=length, qjl_config=st.config, batch_size=batch, device=device, dtype=dtype,
                     tp_size=_tp_size(self))  # under TP: this rank's KV heads only
        st.cache = c
    log.debug("qjl_compile: QJLCache(max_cache_len=%d, batch=%d) for a request of %d positions", length, batch, needed)
    model_kwargs[key] = c
    _own_compile(generation_config)


def _own_compile(generation_config) -> None:
    """The decode step over a QJLCache is compiled by qjl_compile (model.forward); keep transformers'
    auto-compile off for this request so the step is not compiled a second time around it."""
    if getattr(generation_config, "compile_config", None) is not None and not generation_config.disable_compile:
        diagnostics.warn_once("generate:compile_config", (
            "qjl_compile.compile: generate(compile_config=...) is ignored for a QJLCache: the decode step is "
            "compiled by qjl_compile with the arguments given to qjl_compile.compile(model, mode=..., options=...). "
            "Fix: pass those there instead."))
    generation_config.disable_compile = True
