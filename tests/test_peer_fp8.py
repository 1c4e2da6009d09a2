"""benchmarks/peer_fp8.py (issue 15's fp8 FlashInfer peer): what runs without a GPU (sizes, the
message when flashinfer is missing, the slimmed wheel, no GPU import at module load), and a small
GPU run where flashinfer is importable."""
import base64
import hashlib
import importlib.util
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "peer_fp8.py"


def _load():
    spec = importlib.util.spec_from_file_location("peer_fp8", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


pf = _load()


def test_parse_sizes():
    assert pf.parse_sizes("1x4096, 1x32768,16X16384,") == [(1, 4096), (1, 32768), (16, 16384)]
    for bad in ("4096", "1x", "0x16", "ax2", ""):
        with pytest.raises(Exception, match="size|no sizes"):
            pf.parse_sizes(bad)
    args = pf.build_parser().parse_args([])
    assert args.sizes == [(1, 4096), (1, 32768), (1, 131072), (16, 16384)] and args.page_size == 16


def test_bad_sizes_exit_with_usage():
    r = subprocess.run([sys.executable, str(SCRIPT), "--sizes", "1y4"], capture_output=True, text=True)
    assert r.returncode == 2 and "is not BxL" in r.stderr


def test_module_import_loads_no_gpu_package():
    code = (f"import importlib.util, sys; s = importlib.util.spec_from_file_location('p', {str(SCRIPT)!r}); "
            "m = importlib.util.module_from_spec(s); s.loader.exec_module(m); "
            "print(sorted(x for x in ('torch', 'flashinfer', 'triton', 'timer') if x in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]"


def test_missing_flashinfer_names_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "flashinfer", None)      # import flashinfer -> ImportError
    with pytest.raises(SystemExit) as e:
        pf.import_flashinfer()
    msg = str(e.value)
    assert "flashinfer is not importable" in msg and "carry the wheels" in msg and "--target /tmp/site" in msg
    with pytest.raises(SystemExit, match="carry the wheels"):   # main fails the same way, before any GPU use
        pf.main(["--sizes", "1x64"])


def test_slim_wheel_drops_kernel_sources_and_rewrites_record(tmp_path):
    src = tmp_path / "in" / "flashinfer_python-0.7.2-py3-none-any.whl"
    src.parent.mkdir()
    files = {
        "flashinfer/__init__.py": b"__version__ = '0.7.2'\n",
        "flashinfer/data/csrc/batch_decode.cu": b"// kept: top-level template\n",
        "flashinfer/data/csrc/tvm_ffi_utils.h": b"// kept\n",
        "flashinfer/data/csrc/cake_sampling/big.cuh": b"x" * 1000,
        "flashinfer/data/include/flashinfer/attention/decode.cuh": b"// kept\n",
        "flashinfer/fused_moe/backends/cudnn_frost/artifacts/bf16/k.json": b"{}",
        "flashinfer/fused_moe/backends/cudnn_frost/runtime.py": b"# kept\n",
    }
    with zipfile.ZipFile(src, "w") as z:
        for n, d in files.items():
            z.writestr(n, d)
        z.writestr("flashinfer_python-0.7.2.dist-info/METADATA", "Name: flashinfer-python\nVersion: 0.7.2\n")
        z.writestr("flashinfer_python-0.7.2.dist-info/RECORD", "stale\n")
    dst = Path(pf.slim_wheel(str(src), str(tmp_path / "out")))
    assert dst.name == src.name
    with zipfile.ZipFile(dst) as z:
        names = set(z.namelist())
        record = z.read("flashinfer_python-0.7.2.dist-info/RECORD").decode().splitlines()
        assert "flashinfer/data/csrc/cake_sampling/big.cuh" not in names
        assert "flashinfer/fused_moe/backends/cudnn_frost/artifacts/bf16/k.json" not in names
        kept = [n for n in files if pf._drop(n) is False]
        assert set(kept) <= names and len(kept) == 5
        rows = {r.split(",")[0]: r for r in record}
        assert set(rows) == names
        for n in kept:
            d = z.read(n)
            h = base64.urlsafe_b64encode(hashlib.sha256(d).digest()).rstrip(b"=").decode()
            assert rows[n] == f"{n},sha256={h},{len(d)}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_small_run(tmp_path):
    pytest.importorskip("flashinfer", reason="flashinfer not installed (carry the wheels: benchmarks/peer_fp8.py)")
    out = tmp_path / "fp8.json"
    assert pf.main(["--sizes", "1x1000,2x256", "--warmup", "2", "--rep", "5", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    fp8 = [r for r in res["rows"] if r["impl"].startswith("flashinfer")]
    assert len(fp8) == 4 and all("error" not in r for r in fp8), fp8
    assert all(r["rel_err_fp32"] < 2e-2 for r in fp8)


def test_gather_dequant_follows_the_page_table():
    """The reference's dense K/V: request b's tokens are pages perm[b*ppr:(b+1)*ppr], in order,
    truncated to L (a partly filled last page), times the scale."""
    B, L, page, ppr = 2, 37, 16, 3
    npages = B * ppr
    torch.manual_seed(0)
    kv = (torch.randn(npages, 2, pf.H, page, pf.D) * 8).to(torch.float8_e4m3fn)
    perm = torch.randperm(npages).to(torch.int32)
    k, v = pf.gather_dequant(kv, perm, B, L, 0.5, 2.0, torch, torch.float32)
    assert k.shape == v.shape == (B, pf.H, L, pf.D)
    for b in range(B):
        pages = [kv[int(p)] for p in perm[b * ppr:(b + 1) * ppr]]       # each [2, H, page, D]
        dense = torch.cat(pages, dim=2)[:, :, :L].float()              # [2, H, ppr*page, D] -> L
        assert torch.equal(k[b], dense[0] * 0.5) and torch.equal(v[b], dense[1] * 2.0)


class _FakeDecodeWrapper:
    """Stands in for flashinfer.BatchDecodeWithPagedKVCacheWrapper on CPU: reads the planned page
    table per request (indptr / indices / last_page_len, HND pages) on its own, not through
    gather_dequant, so the script's cache layout and page table are checked independently."""

    def __init__(self, ws, kv_layout="NHD", use_cuda_graph=False, use_tensor_cores=False,
                 paged_kv_indptr_buffer=None, paged_kv_indices_buffer=None,
                 paged_kv_last_page_len_buffer=None, backend="auto"):
        assert kv_layout == "HND" and use_cuda_graph
        self.bufs = (paged_kv_indptr_buffer, paged_kv_indices_buffer, paged_kv_last_page_len_buffer)
        self.resolved_backend = "fa2"

    def plan(self, indptr, indices, last, hq, h, d, page, **kw):
        assert (hq, h, d) == (pf.HQ, pf.H, pf.D) and kw["kv_data_type"] == torch.float8_e4m3fn
        for buf, x in zip(self.bufs, (indptr, indices, last)):
            buf.copy_(x)
        self.page = page

    def run(self, q, kv, k_scale=None, v_scale=None, out=None):
        indptr, idx, last = self.bufs
        for b in range(q.shape[0]):
            pg = idx[indptr[b]:indptr[b + 1]].long()
            n = (len(pg) - 1) * self.page + int(last[b])
            k = kv[pg, 0].permute(1, 0, 2, 3).reshape(pf.H, -1, pf.D)[:, :n].float() * k_scale
            v = kv[pg, 1].permute(1, 0, 2, 3).reshape(pf.H, -1, pf.D)[:, :n].float() * v_scale
            o = torch.nn.functional.scaled_dot_product_attention(
                q[b].float().view(1, pf.HQ, 1, pf.D), k[None], v[None], enable_gqa=True)
            out[b] = o.view(pf.HQ, pf.D).to(out.dtype)
        return out


def test_whole_run_on_cpu_with_a_fake_flashinfer(monkeypatch, tmp_path):
    import types
    fi = types.ModuleType("flashinfer")
    fi.BatchDecodeWithPagedKVCacheWrapper, fi.__version__ = _FakeDecodeWrapper, "fake"
    timer = types.ModuleType("timer")
    timer.bench = lambda fn, warmup=10, rep=50, graph=False, flush_l2=True: (fn(), 0.5)[1]
    timer.copy_bandwidth, timer.env_header = (lambda: 4000.0), (lambda: "fake")
    monkeypatch.setitem(sys.modules, "flashinfer", fi)
    monkeypatch.setitem(sys.modules, "timer", timer)
    monkeypatch.setattr(pf, "DEVICE", "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: types.SimpleNamespace(name="FakeGPU", multi_processor_count=1))
    out = tmp_path / "fp8.json"
    assert pf.main(["--sizes", "1x40,2x33", "--out", str(out)]) == 0     # partial last pages
    res = json.loads(out.read_text())
    assert res["complete"] and res["gpu"] == "FakeGPU" and len(res["rows"]) == 6
    for r in res["rows"]:
        assert "error" not in r, r
        if r["impl"].startswith("flashinfer"):
            assert r["rel_err_fp32"] < 5e-3 and r["kv_bytes"] == 2 * r["B"] * pf.H * r["L"] * pf.D
            assert r["speedup_vs_sdpa"] == 1.0 and r["TBps"] == r["kv_bytes"] / 0.5 / 1e9
