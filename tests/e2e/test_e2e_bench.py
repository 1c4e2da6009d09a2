"""CPU smoke run of benchmarks/e2e.py --quick (tiny model): every mode that runs on CPU finishes
(grid, time to first token, serving at a KV budget, context search), the JSON/markdown/plots are
written, and the cache accounting is consistent."""
import json
import os
import runpy
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "benchmarks", "e2e.py")


def test_e2e_quick_smoke(tmp_path, monkeypatch):
    pytest.importorskip("tabulate")
    pytest.importorskip("tqdm")
    argv = [SCRIPT, "--quick", "--prompts", "192", "--new-tokens", "4", "--modes", "eager", "qjl-eager", "grouped",
            "qjl", "--budget-gib", "0.02", "--budget-modes", "eager", "qjl", "--ttft-prompt", "192",
            "--ttft-modes", "grouped", "qjl", "--kv-budget-gib", "0.004", "--serve-modes", "grouped", "qjl",
            "--out-dir", str(tmp_path), "--no-progress"]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(SCRIPT, run_name="__main__")  # as `qjl-compile bench e2e` runs it
    res = json.loads((tmp_path / "e2e_quick.json").read_text())
    runs = {r["mode"]: r for r in res["runs"]}
    assert set(runs) == {"eager", "qjl-eager", "grouped", "qjl"}
    for r in runs.values():
        assert r["status"] == "ok", r
        assert r["tokens_per_s"] > 0 and r["prefill_s"] > 0 and r["kv_bytes"] > 0
    # QJLCache bytes come from its allocation report; both QJL modes hold the same cache
    assert runs["qjl"]["kv_bytes"] == runs["qjl-eager"]["kv_bytes"]
    assert runs["qjl"]["bits_per_value"] > 0
    # DynamicCache holds prompt + generated tokens, fp32 here: 2 (K,V) * layers * B * H * T * D * 4 bytes
    e = runs["eager"]
    assert e["kv_bytes"] == 2 * 2 * 1 * 2 * e["kv_capacity_tokens"] * 32 * 4
    # the strong fp16 peer: HF's StaticCache with every attention rewritten to grouped SDPA (2 layers)
    assert runs["grouped"]["pass_counters"]["grouped_sdpa"] == 2 * 2  # prefill-chunk graph + decode graph, 2 layers
    # StaticCache: K/V of the full capacity (fp32) plus a length counter per layer
    kv = 2 * 2 * 1 * 2 * runs["grouped"]["kv_capacity_tokens"] * 32 * 4
    assert kv <= runs["grouped"]["kv_bytes"] <= kv + 2 * 64
    # serving: the batch each mode's own full-depth cache bytes fit in the KV budget
    serve = {r["mode"]: r for r in res["serve"]}
    budget_b = int(0.004 * (1 << 30))
    for r in serve.values():
        assert r["status"] == "ok", r
        assert r["batch"] == r["batch_fit"] == (budget_b - r["shared_bytes"]) // r["per_request_bytes"] > 0
        assert r["batch"] * r["per_request_bytes"] + r["shared_bytes"] <= budget_b
    assert serve["qjl"]["batch"] > serve["grouped"]["batch"]
    assert {r["mode"] for r in res["ttft"]} == {"grouped", "qjl"}
    assert all(r["status"] == "ok" and r["ttft_s"] > 0 for r in res["ttft"])
    assert res["header"]["torch"] and res["header"]["full_layers"] == 2
    budget = {b["mode"]: b for b in res["budget"]}
    assert budget["qjl"]["max_prompt"] > budget["eager"]["max_prompt"] > 0
    assert {t["target"] for t in res["targets"]}
    md = (tmp_path / "e2e_quick.md").read_text()
    assert "vs grouped" in md and "longest prompt" in md and "Time to first token" in md and "batch fits" in md
    if res.get("plots"):
        for p in res["plots"]:
            assert os.path.getsize(p) > 1000
