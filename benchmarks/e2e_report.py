"""e2e benchmark, part 3: the report (header with device and versions, markdown tables, targets,
plots). See benchmarks/e2e.py for the command line."""
from __future__ import annotations

import os
import platform
import sys

import torch

from e2e_modes import fmt_tokens
from e2e_run import copy_bandwidth, env_header, weight_bytes

GiB = 1 << 30
MiB = 1 << 20


# ---------------------------------------------------------------------------------------------
# output
PEERS = ("inductor", "grouped")  # HF's StaticCache as Inductor compiles it; the strong fp16 peer


def _ratio(a, b, fmt="{:.2f}x"):
    return fmt.format(a / b) if a is not None and b else "-"


def _mib(n):
    return "-" if n is None else (f"{n / MiB:.0f}" if n >= 100 * MiB else f"{n / MiB:.3g}")


def _ok(r):
    return r.get("status") == "ok"


def grid_table(runs: list) -> str:
    from tabulate import tabulate

    peer = {(p, r["batch"], r["prompt"], r.get("layers")): r for p in PEERS for r in runs if r["mode"] == p and _ok(r)}
    rows = []
    for r in runs:
        ok = _ok(r)
        pi, pg = (peer.get((p, r["batch"], r["prompt"], r.get("layers"))) for p in PEERS)
        rows.append([
            r["batch"], fmt_tokens(r["prompt"]), r.get("layers", "-"), r["label"],
            f"{r['prefill_s']:.2f}" if ok and r.get("prefill_s") is not None else ("synthetic" if ok else "-"),
            f"{r['tokens_per_s']:.1f}" if ok else r.get("status"),
            f"{r['decode_ms']:.2f}" if ok else "-",
            _ratio(r["tokens_per_s"], pi and pi["tokens_per_s"]) if ok else "-",
            _ratio(r["tokens_per_s"], pg and pg["tokens_per_s"]) if ok else "-",
            f"{r['peak_bytes'] / GiB:.1f}" if ok and r.get("peak_bytes") else "-",
            _mib(r.get("kv_bytes")) if ok else "-",
            f"{r['kv_ratio_vs_fp16']:.2f}x" if ok else "-",
            r.get("steps_timed", "-"),
        ])
    head = ["B", "prompt", "layers", "mode", "prefill s", "decode tok/s", "ms/step", "vs inductor", "vs grouped",
            "peak GiB", "KV MiB", "fp16/KV (same cap.)", "steps"]
    return tabulate(rows, head, tablefmt="github")


def serve_table(rows_in: list) -> str:
    from tabulate import tabulate

    pg = next((r for r in rows_in if r["mode"] == "grouped" and _ok(r)), None)
    pi = next((r for r in rows_in if r["mode"] == "inductor" and _ok(r)), None)
    rows = []
    for r in rows_in:
        ok = _ok(r)
        rows.append([r["label"], fmt_tokens(r.get("prompt")), r.get("layers", "-"),
                     f"{r['kv_budget_bytes'] / GiB:.3g}" if r.get("kv_budget_bytes") else "-",
                     _mib(r.get("per_request_bytes")), r.get("batch_fit", "-"), r.get("batch", "-"),
                     f"{r['tokens_per_s']:.1f}" if ok else r.get("status"),
                     f"{r['decode_ms']:.2f}" if ok else "-",
                     _ratio(r.get("tokens_per_s"), pi and pi["tokens_per_s"]) if ok else "-",
                     _ratio(r.get("tokens_per_s"), pg and pg["tokens_per_s"]) if ok else "-",
                     f"{r['peak_bytes'] / GiB:.1f}" if ok and r.get("peak_bytes") else "-"])
    head = ["mode", "prompt", "layers run", "KV budget GiB (full depth)", "KV MiB / request (full depth)", "batch fits",
            "batch run", "decode tok/s", "ms/step", "vs inductor", "vs grouped", "peak GiB"]
    return tabulate(rows, head, tablefmt="github")


def ttft_table(rows_in: list) -> str:
    from tabulate import tabulate

    pg = next((r for r in rows_in if r["mode"] == "grouped" and _ok(r)), None)
    pi = next((r for r in rows_in if r["mode"] == "inductor" and _ok(r)), None)
    rows = [[r["label"], fmt_tokens(r["prompt"]), r.get("layers", "-"), r.get("chunk", "-"),
             f"{r['ttft_s'] * 1e3:.0f}" if _ok(r) else r.get("status"),
             _ratio(r.get("ttft_s"), pi and pi["ttft_s"]) if _ok(r) else "-",
             _ratio(r.get("ttft_s"), pg and pg["ttft_s"]) if _ok(r) else "-",
             f"{r['warmup_s']:.1f}" if _ok(r) else "-"] for r in rows_in]
    return tabulate(rows, ["mode", "prompt", "layers", "chunk", "TTFT ms", "time vs inductor", "time vs grouped",
                           "first (tracing) run s"], tablefmt="github")


def tables(res: dict) -> str:
    from tabulate import tabulate

    runs = res["runs"]
    out = []
    if runs:
        out.append(grid_table(runs))
    if res.get("serve"):
        out.append("Serving at a fixed KV budget:\n\n" + serve_table(res["serve"]))
    if res.get("ttft"):
        out.append("Time to first token:\n\n" + ttft_table(res["ttft"]))
    every = runs + res.get("serve", []) + res.get("ttft", [])
    notes = sorted({f"- {r['label']}: {r['note']}" for r in every if r.get("note")} |
                   {f"- {r['label']} B={r.get('batch')} T={r.get('prompt')}: {r['status']}: {r.get('error', '')}"
                    for r in every if r.get("status") not in ("ok", None)})
    if notes:
        out.append("\n".join(notes))
    if res.get("budget"):
        bpeer = next((b for b in res["budget"] if b["mode"] == "inductor" and b.get("max_prompt")), None)
        brows = []
        for b in res["budget"]:
            x = f"{b['max_prompt'] / bpeer['max_prompt']:.2f}x" if bpeer and b.get("max_prompt") else "-"
            brows.append([b["label"], b["batch"], f"{b['budget_bytes'] / GiB:.3g}", fmt_tokens(b.get("max_prompt")),
                          x, len(b.get("probes", [])), b.get("status")])
        out.append(tabulate(brows, ["mode", "B", "budget GiB", "longest prompt", "vs inductor", "probes", "search"],
                            tablefmt="github"))
    if res.get("targets"):
        trows = [[t["target"], t.get("value"), {True: "met", False: "NOT met", None: "n/a"}[t.get("met")],
                  t.get("where", "")] for t in res["targets"]]
        out.append(tabulate(trows, ["target", "measured", "", "where"], tablefmt="github"))
    return "\n\n".join(out)


def strong_peer_targets(res: dict) -> list[dict]:
    """The targets against the strong fp16 peer (grouped SDPA, compiled): the decode byte ratio at the
    longest B=1 prompt of the deepest model run, throughput at the KV budget, time to first token."""
    out = []
    ok = [r for r in res["runs"] if _ok(r) and r["batch"] == 1]
    deep = max((r.get("layers") or 0 for r in ok if r["mode"] == "grouped"), default=None)
    Ts = [r["prompt"] for r in ok if r["mode"] == "grouped" and r.get("layers") == deep]
    if Ts:
        T = max(Ts)
        g = next(r for r in ok if r["mode"] == "grouped" and r["prompt"] == T and r.get("layers") == deep)
        for m in ("qjl", "rotation"):
            r = next((x for x in ok if x["mode"] == m and x["prompt"] == T and x.get("layers") == deep), None)
            if r is None:
                continue
            w = r.get("weights_bytes") or res["header"].get("weights_bytes", 0)
            ideal = (w + g["kv_bytes"]) / (w + r["kv_bytes"])
            v = r["tokens_per_s"] / g["tokens_per_s"]
            out.append(dict(target=f"{m} decode >= 85% of the ideal byte ratio vs the strong fp16 peer",
                            value=f"{v:.2f}x (ideal {ideal:.2f}x = (weights + fp16 KV) / (weights + {m} KV); "
                                  f"{100 * v / ideal:.0f}% of it)",
                            met=v >= 0.85 * ideal, where=f"B=1, {fmt_tokens(T)}, {deep} layers"))
    else:
        out.append(dict(target="compressed decode >= 85% of the ideal byte ratio vs the strong fp16 peer", value=None,
                        met=None, where="no B=1 run of the grouped peer"))
    sv = {r["mode"]: r for r in res.get("serve", []) if _ok(r)}
    for m in ("qjl", "rotation"):
        if m in sv and "grouped" in sv:
            v = sv[m]["tokens_per_s"] / sv["grouped"]["tokens_per_s"]
            out.append(dict(target=f"{m} throughput at the KV budget >= 3x the strong fp16 peer", value=f"{v:.2f}x "
                            f"(B={sv[m]['batch']} vs B={sv['grouped']['batch']})", met=v >= 3,
                            where=f"{sv[m]['kv_budget_bytes'] / GiB:.3g} GiB full-depth KV, "
                                  f"{fmt_tokens(sv[m]['prompt'])} requests, {sv[m]['layers']} layers run"))
    tt = {r["mode"]: r for r in res.get("ttft", []) if _ok(r)}
    # the fp16 peer's time to first token: the faster of its two prefill paths (HF eager over the
    # StaticCache, as the inductor mode prefills; the qjl passes with grouped SDPA)
    best = min((tt[p] for p in PEERS if p in tt), key=lambda r: r["ttft_s"], default=None)
    for m in ("qjl", "rotation"):
        if m in tt and best is not None:
            v = tt[m]["ttft_s"] / best["ttft_s"]
            out.append(dict(target=f"{m} time to first token within 10% of the fp16 peer's (faster prefill path)",
                            value=f"{v:.2f}x ({tt[m]['ttft_s'] * 1e3:.0f} vs {best['ttft_s'] * 1e3:.0f} ms, "
                                  f"{best['mode']} prefill)",
                            met=v <= 1.1, where=f"{fmt_tokens(tt[m]['prompt'])} prompt, {tt[m]['layers']} layers"))
    return out


def targets(res: dict) -> list[dict]:
    """The targets against the strong peer, then the earlier ones (against Inductor + HF StaticCache)."""
    return strong_peer_targets(res) + inductor_targets(res)


def inductor_targets(res: dict) -> list[dict]:
    ok = [r for r in res["runs"] if r.get("status") == "ok"]

    def get(mode, B, T):
        return next((r for r in ok if r["mode"] == mode and r["batch"] == B and r["prompt"] == T), None)

    out = []
    Ts = sorted({r["prompt"] for r in ok if r["batch"] == 1})
    longest = max((T for T in Ts if get("qjl", 1, T) and get("inductor", 1, T)), default=None)
    if longest:
        q, p = get("qjl", 1, longest), get("inductor", 1, longest)
        v = q["tokens_per_s"] / p["tokens_per_s"]
        out.append(dict(target="compiled QJL decode >= 1.4x Inductor StaticCache tok/s (longest prompt)",
                        value=f"{v:.2f}x", met=v >= 1.4, where=f"B=1, {fmt_tokens(longest)}"))
        v = p["kv_bytes"] / q["kv_bytes"]
        out.append(dict(target="KV bytes >= 4x smaller than fp16 StaticCache (same capacity)",
                        value=f"{v:.2f}x", met=v >= 4, where=f"B=1, {fmt_tokens(longest)}"))
    else:
        out.append(dict(target="compiled QJL decode >= 1.4x Inductor StaticCache tok/s", value=None, met=None,
                        where="no run of both qjl and inductor"))
        # the same QJLCache serves qjl-eager: its allocation answers the bytes target
        longest = max((T for T in Ts if get("qjl-eager", 1, T) and get("inductor", 1, T)), default=None)
        if longest:
            q, p = get("qjl-eager", 1, longest), get("inductor", 1, longest)
            v = p["kv_bytes"] / q["kv_bytes"]
            out.append(dict(target="KV bytes >= 4x smaller than fp16 StaticCache (same capacity)",
                            value=f"{v:.2f}x", met=v >= 4, where=f"B=1, {fmt_tokens(longest)} (QJLCache of qjl-eager)"))
        else:
            q = next((r for r in ok if r["mode"] in ("qjl", "qjl-eager")), None)
            if q:
                v = q["kv_ratio_vs_fp16"]
                out.append(dict(target="KV bytes >= 4x smaller than fp16 (same capacity)", value=f"{v:.2f}x",
                                met=v >= 4, where=f"B={q['batch']}, {fmt_tokens(q['prompt'])}"))
    b = {x["mode"]: x for x in res.get("budget", []) if x.get("max_prompt")}
    if "qjl" in b and "inductor" in b:
        v = b["qjl"]["max_prompt"] / b["inductor"]["max_prompt"]
        out.append(dict(target=">= 3x longer context than fp16 StaticCache at a fixed budget", value=f"{v:.2f}x",
                        met=v >= 3, where=f"{b['qjl']['budget_bytes'] / GiB:.1f} GiB, B={b['qjl']['batch']}"))
    else:
        out.append(dict(target=">= 3x longer context at a fixed budget", value=None, met=None,
                        where="no context search of both qjl and inductor"))
    if "qjl-eager" in b and "inductor" in b:
        v = b["qjl-eager"]["max_prompt"] / b["inductor"]["max_prompt"]
        out.append(dict(target="(eager QJLCache: longer context at a fixed budget)", value=f"{v:.2f}x",
                        met=v >= 3, where=f"{b['qjl-eager']['budget_bytes'] / GiB:.1f} GiB, B=1"))
    T32 = 32768 if get("qjl", 1, 32768) and get("qjl-eager", 1, 32768) else \
        max((T for T in Ts if get("qjl", 1, T) and get("qjl-eager", 1, T)), default=None)
    if T32:
        v = get("qjl", 1, T32)["tokens_per_s"] / get("qjl-eager", 1, T32)["tokens_per_s"]
        out.append(dict(target="compiled QJL >= 2x eager QJLCache decode at 32k", value=f"{v:.2f}x", met=v >= 2,
                        where=f"B=1, {fmt_tokens(T32)}"))
    else:
        out.append(dict(target="compiled QJL >= 2x eager QJLCache decode at 32k", value=None, met=None,
                        where="no run of both qjl and qjl-eager"))
    return out



def _log_axes(ax, ylabel: str, title: str) -> None:
    """Log-log axes over prompt length, shared by both plots."""
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)

def plots(res: dict, stem: str) -> list[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # noqa: BLE001
        return []
    ok = [r for r in res["runs"] if r.get("status") == "ok"]
    labels = {r["mode"]: r["label"] for r in ok}
    batches = sorted({r["batch"] for r in ok})
    files = []
    if ok:
        fig, axes = plt.subplots(1, max(1, len(batches)), figsize=(6 * max(1, len(batches)), 4.5), squeeze=False)
        for ax, B in zip(axes[0], batches):
            for m in labels:
                pts = sorted((r["prompt"], r["tokens_per_s"]) for r in ok if r["mode"] == m and r["batch"] == B)
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=labels[m])
            _log_axes(ax, "decode tokens/s", f"batch {B}")
        axes[0][0].legend(fontsize=7)
        fig.suptitle(res["header"]["model"], fontsize=9)
        fig.tight_layout()
        files.append(stem + "_tokens.png")
        fig.savefig(files[-1], dpi=110)
        plt.close(fig)
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        B0 = batches[0] if batches else 1
        for m in labels:
            pts = sorted((r["prompt"], r["kv_bytes"] / MiB) for r in ok if r["mode"] == m and r["batch"] == B0)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=labels[m])
        _log_axes(ax, "KV cache MiB (allocated)", f"KV cache bytes, batch {B0}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        files.append(stem + "_bytes.png")
        fig.savefig(files[-1], dpi=110)
        plt.close(fig)
    serve = [r for r in res.get("serve", []) if _ok(r)]
    ttft = [r for r in res.get("ttft", []) if _ok(r)]
    if serve or ttft:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), squeeze=False)
        for ax, rows, key, ylabel, title in (
                (axes[0][0], serve, "tokens_per_s", "decode tokens/s", "serving at the KV budget (batch in the bar)"),
                (axes[0][1], ttft, "ttft_s", "seconds", "time to first token")):
            ax.bar(range(len(rows)), [r[key] for r in rows], color="tab:blue")
            ax.set_xticks(range(len(rows)), [r["mode"] for r in rows], fontsize=8)
            for i, r in enumerate(rows):
                if key == "tokens_per_s":
                    ax.text(i, r[key], f"B={r['batch']}", ha="center", va="bottom", fontsize=7)
            ax.set_ylabel(ylabel)
            ax.set_title(title, fontsize=9)
        fig.suptitle(res["header"]["model"], fontsize=9)
        fig.tight_layout()
        files.append(stem + "_serve.png")
        fig.savefig(files[-1], dpi=110)
        plt.close(fig)
    return files


def header(args, device, model_desc, model) -> dict:
    import transformers
    h = dict(device=env_header() if env_header else platform.platform(),
             transformers=transformers.__version__, torch=torch.__version__,
             python=platform.python_version(), model=model_desc, dtype=str(model.dtype).replace("torch.", ""),
             weights_bytes=weight_bytes(model), chunk=args.chunk, new_tokens=args.new_tokens,
             full_layers=model.full_config.num_hidden_layers,
             command="python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]))
    try:
        import triton
        h["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        pass
    try:
        from importlib.metadata import version
        h["hqq"] = version("hqq")
    except Exception:  # noqa: BLE001
        pass
    if device == "cuda":
        h["gpu"] = torch.cuda.get_device_name()
        h["cuda"] = torch.version.cuda
    if device == "cuda" and copy_bandwidth is not None and not args.child:
        h["copy_GBs"] = round(copy_bandwidth(), 1)
    return h


def header_text(h: dict) -> str:
    s = [f"device: {h['device']}", f"torch {h['torch']}, transformers {h['transformers']}"
         + (f", triton {h['triton']}" if "triton" in h else "") + (f", hqq {h['hqq']}" if "hqq" in h else ""),
         f"model: {h['model']}, {h['dtype']}, weights {h['weights_bytes'] / GiB:.2f} GiB",
         f"prefill chunk {h['chunk']} tokens, {h['new_tokens']} new tokens"]
    if "copy_GBs" in h:
        s.append(f"measured copy bandwidth {h['copy_GBs']} GB/s")
    s.append(f"command: {h['command']}")
    return "\n".join(s)


