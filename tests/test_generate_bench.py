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
