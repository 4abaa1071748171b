"""``SegmentedModel``: the driver that runs the segment-step graph over a sequence.

The step graph (built by the passes) processes up to one segment's worth of tokens given the
carried state; the driver cuts the input at segment boundaries, feeds the state in, and at the
end of every segment moves keys between the state's parts (docs/design.md section 1):

    current (<= S) --> tail (last T of the segment) --> history (long-range KV heads only)
                                                    \\-> sinks (first G positions, all KV heads)

A local KV head therefore holds at most G + T + S entries whatever the length; a long-range KV
head keeps everything. The same loop serves ``forward`` (whole sequence), ``prefill`` and
``decode`` (any number of tokens, usually one).
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.fx as fx
import torch.utils.checkpoint
import torch.utils._pytree as pytree

from ..config import SegmentConfig, segment_pieces
from ..errors import SegcompileError
from ..ir import STATE_NAMES, AttentionSite
from .. import ir


@dataclass(frozen=True)
class LayerState:
    """Carried K/V of one layer, each ``[B, heads, entries, head_dim]``."""

    sink_k: torch.Tensor
    sink_v: torch.Tensor
    hist_k: torch.Tensor  # long-range KV heads only
    hist_v: torch.Tensor
    tail_k: torch.Tensor
    tail_v: torch.Tensor
    current_k: torch.Tensor
    current_v: torch.Tensor
    # The buffers hist_k/v are views of (append-only, shared by every live segment graph)
    hist_store_k: torch.Tensor | None = None
    hist_store_v: torch.Tensor | None = None

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, name) for name in STATE_NAMES)

    def local_entries(self) -> dict[str, int]:
        return {"sink": self.sink_k.shape[2], "tail": self.tail_k.shape[2], "current": self.current_k.shape[2]}


@dataclass(frozen=True)
class SegmentState:
    """Everything a segmented model carries between calls: position, per-layer K/V, last logits."""

    position: int
    layers: tuple[LayerState, ...]
    logits: torch.Tensor | None = None  # logits of the last token fed, [B, V]

    @property
    def batch_size(self) -> int:
        return self.layers[0].tail_k.shape[0]


class SegmentedModel(torch.nn.Module):
    """A model rewritten into a segment loop. Build it with ``segcompile.transform``."""

    def __init__(self, step_graph: fx.GraphModule, cfg: SegmentConfig):
        super().__init__()
        self.step_graph = step_graph
        self.cfg = cfg
        self.sites: list[AttentionSite] = step_graph.meta[ir.SITES]
        self.capture_info = step_graph.meta[ir.CAPTURE]
        self.implementations: dict[int, str] = step_graph.meta[ir.IMPL]
        self._num_outputs = step_graph.meta[ir.NUM_MODEL_OUTPUTS]
        self.pass_timings: dict[str, float] = dict(step_graph.meta.get(ir.PASS_TIMINGS, {}))
        self._last_logits_graph: fx.GraphModule | None = None  # built on the first prefill
        self._releasing_tails_graph: fx.GraphModule | None = None  # the same, freeing the old tails
        # set by compile(): graph -> (its torch.compile'd callable, the unbacked sources for its calls)
        self._compiled: dict[fx.GraphModule, tuple[Callable, str]] = {}
        self._compile_options: dict = {}
        self._gradient_sync = None  # set by segcompile.distributed.fsdp / ddp

    # ---- public API -------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, **kwargs):
        """Segmented forward over the whole sequence; returns the model's own output type."""
        if kwargs:
            raise SegcompileError(
                f"SegmentedModel.forward takes only input_ids; got {sorted(kwargs)}. Positions are "
                "implicit and masks are the segment semantics (padding is not supported)"
            )
        self._check_ids(input_ids)  # before anything reads input_ids.shape
        if self.cfg.tbptt_k and input_ids.shape[1] > self.cfg.segment_len and _builds_graph(self):
            warnings.warn(
                "gradients through SegmentedModel.forward carry no state across segments (tbptt_k=0 "
                f"semantics), but this config has tbptt_k={self.cfg.tbptt_k}: train with "
                "seg.tbptt_backward(input_ids, labels), or run the forward under torch.no_grad()",
                stacklevel=2,
            )
        outputs, _ = self._feed(self.initial_state(input_ids), input_ids, collect=True)
        return outputs

    def prefill(self, input_ids: torch.Tensor, state: SegmentState | None = None) -> SegmentState:
        """Run ``input_ids`` through the loop and return the state (``state.logits`` = last token's).

        Each step computes the logits of its last position only, the long-range history is
        allocated once for the whole prompt, and a step over a whole segment frees each layer's
        old tail once its layer has read it (``_step_releasing_tails``), except the tails of the
        ``state`` passed in, which the caller may continue from again."""
        state = state or self.initial_state(input_ids)
        foreign = _storages([*_layer_tensors(state, _CARRIED), state.logits])
        state = reserve_history(state, state.position + input_ids.shape[1], token_major=bool(self._compiled))
        _, state = self._feed(state, input_ids, collect=False, foreign=foreign)
        return state

    def decode(self, state: SegmentState, next_ids: torch.Tensor) -> tuple[torch.Tensor, SegmentState]:
        """Feed ``next_ids [B, n]`` after ``state``; returns their logits ``[B, n, V]`` and the new state."""
        self._check_ids(next_ids)
        if next_ids.shape[0] != state.batch_size:
            raise SegcompileError(
                f"decode: batch size {next_ids.shape[0]} does not match the state's {state.batch_size}; "
                "decode with the batch the state was prefilled with"
            )
        outputs, state = self._feed(state, next_ids, collect=True)
        return _logits_of(outputs), state

    def initial_state(self, input_ids: torch.Tensor) -> SegmentState:
        self._check_ids(input_ids)
        batch, device = input_ids.shape[0], input_ids.device
        layers = []
        for site in self.sites:
            def empty(heads, dim, site=site):
                return torch.empty(batch, heads, 0, dim, dtype=site.dtype, device=device)

            h, lr = site.num_kv_heads, len(site.long_range)
            layers.append(
                LayerState(
                    empty(h, site.head_dim), empty(h, site.v_head_dim),
                    empty(lr, site.head_dim), empty(lr, site.v_head_dim),
                    empty(h, site.head_dim), empty(h, site.v_head_dim),
                    empty(h, site.head_dim), empty(h, site.v_head_dim),
                )
            )
        return SegmentState(0, tuple(layers))

    def compile(self, **kwargs) -> SegmentedModel:
        """Run the segment step under ``torch.compile(**kwargs)`` (``backend``, ``mode``, ``options``...)
        in ``forward``, ``prefill``, ``decode`` and ``tbptt_backward``, without a recompile per step.

        A plainly compiled ``step_graph`` recompiles as the carried state grows: Dynamo
        specialises lengths 0 and 1 (the tail, sinks and history are empty in the first segment,
        the current segment passes 0 and 1 in every one), guards the strides of views of longer
        buffers (the history, the tail, the sinks), and so falls back to eager at its recompile
        limit. Here the carried tensors' lengths, and the token count of a prefill step, are
        unbacked (Dynamo neither specialises nor guards them), and every step gets the state in
        one layout whatever its lengths, none of it a view: sinks, tail and history token-major
        (``[entries, batch, kv_heads, head_dim]`` in memory, strides that do not depend on the
        entries; the history buffer is token-major), the current segment contiguous. Decoding
        then compiles one graph for prefill steps and one for one-token decode steps (two if the
        first decode step starts a segment), however many tokens follow; another batch size,
        dtype or grad mode compiles again. Every attention site keeps its ``impl``.

        Compiles in place and returns ``self``; ``step_graph`` stays the uncompiled ``GraphModule``
        (what export, ``print(seg)`` and the pass pages show).
        """
        graphs = [self.step_graph, self._prefill_graph()]
        self._compiled = {}
        for graph in graphs:
            # Dynamo names the step's arguments L['<name>'] (torch.compiler.config.unbacked_sources)
            names = list(inspect.signature(graph.forward).parameters)  # input_ids, position_offset, state...
            sources = [f"L['{name}']:2" for name in names[2:]]
            if graph is not self.step_graph:  # prefill: any prompt length, 1 included, in one graph
                sources.append(f"L['{names[0]}']:1")
            self._compiled[graph] = (torch.compile(graph, **kwargs), ",".join(sources))
        self._compile_options = dict(kwargs)
        return self

    # ---- the loop ---------------------------------------------------------------------------
    def _feed(self, state: SegmentState, input_ids: torch.Tensor, collect: bool, foreign: set[int] | None = None):
        """Run ``input_ids`` after ``state``, one step per piece of a segment. ``foreign`` (prefill):
        the storages the caller holds; steps that may free the old tails then do."""
        self._check_ids(input_ids)
        pieces = []
        for piece in segment_pieces(state.position, input_ids.shape[1], self.cfg.segment_len):
            chunk = input_ids[:, piece]
            if foreign is not None and self._can_release_tails(state, chunk, foreign):
                leaves, state = self._step_releasing_tails(state, chunk)
            else:
                leaves, state = self.step(state, chunk, last_logits_only=not collect)
            if collect:
                pieces.append(leaves)
        if not collect:
            return None, state
        return _join(pieces, self.capture_info.out_spec), state

    def step(self, state: SegmentState, chunk: torch.Tensor, last_logits_only: bool = False) -> tuple[list, SegmentState]:
        """Run the step graph once on ``chunk`` (which must not cross a segment boundary), and
        move the segment into the carried state if ``chunk`` finished it. ``last_logits_only``:
        the logits leaf holds the last position's only."""
        leaves, state = self.run_step(state, chunk, graph=self._prefill_graph() if last_logits_only else None)
        if state.position % self.cfg.segment_len == 0:
            state = self.end_segment(state)
        return leaves, state

    def _can_release_tails(self, state: SegmentState, chunk: torch.Tensor, foreign: set[int]) -> bool:
        """Whether a prefill step over ``chunk`` may free ``state``'s tails once they are read.

        Only a step over a whole segment (it ends the segment: nothing reads the old tails after
        it), with no autograd graph (one would save the tails for backward) and not compiled, and
        only tails that are not empty and whose storage is the prefill's own: neither the
        caller's (``foreign``: a user may continue two branches from one state) nor shared with
        sinks or history, which the next state may keep. The storage of an old tail is then the
        previous step's ``current`` buffer (a fresh concatenation; with T < S a copy of its last
        T entries), which only the old tail refers to."""
        S = self.cfg.segment_len
        if state.position % S or chunk.shape[1] != S or self._compiled or _builds_graph(self):
            return False
        kept = foreign | _storages(_layer_tensors(state, _CONSTANTS))
        return all(t.numel() > 0 and _storage_id(t) not in kept for t in _layer_tensors(state, ("tail_k", "tail_v")))

    def _step_releasing_tails(self, state: SegmentState, chunk: torch.Tensor) -> tuple[list, SegmentState]:
        """``step`` over a whole segment in a graph that frees every layer's old tail after its
        layer's attention has read it (``passes/release_tails.py``). What ``end_segment`` does
        with the old tails is done before the step (``_retire_tails``), the rest after it: a
        freed tail is never read again."""
        retired = self._retire_tails(state)
        leaves, state = self.run_step(state, chunk, graph=self._releasing_graph())
        return leaves, self.end_segment(state, retired=retired)

    def run_step(
        self, state: SegmentState, chunk: torch.Tensor, checkpoint: bool = False, graph: fx.GraphModule | None = None
    ) -> tuple[list, SegmentState]:
        """Run the step graph (or ``graph``, a variant of it) once; the new tokens' K/V are
        appended to ``current``.

        ``checkpoint``: keep no activations inside the segment; recompute them in backward.
        """
        graph = graph if graph is not None else self.step_graph
        compiled = self._compiled.get(graph)
        if compiled is not None:
            state = compiled_layout(state)
            chunk = chunk.clone()  # not a view of the caller's ids (their offset and base would be guarded)
        offset = torch.tensor(state.position, dtype=torch.long, device=chunk.device)
        flat = [t for layer in state.layers for t in layer.tensors()]
        if compiled is not None:
            flat = [t.detach() if t._base is not None and not t.requires_grad else t for t in flat]
            graph = functools.partial(_call_compiled, *compiled)
        if checkpoint:
            outs = torch.utils.checkpoint.checkpoint(graph, chunk, offset, *flat, use_reentrant=False)
        else:
            outs = graph(chunk, offset, *flat)
        leaves, currents = list(outs[: self._num_outputs]), outs[self._num_outputs :]
        layers = tuple(
            replace(layer, current_k=currents[2 * i], current_v=currents[2 * i + 1])
            for i, layer in enumerate(state.layers)
        )
        position = state.position + chunk.shape[1]
        return leaves, SegmentState(position, layers, self.logits_of(leaves)[:, -1])

    def _prefill_graph(self) -> fx.GraphModule:
        if self._last_logits_graph is None:
            from .variants.keep_last_logits import keep_last_logits

            self._last_logits_graph = keep_last_logits(self.step_graph) or self.step_graph
        return self._last_logits_graph

    def _releasing_graph(self) -> fx.GraphModule:
        if self._releasing_tails_graph is None:
            from .variants.release_tails import release_tails

            self._releasing_tails_graph = release_tails(self._prefill_graph())
        return self._releasing_tails_graph

    def logits_of(self, leaves: list) -> torch.Tensor:
        return _logits_of(pytree.tree_unflatten(leaves, self.capture_info.out_spec))

    def tbptt_backward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        reduction: str = "mean",
        checkpoint: bool = False,
    ):
        """Exact truncated-BPTT gradients (``cfg.tbptt_k``) into the model's parameters' ``.grad``.

        ``labels`` default to ``input_ids`` (position i predicts labels[i+1]; -100 is ignored);
        ``reduction="mean"`` divides by the label tokens of the whole sequence (HF's causal-LM
        loss), ``"sum"`` does not. Returns the loss. Keeps at most ``tbptt_k + 1`` segment graphs;
        with ``checkpoint=True`` they hold only their inputs and recompute activations in backward.
        Under ``torch.autocast`` the segment steps run in the autocast dtype. Wrapped by
        ``segcompile.distributed``, the gradients are synchronised over the ranks once, after the
        sequence's last backward.
        """
        from .distributed import check_sync_owner
        from .training import tbptt_backward

        check_sync_owner(self)
        if self._gradient_sync is None:
            return tbptt_backward(self, input_ids, labels, reduction, checkpoint)
        with self._gradient_sync.sequence(self):
            return tbptt_backward(self, input_ids, labels, reduction, checkpoint)

    def end_segment(self, state: SegmentState, retired: tuple[dict, ...] | None = None) -> SegmentState:
        """Move a finished segment into tail, history and sinks (all detached).

        ``retired``: per layer, the sinks and history the old tail has already moved into
        (``_retire_tails``, before a step that frees the old tails); only the segment's first
        S - T entries are left to move, and the old tail is not read."""
        S, T = self.cfg.segment_len, self.cfg.tail_len
        layers = []
        for i, (site, layer) in enumerate(zip(self.sites, state.layers)):
            if retired is not None:
                layer = replace(layer, **retired[i])
            moved = {}
            for kv in ("k", "v"):
                current = getattr(layer, f"current_{kv}").detach()
                leaving = current[:, :, : S - T]
                if retired is None:
                    tail = getattr(layer, f"tail_{kv}").detach()  # a TBPTT leaf: sinks and history are constants
                    # the tail follows the K/V dtype of the run
                    leaving = torch.cat([tail.to(current.dtype), leaving], dim=2)
                moved.update(self._leave(site, layer, kv, leaving))
                # views would keep the whole segment's buffer alive with the tail (S entries a
                # layer where T are carried): with T < S the tail gets its own copy
                tail = current[:, :, S - T :]
                moved[f"tail_{kv}"] = tail.clone() if T < S else tail
                moved[f"current_{kv}"] = current.new_empty(*current.shape[:2], 0, current.shape[3])
            layers.append(replace(layer, **moved))
        return replace(state, layers=tuple(layers))

    def _retire_tails(self, state: SegmentState) -> tuple[dict, ...]:
        """Per layer, the sinks and history with the old tail moved in, as ``end_segment`` would
        move it at the end of the coming step, for ``end_segment(..., retired=)``. The step
        itself still sees the old sinks and history: the tail's long-range heads are written
        past the end of the history view it reads (in place, in a buffer ``reserve_history``
        sized), and new sinks are new tensors. A tail made by this prefill has the K/V dtype of
        its steps, so it leaves in the dtype ``end_segment`` would convert it to."""
        retired = []
        for site, layer in zip(self.sites, state.layers):
            moved = {}
            for kv in ("k", "v"):
                moved.update(self._leave(site, layer, kv, getattr(layer, f"tail_{kv}").detach()))
            retired.append(moved)
        return tuple(retired)

    def _leave(self, site: AttentionSite, layer: LayerState, kv: str, leaving: torch.Tensor) -> dict[str, torch.Tensor]:
        """``layer``'s sinks and history (``kv``: "k" or "v") with ``leaving``, entries that leave
        the tail in position order, appended: the sinks while they have fewer than G entries,
        the history for the long-range KV heads. Both are constants, in ``carried_dtype``."""
        G = self.cfg.sink_tokens
        constant = carried_dtype(leaving.dtype, leaving.device.type)
        moved = {}
        sinks = getattr(layer, f"sink_{kv}").to(constant)
        if sinks.shape[2] < G:
            # only the entries the sinks take: a slice of the whole concatenation would keep every
            # leaving entry alive with them (a segment's K/V a layer, for good)
            sinks = torch.cat([sinks, leaving[:, :, : G - sinks.shape[2]].to(constant)], dim=2)
        moved[f"sink_{kv}"] = sinks
        if site.long_range:
            index = _head_index(tuple(site.long_range), leaving.device)
            store, history = _append_history(
                getattr(layer, f"hist_store_{kv}"), getattr(layer, f"hist_{kv}"),
                leaving.index_select(1, index).to(constant), token_major=bool(self._compiled),
            )
            moved[f"hist_store_{kv}"], moved[f"hist_{kv}"] = store, history
        return moved

    def _check_ids(self, input_ids: torch.Tensor) -> None:
        if not isinstance(input_ids, torch.Tensor):
            raise SegcompileError(f"input_ids must be an integer tensor [batch, tokens], got a {type(input_ids).__name__}")
        if input_ids.dim() != 2 or input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
            raise SegcompileError(
                f"input_ids must be an integer tensor [batch, tokens], got {input_ids.dtype} of shape {tuple(input_ids.shape)}"
            )
        if input_ids.shape[1] == 0:
            raise SegcompileError("input_ids has no tokens")
        captured_on = self.capture_info.device
        if input_ids.device.type != captured_on.type:
            raise SegcompileError(
                f"input_ids are on {input_ids.device} but {self.capture_info.model_class} was captured on "
                f"{captured_on}; the traced graph is device-specific: move the model first, then call transform"
            )

    # ---- display ----------------------------------------------------------------------------
    def __repr__(self) -> str:
        # The step graph's module tree repeats the original model's; show what was compiled instead.
        body = self.extra_repr().replace("\n", "\n  ")
        return f"SegmentedModel(\n  {body}\n)"

    def extra_repr(self) -> str:
        c = self.cfg
        lines = [
            f"model={self.capture_info.model_class}, segment_len={c.segment_len}, tail_len={c.tail_len}, "
            f"sink_tokens={c.sink_tokens}, tbptt_k={c.tbptt_k}, long_range={c.long_range.describe()}",
        ]
        for site in self.sites:
            lines.append(
                f"layer {site.layer}: {site.module} [{site.kind}] heads={site.num_heads} kv_heads={site.num_kv_heads} "
                f"long_range_kv_heads={list(site.long_range)} impl={self.implementations[site.layer]}"
            )
        if self._compiled:
            options = ", ".join(f"{k}={v!r}" for k, v in self._compile_options.items())
            lines.append(f"step: torch.compile({options}), unbacked state lengths (SegmentedModel.compile)")
        return "\n".join(lines)




HISTORY_GROWTH = 1.5  # capacity factor when the history buffer is full: amortised O(1) per token


def carried_dtype(dtype: torch.dtype, device_type: str) -> torch.dtype:
    """The dtype sinks and history are kept in: under autocast, fp32 K/V (Llama's leave RoPE in
    fp32) are stored in the autocast dtype, as the model's own SDPA would cast them, which halves
    the memory that grows with the context. They are constants (no gradient), so nothing else
    changes; the tail, which TBPTT differentiates through, keeps the run's dtype."""
    if dtype == torch.float32 and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return dtype


def reserve_history(state: SegmentState, total_tokens: int, token_major: bool = False) -> SegmentState:
    """Give every long-range history a buffer for ``total_tokens`` positions up front (prefill of
    a known prompt), instead of growing it by ``HISTORY_GROWTH`` (which can leave half again the
    needed memory allocated, and copies at every growth). ``token_major``: lay the buffer out
    token-major (compiled steps, ``SegmentedModel.compile``)."""
    layers = []
    for layer in state.layers:
        moved = {}
        for kv in ("k", "v"):
            store, history = getattr(layer, f"hist_store_{kv}"), getattr(layer, f"hist_{kv}")
            if history.shape[1] == 0 or (store is not None and store.shape[2] >= total_tokens):
                continue
            dtype = carried_dtype(history.dtype, history.device.type)
            fresh = _empty_entries(history, total_tokens, token_major, dtype)
            fresh[:, :, : history.shape[2]] = history
            moved[f"hist_store_{kv}"], moved[f"hist_{kv}"] = fresh, fresh[:, :, : history.shape[2]]
        layers.append(replace(layer, **moved))
    return replace(state, layers=tuple(layers))


def _append_history(store: torch.Tensor | None, history: torch.Tensor, new: torch.Tensor, token_major: bool = False):
    """Append ``new`` after ``history`` in an append-only buffer; return (buffer, view of the history).

    Segment graphs kept for TBPTT save the history view they read; a fresh concatenation per
    segment would give each its own copy. Appends land past the end of every view already
    handed out, so they are written through ``.data`` (no autograd version bump: no saved
    region changes). A full buffer is replaced by a larger one; old views keep the old one alive
    only while a graph still holds them. A state whose view ends before what was already
    appended (a branch) gets a copy. ``token_major``: a new buffer is laid out token-major.
    """
    length, need = history.shape[2], history.shape[2] + new.shape[2]
    # Another state that shares this buffer (two decodes continued from one state) may already have
    # appended past this view: writing here would change that state's history, so copy instead.
    taken = getattr(store, "_segcompile_filled", length) > length if store is not None else False
    if (store is None or taken or store.shape[2] < need or store.dtype != new.dtype
            or store.shape[:2] != new.shape[:2]):
        capacity = max(need, int(length * HISTORY_GROWTH))
        fresh = _empty_entries(new, capacity, token_major)
        fresh[:, :, :length] = history
        store = fresh
    store.data[:, :, length:need] = new
    store._segcompile_filled = need
    return store, store[:, :, :need]


def _empty_entries(like: torch.Tensor, entries: int, token_major: bool, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An empty ``[B, heads, entries, head_dim]`` buffer like ``like``, token-major or contiguous."""
    B, H, _, D = like.shape
    if not token_major:
        return like.new_empty(B, H, entries, D, dtype=dtype)
    return torch.empty_strided((B, H, entries, D), _token_major_strides(like.shape), dtype=dtype or like.dtype, device=like.device)


# ---- the layout compiled steps take (SegmentedModel.compile) --------------------------------------
# Dynamo guards the sizes, strides and storage offset of every input. The lengths are unbacked (not
# guarded); what is left must not change with them. Sinks, tail and history are token-major, whose
# strides are products of batch, heads and head_dim only; the current segment is the step's own
# output, contiguous, and an empty one has the strides a contiguous one of length 0 would have
# (H*0*D, 0*D, D, 1), which satisfy the guards of a graph compiled on a longer one.


def _token_major_strides(shape) -> tuple[int, int, int, int]:
    B, H, _, D = shape
    return (H * D, D, B * H * D, 1)


def _contiguous_strides(shape) -> tuple[int, int, int, int]:
    _, H, n, D = shape
    return (H * n * D, n * D, D, 1)


def _has_layout(t: torch.Tensor, strides) -> bool:
    return t.stride() == strides and t.storage_offset() == 0


def compiled_layout(state: SegmentState) -> SegmentState:
    """``state`` with every carried tensor in the layout compiled steps take (``SegmentedModel.compile``).

    Nothing is copied for a state a compiled step returned, except after a segment end: the new
    tail and the sinks while they fill, T + G entries a layer, once. A history not yet token-major
    (a state from before ``compile``) moves to a token-major buffer of the same capacity. Copies
    are differentiable (a TBPTT tail leaf keeps its gradient)."""
    layers = []
    for layer in state.layers:
        moved = {}
        for kv in ("k", "v"):
            for name, strides in ((f"sink_{kv}", _token_major_strides), (f"tail_{kv}", _token_major_strides),
                                  (f"current_{kv}", _contiguous_strides)):
                t = getattr(layer, name)
                if not _has_layout(t, strides(t.shape)):
                    moved[name] = torch.empty_strided(t.shape, strides(t.shape), dtype=t.dtype, device=t.device).copy_(t)
            history, store = getattr(layer, f"hist_{kv}"), getattr(layer, f"hist_store_{kv}")
            if not _has_layout(history, _token_major_strides(history.shape)):
                fresh = _empty_entries(history, max(store.shape[2] if store is not None else 0, history.shape[2]), True)
                fresh[:, :, : history.shape[2]] = history
                moved[f"hist_store_{kv}"], moved[f"hist_{kv}"] = fresh, fresh[:, :, : history.shape[2]]
        layers.append(replace(layer, **moved) if moved else layer)
    return replace(state, layers=tuple(layers))


def _call_compiled(step: Callable, unbacked_sources: str, *args):
    # the unbacked lengths, named by the step's arguments; in effect only while the step traces
    with torch.compiler.config.patch(unbacked_sources=unbacked_sources):
        return step(*args)


# What a LayerState holds: all of it, and the constants (what the next state may keep as it is).
_CONSTANTS = ("sink_k", "sink_v", "hist_k", "hist_v", "hist_store_k", "hist_store_v")
_CARRIED = (*STATE_NAMES, "hist_store_k", "hist_store_v")


def _layer_tensors(state: SegmentState, names: tuple[str, ...]) -> list[torch.Tensor | None]:
    return [getattr(layer, name) for layer in state.layers for name in names]


def _storage_id(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _storages(tensors: list[torch.Tensor | None]) -> set[int]:
    """The storages of ``tensors`` (an empty storage is no one's: nothing to free, no address)."""
    return {_storage_id(t) for t in tensors if t is not None and t.untyped_storage().nbytes()}


@functools.cache
def _head_index(heads: tuple[int, ...], device: torch.device) -> torch.Tensor:
    # made once per device: a fresh host-to-device copy per layer and segment stalls the stream
    return torch.tensor(heads, device=device)


def _builds_graph(module: torch.nn.Module) -> bool:
    return torch.is_grad_enabled() and any(p.requires_grad for p in module.parameters())


def _logits_of(output):
    return output.logits if hasattr(output, "logits") else output


def _join(pieces: list[list], out_spec):
    """Concatenate each output leaf of the chunks along the token axis and rebuild the output."""
    if len(pieces) == 1:
        return pytree.tree_unflatten(pieces[0], out_spec)
    joined = [torch.cat(parts, dim=1) for parts in zip(*pieces)]
    return pytree.tree_unflatten(joined, out_spec)
