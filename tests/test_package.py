"""The package imports from a source checkout even without its install-time directory mapping."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_imports_from_checkout_without_install():
    # drop setuptools' editable finder (what `pip install -e .` adds): passes/ and kernels/ must
    # still load as qjl_compile.passes / qjl_compile.kernels from the checkout
    code = (
        "import sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if 'Editable' not in getattr(f, '__name__', type(f).__name__)]\n"
        f"sys.path.insert(0, {ROOT!r})\n"
        "import qjl_compile, qjl_compile.kernels.triton, qjl_compile.passes\n"
        "from qjl_compile.kernels import reference\n"
        "print(qjl_compile.kernels.__file__); print(qjl_compile.passes.__file__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    files = out.stdout.split()
    assert files == [os.path.join(ROOT, "kernels", "__init__.py"), os.path.join(ROOT, "passes", "__init__.py")]


@pytest.mark.parametrize("pypi_kernels", ["as installed", "hidden"])
def test_checkout_kernels_dir_never_runs_as_top_level_kernels(pypi_kernels):
    # with the checkout root on sys.path, `import kernels` (transformers does it for the PyPI package, HF's
    # kernel hub) found kernels/ and ran it a second time: the qjl ops registered twice, and the copy that
    # registered last served them without the kernel constants the other one built at cache creation
    hide = ("import importlib.machinery as m\n_f = m.PathFinder.find_spec.__func__\n"   # as if not installed
            "m.PathFinder.find_spec = classmethod(lambda c, n, p=None, t=None: None if n == 'kernels' and p is not None "
            "else _f(c, n, p, t))\n") if pypi_kernels == "hidden" else ""
    code = (
        "import importlib.util, sys\n" + hide +
        f"sys.path.insert(0, {ROOT!r})\n"
        "import qjl_compile\n"
        "try:\n"
        "    import kernels\n"
        "    print('imported', kernels.__file__, hasattr(kernels, 'ops'), hasattr(kernels, 'reference'))\n"
        "    import kernels.ops\n"
        "except ImportError as e:\n"
        "    print('no submodule', type(e).__name__)\n"
        f"print('copies', sorted(n for n, m in list(sys.modules.items()) if not n.startswith('qjl_compile.') and "
        f"(getattr(m, '__file__', None) or '').startswith({os.path.join(ROOT, 'kernels', '')!r}) and n != 'kernels'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert lines[-1] == "copies []", out.stdout
    assert lines[0].startswith("imported"), out.stdout
    if lines[0].split()[1].startswith(os.path.join(ROOT, "kernels")):   # no PyPI `kernels`: an empty module
        assert lines[0].split()[2:] == ["False", "False"] and lines[1] == "no submodule ModuleNotFoundError", out.stdout
    else:
        assert pypi_kernels == "as installed", out.stdout   # the PyPI package, installed, is the one imported
