"""``bench/families.py`` on two families: one compiles and matches the oracle, one is refused with
the error that names why; the result file records both, and the script fails on a defect."""

from __future__ import annotations

import json

from conftest import load_script


def test_a_family_that_compiles_and_one_that_is_refused(tmp_path, capsys):
    bench = load_script("bench", "families")
    assert bench.main(["--families", "qwen3_moe", "lfm2", "--impls", "sdpa", "--out", str(tmp_path)]) == 0
    rows = {r["family"]: r for r in json.loads((tmp_path / "families-cpu.json").read_text())["rows"]}
    assert rows["qwen3_moe"]["status"] == "ok" and rows["qwen3_moe"]["max_abs_vs_oracle"] <= 1e-4
    assert rows["lfm2"]["status"] == "refused" and rows["lfm2"]["error"] == "UnsupportedAttentionError"
    assert "['conv'] layers" in rows["lfm2"]["detail"]
    assert "qwen3_moe    sdpa   ok" in capsys.readouterr().out


def test_an_error_that_is_not_a_refusal_fails_the_run(tmp_path, monkeypatch):
    bench = load_script("bench", "families")

    def broken(model, cfg):
        raise RuntimeError("a bare error escaped")

    monkeypatch.setattr(bench.sc, "transform", broken)
    assert bench.main(["--families", "llama", "--impls", "sdpa", "--out", str(tmp_path)]) == 1
    row = json.loads((tmp_path / "families-cpu.json").read_text())["rows"][0]
    assert row["status"] == "FAILED" and row["detail"] == "a bare error escaped"
