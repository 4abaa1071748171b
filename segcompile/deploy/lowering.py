"""Export lowering of ``segment_attention``: one decode/prefill step over fixed-size state buffers.

The reference takes variable-length sinks, tail and current K/V; an exported program cannot
(their lengths depend on the position, which is a runtime value). Here the carried K/V of one
layer live in buffers whose sizes never change:

    local_k/v [B, Hkv, G + T + S, D]   slots [0, G) sinks, [G, G+T) tail, [G+T, G+T+S) current
    hist_k/v  [B, n_lr, C, D]          slot j holds absolute position j (long-range KV heads only;
                                       C is a capacity the runtime grows, valid slots j < a - T)

and which slots are valid follows from ``position_offset`` alone (``a`` = start of the segment
holding it): sink slot m holds position m (valid if m < a - T), tail slot m position a - T + m
(valid if >= 0), current slot m position a + m (visible to a query at p if a + m <= p). The mask
of one layer is therefore ``[L, G+T+S]`` for local heads and ``[L, C+T+S]`` for long-range heads
(never N x N). Invalid slots hold zeros or stale finite values and are masked with -inf before
the softmax; every query sees at least itself, so no row is fully masked.

``step_attention`` also moves the state like ``SegmentedModel.end_segment`` when the step
finishes its segment (tail = last T of the segment, sinks = first G positions, what leaves the
window is appended to the long-range history), selected with ``where`` so that the graph has no
control flow.

A quantised history (``history_dtype``, ``SegmentConfig.history_dtype``) stays in the model's
dtype in the buffers, but what enters it is rounded as the runtime stores it: quantised to
``history_dtype`` with the runtime's per-block scales and read back
(``history_format.round_trip_segment_end``: an amax per block, a divide, a Cast to float8 and
back, a multiply), so the buffers hold exactly the values ``SegmentedModel`` attends to. Only
such a program has the ops this adds (ONNX ReduceMax, ScatterElements with a max reduction, Clip
on floats, Cast to FLOAT8E4M3FN); none of them has been through TensorRT's parser.

Made of matmul, softmax, where, gather (index_select), concat and integer arithmetic only:
ONNX MatMul/Softmax/Where/Gather/Concat, which onnxruntime runs and TensorRT's ONNX operator list
has carried since long before 10.0 (the file has not been through TensorRT's parser yet: no
TensorRT here; T = 0 gives zero-size slices, a case to check there). The opset-23 ``Attention``
operator would be one node per head group, but TensorRT's parser supports it only from 10.14
(its release notes) and it adds nothing we need (GQA is a broadcast here, the mask a [L, K]
bool); the decomposition runs everywhere at opset 20.

The integer index math avoids three lowerings that the onnx-tensorrt operator table
(``tests/data/onnx_tensorrt_operators.tsv``, checked by ``tests/test_export_tensorrt.py``) lists for
float types only: ``arange`` is ``torch.arange`` (ONNX Range) rather than a cumsum of ones (CumSum:
FP32/FP16/BF16), clamping is ``where`` (Clip: FP32/FP16/BF16), and the segment start is
``pos - pos % S`` (Mod, int64) rather than a floor division, which ONNX lowers through float32
(exact only below 2**24 positions).
"""

from __future__ import annotations

import torch

from ..kernels.history_format import HistoryGeometry, round_trip_segment_end

_NEG = float("-inf")


def _positions(like: torch.Tensor, n) -> torch.Tensor:
    """``arange(n)`` as int64 on ``like``'s device; ``n`` may be symbolic (a dynamic axis: ONNX Range)."""
    return torch.arange(n, dtype=torch.long, device=like.device)


def _arange(n: int, device) -> torch.Tensor:
    return torch.arange(n, dtype=torch.long, device=device)


def _clamp(x: torch.Tensor, low: int, high: int | None = None) -> torch.Tensor:
    """``x.clamp(low, high)`` for int64 index math, as ``where`` (ONNX Clip is float-only in TensorRT's parser)."""
    x = torch.where(x < low, low, x)
    return x if high is None else torch.where(x > high, high, x)


def _attend(q, keys, values, key_pos, q_pos, scale):
    """q [B, h, g, L, D] over keys/values [B, h, K, D]; key k visible to query i iff 0 <= key_pos[k] <= q_pos[i]."""
    compute = torch.promote_types(q.dtype, torch.float32)
    scores = torch.matmul(q.to(compute), keys.to(compute).unsqueeze(2).transpose(-1, -2)) * scale  # [B,h,g,L,K]
    visible = (key_pos >= 0).unsqueeze(0) & (key_pos.unsqueeze(0) <= q_pos.unsqueeze(1))  # [L, K]
    scores = scores.masked_fill(~visible, _NEG)
    return torch.matmul(torch.softmax(scores, dim=-1), values.to(compute).unsqueeze(2))  # [B,h,g,L,Dv]


def step_attention(q, k, v, local_k, local_v, hist_k, hist_v, position_offset, *, segment_len, tail_len, sinks,
                   long_range, scale, history_dtype=None):
    """Attention of one step (``L`` tokens inside one segment) and the updated state buffers.

    q ``[B, H, L, D]``; k, v ``[B, Hkv, L, D]`` (this step's keys and values); local/hist as in the
    module docstring (``hist_k/v`` None when the layer has no long-range head); ``position_offset``
    a 0-d int64 tensor; ``history_dtype``: the dtype the runtime stores the history in (None: the
    buffers' own), whose rounding the positions entering the history get (module docstring).
    Returns ``(out [B, H, L, Dv], local_k, local_v, hist_k, hist_v)``.
    """
    S, T, G = segment_len, tail_len, sinks
    B, H, L, D = q.shape
    hkv = k.shape[1]
    group = H // hkv
    dev = q.device
    pos = position_offset
    c = torch.remainder(pos, S)  # tokens of this segment already in the current slots (pos >= 0)
    a = pos - c
    start = a - T  # first position of the tail; positions < start are history (and sinks)

    # 1. write this step's K/V into current slots [c, c + L)
    m = _arange(S, dev)
    step_pos = _positions(k, L)
    take = (m >= c) & (m < c + L)
    src = _clamp(m - c, 0)
    src = torch.minimum(src, step_pos[-1])  # L - 1
    cur = slice(G + T, G + T + S)
    written_k = torch.where(take[:, None], k.index_select(2, src), local_k[:, :, cur])
    written_v = torch.where(take[:, None], v.index_select(2, src), local_v[:, :, cur])
    local_k = torch.cat([local_k[:, :, : G + T], written_k], dim=2)
    local_v = torch.cat([local_v[:, :, : G + T], written_v], dim=2)

    # 2. attention: local KV heads over [sinks | tail | current], long-range over [history | tail | current]
    q_pos = pos + step_pos
    g_idx, t_idx = _arange(G, dev), _arange(T, dev)
    window_pos = torch.cat([t_idx + start, m + a])  # tail and current slots
    local_pos = torch.cat([torch.where(g_idx < start, g_idx, -1), window_pos])
    lr = list(long_range)
    local = [h for h in range(hkv) if h not in set(lr)]
    qg = q.reshape(B, hkv, group, L, D)
    outs, order = [], []
    if local:
        idx = torch.tensor(local, device=dev)
        outs.append(_attend(qg.index_select(1, idx), local_k.index_select(1, idx), local_v.index_select(1, idx),
                            local_pos, q_pos, scale))
        order += local
    if lr:
        idx = torch.tensor(lr, device=dev)
        j = _positions(hist_k, hist_k.shape[2])
        hist_pos = torch.where(j < start, j, -1)
        keys = torch.cat([hist_k, local_k[:, :, G:].index_select(1, idx)], dim=2)
        values = torch.cat([hist_v, local_v[:, :, G:].index_select(1, idx)], dim=2)
        outs.append(_attend(qg.index_select(1, idx), keys, values, torch.cat([hist_pos, window_pos]), q_pos, scale))
        order += lr
    out = torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]
    if order != list(range(hkv)):
        out = out.index_select(1, torch.tensor([order.index(h) for h in range(hkv)], device=dev))
    out = out.reshape(B, H, L, v.shape[-1]).to(q.dtype)

    # 3. segment end (runtime.SegmentedModel.end_segment): leaving = positions [start, start + S)
    ended = (c + L) == S
    new_state = []
    for buf, hist in ((local_k, hist_k), (local_v, hist_v)):
        leaving = buf[:, :, G : G + S]  # the old tail, then the first S - T of the segment
        parts = []
        if G:
            into = (g_idx >= start) & (g_idx < start + S)
            gathered = leaving.index_select(2, _clamp(g_idx - start, 0, S - 1))
            parts.append(torch.where(into[:, None], gathered, buf[:, :, :G]))
        parts += [buf[:, :, G + S :], buf[:, :, G + T :]]  # new tail = last T; current slots are stale
        ended_buf = torch.cat(parts, dim=2)
        new_state.append(torch.where(ended, ended_buf, buf))
        if lr:
            j = _positions(hist, hist.shape[2])
            into = (j >= start) & (j < start + S)
            moved = leaving.index_select(1, torch.tensor(lr, device=dev))
            if history_dtype is not None:  # scales per long-range head: after the head selection, as stored
                moved = round_trip_segment_end(moved, HistoryGeometry(S, T), history_dtype)
            moved = moved.index_select(2, _clamp(j - start, 0, S - 1))
            new_state.append(torch.where(ended & into[:, None], moved, hist))
        else:
            new_state.append(None)
    local_k, hist_k, local_v, hist_v = new_state
    return out, local_k, local_v, hist_k, hist_v
