"""Never fall back silently: one warning per reason when the compressed cache is not compiled.

Who warns (each message says what happened, why, and the fix):
* `qjl_compile.compile`'s generate (qjl_compile/api.py): a request that will not run the
  qjl-compiled decode step (another cache, ``use_cache=False``, ``cache_implementation=``, a
  transformers that stopped calling the hook);
* the ``qjl`` backend (qjl_compile/backend.py): a graph in which attention over a `QJLCache` stays
  unfused (a pass skipped the site, a graph break between ``cache.update`` and the attention,
  an attention that is not SDPA);
* `QJLCache.update` when it runs eagerly inside the compiled decode step (Dynamo skipped it).

Warnings are `QJLFallbackWarning` (a UserWarning), issued through `warnings.warn` once per reason
key per process (and logged at debug level on ``qjl_compile``; not twice at WARNING, which would
print the same message two times). `reset()` forgets what was said (tests).
"""
from __future__ import annotations

import contextlib
import logging
import threading
import warnings

log = logging.getLogger("qjl_compile")

_said: set[str] = set()
_lock = threading.Lock()
_step = threading.local()


class QJLFallbackWarning(UserWarning):
    """The compressed cache or the compiled qjl step is not used where it was asked for."""


def warn_once(key: str, message: str, stacklevel: int = 3) -> bool:
    """Warn `message` unless `key` was warned already in this process; True if it warned now."""
    with _lock:
        if key in _said:
            return False
        _said.add(key)
    log.debug("fallback warning %s: %s", key, message)
    warnings.warn(message, QJLFallbackWarning, stacklevel=stacklevel)
    return True


def reset() -> None:
    """Forget every reason warned so far (each warns once more)."""
    with _lock:
        _said.clear()


def warned() -> frozenset[str]:
    """The reason keys warned so far."""
    with _lock:
        return frozenset(_said)


@contextlib.contextmanager
def compiled_step():
    """Mark the calls inside as the qjl-compiled decode step (see `in_compiled_step`)."""
    depth = getattr(_step, "depth", 0)
    _step.depth = depth + 1
    try:
        yield
    finally:
        _step.depth = depth


def in_compiled_step() -> bool:
    """True while `qjl_compile.compile`'s compiled decode step runs (eager code there = a fallback)."""
    return getattr(_step, "depth", 0) > 0


__all__ = ["QJLFallbackWarning", "warn_once", "reset", "warned", "compiled_step", "in_compiled_step"]
