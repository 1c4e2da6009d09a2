"""Compressed-cache math (reference.py), torch.library ops (ops.py) and Triton kernels."""
if __name__ != "qjl_compile.kernels":
    # The checkout's kernels/ found as top-level `kernels` (its root on sys.path: PYTHONPATH, `python -m`
    # from the root). transformers imports that name for the PyPI package `kernels` (HF's kernel hub);
    # running this package under it too would register the qjl ops a second time, and whichever copy
    # registered last would serve them without the kernel constants the other built at cache creation
    # (issue 16: the compiled decode then failed under CUDA graphs). Hand the name to the real package.
    import importlib.machinery as _mach
    import importlib.util as _util
    import os as _os
    import sys as _sys

    _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _path = [p for p in _sys.path if _os.path.abspath(p or _os.getcwd()) != _root]
    _spec = _mach.PathFinder.find_spec(__name__, _path) if "." not in __name__ else None
    if _spec is not None:
        _mod = _util.module_from_spec(_spec)
        _sys.modules[__name__] = _mod
        _spec.loader.exec_module(_mod)
    else:   # no such package: an empty module without submodules (transformers 5.17's availability probe
        # imports the name and reads it as "not installed": no version); qjl-compile imports qjl_compile.kernels
        __path__ = []
else:
    from . import reference  # noqa: F401
    from . import ops  # noqa: F401  (registers torch.ops.qjl.*)
    from . import decoquant  # noqa: F401  (registers codec 1, DecoQuant)
    from . import rotation  # noqa: F401  (registers codec 2, rotation + Lloyd-Max)
