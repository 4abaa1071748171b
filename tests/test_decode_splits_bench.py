"""bench/decode_splits.py --tiny runs the CUDA-graph decoder's attention over a bf16 and an fp8
history on the CPU (Triton interpreted) for each programs-a-multiprocessor value, and writes its
rows with the command that reproduces them."""

from __future__ import annotations

import json

import torch

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


def test_the_decoders_own_counts_are_the_ones_it_had_at_every_length():
    """A row of programs a multiprocessor 0 times the decoder's own split counts, also at a history
    length swept after rows that set other counts."""
    bench = load_script("bench", "decode_splits")
    from segcompile.kernels import triton_decode

    args = bench.parse_args(["--tiny"])
    args.history_lens, args.programs_per_sm = [200, 328], [0, 1]
    rows = bench.run(args, bench.TINY, "cpu")

    shape = bench.TINY
    bounds = triton_decode.split_bounds(torch.device("cpu"), shape["B"] * shape["HK"], True)
    for r in rows:
        longest = r["history_len"] + shape["T"] + min(100, shape["S"] - 1) + 1  # ``buffers``' position, and itself
        if r["programs_per_sm"] == "decoder's":
            assert r["fp8_keys_a_split"] == triton_decode.split_plan(longest, r["fp8_tile"][1], bounds)[1]
        else:  # one split a KV head
            assert r["fp8_keys_a_split"] >= longest
    assert [r["programs_per_sm"] for r in rows] == ["decoder's", 1, "decoder's", 1]
