"""static_step: the decode step of static shapes that ``runtime/static_decode.py`` replays from CUDA graphs.

A CUDA graph replays the kernels it captured with the arguments they had then: every shape is
fixed and every value that changes between tokens must be read from device memory. The step
graph is neither (its carried state grows, the kernels of ``segment_attention`` take lengths as
Python ints), so the static decoder runs this variant: ``fixed_size_step`` (the rewrite the ONNX
export uses too) with a lowering of ``segment_attention`` that

* reads the position only from the ``position_offset`` tensor: which slots are valid, and where
  this step's K/V go, follow from it (docs/design.md section 8 gives the slot arithmetic);
* writes this step's K/V into the current-segment slots of the layer's buffers in place
  (``index_copy_`` at a position computed on the device) and returns no state: the buffers are
  the graph's inputs, the same memory at every replay;
* reads every buffer where it lies, without a copy: the buffers are laid out heads first,
  ``[Hkv, B, slots, D]``, local KV heads first, then the long-range ones in plan order, so that
  each head class is one slice and its batched matrix products read K and V in place;
* reads the small projections of one input (query, key, value) as one matrix product
  (``fuse_projections``: at batch 1 small products do not reach the memory bandwidth), and sums
  its reductions (RMSNorm's) in fp64 (``wide_reductions``): as the eager decode's graph does, so
  that the two round alike, compiled or not;
* computes products in the K/V dtype with fp32 (fp64 for fp64 models) results, the softmax in
  that wider type (16-bit probabilities for the second product, as FlashAttention does).

Masks are additive ``0 / -inf`` biases ``[group * L, keys]`` made once per step (not per layer)
from the position: ``slot_biases`` for the local buffer and the window (tail and current) that
long-range heads see, ``history_bias`` for the history slots. The segment end (moving current to
tail, sinks and history) is not in this program: it happens once every S tokens and is done by
the decoder between two replays (``StaticDecoder``), with plain copies at Python offsets, instead
of rewriting every buffer in every step as the exported program's ``where`` does.

Matches and refuses what ``fixed_size_step`` does.
"""

from __future__ import annotations

import functools

import torch
from torch import fx

from ... import ir
from ...config import SegmentConfig
from ...kernels.history_format import HISTORY_SCALE_BLOCK, HistoryGeometry, dequantize_history
from .fixed_size_step import fixed_size_step, getitem
from .fused_projections import fuse_projections
from .wide_reductions import wide_reductions

_NEG = float("-inf")


def static_step(step_graph: fx.GraphModule, cfg: SegmentConfig, kernel: bool = False) -> fx.GraphModule:
    """A copy of ``step_graph`` over fixed-size buffers in the heads-first layout (module
    docstring) that writes them in place; its outputs are the model's output leaves. ``kernel``:
    attention by the Triton kernel that reads the position from the device
    (``static_attention_triton``; CUDA, or the CPU under ``TRITON_INTERPRET=1``), else by PyTorch
    products over masks (``static_attention``)."""
    lowering = _KernelLowering() if kernel else _InPlaceLowering()
    gm = fixed_size_step(step_graph, cfg, lowering, logits="all", class_name="StaticDecodeStep")
    return fuse_projections(wide_reductions(gm))


def head_order(site: ir.AttentionSite) -> tuple[int, ...]:
    """The KV heads of ``site`` in the order the static buffers hold them: local heads
    ascending, then the long-range heads in plan order (the history's order)."""
    long_range = tuple(site.long_range)
    return tuple(h for h in range(site.num_kv_heads) if h not in set(long_range)) + long_range


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of scores and softmax for K/V of ``dtype``: fp32, or fp64 for fp64."""
    return torch.promote_types(dtype, torch.float32)


def _history_scales(graph: fx.Graph, site: ir.AttentionSite, cfg: SegmentConfig,
                    buffers: dict[str, fx.Node]) -> tuple[fx.Node | None, fx.Node | None]:
    """The placeholders of a quantised history's scales, ``layer{l}_hist_k/v_scales [n_lr, B,
    blocks]`` fp32, right after the layer's ``hist_v`` (None, None for an unquantised history or a
    layer without long-range heads). Plain inputs, not a ``QuantizedHistory``, so that Dynamo
    traces the step (``compile=True``)."""
    if cfg.history_dtype is None or not site.long_range:
        return None, None
    nodes, after = [], buffers["hist_v"]
    for kv in ("k", "v"):
        with graph.inserting_after(after):
            after = graph.placeholder(f"layer{site.layer}_hist_{kv}_scales")
        nodes.append(after)
    return nodes[0], nodes[1]


def _scale_kwargs(cfg: SegmentConfig) -> dict:
    """Where a quantised history's scale blocks lie (``history_format.HistoryGeometry``), as ints."""
    return {"history_segment_len": cfg.segment_len, "history_tail_len": cfg.tail_len,
            "scale_block": HISTORY_SCALE_BLOCK}


def _input_ids(graph: fx.Graph) -> fx.Node:
    return next(iter(graph.find_nodes(op="placeholder", target="input_ids")))


def _common_kwargs(site: ir.AttentionSite, cfg: SegmentConfig, node: fx.Node) -> dict:
    return {"order": head_order(site), "n_local": site.num_kv_heads - len(site.long_range),
            "sinks": cfg.sink_tokens, "scale": node.kwargs["scale"]}


class _InPlaceLowering:
    """``fixed_size_step``'s lowering for the static step: one ``static_attention`` per layer and
    the masks each needs, made once per group size and shared by every layer."""

    def __init__(self):
        self.masks: dict[int, fx.Node] = {}  # group size -> slot_biases node
        self.history: dict[int, fx.Node] = {}  # group size -> history_bias node

    def __call__(self, graph, node, site, cfg, k, v, buffers, offset):
        q = node.args[0]
        group = site.num_heads // site.num_kv_heads
        sizes = {"segment_len": cfg.segment_len, "tail_len": cfg.tail_len, "group": group,
                 "dtype": compute_dtype(site.dtype)}
        ids = _input_ids(graph)
        with graph.inserting_before(node):
            if group not in self.masks:
                made = graph.call_function(slot_biases, (offset, ids), {**sizes, "sinks": cfg.sink_tokens})
                self.masks[group] = made
            biases = self.masks[group]
            history = None
            if site.long_range:
                if group not in self.history:
                    self.history[group] = graph.call_function(history_bias, (offset, ids, buffers["hist_k"]), sizes)
                history = self.history[group]
            slots, local, window = (graph.call_function(getitem, (biases, i)) for i in range(3))
            k_scales, v_scales = _history_scales(graph, site, cfg, buffers)
            args = (q, k, v, buffers["local_k"], buffers["local_v"], buffers.get("hist_k"), buffers.get("hist_v"),
                    slots, local, window, history, k_scales, v_scales)
            out = graph.call_function(static_attention, args, {**_common_kwargs(site, cfg, node), **_scale_kwargs(cfg)})
        return out, []


class _KernelLowering:
    """``fixed_size_step``'s lowering for the static step on the Triton kernel: one
    ``static_attention_triton`` per layer; the slots this step writes, computed once per step."""

    def __init__(self):
        self.slots: fx.Node | None = None

    def __call__(self, graph, node, site, cfg, k, v, buffers, offset):
        with graph.inserting_before(node):
            if self.slots is None:
                self.slots = graph.call_function(write_slots, (offset, _input_ids(graph)),
                                                 {"segment_len": cfg.segment_len, "tail_len": cfg.tail_len,
                                                  "sinks": cfg.sink_tokens})
            k_scales, v_scales = _history_scales(graph, site, cfg, buffers)
            args = (node.args[0], k, v, buffers["local_k"], buffers["local_v"], buffers.get("hist_k"),
                    buffers.get("hist_v"), k_scales, v_scales, self.slots, offset)
            kwargs = {**_common_kwargs(site, cfg, node), "segment_len": cfg.segment_len, "tail_len": cfg.tail_len}
            out = graph.call_function(static_attention_triton, args, kwargs)
        return out, []


# ---- masks, from the position alone ---------------------------------------------------------------
def _query_positions(position_offset: torch.Tensor, input_ids: torch.Tensor, group: int) -> torch.Tensor:
    """The position of each query row ``[group * L]``: rows are (query head of the group, token)."""
    L = input_ids.shape[1]
    rows = torch.arange(group * L, dtype=torch.long, device=position_offset.device)
    return position_offset + torch.remainder(rows, L)


def _bias(key_pos: torch.Tensor, q_pos: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[rows, keys]``: 0 where key ``k`` is visible to row ``r`` (0 <= key_pos[k] <= q_pos[r]), else -inf."""
    visible = (key_pos >= 0).unsqueeze(0) & (key_pos.unsqueeze(0) <= q_pos.unsqueeze(1))
    return torch.zeros(visible.shape, dtype=dtype, device=key_pos.device).masked_fill_(~visible, _NEG)


def slot_biases(position_offset, input_ids, *, segment_len, tail_len, sinks, group, dtype):
    """The local-buffer slots this step's K/V go to ``[L]``, and the masks of the local buffer
    ``[group*L, G+T+S]`` (sinks, tail, current: what local heads see) and of its window
    ``[group*L, T+S]`` (tail, current: what long-range heads see beside the history).

    Sink slot m holds position m, valid once it has left the tail (m < a - T); tail slot m holds
    position a - T + m (valid if >= 0); current slot m position a + m, visible to a query at p if
    a + m <= p; ``a`` is the start of the segment holding ``position_offset``."""
    S, T, G = segment_len, tail_len, sinks
    device = position_offset.device
    a = position_offset - torch.remainder(position_offset, S)
    start = a - T
    q_pos = _query_positions(position_offset, input_ids, group)
    window = torch.cat([torch.arange(T, device=device) + start, torch.arange(S, device=device) + a])
    g = torch.arange(G, device=device)
    local = torch.cat([torch.where(g < start, g, -1), window])
    slots = write_slots(position_offset, input_ids, segment_len=S, tail_len=T, sinks=G)
    return slots, _bias(local, q_pos, dtype), _bias(window, q_pos, dtype)


def write_slots(position_offset, input_ids, *, segment_len, tail_len, sinks):
    """The local-buffer slots ``[L]`` this step's K/V go to: current slot m (after the sinks and
    the tail) holds position a + m, ``a`` the start of the segment holding ``position_offset``."""
    first = torch.remainder(position_offset, segment_len) + (sinks + tail_len)
    return first + torch.arange(input_ids.shape[1], device=position_offset.device)


def history_bias(position_offset, input_ids, hist_k, *, segment_len, tail_len, group, dtype):
    """The mask of the history slots ``[group*L, slots]``: slot j holds position j, valid if j < a - T."""
    S, T = segment_len, tail_len
    start = position_offset - torch.remainder(position_offset, S) - T
    j = torch.arange(hist_k.shape[2], device=position_offset.device)
    return _bias(torch.where(j < start, j, -1), _query_positions(position_offset, input_ids, group), dtype)


# ---- attention over the buffers ---------------------------------------------------------------------
def heads_first(x: torch.Tensor, order: tuple[int, ...]) -> torch.Tensor:
    """``x [B, Hkv, ...]`` as ``[Hkv, B, ...]`` with its heads in ``order`` (a view when the order
    is the model's)."""
    x = x.transpose(0, 1)
    if list(order) == list(range(len(order))):
        return x
    return torch.cat([x[h : h + 1] for h in order])


def model_order(x: torch.Tensor, order: tuple[int, ...]) -> torch.Tensor:
    """Undo ``heads_first``'s reordering of dim 0 (the heads stay first)."""
    return in_model_order([x], order)


def in_model_order(parts: list[torch.Tensor], order: tuple[int, ...], per_head: int = 1) -> torch.Tensor:
    """``parts`` joined along dim 0 (``per_head`` rows a head, heads in ``order``), with the heads
    put back in the model's order: one concatenation."""
    if list(order) == list(range(len(order))):
        return parts[0] if len(parts) == 1 else torch.cat(parts)
    rows = {}
    for part in parts:
        for i in range(part.shape[0] // per_head):
            rows[order[len(rows)]] = part[i * per_head : (i + 1) * per_head]
    return torch.cat([rows[h] for h in range(len(order))])


def _in_place_products(a: torch.Tensor, b: torch.Tensor) -> bool:
    # CUDA's cuBLAS takes 16-bit operands with an fp32 result (bmm's out_dtype): K and V are read
    # where they lie, not converted to a wider copy first
    return a.is_cuda and a.dtype == b.dtype and a.dtype in (torch.float16, torch.bfloat16)


def _scores(bias: torch.Tensor, q: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """``bias + scale * q @ keys^T`` in ``bias``' dtype: q ``[n, R, D]``, keys ``[n, K, D]``, bias
    ``[R, K]``. (Not one ``baddbmm``: its ``out_dtype`` form takes no broadcast bias.)"""
    if _in_place_products(q, keys):
        products = torch.bmm(q, keys.transpose(1, 2), out_dtype=bias.dtype)
    else:
        products = torch.bmm(q.to(bias.dtype), keys.to(bias.dtype).transpose(1, 2))
    return torch.add(bias, products, alpha=scale)


def _weighted(p: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``p @ values`` in ``p``'s dtype: p ``[n, R, K]`` probabilities, values ``[n, K, Dv]``."""
    if values.is_cuda and values.dtype in (torch.float16, torch.bfloat16):
        return torch.bmm(p.to(values.dtype), values, out_dtype=p.dtype)
    return torch.bmm(p, values.to(p.dtype))


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``[h, B, ...]`` -> ``[h * B, ...]`` (a view for the buffers' slices: heads are outermost)."""
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def static_attention(q, k, v, local_k, local_v, hist_k, hist_v, slots, local_bias, window_bias, hist_bias,
                     hist_k_scales=None, hist_v_scales=None, *, order, n_local, sinks, scale,
                     history_segment_len=0, history_tail_len=0, scale_block=HISTORY_SCALE_BLOCK):
    """One layer's attention for ``L`` tokens inside one segment, writing their K/V into the buffers.

    q ``[B, H, L, D]``; k, v ``[B, Hkv, L, D]`` this step's keys and values (model head order);
    ``local_k/v [Hkv, B, G+T+S, D]`` and ``hist_k/v [n_lr, B, slots, D]`` (``None`` without
    long-range heads) in the heads-first layout, heads in ``order`` (``head_order``); a quantised
    history: fp8 ``hist_k/v`` and their ``hist_k/v_scales [n_lr, B, blocks]`` (the blocks of
    ``HistoryGeometry(history_segment_len, history_tail_len, scale_block)``);
    ``slots`` (where this step's K/V go) and the biases from ``slot_biases`` and ``history_bias``.
    Returns ``[B, H, L, Dv]`` in q's dtype.
    """
    B, H, L, D = q.shape
    hkv = k.shape[1]
    group = H // hkv
    G = sinks
    local_k.index_copy_(2, slots, heads_first(k, order).to(local_k.dtype))
    local_v.index_copy_(2, slots, heads_first(v, order).to(local_v.dtype))

    queries = _rows(heads_first(q.reshape(B, hkv, group * L, D), order))  # [Hkv * B, group * L, D]
    split = n_local * B
    outs = []
    if n_local:
        p = torch.softmax(_scores(local_bias, queries[:split], _rows(local_k[:n_local]), scale), dim=-1)
        outs.append(_weighted(p, _rows(local_v[:n_local])))
    if n_local < hkv:
        q_lr = queries[split:]
        if hist_k_scales is not None:  # read as the eager reference reads it: values times scales, in fp32
            geometry = HistoryGeometry(history_segment_len, history_tail_len, scale_block)
            hist_k = dequantize_history(hist_k, hist_k_scales, geometry, hist_bias.dtype)
            hist_v = dequantize_history(hist_v, hist_v_scales, geometry, hist_bias.dtype)
        window_k, window_v = _rows(local_k[n_local:, :, G:]), _rows(local_v[n_local:, :, G:])
        history = hist_k.shape[2]
        scores = torch.cat([_scores(hist_bias, q_lr, _rows(hist_k), scale),
                            _scores(window_bias, q_lr, window_k, scale)], dim=-1)
        p = torch.softmax(scores, dim=-1)
        outs.append(_weighted(p[..., :history], _rows(hist_v)) + _weighted(p[..., history:], window_v))
    out = in_model_order(outs, order, per_head=B).to(q.dtype)  # [Hkv * B, group * L, Dv]
    return out.reshape(hkv, B, group, L, -1).transpose(0, 1).reshape(B, H, L, -1)


def static_attention_triton(q, k, v, local_k, local_v, hist_k, hist_v, hist_k_scales, hist_v_scales, slots,
                            position_offset, *, order, n_local, sinks, scale, segment_len, tail_len):
    """``static_attention`` by the Triton kernel that reads every length from ``position_offset``
    on the device (``kernels/triton_decode.py``, ``static_decode_forward``): no masks, and the
    keys past the position are not read. Same arguments and result as ``static_attention``
    but the biases (a quantised history's scale blocks follow ``segment_len`` and ``tail_len``).
    One custom op (``segcompile::static_decode_attention``), so that ``torch.compile`` keeps it
    whole and fuses what lies between the layers' attentions."""
    return static_decode_attention(q, k, v, local_k, local_v, hist_k, hist_v, hist_k_scales, hist_v_scales, slots,
                                   position_offset, list(order), n_local, sinks, scale, segment_len, tail_len)


@torch.library.custom_op("segcompile::static_decode_attention", mutates_args=("local_k", "local_v"))
def static_decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, local_k: torch.Tensor, local_v: torch.Tensor,
    hist_k: torch.Tensor | None, hist_v: torch.Tensor | None, hist_k_scales: torch.Tensor | None,
    hist_v_scales: torch.Tensor | None, slots: torch.Tensor, position_offset: torch.Tensor,
    order: list[int], n_local: int, sinks: int, scale: float, segment_len: int, tail_len: int,
) -> torch.Tensor:
    """``static_attention_triton``'s work: this step's K/V into their slots, then the kernel."""
    from ...kernels.triton_decode import static_decode_forward  # needs triton (and TRITON_INTERPRET set first)

    local_k.index_copy_(2, slots, heads_first(k, order).to(local_k.dtype))
    local_v.index_copy_(2, slots, heads_first(v, order).to(local_v.dtype))
    rows = buffer_rows(tuple(order), q.device)
    return static_decode_forward(q, local_k, local_v, hist_k, hist_v, position_offset, rows, n_local=n_local,
                                 segment_len=segment_len, tail_len=tail_len, sinks=sinks, scale=scale,
                                 hist_scales=None if hist_k_scales is None else (hist_k_scales, hist_v_scales))


@static_decode_attention.register_fake
def _(q, k, v, local_k, local_v, hist_k, hist_v, hist_k_scales, hist_v_scales, slots, position_offset, order,
      n_local, sinks, scale, segment_len, tail_len):
    return q.new_empty((*q.shape[:-1], local_v.shape[-1]))


@functools.cache
def buffer_rows(order: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """int32 ``[Hkv]``: model KV head c's row in the heads-first buffers (the inverse of ``order``).
    Cached: made once per device, before a capture (its first use is a warm-up run)."""
    rows = torch.empty(len(order), dtype=torch.int32)
    for row, head in enumerate(order):
        rows[head] = row
    return rows.to(device)
