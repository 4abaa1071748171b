"""keep_last_logits: a step graph that computes the logits of its last position only.

Prefill needs the next token's logits, not a row per token of every segment: for an LM head of
128K words and segments of 4K tokens, the full logits are 1 to 2 GB per step, more than the
rest of the step's working memory. ``SegmentedModel.prefill`` and the ONNX exporter use this
variant; ``forward`` and ``decode`` keep the full graph.

Matches the logits leaf of the model's output. When it is an ``aten.linear`` (the LM head) over
``[B, L, hidden]`` used only there, the hidden states are sliced before it; otherwise (another
head, or hidden states used elsewhere) the logits themselves are sliced, which is still right,
only not cheaper. A model output without a single logits tensor is left alone (``None``).
"""

from __future__ import annotations

import copy

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from ... import ir


def logits_leaf(out_spec) -> int | None:
    """Index of the logits among the flattened model outputs (``None``: no single logits tensor)."""
    tree = pytree.tree_unflatten(list(range(out_spec.num_leaves)), out_spec)
    found = tree.logits if hasattr(tree, "logits") else tree
    return found if isinstance(found, int) else None


def keep_last_position(graph: fx.Graph, output: fx.Node, leaves: list, index: int) -> None:
    """Make ``leaves[index]`` (the logits) the last position's only, in place."""
    head = leaves[index]
    hidden = head.args[0] if head.op == "call_function" and head.target is torch.ops.aten.linear.default else None
    value = hidden.meta.get("val") if isinstance(hidden, fx.Node) else None
    if hidden is not None and len(head.users) == 1 and isinstance(value, torch.Tensor) and value.dim() == 3:
        with graph.inserting_before(head):
            last = graph.call_function(torch.ops.aten.slice.Tensor, (hidden, 1, -1, None))
        head.replace_input_with(hidden, last)
        return
    with graph.inserting_before(output):
        leaves[index] = graph.call_function(torch.ops.aten.slice.Tensor, (head, 1, -1, None))


def keep_last_logits(gm: fx.GraphModule) -> fx.GraphModule | None:
    """A copy of the step graph ``gm`` whose logits output is ``[B, 1, V]``; ``None`` if the
    model's output has no single logits tensor."""
    index = logits_leaf(gm.meta[ir.CAPTURE].out_spec)
    if index is None:
        return None
    out = fx.GraphModule(gm, copy.deepcopy(gm.graph), class_name="SegmentStepLastLogits")
    out.meta.update(gm.meta)
    output = out.graph.output_node()
    leaves = list(output.args[0])
    keep_last_position(out.graph, output, leaves, index)
    output.args = (tuple(leaves),)
    out.graph.eliminate_dead_code()
    out.graph.lint()
    out.recompile()
    return out
