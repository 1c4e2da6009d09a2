"""qjl-compile CLI: inspect on the tiny model, bad arguments, bench/demo pass-through."""
import subprocess
import sys
import types
from pathlib import Path

import pytest

from qjl_compile import cli


def test_inspect_tiny_writes_graphs_and_lists_every_layer(tmp_path, capsys):
    out = tmp_path / "dump"
    rc = cli.main(["inspect", "--tiny-layers", "3", "--phase", "both", "--out", str(out),
                   "--config", "residual=32", "sketch_dim=64"])
    assert rc == 0
    text = capsys.readouterr().out
    rows = [ln for ln in text.splitlines() if ln.startswith("| ")][1:]  # skip the header row
    assert len(rows) == 2 * 3
    for phase in ("prefill", "decode"):
        layers = sorted(int(r.split("|")[3]) for r in rows if r.split("|")[1].strip() == phase)
        assert layers == [0, 1, 2]
    assert all("qjl.attend" in r and "qjl.dequantize + repeat_kv x2 + mask" in r for r in rows)
    assert "6 attention site(s), 6 rewritten" in text
    names = sorted(p.name for p in out.iterdir())
    for phase in ("prefill", "decode"):
        for stage in ("0_before_passes", "1_after_fuse_qjl_attention", "2_after_detect_uncompressed_cache"):
            for ext in (".py", ".txt"):
                assert any(n.startswith(phase) and n.endswith(stage + ext) for n in names), (phase, stage, names)
    before = next(out.glob("decode_*_0_before_passes.py")).read_text()
    after = next(out.glob("decode_*_1_after_fuse_qjl_attention.py")).read_text()
    assert "qjl.dequantize" in before and "scaled_dot_product_attention" in before
    assert "qjl.dequantize" not in after and after.count("qjl.attend") == 3
    table = next(out.glob("decode_*_1_after_fuse_qjl_attention.txt")).read_text()
    assert "opcode" in table and "attend_default" in table


def test_inspect_tiny_hybrid_rewrites_full_layers_and_shows_sliding_ones_exact(tmp_path, capsys):
    """Gemma 3 layers [sliding, full]: decode rewrites the full layer and lists the sliding one as exact."""
    import warnings

    from qjl_compile import diagnostics

    diagnostics.reset()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        rc = cli.main(["inspect", "--model", "tiny-hybrid", "--out", str(tmp_path / "d"), "--config", "residual=32",
                       "sketch_dim=64"])
    assert rc == 0
    text = capsys.readouterr().out
    rows = [[c.strip() for c in ln.split("|")] for ln in text.splitlines() if ln.startswith("| decode")]
    by_layer = {int(r[3]): r for r in rows}
    assert sorted(by_layer) == [0, 1]
    assert by_layer[0][5:7] == ["QJLCache sliding window (exact)", "unchanged (exact)"]
    assert by_layer[1][6].startswith("qjl.attend")
    assert "2 attention site(s), 1 rewritten to qjl.attend, 1 left exact (sliding-window layers, by design)" in text
    assert not [x for x in w if "uncompressed" in str(x.message) or "not fused" in str(x.message)]


@pytest.mark.parametrize("argv", [
    [],
    ["frobnicate"],
    ["inspect", "--phase", "sideways"],
    ["inspect", "--config", "nonsense=1"],
    ["inspect", "--config", "sketch_dim=seven"],
    ["inspect", "--config", "sketch_dim=7"],
    ["inspect", "--config", "noequals"],
    ["inspect", "--preset", "nope"],
    ["inspect", "--prompt-len", "x"],
    ["inspect", "--model", "/no/such/folder"],
    ["bench", "nope"],
])
def test_bad_arguments_one_line_exit_2(argv, capsys):
    try:
        rc = cli.main(argv)
    except SystemExit as e:
        rc = e.code
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("qjl-compile: error:"), err


def test_help_is_complete(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["inspect", "--help"])
    assert e.value.code == 0
    h = capsys.readouterr().out
    for opt in ("--model", "--preset", "--config", "--out", "--phase", "sketch_dim", "smollm2"):
        assert opt in h
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    h = capsys.readouterr().out
    assert all(c in h for c in ("inspect", "bench", "demo"))


def test_bench_passes_arguments_through(tmp_path, monkeypatch):
    (tmp_path / "e2e.py").write_text("import sys, pathlib\n"
                                     "pathlib.Path(sys.argv[-1]).write_text(' '.join(sys.argv[1:]))\n")
    monkeypatch.setattr(cli, "benchmarks_dir", lambda: tmp_path)
    rc = cli.main(["bench", "e2e", "--quick", "--n", "3", str(tmp_path / "got.txt")])
    assert rc == 0
    assert (tmp_path / "got.txt").read_text() == f"--quick --n 3 {tmp_path / 'got.txt'}"
    (tmp_path / "kbench.py").write_text("raise SystemExit(3)\n")
    assert cli.main(["bench", "kernels"]) == 3


def test_bench_without_checkout(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "benchmarks_dir", lambda: tmp_path / "missing")
    assert cli.main(["bench", "accuracy"]) == 1
    err = capsys.readouterr().err
    assert "source checkout" in err and len(err.strip().splitlines()) == 1


def test_demo_calls_qjl_compile_demo_main(monkeypatch):
    got = {}
    fake = types.ModuleType("qjl_compile.demo")

    def main(argv=None):
        got["argv"] = argv
        return 0

    fake.main = main
    monkeypatch.setitem(sys.modules, "qjl_compile.demo", fake)
    assert cli.main(["demo", "--max-new-tokens", "5"]) == 0
    assert got["argv"] == ["--max-new-tokens", "5"]


def test_console_script_installed():
    exe = Path(sys.executable).with_name("qjl-compile")
    if not exe.exists():
        pytest.skip("console script not installed in this environment")
    r = subprocess.run([str(exe), "inspect", "--phase", "nope"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.count("\n") == 1


def test_benchmark_scripts_shadow_no_installed_module():
    # `bench NAME` puts benchmarks/ first on sys.path; a script named like an installed module (kernels.py vs
    # the PyPI package `kernels` that transformers >= 5.25 imports) would replace it for the whole run
    import importlib.util
    root = cli.benchmarks_dir()
    specs = {p.stem: importlib.util.find_spec(p.stem) for p in sorted(root.glob("*.py"))}
    # namespace portions (origin None, e.g. tests/e2e/) lose to a module file earlier on sys.path: no clash
    clash = {n: s.origin for n, s in specs.items() if s is not None and s.origin and not s.origin.startswith(str(root))}
    assert clash == {}
