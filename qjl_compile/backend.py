"""The ``qjl`` torch.compile backend: run the FX passes on Dynamo's graph, then lower it.

    torch.compile(model, backend="qjl")                                   # passes + Inductor
    torch.compile(model, backend="qjl", mode="reduce-overhead")           # + Inductor CUDA graphs
    torch.compile(model, backend="qjl", options={"lowering": "aot_eager"})  # debugging / CPU tests

torch.compile hands a string-named backend its ``mode`` and ``options`` as keyword arguments
(torch/__init__.py, ``_TorchCompileWrapper``), and refuses both at once. ``options`` holds our
keys and, for the Inductor lowering, any Inductor config (as ``torch.compile(options=...)`` would
for Inductor); ``options["mode"]`` is accepted too, so a mode can travel with options:

    lowering : "inductor" (default) | "aot_eager" | "eager"
    passes   : list of pass names to run (default: all, see qjl_compile.passes)
    mode     : an Inductor mode ("default", "reduce-overhead", "max-autotune", ...)
    anything else : an Inductor config key (e.g. "triton.cudagraphs": True), Inductor lowering only

The backend is registered under the ``torch_dynamo_backends`` entry point (works without importing
this package first) and, on import of qjl_compile, directly in Dynamo's registry.
"""
from __future__ import annotations

import itertools
import logging
from typing import Any, Optional

import torch
from torch import fx

from .passes import run_passes
from .passes.manager import Observer

log = logging.getLogger("qjl_compile.backend")

LOWERINGS = ("inductor", "aot_eager", "eager")
_OWN_KEYS = ("lowering", "passes", "mode")
_graph_ids = itertools.count()


def parse_options(mode: Optional[str] = None, options: Optional[dict] = None) -> dict:
    """Validate and split backend arguments.

    Returns ``{"lowering", "passes", "mode", "inductor"}`` where "inductor" is the dict of
    Inductor config patches (mode's patches first, then explicit options). Raises ValueError
    with the allowed values on anything unknown.
    """
    opts = dict(options or {})
    if options is not None and not isinstance(options, dict):
        raise ValueError(f"qjl backend: options must be a dict, got {type(options).__name__}")
    lowering = opts.pop("lowering", "inductor")
    if lowering not in LOWERINGS:
        raise ValueError(f"qjl backend: options['lowering']={lowering!r} is invalid: choose one of {LOWERINGS}")
    passes = opts.pop("passes", None)
    if passes is not None:
        from .passes import select_passes
        select_passes(list(passes))  # raises on unknown names
        passes = list(passes)
    omode = opts.pop("mode", None)
    if omode is not None and mode not in (None, "default") and omode != mode:
        raise ValueError(f"qjl backend: mode={mode!r} and options['mode']={omode!r} disagree")
    mode = omode or mode
    patches: dict[str, Any] = {}
    if mode not in (None, "default"):
        from torch._inductor import list_mode_options
        known = list(list_mode_options().keys())
        if mode not in known:
            raise ValueError(f"qjl backend: unknown mode {mode!r}: choose one of {known}")
        if lowering == "inductor":
            patches.update(list_mode_options(mode, None))
        else:
            log.info("qjl backend: mode=%r only applies to the Inductor lowering; ignored with lowering=%r",
                     mode, lowering)
    if opts:
        if lowering != "inductor":
            raise ValueError(f"qjl backend: options {sorted(opts)} are Inductor config keys, which need "
                             f"lowering='inductor' (got {lowering!r}); our own keys are {_OWN_KEYS}")
        from torch._inductor import config as inductor_config
        current = inductor_config.get_config_copy()
        for k, v in opts.items():
            name = k.replace("-", "_")
            if name not in current:
                raise ValueError(f"qjl backend: unknown option {k!r}: not one of {_OWN_KEYS} nor an Inductor "
                                 f"config key (see torch._inductor.config)")
            patches[name] = v
    return {"lowering": lowering, "passes": passes, "mode": mode, "inductor": patches}


def qjl_backend(gm: fx.GraphModule, example_inputs, mode: Optional[str] = None, options: Optional[dict] = None,
                observer: Optional[Observer] = None, **kwargs):
    """Dynamo backend: rewrite attention over the QJL cache into ``qjl::attend``, then lower.

    Parameters
    ----------
    gm, example_inputs
        What Dynamo hands a backend.
    mode, options
        As passed by ``torch.compile(..., mode=..., options=...)``; see the module docstring.
    observer
        Optional ``observer(stage, gm, ctx)`` called before the passes and after each one
        (used by ``qjl-compile inspect``).
    """
    if kwargs:
        log.debug("qjl backend: ignoring extra backend arguments %s", sorted(kwargs))
    p = parse_options(mode, options)
    name = f"graph{next(_graph_ids)}"
    ctx = run_passes(gm, p["passes"], graph_name=name, observer=observer)
    log.debug("qjl backend: %s sites %s", name, list(ctx.sites.values()))
    report_unfused(gm, ctx)
    lowering = p["lowering"]
    if lowering == "eager":
        return gm.forward
    if lowering == "aot_eager":
        from torch._dynamo.backends.registry import lookup_backend
        return lookup_backend("aot_eager")(gm, example_inputs)
    from torch._inductor.compile_fx import compile_fx
    return compile_fx(gm, example_inputs, config_patches=p["inductor"] or None)


# reason prefix (as the fusion pass records it) -> the fix to name
_FIXES = (
    ("no mask over the full static length", "let transformers build the static-length mask (pass attention_mask, "
                                            "or use generate / qjl_compile.compile)"),
    ("dropout_p", "call model.eval() (the fused op has no dropout)"),
    ("both attn_mask and is_causal", "pass either an attention mask or is_causal, not both"),
)


def _fix_for(reason: str) -> str:
    for prefix, fix in _FIXES:
        if reason.startswith(prefix):
            return fix
    return ("use attn_implementation='sdpa' with a standard Llama-family attention; if it is one, report the "
            "graph (qjl-compile inspect) to qjl-compile")


def report_unfused(gm: fx.GraphModule, ctx) -> int:
    """Warn once per reason if attention over a QJLCache stays unfused in `gm` after the passes.

    Two signs: a site fed by ``qjl.dequantize`` that the fusion pass left unchanged (its reason is
    recorded), and a ``qjl.dequantize`` still in the graph whose K/V feed no SDPA (they leave the
    graph at a graph break, or feed an attention that is not SDPA, e.g. attn_implementation='eager').
    Either way that attention runs over full-precision dequantized K/V: correct, not compiled to
    ``qjl.attend``. Returns the number of such sites/nodes; counter ``qjl/unfused``.
    """
    from .diagnostics import warn_once
    from .passes.fx_utils import is_qjl_op, layer_of, score_features
    from .passes.manager import bump

    found = []
    explained = set()
    for site in ctx.sites.values():
        if site.source:
            explained.add(site.source)  # fused (dequantize erased or kept for another user) or skipped with a reason
            if not site.became.startswith("qjl.attend"):
                found.append((site.layer, site.reason or "left unchanged by the fusion pass", _fix_for(site.reason)))
    for n in gm.graph.nodes:
        if is_qjl_op(n, "dequantize") and n.name not in explained:
            # K/V that reach no attention the fusion pass looked at
            feats = score_features(n)
            if "softcap" in feats:
                found.append((layer_of(n), SOFTCAP, SOFTCAP_FIX))
            elif "sinks" in feats:
                found.append((layer_of(n), SINKS, SINKS_FIX))
            elif feats:
                found.append((layer_of(n), EAGER, "use attn_implementation='sdpa'"))
            else:
                found.append((layer_of(n), UNSEEN, "use attn_implementation='sdpa' and remove graph breaks around "
                                                   "the attention (TORCH_LOGS=graph_breaks shows them)"))
    if not found:
        return 0
    bump("unfused", len(found))
    for layer, reason, fix in dict.fromkeys(found):
        where = f"layer {layer}" if layer is not None else "a layer"
        warn_once(f"backend:{reason}", (
            f"qjl backend: attention over a QJLCache is not fused ({ctx.graph_name}, {where}): {reason}. It runs "
            f"over dequantized full-precision K/V (correct, but not the compiled qjl.attend). Fix: {fix}."),
            stacklevel=2)
    return len(found)


UNSEEN = ("the dequantized K/V reach no scaled_dot_product_attention the fusion pass recognises: they leave the "
          "graph (a graph break between QJLCache.update and the attention), feed an attention that is not SDPA "
          "(attn_implementation='eager'), or pass through ops other than HF's repeat_kv")


SOFTCAP = ("the attention applies logit soft-capping (tanh on the scores, e.g. Gemma 2's attn_logit_softcapping), "
           "which qjl.attend does not implement, so the site is not rewritten")
SOFTCAP_FIX = ("none needed for correctness; for the fused op use a model config with attn_logit_softcapping=None "
               "and attn_implementation='sdpa'")
SINKS = ("the attention adds sink logits to the scores (gpt-oss style attention sinks), which qjl.attend does not "
         "implement, so the site is not rewritten")
SINKS_FIX = "none needed for correctness; qjl-compile has no fused attention with sinks yet"
EAGER = ("the dequantized K/V feed an attention that is not SDPA: an eager matmul + softmax "
         "(attn_implementation='eager')")


def _register() -> None:
    """Put ``qjl`` in Dynamo's registry on import, unless the entry point is being loaded right now
    (then torch registers it itself, and registering twice would assert)."""
    from importlib.metadata import EntryPoint

    from torch._dynamo.backends import registry

    if "qjl" in registry._COMPILER_FNS or isinstance(registry._BACKENDS.get("qjl"), EntryPoint):
        return
    registry.register_backend(qjl_backend, name="qjl")


try:
    _register()
except Exception as e:  # pragma: no cover - registry internals moved; the entry point still works
    log.debug("qjl backend: direct registration failed (%s); relying on the entry point", e)
