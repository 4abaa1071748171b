"""Dequantising a stored long-range history in one pass (``history_format.dequantize_history`` is
its reference, and ``tests/test_fp8_history.py`` compares the two).

Where a segment's forward runs the Gluon kernel on an fp8 history, each call first widens the
layer's history into a transient copy (``dispatch._dequantized_for_gluon``). The reference does it
in five PyTorch operations through fp32 temporaries, about 19 bytes of traffic per stored value;
this kernel reads the value and its block's scale and writes the result, 3 bytes at bf16. At a
128K prefill of the 8B shape that copy was the whole difference between the fp8 and the bf16
history's wall time (bench/README.md, prefill).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .history_format import QuantizedHistory
from .problem import TL_DTYPES
from .triton_common import scale_block_index

BLOCK_P = 64


@triton.jit
def _dequantize_kernel(
    V, SC, OUT, P, S, T,
    stride_vb, stride_vh, stride_vp, stride_sb, stride_sh, stride_ob, stride_oh, stride_op,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr, SCALE_BLOCK: tl.constexpr,
    OUT_DTYPE: tl.constexpr,
):
    """One program per (block of ``BLOCK_P`` positions, head, batch row)."""
    pid_p, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    pos = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    d = tl.arange(0, BLOCK_D)
    inside = pos < P
    mask = inside[:, None] & (d < D)[None, :]
    values = tl.load(V + b * stride_vb + h * stride_vh + pos[:, None] * stride_vp + d[None, :], mask=mask, other=0.0)
    block = scale_block_index(pos, S, T, SCALE_BLOCK)
    scales = tl.load(SC + b * stride_sb + h * stride_sh + block, mask=inside, other=1.0)
    out = (values.to(tl.float32) * scales[:, None]).to(OUT_DTYPE)
    tl.store(OUT + b * stride_ob + h * stride_oh + pos[:, None] * stride_op + d[None, :], out, mask=mask)


def dequantize(hist: QuantizedHistory, dtype: torch.dtype) -> torch.Tensor:
    """``hist.dequantized(dtype)`` (positions from 0) in one kernel: a contiguous
    ``[B, heads, P, D]`` tensor of ``dtype``."""
    values, scales, geometry = hist.values(), hist.scales, hist.geometry
    B, H, P, D = values.shape
    out = torch.empty(B, H, P, D, dtype=dtype, device=values.device)
    if out.numel() == 0:
        return out
    if values.stride(3) != 1:
        values = values.contiguous()
    if scales.stride(2) != 1:
        scales = scales.contiguous()
    grid = (triton.cdiv(P, BLOCK_P), H, B)
    _dequantize_kernel[grid](
        values, scales, out, P, geometry.segment_len, geometry.tail_len,
        values.stride(0), values.stride(1), values.stride(2), scales.stride(0), scales.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        D=D, BLOCK_D=triton.next_power_of_2(D), BLOCK_P=BLOCK_P, SCALE_BLOCK=geometry.block, OUT_DTYPE=TL_DTYPES[dtype],
    )
    return out
