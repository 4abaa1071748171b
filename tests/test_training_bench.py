"""bench/bench_training.py's command line: how it asks seg.compile for a mode or Inductor options
(the benchmark itself needs a GPU)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conftest import load_script

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))  # bench_training imports memory_trace
    try:
        yield load_script("bench", "bench_training")
    finally:
        sys.path.remove(str(BENCH))


def test_compile_options_from_the_command_line(bench):
    assert bench.compile_options(bench.parse_args([])) == {}
    assert bench.compile_options(bench.parse_args(["--compile-mode", "reduce-overhead"])) == {"mode": "reduce-overhead"}
    args = bench.parse_args(["--inductor-option", "cpp_wrapper=true", "--inductor-option", "triton.cudagraphs=true",
                             "--inductor-option", "triton.cudagraph_unexpected_rerecord_limit=2"])
    assert bench.compile_options(args) == {"options": {"cpp_wrapper": True, "triton.cudagraphs": True,
                                                       "triton.cudagraph_unexpected_rerecord_limit": 2}}


def test_a_mode_and_inductor_options_together_are_refused(bench):
    # torch.compile takes one or the other
    with pytest.raises(SystemExit, match="give one"):
        bench.compile_options(bench.parse_args(["--compile-mode", "reduce-overhead", "--inductor-option", "cpp_wrapper=true"]))
    with pytest.raises(SystemExit, match="NAME=VALUE"):
        bench.compile_options(bench.parse_args(["--inductor-option", "cpp_wrapper"]))


def test_collector_pauses_times_each_collection_while_the_block_runs(bench):
    import gc

    with bench.collector_pauses() as pauses:
        gc.collect()
        gc.collect(1)
    gc.collect()  # after the block: not counted
    assert len(pauses) == 2 and all(0 <= p < 60 for p in pauses)
    assert bench.parse_args(["--gc-freeze"]).gc_freeze and not bench.parse_args([]).gc_freeze
