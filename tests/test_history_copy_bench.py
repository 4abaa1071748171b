"""bench/history_copy.py --tiny times the fp8 history's widening copy on the CPU (Triton
interpreted), checks it against history_format's dequantisation, and writes its rows with the
command that reproduces them."""

from __future__ import annotations

import json

from conftest import load_script


def test_tiny_run_times_the_copy_and_leaves_its_tile_as_it_was(tmp_path, capsys):
    bench = load_script("bench", "history_copy")
    from segcompile.kernels import triton_history

    tile_before = dict(triton_history.COPY_TILE)
    rows = bench.main(["--tiny", "--out", str(tmp_path)])
    document = json.loads((tmp_path / "history_copy-tiny-cpu.json").read_text())

    assert document["rows"] == rows
    assert [r["what"] for r in rows] == ["pair 64,4", "two launches", "torch copy_ (bf16)"]
    assert all(r["history_len"] == 200 and r["us"] > 0 and r["gb_per_s"] > 0 for r in rows)
    assert document["meta"]["command"] == "python bench/history_copy.py --tiny"
    assert triton_history.COPY_TILE == tile_before
    assert "GB/s" in capsys.readouterr().out
