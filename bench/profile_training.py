"""Where a TBPTT training step's time goes: one step under ``torch.profiler``, per segment.

The model and regimes are ``bench_training.py``'s (443M Llama shape by default, bf16 autocast, K = 1,
fraction(0.25), S = T = 2048). Reported, for one ``seg.tbptt_backward`` over --seq-len tokens and,
as the floor, for one plain forward+backward of the model over one segment (--segment-len tokens,
full causal attention, the same autocast):

* wall time and GPU-busy time (the union of the kernels' intervals on the device), per segment;
* kernel launches and host-device synchronisations (``cuda*Synchronize``, blocking ``cudaMemcpy``),
  per segment;
* the top operators by self device time and by self host time;
* the time Python's garbage collector stopped the step, and the longest intervals the GPU sat idle
  with the host operator that spans each (a stall outside any operator shows as its caller).

    python bench/profile_training.py --seq-len 32768 [--compiled] [--trace trace.json]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import segcompile as sc
from segcompile.quality import report

from bench_training import (add_compile_args, add_model_args, build_model, collector_pauses, compile_options, sequence,
                            warmup_steps, write_result)

LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx")
# .item(), .cpu() and data-dependent shapes end in one of these (a device-to-host copy waits on its stream)
SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")
TOP = 15


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-len", type=int, default=32768)
    add_model_args(p)
    p.add_argument("--checkpoint", action="store_true", help="tbptt_backward(checkpoint=True)")
    p.add_argument("--compiled", action="store_true", help="profile after seg.compile()")
    add_compile_args(p)
    p.add_argument("--trace", type=Path, default=None, help="also write the Chrome trace of the TBPTT step")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    return p.parse_args(argv)


def profiled(step, trace: Path | None = None, warmup: int = 1) -> tuple[float, profile, list[float]]:
    """Run ``step`` ``warmup`` times, then once under the profiler; its wall seconds, the profile,
    and the seconds of each garbage collection in it (the profiler does not see them)."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof, collector_pauses() as pauses:
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    if trace is not None:
        prof.export_chrome_trace(str(trace))
    return wall, prof, pauses


def summary(wall: float, prof: profile, units: int, gc_pauses: list[float] | None = None) -> dict:
    """Totals of one profile, divided by ``units`` (segments) where it says per segment."""
    events = prof.events()
    kernels = sorted((e.time_range.start, e.time_range.end) for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    busy_us, end, idle = 0.0, float("-inf"), []
    for lo, hi in kernels:  # the union of the intervals: overlapping kernels count once
        if hi > end:
            if end > float("-inf") and lo > end:
                idle.append((lo - end, end, lo))
            busy_us += hi - max(lo, end)
            end = hi
    launches = sum(1 for e in events if e.name in LAUNCHES)
    syncs = sum(1 for e in events if e.name in SYNCS)
    averages = prof.key_averages()
    by_device = sorted(averages, key=lambda a: a.self_device_time_total, reverse=True)[:TOP]
    by_host = sorted(averages, key=lambda a: a.self_cpu_time_total, reverse=True)[:TOP]
    return {
        "units": units,
        "wall_ms": wall * 1e3 / units,
        "gpu_busy_ms": busy_us / 1e3 / units,
        "gpu_busy_fraction": busy_us / 1e6 / wall,
        "kernel_launches": launches / units,
        "host_device_syncs": syncs / units,
        "top_by_device_ms": [(a.key, a.self_device_time_total / 1e3 / units, a.count / units) for a in by_device],
        "top_by_host_ms": [(a.key, a.self_cpu_time_total / 1e3 / units, a.count / units) for a in by_host],
        "gc_pause_ms": None if gc_pauses is None else sum(gc_pauses) * 1e3 / units,
        "longest_gpu_idle": longest_idle(events, idle),
    }


def longest_idle(events, idle: list[tuple[float, float, float]], count: int = 3) -> list[tuple[float, str]]:
    """The ``count`` longest intervals with no kernel on the device (ms, whole step), each with the
    innermost host operator that spans it: what the host was doing while the GPU waited."""
    host = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU]
    found = []
    for us, lo, hi in sorted(idle, reverse=True)[:count]:
        spans = [e for e in host if e.time_range.start <= lo and e.time_range.end >= hi]
        inner = min(spans, key=lambda e: e.time_range.end - e.time_range.start, default=None)
        found.append((us / 1e3, inner.name if inner is not None else "(no host operator)"))
    return found


def main(argv=None):
    args = parse_args(argv)
    args.seq_lens = [args.seq_len]
    model = build_model(args)
    cfg = sc.SegmentConfig(args.segment_len, long_range=sc.HeadPlan.fraction(args.long_range), tbptt_k=1)
    model.eval()
    seg = sc.transform(model, cfg)
    if args.compiled:
        seg.compile(**compile_options(args))
    model.train()
    ids = sequence(args.seq_len, args)
    segments = cfg.num_segments(args.seq_len)

    def tbptt_step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            seg.tbptt_backward(ids, checkpoint=args.checkpoint)
        model.zero_grad(set_to_none=True)

    def floor_step():  # the model's own forward+backward over one segment: what a segment cannot beat
        with torch.autocast("cuda", dtype=torch.bfloat16):
            model(input_ids=ids[:, : args.segment_len], labels=ids[:, : args.segment_len], use_cache=False).loss.backward()
        model.zero_grad(set_to_none=True)

    rows = {}
    wall, prof, pauses = profiled(tbptt_step, args.trace, warmup=warmup_steps(seg))
    rows["tbptt"] = summary(wall, prof, segments, pauses)
    wall, prof, pauses = profiled(floor_step)
    rows["plain_segment"] = summary(wall, prof, 1, pauses)

    device = torch.cuda.get_device_name()
    result = {
        "device": device, "torch": torch.__version__,
        "command": report.recorded_command("bench/profile_training.py", sys.argv[1:], {"--out", "--trace"}),
        "seq_len": args.seq_len, "segment_len": args.segment_len, "long_range_fraction": args.long_range,
        "checkpoint": args.checkpoint, "compiled": args.compiled,
        "compile_options": compile_options(args) if args.compiled else None, "implementations": sorted(set(seg.implementations.values())),
        "rows": rows,
    }
    print_table(result)
    write_result(result, "profile_training", args.out)


def print_table(result) -> None:
    print(f"\n{result['device']}, N={result['seq_len']}, S={result['segment_len']}, per segment:")
    print_profiles(result["rows"], "step", "segment", digits=1)


def print_profiles(rows: dict[str, dict], what: str, unit: str, digits: int) -> None:
    """``summary`` rows as a table (``what``: the first column's title; times per ``unit``), then
    each row's top operators by device and by host time."""
    width = max(len(what), *map(len, rows))
    print(f"{what:<{width}} | {'wall ms':>8} | {'GPU busy ms':>11} | {'busy':>5} | {'launches':>8} | {'syncs':>5}")
    for name, r in rows.items():
        print(f"{name:<{width}} | {r['wall_ms']:8.{digits}f} | {r['gpu_busy_ms']:11.{digits}f} | "
              f"{r['gpu_busy_fraction']:5.0%} | {r['kernel_launches']:8.0f} | {r['host_device_syncs']:5.1f}")
    for name, r in rows.items():
        if r.get("gc_pause_ms") is not None:
            print(f"{name}: garbage collection {r['gc_pause_ms']:.{digits}f} ms per {unit}")
        for ms, op in r.get("longest_gpu_idle", []):
            print(f"{name}: GPU idle {ms:.{digits}f} ms (whole step) inside {op[:80]}")
    for name, r in rows.items():
        for order in ("top_by_device_ms", "top_by_host_ms"):
            print(f"\n{name}: {order} (ms per {unit}, calls per {unit})")
            for key, ms, calls in r[order]:
                print(f"  {ms:8.{digits + 1}f}  {calls:7.1f}  {key[:90]}")


if __name__ == "__main__":
    main()
