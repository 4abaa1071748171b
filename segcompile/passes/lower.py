"""lower: choose the implementation of every ``segment_attention`` node.

Sets the node's ``impl`` argument, so the graph (and its dumps) say which kernel runs, and
records the choice per layer in ``gm.meta[ir.IMPL]`` (``SegmentedModel`` shows it in
its repr, and the choice is logged). ``auto`` gives segcompile's Triton kernels
(``kernels/dispatch.py`` picks which) on CUDA and the PyTorch reference (``kernels/reference.py``)
elsewhere; ``transform(..., implementation=...)`` asks for one by name. Export lowers the nodes
again, to ONNX operators (``deploy/lowering.py``).

The Triton kernels are skipped (``auto``) or refused (asked for by name) where they would be
wrong or cannot run: no triton installed, a head dimension above ``MAX_TRITON_HEAD_DIM``, fp64
(the kernels accumulate in fp32), or a non-CUDA device outside Triton's interpreter
(``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import importlib.util
import logging
import os

import torch
import torch.fx as fx

from .. import ir
from ..errors import ConfigError
from ..ops import IMPLEMENTATIONS, segment_attention

log = logging.getLogger(__name__)

# Register pressure: a 128-row query tile of a 256-wide head already fills a Hopper SM's registers.
MAX_TRITON_HEAD_DIM = 256


TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def triton_unavailable(device: torch.device, head_dim: int, dtype: torch.dtype) -> str | None:
    """Why the Triton kernels cannot run this site, or None if they can."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install 'triton>=3.6')"
    if dtype not in TRITON_DTYPES:
        return f"the kernels take fp16, bf16 or fp32 K/V, not {dtype}"
    if head_dim > MAX_TRITON_HEAD_DIM:
        return f"head dimension {head_dim} is above the kernels' {MAX_TRITON_HEAD_DIM}"
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return f"the model is on {device}; the kernels run on CUDA (or on the CPU under TRITON_INTERPRET=1)"
    return None


def choose_implementation(requested: str, device: torch.device, site) -> str:
    if requested not in ("auto", *IMPLEMENTATIONS):
        raise ConfigError(f"implementation must be 'auto' or one of {sorted(IMPLEMENTATIONS)}, got {requested!r}")
    why_not = triton_unavailable(device, max(site.head_dim, site.v_head_dim), site.dtype)
    if requested == "triton" and why_not:
        raise ConfigError(f"implementation='triton' for {site.where()}: {why_not}; use implementation='reference'")
    if requested != "auto":
        return requested
    return "triton" if device.type == "cuda" and why_not is None else "reference"


def lower(gm: fx.GraphModule) -> fx.GraphModule:
    """Pick the segment_attention implementation of every site for the capture device."""
    device = gm.meta[ir.CAPTURE].device
    requested = gm.meta.get(ir.IMPLEMENTATION, "auto")
    chosen = {}
    for node in gm.graph.find_nodes(op="call_function", target=segment_attention):
        site = node.meta[ir.ATTENTION]
        impl = choose_implementation(requested, device, site)
        node.update_kwarg("impl", impl)
        chosen[site.layer] = impl
        log.info("segment_attention %s -> %s on %s", site.where(), impl, device)
    gm.meta[ir.IMPL] = chosen
    gm.recompile()
    return gm
