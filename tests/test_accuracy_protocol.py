"""The accuracy protocol of issue 17: two text kinds (pydoc prose, stdlib Python source), disjoint
tune / held-out halves, the repeated-span copy metric, one plot per text kind (tiny random model)."""
import importlib.util
import json
import sys
from pathlib import Path

import torch

from qjl_compile import QJLCache, QJLConfig
from qjl_compile import evaluate as ev
from qjl_compile import models

ROOT = Path(__file__).resolve().parents[1]


def test_stdlib_source_is_deterministic_python():
    a, fa = ev.stdlib_source_text(200_000)
    b, fb = ev.stdlib_source_text(200_000)
    assert a == b and fa == fb and fa == sorted(fa) and len(a) == 200_000
    assert a.startswith("# file: ") and "def " in a and not any("/test/" in f or f.startswith("test/") for f in fa)


def test_splits_are_disjoint_halves():
    ids = torch.arange(1001)
    t, h = ev.split_ids(ids, "tune"), ev.split_ids(ids, "heldout")
    assert t.numel() == 500 and h.numel() == 501 and t.max() < h.min()
    wins = ev.make_windows(h, 200, 2)
    assert all(int(w.min()) >= 500 for w in wins)


def test_copy_prompts_and_scoring():
    ids = torch.arange(5000) % 397
    prs = ev.copy_prompts(ids, 256, 32, depths=(0.1, 0.7), trials=2, seed=1)
    assert len(prs) == 4
    for p in prs:
        assert p.context.shape == (1, 256) and p.span.shape == (1, 32)
        assert torch.equal(p.context[0, p.start:p.start + 32], p.span[0])
    model = models.tiny_llama(layers=2, hidden=128, heads=4, kv_heads=2, head_dim=32, vocab=512)
    cfg = QJLConfig(residual=32, sketch_dim=32, sketch_dim_initial=32, outlier_sketch_dim=16,
                    outlier_sketch_dim_initial=16, outliers=2)
    res = ev.evaluate_copy(model, {"fp16": None, "qjl": lambda m, n: QJLCache(m.config, n, cfg)}, prs[:2])
    for r in res.values():
        assert r.tokens == 2 * 31 and r.prompts == 2 and 0 <= r.correct <= r.tokens
    again = ev.evaluate_copy(model, {"fp16": None}, prs[:2])["fp16"]
    assert again.correct == res["fp16"].correct      # deterministic


def test_accuracy_two_kinds_tune_heldout(tmp_path):
    spec = importlib.util.spec_from_file_location("accuracy_bench17", ROOT / "benchmarks" / "accuracy.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)
    out, png = tmp_path / "a.json", tmp_path / "a.png"
    rc = bench.main(["--smoke", "--kinds", "pydoc,pysrc", "--splits", "tune,heldout", "--pysrc-chars", "60000",
                     "--methods", "qjl-reference", "--copy-context", "160", "--copy-trials", "1",
                     "--copy-depths", "0.2", "--out", str(out), "--plot", str(png)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["sets"] == ["pydoc/tune/256", "pydoc/heldout/256", "pysrc/tune/256", "pysrc/heldout/256"]
    rows = {r["method"]: r for r in data["rows"]}
    for st in data["sets"]:
        assert rows["fp16"]["ppl"][st]["kl"] == 0.0 and rows["qjl-reference"]["ppl"][st]["kl"] > 0
    assert set(rows["qjl-reference"]["copy"]) == {"pydoc/tune", "pydoc/heldout", "pysrc/tune", "pysrc/heldout"}
    for kind in ("pydoc", "pysrc"):
        assert (tmp_path / f"a-{kind}.png").stat().st_size > 1000
    merged = bench.merge([data, data])
    assert bench.table(merged).count("| qjl-reference") == 1
