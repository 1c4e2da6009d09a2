"""Decode attention of the fp16 peers on their own: one layer of the Llama-3-8B shape (32 q / 8 kv heads,
d=128, bf16), one query token, a static cache of capacity L holding n tokens under HF's static-cache
mask (B, 1, 1, L). What each form costs, and which SDPA kernel torch picks for it:

  hf-repeat   HF: K/V repeated per query head (a copy), SDPA with the mask       (Inductor + HF StaticCache)
  gqa         SDPA(q, K, V, mask, enable_gqa=True)                               (grouped_sdpa pass, "gqa")
  rows        the G query heads of a kv head as G query rows, SDPA with the mask (grouped_sdpa pass, "rows")
  flash-n     SDPA over the n stored tokens only, no mask, enable_gqa: what a length-aware kernel
              reads (not reachable from a static-shape mask; a reference, not a mode; torch picks its
              kernel, cuDNN on the H200 with torch 2.11, despite the name)

Median of CUDA-graph replays (benchmarks/timer.py), L2 flushed. ``--out`` writes JSON.

    python benchmarks/e2e_attention.py --shapes 1x131072 16x32768 --out e2e-attention.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from e2e_run import bench, env_header  # noqa: E402

HQ, HKV, D = 32, 8, 128
BACKENDS = {0: "math", 1: "flash", 2: "efficient", 3: "cudnn", 4: "overrideable"}


def forms(B: int, L: int, n: int, dtype=torch.bfloat16):
    """{name: (fn, args for _fused_sdp_choice)} over one filled cache."""
    G = HQ // HKV
    q = torch.randn(B, HQ, 1, D, device="cuda", dtype=dtype)
    k = torch.randn(B, HKV, L, D, device="cuda", dtype=dtype)
    v = torch.randn_like(k)
    mask = (torch.arange(L, device="cuda") < n).expand(B, 1, 1, L)

    def rep(x):
        return x[:, :, None].expand(B, HKV, G, L, D).reshape(B, HQ, L, D)

    qg = q.unflatten(1, (HKV, G)).flatten(2, 3)
    kn, vn = k[:, :, :n], v[:, :, :n]
    return {
        "hf-repeat": (lambda: F.scaled_dot_product_attention(q, rep(k), rep(v), attn_mask=mask),
                      (q, rep(k), rep(v), mask, False)),
        "gqa": (lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True),
                (q, k, v, mask, True)),
        "rows": (lambda: F.scaled_dot_product_attention(q.unflatten(1, (HKV, G)).flatten(2, 3), k, v, attn_mask=mask),
                 (qg, k, v, mask, False)),
        "flash-n": (lambda: F.scaled_dot_product_attention(q, kn, vn, enable_gqa=True), (q, kn, vn, None, True)),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["1x131072", "16x32768"], help="BxN: batch x stored tokens")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    rows = []
    for s in a.shapes:
        B, n = (int(x) for x in s.split("x"))
        L = -(-(n + 129) // 256) * 256  # the e2e capacity: prompt + 128 new tokens, rounded up to 256
        kv_bytes = 2 * B * HKV * L * D * 2
        for name, (fn, ch) in forms(B, L, n).items():
            q, k, v, m, gqa = ch
            choice = int(torch._fused_sdp_choice(q, k, v, m, 0.0, False, scale=None, enable_gqa=gqa))
            try:
                ms = bench(fn, graph=True)
                err = None
            except Exception as e:  # noqa: BLE001 - a form torch cannot run here: reported, not hidden
                ms, err = None, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            rows.append(dict(B=B, n=n, L=L, form=name, backend=BACKENDS.get(choice, choice), us=ms and ms * 1e3,
                             kv_MB=kv_bytes / 1e6, GBs=ms and kv_bytes / ms / 1e6, error=err))
            r = rows[-1]
            print(f"B={B} n={n} L={L} {name:10s} {r['backend']:10s} "
                  + (f"{r['us']:9.1f} us {r['GBs']:7.0f} GB/s (cache bytes / time)" if ms else err), flush=True)
        torch.cuda.empty_cache()
    if a.out:
        with open(a.out, "w") as f:
            json.dump(dict(device=env_header(), torch=torch.__version__, rows=rows), f, indent=1)
    return rows


if __name__ == "__main__":
    main()
