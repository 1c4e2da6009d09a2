"""A small pass manager: an ordered list of graph passes run on the Dynamo FX graph.

Each pass is a callable object with a ``name``; it rewrites ``gm.graph`` in place and returns how
many changes it made. The manager recompiles and lints after a pass that changed something,
calls an optional observer before the first pass and after each pass (the `inspect` CLI dumps
graphs there), and collects one `Site` record per attention it saw, so callers can report what
happened to every attention without re-deriving it. Counters live in
``torch._dynamo.utils.counters["qjl"]``; reasons for skipping go to ``logging`` at debug level.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Optional, Protocol, Sequence

import torch
from torch import fx
from torch._dynamo.utils import counters

log = logging.getLogger("qjl_compile.passes")


@dataclass
class Site:
    """One attention call site in one graph, and what the passes made of it."""
    graph: str
    node: str
    layer: Optional[int]
    matched: str = "-"
    became: str = "unchanged"
    reason: str = ""
    source: str = ""  # the qjl.dequantize node feeding it, when it attends over the QJL cache


class PassContext:
    """State shared by the passes over one graph: its name and the attention sites found."""

    def __init__(self, graph_name: str = "graph"):
        self.graph_name = graph_name
        self.sites: dict[str, Site] = {}

    def site(self, node: fx.Node, layer: Optional[int]) -> Site:
        s = self.sites.get(node.name)
        if s is None:
            s = self.sites[node.name] = Site(self.graph_name, node.name, layer)
        return s


class GraphPass(Protocol):
    name: str

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> int: ...


Observer = Callable[[str, fx.GraphModule, PassContext], None]


def bump(key: str, n: int = 1) -> None:
    counters["qjl"][key] += n


class PassManager:
    """Run `passes` in order on a GraphModule.

    Parameters
    ----------
    passes : sequence of GraphPass
        Callables ``pass_(gm, ctx) -> int`` with a ``name`` attribute.
    """

    def __init__(self, passes: Sequence[GraphPass]):
        names = [p.name for p in passes]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate pass names: {names}")
        self.passes = list(passes)

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.passes]

    def run(self, gm: fx.GraphModule, ctx: Optional[PassContext] = None,
            observer: Optional[Observer] = None) -> PassContext:
        ctx = ctx or PassContext()
        bump("graphs")
        if observer is not None:
            observer("input", gm, ctx)
        for p in self.passes:
            changed = p(gm, ctx)
            if changed:
                gm.graph.lint()
                gm.recompile()
            log.debug("pass %s on %s: %d change(s)", p.name, ctx.graph_name, changed)
            if observer is not None:
                observer(p.name, gm, ctx)
        return ctx


def default_passes() -> list[GraphPass]:
    """The backend's pipeline, in order."""
    from .fuse_attention import FuseQJLAttention
    from .detect_uncompressed import DetectUncompressedCache
    from .grouped_sdpa import GroupedSDPA
    return [FuseQJLAttention(), DetectUncompressedCache(), GroupedSDPA()]


def select_passes(names: Optional[Sequence[str]] = None) -> list[GraphPass]:
    """The default pipeline, or the named subset of it (in pipeline order)."""
    ps = default_passes()
    if names is None:
        return ps
    known = {p.name for p in ps}
    bad = [n for n in names if n not in known]
    if bad:
        raise ValueError(f"unknown pass(es) {bad}; known: {sorted(known)}")
    return [p for p in ps if p.name in set(names)]


def run_passes(gm: fx.GraphModule, names: Optional[Sequence[str]] = None, graph_name: str = "graph",
               observer: Optional[Observer] = None) -> PassContext:
    """Run the default pipeline (or the named passes) on `gm` in place; returns the context with its sites."""
    return PassManager(select_passes(names)).run(gm, PassContext(graph_name), observer)


def erase_dead(graph: fx.Graph, nodes) -> list:
    """Erase those of `nodes` that are (or become, as others are erased) unused; returns the erased nodes."""
    pending = list(dict.fromkeys(n for n in nodes if n is not None and n.op in ("call_function", "call_method")))
    erased = []
    progress = True
    while progress:
        progress = False
        for n in list(pending):
            if not n.users:
                graph.erase_node(n)
                pending.remove(n)
                erased.append(n)
                progress = True
    return erased


__all__ = ["Site", "PassContext", "PassManager", "GraphPass", "Observer", "default_passes", "select_passes",
           "run_passes", "erase_dead", "bump"]
