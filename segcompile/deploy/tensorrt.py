"""Build a TensorRT engine from an exported segment-step ONNX file (``deploy.onnx_export``).

**Not run yet.** TensorRT's libraries could not be installed where this was written, so this module
and ``deploy.tensorrt_backend`` follow the documented TensorRT 10 Python API (``Builder``,
``OnnxParser``, ``BuilderConfig``, ``IOptimizationProfile``, ``Runtime``,
``IExecutionContext.execute_async_v3``) and are exercised only by ``tests/test_export_tensorrt.py``,
which runs where ``tensorrt`` imports and a CUDA GPU is present. ``tensorrt`` is imported inside
the functions: without it they raise ``TensorRTUnavailable`` with the install hint.

``build_engine(onnx_path, engine_path)`` parses the file and builds one optimization profile over its
dynamic axes (the exporter's ``Dim``\\ s):

    batch    1 .. max_batch                      opt max_batch
    step     1 .. S   (``input_ids`` axis 1)      opt S: prefill steps are where the time goes
    history  1 .. H   (``*_hist_k/v`` axis 2)     opt H; H = max_context rounded up to whole segments

then writes the serialized engine atomically and, beside it, ``ENGINE.json``: the ONNX file's
``segcompile.*`` metadata, the profile, the precision and the engine's SHA-256
(``deploy.tensorrt_common`` says why). Precisions:

    fp32   no reduced precision, TF32 off: the numbers PyTorch's fp32 gives (the default)
    fp16   BuilderFlag.FP16: TensorRT may run any layer in fp16; inputs and outputs keep the file's types
    bf16   BuilderFlag.BF16, likewise
    typed  a strongly typed network: every tensor has the type the file gives it (for files exported
           in fp16 or bf16). TensorRT 10.12 deprecated the fp16/bf16 flags in favour of this; 11 removed them.

``TensorRTSegmentedModel(engine_path)`` (``deploy.tensorrt_backend``, also importable from here)
runs the engine: the runner of ``deploy.runner`` on torch CUDA tensors.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .format import INPUT_IDS, PREFIX, check_format, read_step_program
from .tensorrt_backend import TensorRTSegmentedModel
from .tensorrt_common import (
    INSTALL_HINT,
    TensorRTError,
    TensorRTUnavailable,
    import_tensorrt,
    logger,
    metadata_path,
    missing_tensorrt,
    require_gpu,
    write_engine,
)

__all__ = [
    "CONTEXT_SEGMENTS", "INSTALL_HINT", "PRECISIONS", "EngineSummary", "TensorRTError", "TensorRTSegmentedModel",
    "TensorRTUnavailable", "build_engine", "import_tensorrt", "metadata_path", "missing_tensorrt",
]

PRECISIONS = ("fp32", "fp16", "bf16", "typed")
CONTEXT_SEGMENTS = 8  # default max_context, in segments


@dataclass(frozen=True)
class EngineSummary:
    path: Path
    bytes: int
    metadata_path: Path
    precision: str
    profile: dict[str, tuple[list[int], list[int], list[int]]]  # dynamic input -> (min, opt, max) shape
    max_context: int
    tensorrt_version: str


def build_engine(onnx_path: str | os.PathLike, engine_path: str | os.PathLike, *, precision: str = "fp32",
                 max_batch: int = 1, max_context: int | None = None, workspace_bytes: int | None = None,
                 verbose: bool = False) -> EngineSummary:
    """Build an engine for the step program in ``onnx_path``; write it (and its metadata) to ``engine_path``.

    ``max_batch`` and ``max_context`` (tokens; default ``CONTEXT_SEGMENTS`` segments) bound the
    optimization profile, and so what the engine can run: TensorRT sizes its memory for them.
    """
    trt = import_tensorrt()
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    meta = _onnx_metadata(onnx_path)
    program = read_step_program(meta)
    S = program.segment_len
    history_inputs = {name for name, *_, entries in program.state_specs if entries is None}
    if precision not in PRECISIONS:
        raise TensorRTError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if not isinstance(max_batch, int) or max_batch < 1:
        raise TensorRTError(f"max_batch must be an int >= 1, got {max_batch!r}")
    max_context = CONTEXT_SEGMENTS * S if max_context is None else max_context
    if not isinstance(max_context, int) or max_context < 1:
        raise TensorRTError(f"max_context must be an int >= 1 (tokens), got {max_context!r}")
    history = -(-max_context // S) * S
    require_gpu()

    log = logger(trt, verbose)
    builder = trt.Builder(log)
    # TensorRT 10 networks are always explicit batch (the EXPLICIT_BATCH flag is deprecated and ignored)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if precision == "typed" else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, log)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [" ".join(str(parser.get_error(i)).split()) for i in range(parser.num_errors)]
        raise TensorRTError(f"TensorRT's ONNX parser rejected {onnx_path}: {'; '.join(errors[:5]) or 'no error given'}")

    profile = builder.create_optimization_profile()
    shapes = {}
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        if tensor.is_shape_tensor:
            raise TensorRTError(f"TensorRT takes input {tensor.name} of {onnx_path} as a shape tensor; the step "
                                "program's inputs are data (the runner binds them in GPU memory): re-export it")
        dims = list(tensor.shape)
        if -1 in dims:
            shapes[tensor.name] = _profile_shapes(tensor.name, dims, max_batch, S,
                                                  history if tensor.name in history_inputs else None)
            profile.set_shape(tensor.name, *shapes[tensor.name])
    config = builder.create_builder_config()
    config.add_optimization_profile(profile)
    _set_precision(trt, config, precision)
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise TensorRTError(f"TensorRT could not build an engine from {onnx_path} (its log above says why; "
                            "verbose=True, or `segcompile export --debug`, shows more)")
    data = memoryview(serialized)
    write_engine(engine_path, data, {
        "tensorrt_version": trt.__version__,
        "precision": precision,
        "max_batch": max_batch,
        "max_context": max_context,
        "profile": {name: [list(s) for s in value] for name, value in shapes.items()},
        "onnx_file": onnx_path.name,
        "onnx_metadata": meta,
    })
    return EngineSummary(engine_path, data.nbytes, metadata_path(engine_path), precision, shapes, max_context,
                         trt.__version__)


def _onnx_metadata(path: Path) -> dict[str, str]:
    """The ``segcompile.*`` metadata of the ONNX file at ``path``, its format checked."""
    import onnx

    if not path.is_file():
        raise TensorRTError(f"{path}: no such file (write one with `segcompile export --format onnx`)")
    model = onnx.load(str(path), load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props if p.key.startswith(PREFIX)}
    check_format(meta, path, TensorRTError, reads="builds from version")
    return meta


def _profile_shapes(name: str, dims: list[int], max_batch: int, S: int, history: int | None):
    """(min, opt, max) for one input whose dims hold -1 (dynamic): the exporter's batch, step and, for a
    history buffer (``history`` not None), history."""
    low, opt, high = list(dims), list(dims), list(dims)
    for axis, dim in enumerate(dims):
        if dim != -1:
            continue
        if axis == 0:
            low[axis], opt[axis], high[axis] = 1, max_batch, max_batch
        elif name == INPUT_IDS and axis == 1:
            low[axis], opt[axis], high[axis] = 1, S, S
        elif history is not None and axis == 2:
            low[axis], opt[axis], high[axis] = 1, history, history
        else:
            raise TensorRTError(f"input {name} has a dynamic axis {axis} that segcompile's exporter does not make")
    return low, opt, high


def _set_precision(trt, config, precision: str) -> None:
    if precision == "fp32":
        config.clear_flag(trt.BuilderFlag.TF32)  # on by default; it rounds matmul inputs to 10 bits
    elif precision in ("fp16", "bf16"):
        flag = getattr(trt.BuilderFlag, precision.upper(), None)
        if flag is None:
            raise TensorRTError(f"TensorRT {trt.__version__} has no BuilderFlag.{precision.upper()}; export the "
                                f"model in {precision} and build with precision='typed'")
        config.set_flag(flag)
    # "typed": a strongly typed network takes no precision flags
