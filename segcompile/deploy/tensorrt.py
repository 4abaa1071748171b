"""Build a TensorRT engine from an exported segment-step ONNX file (``deploy.onnx_export``), and run it.

**Not run yet.** TensorRT's libraries could not be installed where this was written, so this module
follows the documented TensorRT 10 Python API (``Builder``, ``OnnxParser``, ``BuilderConfig``,
``IOptimizationProfile``, ``Runtime``, ``IExecutionContext.execute_async_v3``) and is exercised only
by ``tests/test_export_tensorrt.py``, which runs where ``tensorrt`` imports and a CUDA GPU is present.
``tensorrt`` is imported inside the functions: without it they raise ``TensorRTUnavailable`` with the
install hint.

``build_engine(onnx_path, engine_path)`` parses the file and builds one optimization profile over its
dynamic axes (the exporter's ``Dim``\\ s):

    batch    1 .. max_batch                      opt max_batch
    step     1 .. S   (``input_ids`` axis 1)      opt S: prefill steps are where the time goes
    history  1 .. H   (``*_hist_k/v`` axis 2)     opt H; H = max_context rounded up to whole segments

then writes the serialized engine atomically and, beside it, ``ENGINE.json``: the ONNX file's
``segcompile.*`` metadata, the profile, the precision and the engine's SHA-256 (a TensorRT plan
carries no metadata of ours, and a plain plan file stays loadable by TensorRT's own tools; the
runner refuses an engine whose hash is not the one recorded). Precisions:

    fp32   no reduced precision, TF32 off: the numbers PyTorch's fp32 gives (the default)
    fp16   BuilderFlag.FP16: TensorRT may run any layer in fp16; inputs and outputs keep the file's types
    bf16   BuilderFlag.BF16, likewise
    typed  a strongly typed network: every tensor has the type the file gives it (for files exported
           in fp16 or bf16). TensorRT 10.12 deprecated the fp16/bf16 flags in favour of this; 11 removed them.

``TensorRTSegmentedModel(engine_path)`` has ``OnnxSegmentedModel``'s interface (``initial_state``,
``step``, ``prefill``, ``decode``, ``generate``) on torch CUDA tensors: the state is two sets of
preallocated per-layer buffers that the engine reads and writes in turn, the history capacity grows
(doubling, in whole segments) up to the profile's H, and logits come back as CUDA tensors. Work is
enqueued on a stream of the runner's own (TensorRT warns against the default stream) that waits for
the caller's stream before a step, and the caller's stream waits for it after.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import segment_pieces
from ..errors import SegcompileError
from ..files import atomic_write_bytes, atomic_write_text
from ..ir import ONNX_FORMAT, ONNX_FORMAT_VERSION

INSTALL_HINT = 'pip install "segcompile[tensorrt]" (needs an NVIDIA GPU)'
PRECISIONS = ("fp32", "fp16", "bf16", "typed")
FORMAT = "segcompile.tensorrt-engine"
FORMAT_VERSION = 1
CONTEXT_SEGMENTS = 8  # default max_context, in segments
_LOGGER = None  # one trt.Logger per process: TensorRT warns when a second, different one is passed


class TensorRTError(SegcompileError):
    """TensorRT refused the file, the build failed, or the engine cannot run what it is given."""


class TensorRTUnavailable(SegcompileError, ImportError):
    """``tensorrt`` does not import (not installed, or its libraries are missing)."""

    def __init__(self, reason: str):
        super().__init__(f"TensorRT is not available ({reason}): {INSTALL_HINT}")
        self.reason = reason


def import_tensorrt():
    """The ``tensorrt`` module, or ``TensorRTUnavailable`` with the install hint."""
    try:
        import tensorrt
    except (ImportError, OSError) as e:  # OSError: the bindings are there but libnvinfer is not
        raise TensorRTUnavailable(" ".join(str(e).split()) or type(e).__name__) from e
    return tensorrt


def missing_tensorrt() -> str | None:
    """Why ``tensorrt`` does not import here (one line, without the hint), or None when it does."""
    try:
        import_tensorrt()
    except TensorRTUnavailable as e:
        return e.reason
    return None


def metadata_path(engine_path: str | os.PathLike) -> Path:
    """Where ``build_engine`` writes the engine's metadata: ``ENGINE.json`` beside it."""
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.name + ".json")


@dataclass(frozen=True)
class EngineSummary:
    path: Path
    bytes: int
    metadata_path: Path
    precision: str
    profile: dict[str, tuple[list[int], list[int], list[int]]]  # dynamic input -> (min, opt, max) shape
    max_context: int
    tensorrt_version: str


# ---- building -------------------------------------------------------------------------------------
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
    S = int(meta["segcompile.segment_len"])
    if precision not in PRECISIONS:
        raise TensorRTError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if not isinstance(max_batch, int) or max_batch < 1:
        raise TensorRTError(f"max_batch must be an int >= 1, got {max_batch!r}")
    max_context = CONTEXT_SEGMENTS * S if max_context is None else max_context
    if not isinstance(max_context, int) or max_context < 1:
        raise TensorRTError(f"max_context must be an int >= 1 (tokens), got {max_context!r}")
    history = -(-max_context // S) * S
    _require_gpu()

    logger = _logger(trt, verbose)
    builder = trt.Builder(logger)
    # TensorRT 10 networks are always explicit batch (the EXPLICIT_BATCH flag is deprecated and ignored)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if precision == "typed" else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
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
            shapes[tensor.name] = _profile_shapes(tensor.name, dims, max_batch, S, history)
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
    record = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "engine_bytes": data.nbytes,
        "engine_sha256": hashlib.sha256(data).hexdigest(),
        "tensorrt_version": trt.__version__,
        "precision": precision,
        "max_batch": max_batch,
        "max_context": max_context,
        "profile": {name: [list(s) for s in value] for name, value in shapes.items()},
        "onnx_file": onnx_path.name,
        "onnx_metadata": meta,
    }
    # engine first: a stale metadata file beside a new engine fails the hash check, never runs it
    atomic_write_bytes(engine_path, data)
    atomic_write_text(metadata_path(engine_path), json.dumps(record, indent=1, sort_keys=True) + "\n")
    return EngineSummary(engine_path, data.nbytes, metadata_path(engine_path), precision, shapes, max_context,
                         trt.__version__)


def _onnx_metadata(path: Path) -> dict[str, str]:
    import onnx

    if not path.is_file():
        raise TensorRTError(f"{path}: no such file (write one with `segcompile export --format onnx`)")
    model = onnx.load(str(path), load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props if p.key.startswith("segcompile.")}
    if meta.get("segcompile.format") != ONNX_FORMAT:
        raise TensorRTError(f"{path} is not a segcompile segment-step ONNX file (run `segcompile export`)")
    if meta.get("segcompile.format_version") != ONNX_FORMAT_VERSION:
        raise TensorRTError(f"{path} has format version {meta.get('segcompile.format_version')}; "
                            f"this segcompile builds from version {ONNX_FORMAT_VERSION}")
    return meta


def _profile_shapes(name: str, dims: list[int], max_batch: int, S: int, history: int):
    """(min, opt, max) for one input whose dims hold -1 (dynamic): the exporter's batch, step and history."""
    low, opt, high = list(dims), list(dims), list(dims)
    for axis, dim in enumerate(dims):
        if dim != -1:
            continue
        if axis == 0:
            low[axis], opt[axis], high[axis] = 1, max_batch, max_batch
        elif name == "input_ids" and axis == 1:
            low[axis], opt[axis], high[axis] = 1, S, S
        elif name.endswith(("_hist_k", "_hist_v")) and axis == 2:
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


def _logger(trt, verbose: bool = False):
    global _LOGGER
    if _LOGGER is None:
        _LOGGER = trt.Logger(trt.Logger.WARNING)
    _LOGGER.min_severity = trt.Logger.VERBOSE if verbose else trt.Logger.WARNING
    return _LOGGER


def _require_gpu() -> None:
    import torch

    if not torch.cuda.is_available():
        raise TensorRTError("TensorRT builds and runs engines on an NVIDIA GPU, and torch sees none here")


# ---- running --------------------------------------------------------------------------------------
@dataclass
class TensorRTState:
    """Carried state of one sequence batch: position, the two buffer sets, last logits (CUDA tensors)."""

    export_id: str
    batch_size: int
    position: int = 0
    buffers: dict = field(default_factory=dict)  # name -> tensor (the set the next step reads)
    spare: dict = field(default_factory=dict)  # name -> tensor (the set the next step writes)
    history: int = 0  # capacity of the history buffers
    logits: Any = None  # last token's logits [B, V]


class TensorRTSegmentedModel:
    """Prefill and greedy decode with an engine written by ``build_engine`` (module docstring)."""

    def __init__(self, path: str | os.PathLike, device: str = "cuda"):
        trt = import_tensorrt()
        import torch

        self.path = Path(path)
        record, data = _read_engine(self.path)
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise TensorRTError(f"TensorRT engines run on CUDA devices, got device={device!r}")
        _require_gpu()
        with torch.cuda.device(self.device):
            self.runtime = trt.Runtime(_logger(trt))  # kept: the engine is deserialized from it
            self.engine = self.runtime.deserialize_cuda_engine(data)
            if self.engine is None:
                raise TensorRTError(f"TensorRT {trt.__version__} cannot load {path}: an engine runs only with the "
                                    "TensorRT version and GPU model that built it; build it again here")
            self.context = self.engine.create_execution_context()
            self.stream = torch.cuda.Stream(self.device)
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        shape_io = [n for n in names if self.engine.is_shape_inference_io(n)]
        if shape_io:
            raise TensorRTError(f"{path} takes {shape_io} as shape tensors (host memory); this runner binds every "
                                "tensor in GPU memory: build the engine from a file written by `segcompile export`")
        self.dtypes = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}

        meta = record["onnx_metadata"]
        self.record = record
        self.export_id = meta["segcompile.export_id"]
        self.segment_len = int(meta["segcompile.segment_len"])
        self.tail_len = int(meta["segcompile.tail_len"])
        self.sink_tokens = int(meta["segcompile.sink_tokens"])
        self.plan = {int(k): v for k, v in json.loads(meta["segcompile.plan"]).items()}
        self.model = json.loads(meta["segcompile.model"])
        self.logits_mode = meta["segcompile.logits"]
        self.state_specs = [tuple(s) for s in json.loads(meta["segcompile.state"])]
        self.vocab_size = self.model.get("vocab_size")
        self.max_batch = self.engine.get_tensor_profile_shape("input_ids", 0)[2][0]
        hist = [name for name, *_, entries in self.state_specs if entries is None]
        self.max_history = self.engine.get_tensor_profile_shape(hist[0], 0)[2][2] if hist else None
        self._offset = torch.zeros((), dtype=torch.long, device=self.device)
        self.timings = {"prefill_s": 0.0, "prefill_tokens": 0, "decode_s": 0.0, "decode_tokens": 0}

    # ---- state ---------------------------------------------------------------------------------
    def initial_state(self, batch_size: int) -> TensorRTState:
        import torch

        if not isinstance(batch_size, int) or batch_size < 1:
            raise TensorRTError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if batch_size > self.max_batch:
            raise TensorRTError(f"{self.path.name} was built for batches of at most {self.max_batch}; "
                                f"build it again with a larger max_batch (`--max-batch {batch_size}`)")
        state = TensorRTState(self.export_id, batch_size, history=self.segment_len)
        with torch.cuda.stream(self.stream):
            for name, heads, dim, entries in self.state_specs:
                shape = (batch_size, heads, entries if entries is not None else state.history, dim)
                state.buffers[name] = torch.zeros(shape, dtype=self.dtypes[name], device=self.device)
                state.spare[name] = torch.zeros(shape, dtype=self.dtypes[name], device=self.device)
        return state

    def _grow_history(self, state: TensorRTState, needed: int) -> None:
        import torch

        S = self.segment_len
        if self.max_history is None:  # no long-range heads: no history buffers
            state.history = -(-needed // S) * S
            return
        if needed > self.max_history:
            raise TensorRTError(
                f"the context has reached {needed} history positions; {self.path.name} holds at most "
                f"{self.max_history} (built with max_context={self.record['max_context']}): build it again with a "
                "larger max_context (`--max-context`)"
            )
        capacity = min(-(-max(needed, 2 * state.history) // S) * S, self.max_history)
        for name, *_, entries in self.state_specs:
            if entries is not None:
                continue
            old = state.buffers[name]
            new = old.new_zeros(old.shape[:2] + (capacity,) + old.shape[3:])
            new[:, :, : old.shape[2]] = old
            state.buffers[name], state.spare[name] = new, torch.zeros_like(new)
        state.history = capacity

    # ---- running ------------------------------------------------------------------------------
    def step(self, state: TensorRTState, chunk):
        """Run one step on ``chunk [B, L]`` (L <= S tokens inside one segment); returns its logits."""
        import torch

        self._check_state(state)
        S, T = self.segment_len, self.tail_len
        caller = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(caller)  # chunk may have been made on the caller's stream
        with torch.cuda.stream(self.stream):
            ids = self._check_ids(chunk, "chunk")
            n = ids.shape[1]
            if ids.shape[0] != state.batch_size:
                raise TensorRTError(f"batch size {ids.shape[0]} does not match the state's {state.batch_size}; "
                                    "decode with the batch the state was prefilled with")
            room = S - state.position % S
            if n > room:
                raise TensorRTError(
                    f"a step of {n} tokens at position {state.position} crosses a segment boundary (S={S}; "
                    f"{room} tokens left in this segment): feed at most S tokens per step, or use prefill/decode, "
                    "which cut the input at segment boundaries"
                )
            start = state.position - state.position % S
            if n == room and start + S - T > state.history:
                self._grow_history(state, start + S - T)
            self._offset.fill_(state.position)
            logits = self._execute(ids, state)
        caller.wait_stream(self.stream)
        logits.record_stream(caller)  # the caller reads it there; keep the memory until it has
        state.buffers, state.spare = state.spare, state.buffers
        state.position += n
        state.logits = logits[:, -1]
        return logits

    def _execute(self, ids, state: TensorRTState):
        """Bind the inputs, the spare buffers and a new logits tensor; enqueue the engine on ``self.stream``."""
        import torch

        context = self.context
        for name, value in [("input_ids", ids), *state.buffers.items()]:
            if not context.set_input_shape(name, tuple(value.shape)):
                raise TensorRTError(f"{self.path.name} cannot take {name} of shape {tuple(value.shape)}: outside "
                                    "the optimization profile it was built with (`--max-batch`, `--max-context`)")
            context.set_tensor_address(name, value.data_ptr())
        context.set_tensor_address("position_offset", self._offset.data_ptr())
        for name, value in state.spare.items():
            context.set_tensor_address(f"{name}_out", value.data_ptr())
        logits = torch.empty(tuple(context.get_tensor_shape("logits")), dtype=self.dtypes["logits"],
                             device=self.device)
        context.set_tensor_address("logits", logits.data_ptr())
        if not context.execute_async_v3(self.stream.cuda_stream):
            raise TensorRTError(f"TensorRT could not run {self.path.name} on this step (its log above says why)")
        return logits

    def prefill(self, input_ids, state: TensorRTState | None = None) -> TensorRTState:
        """Feed ``input_ids [B, N]`` (any N), a segment at a time; ``state.logits`` = last token's."""
        import torch

        start = time.perf_counter()
        batch, tokens = _shape(input_ids, "input_ids")
        state = state if state is not None else self.initial_state(batch)
        self._feed(state, input_ids, tokens, collect=False)
        torch.cuda.current_stream(self.device).synchronize()  # the timings are of finished work
        self.timings["prefill_s"] += time.perf_counter() - start
        self.timings["prefill_tokens"] += batch * tokens
        return state

    def decode(self, state: TensorRTState, next_ids):
        """Feed ``next_ids [B, n]`` after ``state``; returns their logits and the (same, updated) state."""
        import torch

        batch, tokens = _shape(next_ids, "next_ids")
        if self.logits_mode != "all" and tokens > 1:
            # a "last" engine gives one position per step: feed one token at a time
            pieces = [self.decode(state, next_ids[:, i : i + 1])[0] for i in range(tokens)]
            return torch.cat(pieces, dim=1), state
        start = time.perf_counter()
        logits = self._feed(state, next_ids, tokens, collect=True)
        torch.cuda.current_stream(self.device).synchronize()
        self.timings["decode_s"] += time.perf_counter() - start
        self.timings["decode_tokens"] += batch * tokens
        return logits, state

    def generate(self, prompt_ids, max_new_tokens: int):
        """Greedy decoding: the ``max_new_tokens`` tokens after ``prompt_ids [B, N]``, as ``[B, max_new_tokens]``
        int64 on the engine's device."""
        import torch

        state = self.prefill(prompt_ids)
        out = []
        for i in range(max_new_tokens):
            token = state.logits.argmax(-1, keepdim=True)
            out.append(token)
            if i + 1 < max_new_tokens:
                self.decode(state, token)
        return torch.cat(out, dim=1) if out else torch.zeros(state.batch_size, 0, dtype=torch.long, device=self.device)

    def _feed(self, state: TensorRTState, ids, total: int, collect: bool):
        import torch

        pieces = [self.step(state, ids[:, piece]) for piece in segment_pieces(state.position, total, self.segment_len)]
        return torch.cat(pieces, dim=1) if collect else None

    # ---- checks -------------------------------------------------------------------------------
    def _check_state(self, state) -> None:
        if not isinstance(state, TensorRTState):
            raise TensorRTError(f"state must be a TensorRTState from this model's prefill, got {type(state).__name__}")
        if state.export_id != self.export_id:
            raise TensorRTError(
                f"this state was made by another exported model (export id {state.export_id[:12]}, this engine "
                f"{self.export_id[:12]} = {self.path.name}); prefill with this model to get its state"
            )

    def _check_ids(self, ids, what: str):
        """``ids`` (numpy or torch, integer, ``[batch, tokens]``) as a new int64 tensor on the engine's device."""
        import numpy as np
        import torch

        if isinstance(ids, np.ndarray):
            if not np.issubdtype(ids.dtype, np.integer):
                raise TensorRTError(f"{what} must be an integer array [batch, tokens], got {ids.dtype}")
            ids = torch.from_numpy(np.ascontiguousarray(ids))
        if not isinstance(ids, torch.Tensor):
            raise TensorRTError(f"{what} must be an integer tensor or numpy array [batch, tokens], got a "
                                f"{type(ids).__name__}")
        if ids.dim() != 2 or ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise TensorRTError(f"{what} must be an integer tensor [batch, tokens], got {ids.dtype} of shape "
                                f"{tuple(ids.shape)}")
        if ids.numel() == 0:
            raise TensorRTError(f"{what} is empty (shape {tuple(ids.shape)})")
        ids = ids.to(device=self.device, dtype=torch.long, copy=True).contiguous()
        low, high = int(ids.min()), int(ids.max())
        if self.vocab_size is not None and (low < 0 or high >= self.vocab_size):
            raise TensorRTError(f"{what} holds ids outside the vocabulary [0, {self.vocab_size}): "
                                f"min {low}, max {high}")
        return ids


def _shape(ids, what: str) -> tuple[int, int]:
    """``(batch, tokens)`` of ``ids`` (numpy or torch); the dtype and values are checked per step."""
    shape = getattr(ids, "shape", None)
    if shape is None or len(shape) != 2:
        raise TensorRTError(f"{what} must be an integer array or tensor [batch, tokens], got a {type(ids).__name__}"
                            + (f" of shape {tuple(shape)}" if shape is not None else ""))
    if 0 in tuple(shape):
        raise TensorRTError(f"{what} is empty (shape {tuple(shape)})")
    return int(shape[0]), int(shape[1])


def _read_engine(path: Path) -> tuple[dict, bytes]:
    """The engine's metadata record and bytes, checked against each other."""
    meta_path = metadata_path(path)
    if not path.is_file():
        raise TensorRTError(f"{path}: no such file (build one with `segcompile export --format tensorrt`)")
    if not meta_path.is_file():
        raise TensorRTError(f"{meta_path}: no such file; segcompile reads an engine's segment sizes, plan and state "
                            "layout from it: build the engine with `segcompile export --format tensorrt`")
    try:
        record = json.loads(meta_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise TensorRTError(f"{meta_path} is not a segcompile engine metadata file ({e})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise TensorRTError(f"{meta_path} is not a segcompile engine metadata file")
    if record.get("format_version") != FORMAT_VERSION:
        raise TensorRTError(f"{meta_path} has format version {record.get('format_version')}; this segcompile "
                            f"reads {FORMAT_VERSION}")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != record.get("engine_sha256"):
        raise TensorRTError(f"{path} is not the engine {meta_path.name} describes (its SHA-256 differs: the build "
                            "was interrupted, or one file was replaced); build the engine again")
    return record, data


def _torch_dtype(trt, dtype):
    import torch

    table = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32,
             "INT64": torch.int64, "BOOL": torch.bool, "INT8": torch.int8, "UINT8": torch.uint8}
    for name, value in table.items():
        if getattr(trt.DataType, name, None) == dtype:
            return value
    raise TensorRTError(f"the engine has a tensor of TensorRT type {dtype}, which this runner has no torch type for")
