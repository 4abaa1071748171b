"""Export's region operators as plain calls that torch.compile traces inline.

``torch.export`` records a model's context-manager regions as higher-order operators whose body is
a submodule: ``wrap_with_autocast`` (an autocast-disabled region: transformers' RoPE angles, which
``autocast_regions.regions_recorded`` keeps) and ``wrap_with_set_grad_enabled`` (a ``no_grad``
region: transformers 5.17's rotary embedding is decorated with one). torch.compile refuses both
once their body reads a length that the segment step carries as an unbacked symbol ("expects no
freevars", torch 2.13): a graph break in every compiled step of a model with a region (Llama under
transformers 5.17: 2 graphs for a prefill, 3 with decode, where there should be 1 and 2).

``as_plain_calls`` makes each such node call ``autocast_region`` or ``grad_region`` instead, plain
functions that enter the same context around the same body: eager runs compute the same, export
records the region again, and torch.compile traces the ``with`` block inline.
"""

from __future__ import annotations

import torch
import torch.fx as fx


def autocast_region(device_type: str, dtype: torch.dtype | None, enabled: bool, cache_enabled: bool | None,
                    body, *args):
    """What a ``wrap_with_autocast`` node computes: ``body(*args)`` inside that ``torch.autocast``."""
    with torch.autocast(device_type, dtype=dtype, enabled=enabled, cache_enabled=cache_enabled):
        return body(*args)


def grad_region(enabled: bool, body, *args):
    """What a ``wrap_with_set_grad_enabled`` node computes: ``body(*args)`` with gradients on or off."""
    with torch.set_grad_enabled(enabled):
        return body(*args)


PLAIN_CALLS = {
    torch.ops.higher_order.wrap_with_autocast: autocast_region,
    torch.ops.higher_order.wrap_with_set_grad_enabled: grad_region,
}


def as_plain_calls(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` with every region operator of ``PLAIN_CALLS``, in it and in its submodules, calling
    its plain function with the same arguments (module docstring); in place."""
    for module in gm.modules():
        if not isinstance(module, fx.GraphModule):
            continue
        regions = [n for n in module.graph.nodes if n.op == "call_function" and n.target in PLAIN_CALLS]
        for node in regions:
            node.target = PLAIN_CALLS[node.target]
        if regions:
            module.recompile()
    return gm
