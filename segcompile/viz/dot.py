"""Graphviz output: one DOT file per pass (clusters per layer, the pass's changes coloured), and
SVG where the ``dot`` program is installed.

Layout cost, measured with Graphviz 2.43 on 2 CPU cores: 0.15 s per graph of the 4-layer tiny
Llama (330 nodes); 2.4 to 6.7 s per graph of the 32-layer one (2,400 to 2,700 nodes), whose
segment_loop graph (removed nodes drawn too) failed with "trouble in init_rank" after more than
100 s. ``newrank=true`` made even the 4-layer graphs take 6-9 s, so it is not used. SVG is
therefore drawn for graphs up to ``SVG_MAX_NODES`` and within ``SVG_TIMEOUT_S``; the DOT file is
always written, and the HTML page is the view that stays readable at any size.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import networkx as nx

from .diff import GraphDiff

SVG_MAX_NODES = 1000
SVG_TIMEOUT_S = 15.0

_STATUS = {  # (border, fill, style)
    "added": ("#1a7f37", "#dafbe1", "filled,rounded,bold"),
    "removed": ("#cf222e", "#ffebe9", "filled,rounded,dashed"),
    "rewired": ("#bc4c00", "#fff1e5", "filled,rounded,bold"),
    "modified": ("#0969da", "#ddf4ff", "filled,rounded"),
}
_KIND_FILL = {"attention": "#fbefff", "segment_attention": "#f0d8ff", "state_in": "#ccfbf1", "state_out": "#ccfbf1"}


def to_dot(after: nx.DiGraph, diff: GraphDiff | None = None, before: nx.DiGraph | None = None, title: str = "") -> str:
    """DOT text of ``after`` plus the nodes ``diff`` says were removed (taken from ``before``)."""
    diff = diff or GraphDiff()
    removed = [n for n in (before.nodes if before is not None else ()) if n in diff.removed]
    clusters: dict[str, list[str]] = {}
    lines = [
        f"digraph {_q(title or after.graph.get('name', 'graph'))} {{",
        '  graph [rankdir=TB, fontname="Helvetica", fontsize=11];',
        '  node [shape=box, style="filled,rounded", fillcolor="#ffffff", color="#8c959f", fontname="Helvetica", fontsize=9];',
        '  edge [color="#8c959f", arrowsize=0.5];',
    ]
    for name, attrs in after.nodes(data=True):
        clusters.setdefault(attrs.get("cluster", ""), []).append(_node(name, attrs, diff.status(name)))
    for name in removed:
        attrs = before.nodes[name]
        clusters.setdefault(attrs.get("cluster", ""), []).append(_node(name, attrs, "removed"))
    labels = {**(before.graph.get("clusters", {}) if before is not None else {}), **after.graph.get("clusters", {})}
    for i, (cluster, node_lines) in enumerate(clusters.items()):
        lines.append(f"  subgraph cluster_{i} {{")
        lines.append(f'    label={_q(labels.get(cluster, cluster))}; style="rounded"; color="#d0d7de";')
        lines += [f"    {line}" for line in node_lines]
        lines.append("  }")
    for u, v in after.edges:
        style = ', color="#bc4c00", penwidth=1.5' if diff.status(v) in ("added", "rewired") else ""
        lines.append(f"  {_q(u)} -> {_q(v)}{(' [' + style[2:] + ']') if style else ''};")
    if before is not None:
        for u, v in before.edges:
            if u in diff.removed or v in diff.removed:
                lines.append(f'  {_q(u)} -> {_q(v)} [style=dashed, color="#cf222e"];')
    lines.append("}")
    return "\n".join(lines) + "\n"


def _node(name: str, attrs: dict, status: str | None) -> str:
    target = attrs.get("target", "") if attrs.get("op") == "call_function" else attrs.get("op", "")
    label = "\n".join(x for x in (name, str(target).removesuffix(".default"), attrs.get("value", "")) if x)
    style = []
    kind = attrs.get("kind")
    if status in _STATUS:
        color, fill, how = _STATUS[status]
        style.append(f'color="{color}", fillcolor="{fill}", style="{how}"')
    elif kind in _KIND_FILL:
        style.append(f'fillcolor="{_KIND_FILL[kind]}"')
    if kind in ("attention", "segment_attention"):
        attn = attrs.get("notes", {}).get("attention", {})
        label += f"\nlayer {attn.get('layer')} long-range KV {attn.get('long_range')}"
        style.append("penwidth=2")
    extra = (", " + ", ".join(style)) if style else ""
    return f"{_q(name)} [label={_q(label)}{extra}];"


def _q(text: str) -> str:
    return '"' + str(text).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def dot_program() -> str | None:
    return shutil.which("dot")


def render_svgs(jobs: list[tuple[Path, Path]], timeout: float = SVG_TIMEOUT_S) -> list[Path]:
    """Run ``dot -Tsvg`` on every (dot file, svg file) pair, all at once; returns the SVGs written.

    A layout that fails or is not done ``timeout`` seconds after the start is skipped (its DOT
    file stays).
    """
    program = dot_program()
    if program is None or not jobs:
        return []
    deadline = time.monotonic() + timeout
    running = []
    for dot_file, svg_file in jobs:
        tmp = svg_file.with_name(f".{svg_file.name}.tmp")
        proc = subprocess.Popen([program, "-Tsvg", "-o", str(tmp), str(dot_file)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        running.append((proc, tmp, svg_file))
    written = []
    for proc, tmp, svg_file in running:
        try:
            ok = proc.wait(timeout=max(0.0, deadline - time.monotonic())) == 0
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            ok = False
        if ok and tmp.exists():
            tmp.replace(svg_file)
            written.append(svg_file)
        else:
            tmp.unlink(missing_ok=True)
    return written
