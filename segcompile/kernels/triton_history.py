"""Quantising and dequantising a long-range history in one pass each (``history_format``'s
``quantize_history`` and ``dequantize_history`` are their references, and
``tests/test_fp8_history.py`` compares them).

Where a segment's forward runs the Gluon kernel on an fp8 history, each call first widens the
layer's history into a transient copy (``dispatch._dequantized_for_gluon``). The reference does it
in five PyTorch operations through fp32 temporaries, about 19 bytes of traffic per stored value;
this kernel reads the value and its block's scale and writes the result, 3 bytes at bf16. At a
128K prefill of the 8B shape (bench/README.md, prefill) the fp8 history's prefill took 1.12x the
bf16 one's time with the reference's copy, 1.05x with this kernel's. Quantising what a segment
end moves into the history takes the reference about ten small operations; here it is one
launch for a layer's K and V (``quantize_pair``), a program per scale block of each.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .history_format import HISTORY_DTYPES, HistoryGeometry, QuantizedHistory
from .problem import TL_DTYPES, usable, usable_scales
from .triton_common import COMPILE_OPTIONS, scale_block_index

# the widening copy's launch: positions a program, warps (bench/history_copy.py sweeps both)
COPY_TILE = dict(block_p=64, num_warps=4)


@triton.jit
def _widen_block(V, SC, OUT, b, h, pos, inside, S, T, stride_vb, stride_vh, stride_vp, stride_sb, stride_sh,
                 stride_ob, stride_oh, stride_op, D: tl.constexpr, BLOCK_D: tl.constexpr,
                 SCALE_BLOCK: tl.constexpr, OUT_DTYPE: tl.constexpr):
    """Positions ``pos`` of head ``h``, batch row ``b``: stored value times its block's scale."""
    d = tl.arange(0, BLOCK_D)
    mask = inside[:, None] & (d < D)[None, :]
    values = tl.load(V + b * stride_vb + h * stride_vh + pos[:, None] * stride_vp + d[None, :], mask=mask, other=0.0)
    block = scale_block_index(pos, S, T, SCALE_BLOCK)
    scales = tl.load(SC + b * stride_sb + h * stride_sh + block, mask=inside, other=1.0)
    out = (values.to(tl.float32) * scales[:, None]).to(OUT_DTYPE)
    tl.store(OUT + b * stride_ob + h * stride_oh + pos[:, None] * stride_op + d[None, :], out, mask=mask)


@triton.jit
def _dequantize_kernel(
    K, KS, KO, V, VS, VO, P, H, S, T,
    stride_kb, stride_kh, stride_kp, stride_ksb, stride_ksh, stride_kob, stride_koh, stride_kop,
    stride_vb, stride_vh, stride_vp, stride_vsb, stride_vsh, stride_vob, stride_voh, stride_vop,
    D_K: tl.constexpr, D_V: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_P: tl.constexpr, SCALE_BLOCK: tl.constexpr, OUT_DTYPE: tl.constexpr, PAIR: tl.constexpr,
):
    """One program per (block of ``BLOCK_P`` positions, head, batch row), widening K's block and,
    with ``PAIR``, V's. The programs run in reverse of the order in which the Gluon forward reads
    (batch row, head, then positions from the first), so that the blocks it reads first are the
    last written; end to end this measured the same as the forward order (bench/README.md,
    prefill). One launch for K and V copies 6-8% faster than two, at PyTorch's bf16 ``copy_``
    rate (``bench/history_copy.py``)."""
    blocks = tl.cdiv(P, BLOCK_P)
    r = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_p, h, b = r % blocks, (r // blocks) % H, r // (blocks * H)
    pos = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    inside = pos < P
    _widen_block(K, KS, KO, b, h, pos, inside, S, T, stride_kb, stride_kh, stride_kp, stride_ksb, stride_ksh,
                 stride_kob, stride_koh, stride_kop, D_K, BLOCK_DK, SCALE_BLOCK, OUT_DTYPE)
    if PAIR:
        _widen_block(V, VS, VO, b, h, pos, inside, S, T, stride_vb, stride_vh, stride_vp, stride_vsb, stride_vsh,
                     stride_vob, stride_voh, stride_vop, D_V, BLOCK_DV, SCALE_BLOCK, OUT_DTYPE)


def dequantize(hist: QuantizedHistory, dtype: torch.dtype) -> torch.Tensor:
    """``hist.dequantized(dtype)`` (positions from 0) in one kernel: a contiguous
    ``[B, heads, P, D]`` tensor of ``dtype``."""
    return _dequantize([hist], dtype)[0]


def dequantize_pair(hist_k: QuantizedHistory, hist_v: QuantizedHistory,
                    dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``dequantize`` of a layer's K and V histories (same batch, heads, length and geometry) in
    one launch."""
    if hist_k.shape[:3] != hist_v.shape[:3] or hist_k.geometry != hist_v.geometry:
        raise ValueError(f"dequantize_pair: K history {tuple(hist_k.shape)} and V history {tuple(hist_v.shape)} "
                         "differ in batch, heads, length or scale blocks")
    k, v = _dequantize([hist_k, hist_v], dtype)
    return k, v


def _dequantize(hists: list[QuantizedHistory], dtype: torch.dtype) -> list[torch.Tensor]:
    """One launch widening each of ``hists`` (one or two) into a fresh tensor."""
    B, H, P, _ = hists[0].shape
    outs = [torch.empty(B, H, P, h.shape[-1], dtype=dtype, device=h.device) for h in hists]
    if P == 0 or B * H == 0:
        return outs
    (k, ks), (v, vs) = [(usable(h.values()), usable_scales(h.scales)) for h in (hists[0], hists[-1])]
    ko, vo = outs[0], outs[-1]
    geometry = hists[0].geometry
    block_p = COPY_TILE["block_p"]
    _dequantize_kernel[(triton.cdiv(P, block_p) * H * B,)](
        k, ks, ko, v, vs, vo, P, H, geometry.segment_len, geometry.tail_len,
        *_strides(k, ks, ko), *_strides(v, vs, vo),
        D_K=k.shape[-1], D_V=v.shape[-1], BLOCK_DK=triton.next_power_of_2(k.shape[-1]),
        BLOCK_DV=triton.next_power_of_2(v.shape[-1]), BLOCK_P=block_p, SCALE_BLOCK=geometry.block,
        OUT_DTYPE=TL_DTYPES[dtype], PAIR=len(hists) == 2, num_warps=COPY_TILE["num_warps"], **COMPILE_OPTIONS,
    )
    return outs


def _strides(values: torch.Tensor, scales: torch.Tensor, out: torch.Tensor) -> tuple[int, ...]:
    return (values.stride(0), values.stride(1), values.stride(2), scales.stride(0), scales.stride(1),
            out.stride(0), out.stride(1), out.stride(2))


@triton.jit
def _block_range(block, S, T, BLOCK: tl.constexpr):
    """The positions ``[start, end)`` of scale block ``block``: ``scale_block_index`` inverted."""
    head = S - T
    head_blocks = (head + BLOCK - 1) // BLOCK
    per_segment = head_blocks + (T + BLOCK - 1) // BLOCK
    segment, inside = block // per_segment, block % per_segment
    in_head = inside < head_blocks
    start = segment * S + tl.where(in_head, inside * BLOCK, head + (inside - head_blocks) * BLOCK)
    end = tl.minimum(start + BLOCK, segment * S + tl.where(in_head, head, S))
    return start, end


@triton.jit
def _on_e4m3_grid(y):
    """``y`` (fp32, finite, within +-448) rounded to the nearest e4m3 value, ties to even, in fp32
    arithmetic: the cast that follows is then exact. Triton's interpreter rounds its own cast to
    fp8 wrongly (127 to 64, 100 to 104), so the tests on the CPU could not check it otherwise; on
    the GPU the hardware's cast gives the same values."""
    exponent = (y.to(tl.int32, bitcast=True) >> 23) & 0xFF
    exponent = tl.maximum(exponent, 127 - 6)  # below 2^-6 the subnormals, all 2^-9 apart
    step = ((exponent - 3) << 23).to(tl.float32, bitcast=True)  # 3 mantissa bits: 2^(e - 3) apart
    q = y / step  # a power of two: exact, and |q| < 16
    rounded = (q + 12582912.0) - 12582912.0  # 1.5 * 2^23: fp32 addition rounds q to an integer, ties to even
    return rounded * step


@triton.jit
def _quantize_block(X, HEADS, V, SC, j, h, b, first, lo, hi, S, T, largest, inv_largest,
                    stride_xb, stride_xh, stride_xp, stride_vb, stride_vh, stride_vp, stride_sb, stride_sh,
                    D: tl.constexpr, BLOCK_D: tl.constexpr, SCALE_BLOCK: tl.constexpr, OUT_DTYPE: tl.constexpr,
                    GATHER: tl.constexpr):
    """Scale block ``first + j`` of head ``h``, batch row ``b``: its amax, its scale, its values.
    With ``GATHER``, head ``h`` of the history is head ``HEADS[h]`` of ``X``."""
    x_head = tl.load(HEADS + h) if GATHER else h
    start, end = _block_range(first + j, S, T, SCALE_BLOCK)
    pos = start + tl.arange(0, SCALE_BLOCK)
    d = tl.arange(0, BLOCK_D)
    rows = (pos < end) & (pos >= lo) & (pos < hi)  # the block's positions that ``x`` holds
    mask = rows[:, None] & (d < D)[None, :]
    x = tl.load(X + b * stride_xb + x_head * stride_xh + (pos - lo)[:, None] * stride_xp + d[None, :],
                mask=mask, other=0.0).to(tl.float32)
    amax = tl.max(tl.max(tl.abs(x), axis=1), axis=0)
    scale = tl.where(amax > 0, amax * inv_largest, 1.0)
    values = _on_e4m3_grid(tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -largest), largest)).to(OUT_DTYPE)
    tl.store(V + b * stride_vb + h * stride_vh + (pos - lo)[:, None] * stride_vp + d[None, :], values, mask=mask)
    tl.store(SC + b * stride_sb + h * stride_sh + j, scale)


@triton.jit
def _quantize_kernel(
    XK, VK, SK, XV, VV, SV, HEADS, first, lo, hi, S, T, largest, inv_largest,
    stride_xkb, stride_xkh, stride_xkp, stride_vkb, stride_vkh, stride_vkp, stride_skb, stride_skh,
    stride_xvb, stride_xvh, stride_xvp, stride_vvb, stride_vvh, stride_vvp, stride_svb, stride_svh,
    D_K: tl.constexpr, D_V: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    SCALE_BLOCK: tl.constexpr, OUT_DTYPE: tl.constexpr, GATHER: tl.constexpr, PAIR: tl.constexpr,
):
    """One program per (scale block, head, batch row; with ``PAIR``, K's block or V's): a layer's
    K and V in one launch, twice the programs of one, which hide each other's latency (at a
    segment end of the 8B shape, 5.5 us a layer against 11.3 for a launch each)."""
    j, h, r = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    if PAIR:
        if r % 2 == 1:
            _quantize_block(XV, HEADS, VV, SV, j, h, r // 2, first, lo, hi, S, T, largest, inv_largest,
                            stride_xvb, stride_xvh, stride_xvp, stride_vvb, stride_vvh, stride_vvp, stride_svb,
                            stride_svh, D_V, BLOCK_DV, SCALE_BLOCK, OUT_DTYPE, GATHER)
        else:
            _quantize_block(XK, HEADS, VK, SK, j, h, r // 2, first, lo, hi, S, T, largest, inv_largest,
                            stride_xkb, stride_xkh, stride_xkp, stride_vkb, stride_vkh, stride_vkp, stride_skb,
                            stride_skh, D_K, BLOCK_DK, SCALE_BLOCK, OUT_DTYPE, GATHER)
    else:
        _quantize_block(XK, HEADS, VK, SK, j, h, r, first, lo, hi, S, T, largest, inv_largest,
                        stride_xkb, stride_xkh, stride_xkp, stride_vkb, stride_vkh, stride_vkp, stride_skb, stride_skh,
                        D_K, BLOCK_DK, SCALE_BLOCK, OUT_DTYPE, GATHER)


def quantize(x: torch.Tensor, start: int, geometry: HistoryGeometry, dtype: torch.dtype,
             out: tuple[torch.Tensor, torch.Tensor] | None = None,
             heads: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_history(x, start, geometry, dtype)`` in one kernel: ``(values, scales)``, written
    into ``out`` if given (views of a history's buffers, where a segment end appends them: no
    copies after the kernel). ``heads`` (an integer tensor on ``x``'s device): quantise
    ``x.index_select(1, heads)``, read in place (a segment end's long-range heads, ungathered)."""
    if out is None:
        B, H, n, D = x.shape
        H = heads.numel() if heads is not None else H
        blocks = geometry.num_blocks(start + n) - geometry.num_blocks(start)
        out = (torch.empty(B, H, n, D, dtype=dtype, device=x.device),
               torch.empty(B, H, blocks, dtype=torch.float32, device=x.device))
    _quantize([x], start, geometry, dtype, [out], heads)
    return out


def quantize_pair(k: torch.Tensor, v: torch.Tensor, start: int, geometry: HistoryGeometry, dtype: torch.dtype,
                  outs: tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                  heads: torch.Tensor | None = None) -> None:
    """``quantize`` of a layer's K and V (same batch, heads and positions; their layouts and head
    dims may differ) into ``outs`` (K's, then V's), in one launch."""
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"quantize_pair: K {tuple(k.shape)} and V {tuple(v.shape)} differ in batch, heads or positions")
    _quantize([k, v], start, geometry, dtype, list(outs), heads)


QUANTIZE_WARPS = 8  # a program's 64 x 128 block in 8 warps: 5.5 us a layer at a segment end of the 8B shape, 6.9 with 4


def _quantize(xs: list[torch.Tensor], start: int, geometry: HistoryGeometry, dtype: torch.dtype,
              outs: list[tuple[torch.Tensor, torch.Tensor]], heads: torch.Tensor | None) -> None:
    """One launch quantising each of ``xs`` (one or two) into its ``outs``."""
    B, H, n, _ = xs[0].shape
    H = heads.numel() if heads is not None else H
    first = geometry.num_blocks(start)
    blocks = geometry.num_blocks(start + n) - first
    for x, (values, scales) in zip(xs, outs):
        if (values.shape != (B, H, n, x.shape[-1]) or scales.shape != (B, H, blocks) or values.stride(3) != 1
                or (blocks and scales.stride(2) != 1)):
            raise ValueError(f"quantize: out of shapes {tuple(values.shape)}, {tuple(scales.shape)} for {tuple(x.shape)} "
                             f"({blocks} blocks), the last dimension of each contiguous")
    if blocks == 0 or B * H == 0:
        return
    (xk, (vk, sk)), (xv, (vv, sv)) = [(usable(x).detach(), out) for x, out in ((xs[0], outs[0]), (xs[-1], outs[-1]))]
    gather = heads is not None
    _quantize_kernel[(blocks, H, B * len(xs))](
        xk, vk, sk, xv, vv, sv, heads if gather else xk, first, start, start + n,
        geometry.segment_len, geometry.tail_len, HISTORY_DTYPES[dtype], 1 / HISTORY_DTYPES[dtype],
        *_quantize_strides(xk, vk, sk), *_quantize_strides(xv, vv, sv),
        D_K=xk.shape[-1], D_V=xv.shape[-1], BLOCK_DK=triton.next_power_of_2(xk.shape[-1]),
        BLOCK_DV=triton.next_power_of_2(xv.shape[-1]), SCALE_BLOCK=geometry.block, OUT_DTYPE=_TL_HISTORY[dtype],
        GATHER=gather, PAIR=len(xs) == 2, num_warps=QUANTIZE_WARPS, **COMPILE_OPTIONS,
    )


def _quantize_strides(x: torch.Tensor, values: torch.Tensor, scales: torch.Tensor) -> tuple[int, ...]:
    return (x.stride(0), x.stride(1), x.stride(2), values.stride(0), values.stride(1), values.stride(2),
            scales.stride(0), scales.stride(1))


_TL_HISTORY = {torch.float8_e4m3fn: tl.float8e4nv}
