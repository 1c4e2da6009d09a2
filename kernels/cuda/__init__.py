"""CUDA C++ kernels of the compressed cache, compiled by NVRTC at first use and cached.

Why not Triton here: the decode attention has to turn packed codes into matrix-unit operands with
one or two integer operations per element, in the register layout of the MMA fragment, which
Triton does not expose (benchmarks/NOTES_kernels.md section 6). Why NVRTC and not
``torch.utils.cpp_extension``: a kernel compiles in well under a second instead of over a minute
(torch's headers), and a CPU-only install needs no CUDA toolchain: the optional packages
``cuda-bindings`` and ``nvidia-cuda-nvrtc`` (extra ``cuda``) are imported only on first use.

    available()            -> (True, "") or (False, why)
    compile_source(...)    -> cubin bytes (works without a GPU: CI compiles every kernel for sm_90)
    module(name, defines)  -> loaded kernels on the current device, built once per process
    launch(fn, grid, block, params, stream, shared=0, pdl=False)

Compiled cubins are kept under ``$QJL_CUDA_CACHE`` (default ``~/.cache/qjl_compile/cuda``), keyed
by the source, the defines, the target and the NVRTC version.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import pathlib
import threading

log = logging.getLogger(__name__)
HERE = pathlib.Path(__file__).resolve().parent
_LOCK = threading.Lock()
_MODULES: dict = {}


@functools.cache
def available() -> tuple[bool, str]:
    """Whether the NVRTC toolchain can be imported (not whether a GPU is present)."""
    try:
        from cuda.bindings import driver, nvrtc  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the install
        return False, (f"cuda-bindings is not importable ({type(e).__name__}: {e}); install the 'cuda' extra "
                       "(pip install 'qjl-compile[cuda]') for the CUDA C++ kernels")
    try:
        err, *_ = nvrtc.nvrtcVersion()
        if int(err) != 0:
            raise RuntimeError(str(err))
    except Exception as e:  # pragma: no cover
        return False, (f"NVRTC cannot be loaded ({e}); install nvidia-cuda-nvrtc matching cuda-bindings' "
                       "major version")
    return True, ""


def _check(res, what: str):
    err = res[0] if isinstance(res, tuple) else res
    if int(err) != 0:
        raise RuntimeError(f"qjl cuda: {what} failed: {err!r}")
    return res[1:] if isinstance(res, tuple) and len(res) > 1 else None


def nvrtc_version() -> tuple[int, int]:
    from cuda.bindings import nvrtc
    _, major, minor = nvrtc.nvrtcVersion()
    return int(major), int(minor)


def compile_source(name: str, defines: dict, arch: str = "sm_90") -> bytes:
    """Compile kernels/cuda/<name>.cu with ``-D`` defines for `arch`; returns the cubin.

    Raises RuntimeError with NVRTC's log on a compile error.
    """
    from cuda.bindings import nvrtc
    src = (HERE / f"{name}.cu").read_bytes()
    hdrs = _headers()
    opts = [f"--gpu-architecture={arch}", "-std=c++17", "-default-device", "--extra-device-vectorization"]
    opts += [f"-D{k}={int(v)}" for k, v in sorted(defines.items())]
    res = nvrtc.nvrtcCreateProgram(src, f"{name}.cu".encode(), len(hdrs), [h[1] for h in hdrs], [h[0] for h in hdrs])
    prog = _check(res, "nvrtcCreateProgram")[0]
    try:
        err = nvrtc.nvrtcCompileProgram(prog, len(opts), [o.encode() for o in opts])[0]
        if int(err) != 0:
            size = nvrtc.nvrtcGetProgramLogSize(prog)[1]
            buf = b" " * size
            nvrtc.nvrtcGetProgramLog(prog, buf)
            raise RuntimeError(f"qjl cuda: NVRTC failed to compile {name}.cu for {arch} with "
                               f"{defines}:\n{buf.decode(errors='replace')}")
        size = _check(nvrtc.nvrtcGetCUBINSize(prog), "nvrtcGetCUBINSize")[0]
        cubin = b" " * size
        _check(nvrtc.nvrtcGetCUBIN(prog, cubin), "nvrtcGetCUBIN")
        return cubin
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def _headers() -> list[tuple[bytes, bytes]]:
    """(include name, text) of the shared headers (kernels/cuda/*.cuh), handed to NVRTC by name."""
    return [(p.name.encode(), p.read_bytes()) for p in sorted(HERE.glob("*.cuh"))]


def _cache_path(name: str, defines: dict, arch: str) -> pathlib.Path:
    src = (HERE / f"{name}.cu").read_bytes() + b"".join(n + t for n, t in _headers())
    key = hashlib.sha256(src + repr((sorted(defines.items()), arch, nvrtc_version())).encode()).hexdigest()[:24]
    root = pathlib.Path(os.environ.get("QJL_CUDA_CACHE", pathlib.Path.home() / ".cache" / "qjl_compile" / "cuda"))
    return root / f"{name}-{arch}-{key}.cubin"


def cubin(name: str, defines: dict, arch: str) -> bytes:
    """`compile_source` through the on-disk cache."""
    path = _cache_path(name, defines, arch)
    try:
        return path.read_bytes()
    except OSError:
        pass
    data = compile_source(name, defines, arch)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as e:  # a read-only home only costs the recompile
        log.debug("qjl cuda: cannot cache %s (%s)", path, e)
    return data


def _ensure_context(device_index: int) -> None:
    from cuda.bindings import driver
    _check(driver.cuInit(0), "cuInit")
    ctx = _check(driver.cuCtxGetCurrent(), "cuCtxGetCurrent")[0]
    if int(ctx) == 0:  # torch made the primary context current on its threads; be safe elsewhere
        dev = _check(driver.cuDeviceGet(device_index), "cuDeviceGet")[0]
        ctx = _check(driver.cuDevicePrimaryCtxRetain(dev), "cuDevicePrimaryCtxRetain")[0]
        _check(driver.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")


def module(name: str, defines: dict, kernels: tuple[str, ...], device) -> dict:
    """The named kernels of kernels/cuda/<name>.cu built with `defines`, loaded on `device`."""
    import torch
    idx = device.index if device.index is not None else torch.cuda.current_device()
    key = (name, tuple(sorted(defines.items())), idx)
    hit = _MODULES.get(key)
    if hit is not None:
        return hit
    with _LOCK:
        hit = _MODULES.get(key)
        if hit is not None:
            return hit
        from cuda.bindings import driver
        major, minor = torch.cuda.get_device_capability(idx)
        arch = f"sm_{major}{minor}"
        data = cubin(name, defines, arch)
        with torch.cuda.device(idx):
            torch.cuda.current_stream()  # the runtime's primary context is current from here on
            _ensure_context(idx)
            mod = _check(driver.cuModuleLoadData(data), f"cuModuleLoadData({name})")[0]
            fns = {k: _check(driver.cuModuleGetFunction(mod, k.encode()), f"cuModuleGetFunction({k})")[0]
                   for k in kernels}
        fns["_module"] = mod
        _MODULES[key] = fns
        return fns


_DYN: dict = {}


def allow_dynamic_smem(fn, nbytes: int) -> None:
    """Let `fn` take `nbytes` of dynamic shared memory (above 48 KB needs the opt-in); once per size."""
    key = (int(fn), nbytes)
    if key in _DYN:
        return
    from cuda.bindings import driver
    _check(driver.cuFuncSetAttribute(fn, driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                     nbytes), "cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES)")
    _DYN[key] = True


PDL = os.environ.get("QJL_CUDA_PDL", "1") != "0"


@functools.cache
def pdl_supported(device_index: int) -> bool:
    """Whether kernels on this device may be launched with programmatic dependent launch (sm_90+,
    and not switched off by QJL_CUDA_PDL=0)."""
    import torch
    return PDL and torch.cuda.get_device_capability(device_index) >= (9, 0)


def sm_count(device) -> int:
    """Streaming multiprocessors of a CUDA device (cached)."""
    import torch
    idx = device.index if device.index is not None else torch.cuda.current_device()
    return _sm_count(idx)


@functools.cache
def _sm_count(idx: int) -> int:
    import torch
    return torch.cuda.get_device_properties(idx).multi_processor_count


def launch(fn, grid, block, params, stream, shared: int = 0, pdl: bool = False) -> None:
    """Launch `fn` on `stream` (a torch.cuda.Stream) with `params`: a list of ctypes values (or one
    ctypes Structure), each passed by address as the kernel's arguments in order.

    ``pdl=True``: programmatic dependent launch (Hopper): the kernel may be scheduled before the
    stream's previous kernel has finished, once every CTA of that one has executed
    ``griddepcontrol.launch_dependents``; it has to ``griddepcontrol.wait`` (decode_common.cuh
    griddep_wait) before reading that kernel's output. Only for a kernel that follows one of ours in
    the same call; the caller checks `pdl_supported`. Captured into CUDA graphs as a programmatic edge.
    """
    from cuda.bindings import driver
    ptrs = (ctypes.c_void_p * len(params))(*[ctypes.addressof(p) for p in params])
    gx, gy, gz = (tuple(grid) + (1, 1))[:3]
    bx, by, bz = (tuple(block) + (1, 1))[:3]
    hs = driver.CUstream(stream.cuda_stream)
    if not pdl:
        _check(driver.cuLaunchKernel(fn, gx, gy, gz, bx, by, bz, shared, hs, ctypes.addressof(ptrs), 0),
               "cuLaunchKernel")
        return
    key = (gx, gy, gz, bx, by, bz, shared, int(stream.cuda_stream))
    cfg = _PDL_CFG.get(key)
    if cfg is None:   # built once per launch shape and stream: no per-call driver structs in eager decode
        cfg = _PDL_CFG[key] = pdl_config((gx, gy, gz), (bx, by, bz), shared, hs)
    _check(driver.cuLaunchKernelEx(cfg, fn, ctypes.addressof(ptrs), 0), "cuLaunchKernelEx(PDL)")


_PDL_CFG: dict = {}


def pdl_config(grid, block, shared, hstream):
    """The CUlaunchConfig of a programmatic dependent launch (built without a GPU: tested on the CPU)."""
    from cuda.bindings import driver
    cfg = driver.CUlaunchConfig()
    cfg.gridDimX, cfg.gridDimY, cfg.gridDimZ = grid
    cfg.blockDimX, cfg.blockDimY, cfg.blockDimZ = block
    cfg.sharedMemBytes = shared
    cfg.hStream = hstream
    attr = driver.CUlaunchAttribute()
    attr.id = driver.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
    attr.value.programmaticStreamSerializationAllowed = 1
    cfg.attrs = [attr]
    cfg.numAttrs = 1
    return cfg
