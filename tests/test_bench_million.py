"""``bench/bench_million.py`` (a million-token prefill with an fp8 history, then greedy decoding)
and the result files it shares with ``bench/bench_prefill.py``, smoked on the CPU with ``--tiny``:
the rows, the history's bytes, the greedy tokens against the oracle's, a time limit, an
out-of-memory error, and rows of two runs merged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import load_script

import segcompile as sc


@pytest.fixture(scope="module")
def million():
    return load_script("bench", "bench_million")  # its sibling imports resolve as when it runs


def rows_of(out: Path) -> dict:
    document = json.loads((out / "bench_million-tiny-cpu.json").read_text())
    return {(r["regime"], r["history_dtype"]): r for r in document["rows"]}


def oracle_greedy(cfg: sc.SegmentConfig, ids: torch.Tensor, new_tokens: int) -> list[int]:
    """Greedy tokens after ``ids`` by the dense oracle of ``cfg``, one whole forward per token."""
    from segcompile.testing.models import tiny_llama

    model = tiny_llama(num_layers=2).eval()
    tokens = []
    for _ in range(new_tokens):
        nxt = sc.oracle.forward(model, cfg, ids)[:, -1].argmax(-1, keepdim=True)
        tokens.append(nxt.item())
        ids = torch.cat([ids, nxt], dim=1)
    return tokens


def test_tiny_run_rows_history_bytes_and_greedy_tokens(million, tmp_path, capsys):
    new_tokens = 4
    million.main(["--tiny", "--new-tokens", str(new_tokens), "--out", str(tmp_path)])
    rows = rows_of(tmp_path)
    assert set(rows) == {("segcompile", "fp8"), ("segcompile", "model"), ("sdpa", "model"), ("chunked", "model")}
    assert all(r["status"] == "ok" for r in rows.values())
    assert rows["segcompile", "fp8"]["decode_path"] == "static"  # the CUDA-graph decoder's program, off CUDA
    assert rows["segcompile", "fp8"]["history_taken_over"] and rows["segcompile", "model"]["history_taken_over"]
    args = million.parse_args(["--tiny"])
    # 144 tokens, S = T = 32: the history holds positions [0, 96) of 1 long-range KV head (of 2) in
    # each of 2 layers, head_dim 16; fp8 values plus a 4-byte scale per 64-position block cut per
    # segment piece (3 blocks), against fp32 values
    positions, pieces, long_range_rows = 96, 3, 2 * 2 * 1  # layers x (K, V) x long-range heads
    fp8_bytes = long_range_rows * (positions * 16 * 1 + pieces * 4)
    fp32_bytes = long_range_rows * positions * 16 * 4
    assert rows["segcompile", "fp8"]["history_gib"] * million.GiB == fp8_bytes
    assert rows["segcompile", "model"]["history_gib"] * million.GiB == fp32_bytes
    ids = torch.randint(0, 256, (1, args.seq_len), generator=million.seeded(torch.device("cpu")))
    for word, dtype in (("fp8", torch.float8_e4m3fn), ("model", None)):
        cfg = sc.SegmentConfig(args.segment_len, long_range=sc.HeadPlan.fraction(args.long_range),
                               history_dtype=dtype)
        assert rows["segcompile", word]["tokens"] == oracle_greedy(cfg, ids, new_tokens), word
    out = capsys.readouterr().out
    assert "segcompile fp8 history: 64/144 tokens" in out and "segcompile fp8 history: 144/144 tokens" in out
    assert "sdpa: layer 1/2" in out


@pytest.mark.filterwarnings("error:.*past_key_values:FutureWarning")
def test_hf_baselines_fill_their_cache_by_the_keyword_this_transformers_takes(million):
    """bench_prefill's SDPA and chunked prefills (the peers of this benchmark and bench_prefill's)
    hand transformers their cache as ``cache`` where its forward takes that (``past_key_values`` is
    deprecated from 5.2x and removed in 5.40), else as ``past_key_values``: both fill it with every
    token, and the chunks' keys are the whole prompt's."""
    from segcompile.testing.models import tiny_llama

    model = tiny_llama(num_layers=2).eval()
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = million.bench_prefill.sdpa_prefill(model, ids)
        chunked = million.bench_prefill.chunked_prefill(model, ids, 16)
    assert whole.get_seq_length() == chunked.get_seq_length() == 40
    for a, b in zip(whole.layers, chunked.layers, strict=True):
        torch.testing.assert_close(b.keys, a.keys, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b.values, a.values, rtol=1e-5, atol=1e-6)


def test_eager_decode_chooses_the_same_tokens(million, tmp_path):
    million.main(["--tiny", "--new-tokens", "4", "--regimes", "segcompile", "--history-dtypes", "fp8",
                  "--decode", "eager", "--out", str(tmp_path / "eager")])
    million.main(["--tiny", "--new-tokens", "4", "--regimes", "segcompile", "--history-dtypes", "fp8",
                  "--out", str(tmp_path / "graphs")])
    eager, graphs = rows_of(tmp_path / "eager")["segcompile", "fp8"], rows_of(tmp_path / "graphs")["segcompile", "fp8"]
    assert (eager["decode_path"], graphs["decode_path"]) == ("eager", "static")
    assert eager["tokens"] == graphs["tokens"]


def test_time_limit_stops_the_baselines_and_records_how_far(million, tmp_path):
    million.main(["--tiny", "--new-tokens", "1", "--regimes", "sdpa", "chunked", "--baseline-limit-s", "0",
                  "--out", str(tmp_path)])
    rows = rows_of(tmp_path)
    assert rows["sdpa", "model"]["status"] == "stopped" and rows["sdpa", "model"]["reached"] == "0 of 2 layers"
    assert rows["chunked", "model"]["status"] == "stopped"
    assert rows["chunked", "model"]["reached"] == "32 of 144 tokens"  # the first chunk ran, then the limit


def test_out_of_memory_is_a_row_and_the_run_goes_on(million):
    def too_big():
        raise torch.OutOfMemoryError("CUDA out of memory")

    row = million.attempt(too_big, weights=0)
    assert row["status"] == "oom" and row["seconds"] >= 0
    assert million.attempt(lambda: dict(seconds=1.0), weights=0)["status"] == "ok"


def test_runs_merge_by_regime_and_history_dtype(million, tmp_path):
    common = ["--tiny", "--new-tokens", "1", "--regimes", "segcompile", "--out", str(tmp_path)]
    million.main([*common, "--history-dtypes", "model"])
    first = rows_of(tmp_path)["segcompile", "model"]
    million.main([*common, "--history-dtypes", "fp8"])
    rows = rows_of(tmp_path)
    assert set(rows) == {("segcompile", "fp8"), ("segcompile", "model")}
    assert rows["segcompile", "model"] == first  # the fp8 run kept the model-dtype row as it was


def test_merge_rows_replaces_only_what_a_run_measured(million):
    prefill = million.bench_prefill
    old = [dict(n=1, regime="segcompile", seconds=1.0), dict(n=1, regime="sdpa", seconds=2.0)]  # files before fp8
    new = [dict(n=1, regime="segcompile", history_dtype="fp8", seconds=3.0),
           dict(n=1, regime="sdpa", history_dtype="model", seconds=4.0)]
    merged = prefill.merge_rows(old, new)
    assert [(r["regime"], r.get("history_dtype", "model"), r["seconds"]) for r in merged] == [
        ("segcompile", "fp8", 3.0), ("segcompile", "model", 1.0), ("sdpa", "model", 4.0)]


def test_interleaved_rounds_alternate_the_order_of_the_runs(million):
    """Every other round runs the regimes in reverse, so that a steady drift of the clocks does not
    always reach the same regime last."""
    calls = []
    runs = {(name, "model"): (lambda ids, name=name: calls.append(name)) for name in ("a", "b", "c")}
    timings = million.bench_prefill.interleaved(runs, None, repeats=4)
    assert calls == ["a", "b", "c", "c", "b", "a", "a", "b", "c", "c", "b", "a"]
    assert all(len(t["seconds_each"]) == 4 for t in timings.values())
