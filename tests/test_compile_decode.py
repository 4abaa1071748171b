"""Decode under torch.compile (``SegmentedModel.compile``) without a recompile per step.

Compiled, a prefill and 2.5 then 5 segments of one-token decode steps give the eager logits (fp32,
max abs error <= 1e-5: the same program compiled, stricter than the table of
``segcompile.testing.tolerances``, which covers different programs of the same semantics), and the number of graphs Dynamo compiles does not grow with the steps:
one for the prefill step, one for the decode step. Carried lengths pass 0 and 1 and the history
grows its buffer on the way, which is where a plainly compiled step graph recompiles. Then, with
the eager backend (fast): batch 1 with a one-token prompt, and a prompt that ends on a segment
boundary (one graph more, still not growing); forward and multi-token decode; and TBPTT gradients
through the compiled step (AOTAutograd).
"""

from __future__ import annotations

import pytest
import torch
from conftest import captured, max_abs, model_with_rope_region, random_ids

import segcompile as sc
from segcompile.runtime.state import compiled_layout

CFG = sc.SegmentConfig(8, tail_len=4, sink_tokens=2, long_range=sc.HeadPlan.fraction(0.5))
STEPS = 20  # 2.5 segments of decode steps, then as many again


def graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def decode(seg, ids, prompt: int, steps: int, compiled_graphs: list | None = None):
    """Prefill ``ids[:, :prompt]``, then decode one token a step; the logits of every step (and
    ``compiled_graphs``: the graph count after the prefill and after each half of the steps)."""
    state = seg.prefill(ids[:, :prompt])
    logits = [state.logits]
    counts = [graphs()]
    for i, t in enumerate(range(prompt, prompt + steps)):
        step_logits, state = seg.decode(state, ids[:, t : t + 1])
        logits.append(step_logits[:, -1])
        if i + 1 in (steps // 2, steps):
            counts.append(graphs())
    if compiled_graphs is not None:
        compiled_graphs.extend(counts)
    return logits, state


def compiled_decode(backend: str | None, batch: int, prompt: int, steps: int = 2 * STEPS, layers: int = 2, graph=None):
    """``decode`` eager, then compiled (``graph``: the captured model; default the tiny Llama's)."""
    graph = graph if graph is not None else captured("llama", layers=layers)[1]
    seg = sc.transform(graph, CFG)
    ids = random_ids(batch, prompt + steps, seed=prompt)
    with torch.no_grad():
        want, _ = decode(seg, ids, prompt, steps)
        seg.compile(**({"backend": backend} if backend else {}))
        torch._dynamo.utils.counters.clear()
        counts = []
        got, state = decode(seg, ids, prompt, steps, counts)
    assert max(max_abs(g, w) for g, w in zip(got, want)) <= 1e-5
    return seg, state, counts


def test_compiled_decode_compiles_once_for_prefill_and_once_for_decode():
    # the default backend (Inductor), as a user would compile; one layer keeps its compiles short
    seg, _, counts = compiled_decode(None, batch=2, prompt=5, layers=1)
    assert counts == [1, 2, 2], counts  # prefill; decode after 2.5 segments; after 5 segments
    text = repr(seg)
    assert "step: torch.compile(" in text and "impl=reference" in text


@pytest.mark.parametrize(
    "batch, prompt, bound",
    [
        (1, 1, 2),  # batch 1, a one-token prompt: the current segment's length is 1 at the first compile
        (1, 16, 3),  # the prompt ends on a segment boundary: the first decode step sees an empty segment
    ],
)
def test_compiled_decode_graphs_do_not_grow_with_the_steps(batch, prompt, bound):
    seg, state, counts = compiled_decode("eager", batch=batch, prompt=prompt)
    assert counts[1] == counts[2] <= bound, counts
    # the state a compiled step returns is already in the compiled layout: nothing is copied per
    # step (only the new tail and sinks, once a segment)
    if state.position % CFG.segment_len == 0:
        with torch.no_grad():
            _, state = seg.decode(state, random_ids(batch, 1))
    assert all(a is b for a, b in zip(compiled_layout(state).layers, state.layers))


def test_regions_compile_into_the_step_without_a_graph_break():
    # transformers 5.17's Llama computes RoPE under no_grad, in an autocast-disabled region, which
    # export records as higher-order ops; Dynamo refused them once the step's lengths were unbacked
    # (a graph break in every step: 2 graphs for the prefill, 3 with decode), until capture made
    # them plain calls (frontend/plain_regions.py)
    graph = sc.capture(model_with_rope_region(layers=1))
    _, _, counts = compiled_decode("eager", batch=2, prompt=5, graph=graph)
    assert counts == [1, 2, 2], counts
    assert not torch._dynamo.utils.counters["graph_break"]


TRAIN_CFG = sc.SegmentConfig(4, tail_len=2, sink_tokens=1, long_range=sc.HeadPlan.fraction(0.5), tbptt_k=2)


def test_compiled_forward_and_multi_token_decode():
    _, graph = captured("llama")
    seg = sc.transform(graph, TRAIN_CFG)
    ids = random_ids(2, 12, seed=12)
    with torch.no_grad():
        want_forward = seg(ids).logits
        want_decode = seg.decode(seg.prefill(ids[:, :5]), ids[:, 5:8])[0]
        seg.compile(backend="eager")
        assert max_abs(seg(ids).logits, want_forward) <= 1e-5
        assert max_abs(seg.decode(seg.prefill(ids[:, :5]), ids[:, 5:8])[0], want_decode) <= 1e-5


def test_compiled_step_trains():
    # tbptt_backward through the compiled step (AOTAutograd): the tail leaves keep their gradient
    _, graph = captured("llama")
    seg = sc.transform(graph, TRAIN_CFG)
    ids = random_ids(2, 12, seed=12)
    seg.tbptt_backward(ids)
    want = {name: p.grad.clone() for name, p in seg.named_parameters()}
    seg.zero_grad(set_to_none=True)
    seg.compile(backend="aot_eager")
    seg.tbptt_backward(ids)
    for name, p in seg.named_parameters():
        assert (p.grad - want[name]).abs().max() <= 1e-5 * want[name].abs().max(), name


def test_compiling_for_cuda_graphs_says_that_the_first_calls_record(caplog):
    # the first two calls at each length compile and record, minutes for long sequences: say so
    _, graph = captured("llama", layers=1)

    def said(**options) -> str:
        caplog.clear()
        with caplog.at_level("INFO", logger="segcompile.runtime.driver"):
            sc.transform(graph, TRAIN_CFG).compile(**options)
        return " ".join(r.getMessage() for r in caplog.records if r.name == "segcompile.runtime.driver")

    assert said(backend="eager") == ""
    with_graphs = said(mode="reduce-overhead")
    assert "record" in with_graphs and "minutes" in with_graphs


def test_compiled_for_cuda_graphs_trains_with_a_bounded_number_of_graphs():
    # mode="reduce-overhead" (CUDA graphs on a GPU, none on the CPU): the carried lengths are backed
    # dynamic sizes, as CUDA graphs need; Dynamo still compiles a bounded number of graphs over a
    # sequence (lengths 0 and 1, then the rest), and the gradients are eager's
    _, graph = captured("llama", layers=1)
    seg = sc.transform(graph, TRAIN_CFG)
    ids = random_ids(2, 7 * TRAIN_CFG.segment_len, seed=7)
    seg.tbptt_backward(ids)
    want = {name: p.grad.clone() for name, p in seg.named_parameters()}
    with torch.no_grad():
        want_logits = seg(ids).logits
    seg.zero_grad(set_to_none=True)
    seg.compile(mode="reduce-overhead")
    assert "backed (CUDA graphs" in repr(seg)
    torch._dynamo.utils.counters.clear()
    seg.tbptt_backward(ids)
    first = graphs()
    seg.zero_grad(set_to_none=True)
    seg.tbptt_backward(ids)
    assert first == graphs() <= 3, (first, graphs())
    for name, p in seg.named_parameters():
        assert (p.grad - want[name]).abs().max() <= 1e-5 * want[name].abs().max(), name
    # forward, and prefill from the empty state, are one generation of the graph trees a call
    with torch.no_grad():
        assert max_abs(seg(ids).logits, want_logits) <= 1e-5
        assert max_abs(seg.prefill(ids).logits, want_logits[:, -1]) <= 1e-5



def test_compiled_training_reserves_each_history_buffer_once(monkeypatch):
    # segments() reserves the whole sequence's history in the compiled (token-major) layout, so the
    # first compiled step does not move it into a second buffer of the same size
    import segcompile.runtime.state as state_module

    made = []
    real = state_module.empty_entries
    monkeypatch.setattr(state_module, "empty_entries", lambda *a, **k: made.append(a[1]) or real(*a, **k))
    _, graph = captured("llama", layers=1)
    seg = sc.transform(graph, TRAIN_CFG).compile(backend="eager")
    seg.tbptt_backward(random_ids(2, 5 * TRAIN_CFG.segment_len, seed=5))
    assert len(made) == 2, made  # the layer's K and V history buffers, once each


def test_compiled_training_tail_leaves_do_not_alias_the_step_outputs():
    # Under CUDA graphs (Inductor's graph trees) a replayed step returns the same output tensors
    # every time, and they keep their autograd graph after its last backward. A tail leaf that
    # aliased the previous segment's K/V output would keep that output alive through the graph of
    # the segment that read it, which the trees take for a change and record the step again
    # (measured on an H200: every segment from the fourth on, every step). Compiled, the leaves are
    # the compiled layout's own copies.
    _, graph = captured("llama", layers=1)
    cfg = sc.SegmentConfig(4, tail_len=4, sink_tokens=1, long_range=sc.HeadPlan.fraction(0.5), tbptt_k=1)
    seg = sc.transform(graph, cfg).compile(backend="eager")
    ids = random_ids(1, 5 * cfg.segment_len, seed=6)
    earlier_outputs: list[torch.Tensor] = []  # kept alive, so that no later tensor can take their memory
    checked = 0
    for run in seg.segments(ids, tails=lambda t: t.detach().requires_grad_()):
        for leaf in run.tail_inputs:
            if leaf.numel():
                assert all(leaf.untyped_storage().data_ptr() != t.untyped_storage().data_ptr() for t in earlier_outputs)
                checked += 1
        earlier_outputs += [t for t in run.tail_outputs if t.numel()]
    assert checked == 4 * 2 * 1  # segments 2..5, K and V, one layer
