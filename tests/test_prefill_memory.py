"""What a prefill keeps alive: the sinks hold their G entries only, and each layer's old tail is
freed once its layer has read it (segcompile/runtime/variants/release_tails.py), with results
equal to the bit to a prefill that frees nothing (``free_tails=False``), and the caller's state
untouched."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from conftest import captured, random_ids

import segcompile as sc
from segcompile.ir import STATE_NAMES

S = 8
PLANS = {"none": sc.HeadPlan.none(), "all": sc.HeadPlan.all(), "fraction": sc.HeadPlan.fraction(0.5)}


@dataclass
class Step:
    position: int
    tokens: int
    # every layer's tail_k and tail_v as the step got them; not in the repr: a freed tensor must not be read
    tails: list[torch.Tensor] = field(repr=False)
    held: list[int]  # their storages' bytes when the step began

    def freed(self) -> list[bool]:
        return freed_all(self.tails)


def record_steps(monkeypatch, seg) -> list[Step]:
    """Every step ``seg`` runs from now on, with the tails it was given."""
    steps = []
    run_step = seg.run_step

    def recording(state, chunk, *args, **kwargs):
        tails = [t for layer in state.layers for t in (layer.tail_k, layer.tail_v)]
        steps.append(Step(state.position, chunk.shape[1], tails, [t.untyped_storage().nbytes() for t in tails]))
        return run_step(state, chunk, *args, **kwargs)

    monkeypatch.setattr(seg, "run_step", recording)
    return steps


def freed(t: torch.Tensor) -> bool:
    """``t`` has entries but no memory left."""
    return t.numel() > 0 and t.untyped_storage().nbytes() == 0


# Assertions are on what this returns, never on an expression of the tensors: pytest's report of a
# failed assertion shows its operands, and showing a freed tensor reads it.
def freed_all(tensors: list[torch.Tensor]) -> list[bool]:
    return [freed(t) for t in tensors]


def prefill_freeing_nothing(seg, ids, state=None):
    return seg.prefill(ids, state, free_tails=False)


def state_tensors(state) -> list[torch.Tensor]:
    return [state.logits, *(getattr(layer, name) for layer in state.layers for name in STATE_NAMES)]


def assert_same_state(got, want):
    assert got.position == want.position
    for a, b in zip(state_tensors(got), state_tensors(want), strict=True):
        assert a.shape == b.shape and torch.equal(a, b)


def assert_freed_exactly_the_tails_of_whole_segment_steps(steps):
    # The first step's tails are empty or the caller's; a last piece shorter than S keeps its tails.
    frees = [i > 0 and step.position % S == 0 and step.tokens == S for i, step in enumerate(steps)]
    assert any(frees)
    for step, expected in zip(steps, frees):
        assert step.freed() == [expected] * len(step.held), step
        if expected:  # the step had the tails' memory when it began
            assert all(step.held), step


def test_sinks_keep_only_their_entries_alive(llama):
    # A slice of the concatenation of the sinks and a whole segment would keep the segment alive.
    seg = sc.transform(llama[1], sc.SegmentConfig(S, tail_len=3, sink_tokens=2, long_range=sc.HeadPlan.none()))
    with torch.no_grad():
        state = seg.prefill(random_ids(2, 3 * S + 1))
    for layer in state.layers:
        for sinks in (layer.sink_k, layer.sink_v):
            assert sinks.shape[2] == 2
            assert sinks.untyped_storage().nbytes() == sinks.numel() * sinks.element_size()


@pytest.mark.parametrize("T", [0, 3])
def test_a_tail_shorter_than_the_segment_keeps_only_its_entries_alive(llama, T):
    # A view of the finished segment's K/V would keep all S entries a layer alive with the T carried.
    seg = sc.transform(llama[1], sc.SegmentConfig(S, tail_len=T, long_range=sc.HeadPlan.fraction(0.5)))
    with torch.no_grad():
        state = seg.prefill(random_ids(2, 3 * S))
    for layer in state.layers:
        for kept in (layer.tail_k, layer.tail_v, layer.current_k, layer.current_v):
            assert kept.untyped_storage().nbytes() == kept.numel() * kept.element_size()
        assert layer.tail_k.shape[2] == T and layer.current_k.shape[2] == 0


# (family, plan, T, G, tokens of the state given to prefill): every plan, T and G from scratch on
# Llama; a state given at a segment boundary and inside a segment; the other kinds of model.
CASES = [("llama", plan, T, G, 0) for plan in PLANS for T in (S, 3) for G in (0, 2)] + [
    ("llama", "fraction", 3, 2, 2 * S),
    ("llama", "all", S, 0, S + 3),
    ("llama", "none", 3, 0, S + 3),
    ("llama", "fraction", S, 2, 2 * S),
    ("gpt2", "fraction", 3, 2, 0),
    ("gpt2", "all", S, 0, S + 3),
    ("plain", "fraction", S, 2, 2 * S),
    ("plain", "none", 3, 2, 0),
]


@pytest.mark.parametrize("family,plan,T,G,start", CASES)
def test_prefill_freeing_tails_equals_prefill_freeing_nothing(monkeypatch, family, plan, T, G, start):
    seg = sc.transform(captured(family)[1], sc.SegmentConfig(S, tail_len=T, sink_tokens=G, long_range=PLANS[plan]))
    ids = random_ids(2, 4 * S + 3, seed=T + G)  # the last piece is shorter than S
    with torch.no_grad():
        given = seg.prefill(random_ids(2, start, seed=7)) if start else None
        before = [t.clone() for t in state_tensors(given)] if given else []
        want = prefill_freeing_nothing(seg, ids, given)
        steps = record_steps(monkeypatch, seg)
        got = seg.prefill(ids, given)
        assert_same_state(got, want)
        assert_freed_exactly_the_tails_of_whole_segment_steps(steps)
        if given is None:
            return
        # The caller's state is whole: readable, unchanged, and a second branch from it is right too.
        kept = freed_all(state_tensors(given))
        assert kept == [False] * len(before)
        assert all(torch.equal(t, copy) for t, copy in zip(state_tensors(given), before, strict=True))
        other = random_ids(2, 3 * S, seed=11)
        want_other = prefill_freeing_nothing(seg, other, given)
        assert_same_state(seg.prefill(other, given), want_other)
        assert_same_state(seg.prefill(ids, got), prefill_freeing_nothing(seg, ids, got))


def test_each_tail_is_freed_once_its_layer_has_read_it(monkeypatch):
    # The peak is lower only if the old tails go one layer at a time, inside the step: when layer
    # l's attention runs, the tails of the layers before it are freed, its own and later ones not.
    seg = sc.transform(captured("llama", layers=3)[1], sc.SegmentConfig(S, tail_len=3, long_range=sc.HeadPlan.fraction(0.5)))
    steps = record_steps(monkeypatch, seg)
    seen = []  # per attention call: the step, and which of the step's tails were freed then
    reference = sc.ops.IMPLEMENTATIONS["reference"]

    def watching(*args):
        seen.append((len(steps) - 1, steps[-1].freed()))
        return reference(*args)

    monkeypatch.setitem(sc.ops.IMPLEMENTATIONS, "reference", watching)
    with torch.no_grad():
        seg.prefill(random_ids(1, 3 * S))
    assert [step for step, _ in seen] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for i, (step, tails) in enumerate(seen):
        layer = i % 3
        want = [step > 0 and l < layer for l in range(3) for _ in "kv"]
        assert tails == want, (step, layer)
    assert all(all(step.freed()) for step in steps[1:])  # the last layer's too, by the step's end


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_prefill_without_autograd_frees_tails(monkeypatch, llama, mode):
    seg = sc.transform(llama[1], sc.SegmentConfig(S, tail_len=3, long_range=sc.HeadPlan.all()))
    steps = record_steps(monkeypatch, seg)
    with getattr(torch, mode)():
        state = seg.prefill(random_ids(1, 3 * S + 2))
    assert_freed_exactly_the_tails_of_whole_segment_steps(steps)
    with torch.no_grad():
        assert_same_state(state, prefill_freeing_nothing(seg, random_ids(1, 3 * S + 2)))


def test_nothing_else_frees_tails(monkeypatch, llama):
    # A prefill that builds an autograd graph (the tails are saved for backward), forward, decode
    # and compiled steps keep every tail.
    seg = sc.transform(llama[1], sc.SegmentConfig(S, tail_len=3, long_range=sc.HeadPlan.all()))
    ids = random_ids(1, 3 * S + 2)
    steps = record_steps(monkeypatch, seg)
    with torch.no_grad():
        want = prefill_freeing_nothing(seg, ids)
    got = seg.prefill(ids)  # grad mode, parameters requiring grad
    assert got.logits.requires_grad
    assert torch.equal(got.logits.detach(), want.logits)
    with torch.no_grad():
        seg(ids)
        state = seg.prefill(ids[:, :2])
        for t in range(2, 2 * S + 1):
            _, state = seg.decode(state, ids[:, t : t + 1])
        seg.compile(backend="eager")
        seg.prefill(ids)
    assert len(steps) > 3 * 4 + 2 * S
    assert not any(any(step.freed()) for step in steps)
