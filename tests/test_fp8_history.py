"""The long-range history stored in fp8 (``SegmentConfig(history_dtype=torch.float8_e4m3fn)``;
docs/design.md section 6, "Quantised history").

The format (``segcompile/kernels/history_format.py``): its round trip, one scale per block, blocks
cut per piece of a segment. Then the quantised program, reference and Triton (the interpreter),
against the oracle of the same config, which quantises the history the same way: forward
logits, prefill then decode across segment ends, TBPTT gradients; fp32 within the fp32 row of
``segcompile.testing.tolerances`` (1e-4), and each also shown to differ from the unquantised
oracle by more than that, so that a path that ignored the quantisation would fail.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import CPU_TRITON, captured, random_ids

import segcompile as sc
from segcompile.kernels.dispatch import segment_attention_backward, segment_attention_forward
from segcompile.kernels.history_format import (
    HISTORY_SCALE_BLOCK,
    HistoryGeometry,
    QuantizedHistory,
    dequantize_history,
    quantize_history,
    round_trip,
    round_trip_segment_end,
)
from segcompile.kernels import triton_history
from segcompile.kernels.reference import segment_attention_reference
from segcompile.runtime.state import append_history
from segcompile.testing.tolerances import tolerance

FP8 = torch.float8_e4m3fn
# Triton's interpreter gets bf16 products wrong (fp32 and fp16 ones right): bf16 kernels on a GPU only
BF16_KERNELS = pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 kernels are checked on a GPU")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the kernel tests: the GPU, or Triton's interpreter
TOL = tolerance(torch.float32)
S, T, G = 8, 3, 2
N = 45  # 6 segments, the last one short; the history ends mid-block (the pieces are 5 and 3 long)


def config(history_dtype=FP8, **kw) -> sc.SegmentConfig:
    kw = {"segment_len": S, "tail_len": T, "sink_tokens": G, "long_range": sc.HeadPlan.fraction(0.5), **kw}
    return sc.SegmentConfig(history_dtype=history_dtype, **kw)


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


# ---- the format ---------------------------------------------------------------------------------
def test_round_trip_within_fp8_rounding_and_scales_are_block_amax():
    g = HistoryGeometry(segment_len=256, tail_len=256)  # pieces of 256: blocks [64 i, 64 i + 64)
    x = torch.randn(2, 3, 256, 16, generator=torch.Generator().manual_seed(0))
    values, scales = quantize_history(x, 0, g, FP8)
    assert values.dtype == FP8 and scales.shape == (2, 3, 256 // HISTORY_SCALE_BLOCK)
    blocks = x.reshape(2, 3, 4, HISTORY_SCALE_BLOCK * 16).abs().amax(-1)
    assert torch.equal(scales, blocks * (1 / 448))
    back = dequantize_history(values, scales, g)
    # e4m3 keeps 3 mantissa bits: a rounding error of at most 1/16 of the value (normal range),
    # and the block's largest value is stored exactly (448 * scale)
    err = (back - x).abs()
    assert (err <= x.abs() / 16 + scales.repeat_interleave(HISTORY_SCALE_BLOCK, 2)[..., None] * 2 ** -9).all()
    assert err.max() > 0
    largest = x.reshape(2, 3, 4, -1).abs().argmax(-1)[..., None]
    assert torch.allclose(back.reshape(2, 3, 4, -1).gather(-1, largest), x.reshape(2, 3, 4, -1).gather(-1, largest),
                          rtol=1e-6, atol=0)


def test_a_large_value_changes_its_own_block_scale_only():
    g = HistoryGeometry(segment_len=256, tail_len=256)
    x = torch.randn(1, 2, 256, 8, generator=torch.Generator().manual_seed(1))
    y = x.clone()
    y[0, 1, 70, 3] = 1000.0  # block 1 of head 1
    _, before = quantize_history(x, 0, g, FP8)
    _, after = quantize_history(y, 0, g, FP8)
    changed = (before != after).nonzero().tolist()
    assert changed == [[0, 1, 1]]
    assert after[0, 1, 1] == 1000.0 / 448


def test_blocks_follow_the_pieces_of_each_segment():
    # S = 100, T = 30: each segment's first 70 positions are blocks of 64 and 6, its tail one of 30
    g = HistoryGeometry(segment_len=100, tail_len=30)
    pos = torch.tensor([0, 63, 64, 69, 70, 99, 100, 164, 170, 199, 200])
    assert g.block_index(pos).tolist() == [0, 0, 1, 1, 2, 2, 3, 4, 5, 5, 6]
    assert [g.num_blocks(n) for n in (0, 1, 70, 100, 170)] == [0, 1, 2, 3, 5]
    every = g.block_index(torch.arange(400))
    assert all(g.num_blocks(n) == int(every[n - 1]) + 1 for n in range(1, 401))  # host arithmetic agrees


def test_segment_by_segment_appends_store_what_quantising_at_once_gives():
    """History length 170 = 1.7 segments: not a multiple of the block. Appends at every piece
    boundary (as the driver's segment ends and released tails write them) leave every block
    written once, equal to the quantisation of the whole."""
    g = HistoryGeometry(segment_len=100, tail_len=30)
    x = torch.randn(2, 2, 170, 8, generator=torch.Generator().manual_seed(2)) * torch.linspace(0.1, 10, 170)[:, None]
    history = QuantizedHistory.of(torch.empty(2, 2, 0, 8, dtype=FP8), torch.empty(2, 2, 0), g)
    store = None
    seen = []
    for lo, hi in ((0, 70), (70, 100), (100, 170)):
        store, history = append_history(store, history, x[:, :, lo:hi])
        seen.append(history)
    assert isinstance(history, QuantizedHistory) and history.shape == (2, 2, 170, 8)
    assert torch.equal(history.dequantized(), round_trip(x, g, FP8))
    # a view handed out earlier still reads what it read
    assert torch.equal(seen[0].dequantized(), round_trip(x[:, :, :70], g, FP8))


def test_unsupported_history_dtype_names_the_supported_ones():
    for dtype in (torch.float8_e5m2, torch.int8, torch.bfloat16, "fp8"):
        with pytest.raises(sc.ConfigError, match=r"history_dtype .* not supported.*None \(the model's dtype\), "
                                                 r"torch\.float8_e4m3fn"):
            config(history_dtype=dtype)


# ---- the kernels against the reference ---------------------------------------------------------
@pytest.mark.parametrize("lq", [1, 3, 20])  # split-keys decode, and the one-pass forward
@pytest.mark.parametrize("dtype, q_scale, v_scale", [
    (torch.float32, 1.0, 1.0),
    (torch.float16, 1.0, 1.0),  # fp16 products over the history, the queries scaled by a power of two
    (torch.float16, 1e3, 1.0),
    (torch.float16, 1.0, 1e-5),  # V's scales ~1e-7: times a probability, below fp16's smallest value
    pytest.param(torch.bfloat16, 1.0, 1.0, marks=BF16_KERNELS),
    pytest.param(torch.bfloat16, 1e5, 1.0, marks=BF16_KERNELS),  # past fp16's range (65504): the power brings them in
])
def test_triton_forward_reads_the_quantised_history_as_the_reference(lq, dtype, q_scale, v_scale):
    """Small scale blocks (4) so a key tile (16 in the interpreter) spans several, pieces of 5 and
    3 positions, 37 history positions (not a multiple of the block)."""
    gen = torch.Generator().manual_seed(3)
    B, Hk, group, D, lk, P = 2, 3, 2, 16, 24, 37
    r = lambda *shape: torch.randn(*shape, generator=gen).to(DEVICE)  # noqa: E731
    g = HistoryGeometry(segment_len=8, tail_len=3, block=4)
    long_range = [2, 0]

    def quantized(x):
        return QuantizedHistory.of(*quantize_history(x, 0, g, FP8), g)

    hist_k, hist_v = quantized(r(B, 2, P, D) * 3), quantized(r(B, 2, P, D) * v_scale)
    q, k, v, tail_k, tail_v, sink_k, sink_v = (r(B, Hk * group, lq, D) * q_scale, r(B, Hk, lk, D), r(B, Hk, lk, D),
                                               r(B, Hk, 3, D), r(B, Hk, 3, D), r(B, Hk, 2, D), r(B, Hk, 2, D))
    # every range's V scaled alike (history, sinks, tail, current), so the output is v_scale times one of unit size
    args = tuple(a.to(dtype) for a in (q, k, v * v_scale, tail_k, tail_v * v_scale, sink_k, sink_v * v_scale))
    got = segment_attention_forward(*args, hist_k, hist_v, long_range, 0.25)
    wide = tuple(a.float() for a in args)
    want = segment_attention_reference(*wide, hist_k, hist_v, long_range, 0.25)
    exact = segment_attention_reference(*wide, hist_k.dequantized(), hist_v.dequantized(), long_range, 0.25)
    assert max_abs(want, exact) == 0  # the reference reads the history dequantised
    assert max_abs(got, want) / v_scale <= tolerance(dtype).logits, max_abs(got, want) / v_scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("start, length", [(0, 45), (16, 13), (40, 8), (0, 0)])
def test_quantize_kernel_equals_the_reference(dtype, start, length):
    """The one-pass quantisation (``triton_history.py``) against ``quantize_history``, bit for bit:
    pieces of both kinds (a segment's first S - T positions, its tail), a block ``x`` fills in part,
    an input in the model's dtype, a strided input."""
    g = HistoryGeometry(segment_len=S, tail_len=T, block=4)
    x = torch.randn(2, 3, length, 32, generator=torch.Generator().manual_seed(start + length)) * 7
    x = x.to(device=DEVICE, dtype=dtype)[..., ::2]
    values, scales = triton_history.quantize(x, start, g, FP8)
    want_values, want_scales = quantize_history(x, start, g, FP8)
    assert values.dtype == FP8 and scales.shape == want_scales.shape
    assert torch.equal(scales, want_scales)
    assert torch.equal(values.float(), want_values.float())
    # into views of larger buffers, as a segment end appends: nothing written outside them
    buffer = torch.zeros(2, length + 9, 3, 16, dtype=FP8, device=DEVICE).transpose(1, 2)  # token-major
    scale_buffer = torch.zeros(2, 3, scales.shape[2] + 5, device=DEVICE)
    out = (buffer[:, :, 4 : 4 + length], scale_buffer[:, :, 2 : 2 + scales.shape[2]])
    triton_history.quantize(x, start, g, FP8, out=out)
    assert torch.equal(scale_buffer[:, :, 2 : 2 + scales.shape[2]], want_scales)
    assert torch.equal(buffer[:, :, 4 : 4 + length].float(), want_values.float())
    assert buffer[:, :, :4].float().abs().sum() == buffer[:, :, 4 + length :].float().abs().sum() == 0
    assert scale_buffer[:, :, :2].abs().sum() == scale_buffer[:, :, 2 + scales.shape[2] :].abs().sum() == 0
    # some heads, read in place (a segment end's long-range heads), in another order than x's
    heads = torch.tensor([2, 0], device=DEVICE)
    values, scales = triton_history.quantize(x, start, g, FP8, heads=heads)
    want_values, want_scales = quantize_history(x.index_select(1, heads), start, g, FP8)
    assert torch.equal(scales, want_scales) and torch.equal(values.float(), want_values.float())
    # a layer's K and V in one launch: V token-major, of another head dim
    v = (torch.randn(2, length, 3, 24, generator=torch.Generator().manual_seed(length)) * 3).to(DEVICE, dtype)
    v = v.transpose(1, 2)
    outs = [(torch.zeros(2, 2, length, t.shape[-1], dtype=FP8, device=DEVICE), torch.zeros_like(want_scales))
            for t in (x, v)]
    triton_history.quantize_pair(x, v, start, g, FP8, outs, heads=heads)
    for t, (got_values, got_scales) in zip((x, v), outs):
        want_values, want_scales = quantize_history(t.index_select(1, heads), start, g, FP8)
        assert torch.equal(got_scales, want_scales) and torch.equal(got_values.float(), want_values.float())


def test_quantize_refuses_buffers_it_cannot_write():
    g = HistoryGeometry(segment_len=S, tail_len=T, block=4)
    x = torch.randn(1, 2, 8, 16, device=DEVICE)
    scales = torch.empty(1, 2, g.num_blocks(8), device=DEVICE)
    with pytest.raises(ValueError, match="quantize: out of shapes"):  # values one position short
        triton_history.quantize(x, 0, g, FP8, out=(torch.empty(1, 2, 7, 16, dtype=FP8, device=DEVICE), scales))
    with pytest.raises(ValueError, match="last dimension of each contiguous"):  # scales strided
        strided = torch.empty(1, 2, 2 * scales.shape[2], device=DEVICE)[:, :, ::2]
        triton_history.quantize(x, 0, g, FP8, out=(torch.empty(1, 2, 8, 16, dtype=FP8, device=DEVICE), strided))
    with pytest.raises(ValueError, match="quantize_pair: K .* and V .* differ"):  # V one position short
        triton_history.quantize_pair(x, x[:, :, 1:], 0, g, FP8, [(torch.empty_like(x, dtype=FP8), scales)] * 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("segment_len, tail_len, length", [(8, 3, 45), (128, 128, 200), (8, 8, 0)])
def test_dequantize_kernel_equals_the_reference(dtype, segment_len, tail_len, length):
    """The one-pass dequantisation (``triton_history.py``) against ``dequantize_history``, bit for
    bit, on a history that is a view into a larger buffer (as the state keeps it) and ends mid-block."""
    g = HistoryGeometry(segment_len=segment_len, tail_len=tail_len, block=4 if segment_len == 8 else 64)
    x = torch.randn(2, 3, length, 16, generator=torch.Generator().manual_seed(length)).to(DEVICE) * 5
    values, scales = quantize_history(x, 0, g, FP8)
    buffer = torch.zeros(2, 3, length + 7, 16, dtype=FP8, device=DEVICE)
    buffer[:, :, :length] = values
    hist = QuantizedHistory.of(buffer[:, :, :length], scales, g)
    other = QuantizedHistory.of(*quantize_history(x.flip(2) * 3, 0, g, FP8), g)  # a V history beside it
    got = [triton_history.dequantize(hist, dtype), *triton_history.dequantize_pair(hist, other, dtype)]
    for got, want in zip(got, [hist.dequantized(dtype), hist.dequantized(dtype), other.dequantized(dtype)]):
        assert got.dtype == dtype and got.shape == want.shape
        if dtype == torch.float32 or got.is_cuda:
            assert torch.equal(got, want)
        else:  # the interpreter rounds fp32 to bf16 toward zero, the GPU and PyTorch to nearest: one ulp
            assert ((got.float() - want.float()).abs() <= want.float().abs() * 2 ** -7).all()


def test_dequantize_pair_refuses_histories_that_differ():
    g = HistoryGeometry(segment_len=8, tail_len=8, block=4)
    k, v = [QuantizedHistory.of(*quantize_history(torch.randn(1, 2, n, 16).to(DEVICE), 0, g, FP8), g) for n in (8, 12)]
    with pytest.raises(ValueError, match="dequantize_pair: K history .* differ"):
        triton_history.dequantize_pair(k, v, torch.float32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Gluon forward runs on a Hopper GPU")
@pytest.mark.parametrize("lq, P, D, tail_len", [
    (1, 1536, 128, 512),  # decode reads fp8 (split keys)
    (512, 1536, 128, 512),  # a segment runs Gluon on a dequantised copy
    (512, 1000, 128, 512),  # the history ends inside a 128-key block and inside a scale block
    (512, 192, 64, 512),  # its last 128-key block holds one scale block; head dim 64
    (512, 1536, 128, 96),  # scale blocks cut at each segment's pieces (416 and 96 positions)
])
def test_bf16_forward_on_cuda_reads_the_quantised_history_as_the_reference(lq, P, D, tail_len):
    gen = torch.Generator(device="cuda").manual_seed(7)
    r = lambda *shape: torch.randn(*shape, generator=gen, device="cuda", dtype=torch.bfloat16)  # noqa: E731
    B, Hk, group = 1, 4, 4
    g = HistoryGeometry(segment_len=512, tail_len=tail_len, block=64)

    def quantized(x):
        return QuantizedHistory.of(*quantize_history(x, 0, g, FP8), g)

    hist_k, hist_v = quantized(r(B, 2, P, D) * 3), quantized(r(B, 2, P, D))
    args = (r(B, Hk * group, lq, D), r(B, Hk, lq, D), r(B, Hk, lq, D), r(B, Hk, 512, D),
            r(B, Hk, 512, D), r(B, Hk, 4, D), r(B, Hk, 4, D))
    got = segment_attention_forward(*args, hist_k, hist_v, [1, 3], D ** -0.5)
    want = segment_attention_reference(*[a.float() for a in args], hist_k, hist_v, [1, 3], D ** -0.5)
    assert max_abs(got, want) <= tolerance(torch.bfloat16).logits, max_abs(got, want)


def test_triton_backward_with_a_quantised_history_equals_the_reference():
    gen = torch.Generator().manual_seed(5)
    r = lambda *shape: torch.randn(*shape, generator=gen).to(DEVICE)  # noqa: E731
    B, Hk, D, lq = 1, 2, 16, 8
    g = HistoryGeometry(segment_len=8, tail_len=3, block=4)
    hist_k, hist_v = (QuantizedHistory.of(*quantize_history(r(B, 1, 13, D), 0, g, FP8), g) for _ in range(2))
    grads_of = [r(B, 2 * Hk, lq, D), r(B, Hk, lq, D), r(B, Hk, lq, D), r(B, Hk, 3, D), r(B, Hk, 3, D)]
    sinks = (r(B, Hk, 2, D), r(B, Hk, 2, D))
    live = [t.clone().requires_grad_() for t in grads_of]
    out = segment_attention_reference(*live, *sinks, hist_k, hist_v, [1], 0.25)
    grad_out = r(*out.shape)
    want = torch.autograd.grad(out, live, grad_out)
    got_out, lse = segment_attention_forward(*grads_of, *sinks, hist_k, hist_v, [1], 0.25, return_lse=True)
    got = segment_attention_backward(grad_out, got_out, *grads_of, *sinks, hist_k, hist_v, [1], 0.25, lse=lse)
    for g_got, g_want in zip(got, want):
        assert max_abs(g_got, g_want) <= TOL.logits


# ---- the program against the quantised oracle ---------------------------------------------------
@pytest.fixture(scope="module")
def llama32():
    return captured("llama")


@pytest.fixture(scope="module")
def oracle_logits(llama32):
    model, _ = llama32
    ids = random_ids(2, N)
    with torch.no_grad():
        return ids, sc.oracle.forward(model, config(), ids), sc.oracle.forward(model, config(history_dtype=None), ids)


@pytest.mark.parametrize("impl", ["reference", pytest.param("triton", marks=CPU_TRITON)])
def test_forward_equals_the_quantised_oracle(llama32, oracle_logits, impl):
    _, graph = llama32
    ids, want, unquantised = oracle_logits
    seg = sc.transform(graph, config(), implementation=impl)
    with torch.no_grad():
        got = seg(ids).logits
    assert max_abs(got, want) <= TOL.logits
    assert max_abs(got, unquantised) > 10 * TOL.logits  # the history really is stored in fp8
    assert "history_dtype=torch.float8_e4m3fn" in repr(seg)


@pytest.mark.parametrize("impl", ["reference", pytest.param("triton", marks=CPU_TRITON)])
def test_prefill_then_decode_across_segment_ends_equals_the_quantised_oracle(llama32, oracle_logits, impl):
    _, graph = llama32
    ids, want, _ = oracle_logits
    seg = sc.transform(graph, config(), implementation=impl)
    with torch.no_grad():
        state = seg.prefill(ids[:, :21])  # mid-segment; the history has 13 positions
        hist = state.layers[0].hist_k
        assert isinstance(hist, QuantizedHistory) and hist.dtype == FP8 and hist.shape[2] == 13
        assert max_abs(state.logits, want[:, 20]) <= TOL.logits
        logits = []
        for i in range(21, N - 3):
            step, state = seg.decode(state, ids[:, i : i + 1])
            logits.append(step)
        several, state = seg.decode(state, ids[:, N - 3 :])  # three tokens, crossing no boundary
    got = torch.cat([*logits, several], dim=1)
    assert max_abs(got, want[:, 21:]) <= TOL.logits


@pytest.mark.parametrize("n", [13, 22])  # 3 and 6 scale blocks (S = 8, T = 3: 2 blocks a segment)
def test_scale_buffers_have_strides_triton_specialises_alike(llama32, n):
    """Every quantised history's scale buffer has room for a multiple of 16 blocks, so its strides,
    which the kernels take as integer arguments, are multiples of 16 at every prompt length: Triton
    compiles one specialisation for all of them, not a new one at a length whose block count
    changes the class (bench/README.md, prefill: the first fp8 128K prefill after a short warm-up
    ran ~0.4 s longer than the next ones)."""
    _, graph = llama32
    seg = sc.transform(graph, config(), implementation="reference")
    with torch.no_grad():
        state = seg.prefill(random_ids(1, n, seed=n))
    histories = [getattr(layer, f"hist_{kv}") for layer in state.layers for kv in "kv"]
    assert histories and all(h.scales.stride(0) % 16 == h.scales.stride(1) % 16 == 0 for h in histories)
    assert all(h.scales.shape[2] == h.geometry.num_blocks(h.shape[2]) for h in histories)


def test_a_branch_keeps_its_own_quantised_history(llama32, oracle_logits):
    _, graph = llama32
    ids, want, _ = oracle_logits
    seg = sc.transform(graph, config(), implementation="reference")
    other = random_ids(2, 10, seed=9)
    with torch.no_grad():
        state = seg.prefill(ids[:, :14])
        seg.decode(state, other)  # a branch crossing a segment end appends to the shared buffer
        got, _ = seg.decode(state, ids[:, 14:24])
    assert max_abs(got, want[:, 14:24]) <= TOL.logits


@pytest.mark.parametrize("impl", ["reference", pytest.param("triton", marks=CPU_TRITON)])
def test_tbptt_gradients_equal_the_quantised_oracle(impl):
    model, graph = captured("llama")
    cfg = config(long_range=sc.HeadPlan.all(), tbptt_k=1)
    ids = random_ids(1, 27, seed=4)
    seg = sc.transform(graph, cfg, implementation=impl)
    model.zero_grad(set_to_none=True)
    loss = seg.tbptt_backward(ids, ids)
    got = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    want_loss, want = sc.oracle.gradients(model, cfg, ids, ids)
    _, unquantised = sc.oracle.gradients(model, config(history_dtype=None, long_range=sc.HeadPlan.all()), ids, ids)
    assert abs(float(loss) - float(want_loss)) <= TOL.logits

    def worst(reference):
        return max(max_abs(got[n], reference[n]) / reference[n].abs().max().clamp_min(1e-30).item() for n in got)

    assert worst(want) <= TOL.relative
    assert worst(unquantised) > 10 * TOL.relative


@pytest.mark.parametrize("kernel,compile", [(False, False), pytest.param(True, False, marks=CPU_TRITON),
                                            pytest.param(True, {"backend": "aot_eager"}, marks=CPU_TRITON)])
def test_fixed_shape_decode_on_an_fp8_history_equals_the_quantised_oracle(llama32, oracle_logits, kernel, compile):
    # the CUDA-graph decoder's program (run eagerly off CUDA): fp8 history buffers and their scales,
    # quantised at each segment end as the eager decode's are; PyTorch products (kernel=False) or
    # the split-keys kernel scaling in registers (kernel=True, the interpreter off CUDA); and that
    # program under torch.compile (AOTAutograd without Inductor's code generation: the scales are
    # plain inputs it traces)
    _, graph = llama32
    ids, want, unquantised = oracle_logits
    seg = sc.transform(graph, config(), implementation="triton" if kernel else "reference")
    torch._dynamo.reset()
    seg.enable_cuda_graphs(kernel=kernel, history_block=4, compile=compile)
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with torch.no_grad():
        state = seg.prefill(ids[:, :21])
        logits = []
        for i in range(21, N):  # three segment ends
            step, state = seg.decode(state, ids[:, i : i + 1])
            logits.append(step)
    assert seg.last_decode_path == "static"
    if compile:  # history buckets 12, 16, ... (and their scales): one graph, the first bucket's specialised
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - before <= 2
    assert "the history in float8_e4m3fn with per-block scales" in repr(seg)
    got = torch.cat(logits, dim=1)
    assert max_abs(got, want[:, 21:]) <= TOL.logits
    assert max_abs(got, unquantised[:, 21:]) > 5 * TOL.logits  # 8.5e-4: the history really is fp8
    back = state.to_segment_state()  # the buffers' fp8 history, as the eager decode keeps it
    hist = back.layers[0].hist_k
    assert isinstance(hist, QuantizedHistory) and hist.dtype == FP8 and hist.shape[2] == 40 - T
    eager = sc.transform(graph, config(), implementation="reference")
    with torch.no_grad():
        want_state = eager.prefill(ids[:, :N])
    # the same blocks and scales as the prefill's quantisation (its K were computed a segment at a
    # time, not a token: equal up to fp32 rounding)
    expected = want_state.layers[0].hist_k
    assert hist.scales.shape == expected.scales.shape
    assert torch.allclose(hist.scales, expected.scales, rtol=1e-5, atol=0)
    assert max_abs(hist.dequantized(), expected.dequantized()) <= 1e-5


def test_paths_that_do_not_take_a_quantised_history_say_so(llama32):
    _, graph = llama32
    seg = sc.transform(graph, config())
    with pytest.raises(sc.ConfigError, match=r"compile\(\) does not support history_dtype.*enable_cuda_graphs"):
        seg.compile()


def test_a_hand_made_state_with_an_unquantised_history_is_refused(llama32, oracle_logits):
    _, graph = llama32
    ids = oracle_logits[0]
    seg = sc.transform(graph, config(long_range=sc.HeadPlan.all()), implementation="reference")
    with torch.no_grad():
        state = seg.prefill(ids[:, :20])
    plain = tuple(replace(layer, hist_k=layer.hist_k.dequantized(), hist_v=layer.hist_v.dequantized())
                  for layer in state.layers)
    with pytest.raises(sc.StateError, match="history is not quantised"):
        seg.decode(replace(state, layers=plain, program_id=None), ids[:, 20:21])


@pytest.mark.parametrize("autocast", [False, True])
def test_a_segment_end_quantises_the_long_range_heads_in_the_carried_dtype(llama32, autocast):
    """A segment end stores the long-range heads of the leaving K/V, rounded to the carried dtype
    and then quantised: bf16 K/V are read in place (the kernel takes the heads), autocast's fp32
    K/V are gathered and rounded to bf16 first (``carried_dtype``). Values and scales bit for bit
    against ``quantize_history`` of those heads; fp32 K/V quantised unrounded would differ."""
    _, graph = llama32
    seg = sc.transform(graph, config(long_range=sc.HeadPlan.fraction(0.5)), implementation="reference")
    site = seg.sites[0]
    state = seg.initial_state(random_ids(1, S))
    gen = torch.Generator().manual_seed(3)
    current = {kv: torch.randn(1, site.num_kv_heads, S, site.head_dim, generator=gen) * 3 for kv in "kv"}
    if not autocast:
        current = {kv: x.to(torch.bfloat16) for kv, x in current.items()}
    layers = (replace(state.layers[0], current_k=current["k"], current_v=current["v"]), *state.layers[1:])
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        layer = seg.end_segment(replace(state, position=S, layers=layers)).layers[0]
    heads = torch.tensor(site.long_range)
    assert 0 < len(heads) < site.num_kv_heads
    for kv in "kv":
        leaving = current[kv][:, :, : S - T].index_select(1, heads)
        values, scales = quantize_history(leaving.to(torch.bfloat16), 0, layer.hist_k.geometry, FP8)
        hist = getattr(layer, f"hist_{kv}")
        assert torch.equal(hist.scales, scales) and torch.equal(hist.values().float(), values.float())
        if autocast:
            assert not torch.equal(hist.scales, quantize_history(leaving, 0, hist.geometry, FP8)[1])


# ---- ONNX export: the history buffers in the model's dtype, holding the fp8 values ---------------
def test_segment_end_round_trip_is_the_appended_history():
    """What the export writes at a segment end equals what ``append_history`` stores, read back,
    at any segment: pieces of 80 and 144 positions (two blocks each, the second short)."""
    g = HistoryGeometry(segment_len=224, tail_len=144)
    x = torch.randn(2, 3, 3 * 224, 16, generator=torch.Generator().manual_seed(4))
    whole = round_trip(x, g, FP8)
    for segment in (1, 2):  # leaving = the tail of segment - 1, then the head of segment
        start = segment * 224 - 144
        leaving = x[:, :, start : start + 224]
        assert torch.equal(round_trip_segment_end(leaving, g, FP8), whole[:, :, start : start + 224])


def _run_steps(module, seg, ids, history):
    """The ONNX runner's loop over ``step_module(logits="all")`` in PyTorch: the logits of every
    position."""
    from segcompile.deploy.onnx_export import example_inputs

    buffers, position, logits = list(example_inputs(seg, batch=ids.shape[0], history=history))[2:], 0, []
    while position < ids.shape[1]:
        take = min(seg.cfg.segment_len - position % seg.cfg.segment_len, ids.shape[1] - position)
        out = module(ids[:, position : position + take], torch.tensor(position), *buffers)
        buffers, position = list(out[1:]), position + take
        logits.append(out[0])
    return torch.cat(logits, dim=1)


def test_step_module_with_fp8_history_equals_segmented_model(llama32):
    """Several scale blocks per piece (S = 224, T = 144: pieces of 80 and 144) in the fixed-size
    step program, against SegmentedModel with the fp8 history and without it."""
    from segcompile.deploy.step_module import step_module

    _, graph = llama32
    ids = random_ids(1, 3 * 224 + 5)
    cfg = config(segment_len=224, tail_len=144)
    seg, plain = sc.transform(graph, cfg), sc.transform(graph, replace(cfg, history_dtype=None))
    with torch.no_grad():
        got = _run_steps(step_module(seg, logits="all"), seg, ids, history=4 * 224)
        want, unquantised = seg(ids).logits, plain(ids).logits
    assert max_abs(got, want) <= TOL.logits
    # the history is long beside the tiny model's rounding: the unquantised logits move by ~4e-4
    assert max_abs(got, unquantised) > 2 * TOL.logits


def test_onnx_export_with_fp8_history_runs_as_segmented_model(llama32, tmp_path):
    """The onnxruntime runner against SegmentedModel with the fp8 history: prefill 5 segments and 3
    tokens, then 2 S greedy tokens, logits within the fp32 tolerance; the unquantised program is
    further away than that, so the rounding is in the file."""
    import onnx

    from segcompile.deploy.format import HISTORY_DTYPE_KEY
    from segcompile.deploy.onnx_export import export_onnx
    from segcompile.deploy.onnxruntime_backend import OnnxSegmentedModel

    _, graph = llama32
    seg, plain = sc.transform(graph, config()), sc.transform(graph, config(history_dtype=None))
    summary = export_onnx(seg, tmp_path / "step.onnx")
    assert summary.metadata[HISTORY_DTYPE_KEY] == "float8_e4m3fn"
    hist_inputs = [(dtype, shape) for name, dtype, shape in summary.inputs if "_hist_" in name]
    assert hist_inputs and all(dtype == "float" for dtype, _ in hist_inputs)  # the model's dtype, fp32
    casts = [a.i for n in onnx.load(tmp_path / "step.onnx").graph.node if n.op_type == "Cast" for a in n.attribute]
    assert onnx.TensorProto.FLOAT8E4M3FN in casts
    runner = OnnxSegmentedModel(tmp_path / "step.onnx")
    ids = random_ids(2, 5 * S + 3)
    with torch.no_grad():
        want, reference = seg.prefill(ids), plain.prefill(ids)
        state = runner.prefill(ids.numpy())
        diffs, unquantised = [max_abs(torch.from_numpy(state.logits), want.logits)], []
        for _ in range(2 * S):
            token = want.logits.argmax(-1, keepdim=True)
            logits, want = seg.decode(want, token)
            other, reference = plain.decode(reference, token)
            got, state = runner.decode(state, token.numpy())
            diffs.append(max_abs(torch.from_numpy(got), logits))
            unquantised.append(max_abs(torch.from_numpy(got), other))
    assert max(diffs) <= TOL.logits, diffs
    assert max(unquantised) > 2 * TOL.logits  # ~9e-4: without the rounding the file would be within 1e-6


def _float8_probe(op: str, inputs: list[str], **attributes) -> bool:
    """Whether onnxruntime's CPU provider runs ``op`` on float8 e4m3 tensors at the export's opset:
    a graph of float inputs cast to float8 (``f8``), int64 zeros (``int``) or bools (``bool``), the
    op, and its output cast back to float."""
    import numpy as np
    import onnxruntime
    from onnx import TensorProto, helper

    from segcompile.deploy.onnx_export import OPSET

    kinds = {"f8": TensorProto.FLOAT, "int": TensorProto.INT64, "bool": TensorProto.BOOL}
    nodes, names, feeds, graph_inputs = [], [], {}, []
    for i, kind in enumerate(inputs):
        graph_inputs.append(helper.make_tensor_value_info(f"x{i}", kinds[kind], [2, 2] if kind != "int" else [1]))
        feeds[f"x{i}"] = {"f8": np.ones((2, 2), np.float32), "int": np.zeros(1, np.int64),
                          "bool": np.ones((2, 2), bool)}[kind]
        if kind == "f8":
            nodes.append(helper.make_node("Cast", [f"x{i}"], [f"c{i}"], to=TensorProto.FLOAT8E4M3FN))
        names.append(f"c{i}" if kind == "f8" else f"x{i}")
    nodes += [helper.make_node(op, names, ["y"], **attributes),
              helper.make_node("Cast", ["y"], ["z"], to=TensorProto.FLOAT)]
    output = helper.make_tensor_value_info("z", TensorProto.FLOAT, None)
    graph = helper.make_graph(nodes, "probe", graph_inputs, [output])
    # the IR version opset 20 needs, not onnx's newest: an onnxruntime older than onnx (1.30 with
    # onnx 1.23) refuses a newer IR version, whatever the op
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=9)
    try:
        session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        session.run(None, feeds)
    except Exception:  # onnxruntime raises its own types: an invalid graph, or no kernel for the type
        return False
    return True


def test_onnxruntime_runs_float8_in_casts_only():
    """Why the export keeps its history in the model's dtype (``deploy/onnx_export.py``): float8
    values reach onnxruntime only through Cast, not the ops that read a history."""
    assert _float8_probe("Identity", ["f8"])  # Cast to float8 and back: runs
    assert not _float8_probe("Reshape", ["f8", "int"])
    assert not _float8_probe("Concat", ["f8", "f8"], axis=0)
    assert not _float8_probe("Gather", ["f8", "int"], axis=0)
    assert not _float8_probe("Where", ["bool", "f8", "f8"])
    assert not _float8_probe("MatMul", ["f8", "f8"])
