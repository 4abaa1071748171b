"""Warp-specialised kernels of ``segment_attention`` for Hopper (sm_90), in Gluon: the forward and
the backward's dK/dV kernel (which can also add dQ); ``dispatch.py`` says where they run.

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

The dK/dV kernel (``dkdv``) has the same roles with keys and queries swapped: the producer streams
Q and dO blocks past a block of 128 keys, whose two halves the consumers own. Given an fp32 dQ,
it also adds those keys' part of it (``FUSE_DQ``: ``dS K`` through shared memory and a TMA
reduce-add), so the backward needs no second pass over the tail and current keys.

Same key ranges, semantics and results as the Triton kernels, from the same ``Problem``
(``problem.prepare``); only 16-bit inputs with head dims of 64 or 128 (``supported``). TMA reads
every ``[B, heads, L, D]`` tensor in place, with its own strides (``_tiles``), in boxes of
``[1, 1, rows, D]``: a block that runs past ``L`` reads zeros, never the next head's rows; the
score mask (forward) or the masked store (dK/dV) removes them.
"""

from __future__ import annotations

import functools

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
from triton.experimental.gluon.language._core import builtin
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
from triton._C.libtriton import ir

from .problem import Problem
from .triton_common import COMPILE_OPTIONS, LOG2E

# the TMA load's name: ``async_copy_global_to_shared`` up to Triton 3.6, ``async_load`` after
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared


@builtin
def _tma_add_36(tensor_desc, coord, src, _semantic=None):
    """TMA reduce-add of a shared-memory tile into global memory. Triton 3.6's builder has the op
    but its Gluon has no wrapper for it (later ones have ``tma.async_atomic_add``, this same call)."""
    coord = _semantic._convert_to_ir_values(coord, require_i64=False)
    _semantic.builder.create_async_tma_reduce(ir.DESCRIPTOR_REDUCE_KIND.ADD, tensor_desc.handle, coord, src.handle)


_tma_add = getattr(tma, "async_atomic_add", None) or _tma_add_36
# a barrier of the calling partition's threads: ``thread_barrier`` up to Triton 3.6, ``barrier`` after
_sync_threads = getattr(gl, "barrier", None) or gl.thread_barrier

BLOCK_M = 128  # two consumer warpgroups of 64 rows
HALF_M = 64
BLOCK_N = 128
STAGES = 2
NUM_WARPS = 4  # the launch's warps: the first consumer warpgroup (the others are the partitions')
_GL_DTYPES = {torch.float16: gl.float16, torch.bfloat16: gl.bfloat16}
_GL_TILE_DTYPES = {**_GL_DTYPES, torch.float32: gl.float32}  # fp32: the dQ accumulator


@gluon.jit
def _mat(buf, i):
    """Slot ``i`` of a TMA ring (``[slots, 1, 1, rows, D]``: boxes of a ``[B, heads, L, D]``
    tensor) as the ``[rows, D]`` matrix the products take."""
    return buf.index(i).reshape([buf.shape[3], buf.shape[4]])


@gluon.jit
def _issue_pair(a, b_ring, b_ready, c, d_ring, d_ready, s, phase, zero):
    """The backward's two score-shaped products of ring slot ``s``, issued together, each once
    its slot is full: ``a @ b^T`` (``S``) and ``c @ d^T`` (``dP``), or their transposes."""
    mbarrier.wait(b_ready.index(s), phase)
    x = warpgroup_mma(a, _mat(b_ring, s).permute((1, 0)), zero, use_acc=False, is_async=True)
    mbarrier.wait(d_ready.index(s), phase)
    y = warpgroup_mma(c, _mat(d_ring, s).permute((1, 0)), zero, use_acc=False, is_async=True)
    return x, y


# ---- producer ---------------------------------------------------------------------------------
@gluon.jit
def _load_pair(ad, bd, b, head, row, c, a_smem, b_smem, a_ready, b_ready, a_empty, b_empty,
               STAGES: gl.constexpr):
    """Ring position ``c``: once the consumers free its slot, the TMA loads of the blocks at
    ``[b, head, row]`` of ``ad`` and ``bd`` (K and V, or Q and dO), each with its own barriers."""
    s = c % STAGES
    free = ((c // STAGES) & 1) ^ 1
    mbarrier.wait(a_empty.index(s), free)
    mbarrier.expect(a_ready.index(s), ad.block_type.nbytes)
    _tma_load(ad, [b, head, row, 0], a_ready.index(s), a_smem.index(s))
    mbarrier.wait(b_empty.index(s), free)
    mbarrier.expect(b_ready.index(s), bd.block_type.nbytes)
    _tma_load(bd, [b, head, row, 0], b_ready.index(s), b_smem.index(s))


@gluon.jit
def _load_range(kd, vd, b, head, n, c, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty,
                BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    """TMA loads of the K/V blocks of one range (the first ``n`` rows of ``[b, head]`` in ``kd`` /
    ``vd``) into the ring, from ring position ``c`` on; returns the next position."""
    for start in range(0, n, BLOCK_N):
        _load_pair(kd, vd, b, head, start, c, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty, STAGES)
        c += 1
    return c


@gluon.jit
def _producer(qd, kd, vd, tkd, tvd, skd, svd, hkd, hvd, q_smem, k_smem, v_smem, q_ready, k_ready, v_ready,
              k_empty, v_empty, b, h, kvh, slot, m0, n_pre, T, n_cur,
              BLOCK_N: gl.constexpr, HALF_M: gl.constexpr, STAGES: gl.constexpr):
    """Q of the query block, then the K/V blocks of every range."""
    for half in gl.static_range(2):
        mbarrier.expect(q_ready.index(half), qd.block_type.nbytes)
        _tma_load(qd, [b, h, m0 + half * HALF_M, 0], q_ready.index(half), q_smem.index(half))
    c = 0
    if slot >= 0:
        c = _load_range(hkd, hvd, b, slot, n_pre, c, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty, BLOCK_N, STAGES)
    else:
        c = _load_range(skd, svd, b, kvh, n_pre, c, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty, BLOCK_N, STAGES)
    c = _load_range(tkd, tvd, b, kvh, T, c, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty, BLOCK_N, STAGES)
    _load_range(kd, vd, b, kvh, n_cur, c, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty, BLOCK_N, STAGES)


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
        qk = warpgroup_mma(q, _mat(k_smem, s).permute((1, 0)), zero, use_acc=False, is_async=True)
        acc = warpgroup_mma(p, _mat(v_smem, prev), acc, is_async=True)
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
    q = _mat(q_smem, HALF)
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
    acc = warpgroup_mma(p, _mat(v_smem, last), acc, is_async=True)
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
def _query_block(Slot, H, GROUP, Lq, Lk, G, P, HALF_M: gl.constexpr):
    """A query-block program's ``(bh, b, h, kvh, m0, slot, n_pre, n_cur)``: its 128 query rows
    from ``m0``, the heaviest blocks first; its prefix length and the current keys it sees."""
    pid_m = gl.num_programs(0) - 1 - gl.program_id(0)  # the heaviest query blocks first, as the Triton forward
    bh = gl.program_id(1)
    b = bh // H
    h = bh % H
    kvh = h // GROUP
    m0 = pid_m * (2 * HALF_M)
    slot = gl.load(Slot + kvh)
    n_pre = gl.where(slot >= 0, P, G)
    n_cur = gl.minimum(Lk, m0 + 2 * HALF_M + (Lk - Lq))  # current keys this query block sees
    return bh, b, h, kvh, m0, slot, n_pre, n_cur


@gluon.jit
def _ring_barriers(STAGES: gl.constexpr):
    """The barriers of a query-block program: ``q_ready`` (one a consumer half) and, a ring slot,
    ``k_ready, v_ready`` (TMA) and ``k_empty, v_empty`` (both consumers)."""
    bar_layout: gl.constexpr = mbarrier.MBarrierLayout()
    q_ready = gl.allocate_shared_memory(gl.int64, [2, 1], bar_layout)
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar_layout)
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar_layout)
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar_layout)
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar_layout)
    for i in gl.static_range(2):
        mbarrier.init(q_ready.index(i), count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=2)
        mbarrier.init(v_empty.index(i), count=2)
    return q_ready, k_ready, v_ready, k_empty, v_empty


@gluon.jit
def _fwd_ws_kernel(qd, kd, vd, tkd, tvd, skd, svd, hkd, hvd, Slot, Out, Lse, qk_scale, s_om,
                   H, Hk, GROUP, NL, Lq, Lk, T, G, P,
                   D_K: gl.constexpr, D_V: gl.constexpr, PINGPONG: gl.constexpr, STORE_LSE: gl.constexpr,
                   HALF_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    bh, b, h, kvh, m0, slot, n_pre, n_cur = _query_block(Slot, H, GROUP, Lq, Lk, G, P, HALF_M)

    dtype: gl.constexpr = qd.dtype
    q_smem = gl.allocate_shared_memory(dtype, [2, 1, 1, HALF_M, D_K], qd.layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, 1, BLOCK_N, D_K], kd.layout)
    # one spare V slot, zeroed: the "previous block" of the first block (its P is zero)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES + 1, 1, 1, BLOCK_N, D_V], vd.layout)
    zero_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    _mat(v_smem, STAGES).store(gl.zeros([BLOCK_N, D_V], dtype, zero_layout))

    q_ready, k_ready, v_ready, k_empty, v_empty = _ring_barriers(STAGES)
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(2):
        mbarrier.init(turn.index(i), count=1)
    fence_async_shared()

    o_row = bh.to(gl.int64) * Lq
    gl.warp_specialize(
        [
            (_consumer, (q_smem, k_smem, v_smem, q_ready, k_ready, v_ready, k_empty, v_empty, turn, Out, Lse, o_row, s_om,
                         m0, Lq, Lk, n_pre, T, n_cur, qk_scale, 0, PINGPONG, STORE_LSE, D_V, HALF_M, BLOCK_N, STAGES)),
            (_consumer, (q_smem, k_smem, v_smem, q_ready, k_ready, v_ready, k_empty, v_empty, turn, Out, Lse, o_row, s_om,
                         m0, Lq, Lk, n_pre, T, n_cur, qk_scale, 1, PINGPONG, STORE_LSE, D_V, HALF_M, BLOCK_N, STAGES)),
            (_producer, (qd, kd, vd, tkd, tvd, skd, svd, hkd, hvd, q_smem, k_smem, v_smem, q_ready, k_ready,
                         v_ready, k_empty, v_empty, b, h, kvh, slot, m0, n_pre, T, n_cur, BLOCK_N, HALF_M, STAGES)),
        ],
        [4, 1],
        [240, 24],
    )


# ---- launch -----------------------------------------------------------------------------------
def supported(p: Problem) -> bool:
    """Where the kernels of this module apply: Hopper, 16-bit inputs and products throughout
    (tile table "16-bit"), equal head dims of 64 or 128, more queries than a decode step."""
    q = p.q
    return (
        runs_on(q.device) and takes(q.dtype)
        and all(t.dtype == q.dtype for t in p.tensors)
        and p.tile_table == "16-bit" and p.D_K == p.D_V and p.D_K in (64, 128) and p.Lq > 16
    )


def takes(dtype: torch.dtype) -> bool:
    """Inputs of ``dtype`` can be the kernels' (fp16 or bf16; every input in the one dtype)."""
    return dtype in _GL_DTYPES


def runs_on(device: torch.device) -> bool:
    """A Hopper GPU (compute capability 9.x): the warp-specialised kernels need its TMA and wgmma."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9


def _tiles(t: torch.Tensor, block_rows: int, block_cols: int | None = None) -> TensorDescriptor:
    """A TMA descriptor over ``t`` (``[B, heads, L, D]``, its own strides: a slice of a longer
    sequence or a transposed projection is read in place) in boxes of ``[1, 1, block_rows,
    block_cols]`` (all ``D`` columns by default). A box that runs past ``L`` reads zeros (and a
    write or reduce there is dropped). Strides TMA cannot take (not multiples of 16 bytes) get a
    contiguous copy."""
    if t.stride(-1) != 1 or t.data_ptr() % 16 or any(st * t.element_size() % 16 for st in t.stride()[:-1]):
        t = t.contiguous()
    # a dimension of one element is never stepped along: give it the stride it would have if dense
    strides = list(t.stride())
    for i in range(t.dim() - 2, -1, -1):
        if t.shape[i] == 1:
            strides[i] = strides[i + 1] * t.shape[i + 1]
    block = [1, 1, block_rows, block_cols or t.shape[-1]]
    return TensorDescriptor(t, list(t.shape), strides, block, _shared_layout(tuple(block), t.dtype))


@functools.cache
def _shared_layout(block: tuple[int, ...], dtype: torch.dtype) -> gl.NVMMASharedLayout:
    """The shared-memory layout of a ``block`` of ``dtype``: a function of the two alone, cached
    because building it is most of a descriptor's host time (a launch builds about ten, and a
    training step launches these kernels three times a layer a segment)."""
    return gl.NVMMASharedLayout.get_default_for(list(block), _GL_TILE_DTYPES[dtype])


def launch_args(p: Problem, scale: float, return_lse: bool, pingpong: bool = False):
    """``(grid, args, constexprs, out, lse)``: the forward kernel's launch for ``forward``'s
    arguments, with the output and log-sum-exp tensors it writes (``lse`` a one-element stand-in
    unless ``return_lse``)."""
    B, H, Lq = p.B, p.H, p.Lq
    out = torch.empty(B, H, Lq, p.D_V, dtype=p.q.dtype, device=p.q.device)
    lse = torch.empty(B * H * Lq if return_lse else 1, dtype=torch.float32, device=p.q.device)
    descs = [_tiles(p.q, HALF_M)] + [_tiles(t, BLOCK_N) for t in p.tensors[1:]]
    args = [*descs, p.slots, out, lse, scale * LOG2E, out.stride(2),
            H, p.Hk, p.group, p.hist_k.shape[1], Lq, p.Lk, p.T, p.G, p.P]
    constexprs = dict(D_K=p.D_K, D_V=p.D_V, PINGPONG=pingpong, STORE_LSE=return_lse,
                      HALF_M=HALF_M, BLOCK_N=BLOCK_N, STAGES=STAGES)
    return (triton.cdiv(Lq, BLOCK_M), B * H), args, constexprs, out, lse


def forward(p: Problem, scale: float, return_lse: bool, pingpong: bool = False):
    """``(out, lse)`` as ``triton_attention.one_pass_forward`` gives them.
    ``pingpong``: the consumers take turns to issue their products; measured slower (H200, the
    kernel benchmark: 9.4 against 6.7 ms for plan none), so off."""
    grid, args, constexprs, out, lse = launch_args(p, scale, return_lse, pingpong)
    _fwd_ws_kernel[grid](*args, **constexprs, num_warps=NUM_WARPS, **COMPILE_OPTIONS)
    return out, lse


# ---- backward: dK/dV ---------------------------------------------------------------------------
# One program per block of BWD_BLOCK_N tail or current keys and KV head; a producer warp streams
# the Q and dO blocks of every query head of the GQA group that sees those keys; two consumer
# warpgroups each own BWD_HALF_N of the keys and accumulate their dK, dV in registers. The
# products run with keys as rows (S^T = K Q^T, dP^T = V dO^T), so P^T and dS^T are already the
# left operands of dV += P^T dO and dK += dS^T Q: nothing goes through shared memory.
BWD_BLOCK_M = 64  # queries a step
BWD_HALF_N = 64  # keys a consumer
BWD_STAGES = 2


@gluon.jit
def _dkdv_producer(qd, dod, kd, vd, tkd, tvd, q_smem, do_smem, k_smem, v_smem, kv_ready, q_ready, do_ready,
                   q_empty, do_empty, in_tail, b, kvh, n0, Lq, GROUP, lo,
                   BLOCK_M: gl.constexpr, HALF_N: gl.constexpr, STAGES: gl.constexpr):
    mbarrier.expect(kv_ready, 2 * kd.block_type.nbytes + 2 * vd.block_type.nbytes)
    for half in gl.static_range(2):
        if in_tail:
            _tma_load(tkd, [b, kvh, n0 + half * HALF_N, 0], kv_ready, k_smem.index(half))
            _tma_load(tvd, [b, kvh, n0 + half * HALF_N, 0], kv_ready, v_smem.index(half))
        else:
            _tma_load(kd, [b, kvh, n0 + half * HALF_N, 0], kv_ready, k_smem.index(half))
            _tma_load(vd, [b, kvh, n0 + half * HALF_N, 0], kv_ready, v_smem.index(half))
    c = 0
    for g in range(GROUP):
        h = kvh * GROUP + g
        for start in range(lo, Lq, BLOCK_M):
            _load_pair(qd, dod, b, h, start, c, q_smem, do_smem, q_ready, do_ready, q_empty, do_empty, STAGES)
            c += 1


@gluon.jit
def _share_ds(dst, ds_smem, ds_ready, c, HALF: gl.constexpr):
    """Put this consumer's ``dS^T`` in shared memory (buffer ``c % 2``: the other consumer may
    still be reading the previous one) and wait until the other consumer's is there too."""
    ds_smem.index(2 * (c % 2) + HALF).store(dst)
    fence_async_shared()
    _sync_threads()  # every thread's part is written before this consumer arrives
    mbarrier.arrive(ds_ready, count=1)
    mbarrier.wait(ds_ready, c & 1)


@gluon.jit
def _dq_part(k_smem, ds_smem, dq_smem, dqd, b, h, start, c, sm_scale,
             HALF: gl.constexpr, BLOCK_M: gl.constexpr, D: gl.constexpr):
    """``dQ += dS K`` of this key block (both consumers' ``dS^T``, ``_share_ds``) for query block
    ``start`` of head ``h``, in columns ``HALF`` of the head dim, TMA-reduced into the fp32 dQ
    rows (``dqd``). The tile's previous reduce, one step back, must have read it first."""
    dq_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, D // 2, 16])
    cols: gl.constexpr = HALF * (D // 2)
    buf = c % 2
    dq = gl.zeros([BLOCK_M, D // 2], gl.float32, dq_layout)
    dq = warpgroup_mma(ds_smem.index(2 * buf).permute((1, 0)), _mat(k_smem, 0).slice(cols, D // 2, dim=1), dq,
                       use_acc=False, is_async=True)
    dq = warpgroup_mma(ds_smem.index(2 * buf + 1).permute((1, 0)), _mat(k_smem, 1).slice(cols, D // 2, dim=1), dq,
                       is_async=True)
    dq = warpgroup_mma_wait(0, deps=(dq,))
    tma.store_wait(0)
    _sync_threads()  # the previous reduce has read the tile
    _mat(dq_smem, HALF).store(dq * sm_scale)
    fence_async_shared()
    _sync_threads()  # every thread's part is written before one thread issues the reduce
    _tma_add(dqd, [b, h, start, cols], dq_smem.index(HALF))


@gluon.jit
def _dkdv_steps(st, k, v, k_smem, q_smem, do_smem, q_ready, do_ready, q_empty, do_empty, Lse, Delta,
                ds_smem, ds_ready, dq_smem, dqd, b, h, sm_scale,
                lo, hi, Lq, key_idx, q_off, qk_scale,
                CAUSAL: gl.constexpr, FUSE_DQ: gl.constexpr, HALF: gl.constexpr, D: gl.constexpr,
                BLOCK_M: gl.constexpr, HALF_N: gl.constexpr,
                STAGES: gl.constexpr, s_layout: gl.constexpr, acc_layout: gl.constexpr):
    """Accumulate this consumer's ``dK`` (unscaled) and ``dV`` over the query blocks ``[lo, hi)``
    of head ``h`` (``Lse`` and ``Delta`` at its first row), and with ``FUSE_DQ`` add each block's
    ``dS K`` to its dQ rows (``_share_ds``, ``_dq_part``). ``S^T`` and ``dP^T`` are issued
    together; ``P^T`` is computed while ``dP^T`` runs. Leaving a block's ``dV, dK`` products
    running into the next block (waited with the next ``S^T``) makes ptxas serialise every
    ``wgmma`` of the loop (its warning C7512, Triton 3.9), so each block waits for its own; the
    dQ product is issued after that wait (issued before it, with one wait for all three, it
    measured slower: more registers live at once)."""
    op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
    cols: gl.constexpr = gl.SliceLayout(0, s_layout)
    row_load: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
    dk, dv, c = st
    for start in range(lo, hi, BLOCK_M):
        s = c % STAGES
        phase = (c // STAGES) & 1
        offs_m = start + gl.arange(0, BLOCK_M, layout=cols)
        # the row vectors are loaded one element a thread and then spread to the columns of the
        # score tile: loaded there directly, each thread would hold 16 addresses of each
        rows = start + gl.arange(0, BLOCK_M, layout=row_load)
        lse = gl.convert_layout(gl.load(Lse + rows, mask=rows < Lq, other=float("inf")), cols)  # p = 0 past Lq
        zero = gl.zeros([HALF_N, BLOCK_M], gl.float32, s_layout)
        st_, dpt = _issue_pair(k, q_smem, q_ready, v, do_smem, do_ready, s, phase, zero)
        st_ = warpgroup_mma_wait(1, deps=(st_,))
        pt = gl.exp2(st_ * qk_scale - lse[None, :])
        if CAUSAL:
            pt = gl.where(key_idx[:, None] <= offs_m[None, :] + q_off, pt, 0.0)
        delta = gl.convert_layout(gl.load(Delta + rows, mask=rows < Lq, other=0.0), cols)
        dpt = warpgroup_mma_wait(0, deps=(dpt,))
        dst = (pt * (dpt - delta[None, :])).to(k.dtype)
        dv = warpgroup_mma(gl.convert_layout(pt.to(k.dtype), op_layout), _mat(do_smem, s), dv, is_async=True)
        dk = warpgroup_mma(gl.convert_layout(dst, op_layout), _mat(q_smem, s), dk, is_async=True)
        if FUSE_DQ:
            _share_ds(dst, ds_smem, ds_ready, c, HALF)
        dk, dv = warpgroup_mma_wait(0, deps=(dk, dv))
        mbarrier.arrive(q_empty.index(s), count=1)
        mbarrier.arrive(do_empty.index(s), count=1)
        if FUSE_DQ:  # after dV, dK: their operands' registers are free again
            _dq_part(k_smem, ds_smem, dq_smem, dqd, b, h, start, c, sm_scale, HALF, BLOCK_M, D)
        c += 1
    return dk, dv, c


@gluon.jit
def _dkdv_consumer(q_smem, do_smem, k_smem, v_smem, kv_ready, q_ready, do_ready, q_empty, do_empty,
                   ds_smem, ds_ready, dq_smem, dqd, Lse, Delta, dK, dV, b, kvh, out_row, n0, n_keys, q_off,
                   lse_row0, Lq, GROUP, lo, mask_hi, qk_scale, sm_scale,
                   HALF: gl.constexpr, FUSE_DQ: gl.constexpr, D: gl.constexpr,
                   BLOCK_M: gl.constexpr, HALF_N: gl.constexpr, STAGES: gl.constexpr):
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_M, 16])
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, D, 16])
    first = n0 + HALF * HALF_N
    key_idx = first + gl.arange(0, HALF_N, layout=gl.SliceLayout(1, s_layout))
    dk = gl.zeros([HALF_N, D], gl.float32, acc_layout)
    dv = gl.zeros([HALF_N, D], gl.float32, acc_layout)
    k = _mat(k_smem, HALF)
    v = _mat(v_smem, HALF)
    mbarrier.wait(kv_ready, 0)
    st = (dk, dv, 0)
    for g in range(GROUP):
        lse_g = Lse + lse_row0 + g * Lq
        delta_g = Delta + lse_row0 + g * Lq
        h = kvh * GROUP + g
        # the query blocks that see only part of these keys (current keys), then those that see all
        st = _dkdv_steps(st, k, v, k_smem, q_smem, do_smem, q_ready, do_ready, q_empty, do_empty, lse_g, delta_g,
                         ds_smem, ds_ready, dq_smem, dqd, b, h, sm_scale,
                         lo, gl.minimum(mask_hi, Lq), Lq, key_idx, q_off, qk_scale,
                         True, FUSE_DQ, HALF, D, BLOCK_M, HALF_N, STAGES, s_layout, acc_layout)
        st = _dkdv_steps(st, k, v, k_smem, q_smem, do_smem, q_ready, do_ready, q_empty, do_empty, lse_g, delta_g,
                         ds_smem, ds_ready, dq_smem, dqd, b, h, sm_scale,
                         mask_hi, Lq, Lq, key_idx, q_off, qk_scale,
                         False, FUSE_DQ, HALF, D, BLOCK_M, HALF_N, STAGES, s_layout, acc_layout)
    dk, dv, c = st
    if FUSE_DQ:
        tma.store_wait(0)  # the last reduce has read its tile before the program ends

    rows = first + gl.arange(0, HALF_N, layout=gl.SliceLayout(1, acc_layout))
    offs_d = gl.arange(0, D, layout=gl.SliceLayout(0, acc_layout))
    mask = (rows[:, None] < n_keys) & (offs_d[None, :] < D)
    offs = (out_row + rows.to(gl.int64))[:, None] * D + offs_d[None, :]
    gl.store(dK + offs, (dk * sm_scale).to(dK.dtype.element_ty), mask=mask)
    gl.store(dV + offs, dv.to(dV.dtype.element_ty), mask=mask)


@gluon.jit
def _dkdv_ws_kernel(qd, dod, kd, vd, tkd, tvd, dqd, Lse, Delta, dK, dV, dTK, dTV, qk_scale, sm_scale,
                    H, Hk, GROUP, Lq, Lk, T, tail_blocks,
                    D: gl.constexpr, FUSE_DQ: gl.constexpr, BLOCK_M: gl.constexpr, HALF_N: gl.constexpr,
                    STAGES: gl.constexpr):
    bk = gl.program_id(0)  # KV heads vary fastest: the heaviest key blocks (tail, then the first current) first
    pid_n = gl.program_id(1)
    b = bk // Hk
    kvh = bk % Hk
    in_tail = pid_n < tail_blocks
    n0 = gl.where(in_tail, pid_n, pid_n - tail_blocks) * (2 * HALF_N)
    n_keys = gl.where(in_tail, T, Lk)
    # query row m sees key n when n <= m + q_off (current keys); tail keys are seen by every query
    q_off = Lk - Lq
    lo = gl.where(in_tail, 0, (gl.maximum(n0 - q_off, 0) // BLOCK_M) * BLOCK_M)
    # the first query block from lo whose every row sees every key of the block
    full_from = gl.maximum(n0 + 2 * HALF_N - 1 - q_off, lo)
    mask_hi = gl.where(in_tail, 0, lo + ((full_from - lo + BLOCK_M - 1) // BLOCK_M) * BLOCK_M)

    dtype: gl.constexpr = qd.dtype
    q_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, 1, BLOCK_M, D], qd.layout)
    do_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, 1, BLOCK_M, D], dod.layout)
    k_smem = gl.allocate_shared_memory(dtype, [2, 1, 1, HALF_N, D], kd.layout)
    v_smem = gl.allocate_shared_memory(dtype, [2, 1, 1, HALF_N, D], vd.layout)
    bar_layout: gl.constexpr = mbarrier.MBarrierLayout()
    kv_ready = gl.allocate_shared_memory(gl.int64, [1], bar_layout)
    q_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar_layout)
    do_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar_layout)
    q_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar_layout)
    do_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar_layout)
    ds_ready = gl.allocate_shared_memory(gl.int64, [1], bar_layout)
    mbarrier.init(kv_ready, count=1)
    mbarrier.init(ds_ready, count=2)
    for i in gl.static_range(STAGES):
        mbarrier.init(q_ready.index(i), count=1)
        mbarrier.init(do_ready.index(i), count=1)
        mbarrier.init(q_empty.index(i), count=2)
        mbarrier.init(do_empty.index(i), count=2)
    if FUSE_DQ:
        # dS^T of both consumers, two steps deep; each consumer's dQ columns on their way out
        ds_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([HALF_N, BLOCK_M], dtype)
        ds_smem = gl.allocate_shared_memory(dtype, [4, HALF_N, BLOCK_M], ds_layout)
        dq_smem = gl.allocate_shared_memory(gl.float32, [2, 1, 1, BLOCK_M, D // 2], dqd.layout)
    else:
        ds_smem = k_smem
        dq_smem = k_smem
    fence_async_shared()

    kv_row = b * Hk + kvh
    lse_row0 = (b * H + kvh * GROUP) * Lq  # the group's first query row in Lse, Delta
    out_row = kv_row.to(gl.int64) * n_keys
    if in_tail:
        gk = dTK
        gv = dTV
    else:
        gk = dK
        gv = dV
    gl.warp_specialize(
        [
            (_dkdv_consumer, (q_smem, do_smem, k_smem, v_smem, kv_ready, q_ready, do_ready, q_empty, do_empty,
                              ds_smem, ds_ready, dq_smem, dqd, Lse, Delta, gk, gv, b, kvh, out_row, n0, n_keys,
                              q_off, lse_row0, Lq, GROUP, lo, mask_hi, qk_scale, sm_scale,
                              0, FUSE_DQ, D, BLOCK_M, HALF_N, STAGES)),
            (_dkdv_consumer, (q_smem, do_smem, k_smem, v_smem, kv_ready, q_ready, do_ready, q_empty, do_empty,
                              ds_smem, ds_ready, dq_smem, dqd, Lse, Delta, gk, gv, b, kvh, out_row, n0, n_keys,
                              q_off, lse_row0, Lq, GROUP, lo, mask_hi, qk_scale, sm_scale,
                              1, FUSE_DQ, D, BLOCK_M, HALF_N, STAGES)),
            (_dkdv_producer, (qd, dod, kd, vd, tkd, tvd, q_smem, do_smem, k_smem, v_smem, kv_ready, q_ready,
                              do_ready, q_empty, do_empty, in_tail, b, kvh, n0, Lq, GROUP, lo,
                              BLOCK_M, HALF_N, STAGES)),
        ],
        [4, 1],
        [240, 24],
    )


def dkdv_launch_args(p: Problem, do, lse, delta, scale: float, tail_needs_grad: bool,
                     dq: torch.Tensor | None = None, block_m: int = BWD_BLOCK_M, stages: int = BWD_STAGES):
    """``(grid, args, constexprs, (dk, dv, dtk, dtv))``: the dK/dV kernel's launch; ``dtk, dtv``
    are None unless ``tail_needs_grad``. ``dq``: an fp32 ``[B, H, Lq, D]`` tensor the kernel adds
    the tail and current keys' part of dQ to (``FUSE_DQ``), or None."""
    q, k, v, tail_k, tail_v = p.q, p.k, p.v, p.tail_k, p.tail_v
    B, Hk, Lk, T, D = p.B, p.Hk, p.Lk, p.T, p.D_K
    dk = torch.empty(B, Hk, Lk, D, dtype=k.dtype, device=k.device)
    dv = torch.empty_like(dk)
    dtk = torch.empty(B, Hk, T, D, dtype=k.dtype, device=k.device) if tail_needs_grad else None
    dtv = torch.empty_like(dtk) if tail_needs_grad else None
    block_n = 2 * BWD_HALF_N
    tail_blocks = triton.cdiv(T, block_n) if tail_needs_grad else 0
    descs = [_tiles(q, block_m), _tiles(do, block_m)] + [_tiles(t, BWD_HALF_N) for t in (k, v, tail_k, tail_v)]
    descs.append(descs[0] if dq is None else _tiles(dq, block_m, D // 2))  # q's: a stand-in, never used
    args = [*descs, lse, delta, dk, dv, dk if dtk is None else dtk, dv if dtv is None else dtv,
            scale * LOG2E, scale, p.H, Hk, p.group, p.Lq, Lk, T, tail_blocks]
    constexprs = dict(D=D, FUSE_DQ=dq is not None, BLOCK_M=block_m, HALF_N=BWD_HALF_N, STAGES=stages)
    grid = (B * Hk, tail_blocks + triton.cdiv(Lk, block_n))
    return grid, args, constexprs, (dk, dv, dtk, dtv)


def dkdv(p: Problem, do, lse, delta, scale: float, tail_needs_grad: bool, dq: torch.Tensor | None = None,
         **variant):
    """``(dk, dv, dtk, dtv)`` as ``triton_attention.launch_dkdv`` gives them, from the dQ kernel's
    log-sum-exp and ``delta`` rows; with ``dq`` (fp32, ``[B, H, Lq, D]``), also adds the tail and
    current keys' part of dQ to it. Then every tail key must be differentiated
    (``tail_needs_grad`` or no tail): the tail blocks are the only programs that visit tail keys."""
    if dq is not None and p.T > 0 and not tail_needs_grad:
        raise ValueError("dkdv: fusing dQ needs the tail's key blocks (tail_needs_grad), or no tail")
    grid, args, constexprs, grads = dkdv_launch_args(p, do, lse, delta, scale, tail_needs_grad, dq, **variant)
    _dkdv_ws_kernel[grid](*args, **constexprs, num_warps=NUM_WARPS, **COMPILE_OPTIONS)
    return grads


# the jit functions by the launch that builds their arguments (``launch_args``, ``dkdv_launch_args``),
# for tools that compile one alone (``tests/test_gluon_attention.py``)
KERNELS = {"forward": _fwd_ws_kernel, "dkdv": _dkdv_ws_kernel}
