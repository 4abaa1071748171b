"""The pages: ``index.html`` (the passes in order) and one self-contained page per pass.

A pass page shows the graph after the pass with the nodes it removed put back where they were,
everything the pass added, removed, rewired or modified coloured; the nodes grouped by cluster
(layer) and module into collapsible folders, a map of the clusters with the values that cross
them, search by name, and a details panel (op, target, dtype and shape, module, source line,
attention site and head plan, carried state). The graph travels inside the page as JSON and
the inlined script (``assets.py``) draws it: nothing is fetched, the page works offline.

Every file is written atomically, and the pass manager (``passes.manager``) has them all
written in a temporary folder that it renames into place once ``index.html`` is written, so that
a run that fails or is interrupted leaves no pages. Measured on the built-in tiny Llama (bench/viz_pages.py, 2 CPU
cores): the largest page is 0.12 MB at 4 layers and 0.65 MB at 32 layers (2,400 to 2,700 nodes a
graph); all pages of the 32-layer model take 1.6 s.
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import networkx as nx

from ..files import atomic_write_text
from .assets import SCRIPT, STYLE
from .diff import GraphDiff, diff_graphs, input_names
from .dot import SVG_MAX_NODES, render_svgs, to_dot
from .graph import TOP

SPECIAL_CLUSTERS = {"inputs": "graph inputs", "outputs": "graph outputs", TOP: "(top level)"}
DOT_SEP = " \u00b7 "
_SIGNS = {"added": "+", "removed": "\u2212", "rewired": "~", "modified": "*"}


@dataclass
class PassPage:
    """One pass as written: its graph, what it changed, and the files."""

    index: int
    name: str
    graph: nx.DiGraph
    diff: GraphDiff
    seconds: float | None
    stem: str  # "03-segment_loop": the page is stem.html, the graph stem.dot (and stem.svg)
    svg: bool = False

    @property
    def page(self) -> str:
        return f"{self.stem}.html"


def write_pages(
    graphs: Sequence[nx.DiGraph],
    out_dir: str | os.PathLike,
    seconds: Mapping[str, float] | None = None,
    *,
    svg: bool = True,
) -> Path:
    """Write ``index.html``, ``NN-<pass>.html`` and ``NN-<pass>.dot`` (+ ``.svg``) for ``graphs``.

    ``graphs``: the snapshots in pipeline order (``graph_of``), the first one the graph the
    passes start from. ``seconds``: time per pass name, shown in the index. ``svg``: draw SVG
    with Graphviz where ``dot`` is installed, for graphs up to ``SVG_MAX_NODES``. Returns the
    path of ``index.html``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seconds = seconds or {}
    pages: list[PassPage] = []
    for i, g in enumerate(graphs):
        name = g.graph.get("name", f"pass{i}")
        before = graphs[i - 1] if i else None
        pages.append(PassPage(i, name, g, diff_graphs(before, g), seconds.get(name), f"{i:02d}-{name}"))

    svg_jobs = []
    for page in pages:
        before = graphs[page.index - 1] if page.index else None
        atomic_write_text(out / page.page, pass_page(page, before, pages))
        dot_file = atomic_write_text(out / f"{page.stem}.dot", to_dot(page.graph, page.diff, before, page.stem))
        (out / f"{page.stem}.svg").unlink(missing_ok=True)  # a drawing from an earlier run would not match
        if svg and page.graph.number_of_nodes() <= SVG_MAX_NODES:
            svg_jobs.append((dot_file, out / f"{page.stem}.svg"))
    if svg_jobs:
        drawn = {p.name for p in render_svgs(svg_jobs)}
        for page in pages:
            page.svg = f"{page.stem}.svg" in drawn
    return atomic_write_text(out / "index.html", index_page(pages, out))


# ---- page data -------------------------------------------------------------------------------
def page_data(before: nx.DiGraph | None, after: nx.DiGraph, diff: GraphDiff) -> dict:
    """The JSON a pass page carries: nodes in order (removed ones where they were), clusters,
    modules, source lines (each once) and the segment config."""
    modules = {**(before.graph.get("modules", {}) if before is not None else {}), **after.graph.get("modules", {})}
    labels = {**(before.graph.get("clusters", {}) if before is not None else {}), **after.graph.get("clusters", {})}
    order = _merged_order(before, after, diff)
    # clusters in the order the computation reaches them: graph inputs, then by their first
    # computing node that the trace placed in a module. Parameters (get_attr), the carried-state
    # inputs and size computations all come first in the graph and would otherwise put every
    # layer before the embedding.
    first: dict[str, tuple[int, int]] = {}
    for position, (name, g) in enumerate(order):
        attrs = g.nodes[name]
        cluster = attrs.get("cluster", "inputs")
        traced = attrs.get("op") not in ("get_attr", "placeholder") and not attrs.get("module_inferred")
        rank = 0 if cluster == "inputs" else 1 if traced else 2
        first[cluster] = min(first.get(cluster, (rank, position)), (rank, position))
    clusters = {c: i for i, c in enumerate(sorted(first, key=first.__getitem__))}
    cluster_list = [
        {"id": c, "label": labels.get(c, SPECIAL_CLUSTERS.get(c, c)), "short": SPECIAL_CLUSTERS.get(c, c)}
        for c in clusters
    ]
    sources: dict[tuple[str, str], int] = {}
    nodes = []
    for name, g in order:
        attrs = g.nodes[name]
        cluster = attrs.get("cluster", "inputs")
        rec = {"n": name, "o": attrs.get("op", ""), "t": attrs.get("target", ""), "k": attrs.get("kind", "call"),
               "c": clusters[cluster]}
        if attrs.get("value"):
            rec["v"] = attrs["value"]
        if "module" in attrs:
            rec["m"] = attrs["module"]
            if attrs.get("module_inferred"):
                rec["mi"] = 1
        if attrs.get("source"):
            key = (attrs["source"], attrs.get("code", ""))
            rec["s"] = sources.setdefault(key, len(sources))
        inputs = attrs.get("inputs")
        inputs = list(inputs) if inputs is not None else input_names(g, name)
        if inputs:
            rec["i"] = inputs
        if attrs.get("args"):
            rec["a"] = attrs["args"]
        if attrs.get("notes"):
            rec["x"] = attrs["notes"]
        status = diff.status(name)
        if status:
            rec["d"] = status
        if status in ("rewired", "modified") and before is not None:
            old = before.nodes[name]
            old_inputs = old.get("inputs")
            old_inputs = list(old_inputs) if old_inputs is not None else input_names(before, name)
            if old_inputs != inputs:
                rec["p"] = old_inputs
            if old.get("target") != attrs.get("target"):
                rec["pt"] = old.get("target", "")
            if old.get("args") != attrs.get("args"):
                rec["pa"] = old.get("args", "")
        nodes.append(rec)
    return {
        "pass": after.graph.get("name", ""),
        "model": after.graph.get("model", ""),
        "config": after.graph.get("config", {}),
        "modules": modules,
        "clusters": cluster_list,
        "sources": [list(k) for k in sources],
        "nodes": nodes,
    }


def _merged_order(before: nx.DiGraph | None, after: nx.DiGraph, diff: GraphDiff) -> list[tuple[str, nx.DiGraph]]:
    """``after``'s nodes in order, each removed node right after the last node that preceded it
    in ``before`` and survived the pass."""
    if before is None or not diff.removed:
        return [(n, after) for n in after.nodes]
    following: dict[str | None, list[str]] = {}
    last = None
    for name in before.nodes:
        if name in diff.removed:
            following.setdefault(last, []).append(name)
        else:
            last = name
    order = [(n, before) for n in following.get(None, [])]
    for name in after.nodes:
        order.append((name, after))
        order += [(n, before) for n in following.get(name, [])]
    return order


def _json_for_script(data: dict) -> str:
    """JSON that cannot close its ``<script>`` element."""
    text = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


# ---- HTML ------------------------------------------------------------------------------------
_LEGEND = '<span class="legend">' + "".join(
    f'<span><i class="sw" style="background:var(--{var}-bg);border-color:var(--{var})"></i>{label}</span>'
    for var, label in [
        ("added", "added"),
        ("removed", "removed"),
        ("rewired", "rewired (inputs or target)"),
        ("modified", "modified (arguments, annotations)"),
        ("attn", "attention"),
        ("state", "carried state"),
    ]
) + "</span>"


def _head(title: str) -> str:
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<title>{html.escape(title)}</title>\n"
        "<!-- segcompile pass visualiser. The style and script below were written for segcompile and "
        "contain no third-party code; the page loads nothing from the network. -->\n"
        f"<style>{STYLE}</style>\n</head>\n"
    )


def _nav(pages: Sequence[PassPage], current: int | None) -> str:
    links = ['<a href="index.html"' + (' class="current"' if current is None else "") + ">index</a>"]
    for p in pages:
        cls = ' class="current"' if p.index == current else ""
        links.append(f'<a href="{html.escape(p.page)}"{cls}>{p.index:02d} {html.escape(p.name)}</a>')
    return '<nav class="passes">' + "".join(links) + "</nav>"


def _diff_summary(diff: GraphDiff, first: bool) -> str:
    if first:
        return "the graph the passes start from"
    counts = diff.counts()
    if not any(counts.values()):
        return "no node changed"
    return "  ".join(f"{_SIGNS[k]}{v} {k}" for k, v in counts.items() if v)


def pass_page(page: PassPage, before: nx.DiGraph | None, pages: Sequence[PassPage]) -> str:
    data = page_data(before, page.graph, page.diff)
    g = page.graph
    title = f"{page.index:02d} {page.name}"
    sub = [g.graph.get("model", ""), f"{g.number_of_nodes()} nodes", _diff_summary(page.diff, page.index == 0)]
    if page.seconds is not None:
        sub.append(f"{page.seconds:.2f} s")
    doc = g.graph.get("doc", "")
    return (
        _head(f"{title} \u2014 segcompile passes")
        + f'<body class="pass-page" data-page="pass" data-pass="{html.escape(page.name)}">\n<header>\n'
        + f"<h1>{html.escape(title)}</h1>"
        + f'<span class="sub">{html.escape(DOT_SEP.join(s for s in sub if s))}</span> '
        + (f'<span class="sub">\u2014 {html.escape(doc)}</span>' if doc else "")
        + "\n<div class=\"toolbar\">" + _nav(pages, page.index) + "</div>\n"
        + '<div class="toolbar"><input type="search" id="search" placeholder="search nodes by name (Enter: go to first)" '
        + 'aria-label="search nodes by name"> <span id="match-count"></span>'
        + '<label><input type="checkbox" id="changed-only"> changed only</label>'
        + '<button id="expand" type="button">expand all</button><button id="collapse" type="button">collapse all</button>'
        + _LEGEND + "</div>\n</header>\n"
        + '<pre id="errors"></pre>\n'
        + '<main><section id="map" aria-label="clusters"></section><section id="tree" aria-label="nodes"></section>'
        + '<section id="details" aria-label="details"></section></main>\n'
        + f'<script type="application/json" id="graph-data">{_json_for_script(data)}</script>\n'
        + f"<script>{SCRIPT}</script>\n</body>\n</html>\n"
    )


def index_page(pages: Sequence[PassPage], out: Path) -> str:
    last = pages[-1].graph if pages else nx.DiGraph()
    model = last.graph.get("model", "")
    cfg = last.graph.get("config", {})
    e = html.escape
    parts = [_head(f"segcompile passes \u2014 {model}"), '<body data-page="index">\n<header>\n',
             f"<h1>segcompile passes</h1><span class=\"sub\">{e(model)}</span>\n",
             '<div class="toolbar">' + _nav(pages, None) + "</div>\n</header>\n<pre id=\"errors\"></pre>\n",
             '<div class="index">\n']
    if cfg:
        parts.append(
            f"<p>Segments: S = {cfg.get('segment_len')}, tail T = {cfg.get('tail_len')}, sinks G = "
            f"{cfg.get('sink_tokens')}, tbptt_k = {cfg.get('tbptt_k')}; head plan "
            f"<code>{e(str(cfg.get('long_range')))}</code>.</p>\n"
        )
    parts.append("<h2>Passes, in the order they ran</h2>\n<table id=\"passes\"><thead><tr><th>#</th><th>pass</th>"
                 "<th>what it does</th><th>nodes</th><th>+ added</th><th>\u2212 removed</th><th>~ rewired</th>"
                 "<th>* modified</th><th>seconds</th><th>files</th></tr></thead><tbody>\n")
    for p in pages:
        counts = p.diff.counts()
        files = [f'<a href="{e(p.page)}">page</a>', f'<a href="{e(p.stem)}.dot">DOT</a>']
        if p.svg:
            files.append(f'<a href="{e(p.stem)}.svg">SVG</a>')
        if (out / f"{p.stem}.txt").exists():
            files.append(f'<a href="{e(p.stem)}.txt">text</a>')
        cells = "".join(f'<td class="num">{counts[k] if p.index else ""}</td>' for k in counts)
        seconds = f"{p.seconds:.2f}" if p.seconds is not None else ""
        parts.append(
            f'<tr class="pass" data-pass="{e(p.name)}"><td class="num">{p.index:02d}</td>'
            f'<td><a href="{e(p.page)}"><b>{e(p.name)}</b></a></td><td>{e(p.graph.graph.get("doc", ""))}</td>'
            f'<td class="num">{p.graph.number_of_nodes()}</td>{cells}<td class="num">{seconds}</td>'
            f"<td>{DOT_SEP.join(files)}</td></tr>\n"
        )
    parts.append("</tbody></table>\n")
    parts.append(_sites_table(pages))
    parts.append(_state_summary(last))
    parts.append(
        "<p>Each pass page shows the graph after the pass, with the nodes it removed shown where they were. "
        f"Colours: {_LEGEND}. Nodes are grouped by layer and module; search by name; click a node for its op, "
        "target, dtype and shape, module, source line, attention site and carried state.</p>\n"
        "</div>\n"
        f"<script>{SCRIPT}</script>\n</body>\n</html>\n"
    )
    return "".join(parts)


def _sites_table(pages: Sequence[PassPage]) -> str:
    if not pages:
        return ""
    last = pages[-1]
    e = html.escape
    rows = []
    for name, attrs in last.graph.nodes(data=True):
        a = attrs.get("notes", {}).get("attention")
        if not a:
            continue
        local = [h for h in range(a["kv_heads"]) if h not in a["long_range"]]
        rows.append(
            f'<tr class="site" data-kind="{attrs["kind"]}"><td class="num">{a["layer"]}</td>'
            f'<td><code>{e(a["module"])}</code></td>'
            f'<td><a href="{e(last.page)}#{e(name)}"><code>{e(name)}</code></a></td><td>{e(attrs["kind"])}</td>'
            f'<td class="num">{a["heads"]}</td><td class="num">{a["kv_heads"]}</td>'
            f"<td>{a['long_range']}</td><td>{local}</td><td class=\"num\">{a['scale']:g}</td>"
            f"<td>{e(a.get('impl', ''))}</td></tr>\n"
        )
    if not rows:
        return ""
    return ("<h2>Attention sites after the last pass</h2>\n<table id=\"sites\"><thead><tr><th>layer</th><th>module</th>"
            "<th>node</th><th>kind</th><th>heads</th><th>KV heads</th><th>long-range KV heads</th><th>local KV heads</th>"
            "<th>scale</th><th>impl</th></tr></thead><tbody>\n" + "".join(rows) + "</tbody></table>\n")


def _state_summary(g: nx.DiGraph) -> str:
    state = [attrs["notes"]["state"] for _, attrs in g.nodes(data=True) if "state" in attrs.get("notes", {})]
    if not state:
        return ""
    ins = sum(s["direction"] == "in" for s in state)
    outs = len(state) - ins
    layers = len({s["layer"] for s in state})
    names_in = sorted({s["name"] for s in state if s["direction"] == "in"})
    names_out = sorted({s["name"] for s in state if s["direction"] == "out"})
    return (
        f'<p id="state">Carried state of the segment-step graph: <b>{ins}</b> inputs and <b>{outs}</b> outputs over '
        f"{layers} layers (in: {', '.join(names_in)}; out: {', '.join(names_out)}).</p>\n"
    )
