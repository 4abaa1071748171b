"""Run an exported segment-step program (``segcompile.deploy.onnx_export``) with onnxruntime.

``OnnxSegmentedModel(path)`` opens the file with the CUDA execution provider when onnxruntime has
it, the CPU provider otherwise, and offers the driver's API on numpy arrays:

    state = model.prefill(prompt_ids)              # any length: cut at segment boundaries
    logits, state = model.decode(state, next_ids)  # [B, n, V]
    new_ids = model.generate(prompt_ids, max_new_tokens=64)   # greedy

State lives in preallocated buffers bound with IO binding (on the GPU under CUDA): two sets of the
per-layer buffers, the step reads one set and writes the other, then they swap. A state is
therefore updated in place and belongs to one model: ``decode`` returns the same object. The
long-range history is a capacity that grows (doubling, in whole segments) before a step that
would need more; the local buffers never change size.

Checked before anything runs, each with a ``SegcompileError`` saying what to do: ids that are not
an integer array ``[batch, tokens]`` or are outside the vocabulary, a step longer than S or
crossing a segment boundary, a batch other than the state's, a state made by another exported
file, and a file that is not a segcompile step program.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import segment_pieces
from ..errors import SegcompileError

FORMAT = "segcompile.onnx-step"
FORMAT_VERSION = "1"


@dataclass
class OnnxState:
    """Carried state of one sequence batch: position, the two buffer sets, last logits."""

    export_id: str
    batch_size: int
    position: int = 0
    buffers: dict = field(default_factory=dict)  # name -> OrtValue (the set the next step reads)
    spare: dict = field(default_factory=dict)  # name -> OrtValue (the set the next step writes)
    history: int = 0  # capacity of the history buffers
    logits: np.ndarray | None = None  # last token's logits [B, V]


class OnnxSegmentedModel:
    def __init__(self, path, providers: list[str] | None = None):
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise SegcompileError(f"{path}: no such file")
        available = ort.get_available_providers()
        if providers is None:
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        options = ort.SessionOptions()
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=providers)
        except Exception as e:  # onnxruntime's errors are its own types
            raise SegcompileError(f"onnxruntime cannot load {path}: {' '.join(str(e).split())[:300]}") from e
        meta = self.session.get_modelmeta().custom_metadata_map
        if meta.get("segcompile.format") != FORMAT:
            raise SegcompileError(f"{path} is not a segcompile segment-step ONNX file (run `segcompile export`)")
        if meta.get("segcompile.format_version") != FORMAT_VERSION:
            raise SegcompileError(
                f"{path} has format version {meta.get('segcompile.format_version')}; this segcompile reads {FORMAT_VERSION}"
            )
        self.metadata = dict(meta)
        self.export_id = meta["segcompile.export_id"]
        self.segment_len = int(meta["segcompile.segment_len"])
        self.tail_len = int(meta["segcompile.tail_len"])
        self.sink_tokens = int(meta["segcompile.sink_tokens"])
        self.plan = {int(k): v for k, v in json.loads(meta["segcompile.plan"]).items()}
        self.model = json.loads(meta["segcompile.model"])
        self.logits_mode = meta["segcompile.logits"]
        self.state_specs = [tuple(s) for s in json.loads(meta["segcompile.state"])]
        self.vocab_size = self.model.get("vocab_size")
        try:
            self.dtype = np.dtype(self.model["dtype"])
        except TypeError:
            raise SegcompileError(
                f"{path} keeps its state in {self.model['dtype']}, which numpy (and so this runner) has no type "
                "for; export the model in float32 or float16"
            ) from None
        self.providers = self.session.get_providers()
        self.device = "cuda" if self.providers[0] == "CUDAExecutionProvider" else "cpu"
        self.timings = {"prefill_s": 0.0, "prefill_tokens": 0, "decode_s": 0.0, "decode_tokens": 0}

    # ---- state ---------------------------------------------------------------------------------
    def initial_state(self, batch_size: int) -> OnnxState:
        if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise SegcompileError(f"batch_size must be an int >= 1, got {batch_size!r}")
        state = OnnxState(self.export_id, int(batch_size))
        for name, heads, dim, entries in self.state_specs:
            shape = (batch_size, heads, entries if entries is not None else self.segment_len, dim)
            state.buffers[name] = self._zeros(shape)
            state.spare[name] = self._zeros(shape)
        state.history = self.segment_len
        return state

    def _zeros(self, shape):
        import onnxruntime as ort

        return ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, self.dtype), self.device, 0)

    def _grow_history(self, state: OnnxState, needed: int) -> None:
        import onnxruntime as ort

        S = self.segment_len
        capacity = max(needed, 2 * state.history)
        capacity = -(-capacity // S) * S
        for name, heads, dim, entries in self.state_specs:
            if entries is not None:
                continue
            old = state.buffers[name].numpy()  # a copy to the host: growth is rare (doubling)
            new = np.zeros((state.batch_size, heads, capacity, dim), self.dtype)
            new[:, :, : old.shape[2]] = old
            state.buffers[name] = ort.OrtValue.ortvalue_from_numpy(new, self.device, 0)
            state.spare[name] = self._zeros(new.shape)
        state.history = capacity

    # ---- running ------------------------------------------------------------------------------
    def step(self, state: OnnxState, chunk) -> np.ndarray:
        """Run one step on ``chunk [B, L]`` (L <= S tokens inside one segment); returns its logits."""
        self._check_state(state)
        chunk = self._check_ids(chunk, "chunk")
        S, T = self.segment_len, self.tail_len
        n = chunk.shape[1]
        if chunk.shape[0] != state.batch_size:
            raise SegcompileError(
                f"batch size {chunk.shape[0]} does not match the state's {state.batch_size}; "
                "decode with the batch the state was prefilled with"
            )
        room = S - state.position % S
        if n > room:
            raise SegcompileError(
                f"a step of {n} tokens at position {state.position} crosses a segment boundary (S={S}; "
                f"{room} tokens left in this segment): feed at most S tokens per step, or use prefill/decode, "
                "which cut the input at segment boundaries"
            )
        start = state.position - state.position % S
        if n == room and start + S - T > state.history:
            self._grow_history(state, start + S - T)

        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", chunk)
        binding.bind_cpu_input("position_offset", np.array(state.position, dtype=np.int64))
        for name, value in state.buffers.items():
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", self.device)
        for name, value in state.spare.items():
            binding.bind_ortvalue_output(f"{name}_out", value)
        self.session.run_with_iobinding(binding)
        logits = binding.get_outputs()[0].numpy()
        state.buffers, state.spare = state.spare, state.buffers
        state.position += n
        state.logits = logits[:, -1]
        return logits

    def prefill(self, input_ids, state: OnnxState | None = None) -> OnnxState:
        """Feed ``input_ids [B, N]`` (any N), a segment at a time; ``state.logits`` = last token's."""
        ids = self._check_ids(input_ids, "input_ids")
        state = state if state is not None else self.initial_state(ids.shape[0])
        start = time.perf_counter()
        self._feed(state, ids, collect=False)
        self.timings["prefill_s"] += time.perf_counter() - start
        self.timings["prefill_tokens"] += ids.shape[0] * ids.shape[1]
        return state

    def decode(self, state: OnnxState, next_ids) -> tuple[np.ndarray, OnnxState]:
        """Feed ``next_ids [B, n]`` after ``state``; returns their logits and the (same, updated) state."""
        if self.logits_mode != "all" and np.asarray(next_ids).ndim == 2 and np.asarray(next_ids).shape[1] > 1:
            # a "last" file gives one position per step: feed one token at a time
            pieces = [self.decode(state, np.asarray(next_ids)[:, i : i + 1])[0] for i in range(np.asarray(next_ids).shape[1])]
            return np.concatenate(pieces, axis=1), state
        ids = self._check_ids(next_ids, "next_ids")
        start = time.perf_counter()
        logits = self._feed(state, ids, collect=True)
        self.timings["decode_s"] += time.perf_counter() - start
        self.timings["decode_tokens"] += ids.shape[0] * ids.shape[1]
        return logits, state

    def generate(self, prompt_ids, max_new_tokens: int) -> np.ndarray:
        """Greedy decoding: the ``max_new_tokens`` tokens after ``prompt_ids [B, N]``, as ``[B, max_new_tokens]``."""
        state = self.prefill(prompt_ids)
        out = []
        for i in range(max_new_tokens):
            token = state.logits.argmax(-1).astype(np.int64)[:, None]
            out.append(token)
            if i + 1 < max_new_tokens:
                self.decode(state, token)
        return np.concatenate(out, axis=1) if out else np.zeros((state.batch_size, 0), np.int64)

    def _feed(self, state: OnnxState, ids: np.ndarray, collect: bool):
        pieces = [self.step(state, ids[:, piece]) for piece in segment_pieces(state.position, ids.shape[1], self.segment_len)]
        return np.concatenate(pieces, axis=1) if collect else None

    # ---- checks -------------------------------------------------------------------------------
    def _check_state(self, state) -> None:
        if not isinstance(state, OnnxState):
            raise SegcompileError(f"state must be an OnnxState from this model's prefill, got {type(state).__name__}")
        if state.export_id != self.export_id:
            raise SegcompileError(
                f"this state was made by another exported model (export id {state.export_id[:12]}, this file "
                f"{self.export_id[:12]} = {self.path.name}); prefill with this model to get its state"
            )

    def _check_ids(self, ids, what: str) -> np.ndarray:
        try:
            import torch

            if isinstance(ids, torch.Tensor):
                ids = ids.detach().cpu().numpy()
        except ImportError:
            pass
        if not isinstance(ids, np.ndarray):
            raise SegcompileError(f"{what} must be an integer numpy array [batch, tokens], got a {type(ids).__name__}")
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
            raise SegcompileError(f"{what} must be an integer array [batch, tokens], got {ids.dtype} of shape {ids.shape}")
        if ids.shape[0] == 0 or ids.shape[1] == 0:
            raise SegcompileError(f"{what} is empty (shape {ids.shape})")
        if self.vocab_size is not None and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise SegcompileError(
                f"{what} holds ids outside the vocabulary [0, {self.vocab_size}): min {ids.min()}, max {ids.max()}"
            )
        return np.ascontiguousarray(ids, dtype=np.int64)
