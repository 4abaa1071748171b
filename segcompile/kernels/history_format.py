"""The stored format of a quantised long-range history (``SegmentConfig.history_dtype``;
docs/design.md section 6): the one definition of its rounding, block layout and scales, which the
driver's state (when a segment ends), the PyTorch reference, the Triton kernels and the oracle
all use.

Format. A long-range layer's history ``[B, n_long_range, P, D]`` is stored as ``HISTORY_DTYPES``
values (fp8 e4m3) with one fp32 scale per (batch row, long-range KV head, block): ``scale =
amax * (1 / FP8_MAX)`` over the block's values (1 for an all-zero block; the reciprocal rounded
to fp32 once: PyTorch's CUDA kernels divide by a scalar so, its CPU kernels exactly, and the
product is what both and the Triton kernel compute alike), ``value =
round_to_nearest(x / scale)`` in fp32, saturated to the format's range; reading gives
``value.float() * scale``.

Blocks. Positions enter the history in two kinds of piece, each written once when a segment ends
and never rewritten: the first ``S - T`` positions of a segment and its last ``T`` (the tail, which
moves to the history one segment later). Each piece is cut into blocks of
``HISTORY_SCALE_BLOCK`` positions from its own start (the last block of a piece may be shorter),
so a block never spans two writes: its scale is final when it is written, views of the history
already handed out (TBPTT's saved segments, a branched state) never change, and a position's
stored value depends only on its segment's K/V, not on when it was read. With ``S - T`` and ``T``
multiples of the block (the default ``T = S`` with ``S`` a multiple of 64) block ``i`` is simply
positions ``[64 i, 64 i + 64)``.

Why 64: the key block of the decode kernels and of the 64-wide forward tiles (the 128-wide
forward tile reads two scales a tile), so a tile reads one or two scales per key range; 4 bytes
a 64-position block of ``D`` values a position is 1/16 of a byte a position, 1/1024 of a byte per
stored value at ``D = 64``, 1/2048 at ``D = 128``.

``QuantizedHistory`` carries the values, their scales and the block geometry as one tensor (the
values, fp8, ``[B, n_long_range, P, D]``) through the step graph to ``segment_attention``, whose
schema has one tensor per history; the implementations take it apart (``values``, ``scales``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

HISTORY_SCALE_BLOCK = 64
# the dtypes a history may be stored in, and the largest finite value of each (the scale's divisor)
HISTORY_DTYPES: dict[torch.dtype, float] = {torch.float8_e4m3fn: 448.0}


def supported_history_dtypes() -> str:
    """The dtypes ``SegmentConfig.history_dtype`` takes, in words."""
    return ", ".join(["None (the model's dtype)",
                      *(f"torch.{str(d).removeprefix('torch.')} (a scale per block of positions)" for d in HISTORY_DTYPES)])


@dataclass(frozen=True)
class HistoryGeometry:
    """Where the scale blocks of a history lie: segment length S, tail length T, block size."""

    segment_len: int
    tail_len: int
    block: int = HISTORY_SCALE_BLOCK

    @property
    def head_blocks(self) -> int:
        """Blocks of a segment's first ``S - T`` positions."""
        return -(-(self.segment_len - self.tail_len) // self.block)

    @property
    def blocks_per_segment(self) -> int:
        return self.head_blocks + -(-self.tail_len // self.block)

    def block_index(self, positions: torch.Tensor) -> torch.Tensor:
        """The scale block of each position (``triton_common.scale_block_index`` on the device)."""
        S, head = self.segment_len, self.segment_len - self.tail_len
        segment, offset = positions // S, positions % S
        in_head = offset < head
        inside = torch.where(in_head, offset // self.block, self.head_blocks + (offset - head) // self.block)
        return segment * self.blocks_per_segment + inside

    def num_blocks(self, length: int) -> int:
        """Scale blocks covering positions ``[0, length)`` (host arithmetic: no device sync)."""
        if length <= 0:
            return 0
        S, head = self.segment_len, self.segment_len - self.tail_len
        segment, offset = divmod(length - 1, S)
        inside = offset // self.block if offset < head else self.head_blocks + (offset - head) // self.block
        return segment * self.blocks_per_segment + inside + 1


class QuantizedHistory(torch.Tensor):
    """A quantised history: the tensor is its values (``[B, heads, P, D]``, a ``HISTORY_DTYPES``
    dtype); ``scales`` is ``[B, heads, geometry.num_blocks(P)]`` fp32. Operations on it give plain
    tensors (no scales), so a slice or copy can never pass for a quantised history."""

    __torch_function__ = torch._C._disabled_torch_function_impl
    scales: torch.Tensor
    geometry: HistoryGeometry

    @classmethod
    def of(cls, values: torch.Tensor, scales: torch.Tensor, geometry: HistoryGeometry) -> QuantizedHistory:
        if values.dtype not in HISTORY_DTYPES:
            raise TypeError(f"a quantised history holds {list(HISTORY_DTYPES)} values, not {values.dtype}")
        if scales.shape != (*values.shape[:2], geometry.num_blocks(values.shape[2])):
            raise ValueError(f"scales of shape {tuple(scales.shape)} for a history of shape {tuple(values.shape)}")
        history = torch.Tensor._make_subclass(cls, values)
        history.scales, history.geometry = scales, geometry
        return history

    def values(self) -> torch.Tensor:
        """The stored values as a plain tensor (same memory)."""
        return self.as_subclass(torch.Tensor)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_history(self.values(), self.scales, self.geometry, dtype)


def empty_history(batch: int, heads: int, head_dim: int, dtype: torch.dtype, geometry: HistoryGeometry,
                  device: torch.device) -> QuantizedHistory:
    """A quantised history of no positions."""
    values = torch.empty(batch, heads, 0, head_dim, dtype=dtype, device=device)
    return QuantizedHistory.of(values, torch.empty(batch, heads, 0, device=device), geometry)


def quantize_history(x: torch.Tensor, start: int, geometry: HistoryGeometry,
                     dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, scales)`` of ``x [B, heads, n, D]``, positions ``[start, start + n)``, which
    begin on a block boundary: ``values`` in ``dtype``, ``scales [B, heads, blocks]`` fp32 for the
    blocks from the one holding ``start``. A block past ``start + n`` that ``x`` fills only in
    part is scaled by the part it holds (the oracle quantises a whole sequence so)."""
    B, H, n, _ = x.shape
    largest = HISTORY_DTYPES[dtype]
    first = geometry.num_blocks(start)  # the index of the block that starts at ``start``
    ids = geometry.block_index(torch.arange(start, start + n, device=x.device)) - first
    blocks = geometry.num_blocks(start + n) - first
    row_max = x.detach().abs().amax(-1).float()
    amax = row_max.new_zeros(B, H, blocks).scatter_reduce(2, ids.expand(B, H, n), row_max, "amax")
    scales = torch.where(amax > 0, amax * (1 / largest), torch.ones_like(amax))
    values = (x.detach().float() / scales[:, :, ids, None]).clamp(-largest, largest).to(dtype)
    return values, scales


def dequantize_history(values: torch.Tensor, scales: torch.Tensor, geometry: HistoryGeometry,
                       dtype: torch.dtype = torch.float32, start: int = 0) -> torch.Tensor:
    """``values.float() * scale`` of every position, in ``dtype``: ``values`` hold positions
    ``[start, start + n)`` and ``scales`` the blocks from the one holding ``start``, as
    ``quantize_history`` returns them."""
    positions = torch.arange(start, start + values.shape[2], device=values.device)
    ids = geometry.block_index(positions) - geometry.num_blocks(start)
    return (values.float() * scales[:, :, ids, None]).to(dtype)


def round_trip(x: torch.Tensor, geometry: HistoryGeometry, dtype: torch.dtype) -> torch.Tensor:
    """``x [B, heads, n, D]`` (positions ``[0, n)``) as a history stored in ``dtype`` reads it back,
    in ``x``'s dtype: what the oracle attends to where a long-range head sees history."""
    values, scales = quantize_history(x, 0, geometry, dtype)
    return dequantize_history(values, scales, geometry, x.dtype)


def dequantized(hist: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``hist`` in ``dtype``: dequantised if it is a ``QuantizedHistory``, else as it is. A bare
    tensor of a ``HISTORY_DTYPES`` dtype has lost its scales: refused."""
    if isinstance(hist, QuantizedHistory):
        return hist.dequantized(dtype)
    if hist.dtype in HISTORY_DTYPES:
        raise TypeError(f"a {hist.dtype} history without its scales: pass the QuantizedHistory the state holds")
    return hist


def history_bytes(hist: torch.Tensor) -> int:
    """The bytes the positions of ``hist`` take as stored: values and scales of a
    ``QuantizedHistory``, the elements of a plain one (not the spare capacity of its buffer)."""
    if isinstance(hist, QuantizedHistory):
        return hist.values().numel() * hist.element_size() + hist.scales.numel() * hist.scales.element_size()
    return hist.numel() * hist.element_size()


def round_trip_segment_end(leaving: torch.Tensor, geometry: HistoryGeometry, dtype: torch.dtype) -> torch.Tensor:
    """What a segment end moves into the history, ``leaving [B, heads, S, D]`` (the previous
    segment's tail, T positions, then the segment's first S - T), as a history stored in ``dtype``
    reads it back, in ``leaving``'s dtype: the blocks and scales ``append_history`` gives those
    positions (``quantize_history``), for a program whose history buffer holds the model's dtype
    (the ONNX export, ``deploy/lowering.py``). The block layout repeats every segment, so the
    pieces are placed where segment 0's tail starts; the result does not depend on the position."""
    start = geometry.segment_len - geometry.tail_len
    values, scales = quantize_history(leaving, start, geometry, dtype)
    return dequantize_history(values, scales, geometry, leaving.dtype, start)
