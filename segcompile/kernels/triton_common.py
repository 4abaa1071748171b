"""What the Triton kernels of ``triton_attention.py`` and ``triton_decode.py`` share: the inner
loop over one key range (``attend``), where a KV head's prefix lies (``prefix``), the tile tables
and their lookup (``tile``), the compile options every launch passes (``COMPILE_OPTIONS``), and
the host's stride helper.

The tile tables live here rather than beside one kernel because both kernel files read them and
``bench/tune_kernels.py`` swaps entries of ``TILES`` in place to time candidates: ``tile`` reads
the table at every launch.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
LOG2E = 1.4426950408889634
# What every launch of these kernels (and the Gluon ones) passes besides its tile: floating-point
# contraction (``a * b + c`` as one FMA) asked for, not left to Triton's default. Up to 3.9 that
# default is on, and the kernels were tuned, measured and tested so; Triton 3.10 turns it off
# (3.9 warns wherever a launch leaves it unset), which would change their rounding and their speed.
COMPILE_OPTIONS = {"enable_fp_fusion": True}

# Block shapes per kernel and head-dim bucket (64, 128, 256: the padded head dim, rounded up):
# (BLOCK_M, BLOCK_N, warps, pipeline stages[, registers a thread]). A register cap (ptxas's
# ``maxnreg``) lets two programs share a multiprocessor where ptxas would otherwise take the whole
# register file for one (255 a thread at 8 warps). The 128 column is what ``bench/tune_kernels.py``
# measured fastest on an H200 at D=128, bf16 (``bench/results/tune_kernels-NVIDIA_H200.json``).
# The 256 column keeps each kernel's shared memory under Hopper's 227 KB (the 128 column's tiles
# would need up to 384 KB there), by ``bench/kernel_resources.py``'s report; untimed. "decode" is
# the forward for at most 16 queries. The interpreter runs any shape: small tiles keep the CPU
# tests fast and still exercise multi-block loops and partial blocks. "decode-fp8" is the decode
# over an fp8 history (``triton_decode.tile_kind``): one warp a program, measured fastest on an
# H100 at 57K-1M positions at head dim 128, and on an H200 at 128K-512K at head dim 64 (two warps
# over 64 keys won below 32K there; ``bench/decode_splits.py``); the other tables keep their decode
# tile.
TILES = {
    "fwd": {64: (128, 64, 4, 3), 128: (128, 128, 8, 3), 256: (64, 64, 8, 2)},
    "decode": {64: (16, 64, 4, 3), 128: (16, 64, 4, 3), 256: (16, 64, 4, 2)},
    "decode-fp8": {64: (16, 32, 1, 3), 128: (16, 32, 1, 3), 256: (16, 64, 4, 2)},
    "dq": {64: (128, 64, 8, 3), 128: (128, 64, 8, 3), 256: (64, 32, 4, 2)},
    "dkdv": {64: (32, 64, 4, 3), 128: (32, 64, 4, 3), 256: (32, 32, 4, 2)},
}
# Inputs with 4-byte elements and 16-bit products (fp32 K/V under autocast) need twice the shared
# memory per pipeline stage: the 16-bit tiles would need up to 384 KB. These fit Hopper's 227 KB.
# At 64 the 16-bit tiles fit (and ran in the GPU training benchmark, fp32 K/V under autocast).
TILES_WIDE = {
    "fwd": {64: TILES["fwd"][64], 128: (128, 64, 8, 2), 256: (32, 32, 4, 2)},
    "decode": {64: TILES["decode"][64], 128: (16, 64, 4, 2), 256: (16, 32, 4, 2)},
    "dq": {64: TILES["dq"][64], 128: (64, 32, 4, 2), 256: (32, 32, 4, 2)},
    "dkdv": {64: TILES["dkdv"][64], 128: (32, 32, 4, 2), 256: (16, 32, 4, 2)},
}
TILES_WIDE["decode-fp8"] = TILES_WIDE["decode"]
# fp32 products (fp32 runs: no tensor cores, each product a loop of FMAs in registers): tiles
# that ptxas fits in registers with few or no spills (``bench/kernel_resources.py --dtype fp32``,
# sm_90a: at 64, no spills; at 128, forward 4 KB of spill stores a thread where the WIDE tile has
# 30 KB, dQ 3 KB where 78 KB, dK/dV 16 B; at 256, none, 5 KB and none). Correctness, not speed,
# is what fp32 runs are for; spills cost ptxas time too. Untimed.
TILES_FP32 = {
    "fwd": {64: (64, 32, 8, 2), 128: (64, 32, 8, 2), 256: (16, 32, 8, 2)},
    "decode": {64: (16, 32, 4, 2), 128: (16, 32, 4, 2), 256: (16, 16, 4, 2)},
    "dq": {64: (64, 32, 8, 2), 128: (64, 32, 8, 2), 256: (16, 32, 4, 2)},
    "dkdv": {64: (32, 32, 8, 2), 128: (32, 32, 8, 2), 256: (16, 32, 8, 2)},
}
TILES_FP32["decode-fp8"] = TILES_FP32["decode"]
INTERPRETER_TILE = (16, 16, 1, 1)
# ``Problem.tile_table`` names the table its launches read
TILE_TABLES = {"16-bit": TILES, "wide": TILES_WIDE, "fp32": TILES_FP32}


# ---- device helpers -----------------------------------------------------------------------------
@triton.jit
def batch_and_kv_head(bk, Hk):
    """Batch row and KV head of a program indexed by ``b * Hk + kv_head`` (int64: they scale strides)."""
    return (bk // Hk).to(tl.int64), (bk % Hk).to(tl.int64)


@triton.jit
def scale_block_index(pos, S, T, BLOCK: tl.constexpr):
    """The scale block of history position ``pos``: ``history_format.HistoryGeometry.block_index``
    (each segment's first S - T positions, then its last T, cut into blocks of ``BLOCK``)."""
    head = S - T
    head_blocks = (head + BLOCK - 1) // BLOCK
    per_segment = head_blocks + (T + BLOCK - 1) // BLOCK
    offset = pos % S
    inside = tl.where(offset < head, offset // BLOCK, head_blocks + (offset - head) // BLOCK)
    return (pos // S) * per_segment + inside


@triton.jit
def attend(
    acc, m_i, l_i, q, K, V, stride_kn, stride_vn, lo, hi, n_keys, q_pos, qk_scale,
    MASK_N: tl.constexpr, CAUSAL: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, D_K: tl.constexpr, D_V: tl.constexpr,
    DOT: tl.constexpr, PRECISION: tl.constexpr, EMPTY_ROWS: tl.constexpr = False,
    KS=None, VS=None, SCALE_S=1, SCALE_T=0, SCALED: tl.constexpr = False, SCALE_BLOCK: tl.constexpr = 64,
):
    """Online softmax of ``q`` over keys ``[lo, hi)`` of one range (keys ``K``, values ``V``).
    ``EMPTY_ROWS``: a row may see none of these keys (a split of the decode kernel past a query's
    causal limit); its maximum stays -inf, and the exponentials are taken against 0 instead.
    ``SCALED``: K and V are a quantised history (key index = position) whose per-block scales
    ``KS``, ``VS`` (one row of blocks) are applied in registers, to the scores and to the
    probabilities: the fp8 values convert exactly to the product dtype, and the products see them
    unrounded. With 16-bit products ``Q K^T`` is fp16 (``history_queries``): e4m3 widens to fp16
    in one instruction for two values, to bf16 in three, and widening is what bounds the decode
    kernel's loop over an fp8 history. ``P V`` stays in the product dtype (over bf16 the
    normalisation below costs more than the widening it would save); over fp16 the probabilities
    enter it times each key's V scale over the block's largest (at most 1, where a tiny scale
    times a probability would fall below fp16's smallest value), the product then times that
    largest."""
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    if SCALED:
        qh, qk_h = history_queries(q, qk_scale, DOT)
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        key_ok = offs_n < n_keys
        if MASK_N:
            kt = tl.load(K + offs_n[None, :] * stride_kn + offs_dk[:, None],
                         mask=key_ok[None, :] & (offs_dk[:, None] < D_K), other=0.0)
            v = tl.load(V + offs_n[:, None] * stride_vn + offs_dv[None, :],
                        mask=key_ok[:, None] & (offs_dv[None, :] < D_V), other=0.0)
        else:
            kt = tl.load(K + offs_n[None, :] * stride_kn + offs_dk[:, None], mask=offs_dk[:, None] < D_K, other=0.0)
            v = tl.load(V + offs_n[:, None] * stride_vn + offs_dv[None, :], mask=offs_dv[None, :] < D_V, other=0.0)
        if SCALED:
            block = scale_block_index(offs_n, SCALE_S, SCALE_T, SCALE_BLOCK)
            k_scale = tl.load(KS + block, mask=key_ok, other=0.0)
            v_scale = tl.load(VS + block, mask=key_ok, other=0.0)
            s = tl.dot(qh, kt.to(qh.dtype), input_precision=PRECISION) * (k_scale[None, :] * qk_h)
        else:
            s = tl.dot(q, kt.to(DOT), input_precision=PRECISION) * qk_scale
        if MASK_N:
            s = tl.where(key_ok[None, :], s, float("-inf"))
        if CAUSAL:
            s = tl.where(offs_n[None, :] <= q_pos[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new) if EMPTY_ROWS else m_new
        alpha = tl.math.exp2(m_i - m_ref)
        p = tl.math.exp2(s - m_ref[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if SCALED and DOT == tl.float16:
            v_top = tl.max(v_scale, 0)  # > 0: a block holds a real key, and a scale is positive
            pv = (p * (v_scale / v_top)[None, :]).to(DOT)
            acc = acc * alpha[:, None] + tl.dot(pv, v.to(DOT), input_precision=PRECISION) * v_top
        elif SCALED:  # bf16 and fp32 have fp32's range: the scaled probabilities cannot underflow
            pv = (p * v_scale[None, :]).to(DOT)
            acc = acc * alpha[:, None] + tl.dot(pv, v.to(DOT), input_precision=PRECISION)
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(DOT), v.to(DOT), input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def history_queries(q, qk_scale, DOT: tl.constexpr):
    """``(q, qk_scale)`` for the products over a quantised history (``attend``'s ``SCALED``): with
    16-bit products, ``q`` times a power of two ``2^e`` (its largest magnitude then in (2^13,
    2^14]) in fp16, exact for every value above ``2^-28`` of the largest (fp16 has bf16's 8
    significant bits and more; the power keeps bf16's range out of fp16's overflow), and
    ``qk_scale / 2^e``; with fp32 products, as given."""
    if DOT != tl.float32:
        x = q.to(tl.float32)
        largest = tl.max(tl.max(tl.abs(x), 1), 0)
        power = tl.math.exp2(tl.where(largest > 0, tl.minimum(tl.floor(tl.math.log2(16384.0 / largest)), 100.0), 0.0))
        return (x * power).to(tl.float16), qk_scale / power
    else:
        return q, qk_scale


@triton.jit
def history_rows(HK, HV, KS, VS, Slot, b, kvh, s_hkb, s_hkh, s_hvb, s_hvh, s_ksb, s_ksh, s_vsb, s_vsh):
    """Whether KV head ``kvh`` is long-range, and the base pointers of its history and of its
    history's scales (a quantised history: ``attend``'s ``SCALED``)."""
    slot = tl.load(Slot + kvh)
    row = tl.maximum(slot, 0).to(tl.int64)
    return (slot >= 0, HK + b * s_hkb + row * s_hkh, HV + b * s_hvb + row * s_hvh,
            KS + b * s_ksb + row * s_ksh, VS + b * s_vsb + row * s_vsh)


@triton.jit
def prefix(SK, SV, HK, HV, Slot, b, kvh,
           s_skb, s_skh, s_svb, s_svh, s_hkb, s_hkh, s_hvb, s_hvh, s_skn, s_svn, s_hkn, s_hvn, G, P):
    """Base pointers, strides and length of the prefix range: history or sinks of KV head ``kvh``."""
    slot = tl.load(Slot + kvh)
    if slot >= 0:
        pk = HK + b * s_hkb + slot.to(tl.int64) * s_hkh
        pv = HV + b * s_hvb + slot.to(tl.int64) * s_hvh
        n, skn, svn = P, s_hkn, s_hvn
    else:
        pk = SK + b * s_skb + kvh * s_skh
        pv = SV + b * s_svb + kvh * s_svh
        n, skn, svn = G, s_skn, s_svn
    return pk, pv, n, skn, svn


# ---- host helpers -------------------------------------------------------------------------------
def strides(t: torch.Tensor) -> tuple[int, int, int]:
    """The strides of a ``[B, heads, L, D]`` tensor's first three axes (the last is 1)."""
    return t.stride(0), t.stride(1), t.stride(2)


def block_d(d: int) -> int:
    """A head dim padded to a power of two, at least the 16 columns a ``tl.dot`` takes."""
    return max(16, triton.next_power_of_2(d))


def tile(kind: str, head_dim: int, lq: int, table: str = "16-bit") -> dict:
    """The launch options (``tile_options``) of kernel ``kind`` ("fwd", "decode", "decode-fp8", "dq"
    or "dkdv") for this head dim and query count, from tile table ``table`` (``TILE_TABLES``): the forward
    of at most 16 queries takes the "decode" tile."""
    if kind == "fwd" and lq <= 16:
        kind = "decode"
    if INTERPRET:
        return tile_options(INTERPRETER_TILE)
    bucket = min(b for b in (64, 128, 256) if b >= block_d(head_dim))
    return tile_options(TILE_TABLES[table][kind][bucket])


def tile_options(entry: tuple[int, ...]) -> dict:
    """A ``TILES`` entry, (BLOCK_M, BLOCK_N, warps, stages[, register cap]), as launch options."""
    return dict(zip(("BLOCK_M", "BLOCK_N", "num_warps", "num_stages", "maxnreg"), entry))


def register_cap(options: dict) -> dict:
    """The register cap of ``tile_options`` as a launch option (none where the entry has none), for
    launchers that pass the tile's fields one by one."""
    return {"maxnreg": options["maxnreg"]} if options.get("maxnreg") else {}
