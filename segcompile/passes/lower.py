"""lower: choose the implementation of every ``segment_attention`` node.

Sets the node's ``impl`` argument, so the graph (and its dumps) say which kernel runs, and
records the choice per layer in ``gm.meta["segcompile.impl"]``. Today every device gets the
PyTorch reference (``kernels/reference.py``); Triton kernels for CUDA and export
decompositions plug in here.
"""

from __future__ import annotations

import logging

import torch.fx as fx

from ..ops import segment_attention

log = logging.getLogger(__name__)


def choose_implementation(device) -> str:
    return "reference"


def lower(gm: fx.GraphModule) -> fx.GraphModule:
    """Pick the segment_attention implementation for the capture device."""
    device = gm.meta["segcompile.capture"].device
    chosen = {}
    for node in gm.graph.find_nodes(op="call_function", target=segment_attention._opoverload):
        impl = choose_implementation(device)
        node.update_kwarg("impl", impl)
        site = node.meta["segcompile.attention"]
        chosen[site.layer] = impl
        log.info("segment_attention %s -> %s on %s", site.where(), impl, device)
    gm.meta["segcompile.impl"] = chosen
    gm.recompile()
    return gm
