"""bench/head_selection.py evaluates plans with a masked forward of the model instead of the
segment loop (faster on the CPU): it must compute what the oracle defines."""

from __future__ import annotations

import argparse
import sys

import pytest
import torch

import segcompile as sc
from segcompile import quality
from segcompile.quality import report
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


def test_a_row_of_another_trial_count_is_measured_again(bench):
    passkey = {"task": "passkey", "overall": {"trials": 4}}
    ppl = {"task": "ppl", "sequences": [{}, {}, {}, {}]}
    assert not bench._measured(None, 8)
    assert not bench._measured(passkey, 8) and bench._measured(passkey, 4)
    assert bench._measured(ppl, 4) and not bench._measured(ppl, 2)


def test_recorded_commands_leave_out_the_time_limit(bench, tmp_path, monkeypatch):
    argv = ["--minutes", "30", "--lengths", "8192", "--minutes=5", "--plans", "1/3 *"]
    assert report.without_options(argv, {"--minutes"}) == ["--lengths", "8192", "--plans", "1/3 *"]
    monkeypatch.setattr(sys, "argv", ["bench/head_selection.py", *argv])
    assert bench.recorded_commands(argparse.Namespace(out=tmp_path / "none.json")) == [
        "python bench/head_selection.py --lengths 8192 --plans '1/3 *'"]


def test_only_the_wanted_plans_are_made(bench, tmp_path):
    """A method scores only for a plan the run measures (``tokenizer=None``: scoring any method
    would fail); plans already saved are loaded whether wanted or not."""
    import fnmatch

    model = make_model("llama")
    args = argparse.Namespace(plans_dir=str(tmp_path), calibration_len=64, calibration_samples=1, gate_len=64,
                              gate_steps=1)
    plans = bench.make_plans(model, None, [0.5], args, print, lambda label: fnmatch.fnmatch(label, "1/2 first-*"))
    assert list(plans) == ["full", "none", "1/2 first-layers"]
    assert [p.name for p in tmp_path.iterdir()] == ["1_2-first-layers.json"]
    again = bench.make_plans(model, None, [0.5], args, print, lambda label: False)
    assert list(again) == ["full", "none", "1/2 first-layers"]
    assert again["1/2 first-layers"]["plan"].heads == plans["1/2 first-layers"]["plan"].heads


def test_plot_draws_a_partial_result_file(bench, tmp_path):
    pytest.importorskip("matplotlib")
    document = {"model": {"source": "m", "class": "C", "layers": 2, "kv_heads": 2},
                "device": {"device": "cpu", "name": "x"},
                "plans": {"full": {}, "none": {}, "1/3 random-s0": {}, "1/3 random-s1": {}, "1/3 random-s2": {},
                          "1/3 gate-answer": {}},
                "rows": {}}
    for label, accuracy in (("full", 1.0), ("1/3 random-s0", 0.0), ("1/3 random-s1", 0.25), ("1/3 gate-answer", 1.0)):
        document["rows"][f"{label}|passkey|2048"] = {"plan": label, "task": "passkey", "length": 2048,
                                                     "overall": {"trials": 4, "accuracy": accuracy}}
    bands = {b: {"perplexity": 10.0} for b in bench.BANDS}
    document["rows"]["full|ppl|2048"] = {"plan": "full", "task": "ppl", "length": 2048, "bands": bands}
    series = bench._series(document, "1/3")
    assert [name for name, _, _ in series] == ["full", "none", "random (3 seeds)", "gate-answer"]
    bench.plot(document, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 10_000
