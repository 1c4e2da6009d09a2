"""Where a decode step's GPU time goes: top CUDA kernels of one mode's compiled decode step.

    python benchmarks/profile_step.py --layers 4 --prompt 131072 --modes inductor qjl

Builds the e2e benchmark's model and cache (benchmarks/e2e.py), fills the cache with random K/V
(no prefill), warms the step up (compile, CUDA-graph recording) and profiles a few steps
with torch.profiler. CUDA only.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import e2e  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=131072)
    ap.add_argument("--modes", nargs="+", default=["inductor", "qjl"])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--top", type=int, default=12)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("profile_step.py needs CUDA")
    args = e2e.parse_args(["--layers", str(a.layers), "--new-tokens", "16"])
    model, desc = e2e.build_model(args, "cuda", torch.bfloat16)
    print(desc, f"B={a.batch} prompt={a.prompt}")
    for key in a.modes:
        mode = e2e.mode_table("cuda", args)[key]
        e2e.reset_compiled()
        cache = e2e.make_cache(mode, model, a.batch, e2e.capacity(a.prompt, 16))
        with torch.no_grad():
            e2e.fill_cache(mode, cache, model, a.batch, a.prompt, random=True, chunk=4096)
            fn = e2e.compile_fn(model, mode, "decode")
            tok = torch.ones(a.batch, 1, dtype=torch.long, device="cuda")

            def step():
                if mode.cudagraphs:
                    torch.compiler.cudagraph_mark_step_begin()
                return e2e.forward(fn, tok, cache).logits[:, -1:].argmax(-1)

            for _ in range(3):
                step()
            torch.cuda.synchronize()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                    torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(a.steps):
                    step()
                torch.cuda.synchronize()
        print(f"\n== {mode.label}: {a.steps} steps")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=a.top, max_name_column_width=70))
        del cache, fn
        e2e.cleanup("cuda")


if __name__ == "__main__":
    main()
