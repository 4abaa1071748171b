"""Warp-specialised forward of ``segment_attention`` for Hopper (sm_90), in Gluon.

The Triton forward (``triton_attention._fwd_kernel``) runs two warpgroups in lock step: they meet
at a CTA barrier every key block (the shared-memory pipeline's), so both are in their softmax at
once and the tensor cores idle through it. Here the roles are split, as in FlashAttention-3:

* a producer warp loads Q once and then every K/V block with TMA into a ring of ``STAGES``
  buffers (``k_ready`` / ``v_ready`` barriers say a buffer is full, ``k_empty, v_empty`` that both
  consumers are done with it);
* two consumer warpgroups each own 64 of the block's 128 query rows. A consumer issues block
  ``j``'s ``S = Q K^T`` together with block ``j - 1``'s ``P V`` and then does block ``j``'s
  softmax while those run. With ``PINGPONG`` the two take turns to issue (``turn`` barriers), so
  one's softmax runs under the other's matrix products.

Same key ranges, semantics and result (output, base-2 log-sum-exp) as the Triton forward; only
16-bit inputs with head dims of 64 or 128 (``supported``). TMA reads each range through a 2-D
view ``[rows, D]`` of a contiguous ``[B, heads, L, D]`` tensor: a block that runs past its range
reads the next head's rows (or zeros past the tensor), which the score mask removes.
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

# the TMA load's name: ``async_copy_global_to_shared`` up to Triton 3.6, ``async_load`` after
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared

BLOCK_M = 128  # two consumer warpgroups of 64 rows
HALF_M = 64
BLOCK_N = 128
STAGES = 2
NUM_WARPS = 4  # the launch's warps: the first consumer warpgroup (the others are the partitions')
_LOG2E = 1.4426950408889634
_GL_DTYPES = {torch.float16: gl.float16, torch.bfloat16: gl.bfloat16}


# ---- producer ---------------------------------------------------------------------------------
@gluon.jit
def _load_range(kd, vd, row0, n, c, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty,
                BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    """TMA loads of the K/V blocks of one range (rows ``row0 .. row0 + n`` of ``kd`` / ``vd``)
    into the ring, from ring position ``c`` on; returns the next position."""
    for start in range(0, n, BLOCK_N):
        s = c % STAGES
        free = ((c // STAGES) & 1) ^ 1
        mbarrier.wait(k_empty.index(s), free)
        mbarrier.expect(k_ready.index(s), kd.block_type.nbytes)
        _tma_load(kd, [row0 + start, 0], k_ready.index(s), k_smem.index(s))
        mbarrier.wait(v_empty.index(s), free)
        mbarrier.expect(v_ready.index(s), vd.block_type.nbytes)
        _tma_load(vd, [row0 + start, 0], v_ready.index(s), v_smem.index(s))
        c += 1
    return c


@gluon.jit
def _producer(qd, kd, vd, tkd, tvd, skd, svd, hkd, hvd, q_smem, k_smem, v_smem, q_ready, k_ready, v_ready,
              k_empty, v_empty, q_row, sink_row, hist_row, tail_row, cur_row, slot, n_pre, T, n_cur,
              BLOCK_N: gl.constexpr, HALF_M: gl.constexpr, STAGES: gl.constexpr):
    for half in gl.static_range(2):
        mbarrier.expect(q_ready.index(half), qd.block_type.nbytes)
        _tma_load(qd, [q_row + half * HALF_M, 0], q_ready.index(half), q_smem.index(half))
    c = 0
    if slot >= 0:
        c = _load_range(hkd, hvd, hist_row, n_pre, c, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty, BLOCK_N, STAGES)
    else:
        c = _load_range(skd, svd, sink_row, n_pre, c, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty, BLOCK_N, STAGES)
    c = _load_range(tkd, tvd, tail_row, T, c, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty, BLOCK_N, STAGES)
    _load_range(kd, vd, cur_row, n_cur, c, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty, BLOCK_N, STAGES)


# ---- consumers --------------------------------------------------------------------------------
@gluon.jit
def _attend(st, q, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty, turn,
            lo, hi, n_keys, q_pos, qk_scale,
            MASK_N: gl.constexpr, CAUSAL: gl.constexpr, HALF: gl.constexpr, PINGPONG: gl.constexpr,
            HALF_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, s_layout: gl.constexpr, o_layout: gl.constexpr):
    """Key blocks ``[lo, hi)`` of one range (ring positions from ``c``). ``p`` holds the previous
    block's probabilities, whose ``P V`` is issued with this block's ``Q K^T``; its V buffer is
    ring slot ``(c - 1) % STAGES``, or the zeroed spare slot ``STAGES`` before the first block."""
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    acc, m_i, l_i, p, c, t = st
    for start in range(lo, hi, BLOCK_N):
        s = c % STAGES
        prev = gl.where(c > 0, (c + STAGES - 1) % STAGES, STAGES)
        mbarrier.wait(k_ready.index(s), (c // STAGES) & 1)
        mbarrier.wait(v_ready.index(prev % STAGES), ((c + STAGES - 1) // STAGES - 1) & 1, pred=c > 0)
        if PINGPONG:
            mbarrier.wait(turn.index(HALF), (t & 1) ^ (1 - HALF))
        zero = gl.zeros([HALF_M, BLOCK_N], gl.float32, s_layout)
        qk = warpgroup_mma(q, k_smem.index(s).permute((1, 0)), zero, use_acc=False, is_async=True)
        acc = warpgroup_mma(p, v_smem.index(prev), acc, is_async=True)
        if PINGPONG:
            mbarrier.arrive(turn.index(1 - HALF), count=1)
            t += 1
        qk = warpgroup_mma_wait(1, deps=(qk,))
        mbarrier.arrive(k_empty.index(s), count=1)
        if MASK_N or CAUSAL:
            offs_n = start + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
            if MASK_N:
                qk = gl.where(offs_n[None, :] < n_keys, qk, float("-inf"))
            if CAUSAL:
                qk = gl.where(offs_n[None, :] <= q_pos[:, None], qk, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(qk, 1) * qk_scale)
        alpha = gl.exp2(m_i - m_new)
        prob = gl.exp2(qk * qk_scale - m_new[:, None])
        l_i = l_i * alpha + gl.sum(prob, 1)
        m_i = m_new
        acc = warpgroup_mma_wait(0, deps=(acc,))
        mbarrier.arrive(v_empty.index(prev % STAGES), count=1, pred=c > 0)
        acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
        p = gl.convert_layout(prob.to(q.dtype), p_layout)
        c += 1
    return acc, m_i, l_i, p, c, t


@gluon.jit
def _consumer(q_smem, k_smem, v_smem, q_ready, k_ready, v_ready, k_empty, v_empty, turn, Out, Lse,
              o_row, s_om, m0, Lq, Lk, n_pre, T, n_cur, qk_scale,
              HALF: gl.constexpr, PINGPONG: gl.constexpr, STORE_LSE: gl.constexpr, D_V: gl.constexpr,
              HALF_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, D_V, 16])
    row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
    first = m0 + HALF * HALF_M
    q_pos = first + gl.arange(0, HALF_M, layout=row_layout) + (Lk - Lq)

    acc = gl.zeros([HALF_M, D_V], gl.float32, o_layout)
    m_i = gl.full([HALF_M], float("-inf"), gl.float32, row_layout)
    l_i = gl.zeros([HALF_M], gl.float32, row_layout)
    p = gl.zeros([HALF_M, BLOCK_N], q_smem.dtype, gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2))
    c = 0
    t = 0
    q = q_smem.index(HALF)
    mbarrier.wait(q_ready.index(HALF), 0)

    # prefix and tail: every query sees them whole; the current segment: the blocks this half's
    # rows see whole, then the diagonal. The last block of the whole 128-row block may lie past
    # every row of the first half: it is masked out, not skipped, so both halves walk the ring alike.
    full_pre = (n_pre // BLOCK_N) * BLOCK_N
    full_tail = (T // BLOCK_N) * BLOCK_N
    full_cur = ((first + (Lk - Lq) + 1) // BLOCK_N) * BLOCK_N
    st = (acc, m_i, l_i, p, c, t)
    st = _attend(st, q, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty, turn, 0, full_pre, n_pre, q_pos, qk_scale,
                 False, False, HALF, PINGPONG, HALF_M, BLOCK_N, STAGES, s_layout, o_layout)
    st = _attend(st, q, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty, turn, full_pre, n_pre, n_pre, q_pos, qk_scale,
                 True, False, HALF, PINGPONG, HALF_M, BLOCK_N, STAGES, s_layout, o_layout)
    st = _attend(st, q, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty, turn, 0, full_tail, T, q_pos, qk_scale,
                 False, False, HALF, PINGPONG, HALF_M, BLOCK_N, STAGES, s_layout, o_layout)
    st = _attend(st, q, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty, turn, full_tail, T, T, q_pos, qk_scale,
                 True, False, HALF, PINGPONG, HALF_M, BLOCK_N, STAGES, s_layout, o_layout)
    st = _attend(st, q, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty, turn, 0, full_cur, Lk, q_pos, qk_scale,
                 False, False, HALF, PINGPONG, HALF_M, BLOCK_N, STAGES, s_layout, o_layout)
    acc, m_i, l_i, p, c, t = _attend(st, q, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty, turn, full_cur, n_cur,
                                     Lk, q_pos, qk_scale, True, True, HALF, PINGPONG, HALF_M, BLOCK_N, STAGES,
                                     s_layout, o_layout)
    # the last block's P V
    last = (c + STAGES - 1) % STAGES
    mbarrier.wait(v_ready.index(last), ((c + STAGES - 1) // STAGES - 1) & 1)
    acc = warpgroup_mma(p, v_smem.index(last), acc, is_async=True)
    acc = warpgroup_mma_wait(0, deps=(acc,))
    mbarrier.arrive(v_empty.index(last), count=1)

    out_rows: gl.constexpr = gl.SliceLayout(1, o_layout)
    offs_m = first + gl.arange(0, HALF_M, layout=out_rows)
    offs_d = gl.arange(0, D_V, layout=gl.SliceLayout(0, o_layout))
    out = acc / gl.convert_layout(l_i, out_rows)[:, None]
    ptrs = Out + o_row * s_om + offs_m[:, None] * s_om + offs_d[None, :]
    gl.store(ptrs, out.to(Out.dtype.element_ty), mask=(offs_m[:, None] < Lq) & (offs_d[None, :] < D_V))
    if STORE_LSE:
        rows = first + gl.arange(0, HALF_M, layout=row_layout)
        gl.store(Lse + o_row + rows, m_i + gl.log2(l_i), mask=rows < Lq)


@gluon.jit
def _fwd_ws_kernel(qd, kd, vd, tkd, tvd, skd, svd, hkd, hvd, Slot, Out, Lse, qk_scale, s_om,
                   H, Hk, GROUP, NL, Lq, Lk, T, G, P,
                   D_K: gl.constexpr, D_V: gl.constexpr, PINGPONG: gl.constexpr, STORE_LSE: gl.constexpr,
                   HALF_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    n_m = gl.num_programs(0)
    pid_m = n_m - 1 - gl.program_id(0)  # the heaviest query blocks first, as the Triton forward
    bh = gl.program_id(1)
    b = bh // H
    h = bh % H
    kvh = h // GROUP
    m0 = pid_m * (2 * HALF_M)
    slot = gl.load(Slot + kvh)
    n_pre = gl.where(slot >= 0, P, G)
    n_cur = gl.minimum(Lk, m0 + 2 * HALF_M + (Lk - Lq))  # current keys this query block sees

    dtype: gl.constexpr = qd.dtype
    q_smem = gl.allocate_shared_memory(dtype, [2, HALF_M, D_K], qd.layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, D_K], kd.layout)
    # one spare V slot, zeroed: the "previous block" of the first block (its P is zero)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES + 1, BLOCK_N, D_V], vd.layout)
    zero_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    v_smem.index(STAGES).store(gl.zeros([BLOCK_N, D_V], dtype, zero_layout))

    bar_layout: gl.constexpr = mbarrier.MBarrierLayout()
    q_ready = gl.allocate_shared_memory(gl.int64, [2, 1], bar_layout)
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar_layout)
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar_layout)
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar_layout)
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar_layout)
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], bar_layout)
    for i in gl.static_range(2):
        mbarrier.init(q_ready.index(i), count=1)
        mbarrier.init(turn.index(i), count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=2)
        mbarrier.init(v_empty.index(i), count=2)
    fence_async_shared()

    o_row = bh.to(gl.int64) * Lq
    q_row = bh * Lq + m0  # TMA coordinates are 32-bit
    kv_row = b * Hk + kvh
    gl.warp_specialize(
        [
            (_consumer, (q_smem, k_smem, v_smem, q_ready, k_ready, v_ready, k_empty, v_empty, turn, Out, Lse, o_row, s_om,
                         m0, Lq, Lk, n_pre, T, n_cur, qk_scale, 0, PINGPONG, STORE_LSE, D_V, HALF_M, BLOCK_N, STAGES)),
            (_consumer, (q_smem, k_smem, v_smem, q_ready, k_ready, v_ready, k_empty, v_empty, turn, Out, Lse, o_row, s_om,
                         m0, Lq, Lk, n_pre, T, n_cur, qk_scale, 1, PINGPONG, STORE_LSE, D_V, HALF_M, BLOCK_N, STAGES)),
            (_producer, (qd, kd, vd, tkd, tvd, skd, svd, hkd, hvd, q_smem, k_smem, v_smem, q_ready, k_ready,
                         v_ready, k_empty, v_empty, q_row, kv_row * G, (b * NL + slot) * P, kv_row * T, kv_row * Lk,
                         slot, n_pre, T, n_cur, BLOCK_N, HALF_M, STAGES)),
        ],
        [4, 1],
        [240, 24],
    )


# ---- launch -----------------------------------------------------------------------------------
def supported(tensors, s: dict) -> bool:
    """Hopper, 16-bit inputs and products throughout (``TABLE`` 16-bit), equal head dims of 64 or
    128, more queries than a decode step (``s``: ``triton_attention._common``'s shape dict)."""
    q = tensors[0]
    return (
        q.is_cuda and torch.cuda.get_device_capability(q.device)[0] == 9 and q.dtype in _GL_DTYPES
        and all(t.dtype == q.dtype for t in tensors)
        and s["TABLE"] == "16-bit" and s["D_K"] == s["D_V"] and s["D_K"] in (64, 128) and s["Lq"] > 16
    )


def _rows(t: torch.Tensor, block_rows: int) -> TensorDescriptor:
    """A TMA descriptor over ``t`` ([B, heads, L, D]) seen as ``[B * heads * L, D]``."""
    t = t.contiguous()
    flat = t.view(-1, t.shape[-1])
    layout = gl.NVMMASharedLayout.get_default_for([block_rows, t.shape[-1]], _GL_DTYPES[t.dtype])
    return TensorDescriptor(flat, list(flat.shape), list(flat.stride()), [block_rows, t.shape[-1]], layout)


def launch_args(tensors, s, slots, scale, return_lse: bool, pingpong: bool = False):
    """``(grid, args, constexprs, out, lse)``: the kernel's launch for ``forward``'s arguments,
    with the output and log-sum-exp tensors it writes (``lse`` a one-element stand-in unless
    ``return_lse``)."""
    q, k, v, tail_k, tail_v, sink_k, sink_v, hist_k, hist_v = tensors
    B, H, Lq = s["B"], s["H"], s["Lq"]
    out = torch.empty(B, H, Lq, s["D_V"], dtype=q.dtype, device=q.device)
    lse = torch.empty(B * H * Lq if return_lse else 1, dtype=torch.float32, device=q.device)
    descs = [_rows(q, HALF_M)] + [_rows(t, BLOCK_N) for t in (k, v, tail_k, tail_v, sink_k, sink_v, hist_k, hist_v)]
    args = [*descs, slots, out, lse, scale * _LOG2E, out.stride(2),
            H, s["Hk"], s["GROUP"], hist_k.shape[1], Lq, s["Lk"], s["T"], s["G"], s["P"]]
    constexprs = dict(D_K=s["D_K"], D_V=s["D_V"], PINGPONG=pingpong, STORE_LSE=return_lse,
                      HALF_M=HALF_M, BLOCK_N=BLOCK_N, STAGES=STAGES)
    return (triton.cdiv(Lq, BLOCK_M), B * H), args, constexprs, out, lse


def forward(tensors, s, slots, scale, return_lse: bool, pingpong: bool = False):
    """``(out, lse)`` as ``triton_attention.one_pass_forward`` gives them, from the same
    arguments (``tensors``, shape dict ``s`` and ``slots`` of ``triton_attention._common``).
    ``pingpong``: the consumers take turns to issue their products; measured slower (H200, the
    kernel benchmark: 9.4 against 6.7 ms for plan none), so off."""
    grid, args, constexprs, out, lse = launch_args(tensors, s, slots, scale, return_lse, pingpong)
    _fwd_ws_kernel[grid](*args, **constexprs, num_warps=NUM_WARPS)
    return out, lse
