"""``tbptt_backward`` equals the oracle's TBPTT gradients (docs/design.md section 1, ``tbptt_k``), in fp64.

Tolerance: max over parameters of max|g - g_oracle| / max|g_oracle| within the fp64 row of
``segcompile.testing.tolerances`` (1e-9; measured ~1e-15); bf16 and fp32 runs within their rows.
"""

from __future__ import annotations

import pytest
import torch
from conftest import CPU_TRITON, captured, max_abs, random_ids

import segcompile as sc
import segcompile.ops
from segcompile.loss import IGNORE_INDEX
from segcompile.testing.tolerances import tolerance

REL_TOL = tolerance(torch.float64).relative
S = 4
N = 19  # 5 segments, the last one short

PLANS = {"none": sc.HeadPlan.none(), "all": sc.HeadPlan.all(), "fraction": sc.HeadPlan.fraction(0.5)}


def relative_error(model, want: dict[str, torch.Tensor]) -> float:
    worst = 0.0
    for name, p in model.named_parameters():
        scale = want[name].abs().max().clamp_min(1e-30)
        got = p.grad if p.grad is not None else torch.zeros_like(p)
        worst = max(worst, ((got - want[name]).abs().max() / scale).item())
    return worst


def check_against_oracle(family, cfg, ids, labels=None, reduction="mean"):
    model, graph = captured(family, dtype=torch.float64)
    labels = ids if labels is None else labels
    seg = sc.transform(graph, cfg)
    model.zero_grad(set_to_none=True)
    loss = seg.tbptt_backward(ids, labels, reduction=reduction)
    want_loss, want = sc.oracle.gradients(model, cfg, ids, labels, reduction=reduction)
    assert abs(float(loss) - float(want_loss)) <= 1e-12 * max(1.0, abs(float(want_loss)))
    assert relative_error(model, want) <= REL_TOL
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("K", [0, 1, 2, 5])
@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("T", [0, S // 2, S])
@pytest.mark.parametrize("G", [0, 2])
def test_llama_gradients_equal_oracle(K, plan, T, G):
    cfg = sc.SegmentConfig(S, tail_len=T, sink_tokens=G, long_range=PLANS[plan], tbptt_k=K)
    check_against_oracle("llama", cfg, random_ids(2, N, seed=K + T + G))


@pytest.mark.parametrize("family", ["gpt2", "plain"])
@pytest.mark.parametrize("K", [0, 1, 2, 5])
@pytest.mark.parametrize("plan,T,G", [("none", S, 2), ("fraction", S // 2, 0), ("all", 0, 2), ("fraction", S, 2)])
def test_other_families_gradients_equal_oracle(family, K, plan, T, G):
    cfg = sc.SegmentConfig(S, tail_len=T, sink_tokens=G, long_range=PLANS[plan], tbptt_k=K)
    check_against_oracle(family, cfg, random_ids(2, N, seed=K))


@pytest.mark.parametrize("family", ["llama", "gpt2", "plain"])
def test_one_segment_equals_plain_backward(family):
    model, graph = captured(family, dtype=torch.float64)
    ids = random_ids(2, 13)
    labels = ids.clone()
    labels[0, 3] = IGNORE_INDEX
    seg = sc.transform(graph, sc.SegmentConfig(16, tbptt_k=1, long_range=sc.HeadPlan.none()))
    model.zero_grad(set_to_none=True)
    loss = seg.tbptt_backward(ids, labels)
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    want = _plain_loss(model, ids, labels)  # not HF's `labels=` loss: it casts logits to fp32
    want.backward()
    assert abs(float(loss) - want.item()) <= 1e-12
    for name, p in model.named_parameters():
        assert torch.allclose(got[name], p.grad, rtol=1e-9, atol=1e-13), name
    model.zero_grad(set_to_none=True)


def _plain_loss(model, ids, labels):
    logits = model(ids, use_cache=False).logits if hasattr(model, "generation_config") else model(ids).logits
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX
    )


def test_ignored_labels_and_sum_reduction():
    ids = random_ids(2, N, seed=3)
    labels = ids.clone()
    labels[:, :10] = IGNORE_INDEX  # the first two segments carry no label at all
    labels[1, 11] = IGNORE_INDEX
    cfg = sc.SegmentConfig(S, tail_len=S, sink_tokens=1, long_range=sc.HeadPlan.fraction(0.5), tbptt_k=2)
    check_against_oracle("llama", cfg, ids, labels, reduction="sum")
    check_against_oracle("llama", cfg, ids, labels, reduction="mean")


def test_loss_taken_in_pieces_of_positions_gives_the_oracle_gradients(monkeypatch):
    """Segments' losses over pieces of 3 positions (not dividing S), some labels ignored: what a
    large vocabulary gives (a piece holds 2**24 logits); pieces of the tiny models would be whole."""
    import segcompile.runtime.training as training

    ids = random_ids(2, N, seed=4)
    vocab = captured("llama", dtype=torch.float64)[0].config.vocab_size
    monkeypatch.setattr(training, "LOSS_PIECE_ELEMENTS", 3 * ids.shape[0] * vocab)
    labels = ids.clone()
    labels[0, 3:9] = IGNORE_INDEX
    cfg = sc.SegmentConfig(S, tail_len=S // 2, long_range=sc.HeadPlan.fraction(0.5), tbptt_k=1)
    check_against_oracle("llama", cfg, ids, labels, reduction="mean")


@pytest.mark.parametrize("K", [1, 2])
def test_only_what_a_later_loss_reaches_outlives_its_segment(K, monkeypatch):
    """When a segment's forward starts, the K segments before it are all that is kept of the past
    (their graphs, K/V and tail leaves), and no gradient on a tail is left over from an earlier
    segment's backward: each is used by the deeper pass at once. Kept longer, they cost a
    segment's K/V a layer each, and the peak grew over the first segments of a long sequence.

    A segment is kept while its tail leaves are: the record training keeps of it holds them, and
    so does its graph (through the leaves' gradient accumulators). A gradient on a tail is the
    ``.grad`` a backward leaves on a tail leaf, which training takes and passes deeper."""
    import weakref

    leaves, tail_grads, seen = [], [], []  # per segment, weak references to its tail leaves

    def record_gradient(leaf):
        tail_grads.append(weakref.ref(leaf.grad))

    model, graph = captured("llama", dtype=torch.float64)
    seg = sc.transform(graph, sc.SegmentConfig(S, long_range=sc.HeadPlan.fraction(0.5), tbptt_k=K))
    segments, run_step = seg.segments, seg.run_step

    def recorded_segments(*args, **kwargs):
        for run in segments(*args, **kwargs):
            for leaf in run.tail_inputs:
                leaf.register_post_accumulate_grad_hook(record_gradient)
            leaves.append([weakref.ref(leaf) for leaf in run.tail_inputs])
            yield run
            del run  # kept here, the segment would be alive during the next step

    def observed_step(*args, **kwargs):
        alive = [[r() for r in refs] for refs in leaves if all(r() is not None for r in refs)]
        seen.append((len(alive), sum(r() is not None for r in tail_grads),
                     sum(t.grad is not None for tails in alive for t in tails)))
        del alive
        return run_step(*args, **kwargs)

    monkeypatch.setattr(seg, "segments", recorded_segments)
    monkeypatch.setattr(seg, "run_step", observed_step)
    seg.tbptt_backward(random_ids(1, 6 * S, seed=7))
    assert all(leaves)  # every segment had tail leaves to watch
    assert len(tail_grads) > 0  # and the hooks saw the gradients on them
    assert seen == [(min(r, K), 0, 0) for r in range(6)]


def test_gradients_accumulate_like_backward():
    model, graph = captured("llama", dtype=torch.float64)
    cfg = sc.SegmentConfig(S, long_range=sc.HeadPlan.fraction(0.5), tbptt_k=1)
    seg = sc.transform(graph, cfg)
    a, b = random_ids(1, N, seed=5), random_ids(1, N, seed=6)
    model.zero_grad(set_to_none=True)
    seg.tbptt_backward(a)
    seg.tbptt_backward(b)
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    _, want_a = sc.oracle.gradients(model, cfg, a, a)
    _, want_b = sc.oracle.gradients(model, cfg, b, b)
    model.zero_grad(set_to_none=True)
    for name in got:
        assert max_abs(got[name], want_a[name] + want_b[name]) <= 1e-12, name


def test_no_automatic_collection_runs_inside_a_step_and_one_young_collection_after():
    # a full collection inside a step walks every object compiling left alive (bench/README.md,
    # training); with the thresholds at 1 the collector would otherwise run at every allocation
    import gc
    import sys

    model, graph = captured("llama", dtype=torch.float64)
    seg = sc.transform(graph, sc.SegmentConfig(S, long_range=sc.HeadPlan.fraction(0.5), tbptt_k=1))
    ids = random_ids(1, N, seed=5)
    collections, inside = [], []

    def note(phase, info):
        if phase == "start":
            collections.append(info["generation"])
            frame = sys._getframe()
            while frame is not None and frame.f_code.co_name != "_run_segments":  # the segment loop
                frame = frame.f_back
            inside.append(frame is not None)

    thresholds = gc.get_threshold()
    gc.set_threshold(1, 1, 1)
    gc.callbacks.append(note)
    try:
        seg.tbptt_backward(ids)
        assert not any(inside) and collections[:1] == [1] and gc.isenabled()  # the step's own, then as usual
        collections.clear()
        gc.disable()  # the caller's choice stands: no collection, and still off after
        seg.tbptt_backward(ids)
        assert collections == [] and not gc.isenabled()
    finally:
        gc.enable()
        gc.callbacks.remove(note)
        gc.set_threshold(*thresholds)
        model.zero_grad(set_to_none=True)


def test_tbptt_k_changes_the_gradient():
    # The grid above would also pass if every K gave the same gradient and the oracle ignored K:
    # show that K = 0, 1, 2 really are different objectives on this input.
    model, _ = captured("llama", dtype=torch.float64)
    ids = random_ids(1, N, seed=7)
    grads = [
        sc.oracle.gradients(model, sc.SegmentConfig(S, long_range=sc.HeadPlan.none(), tbptt_k=k), ids, ids)[1]
        for k in (0, 1, 2)
    ]
    name = "model.layers.0.self_attn.k_proj.weight"
    assert max_abs(grads[0][name], grads[1][name]) > 1e-6
    assert max_abs(grads[1][name], grads[2][name]) > 1e-8


def test_forward_with_gradients_warns_when_tbptt_k_is_set():
    _, graph = captured("llama")
    seg = sc.transform(graph, sc.SegmentConfig(S, tbptt_k=1))
    with pytest.warns(UserWarning, match="tbptt_backward"):
        seg(random_ids(1, 3 * S))


def test_gradient_checkpointing_gives_the_same_gradients(monkeypatch):
    cfg = sc.SegmentConfig(S, tail_len=2, sink_tokens=1, long_range=sc.HeadPlan.fraction(0.5), tbptt_k=2)
    model, graph = captured("llama", dtype=torch.float64)
    ids = random_ids(2, N, seed=9)
    seg = sc.transform(graph, cfg)
    calls = []
    reference = segcompile.ops.IMPLEMENTATIONS["reference"]

    def counted(*args):
        calls.append(1)
        return reference(*args)

    # Checkpoint's recomputation bypasses module hooks; the attention kernel itself runs again.
    monkeypatch.setitem(segcompile.ops.IMPLEMENTATIONS, "reference", counted)
    model.zero_grad(set_to_none=True)
    seg.tbptt_backward(ids)
    without = len(calls)
    calls.clear()
    model.zero_grad(set_to_none=True)
    seg.tbptt_backward(ids, checkpoint=True)
    assert len(calls) > without  # the segments' forwards ran again in backward
    _, want = sc.oracle.gradients(model, cfg, ids, ids)
    assert relative_error(model, want) <= REL_TOL
    model.zero_grad(set_to_none=True)


def test_bf16_autocast_close_to_fp32_oracle():
    # bf16 matmuls (8 mantissa bits) over these tiny layers: measured max relative error ~1e-2.
    cfg = sc.SegmentConfig(S, tail_len=2, sink_tokens=1, long_range=sc.HeadPlan.fraction(0.5), tbptt_k=1)
    model, graph = captured("llama")
    ids = random_ids(2, N, seed=10)
    seg = sc.transform(graph, cfg)
    _, want = sc.oracle.gradients(model, cfg, ids, ids)
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        seg.tbptt_backward(ids)
    assert relative_error(model, want) <= tolerance(torch.bfloat16).relative
    for name, p in model.named_parameters():
        assert torch.nn.functional.cosine_similarity(p.grad.flatten(), want[name].flatten(), dim=0) > 0.999, name
    model.zero_grad(set_to_none=True)


def test_under_autocast_history_and_sinks_are_kept_in_the_autocast_dtype():
    # Llama's K/V leave RoPE in fp32 under autocast; the constants that grow with the context are
    # stored in bf16 (as SDPA would cast them), the differentiated tail keeps fp32.
    cfg = sc.SegmentConfig(S, tail_len=2, sink_tokens=1, long_range=sc.HeadPlan.fraction(0.5), tbptt_k=1)
    model, graph = captured("llama")
    seg = sc.transform(graph, cfg)
    ids = random_ids(2, N, seed=11)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        state = seg.prefill(ids)
        logits, _ = seg.decode(state, ids[:, :1])
    layer = state.layers[0]
    assert layer.hist_k.dtype == layer.sink_k.dtype == layer.hist_store_k.dtype == torch.bfloat16
    assert layer.tail_k.dtype == torch.float32
    with torch.no_grad():
        want = sc.oracle.forward(model, cfg, torch.cat([ids, ids[:, :1]], dim=1))[:, -1]
    assert torch.nn.functional.cosine_similarity(logits[:, -1].float(), want, dim=-1).min() > 0.999


@pytest.mark.parametrize("implementation", ["reference", pytest.param("triton", marks=CPU_TRITON)])
def test_compiled_step_graph_trains(implementation):
    # torch.compile traces each backward: the Triton backward is an op of its own, the reference's
    # recompute builds an explicit mask while tracing, and tbptt_backward turns off buffer
    # donation (every segment graph is backpropagated more than once).
    cfg = sc.SegmentConfig(S, tail_len=2, sink_tokens=1, long_range=sc.HeadPlan.fraction(0.5), tbptt_k=2)
    model, graph = captured("llama")
    seg = sc.transform(graph, cfg, implementation=implementation)
    ids = random_ids(2, N, seed=12)
    _, want = sc.oracle.gradients(model, cfg, ids, ids)
    model.zero_grad(set_to_none=True)
    seg.step_graph = torch.compile(seg.step_graph, backend="aot_eager", dynamic=True)
    seg.tbptt_backward(ids)
    assert relative_error(model, want) <= tolerance(torch.float32).relative
    model.zero_grad(set_to_none=True)
