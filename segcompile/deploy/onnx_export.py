"""Export a ``SegmentedModel``'s segment-step program to ONNX.

The exported graph is the step graph ``seg.step_graph`` (the same program ``SegmentedModel`` runs)
with its carried state rewritten to fixed-size buffers, so that one file serves any context
length and the state of a local KV head never grows:

inputs
    ``input_ids``        int64 ``[batch, step]``: 1 <= step <= S tokens that do not cross a
                         segment boundary (a whole segment in prefill, one token in decode)
    ``position_offset``  int64 ``[]``: absolute position of ``input_ids[:, 0]``
    per layer l         ``layer{l}_local_k/v`` ``[batch, Hkv, G + T + S, D]`` (sinks | tail |
                         current, every KV head); for layers with long-range KV heads also
                         ``layer{l}_hist_k/v`` ``[batch, n_lr, history, D]`` (slot j = position j;
                         ``history`` is a capacity, at least ``a + S - T`` before a step that ends
                         the segment starting at ``a``)
outputs
    ``logits``           ``[batch, 1, V]`` (``logits="last"``, the default) or ``[batch, step, V]``
    per layer l         ``layer{l}_local_k/v_out``, ``layer{l}_hist_k/v_out``: the state after the
                         step, same shapes as the inputs (so a runtime can bind them to a second
                         set of preallocated buffers and swap)

Which slots are valid is a function of ``position_offset`` (``kernels/export.py``), so there are
no length inputs. Dynamic axes: batch, step, history. When a step finishes its segment the graph
also does ``SegmentedModel.end_segment``'s move (tail, sinks, history) with ``where``: the
runtime only feeds tokens and positions.

How: every ``segcompile::segment_attention`` node of a copy of the step graph is replaced by
``lowering.step_attention`` (plain torch ops; the attention math and the state move), the
per-layer sink/hist/tail/current placeholders by the buffers above, and the result goes through
``torch.onnx.export(dynamo=True)``. No node of a custom ONNX domain remains; the file is checked
with ``onnx.checker`` and shape inference before it is renamed into place. ``metadata_props``
record the segment sizes, the plan per layer and the model's fingerprint (``segcompile.*`` keys)
so that a runtime can check what it is fed.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import fx

from ..errors import SegcompileError
from .lowering import step_attention
from ..ops import segment_attention
from ..runtime.variants.keep_last_logits import keep_last_position, logits_leaf
from ..runtime.driver import SegmentedModel
from .. import ir

OPSET = 20  # plain MatMul/Softmax attention; see kernels/export.py for why not opset 23's Attention
FORMAT = "segcompile.onnx-step"
FORMAT_VERSION = 1
EXAMPLE_BATCH = 2  # >= 2 so that export keeps batch and step dynamic (0/1 sizes specialise)


class ExportError(SegcompileError):
    """The model cannot be exported as asked."""


@dataclass(frozen=True)
class ExportSummary:
    path: Path
    bytes: int
    opset: int
    inputs: list[tuple[str, str, list]]  # name, element type, shape (ints or axis names)
    outputs: list[tuple[str, str, list]]
    metadata: dict[str, Any]


def step_module(seg: SegmentedModel, logits: str = "last") -> fx.GraphModule:
    """The step graph with fixed-size state buffers (see the module docstring); runs in PyTorch too."""
    if logits not in ("last", "all"):
        raise ExportError(f"logits must be 'last' or 'all', got {logits!r}")
    cfg = seg.cfg
    src = seg.step_graph
    gm = fx.GraphModule(src, copy.deepcopy(src.graph), class_name="SegmentStep")
    graph = gm.graph
    placeholders = {n.target: n for n in graph.nodes if n.op == "placeholder"}
    offset = placeholders["position_offset"]

    new_inputs, last = [], offset
    for site in seg.sites:
        names = ["local_k", "local_v"] + (["hist_k", "hist_v"] if site.long_range else [])
        nodes = {}
        for name in names:
            with graph.inserting_after(last):
                last = nodes[name] = graph.placeholder(f"layer{site.layer}_{name}")
        new_inputs.append(nodes)

    attention = list(graph.find_nodes(op="call_function", target=segment_attention))
    if len(attention) != len(seg.sites):
        raise ExportError(f"the step graph has {len(attention)} segment_attention nodes for {len(seg.sites)} layers")
    state_out = []
    for site, node, buffers in zip(seg.sites, attention, new_inputs):
        q, cur_k, cur_v = node.args[:3]
        k, v = _step_kv(cur_k), _step_kv(cur_v)
        kwargs = {"segment_len": cfg.segment_len, "tail_len": cfg.tail_len, "sinks": cfg.sink_tokens,
                  "long_range": tuple(site.long_range), "scale": node.kwargs["scale"]}
        with graph.inserting_before(node):
            step = graph.call_function(
                step_attention,
                (q, k, v, buffers["local_k"], buffers["local_v"], buffers.get("hist_k"), buffers.get("hist_v"), offset),
                kwargs,
            )
            items = [graph.call_function(_getitem, (step, i)) for i in range(5)]
        node.replace_all_uses_with(items[0])
        state_out += items[1:3] + (items[3:5] if site.long_range else [])

    _count_with_range(graph)
    output = graph.output_node()
    leaves = list(output.args[0][: seg._num_outputs])
    index = _logits_leaf(seg)
    if logits == "last":
        keep_last_position(graph, output, leaves, index)
    output.args = (tuple(leaves) + tuple(state_out),)
    for node in attention:
        graph.erase_node(node)
    graph.eliminate_dead_code()
    for name, node in placeholders.items():
        if name not in ("input_ids", "position_offset"):
            if node.users:
                raise ExportError(f"state input {name} is still used after the rewrite")
            graph.erase_node(node)
    graph.lint()
    gm.recompile()
    gm.meta[ir.EXPORT] = {"logits_leaf": index, "num_model_outputs": seg._num_outputs}
    return gm


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


# ---- state buffers ------------------------------------------------------------------------------
def state_specs(seg: SegmentedModel) -> list[tuple[str, int, int, int | None]]:
    """``(name, kv_heads, head_dim, fixed_entries or None for history)`` per state input, in order."""
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


def example_inputs(seg: SegmentedModel, batch: int = EXAMPLE_BATCH, step: int | None = None, history: int | None = None):
    S = seg.cfg.segment_len
    step = step or max(2, min(S, 3))
    history = history or max(2, S)
    dtype = seg.sites[0].dtype
    device = seg.capture_info.device
    ids = torch.zeros(batch, step, dtype=torch.long, device=device)
    offset = torch.tensor(0, dtype=torch.long, device=device)
    state = [torch.zeros(batch, heads, entries if entries is not None else history, dim, dtype=dtype, device=device)
             for _, heads, dim, entries in state_specs(seg)]
    return (ids, offset, *state)


def metadata(seg: SegmentedModel, logits: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    from .. import __name__ as package

    try:
        ver = version(package)
    except PackageNotFoundError:
        ver = "unknown"
    cfg = seg.cfg
    info = seg.capture_info
    vocab = getattr(info.model_config, "vocab_size", None)
    fingerprint = {
        "architecture": info.model_class,
        "num_layers": len(seg.sites),
        "kv_heads": [s.num_kv_heads for s in seg.sites],
        "heads": [s.num_heads for s in seg.sites],
        "head_dim": [s.head_dim for s in seg.sites],
        "vocab_size": vocab,
        "dtype": str(seg.sites[0].dtype).removeprefix("torch."),
    }
    return {
        "segcompile.format": FORMAT,
        "segcompile.format_version": str(FORMAT_VERSION),
        "segcompile.version": ver,
        "segcompile.export_id": uuid.uuid4().hex,
        "segcompile.segment_len": str(cfg.segment_len),
        "segcompile.tail_len": str(cfg.tail_len),
        "segcompile.sink_tokens": str(cfg.sink_tokens),
        "segcompile.plan": json.dumps({str(s.layer): list(s.long_range) for s in seg.sites}),
        "segcompile.plan_description": cfg.long_range.describe(),
        "segcompile.model": json.dumps(fingerprint),
        "segcompile.logits": logits,
        "segcompile.state": json.dumps([[n, h, d, e] for n, h, d, e in state_specs(seg)]),
    }


# ---- export ---------------------------------------------------------------------------------------
def export_onnx(seg: SegmentedModel, path: str | os.PathLike, *, logits: str = "last") -> ExportSummary:
    """Write ``seg``'s step program to ``path`` (atomically) and return what was written."""
    import onnx

    path = Path(path)
    module = step_module(seg, logits)
    args = example_inputs(seg)
    batch = torch.export.Dim("batch", min=1)
    step = torch.export.Dim("step", min=1, max=seg.cfg.segment_len)
    history = torch.export.Dim("history", min=1)
    specs = state_specs(seg)
    dynamic = [{0: batch, 1: step}, None]
    dynamic += [{0: batch} if entries is not None else {0: batch, 2: history} for _, _, _, entries in specs]
    input_names = ["input_ids", "position_offset"] + [name for name, *_ in specs]
    output_names = ["logits"] + [f"{name}_out" for name, *_ in specs]
    if module.meta[ir.EXPORT]["num_model_outputs"] != 1:
        raise ExportError("only models whose output is one logits tensor are exported today")

    module.eval()  # a fresh GraphModule is in training mode; the graph's own dropout flags are already fixed
    with torch.no_grad():
        try:
            program = torch.onnx.export(
                module, args, dynamo=True, opset_version=OPSET, dynamic_shapes=tuple(dynamic),
                input_names=input_names, output_names=output_names, optimize=True, verbose=False,
                report=False,
            )
        except Exception as e:  # torch.onnx raises several types; name the stage and keep the cause
            raise ExportError(f"torch.onnx.export failed on the segment-step graph: {' '.join(str(e).split())[:500]}") from e
    proto = program.model_proto
    for key, value in metadata(seg, logits).items():
        proto.metadata_props.add(key=key, value=value)
    domains = {node.domain for node in proto.graph.node if node.domain not in ("", "ai.onnx")}
    if domains:
        raise ExportError(f"the exported graph has nodes in custom domains {sorted(domains)}; onnxruntime cannot run them")

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        onnx.save_model(proto, tmp)
        onnx.checker.check_model(tmp, full_check=True)  # full_check runs strict shape inference too
        onnx.shape_inference.infer_shapes_path(tmp, tmp + ".inferred", strict_mode=True)
        Path(tmp + ".inferred").unlink()
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the mode open() would
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        Path(tmp + ".inferred").unlink(missing_ok=True)
        raise
    return ExportSummary(path, path.stat().st_size, OPSET, _values(proto.graph.input), _values(proto.graph.output),
                         {p.key: p.value for p in proto.metadata_props})


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _values(values) -> list[tuple[str, str, list]]:
    import onnx

    out = []
    for value in values:
        t = value.type.tensor_type
        shape = [d.dim_param or d.dim_value for d in t.shape.dim]
        out.append((value.name, onnx.TensorProto.DataType.Name(t.elem_type).lower(), shape))
    return out
