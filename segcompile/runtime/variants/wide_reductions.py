"""wide_reductions: a step graph whose mean and sum reductions accumulate in fp64.

Eager PyTorch and Inductor sum a row in different orders, so a compiled step's RMSNorm variance
can differ from the eager step's by one fp32 unit; rounded to bf16 the normalised values then
flip by one unit now and then, and the layers after it grow one flip into several units of the
logits (a random 8B-shaped model after 32K tokens: 3.5 bf16 units, 1.7e-2 relative,
bench/README.md, generation). Summed in fp64, terms of fp32 or narrower lose almost nothing
whatever the order, and the sum rounded back to its dtype is the same in both: it can differ
only where two fp64 sums straddle a rounding boundary of the narrow type (relative gap ~1e-16
against a boundary spacing of 6e-8 in fp32: about one row in 10^8 or fewer).

Matches ``aten.mean.dim`` and ``aten.sum.dim_IntList`` nodes whose input is floating point
narrower than fp64. Produces the same reduction over the input converted to fp64, its result
converted back to the node's dtype; in place. The decode graphs run it (the eager decode's,
``SegmentedModel.decode_graph``, and the CUDA-graph decoder's, ``static_step``), so that the
decode paths, compiled or not, compute the same bits; prefill and training keep the model's own
sums (a segment's activations in fp64 would cost memory there).
"""

from __future__ import annotations

import torch
from torch import fx

_REDUCTIONS = (torch.ops.aten.mean.dim, torch.ops.aten.sum.dim_IntList)
_TO = torch.ops.aten._to_copy.default


def wide_reductions(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` with its floating mean and sum reductions accumulated in fp64 (module docstring); in place."""
    graph, changed = gm.graph, False
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in _REDUCTIONS:
            continue
        x, out = node.args[0], node.meta.get("val")
        given = x.meta.get("val") if isinstance(x, fx.Node) else None
        if not isinstance(given, torch.Tensor) or not given.is_floating_point() or given.dtype == torch.float64:
            continue
        kwargs = {k: v for k, v in node.kwargs.items() if k != "dtype"}  # the fp64 input sets the accumulation
        with graph.inserting_before(node):
            wide = graph.call_function(_TO, (x,), {"dtype": torch.float64})
            reduced = graph.call_function(node.target, (wide, *node.args[1:]), kwargs)
            narrow = graph.call_function(_TO, (reduced,), {"dtype": out.dtype if out is not None else given.dtype})
        for new in (wide, reduced, narrow):
            new.meta.update(node.meta)
            new.meta["val"] = _meta_value(new)
        node.replace_all_uses_with(narrow)
        graph.erase_node(node)
        changed = True
    if changed:
        graph.lint()
        gm.recompile()
    return gm


def _meta_value(node: fx.Node):
    """The fake value of ``node`` from its inputs' (FakeTensors run the op without data)."""
    args = fx.node.map_arg(node.args, lambda n: n.meta["val"])
    kwargs = fx.node.map_arg(node.kwargs, lambda n: n.meta["val"])
    return node.target(*args, **kwargs)
