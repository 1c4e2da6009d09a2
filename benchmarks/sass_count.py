"""Instruction mix of the CUDA C++ decode kernels' hot loop, offline (no GPU): compile for sm_90 with
NVRTC, disassemble with the triton wheel's cuobjdump, take the largest loop closed by a conditional
backward branch (an unconditional BRA back is a divergent shuffle's BRA.DIV fallback) and count its
SASS instructions per issue pipe. On Hopper an ALU-pipe instruction holds the pipe for two issue
cycles, so a loop whose ALU count exceeds half its instructions is ALU-bound in the limit
(benchmarks/NOTES_kernels.md section 11: "count before tuning").

    python benchmarks/sass_count.py                      # rotation k4v3-match split at B=1 128k
    python benchmarks/sass_count.py --config qjl-128k --fun qjl_split
    python benchmarks/sass_count.py --set MKS=1 --set NW=4 --json out.json

The loop is one 32-token group of one warp: divide by 32 for instructions per token. The count
includes the loop's rare branches (the tail mask, the softmax rescale) unless they were compiled
as forward branches out of it; `--top` lists the opcodes.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile

# the launchers' defines at the reference shapes (Llama-3-8B attention, bf16, decode, no mask):
# kernels/cuda/rot.py rotation_attend_cuda / qjl.py qjl_attend_cuda; --set overrides any entry
CONFIGS = {
    # rotation-k4v3-match past the initial layers, B=1 L=128k: 8 warps, 2 CTAs per SM (rot._config); the preset's
    # Hadamard Pi (HAD, since 2026-12-06: Pi q in the split) and the dense one it had before ("rot-128k-haar")
    "rot-128k": ("rot_decode", "rot_split", dict(D=128, KB=4, VB=3, RR=128, NW=8, QDT=1, MK=0, CAUSAL=1, CAUSAL_C=0,
                                                 CK=1, BLK=128, MINB=2, STAGES=2, NSINK=4, FMAOFF=1, VFRAG=1, PIPE=0,
                                                 FUSEQ=1, HAD=1, KI8=1, PK=1, EARLY=0, MKS=0, KST=1)),
    "rot-128k-haar": ("rot_decode", "rot_split", dict(D=128, KB=4, VB=3, RR=128, NW=8, QDT=1, MK=0, CAUSAL=1,
                                                      CAUSAL_C=0, CK=1, BLK=128, MINB=2, STAGES=2, NSINK=4, FMAOFF=1,
                                                      VFRAG=1, PIPE=0, FUSEQ=0, KI8=1, PK=1, EARLY=0, MKS=0)),
    # the same at 32k and below: 4 warps, 3 CTAs per SM
    "rot-32k": ("rot_decode", "rot_split", dict(D=128, KB=4, VB=3, RR=128, NW=4, QDT=1, MK=0, CAUSAL=1, CAUSAL_C=0,
                                                CK=1, BLK=128, MINB=3, STAGES=2, NSINK=4, FMAOFF=1, VFRAG=1, PIPE=0,
                                                FUSEQ=1, HAD=1, KI8=1, PK=1, EARLY=0, MKS=0, KST=1)),
    # the QJL reference preset past the initial layers (m=256, m_out=128, 8 outliers, 2-bit values)
    "qjl-128k": ("qjl_decode", "qjl_split", dict(D=128, MS=256, MO=128, NO=8, VB=2, VG=32, RR=128, NW=4, QDT=1, MK=0,
                                                 CAUSAL=1, CAUSAL_C=0, MINB=3, PK=1, FMAOFF=0, STAGES=3)),
}

# Hopper issue pipes of the opcodes these kernels use (unlisted opcodes count as "other")
PIPES = {
    "alu": {"PRMT", "LOP3", "LOP", "IADD3", "LEA", "SHF", "ISETP", "FSETP", "FMNMX", "IMNMX", "FSEL", "SEL", "MOV",
            "PLOP3", "SGXT", "BMSK", "ISCADD", "P2R", "R2P", "CS2R", "S2R", "VIADD", "IABS", "FLO", "POPC", "BREV",
            "F2FP"},
    "fma": {"IMAD", "IMUL", "FFMA", "FMUL", "FADD", "HFMA2", "HADD2", "HMUL2", "FSWZADD", "IDP", "IMNMX.FMA"},
    "mma": {"HMMA", "IMMA", "HGMMA", "IGMMA", "QGMMA"},
    "mem": {"LDS", "STS", "LDG", "STG", "LDSM", "LDGSTS", "LDGDEPBAR", "DEPBAR", "LD", "ST", "ATOMS", "RED", "ATOM",
            "LDC", "ULDC", "MOVM"},
    "xu": {"MUFU", "I2F", "F2I", "F2F", "I2FP", "F2IP", "FRND"},
    "sync": {"SHFL", "BAR", "WARPSYNC", "BSSY", "BSYNC", "VOTE", "MATCH", "NANOSLEEP"},
    "branch": {"BRA", "EXIT", "RET", "CALL", "JMP", "BRX", "NOP", "YIELD"},
}


def _tool(name: str) -> str:
    import triton
    p = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(p):
        raise FileNotFoundError(f"{name} is not in the triton wheel ({p}); install triton for the offline tools")
    return p


def pipe_of(op: str) -> str:
    if op.startswith("U"):          # uniform datapath (UIADD3, UMOV, ...): off the vector pipes
        return "uniform"
    return next((p for p, ops in PIPES.items() if op in ops), "other")


def loop_mix(sass: str) -> dict:
    """The largest loop closed by a conditional backward branch in one function's SASS: its
    instruction count, the count per pipe, the opcodes, and its address range."""
    ins = [(int(m.group(1), 16), m.group(2).strip())
           for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", sass)]
    best = (0, 0, 0)
    for a, t in ins:
        m = re.match(r"@!?U?P\w+\s+BRA\b.*?0x([0-9a-f]+)", t)        # predicated: a conditional branch
        if m and int(m.group(1), 16) < a:
            best = max(best, (a - int(m.group(1), 16), int(m.group(1), 16), a))
    if not best[0]:
        raise ValueError("no loop closed by a conditional backward branch in this SASS")
    body = [t for a, t in ins if best[1] <= a <= best[2]]
    ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0] for t in body)
    pipes = collections.Counter()
    for op, n in ops.items():
        pipes[pipe_of(op)] += n
    return dict(instructions=len(body), pipes=dict(pipes), opcodes=dict(ops.most_common()),
                start=hex(best[1]), end=hex(best[2]))


def count(source: str, fun: str, defines: dict, arch: str = "sm_90") -> dict:
    """Compile kernels/cuda/<source>.cu with `defines`, disassemble `fun`: `loop_mix` plus registers."""
    from qjl_compile.kernels.cuda import compile_source
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(compile_source(source, defines, arch))
        sass = subprocess.run([_tool("cuobjdump"), "-sass", "-fun", fun, path], capture_output=True, text=True,
                              check=True).stdout
        res = subprocess.run([_tool("cuobjdump"), "-res-usage", path], capture_output=True, text=True,
                             check=True).stdout
    m = re.search(rf"Function {fun}:\s+REG:(\d+) STACK:(\d+)", res)
    out = loop_mix(sass)
    out.update(source=source, fun=fun, arch=arch, defines=dict(defines),
               regs=int(m.group(1)) if m else None, stack=int(m.group(2)) if m else None)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=sorted(CONFIGS), default="rot-128k")
    ap.add_argument("--fun", default=None, help="kernel function (default: the config's split kernel)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VAL", help="override a define")
    ap.add_argument("--top", type=int, default=16, help="opcodes to list")
    ap.add_argument("--json", default=None, help="also write the result here")
    args = ap.parse_args(argv)
    source, fun, defines = CONFIGS[args.config]
    defines = dict(defines)
    for kv in args.set:
        k, _, v = kv.partition("=")
        if not k or not v.lstrip("-").isdigit():
            ap.error(f"--set {kv!r}: expected KEY=INT, e.g. --set NW=4")
        defines[k] = int(v)
    r = count(source, args.fun or fun, defines)
    n, p = r["instructions"], r["pipes"]
    print(f"{source}.cu {r['fun']} (sm_90, {r['regs']} registers, stack {r['stack']}): hot loop {n} instructions "
          f"per warp and 32-token group = {n / 32:.1f} per token; {r['start']}..{r['end']}")
    print("  pipes: " + ", ".join(f"{k} {v} ({100 * v / n:.0f}%)" for k, v in sorted(p.items(), key=lambda x: -x[1])))
    alu = p.get("alu", 0)
    print(f"  ALU-bound floor: {2 * alu} issue cycles a group ({'ALU-bound' if 2 * alu > n else 'issue-bound'}: "
          f"{n} instructions)")
    print("  opcodes: " + ", ".join(f"{k} {v}" for k, v in list(r["opcodes"].items())[:args.top]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
