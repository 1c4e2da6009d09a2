"""Tensor parallelism: QJLCache and qjl_compile.compile under transformers' tp_plan (CPU, gloo).

* per-rank cache logic, one process: a rank's cache (tp_size=2, half the KV heads) holds exactly the
  single-process cache's slice of its heads (identical sketches / rotations, same codes), memory() per
  rank and in total, head-count resolution from the config transformers records, clear refusals;
* two processes (gloo, ``from_pretrained(..., tp_plan="auto")``): ``qjl_compile.compile`` + generate on
  every rank gives the single-process greedy tokens for each codec (qjl, rotation, decoquant), decoding
  through the qjl backend (fused attend on each rank), with no collective on K/V in the compiled step.

This file is also the worker of the two-process test (``python tests/e2e/test_tp.py --worker ...``).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

CODECS = ("qjl", "rotation", "decoquant")
# 200 prompt tokens: the prefill stores one compressed 128-token block (residual window R = 128 in every
# preset used here) and the decode steps attend over it, so the comparison exercises each codec
PROMPT = torch.randint(0, 320, (1, 200), generator=torch.Generator().manual_seed(5)).tolist()
NEW_TOKENS = 6


def qjl_config(method: str, cfg):
    from qjl_compile import QJLConfig
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if method == "qjl":
        return QJLConfig.for_model(cfg)
    return QJLConfig.preset("rotation-k4v3" if method == "rotation" else "decoquant4", head_dim=hd,
                            num_layers=cfg.num_hidden_layers)


def tiny(kv_heads=2, heads=4, layers=2):
    from qjl_compile.models import tiny_llama  # vocab / 2 != hidden: the collectives check tells them apart
    return tiny_llama(layers=layers, hidden=128, heads=heads, kv_heads=kv_heads, vocab=320, max_positions=1024,
                      seed=3)  # seed 3: greedy tokens that do not repeat (a stronger comparison)


# ------------------------------------------------------------------------------------------------
# per-rank cache logic (one process)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", CODECS)
def test_rank_caches_hold_the_single_process_slices(method):
    """Two tp_size=2 caches fed heads [0] and [1] store exactly what one cache fed both heads stores."""
    from qjl_compile import QJLCache
    cfg = tiny().config
    qc = qjl_config(method, cfg)
    g = torch.Generator().manual_seed(1)
    one = QJLCache(cfg, max_cache_len=512, qjl_config=qc)
    ranks = [QJLCache(cfg, max_cache_len=512, qjl_config=qc, tp_size=2) for _ in range(2)]
    assert [l.kv_heads for l in ranks[0].layers] == [1, 1] and one.layers[0].kv_heads == 2
    for T in (150, 1, 1, 120):  # prompt (one compressed block + ring), decode steps, a chunk that flushes
        for i in range(cfg.num_hidden_layers):
            k = torch.randn(1, 2, T, 32, generator=g) * 2
            v = torch.randn(1, 2, T, 32, generator=g)
            k1, v1 = one.update(k, v, i)
            for r, c in enumerate(ranks):
                kr, vr = c.update(k[:, r:r + 1], v[:, r:r + 1], i)
                torch.testing.assert_close(kr, k1[:, r:r + 1], rtol=0, atol=0)
                torch.testing.assert_close(vr, v1[:, r:r + 1], rtol=0, atol=0)
    for i, full in enumerate(one.layers):
        for r, c in enumerate(ranks):
            part = c.layers[i]
            for a, b in zip(part.consts, full.consts):  # sketches / rotations / codebooks: identical on every rank
                assert torch.equal(a, b)
            assert torch.equal(part.state[0], full.state[0])  # length
            for a, b in zip(part.state[1:], full.state[1:]):
                assert a.shape[1] == 1 and torch.equal(a, b[:, r:r + 1]), (method, i, r)


@pytest.mark.parametrize("method", CODECS)
def test_memory_per_rank_and_total(method):
    from qjl_compile import QJLCache
    cfg = tiny().config
    qc = qjl_config(method, cfg)
    kw = dict(max_cache_len=1024, qjl_config=qc, batch_size=2, device="cpu", dtype=torch.float16)
    one = QJLCache(cfg, **kw).memory()
    rank = QJLCache(cfg, tp_size=2, **kw).memory()
    assert one["tp"] == {"size": 1, "rank": 0, "kv_heads_per_rank": 2, "total_allocated_bytes": one["allocated_bytes"],
                         "total_fp16_bytes": one["fp16_bytes"]}
    assert rank["tp"]["size"] == 2 and rank["tp"]["kv_heads_per_rank"] == 1
    assert rank["fp16_bytes"] * 2 == one["fp16_bytes"] == rank["tp"]["total_fp16_bytes"]
    # every rank holds its own copy of the layer constants (sketches, rotations) and length; the per-head state halves
    shared = sum(t.numel() * t.element_size() for l in QJLCache(cfg, **kw).layers for t in l.consts + l.state[:1])
    assert shared > 0
    assert rank["tp"]["total_allocated_bytes"] == 2 * rank["allocated_bytes"] == one["allocated_bytes"] + shared
    assert (rank["k_bits"], rank["v_bits"]) == (one["k_bits"], one["v_bits"])  # codec rate: per rank = total


def test_heads_per_rank_from_the_recorded_tp_config():
    """QJLCache(model.config) sizes itself from config.distributed_config, as transformers records it."""
    from qjl_compile import QJLCache
    from qjl_compile import tp
    cfg = tiny(kv_heads=4, heads=4).config
    assert tp.tp_size_of(cfg) == 1 and QJLCache(cfg, max_cache_len=128).layers[0].kv_heads == 4
    cfg.distributed_config = SimpleNamespace(tp_size=2, tp_plan="auto")
    c = QJLCache(cfg, max_cache_len=128)
    assert c.tp_size == 2 and [l.kv_heads for l in c.layers] == [2, 2]
    c.check_model(cfg)  # the same (TP) config: accepted
    cfg.distributed_config = SimpleNamespace(tp_size=4, tp_plan=None)
    assert QJLCache(cfg, max_cache_len=128).layers[0].kv_heads == 1
    # a plan that keeps attention whole (MLP only): every rank holds every head
    whole = "replicated_with_grad_allreduce"
    cfg.distributed_config = SimpleNamespace(tp_size=2, tp_plan={"layers.*.self_attn.k_proj": whole,
                                                                 "layers.*.self_attn.v_proj": whole})
    assert QJLCache(cfg, max_cache_len=128).layers[0].kv_heads == 4
    cfg.distributed_config = SimpleNamespace(tp_size=2, tp_plan={})  # empty plan: no TP sharding at all
    assert QJLCache(cfg, max_cache_len=128).layers[0].kv_heads == 4
    assert QJLCache(cfg, max_cache_len=128, tp_size=4).layers[0].kv_heads == 4


def test_refusals_name_the_fix():
    from qjl_compile import QJLCache
    import qjl_compile
    model = tiny(kv_heads=2)
    with pytest.raises(ValueError, match=r"2 key/value heads, which tp_size=4 .*divides 2 \(\[1, 2\]"):
        QJLCache(model.config, max_cache_len=128, tp_size=4)
    model._tp_size = 4  # what transformers sets on a model it sharded 4 ways
    try:
        with pytest.raises(ValueError, match="tp_size=4 ranks cannot split"):
            qjl_compile.compile(model)
    finally:
        del model._tp_size
    # a cache that was not told about TP, fed one rank's heads: the error says what to pass
    c = QJLCache(model.config, max_cache_len=128)
    with pytest.raises(ValueError, match=r"tensor parallelism\? .*tp_size=2"):
        c.update(torch.randn(1, 1, 4, 32), torch.randn(1, 1, 4, 32), 0)
    # a per-rank cache used with the unsharded model: refused by generate's check
    with pytest.raises(ValueError, match=r"kv heads per rank \(tp_size=2\)"):
        QJLCache(model.config, max_cache_len=128, tp_size=2).check_model(tiny(kv_heads=4, heads=4).config)


# ------------------------------------------------------------------------------------------------
# two processes, gloo, transformers' tp_plan="auto"
# ------------------------------------------------------------------------------------------------
def _generate(model, method):
    """Greedy tokens through qjl_compile.compile: the qjl passes (fused qjl::attend), eager lowering (the
    fastest to compile; Inductor on a TP model is exercised by benchmarks/tp.py)."""
    import qjl_compile
    qjl_compile.compile(model, qjl_config(method, model.config), options={"lowering": "eager"})
    try:
        out = model.generate(torch.tensor(PROMPT), max_new_tokens=NEW_TOKENS, do_sample=False)
        st = model._qjl_compile
        return out[0, len(PROMPT[0]):].tolist(), st.compiled_calls, st.cache
    finally:
        qjl_compile.uncompile(model)


def _collectives(gm) -> list:
    """[op, output shape] of every cross-rank step in a graph: functional collectives (all_reduce, all_gather,
    ...) and DTensor redistributions (which lower to collectives later)."""
    found = []
    for n in gm.graph.nodes:
        name = n.target if isinstance(n.target, str) else str(n.target)
        dtensor = n.op == "call_method" and name in ("redistribute", "full_tensor")
        if ("c10d" in name and "wait" not in name) or dtensor:
            val = n.meta.get("val", n.meta.get("example_value"))
            found.append([name, list(val.shape) if val is not None else None])
    return found


def _worker(model_dir: str, out_dir: str) -> None:
    import functools

    import qjl_compile
    from qjl_compile import tp
    from qjl_compile.backend import qjl_backend
    from torch._dynamo.utils import counters
    from transformers import LlamaForCausalLM

    torch.set_num_threads(1)
    t0 = time.time()
    model = LlamaForCausalLM.from_pretrained(model_dir, tp_plan="auto", dtype=torch.float32).eval()
    rank = torch.distributed.get_rank()
    res = {"rank": rank, "tp_size": model._tp_size, "codecs": {}, "seconds": {"load": time.time() - t0}}
    graphs = []

    def observer(stage, gm, ctx):  # called per pass with the same (rewritten in place) graph
        if all(g is not gm for g in graphs):
            graphs.append(gm)

    real_compile = torch.compile

    def recording_compile(fn, **kw):  # qjl_compile.compile's step, with an observer on the qjl backend
        opts = kw.get("options")
        return real_compile(fn, fullgraph=kw.get("fullgraph", False), dynamic=kw.get("dynamic"),
                            backend=functools.partial(qjl_backend, options=opts, observer=observer))

    for method in CODECS:
        torch._dynamo.reset()
        counters.clear()
        graphs.clear()
        torch.compile = recording_compile
        t0 = time.time()
        try:
            toks, calls, cache = _generate(model, method)
        finally:
            torch.compile = real_compile
        res["seconds"][method] = time.time() - t0
        coll = [c for g in graphs for c in _collectives(g)]
        res["codecs"][method] = {
            "tokens": toks, "compiled_calls": calls, "fused": counters["qjl"]["fuse_attention"],
            "kv_heads": [l.state[1].shape[1] for l in cache.layers],
            "stored": int(cache.get_seq_length()),
            "compressed_blocks": int(cache.get_seq_length()) // cache.qjl_config.residual,
            "memory": [m["allocated_bytes"] for m in tp.gather_memory(cache)],
            "total": cache.memory()["tp"]["total_allocated_bytes"],
            "collectives": coll}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_tp_matches_one_process(tmp_path):
    """2 ranks x gloo x tp_plan="auto": same greedy tokens as one process for every codec, each rank holding
    1 of the 2 KV heads, decode compiled through the qjl backend, collectives only on hidden states/logits."""
    t0 = time.time()
    model = tiny(kv_heads=2, heads=4)
    model.save_pretrained(tmp_path / "model")
    want = {m: _generate(model, m)[0] for m in CODECS}
    t1 = time.time()
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2",
           "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "1")}
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(tmp_path / "model"), str(tmp_path)],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(2)]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=240)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("TP workers did not finish in 240 s")
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]
    res = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    hidden, vocab = model.config.hidden_size, model.config.vocab_size
    for r in res:
        assert r["tp_size"] == 2
        for m in CODECS:
            got = r["codecs"][m]
            assert got["tokens"] == want[m], (m, r["rank"], got["tokens"], want[m])
            assert got["stored"] == len(PROMPT[0]) + NEW_TOKENS - 1 and got["compressed_blocks"] == 1
            assert got["compiled_calls"] == NEW_TOKENS - 1  # every decode step through the qjl-compiled forward
            assert got["fused"] >= model.config.num_hidden_layers  # qjl::attend on this rank
            assert got["kv_heads"] == [1, 1]
            assert got["total"] == sum(got["memory"])
            # no K/V crosses ranks: every collective in the compiled step carries hidden states or logits
            # (o_proj and down_proj all-reduce per layer, the lm_head's logits gathered)
            ops = [op for op, _ in got["collectives"]]
            assert ops.count("_c10d_functional.all_reduce") >= 2 * model.config.num_hidden_layers, ops
            assert "redistribute" in ops, ops
            for op, shape in got["collectives"]:
                assert shape is not None and shape[-1] in (hidden, vocab), (m, op, shape)
    print(f"two-process TP test: {time.time() - t0:.1f} s (one process {t1 - t0:.1f} s)", res[0]["seconds"],
          res[0]["codecs"]["qjl"])


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _worker(sys.argv[2], sys.argv[3])
