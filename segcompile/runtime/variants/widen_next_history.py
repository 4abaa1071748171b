"""widen_next_history: a step graph in which each layer's attention widens the next layer's fp8
history beside its own forward.

For ``SegmentedModel.prefill``'s steps over a whole segment with a quantised history
(``SegmentConfig.history_dtype``), after ``release_tails``. The Gluon forward reads a 16-bit
history, so each layer's call over an fp8 history would first widen it into a transient copy
(``kernels/dispatch.py``): 1 byte read and 2 written a value at the memory's rate, during which
nothing else runs. Here the call of layer l launches the copy of layer l + 1's history on a few
multiprocessors beside its own forward, which the others run
(``kernels/triton_history.widening_beside``), and layer l + 1 reads that copy as a plain
history. Only the first layer's call still copies at the call. ``kernels/dispatch.WIDEN_NEXT_HISTORY``
turns it off (each call then widens its own, as without the variant).

Matches the ``segment_attention`` nodes with ``impl="triton"`` whose ``hist_k`` and ``hist_v``
are the layer's history placeholders (``node.meta[ir.STATE]``), in graph order. Produces a copy
of the graph in which each matched node but the last, when the next one's sinks are defined
before it, is a ``segment_attention_widening_next`` node that also takes the next node's
history and sinks; ``operator.getitem`` 0 of it replaces its output, and 1 and 2 replace the next
node's ``hist_k, hist_v``. A copy then lives from one layer's attention to the end of the next's:
during a forward, its own history's copy and the next one's (one layer's history in 16 bits more
than with the copy at the call). Where the Gluon forward does not run a call, or the switch is
off, the function passes the next history on as stored
(``dispatch.segment_attention_forward_widening``), and the next call reads it as it would have.
"""

from __future__ import annotations

import copy
import operator

import torch.fx as fx

from ... import ir
from ...ops import segment_attention, segment_attention_widening_next

HISTORY = ("hist_k", "hist_v")
SINK_K, HIST_K = 5, 7  # segment_attention's arguments: q, k, v, tail_k, tail_v, sink_k, sink_v, hist_k, hist_v, ...


def widen_next_history(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of the step graph ``gm`` whose attention nodes each widen the next one's history."""
    out = fx.GraphModule(gm, copy.deepcopy(gm.graph), class_name="SegmentStepWideningNextHistory")
    out.meta.update(gm.meta)
    graph = out.graph
    readers = [n for n in graph.find_nodes(op="call_function", target=segment_attention) if _reads_history(n)]
    order = {node: i for i, node in enumerate(graph.nodes)}
    for node, nxt in zip(readers, readers[1:]):
        sinks = nxt.args[SINK_K : SINK_K + 2]
        if any(isinstance(s, fx.Node) and order[s] > order[node] for s in sinks):
            continue  # the next layer's sinks are computed after this attention: leave both as they are
        args = (*node.args[:9], *nxt.args[HIST_K : HIST_K + 2], *sinks, *node.args[9:])
        with graph.inserting_before(node):
            both = graph.call_function(segment_attention_widening_next, args, dict(node.kwargs))
            attended = graph.call_function(operator.getitem, (both, 0))
            wide = [graph.call_function(operator.getitem, (both, i)) for i in (1, 2)]
        both.meta.update(node.meta)
        attended.meta.update(node.meta)
        node.replace_all_uses_with(attended)
        graph.erase_node(node)
        for i, w in enumerate(wide):
            nxt.update_arg(HIST_K + i, w)
    graph.lint()
    out.recompile()
    return out


def _reads_history(node: fx.Node) -> bool:
    return node.kwargs.get("impl") == "triton" and all(
        isinstance(a, fx.Node) and a.op == "placeholder" and a.meta.get(ir.STATE, (None, None))[1] in HISTORY
        for a in node.args[HIST_K : HIST_K + 2]
    )
