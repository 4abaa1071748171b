"""Export a ``SegmentedModel``'s segment-step program to ONNX (docs/design.md section 8).

The exported graph is ``step_module(seg)``: the step graph ``seg.step_graph`` (the same program
``SegmentedModel`` runs) with its carried state rewritten to fixed-size buffers, so that one file
serves any context length and the state of a local KV head never grows:

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

Which slots are valid is a function of ``position_offset`` (``deploy.lowering``), so there are
no length inputs. Dynamic axes: batch, step, history. When a step finishes its segment the graph
also does ``SegmentedModel.end_segment``'s move (tail, sinks, history) with ``where``: the
runtime only feeds tokens and positions.

How: ``deploy.step_module`` rewrites the graph (it says what it matches and when it refuses), and
the result goes through ``torch.onnx.export(dynamo=True)``. No node of a custom ONNX domain
remains; the file is checked with ``onnx.checker`` and shape inference before it is renamed into
place. ``metadata_props`` record the format and its version (``ir.FORMAT_KEY``,
``ir.FORMAT_VERSION_KEY``), the segment sizes, the plan per layer and the model's fingerprint
(the keys of ``deploy.format``) so that a runtime can check what it is fed.

A quantised history (``SegmentConfig.history_dtype=torch.float8_e4m3fn``). The ``hist`` inputs
and outputs stay in the model's dtype; what a segment end writes into them is quantised with the
runtime's per-block scales and read back (``deploy.lowering``), so the file computes what
``SegmentedModel`` with the fp8 history computes, and a runner feeds it as any other file
(``HISTORY_DTYPE_KEY`` in the metadata names the rounding). onnxruntime's own float8 storage is
not used: at the file's opset (20) ONNX's Gather, Concat, Where and MatMul, which the step reads
and writes its history with, take no float8 tensors, and onnxruntime (1.32, CPU) runs float8 in
Cast but not even in Reshape (``tests/test_fp8_history.py`` checks both). A float8 history input
would be cast whole to the model's dtype at every step, beside a second input of scales per layer:
the buffer's memory would halve, but each step would read and write the whole history in the
model's dtype besides.
"""

from __future__ import annotations

import json
import os
import re
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import ir
from ..files import atomic_path, default_file_mode
from ..runtime import SegmentedModel
from .format import (
    EXPORT_ID_KEY,
    HISTORY_DTYPE_KEY,
    INPUT_IDS,
    LOGITS,
    LOGITS_KEY,
    MODEL_KEY,
    OUTPUT_SUFFIX,
    PLAN_DESCRIPTION_KEY,
    PLAN_KEY,
    POSITION_OFFSET,
    SEGMENT_LEN_KEY,
    SINK_TOKENS_KEY,
    STATE_KEY,
    TAIL_LEN_KEY,
    VERSION_KEY,
)
from .step_module import ExportError, state_specs, step_module

OPSET = 20  # plain MatMul/Softmax attention; see deploy/lowering.py for why not opset 23's Attention
EXAMPLE_BATCH = 2  # >= 2 so that export keeps batch and step dynamic (0/1 sizes specialise)
PROTOBUF_LIMIT = 2**31 - 1  # bytes: the most one ModelProto serialises to
GRAPH_ROOM = 256 << 20  # bytes kept for the graph itself when the weights alone are measured
WEIGHTS_SUFFIX = ".data"  # a file whose weights pass the limit keeps them in PATH.data beside it


@dataclass(frozen=True)
class ExportSummary:
    path: Path
    bytes: int
    opset: int
    inputs: list[tuple[str, str, list]]  # name, element type, shape (ints or axis names)
    outputs: list[tuple[str, str, list]]
    metadata: dict[str, Any]


def example_inputs(seg: SegmentedModel, batch: int = EXAMPLE_BATCH, step: int | None = None, history: int | None = None):
    """Zero inputs of ``step_module(seg)``: ids ``[batch, step]``, offset 0, the buffers with ``history`` slots."""
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
    """The file's ``metadata_props``: the format, the segment sizes, the plan, the fingerprint (``deploy.format``)."""
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
        ir.FORMAT_KEY: ir.ONNX_FORMAT,
        ir.FORMAT_VERSION_KEY: ir.ONNX_FORMAT_VERSION,
        VERSION_KEY: ver,
        EXPORT_ID_KEY: uuid.uuid4().hex,
        SEGMENT_LEN_KEY: str(cfg.segment_len),
        TAIL_LEN_KEY: str(cfg.tail_len),
        SINK_TOKENS_KEY: str(cfg.sink_tokens),
        PLAN_KEY: json.dumps({str(s.layer): list(s.long_range) for s in seg.sites}),
        PLAN_DESCRIPTION_KEY: cfg.long_range.describe(),
        MODEL_KEY: json.dumps(fingerprint),
        LOGITS_KEY: logits,
        STATE_KEY: json.dumps([[n, h, d, e] for n, h, d, e in state_specs(seg)]),
        **({HISTORY_DTYPE_KEY: str(cfg.history_dtype).removeprefix("torch.")} if cfg.history_dtype is not None else {}),
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
    input_names = [INPUT_IDS, POSITION_OFFSET] + [name for name, *_ in specs]
    output_names = [LOGITS] + [name + OUTPUT_SUFFIX for name, *_ in specs]
    if module.meta[ir.EXPORT]["num_model_outputs"] != 1:
        raise ExportError("only models whose output is one logits tensor are exported today")

    module.eval()  # a fresh GraphModule is in training mode; the graph's own dropout flags are already fixed
    with torch.no_grad(), warnings.catch_warnings():
        # torch.onnx says each input's "batch" / "history" axis name "will not be used" because
        # another input shares it: it is used, once, for all of them (the file's dims carry it)
        warnings.filterwarnings("ignore", message=r"# The axis name: \w+ will not be used, since it shares")
        try:
            program = torch.onnx.export(
                module, args, dynamo=True, opset_version=OPSET, dynamic_shapes=tuple(dynamic),
                input_names=input_names, output_names=output_names, optimize=True, verbose=False,
                report=False,
            )
        except Exception as e:  # torch.onnx raises several types; name the stage and keep the cause
            raise ExportError(_why_export_failed(e, module)) from e
    proto = program.model_proto
    for key, value in metadata(seg, logits).items():
        proto.metadata_props.add(key=key, value=value)
    domains = {node.domain for node in proto.graph.node if node.domain not in ("", "ai.onnx")}
    if domains:
        raise ExportError(f"the exported graph has nodes in custom domains {sorted(domains)}; onnxruntime cannot run them")

    with atomic_path(path) as tmp:
        _save(proto, tmp, path)
        onnx.checker.check_model(str(tmp), full_check=True)  # full_check runs strict shape inference too
        _check_shapes(tmp)
    return ExportSummary(path, path.stat().st_size, OPSET, _values(proto.graph.input), _values(proto.graph.output),
                         {p.key: p.value for p in proto.metadata_props})


def _why_export_failed(error: Exception, module: torch.fx.GraphModule) -> str:
    """``torch.onnx.export``'s failure in the user's terms: where the graph calls an op torch.onnx
    has no ONNX function for (what a model's own code can cause), that op and the modules that
    call it; else the start of torch.onnx's message."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))  # torch.onnx colours its message
    found = re.search(r"No ONNX function found for <OpOverload\(op='([\w.]+)', overload='(\w+)'\)>", text)
    if found is None:
        return f"torch.onnx.export failed on the segment-step graph: {' '.join(text.split())[:500]}"
    op = f"{found[1]}.{found[2]}"
    calls = [n for m in module.modules() if isinstance(m, torch.fx.GraphModule)
             for n in m.graph.nodes if n.op == "call_function" and str(n.target) == op]
    callers = sorted({"`{}` ({})".format(*ir.module_of(n)) for n in calls})
    more = f" and {len(callers) - 3} more" if len(callers) > 3 else ""
    where = f", called by {', '.join(callers[:3])}{more}" if callers else ""
    if "grouped_mm" in op:  # transformers' MoE experts with experts_implementation="grouped_mm"
        remedy = ('transformers\' MoE experts run it: call model.set_experts_implementation("batched_mm") before '
                  'segcompile.transform (or load with experts_implementation="batched_mm"); batched products export')
    else:
        remedy = "the step graph exports only where every op has one: make the model use standard PyTorch ops there"
    return f"torch.onnx has no ONNX function for `{op}`{where}; {remedy}"


def _save(proto, tmp: Path, path: Path) -> None:
    """``proto`` to ``tmp`` (renamed to ``path`` afterwards), its weights to ``path`` +
    ``WEIGHTS_SUFFIX`` when the whole would pass protobuf's 2 GiB (an 8B-shaped model's embeddings
    alone do). The file names the data file by its final name, so the rename keeps the pair valid;
    the data file itself is written in place, not atomically."""
    import onnx

    if sum(len(t.raw_data) for t in proto.graph.initializer) < PROTOBUF_LIMIT - GRAPH_ROOM:
        onnx.save_model(proto, str(tmp))
        return
    data = path.with_name(path.name + WEIGHTS_SUFFIX)
    data.unlink(missing_ok=True)  # onnx appends to an existing data file
    onnx.save_model(proto, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)
    os.chmod(data, default_file_mode())  # onnx writes it 0600: readable by whoever may read the model


def _check_shapes(path: Path) -> None:
    """Strict shape inference over the file at ``path`` (by path: a model over 2 GB cannot be
    inferred in memory); the inferred copy is only a by-product."""
    import onnx

    inferred = path.with_name(path.name + ".inferred")
    try:
        onnx.shape_inference.infer_shapes_path(str(path), str(inferred), strict_mode=True)
    finally:
        inferred.unlink(missing_ok=True)


def _values(values) -> list[tuple[str, str, list]]:
    import onnx

    out = []
    for value in values:
        t = value.type.tensor_type
        shape = [d.dim_param or d.dim_value for d in t.shape.dim]
        out.append((value.name, onnx.TensorProto.DataType.Name(t.elem_type).lower(), shape))
    return out
