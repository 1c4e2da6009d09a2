"""Soak: 2,000 compiled decode steps with many flushes stay equal to the eager reference path and
do not grow memory after warm-up. Marked slow: `pytest -m slow tests/e2e/test_soak.py`."""
import os
import time

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from qjl_compile import QJLCache, QJLConfig
from qjl_compile.compat import cache_kwargs

STEPS = int(os.environ.get("QJL_SOAK_STEPS", "2000"))
WARM = min(200, STEPS // 4)


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.slow
def test_soak_compiled_decode_matches_eager():
    import qjl_compile.backend  # noqa: F401  (registers "qjl")

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    model = LlamaForCausalLM(cfg).eval()
    qc = QJLConfig(sketch_dim=64, sketch_dim_initial=64, outlier_sketch_dim=32, outlier_sketch_dim_initial=32,
                   outliers=4, residual=32)
    L = STEPS + 48
    eager_cache, comp_cache = QJLCache(cfg, L, qc), QJLCache(cfg, L, qc)
    step = torch.compile(model, backend="qjl", options={"lowering": "aot_eager"}, fullgraph=True)
    ids = torch.randint(0, 256, (1, 40))
    worst, mem, t0 = 0.0, {}, time.time()
    with torch.no_grad():
        model(ids, **cache_kwargs(eager_cache))
        model(ids, **cache_kwargs(comp_cache))  # prefill eager, as generate does
        tok = ids[:, -1:]
        for i in range(STEPS):
            pos = torch.tensor([[40 + i]])
            a = model(tok, **cache_kwargs(eager_cache), position_ids=pos, cache_position=pos[0]).logits
            b = step(tok, **cache_kwargs(comp_cache), position_ids=pos, cache_position=pos[0]).logits
            worst = max(worst, ((a - b).abs().max() / a.abs().max()).item())
            tok = a[:, -1:].argmax(-1)
            if i in (WARM, STEPS - 1):
                mem[i] = rss_mib()
    print(f"\nsoak: {STEPS} steps, {STEPS // 32} flushes, worst rel |eager-compiled| = {worst:.2e}, "
          f"RSS {mem[WARM]:.0f} -> {mem[STEPS - 1]:.0f} MiB, {time.time() - t0:.0f} s")
    assert int(comp_cache.get_seq_length()) == int(eager_cache.get_seq_length()) == 40 + STEPS
    for x, y in zip(eager_cache.layers[0].state, comp_cache.layers[0].state):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-3)  # the same cache, bit for bit up to rounding
    assert worst < 1e-4
    assert mem[STEPS - 1] - mem[WARM] < 64  # MiB: no growth with the number of steps
