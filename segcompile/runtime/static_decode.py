"""Static decoding: one token at a time through a step of fixed shapes, replayed from CUDA graphs.

``seg.enable_cuda_graphs()`` routes ``seg.decode`` here (docs/design.md section 6). Prefill stays
the driver's; the first decode after it loads the ``SegmentState`` once into fixed buffers, and
every token then runs ``variants/static_step.py``'s program over them:

    per layer   local_k/v [Hkv, B, G + T + S, D]   sinks | tail | current segment, heads first
                hist_k/v  [n_lr, B, capacity, D]   slot j = position j (long-range KV heads),
                                                   a view of [B, n_lr, capacity, D]
    per batch   ids [B, 1], position [] (int64)    copied in before each token

The history is loaded without a copy where it can be: a prefill with this decoder enabled sizes
its history buffer for what the decoder holds (``history_slots``), and the first decode takes that
buffer over (``StaticBuffers._take_history``), so the history is held once however long the
caller keeps the prefill's state.

With ``SegmentConfig.history_dtype`` the history buffers hold its fp8 values, beside scale buffers
``[n_lr, B, blocks]`` in ``kernels/history_format.py``'s block layout; a segment end quantises
what it moves in as the eager decode does, and the step takes the scales as inputs of their own,
after the layer's history.

On CUDA each (history bucket, autocast state) of a batch size is captured once in a
``torch.cuda.CUDAGraph`` (after warm-up runs on a side stream; every graph of a decoder shares one
memory pool) and replayed for every token; elsewhere the same program runs eagerly, which is
what the CPU tests compare with the driver's eager decode. A step reads the first ``bucket``
history slots, the history rounded up to ``history_block`` (default S), so the program's shapes
change only when the history passes a block: one graph per block reached, not per token.

The segment end (docs/design.md section 6: current -> tail, sinks, history) is not in the
captured program. It happens once every S tokens, between two replays, as a few copies a layer
at offsets the host knows (``_end_segment``); the step itself then only appends its K/V, and no
token pays for moving state it does not change (the exported program's ``where`` rewrites every
buffer at every step). The history buffer grows (``HISTORY_GROWTH``, in whole blocks; or once, to
``max_context``) before a segment end that would overflow it; growing moves it, so the graphs
captured over the old one are dropped and captured again on use.

State semantics: the buffers of a batch size hold one sequence batch, updated in place. Each
decode returns a new ``StaticState`` (position, last logits) and makes the one it continued
stale; decoding from a stale state raises. ``state.to_segment_state()`` copies the live state
back to a ``SegmentState`` (to branch, to prefill more, to decode eagerly); decoding from a
``SegmentState`` loads it into the buffers again (its shapes checked first). A ``StaticState``
carries its decoder's ``program_id`` (the driver's), so the driver refuses one from another
program as it refuses such a ``SegmentState``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from torch import fx

from ..config import SegmentConfig, offset_in_segment, segment_start
from ..errors import SegcompileError, StateError
from .. import ir
from ..ir import AttentionSite
from ..kernels.dispatch import quantized_history_pair
from ..kernels.history_format import HistoryGeometry, QuantizedHistory
from .state import (HISTORY_GROWTH, LayerState, ProgramId, SegmentState, carried_dtype, check_state_layout,
                    history_buffer, written_past)
from .variants.fused_projections import refresh_fused_projections
from .variants.static_step import head_order, heads_first, model_order, static_step

log = logging.getLogger(__name__)

# Inductor rounds to the model's 16-bit dtype wherever the eager step does (by default a fused
# kernel keeps fp32 between ops): the compiled step's logits then stay within bf16 tolerance of
# the eager decode's instead of drifting layer by layer
COMPILE_OPTIONS = {"options": {"emulate_precision_casts": True}}
WARMUP_RUNS = 2  # eager runs on a side stream before a capture: cuBLAS picks and allocates its workspaces


def _same_memory(view: torch.Tensor | None, store: torch.Tensor | None) -> bool:
    """Whether ``view`` is ``store`` seen heads-first (the history buffer taken over)."""
    return view is not None and store is not None and view.data_ptr() == store.data_ptr() and view.shape[2] == store.shape[2]


@dataclass(frozen=True, eq=False)
class StaticState:
    """A decode state held in a ``StaticDecoder``'s buffers: live until the next decode from it.

    ``position``, ``logits`` (the last token's, ``[B, V]``) and ``batch_size`` read as a
    ``SegmentState``'s; ``to_segment_state()`` copies the carried K/V out."""

    position: int
    logits: torch.Tensor
    buffers: StaticBuffers

    @property
    def batch_size(self) -> int:
        return self.buffers.batch_size

    @property
    def program_id(self) -> ProgramId:
        """The program whose buffers hold this state (``SegmentState.program_id``)."""
        return self.buffers.decoder.program_id

    @property
    def live(self) -> bool:
        return self.buffers.live is self

    def to_segment_state(self, *, history_capacity: int = 0, token_major: bool = False) -> SegmentState:
        """The same state as a ``SegmentState`` (a copy: the driver's eager steps can continue it).
        ``history_capacity``, ``token_major``: the history's buffer, as ``reserve_history`` makes
        it (a prefill continuing this state asks for the room its prompt needs: one copy, not two)."""
        self.buffers.check_live(self)
        return self.buffers.to_segment_state(self.position, self.logits, history_capacity, token_major)


class StaticBuffers:
    """The fixed-shape state of one batch size and the CUDA graphs captured over it."""

    def __init__(self, decoder: StaticDecoder, batch_size: int, device: torch.device):
        cfg = decoder.cfg
        self.decoder = decoder
        self.batch_size = batch_size
        self.device = device
        slots = cfg.sink_tokens + cfg.tail_len + cfg.segment_len
        # normal tensors even when the first decode runs under torch.inference_mode: later
        # decodes outside it write them in place
        with torch.inference_mode(False):
            self.local = [
                {kv: torch.zeros(site.num_kv_heads, batch_size, slots, dim, dtype=site.dtype, device=device)
                 for kv, dim in (("k", site.head_dim), ("v", site.v_head_dim))}
                for site in decoder.sites
            ]
            self.ids = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
            self.position = torch.zeros((), dtype=torch.long, device=device)
        self.capacity: int | None = None  # history slots; None: no history buffer yet
        # per layer "k", "v": the history's values; quantised (SegmentConfig.history_dtype), also
        # "k_scales", "v_scales" [n_lr, B, blocks] fp32, in history_format's block layout
        self.history: list[dict[str, torch.Tensor]] = [{} for _ in decoder.sites]
        # True: the history buffers are a prefill's, taken over (``_take_history``), not allocated
        # here; loading another state must then not write into them (that state still views them)
        self.taken = False
        # True: what was taken are inference tensors (a prefill under torch.inference_mode), which
        # a decode outside inference mode must move first (``keep_writable``)
        self.taken_inference = False
        self.geometry = decoder.geometry
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.live: StaticState | None = None

    # ---- the history buffer ------------------------------------------------------------------
    def reserve(self, slots: int) -> None:
        """Make the history capacity at least ``slots`` in whole blocks (the old content kept).
        A new buffer has a new address: the graphs captured over the old one are dropped."""
        slots = self.decoder.whole_blocks(slots)
        if self.capacity is not None and slots <= self.capacity:
            return
        grown = max(slots, int((self.capacity or 0) * HISTORY_GROWTH), self.decoder.max_context or 0)
        self._allocate(self.decoder.whole_blocks(grown))

    def _allocate(self, capacity: int) -> None:
        """History buffers of ``capacity`` slots of this decoder's own, holding what the old held."""
        held = min(self.capacity or 0, capacity)
        dtype = self.decoder.cfg.history_dtype
        with torch.inference_mode(False):
            for site, old in zip(self.decoder.sites, self.history):
                if not site.long_range:
                    continue
                for kv, dim in (("k", site.head_dim), ("v", site.v_head_dim)):
                    # batch-first underneath, as a prefill's buffer (the one _take_history views):
                    # the compiled step then sees one layout whichever the decoder holds
                    fresh = torch.zeros(self.batch_size, len(site.long_range), capacity, dim, dtype=dtype or site.dtype,
                                        device=self.device).transpose(0, 1)
                    if kv in old:
                        fresh[:, :, :held] = old[kv][:, :, :held]
                    old[kv] = fresh
                    if self.geometry is not None:
                        scales = torch.ones(self.batch_size, len(site.long_range), self.geometry.num_blocks(capacity),
                                            device=self.device).transpose(0, 1)
                        if held:
                            blocks = self.geometry.num_blocks(held)
                            scales[:, :, :blocks] = old[f"{kv}_scales"][:, :, :blocks]
                        old[f"{kv}_scales"] = scales
        self.capacity = capacity
        self.taken = self.taken_inference = False
        self.graphs.clear()

    def _take_history(self, state: SegmentState, slots: int) -> bool:
        """Take ``state``'s history buffers over as this batch's instead of copying them, when every
        long-range layer's can be (``_can_take``); returns whether they were.

        Copied, the history would be held twice from the first decode on for as long as the caller
        keeps ``state`` (the argument of that decode, at least): 16 GiB more after a million tokens
        of the 8B shape's fp8 history. Taken, the buffer is viewed heads-first (the kernels read
        any strides) and the decoder writes only past ``state``'s history, so ``state`` stays
        valid; the buffer is then marked filled to its end, so a driver's decode from ``state``
        appends to a copy (``append_history``) and another load never writes into it."""
        taken = []
        for site, layer, history in zip(self.decoder.sites, state.layers, self.history):
            for kv in ("k", "v") if site.long_range else ():
                store, hist = getattr(layer, f"hist_store_{kv}"), getattr(layer, f"hist_{kv}")
                if not self._can_take(site, store, hist, slots, history.get(kv)):
                    return False
                taken.append((history, kv, store, hist.shape[2]))
        if not taken:
            return False
        if self.taken and all(_same_memory(history[kv], store) for history, kv, store, _ in taken):
            return True  # this state's history is in these buffers already (decoded from it before)
        for history, kv, store, kept in taken:
            # through .data, as append_history writes: past every view of the buffer, so no
            # autograd version bump (a graph of the prefill may have saved a view of it)
            values = store.data.transpose(0, 1)
            # slots past the history hold whatever the prefill's empty buffer did; the PyTorch
            # products read every slot through masks, so they must at least be finite
            values[:, :, kept:].zero_()
            history[kv] = values
            if self.geometry is not None:
                scales = store._segcompile_scales.data.transpose(0, 1)
                scales[:, :, self.geometry.num_blocks(kept):].fill_(1.0)
                history[f"{kv}_scales"] = scales
            store._segcompile_filled = store.shape[2]
        self.capacity = min(store.shape[2] for _, _, store, _ in taken)
        self.taken = True
        self.taken_inference = any(store.is_inference() for _, _, store, _ in taken)
        self.graphs.clear()
        return True

    def _can_take(self, site: AttentionSite, store: torch.Tensor | None, hist, slots: int,
                  held: torch.Tensor | None) -> bool:
        """Whether ``hist``'s buffer ``store`` can become this batch's history buffer for ``slots``:
        ``hist`` starts it, nothing was written past ``hist`` (by another state's append, or a
        decoder that took it: unless that decoder is this one), it is big enough, in the dtype
        and on the device the decoder writes, and writable wherever later decodes run."""
        values = hist.values() if isinstance(hist, QuantizedHistory) else hist
        if store is None or store.device != self.device or store.shape[2] < slots:
            return False
        if store.dtype != (self.decoder.cfg.history_dtype or site.dtype) or store.shape[0] != self.batch_size:
            return False
        if values.data_ptr() != store.data_ptr() or values.stride() != store.stride():
            return False
        if store.is_inference() and not torch.is_inference_mode_enabled():
            return False  # made under torch.inference_mode: only inference mode may write it
        return not written_past(store, values.shape[2]) or (self.taken and _same_memory(held, store))

    def _drop_history(self) -> None:
        self.history = [{} for _ in self.decoder.sites]
        self.capacity, self.taken, self.taken_inference = None, False, False
        self.graphs.clear()

    def keep_writable(self) -> None:
        """Move a history taken from a prefill under ``torch.inference_mode`` (inference tensors,
        which only inference mode may write) to buffers of this decoder's own when a decode runs
        outside it."""
        if self.taken_inference and not torch.is_inference_mode_enabled():
            self._allocate(self.capacity)

    def inputs(self, bucket: int) -> list[torch.Tensor]:
        """The program's buffer inputs for a step that reads ``bucket`` history slots."""
        out = []
        for site, local, history in zip(self.decoder.sites, self.local, self.history):
            out += [local["k"], local["v"]]
            if site.long_range:
                out += [history["k"][:, :, :bucket], history["v"][:, :, :bucket]]
                if self.geometry is not None:  # the program's scale inputs follow the layer's history
                    blocks = self.geometry.num_blocks(bucket)
                    out += [history["k_scales"][:, :, :blocks], history["v_scales"][:, :, :blocks]]
        return out

    def history_inputs(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """The history slices (and scale slices) among ``inputs`` (``self.inputs``' result): the
        inputs whose dim 2 changes with the bucket."""
        per_layer = 2 if self.geometry is None else 4
        out, i = [], 0
        for site in self.decoder.sites:
            i += 2
            if site.long_range:
                out += inputs[i : i + per_layer]
                i += per_layer
        return out

    # ---- moving state in and out -------------------------------------------------------------------
    def load(self, state: SegmentState) -> None:
        """Copy ``state`` into the buffers, its history taken over where it can be (``_take_history``;
        docs/design.md section 8 gives each slot's position)."""
        cfg = self.decoder.cfg
        T, G = cfg.tail_len, cfg.sink_tokens
        check_state_layout(state, self.decoder.sites, cfg)  # before anything is written
        slots = self.decoder.history_slots(state.position)
        if not self._take_history(state, slots):
            if self.taken:  # another state's buffers: this one's history goes into buffers of our own
                self._drop_history()
            self.reserve(slots)
        for site, layer, local, history in zip(self.decoder.sites, state.layers, self.local, self.history):
            order = head_order(site)
            for kv in ("k", "v"):
                buffer = local[kv]
                sinks, tail, current = (getattr(layer, f"{part}_{kv}") for part in ("sink", "tail", "current"))
                buffer[:, :, : sinks.shape[2]] = heads_first(sinks, order)
                buffer[:, :, G + T - tail.shape[2] : G + T] = heads_first(tail, order)
                buffer[:, :, G + T : G + T + current.shape[2]] = heads_first(current, order)
                if site.long_range:
                    hist = getattr(layer, f"hist_{kv}")
                    if _same_memory(history[kv], getattr(layer, f"hist_store_{kv}")):
                        continue  # taken over: already in place
                    if isinstance(hist, QuantizedHistory):
                        scales = hist.scales
                        history[f"{kv}_scales"][:, :, : scales.shape[2]] = scales.transpose(0, 1)
                        hist = hist.values()
                    history[kv][:, :, : hist.shape[2]] = hist.transpose(0, 1)

    def to_segment_state(self, position: int, logits: torch.Tensor, history_capacity: int = 0,
                         token_major: bool = False) -> SegmentState:
        """The state at ``position`` as the driver holds it: sinks, tail, current, history cut to
        their lengths, in the model's head order (copies; the history in a buffer of at least
        ``history_capacity`` positions, token-major if asked: ``state.history_buffer``)."""
        cfg = self.decoder.cfg
        S, T, G = cfg.segment_len, cfg.tail_len, cfg.sink_tokens
        a = segment_start(position, S)
        start = a - T
        kept = max(start, 0)  # positions before the tail: sinks and history hold them
        sinks, tail, current = min(G, kept), (T if a > 0 else 0), position - a
        layers = []
        for site, local, history in zip(self.decoder.sites, self.local, self.history):
            order = head_order(site)
            parts = {}
            for kv in ("k", "v"):
                buffer = local[kv]

                def cut(lo: int, hi: int) -> torch.Tensor:
                    return model_order(buffer[:, :, lo:hi], order).transpose(0, 1).contiguous()

                constant = carried_dtype(buffer.dtype, buffer.device.type)
                parts[f"sink_{kv}"] = cut(0, sinks).to(constant)
                parts[f"tail_{kv}"] = cut(G + T - tail, G + T)
                parts[f"current_{kv}"] = cut(G + T, G + T + current)
                if site.long_range:
                    hist = history[kv][:, :, :kept].transpose(0, 1)
                    if self.geometry is not None:
                        scales = history[f"{kv}_scales"][:, :, : self.geometry.num_blocks(kept)]
                        hist = QuantizedHistory.of(hist, scales.transpose(0, 1), self.geometry)
                    parts[f"hist_store_{kv}"], parts[f"hist_{kv}"] = history_buffer(
                        hist, max(kept, history_capacity), token_major)
                else:
                    parts[f"hist_{kv}"] = buffer.new_empty(self.batch_size, 0, 0, buffer.shape[3]).to(constant)
            layers.append(LayerState(**parts))
        return SegmentState(position, tuple(layers), logits, self.decoder.program_id)

    def end_segment(self, position: int) -> None:
        """Move the segment that ended at ``position`` into tail, sinks and history, in place
        (``SegmentedModel.end_segment``'s move over the slots)."""
        cfg = self.decoder.cfg
        S, T, G = cfg.segment_len, cfg.tail_len, cfg.sink_tokens
        start = position - S - T  # position of leaving[0]: the old tail, then the first S - T of the segment
        self.reserve(start + S)
        lo = max(start, 0)
        sink_hi = min(G, start + S)
        for site, local, history in zip(self.decoder.sites, self.local, self.history):
            n_local = site.num_kv_heads - len(site.long_range)
            leaving = {kv: local[kv][:, :, G : G + S] for kv in ("k", "v")}
            if lo < sink_hi:
                for kv, buffer in local.items():
                    buffer[:, :, lo:sink_hi] = leaving[kv][:, :, lo - start : sink_hi - start]
            if site.long_range:
                self._append_history(history, {kv: x[n_local:, :, lo - start :] for kv, x in leaving.items()}, lo)
            if T:  # after the reads above: the tail slots are part of what leaves
                for buffer in local.values():
                    buffer[:, :, G : G + T] = buffer[:, :, G + S : G + S + T]

    def _append_history(self, history: dict[str, torch.Tensor], new: dict[str, torch.Tensor], at: int) -> None:
        """Write ``new`` (K's and V's, ``[n_lr, B, n, D]`` each) into history slots ``[at, at + n)``;
        quantised as the eager decode's segment end quantises them (``at`` starts a piece of the
        block layout), K and V in one launch on a GPU."""
        end = at + new["k"].shape[2]
        if self.geometry is None:
            for kv, x in new.items():
                history[kv][:, :, at:end] = x
            return
        blocks = slice(self.geometry.num_blocks(at), self.geometry.num_blocks(end))
        outs = tuple((history[kv][:, :, at:end], history[f"{kv}_scales"][:, :, blocks]) for kv in ("k", "v"))
        quantized_history_pair((new["k"], new["v"]), at, self.geometry, self.decoder.cfg.history_dtype, outs)

    # ---- liveness ------------------------------------------------------------------------------------
    def check_live(self, state: StaticState) -> None:
        if self.live is not state:
            raise StateError(
                f"this decode state (position {state.position}) was continued already: with CUDA graphs "
                "(seg.enable_cuda_graphs) a batch's state lives in fixed buffers updated in place, and "
                "only the state the last decode returned is live. Continue from that one, or call "
                "state.to_segment_state() before decoding on, to keep a copy to branch from"
            )


class StaticDecoder:
    """Decodes through ``static_step``'s program: buffers per batch size, CUDA graphs per
    (batch size, history bucket) on CUDA, the same program eagerly elsewhere (module docstring)."""

    def __init__(self, step_graph: fx.GraphModule, cfg: SegmentConfig, device: torch.device, program_id: ProgramId, *,
                 history_block: int | None = None, max_context: int | None = None, capture: bool | None = None,
                 kernel: bool | None = None, compile: bool | dict = False):
        if history_block is not None and (not isinstance(history_block, int) or history_block < 1):
            raise SegcompileError(f"history_block must be a positive int, got {history_block!r}")
        if max_context is not None and (not isinstance(max_context, int) or max_context < 1):
            raise SegcompileError(f"max_context must be a positive int, got {max_context!r}")
        if not isinstance(compile, (bool, dict)):
            raise SegcompileError(f"compile must be True, False or a dict of torch.compile options, got {compile!r}")
        if capture and device.type != "cuda":
            raise SegcompileError(f"CUDA graphs need a model captured on CUDA; this one runs on {device}")
        self.cfg = cfg
        self.device = device
        self.program_id = program_id  # the driver's: states here belong to its program
        self.sites: list[AttentionSite] = step_graph.meta[ir.SITES]
        # how a quantised history's scales are laid out (None: the history is stored unquantised)
        self.geometry = None if cfg.history_dtype is None else HistoryGeometry(cfg.segment_len, cfg.tail_len)
        # the Triton kernel reads the lengths from the device and only the keys a token sees; the
        # PyTorch products read every slot of the buffers through masks (the CPU's path)
        self.kernel = device.type == "cuda" if kernel is None else kernel
        # the q/k/v products stacked as the eager decode's (one copy of the stacked weights for both)
        self.program = static_step(step_graph, cfg, kernel=self.kernel)
        # compiled, the elementwise work between the layers' matrix products fuses into a few kernels
        # (about 1,500 launches a token on the 8B shape, eager); the attention stays one custom op
        options = dict(COMPILE_OPTIONS) if compile is True else compile
        self.runner = torch.compile(self.program, **options) if options is not False else self.program
        self.compiled = options is not False
        self.logits_leaf = self.program.meta[ir.EXPORT]["logits_leaf"]
        self.history_block = history_block or cfg.segment_len
        self.max_context = max_context
        self.cuda_graphs = device.type == "cuda" if capture is None else capture
        self.buffers: dict[int, StaticBuffers] = {}
        self.pool = None  # the memory pool every graph of this decoder shares (they never run at once)
        self.captures: list[dict] = []  # batch, bucket, seconds of each capture

    @property
    def path(self) -> str:
        """``"cuda-graph"`` (replayed) or ``"static"`` (the same fixed-shape program, run eagerly)."""
        return "cuda-graph" if self.cuda_graphs else "static"

    def history_slots(self, position: int) -> int:
        """History slots a batch's buffers hold to decode from ``position`` through the end of its
        segment (what that end moves in), in whole blocks. A prefill to ``position`` with this
        decoder enabled sizes its history buffer for this many (and ``max_context``), so that the
        first decode takes the buffer over instead of copying it (``StaticBuffers._take_history``)."""
        cfg = self.cfg
        return self.whole_blocks(segment_start(position, cfg.segment_len) - cfg.tail_len + cfg.segment_len)

    def bucket(self, position: int) -> int:
        """History slots a step at ``position`` reads: its valid history, rounded up to a block."""
        cfg = self.cfg
        return self.whole_blocks(max(segment_start(position, cfg.segment_len) - cfg.tail_len, 0))

    def whole_blocks(self, slots: int) -> int:
        """``slots`` rounded up to whole history blocks: a step reads, and a buffer holds, whole blocks."""
        return -(-slots // self.history_block) * self.history_block

    def decode(self, state: SegmentState | StaticState, next_ids: torch.Tensor) -> tuple[torch.Tensor, StaticState]:
        """Feed ``next_ids [B, n]`` one token a step; returns their logits ``[B, n, V]`` and the new live state."""
        with torch.no_grad():
            refresh_fused_projections(self.program)  # weights changed in place since (a training step)
            buffers = self._buffers_for(state)
            position, pieces = state.position, []
            for i in range(next_ids.shape[1]):
                pieces.append(self._token(buffers, position, next_ids[:, i : i + 1]))
                position += 1
                if offset_in_segment(position, self.cfg.segment_len) == 0:
                    buffers.end_segment(position)
        logits = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)
        buffers.live = StaticState(position, logits[:, -1], buffers)
        return logits, buffers.live

    def describe(self) -> str:
        """One line for ``print(seg)``: the path and what was captured."""
        block = (f"history in blocks of {self.history_block} positions, "
                 f"attention by {'the Triton kernel' if self.kernel else 'PyTorch products'}")
        if self.geometry is not None:
            block += f", the history in {str(self.cfg.history_dtype).removeprefix('torch.')} with per-block scales"
        if self.compiled:
            block += ", the step under torch.compile"
        taken = sorted(batch for batch, buffers in self.buffers.items() if buffers.taken)
        if taken:  # where the memory went: the history is held once, not copied
            block += f", the prefill's history buffer taken over (batch {', '.join(map(str, taken))})"
        if not self.cuda_graphs:
            why = "not on CUDA" if self.device.type != "cuda" else "capture=False"
            return f"decode: fixed-shape step run eagerly (seg.enable_cuda_graphs, {why}), {block}"
        graphs = sum(len(b.graphs) for b in self.buffers.values())
        return (f"decode: CUDA graphs, one per batch size and history bucket (seg.enable_cuda_graphs), {block}; "
                f"{graphs} held, {len(self.captures)} captured")

    # ---- one token -------------------------------------------------------------------------------
    def _buffers_for(self, state: SegmentState | StaticState) -> StaticBuffers:
        """The buffers ``state`` is in, loaded if it is a ``SegmentState``; none of their states
        is live while a decode runs (one that fails midway leaves no state to continue)."""
        if isinstance(state, StaticState):
            state.buffers.check_live(state)
            if state.buffers.decoder is self:
                state.buffers.live = None
                state.buffers.keep_writable()
                return state.buffers
            state = state.to_segment_state()  # made before enable_cuda_graphs was called again
        buffers = self.buffers.get(state.batch_size)
        if buffers is None:
            buffers = self.buffers[state.batch_size] = StaticBuffers(self, state.batch_size, self.device)
        buffers.live = None  # the state these buffers held is stale from here on
        buffers.load(state)
        return buffers

    def _token(self, buffers: StaticBuffers, position: int, ids: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, 1, V]`` of one token at ``position`` (a copy: the graph's output is reused)."""
        bucket = self.bucket(position)
        buffers.reserve(bucket)
        buffers.ids.copy_(ids)
        buffers.position.fill_(position)
        if not self.cuda_graphs:
            return self._run(buffers, bucket).clone()
        key = (bucket, torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
        if key not in buffers.graphs:
            buffers.graphs[key] = self._capture(buffers, bucket)
        graph, logits = buffers.graphs[key]
        graph.replay()
        return logits.clone()

    def _run(self, buffers: StaticBuffers, bucket: int) -> torch.Tensor:
        inputs = buffers.inputs(bucket)
        if self.compiled:  # one compiled graph for every history bucket: its length is not specialised
            for t in buffers.history_inputs(inputs):
                torch._dynamo.maybe_mark_dynamic(t, 2)
        outputs = self.runner(buffers.ids, buffers.position, *inputs)
        return outputs[self.logits_leaf]

    def _capture(self, buffers: StaticBuffers, bucket: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Capture the step over ``buffers`` reading ``bucket`` history slots. The warm-up runs and
        the capture write this token's K/V into its slot, as the replay that follows will."""
        begin = time.perf_counter()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_RUNS):
                self._run(buffers, bucket)
        torch.cuda.current_stream(self.device).wait_stream(side)
        if not any(b.graphs for b in self.buffers.values()):
            # every graph of the pool was dropped (the history moved): a pool that no graph holds
            # cannot be captured into again, so start a new one
            self.pool = None
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self._run(buffers, bucket)
        self.pool = graph.pool()
        seconds = time.perf_counter() - begin
        self.captures.append({"batch": buffers.batch_size, "bucket": bucket, "seconds": seconds})
        log.info("decode: captured a CUDA graph for batch %d, history bucket %d in %.2f s",
                 buffers.batch_size, bucket, seconds)
        return graph, logits
