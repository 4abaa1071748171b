"""bench/tbptt_regimes.py --quick runs every regime on CPU and writes a well-formed result."""

from __future__ import annotations

import json

from conftest import load_script


def load_bench():
    return load_script("bench", "tbptt_regimes")


def test_quick_run_writes_all_four_regimes(tmp_path, capsys):
    bench = load_bench()
    bench.main(["--quick", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "tbptt_regimes-quick-cpu.json").read_text())

    assert list(report["regimes"]) == ["full", "full->seg", "seg k=1", "seg k=0"]
    n_buckets = report["config"]["seq_len"] // report["config"]["segment_len"]
    for name, r in report["regimes"].items():
        assert 0 <= r["accuracy"] <= 1, name
        assert set(r["accuracy_by_segments_back"]) <= {str(b) for b in range(n_buckets)}, name
        assert all(0 <= a <= 1 for a in r["accuracy_by_segments_back"].values()), name
        assert sum(r["answers_by_segments_back"].values()) == report["config"]["eval_batches"] * report["config"]["batch_size"] * report["config"]["queries"]
        assert r["train_seconds"] > 0 and r["loss_curve"][-1][0] == report["config"]["steps"]
    assert report["regimes"]["full->seg"]["loss_curve"] == report["regimes"]["full"]["loss_curve"]  # one trained model
    assert report["command"].endswith("--quick --out " + str(tmp_path))
    out = capsys.readouterr().out
    assert "answer accuracy by segments back" in out and "seg k=0" in out
