"""The README's "spelled out" use with a compiled first call (issue 14): ``step = torch.compile(model,
backend="qjl")`` over a `QJLCache`, first call = a batch of 3 left-padded prompts (300 positions,
attention_mask and position_ids given), then decode steps, against the same model run eagerly over
its own `QJLCache` of the same configuration.

Model: tiny random Llama, 2 layers, 14 query / 2 kv heads (GQA group 7 > 4), head_dim 64. The
compiled prefill (query rows 300 * 7 per kv head) takes qjl::attend's long-chunk route (SDPA over
the sync-free dequantization on CUDA), the decode steps the fused kernel: before the fix the first
route returned another layout than the op's fake and Inductor refused the graph ("incorrect fake
kernel", stride mismatch), for every preset.

GPU (`-m gpu`, Inductor lowering): every preset. CPU: one preset per codec with the aot_eager
lowering (same passes and ops, the CPU reference implementation).
"""
import pytest
import torch
from torch._dynamo.utils import counters
from transformers import LlamaConfig, LlamaForCausalLM

from qjl_compile import QJLCache, QJLConfig
from qjl_compile.compat import cache_kwargs

LAYERS, HQ, HKV, D = 2, 14, 2, 64
B, T, PADS, STEPS = 3, 300, (0, 37, 120), 4
L = 320
# bound on ||compiled - eager|| / ||eager|| of the logits per call, worst row. Eager and compiled compute the
# same estimator in different orders (dequantized K/V + SDPA vs the fused kernel; TF32 dots on GPU); a
# wrong layout, mask or padding row gives O(1). CPU fp32 (measured <= 8e-6) is checked at 1e-4.
TOL = {torch.float32: 1e-2, torch.bfloat16: 8e-2, torch.float16: 4e-2}

pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def tiny(device, dtype):
    cfg = LlamaConfig(vocab_size=512, hidden_size=HQ * D, intermediate_size=1024, num_hidden_layers=LAYERS,
                      num_attention_heads=HQ, num_key_value_heads=HKV, head_dim=D, max_position_embeddings=1024,
                      pad_token_id=0)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval().to(device=device, dtype=dtype)


def batch(device):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 512, (B, T), generator=g)
    am = torch.ones(B, T, dtype=torch.long)
    for r, p in enumerate(PADS):  # left padding
        ids[r, :p], am[r, :p] = 0, 0
    steps = torch.randint(1, 512, (STEPS, B, 1), generator=g)
    return ids.to(device), am.to(device), steps.to(device)


def run(fwd, model, qcfg, device, dtype, early):
    """Logits of the prefill's last position and of each decode step, (B, 1 + STEPS, V) in fp32."""
    kw = dict(batch_size=B, device=device, dtype=dtype) if early else {}
    cache = QJLCache(model.config, max_cache_len=L, qjl_config=qcfg, **kw)
    ids, am, steps = batch(device)
    pos = (am.cumsum(-1) - 1).clamp_min(0)
    out = []
    with torch.no_grad():
        out.append(fwd(ids, attention_mask=am, position_ids=pos, **cache_kwargs(cache)).logits[:, -1:].float())
        for t in steps:
            am = torch.cat([am, am.new_ones(B, 1)], 1)
            pos = pos[:, -1:] + 1
            out.append(fwd(t, attention_mask=am, position_ids=pos, **cache_kwargs(cache)).logits[:, -1:].float())
    assert int(cache.get_seq_length()) == T + STEPS
    return torch.cat(out, 1)


def check(preset, device, dtype, lowering, early=True, tol=None):
    model = tiny(device, dtype)
    qcfg = QJLConfig.for_model(model.config, preset)
    ref = run(model, model, qcfg, device, dtype, early)
    options = None if lowering == "inductor" else {"lowering": lowering}
    step = torch.compile(model, backend="qjl", options=options)
    got = run(step, model, qcfg, device, dtype, early)
    rel = ((got - ref).norm(dim=-1) / ref.norm(dim=-1)).amax(dim=0)  # per call, worst row
    print(f"\n{preset} {device} {dtype} {lowering} early={early}: rel |compiled - eager| per call "
          f"{[f'{x:.1e}' for x in rel.tolist()]}")
    # prefill and every decode step rewritten in every layer (graphs: prefill + decode, decode recompiles once
    # at most for the grown mask length)
    assert counters["qjl"]["fuse_attention"] >= 2 * LAYERS
    assert counters["qjl"]["unfused"] == 0
    assert rel.max().item() < (tol or TOL[dtype]), rel


@pytest.mark.parametrize("preset", ["reference", "decoquant4", "rotation-k4v3"])
def test_compiled_prefill_left_padded_batch_cpu(preset):
    check(preset, "cpu", torch.float32, "aot_eager", tol=1e-4)  # measured <= 8e-6


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
# exact outlier channels and rotation-coded QJL values are reference-only: a CUDA cache refuses them
# (test_qjl_exact_outliers.py, test_qjl_value_rotation.py)
@pytest.mark.parametrize("preset", [p for p in QJLConfig.presets() if not QJLConfig.preset(p).qjl_exact_outliers
                                    and QJLConfig.preset(p).qjl_value_codec != "rotation"])
def test_compiled_prefill_left_padded_batch_gpu(preset):
    check(preset, "cuda", torch.bfloat16, "inductor")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("preset", ["reference", "rotation-k4v3"])
def test_compiled_prefill_lazy_cache_fp32_gpu(preset):
    """The README's cache without batch/device/dtype: allocated inside the compiled prefill."""
    check(preset, "cuda", torch.float32, "inductor", early=False)
