"""segment_loop: turn the whole-sequence graph into the segment-step graph.

Matches the sites annotated by find_attention/plan_heads. Produces a graph whose inputs are

    input_ids [B, L], position_offset [] (int64: absolute position of input_ids[:, 0]),
    then per layer l: sink_k/v, hist_k/v, tail_k/v, current_k/v

(``current`` is the part of the current segment already processed: empty in prefill, the
segment so far in decode) and whose outputs are the model's own output leaves for the L tokens
followed by, per layer, the updated ``current_k/v`` (the old ones with this step's K/V
appended). Every attention site becomes one ``segcompile::segment_attention`` node over
``[sinks or history | tail | current]``; the model's mask subgraph and the ``repeat_kv``
expansion become dead and are removed. The driver (``SegmentedModel``) owns what moves between
tail, history and sinks at segment boundaries.

Positions: the model's ``position_ids`` input is replaced by ``position_offset + arange(L)``
(written as a cumsum of ones so that no device is baked into the graph).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .. import ir
from ..ir import STATE_NAMES, AttentionSite
from ..ops import segment_attention

aten = torch.ops.aten



def segment_loop(gm: fx.GraphModule) -> fx.GraphModule:
    """Rewrite every attention site into segment_attention over carried state."""
    graph = gm.graph
    sites: list[AttentionSite] = gm.meta[ir.SITES]
    input_ids, position_ids = _placeholders(graph)

    with graph.inserting_after(position_ids):
        offset = graph.placeholder("position_offset")
    last = offset
    state: list[dict[str, fx.Node]] = []
    for site in sites:
        nodes = {}
        for name in STATE_NAMES:
            with graph.inserting_after(last):
                last = nodes[name] = graph.placeholder(f"layer{site.layer}_{name}")
                last.meta[ir.STATE] = (site.layer, name)
        state.append(nodes)

    _replace_positions(graph, input_ids, position_ids, offset)

    new_current = []
    for site, st in zip(sites, state):
        with graph.inserting_before(site.output):
            # type_as: the carried K/V follow the dtype K/V have at run time (autocast may change it)
            past_k = graph.call_function(aten.type_as.default, (st["current_k"], site.k))
            past_v = graph.call_function(aten.type_as.default, (st["current_v"], site.v))
            cur_k = graph.call_function(aten.cat.default, ([past_k, site.k], 2))
            cur_v = graph.call_function(aten.cat.default, ([past_v, site.v], 2))
            attn = graph.call_function(
                segment_attention,
                (site.q, cur_k, cur_v, st["tail_k"], st["tail_v"], st["sink_k"], st["sink_v"], st["hist_k"], st["hist_v"]),
                {"long_range": list(site.long_range), "scale": site.scale, "impl": "reference"},
            )
        attn.meta.update({k: v for k, v in site.output.meta.items() if k in ("val", "nn_module_stack", "stack_trace")})
        attn.meta[ir.ATTENTION] = site
        site.output.replace_all_uses_with(attn)
        graph.erase_node(site.output)
        site.output = attn
        new_current += [cur_k, cur_v]

    output = graph.output_node()
    output.args = (tuple(output.args[0]) + tuple(new_current),)
    graph.eliminate_dead_code(is_impure_node=_impure_except_dropout)
    graph.lint()
    gm.recompile()
    gm.meta[ir.NUM_MODEL_OUTPUTS] = len(output.args[0]) - len(new_current)
    return gm


def _impure_except_dropout(node: fx.Node) -> bool:
    # FX keeps dropout as impure (it draws random numbers); a dropped attention's dropout is dead.
    return node.target is not aten.dropout.default and node.is_impure()


def _placeholders(graph: fx.Graph) -> tuple[fx.Node, fx.Node]:
    found = {n.target: n for n in graph.nodes if n.op == "placeholder"}
    return found["input_ids"], found["position_ids"]


def _replace_positions(graph: fx.Graph, input_ids: fx.Node, position_ids: fx.Node, offset: fx.Node) -> None:
    with graph.inserting_after(offset):
        row = graph.call_function(aten.select.int, (input_ids, 0, 0))
    with graph.inserting_after(row):
        ones = graph.call_function(aten.ones_like.default, (row,), {"dtype": torch.long})
    with graph.inserting_after(ones):
        counted = graph.call_function(aten.cumsum.default, (ones, 0))
    with graph.inserting_after(counted):
        shifted = graph.call_function(aten.add.Tensor, (counted, offset))
    with graph.inserting_after(shifted):
        zero_based = graph.call_function(aten.sub.Tensor, (shifted, 1))
    with graph.inserting_after(zero_based):
        positions = graph.call_function(aten.unsqueeze.default, (zero_based, 0))
    position_ids.replace_all_uses_with(positions)
    graph.erase_node(position_ids)
