"""step_module: the step graph with its carried state in fixed-size buffers, ready for export.

The rewrite itself is the runtime's ``fixed_size_step`` (``runtime/variants/fixed_size_step.py``:
what it matches, what it produces and when it refuses), which the static decode step
(``runtime/static_decode.py``) shares. This module gives it the export's lowering: every
``segcompile::segment_attention`` node becomes a ``lowering.step_attention`` call (plain torch
ops: the attention math and, when the step ends its segment, the state move, selected with
``where``), so the graph has no custom op and no control flow, and the state after the step is
returned as outputs. The buffers are ``[B, Hkv, G + T + S, D]`` per layer (``layer{l}_local_k/v``)
and ``[B, n_lr, history, D]`` for layers with long-range KV heads (``layer{l}_hist_k/v``), heads
in the model's order; ``deploy.lowering`` says which slot holds what. With ``logits="last"`` the
logits are the step's last position only (``keep_last_logits``). A program with a quantised
history (``SegmentConfig.history_dtype``) keeps its history buffers in the model's dtype, holding
the values the quantised history reads back (``deploy.lowering``).

Refuses with ``ExportError`` whatever ``fixed_size_step`` refuses.
"""

from __future__ import annotations

from torch import fx

from .. import ir
from ..config import SegmentConfig
from ..errors import SegcompileError
from ..runtime import SegmentedModel
from ..runtime.variants.fixed_size_step import BufferSpec, buffer_specs, fixed_size_step, getitem
from .lowering import step_attention


class ExportError(SegcompileError):
    """The model cannot be exported as asked."""


def step_module(seg: SegmentedModel, logits: str = "last") -> fx.GraphModule:
    """Rewrite a copy of ``seg``'s step graph to fixed-size state buffers (module docstring); it runs in PyTorch too."""
    return fixed_size_step(seg.step_graph, seg.cfg, _lower_attention, logits=logits, error=ExportError,
                           class_name="SegmentStep")


def state_specs(seg: SegmentedModel) -> list[BufferSpec]:
    """``(name, kv_heads, head_dim, fixed_entries or None for history)`` per buffer input of
    ``step_module``, in its order."""
    return buffer_specs(seg.sites, seg.cfg)


def _lower_attention(graph: fx.Graph, node: fx.Node, site: ir.AttentionSite, cfg: SegmentConfig, k: fx.Node,
                     v: fx.Node, buffers: dict[str, fx.Node], offset: fx.Node) -> tuple[fx.Node, list[fx.Node]]:
    """A ``step_attention`` over the layer's buffers, before ``node``: its output, and the nodes of
    the layer's buffers after the step (local k/v, then hist k/v if it has long-range heads)."""
    q = node.args[0]
    args = (q, k, v, buffers["local_k"], buffers["local_v"], buffers.get("hist_k"), buffers.get("hist_v"), offset)
    kwargs = {"segment_len": cfg.segment_len, "tail_len": cfg.tail_len, "sinks": cfg.sink_tokens,
              "long_range": tuple(site.long_range), "scale": node.kwargs["scale"], "history_dtype": cfg.history_dtype}
    with graph.inserting_before(node):
        step = graph.call_function(step_attention, args, kwargs)
        items = [graph.call_function(getitem, (step, i)) for i in range(5)]
    return items[0], items[1:3] + (items[3:5] if site.long_range else [])
