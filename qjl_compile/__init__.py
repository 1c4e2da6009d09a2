"""qjl-compile: KV-cache compression (QJL, DecoQuant) as a torch.compile backend.

    model = qjl_compile.compile(model)          # backend "qjl" + compressed cache in generate()
    cache = qjl_compile.QJLCache(model.config, max_cache_len=8192)
"""
import importlib.util as _ilu
import os as _os
import sys as _sys


def _map_checkout_dirs():
    # pyproject maps top-level passes/ and kernels/ to qjl_compile.passes/.kernels. A source
    # checkout imported without `pip install -e .` (or an install that failed) has no such mapping:
    # load them from the checkout so the package still imports.
    root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    for sub in ("kernels", "passes"):
        name = f"{__name__}.{sub}"
        if name in _sys.modules or _ilu.find_spec(name) is not None:
            continue
        init = _os.path.join(root, sub, "__init__.py")
        if not _os.path.exists(init):
            continue
        spec = _ilu.spec_from_file_location(name, init, submodule_search_locations=[_os.path.dirname(init)])
        mod = _ilu.module_from_spec(spec)
        _sys.modules[name] = mod
        spec.loader.exec_module(mod)
        setattr(_sys.modules[__name__], sub, mod)


_map_checkout_dirs()

from .config import QJLConfig  # noqa: E402
from .cache import QJLCache
from .backend import qjl_backend  # noqa: E402  (also registers backend "qjl" with Dynamo)
from .api import compile, uncompile  # noqa: E402,A001

__all__ = ["QJLConfig", "QJLCache", "compile", "uncompile", "qjl_backend"]
__version__ = "0.1.0"
