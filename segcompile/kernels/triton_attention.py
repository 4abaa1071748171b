"""Triton kernels of ``segment_attention``: the one-pass forward and the backward (the CUDA lowering).

Shapes and semantics are the reference's (``kernels/reference.py``): queries ``q [B, H, Lq, Dk]``
are the last ``Lq`` tokens of the current segment; every query head sees

    [prefix | tail | current, causal]      prefix = sinks (local KV head) or history (long-range)

with query head ``h`` on KV head ``h // (H // Hk)``. The kernels never materialise repeated
K/V for GQA nor any mask: key ranges and the causal offset ``Lk - Lq`` come in as lengths.
Every launcher takes a ``Problem`` (``problem.prepare``); ``dispatch.py`` says which kernel runs
(docs/design.md section 7) and holds the entry points.

Forward (``one_pass_forward``): one program per (block of queries, query head) runs an online
softmax over the three key ranges with one inner loop, ``triton_common.attend``, called per
range. A few queries (decode: ``Lq`` of 1 to 16) run split over the keys instead, in
``triton_decode.py``.

Backward: gradient flows into q, the current k/v and the tail k/v only; no gradient work is
spent on the prefix (sinks and history are constants):

* ``launch_dq`` (``_dq_kernel``, per block of queries): ``dq`` in one pass over the visible
  keys, with the softmax statistics (log-sum-exp) the forward kept (``return_lse``; the autograd
  path of ``ops.py`` keeps them); without them it first recomputes them in a pass of ``q k^T``
  of its own, one matrix product more. ``prefix_only``: the prefix's part and ``delta`` alone,
  for the Hopper dK/dV kernel of ``gluon_attention.py`` that adds the tail's and current keys'
  part of dQ itself (five matrix products a visible pair, not seven).
* ``launch_dkdv`` (``_dkdv_kernel``, per block of tail or current keys and KV head): loops over
  the query heads of its GQA group and the query blocks that see it, so no atomics are needed.

Matrix products run in the inputs' dtype when it is fp16/bf16, in the autocast dtype when a
CUDA autocast region asked for one (fp32 K/V are cast in registers, never copied), and in full
fp32 (``ieee``) otherwise; accumulation is always fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .problem import Problem
from .triton_common import COMPILE_OPTIONS, LOG2E, attend, batch_and_kv_head, history_rows, prefix, strides


# ---- kernels ----------------------------------------------------------------------------------
@triton.jit
def _heaviest_first(pid, n):
    """The query block a program takes: the last first. A later query block sees more current
    keys (causal), so launching those first leaves the light ones to fill the last wave (H200,
    bf16, the benchmark shape: forward 7.04 -> 6.88 ms for plan none)."""
    return n - 1 - pid


@triton.jit
def _fwd_kernel(
    Q, K, V, TK, TV, SK, SV, HK, HV, Slot, Out, Lse, qk_scale,
    s_qb, s_qh, s_qm, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn,
    s_tkb, s_tkh, s_tkn, s_tvb, s_tvh, s_tvn,
    s_skb, s_skh, s_skn, s_svb, s_svh, s_svn,
    s_hkb, s_hkh, s_hkn, s_hvb, s_hvh, s_hvn,
    s_ob, s_oh, s_om,
    H, GROUP, Lq, Lk, T, G, P,
    HKS, HVS, s_ksb, s_ksh, s_vsb, s_vsh, SCALE_S, SCALE_T,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    D_K: tl.constexpr, D_V: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr, STORE_LSE: tl.constexpr,
    HIST_SCALED: tl.constexpr = False, SCALE_BLOCK: tl.constexpr = 64,
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

    if HIST_SCALED:  # a quantised history (fp8 values, per-block scales) and the sinks: two dtypes, two branches
        long_range, hk, hv, ks, vs = history_rows(HK, HV, HKS, HVS, Slot, b, kvh, s_hkb, s_hkh, s_hvb, s_hvh,
                                                  s_ksb, s_ksh, s_vsb, s_vsh)
        if long_range:
            acc, m_i, l_i = _attend_range(acc, m_i, l_i, q, hk, hv, s_hkn, s_hvn, P, q_pos, qk_scale,
                                          BLOCK_N, BLOCK_DK, BLOCK_DV, D_K, D_V, DOT, PRECISION,
                                          ks, vs, SCALE_S, SCALE_T, True, SCALE_BLOCK)
        else:
            acc, m_i, l_i = _attend_range(acc, m_i, l_i, q, SK + b * s_skb + kvh * s_skh, SV + b * s_svb + kvh * s_svh,
                                          s_skn, s_svn, G, q_pos, qk_scale,
                                          BLOCK_N, BLOCK_DK, BLOCK_DV, D_K, D_V, DOT, PRECISION)
    else:
        pk, pv, n_pre, skn, svn = prefix(SK, SV, HK, HV, Slot, b, kvh, s_skb, s_skh, s_svb, s_svh,
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
    acc, m_i, l_i = attend(acc, m_i, l_i, q, ck, cv, s_kn, s_vn, 0, full_hi, Lk, q_pos, qk_scale,
                           False, False, BLOCK_N, BLOCK_DK, BLOCK_DV, D_K, D_V, DOT, PRECISION)
    acc, m_i, l_i = attend(acc, m_i, l_i, q, ck, cv, s_kn, s_vn, full_hi, diag_hi, Lk, q_pos, qk_scale,
                           True, True, BLOCK_N, BLOCK_DK, BLOCK_DV, D_K, D_V, DOT, PRECISION)

    out = acc / l_i[:, None]
    tl.store(Out + b * s_ob + h * s_oh + offs_m[:, None] * s_om + offs_dv[None, :], out.to(Out.dtype.element_ty),
             mask=(offs_m[:, None] < Lq) & (offs_dv[None, :] < D_V))
    if STORE_LSE:  # base 2, in units of the scaled scores: what the backward's exp2(s - lse) needs
        tl.store(Lse + bh.to(tl.int64) * Lq + offs_m, m_i + tl.math.log2(l_i), mask=offs_m < Lq)


@triton.jit
def _attend_range(acc, m_i, l_i, q, K, V, skn, svn, n, q_pos, qk_scale,
                  BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
                  D_K: tl.constexpr, D_V: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
                  KS=None, VS=None, SCALE_S=1, SCALE_T=0, SCALED: tl.constexpr = False,
                  SCALE_BLOCK: tl.constexpr = 64):
    """A range every query sees whole: full blocks unmasked, then the last partial block
    (``SCALED``...: a quantised history, ``triton_common.attend``)."""
    n_full = (n // BLOCK_N) * BLOCK_N
    acc, m_i, l_i = attend(acc, m_i, l_i, q, K, V, skn, svn, 0, n_full, n, q_pos, qk_scale,
                           False, False, BLOCK_N, BLOCK_DK, BLOCK_DV, D_K, D_V, DOT, PRECISION, False,
                           KS, VS, SCALE_S, SCALE_T, SCALED, SCALE_BLOCK)
    acc, m_i, l_i = attend(acc, m_i, l_i, q, K, V, skn, svn, n_full, n, n, q_pos, qk_scale,
                           True, False, BLOCK_N, BLOCK_DK, BLOCK_DV, D_K, D_V, DOT, PRECISION, False,
                           KS, VS, SCALE_S, SCALE_T, SCALED, SCALE_BLOCK)
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

    pk, pv, n_pre, skn, svn = prefix(SK, SV, HK, HV, Slot, b, kvh, s_skb, s_skh, s_svb, s_svh,
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
    b, kvh = batch_and_kv_head(bk, Hk)
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


# the jit functions by their ``TILES`` kind, for tools that compile one alone (``bench/kernel_resources.py``)
KERNELS = {"fwd": _fwd_kernel, "dq": _dq_kernel, "dkdv": _dkdv_kernel}


# ---- launch -----------------------------------------------------------------------------------
def one_pass_forward(p: Problem, scale: float, return_lse: bool):
    """``(out, lse)``: one program per block of queries and query head, over all its keys
    (``lse`` a one-element stand-in unless ``return_lse``)."""
    out = torch.empty(p.B, p.H, p.Lq, p.D_V, dtype=p.q.dtype, device=p.q.device)
    lse = torch.empty(p.B * p.H * p.Lq if return_lse else 1, dtype=torch.float32, device=p.q.device)
    blocks = p.tile("fwd")
    grid = (triton.cdiv(p.Lq, blocks["BLOCK_M"]), p.B * p.H)
    _fwd_kernel[grid](
        *p.tensors, p.slots, out, lse, scale * LOG2E,
        *strides(p.q), *strides(p.k), *strides(p.v), *strides(p.tail_k), *strides(p.tail_v),
        *strides(p.sink_k), *strides(p.sink_v), *strides(p.hist_k), *strides(p.hist_v), *strides(out),
        p.H, p.group, p.Lq, p.Lk, p.T, p.G, p.P, *p.history_scale_args(),
        BLOCK_DK=p.block_dk, BLOCK_DV=p.block_dv, D_K=p.D_K, D_V=p.D_V, STORE_LSE=return_lse,
        **p.dot_options(), **p.history_scale_options(), **blocks, **COMPILE_OPTIONS,
    )
    return out, lse


def launch_dq(p: Problem, o: torch.Tensor, do: torch.Tensor, scale: float, lse: torch.Tensor | None = None,
              prefix_only: bool = False):
    """``(dq, lse, delta)``: dq, with the log-sum-exp (computed unless given) and
    ``delta = rowsum(o * do)`` of every query row, for dK/dV. ``o``, ``do``: unit stride on the
    last axis (``problem.usable``). ``prefix_only`` (``lse`` given): only the prefix keys' part of
    dq, in fp32, for the fused dK/dV kernel to add the rest to; zeros and ``_delta_kernel``'s
    delta when no head has prefix keys."""
    blocks = p.tile("dq")
    B, H, lq = p.B, p.H, p.Lq
    given = lse is not None
    assert given or not prefix_only, "prefix_only needs the forward's log-sum-exp"
    if p.hist_scaled:  # the dQ kernel reads the prefix unscaled
        raise ValueError("launch_dq takes a history in the sinks' dtype: dequantise a quantised one first "
                         "(dispatch.segment_attention_backward does)")
    delta = torch.empty(B * H * lq, dtype=torch.float32, device=p.q.device)
    if prefix_only and p.G == 0 and (p.P == 0 or p.hist_k.shape[1] == 0):  # no prefix keys: dq starts at zero
        _delta_kernel[(triton.cdiv(lq, 64), B * H)](o, do, delta, *strides(o), *strides(do), H, lq,
                                                    BLOCK_M=64, BLOCK_DV=p.block_dv, D_V=p.D_V, **COMPILE_OPTIONS)
        return p.q.new_zeros(B, H, lq, p.D_K, dtype=torch.float32), lse, delta
    dq = p.q.new_empty(B, H, lq, p.D_K, dtype=torch.float32 if prefix_only else None)
    lse = lse if given else torch.empty(B * H * lq, dtype=torch.float32, device=p.q.device)
    _dq_kernel[(triton.cdiv(lq, blocks["BLOCK_M"]), B * H)](
        *p.tensors, p.slots, o, do, dq, lse, delta, scale * LOG2E, scale,
        *strides(p.q), *strides(p.k), *strides(p.v), *strides(p.tail_k), *strides(p.tail_v),
        *strides(p.sink_k), *strides(p.sink_v), *strides(p.hist_k), *strides(p.hist_v),
        *strides(o), *strides(do), *strides(dq),
        H, p.group, lq, p.Lk, p.T, p.G, p.P,
        BLOCK_DK=p.block_dk, BLOCK_DV=p.block_dv, D_K=p.D_K, D_V=p.D_V, LSE_GIVEN=given,
        PREFIX_ONLY=prefix_only, **p.dot_options(), **blocks, **COMPILE_OPTIONS,
    )
    return dq, lse, delta


def launch_dkdv(p: Problem, do: torch.Tensor, lse: torch.Tensor, delta: torch.Tensor, scale: float,
                tail_needs_grad: bool):
    """``(dk, dv, dtk, dtv)``: dK/dV of the current keys and, when ``tail_needs_grad``, of the
    tail keys (else ``None``), from ``launch_dq``'s log-sum-exp and ``delta``."""
    B, Hk = p.B, p.Hk
    dk = p.k.new_empty(B, Hk, p.Lk, p.D_K)
    dv = p.v.new_empty(B, Hk, p.Lk, p.D_V)
    dtk = p.tail_k.new_empty(B, Hk, p.T, p.D_K) if tail_needs_grad else None
    dtv = p.tail_v.new_empty(B, Hk, p.T, p.D_V) if tail_needs_grad else None
    blocks = p.tile("dkdv")
    tail_blocks = triton.cdiv(p.T, blocks["BLOCK_N"]) if tail_needs_grad else 0
    grid = (tail_blocks + triton.cdiv(p.Lk, blocks["BLOCK_N"]), B * Hk)
    dtk_, dtv_ = (dtk, dtv) if tail_needs_grad else (dk, dv)  # never written when there are no tail blocks
    _dkdv_kernel[grid](
        p.q, p.k, p.v, p.tail_k, p.tail_v, do, lse, delta, dk, dv, dtk_, dtv_, scale * LOG2E, scale,
        *strides(p.q), *strides(p.k), *strides(p.v), *strides(p.tail_k), *strides(p.tail_v), *strides(do),
        *strides(dk), *strides(dv), *strides(dtk_), *strides(dtv_),
        p.H, Hk, p.group, p.Lq, p.Lk, p.T, tail_blocks,
        BLOCK_DK=p.block_dk, BLOCK_DV=p.block_dv, D_K=p.D_K, D_V=p.D_V, **p.dot_options(), **blocks, **COMPILE_OPTIONS,
    )
    return dk, dv, dtk, dtv
