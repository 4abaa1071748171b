"""Triton kernels for ``segment_attention``: forward, backward and decode (the CUDA lowering).

Shapes and semantics are the reference's (``kernels/reference.py``): queries ``q [B, H, Lq, Dk]``
are the last ``Lq`` tokens of the current segment; every query head sees

    [prefix | tail | current, causal]      prefix = sinks (local KV head) or history (long-range)

with query head ``h`` on KV head ``h // (H // Hk)``. The kernels never materialise repeated
K/V for GQA nor any mask: key ranges and the causal offset ``Lk - Lq`` come in as lengths.

Forward (``segment_attention_forward``): one program per (block of queries, query head) runs an
online softmax over the three key ranges with one inner loop, ``_attend``, called per range.
A few queries (decode: ``Lq`` of 1 to 16) run split over the keys instead, in ``triton_decode.py``;
``one_pass_forward`` is this kernel's launch.

Backward (``segment_attention_backward``): gradient flows into q, the current k/v and the tail
k/v only; no gradient work is spent on the prefix (sinks and history are constants):

* ``_dq_kernel`` (per block of queries): ``dq`` in one pass over the visible keys, with the
  softmax statistics (log-sum-exp) the forward kept (``return_lse``; the autograd path of
  ``ops.py`` keeps them); without them it first recomputes them in a pass of ``q k^T`` of its
  own, one matrix product more.
* ``_dkdv_kernel`` (per block of tail or current keys and KV head): loops over the query heads
  of its GQA group and the query blocks that see it, so no atomics are needed.

On Hopper, for 16-bit inputs with head dims of 64 or 128, the forward and dK/dV run instead as
the warp-specialised Gluon kernels of ``gluon_attention.py`` (same results); ``forward_kernel``
and ``dkdv_kernel`` say which runs, and log it. With the forward's log-sum-exp, that dK/dV
kernel also adds the tail's and current keys' part of dQ (five matrix products a visible pair,
not seven), and ``_dq_kernel`` runs with ``PREFIX_ONLY``: the prefix's part and ``delta``.

Matrix products run in the inputs' dtype when it is fp16/bf16, in the autocast dtype when a
CUDA autocast region asked for one (fp32 K/V are cast in registers, never copied), and in full
fp32 (``ieee``) otherwise; accumulation is always fp32.
"""

from __future__ import annotations

import functools
import logging
import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_LOG2E = 1.4426950408889634

# Block shapes per kernel and head-dim bucket (64, 128, 256: the padded head dim, rounded up):
# (BLOCK_M, BLOCK_N, warps, pipeline stages[, registers a thread]). A register cap (ptxas's
# ``maxnreg``) lets two programs share a multiprocessor where ptxas would otherwise take the whole
# register file for one (255 a thread at 8 warps). The 128 column is what ``bench/tune_kernels.py``
# measured fastest on an H200 at D=128, bf16 (``bench/results/tune_kernels-NVIDIA_H200.json``).
# The 256 column keeps each kernel's shared memory under Hopper's 227 KB (the 128 column's tiles
# would need up to 384 KB there), by ``bench/kernel_resources.py``'s report; untimed. "decode" is
# the forward for at most 16 queries. The interpreter runs any shape: small tiles keep the CPU
# tests fast and still exercise multi-block loops and partial blocks.
TILES = {
    "fwd": {64: (128, 64, 4, 3), 128: (128, 128, 8, 3), 256: (64, 64, 8, 2)},
    "decode": {64: (16, 64, 4, 3), 128: (16, 64, 4, 3), 256: (16, 64, 4, 2)},
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
_INTERPRETER_TILE = (16, 16, 1, 1)


# ---- kernels ----------------------------------------------------------------------------------
@triton.jit
def _heaviest_first(pid, n):
    """The query block a program takes: the last first. A later query block sees more current
    keys (causal), so launching those first leaves the light ones to fill the last wave (H200,
    bf16, the benchmark shape: forward 7.04 -> 6.88 ms for plan none)."""
    return n - 1 - pid


@triton.jit
def _batch_and_kv_head(bk, Hk):
    """Batch row and KV head of a program indexed by ``b * Hk + kv_head`` (int64: they scale strides)."""
    return (bk // Hk).to(tl.int64), (bk % Hk).to(tl.int64)


@triton.jit
def _attend(
    acc, m_i, l_i, q, K, V, stride_kn, stride_vn, lo, hi, n_keys, q_pos, qk_scale,
    MASK_N: tl.constexpr, CAUSAL: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, D_K: tl.constexpr, D_V: tl.constexpr,
    DOT: tl.constexpr, PRECISION: tl.constexpr, EMPTY_ROWS: tl.constexpr = False,
):
    """Online softmax of ``q`` over keys ``[lo, hi)`` of one range (keys ``K``, values ``V``).
    ``EMPTY_ROWS``: a row may see none of these keys (a split of the decode kernel past a query's
    causal limit); its maximum stays -inf, and the exponentials are taken against 0 instead."""
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
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
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT), v.to(DOT), input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _prefix(SK, SV, HK, HV, Slot, b, kvh,
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


@triton.jit
def _fwd_kernel(
    Q, K, V, TK, TV, SK, SV, HK, HV, Slot, Out, Lse, qk_scale,
    s_qb, s_qh, s_qm, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn,
    s_tkb, s_tkh, s_tkn, s_tvb, s_tvh, s_tvn,
    s_skb, s_skh, s_skn, s_svb, s_svh, s_svn,
    s_hkb, s_hkh, s_hkn, s_hvb, s_hvh, s_hvn,
    s_ob, s_oh, s_om,
    H, GROUP, Lq, Lk, T, G, P,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    D_K: tl.constexpr, D_V: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr, STORE_LSE: tl.constexpr,
):
    pid_m = _heaviest_first(tl.program_id(0), tl.num_programs(0))
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    kvh = (h // GROUP).to(tl.int64)
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = tl.load(Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qm + offs_dk[None, :],
                mask=(offs_m[:, None] < Lq) & (offs_dk[None, :] < D_K), other=0.0).to(DOT)

    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    q_pos = offs_m + (Lk - Lq)  # each query's index among the current keys

    pk, pv, n_pre, skn, svn = _prefix(SK, SV, HK, HV, Slot, b, kvh, s_skb, s_skh, s_svb, s_svh,
                                      s_hkb, s_hkh, s_hvb, s_hvh, s_skn, s_svn, s_hkn, s_hvn, G, P)
    acc, m_i, l_i = _attend_range(acc, m_i, l_i, q, pk, pv, skn, svn, n_pre, q_pos, qk_scale,
                                  BLOCK_N, BLOCK_DK, BLOCK_DV, D_K, D_V, DOT, PRECISION)
    acc, m_i, l_i = _attend_range(acc, m_i, l_i, q, TK + b * s_tkb + kvh * s_tkh, TV + b * s_tvb + kvh * s_tvh,
                                  s_tkn, s_tvn, T, q_pos, qk_scale, BLOCK_N, BLOCK_DK, BLOCK_DV, D_K, D_V, DOT, PRECISION)
    # current segment: blocks every query of this block sees whole, then the diagonal blocks
    ck = K + b * s_kb + kvh * s_kh
    cv = V + b * s_vb + kvh * s_vh
    first_pos = m0 + (Lk - Lq)
    full_hi = ((first_pos + 1) // BLOCK_N) * BLOCK_N
    diag_hi = tl.minimum(Lk, first_pos + BLOCK_M)
    acc, m_i, l_i = _attend(acc, m_i, l_i, q, ck, cv, s_kn, s_vn, 0, full_hi, Lk, q_pos, qk_scale,
                            False, False, BLOCK_N, BLOCK_DK, BLOCK_DV, D_K, D_V, DOT, PRECISION)
    acc, m_i, l_i = _attend(acc, m_i, l_i, q, ck, cv, s_kn, s_vn, full_hi, diag_hi, Lk, q_pos, qk_scale,
                            True, True, BLOCK_N, BLOCK_DK, BLOCK_DV, D_K, D_V, DOT, PRECISION)

    out = acc / l_i[:, None]
    tl.store(Out + b * s_ob + h * s_oh + offs_m[:, None] * s_om + offs_dv[None, :], out.to(Out.dtype.element_ty),
             mask=(offs_m[:, None] < Lq) & (offs_dv[None, :] < D_V))
    if STORE_LSE:  # base 2, in units of the scaled scores: what the backward's exp2(s - lse) needs
        tl.store(Lse + bh.to(tl.int64) * Lq + offs_m, m_i + tl.math.log2(l_i), mask=offs_m < Lq)


@triton.jit
def _attend_range(acc, m_i, l_i, q, K, V, skn, svn, n, q_pos, qk_scale,
                  BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
                  D_K: tl.constexpr, D_V: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr):
    """A range every query sees whole: full blocks unmasked, then the last partial block."""
    n_full = (n // BLOCK_N) * BLOCK_N
    acc, m_i, l_i = _attend(acc, m_i, l_i, q, K, V, skn, svn, 0, n_full, n, q_pos, qk_scale,
                            False, False, BLOCK_N, BLOCK_DK, BLOCK_DV, D_K, D_V, DOT, PRECISION)
    acc, m_i, l_i = _attend(acc, m_i, l_i, q, K, V, skn, svn, n_full, n, n, q_pos, qk_scale,
                            True, False, BLOCK_N, BLOCK_DK, BLOCK_DV, D_K, D_V, DOT, PRECISION)
    return acc, m_i, l_i


@triton.jit
def _softmax_stats(m_i, l_i, q, K, stride_kn, lo, hi, n_keys, q_pos, qk_scale,
                   MASK_N: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr,
                   D_K: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr):
    """Running max and sum of ``exp2(q k^T)`` over keys ``[lo, hi)`` (the log-sum-exp pass)."""
    offs_dk = tl.arange(0, BLOCK_DK)
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        key_ok = offs_n < n_keys
        kt = tl.load(K + offs_n[None, :] * stride_kn + offs_dk[:, None],
                     mask=key_ok[None, :] & (offs_dk[:, None] < D_K), other=0.0)
        s = tl.dot(q, kt.to(DOT), input_precision=PRECISION) * qk_scale
        if MASK_N:
            s = tl.where(key_ok[None, :], s, float("-inf"))
        if CAUSAL:
            s = tl.where(offs_n[None, :] <= q_pos[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        l_i = l_i * tl.math.exp2(m_i - m_new) + tl.sum(tl.math.exp2(s - m_new[:, None]), 1)
        m_i = m_new
    return m_i, l_i


@triton.jit
def _dq_keys(dq, q, do, lse, delta, K, V, stride_kn, stride_vn, lo, hi, n_keys, q_pos, qk_scale,
             MASK_N: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr,
             BLOCK_DV: tl.constexpr, D_K: tl.constexpr, D_V: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr):
    """Accumulate ``dS K`` over keys ``[lo, hi)`` (scaled by the caller)."""
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        key_ok = offs_n < n_keys
        kt = tl.load(K + offs_n[None, :] * stride_kn + offs_dk[:, None],
                     mask=key_ok[None, :] & (offs_dk[:, None] < D_K), other=0.0).to(DOT)
        vt = tl.load(V + offs_n[None, :] * stride_vn + offs_dv[:, None],
                     mask=key_ok[None, :] & (offs_dv[:, None] < D_V), other=0.0).to(DOT)
        s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
        p = tl.math.exp2(s - lse[:, None])
        if MASK_N:
            p = tl.where(key_ok[None, :], p, 0.0)
        if CAUSAL:
            p = tl.where(offs_n[None, :] <= q_pos[:, None], p, 0.0)
        dp = tl.dot(do, vt, input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(DOT), tl.trans(kt), input_precision=PRECISION)
    return dq


@triton.jit
def _dq_kernel(
    Q, K, V, TK, TV, SK, SV, HK, HV, Slot, Out, dOut, dQ, Lse, Delta, qk_scale, sm_scale,
    s_qb, s_qh, s_qm, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn,
    s_tkb, s_tkh, s_tkn, s_tvb, s_tvh, s_tvn,
    s_skb, s_skh, s_skn, s_svb, s_svh, s_svn,
    s_hkb, s_hkh, s_hkn, s_hvb, s_hvh, s_hvn,
    s_ob, s_oh, s_om, s_dob, s_doh, s_dom, s_dqb, s_dqh, s_dqm,
    H, GROUP, Lq, Lk, T, G, P,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    D_K: tl.constexpr, D_V: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr, LSE_GIVEN: tl.constexpr,
    PREFIX_ONLY: tl.constexpr = False,
):
    pid_m = _heaviest_first(tl.program_id(0), tl.num_programs(0))
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    kvh = (h // GROUP).to(tl.int64)
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < Lq
    row = bh.to(tl.int64) * Lq + offs_m
    q = tl.load(Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qm + offs_dk[None, :],
                mask=row_ok[:, None] & (offs_dk[None, :] < D_K), other=0.0).to(DOT)
    dv_mask = row_ok[:, None] & (offs_dv[None, :] < D_V)
    o = tl.load(Out + b * s_ob + h * s_oh + offs_m[:, None] * s_om + offs_dv[None, :], mask=dv_mask, other=0.0)
    do = tl.load(dOut + b * s_dob + h * s_doh + offs_m[:, None] * s_dom + offs_dv[None, :], mask=dv_mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    do = do.to(DOT)
    q_pos = offs_m + (Lk - Lq)

    pk, pv, n_pre, skn, svn = _prefix(SK, SV, HK, HV, Slot, b, kvh, s_skb, s_skh, s_svb, s_svh,
                                      s_hkb, s_hkh, s_hvb, s_hvh, s_skn, s_svn, s_hkn, s_hvn, G, P)
    tk = TK + b * s_tkb + kvh * s_tkh
    tv = TV + b * s_tvb + kvh * s_tvh
    ck = K + b * s_kb + kvh * s_kh
    cv = V + b * s_vb + kvh * s_vh
    first_pos = m0 + (Lk - Lq)
    full_hi = ((first_pos + 1) // BLOCK_N) * BLOCK_N
    diag_hi = tl.minimum(Lk, first_pos + BLOCK_M)

    if LSE_GIVEN:  # kept by the forward
        lse = tl.load(Lse + row, mask=row_ok, other=float("inf"))
    else:  # pass 1: log-sum-exp (base 2) of every query row
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        m_i, l_i = _softmax_stats(m_i, l_i, q, pk, skn, 0, n_pre, n_pre, q_pos, qk_scale,
                                  True, False, BLOCK_N, BLOCK_DK, D_K, DOT, PRECISION)
        m_i, l_i = _softmax_stats(m_i, l_i, q, tk, s_tkn, 0, T, T, q_pos, qk_scale,
                                  True, False, BLOCK_N, BLOCK_DK, D_K, DOT, PRECISION)
        m_i, l_i = _softmax_stats(m_i, l_i, q, ck, s_kn, 0, full_hi, Lk, q_pos, qk_scale,
                                  False, False, BLOCK_N, BLOCK_DK, D_K, DOT, PRECISION)
        m_i, l_i = _softmax_stats(m_i, l_i, q, ck, s_kn, full_hi, diag_hi, Lk, q_pos, qk_scale,
                                  True, True, BLOCK_N, BLOCK_DK, D_K, DOT, PRECISION)
        lse = m_i + tl.math.log2(l_i)
    lse = tl.where(row_ok, lse, float("inf"))  # rows past Lq: p = 0 in every later product

    # pass 2: dq
    dq = tl.zeros([BLOCK_M, BLOCK_DK], dtype=tl.float32)
    dq = _dq_keys(dq, q, do, lse, delta, pk, pv, skn, svn, 0, n_pre, n_pre, q_pos, qk_scale,
                  True, False, BLOCK_N, BLOCK_DK, BLOCK_DV, D_K, D_V, DOT, PRECISION)
    if not PREFIX_ONLY:  # else the fused dK/dV kernel adds the tail's and current keys' part
        dq = _dq_keys(dq, q, do, lse, delta, tk, tv, s_tkn, s_tvn, 0, T, T, q_pos, qk_scale,
                      True, False, BLOCK_N, BLOCK_DK, BLOCK_DV, D_K, D_V, DOT, PRECISION)
        dq = _dq_keys(dq, q, do, lse, delta, ck, cv, s_kn, s_vn, 0, full_hi, Lk, q_pos, qk_scale,
                      False, False, BLOCK_N, BLOCK_DK, BLOCK_DV, D_K, D_V, DOT, PRECISION)
        dq = _dq_keys(dq, q, do, lse, delta, ck, cv, s_kn, s_vn, full_hi, diag_hi, Lk, q_pos, qk_scale,
                      True, True, BLOCK_N, BLOCK_DK, BLOCK_DV, D_K, D_V, DOT, PRECISION)

    tl.store(dQ + b * s_dqb + h * s_dqh + offs_m[:, None] * s_dqm + offs_dk[None, :],
             (dq * sm_scale).to(dQ.dtype.element_ty), mask=row_ok[:, None] & (offs_dk[None, :] < D_K))
    if not LSE_GIVEN:
        tl.store(Lse + row, lse, mask=row_ok)
    tl.store(Delta + row, delta, mask=row_ok)


@triton.jit
def _delta_kernel(Out, dOut, Delta, s_ob, s_oh, s_om, s_dob, s_doh, s_dom, H, Lq,
                  BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr, D_V: tl.constexpr):
    """``delta = rowsum(o * do)`` alone, for a backward whose dq needs no pass of ``_dq_kernel``."""
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_DV)
    mask = (offs_m[:, None] < Lq) & (offs_d[None, :] < D_V)
    o = tl.load(Out + b * s_ob + h * s_oh + offs_m[:, None] * s_om + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(dOut + b * s_dob + h * s_doh + offs_m[:, None] * s_dom + offs_d[None, :], mask=mask, other=0.0)
    tl.store(Delta + bh.to(tl.int64) * Lq + offs_m, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=offs_m < Lq)


@triton.jit
def _dkdv_queries(dk, dv, k, v, Q, dOut, Lse, Delta, s_qm, s_dom, lo, Lq, key_idx, q_off, qk_scale,
                  BLOCK_M: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, D_K: tl.constexpr,
                  D_V: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr):
    """Accumulate dK (unscaled) and dV of one key block over the query rows ``[lo, Lq)`` of one head.

    One loop, masked everywhere (rows past ``Lq``, keys after a query): splitting it into masked
    and unmasked loops, as the forward does, made ptxas spill 388 bytes a thread at 64x64 tiles
    (sm_90a, Triton 3.9) against 4 for this form at 32x128; the masks are elementwise work
    beside four matrix products a tile."""
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    for start in range(lo, Lq, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        row_ok = offs_m < Lq
        qt = tl.load(Q + offs_m[None, :] * s_qm + offs_dk[:, None],
                     mask=row_ok[None, :] & (offs_dk[:, None] < D_K), other=0.0).to(DOT)
        do = tl.load(dOut + offs_m[:, None] * s_dom + offs_dv[None, :],
                     mask=row_ok[:, None] & (offs_dv[None, :] < D_V), other=0.0).to(DOT)
        lse = tl.load(Lse + offs_m, mask=row_ok, other=float("inf"))  # p = 0 on rows past Lq
        delta = tl.load(Delta + offs_m, mask=row_ok, other=0.0)
        st = tl.dot(k, qt, input_precision=PRECISION) * qk_scale  # [BLOCK_N, BLOCK_M]
        pt = tl.math.exp2(st - lse[None, :])
        pt = tl.where(key_idx[:, None] <= (offs_m + q_off)[None, :], pt, 0.0)
        dv += tl.dot(pt.to(DOT), do, input_precision=PRECISION)
        dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(DOT), tl.trans(qt), input_precision=PRECISION)
    return dk, dv


@triton.jit
def _dkdv_kernel(
    Q, K, V, TK, TV, dOut, Lse, Delta, dK, dV, dTK, dTV, qk_scale, sm_scale,
    s_qb, s_qh, s_qm, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn,
    s_tkb, s_tkh, s_tkn, s_tvb, s_tvh, s_tvn,
    s_dob, s_doh, s_dom,
    s_dkb, s_dkh, s_dkn, s_dvb, s_dvh, s_dvn, s_dtkb, s_dtkh, s_dtkn, s_dtvb, s_dtvh, s_dtvn,
    H, Hk, GROUP, Lq, Lk, T, tail_blocks,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    D_K: tl.constexpr, D_V: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    bk = tl.program_id(1)
    b, kvh = _batch_and_kv_head(bk, Hk)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    in_tail = pid_n < tail_blocks
    if in_tail:
        n0 = pid_n * BLOCK_N
        n_keys = T
        pk = TK + b * s_tkb + kvh * s_tkh
        pv = TV + b * s_tvb + kvh * s_tvh
        skn = s_tkn
        svn = s_tvn
    else:
        n0 = (pid_n - tail_blocks) * BLOCK_N
        n_keys = Lk
        pk = K + b * s_kb + kvh * s_kh
        pv = V + b * s_vb + kvh * s_vh
        skn = s_kn
        svn = s_vn
    offs_n = n0 + tl.arange(0, BLOCK_N)
    key_ok = offs_n < n_keys
    k = tl.load(pk + offs_n[:, None] * skn + offs_dk[None, :],
                mask=key_ok[:, None] & (offs_dk[None, :] < D_K), other=0.0).to(DOT)
    v = tl.load(pv + offs_n[:, None] * svn + offs_dv[None, :],
                mask=key_ok[:, None] & (offs_dv[None, :] < D_V), other=0.0).to(DOT)

    dk = tl.zeros([BLOCK_N, BLOCK_DK], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    # query row m sees key n when n <= m + q_off: the causal offset for current keys, and for
    # tail keys one large enough that every query sees every key
    q_off = tl.where(in_tail, T + BLOCK_N, Lk - Lq)
    # the first query block that sees any key of this block
    causal_lo = 0 if in_tail else (tl.maximum(n0 - q_off, 0) // BLOCK_M) * BLOCK_M
    for g in range(0, GROUP):
        h = kvh * GROUP + g
        row_base = (b * H + h) * Lq
        dk, dv = _dkdv_queries(dk, dv, k, v, Q + b * s_qb + h * s_qh, dOut + b * s_dob + h * s_doh,
                               Lse + row_base, Delta + row_base, s_qm, s_dom, causal_lo, Lq, offs_n, q_off, qk_scale,
                               BLOCK_M, BLOCK_DK, BLOCK_DV, D_K, D_V, DOT, PRECISION)
    dk = dk * sm_scale
    mask_k = key_ok[:, None] & (offs_dk[None, :] < D_K)
    mask_v = key_ok[:, None] & (offs_dv[None, :] < D_V)
    if in_tail:
        tl.store(dTK + b * s_dtkb + kvh * s_dtkh + offs_n[:, None] * s_dtkn + offs_dk[None, :],
                 dk.to(dTK.dtype.element_ty), mask=mask_k)
        tl.store(dTV + b * s_dtvb + kvh * s_dtvh + offs_n[:, None] * s_dtvn + offs_dv[None, :],
                 dv.to(dTV.dtype.element_ty), mask=mask_v)
    else:
        tl.store(dK + b * s_dkb + kvh * s_dkh + offs_n[:, None] * s_dkn + offs_dk[None, :],
                 dk.to(dK.dtype.element_ty), mask=mask_k)
        tl.store(dV + b * s_dvb + kvh * s_dvh + offs_n[:, None] * s_dvn + offs_dv[None, :],
                 dv.to(dV.dtype.element_ty), mask=mask_v)


# ---- host side --------------------------------------------------------------------------------
_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def compute_dtype(q: torch.Tensor) -> torch.dtype:
    """The dtype of the matrix products: q's if half precision, else the CUDA autocast dtype if
    autocast is on, else fp32."""
    if q.dtype in (torch.float16, torch.bfloat16):
        return q.dtype
    if q.device.type == "cuda" and torch.is_autocast_enabled("cuda"):
        return torch.get_autocast_dtype("cuda")
    return torch.float32


@functools.cache
def _slots(long_range: tuple[int, ...], num_kv_heads: int, device: torch.device) -> torch.Tensor:
    """``slot[c]``: the row of KV head ``c`` in the history tensors, -1 for a local head."""
    slot = torch.full((num_kv_heads,), -1, dtype=torch.int32)
    for i, c in enumerate(long_range):
        slot[c] = i
    return slot.to(device)


def _usable(t: torch.Tensor) -> torch.Tensor:
    """Unit stride on the last axis; an empty range gets a one-element stand-in so that no null
    pointer reaches the launcher (the kernels never read it)."""
    if t.numel() == 0:
        return t.new_zeros(1, 1, 1, max(t.shape[-1], 1))
    return t if t.stride(-1) == 1 else t.contiguous()


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _blocks(kind: str, head_dim: int, lq: int, table: str = "16-bit") -> dict:
    """The tile of ``kind`` for this head dim from ``table`` (``_tile_table``)."""
    if kind == "fwd" and lq <= 16:
        kind = "decode"
    table = {"16-bit": TILES, "wide": TILES_WIDE, "fp32": TILES_FP32}[table]
    tile = _INTERPRETER_TILE if _INTERPRET else table[kind][min(b for b in (64, 128, 256) if b >= _block_d(head_dim))]
    return tile_options(tile)


def tile_options(tile: tuple[int, ...]) -> dict:
    """A ``TILES`` entry, (BLOCK_M, BLOCK_N, warps, stages[, register cap]), as launch options."""
    return dict(zip(("BLOCK_M", "BLOCK_N", "num_warps", "num_stages", "maxnreg"), tile))


def _tile_table(dot: torch.dtype, tensors) -> str:
    """fp32 products; else 16-bit products with some 4-byte input (twice the shared memory a
    pipeline stage); else all 16-bit."""
    if dot == torch.float32:
        return "fp32"
    return "wide" if any(t.element_size() > 2 for t in tensors) else "16-bit"


def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _same_dtype(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    wide = torch.promote_types(a.dtype, b.dtype)
    return a.to(wide), b.to(wide)


def _common(q, k, v, tail_k, tail_v, sink_k, sink_v, hist_k, hist_v, long_range):
    B, H, lq, dk = q.shape
    hk, lk, dv = k.shape[1], k.shape[2], v.shape[-1]
    if H % hk:
        raise ValueError(f"segment_attention: {H} query heads are not a multiple of {hk} KV heads")
    if lk < lq:
        raise ValueError(f"segment_attention: {lk} current keys for {lq} queries; the queries are the last of the keys")
    dot = compute_dtype(q)
    if sink_k.dtype != hist_k.dtype:  # one kernel branch reads either: one pointer type (sinks are few)
        sink_k, sink_v = sink_k.to(hist_k.dtype), sink_v.to(hist_v.dtype)
    # likewise tail and current keys in dK/dV (under autocast Llama's V leaves its projection in
    # bf16 while the carried tail keeps the run's dtype): both in the wider dtype
    k, tail_k = _same_dtype(k, tail_k)
    v, tail_v = _same_dtype(v, tail_v)
    tensors = [_usable(t) for t in (q, k, v, tail_k, tail_v, sink_k, sink_v, hist_k, hist_v)]
    shape = dict(
        B=B, H=H, Hk=hk, GROUP=H // hk, Lq=lq, Lk=lk, T=tail_k.shape[2], G=sink_k.shape[2], P=hist_k.shape[2],
        D_K=dk, D_V=dv, BLOCK_DK=_block_d(dk), BLOCK_DV=_block_d(dv),
        TABLE=_tile_table(dot, tensors),
    )
    meta = dict(DOT=_TL_DTYPES[dot], PRECISION="ieee" if dot == torch.float32 else "tf32")
    return tensors, shape, meta, _slots(tuple(long_range), hk, q.device)


def segment_attention_forward(q, k, v, tail_k, tail_v, sink_k, sink_v, hist_k, hist_v, long_range, scale,
                              return_lse: bool = False):
    """Triton forward; same arguments and result as ``segment_attention_reference``. With
    ``return_lse``: ``(out, lse)``, the log-sum-exp of every query row (base 2, of the scaled
    scores; ``[B * H * Lq]`` fp32), which the backward then need not recompute. A few queries
    (decode) run split over the keys (``triton_decode.py``), more in one pass over them."""
    from . import triton_decode  # a module of its own, which builds on this one

    tensors, s, meta, slots = _common(q, k, v, tail_k, tail_v, sink_k, sink_v, hist_k, hist_v, long_range)
    kernel = forward_kernel(tensors, s)
    if kernel == "gluon-ws":
        out, lse = _gluon().forward(tensors, s, slots, scale, return_lse)
    else:
        forward = triton_decode.split_keys_forward if kernel == "split-keys" else one_pass_forward
        out, lse = forward(tensors, s, meta, slots, scale, return_lse)
    return (out, lse) if return_lse else out


def forward_kernel(tensors, s: dict) -> str:
    """Which forward runs: ``"split-keys"`` (decode, ``triton_decode.py``), ``"gluon-ws"`` (the
    warp-specialised Hopper kernel of ``gluon_attention.py``, where it applies and Gluon imports)
    or ``"one-pass"`` (``_fwd_kernel``). Logged at debug level on first use of each."""
    from . import triton_decode

    if triton_decode.splits_keys(s):
        kernel = "split-keys"
    elif _gluon_applies(tensors, s):
        kernel = "gluon-ws"
    else:
        kernel = "one-pass"
    _log_kernel(kernel)
    return kernel


def dkdv_kernel(tensors, s: dict, grad_out: torch.Tensor, lse_given: bool = False, tail_grads: bool = True) -> str:
    """Which dK/dV kernel the backward runs, where the Gluon forward applies and the output
    gradient has the inputs' dtype: ``"gluon-ws+dq"`` (``gluon_attention.dkdv`` adding the tail's
    and current keys' part of dQ, the prefix's coming from ``_dq_kernel``) when the forward's
    log-sum-exp is given and every tail key is differentiated (or there is no tail), else
    ``"gluon-ws"`` (dK/dV alone). Elsewhere ``"triton"`` (``_dkdv_kernel``). Logged like
    ``forward_kernel``."""
    if not (_gluon_applies(tensors, s) and grad_out.dtype == tensors[0].dtype):
        kernel = "triton"
    elif lse_given and (tail_grads or s["T"] == 0):
        kernel = "gluon-ws+dq"
    else:
        kernel = "gluon-ws"
    _log_kernel(kernel, "dK/dV")
    return kernel


@functools.cache
def _log_kernel(kernel: str, part: str = "forward") -> None:
    logging.getLogger(__name__).debug("segment_attention %s runs the %s kernel", part, kernel)


def _gluon_applies(tensors, s: dict) -> bool:
    """Gluon imports, Triton is not interpreting, and ``gluon_attention.supported`` holds."""
    return not _INTERPRET and _gluon() is not None and _gluon().supported(tensors, s)


@functools.cache
def _gluon():
    """``gluon_attention``, or None where this Triton has no Gluon for Hopper."""
    try:
        from . import gluon_attention
    except ImportError:
        return None
    return gluon_attention


def one_pass_forward(tensors, s, meta, slots, scale, return_lse: bool):
    """``(out, lse)``: one program per block of queries and query head, over all its keys
    (``lse`` a one-element stand-in unless ``return_lse``)."""
    q_, k_, v_, tk, tv, sk, sv, hk_, hv = tensors
    out = torch.empty(s["B"], s["H"], s["Lq"], s["D_V"], dtype=q_.dtype, device=q_.device)
    lse = torch.empty(s["B"] * s["H"] * s["Lq"] if return_lse else 1, dtype=torch.float32, device=q_.device)
    blocks = _blocks("fwd", s["D_K"], s["Lq"], s["TABLE"])
    grid = (triton.cdiv(s["Lq"], blocks["BLOCK_M"]), s["B"] * s["H"])
    _fwd_kernel[grid](
        q_, k_, v_, tk, tv, sk, sv, hk_, hv, slots, out, lse, scale * _LOG2E,
        *_strides(q_), *_strides(k_), *_strides(v_), *_strides(tk), *_strides(tv),
        *_strides(sk), *_strides(sv), *_strides(hk_), *_strides(hv), *_strides(out),
        s["H"], s["GROUP"], s["Lq"], s["Lk"], s["T"], s["G"], s["P"],
        BLOCK_DK=s["BLOCK_DK"], BLOCK_DV=s["BLOCK_DV"], D_K=s["D_K"], D_V=s["D_V"], STORE_LSE=return_lse,
        **meta, **blocks,
    )
    return out, lse


def segment_attention_backward(grad_out, out, q, k, v, tail_k, tail_v, sink_k, sink_v, hist_k, hist_v,
                               long_range, scale, tail_needs_grad: bool = True, lse: torch.Tensor | None = None):
    """Gradients ``(dq, dk, dv, dtail_k, dtail_v)`` of ``segment_attention``; the tail's are
    ``None`` when ``tail_needs_grad`` is false (no work is done for them). ``lse``: the forward's
    (``return_lse``); without it the dQ kernel recomputes it in a pass of its own."""
    tensors, s, meta, slots = _common(q, k, v, tail_k, tail_v, sink_k, sink_v, hist_k, hist_v, long_range)
    do = _usable(grad_out)
    tail_grads = tail_needs_grad and s["T"] > 0
    kernel = dkdv_kernel(tensors, s, do, lse is not None, tail_grads)
    fused = kernel == "gluon-ws+dq"  # five matrix products a visible pair instead of seven
    dq, lse, delta = _launch_dq(tensors, s, meta, slots, _usable(out), do, scale, lse, prefix_only=fused)
    if kernel == "triton":
        dk, dv, dtk, dtv = _launch_dkdv(tensors, s, meta, do, lse, delta, scale, tail_grads)
    else:
        dk, dv, dtk, dtv = _gluon().dkdv(tensors, s, do, lse, delta, scale, tail_grads, dq=dq if fused else None)
    # each gradient in its input's dtype (they differ from the kernels' when _common widened one)
    dtk, dtv = (None, None) if dtk is None else (dtk.to(tail_k.dtype), dtv.to(tail_v.dtype))
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dtk, dtv


def _launch_dq(tensors, s, meta, slots, o, do, scale, lse=None, prefix_only: bool = False):
    """dq, with the log-sum-exp (computed unless given) and ``delta = rowsum(o * do)`` of every
    query row, for dK/dV. ``prefix_only`` (``lse`` given): only the prefix keys' part of dq, in
    fp32, for the fused dK/dV kernel to add the rest to; zeros and ``_delta_kernel``'s delta when
    no head has prefix keys."""
    q_, k_, v_, tk, tv, sk, sv, hk_, hv = tensors
    blocks = _blocks("dq", s["D_K"], s["Lq"], s["TABLE"])
    B, H, lq = s["B"], s["H"], s["Lq"]
    given = lse is not None
    assert given or not prefix_only, "prefix_only needs the forward's log-sum-exp"
    delta = torch.empty(B * H * lq, dtype=torch.float32, device=q_.device)
    if prefix_only and s["G"] == 0 and (s["P"] == 0 or hk_.shape[1] == 0):  # no prefix keys: dq starts at zero
        _delta_kernel[(triton.cdiv(lq, 64), B * H)](o, do, delta, *_strides(o), *_strides(do), H, lq,
                                                    BLOCK_M=64, BLOCK_DV=s["BLOCK_DV"], D_V=s["D_V"])
        return q_.new_zeros(B, H, lq, s["D_K"], dtype=torch.float32), lse, delta
    dq = q_.new_empty(B, H, lq, s["D_K"], dtype=torch.float32 if prefix_only else None)
    lse = lse if given else torch.empty(B * H * lq, dtype=torch.float32, device=q_.device)
    _dq_kernel[(triton.cdiv(lq, blocks["BLOCK_M"]), B * H)](
        q_, k_, v_, tk, tv, sk, sv, hk_, hv, slots, o, do, dq, lse, delta, scale * _LOG2E, scale,
        *_strides(q_), *_strides(k_), *_strides(v_), *_strides(tk), *_strides(tv),
        *_strides(sk), *_strides(sv), *_strides(hk_), *_strides(hv),
        *_strides(o), *_strides(do), *_strides(dq),
        H, s["GROUP"], lq, s["Lk"], s["T"], s["G"], s["P"],
        BLOCK_DK=s["BLOCK_DK"], BLOCK_DV=s["BLOCK_DV"], D_K=s["D_K"], D_V=s["D_V"], LSE_GIVEN=given,
        PREFIX_ONLY=prefix_only, **meta, **blocks,
    )
    return dq, lse, delta


def _launch_dkdv(tensors, s, meta, do, lse, delta, scale, tail_needs_grad: bool):
    """dK/dV of the current keys and, when ``tail_needs_grad``, of the tail keys (else ``None``)."""
    q_, k_, v_, tk, tv = tensors[:5]
    B, Hk = s["B"], s["Hk"]
    dk = k_.new_empty(B, Hk, s["Lk"], s["D_K"])
    dv = v_.new_empty(B, Hk, s["Lk"], s["D_V"])
    dtk = tk.new_empty(B, Hk, s["T"], s["D_K"]) if tail_needs_grad else None
    dtv = tv.new_empty(B, Hk, s["T"], s["D_V"]) if tail_needs_grad else None
    blocks = _blocks("dkdv", s["D_K"], s["Lq"], s["TABLE"])
    tail_blocks = triton.cdiv(s["T"], blocks["BLOCK_N"]) if tail_needs_grad else 0
    grid = (tail_blocks + triton.cdiv(s["Lk"], blocks["BLOCK_N"]), B * Hk)
    dtk_, dtv_ = (dtk, dtv) if tail_needs_grad else (dk, dv)  # never written when there are no tail blocks
    _dkdv_kernel[grid](
        q_, k_, v_, tk, tv, do, lse, delta, dk, dv, dtk_, dtv_, scale * _LOG2E, scale,
        *_strides(q_), *_strides(k_), *_strides(v_), *_strides(tk), *_strides(tv), *_strides(do),
        *_strides(dk), *_strides(dv), *_strides(dtk_), *_strides(dtv_),
        s["H"], Hk, s["GROUP"], s["Lq"], s["Lk"], s["T"], tail_blocks,
        BLOCK_DK=s["BLOCK_DK"], BLOCK_DV=s["BLOCK_DV"], D_K=s["D_K"], D_V=s["D_V"], **meta, **blocks,
    )
    return dk, dv, dtk, dtv
