"""layer_units: the step graph with every decoder layer outlined into a submodule of its own.

Sharding a model layer by layer (FSDP2's ``fully_shard`` applied per layer) needs one module per
layer whose ``forward`` runs when the layer runs: its hooks gather the layer's parameters before
and free them after, and gather them again for every backward through it. The step graph is one
flat graph whose root reads every parameter (``get_attr``), so no such module is ever called.

Matches the layers by ``node.meta["nn_module_stack"]``: a node belongs to the layer whose path is
the first entry of its stack that ends in an index (``model.layers.3``). A layer's unit is the
run of the graph from its first node to its last, so it takes in the nodes the passes inserted
without a module stack (``segment_loop``'s ``cat`` of the carried and the step's K/V). Each unit
is a ``GraphModule`` installed at the layer's own path, owning that layer's parameters under their
names relative to it: the parameters keep their names (``step_graph.model.layers.3.mlp.up_proj.weight``)
and state dicts and checkpoints do not change. The root graph calls the unit (``call_module``) and
reads its outputs by ``getitem``. Everything that is not a layer (positions, embeddings, rotary
tables, final norm, head) stays in the root.

Produces a copy; ``step_graph`` is not changed. Refuses (``error``, the caller's exception type) a
graph without indexed layers, a layer whose run contains a node of another layer (its nodes are
interleaved with another's, so no single call can stand for it), and a parameter under a layer's
path that is read outside the layer (tied across layers).
"""

from __future__ import annotations

import copy
import operator
import re
from dataclasses import dataclass

import torch.fx as fx

from ...errors import SegcompileError

_INDEXED = re.compile(r".+\.\d+")  # a path inside a ModuleList: model.layers.3


@dataclass
class LayerUnits:
    """The outlined step graph and the paths of its layer units, in execution order."""

    graph: fx.GraphModule
    layers: list[str]


def layer_units(step_graph: fx.GraphModule, error: type[SegcompileError] = SegcompileError) -> LayerUnits:
    """A copy of ``step_graph`` with each layer's nodes in a submodule at the layer's path (module
    docstring). The copy computes the same values in the same order."""
    graph = copy.deepcopy(step_graph.graph)
    runs = _layer_runs(graph, error)
    if not runs:
        raise error("the step graph has no layers to shard one by one (no node's module path ends in a layer index)")
    units = {}
    for path, run in runs.items():
        units[path] = _outline(step_graph, graph, path, run, error)
    attributes = {node.target: _attribute(step_graph, node.target) for node in graph.find_nodes(op="get_attr")}
    gm = fx.GraphModule({**attributes, **units}, graph, class_name="SegmentStepByLayer")
    gm.meta.update(step_graph.meta)
    graph.lint()
    gm.recompile()
    return LayerUnits(gm, list(runs))


def layer_path(node: fx.Node) -> str | None:
    """The path of the layer ``node`` belongs to (``model.layers.3``), or ``None``."""
    for path, *_ in (node.meta.get("nn_module_stack") or {}).values():
        if _INDEXED.fullmatch(path):
            return path
    return None


def _layer_runs(graph: fx.Graph, error) -> dict[str, list[fx.Node]]:
    """Per layer, in execution order, the computing nodes from its first node to its last."""
    nodes = list(graph.nodes)
    bounds: dict[str, list[int]] = {}
    for i, node in enumerate(nodes):
        if node.op in ("call_function", "call_method", "call_module") and (path := layer_path(node)):
            bounds.setdefault(path, [i, i])[1] = i
    runs = {}
    for path, (first, last) in bounds.items():
        run = [n for n in nodes[first : last + 1] if n.op not in ("placeholder", "get_attr")]
        strangers = {p for n in run if (p := layer_path(n)) not in (None, path)}
        if strangers:
            raise error(f"the nodes of {path} are interleaved with those of {sorted(strangers)}: "
                        "the layer is not one run of the graph")
        runs[path] = run
    return runs


def _outline(step_graph: fx.GraphModule, graph: fx.Graph, path: str, run: list[fx.Node], error) -> fx.GraphModule:
    """Replace ``run`` in ``graph`` with a call of a new unit at ``path``; return the unit."""
    members = set(run)
    prefix = path + "."
    own = [n for n in graph.find_nodes(op="get_attr") if n.target.startswith(prefix)]
    for node in own:
        if any(user not in members for user in node.users):
            raise error(f"parameter {node.target} of {path} is read outside the layer: the layer cannot own it")
    owned = set(own)
    inputs = list(dict.fromkeys(i for n in run for i in n.all_input_nodes if i not in members and i not in owned))
    outputs = [n for n in run if any(user not in members for user in n.users)]

    sub = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in inputs:
        env[node] = sub.placeholder(node.name)
    for node in own:
        env[node] = sub.get_attr(node.target[len(prefix) :])
    for node in run:
        env[node] = sub.node_copy(node, env.__getitem__)
    sub.output(tuple(env[n] for n in outputs))
    unit = fx.GraphModule({n.target[len(prefix) :]: _attribute(step_graph, n.target) for n in own}, sub,
                          class_name="LayerUnit")

    with graph.inserting_after(run[-1]):
        call = graph.call_module(path, tuple(inputs))
    after = call
    for i, node in enumerate(outputs):
        with graph.inserting_after(after):
            after = graph.call_function(operator.getitem, (call, i))
        after.meta = dict(node.meta)
        node.replace_all_uses_with(after, delete_user_cb=lambda user: user not in members)
    for node in reversed(run):
        graph.erase_node(node)
    for node in own:
        graph.erase_node(node)
    return unit


def _attribute(module, target: str):
    return operator.attrgetter(target)(module)
