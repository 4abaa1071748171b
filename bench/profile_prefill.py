"""Where a long prefill's time goes, per history dtype: one ``seg.prefill`` under ``torch.profiler``.

The model and settings are ``bench_prefill.py``'s (Llama-3-8B shape, random bf16 weights,
S = T = --segment-len, fraction(--long-range), no sinks, ``torch.no_grad()``). For each
--history-dtypes (the model's dtype, fp8: ``SegmentConfig.history_dtype``), one prefill of
--seq-len tokens runs as a warm-up and one under the profiler; reported per segment: wall time,
GPU-busy time, kernel launches, host-device synchronisations and the top operators by device and
by host time (``profile_training.summary``), and the device time of the kernels the dtypes spend
differently (``NAMED_KERNELS``). Side by side, the two rows say where the fp8 history's
prefill spends the time that the bf16 one does not.

    python bench/profile_prefill.py                       # 128K, bf16 and fp8 history
    python bench/profile_prefill.py --seq-len 32768 --trace trace.json

Writes ``bench/results/profile_prefill-<device>.json``; needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import segcompile as sc
from segcompile.quality import report

from bench_prefill import HISTORY_DTYPES, add_model_args, build_model
from bench_training import write_result
from profile_training import print_profiles, profiled, summary


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-len", type=int, default=131072)
    add_model_args(p)
    p.add_argument("--history-dtypes", nargs="+", choices=list(HISTORY_DTYPES), default=["model", "fp8"])
    p.add_argument("--trace", type=Path, default=None, help="also write the Chrome trace of the last dtype's prefill")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args(argv)
    args.seq_lens = [args.seq_len]  # build_model sizes the position table by it
    return args


def main(argv=None):
    args = parse_args(argv)
    model = build_model(args)
    ids = torch.randint(0, model.config.vocab_size, (1, args.seq_len), device="cuda")
    segments = -(-args.seq_len // args.segment_len)
    rows = {}
    for name in args.history_dtypes:
        cfg = sc.SegmentConfig(args.segment_len, long_range=sc.HeadPlan.fraction(args.long_range), tbptt_k=0,
                               history_dtype=HISTORY_DTYPES[name])
        seg = sc.transform(model, cfg)

        def prefill():
            with torch.no_grad():
                seg.prefill(ids)

        wall, prof, pauses = profiled(prefill, args.trace if name == args.history_dtypes[-1] else None)
        rows[f"{name} history"] = dict(summary(wall, prof, segments, pauses), kernels_ms=named_kernels(prof, segments))
        print(name, {k: v for k, v in rows[f"{name} history"].items() if not k.startswith("top")}, flush=True)
        del seg, prof
        torch.cuda.empty_cache()
    result = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "command": report.recorded_command("bench/profile_prefill.py", sys.argv[1:], {"--out", "--trace"}),
        "seq_len": args.seq_len, "segment_len": args.segment_len, "long_range_fraction": args.long_range,
        "layers": args.layers, "rows": rows,
    }
    print(f"\n{result['device']}, N={args.seq_len}, S={args.segment_len}, per segment:")
    print_profiles(rows, "prefill", "segment", digits=1)
    for name, r in rows.items():
        for kernel, (ms, launches) in r["kernels_ms"].items():
            print(f"{name}: {kernel} {ms:.2f} ms, {launches:.0f} launches per segment")
    write_result(result, "profile_prefill", args.out)


# the kernels whose time the two history dtypes spend differently: the attention forward, the
# fp8 history's widening copy and its quantisation at a segment end
NAMED_KERNELS = ("_fwd_ws_kernel", "_dequantize_kernel", "_quantize_kernel")


def named_kernels(prof, units: int) -> dict:
    """``NAMED_KERNELS``' device ms and launches per segment (the top lists may not reach them)."""
    averages = {a.key: a for a in prof.key_averages()}
    return {name: (averages[name].self_device_time_total / 1e3 / units, averages[name].count / units)
            for name in NAMED_KERNELS if name in averages}


if __name__ == "__main__":
    main()
