"""A small pass manager: runs named passes in order and can dump the graph after each one."""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch.fx as fx

from .. import ir
from ..files import atomic_dir, atomic_write_text, check_replaceable_dir

log = logging.getLogger(__name__)

Pass = Callable[[fx.GraphModule], fx.GraphModule]

# What a dump folder holds: NN-<pass>.txt/.html/.dot/.svg, index.html, and the temporary files of
# an atomic write that an interrupted run may have left. A folder of nothing else is an earlier
# dump, which a new one replaces as a whole.
DUMP_FILE = re.compile(r"\d{2,}-\w+\.(txt|html|dot|svg)|index\.html|\..+\.tmp")


def is_dump_file(name: str) -> bool:
    """Whether a file called ``name`` is one a pass dump writes (``DUMP_FILE``)."""
    return DUMP_FILE.fullmatch(name) is not None


def check_dump_dir(dump_dir: str | os.PathLike, what: str | None = None) -> None:
    """Raise ``OutputPathError`` (a ``SegcompileError``) unless a dump can go to ``dump_dir``: a
    place that can be written, missing, empty or holding an earlier dump. Cheap: for callers that
    know the folder before the expensive work (capture)."""
    check_replaceable_dir(dump_dir, is_dump_file, what)


class PassManager:
    """Runs ``passes`` (a list of functions ``GraphModule -> GraphModule``) in order.

    With ``dump_dir`` it writes ``NN-<pass>.txt`` after each pass (``00-capture.txt`` for the
    input graph): the generated code plus one line per node with its shape and module. It also
    keeps a ``networkx`` snapshot of the graph after each pass (``graphs``) and at the end writes
    the visualiser's pages there (``segcompile.viz``): ``index.html``, ``NN-<pass>.html``,
    ``NN-<pass>.dot``, and ``NN-<pass>.svg`` where Graphviz's ``dot`` is installed.
    All of it is written to a temporary folder beside ``dump_dir``, renamed into place when the
    last page is written (``files.atomic_dir``): a pass that raises (a plan the model refuses, say)
    or an interruption leaves no folder of partial dumps. ``dump_dir`` must be missing, empty or
    an earlier dump (``check_dump_dir``), which is replaced as a whole.
    Seconds per pass end up in ``timings`` and ``gm.meta[ir.PASS_TIMINGS]``; seconds
    spent on dumps, snapshots and pages in ``dump_seconds`` and ``gm.meta[ir.DUMP_SECONDS]``.
    """

    def __init__(self, passes: Sequence[Pass], dump_dir: str | os.PathLike | None = None):
        self.passes = list(passes)
        self.dump_dir = Path(dump_dir) if dump_dir is not None else None
        if self.dump_dir is not None:
            check_dump_dir(self.dump_dir, f"dump_dir {self.dump_dir}")
        self.timings: dict[str, float] = {}
        self.graphs: list = []  # networkx.DiGraph snapshots, one per dump
        self.dump_seconds = 0.0
        self.index_html: Path | None = None
        self._writing: Path | None = None  # the temporary folder the dumps go to while the passes run

    def __call__(self, gm: fx.GraphModule) -> fx.GraphModule:
        if self.dump_dir is None:
            return self._run(gm)
        with atomic_dir(self.dump_dir, is_dump_file) as folder:
            self._writing = folder
            try:
                gm = self._run(gm)
                self._write_pages(gm)
            finally:
                self._writing = None
        self.index_html = self.dump_dir / "index.html"
        return gm

    def _run(self, gm: fx.GraphModule) -> fx.GraphModule:
        self._dump(gm, 0, "capture", INPUT_GRAPH_DOC)
        for i, p in enumerate(self.passes, start=1):
            start = time.perf_counter()
            gm = p(gm)
            self.timings[p.__name__] = time.perf_counter() - start
            log.debug("after %s:\n%s", p.__name__, gm.graph)
            self._dump(gm, i, p.__name__, _first_line(p.__doc__))
        gm.meta[ir.PASS_TIMINGS] = dict(self.timings)
        return gm

    def _write_pages(self, gm: fx.GraphModule) -> None:
        from ..viz import write_pages

        start = time.perf_counter()
        write_pages(self.graphs, self._writing, self.timings)
        self.dump_seconds += time.perf_counter() - start
        gm.meta[ir.DUMP_SECONDS] = self.dump_seconds

    def _dump(self, gm: fx.GraphModule, index: int, name: str, doc: str) -> None:
        if self._writing is None:
            return
        from ..viz import graph_of

        start = time.perf_counter()
        atomic_write_text(self._writing / f"{index:02d}-{name}.txt", describe_graph(gm, name))
        snapshot = graph_of(gm, name)
        snapshot.graph["doc"] = doc
        self.graphs.append(snapshot)
        self.dump_seconds += time.perf_counter() - start


INPUT_GRAPH_DOC = "The captured graph the passes start from."


def _first_line(doc: str | None) -> str:
    return (doc or "").strip().split("\n", 1)[0]


def describe_graph(gm: fx.GraphModule, title: str) -> str:
    lines = [f"# graph after {title}", f"# {len(gm.graph.nodes)} nodes", ""]
    lines.append(gm.print_readable(print_output=False, include_stride=False, colored=False))
    lines += ["", "# nodes: name | op | target | value | module"]
    for node in gm.graph.nodes:
        lines.append(" | ".join([node.name, node.op, _target(node), _value(node), _module(node)]))
    return "\n".join(lines) + "\n"


def _target(node: fx.Node) -> str:
    return re.sub(r"\s+", " ", str(node.target))


def _value(node: fx.Node) -> str:
    val = node.meta.get("val")
    if hasattr(val, "shape"):
        return f"{str(val.dtype).removeprefix('torch.')}{list(val.shape)}"
    state = node.meta.get(ir.STATE)
    return f"state of layer {state[0]}: {state[1]}" if state else ""


def _module(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""
