"""bench/bench_generate.py --tiny on the CPU: every segcompile path decodes the eager path's tokens,
and the result file holds the agreement of each path with the eager step and with the fixed-shape
step run uncaptured (``seg-static``), which the replayed program equals exactly."""

from __future__ import annotations

import json

from conftest import load_script


def test_tiny_run_reports_agreement_against_both_references(tmp_path, capsys):
    bench = load_script("bench", "bench_generate")
    bench.main(["--tiny", "--paths", "seg-eager", "seg-static", "seg-cuda-graph", "--new-tokens", "12",
                "--batches", "1", "3", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "bench_generate-tiny-cpu.json").read_text())
    agreement = {(a["path"], a["against"]): a["max_rel_error"] for a in report["accuracy"]}
    assert set(agreement) == {("seg-static", "seg-eager"), ("seg-cuda-graph", "seg-eager"),
                              ("seg-cuda-graph", "seg-static")}
    assert agreement[("seg-cuda-graph", "seg-static")] == 0.0  # one program: off CUDA both run it eagerly
    assert agreement[("seg-static", "seg-eager")] <= 1e-5  # fp32 (the fused projections may round otherwise)
    assert {r["decode_path"] for r in report["rows"]} == {"eager", "static"}
    assert "against seg-static" in capsys.readouterr().out


def test_agreement_measures_units_in_the_last_place_and_greedy_choices():
    import torch

    bench = load_script("bench", "bench_generate")
    want = [torch.tensor([[3.3125, -1.0, 0.5]], dtype=torch.bfloat16),
            torch.tensor([[0.25, 1.5, 1.4921875]], dtype=torch.bfloat16)]
    # token 1: 4 bf16 units (2^-6 each at 3.3125) on its largest logit; token 2: 2 units (2^-7 at
    # its largest, 1.5) on another logit, which overtakes the largest
    got = [torch.tensor([[3.3125 + 0.0625, -1.0, 0.5]], dtype=torch.bfloat16),
           torch.tensor([[0.25, 1.5, 1.5078125]], dtype=torch.bfloat16)]
    measures = bench.agreement(got, want)
    assert measures["ulps_at_largest"] == 4.0
    assert measures["same_greedy_tokens"] == 0.5
    assert abs(measures["max_rel_error"] - 0.0625 / 3.3125) < 1e-12


def test_tiny_run_with_an_fp8_history_writes_its_own_file(tmp_path):
    bench = load_script("bench", "bench_generate")
    bench.main(["--tiny", "--history-dtype", "fp8", "--paths", "seg-eager", "seg-cuda-graph", "--new-tokens", "12",
                "--out", str(tmp_path)])
    report = json.loads((tmp_path / "bench_generate-tiny-fp8-history-cpu.json").read_text())
    assert report["runs"][0]["history_dtype"] == "fp8"
    agreement = {(a["path"], a["against"]): a["max_rel_error"] for a in report["accuracy"]}
    assert agreement[("seg-cuda-graph", "seg-eager")] <= 1e-5  # fp32: the fp8 buffers hold the eager state's values
