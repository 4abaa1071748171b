"""docs/design.md's invariants 1-4 for the forward, prefill and decode, on every supported family.

Tolerances: the per-dtype table of ``segcompile.testing.tolerances`` (max abs logit error: fp32
1e-4, logits are O(1) for these models; bf16/fp16 against the original model in the same dtype,
a few units in the last place of logits of magnitude ~1, measured ~1e-2 at worst in bf16).
"""

from __future__ import annotations

import pytest
import torch
from conftest import ALL_MODELS, VOCAB, captured, make_model, max_abs, random_ids

import segcompile as sc
from segcompile.runtime.state import reserve_history
from segcompile.testing.tolerances import assert_close, tolerance

FP32_ATOL = tolerance(torch.float32).logits
BF16_ATOL = tolerance(torch.bfloat16).logits
FP16_ATOL = tolerance(torch.float16).logits

PLANS = {
    "none": sc.HeadPlan.none(),
    "all": sc.HeadPlan.all(),
    "fraction": sc.HeadPlan.fraction(0.25),
    "layer0": sc.HeadPlan.layers([0]),
    "dict": sc.HeadPlan.from_dict({0: [1], 1: [0]}),
}


def original_logits(model, ids):
    with torch.no_grad():
        out = model(ids, use_cache=False) if hasattr(model, "generation_config") else model(ids)
    return out.logits


# ---- invariant 1: S >= N equals the original model ---------------------------------------
@pytest.mark.parametrize("family,impl", ALL_MODELS)
def test_one_segment_equals_original(family, impl):
    model, graph = captured(family, impl)
    ids = random_ids(2, 19)
    for S in (19, 32):
        seg = sc.transform(graph, sc.SegmentConfig(S, sink_tokens=2, long_range=sc.HeadPlan.fraction(0.25)))
        with torch.no_grad():
            got = seg(ids).logits
        assert got.shape == (2, 19, VOCAB)
        assert max_abs(got, original_logits(model, ids)) <= FP32_ATOL


@pytest.mark.parametrize("family", ["llama", "gpt2", "plain"])
def test_one_segment_gradients_equal_original(family):
    model = make_model(family).double()
    ids = random_ids(2, 12)
    seg = sc.transform(model, sc.SegmentConfig(16, long_range=sc.HeadPlan.none()))
    seg(ids).logits.square().mean().backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    original_logits_with_grad = model(ids).logits
    original_logits_with_grad.square().mean().backward()
    for name, p in model.named_parameters():
        assert_close(got[name], p.grad, torch.float64, "relative", what=name)


# ---- invariant 2: every head long-range equals the original model ------------------------
@pytest.mark.parametrize("family,impl", ALL_MODELS)
def test_all_heads_long_range_equals_original(family, impl):
    model, graph = captured(family, impl)
    ids = random_ids(2, 37)
    for T, G in ((None, 0), (0, 3), (3, 0)):
        seg = sc.transform(graph, sc.SegmentConfig(8, tail_len=T, sink_tokens=G, long_range=sc.HeadPlan.all()))
        with torch.no_grad():
            got = seg(ids).logits
        assert max_abs(got, original_logits(model, ids)) <= FP32_ATOL, (T, G)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt2", "plain"])
@pytest.mark.parametrize("dtype,atol", [(torch.bfloat16, BF16_ATOL), (torch.float16, FP16_ATOL)])
def test_low_precision_equals_original(family, dtype, atol):
    model, graph = captured(family, dtype=dtype)
    ids = random_ids(2, 29)
    for S in (8, 32):  # several segments, and one
        seg = sc.transform(graph, sc.SegmentConfig(S, long_range=sc.HeadPlan.all()))
        with torch.no_grad():
            got = seg(ids).logits
        assert got.dtype == dtype
        assert max_abs(got, original_logits(model, ids)) <= atol


# ---- invariant 3 (forward): any plan equals the oracle ---------------------------------------
S = 8


@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("T", [0, S // 2, S])
@pytest.mark.parametrize("G", [0, 4])
@pytest.mark.parametrize("N", [29, 5], ids=["N_not_multiple", "N_lt_S"])
def test_forward_equals_oracle_llama(llama, plan, T, G, N):
    model, graph = llama
    cfg = sc.SegmentConfig(S, tail_len=T, sink_tokens=G, long_range=PLANS[plan])
    ids = random_ids(2, N, seed=N + T + G)
    seg = sc.transform(graph, cfg)
    with torch.no_grad():
        got = seg(ids).logits
    assert max_abs(got, sc.oracle.forward(model, cfg, ids)) <= FP32_ATOL


@pytest.mark.parametrize("family,impl", ALL_MODELS)
def test_forward_equals_oracle_every_family(family, impl):
    model, graph = captured(family, impl, layers=3)
    for cfg in (
        sc.SegmentConfig(S, tail_len=S // 2, sink_tokens=4, long_range=sc.HeadPlan.fraction(0.5)),
        sc.SegmentConfig(S, tail_len=0, sink_tokens=0, long_range=sc.HeadPlan.none()),
    ):
        ids = random_ids(2, 3 * S + 3)
        seg = sc.transform(graph, cfg)
        with torch.no_grad():
            got = seg(ids).logits
        assert max_abs(got, sc.oracle.forward(model, cfg, ids)) <= FP32_ATOL


def test_a_model_taking_use_cache_through_its_keywords_captures_without_a_cache():
    # Granite MoE's forward takes use_cache only through **kwargs and returned a DynamicCache, which
    # export refused: capture turns the cache off by the config while it traces (and restores it)
    import transformers

    torch.manual_seed(0)
    config = transformers.GraniteMoeConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                           num_key_value_heads=2, num_hidden_layers=2, num_local_experts=4,
                                           num_experts_per_tok=2, pad_token_id=0)
    model = transformers.GraniteMoeForCausalLM(config).eval()
    cfg = sc.SegmentConfig(S, tail_len=S // 2, sink_tokens=2, long_range=sc.HeadPlan.fraction(0.5))
    seg = sc.transform(model, cfg)
    assert model.config.use_cache
    ids = random_ids(2, 3 * S + 3)
    with torch.no_grad():
        assert max_abs(seg(ids).logits, sc.oracle.forward(model, cfg, ids)) <= FP32_ATOL


def test_a_model_with_another_attention_implementation_is_traced_through_sdpa():
    # flex_attention (or flash_attention_2, a hub kernel) cannot be traced: capture runs the model's
    # attention as SDPA while it traces, restores the model's choice, and says so in the capture
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                      num_key_value_heads=2, num_hidden_layers=2, attn_implementation="flex_attention")
    model = transformers.LlamaForCausalLM(config).eval()
    cfg = sc.SegmentConfig(S, tail_len=S // 2, sink_tokens=2, long_range=sc.HeadPlan.fraction(0.5))
    seg = sc.transform(model, cfg)
    assert model.config._attn_implementation == "flex_attention"
    assert "attention traced as sdpa, the model's attn_implementation being 'flex_attention'" in seg.capture_info.method
    ids = random_ids(2, 3 * S + 3)
    with torch.no_grad():
        assert max_abs(seg(ids).logits, sc.oracle.forward(model, cfg, ids)) <= FP32_ATOL


def test_segmented_output_differs_from_full_attention_when_heads_are_local(llama):
    model, graph = llama
    # Guards against a rewrite that silently kept full attention: local heads must change the answer.
    cfg = sc.SegmentConfig(S, tail_len=2, long_range=sc.HeadPlan.none())
    ids = random_ids(2, 4 * S)
    with torch.no_grad():
        got = sc.transform(graph, cfg)(ids).logits
    assert max_abs(got[:, S + 2 :], original_logits(model, ids)[:, S + 2 :]) > 1e-3
    assert max_abs(got[:, :S], original_logits(model, ids)[:, :S]) <= FP32_ATOL  # first segment sees everything


# ---- invariant 4: prefill + decode equals one segmented forward ------------------------------
def assert_local_caches_bounded(seg, state):
    cfg = seg.cfg
    bound = cfg.sink_tokens + cfg.tail_len + cfg.segment_len
    for site, layer in zip(seg.sites, state.layers):
        entries = layer.local_entries()
        assert entries["sink"] <= cfg.sink_tokens
        assert entries["tail"] <= cfg.tail_len
        assert entries["current"] <= cfg.segment_len
        assert sum(entries.values()) <= bound
        assert layer.hist_k.shape[1] == len(site.long_range)  # history kept for long-range heads only


@pytest.mark.parametrize(
    "family,plan,T,G",
    [
        ("llama", "fraction", S, 0),
        ("llama", "none", S // 2, 4),
        ("llama", "dict", 0, 4),
        ("qwen3", "fraction", S // 2, 2),
        ("gpt2", "none", S, 4),
        ("plain", "fraction", S // 2, 4),
    ],
)
def test_decode_equals_oracle(family, plan, T, G):
    model, graph = captured(family)
    cfg = sc.SegmentConfig(S, tail_len=T, sink_tokens=G, long_range=PLANS[plan])
    prompt = 2 * S + 3
    ids = random_ids(2, prompt + 3 * S)
    seg = sc.transform(graph, cfg)
    want = sc.oracle.forward(model, cfg, ids)
    with torch.no_grad():
        state = seg.prefill(ids[:, :prompt])
        assert max_abs(state.logits, want[:, prompt - 1]) <= FP32_ATOL
        assert_local_caches_bounded(seg, state)
        for t in range(prompt, ids.shape[1]):
            logits, state = seg.decode(state, ids[:, t : t + 1])
            assert logits.shape == (2, 1, VOCAB)
            assert max_abs(logits[:, 0], want[:, t]) <= FP32_ATOL, t
            assert_local_caches_bounded(seg, state)
    assert state.position == ids.shape[1]


def test_decode_several_tokens_across_a_boundary(llama):
    model, graph = llama
    cfg = sc.SegmentConfig(S, tail_len=3, sink_tokens=2, long_range=sc.HeadPlan.fraction(0.25))
    ids = random_ids(1, 3 * S)
    seg = sc.transform(graph, cfg)
    want = sc.oracle.forward(model, cfg, ids)
    with torch.no_grad():
        state = seg.prefill(ids[:, : S - 2])
        logits, state = seg.decode(state, ids[:, S - 2 : S + 5])  # crosses the end of segment 0
    assert max_abs(logits, want[:, S - 2 : S + 5]) <= FP32_ATOL


def test_local_cache_constant_in_sequence_length(llama):
    cfg = sc.SegmentConfig(S, tail_len=S // 2, sink_tokens=4, long_range=sc.HeadPlan.none())
    seg = sc.transform(llama[1], cfg)
    with torch.no_grad():
        short = seg.prefill(random_ids(1, 3 * S + 1))
        long = seg.prefill(random_ids(1, 40 * S + 1))
    assert [l.local_entries() for l in short.layers] == [l.local_entries() for l in long.layers]


def test_history_is_one_growing_buffer(llama):
    # Live segment graphs share the history: consecutive states view one buffer, which is
    # reallocated only geometrically (not once per segment).
    _, graph = llama
    seg = sc.transform(graph, sc.SegmentConfig(4, long_range=sc.HeadPlan.all()))
    state = seg.initial_state(random_ids(1, 4))
    buffers = set()
    with torch.no_grad():
        for _ in range(40):
            _, state = seg.step(state, random_ids(1, 4))
            buffers.add(state.layers[0].hist_k.untyped_storage().data_ptr())
    assert state.layers[0].hist_k.shape[2] == 39 * 4  # everything before the tail
    assert len(buffers) <= 12


def test_prefill_allocates_the_history_once_and_computes_the_last_logits_only(llama):
    model, graph = llama
    cfg = sc.SegmentConfig(4, long_range=sc.HeadPlan.all())
    seg = sc.transform(graph, cfg)
    ids = random_ids(2, 27)
    with torch.no_grad():
        state = seg.prefill(ids)
        want = sc.oracle.forward(model, cfg, ids)[:, -1]
    assert (state.logits - want).abs().max() <= 1e-4
    layer = state.layers[0]
    assert layer.hist_store_k.shape[2] == 27 and layer.hist_k.shape[2] == 27 - 3 - 4  # current 3, tail 4
    assert layer.hist_k.untyped_storage().data_ptr() == layer.hist_store_k.untyped_storage().data_ptr()
    logits_node = [n for n in seg.prefill_graph().graph.nodes if n.target is torch.ops.aten.linear.default][-1]
    assert logits_node.args[0].target is torch.ops.aten.slice.Tensor  # the LM head sees the last position only


@pytest.mark.parametrize("history_dtype", [None, torch.float8_e4m3fn])
def test_prefill_makes_the_history_buffer_when_its_first_positions_arrive(llama, history_dtype):
    # From the empty state, reserve_history only records the room: allocating 2 x layers buffers
    # there would keep the GPU idle before the prefill's first kernel. The first append then makes
    # the whole buffer (values and scales alike), which later segments fill in place.
    _, graph = llama
    seg = sc.transform(graph, sc.SegmentConfig(4, long_range=sc.HeadPlan.all(), history_dtype=history_dtype))
    ids = random_ids(1, 27)
    reserved = reserve_history(seg.initial_state(ids), 27)
    assert reserved.history_room == 27
    assert all(layer.hist_store_k is None and layer.hist_store_v is None for layer in reserved.layers)
    buffers, state = set(), reserved
    with torch.no_grad():
        for start in range(0, 24, 4):
            _, state = seg.step(state, ids[:, start : start + 4])
            if state.layers[0].hist_store_k is not None:
                buffers.add(state.layers[0].hist_store_k.untyped_storage().data_ptr())
    layer = state.layers[0]
    assert len(buffers) == 1 and layer.hist_store_k.shape[2] == layer.hist_store_v.shape[2] == 27
    assert layer.hist_k.shape[2] == 24 - 4  # all but the tail
    if history_dtype is not None:
        assert layer.hist_store_k._segcompile_scales.shape[2] >= layer.hist_k.geometry.num_blocks(27)


def test_two_decodes_from_one_state_do_not_share_their_history(llama):
    # Both branches append to the history buffer the state views; the second must not overwrite
    # what the first appended (a silent wrong answer in the first branch's later steps).
    _, graph = llama
    seg = sc.transform(graph, sc.SegmentConfig(4, long_range=sc.HeadPlan.all()))
    a, b, after = random_ids(1, 9, seed=3), random_ids(1, 9, seed=4), random_ids(1, 5, seed=5)
    with torch.no_grad():
        state = seg.prefill(random_ids(1, 13))
        for seed in range(6, 30):  # decode until the buffer has grown: spare room past the view
            _, state = seg.decode(state, random_ids(1, 1, seed=seed))
            if state.position % 4 == 0 and state.layers[0].hist_store_k.shape[2] >= state.layers[0].hist_k.shape[2] + 8:
                break
        assert state.layers[0].hist_store_k.shape[2] >= state.layers[0].hist_k.shape[2] + 8
        alone = seg.decode(seg.decode(state, a)[1], after)[0]
        _, branch_a = seg.decode(state, a)
        _, branch_b = seg.decode(state, b)
        assert (branch_b.layers[0].hist_k - branch_a.layers[0].hist_k).abs().max() > 0  # they differ
        got = seg.decode(branch_a, after)[0]
    assert (got - alone).abs().max() <= 1e-6
