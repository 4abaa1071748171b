"""fixed_size_step: the step graph with its carried state in fixed-size buffers.

The step graph takes the carried state as tensors whose lengths grow with the position (sinks,
tail, current segment, history: docs/design.md section 6). A program of static shapes (an
exported file, a decode step replayed from a CUDA graph) cannot: here every layer's state lives in
buffers whose sizes do not follow the position, and the position is a tensor input.

Matches the segment-step graph (``SegmentedModel.step_graph``): its ``input_ids`` and
``position_offset`` placeholders, the per-layer ``sink/hist/tail/current_k/v`` placeholders, one
``segcompile::segment_attention`` node per attention site whose K/V come from
``current = cat([carried, step], 2)``, and the model's output leaves.

Produces a copy whose inputs are ``input_ids``, ``position_offset`` and the buffers
``buffer_specs`` lists, per layer ``layer{l}_local_k/v`` (``G + T + S`` slots: sinks, tail, current
segment, every KV head) and, for layers with long-range KV heads, ``layer{l}_hist_k/v`` (slot ``j``
holds position ``j``; the number of slots is a capacity). A *lowering* replaces every
``segment_attention`` node: it says how the buffers are laid out and read, and whether the state
after the step is returned (the ONNX export: ``deploy/step_module.py``) or written in place (the
static decode step: ``runtime/static_decode.py``). The outputs are the model's output leaves
(with ``logits="last"`` the logits of the last position only, ``keep_last_logits``) followed by
the state outputs the lowering returned. The positions ``cumsum(ones_like(ids, dtype=long), 0)``
become ``arange(1, L + 1)``: ONNX Range rather than an int64 CumSum (which TensorRT's ONNX parser
lists for float types only), and one kernel without a scan in a replayed step.

Refuses (``error``, the caller's exception type) a ``logits`` other than "last"/"all", a graph
with a number of ``segment_attention`` nodes other than the number of layers, a current K/V that
is not built as above, a model output without one logits tensor, and a carried-state
placeholder still used after the rewrite: each means the step graph's layout is not the one this
rewrite knows.
"""

from __future__ import annotations

import copy
from typing import Protocol

import torch
from torch import fx

from ... import ir
from ...config import SegmentConfig
from ...errors import SegcompileError
from ...ops import segment_attention
from .keep_last_logits import keep_last_position, logits_leaf

STEP_INPUTS = ("input_ids", "position_offset")  # the placeholders that stay; every other is carried state

# (name, kv_heads, head_dim, fixed entries or None for a history capacity) of one buffer input
BufferSpec = tuple[str, int, int, "int | None"]


class Lowering(Protocol):
    """Builds one layer's attention over its buffers, inserting its nodes before ``node`` (the
    ``segment_attention`` node being replaced). ``k``, ``v``: the nodes of this step's own K/V
    ``[B, Hkv, L, D]``; ``buffers``: the layer's buffer placeholders by name without the layer
    prefix (``local_k``, ``local_v``, and ``hist_k``, ``hist_v`` if the layer has long-range heads).
    Returns the node of the attention output ``[B, H, L, Dv]`` and the nodes of the layer's state
    after the step, in ``buffer_specs`` order (none when the lowering writes the buffers in place)."""

    def __call__(self, graph: fx.Graph, node: fx.Node, site: ir.AttentionSite, cfg: SegmentConfig, k: fx.Node,
                 v: fx.Node, buffers: dict[str, fx.Node], offset: fx.Node) -> tuple[fx.Node, list[fx.Node]]: ...


def buffer_specs(sites: list[ir.AttentionSite], cfg: SegmentConfig) -> list[BufferSpec]:
    """``(name, kv_heads, head_dim, fixed_entries or None for history)`` per buffer input of
    ``fixed_size_step``, in its order."""
    local = cfg.sink_tokens + cfg.tail_len + cfg.segment_len
    specs = []
    for site in sites:
        specs += [(f"layer{site.layer}_local_k", site.num_kv_heads, site.head_dim, local),
                  (f"layer{site.layer}_local_v", site.num_kv_heads, site.v_head_dim, local)]
        if site.long_range:
            n = len(site.long_range)
            specs += [(f"layer{site.layer}_hist_k", n, site.head_dim, None),
                      (f"layer{site.layer}_hist_v", n, site.v_head_dim, None)]
    return specs


def fixed_size_step(
    step_graph: fx.GraphModule,
    cfg: SegmentConfig,
    lower: Lowering,
    *,
    logits: str = "last",
    error: type[SegcompileError] = SegcompileError,
    class_name: str = "SegmentStep",
) -> fx.GraphModule:
    """A copy of ``step_graph`` (compiled for ``cfg``) over fixed-size state buffers, each attention
    built by ``lower`` (module docstring). ``gm.meta[ir.EXPORT]`` records the logits leaf and the number of model
    outputs (the state outputs follow them)."""
    if logits not in ("last", "all"):
        raise error(f"logits must be 'last' or 'all', got {logits!r}")
    sites: list[ir.AttentionSite] = step_graph.meta[ir.SITES]
    index = logits_leaf(step_graph.meta[ir.CAPTURE].out_spec)
    if index is None:
        raise error("the model's output has no single logits tensor to run as a fixed-size step")
    gm = fx.GraphModule(step_graph, copy.deepcopy(step_graph.graph), class_name=class_name)
    graph = gm.graph
    placeholders = {n.target: n for n in graph.nodes if n.op == "placeholder"}
    offset = placeholders["position_offset"]
    buffers = _add_buffer_inputs(graph, offset, buffer_specs(sites, cfg))

    attention = list(graph.find_nodes(op="call_function", target=segment_attention))
    if len(attention) != len(sites):
        raise error(f"the step graph has {len(attention)} segment_attention nodes for {len(sites)} layers")
    state_out = []
    for site, node in zip(sites, attention):
        prefix = f"layer{site.layer}_"
        own = {name.removeprefix(prefix): n for name, n in buffers.items() if name.startswith(prefix)}
        q, cur_k, cur_v = node.args[:3]
        out, after = lower(graph, node, site, cfg, _step_kv(cur_k, error), _step_kv(cur_v, error), own, offset)
        node.replace_all_uses_with(out)
        state_out += after

    _count_with_range(graph)
    num_outputs = step_graph.meta[ir.NUM_MODEL_OUTPUTS]
    output = graph.output_node()
    leaves = list(output.args[0][:num_outputs])
    if logits == "last":
        keep_last_position(graph, output, leaves, index)
    output.args = (tuple(leaves) + tuple(state_out),)
    for node in attention:
        graph.erase_node(node)
    graph.eliminate_dead_code()
    _erase_carried_state(graph, placeholders, error)
    graph.lint()
    gm.recompile()
    gm.meta[ir.EXPORT] = {"logits_leaf": index, "num_model_outputs": num_outputs}
    return gm


def getitem(t, i):
    """``t[i]``: the node a lowering reads one output of a multi-output call with."""
    return t[i]


def _add_buffer_inputs(graph: fx.Graph, after: fx.Node, specs: list[BufferSpec]) -> dict[str, fx.Node]:
    """One placeholder per buffer, in ``specs``' order, after ``after``."""
    buffers = {}
    for name, *_ in specs:
        with graph.inserting_after(after):
            after = buffers[name] = graph.placeholder(name)
    return buffers


def _erase_carried_state(graph: fx.Graph, placeholders: dict[str, fx.Node], error: type[SegcompileError]) -> None:
    """Remove the step graph's own state placeholders, which the rewrite has left without users."""
    for name, node in placeholders.items():
        if name in STEP_INPUTS:
            continue
        if node.users:
            raise error(f"state input {name} is still used after the rewrite")
        graph.erase_node(node)


def _count_with_range(graph: fx.Graph) -> None:
    """Replace the step graph's ``cumsum(ones_like(row, dtype=long), 0)`` (the positions ``1..L``) with
    ``arange(1, L + 1)``. A cumsum of anything else is left alone (the export's operator test names it)."""
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


def _step_kv(cur: fx.Node, error: type[SegcompileError]) -> fx.Node:
    """This step's k (or v): the step graph builds current = cat([type_as(carried), step], 2)."""
    if cur.target is not torch.ops.aten.cat.default or len(cur.args[0]) != 2:
        raise error(f"unexpected current K/V producer {cur.format_node()}: the step graph layout changed")
    return cur.args[0][1]

