"""widen_history_early: a step graph that starts widening each layer's fp8 history before the
layer's projections.

For ``SegmentedModel.prefill``'s steps over a whole segment with a quantised history
(``SegmentConfig.history_dtype``), the same steps ``release_tails`` serves. Where the Gluon
forward runs a segment over an fp8 history, the call first writes the layer's history widened
to bf16 (``kernels/dispatch.py``): at 128K, 120 MB a layer, 1 byte read and 2 written per
value, 50 us on an H200 before the attention can start. Started before the layer's query
projection instead, on a side stream, the copy is made while the products leave the memory
bandwidth mostly idle (bench/README.md, "fp8 history").

Matches every ``segment_attention`` node with ``impl="triton"`` whose ``hist_k`` and ``hist_v``
are the layer's history placeholders (``node.meta[ir.STATE]``). Produces a copy of the graph with
a ``widen_history_ahead(hist, sink)`` node for each, which the attention node reads in place of
the placeholder, put before the first node that feeds only that attention's queries, keys or
values (the query projection in a Llama graph: after the layer's norm, whose output the K and V
projections, and so the step's outputs, also read). The copy then lives from there to the
attention, not across the previous layer's MLP. At run time the node gives back a plain history,
and anything on a device where the Gluon forward cannot run, as it is; so does the attention
(``dispatch.segment_attention_forward``) with a copy the Gluon forward then does not apply to.
"""

from __future__ import annotations

import copy

import torch.fx as fx

from ... import ir
from ...ops import segment_attention, widen_history_ahead

HISTORY = ("hist_k", "hist_v")
HIST_K, SINK_K = 7, 5  # segment_attention's arguments: q, k, v, tail_k, tail_v, sink_k, sink_v, hist_k, hist_v


def widen_history_early(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of the step graph ``gm`` whose long-range histories are widened before each layer's
    projections."""
    out = fx.GraphModule(gm, copy.deepcopy(gm.graph), class_name="SegmentStepWideningHistoryEarly")
    out.meta.update(gm.meta)
    for node in list(out.graph.find_nodes(op="call_function", target=segment_attention)):
        if node.kwargs.get("impl") != "triton" or not all(_is_history(a) for a in node.args[HIST_K : HIST_K + 2]):
            continue
        order = {n: i for i, n in enumerate(out.graph.nodes)}
        start = _start_of_inputs(node, order)
        sinks = [a for a in node.args[SINK_K : SINK_K + 2] if isinstance(a, fx.Node)]
        if any(order[s] >= order[start] for s in sinks):  # a sink computed in the step: wait for it
            start = node
        with out.graph.inserting_before(start):
            for i in (0, 1):
                hist, sink = node.args[HIST_K + i], node.args[SINK_K + i]
                node.update_arg(HIST_K + i, out.graph.call_function(widen_history_ahead, (hist, sink)))
    out.graph.lint()
    out.recompile()
    return out


def _is_history(arg) -> bool:
    return isinstance(arg, fx.Node) and arg.op == "placeholder" and arg.meta.get(ir.STATE, (None, None))[1] in HISTORY


def _start_of_inputs(attention: fx.Node, order: dict[fx.Node, int]) -> fx.Node:
    """The first node (in graph order) of those that feed only ``attention``'s queries, keys or
    values, directly or through each other; ``attention`` itself where there are none."""
    nodes = list(order)
    own: set[fx.Node] = set()
    for node in reversed(nodes[: order[attention]]):  # a node's users come after it
        feeds = node.op == "call_function" and node.users and all(u in own or u is attention for u in node.users)
        if feeds and (attention in node.users and node in attention.args[:3] or attention not in node.users):
            own.add(node)
    return min(own, key=order.__getitem__, default=attention)
