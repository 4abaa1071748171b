"""TensorRT: the exported graphs against the parser's operator table, and the engine builder and runner.

The operator check runs everywhere: every node of the files ``test_export_onnx`` exports (every
family, plan and G) is looked up in onnx-tensorrt's operator support table for TensorRT 10.15
(``data/onnx_tensorrt_operators.tsv``, with its source and date), with the type of its data input,
the restrictions that could apply to it, and the opset. A second check follows the values of the
graph inputs and fails if any reaches an input that sets a shape: TensorRT would then take that
input as a shape tensor, which must live in host memory, and the runner binds every input on the GPU.

The engine tests run where ``tensorrt`` imports and a CUDA GPU is present, and are skipped with the
reason otherwise. An fp32 engine (TF32 off) of the tiny Llama is compared with ``SegmentedModel``
like the ONNX runner is: 5 segments and 3 tokens of prefill, then 2*S decoded tokens, logits within
1e-4 max abs (logits are ~0.3; fp32 kernels of another library reorder sums, ~1e-6 expected). The
builder's error without TensorRT is checked by making ``import tensorrt`` fail.
"""

from __future__ import annotations

import sys
from pathlib import Path

import onnx
import pytest
import torch
from conftest import random_ids
from test_export_onnx import ONNX_CASES, S, TOL, _compare, exported  # noqa: F401 (exported is a fixture)

from segcompile.deploy import tensorrt as trt_export

TABLE = Path(__file__).parent / "data" / "onnx_tensorrt_operators.tsv"
# the table's type names for ONNX's
TYPE_NAMES = {"FLOAT": "FP32", "FLOAT16": "FP16", "BFLOAT16": "BF16", "DOUBLE": "DOUBLE", "INT8": "INT8",
              "UINT8": "UINT8", "INT32": "INT32", "INT64": "INT64", "BOOL": "BOOL"}
DATA_INPUT = {"Where": 1}  # the input whose type the table's "types" column is about; input 0 otherwise
# restrictions of the table that this file checks on a node: input index that must be a constant
CONSTANT_INPUT = {"CumSum": 1, "Squeeze": 1, "Unsqueeze": 1, "OneHot": 1,
                  **{op: 1 for op in ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax",
                                      "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare")}}
FIRST_OUTPUT_ONLY = {"LayerNormalization"}
# inputs that set an output's shape, by op (all inputs from the index given)
SHAPE_INPUTS = {"Reshape": [1], "Expand": [1], "Tile": [1], "ConstantOfShape": [0], "Range": [0, 1, 2],
                "Slice": [1, 2, 3, 4], "Squeeze": [1], "Unsqueeze": [1], "Split": [1], "Pad": [1, 2, 3],
                "Resize": [1, 2, 3], "TopK": [1], "OneHot": [1], "CumSum": [1],
                **{op: [1] for op in CONSTANT_INPUT if op.startswith("Reduce")}}
SHAPE_ONLY = {"Shape", "Size"}  # ops whose outputs depend on their input's shape, not its values

MISSING = trt_export.missing_tensorrt()
needs_engine = pytest.mark.skipif(
    MISSING is not None or not torch.cuda.is_available(),
    reason=(f"TensorRT engine tests need TensorRT and a CUDA GPU: {MISSING}" if MISSING is not None
            else "TensorRT engine tests need a CUDA GPU; torch sees none"),
)


# ---- the operator table ----------------------------------------------------------------------------
def _table():
    """``(opset range, {op: (supported, types, restrictions)})`` from the TSV."""
    opsets, ops = None, {}
    for line in TABLE.read_text(encoding="utf-8").splitlines():
        if not line or line.startswith("#"):
            continue
        cells = line.split("\t")
        if cells[0] == "opset":
            opsets = (int(cells[1]), int(cells[2]))
            continue
        op, supported, types, restrictions = cells
        ops[op] = (supported == "Y", {t.strip() for t in types.split(",") if t.strip()}, restrictions)
    return opsets, ops


def _types(model: onnx.ModelProto) -> dict[str, str]:
    """Tensor name -> the table's type name, from strict shape inference."""
    graph = onnx.shape_inference.infer_shapes(model, strict_mode=True).graph
    found = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.value_info, *graph.output]}
    found.update({init.name: init.data_type for init in graph.initializer})
    return {name: TYPE_NAMES.get(onnx.TensorProto.DataType.Name(t), onnx.TensorProto.DataType.Name(t))
            for name, t in found.items()}


def tensorrt_problems(model: onnx.ModelProto) -> list[str]:
    """Every node of ``model`` that the table says TensorRT's parser does not take, or may not take."""
    opsets, table = _table()
    problems = []
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if not opsets[0] <= opset <= opsets[1]:
        problems.append(f"opset {opset} is outside the parser's {opsets[0]}..{opsets[1]}")
    types = _types(model)
    constants = {init.name for init in model.graph.initializer}
    constants |= {out for node in model.graph.node if node.op_type == "Constant" for out in node.output}
    used = {name for node in model.graph.node for name in node.input} | {o.name for o in model.graph.output}
    for node in model.graph.node:
        where = f"{node.op_type} {node.name!r}"
        if node.domain not in ("", "ai.onnx"):
            problems.append(f"{where}: custom domain {node.domain!r}")
            continue
        if node.op_type not in table or not table[node.op_type][0]:
            problems.append(f"{where}: not supported" if node.op_type in table else f"{where}: not in the table")
            continue
        _, allowed, restrictions = table[node.op_type]
        data = node.input[DATA_INPUT.get(node.op_type, 0)] if node.input else None
        dtypes = [types.get(data, "unknown")] if data else []
        if node.op_type == "Cast":
            dtypes.append(TYPE_NAMES.get(onnx.TensorProto.DataType.Name(node.attribute[0].i), "unknown"))
        problems += [f"{where}: type {t} (the parser takes {', '.join(sorted(allowed))})"
                     for t in dtypes if t not in allowed]
        if not restrictions:
            continue
        if node.op_type in CONSTANT_INPUT:
            index = CONSTANT_INPUT[node.op_type]
            if len(node.input) > index and node.input[index] not in constants:
                problems.append(f"{where}: {restrictions}")
        elif node.op_type in FIRST_OUTPUT_ONLY:
            if any(out and out in used for out in node.output[1:]):
                problems.append(f"{where}: {restrictions}")
        else:  # a restriction this file does not check: a person has to look
            problems.append(f"{where}: restricted ({restrictions}); not checked here")
    return problems


def shape_inputs_from_values(model: onnx.ModelProto) -> list[str]:
    """Nodes whose shape-setting input depends on the *values* of a graph input (not only its shape)."""
    graph = model.graph
    dependent = {i.name for i in graph.input} - {init.name for init in graph.initializer}
    found = []
    for node in graph.node:  # ONNX lists nodes in topological order
        for index in SHAPE_INPUTS.get(node.op_type, []):
            if index < len(node.input) and node.input[index] in dependent:
                found.append(f"{node.op_type} {node.name!r} input {index} ({node.input[index]})")
        if node.op_type not in SHAPE_ONLY and any(name in dependent for name in node.input):
            dependent.update(out for out in node.output if out)
    return found


def test_table_is_the_parsers_10_15_table():
    header = TABLE.read_text(encoding="utf-8").split("\nopset")[0]
    assert "https://github.com/onnx/onnx-tensorrt/blob/main/docs/operators.md" in header
    assert "TensorRT 10.15" in header and "read:" in header
    opsets, ops = _table()
    assert opsets == (9, 24)
    assert len(ops) == 200
    assert ops["MatMul"][:2] == (True, {"FP32", "FP16", "BF16"})
    assert ops["CumSum"][1] == ops["Clip"][1] == {"FP32", "FP16", "BF16"}  # why deploy/lowering.py avoids them
    assert not ops["Compress"][0]


@pytest.mark.parametrize("family,plan,sinks", ONNX_CASES)
def test_exported_graph_uses_only_what_tensorrts_parser_supports(family, plan, sinks, exported):
    _, path = exported(family, plan, sinks)
    model = onnx.load(str(path))
    problems = tensorrt_problems(model)
    assert not problems, f"{len(problems)} nodes TensorRT's parser may refuse:\n" + "\n".join(problems)
    assert {n.op_type for n in model.graph.node} >= {"MatMul", "Softmax", "Where", "Gather", "Concat"}


@pytest.mark.parametrize("family,plan,sinks", ONNX_CASES)
def test_no_input_value_sets_a_shape(family, plan, sinks, exported):
    _, path = exported(family, plan, sinks)
    found = shape_inputs_from_values(onnx.load(str(path)))
    assert not found, "graph input values reach shape inputs (TensorRT shape tensors):\n" + "\n".join(found)


def test_the_checks_fire():
    """The two checks report what they are for: an int64 CumSum, an unknown op, a value-set shape."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.INT64, [4])
    n = helper.make_tensor_value_info("n", TensorProto.INT64, [1])
    y = helper.make_tensor_value_info("y", TensorProto.INT64, None)
    axis = helper.make_tensor("axis", TensorProto.INT64, [], [0])
    nodes = [helper.make_node("CumSum", ["x", "axis"], ["c"], name="count"),
             helper.make_node("Reshape", ["c", "n"], ["r"], name="shaped"),
             helper.make_node("Identity", ["r"], ["y"], name="out")]
    graph = helper.make_graph(nodes, "g", [x, n], [y], [axis])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    assert tensorrt_problems(model) == ["CumSum 'count': type INT64 (the parser takes BF16, FP16, FP32)"]
    assert shape_inputs_from_values(model) == ["Reshape 'shaped' input 1 (n)"]
    model.graph.node[2].op_type = "Unique"
    assert "Unique 'out': not supported" in tensorrt_problems(model)


# ---- without TensorRT -------------------------------------------------------------------------------
def test_builder_and_runner_without_tensorrt_say_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` now raises ImportError
    engine = tmp_path / "model.engine"
    with pytest.raises(trt_export.TensorRTUnavailable, match=r'pip install "segcompile\[tensorrt\]"') as info:
        trt_export.build_engine(tmp_path / "model.onnx", engine)  # checked before any file is read
    assert "NVIDIA GPU" in str(info.value) and isinstance(info.value, ImportError)
    assert not list(tmp_path.iterdir())
    with pytest.raises(trt_export.TensorRTUnavailable, match="NVIDIA GPU"):
        trt_export.TensorRTSegmentedModel(engine)
    assert trt_export.missing_tensorrt()


def test_cli_tensorrt_without_tensorrt_exits_2_with_the_hint(tmp_path, capsys, monkeypatch):
    from segcompile.cli.main import main

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    assert main(["export", "--format", "tensorrt", "--out", str(tmp_path / "x.engine")]) == 2
    err = capsys.readouterr().err
    assert 'pip install "segcompile[tensorrt]"' in err and "NVIDIA GPU" in err
    assert len(err.strip().splitlines()) == 2  # error: and hint:, no traceback
    assert not list(tmp_path.iterdir())
    # TensorRT's flags with an ONNX export are a user error, with or without TensorRT
    assert main(["export", "--precision", "fp16", "--out", str(tmp_path / "x.onnx")]) == 2
    assert "--precision: for --format tensorrt only" in capsys.readouterr().err


# ---- engines (GPU + TensorRT) -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine(exported, tmp_path_factory):
    """(seg, engine path): the tiny Llama (plan fraction(0.5), G = 4) as an fp32 engine, batch <= 2,
    context <= 16 segments."""
    seg, onnx_path = exported(*ONNX_CASES[0])
    path = tmp_path_factory.mktemp("trt") / "llama.engine"
    summary = trt_export.build_engine(onnx_path, path, precision="fp32", max_batch=2, max_context=16 * S)
    assert summary.path == path and summary.metadata_path.is_file() and summary.bytes == path.stat().st_size
    assert summary.profile["input_ids"] == ([1, 1], [2, S], [2, S])
    return seg, path


@needs_engine
def test_engine_matches_segmented_model(engine):
    seg, path = engine
    runner = trt_export.TensorRTSegmentedModel(path)

    def prefill(ids):
        state = runner.prefill(ids)
        return state, state.logits.cpu()

    def decode(state, ids):
        logits, state = runner.decode(state, ids)
        return logits.cpu(), state

    prefill_diff, decode_diff = _compare(seg, prefill, decode)
    print(f"TensorRT {trt_export.import_tensorrt().__version__} on {torch.cuda.get_device_name()}: "
          f"prefill {prefill_diff:.1e}, decode {decode_diff:.1e}")
    assert prefill_diff < TOL and decode_diff < TOL, (prefill_diff, decode_diff)


@needs_engine
def test_engine_history_grows_to_its_profile_and_no_further(engine):
    seg, path = engine
    runner = trt_export.TensorRTSegmentedModel(path)
    ids = random_ids(1, 15 * S + 3, seed=5)  # history up to 14 segments: within 16
    state = runner.prefill(ids)
    with torch.no_grad():
        ref = seg.prefill(ids)
    assert (state.logits.cpu() - ref.logits).abs().max().item() < TOL
    assert state.history <= runner.max_history == 16 * S
    with pytest.raises(trt_export.TensorRTError, match="max_context"):
        # T = S: the step that ends the segment [17 S, 18 S) needs 17 S history positions
        runner.decode(state, random_ids(1, 3 * S, seed=6))


@needs_engine
def test_engine_bad_inputs_are_clear_errors(engine, tmp_path):
    _, path = engine
    runner = trt_export.TensorRTSegmentedModel(path)
    with pytest.raises(trt_export.TensorRTError, match="at most 2"):
        runner.prefill(random_ids(3, S))
    with pytest.raises(trt_export.TensorRTError, match="integer"):
        runner.prefill(random_ids(1, S).float())
    state = runner.initial_state(1)
    with pytest.raises(trt_export.TensorRTError, match="crosses a segment boundary"):
        runner.step(state, random_ids(1, S + 1))
    copy = tmp_path / "copy.engine"
    data = path.read_bytes()
    copy.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    trt_export.metadata_path(copy).write_text(trt_export.metadata_path(path).read_text())
    with pytest.raises(trt_export.TensorRTError, match="SHA-256"):
        trt_export.TensorRTSegmentedModel(copy)


@needs_engine
def test_cli_export_tensorrt(tmp_path, capsys, monkeypatch):
    from segcompile.cli.main import main

    monkeypatch.setenv("COLUMNS", "200")
    out = tmp_path / "tiny.engine"
    rc = main(["export", "--format", "tensorrt", "--layers", "1", "--segment-len", "16", "--sinks", "2",
               "--max-context", "64", "--out", str(out), "--no-color"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert out.is_file() and trt_export.metadata_path(out).is_file() and not list(tmp_path.glob(".*.tmp"))
    assert "fp32" in text and "TensorRT" in text
    runner = trt_export.TensorRTSegmentedModel(out)
    assert runner.generate(random_ids(1, 40), 3).shape == (1, 3)
