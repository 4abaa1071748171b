"""PyTorch reference implementation of ``segment_attention`` (the CPU lowering).

Shapes: ``q [B, H, Lq, D]``; current-segment ``k, v [B, Hk, Lk, D]`` with ``Lk >= Lq`` (the
queries are the last ``Lq`` tokens of the current segment, so query ``t`` sees current keys
``0 .. Lk - Lq + t``); ``tail_k/v [B, Hk, T', D]``; ``sink_k/v [B, Hk, G', D]`` (used by local
heads); ``hist_k/v [B, len(long_range), P, D]`` (everything before the tail, sinks included, for
the long-range KV heads in ``long_range`` order). Query head ``h`` belongs to KV head
``h // (H // Hk)``. Computed in fp32 (or fp64), returned in ``q.dtype``. A quantised history
(``history_format.QuantizedHistory``) is read dequantised, ``values.float() * scale``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from .history_format import dequantized


def segment_attention_reference(q, k, v, tail_k, tail_v, sink_k, sink_v, hist_k, hist_v, long_range, scale):
    # The reference computes in fp32 whatever the caller's autocast says (SDPA is on CUDA
    # autocast's bf16 list); the result is returned in q's dtype.
    with torch.autocast(q.device.type, enabled=False):
        compute = torch.promote_types(q.dtype, torch.float32)
        hist_k, hist_v = dequantized(hist_k, compute), dequantized(hist_v, compute)
        return _reference(q, k, v, tail_k, tail_v, sink_k, sink_v, hist_k, hist_v, long_range, scale)


def _reference(q, k, v, tail_k, tail_v, sink_k, sink_v, hist_k, hist_v, long_range, scale):
    B, H, lq, _ = q.shape
    hk = k.shape[1]
    group = H // hk
    compute = torch.promote_types(q.dtype, torch.float32)
    out = q.new_empty(B, H, lq, v.shape[-1], dtype=compute)
    long_set = set(long_range)
    local = [h for h in range(hk) if h not in long_set]
    for kv_heads, before_k, before_v in (
        (local, sink_k, sink_v),
        (list(long_range), hist_k, hist_v),
    ):
        if not kv_heads:
            continue
        idx = torch.tensor(kv_heads, device=q.device)
        if before_k is sink_k:
            before_k, before_v = sink_k.index_select(1, idx), sink_v.index_select(1, idx)
        keys = torch.cat([before_k, tail_k.index_select(1, idx), k.index_select(1, idx)], dim=2)
        values = torch.cat([before_v, tail_v.index_select(1, idx), v.index_select(1, idx)], dim=2)
        heads = torch.tensor([c * group + g for c in kv_heads for g in range(group)], device=q.device)
        # Everything before the current segment is visible and the current segment is causal with
        # the queries as its last lq tokens: exactly the lower-right-aligned causal mask over
        # [before | tail | current], which SDPA applies without materialising it.
        o = F.scaled_dot_product_attention(
            q.index_select(1, heads).to(compute),
            keys.to(compute),
            values.to(compute),
            attn_mask=_lower_right_causal(lq, keys.shape[2], q.device),
            scale=scale,
            enable_gqa=group > 1,
        )
        out = out.index_copy(1, heads, o)
    return out.to(q.dtype)


def _lower_right_causal(lq: int, n: int, device: torch.device):
    """``causal_lower_right`` (no mask tensor) in eager mode; an explicit ``[lq, n]`` bool mask while
    torch.compile traces (the recomputing backward of a compiled step graph), where the bias
    subclass cannot be created under functionalization."""
    if not torch.compiler.is_compiling():
        return causal_lower_right(lq, n)
    rows = torch.arange(lq, device=device).unsqueeze(1)
    return torch.arange(n, device=device).unsqueeze(0) <= rows + (n - lq)
