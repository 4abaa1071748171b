"""The static decode path (``seg.enable_cuda_graphs()``, runtime/static_decode.py) against the eager decode.

On the CPU the fixed-shape step runs eagerly, without capture: every test here checks it token by
token against ``seg.decode`` on the step graph (itself tested against the oracle), across several
segment ends, within the fp32 table (fp64 where the arithmetic should agree to rounding). The
capture and replay run only on CUDA (the last test).
"""

from __future__ import annotations

import gc
import logging
import weakref

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx
from torch.overrides import TorchFunctionMode
from conftest import CPU_TRITON, captured, make_model, random_ids

import segcompile as sc
from segcompile.errors import SegcompileError
from segcompile.kernels.history_format import QuantizedHistory
from segcompile.ops import segment_attention
from segcompile.runtime.static_decode import StaticState
from segcompile.runtime.variants.fixed_size_step import buffer_specs
from segcompile.runtime.variants.fused_projections import FUSED
from segcompile.runtime.variants.static_step import static_step
from segcompile.runtime.variants.wide_reductions import wide_reductions
from segcompile.testing.tolerances import assert_close

S = 8
PLANS = {"none": sc.HeadPlan.none(), "fraction(0.5)": sc.HeadPlan.fraction(0.5), "all": sc.HeadPlan.all(),
         "layer 1": sc.HeadPlan.layers([1])}


def make(family="llama", plan="fraction(0.5)", tail=None, sinks=0, dtype=torch.float32):
    _, graph = captured(family, dtype=dtype)
    return sc.transform(graph, sc.SegmentConfig(S, tail_len=tail, sink_tokens=sinks, long_range=PLANS[plan]))


def eager_tokens(seg, state, steps):
    """Greedy tokens and their logits from the eager decode (the reference)."""
    tokens, logits = [], []
    for _ in range(steps):
        token = state.logits.argmax(-1, keepdim=True)
        step_logits, state = seg.decode(state, token)
        tokens.append(token)
        logits.append(step_logits)
    return tokens, logits, state


def check_static(seg, state, tokens, want, dtype=torch.float32, **options):
    """Decode ``tokens`` from ``state`` on the static path; each token's logits equal ``want``'s."""
    seg.enable_cuda_graphs(**options)
    for i, (token, expected) in enumerate(zip(tokens, want)):
        got, state = seg.decode(state, token)
        assert_close(got, expected, dtype, what=f"token {i} at position {state.position - 1}")
    assert seg.last_decode_path == "static"
    return state


@pytest.mark.parametrize(
    "family,plan,tail,sinks,batch",
    [
        ("llama", "fraction(0.5)", None, 0, 2),  # GQA, one long-range KV head of two
        ("llama", "none", 3, 2, 2),  # T < S, sinks
        ("llama", "all", 0, 4, 1),  # T = 0, sinks with no local head
        ("llama", "layer 1", 5, 3, 2),  # one layer long-range, the other local
        ("qwen2", "fraction(0.5)", 3, 0, 2),
        ("gpt2", "none", None, 4, 2),  # no GQA
        ("gpt2", "all", 3, 2, 1),
    ],
)
def test_static_decode_equals_eager_decode(family, plan, tail, sinks, batch):
    seg = make(family, plan, tail, sinks)
    with torch.no_grad():
        state = seg.prefill(random_ids(batch, 2 * S + 3))
        tokens, want, _ = eager_tokens(seg, state, 3 * S)  # three segment ends
        check_static(seg, state, tokens, want)


@pytest.mark.parametrize(
    "family,plan,tail,sinks,prompt",
    [
        ("llama", "fraction(0.5)", None, 0, 2 * S + 3),  # GQA, one long-range KV head of two
        ("llama", "none", 3, 2, S - 1),  # T < S, sinks; from the first segment's last token
        ("llama", "all", 0, 4, 1),  # T = 0, sinks with no local head; from the first token
        ("gpt2", "all", 3, 2, 2 * S),  # no GQA; from a segment start
    ],
)
@CPU_TRITON
def test_static_decode_on_the_triton_kernel_equals_eager_decode(family, plan, tail, sinks, prompt):
    # the kernel the CUDA path runs (here under the interpreter), lengths read from the position tensor
    seg = make(family, plan, tail, sinks)
    with torch.no_grad():
        state = seg.prefill(random_ids(2, prompt))
        tokens, want, _ = eager_tokens(seg, state, 2 * S + 1)  # two segment ends
        check_static(seg, state, tokens, want, kernel=True, history_block=4)
    assert "attention by the Triton kernel" in repr(seg)


@CPU_TRITON
def test_compiled_static_step_equals_eager_decode_with_one_graph_for_every_bucket():
    # the Triton kernel inside the compiled step (a custom op that writes the buffers); AOTAutograd
    # (functionalisation of that write) without Inductor's code generation, which the GPU run covers
    seg = make("llama", "fraction(0.5)", tail=3, sinks=2)
    torch._dynamo.reset()
    with torch.no_grad():
        state = seg.prefill(random_ids(2, S + 3))
        tokens, want, _ = eager_tokens(seg, state, 3 * S)  # history buckets 0 (specialised), 4, 8, ...
        before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        check_static(seg, state, tokens, want, kernel=True, history_block=4, compile={"backend": "aot_eager"})
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - before <= 2
    assert "the step under torch.compile" in repr(seg)


@pytest.mark.parametrize("prompt", [1, S - 1, S, 2 * S])
def test_static_decode_from_any_position(prompt):
    # the first segment (no tail, no history), its last token, a segment start, a later segment start
    seg = make("llama", "fraction(0.5)", tail=5, sinks=2)
    with torch.no_grad():
        state = seg.prefill(random_ids(2, prompt))
        tokens, want, _ = eager_tokens(seg, state, S + 2)
        check_static(seg, state, tokens, want)


def test_static_decode_in_fp64_agrees_to_rounding():
    seg = make("llama", "fraction(0.5)", tail=3, sinks=2, dtype=torch.float64)
    with torch.no_grad():
        state = seg.prefill(random_ids(2, 2 * S + 3))
        tokens, want, _ = eager_tokens(seg, state, 2 * S)
        check_static(seg, state, tokens, want, dtype=torch.float64)


def test_history_moves_to_the_next_bucket_and_grows():
    # blocks of 4 positions: a new bucket (a new graph on CUDA) at every segment end; the buffer,
    # sized when loaded for what the next segment end moves (positions < 16 + S - T = 21, in
    # blocks: 24), grows by half (36, then 56) at the segment ends after
    seg = make("llama", "all", tail=3)
    with torch.no_grad():
        state = seg.prefill(random_ids(2, 2 * S + 3))
        tokens, want, _ = eager_tokens(seg, state, 3 * S)
        seg.enable_cuda_graphs(history_block=4)
        buckets, capacities = [], []
        for token, expected in zip(tokens, want):
            got, state = seg.decode(state, token)
            assert_close(got, expected, torch.float32)
            buckets.append(state.buffers.decoder.bucket(state.position))
            capacities.append(state.buffers.capacity)
    assert buckets == sorted(buckets) and len(set(buckets)) == 4
    assert all(b % 4 == 0 for b in buckets)
    assert sorted(set(capacities)) == [24, 36, 56]


def test_max_context_reserves_the_history_once():
    seg = make("llama", "fraction(0.5)")
    with torch.no_grad():
        state = seg.prefill(random_ids(1, 2 * S + 3))
        tokens, want, _ = eager_tokens(seg, state, 3 * S)
        state = check_static(seg, state, tokens, want, max_context=100)
    assert state.buffers.capacity == 104  # 100 in whole blocks of S


def test_several_tokens_in_one_decode_across_a_segment_end():
    seg = make("llama", "fraction(0.5)", tail=3, sinks=2)
    ids = random_ids(2, S + 4, seed=7)
    with torch.no_grad():
        state = seg.prefill(random_ids(2, S - 2))
        want, _ = seg.decode(state, ids)
        seg.enable_cuda_graphs()
        got, static = seg.decode(state, ids)
    assert isinstance(static, StaticState) and static.position == state.position + ids.shape[1]
    assert_close(got, want, torch.float32)


def test_state_converted_back_continues_eagerly():
    seg = make("llama", "none", tail=3, sinks=2)
    with torch.no_grad():
        state = seg.prefill(random_ids(2, 2 * S + 3))
        tokens, want, _ = eager_tokens(seg, state, 2 * S + 2)
        static = check_static(seg, state, tokens[: S + 1], want[: S + 1])
        back = static.to_segment_state()
        seg.disable_cuda_graphs()
        for i, (token, expected) in enumerate(zip(tokens[S + 1 :], want[S + 1 :])):
            got, back = seg.decode(back, token)
            assert_close(got, expected, torch.float32, what=f"eager token {i}")
    assert seg.last_decode_path == "eager"


def test_converted_state_has_the_driver_layout():
    seg = make("llama", "fraction(0.5)", tail=3, sinks=2)
    with torch.no_grad():
        state = seg.prefill(random_ids(2, 2 * S + 3))
        tokens, _, eager = eager_tokens(seg, state, S)
        seg.enable_cuda_graphs()
        static = state  # the first decode converts it; each later one continues the last
        for token in tokens:
            _, static = seg.decode(static, token)
    back = static.to_segment_state()
    assert back.position == eager.position
    for mine, theirs in zip(back.layers, eager.layers):
        for name in ("sink_k", "sink_v", "hist_k", "hist_v", "tail_k", "tail_v", "current_k", "current_v"):
            assert_close(getattr(mine, name), getattr(theirs, name), torch.float32, what=name)


def test_prefill_continues_from_a_static_state():
    seg = make("llama", "fraction(0.5)")
    more = random_ids(2, S + 3, seed=9)
    with torch.no_grad():
        state = seg.prefill(random_ids(2, 5))
        tokens, _, eager = eager_tokens(seg, state, 4)
        want = seg.prefill(more, state=eager).logits
        seg.enable_cuda_graphs()
        static = state
        for token in tokens:
            _, static = seg.decode(static, token)
        got = seg.prefill(more, state=static).logits
    assert_close(got, want, torch.float32)


def test_only_the_latest_state_continues():
    seg = make("llama", "fraction(0.5)").enable_cuda_graphs()
    with torch.no_grad():
        state = seg.prefill(random_ids(1, 5))
        token = state.logits.argmax(-1, keepdim=True)
        _, first = seg.decode(state, token)
        _, second = seg.decode(first, token)
        assert second.live and not first.live
        with pytest.raises(SegcompileError, match="continued already"):
            seg.decode(first, token)
        with pytest.raises(SegcompileError, match="continued already"):
            first.to_segment_state()
        _, again = seg.decode(state, token)  # a SegmentState loads again: the older static state is stale
        assert again.live and not second.live


def test_a_state_of_an_earlier_enable_is_copied_over():
    seg = make("llama", "fraction(0.5)", tail=3)
    with torch.no_grad():
        state = seg.prefill(random_ids(2, S + 3))
        tokens, want, _ = eager_tokens(seg, state, S)
        static = check_static(seg, state, tokens[:3], want[:3])
        seg.enable_cuda_graphs()  # new buffers: the state's own are copied out, then in
        for token, expected in zip(tokens[3:], want[3:]):
            got, static = seg.decode(static, token)
            assert_close(got, expected, torch.float32)


def test_autograd_recording_decodes_eagerly():
    seg = make("llama", "fraction(0.5)").enable_cuda_graphs()
    with torch.no_grad():
        state = seg.prefill(random_ids(1, 5))
        _, static = seg.decode(state, state.logits.argmax(-1, keepdim=True))
    logits, after = seg.decode(static, random_ids(1, 1))
    assert seg.last_decode_path == "eager" and logits.requires_grad and isinstance(after, sc.SegmentState)


def test_the_decode_path_shows_in_repr_and_log(caplog):
    seg = make("llama", "fraction(0.5)")
    assert "decode: the step graph, eager" in repr(seg)
    seg.enable_cuda_graphs(history_block=16)
    assert "decode: fixed-shape step run eagerly" in repr(seg) and "blocks of 16 positions" in repr(seg)
    with torch.no_grad(), caplog.at_level(logging.DEBUG, logger="segcompile.runtime.driver"):
        state = seg.prefill(random_ids(1, 5))
        seg.decode(state, random_ids(1, 1))
    assert "last decode ran: static" in repr(seg)
    assert any("decode runs the static path" in r.getMessage() for r in caplog.records)


def test_generate_on_the_static_path_gives_the_eager_tokens():
    seg = make("llama", "fraction(0.5)", tail=3, sinks=2)
    ids = random_ids(2, S + 3)
    want = seg.generate(ids, max_new_tokens=2 * S)
    got = seg.enable_cuda_graphs().generate(ids, max_new_tokens=2 * S)
    assert torch.equal(got, want) and seg.last_decode_path == "static"


def test_static_program_is_the_fixed_size_rewrite():
    # the program the static decoder runs: the step graph over the export's buffers, no custom op
    seg = make("llama", "fraction(0.5)", tail=3, sinks=2)
    program = static_step(seg.step_graph, seg.cfg)
    placeholders = [n.target for n in program.graph.find_nodes(op="placeholder")]
    assert placeholders == ["input_ids", "position_offset"] + [name for name, *_ in buffer_specs(seg.sites, seg.cfg)]
    assert not program.graph.find_nodes(op="call_function", target=segment_attention)
    biases = [n for n in program.graph.nodes if n.op == "call_function" and n.target.__name__ == "slot_biases"]
    assert len(biases) == 1  # the masks are made once per step, not once per layer


def test_sibling_projections_are_one_product():
    # the query, key and value projections read one input: one product over their weights stacked
    seg = make("llama", "fraction(0.5)")
    program = static_step(seg.step_graph, seg.cfg)
    sources = [[tuple(t.shape) for t in copy.sources] for name, copy in program.meta[FUSED]
               if not name.endswith("_bias")]
    site = seg.sites[0]
    hidden, kv = site.num_heads * site.head_dim, site.num_kv_heads * site.head_dim
    assert sources.count([(hidden, hidden), (kv, hidden), (kv, hidden)]) == len(seg.sites)
    linear = torch.ops.aten.linear.default
    products = program.graph.find_nodes(op="call_function", target=linear)
    original = seg.step_graph.graph.find_nodes(op="call_function", target=linear)
    assert len(products) == len(original) - sum(len(s) - 1 for s in sources)


class DecodeCalls(TorchFunctionMode):
    """What a decode runs: the weight every ``aten.linear`` reads, the dtype every mean sums, and
    how many stacked copies it writes again (``torch.cat`` into an existing tensor)."""

    def __init__(self):
        super().__init__()
        self.weights, self.mean_dtypes, self.refreshes = [], [], 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.linear.default:
            self.weights.append(args[1])
        elif func is torch.ops.aten.mean.dim:
            self.mean_dtypes.append(args[0].dtype)
        elif func is torch.cat and (kwargs or {}).get("out") is not None:
            self.refreshes += 1
        return func(*args, **(kwargs or {}))


def test_both_decode_paths_read_one_stacked_copy_of_the_projections():
    # the eager decode runs the step graph with q, k and v as one product and its means in fp64,
    # as the static program does, so that the two paths round alike; one copy of the stacked
    # weights serves both
    seg = make("llama", "fraction(0.5)")
    ids = random_ids(2, S + 3)
    with torch.no_grad():
        state = seg.prefill(ids)
        with DecodeCalls() as eager:
            seg.decode(state, ids[:, :1])
        seg.enable_cuda_graphs()
        with DecodeCalls() as static:
            seg.decode(state, ids[:, :1])
    site = seg.sites[0]
    hidden, kv = site.num_heads * site.head_dim, site.num_kv_heads * site.head_dim
    shapes = [tuple(w.shape) for w in eager.weights]
    assert shapes.count((hidden + 2 * kv, hidden)) == len(seg.sites)
    linear = torch.ops.aten.linear.default
    fused = sum(len(copy.sources) - 1 for _, copy in seg.decode_graph().meta[FUSED])
    assert len(eager.weights) == len(seg.step_graph.graph.find_nodes(op="call_function", target=linear)) - fused
    assert [w.data_ptr() for w in eager.weights] == [w.data_ptr() for w in static.weights]
    assert eager.mean_dtypes and set(eager.mean_dtypes) == set(static.mean_dtypes) == {torch.float64}
    assert seg.last_decode_path == "static"


def test_weights_changed_in_place_are_copied_once_for_both_decode_paths():
    seg = make("llama", "fraction(0.5)")
    ids = random_ids(1, S + 3)
    with torch.no_grad():
        state = seg.prefill(ids)
        seg.decode(state, ids[:, :1])  # the eager decode's program and the stacked copy
        seg.enable_cuda_graphs()
        seg.decode(state, ids[:, :1])  # the static decoder's program, on the same copy
        for p in seg.step_graph.parameters():
            p.mul_(1.5)
        with DecodeCalls() as static:
            seg.decode(state, ids[:, :1])
        seg.disable_cuda_graphs()
        with DecodeCalls() as eager:
            seg.decode(state, ids[:, :1])
    assert static.refreshes == len(seg.decode_graph().meta[FUSED]) > 0  # each stacked copy once (q/k/v; gate/up here)
    assert eager.refreshes == 0  # already up to date: the static decoder's refresh was the eager decode's too


def test_programs_of_one_model_share_one_stacked_copy():
    # two transforms of one model (another history dtype, another segment length) read one copy of
    # the stacked weights (1.5 GB for an 8B model), which goes with the last program that reads it
    graph = sc.capture(make_model("llama"))  # not `captured`'s cached model: other tests' programs hold its copies
    configs = [sc.SegmentConfig(S, long_range=PLANS["fraction(0.5)"]),
               sc.SegmentConfig(2 * S, long_range=PLANS["fraction(0.5)"], history_dtype=torch.float8_e4m3fn)]
    programs = [sc.transform(graph, cfg) for cfg in configs]
    ids = random_ids(1, 2 * S + 3)
    with torch.no_grad():
        for seg in programs:
            seg.decode(seg.prefill(ids), ids[:, :1])
        programs[1].enable_cuda_graphs()
        programs[1].decode(programs[1].prefill(ids), ids[:, :1])
    copies = [[copy for _, copy in program.meta[FUSED]]
              for program in (programs[0].decode_graph(), programs[1].decode_graph(), programs[1]._static.program)]
    assert copies[0] and all(len(c) == len(copies[0]) for c in copies)
    assert all(a is b for c in copies[1:] for a, b in zip(copies[0], c))
    assert len({id(copy.tensor) for copy in copies[0]}) == len(copies[0])
    gone = [weakref.ref(copy) for copy in copies[0]]
    del programs, copies, seg
    gc.collect()
    assert all(ref() is None for ref in gone)


def test_wide_reductions_give_the_same_bits_in_any_order():
    # eager PyTorch and Inductor sum a row in different orders; summed in fp64, RMSNorm's mean of
    # squares rounds to the same fp32 whatever the order (here: the row permuted)
    def mean_of_squares(x):
        return x.pow(2).mean(-1, keepdim=True)

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 4096, generator=gen) * torch.logspace(-3, 2, 4096)[torch.randperm(4096, generator=gen)]
    shuffled = x[:, torch.randperm(4096, generator=gen)]
    narrow = make_fx(mean_of_squares, tracing_mode="fake")(x)
    wide = wide_reductions(make_fx(mean_of_squares, tracing_mode="fake")(x))
    assert not torch.equal(narrow(x), narrow(shuffled))  # the order shows in fp32 sums
    assert torch.equal(wide(x), wide(shuffled)) and wide(x).dtype == torch.float32
    assert_close(wide(x), mean_of_squares(x.double()), torch.float32, what="mean of squares")


def test_both_decode_graphs_sum_their_reductions_in_fp64():
    seg = make("llama", "fraction(0.5)")
    ids = random_ids(1, S + 3)
    with torch.no_grad():
        seg.decode(seg.prefill(ids), ids[:, :1])
    for program in (seg.decode_graph(), static_step(seg.step_graph, seg.cfg)):
        means = program.graph.find_nodes(op="call_function", target=torch.ops.aten.mean.dim)
        assert len(means) == 2 * len(seg.sites) + 1  # two RMSNorms a layer and the final one
        assert all(m.args[0].meta["val"].dtype == torch.float64 and m.users.keys() and
                   next(iter(m.users)).meta["val"].dtype == torch.float32 for m in means)


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # qwen2: q, k and v have biases, stacked too
def test_eager_decode_serves_the_weights_as_they_are(family):
    # the eager decode's stacked copy follows weights changed in place (an optimizer step between
    # two decodes); with autograd recording, decode runs the step graph itself, whose products
    # read the parameters (their gradients must reach them)
    seg = make(family, "fraction(0.5)", tail=3, sinks=2)
    ids = random_ids(2, S + 3)
    with torch.no_grad():
        state = seg.prefill(ids)
    with torch.inference_mode():  # the stacked copy is made here: it must stay writable outside
        seg.decode(state, ids[:, :1])
    with torch.no_grad():
        for p in seg.step_graph.parameters():
            p.mul_(1.5)
        got, _ = seg.decode(state, ids[:, :1])
    want, _ = seg.decode(state, ids[:, :1])
    assert_close(got, want, torch.float32, what="eager decode after an in-place change of the weights")
    want.sum().backward()
    sources = [t for _, copy in seg.decode_graph().meta[FUSED] for t in copy.sources]
    assert sources and all(t.grad is not None for t in sources)


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # qwen2: q, k and v have biases, stacked too
def test_weights_changed_in_place_reach_the_fused_products(family):
    # an optimizer step between two decodes changes the weights in place: the static path must
    # not go on serving its stacked copy of the old ones
    static, eager = (make(family, "fraction(0.5)", tail=3, sinks=2) for _ in range(2))
    ids = random_ids(2, S + 3)
    static.enable_cuda_graphs()
    with torch.no_grad():
        static.decode(static.prefill(ids), ids[:, :1])  # the stacked weights are copied here
        for seg in (static, eager):
            for p in seg.step_graph.parameters():
                p.mul_(1.5)
        tokens, want, _ = eager_tokens(eager, eager.prefill(ids), S)
        state = static.prefill(ids)
        for i, (token, expected) in enumerate(zip(tokens, want)):  # the decoder made before the change
            got, state = static.decode(state, token)
            assert_close(got, expected, torch.float32, what=f"token {i}")


def test_bad_options_are_refused():
    seg = make()
    with pytest.raises(SegcompileError, match="history_block"):
        seg.enable_cuda_graphs(history_block=0)
    with pytest.raises(SegcompileError, match="max_context"):
        seg.enable_cuda_graphs(max_context=-1)
    with pytest.raises(SegcompileError, match="compile must be"):
        seg.enable_cuda_graphs(compile="inductor")


# ---- the first decode takes the prefill's history buffer over ----------------------------------------
def hist_values(layer, kv="k"):
    hist = getattr(layer, f"hist_{kv}")
    return hist.values() if isinstance(hist, QuantizedHistory) else hist


def long_range_stores(state):
    return [getattr(layer, f"hist_store_{kv}") for layer in state.layers for kv in ("k", "v")
            if layer.hist_store_k is not None and layer.hist_k.shape[1]]


def holds_the_stores(buffers, state) -> bool:
    """Whether ``buffers``' history (and scales) is ``state``'s history buffers, heads first."""
    stores = long_range_stores(state)
    held = [h[kv] for h in buffers.history if h for kv in ("k", "v")]
    same = [view.data_ptr() == store.data_ptr() for view, store in zip(held, stores)]
    if buffers.geometry is not None:
        scales = [h[f"{kv}_scales"] for h in buffers.history if h for kv in ("k", "v")]
        same += [view.data_ptr() == store._segcompile_scales.data_ptr() for view, store in zip(scales, stores)]
    return len(held) == len(stores) > 0 and all(same)


def static_tokens(seg, state, tokens, want):
    """Decode ``tokens`` from ``state`` on the static path enabled already; returns the last state."""
    for i, (token, expected) in enumerate(zip(tokens, want)):
        got, state = seg.decode(state, token)
        assert_close(got, expected, torch.float32, what=f"token {i}")
    assert seg.last_decode_path == "static"
    return state


@pytest.mark.parametrize("history_dtype", [None, torch.float8_e4m3fn])
@pytest.mark.parametrize("kernel", [False, pytest.param(True, marks=CPU_TRITON)])
def test_the_first_decode_takes_the_prefill_history_over(history_dtype, kernel):
    # prefilled with the static decoder enabled, the history buffer has room to the end of the
    # segment being decoded: the decoder views it heads-first instead of copying it, and the
    # prefill's state stays valid (its history unchanged; continued statically again, or eagerly)
    _, graph = captured("llama")
    seg = sc.transform(graph, sc.SegmentConfig(S, tail_len=3, sink_tokens=2, long_range=PLANS["fraction(0.5)"],
                                               history_dtype=history_dtype))
    ids = random_ids(2, 2 * S + 3)
    with torch.no_grad():
        tokens, want, _ = eager_tokens(seg, seg.prefill(ids), 6)  # across the segment end at 3S
        seg.enable_cuda_graphs(kernel=kernel)
        state = seg.prefill(ids)
        assert {store.shape[2] for store in long_range_stores(state)} == {seg._static.history_slots(2 * S + 3)} == {24}
        before = [hist_values(layer, kv).clone() for layer in state.layers for kv in ("k", "v")]
        for _ in range(2):  # the second time from the buffers it took already
            static = static_tokens(seg, state, tokens, want)
            assert static.buffers.taken and holds_the_stores(static.buffers, state)
        assert "the prefill's history buffer taken over (batch 2)" in repr(seg)
        assert all(torch.equal(hist_values(layer, kv), old) for (layer, kv), old in
                   zip([(layer, kv) for layer in state.layers for kv in ("k", "v")], before))
        seg.disable_cuda_graphs()
        _, again, eager = eager_tokens(seg, state, 6)  # appends to a copy: the decoder's slots are not its
        for got, expected in zip(again, want):
            assert_close(got, expected, torch.float32)
        assert not {id(s) for s in long_range_stores(eager)} & {id(s) for s in long_range_stores(state)}


def test_a_history_without_room_or_written_past_is_copied():
    seg = make("llama", "fraction(0.5)", tail=3, sinks=2)
    ids = random_ids(2, 2 * S + 3)
    with torch.no_grad():
        tight = seg.prefill(ids)  # before enable_cuda_graphs: room for the prompt only (19 < 24)
        tokens, want, _ = eager_tokens(seg, tight, 6)
        seg.enable_cuda_graphs()
        static = static_tokens(seg, tight, tokens, want)
        assert not static.buffers.taken and not holds_the_stores(static.buffers, tight)
        roomy = seg.prefill(ids)
        seg.disable_cuda_graphs()
        eager_tokens(seg, roomy, 6)  # another state written past roomy's view, in its buffer
        seg.enable_cuda_graphs()
        static = static_tokens(seg, roomy, tokens, want)
        assert not static.buffers.taken


def test_loading_another_state_leaves_the_taken_buffers_alone():
    seg = make("llama", "all", tail=3)
    first_ids, second_ids = random_ids(1, 2 * S + 3, seed=1), random_ids(1, 2 * S + 3, seed=2)
    with torch.no_grad():
        tokens, want, _ = eager_tokens(seg, seg.prefill(first_ids), 6)
        second = seg.prefill(second_ids)  # room for the prompt only: copied when loaded
        second_tokens, second_want, _ = eager_tokens(seg, seg.prefill(second_ids), 6)
        seg.enable_cuda_graphs()
        first = seg.prefill(first_ids)
        kept = [hist_values(layer, kv).clone() for layer in first.layers for kv in ("k", "v")]
        assert static_tokens(seg, first, tokens, want).buffers.taken
        static = static_tokens(seg, second, second_tokens, second_want)
        assert not static.buffers.taken and not holds_the_stores(static.buffers, first)
        static_tokens(seg, first, tokens, want)  # taken again: nothing of it was overwritten
    assert all(torch.equal(hist_values(layer, kv), old) for (layer, kv), old in
               zip([(layer, kv) for layer in first.layers for kv in ("k", "v")], kept))


def test_a_history_prefilled_under_inference_mode_moves_before_a_decode_outside_it():
    # inference tensors can only be written in inference mode: taken there, moved to the decoder's
    # own buffers when a decode runs outside it
    seg = make("llama", "all", tail=3)
    ids = random_ids(1, 2 * S + 3)
    with torch.no_grad():
        tokens, want, _ = eager_tokens(seg, seg.prefill(ids), 6)
    seg.enable_cuda_graphs()
    with torch.inference_mode():
        state = seg.prefill(ids)
        got, static = seg.decode(state, tokens[0])
        assert static.buffers.taken
    assert_close(got, want[0], torch.float32)
    with torch.no_grad():
        for token, expected in zip(tokens[1:], want[1:]):
            got, static = seg.decode(static, token)
            assert_close(got, expected, torch.float32)
    assert not static.buffers.taken and not holds_the_stores(static.buffers, state)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("dtype,history_dtype", [(torch.float32, None), (torch.bfloat16, None),
                                                 (torch.bfloat16, torch.float8_e4m3fn)])
def test_cuda_graph_replay_equals_eager_decode(dtype, history_dtype):
    # with an fp8 history: the captured split-keys kernel reading fp8 buffers and their scales,
    # against the eager decode of the same quantised program (the non-static kernel)
    from segcompile.testing.models import tiny_model

    model = tiny_model("llama", layers=2, dtype=dtype).cuda()
    seg = sc.transform(model, sc.SegmentConfig(S, tail_len=3, sink_tokens=2, long_range=PLANS["fraction(0.5)"],
                                               history_dtype=history_dtype))
    with torch.no_grad():
        state = seg.prefill(random_ids(2, 2 * S + 3).cuda())
        tokens, want, _ = eager_tokens(seg, state, 3 * S)
        seg.enable_cuda_graphs()
        for token, expected in zip(tokens, want):
            got, state = seg.decode(state, token)
            assert_close(got, expected, dtype, measure="relative")
    assert seg.last_decode_path == "cuda-graph"
    assert "decode: CUDA graphs" in repr(seg)


@pytest.mark.parametrize("history_dtype", [None, torch.float8_e4m3fn])
def test_prefill_from_a_static_state_copies_the_history_once(history_dtype, monkeypatch):
    # the copy out of the decoder's buffers has the room the prompt needs, so the prefill appends
    # to it in place: the continued state's history buffer is that copy (not a second one)
    _, graph = captured("llama")
    seg = sc.transform(graph, sc.SegmentConfig(S, tail_len=3, long_range=PLANS["all"], history_dtype=history_dtype))
    more = random_ids(2, S + 3, seed=9)
    copies, to_segment_state = [], StaticState.to_segment_state

    def kept(static, **options):
        copies.append(to_segment_state(static, **options))
        return copies[-1]

    monkeypatch.setattr(StaticState, "to_segment_state", kept)
    with torch.no_grad():
        state = seg.prefill(random_ids(2, 2 * S + 3))
        tokens, want, eager = eager_tokens(seg, state, 4)
        want_logits = seg.prefill(more, state=eager).logits
        seg.enable_cuda_graphs()
        got = seg.prefill(more, state=static_tokens(seg, state, tokens, want))
        _, after = seg.decode(got, got.logits.argmax(-1, keepdim=True))
    assert after.buffers.taken and holds_the_stores(after.buffers, got)  # and the next decode takes it over
    assert_close(got.logits, want_logits, torch.float32)
    (copy,) = copies
    assert {store.shape[2] for store in long_range_stores(copy)} == {seg._static.history_slots(got.position)}
    assert all(mine is theirs for mine, theirs in zip(long_range_stores(copy), long_range_stores(got)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the allocator's peak is a CUDA count")
def test_taking_the_history_over_saves_a_copy_of_it_on_cuda():
    # the first decode's peak above what the prefill left: with the decoder enabled after the
    # prefill (the history copied into its buffers) against before it (the buffer taken over);
    # each twice, the second counted (the first of a process allocates cuBLAS's workspaces)
    from segcompile.testing.models import tiny_model

    model = tiny_model("llama", layers=2, dtype=torch.bfloat16).cuda()
    # a tail shorter than a segment: the decoder's buffer (history_slots) then needs more room
    # than a prefill sizes for itself (its own length), so enabled after the prefill it copies
    seg = sc.transform(model, sc.SegmentConfig(1024, tail_len=256, long_range=PLANS["all"]))
    ids = random_ids(1, 64 * 1024 + 5).cuda()

    def first_decode(enable_first: bool) -> tuple[int, int, bool]:
        seg.disable_cuda_graphs()
        if enable_first:
            seg.enable_cuda_graphs()
        with torch.no_grad():
            state = seg.prefill(ids)
            if not enable_first:
                seg.enable_cuda_graphs()
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            _, static = seg.decode(state, state.logits.argmax(-1, keepdim=True))
            torch.cuda.synchronize()
        history = sum(hist_values(layer, kv).nbytes for layer in state.layers for kv in ("k", "v"))
        return torch.cuda.max_memory_allocated() - before, history, static.buffers.taken

    for _ in range(2):
        copied, history, taken_then = first_decode(enable_first=False)
        taken, _, taken_now = first_decode(enable_first=True)
    assert (taken_then, taken_now) == (False, True)
    assert history > 7 * 2**20  # 65,280 positions x 2 layers x 2 KV heads x (K, V) x 8 dims x 2 bytes
    assert copied - taken >= 0.9 * history
