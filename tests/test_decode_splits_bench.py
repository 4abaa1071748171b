"""bench/decode_splits.py --tiny runs the CUDA-graph decoder's attention over a bf16 and an fp8
history on the CPU (Triton interpreted) for each programs-a-multiprocessor value, and writes its
rows with the command that reproduces them."""

from __future__ import annotations

import json

from conftest import load_script


def test_tiny_sweep_times_both_histories_and_leaves_the_decode_as_it_was(tmp_path, capsys):
    bench = load_script("bench", "decode_splits")
    from segcompile.kernels import triton_common, triton_decode

    tiles_before = dict(triton_common.TILES["decode"]), dict(triton_common.TILES["decode-fp8"])
    constants = triton_decode.PROGRAMS_PER_SM, triton_decode.PROGRAMS_PER_SM_FP8_HISTORY
    rows = bench.main(["--tiny", "--decode-tiles", "16,32,4,2", "--out", str(tmp_path)])
    document = json.loads((tmp_path / "decode_splits-tiny-cpu.json").read_text())

    assert document["rows"] == rows
    assert [(r["history_len"], r["programs_per_sm"]) for r in rows] == [(200, "decoder's"), (200, 1), (200, 2)]
    assert all(r["tile"] == r["fp8_tile"] == [16, 32, 4, 2] for r in rows)
    assert all(r["bf16_ms"] > 0 and r["fp8_ms"] > 0 for r in rows)
    assert document["meta"]["command"] == "python bench/decode_splits.py --tiny --decode-tiles 16,32,4,2"
    # the sweep leaves the decode's table and constants as it found them
    assert (dict(triton_common.TILES["decode"]), dict(triton_common.TILES["decode-fp8"])) == tiles_before
    assert (triton_decode.PROGRAMS_PER_SM, triton_decode.PROGRAMS_PER_SM_FP8_HISTORY) == constants
    assert "programs/SM" in capsys.readouterr().out
