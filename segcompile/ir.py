"""The contract between the compiler and everything that runs its output.

The passes write these, the runtime, the exporters and the visualiser read them; nothing here
imports another segcompile module but the errors, so every layer may depend on it:

* ``AttentionSite``: what ``find_attention`` learned about one attention site (and
  ``plan_heads`` added), kept in ``gm.meta[SITES]`` in layer order;
* ``STATE_NAMES``: the carried state of one layer, in the order the segment-step graph takes
  and returns it (docs/design.md section 6);
* the metadata keys of graphs and nodes;
* the names and versions of the file formats segcompile writes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx

# Per layer, in this order: the step graph's placeholders ``layer{i}_{name}`` after input_ids and
# position_offset, and LayerState's fields.
STATE_NAMES = ("sink_k", "sink_v", "hist_k", "hist_v", "tail_k", "tail_v", "current_k", "current_v")

# ---- gm.meta keys (a GraphModule's) --------------------------------------------------------------
CAPTURE = "segcompile.capture"  # frontend.capture.CaptureInfo: model class, config, device, out_spec
CONFIG = "segcompile.config"  # the SegmentConfig being compiled
IMPLEMENTATION = "segcompile.implementation"  # what transform() asked for: "auto", "triton", "reference"
SITES = "segcompile.sites"  # list[AttentionSite], layer order (find_attention; plan_heads fills long_range)
PLAN = "segcompile.plan"  # {layer: long-range KV heads} (plan_heads)
FINGERPRINT = "segcompile.fingerprint"  # the model's fingerprint (plan_heads; plan files carry it)
IMPL = "segcompile.impl"  # {layer: implementation name} (lower)
NUM_MODEL_OUTPUTS = "segcompile.num_model_outputs"  # the step graph's leading outputs: the model's leaves
PASS_TIMINGS = "segcompile.pass_timings"  # {pass: seconds} (PassManager)
DUMP_SECONDS = "segcompile.dump_seconds"  # seconds spent writing dumps and pages (PassManager)
EXPORT = "segcompile.export"  # the export step module: logits leaf and output count

# ---- node.meta keys ------------------------------------------------------------------------------
ATTENTION = "segcompile.attention"  # the AttentionSite a node belongs to
STATE = "segcompile.state"  # (layer, state name) of a carried-state placeholder or output
RELEASED = "segcompile.released"  # release_tails: the placeholder whose storage a node frees


def module_of(node: fx.Node) -> tuple[str, str]:
    """The innermost module whose forward made ``node`` (the ``nn_module_stack`` capture records):
    its path (``"<root>"``: the model itself) and its class's short name; ``("<unknown module>",
    "<unknown>")`` where the node has none (one a pass made without copying it)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "<unknown module>", "<unknown>"
    path, cls = list(stack.values())[-1]
    cls = cls if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
    return path or "<root>", cls.rsplit(".", 1)[-1]


@dataclass
class AttentionSite:
    """One attention site of the captured model: where it is, its q/k/v producers and sizes."""

    layer: int
    module: str
    module_class: str
    kind: str  # "sdpa" | "eager"
    output: fx.Node  # its value is the attention output [B, H, L, Dv]
    q: fx.Node
    k: fx.Node  # un-repeated [B, Hk, L, D]
    v: fx.Node
    num_heads: int
    num_kv_heads: int
    head_dim: int
    v_head_dim: int
    scale: float
    dtype: torch.dtype
    mask: fx.Node | None = None
    is_causal: bool = False
    long_range: tuple[int, ...] = field(default=())  # filled by plan_heads

    def where(self) -> str:
        return f"layer {self.layer} (`{self.module}`, {self.module_class})"


# ---- file formats ---------------------------------------------------------------------------------
# The exported ONNX step program: its metadata_props carry ONNX_FORMAT and ONNX_FORMAT_VERSION
# (as strings, as ONNX stores every property) under these keys.
ONNX_FORMAT = "segcompile.onnx-step"
ONNX_FORMAT_VERSION = "1"
FORMAT_KEY = "segcompile.format"
FORMAT_VERSION_KEY = "segcompile.format_version"
# The JSON record written beside a TensorRT engine.
TENSORRT_FORMAT = "segcompile.tensorrt-engine"
TENSORRT_FORMAT_VERSION = 1
