"""One ``segment_attention`` call as the kernels take it: ``prepare`` checks the shapes, brings
the inputs to what a launch can read, and derives the lengths, padded head dims, tile table and
product dtype every launcher needs (``Problem``).

Shapes are the reference's (``kernels/reference.py``): ``q [B, H, Lq, D_K]``, current
``k, v [B, Hk, Lk, D]``, ``tail_k/v [B, Hk, T, D]``, ``sink_k/v [B, Hk, G, D]`` and
``hist_k/v [B, len(long_range), P, D]``; query head ``h`` on KV head ``h // group``. A quantised
history (``history_format.QuantizedHistory``) is taken apart into its fp8 values (``hist_k/v``)
and their scales, which the forward kernels apply in registers.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import triton.language as tl

from . import triton_common
from .history_format import HISTORY_SCALE_BLOCK, QuantizedHistory

TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


@dataclass(frozen=True, eq=False)
class Problem:
    """A prepared ``segment_attention`` call. The tensors are the inputs as the kernels read them
    (unit stride on the last axis, empty ranges replaced by a one-element stand-in, the sinks in
    the history's dtype, current and tail K/V each in the wider of their two dtypes); the lengths
    are those of the caller's tensors (``T``, ``G``, ``P`` may be 0 where the tensor is a stand-in).
    A quantised history: ``hist_k/v`` its fp8 values, ``hist_scales_k/v`` their scales
    (``[B, len(long_range), blocks]`` fp32), ``scale_geometry`` (S, T, block) where the blocks lie;
    the sinks then keep their own dtype."""

    q: torch.Tensor = field(repr=False)
    k: torch.Tensor = field(repr=False)
    v: torch.Tensor = field(repr=False)
    tail_k: torch.Tensor = field(repr=False)
    tail_v: torch.Tensor = field(repr=False)
    sink_k: torch.Tensor = field(repr=False)
    sink_v: torch.Tensor = field(repr=False)
    hist_k: torch.Tensor = field(repr=False)
    hist_v: torch.Tensor = field(repr=False)
    slots: torch.Tensor = field(repr=False)  # int32 [Hk]: KV head c's row in hist_k/v, -1 for a local head
    B: int
    H: int
    Hk: int
    group: int  # query heads a KV head
    Lq: int
    Lk: int
    T: int
    G: int
    P: int
    D_K: int
    D_V: int
    block_dk: int  # D_K, D_V padded (``triton_common.block_d``)
    block_dv: int
    tile_table: str  # ``triton_common.TILE_TABLES``: "16-bit", "wide" or "fp32"
    dot: tl.dtype  # the matrix products' input dtype (``compute_dtype``); accumulation is fp32
    precision: str  # ``tl.dot``'s input_precision: "ieee" for fp32 products
    hist_scales_k: torch.Tensor | None = field(default=None, repr=False)  # None: the history is not quantised
    hist_scales_v: torch.Tensor | None = field(default=None, repr=False)
    scale_geometry: tuple[int, int, int] = (1, 0, HISTORY_SCALE_BLOCK)  # (S, T, block) of the scale blocks

    @property
    def hist_scaled(self) -> bool:
        """Whether the history is quantised (fp8 values and per-block scales)."""
        return self.hist_scales_k is not None

    def history_scale_args(self) -> tuple:
        """The scale arguments of the forward kernels: both scale tensors (stand-ins when the history
        is not quantised), their batch and head strides, and S and T of the block layout."""
        S, T, _ = self.scale_geometry
        if not self.hist_scaled:  # never read
            return (self.slots, self.slots, 0, 0, 0, 0, S, T)
        ks, vs = self.hist_scales_k, self.hist_scales_v
        return (ks, vs, ks.stride(0), ks.stride(1), vs.stride(0), vs.stride(1), S, T)

    def history_scale_options(self) -> dict:
        """The scale constexprs of the forward kernels."""
        return dict(HIST_SCALED=self.hist_scaled, SCALE_BLOCK=self.scale_geometry[2])

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The nine inputs in ``segment_attention``'s order."""
        return (self.q, self.k, self.v, self.tail_k, self.tail_v, self.sink_k, self.sink_v, self.hist_k, self.hist_v)

    def tile(self, kind: str) -> dict:
        """Launch options of kernel ``kind`` ("fwd", "decode", "dq", "dkdv"; ``triton_common.tile``)."""
        return triton_common.tile(kind, self.D_K, self.Lq, self.tile_table)

    def dot_options(self) -> dict:
        """The constexprs every Triton kernel takes for its products."""
        return dict(DOT=self.dot, PRECISION=self.precision)


def prepare(q, k, v, tail_k, tail_v, sink_k, sink_v, hist_k, hist_v, long_range) -> Problem:
    """The ``Problem`` of one ``segment_attention`` call (its arguments but ``scale``)."""
    B, H, lq, dk = q.shape
    hk, lk, dv = k.shape[1], k.shape[2], v.shape[-1]
    if H % hk:
        raise ValueError(f"segment_attention: {H} query heads are not a multiple of {hk} KV heads")
    if lk < lq:
        raise ValueError(f"segment_attention: {lk} current keys for {lq} queries; the queries are the last of the keys")
    dot = compute_dtype(q)
    lengths = dict(T=tail_k.shape[2], G=sink_k.shape[2], P=hist_k.shape[2])
    quantized = _quantized_parts(hist_k, hist_v)
    if quantized:  # the kernels read history and sinks in two branches, each of its own dtype
        hist_k, hist_v = hist_k.values(), hist_v.values()
    elif sink_k.dtype != hist_k.dtype:  # one kernel branch reads either: one pointer type (sinks are few)
        sink_k, sink_v = sink_k.to(hist_k.dtype), sink_v.to(hist_v.dtype)
    # likewise tail and current keys in dK/dV (under autocast Llama's V leaves its projection in
    # bf16 while the carried tail keeps the run's dtype): both in the wider dtype
    k, tail_k = _same_dtype(k, tail_k)
    v, tail_v = _same_dtype(v, tail_v)
    tensors = [usable(t) for t in (q, k, v, tail_k, tail_v, sink_k, sink_v, hist_k, hist_v)]
    return Problem(
        *tensors, slots=slot_table(tuple(long_range), hk, q.device),
        B=B, H=H, Hk=hk, group=H // hk, Lq=lq, Lk=lk, **lengths, D_K=dk, D_V=dv,
        block_dk=triton_common.block_d(dk), block_dv=triton_common.block_d(dv), tile_table=_tile_table(dot, tensors),
        dot=TL_DTYPES[dot], precision="ieee" if dot == torch.float32 else "tf32", **quantized,
    )


def _quantized_parts(hist_k, hist_v) -> dict:
    """The ``Problem`` fields of a quantised history (empty for a plain one)."""
    if not isinstance(hist_k, QuantizedHistory):
        return {}
    g = hist_k.geometry
    return dict(hist_scales_k=usable_scales(hist_k.scales), hist_scales_v=usable_scales(hist_v.scales),
                scale_geometry=(g.segment_len, g.tail_len, g.block))


def usable_scales(scales: torch.Tensor) -> torch.Tensor:
    """Unit stride along the blocks; a one-element stand-in when there are none."""
    if scales.numel() == 0:
        return scales.new_ones(1, 1, 1)
    return scales if scales.stride(-1) == 1 else scales.contiguous()


def compute_dtype(q: torch.Tensor) -> torch.dtype:
    """The dtype of the matrix products: q's if half precision, else the CUDA autocast dtype if
    autocast is on, else fp32."""
    if q.dtype in (torch.float16, torch.bfloat16):
        return q.dtype
    if q.device.type == "cuda" and torch.is_autocast_enabled("cuda"):
        return torch.get_autocast_dtype("cuda")
    return torch.float32


def usable(t: torch.Tensor) -> torch.Tensor:
    """Unit stride on the last axis; an empty range gets a one-element stand-in so that no null
    pointer reaches the launcher (the kernels never read it)."""
    if t.numel() == 0:
        return t.new_zeros(1, 1, 1, max(t.shape[-1], 1))
    return t if t.stride(-1) == 1 else t.contiguous()


@functools.cache
def slot_table(long_range: tuple[int, ...], num_kv_heads: int, device: torch.device) -> torch.Tensor:
    """``slot[c]``: the row of KV head ``c`` in the history tensors, -1 for a local head. Made once
    a device: ``SegmentedModel`` makes its sites' tables before a compiled step first runs, since a
    table first made inside a CUDA graph's warm-up run would live on in that graph's memory pool,
    which Inductor's CUDA-graph trees refuse."""
    slot = torch.full((num_kv_heads,), -1, dtype=torch.int32)
    for i, c in enumerate(long_range):
        slot[c] = i
    return slot.to(device)


def _tile_table(dot: torch.dtype, tensors) -> str:
    """fp32 products; else 16-bit products with some 4-byte input (twice the shared memory a
    pipeline stage); else all 16-bit."""
    if dot == torch.float32:
        return "fp32"
    return "wide" if any(t.element_size() > 2 for t in tensors) else "16-bit"


def _same_dtype(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    wide = torch.promote_types(a.dtype, b.dtype)
    return a.to(wide), b.to(wide)
