"""A decode state belongs to the program that made it (``SegmentState.program_id``).

A state holds each layer's K/V where its segment sizes and head plan put them, computed with its
model's parameters: continued by another program it gives wrong logits (prefill with S = 8,
decode with S = 16: no error, logits off by about 0.05) or a shape error deep inside a step. The
driver refuses such a state up front with a ``StateError`` naming what differs, on the eager and
the static (CUDA-graph) paths, and accepts the state of an equivalent program (same parameters,
segment sizes and plan; another implementation or ``tbptt_k`` does not matter). States are
functional on the eager path: continuing one leaves it valid.
"""

from __future__ import annotations

import re
from dataclasses import replace

import pytest
import torch
from conftest import captured, make_model, random_ids

import segcompile as sc
from segcompile.errors import StateError
from segcompile.testing.tolerances import assert_close

PROMPT = 12  # crosses the first segment end of S = 8


def transform(segment_len=8, plan=None, model=None, implementation="auto", **sizes):
    """The tiny Llama (its capture, unless ``model``) as a program; ``sizes``: the config's other fields."""
    cfg = sc.SegmentConfig(segment_len, long_range=plan or sc.HeadPlan.fraction(0.5), **sizes)
    return sc.transform(model if model is not None else captured("llama")[1], cfg, implementation=implementation)


def next_token(state) -> torch.Tensor:
    return state.logits.argmax(-1, keepdim=True)


def check_message(error: pytest.ExceptionInfo, *patterns: str) -> None:
    message = str(error.value)
    for pattern in patterns:
        assert re.search(pattern, message), f"{pattern!r} not in message: {message}"
    assert len(message) < 600 and "\n" not in message, message


@pytest.fixture(scope="module")
def seg8():
    return transform(8)


@pytest.fixture(scope="module")
def prompt():
    return random_ids(2, PROMPT)


# ---- another program's state is refused ------------------------------------------------------------
@torch.no_grad()
def test_decode_refuses_a_state_of_another_segment_length(seg8, prompt):
    state = seg8.prefill(prompt)
    seg16 = transform(16)
    with pytest.raises(StateError) as error:
        seg16.decode(state, next_token(state))
    check_message(error, r"^decode: this state was made by another program", r"segment_len 8 \(this model: 16\)",
                  r"prefill with this model")
    with pytest.raises(StateError, match=r"^prefill: .*segment_len 8 \(this model: 16\)"):
        seg16.prefill(random_ids(2, 3), state=state)


@torch.no_grad()
def test_decode_refuses_a_state_of_another_plan_tail_or_sinks(seg8, prompt):
    state = seg8.prefill(prompt)
    for other, pattern in [
        (transform(8, sc.HeadPlan.none()),
         r"long-range KV heads \{0: \[0\], 1: \[0\]\} \(this model: \{0: \[\], 1: \[\]\}\)"),
        (transform(8, tail_len=4), r"tail_len 8 \(this model: 4\)"),
        (transform(8, sink_tokens=2), r"sink_tokens 0 \(this model: 2\)"),
    ]:
        with pytest.raises(StateError) as error:
            other.decode(state, next_token(state))
        check_message(error, pattern)


@torch.no_grad()
def test_decode_refuses_a_state_of_another_model_of_the_same_architecture(seg8, prompt):
    other = transform(8, model=make_model("llama", seed=1))
    state = other.prefill(prompt)
    with pytest.raises(StateError) as error:
        seg8.decode(state, next_token(state))
    check_message(error, r"the parameters of another LlamaForCausalLM")


def test_decode_refuses_what_is_not_a_state(seg8):
    with pytest.raises(StateError, match=r"decode: state must be a SegmentState .* got dict"):
        seg8.decode({}, random_ids(2, 1))


# ---- an equivalent program's state is accepted -----------------------------------------------------
@torch.no_grad()
def test_an_equivalent_program_continues_the_state(seg8, prompt):
    state = seg8.prefill(prompt)
    want, _ = seg8.decode(state, next_token(state))
    # another transform of the same capture, another implementation and tbptt_k (gradients only)
    same = transform(8, implementation="reference", tbptt_k=0)
    # a transform of the model itself: captured again, the same parameters
    recaptured = transform(8, model=captured("llama")[0])
    for other in (same, recaptured):
        got, after = other.decode(state, next_token(state))
        assert_close(got, want, torch.float32)
        assert after.program_id == seg8.program_id


@torch.no_grad()
def test_a_hand_made_state_is_checked_by_its_shapes(seg8, prompt):
    state = seg8.prefill(prompt)
    want, _ = seg8.decode(state, next_token(state))
    got, after = seg8.decode(replace(state, program_id=None), next_token(state))
    assert_close(got, want, torch.float32)
    assert after.program_id == seg8.program_id  # what this model makes carries its id
    with pytest.raises(StateError) as error:
        seg8.decode(replace(state, position=PROMPT + 1, program_id=None), next_token(state))
    check_message(error, r"layer 0: the state's current_k has shape \(2, 2, 4, 8\) where this model's state at "
                         r"position 13 has \(2, 2, 5, 8\)")


# ---- the static (CUDA-graph) path -----------------------------------------------------------------
@torch.no_grad()
def test_static_path_refuses_another_programs_state(prompt):
    seg8, seg16 = transform(8).enable_cuda_graphs(), transform(16).enable_cuda_graphs()
    state = seg8.prefill(prompt)
    with pytest.raises(StateError, match=r"segment_len 8 \(this model: 16\)"):
        seg16.decode(state, next_token(state))  # a SegmentState, before it is loaded into the buffers
    _, static = seg8.decode(state, next_token(state))
    assert seg8.last_decode_path == "static"
    with pytest.raises(StateError, match=r"segment_len 8 \(this model: 16\)"):
        seg16.decode(static, next_token(static))
    with pytest.raises(StateError, match=r"segment_len 8 \(this model: 16\)"):
        seg16.prefill(random_ids(2, 2), state=static)
    assert static.live  # refused before anything ran: the state continues where it belongs
    copy = static.to_segment_state()
    equivalent = transform(8).enable_cuda_graphs()
    got, _ = equivalent.decode(static, next_token(static))  # copied out of seg8's buffers, loaded in its own
    want, _ = seg8.decode(copy, next_token(static))
    assert_close(got, want, torch.float32)


# ---- state semantics: functional on the eager path ----------------------------------------------------
@torch.no_grad()
def test_continuing_a_state_leaves_it_valid(seg8, prompt):
    state = seg8.prefill(prompt)
    token = next_token(state)
    first, _ = seg8.decode(state, token)
    seg8.prefill(random_ids(2, 9, seed=3), state=state)  # crosses a segment end: frees only its own tails
    seg8.decode(state, token + 1)
    again, _ = seg8.decode(state, token)
    assert torch.equal(first, again)
