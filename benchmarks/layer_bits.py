#!/usr/bin/env python
"""Per-layer key/value bit schedules for the rotation codec, from tune windows only (issue 17).

    python benchmarks/layer_bits.py --budget 3.5          # SmolLM2-135M, 2 pydoc + 2 pysrc tune windows

For every window (W tokens from the *tune* half of each text kind, `evaluate.split_ids`), one exact
forward records each layer's post-RoPE queries, keys and values. Per layer and bit width b in
{2, 3, 4}, the first P positions are coded with the rotation codec (reference, kernels/rotation.py:
the preset's scale, key centering and sinks), keys alone at b bits (values exact) and values alone at b
bits (keys exact); the score is the relative error of that layer's attention output for the queries
[P, W): ||o_hat - o||^2 / ||o||^2. Errors are averaged over the windows. A greedy allocation then
starts from K3/V3 and repeatedly takes the upgrade (one layer's keys or values +1 bit) with the largest
error drop, paying for it, once the budget is reached, with the cheapest downgrade (-1 bit, >= 2 bits)
when that costs less than 0.7 x the upgrade gains. Bits per value = (mean K bits + 16/D + 16/R + mean V
bits + 16/D) / 2, as `QJLCache.memory()` counts them. Layers are treated independently (errors that
propagate through later layers are not modelled): the schedule is a candidate, scored afterwards by
`benchmarks/accuracy.py` on tune windows and reported on held-out windows.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from qjl_compile import evaluate as ev  # noqa: E402
from qjl_compile import models  # noqa: E402
from qjl_compile.kernels import reference as ref  # noqa: E402
from qjl_compile.kernels import rotation as rot  # noqa: E402

BITS = (2, 3, 4)


def record_qkv(model, ids):
    """{layer: (q (Hq, W, D), k (H, W, D), v (H, W, D))} of one exact forward over ids (1, W)."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    rec = {}

    def hook(module, q, k, v, mask, **kw):
        rec[module.layer_idx] = (q[0].float(), k[0].float(), v[0].float())
        return sdpa_attention_forward(module, q, k, v, mask, **kw)

    AttentionInterface.register("qjl_record", hook)
    old = model.config._attn_implementation
    model.config._attn_implementation = "qjl_record"
    try:
        with torch.inference_mode():
            model(ids)
    finally:
        model.config._attn_implementation = old
    return rec


def attention(q, k, v, P, s_comp=None):
    """Causal attention output of queries [P, W) over keys [0, W), GQA by repeat; (Hq, W-P, D).
    ``s_comp``: (Hq, W-P, P) estimated raw scores q . k of the first P keys (a codec that scores without
    decompressing, QJL) in place of the exact ones."""
    G = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(G, 0), v.repeat_interleave(G, 0)
    s = q[:, P:] @ k.transpose(-1, -2)
    if s_comp is not None:
        s = torch.cat([s_comp.float(), s[..., P:]], -1)
    s = s / math.sqrt(q.shape[-1])
    pos = torch.arange(k.shape[1])
    s = s.masked_fill(pos[None] > torch.arange(P, k.shape[1])[:, None], float("-inf"))
    return torch.softmax(s, -1) @ v


def layer_errors(rec, P, R, scale, sink, seed):
    """{("k"|"v", b): (layers,) relative attention-output error with only keys / values coded at b bits}."""
    codec = ref.CODECS[2]
    out = {(w, b): [] for w in "kv" for b in BITS}
    for L in sorted(rec):
        q, k, v = rec[L]
        D = k.shape[-1]
        o = attention(q, k, v, P)
        for b in BITS:
            consts = rot.make_consts(D, b, b, False, seed, L)
            params = [b, b, 0, rot.SCALE_MODES[scale], sink, 1, R]      # key centering, as the presets
            bufs = codec.compress(k[None, :, :P], v[None, :, :P], consts, params)
            # a head-only buffer (sinks) keeps only its first rows, as reference.append_ stores it
            bufs = [x[:, :, : s.head // s.per] if s.head else x for x, s in zip(bufs, codec.specs(D, consts, params))]
            kh, vh = (x[0] for x in codec.decompress(bufs, consts, params))
            for w, kk, vv in (("k", torch.cat([kh, k[:, P:]], 1), v), ("v", k, torch.cat([vh, v[:, P:]], 1))):
                oh = attention(q, kk, vv, P)
                out[(w, b)].append(((oh - o).pow(2).sum() / o.pow(2).sum()).item())
    return {key: torch.tensor(x) for key, x in out.items()}


QJL_M = (128, 256, 512, 768, 1024)   # key sketch rows per layer, x head_dim / 128 (SmolLM2: 64 .. 512 = 1 .. 8 bits)


def qjl_layer_errors(rec, P, R, qcfg, seed):
    """{("k", m): (layers,) relative attention-output error with only the keys QJL-coded with m sketch
    rows (`qcfg`'s outliers, outlier sketch and centering; values exact)}."""
    codec = ref.CODECS[0]
    out = {}
    for L in sorted(rec):
        q, k, v = rec[L]
        D = k.shape[-1]
        o = attention(q, k, v, P)
        _, mo = qcfg.sketch_dims(L)
        So = ref.sketch(D, mo, seed, 2 * L + 1)
        params = [qcfg.outliers, 8, D] + ([R] if qcfg.qjl_center else [])
        if qcfg.qjl_exact_outliers:           # as QJLCache builds them (qjl_compile/cache.py _codec_setup)
            params = params[:3] + [R if qcfg.qjl_center else 0, 1]
        for m in qjl_ms(D):
            S = ref.sketch(D, m, seed, 2 * L)
            bufs = codec.compress(k[None, :, :P], v[None, :, :P], [S, So], params)
            s_c = codec.scores(q[None, :, P:], [b.repeat_interleave(q.shape[0] // k.shape[0], 1) for b in bufs],
                               [S, So], params)[0]                            # (Hq, W-P, P)
            oh = attention(q, k, v, P, s_c)
            out.setdefault(("k", m), []).append(((oh - o).pow(2).sum() / o.pow(2).sum()).item())
    return {key: torch.tensor(x) for key, x in out.items()}


def qjl_ms(D):
    return tuple(m * D // 128 for m in QJL_M)


def allocate_m(E, budget_m, D):
    """Sketch rows per layer with mean <= budget_m: start every layer at the smallest size, then
    repeatedly take the move (one layer to any larger size) with the largest error drop per added row
    that fits (any larger size, not only the next: a single window's error is not monotone in m);
    -> (ms, mean error)."""
    ms_all = qjl_ms(D)
    n = len(E[("k", ms_all[0])])
    ms = [ms_all[0]] * n
    while True:
        ups = [((E[("k", ms[i])][i] - E[("k", m)][i]).item() / (m - ms[i]), i, m)
               for i in range(n) for m in ms_all
               if m > ms[i] and (sum(ms) - ms[i] + m) / n <= budget_m + 1e-9]
        ups = [u for u in ups if u[0] > 0]
        if not ups:
            break
        _, i, m = max(ups)
        ms[i] = m
    return ms, sum(E[("k", ms[i])][i].item() for i in range(n)) / n


def allocate(E, budget, D, R):
    """Greedy K/V bits per layer under `budget` bits/value (module docstring); -> (kb, vb, rate, err)."""
    n = len(E[("k", 3)])
    kb, vb = [3] * n, [3] * n
    arr = {"k": kb, "v": vb}

    def rate():
        return (sum(kb) / n + 16 / D + 16 / R + sum(vb) / n + 16 / D) / 2

    def err():
        return sum(E[(w, arr[w][i])][i].item() for w in "kv" for i in range(n)) / n

    while True:
        ups = [((E[(w, arr[w][i])][i] - E[(w, arr[w][i] + 1)][i]).item(), w, i)
               for w in "kv" for i in range(n) if arr[w][i] < BITS[-1]]
        if not ups:
            break
        gain, w, i = max(ups)
        arr[w][i] += 1
        if rate() <= budget + 1e-9:
            continue
        arr[w][i] -= 1
        downs = [((E[(w2, arr[w2][j] - 1)][j] - E[(w2, arr[w2][j])][j]).item(), w2, j)
                 for w2 in "kv" for j in range(n) if arr[w2][j] > BITS[0] and (w2, j) != (w, i)]
        if not downs:
            break
        cost, w2, j = min(downs)
        if cost >= 0.7 * gain:
            break
        arr[w2][j] -= 1
        arr[w][i] += 1
        if rate() > budget + 1e-9:
            arr[w][i] -= 1
            arr[w2][j] += 1
            break
    return kb, vb, rate(), err()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget", type=float, default=3.5, help="bits per value (K+V)/2, side data counted")
    ap.add_argument("--kinds", default="pydoc,pysrc")
    ap.add_argument("--window", type=int, default=2048)
    ap.add_argument("--n-windows", type=int, default=2, help="tune windows per kind (evaluate.make_windows)")
    ap.add_argument("--prefill-frac", type=float, default=0.75)
    ap.add_argument("--residual", type=int, default=128)
    ap.add_argument("--scale", default="match", choices=sorted(rot.SCALE_MODES))
    ap.add_argument("--sink", type=int, default=4)
    ap.add_argument("--seed", type=int, default=42, help="QJLConfig.seed (the per-layer rotations)")
    ap.add_argument("--codec", choices=("rotation", "qjl"), default="rotation",
                    help="qjl: per-layer key sketch rows (--qjl-preset's outliers and centering), budget "
                         "--budget-m mean rows (x head_dim / 128)")
    ap.add_argument("--qjl-preset", default="m512-center-o4x")
    ap.add_argument("--budget-m", type=int, default=512, help="qjl: mean key sketch rows at head_dim 128")
    ap.add_argument("--from-log", default=None, help="qjl: allocate from the per-layer error lines an earlier run "
                    "printed (\"m=... per layer: ...\"), no model run; --head-dim gives their head_dim")
    ap.add_argument("--head-dim", type=int, default=64)
    a = ap.parse_args(argv)
    if a.from_log:
        import re
        E = {}
        with open(a.from_log) as f:
            for line in f:
                m = re.match(r"m=(\d+) per layer: (.*) \(x1e-3\)", line)
                if m:
                    E[("k", int(m.group(1)))] = torch.tensor([float(x) * 1e-3 for x in m.group(2).split()])
        if not E:
            ap.error(f"--from-log {a.from_log}: no 'm=... per layer' lines")
        ms, err = allocate_m(E, a.budget_m * a.head_dim // 128, a.head_dim)
        print(f"schedule mean {sum(ms) / len(ms):.1f} rows at head_dim {a.head_dim}, mean layer error {err:.6f}")
        print(f"qjl_layer_sketch_dims={tuple(ms)}  # at head_dim {a.head_dim}; "
              f"{tuple(m * 128 // a.head_dim for m in ms)} for head_dim 128")
        return 0
    model, tok = models.load_model(None)
    P = int(a.window * a.prefill_frac)
    if a.codec == "qjl":
        from qjl_compile import QJLConfig
        qcfg = QJLConfig.preset(a.qjl_preset, head_dim=model.config.head_dim,
                                num_layers=model.config.num_hidden_layers)
    errs = []
    for kind in a.kinds.split(","):
        text = models.pydoc_text() if kind == "pydoc" else ev.stdlib_source_text(1_200_000)[0]
        ids = torch.tensor(tok.encode(text, add_special_tokens=False))
        for w in ev.make_windows(ev.split_ids(ids, "tune"), a.window, a.n_windows):
            if a.codec == "qjl":
                errs.append(qjl_layer_errors(record_qkv(model, w), P, a.residual, qcfg, a.seed))
                print(f"[layer_bits] {kind} window {len(errs)}: " + " ".join(
                    f"m{k[1]} {x.mean():.5f}" for k, x in sorted(errs[-1].items())), file=sys.stderr)
                continue
            errs.append(layer_errors(record_qkv(model, w), P, a.residual, a.scale, a.sink, a.seed))
            print(f"[layer_bits] {kind} window {len(errs)}: K3 {errs[-1][('k', 3)].mean():.5f} "
                  f"V3 {errs[-1][('v', 3)].mean():.5f}", file=sys.stderr)
    E = {key: torch.stack([e[key] for e in errs]).mean(0) for key in errs[0]}
    D = model.config.head_dim
    if a.codec == "qjl":
        for key in sorted(E):
            print(f"m={key[1]} per layer:", " ".join(f"{x * 1e3:.2f}" for x in E[key].tolist()), "(x1e-3)")
        bm = a.budget_m * D // 128
        ms, err = allocate_m(E, bm, D)
        base = E[("k", bm)].mean().item() if ("k", bm) in E else float("nan")
        print(f"mean rows {bm}: schedule mean {sum(ms) / len(ms):.1f}, mean layer error {err:.6f} "
              f"(every layer at {bm}: {base:.6f})")
        print(f"qjl_layer_sketch_dims={tuple(m * 128 // D for m in ms)}  # for head_dim 128 (QJLConfig.preset scales it)")
        return 0
    for key in sorted(E):
        print(f"{key[0]}{key[1]} per layer:", " ".join(f"{x * 1e3:.2f}" for x in E[key].tolist()), "(x1e-3)")
    kb, vb, rate, err = allocate(E, a.budget, D, a.residual)
    print(f"budget {a.budget}: rate {rate:.4f} bits/value, mean layer error {err:.6f} "
          f"(K3/V3 {(E[('k', 3)] + E[('v', 3)]).mean():.6f})")
    print(f"rotation_layer_key_bits={tuple(kb)}\nrotation_layer_value_bits={tuple(vb)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
