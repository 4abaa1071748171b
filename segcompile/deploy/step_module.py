"""step_module: the step graph with its carried state in fixed-size buffers, ready for export.

Matches the segment-step graph ``seg.step_graph`` (what ``SegmentedModel`` runs): its
``input_ids`` and ``position_offset`` placeholders, the per-layer ``sink/hist/tail/current_k/v``
placeholders, one ``segcompile::segment_attention`` node per attention site whose K/V come from
``current = cat([carried, step], 2)``, and the model's output leaves.

Produces a copy (``class SegmentStep``) whose inputs are ``input_ids``, ``position_offset`` and
the buffers ``state_specs`` lists, per layer ``layer{l}_local_k/v`` ``[B, Hkv, G + T + S, D]`` and,
for layers with long-range KV heads, ``layer{l}_hist_k/v`` ``[B, n_lr, history, D]``
(``deploy.lowering`` says which slot holds what), and whose outputs are the model's output
leaves followed by those buffers after the step. Every ``segment_attention`` node becomes a
``lowering.step_attention`` call (plain torch ops: the attention math and, when the step ends its
segment, the state move), so the graph has no custom op and no control flow. With
``logits="last"`` the logits are the step's last position only (``keep_last_logits``). The
positions ``cumsum(ones_like(ids, dtype=long), 0)`` become ``arange(1, L + 1)``: ONNX Range, not
an int64 CumSum, which TensorRT's ONNX parser lists for float types only.

Refuses (``ExportError``) a ``logits`` other than "last"/"all", a graph with a number of
``segment_attention`` nodes other than the number of layers, a current K/V that is not built as
above, a model output without one logits tensor, and a carried-state placeholder still used
after the rewrite: each means the step graph's layout is not the one this rewrite knows.
"""

from __future__ import annotations

import copy

import torch
from torch import fx

from .. import ir
from ..errors import SegcompileError
from ..ops import segment_attention
from ..runtime import SegmentedModel
from ..runtime.variants.keep_last_logits import keep_last_position, logits_leaf
from .lowering import step_attention

STEP_INPUTS = ("input_ids", "position_offset")  # the placeholders that stay; every other is carried state


class ExportError(SegcompileError):
    """The model cannot be exported as asked."""


def step_module(seg: SegmentedModel, logits: str = "last") -> fx.GraphModule:
    """Rewrite a copy of ``seg``'s step graph to fixed-size state buffers (module docstring); it runs in PyTorch too."""
    if logits not in ("last", "all"):
        raise ExportError(f"logits must be 'last' or 'all', got {logits!r}")
    src = seg.step_graph
    gm = fx.GraphModule(src, copy.deepcopy(src.graph), class_name="SegmentStep")
    graph = gm.graph
    placeholders = {n.target: n for n in graph.nodes if n.op == "placeholder"}
    buffers = _add_buffer_inputs(graph, placeholders["position_offset"], state_specs(seg))

    attention = list(graph.find_nodes(op="call_function", target=segment_attention))
    if len(attention) != len(seg.sites):
        raise ExportError(f"the step graph has {len(attention)} segment_attention nodes for {len(seg.sites)} layers")
    state_out = []
    for site, node in zip(seg.sites, attention):
        state_out += _lower_attention(graph, node, site, seg.cfg, buffers, placeholders["position_offset"])

    _count_with_range(graph)
    num_outputs = src.meta[ir.NUM_MODEL_OUTPUTS]
    output = graph.output_node()
    leaves = list(output.args[0][:num_outputs])
    index = _logits_leaf(seg)
    if logits == "last":
        keep_last_position(graph, output, leaves, index)
    output.args = (tuple(leaves) + tuple(state_out),)
    for node in attention:
        graph.erase_node(node)
    graph.eliminate_dead_code()
    _erase_carried_state(graph, placeholders)
    graph.lint()
    gm.recompile()
    gm.meta[ir.EXPORT] = {"logits_leaf": index, "num_model_outputs": num_outputs}
    return gm


def state_specs(seg: SegmentedModel) -> list[tuple[str, int, int, int | None]]:
    """``(name, kv_heads, head_dim, fixed_entries or None for history)`` per buffer input of
    ``step_module``, in its order."""
    cfg = seg.cfg
    local = cfg.sink_tokens + cfg.tail_len + cfg.segment_len
    specs = []
    for site in seg.sites:
        specs += [(f"layer{site.layer}_local_k", site.num_kv_heads, site.head_dim, local),
                  (f"layer{site.layer}_local_v", site.num_kv_heads, site.v_head_dim, local)]
        if site.long_range:
            n = len(site.long_range)
            specs += [(f"layer{site.layer}_hist_k", n, site.head_dim, None),
                      (f"layer{site.layer}_hist_v", n, site.v_head_dim, None)]
    return specs


def _add_buffer_inputs(graph: fx.Graph, after: fx.Node, specs) -> dict[str, fx.Node]:
    """One placeholder per buffer, in ``specs``' order, after ``after``."""
    buffers = {}
    for name, *_ in specs:
        with graph.inserting_after(after):
            after = buffers[name] = graph.placeholder(name)
    return buffers


def _lower_attention(graph: fx.Graph, node: fx.Node, site: ir.AttentionSite, cfg, buffers: dict[str, fx.Node],
                     offset: fx.Node) -> list[fx.Node]:
    """Replace ``node``'s uses with a ``step_attention`` over the layer's buffers; returns the
    nodes of the layer's buffers after the step (local k/v, then hist k/v if it has long-range heads)."""
    q, cur_k, cur_v = node.args[:3]
    layer = f"layer{site.layer}"
    args = (q, _step_kv(cur_k), _step_kv(cur_v), buffers[f"{layer}_local_k"], buffers[f"{layer}_local_v"],
            buffers.get(f"{layer}_hist_k"), buffers.get(f"{layer}_hist_v"), offset)
    kwargs = {"segment_len": cfg.segment_len, "tail_len": cfg.tail_len, "sinks": cfg.sink_tokens,
              "long_range": tuple(site.long_range), "scale": node.kwargs["scale"]}
    with graph.inserting_before(node):
        step = graph.call_function(step_attention, args, kwargs)
        items = [graph.call_function(_getitem, (step, i)) for i in range(5)]
    node.replace_all_uses_with(items[0])
    return items[1:3] + (items[3:5] if site.long_range else [])


def _erase_carried_state(graph: fx.Graph, placeholders: dict[str, fx.Node]) -> None:
    """Remove the step graph's own state placeholders, which the rewrite has left without users."""
    for name, node in placeholders.items():
        if name in STEP_INPUTS:
            continue
        if node.users:
            raise ExportError(f"state input {name} is still used after the rewrite")
        graph.erase_node(node)


def _getitem(t, i):
    return t[i]


def _count_with_range(graph: fx.Graph) -> None:
    """Replace the step graph's ``cumsum(ones_like(row, dtype=long), 0)`` (the positions ``1..L``) with
    ``arange(1, L + 1)``: ONNX Range instead of an int64 CumSum, which TensorRT's ONNX parser lists for
    float types only. A cumsum of anything else is left alone (the operator test names it)."""
    for node in list(graph.find_nodes(op="call_function", target=torch.ops.aten.cumsum.default)):
        ones = node.args[0]
        if not (isinstance(ones, fx.Node) and ones.target is torch.ops.aten.ones_like.default
                and ones.kwargs.get("dtype") == torch.long and node.args[1:] == (0,)):
            continue
        with graph.inserting_before(node):
            counted = graph.call_function(_count, (ones,))
        node.replace_all_uses_with(counted)
        graph.erase_node(node)


def _count(ones: torch.Tensor) -> torch.Tensor:
    """``ones.cumsum(0)``: ``1, 2, .., len(ones)`` as int64 when ``ones`` is 1-D (the inserted nodes
    carry no shape metadata, so the rank is checked here, when the graph is traced)."""
    if ones.dim() != 1:
        return ones.cumsum(0)
    return torch.arange(1, ones.shape[0] + 1, dtype=torch.long, device=ones.device)


def _step_kv(cur: fx.Node) -> fx.Node:
    """This step's k (or v): the step graph builds current = cat([type_as(carried), step], 2)."""
    if cur.target is not torch.ops.aten.cat.default or len(cur.args[0]) != 2:
        raise ExportError(f"unexpected current K/V producer {cur.format_node()}: the step graph layout changed")
    return cur.args[0][1]


def _logits_leaf(seg: SegmentedModel) -> int:
    found = logits_leaf(seg.capture_info.out_spec)
    if found is None:
        raise ExportError("the model's output has no single logits tensor to export")
    return found
