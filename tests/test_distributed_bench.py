"""bench/bench_distributed.py --tiny runs one rank on the CPU (gloo) and writes a well-formed result."""

from __future__ import annotations

import json

import pytest
import torch.distributed as dist

from conftest import load_script


def load_bench():
    return load_script("bench", "bench_distributed")


@pytest.mark.parametrize("flags,wrap", [(["--gathered"], "fsdp-per-layer-sequence"), (["--wrap", "ddp"], "ddp")])
def test_tiny_run_writes_its_result(tmp_path, capsys, flags, wrap):
    assert not dist.is_initialized()
    result = load_bench().main(["--tiny", "--out", str(tmp_path), *flags])
    assert not dist.is_initialized()  # the bench's one-rank group is gone
    written = json.loads((tmp_path / f"bench_distributed-{wrap}-1xcpu.json").read_text())
    assert written == json.loads(json.dumps(result))
    assert written["ranks"] == 1 and written["tokens_per_s"] > 0 and len(written["losses_rank0"]) == 2
    if wrap != "ddp":
        # one tiny layer at a time (2 of 2 layers would be 295936 B), the root unit besides
        layer = 147968  # 2 x (64 x 64) + 2 x (64 x 32) attention + 3 x 64 x 128 MLP + 2 x 64 norm, fp32
        assert written["gathered_peak_bytes"]["layers"] == layer
    assert f"{wrap} on 1 x cpu" in capsys.readouterr().out


def test_arguments_are_checked():
    bench = load_bench()
    with pytest.raises(SystemExit):
        bench.parse_args(["--seq-len", "100", "--segment-len", "64"])
    args = bench.parse_args([])
    assert (args.seq_len, args.layers, args.hidden, args.vocab) == (32768, 16, 2048, 128256)
