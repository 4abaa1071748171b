"""The runner of an exported segment-step program, over a backend that runs one step (docs/design.md section 8).

``SegmentRunner(backend)`` offers the driver's API on the backend's arrays:

    state = model.prefill(prompt_ids)              # any length: cut at segment boundaries
    logits, state = model.decode(state, next_ids)  # [B, n, V]
    new_ids = model.generate(prompt_ids, max_new_tokens=64)   # greedy

The runner owns all that does not depend on the inference library: the state, the checks,
cutting the input at segment boundaries, the growth of the history capacity, greedy decoding
and the timings. A backend (``StepBackend``) loads the file and runs one step on its own arrays:
``OnnxSegmentedModel`` (``deploy.onnxruntime_backend``: numpy, onnxruntime) and
``TensorRTSegmentedModel`` (``deploy.tensorrt_backend``: torch CUDA tensors, a TensorRT engine)
are this runner over one backend each.

State lives in preallocated buffers: two sets of the per-layer buffers, the step reads one set
and writes the other, then they swap. The long-range history is a capacity that grows
(doubling, in whole segments, up to the backend's limit) before a step that would need more; the
local buffers never change size.

State semantics (those of the PyTorch static decode, ``runtime.static_decode``): the buffers are
updated in place, so a state can be continued once. ``decode(state, ids)`` and
``prefill(ids, state)`` return a new ``StepState`` that takes the buffers over and make the one
they continued stale; continuing a stale state raises the backend's ``SegcompileError`` (it
would read buffers a later step has overwritten: a silently different answer).
``copy_state(state)`` makes an independent copy, to branch from or to decode the same state
twice. ``step(state, chunk)``, the low-level single step, advances the state it is given in
place. A decode that fails before its first step leaves its state live; one that fails later
leaves none (the buffers hold a part of it).

Checked before anything runs, each with the backend's ``SegcompileError`` saying what to do: ids
that are not an integer array ``[batch, tokens]`` or are outside the vocabulary, a step longer
than S or crossing a segment boundary, a batch other than the state's or larger than the file
was built for, a state made by another exported file or already continued, and (by the backend,
when it loads) a file that is not a segcompile step program.
"""

from __future__ import annotations

import numbers
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from ..config import offset_in_segment, segment_pieces, segment_start
from ..errors import SegcompileError
from .format import StepProgram


class StepBackend(Protocol):
    """An inference library running one exported step program; arrays are its own (numpy, torch)."""

    path: Path  # the file loaded
    noun: str  # what messages call that file: "file", "engine"
    error: type[SegcompileError]  # what the runner raises for this backend's model
    program: StepProgram  # read from the file's metadata, its format checked
    metadata: dict[str, str]  # the file's metadata, as stored
    max_batch: int | None  # the largest batch the file runs (None: any)
    max_history: int | None  # the largest history capacity it runs (None: any)

    def ids(self, ids: Any, what: str) -> Any:
        """``ids`` as an int64 ``[batch, tokens]`` array of the backend's kind; ``error`` for anything
        that is not an integer array (or tensor) of two dimensions."""

    def zeros(self, name: str, shape: tuple[int, ...]) -> Any:
        """A zero state buffer for input ``name``."""

    def grown(self, name: str, buffer: Any, capacity: int) -> Any:
        """A history buffer of ``capacity`` slots (axis 2) holding ``buffer`` in front, zeros after."""

    def run(self, ids: Any, position: int, inputs: dict[str, Any], outputs: dict[str, Any]) -> Any:
        """One step on ``ids [B, L]`` at absolute ``position``: reads the buffers ``inputs``, writes
        the buffers ``outputs`` (same names); returns the logits ``[B, L or 1, V]``."""

    def concat(self, pieces: list) -> Any:
        """``pieces`` joined along axis 1."""

    def next_token(self, logits: Any) -> Any:
        """The argmax tokens of last-position ``logits [B, V]``, as int64 ``[B, 1]``."""

    def no_tokens(self, batch: int) -> Any:
        """An int64 ``[batch, 0]`` array."""

    def copy(self, buffer: Any) -> Any:
        """A new state buffer holding what ``buffer`` holds."""

    def synchronize(self) -> None:
        """Return when the work queued so far is done (for the timings)."""


@dataclass(eq=False)
class StepState:
    """Carried state of one sequence batch: position, the two buffer sets, last logits.

    Live until a ``decode`` or ``prefill`` continues it (module docstring): ``stale`` then."""

    export_id: str
    batch_size: int
    position: int = 0
    buffers: dict = field(default_factory=dict)  # name -> buffer (the set the next step reads)
    spare: dict = field(default_factory=dict)  # name -> buffer (the set the next step writes)
    history: int = 0  # capacity of the history buffers
    logits: Any = None  # last token's logits [B, V]
    stale: bool = False  # continued by a decode or prefill: its buffers now hold a later state


class SegmentRunner:
    """Prefill, decode and greedy generation of an exported step program with one backend (module docstring)."""

    def __init__(self, backend: StepBackend):
        self.backend = backend
        self.path = backend.path
        self.metadata = backend.metadata
        program = backend.program
        self.export_id = program.export_id
        self.segment_len = program.segment_len
        self.tail_len = program.tail_len
        self.sink_tokens = program.sink_tokens
        self.plan = program.plan
        self.model = program.model
        self.logits_mode = program.logits
        self.state_specs = program.state_specs
        self.vocab_size = program.vocab_size
        self.max_batch = backend.max_batch
        self.max_history = backend.max_history
        self.timings = {"prefill_s": 0.0, "prefill_tokens": 0, "decode_s": 0.0, "decode_tokens": 0}

    # ---- state ---------------------------------------------------------------------------------
    def initial_state(self, batch_size: int) -> StepState:
        if not isinstance(batch_size, numbers.Integral) or batch_size < 1:
            raise self.backend.error(f"batch_size must be an int >= 1, got {batch_size!r}")
        if self.max_batch is not None and batch_size > self.max_batch:
            raise self.backend.error(
                f"{self.path.name} was built for batches of at most {self.max_batch}; build it again with a "
                f"larger max_batch (`--max-batch {batch_size}`)"
            )
        state = StepState(self.export_id, int(batch_size), history=self.segment_len)
        for name, *spec in self.state_specs:
            state.buffers[name] = self.backend.zeros(name, _buffer_shape(state, *spec))
            state.spare[name] = self.backend.zeros(name, _buffer_shape(state, *spec))
        return state

    def copy_state(self, state: StepState) -> StepState:
        """An independent copy of the live ``state``: continuing one leaves the other as it was
        (to branch, or to decode the same state twice)."""
        self._check_state(state)
        copy = replace(state, buffers={}, spare={})
        for name, *spec in self.state_specs:
            copy.buffers[name] = self.backend.copy(state.buffers[name])
            copy.spare[name] = self.backend.zeros(name, _buffer_shape(state, *spec))
        return copy

    def _grow_history(self, state: StepState, needed: int) -> None:
        """Make the history capacity at least ``needed`` slots: double it, in whole segments."""
        S = self.segment_len
        if self.max_history is not None and needed > self.max_history:
            raise self.backend.error(
                f"the context has reached {needed} history positions; {self.path.name} holds at most "
                f"{self.max_history}: build it again with a larger max_context (`--max-context`)"
            )
        capacity = -(-max(needed, 2 * state.history) // S) * S
        if self.max_history is not None:
            capacity = min(capacity, self.max_history)
        for name, heads, dim, entries in self.state_specs:
            if entries is None:
                state.buffers[name] = self.backend.grown(name, state.buffers[name], capacity)
                state.spare[name] = self.backend.zeros(name, (state.batch_size, heads, capacity, dim))
        state.history = capacity

    # ---- running ------------------------------------------------------------------------------
    def step(self, state: StepState, chunk) -> Any:
        """Run one step on ``chunk [B, L]`` (L <= S tokens inside one segment); returns its logits."""
        self._check_state(state)
        return self._step(state, self._ids(chunk, "chunk"))

    def prefill(self, input_ids, state: StepState | None = None) -> StepState:
        """Feed ``input_ids [B, N]`` (any N), a segment at a time, after ``state`` (default: a new
        one); returns the state after them (``.logits`` = the last token's). A ``state`` given is
        stale from here on: continue from the one returned."""
        ids = self._ids(input_ids, "input_ids")
        if state is None:
            state = self.initial_state(ids.shape[0])
        start = time.perf_counter()
        with self._continuing(state) as new:
            self._feed(new, ids)
        self.backend.synchronize()
        self.timings["prefill_s"] += time.perf_counter() - start
        self.timings["prefill_tokens"] += ids.shape[0] * ids.shape[1]
        return new

    def decode(self, state: StepState, next_ids) -> tuple[Any, StepState]:
        """Feed ``next_ids [B, n]`` after ``state``; returns their logits ``[B, n, V]`` and the new
        state. ``state`` is stale from here on: continue from the one returned (or decode from a
        ``copy_state`` of it)."""
        ids = self._ids(next_ids, "next_ids")
        start = time.perf_counter()
        with self._continuing(state) as new:
            if self.logits_mode == "all":
                pieces = self._feed(new, ids)
            else:  # a "last" file gives one position per step: feed one token at a time
                pieces = [self._step(new, ids[:, i : i + 1]) for i in range(ids.shape[1])]
        logits = self.backend.concat(pieces)
        self.backend.synchronize()
        self.timings["decode_s"] += time.perf_counter() - start
        self.timings["decode_tokens"] += ids.shape[0] * ids.shape[1]
        return logits, new

    def greedy_tokens(self, prompt_ids, max_new_tokens: int) -> Iterator[Any]:
        """Greedy decoding a token at a time, for callers that show progress: prefills
        ``prompt_ids [B, N]``, then yields each of the ``max_new_tokens`` new tokens as ``[B, 1]``."""
        yield from self._continue_greedily(self.prefill(prompt_ids), max_new_tokens)

    def generate(self, prompt_ids, max_new_tokens: int) -> Any:
        """Greedy decoding: the ``max_new_tokens`` tokens after ``prompt_ids [B, N]``, as ``[B, max_new_tokens]``
        int64 (on the backend's device)."""
        state = self.prefill(prompt_ids)
        tokens = list(self._continue_greedily(state, max_new_tokens))
        return self.backend.concat(tokens) if tokens else self.backend.no_tokens(state.batch_size)

    def _continue_greedily(self, state: StepState, max_new_tokens: int) -> Iterator[Any]:
        for i in range(max_new_tokens):
            token = self.backend.next_token(state.logits)
            yield token
            if i + 1 < max_new_tokens:  # the last token's logits are not needed
                _, state = self.decode(state, token)

    @contextmanager
    def _continuing(self, state: StepState) -> Iterator[StepState]:
        """The state that continues ``state`` (checked), taking its buffers over for the block to
        feed; ``state`` is stale from here on. If the block raises before its first step, ``state``
        stays live: its buffers are as they were (a history growth makes new ones)."""
        self._check_state(state)
        new = replace(state, buffers=dict(state.buffers), spare=dict(state.spare))
        state.stale = True
        try:
            yield new
        except BaseException:
            state.stale = new.position != state.position
            raise

    def _feed(self, state: StepState, ids) -> list:
        """Run ``ids`` (checked) a step per segment piece; the logits of each step."""
        pieces = segment_pieces(state.position, ids.shape[1], self.segment_len)
        return [self._step(state, ids[:, piece]) for piece in pieces]

    def _step(self, state: StepState, ids) -> Any:
        S, T = self.segment_len, self.tail_len
        n = ids.shape[1]
        if ids.shape[0] != state.batch_size:
            raise self.backend.error(
                f"batch size {ids.shape[0]} does not match the state's {state.batch_size}; "
                "decode with the batch the state was prefilled with"
            )
        room = S - offset_in_segment(state.position, S)
        if n > room:
            raise self.backend.error(
                f"a step of {n} tokens at position {state.position} crosses a segment boundary (S={S}; "
                f"{room} tokens left in this segment): feed at most S tokens per step, or use prefill/decode, "
                "which cut the input at segment boundaries"
            )
        # a step that ends its segment moves the segment's first S - T positions into the history
        needed = segment_start(state.position, S) + S - T
        if n == room and needed > state.history:
            self._grow_history(state, needed)
        logits = self.backend.run(ids, state.position, state.buffers, state.spare)
        state.buffers, state.spare = state.spare, state.buffers
        state.position += n
        state.logits = logits[:, -1]
        return logits

    # ---- checks -------------------------------------------------------------------------------
    def _check_state(self, state) -> None:
        if not isinstance(state, StepState):
            raise self.backend.error(
                f"state must be a StepState from this model's prefill, got {type(state).__name__}"
            )
        if state.export_id != self.export_id:
            raise self.backend.error(
                f"this state was made by another exported model (export id {state.export_id[:12]}, this "
                f"{self.backend.noun} {self.export_id[:12]} = {self.path.name}); prefill with this model to get "
                "its state"
            )
        if state.stale:
            raise self.backend.error(
                f"this state (position {state.position}) was continued already: a decode or prefill updates "
                "the state's buffers in place and returns the state that continues it. Continue from the state "
                "the last decode returned, or call copy_state(state) before decoding, to keep a copy to branch from"
            )

    def _ids(self, ids, what: str):
        """``ids`` checked (integer ``[batch, tokens]``, not empty, inside the vocabulary) as the backend's
        int64 array."""
        ids = self.backend.ids(ids, what)
        if ids.shape[0] == 0 or ids.shape[1] == 0:
            raise self.backend.error(f"{what} is empty (shape {tuple(ids.shape)})")
        if self.vocab_size is not None:
            low, high = int(ids.min()), int(ids.max())
            if low < 0 or high >= self.vocab_size:
                raise self.backend.error(
                    f"{what} holds ids outside the vocabulary [0, {self.vocab_size}): min {low}, max {high}"
                )
        return ids


def _buffer_shape(state: StepState, heads: int, dim: int, entries: int | None) -> tuple[int, ...]:
    """``[B, heads, slots, dim]`` of one state buffer: ``entries`` slots (local), or the history capacity."""
    return (state.batch_size, heads, entries if entries is not None else state.history, dim)
