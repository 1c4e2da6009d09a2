"""Compile the Triton kernels for an H100 (sm_90) on a machine without a GPU.

The launchers run unchanged on CPU tensors; every kernel launch is turned into a compile for
``cuda:90`` (ptxas from the triton wheel) and nothing is executed. What comes back per launch:
shared memory (Triton's allocation, what `OutOfResources` checks at load time), registers and
stack from the cubin, and the instruction mix of the kernel's largest loop from its SASS.

This is how the shared-memory failures of the rotation append at D=128 (fp32 tokens, the
unbiased option) were found and fixed without a GPU; `test_sm90_resources.py` keeps them fixed.

    with sm90.Offline() as off:
        rotation_append_(state, consts, k, v, meta)      # CPU tensors: compiled, not run
    off.launches[-1].shared, off.launches[-1].regs

Relies on Triton internals (the CUDA driver class, ``JITFunction.run``); `Offline` raises
`Unavailable` where they differ, and tests skip on that.
"""
from __future__ import annotations

import collections
import dataclasses
import os
import re
import subprocess
import tempfile

H100_SMEM = 232448          # bytes of shared memory per block on sm_90 (cudaDevAttrMaxSharedMemoryPerBlockOptin)


class Unavailable(RuntimeError):
    pass


@dataclasses.dataclass
class Launch:
    name: str
    shared: int
    regs: int
    stack: int
    sass: str

    def loop_mix(self, top=12):
        """(instructions, Counter of opcodes) of the largest loop (backward branch) in the SASS."""
        ins = [(int(m.group(1), 16), m.group(2).strip())
               for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+(.*?);", self.sass)]
        best = (0, 0, 0)
        for a, t in ins:
            m = re.search(r"BRA\b.*?0x([0-9a-f]+)", t)
            if m and int(m.group(1), 16) < a:
                best = max(best, (a - int(m.group(1), 16), int(m.group(1), 16), a))
        body = [t for a, t in ins if best[1] <= a <= best[2]]
        ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0] for t in body)
        return len(body), ops.most_common(top)


def _tool(name):
    import triton
    p = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(p):
        raise Unavailable(f"{name} not in the triton wheel")
    return p


class Offline:
    """Context manager: kernel launches compile for sm_90 and are recorded in `launches`."""

    def __init__(self, arch: int = 90):
        self.arch = arch
        self.launches: list[Launch] = []

    def __enter__(self):
        if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
            raise Unavailable("TRITON_INTERPRET is set: kernels were built as interpreted functions")
        try:
            import torch
            import triton.runtime.jit as jit
            from triton.backends.compiler import GPUTarget
            from triton.backends.nvidia.driver import CudaDriver
            from triton.runtime import driver
        except ImportError as e:                                  # other triton layouts
            raise Unavailable(str(e)) from e
        target = GPUTarget("cuda", self.arch, 32)

        class _Driver(CudaDriver):
            def __init__(self):                                   # no libcuda: nothing to load
                pass

            def get_current_target(self):
                return target

            def get_current_device(self):
                return 0

            def get_current_stream(self, device=None):
                return 0

            def get_device_interface(self):
                return torch.cuda

            def get_active_torch_device(self):
                return torch.device("cpu")

            @staticmethod
            def is_active():
                return True

        self._jit, self._driver = jit, driver
        self._run = jit.JITFunction.run
        self._prev = getattr(driver, "_active", None)
        cuobjdump = _tool("cuobjdump")
        launches = self.launches
        run0 = self._run

        def run(fn, *args, grid, warmup, **kw):
            k = run0(fn, *args, grid=grid, warmup=True, **kw)
            with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                f.write(k.asm["cubin"])
                f.flush()
                res = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True,
                                     text=True).stdout
                sass = subprocess.run([cuobjdump, "-sass", f.name], capture_output=True, text=True).stdout
            reg = re.search(r"REG:(\d+)", res)
            stack = re.search(r"STACK:(\d+)", res)
            launches.append(Launch(fn.fn.__name__, int(k.metadata.shared), int(reg.group(1)) if reg else -1,
                                   int(stack.group(1)) if stack else -1, sass))
            return k

        try:
            driver.set_active(_Driver())
        except Exception as e:
            raise Unavailable(f"cannot install the offline driver: {e}") from e
        jit.JITFunction.run = run
        self._patched = []
        from qjl_compile.kernels.triton import decoquant, qjl_append, qjl_attend, rotation
        for m in (qjl_attend, qjl_append, rotation, decoquant):   # the launchers insist on CUDA tensors
            if hasattr(m, "check_device"):
                self._patched.append((m, m.check_device))
                m.check_device = lambda *a, **k: None
        return self

    def __exit__(self, *exc):
        self._jit.JITFunction.run = self._run
        self._driver._active = self._prev
        for m, f in self._patched:
            m.check_device = f
        return False
