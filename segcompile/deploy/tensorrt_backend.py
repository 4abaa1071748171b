"""Run a TensorRT engine built by ``deploy.tensorrt.build_engine``.

**Not run yet** (``deploy.tensorrt`` says why): follows the documented TensorRT 10 Python API
(``Runtime.deserialize_cuda_engine``, ``IExecutionContext.set_input_shape``,
``set_tensor_address``, ``execute_async_v3``).

``TensorRTSegmentedModel(engine_path)`` is the runner (``deploy.runner``) over
``TensorRTBackend``: ``OnnxSegmentedModel``'s interface (``initial_state``, ``copy_state``, ``step``,
``prefill``, ``decode``, ``generate``) on torch CUDA tensors. The state buffers are CUDA tensors
whose addresses the engine reads and writes; the history capacity grows up to the profile's H
(``max_context``), and logits come back as CUDA tensors. As with onnxruntime, a state is updated
in place: each ``decode`` returns the state that continues it and makes it stale, and
``copy_state`` copies one to branch from (``deploy.runner``). Work is enqueued on a stream of the
backend's own (TensorRT warns against the default stream) that waits for the caller's stream
before each piece of work, and the caller's stream waits for it after.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from .format import INPUT_IDS, LOGITS, OUTPUT_SUFFIX, POSITION_OFFSET, read_step_program
from .runner import SegmentRunner
from .tensorrt_common import TensorRTError, import_tensorrt, logger, read_engine, require_gpu

# TensorRT's DataType names -> torch dtypes (the types an exported step program's tensors can have)
TORCH_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32,
                "INT64": torch.int64, "BOOL": torch.bool, "INT8": torch.int8, "UINT8": torch.uint8}


class TensorRTBackend:
    """A deserialized engine with one execution context; arrays are torch tensors on its CUDA device."""

    noun = "engine"
    error = TensorRTError

    def __init__(self, path: str | os.PathLike, device: str = "cuda"):
        trt = import_tensorrt()
        self.path = Path(path)
        self.record, data = read_engine(self.path)
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise TensorRTError(f"TensorRT engines run on CUDA devices, got device={device!r}")
        require_gpu()
        with torch.cuda.device(self.device):
            self.runtime = trt.Runtime(logger(trt))  # kept: the engine is deserialized from it
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

        self.metadata = dict(self.record["onnx_metadata"])  # its format was checked by build_engine
        self.program = read_step_program(self.metadata)
        # the profile's max shapes (get_tensor_profile_shape gives min, opt, max)
        self.max_batch = self.engine.get_tensor_profile_shape(INPUT_IDS, 0)[2][0]
        hist = [name for name, *_, entries in self.program.state_specs if entries is None]
        self.max_history = self.engine.get_tensor_profile_shape(hist[0], 0)[2][2] if hist else None
        self._offset = torch.zeros((), dtype=torch.long, device=self.device)

    def ids(self, ids, what: str) -> torch.Tensor:
        """``ids`` (numpy or torch, integer, ``[batch, tokens]``) as a new int64 tensor on the engine's device."""
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
        return ids.to(device=self.device, dtype=torch.long, copy=True).contiguous()

    def zeros(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        with self._on_stream():
            return torch.zeros(shape, dtype=self.dtypes[name], device=self.device)

    def copy(self, buffer: torch.Tensor) -> torch.Tensor:
        with self._on_stream():
            return buffer.clone()

    def grown(self, name: str, buffer: torch.Tensor, capacity: int) -> torch.Tensor:
        with self._on_stream():
            new = buffer.new_zeros(buffer.shape[:2] + (capacity,) + buffer.shape[3:])
            new[:, :, : buffer.shape[2]] = buffer
        return new

    def run(self, ids: torch.Tensor, position: int, inputs: dict, outputs: dict) -> torch.Tensor:
        """Bind the inputs, the output buffers and a new logits tensor; run the engine on the backend's stream."""
        with self._on_stream() as caller:
            ids = ids.contiguous()  # a piece of a prompt is a strided view: the engine reads dense memory
            self._offset.fill_(position)
            logits = self._execute(ids, inputs, outputs)
        logits.record_stream(caller)  # the caller reads it there; keep the memory until it has
        return logits

    def concat(self, pieces: list) -> torch.Tensor:
        return torch.cat(pieces, dim=1)

    def next_token(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.argmax(-1, keepdim=True)

    def no_tokens(self, batch: int) -> torch.Tensor:
        return torch.zeros(batch, 0, dtype=torch.long, device=self.device)

    def synchronize(self) -> None:
        torch.cuda.current_stream(self.device).synchronize()  # the caller's stream waits for ours after each step

    @contextmanager
    def _on_stream(self) -> Iterator[torch.cuda.Stream]:
        """Enqueue the block's work on the backend's stream, ordered after the caller's stream's work
        (whose tensors it may read) and before the caller's later work; yields the caller's stream."""
        caller = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(caller)
        try:
            with torch.cuda.stream(self.stream):
                yield caller
        finally:
            caller.wait_stream(self.stream)

    def _execute(self, ids: torch.Tensor, inputs: dict, outputs: dict) -> torch.Tensor:
        context = self.context
        for name, value in [(INPUT_IDS, ids), *inputs.items()]:
            if not context.set_input_shape(name, tuple(value.shape)):
                raise TensorRTError(f"{self.path.name} cannot take {name} of shape {tuple(value.shape)}: outside "
                                    "the optimization profile it was built with (`--max-batch`, `--max-context`)")
            context.set_tensor_address(name, value.data_ptr())
        context.set_tensor_address(POSITION_OFFSET, self._offset.data_ptr())
        for name, value in outputs.items():
            context.set_tensor_address(name + OUTPUT_SUFFIX, value.data_ptr())
        logits = torch.empty(tuple(context.get_tensor_shape(LOGITS)), dtype=self.dtypes[LOGITS], device=self.device)
        context.set_tensor_address(LOGITS, logits.data_ptr())
        if not context.execute_async_v3(self.stream.cuda_stream):
            raise TensorRTError(f"TensorRT could not run {self.path.name} on this step (its log above says why)")
        return logits


class TensorRTSegmentedModel(SegmentRunner):
    """Prefill and greedy decode with an engine written by ``build_engine`` (module docstring)."""

    def __init__(self, path: str | os.PathLike, device: str = "cuda"):
        backend = TensorRTBackend(path, device)
        super().__init__(backend)
        self.record = backend.record
        self.engine = backend.engine
        self.context = backend.context
        self.stream = backend.stream
        self.device = backend.device


def _torch_dtype(trt, dtype) -> torch.dtype:
    for name, value in TORCH_DTYPES.items():
        if getattr(trt.DataType, name, None) == dtype:
            return value
    raise TensorRTError(f"the engine has a tensor of TensorRT type {dtype}, which this runner has no torch type for")
