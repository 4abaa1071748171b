"""release_tails: a step graph that frees every layer's old tail once its layer has read it.

For ``SegmentedModel.prefill``'s steps over a whole segment whose tails the prefill itself made
(the driver decides which steps: ``SegmentedModel._can_release_tails``). The old tail of layer l
is dead once layer l's ``segment_attention`` has read it, but the carried state that the
driver's frames and the step's arguments hold keeps every layer's old tail alive until the step
returns: a segment's K/V of every layer (0.5 GiB for a Llama-3-8B shape at S = T = 4096) on top
of the new segment's, which become the next tails. Freeing the storage itself, as FSDP frees
unsharded parameters, does not depend on who still refers to it.

Matches the ``tail_k`` / ``tail_v`` placeholders of every layer (``node.meta[ir.STATE]``,
set by segment_loop). Produces a copy of the graph with a ``segcompile::release_storage`` node
after the last reader of each tail whose every reader is a ``segment_attention`` node (its output
is never a view of an input); a tail that anything else reads is left alone (a view of it could
reach an output). ``gm.meta[ir.RELEASED]`` lists the freed tails as (layer, name). A
freed tail must never be read again: the driver moves the old tails into history and sinks
before such a step (``SegmentedModel._retire_tails``).
"""

from __future__ import annotations

import copy

import torch.fx as fx

from ...ops import release_storage, segment_attention
from ... import ir

TAILS = ("tail_k", "tail_v")


def release_tails(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of the step graph ``gm`` that frees each tail input after its last reader."""
    out = fx.GraphModule(gm, copy.deepcopy(gm.graph), class_name="SegmentStepReleasingTails")
    out.meta.update(gm.meta)
    order = {node: i for i, node in enumerate(out.graph.nodes)}
    after: dict[fx.Node, fx.Node] = {}  # last reader -> the last release put after it (k before v)
    released = []
    for tail in _tail_placeholders(out.graph):
        readers = list(tail.users)
        if not readers or any(r.target is not segment_attention for r in readers):
            continue
        last = max(readers, key=order.__getitem__)
        with out.graph.inserting_after(after.get(last, last)):
            node = after[last] = out.graph.call_function(release_storage, (tail,))
        node.meta[ir.RELEASED] = tail.meta[ir.STATE]
        released.append(tail.meta[ir.STATE])
    out.meta[ir.RELEASED] = released
    out.graph.eliminate_dead_code()
    out.graph.lint()
    out.recompile()
    return out


def _tail_placeholders(graph: fx.Graph) -> list[fx.Node]:
    return [
        node for node in graph.find_nodes(op="placeholder")
        if node.meta.get(ir.STATE, (None, None))[1] in TAILS
    ]
