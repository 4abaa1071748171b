"""Run an exported segment-step program (``deploy.onnx_export``) with onnxruntime.

``OnnxSegmentedModel(path, device=None)`` is the runner (``deploy.runner``) over
``OnnxRuntimeBackend``, on numpy arrays:

    state = model.prefill(prompt_ids)              # any length: cut at segment boundaries
    logits, state = model.decode(state, next_ids)  # [B, n, V]
    new_ids = model.generate(prompt_ids, max_new_tokens=64)   # greedy

**Where it runs.** ``device="cuda"`` opens the file with onnxruntime's CUDA execution provider
(the ``onnxruntime-gpu`` build; a ``SegcompileError`` where it is missing), ``device="cpu"`` with
the CPU provider, ``device=None`` with CUDA where onnxruntime has it, else the CPU.
``providers=`` (onnxruntime's own list) overrides the choice. ``model.provider`` and
``repr(model)`` name the provider the session runs on. The CUDA provider computes fp32 products
without TF32 (``CUDA_OPTIONS``), as PyTorch does by default, so an fp32 file gives
``SegmentedModel``'s logits on the same GPU. Its CUDA libraries are those a CUDA torch loads:
import torch before the first session (segcompile does), or call
``onnxruntime.preload_dlls()``.

**Dtypes.** The state buffers and logits are numpy arrays of the file's dtype: float32 and
float16 exports run on both providers. numpy has no bfloat16, so a bf16 export is refused when
it is opened: export the model in float16 (or float32) instead.

**Memory traffic.** The state buffers are OrtValues on the provider's device, bound with IO
binding, and each step writes the other set of buffers in place (``deploy.runner``): a step
copies only the ids and the position to the device and the logits (``[B, 1, V]`` for a
``logits="last"`` file) back to the host, which greedy decoding reads. Copying a state
(``copy_state``) stays on the device; new zero buffers and a history that grows (doubling, so
rarely) go through the host.

The buffers are updated in place: each ``decode`` returns the state that continues the one it
was given, which is stale from then on (decoding from it again raises a ``SegcompileError``);
``copy_state(state)`` keeps a copy to branch from (``deploy.runner``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from ..errors import SegcompileError
from .format import INPUT_IDS, LOGITS, OUTPUT_SUFFIX, POSITION_OFFSET, check_format, read_step_program
from .runner import SegmentRunner

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
DEVICES = {"cuda": CUDA, "cpu": CPU}
# TF32 would round fp32 products to 10 mantissa bits (onnxruntime enables it by default)
CUDA_OPTIONS = {"use_tf32": "0"}
INSTALL_HINT = "pip install onnxruntime-gpu"


def choose_providers(device: str | None, available: list[str] | None = None) -> list:
    """onnxruntime's ``providers`` list for ``device`` ("cuda", "cpu" or None: CUDA where
    ``available`` (default: this onnxruntime's providers) has it, else the CPU)."""
    if device is not None and device not in DEVICES:
        raise SegcompileError(f"device must be 'cuda', 'cpu' or None (CUDA where available), got {device!r}")
    available = list(ort.get_available_providers() if available is None else available)
    if device == "cuda" and CUDA not in available:
        raise SegcompileError(
            f"device 'cuda' needs onnxruntime's {CUDA}, which this onnxruntime {ort.__version__} lacks "
            f"(it has {', '.join(available)}): install the GPU build on a machine with an NVIDIA GPU "
            f"(`{INSTALL_HINT}`, first on sys.path if the CPU `onnxruntime` is installed too), or use device 'cpu'"
        )
    if device == "cpu" or (device is None and CUDA not in available):
        return [CPU]
    return [(CUDA, dict(CUDA_OPTIONS)), CPU]


class OnnxRuntimeBackend:
    """A step program loaded in an onnxruntime session; arrays are numpy, state buffers OrtValues."""

    noun = "file"
    error = SegcompileError
    max_batch = None  # the file's axes are dynamic: any batch, any history
    max_history = None

    def __init__(self, path, providers: list | None = None, device: str | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise SegcompileError(f"{path}: no such file")
        if providers is not None and device is not None:
            raise SegcompileError("give device= or providers=, not both (providers= is onnxruntime's own list)")
        if providers is None:
            providers = choose_providers(device)
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
        self.provider = self.providers[0]
        self.device = "cuda" if self.provider == CUDA else "cpu"
        if device == "cuda" and self.device != "cuda":  # onnxruntime falls back to the CPU when CUDA fails to start
            raise SegcompileError(
                f"onnxruntime could not start its {CUDA} for {path} (the session runs on {self.provider}): its CUDA "
                "libraries did not load; import torch (a CUDA build) before onnxruntime, or call "
                "onnxruntime.preload_dlls(), and check onnxruntime's message above"
            )

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
        copy = ort.OrtValue.ortvalue_from_shape_and_type(buffer.shape(), self.dtype, self.device, 0)
        copy.update_inplace(buffer)  # device to device
        return copy

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
    """Prefill and greedy decode of an exported ONNX step program with onnxruntime (module docstring).

    ``device``: "cuda", "cpu" or None (CUDA where onnxruntime has it); ``providers``: onnxruntime's
    own list instead."""

    def __init__(self, path, providers: list | None = None, *, device: str | None = None):
        backend = OnnxRuntimeBackend(path, providers, device)
        super().__init__(backend)
        self.session = backend.session
        self.providers = backend.providers
        self.provider = backend.provider
        self.device = backend.device
        self.dtype = backend.dtype

    def __repr__(self) -> str:
        return (f"OnnxSegmentedModel({self.path.name}, provider={self.provider}, device={self.device}, "
                f"dtype={self.dtype}, S={self.segment_len}, T={self.tail_len}, G={self.sink_tokens})")
