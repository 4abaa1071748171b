"""Run an exported segment-step program (``deploy.onnx_export``) with onnxruntime.

``OnnxSegmentedModel(path)`` is the runner (``deploy.runner``) over ``OnnxRuntimeBackend``: it
opens the file with the CUDA execution provider when onnxruntime has it, the CPU provider
otherwise, and offers the driver's API on numpy arrays:

    state = model.prefill(prompt_ids)              # any length: cut at segment boundaries
    logits, state = model.decode(state, next_ids)  # [B, n, V]
    new_ids = model.generate(prompt_ids, max_new_tokens=64)   # greedy

The state buffers are OrtValues bound with IO binding (on the GPU under CUDA), so a step copies
only the ids in and the logits out. They are updated in place: each ``decode`` returns the state
that continues the one it was given, which is stale from then on (decoding from it again raises
a ``SegcompileError``); ``copy_state(state)`` keeps a copy to branch from (``deploy.runner``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from ..errors import SegcompileError
from .format import INPUT_IDS, LOGITS, OUTPUT_SUFFIX, POSITION_OFFSET, check_format, read_step_program
from .runner import SegmentRunner

PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")  # in order of preference


class OnnxRuntimeBackend:
    """A step program loaded in an onnxruntime session; arrays are numpy, state buffers OrtValues."""

    noun = "file"
    error = SegcompileError
    max_batch = None  # the file's axes are dynamic: any batch, any history
    max_history = None

    def __init__(self, path, providers: list[str] | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise SegcompileError(f"{path}: no such file")
        if providers is None:
            available = ort.get_available_providers()
            providers = [p for p in PROVIDERS if p in available]
        options = ort.SessionOptions()
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=providers)
        except Exception as e:  # onnxruntime's errors are its own types
            raise SegcompileError(f"onnxruntime cannot load {path}: {' '.join(str(e).split())[:300]}") from e
        meta = self.session.get_modelmeta().custom_metadata_map
        check_format(meta, path)
        self.metadata = dict(meta)
        self.program = read_step_program(meta)
        try:
            self.dtype = np.dtype(self.program.model["dtype"])
        except TypeError:
            raise SegcompileError(
                f"{path} keeps its state in {self.program.model['dtype']}, which numpy (and so this runner) has "
                "no type for; export the model in float32 or float16"
            ) from None
        self.providers = self.session.get_providers()
        self.device = "cuda" if self.providers[0] == "CUDAExecutionProvider" else "cpu"

    def ids(self, ids, what: str) -> np.ndarray:
        if isinstance(ids, torch.Tensor):
            ids = ids.detach().cpu().numpy()
        if not isinstance(ids, np.ndarray):
            raise SegcompileError(f"{what} must be an integer numpy array [batch, tokens], got a {type(ids).__name__}")
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
            raise SegcompileError(f"{what} must be an integer array [batch, tokens], got {ids.dtype} of shape {ids.shape}")
        return np.ascontiguousarray(ids, dtype=np.int64)

    def zeros(self, name: str, shape: tuple[int, ...]):
        return self._on_device(np.zeros(shape, self.dtype))

    def copy(self, buffer):
        return self._on_device(np.array(buffer.numpy()))  # through the host: copies are for branching, rare

    def grown(self, name: str, buffer, capacity: int):
        old = buffer.numpy()  # a copy to the host: growth is rare (doubling)
        new = np.zeros(old.shape[:2] + (capacity,) + old.shape[3:], self.dtype)
        new[:, :, : old.shape[2]] = old
        return self._on_device(new)

    def run(self, ids: np.ndarray, position: int, inputs: dict, outputs: dict) -> np.ndarray:
        binding = self.session.io_binding()
        binding.bind_cpu_input(INPUT_IDS, np.ascontiguousarray(ids))
        binding.bind_cpu_input(POSITION_OFFSET, np.array(position, dtype=np.int64))
        for name, value in inputs.items():
            binding.bind_ortvalue_input(name, value)
        binding.bind_output(LOGITS, self.device)
        for name, value in outputs.items():
            binding.bind_ortvalue_output(name + OUTPUT_SUFFIX, value)
        self.session.run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy()

    def concat(self, pieces: list) -> np.ndarray:
        return np.concatenate(pieces, axis=1)

    def next_token(self, logits: np.ndarray) -> np.ndarray:
        return logits.argmax(-1).astype(np.int64)[:, None]

    def no_tokens(self, batch: int) -> np.ndarray:
        return np.zeros((batch, 0), np.int64)

    def synchronize(self) -> None:
        pass  # run_with_iobinding returns when the step is done, and the logits are on the host

    def _on_device(self, array: np.ndarray):
        return ort.OrtValue.ortvalue_from_numpy(array, self.device, 0)


class OnnxSegmentedModel(SegmentRunner):
    """Prefill and greedy decode of an exported ONNX step program with onnxruntime (module docstring)."""

    def __init__(self, path, providers: list[str] | None = None):
        backend = OnnxRuntimeBackend(path, providers)
        super().__init__(backend)
        self.session = backend.session
        self.providers = backend.providers
        self.device = backend.device
        self.dtype = backend.dtype
