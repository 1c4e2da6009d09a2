"""What differs between the transformers versions the project supports (5.17 up to the newest).

Read from the installed transformers itself, never from its version number:

* the cache keyword: ``past_key_values=`` up to 5.2x, ``cache=`` after (the old name is deprecated
  there with a FutureWarning). `cache_kwarg()` is the name the installed `generate` and Llama-family
  ``forward`` take; `cache_kwargs(cache)` builds ``{name: cache}`` for a call;
* where outputs keep the cache (``out.past_key_values`` -> ``out.cache``): `output_cache(out)`.

    logits = model(ids, **cache_kwargs(cache)).logits
    out = model.generate(ids, max_new_tokens=8, return_dict_in_generate=True, **cache_kwargs(cache))
    assert output_cache(out) is cache
"""
from __future__ import annotations

import functools
import inspect
from typing import Any

CACHE_NAMES = ("cache", "past_key_values")


@functools.cache
def cache_kwarg() -> str:
    """``"cache"`` or ``"past_key_values"``: the keyword the installed transformers takes the cache by.

    generate keeps the cache in ``model_kwargs`` under ``ALL_CACHE_NAMES[0]`` (the name it also
    passes to the model's forward); Llama's forward is the check where that list is missing.
    """
    try:
        from transformers.generation import utils as gen_utils
        names = getattr(gen_utils, "ALL_CACHE_NAMES", None)
        if names and names[0] in CACHE_NAMES:
            return names[0]
    except Exception:  # noqa: BLE001 - fall through to the forward signature
        pass
    from transformers import LlamaForCausalLM
    return "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


def model_cache_kwarg(model) -> str:
    """The cache keyword of ``model.forward`` (its own signature first, then the installed default)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return cache_kwarg()
    for name in CACHE_NAMES:
        if name in params:
            return name
    return cache_kwarg()


def cache_kwargs(cache, model=None) -> dict:
    """``{cache keyword: cache}`` for a ``model(...)`` or ``model.generate(...)`` call on this transformers."""
    return {model_cache_kwarg(model) if model is not None else cache_kwarg(): cache}


def output_cache(out) -> Any:
    """The cache a model output or a ``generate(return_dict_in_generate=True)`` result holds (or None)."""
    keys = out.keys() if hasattr(out, "keys") else ()
    for name in CACHE_NAMES:
        if name in keys:
            return out[name]
    return None


def pop_cache(kwargs: dict, where: str = "generate") -> tuple[bool, Any]:
    """Remove the cache from call kwargs given under either spelling; (given, cache).

    Raises TypeError when both spellings are given with different objects.
    """
    given = [n for n in CACHE_NAMES if n in kwargs]
    if not given:
        return False, None
    values = [kwargs.pop(n) for n in given]
    if len(values) == 2 and values[0] is not values[1] and values[0] is not None and values[1] is not None:
        raise TypeError(f"{where}() got both cache= and past_key_values=; pass the cache once (cache= on "
                        f"transformers that take it, past_key_values= before)")
    cache = next((v for v in values if v is not None), None)
    return True, cache


__all__ = ["cache_kwarg", "model_cache_kwarg", "cache_kwargs", "output_cache", "pop_cache", "CACHE_NAMES"]
