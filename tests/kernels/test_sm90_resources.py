"""Every append launch fits an H100's shared memory (compiled for sm_90 on CPU, nothing runs).

The append kernels have no smaller-tile retry (the attends do), so a configuration that asks for
more than the 227 KB an H100 block may use fails at its first launch on the GPU. These checks
compile each codec's append for sm_90 in a subprocess (the CPU suite imports the kernels in
interpreter mode) over dtypes, head dims and codec options, and read the shared memory Triton
allocated. They skip where the offline compile cannot be set up (see sm90.py).
"""
import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))

SCRIPT = r"""
import json, sys
sys.path.insert(0, HERE)
import torch
import sm90
try:
    off = sm90.Offline().__enter__()
except sm90.Unavailable as e:
    print(json.dumps({"unavailable": str(e)})); raise SystemExit(0)
import test_triton_rotation as R, test_triton_qjl as Q, test_triton_decoquant as DQ
from qjl_compile.kernels.triton.rotation import rotation_append_
from qjl_compile.kernels.triton.qjl_append import qjl_append_
from qjl_compile.kernels.triton.decoquant import decoquant_append_
out = []
def rec(label, fn):
    off.launches.clear()
    fn()
    out.append([label, max(l.shared for l in off.launches), [l.name for l in off.launches]])
for dt in (torch.float16, torch.float32):
    for D in (64, 128):
        k = torch.randn(1, 2, 130, D, dtype=dt)
        for name in ("rotation-k4v3", "k3v2-unbiased-kv", "k4v4-match-unbiased"):
            st, consts, meta = R.make(1, 2, D, 512, 128, R.PRESETS[name], dt, dev="cpu")
            rec(f"rotation {name} {dt} D={D}", lambda: rotation_append_(st, consts, k, k, meta))
        st, consts, meta = Q.make(1, 2, D, 512, 128, 2 * D, D, 8, dtype=dt, dev="cpu")
        rec(f"qjl {dt} D={D}", lambda: qjl_append_(st, consts, k, k, meta))
        if dt == torch.float16:   # the fitted key norm (QJLConfig.qjl_key_scale="match"): one more dot per chunk
            rec(f"qjl fit {dt} D={D}", lambda: qjl_append_(st, consts, k, k, meta + [0, 0, 0, 1]))
        st, consts, meta = DQ.make(1, 2, D, 512, 128, 4, dtype=dt, dev="cpu")
        rec(f"decoquant {dt} D={D}", lambda: decoquant_append_(st, consts, k, k, meta))
print(json.dumps({"rows": out}))
"""


def test_appends_fit_h100_shared_memory():
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")]))
    p = subprocess.run([sys.executable, "-c", f"HERE = {HERE!r}\n" + SCRIPT], env=env, capture_output=True,
                       text=True, timeout=1200)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    if "unavailable" in res:
        pytest.skip(f"offline sm_90 compile unavailable: {res['unavailable']}")
    import sm90
    over = [(label, smem) for label, smem, _ in res["rows"] if smem > sm90.H100_SMEM]
    assert res["rows"] and not over, f"shared memory over {sm90.H100_SMEM} B: {over}"
