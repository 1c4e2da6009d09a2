"""FX passes of the `qjl` backend (importable as ``qjl_compile.passes``).

Pipeline (in order, see `default_passes`):
  fuse_qjl_attention         SDPA over qjl.dequantize -> qjl.attend (fuse_attention.py)
  detect_uncompressed_cache  warn once about attention over DynamicCache/StaticCache (detect_uncompressed.py)
  grouped_sdpa               repeat_kv + SDPA over an HF StaticCache -> grouped SDPA, no K/V copy (grouped_sdpa.py)
                             (a prefill chunk: causal SDPA over the filled prefix when the cache was empty, causal_prefill.py)
"""
from .manager import (GraphPass, PassContext, PassManager, Site, default_passes, run_passes,  # noqa: F401
                      select_passes)
from .fuse_attention import FuseQJLAttention  # noqa: F401
from .detect_uncompressed import DetectUncompressedCache  # noqa: F401
from .grouped_sdpa import GroupedSDPA  # noqa: F401

__all__ = ["GraphPass", "PassContext", "PassManager", "Site", "default_passes", "run_passes", "select_passes",
           "FuseQJLAttention", "DetectUncompressedCache",
           "GroupedSDPA"]
