"""The Triton kernels of ``segment_attention`` against the PyTorch reference, output and every gradient.

On a machine without CUDA they run in Triton's interpreter (``TRITON_INTERPRET=1``, set by
conftest before the kernels are defined), on tiny shapes. Tolerance: relative error
``max|triton - reference| / max|reference| <= 1e-4`` in fp32, for the output and for each of
the five gradients (q, current k/v, tail k/v) on fresh random inputs.
"""

from __future__ import annotations

import os

import pytest
import torch
import triton
import triton.language as tl

import segcompile as sc
from segcompile.errors import ConfigError
from segcompile.kernels.reference import segment_attention_reference
from segcompile.passes.lower import triton_unavailable
from conftest import captured, random_ids

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and TRITON_INTERPRET is not 1", allow_module_level=True)

from segcompile.kernels import triton_attention, triton_decode  # noqa: E402
from segcompile.kernels.dispatch import segment_attention_backward, segment_attention_forward  # noqa: E402
from segcompile.kernels.history_format import HistoryGeometry, QuantizedHistory, quantize_history  # noqa: E402
from segcompile.kernels.problem import prepare  # noqa: E402
from segcompile.testing.tolerances import tolerance  # noqa: E402

FP32_RTOL = tolerance(torch.float32).relative
# one bf16 op against its fp32 reference, not a model: a few bf16 units (8 mantissa bits) at most,
# stricter than the table's bf16 row, which covers gradients through several layers
BF16_OP_RTOL = 1e-2
GRAD_NAMES = ("q", "k", "v", "tail_k", "tail_v")


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    if want.numel() == 0:
        return 0.0
    return ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-30)).item()


def random_inputs(B, H, Hk, lq, lk, T, G, P, D, long_range, seed, dtype=torch.float32):
    """The nine tensor arguments of segment_attention, random normal, on DEVICE."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float32).to(DEVICE, dtype)

    lr = len(long_range)
    return [
        r(B, H, lq, D), r(B, Hk, lk, D), r(B, Hk, lk, D), r(B, Hk, T, D), r(B, Hk, T, D),
        r(B, Hk, G, D), r(B, Hk, G, D), r(B, lr, P, D), r(B, lr, P, D),
    ]


def reference_and_grads(args, long_range, scale, grad_out_seed):
    live = [a.detach().clone().requires_grad_(i < 5) for i, a in enumerate(args)]
    out = segment_attention_reference(*live, list(long_range), scale)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_out_seed)).to(out)
    out.backward(grad_out)
    return out.detach(), grad_out, [t.grad for t in live[:5]]


# (B, H, Hk, Lq, Lk, T, G, P, D, long_range): each row is an edge case docs/design.md lists
CASES = {
    "first segment, N < S (no tail, sinks or history)": (1, 4, 2, 13, 13, 0, 0, 0, 16, ()),
    "full segment, tail, sinks, GQA 2, one long-range head": (2, 4, 2, 32, 32, 32, 3, 70, 16, (1,)),
    "last short segment": (1, 4, 2, 11, 11, 32, 2, 45, 16, (0,)),
    "T = 0 with history": (1, 2, 2, 20, 20, 0, 0, 37, 16, (0, 1)),
    "G > 0, no head long-range": (1, 4, 4, 24, 24, 24, 4, 0, 16, ()),
    "every head long-range, GQA 4": (1, 8, 2, 19, 19, 16, 0, 50, 16, (1, 0)),
    "decode: one query after a partial segment": (2, 4, 2, 1, 9, 16, 2, 33, 16, (1,)),
    "a few queries after a partial segment": (1, 4, 2, 3, 27, 8, 0, 20, 16, (0,)),
    "head dim 64": (1, 2, 1, 40, 40, 17, 1, 19, 64, (0,)),
    "head dim 8 (padded to the 16-wide dot)": (1, 4, 2, 18, 18, 7, 2, 5, 8, (0,)),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_forward_and_gradients_match_the_reference(case):
    B, H, Hk, lq, lk, T, G, P, D, long_range = case
    args = random_inputs(B, H, Hk, lq, lk, T, G, P, D, long_range, seed=sum(case[:9]))
    scale = D ** -0.5
    want, grad_out, want_grads = reference_and_grads(args, long_range, scale, grad_out_seed=lq)

    torch.manual_seed(0)
    got, lse = segment_attention_forward(*args, list(long_range), scale, return_lse=True)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert relative_error(got, want) <= FP32_RTOL
    assert torch.equal(segment_attention_forward(*args, list(long_range), scale), got)
    # the backward with the forward's log-sum-exp (the autograd path) and with its own pass
    for kept in (lse, None):
        grads = segment_attention_backward(grad_out, got, *args, list(long_range), scale, lse=kept)
        for name, g, w in zip(GRAD_NAMES, grads, want_grads):
            if T == 0 and name.startswith("tail"):
                assert g is None
                continue
            assert g.shape == w.shape, name
            assert torch.isfinite(g).all(), name
            assert relative_error(g, w) <= FP32_RTOL, f"d{name} (lse {'kept' if kept is not None else 'recomputed'}): {relative_error(g, w):.2e}"


@pytest.mark.parametrize("case", ["full segment, tail, sinks, GQA 2, one long-range head", "a few queries after a partial segment"])
def test_kept_log_sum_exp_is_the_reference_softmax_normaliser(case):
    # base 2, of the scaled scores: lse * ln 2 is the natural log-sum-exp of scale * q k^T over
    # each query's visible keys, which the reference's own output pins down (one pass over the
    # keys, and split over them: a few queries)
    B, H, Hk, lq, lk, T, G, P, D, long_range = CASES[case]
    args = random_inputs(B, H, Hk, lq, lk, T, G, P, D, long_range, seed=3)
    q, k, v, tk, tv, sk, sv, hk, hv = args
    _, lse = segment_attention_forward(*args, list(long_range), D ** -0.5, return_lse=True)
    group = H // Hk
    natural = []
    for b in range(B):
        for h in range(H):
            c = h // group
            prefix = hk[b, list(long_range).index(c)] if c in long_range else sk[b, c]
            keys = torch.cat([prefix, tk[b, c], k[b, c]])
            scores = (q[b, h] @ keys.T) * D ** -0.5
            n_before = prefix.shape[0] + T
            visible = torch.arange(keys.shape[0])[None, :] < (n_before + torch.arange(lk - lq, lk) + 1)[:, None]
            natural.append(torch.logsumexp(scores.masked_fill(~visible, float("-inf")), dim=1))
    want = torch.cat(natural)
    assert (lse * torch.log(torch.tensor(2.0)) - want).abs().max() <= 1e-4


@pytest.mark.parametrize("lq", [1, 16])
def test_decode_split_over_the_keys_matches_the_reference(lq, monkeypatch):
    """A few queries run split over the keys (flash-decoding), every query head of a GQA group in
    one program. The case crosses split boundaries inside history, tail and current keys, and its
    last split holds only current keys past the first query's causal limit (with 16 queries):
    that query sees no key there."""
    monkeypatch.setattr(triton_decode, "multiprocessors", lambda device: 2)
    B, H, Hk, T, G, P, D, long_range = 1, 8, 2, 20, 3, 123, 16, (0,)
    lk = 16
    args = random_inputs(B, H, Hk, lq, lk, T, G, P, D, long_range, seed=lq)
    problem = prepare(*args, list(long_range))
    splits, split_len = triton_decode.split_len(problem)
    assert triton_decode.splits_keys(problem) and splits >= 3
    if os.environ.get("TRITON_INTERPRET") == "1":  # the interpreter's 16-key blocks
        assert (splits - 1) * split_len == P + T + 1
    want, grad_out, want_grads = reference_and_grads(args, long_range, D ** -0.5, grad_out_seed=lq)
    got, lse = segment_attention_forward(*args, list(long_range), D ** -0.5, return_lse=True)
    assert torch.isfinite(got).all() and relative_error(got, want) <= FP32_RTOL
    grads = segment_attention_backward(grad_out, got, *args, list(long_range), D ** -0.5, lse=lse)
    for name, g, w in zip(GRAD_NAMES, grads, want_grads):
        assert relative_error(g, w) <= FP32_RTOL, name


@triton.jit
def _split_counts(Longest, Out, n, fewest, most, keys_a_split, BLOCK_N: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    longest = tl.load(Longest + offs, mask=offs < n, other=1)
    tl.store(Out + offs, triton_decode.device_split_count(longest, BLOCK_N, fewest, most, keys_a_split), mask=offs < n)


@pytest.mark.parametrize("block_n,bounds", [(32, (264, 528)), (64, (66, 66)), (16, (1, 3))],
                         ids=["fp8-history", "16-bit-history", "few"])
def test_the_static_decoder_counts_splits_as_the_eager_decode_does(block_n, bounds):
    """The static decoder's kernel counts a token's splits on the device (``device_split_count``),
    the eager decode on the host (``split_count``): the same counts, or the two would sum in
    different orders. Over an fp8 history (bounds of 16 and 32 programs a multiprocessor at the 8B
    shape on 132 of them) the splits hold about ``KEYS_A_SPLIT_FP8`` keys within the bounds."""
    longest = [1, 31, 32, 33, 100, 2047, 2048, 2049, 28_773, 131_173, 262_245, 1_040_485, 4_000_000]
    lengths = torch.tensor(longest, dtype=torch.int32, device=DEVICE)
    out = torch.zeros_like(lengths)
    _split_counts[(1,)](lengths, out, len(longest), *bounds, triton_decode.KEYS_A_SPLIT_FP8, BLOCK_N=block_n, BLOCK=16)
    want = [triton_decode.split_count(n, block_n, bounds) for n in longest]
    assert out.tolist() == want
    if block_n == 32:  # 4 one-block splits of 100 keys; the fewest at 24K, 128K, 256K; ~2,048 keys at 1M; the most
        assert [want[4], want[8], want[9], want[10], want[11], want[12]] == [4, 264, 264, 264, 509, 528]


@pytest.mark.parametrize("long_range,fp8", [((1,), False), ((), False), ((1,), True)],
                         ids=["history", "no-history", "fp8-history"])
def test_static_decode_kernel_sums_as_the_eager_decode_does(long_range, fp8, monkeypatch):
    """The static decoder's kernel (lengths and split length read from the position on the device,
    over its heads-first buffers, whose capacity exceeds what the token sees) gives the split
    kernel's result bit for bit: the same splits, summed in the same order. A CUDA graph's replay
    then agrees with the eager decode beyond rounding, at any depth of the model. With an fp8
    history, both scale the same values by the same per-block scales in registers."""
    monkeypatch.setattr(triton_decode, "multiprocessors", lambda device: 2)
    B, H, Hk, S, T, G, D = 2, 8, 2, 16, 8, 2, 16
    a, offset = 3 * S, 5  # the token at a + offset; the tail holds [a - T, a), history [0, a - T)
    P, lk = a - T, offset + 1
    args = random_inputs(B, H, Hk, 1, lk, T, G, P, D, long_range, seed=7)
    q, k, v, tail_k, tail_v, sink_k, sink_v, hist_k, hist_v = args
    geometry = HistoryGeometry(S, T)
    if fp8:  # the eager decode's QuantizedHistory, and the values and scales the buffers hold
        quantised = [quantize_history(h, 0, geometry, torch.float8_e4m3fn) for h in (hist_k, hist_v)]
        hist_k, hist_v = (QuantizedHistory.of(values, scales, geometry) for values, scales in quantised)
        args = (*args[:7], hist_k, hist_v)
    want = segment_attention_forward(*args, list(long_range), D ** -0.5)

    order = tuple(h for h in range(Hk) if h not in long_range) + long_range  # local heads first
    local = [torch.randn(Hk, B, G + T + S, D, device=DEVICE) for _ in range(2)]  # unread slots: noise
    for buffer, sink, tail, current in zip(local, (sink_k, sink_v), (tail_k, tail_v), (k, v)):
        for row, head in enumerate(order):
            buffer[row, :, :G] = sink[:, head]
            buffer[row, :, G : G + T] = tail[:, head]
            buffer[row, :, G + T : G + T + lk] = current[:, head]
    history, scales = [None, None], None
    if long_range:
        capacity = P + 2 * S
        history = [torch.randn(len(long_range), B, capacity, D, device=DEVICE) for _ in range(2)]
        if fp8:
            history = [buffer.to(torch.float8_e4m3fn) for buffer in history]
            scales = [torch.rand(len(long_range), B, geometry.num_blocks(capacity), device=DEVICE) for _ in range(2)]
            for buffer, scale, (values, block_scales) in zip(history, scales, quantised):
                buffer[:, :, :P] = values.transpose(0, 1)
                scale[:, :, : block_scales.shape[2]] = block_scales.transpose(0, 1)
        else:
            for buffer, hist in zip(history, (hist_k, hist_v)):
                buffer[:, :, :P] = hist.transpose(0, 1)
    rows = torch.tensor([order.index(h) for h in range(Hk)], dtype=torch.int32, device=DEVICE)
    position = torch.tensor(a + offset, device=DEVICE)
    got = triton_decode.static_decode_forward(q, *local, *history, position, rows, n_local=Hk - len(long_range),
                                              segment_len=S, tail_len=T, sinks=G, scale=D ** -0.5,
                                              hist_scales=None if scales is None else tuple(scales))
    assert torch.equal(got, want)


def test_no_tail_gradient_work_when_the_tail_is_detached():
    args = random_inputs(1, 4, 2, 16, 16, 16, 2, 10, 16, (0,), seed=3)
    want, grad_out, want_grads = reference_and_grads(args, (0,), 0.25, grad_out_seed=4)
    out = segment_attention_forward(*args, [0], 0.25)
    dq, dk, dv, dtk, dtv = segment_attention_backward(grad_out, out, *args, [0], 0.25, tail_needs_grad=False)
    assert dtk is None and dtv is None
    for g, w in zip((dq, dk, dv), want_grads):
        assert relative_error(g, w) <= FP32_RTOL


@pytest.mark.parametrize("case", ["full segment, tail, sinks, GQA 2, one long-range head", "every head long-range, GQA 4",
                                  "first segment, N < S (no tail, sinks or history)"])
def test_prefix_only_dq_and_the_rest_add_up_to_the_whole_dq(case):
    # the fused Hopper backward takes dq's prefix part from launch_dq (prefix_only) and adds the
    # tail's and current keys' part itself: here that part comes from launch_dq on the same
    # inputs without a prefix, with the whole problem's log-sum-exp and output
    B, H, Hk, lq, lk, T, G, P, D, long_range = CASES[case]
    args = random_inputs(B, H, Hk, lq, lk, T, G, P, D, long_range, seed=lk + 5)
    scale = D ** -0.5
    _, grad_out, want_grads = reference_and_grads(args, long_range, scale, grad_out_seed=7)
    out, lse = segment_attention_forward(*args, list(long_range), scale, return_lse=True)
    whole = prepare(*args, list(long_range))
    prefix_dq, _, delta = triton_attention.launch_dq(whole, out, grad_out, scale, lse, prefix_only=True)
    assert prefix_dq.dtype == torch.float32
    no_prefix = prepare(*args[:5], *[a[:, :, :0] for a in args[5:]], [])
    rest_dq, _, rest_delta = triton_attention.launch_dq(no_prefix, out, grad_out, scale, lse)
    torch.testing.assert_close(delta, rest_delta, rtol=1e-6, atol=1e-6)  # no prefix: the delta-only kernel's
    assert relative_error(prefix_dq + rest_dq, want_grads[0]) <= FP32_RTOL
    if G == 0 and not long_range:
        assert torch.equal(prefix_dq, torch.zeros_like(prefix_dq))


def test_prepare_keeps_the_callers_lengths_and_widens_what_one_pointer_reads():
    # empty ranges reach the kernels as one-row stand-ins, but the lengths stay the caller's;
    # sinks take the history's dtype and the tail the current keys' wider one
    args = random_inputs(2, 4, 2, 5, 9, 0, 3, 0, 8, (), seed=1)
    args[5], args[6] = args[5].bfloat16(), args[6].bfloat16()
    args[3], args[4] = args[3].bfloat16(), args[4].bfloat16()
    problem = prepare(*args, [])
    assert (problem.B, problem.H, problem.Hk, problem.group, problem.Lq, problem.Lk) == (2, 4, 2, 2, 5, 9)
    assert (problem.T, problem.G, problem.P, problem.D_K, problem.block_dk) == (0, 3, 0, 8, 16)
    assert problem.tail_k.shape[:3] == problem.hist_k.shape[:3] == (1, 1, 1)
    assert problem.sink_k.dtype == problem.hist_k.dtype == torch.float32 and problem.tail_k.dtype == torch.float32
    assert problem.tile_table == "fp32" and problem.precision == "ieee"
    assert problem.slots.tolist() == [-1, -1]
    with pytest.raises(ValueError, match="4 query heads are not a multiple of 3 KV heads"):
        prepare(args[0], args[1][:, :1].expand(-1, 3, -1, -1), *args[2:], [])
    with pytest.raises(ValueError, match="4 current keys for 5 queries"):
        prepare(args[0], args[1][:, :, :4], args[2][:, :, :4], *args[3:], [])


def test_strided_inputs_as_the_driver_passes_them():
    # the driver hands over views: the tail is the end of the previous current, history a
    # prefix of a larger buffer, q a transpose of the projection's output
    B, H, Hk, S, D = 1, 4, 2, 16, 16
    g = torch.Generator().manual_seed(5)
    r = lambda *s: torch.randn(*s, generator=g).to(DEVICE)  # noqa: E731
    q = r(B, S, H, D).transpose(1, 2)
    prev = r(B, Hk, S, D)
    store = r(B, 1, 40, D)
    args = [q, r(B, Hk, S, D), r(B, Hk, S, D), prev[:, :, 6:], prev[:, :, 6:].flip(2), r(B, Hk, 2, D)[:, :, :1],
            r(B, Hk, 1, D), store[:, :, :25], store[:, :, 5:30]]
    want, grad_out, want_grads = reference_and_grads(args, (1,), 0.3, grad_out_seed=6)
    got = segment_attention_forward(*args, [1], 0.3)
    assert relative_error(got, want) <= FP32_RTOL
    for name, gr, w in zip(GRAD_NAMES, segment_attention_backward(grad_out, got, *args, [1], 0.3), want_grads):
        assert relative_error(gr, w) <= FP32_RTOL, name


# ---- lowered into the step graph --------------------------------------------------------------
CFG = sc.SegmentConfig(8, tail_len=4, sink_tokens=2, long_range=sc.HeadPlan.fraction(0.5), tbptt_k=1)


def test_lowered_model_matches_the_oracle_forward_decode_and_tbptt_gradients():
    model, graph = captured("llama")
    if DEVICE == "cuda":
        pytest.skip("the captured tiny model lives on the CPU; bench/cuda_smoke.py covers CUDA")
    seg = sc.transform(graph, CFG, implementation="triton")
    assert set(seg.implementations.values()) == {"triton"}
    assert "impl=triton" in repr(seg)
    ids = random_ids(2, 21, seed=7)
    with torch.no_grad():
        want = sc.oracle.forward(model, CFG, ids)
        assert (seg(ids).logits - want).abs().max() <= 1e-4
        state = seg.prefill(ids[:, :13])
        logits, state = seg.decode(state, ids[:, 13:14])
        assert (logits[:, 0] - want[:, 13]).abs().max() <= 1e-4

    labels = random_ids(2, 21, seed=8)
    want_loss, want_grads = sc.oracle.gradients(model, CFG, ids, labels)
    model.zero_grad(set_to_none=True)
    loss = seg.tbptt_backward(ids, labels)
    assert abs(loss.item() - want_loss.item()) <= 1e-5 * abs(want_loss.item())
    for name, p in model.named_parameters():
        w = want_grads[name]
        assert relative_error(p.grad, w) <= FP32_RTOL, name
    model.zero_grad(set_to_none=True)


def test_compiled_decode_steps_on_the_triton_kernels_match_the_oracle():
    """Decode steps under ``seg.compile()`` (token-major caches, carried lengths unbacked) run the
    split decode kernels; each step's logits are the oracle's."""
    model, graph = captured("llama", layers=1)
    if DEVICE == "cuda":
        pytest.skip("the captured tiny model lives on the CPU; bench/check_kernels_cuda.py covers CUDA")
    seg = sc.transform(graph, CFG, implementation="triton")
    ids = random_ids(2, 22, seed=9)
    with torch.no_grad():
        want = sc.oracle.forward(model, CFG, ids)
        seg.compile(backend="eager")
        state = seg.prefill(ids[:, :11])
        for t in range(11, 22):  # across a segment boundary (16)
            logits, state = seg.decode(state, ids[:, t : t + 1])
            assert (logits[:, 0] - want[:, t]).abs().max() <= 1e-4, t


def test_auto_lowering_picks_the_reference_off_cuda_and_triton_on_request():
    _, graph = captured("llama")
    assert set(sc.transform(graph, CFG).implementations.values()) == {"reference"}
    with pytest.raises(ConfigError, match="implementation must be 'auto' or one of"):
        sc.transform(graph, CFG, implementation="cudnn")


def test_triton_is_refused_with_the_reason():
    assert "fp16, bf16 or fp32" in triton_unavailable(torch.device("cuda"), 64, torch.float64)
    assert "above the kernels' 256" in triton_unavailable(torch.device("cuda"), 512, torch.float32)
    assert triton_unavailable(torch.device("cuda"), 128, torch.bfloat16) is None
    _, graph64 = captured("llama", dtype=torch.float64)
    with pytest.raises(ConfigError, match=r"implementation='triton' for layer 0 .*torch.float64"):
        sc.transform(graph64, CFG, implementation="triton")


def test_cpu_without_the_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    reason = triton_unavailable(torch.device("cpu"), 64, torch.float32)
    assert "run on CUDA (or on the CPU under TRITON_INTERPRET=1)" in reason


def test_constants_in_a_narrower_dtype_than_the_current_keys():
    # under autocast the driver keeps sinks and history in bf16 while current and tail K/V are fp32
    args = random_inputs(1, 4, 2, 16, 16, 8, 2, 30, 16, (1,), seed=9)
    for i in (5, 6, 7, 8):
        args[i] = args[i].bfloat16()
    want, grad_out, want_grads = reference_and_grads(args, (1,), 0.25, grad_out_seed=10)
    got = segment_attention_forward(*args, [1], 0.25)
    assert got.dtype == torch.float32 and relative_error(got, want) <= FP32_RTOL
    for name, g, w in zip(GRAD_NAMES, segment_attention_backward(grad_out, got, *args, [1], 0.25), want_grads):
        assert relative_error(g, w) <= FP32_RTOL, name


def test_tail_and_current_values_in_different_dtypes():
    # under bf16 autocast Llama's V leaves its projection in bf16 (K leaves RoPE in fp32) while
    # the carried tail keeps the run's fp32: each gradient comes back in its input's dtype
    args = random_inputs(1, 4, 2, 16, 16, 8, 0, 12, 16, (0,), seed=11)
    args[2] = args[2].bfloat16()
    want, grad_out, want_grads = reference_and_grads(args, (0,), 0.25, grad_out_seed=12)
    got = segment_attention_forward(*args, [0], 0.25)
    assert relative_error(got, want) <= FP32_RTOL
    grads = segment_attention_backward(grad_out, got, *args, [0], 0.25)
    for name, g, w, a in zip(GRAD_NAMES, grads, want_grads, args):
        assert g.dtype == a.dtype, name
        assert relative_error(g, w) <= (BF16_OP_RTOL if a.dtype == torch.bfloat16 else FP32_RTOL), name


def test_token_major_constants_and_tail_as_compiled_steps_pass_them():
    # SegmentedModel.compile keeps sinks, tail and history token-major ([entries, B, heads, D] in
    # memory, strides (H*D, D, B*H*D, 1)); the kernels read them through their strides
    B, H, Hk, lq, T, G, P, D, long_range = 2, 4, 2, 12, 9, 3, 21, 16, (1,)
    args = random_inputs(B, H, Hk, lq, lq, T, G, P, D, long_range, seed=13)

    def token_major(t):
        return t.permute(2, 0, 1, 3).contiguous().permute(1, 2, 0, 3)

    for i in (3, 4, 5, 6, 7, 8):
        args[i] = token_major(args[i])
        assert args[i].stride() == (args[i].shape[1] * D, D, args[i].shape[0] * args[i].shape[1] * D, 1)
    want, grad_out, want_grads = reference_and_grads(args, long_range, D ** -0.5, grad_out_seed=14)
    got, lse = segment_attention_forward(*args, list(long_range), D ** -0.5, return_lse=True)
    assert relative_error(got, want) <= FP32_RTOL
    grads = segment_attention_backward(grad_out, got, *args, list(long_range), D ** -0.5, lse=lse)
    for name, g, w in zip(GRAD_NAMES, grads, want_grads):
        assert relative_error(g, w) <= FP32_RTOL, name
