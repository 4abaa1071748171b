"""The carried state and its buffers (docs/design.md section 6).

``SegmentState`` is what a ``SegmentedModel`` carries between calls: the position, one
``LayerState`` per layer (the step graph's state inputs in ``ir.STATE_NAMES`` order), the last
token's logits and the ``ProgramId`` of the program that made it (a state is only meaningful to
that program: ``SegmentedModel`` refuses another's, ``check_state_program``). This module makes
states, checks them and lays out their memory; moving a finished segment into tail, sinks and
history is the driver's (``SegmentedModel.end_segment``):

* the long-range history is an append-only buffer that every live segment graph shares
  (``append_history``), sized for the whole input when it is known (``reserve_history``);
* sinks and history are constants, kept in ``carried_dtype``; with ``SegmentConfig.history_dtype``
  the history is stored quantised instead (``kernels/history_format.py``: a ``QuantizedHistory``
  view of an fp8 buffer and of a buffer of its scales, appended to and sized as above);
* compiled steps take every carried tensor in one layout whatever its length
  (``compiled_layout``, for ``SegmentedModel.compile``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from ..config import SegmentConfig, segment_start
from ..errors import StateError
from ..ir import STATE_NAMES, AttentionSite
from ..kernels.dispatch import quantized_history, quantized_history_pair
from ..kernels.history_format import HistoryGeometry, QuantizedHistory, empty_history

HISTORY_GROWTH = 1.5  # capacity factor when the history buffer is full: amortised O(1) per token
SCALE_ROOM = 16  # a quantised history's scale buffer holds a multiple of this many blocks

# What a LayerState holds: the constants (what the next state may keep as it is), and all of it.
CONSTANT_NAMES = ("sink_k", "sink_v", "hist_k", "hist_v", "hist_store_k", "hist_store_v")
CARRIED_NAMES = (*STATE_NAMES, "hist_store_k", "hist_store_v")


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
class ProgramId:
    """The program a carried state belongs to: what its K/V mean (docs/design.md sections 1 and 6).

    Two ``SegmentedModel``s take each other's states when these are equal: the same parameters
    (the objects, not their values: two transforms of one model, or of one ``sc.capture``, share
    them; a copy of the model, or another model of the same architecture, does not), the same
    segment sizes and head plan, and the same K/V layout and dtype per layer. What does not change
    what a state holds is left out: ``tbptt_k`` (gradients only), the attention implementation,
    ``compile()`` and CUDA graphs (how a step runs). Parameters changed in place (an optimizer
    step) keep their identity: a state made before the change stays accepted, and holds K/V of
    the old weights."""

    model: str  # the captured model's class
    parameters: int  # hash of the identities of its parameters
    segment_len: int
    tail_len: int
    sink_tokens: int
    long_range: tuple[tuple[int, ...], ...]  # per layer, its long-range KV heads in plan order
    layers: tuple[tuple[int, int, int, str], ...]  # per layer: KV heads, K and V head dims, K/V dtype
    history_dtype: torch.dtype | None = None  # SegmentConfig.history_dtype: how the history is stored

    @classmethod
    def of(cls, model: str, parameters, sites: list[AttentionSite], cfg: SegmentConfig) -> ProgramId:
        """The id of the program that runs ``sites`` under ``cfg`` with ``parameters``."""
        return cls(
            model=model,
            parameters=hash(tuple(id(p) for p in parameters)),
            segment_len=cfg.segment_len,
            tail_len=cfg.tail_len,
            sink_tokens=cfg.sink_tokens,
            long_range=tuple(tuple(site.long_range) for site in sites),
            layers=tuple((site.num_kv_heads, site.head_dim, site.v_head_dim, str(site.dtype)) for site in sites),
            history_dtype=cfg.history_dtype,
        )

    def history_geometry(self) -> HistoryGeometry | None:
        """Where the scale blocks of this program's quantised history lie (``None``: not quantised)."""
        return None if self.history_dtype is None else HistoryGeometry(self.segment_len, self.tail_len)

    def differences(self, other: ProgramId) -> list[str]:
        """How ``other`` (where a state comes from) differs from this program, in words."""
        said = []
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if mine == theirs:
                continue
            if f.name == "parameters":
                said.append(f"the parameters of another {other.model} (a copy, or another model)")
            elif f.name == "long_range":
                said.append(f"long-range KV heads {_per_layer(theirs)} (this model: {_per_layer(mine)})")
            elif f.name == "layers":
                said.append("another K/V layout (KV heads, head dims or dtype per layer)")
            else:
                said.append(f"{f.name} {theirs} (this model: {mine})")
        return said


def _per_layer(heads: tuple[tuple[int, ...], ...]) -> dict[int, list[int]]:
    return {layer: list(h) for layer, h in enumerate(heads)}


@dataclass(frozen=True)
class SegmentState:
    """Everything a segmented model carries between calls: position, per-layer K/V, last logits,
    and the program that made it (``None``: a state put together by hand, checked by its shapes)."""

    position: int
    layers: tuple[LayerState, ...]
    logits: torch.Tensor | None = None  # logits of the last token fed, [B, V]
    program_id: ProgramId | None = None
    # positions a long-range history's buffer is made for when its first positions arrive
    # (``reserve_history``; later growth is ``HISTORY_GROWTH``'s)
    history_room: int = 0

    @property
    def batch_size(self) -> int:
        return self.layers[0].tail_k.shape[0]


def empty_state(sites: list[AttentionSite], batch_size: int, device: torch.device,
                program_id: ProgramId | None = None) -> SegmentState:
    """The state before the first token: every part of every layer empty, in the site's K/V dtype
    (the history in ``program_id.history_dtype`` when the program quantises it)."""
    def empty(site: AttentionSite, heads: int, dim: int) -> torch.Tensor:
        return torch.empty(batch_size, heads, 0, dim, dtype=site.dtype, device=device)

    geometry = program_id.history_geometry() if program_id is not None else None

    def history(site: AttentionSite, heads: int, dim: int) -> torch.Tensor:
        if geometry is None or not heads:
            return empty(site, heads, dim)
        return empty_history(batch_size, heads, dim, program_id.history_dtype, geometry, device)

    layers = []
    for site in sites:
        h, lr = site.num_kv_heads, len(site.long_range)
        layers.append(
            LayerState(
                empty(site, h, site.head_dim), empty(site, h, site.v_head_dim),
                history(site, lr, site.head_dim), history(site, lr, site.v_head_dim),
                empty(site, h, site.head_dim), empty(site, h, site.v_head_dim),
                empty(site, h, site.head_dim), empty(site, h, site.v_head_dim),
            )
        )
    return SegmentState(0, tuple(layers), program_id=program_id)


# ---- whose state: the checks before a state is continued -------------------------------------------
def check_state_program(state, program_id: ProgramId, sites: list[AttentionSite], cfg: SegmentConfig,
                        what: str) -> None:
    """Refuse a state another program made (``ProgramId``); check a hand-made one by its shapes.

    ``state``: a ``SegmentState`` or a ``static_decode.StaticState`` (both carry ``program_id``).
    A state of another segment length, tail, sinks or plan holds K/V in other places, and one of
    other parameters holds other K/V: continuing it gives wrong logits, or a shape error deep in
    a step, so it is refused up front, naming what differs."""
    theirs = getattr(state, "program_id", _NOT_A_STATE)
    if theirs is _NOT_A_STATE:
        raise StateError(
            f"{what}: state must be a SegmentState from this model's prefill or decode, got {type(state).__name__}"
        )
    if theirs is None:
        check_state_layout(state, sites, cfg)
    elif theirs is not program_id and theirs != program_id:
        raise StateError(
            f"{what}: this state was made by another program ({'; '.join(program_id.differences(theirs))}); a state "
            f"holds K/V laid out for the model, segment sizes and head plan that made it: prefill with this model"
        )


_NOT_A_STATE = object()


def check_state_layout(state: SegmentState, sites: list[AttentionSite], cfg: SegmentConfig) -> None:
    """Refuse a state whose tensors do not have the shapes this program's state has at its
    position (docs/design.md section 6): a state put together by hand, or loaded into the static
    decode buffers."""
    if isinstance(state.position, bool) or not isinstance(state.position, int) or state.position < 0:
        raise StateError(f"a state's position must be an int >= 0, got {state.position!r}")
    if len(state.layers) != len(sites):
        raise StateError(
            f"a state of {len(state.layers)} layers given to a model of {len(sites)}; decode from a state this "
            "model's prefill or decode made"
        )
    want_length = state_lengths(state.position, cfg)
    batch = state.batch_size
    for site, layer in zip(sites, state.layers):
        for part, heads in (("sink", site.num_kv_heads), ("hist", len(site.long_range)),
                            ("tail", site.num_kv_heads), ("current", site.num_kv_heads)):
            length = want_length[part] if part != "hist" or site.long_range else 0
            for kv, dim in (("k", site.head_dim), ("v", site.v_head_dim)):
                got, want = tuple(getattr(layer, f"{part}_{kv}").shape), (batch, heads, length, dim)
                if got != want:
                    raise StateError(
                        f"layer {site.layer}: the state's {part}_{kv} has shape {got} where this model's state at "
                        f"position {state.position} has {want}; decode from a state this model's prefill or decode made"
                    )
                quantized = isinstance(getattr(layer, f"hist_{kv}"), QuantizedHistory)
                if part == "hist" and heads and quantized != (cfg.history_dtype is not None):
                    raise StateError(
                        f"layer {site.layer}: the state's history is {'' if quantized else 'not '}quantised where this "
                        f"model's history_dtype is {cfg.history_dtype}; decode from a state this model's prefill or "
                        "decode made"
                    )


def state_lengths(position: int, cfg: SegmentConfig) -> dict[str, int]:
    """Entries of each part of a layer's state at ``position`` (history: a long-range layer's)."""
    S, T, G = cfg.segment_len, cfg.tail_len, cfg.sink_tokens
    a = segment_start(position, S)
    start = a - T
    return {"sink": min(G, max(start, 0)), "hist": max(start, 0), "tail": T if a > 0 else 0, "current": position - a}


def carried_dtype(dtype: torch.dtype, device_type: str) -> torch.dtype:
    """The dtype sinks and history are kept in: under autocast, fp32 K/V (Llama's leave RoPE in
    fp32) are stored in the autocast dtype, as the model's own SDPA would cast them, which halves
    the memory that grows with the context. They are constants (no gradient), so nothing else
    changes; the tail, which TBPTT differentiates through, keeps the run's dtype."""
    if dtype == torch.float32 and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return dtype


# ---- the long-range history: one append-only buffer a layer ----------------------------------------
def reserve_history(state: SegmentState, total_tokens: int, token_major: bool = False) -> SegmentState:
    """Give every long-range history a buffer for ``total_tokens`` positions up front (prefill of
    a known prompt, TBPTT over a known sequence), instead of growing it by ``HISTORY_GROWTH``
    (which can leave half again the needed memory allocated, and copies at every growth).
    ``token_major``: lay the buffer out token-major (compiled steps, ``SegmentedModel.compile``).

    A history with no positions and no buffer yet (a prompt from the empty state) gets its buffer
    when its first positions arrive (``state.history_room``, which ``append_history`` reads), two
    segments into the prompt: made here, the buffers (64 allocations at the 8B shape, 128 with a
    quantised history's scales) would keep the GPU idle before the prefill's first kernel; made
    there, the host makes them while the GPU runs the first segments."""
    layers = []
    for layer in state.layers:
        moved = {}
        for kv in ("k", "v"):
            store, history = getattr(layer, f"hist_store_{kv}"), getattr(layer, f"hist_{kv}")
            if history.shape[1] == 0 or (store is None and history.shape[2] == 0):
                continue
            if store is not None and store.shape[2] >= total_tokens and not written_past(store, history.shape[2]):
                continue
            moved[f"hist_store_{kv}"], moved[f"hist_{kv}"] = history_buffer(history, total_tokens, token_major)
        layers.append(replace(layer, **moved))
    return replace(state, layers=tuple(layers), history_room=max(state.history_room, total_tokens))


def history_buffer(history, capacity: int, token_major: bool = False):
    """(a buffer of ``capacity`` positions holding ``history``, ``history`` as a view of it): one
    copy, into ``carried_dtype``; a ``QuantizedHistory``'s values and scales alike."""
    if isinstance(history, QuantizedHistory):
        return _quantized_buffer(history, capacity, token_major)
    fresh = empty_entries(history, capacity, token_major, carried_dtype(history.dtype, history.device.type))
    fresh[:, :, : history.shape[2]] = history
    return fresh, fresh[:, :, : history.shape[2]]


def append_history(store: torch.Tensor | None, history: torch.Tensor, new: torch.Tensor, token_major: bool = False,
                   heads: torch.Tensor | None = None, room: int = 0):
    """Append ``new`` (with ``heads``: ``new.index_select(1, heads)``) after ``history`` in an
    append-only buffer; return (buffer, view of the history).

    Segment graphs kept for TBPTT save the history view they read; a fresh concatenation per
    segment would give each its own copy. Appends land past the end of every view already
    handed out, so they are written through ``.data`` (no autograd version bump: no saved
    region changes). A full buffer is replaced by a larger one (of at least ``room`` positions:
    the state's ``history_room``); old views keep the old one alive only while a graph still
    holds them. A state whose view ends before what was already
    appended (a branch) gets a copy. ``token_major``: a new buffer is laid out token-major. A
    ``QuantizedHistory`` gets ``new`` quantised (``kernels/history_format.py``), its values and
    scales appended alike; its kernel reads the ``heads`` of ``new`` in place.
    """
    if isinstance(history, QuantizedHistory):
        return _append_quantized((store,), (history,), (new,), token_major, heads, room)[0]
    new = new.index_select(1, heads) if heads is not None else new
    length, need = history.shape[2], history.shape[2] + new.shape[2]
    # Another state that shares this buffer (two decodes continued from one state) may already have
    # appended past this view: writing here would change that state's history, so copy instead.
    if (store is None or written_past(store, length) or store.shape[2] < need or store.dtype != new.dtype
            or store.shape[:2] != new.shape[:2]):
        fresh = empty_entries(new, max(need, int(length * HISTORY_GROWTH), room), token_major)
        fresh[:, :, :length] = history
        store = fresh
    store.data[:, :, length:need] = new
    store._segcompile_filled = need
    return store, store[:, :, :need]


def written_past(store: torch.Tensor | None, length: int) -> bool:
    """Whether another state (or a static decoder that took the buffer over) wrote ``store`` past
    its first ``length`` positions: a state whose history ends there must not append in place."""
    return store is not None and getattr(store, "_segcompile_filled", length) > length


def append_history_pair(stores: tuple, histories: tuple, news: tuple, token_major: bool = False,
                        heads: torch.Tensor | None = None, room: int = 0) -> tuple:
    """``append_history`` of a layer's K and V (each argument a pair, K's first; returns a pair of
    (buffer, view of the history)): a quantised pair of the same length is quantised in one
    launch on a GPU (``dispatch.quantized_history_pair``)."""
    k, v = histories
    if (isinstance(k, QuantizedHistory) and isinstance(v, QuantizedHistory) and k.shape[2] == v.shape[2]
            and k.geometry == v.geometry and k.dtype == v.dtype):
        return _append_quantized(stores, histories, news, token_major, heads, room)
    return tuple(append_history(*args, token_major=token_major, heads=heads, room=room)
                 for args in zip(stores, histories, news))


def _append_quantized(stores: tuple, histories: tuple, news: tuple, token_major: bool, heads: torch.Tensor | None,
                      room: int = 0):
    """``append_history`` for quantised histories (one, or a layer's K and V of one length, block
    geometry and dtype): each store is its values' buffer, which carries the buffer of its scales
    (``_segcompile_scales``). Each new part starts where a piece of the format starts (a segment's
    first S - T positions or its tail), so no block already written changes."""
    buffers, outs = [], []
    for store, history, new in zip(stores, histories, news):
        length, need = history.shape[2], history.shape[2] + new.shape[2]
        shape = (new.shape[0], heads.numel() if heads is not None else new.shape[1])
        if store is None or written_past(store, length) or store.shape[2] < need or store.shape[:2] != shape:
            store, _ = _quantized_buffer(history, max(need, int(length * HISTORY_GROWTH), room), token_major)
        blocks, total = history.scales.shape[2], history.geometry.num_blocks(need)
        buffers.append((store, need, total))
        outs.append((store.data[:, :, length:need], store._segcompile_scales.data[:, :, blocks:total]))
    # quantised straight into the buffers: one kernel on a GPU, reading the heads in place (the
    # model's dtype takes a gather and a copy)
    first = histories[0]
    if len(news) == 2:
        quantized_history_pair(news, first.shape[2], first.geometry, first.dtype, outs, heads=heads)
    else:
        quantized_history(news[0], first.shape[2], first.geometry, first.dtype, out=outs[0], heads=heads)
    appended = []
    for store, need, total in buffers:
        store._segcompile_filled = need
        appended.append((store, QuantizedHistory.of(store[:, :, :need], store._segcompile_scales[:, :, :total],
                                                    first.geometry)))
    return tuple(appended)


def _quantized_buffer(history: QuantizedHistory, capacity: int, token_major: bool):
    """(values buffer of ``capacity`` positions holding ``history``, the history as a view of it);
    the buffer carries its scales' buffer as ``_segcompile_scales``."""
    length, blocks = history.shape[2], history.scales.shape[2]
    values = empty_entries(history.values(), capacity, token_major)
    values[:, :, :length] = history.values()
    # room for a whole number of 16 blocks: the kernels' scale strides are then multiples of 16 at
    # every capacity, one class of Triton's specialisation of integer arguments, so a prompt of a
    # length not seen before does not compile the history kernels anew (bf16 strides already are)
    room = -(-history.geometry.num_blocks(capacity) // SCALE_ROOM) * SCALE_ROOM
    scales = history.scales.new_empty(*history.shape[:2], room)
    scales[:, :, :blocks] = history.scales
    values._segcompile_scales = scales
    values._segcompile_filled = length
    return values, QuantizedHistory.of(values[:, :, :length], scales[:, :, :blocks], history.geometry)


def empty_entries(like: torch.Tensor, entries: int, token_major: bool, dtype: torch.dtype | None = None) -> torch.Tensor:
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
            token_major = _token_major_strides(history.shape)
            if _has_layout(history, token_major):
                continue
            if store is None and history.shape[2] == 0:  # no buffer yet: the first append makes it token-major
                moved[f"hist_{kv}"] = torch.empty_strided(history.shape, token_major, dtype=history.dtype,
                                                          device=history.device)
            else:
                fresh = empty_entries(history, max(store.shape[2] if store is not None else 0, history.shape[2]), True)
                fresh[:, :, : history.shape[2]] = history
                moved[f"hist_store_{kv}"], moved[f"hist_{kv}"] = fresh, fresh[:, :, : history.shape[2]]
        layers.append(replace(layer, **moved) if moved else layer)
    return replace(state, layers=tuple(layers))


def _token_major_strides(shape) -> tuple[int, int, int, int]:
    B, H, _, D = shape
    return (H * D, D, B * H * D, 1)


def _contiguous_strides(shape) -> tuple[int, int, int, int]:
    _, H, n, D = shape
    return (H * n * D, n * D, D, 1)


def _has_layout(t: torch.Tensor, strides) -> bool:
    return t.stride() == strides and t.storage_offset() == 0


# ---- which memory a state holds (what a prefill may free) ------------------------------------------
def layer_tensors(state: SegmentState, names: tuple[str, ...]) -> list[torch.Tensor | None]:
    """The tensors ``names`` (``CARRIED_NAMES``, ``CONSTANT_NAMES``...) of every layer of ``state``."""
    return [getattr(layer, name) for layer in state.layers for name in names]


def storage_id(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def storages(tensors: list[torch.Tensor | None]) -> set[int]:
    """The storages of ``tensors`` (an empty storage is no one's: nothing to free, no address)."""
    return {storage_id(t) for t in tensors if t is not None and t.untyped_storage().nbytes()}
