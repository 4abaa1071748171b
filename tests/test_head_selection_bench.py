"""bench/head_selection.py evaluates plans with a masked forward of the model instead of the
segment loop (faster on the CPU): it must compute what the oracle defines."""

from __future__ import annotations

import pytest
import torch

import segcompile as sc
from segcompile import quality
from segcompile.testing.tolerances import assert_close

from conftest import load_script, make_model, random_ids

@pytest.fixture(scope="module")
def bench():
    return load_script("bench", "head_selection")


@pytest.mark.parametrize("cfg", [
    sc.SegmentConfig(segment_len=16, sink_tokens=2, long_range=sc.HeadPlan.from_dict({0: [1], 1: [0, 1]})),
    sc.SegmentConfig(segment_len=16, tail_len=5, sink_tokens=3, long_range=sc.HeadPlan.from_dict({1: [0]})),
    sc.SegmentConfig(segment_len=8, tail_len=0, long_range=sc.HeadPlan.none()),
], ids=["mixed", "short-tail", "none"])
def test_masked_program_equals_the_oracle(bench, cfg):
    model = make_model("llama")
    ids = random_ids(1, 75, seed=3)
    got = bench.MaskedSegmentProgram(model, cfg)(ids).logits
    assert_close(got, sc.oracle.forward(model, cfg, ids), torch.float32, what="masked program vs oracle")
    assert (got - model(ids).logits).abs().max() > 1e-3  # the plan changes the logits: the masks did something


def test_quality_scores_the_masked_program_as_a_model(bench):
    model = make_model("llama")
    cfg = sc.SegmentConfig(segment_len=16, sink_tokens=2, long_range=sc.HeadPlan.from_dict({0: [0]}))
    ids = random_ids(1, 60, seed=4)
    program = bench.MaskedSegmentProgram(model, cfg)
    last = quality.last_logits(program, ids, 3)
    assert_close(last, sc.oracle.forward(model, cfg, ids)[0, -3:], torch.float32, what="last logits")
