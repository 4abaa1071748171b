"""The pass visualiser: the diff logic, the pages of a 4-layer Llama, the page in a real browser, the CLI."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path

import networkx as nx
import pytest
import torch
import torch.fx as fx
from conftest import captured, make_model

import segcompile as sc
from segcompile.cli.main import main
from segcompile.viz import diff_graphs, graph_of, to_dot
from segcompile.viz.pages import page_data

PASSES = ["capture", "find_attention", "plan_heads", "segment_loop", "lower"]
LAYERS = 4
STATE_NAMES = ["sink_k", "sink_v", "hist_k", "hist_v", "tail_k", "tail_v", "current_k", "current_v"]


def graph_data(page: Path) -> dict:
    """The JSON a pass page carries (what its script draws)."""
    match = re.search(r'<script type="application/json" id="graph-data">(.*?)</script>', page.read_text(), re.S)
    assert match, f"{page.name} has no graph data"
    return json.loads(match.group(1))


# ---- the diff, on hand-made graphs -------------------------------------------------------------
def chain(*edges, **targets) -> nx.DiGraph:
    """A graph from ``(src, dst, slot)`` edges; node targets by keyword (default: the node name)."""
    g = nx.DiGraph()  # nodes in order of first mention, as in an FX graph
    for src, dst, slot in edges:
        for n in (src, dst):
            if n not in g:
                g.add_node(n, target=targets.get(n, n), op="call_function")
        if g.has_edge(src, dst):
            g.edges[src, dst]["slots"].append(slot)
        else:
            g.add_edge(src, dst, slots=[slot])
    return g


def test_diff_finds_exactly_the_added_removed_and_rewired_nodes():
    #  before: x -> mm(x, w) -> relu -> drop -> out;  sub(x, w)
    before = chain(("x", "mm", 0), ("w", "mm", 1), ("mm", "relu", 0), ("relu", "drop", 0), ("drop", "out", 0),
                   ("x", "sub", 0), ("w", "sub", 1), mm="aten.mm", relu="aten.relu")
    #  after: drop removed; scale added between relu and out (out rewired); mm retargeted to
    #  linear (rewired); sub's arguments swapped (rewired); x, w, relu untouched
    after = chain(("x", "mm", 0), ("w", "mm", 1), ("mm", "relu", 0), ("relu", "scale", 0), ("scale", "out", 0),
                  ("w", "sub", 0), ("x", "sub", 1), mm="aten.linear", relu="aten.relu")
    d = diff_graphs(before, after)
    assert (d.added, d.removed, d.rewired, d.modified) == ({"scale"}, {"drop"}, {"out", "mm", "sub"}, set())
    assert [d.status(n) for n in ("x", "w", "relu")] == [None, None, None]

    # the page highlights exactly those, and shows the removed node where it was (after relu)
    nodes = page_data(before, after, d)["nodes"]
    assert {n["n"]: n.get("d") for n in nodes if n.get("d")} == {
        "scale": "added", "drop": "removed", "out": "rewired", "mm": "rewired", "sub": "rewired"}
    order = [n["n"] for n in nodes]
    assert order.index("drop") == order.index("relu") + 1
    out = next(n for n in nodes if n["n"] == "out")
    assert (out["i"], out["p"]) == (["scale"], ["drop"])
    assert next(n for n in nodes if n["n"] == "mm")["pt"] == "aten.mm"


def test_diff_reading_an_input_twice_and_constant_arguments():
    before = chain(("x", "mul", 0), ("y", "mul", 1))
    after = chain(("x", "mul", 0), ("x", "mul", 1), ("y", "other", 0))  # mul(x, y) -> mul(x, x)
    assert diff_graphs(before, after).rewired == {"mul"}
    assert diff_graphs(before, before) == diff_graphs(None, before)
    assert not diff_graphs(before, before)

    changed = before.copy()
    changed.nodes["mul"]["args"] = "%x, %y, alpha=2"  # same inputs and target, another constant
    d = diff_graphs(before, changed)
    assert (d.rewired, d.modified) == (set(), {"mul"})


class _Small(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, x):
        return (self.proj(x).relu() + 1).sum()


def test_diff_of_a_real_pass_on_an_fx_graph():
    """A pass that swaps relu for sigmoid and drops the `+ 1`: graph_of + diff name exactly those nodes."""
    gm = fx.symbolic_trace(_Small())
    before = graph_of(gm, "traced")
    relu = next(n for n in gm.graph.nodes if n.target == "relu")
    add = next(iter(relu.users))
    with gm.graph.inserting_after(relu):
        sigmoid = gm.graph.call_function(torch.sigmoid, (relu.args[0],))
    add.replace_all_uses_with(sigmoid)  # the sum now reads sigmoid
    gm.graph.erase_node(add)
    gm.graph.erase_node(relu)
    gm.recompile()
    after = graph_of(gm, "rewritten")

    d = diff_graphs(before, after)
    assert (d.added, d.removed, d.rewired, d.modified) == ({sigmoid.name}, {"relu", "add"}, {"sum_1"}, set())
    assert after.nodes[sigmoid.name]["inputs"] == ["proj"]
    assert after.nodes["proj"]["module"] == "proj"  # the call_module node names its module
    dot = to_dot(after, d, before)
    assert dot.startswith("digraph") and '"relu"' in dot and "dashed" in dot


# ---- the pages of a 4-layer tiny Llama ---------------------------------------------------------
@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    out = tmp_path_factory.mktemp("viz")
    cfg = sc.SegmentConfig(64, sink_tokens=4, long_range=sc.HeadPlan.from_dict({0: [1], 2: [0, 1]}))
    seg = sc.transform(captured("llama", "sdpa", layers=LAYERS)[1], cfg, dump_dir=out)
    return out, seg.step_graph.meta["segcompile.dump_seconds"]


def test_index_lists_every_pass_in_order(pages):
    out, _ = pages
    index = (out / "index.html").read_text()
    assert re.findall(r'<tr class="pass" data-pass="(\w+)">', index) == PASSES
    for i, name in enumerate(PASSES):
        page = out / f"{i:02d}-{name}.html"
        assert page.exists() and f'href="{page.name}"' in index
        assert (out / f"{i:02d}-{name}.dot").exists() and (out / f"{i:02d}-{name}.txt").exists()
    assert index.count('<tr class="site" data-kind="segment_attention">') == LAYERS
    assert "<b>32</b> inputs and <b>8</b> outputs" in index


def test_lowered_page_marks_segment_attention_and_carried_state(pages):
    out, _ = pages
    nodes = graph_data(out / "04-lower.html")["nodes"]
    attn = [n for n in nodes if n["k"] == "segment_attention"]
    assert len(attn) == LAYERS
    notes = {n["x"]["attention"]["layer"]: n["x"]["attention"] for n in attn}
    assert sorted(notes) == list(range(LAYERS))
    assert [notes[l]["long_range"] for l in range(LAYERS)] == [[1], [], [0, 1], []]
    assert {(a["heads"], a["kv_heads"], a["impl"]) for a in notes.values()} == {(4, 2, "reference")}

    state_in = [n["x"]["state"] for n in nodes if n["k"] == "state_in"]
    assert sorted((s["layer"], s["name"]) for s in state_in) == sorted(
        (l, s) for l in range(LAYERS) for s in STATE_NAMES)
    state_out = [n["x"]["state"] for n in nodes if n.get("x", {}).get("state", {}).get("direction") == "out"]
    assert sorted((s["layer"], s["name"]) for s in state_out) == sorted(
        (l, s) for l in range(LAYERS) for s in ("current_k", "current_v"))
    data = graph_data(out / "04-lower.html")
    assert data["config"] == {"segment_len": 64, "tail_len": 64, "sink_tokens": 4, "tbptt_k": 1,
                              "long_range": "from_dict(0: [1], 2: [0, 1])"}


def test_segment_loop_page_shows_what_the_rewrite_did(pages):
    out, _ = pages
    data = graph_data(out / "03-segment_loop.html")
    by_status = {}
    for n in data["nodes"]:
        by_status.setdefault(n.get("d"), []).append(n)
    removed_attention = [n for n in by_status["removed"] if n["k"] == "attention"]
    added_attention = [n for n in by_status["added"] if n["k"] == "segment_attention"]
    assert len(removed_attention) == len(added_attention) == LAYERS
    assert sum(n["k"] == "state_in" for n in by_status["added"]) == 8 * LAYERS
    # every node has what the details panel shows: module and cluster, source line where traced
    layer0 = next(i for i, c in enumerate(data["clusters"]) if c["id"] == "model.layers.0")
    sdpa = removed_attention[0]
    assert sdpa["c"] == layer0 and sdpa["m"] == "model.layers.0.self_attn" and sdpa["v"].startswith("f32[B, 4, L")
    assert "modeling_llama.py" in data["sources"][sdpa["s"]][0]
    # find_attention only annotates: its page shows the sites as modified, nothing added or removed
    found = graph_data(out / "01-find_attention.html")["nodes"]
    assert {n.get("d") for n in found} == {None, "modified"}
    assert sum(n.get("d") == "modified" and n["k"] == "attention" for n in found) == LAYERS


def test_pages_are_small_and_quick(pages):
    out, seconds = pages
    sizes = {p.name: p.stat().st_size for p in out.glob("*.html")}
    assert len(sizes) == 6
    assert max(sizes.values()) < 1_000_000, sizes  # measured: about 0.1 MB per page
    assert seconds < 10, f"snapshots and pages took {seconds:.1f} s"  # measured: 0.3-0.8 s on 2 cores


# ---- the page in a real browser ----------------------------------------------------------------
def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed: .ci/run installs Debian's chromium package for this test")
        pytest.skip("chromium is not installed (in CI it is, and this test runs)")
    return path


class _Dom(HTMLParser):
    """Elements (tag, attributes) of a dumped DOM, and the text of #errors."""

    def __init__(self, text: str):
        super().__init__()
        self.elements: list[tuple[str, dict]] = []
        self.errors, self._in_errors, self.texts = "", False, []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.elements.append((tag, attrs))
        self._in_errors = attrs.get("id") == "errors"

    def handle_endtag(self, tag):
        self._in_errors = False

    def handle_data(self, data):
        self.texts.append(data)
        if self._in_errors:
            self.errors += data

    def count(self, tag=None, **attrs) -> int:
        return sum(
            (tag is None or t == tag) and all(a.get(k.replace("_", "-")) == v for k, v in attrs.items())
            for t, a in self.elements
        )

    def classed(self, cls: str, **attrs) -> int:
        return sum(cls in a.get("class", "").split() and all(a.get(k.replace("_", "-")) == v for k, v in attrs.items())
                   for _, a in self.elements)


def render(page: Path, tmp_path: Path, fragment: str = "") -> _Dom:
    """Open ``page`` in headless Chromium, let its script run, return the DOM it left."""
    profile = tmp_path / f"profile-{time.monotonic_ns()}"
    done = subprocess.run(
        [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", "--dump-dom", page.as_uri() + fragment],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    console_errors = [line for line in done.stderr.splitlines() if "Uncaught" in line or ":CONSOLE" in line and "rror" in line]
    assert not console_errors, console_errors
    return _Dom(done.stdout)


def test_page_renders_in_chromium(pages, tmp_path):
    out, _ = pages
    dom = render(out / "04-lower.html", tmp_path)
    assert dom.count("body", data_rendered="1"), "the page's script did not finish"
    assert dom.errors.strip() == ""
    assert dom.classed("node", data_kind="segment_attention") == LAYERS
    assert dom.classed("node", data_kind="state_in") == 8 * LAYERS
    assert dom.classed("node", data_kind="state_out") == 2 * LAYERS
    layers = [a["data-module"] for t, a in dom.elements if "cluster" in a.get("class", "").split()]
    assert [m for m in layers if m.startswith("model.layers.")] == [f"model.layers.{i}" for i in range(LAYERS)]
    assert dom.classed("box") == len(layers)  # one box per cluster on the map
    # with no node named in the address, the first segment_attention node is selected and described
    assert dom.classed("node", data_kind="segment_attention") and dom.classed("selected") == 1
    assert "long-range KV heads" in dom.texts

    dom = render(out / "03-segment_loop.html", tmp_path, "#segment_attention_default_2")
    assert dom.count("body", data_rendered="1") and dom.errors.strip() == ""
    assert dom.classed("node", data_kind="attention", data_diff="removed") == LAYERS
    assert dom.classed("node", data_kind="segment_attention", data_diff="added") == LAYERS
    selected = [a for _, a in dom.elements if "selected" in a.get("class", "").split()]
    assert [a["data-name"] for a in selected] == ["segment_attention_default_2"]
    assert "[0, 1]" in dom.texts  # layer 2's long-range KV heads, in the details panel

    index = render(out / "index.html", tmp_path)
    assert index.count("body", data_rendered="1") and index.errors.strip() == ""
    assert index.classed("pass") == len(PASSES)


def test_browser_check_catches_a_script_error(pages, tmp_path):
    """The harness itself: a page whose data is broken reports it in #errors and never says rendered."""
    out, _ = pages
    broken = tmp_path / "broken.html"
    text = (out / "02-plan_heads.html").read_text()
    assert text.count('"nodes":[') == 1
    broken.write_text(text.replace('"nodes":[', '"nodes":[null,'))  # a node that is not one
    dom = render(broken, tmp_path)
    assert not dom.count("body", data_rendered="1")
    assert "render failed" in dom.errors


# ---- the command ---------------------------------------------------------------------------------
def test_viz_command_on_a_model_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    model_dir = tmp_path / "model"
    make_model("llama", layers=2).save_pretrained(model_dir)
    assert list(model_dir.glob("*.safetensors"))
    plan = tmp_path / "heads.json"
    sc.HeadPlan.from_dict({1: [0]}).save(plan)
    out = tmp_path / "pages"
    rc = main(["viz", str(model_dir), "--segment-len", "32", "--sinks", "2", "--long-range", str(plan),
               "--out", str(out), "--no-color"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert f"open {out / 'index.html'}" in text
    assert "S=32  T=32  G=2; head plan from_dict(1: [0])" in text
    assert "2 segment_attention, carried state 16 in / 4 out" in text
    assert sorted(p.name for p in out.glob("*.html")) == [*(f"{i:02d}-{p}.html" for i, p in enumerate(PASSES)), "index.html"]


@pytest.mark.parametrize("argv, message", [
    (["viz", "no/such/model"], "MODEL no/such/model does not exist"),
    (["viz", "--long-range", "missing-plan.json"], "--long-range missing-plan.json: no such plan file"),
    (["viz", "--long-range", "1.5"], "must be a fraction in [0, 1] or a plan JSON file"),
])
def test_viz_command_user_errors(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_viz_command_refuses_a_folder_that_is_not_a_model(tmp_path, capsys):
    assert main(["viz", str(tmp_path)]) == 2
    assert "has no config.json" in capsys.readouterr().err
    (tmp_path / "config.json").write_text("{}")
    assert main(["viz", str(tmp_path), "--layers", "2"]) == 2
    assert "--layers applies to the built-in tiny Llama only" in capsys.readouterr().err


# ---- partial output ----------------------------------------------------------------------------------
def test_viz_with_a_plan_the_model_refuses_leaves_nothing(tmp_path, capsys, monkeypatch):
    # the plan is refused by the third pass: the two dumps before it used to stay, without an index
    monkeypatch.setenv("COLUMNS", "200")
    plan = tmp_path / "heads.json"
    sc.HeadPlan.from_dict({7: [0]}).save(plan)  # the tiny Llama has 2 layers
    out = tmp_path / "pages"
    argv = ["viz", "--layers", "2", "--segment-len", "32", "--out", str(out), "--no-color"]
    assert main([*argv, "--long-range", str(plan)]) == 2
    assert "layer 7" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["heads.json"]  # no folder, no temporary one

    assert main([*argv, "--long-range", "0.5"]) == 0  # an earlier output, then a refused run
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main([*argv, "--long-range", str(plan)]) == 2
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["heads.json", "pages"]


def test_dump_dir_is_written_whole_and_replaces_an_earlier_dump(tmp_path):
    graph = captured("llama", "sdpa")[1]
    out = tmp_path / "dumps"
    with pytest.raises(sc.PlanError):
        sc.transform(graph, sc.SegmentConfig(16, long_range=sc.HeadPlan.from_dict({7: [0]})), dump_dir=out)
    assert not list(tmp_path.iterdir())
    sc.transform(graph, sc.SegmentConfig(16), dump_dir=out)
    (out / "09-gone.txt").write_text("from a pass list of an earlier version")
    sc.transform(graph, sc.SegmentConfig(16, sink_tokens=2), dump_dir=out)
    assert not (out / "09-gone.txt").exists() and "G = 2" in (out / "index.html").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dumps"]


def test_dump_dir_of_other_files_is_refused_before_the_passes(tmp_path, capsys):
    (tmp_path / "thesis.tex").write_text("keep")
    with pytest.raises(sc.SegcompileError, match=r"holds files that an earlier run did not write \(thesis.tex\)"):
        sc.transform(captured("llama", "sdpa")[1], sc.SegmentConfig(16), dump_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thesis.tex"]
    assert main(["viz", "--layers", "1", "--out", str(tmp_path)]) == 2
    captured_io = capsys.readouterr()
    assert captured_io.out == "" and "thesis.tex" in captured_io.err  # before the model is built
