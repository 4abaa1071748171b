"""Decode for ``segment_attention``: a few queries against long caches, split over the keys.

With one query token a program per (query block, query head) is only ``B * H`` programs, each
streaming its head's whole [prefix | tail | current] key range: at B=1 a fraction of the GPU's
multiprocessors does all the work, and each KV head's keys are read once per query head of its
GQA group. Here (flash-decoding):

* ``_split_kernel``: one program per (split, batch, KV head) takes the queries of every query head
  of the group (``GROUP * Lq`` rows, so the keys are read once) over one contiguous split of the
  concatenated key range, and writes its unnormalised output with the running max and sum;
* ``_combine_kernel``: one program per (batch, KV head, block of value columns) merges the
  splits into the output and the log-sum-exp (the same base-2 log-sum-exp the one-pass forward
  keeps for the backward), many splits a load.

The splits are sized for the longest key range (the long-range heads' history); programs past a
shorter head's keys do nothing. A split may hold no key a query sees (past its causal limit), so
the inner loop runs with ``EMPTY_ROWS``.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import triton_common
from .history_format import HISTORY_SCALE_BLOCK
from .problem import TL_DTYPES, Problem, compute_dtype, usable, usable_scales
from .triton_common import COMPILE_OPTIONS, INTERPRET, LOG2E, attend, batch_and_kv_head, history_rows, prefix, strides

MAX_ROWS = 128  # group * Lq rows a program holds, times the padded value dim, at most MAX_ROWS x 128
MAX_QUERIES = 16  # more queries run in one pass (triton_attention.one_pass_forward)
PROGRAMS_PER_SM = 4  # enough splits for this many programs a multiprocessor
# Over an fp8 history the loop is bound by its instructions (widening fp8), not by memory, and
# the "decode-fp8" tile (one warp a program: no exchange of the probabilities between warps)
# needs many resident programs to hide them; splits of about KEYS_A_SPLIT_FP8 keys, between
# these bounds (programs a multiprocessor). H100, one layer of the 8B shape, fp8 history, ms
# (bench/README.md, decode): 1M positions 0.41 at 8 a multiprocessor with the 16-bit tile, one
# warp 0.34 at 16, 0.29 at 32 (1,984 keys a split), 0.32 at 64; 254K 0.131, one warp 0.109 at
# 16 (992 keys), 0.127 at 32; 123K 0.076, 0.071 at 16 (512 keys), 0.086 at 32.
PROGRAMS_PER_SM_FP8_HISTORY = (16, 32)
KEYS_A_SPLIT_FP8 = 2048


def split_bounds(device: torch.device, programs: int, scaled: bool) -> tuple[int, int]:
    """(fewest, most) splits a KV head's keys are cut into: about ``PROGRAMS_PER_SM`` programs a
    multiprocessor over ``programs`` (batch rows times KV heads), or over a quantised history
    (``scaled``) between the bounds of ``PROGRAMS_PER_SM_FP8_HISTORY``."""
    fewest, most = PROGRAMS_PER_SM_FP8_HISTORY if scaled else (PROGRAMS_PER_SM, PROGRAMS_PER_SM)
    sms = multiprocessors(device)
    return triton.cdiv(fewest * sms, programs), triton.cdiv(most * sms, programs)


def split_count(longest: int, block_n: int, bounds: tuple[int, int]) -> int:
    """Splits of ``longest`` keys: about ``KEYS_A_SPLIT_FP8`` keys each within ``bounds``
    (``split_bounds``), at least one key block each; ``device_split_count`` in the static
    decoder's kernel."""
    fewest, most = bounds
    return max(1, min(triton.cdiv(longest, block_n), min(max(triton.cdiv(longest, KEYS_A_SPLIT_FP8), fewest), most)))


@triton.jit
def device_split_count(longest, BLOCK_N: tl.constexpr, fewest, most, keys_a_split):
    """``split_count`` on the device (``keys_a_split``: ``KEYS_A_SPLIT_FP8``)."""
    splits = tl.minimum(tl.maximum(tl.cdiv(longest, keys_a_split), fewest), most)
    return tl.maximum(1, tl.minimum(tl.cdiv(longest, BLOCK_N), splits))


def tile_kind(rows: int, head_dim: int, scaled: bool) -> str:
    """The tile-table kind of a decode: "decode-fp8" over a quantised history where a program
    holds at most 16 rows (``_rows``) of at most 128 columns (one warp keeps their queries and
    output in registers), else "decode"."""
    return "decode-fp8" if scaled and rows <= 16 and head_dim <= 128 else "decode"


@triton.jit
def _group_rows(kvh, GROUP, Lq, ROWS: tl.constexpr):
    """A program's rows for KV head ``kvh``: row r is query ``i = r % Lq`` of query head
    ``h = kvh * GROUP + r // Lq``; ``row_ok`` marks the ``GROUP * Lq`` real ones."""
    rows = tl.arange(0, ROWS)
    return rows, rows < GROUP * Lq, kvh * GROUP + rows // Lq, rows % Lq


@triton.jit
def _group_queries(Q, b, kvh, s_qb, s_qh, s_qm, GROUP, Lq, ROWS: tl.constexpr, BLOCK_DK: tl.constexpr,
                   BLOCK_DV: tl.constexpr, D_K: tl.constexpr, DOT: tl.constexpr):
    """A split program's start: its rows (``_group_rows``), their queries in the product dtype,
    and the empty online-softmax state."""
    rows, row_ok, h, i = _group_rows(kvh, GROUP, Lq, ROWS)
    offs_dk = tl.arange(0, BLOCK_DK)
    q = tl.load(Q + b * s_qb + h[:, None] * s_qh + i[:, None] * s_qm + offs_dk[None, :],
                mask=row_ok[:, None] & (offs_dk[None, :] < D_K), other=0.0).to(DOT)
    acc = tl.zeros([ROWS, BLOCK_DV], dtype=tl.float32)
    m_i = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    return rows, i, q, acc, m_i, l_i


@triton.jit
def _store_split(Acc, Max, Sum, bk, split, rows, n_rows, acc, m_i, l_i, ROWS: tl.constexpr, BLOCK_DV: tl.constexpr):
    """A split's running max and sum of every row, and its unnormalised output of the ``n_rows``
    real rows that saw a key, where ``_combine_kernel`` reads them. No other row's output is
    written, or read: at the 8B shape 12 of a split's 16 rows are padding, and past a short
    head's keys (6 KV heads of 8 at long contexts) whole splits see none."""
    at = (bk.to(tl.int64) * tl.num_programs(0) + split) * ROWS + rows
    seen = (rows < n_rows) & (m_i > float("-inf"))
    tl.store(Acc + at[:, None] * BLOCK_DV + tl.arange(0, BLOCK_DV)[None, :], acc, mask=seen[:, None])
    tl.store(Max + at, m_i)
    tl.store(Sum + at, l_i)


@triton.jit
def _span(acc, m_i, l_i, q, K, V, skn, svn, c0, c1, r0, r1, q_pos, qk_scale, CAUSAL: tl.constexpr,
          BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, D_K: tl.constexpr,
          D_V: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
          KS=None, VS=None, SCALE_S=1, SCALE_T=0, SCALED: tl.constexpr = False, SCALE_BLOCK: tl.constexpr = 64):
    """The keys of range ``[r0, r1)`` (of the concatenated key range) inside split ``[c0, c1)``
    (``SCALED``...: a quantised history, ``triton_common.attend``)."""
    lo = tl.maximum(c0, r0) - r0
    hi = tl.minimum(c1, r1) - r0
    if hi > lo:
        acc, m_i, l_i = attend(acc, m_i, l_i, q, K, V, skn, svn, lo, hi, hi, q_pos, qk_scale, True, CAUSAL,
                               BLOCK_N, BLOCK_DK, BLOCK_DV, D_K, D_V, DOT, PRECISION, True,
                               KS, VS, SCALE_S, SCALE_T, SCALED, SCALE_BLOCK)
    return acc, m_i, l_i


@triton.jit
def _split_kernel(
    Q, K, V, TK, TV, SK, SV, HK, HV, Slot, Acc, Max, Sum, qk_scale,
    s_qb, s_qh, s_qm, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn,
    s_tkb, s_tkh, s_tkn, s_tvb, s_tvh, s_tvn,
    s_skb, s_skh, s_skn, s_svb, s_svh, s_svn,
    s_hkb, s_hkh, s_hkn, s_hvb, s_hvh, s_hvn,
    Hk, GROUP, Lq, Lk, T, G, P, split_len,
    HKS, HVS, s_ksb, s_ksh, s_vsb, s_vsh, SCALE_S, SCALE_T,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    D_K: tl.constexpr, D_V: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
    HIST_SCALED: tl.constexpr = False, SCALE_BLOCK: tl.constexpr = 64,
):
    split = tl.program_id(0)
    bk = tl.program_id(1)
    b, kvh = batch_and_kv_head(bk, Hk)
    rows, i, q, acc, m_i, l_i = _group_queries(Q, b, kvh, s_qb, s_qh, s_qm, GROUP, Lq, ROWS, BLOCK_DK, BLOCK_DV,
                                               D_K, DOT)
    q_pos = i + (Lk - Lq)

    c0 = split * split_len
    c1 = c0 + split_len
    if HIST_SCALED:  # a quantised history (fp8 values, per-block scales) and the sinks: two dtypes, two branches
        long_range, hk, hv, ks, vs = history_rows(HK, HV, HKS, HVS, Slot, b, kvh, s_hkb, s_hkh, s_hvb, s_hvh,
                                                  s_ksb, s_ksh, s_vsb, s_vsh)
        if long_range:
            acc, m_i, l_i = _span(acc, m_i, l_i, q, hk, hv, s_hkn, s_hvn, c0, c1, 0, P, q_pos, qk_scale, False,
                                  BLOCK_N, BLOCK_DK, BLOCK_DV, D_K, D_V, DOT, PRECISION,
                                  ks, vs, SCALE_S, SCALE_T, True, SCALE_BLOCK)
        else:
            acc, m_i, l_i = _span(acc, m_i, l_i, q, SK + b * s_skb + kvh * s_skh, SV + b * s_svb + kvh * s_svh,
                                  s_skn, s_svn, c0, c1, 0, G, q_pos, qk_scale, False,
                                  BLOCK_N, BLOCK_DK, BLOCK_DV, D_K, D_V, DOT, PRECISION)
        n_pre = tl.where(long_range, P, G)
    else:
        pk, pv, n_pre, skn, svn = prefix(SK, SV, HK, HV, Slot, b, kvh, s_skb, s_skh, s_svb, s_svh,
                                         s_hkb, s_hkh, s_hvb, s_hvh, s_skn, s_svn, s_hkn, s_hvn, G, P)
        acc, m_i, l_i = _span(acc, m_i, l_i, q, pk, pv, skn, svn, c0, c1, 0, n_pre, q_pos, qk_scale, False,
                              BLOCK_N, BLOCK_DK, BLOCK_DV, D_K, D_V, DOT, PRECISION)
    acc, m_i, l_i = _span(acc, m_i, l_i, q, TK + b * s_tkb + kvh * s_tkh, TV + b * s_tvb + kvh * s_tvh,
                          s_tkn, s_tvn, c0, c1, n_pre, n_pre + T, q_pos, qk_scale, False,
                          BLOCK_N, BLOCK_DK, BLOCK_DV, D_K, D_V, DOT, PRECISION)
    acc, m_i, l_i = _span(acc, m_i, l_i, q, K + b * s_kb + kvh * s_kh, V + b * s_vb + kvh * s_vh,
                          s_kn, s_vn, c0, c1, n_pre + T, n_pre + T + Lk, q_pos, qk_scale, True,
                          BLOCK_N, BLOCK_DK, BLOCK_DV, D_K, D_V, DOT, PRECISION)

    _store_split(Acc, Max, Sum, bk, split, rows, GROUP * Lq, acc, m_i, l_i, ROWS, BLOCK_DV)


@triton.jit
def _split_slots(first, s0, offs_s, splits, rows, row_ok, ROWS: tl.constexpr):
    """Where splits ``s0 + offs_s`` keep the partial results of ``rows`` (``[SPLITS_BLOCK, rows]``
    offsets into Max / Sum, rows of Acc; a split holds ``ROWS``), and which are real splits and rows."""
    at = (first + s0 + offs_s)[:, None] * ROWS + rows[None, :]
    return at, ((s0 + offs_s) < splits)[:, None] & row_ok[None, :]


@triton.jit
def _combine_kernel(Acc, Max, Sum, Out, Lse, s_ob, s_oh, s_om, H, Hk, GROUP, Lq, splits,
                    ROWS: tl.constexpr, GROUP_ROWS: tl.constexpr, BLOCK_DV: tl.constexpr, D_V: tl.constexpr,
                    SPLITS_BLOCK: tl.constexpr, DV_BLOCK: tl.constexpr, STORE_LSE: tl.constexpr):
    """One program per (batch and KV head, block of ``DV_BLOCK`` value columns) merges every
    split's partial result, ``SPLITS_BLOCK`` splits a load: first the maximum over the splits, so
    that each split's weight is final when its part is added. It loads ``GROUP_ROWS`` rows of each
    split's ``ROWS`` (the real ``GROUP * Lq`` to a power of two; the rest are the split kernel's
    padding for its products), so that a load takes more splits."""
    bk = tl.program_id(0)
    b, kvh = batch_and_kv_head(bk, Hk)
    rows, row_ok, h, i = _group_rows(kvh, GROUP, Lq, GROUP_ROWS)
    offs_s = tl.arange(0, SPLITS_BLOCK)
    offs_dv = tl.program_id(1) * DV_BLOCK + tl.arange(0, DV_BLOCK)
    first = bk.to(tl.int64) * splits
    m_i = tl.full([GROUP_ROWS], float("-inf"), dtype=tl.float32)
    for s0 in range(0, splits, SPLITS_BLOCK):
        at, ok = _split_slots(first, s0, offs_s, splits, rows, row_ok, ROWS)
        m_i = tl.maximum(m_i, tl.max(tl.load(Max + at, mask=ok, other=float("-inf")), 0))
    m_ref = tl.where(m_i == float("-inf"), 0.0, m_i)
    acc = tl.zeros([GROUP_ROWS, DV_BLOCK], dtype=tl.float32)
    l_i = tl.zeros([GROUP_ROWS], dtype=tl.float32)
    for s0 in range(0, splits, SPLITS_BLOCK):
        at, ok = _split_slots(first, s0, offs_s, splits, rows, row_ok, ROWS)
        m_split = tl.load(Max + at, mask=ok, other=float("-inf"))
        weight = tl.math.exp2(m_split - m_ref[None, :])  # 0: no keys
        l_i += tl.sum(tl.load(Sum + at, mask=ok, other=0.0) * weight, 0)
        seen = ok & (m_split > float("-inf"))  # the rows whose output _store_split wrote
        part = tl.load(Acc + at[:, :, None] * BLOCK_DV + offs_dv[None, None, :], mask=seen[:, :, None], other=0.0)
        acc += tl.sum(part * weight[:, :, None], 0)
    out = acc / l_i[:, None]
    tl.store(Out + b * s_ob + h[:, None] * s_oh + i[:, None] * s_om + offs_dv[None, :], out.to(Out.dtype.element_ty),
             mask=row_ok[:, None] & (offs_dv[None, :] < D_V))
    if STORE_LSE:
        if tl.program_id(1) == 0:  # one column block's programs write it
            tl.store(Lse + (b * H + h) * Lq + i, m_i + tl.math.log2(l_i), mask=row_ok)


@triton.jit
def _static_split_kernel(
    Q, LK, LV, HK, HV, Position, BufferHead, Acc, Max, Sum, qk_scale,
    s_qb, s_qh, s_qm, s_lkh, s_lkb, s_lkn, s_lvh, s_lvb, s_lvn, s_hkh, s_hkb, s_hkn, s_hvh, s_hvb, s_hvn,
    Hk, GROUP, Lq, S, T, G, n_local, n_hist, fewest_splits, most_splits, keys_a_split,
    HKS, HVS, s_ksh, s_ksb, s_vsh, s_vsb,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    D_K: tl.constexpr, D_V: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr, HAS_HISTORY: tl.constexpr,
    HIST_SCALED: tl.constexpr = False, SCALE_BLOCK: tl.constexpr = 64,
):
    """``_split_kernel`` over the static decoder's buffers (``static_decode_forward``): the
    lengths of the prefix, tail and current ranges follow from the position, read from device
    memory, so that one launch serves every token of a CUDA graph's replays. So does the split
    length: ``split_len``'s arithmetic over the keys this token sees (the eager decode's, so both
    sum in the same order), over a grid sized for the longest; the programs past the last split
    store empty partials. ``HIST_SCALED``: the history is quantised (fp8 values, scales
    ``[n_lr, B, blocks]``), scaled in registers as in ``_split_kernel``."""
    split = tl.program_id(0)
    bk = tl.program_id(1)
    b, kvh = batch_and_kv_head(bk, Hk)
    rows, i, q, acc, m_i, l_i = _group_queries(Q, b, kvh, s_qb, s_qh, s_qm, GROUP, Lq, ROWS, BLOCK_DK, BLOCK_DV,
                                               D_K, DOT)

    position = tl.load(Position)
    offset = position % S  # of the first query in its segment
    start = position - offset - T  # the tail's first position; sinks and history hold those before it
    head = tl.load(BufferHead + kvh).to(tl.int64)  # this KV head's row in the buffers
    lk = LK + head * s_lkh + b * s_lkb
    lv = LV + head * s_lvh + b * s_lvb
    # sinks: slot m holds position m; history: slot j holds position j
    n_pre = tl.where(head < n_local, tl.minimum(tl.maximum(start, 0), G), tl.minimum(tl.maximum(start, 0), n_hist))
    tail_lo = tl.maximum(-start, 0)  # tail slot m holds position start + m: none before 0
    n_tail = tl.maximum(T - tail_lo, 0)
    # split_len() of the eager decode: its prefix is the history's length if the layer has one,
    # else the sinks'; its current range ends at the last query
    if HAS_HISTORY:
        longest_prefix = tl.maximum(start, 0)
    else:
        longest_prefix = tl.minimum(tl.maximum(start, 0), G)
    longest = longest_prefix + n_tail + offset + Lq
    splits = device_split_count(longest, BLOCK_N, fewest_splits, most_splits, keys_a_split)
    split_len = tl.cdiv(tl.cdiv(longest, splits), BLOCK_N) * BLOCK_N
    c0 = split * split_len
    c1 = c0 + split_len
    row = tl.maximum(head - n_local, 0)  # the head's row in the history buffers
    if HIST_SCALED:  # fp8 history and 16-bit sinks: pointers of two dtypes, two branches
        if head < n_local:
            acc, m_i, l_i = _span(acc, m_i, l_i, q, lk, lv, s_lkn, s_lvn, c0, c1, 0, n_pre, i, qk_scale, False,
                                  BLOCK_N, BLOCK_DK, BLOCK_DV, D_K, D_V, DOT, PRECISION)
        else:
            acc, m_i, l_i = _span(acc, m_i, l_i, q, HK + row * s_hkh + b * s_hkb, HV + row * s_hvh + b * s_hvb,
                                  s_hkn, s_hvn, c0, c1, 0, n_pre, i, qk_scale, False,
                                  BLOCK_N, BLOCK_DK, BLOCK_DV, D_K, D_V, DOT, PRECISION,
                                  HKS + row * s_ksh + b * s_ksb, HVS + row * s_vsh + b * s_vsb, S, T, True, SCALE_BLOCK)
    else:
        if head < n_local:
            pk, pv, skn, svn = lk, lv, s_lkn, s_lvn
        else:
            pk, pv, skn, svn = HK + row * s_hkh + b * s_hkb, HV + row * s_hvh + b * s_hvb, s_hkn, s_hvn
        acc, m_i, l_i = _span(acc, m_i, l_i, q, pk, pv, skn, svn, c0, c1, 0, n_pre, i, qk_scale, False,
                              BLOCK_N, BLOCK_DK, BLOCK_DV, D_K, D_V, DOT, PRECISION)
    acc, m_i, l_i = _span(acc, m_i, l_i, q, lk + (G + tail_lo) * s_lkn, lv + (G + tail_lo) * s_lvn,
                          s_lkn, s_lvn, c0, c1, n_pre, n_pre + n_tail, i, qk_scale, False,
                          BLOCK_N, BLOCK_DK, BLOCK_DV, D_K, D_V, DOT, PRECISION)
    # current slot m holds position start + T + m; query i (at offset + i) sees m <= offset + i
    acc, m_i, l_i = _span(acc, m_i, l_i, q, lk + (G + T) * s_lkn, lv + (G + T) * s_lvn,
                          s_lkn, s_lvn, c0, c1, n_pre + n_tail, n_pre + n_tail + offset + Lq, offset + i, qk_scale,
                          True, BLOCK_N, BLOCK_DK, BLOCK_DV, D_K, D_V, DOT, PRECISION)

    _store_split(Acc, Max, Sum, bk, split, rows, GROUP * Lq, acc, m_i, l_i, ROWS, BLOCK_DV)


# the CUDA-graph decoder's split kernel, for tools that compile it alone (``bench/kernel_resources.py --decode``)
STATIC_SPLIT_KERNEL = _static_split_kernel


def splits_keys(p: Problem) -> bool:
    """Whether the forward of ``p`` runs split over the keys: a few queries, whose rows for a
    whole GQA group fit one program."""
    return 1 <= p.Lq <= MAX_QUERIES and _rows(p) * p.block_dv <= MAX_ROWS * 128


def _rows(p: Problem) -> int:
    return _split_rows(p.group, p.Lq)


def _split_rows(group: int, lq: int) -> int:
    """The rows a split program holds: ``group * lq`` to a power of two, at least the 16 a ``tl.dot`` takes."""
    return max(16, triton.next_power_of_2(group * lq))


@functools.cache
def multiprocessors(device: torch.device) -> int:
    """The GPU's multiprocessors, which the splits are sized for (2 off CUDA and in the interpreter:
    a few splits, so that the tests cross split boundaries)."""
    if INTERPRET or device.type != "cuda":
        return 2
    return torch.cuda.get_device_properties(device).multi_processor_count


def split_len(p: Problem) -> tuple[int, int]:
    """(splits, keys a split) of ``p``'s decode (``split_plan``) over its longest key range, in
    whole key blocks of its split kernel's tile (``tile_kind``)."""
    longest = max(p.P, p.G) + p.T + p.Lk
    return split_plan(longest, _tile(p)["BLOCK_N"], split_bounds(p.q.device, p.B * p.Hk, p.hist_scaled))


def split_plan(longest: int, block_n: int, bounds: tuple[int, int]) -> tuple[int, int]:
    """(splits, keys a split) of ``longest`` keys: ``split_count`` splits, each of whole key
    blocks, the last one shorter (so possibly fewer splits than counted)."""
    keys = triton.cdiv(triton.cdiv(longest, split_count(longest, block_n, bounds)), block_n) * block_n
    return triton.cdiv(longest, keys), keys


def _tile(p: Problem) -> dict:
    """The launch options of ``p``'s split kernel (``tile_kind``)."""
    return p.tile(tile_kind(_rows(p), p.block_dk, p.hist_scaled))


def _combine_blocks(group_rows: int, block_dv: int) -> tuple[int, int]:
    """(value columns, splits) a combine program loads at once: about 8K fp32 a load (64 a thread
    at 4 warps) of ``group_rows`` rows, over ``B * Hk * block_dv / columns`` programs. A merge of
    64 splits by one program per KV head, a split at a time, took 47 us at B = 1 (H200), twice the
    split kernel; 32 columns and 16 splits a load, 16 us (32 programs at B = 1, Hk = 8, D = 128:
    the loop over the splits is latency-bound), so 8 columns and up to 256 splits: 128 programs,
    and at the 8B shape (4 rows) 256 splits a load. The interpreter takes small blocks, so that
    the tests cross both kinds of block boundary."""
    if INTERPRET:
        return min(8, block_dv), 2
    columns = min(8, block_dv)
    return columns, max(1, min(256, 8192 // (group_rows * columns)))


def _group_rows_padded(group: int, lq: int) -> int:
    """The rows a combine program loads of each split: ``group * lq`` to a power of two."""
    return max(2, triton.next_power_of_2(group * lq))


def split_keys_forward(p: Problem, scale: float, return_lse: bool):
    """``(out, lse)`` as ``triton_attention.one_pass_forward`` gives them, split over the keys."""
    B, H, Hk, lq = p.B, p.H, p.Hk, p.Lq
    tile = _tile(p)
    rows = _rows(p)
    splits, keys = split_len(p)
    acc = torch.empty(B * Hk * splits * rows * p.block_dv, dtype=torch.float32, device=p.q.device)
    running_max = torch.empty(B * Hk * splits * rows, dtype=torch.float32, device=p.q.device)
    running_sum = torch.empty_like(running_max)
    warps = tile["num_warps"] if rows <= 32 else max(tile["num_warps"], 8)
    _split_kernel[(splits, B * Hk)](
        *p.tensors, p.slots, acc, running_max, running_sum, scale * LOG2E,
        *strides(p.q), *strides(p.k), *strides(p.v), *strides(p.tail_k), *strides(p.tail_v),
        *strides(p.sink_k), *strides(p.sink_v), *strides(p.hist_k), *strides(p.hist_v),
        Hk, p.group, lq, p.Lk, p.T, p.G, p.P, keys, *p.history_scale_args(),
        ROWS=rows, BLOCK_N=tile["BLOCK_N"], BLOCK_DK=p.block_dk, BLOCK_DV=p.block_dv, D_K=p.D_K,
        D_V=p.D_V, num_warps=warps, num_stages=tile["num_stages"], **triton_common.register_cap(tile),
        **p.dot_options(), **p.history_scale_options(), **COMPILE_OPTIONS,
    )
    out = torch.empty(B, H, lq, p.D_V, dtype=p.q.dtype, device=p.q.device)
    lse = torch.empty(B * H * lq if return_lse else 1, dtype=torch.float32, device=p.q.device)
    group_rows = _group_rows_padded(p.group, lq)
    dv_block, splits_block = _combine_blocks(group_rows, p.block_dv)
    _combine_kernel[(B * Hk, p.block_dv // dv_block)](
        acc, running_max, running_sum, out, lse, *strides(out), H, Hk, p.group, lq, splits,
        ROWS=rows, GROUP_ROWS=group_rows, BLOCK_DV=p.block_dv, D_V=p.D_V, SPLITS_BLOCK=splits_block, DV_BLOCK=dv_block,
        STORE_LSE=return_lse, num_warps=1 if INTERPRET else 4, **COMPILE_OPTIONS,
    )
    return out, lse


@functools.cache
def _no_scales(device: torch.device) -> torch.Tensor:
    """The scales argument of an unquantised history, never read. Made once per device (before a
    CUDA-graph capture, in its warm-up runs): no allocation or fill in every replayed step."""
    return torch.ones(1, 1, 1, device=device)


def static_decode_forward(q, local_k, local_v, hist_k, hist_v, position, buffer_head, *, n_local: int,
                          segment_len: int, tail_len: int, sinks: int, scale: float,
                          hist_scales: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Attention of ``q [B, H, Lq, D]`` (the queries at ``position``, a one-element int64 device
    tensor, and after it, inside one segment) over the static decoder's buffers, split over the keys.

    ``local_k/v [Hkv, B, G + T + S, D]``: sinks, tail, current segment (this step's K/V already
    written); ``hist_k/v [n_lr, B, slots, D]`` (or ``None``): slot j holds position j, the
    long-range heads' history; ``buffer_head [Hkv]`` int32: model KV head c's row in the buffers,
    local heads (rows below ``n_local``) read the sinks, long-range heads the history. Every
    length comes from ``position`` on the device, never from the host: a CUDA graph of this call
    replays for any position whose history fits ``hist_k``'s slots. A quantised history: fp8
    ``hist_k/v`` and ``hist_scales`` (K's and V's, ``[n_lr, B, blocks]`` fp32, the blocks of
    ``HistoryGeometry(segment_len, tail_len)``), scaled in registers. Returns ``[B, H, Lq, Dv]``."""
    B, H, lq, dk = q.shape
    hk, dv = local_k.shape[0], local_v.shape[-1]
    group = H // hk
    if hist_k is None:  # no long-range head: the history branch is never taken
        hist_k, hist_v = local_k, local_v
    scaled = hist_scales is not None
    k_scales, v_scales = map(usable_scales, hist_scales) if scaled else (_no_scales(q.device),) * 2
    dot = compute_dtype(q)
    table = "fp32" if dot == torch.float32 else ("wide" if local_k.element_size() > 2 else "16-bit")
    rows = _split_rows(group, lq)
    block_dk, block_dv = triton_common.block_d(dk), triton_common.block_d(dv)
    tile = triton_common.tile(tile_kind(rows, block_dk, scaled), dk, lq, table)
    longest = max(hist_k.shape[2], sinks) + tail_len + segment_len  # what a replay may see at most
    bounds = split_bounds(q.device, B * hk, scaled)
    # the grid: the most splits any replay takes (split_count grows with the keys); the kernel uses a prefix
    splits = split_count(longest, tile["BLOCK_N"], bounds)
    acc = torch.empty(B * hk * splits * rows * block_dv, dtype=torch.float32, device=q.device)
    running_max = torch.empty(B * hk * splits * rows, dtype=torch.float32, device=q.device)
    running_sum = torch.empty_like(running_max)
    q = usable(q)
    _static_split_kernel[(splits, B * hk)](
        q, local_k, local_v, hist_k, hist_v, position, buffer_head, acc, running_max, running_sum, scale * LOG2E,
        *strides(q), *strides(local_k), *strides(local_v), *strides(hist_k), *strides(hist_v),
        hk, group, lq, segment_len, tail_len, sinks, n_local, hist_k.shape[2], *bounds, KEYS_A_SPLIT_FP8,
        k_scales, v_scales, k_scales.stride(0), k_scales.stride(1), v_scales.stride(0), v_scales.stride(1),
        HIST_SCALED=scaled, SCALE_BLOCK=HISTORY_SCALE_BLOCK, ROWS=rows, BLOCK_N=tile["BLOCK_N"], BLOCK_DK=block_dk, BLOCK_DV=block_dv, D_K=dk, D_V=dv,
        num_warps=tile["num_warps"] if rows <= 32 else max(tile["num_warps"], 8), num_stages=tile["num_stages"],
        **triton_common.register_cap(tile), DOT=TL_DTYPES[dot],
        PRECISION="ieee" if dot == torch.float32 else "tf32", HAS_HISTORY=n_local < hk, **COMPILE_OPTIONS,
    )
    out = torch.empty(B, H, lq, dv, dtype=q.dtype, device=q.device)
    group_rows = _group_rows_padded(group, lq)
    dv_block, splits_block = _combine_blocks(group_rows, block_dv)
    _combine_kernel[(B * hk, block_dv // dv_block)](
        acc, running_max, running_sum, out, running_max, *strides(out), H, hk, group, lq, splits,
        ROWS=rows, GROUP_ROWS=group_rows, BLOCK_DV=block_dv, D_V=dv, SPLITS_BLOCK=splits_block, DV_BLOCK=dv_block,
        STORE_LSE=False, num_warps=1 if INTERPRET else 4, **COMPILE_OPTIONS,
    )
    return out
