"""bench/bench_training.py's command line: how it asks seg.compile for a mode or Inductor options
(the benchmark itself needs a GPU)."""

from __future__ import annotations

import pytest
from conftest import load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("bench", "bench_training")  # its sibling imports resolve as when it runs


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


def test_heaviest_functions_names_where_a_profiled_run_spent_its_time(bench):
    import cProfile
    import time

    def slow():
        time.sleep(0.05)

    def quick():
        return sum(range(10))

    with cProfile.Profile() as profiler:
        slow()
        for _ in range(3):
            quick()
    heaviest = bench.heaviest_functions(profiler, top=3)
    assert set(heaviest) == {"self", "cumulative"} and all(len(rows) <= 3 for rows in heaviest.values())
    (slow_row,) = [r for r in heaviest["cumulative"] if "(slow)" in r["function"]]  # among the top 3
    assert slow_row["calls"] == 1 and slow_row["cumulative_s"] >= 0.04
    assert "sleep" in heaviest["self"][0]["function"]  # its own time, not slow()'s
    assert not any("(quick)" in r["function"] for r in heaviest["cumulative"][:2])
    assert bench.parse_args(["--profile-warmup"]).profile_warmup and not bench.parse_args([]).profile_warmup
