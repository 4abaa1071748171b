"""An FX graph, with what the passes recorded on it, as a plain ``networkx.DiGraph``.

One graph node per FX node, keyed by the FX node's name (names are stable across passes for
nodes a pass did not touch, which is what ``diff_graphs`` relies on); an edge ``u -> v`` when
``v`` reads ``u``, with ``slots``: the positions in ``v``'s inputs where it does. Every attribute
is plain data (str, int, float, list, dict), copied when the snapshot is taken: later passes
rewrite the graph and its metadata in place, the snapshot does not change with them.

Node attributes (missing ones are simply unknown: nodes a pass added often have no ``val``):

    op, target        FX op and target, as text
    args              the arguments, other nodes written ``%name``
    inputs            input node names, in argument order (a node read twice appears twice)
    value             dtype and shape of the result, ``f32[B, 4, L, 16]`` (B, L: batch, length)
    module            module path (``model.layers.0.self_attn``); ``module_inferred`` when it was
                      not in ``nn_module_stack`` but taken from the node's users or inputs
    cluster           the group the node is drawn in: its layer (``model.layers.0``), a top-level
                      module, ``inputs`` or ``outputs``
    source, code      ``file:line`` and the line of the last frame of ``stack_trace``
    kind              placeholder | state_in | get_attr | call | attention | segment_attention |
                      state_out | output
    notes             segcompile annotations: attention site (layer, heads, long-range KV heads,
                      scale, impl), carried state (layer, name)

Graph attributes: ``name`` (the pass), ``modules`` (path -> class name), ``clusters``
(cluster -> label, in order of appearance), ``config`` (segment sizes), ``model``.
"""

from __future__ import annotations

import re
from typing import Any

import networkx as nx
import torch
import torch.fx as fx

from .. import ir

KINDS = ("placeholder", "state_in", "get_attr", "call", "attention", "segment_attention", "state_out", "output")

_DTYPES = {
    torch.float32: "f32", torch.float64: "f64", torch.float16: "f16", torch.bfloat16: "bf16",
    torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8",
    torch.bool: "b8", torch.complex64: "c64",
}
_FRAME = re.compile(r'File "([^"]+)", line (\d+), in ([^\n]+)\n([^\n]*)')
_LAYER = re.compile(r"^(.*?\.\d+)(?:\.|$)")
_EMPTY_STACK = "_empty_nn_module_stack"  # export's placeholder entry for nodes outside any module
TOP = "(top)"  # the cluster of nodes in the root module itself
ARGS_CHARS = 400  # longer argument lists (the output node of a 32-layer model) are cut here


def graph_of(gm: fx.GraphModule, name: str) -> nx.DiGraph:
    """Snapshot ``gm`` (after the pass ``name``) as a ``networkx.DiGraph`` of plain data."""
    graph = gm.graph
    nodes = list(graph.nodes)
    g = nx.DiGraph(name=name, model=_model_class(gm), config=_config(gm))
    symbols = _symbols(nodes)
    modules: dict[str, str] = {}
    sources: dict[str, tuple[str, str]] = {}
    sites = {s.layer: s for s in gm.meta.get(ir.SITES, ())}
    state_out = _state_outputs(gm, graph, sites)

    for node in nodes:
        attrs: dict[str, Any] = {"op": node.op, "target": _target(node)}
        inputs = _input_names(node)
        attrs["inputs"] = inputs
        attrs["args"] = _args_text(node)
        value = _value(node.meta.get("val"), symbols)
        if value:
            attrs["value"] = value
        module = _module(node, modules)
        if module is not None:
            attrs["module"] = module
        trace = node.meta.get("stack_trace")
        if trace:
            if trace not in sources:
                sources[trace] = _last_frame(trace)
            attrs["source"], attrs["code"] = sources[trace]
        attrs["kind"], notes = _kind(node, sites, state_out)
        if notes:
            attrs["notes"] = notes
        g.add_node(node.name, **attrs)
        for slot, name_in in enumerate(inputs):
            if g.has_edge(name_in, node.name):
                g.edges[name_in, node.name]["slots"].append(slot)
            else:
                g.add_edge(name_in, node.name, slots=[slot])

    _infer_modules(g, nodes, modules, sites)
    g.graph["modules"] = modules
    g.graph["clusters"] = _assign_clusters(g, modules)
    return g


# ---- per node --------------------------------------------------------------------------------
def _target(node: fx.Node) -> str:
    t = node.target
    if isinstance(t, str):
        return t
    if isinstance(t, torch._ops.OpOverload):
        return str(t)
    module = getattr(t, "__module__", None) or ""
    qualname = getattr(t, "__qualname__", None) or getattr(t, "__name__", None) or str(t)
    if module in ("_operator", "operator", "builtins"):
        return qualname
    return f"{module}.{qualname}" if module else qualname


def _input_names(node: fx.Node) -> list[str]:
    names: list[str] = []
    fx.node.map_arg((node.args, node.kwargs), lambda n: names.append(n.name))
    return names


def _args_text(node: fx.Node) -> str:
    if node.op in ("placeholder", "get_attr"):
        return ""
    args = fx.node.map_arg(node.args, lambda n: _Ref(n.name))
    kwargs = fx.node.map_arg(node.kwargs, lambda n: _Ref(n.name))
    parts = [repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items()]
    text = ", ".join(parts)
    return text if len(text) <= ARGS_CHARS else text[: ARGS_CHARS - 3] + "..."


class _Ref:
    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return f"%{self.name}"


def _symbols(nodes: list[fx.Node]) -> dict[str, str]:
    """Name the symbolic sizes by what they are: ``input_ids`` is ``[B, L]``."""
    for node in nodes:
        if node.op == "placeholder" and node.target == "input_ids":
            val = node.meta.get("val")
            if hasattr(val, "shape") and len(val.shape) == 2:
                return {str(s): name for s, name in zip(val.shape, "BL") if not str(s).isdigit()}
    return {}


def _value(val: Any, symbols: dict[str, str]) -> str:
    if val is None:
        return ""
    if isinstance(val, torch.Tensor):
        dims = ", ".join(_size(s, symbols) for s in val.shape)
        return f"{_DTYPES.get(val.dtype, str(val.dtype).removeprefix('torch.'))}[{dims}]"
    if isinstance(val, (list, tuple)):
        inner = [_value(v, symbols) for v in val]
        return "(" + ", ".join(v or "?" for v in inner) + ")" if any(inner) else ""
    if isinstance(val, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return f"{type(val).__name__} {_size(val, symbols)}"
    if isinstance(val, (int, float, bool)):
        return f"{type(val).__name__} {val}"
    return ""


def _size(s: Any, symbols: dict[str, str]) -> str:
    text = str(s)
    if not symbols or text.isdigit():
        return text
    return re.sub(r"\b[su]\d+\b", lambda m: symbols.get(m.group(0), m.group(0)), text)


def _module(node: fx.Node, modules: dict[str, str]) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if stack:
        for path, cls in stack.values():
            if isinstance(path, str) and not path.startswith(_EMPTY_STACK):
                cls = cls if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
                modules.setdefault(path, cls.rsplit(".", 1)[-1])
        path = list(stack.values())[-1][0]
        if isinstance(path, str) and not path.startswith(_EMPTY_STACK):
            return path
    return None


def _last_frame(trace: str) -> tuple[str, str]:
    frames = _FRAME.findall(trace)
    if not frames:
        return "", ""
    filename, line, _, code = frames[-1]
    return f"{_short_path(filename)}:{line}", code.strip()


def _short_path(filename: str) -> str:
    """Installed packages by their import path (``transformers/models/...``), the rest by file name."""
    for marker in ("site-packages/", "dist-packages/"):
        if marker in filename:
            return filename.rsplit(marker, 1)[1]
    return filename.replace("\\", "/").rsplit("/", 1)[-1]


def _kind(node: fx.Node, sites: dict, state_out: dict[str, tuple[int, str]]) -> tuple[str, dict]:
    state = node.meta.get(ir.STATE)
    if node.op == "placeholder":
        if state:
            return "state_in", {"state": {"layer": int(state[0]), "name": str(state[1]), "direction": "in"}}
        return "placeholder", {}
    if node.op == "output":
        return "output", {}
    if node.op == "get_attr":
        return "get_attr", {}
    notes: dict[str, Any] = {}
    kind = "call"
    site = node.meta.get(ir.ATTENTION)
    if site is not None:
        is_segment = "segment_attention" in str(node.target)
        kind = "segment_attention" if is_segment else "attention"
        notes["attention"] = _site_notes(site, node if is_segment else None)
    if node.name in state_out:
        layer, name = state_out[node.name]
        notes["state"] = {"layer": layer, "name": name, "direction": "out"}
        if kind == "call":
            kind = "state_out"
    return kind, notes


def _site_notes(site, node: fx.Node | None) -> dict[str, Any]:
    notes = {
        "layer": site.layer,
        "module": site.module,
        "class": site.module_class,
        "matched": site.kind,
        "heads": site.num_heads,
        "kv_heads": site.num_kv_heads,
        "head_dim": site.head_dim,
        "scale": round(float(site.scale), 6),
        "long_range": list(site.long_range),
    }
    if node is not None and "impl" in node.kwargs:
        notes["impl"] = str(node.kwargs["impl"])
    return notes


def _state_outputs(gm: fx.GraphModule, graph: fx.Graph, sites: dict) -> dict[str, tuple[int, str]]:
    """The output node's trailing entries are each layer's new current_k/current_v (segment_loop)."""
    first = gm.meta.get(ir.NUM_MODEL_OUTPUTS)
    if first is None or not sites:
        return {}
    outputs = graph.output_node().args[0]
    layers = sorted(sites)
    found = {}
    for i, out in enumerate(outputs[first:]):
        if isinstance(out, fx.Node) and i // 2 < len(layers):
            found[out.name] = (layers[i // 2], ("current_k", "current_v")[i % 2])
    return found


def _model_class(gm: fx.GraphModule) -> str:
    info = gm.meta.get(ir.CAPTURE)
    return getattr(info, "model_class", "") or type(gm).__name__


def _config(gm: fx.GraphModule) -> dict[str, Any]:
    cfg = gm.meta.get(ir.CONFIG)
    if cfg is None:
        return {}
    plan = cfg.long_range.describe() if hasattr(cfg.long_range, "describe") else str(cfg.long_range)
    return {
        "segment_len": cfg.segment_len,
        "tail_len": cfg.tail_len,
        "sink_tokens": cfg.sink_tokens,
        "tbptt_k": cfg.tbptt_k,
        "long_range": plan,
    }


# ---- modules and clusters --------------------------------------------------------------------
def _infer_modules(g: nx.DiGraph, nodes: list[fx.Node], modules: dict[str, str], sites: dict) -> None:
    """Give nodes outside ``nn_module_stack`` (parameters, nodes passes added) a module."""
    site_modules = {layer: s.module for layer, s in sites.items()}
    for node in nodes:
        attrs = g.nodes[node.name]
        if "module" in attrs:
            continue
        if node.op == "call_module":
            attrs["module"] = node.target
        elif node.op == "get_attr":
            owner = _owner(node.target, modules)
            if owner is not None:
                attrs["module"] = owner
        state = attrs.get("notes", {}).get("state")
        if state and state["direction"] == "in" and state["layer"] in site_modules:
            attrs["module"], attrs["module_inferred"] = site_modules[state["layer"]], True
    # other call nodes: the module of their first user that has one, else of their first input
    for node in reversed(nodes):
        attrs = g.nodes[node.name]
        if "module" in attrs or node.op != "call_function":
            continue
        for user in node.users:
            if user.op != "output" and "module" in g.nodes[user.name]:
                attrs["module"], attrs["module_inferred"] = g.nodes[user.name]["module"], True
                break
    for node in nodes:
        attrs = g.nodes[node.name]
        if "module" in attrs or node.op != "call_function":
            continue
        for source in node.all_input_nodes:
            if "module" in g.nodes[source.name] and g.nodes[source.name]["op"] == "call_function":
                attrs["module"], attrs["module_inferred"] = g.nodes[source.name]["module"], True
                break


def _owner(target: str, modules: dict[str, str]) -> str | None:
    path = target
    while "." in path:
        path = path.rsplit(".", 1)[0]
        if path in modules:
            return path
    return None


def _assign_clusters(g: nx.DiGraph, modules: dict[str, str]) -> dict[str, str]:
    """Set every node's ``cluster``; return cluster -> label in order of first appearance.

    A cluster is a layer (the shortest module path ending in a number, ``model.layers.3``),
    else the module cut to the depth of the layers' container (``model.norm``, ``lm_head``), else
    ``inputs`` / ``outputs`` for graph inputs, parameters outside modules and the output node.
    """
    layers = [m.group(1) for m in map(_LAYER.match, modules) if m]
    layer_depth = min((p.count(".") for p in layers), default=1)
    clusters: dict[str, str] = {}
    for name, attrs in g.nodes(data=True):
        module = attrs.get("module")
        if attrs["op"] == "output":
            cluster, label = "outputs", "graph outputs"
        elif module is None:
            cluster, label = "inputs", "graph inputs"
        elif module == "":
            cluster, label = TOP, f"{modules.get('', 'model')} (top level)"
        else:
            m = _LAYER.match(module)
            cluster = m.group(1) if m else ".".join(module.split(".")[:layer_depth])
            label = f"{cluster} ({modules[cluster]})" if cluster in modules else cluster
        attrs["cluster"] = cluster
        clusters.setdefault(cluster, label)
    return clusters
