"""Hardware counters (Nsight Compute) of the segment_attention kernels and FlexAttention's, at the
benchmark shape: where the cycles of each kernel go.

The workload (``--workload``, what ``ncu`` runs): plan none at ``bench_kernel.py``'s shape; the last
segment's forward, dQ and dK/dV kernels (as autograd runs them: the forward keeps the log-sum-exp),
then FlexAttention's forward (no grad), and its forward and backward, over the whole sequence;
everything compiled and warmed up before the profiled range. Without ``--workload`` the script
runs ``ncu`` on itself (``--clock-control none``: the clocks as they run, not locked at base),
reads the report's raw page, prints a table per kernel and writes
``results/profile_kernels-<device>.json``:

* the matrix (tensor) pipe's active cycles, the issue slots used, the MUFU (``xu``: exp2), FMA
  and ALU pipes, warps resident per multiprocessor, registers a thread;
* per issued instruction, how many warps were stalled and on what (``barrier``: a CTA-wide
  ``bar.sync``; ``wait``: a fixed-latency dependency; ``long_scoreboard``: global/L2 data;
  ``mio_throttle``: the shared-memory instruction queue; ...).

    python bench/profile_kernels.py                # needs ncu on the PATH (or --ncu PATH)
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# the Triton kernels and their warp-specialised Gluon counterparts (`_fwd_ws_kernel`, `_dkdv_ws_kernel`)
KERNELS = "regex:_fwd(_ws)?_kernel|_dq_kernel|_dkdv(_ws)?_kernel|triton_tem"
SECTIONS = ["SpeedOfLight", "ComputeWorkloadAnalysis", "WarpStateStats", "SchedulerStats", "Occupancy", "LaunchStats"]
# in the order the workload launches them
LABELS = ["segcompile forward", "segcompile dQ", "segcompile dK/dV",
          "flex forward", "flex forward (grad)", "flex backward"]
METRICS = {
    "ms": "gpu__time_duration.sum",
    "registers": "launch__registers_per_thread",
    "warps_per_sm": "sm__warps_active.avg.per_cycle_active",
    "tensor_pipe_pct": "sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active",
    "issue_pct": "smsp__issue_active.avg.pct_of_peak_sustained_active",
    "mufu_pct": "sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active",
    "fma_pct": "sm__pipe_fma_cycles_active.avg.pct_of_peak_sustained_active",
    "alu_pct": "sm__pipe_alu_cycles_active.avg.pct_of_peak_sustained_active",
}
TO_MS = {"ns": 1e-6, "us": 1e-3, "usecond": 1e-3, "nsecond": 1e-6, "ms": 1.0, "msecond": 1.0}
STALLS = ["barrier", "wait", "mio_throttle", "long_scoreboard", "short_scoreboard", "not_selected",
          "math_pipe_throttle", "dispatch_stall", "lg_throttle", "gmma"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workload", action="store_true", help="run the profiled workload (what ncu runs)")
    p.add_argument("--ncu", default=shutil.which("ncu") or "/usr/local/cuda/bin/ncu")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    return p.parse_args(argv)


def workload() -> None:
    import torch

    from bench_kernel import flex_runs, segments

    from segcompile.kernels.dispatch import segment_attention_backward, segment_attention_forward

    N, S, H, hk, D = 32768, 4096, 32, 8, 128
    torch.manual_seed(0)
    q, do = (torch.randn(1, H, N, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    k, v = (torch.randn(1, hk, N, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    scale = D ** -0.5
    last, grad = list(segments(q, k, v, S, []))[-1], do[:, :, N - S:]

    def ours():
        out, lse = segment_attention_forward(*last, [], scale, return_lse=True)
        segment_attention_backward(grad, out, *last, [], scale, lse=lse)

    flex_fwd, flex_fwd_bwd = flex_runs(q, k, v, do, S, [], scale)
    for fn in (ours, flex_fwd, flex_fwd_bwd):  # compile and warm up outside the profiled range
        fn()
        fn()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    ours()
    flex_fwd()
    flex_fwd_bwd()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


def profile(ncu: str) -> tuple[str, str]:
    """The report's raw page (CSV) and the GPU's name."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "kernels"
        sections = [a for s in SECTIONS for a in ("--section", s)]
        subprocess.run([ncu, "--clock-control", "none", "--profile-from-start", "off", "-k", KERNELS, *sections,
                        "-o", str(report), sys.executable, __file__, "--workload"], check=True)
        raw = subprocess.run([ncu, "--import", f"{report}.ncu-rep", "--page", "raw", "--csv"],
                             check=True, capture_output=True, text=True).stdout
    import torch

    return raw, torch.cuda.get_device_name()


def summarize(raw: str) -> list[dict]:
    table = list(csv.reader(io.StringIO(raw)))
    header, units, rows = table[0], table[1], table[2:]
    col = {name: i for i, name in enumerate(header)}

    def number(row, metric):
        value = float(row[col[metric]].replace(",", ""))
        return value * TO_MS[units[col[metric]]] if metric == METRICS["ms"] else value

    out = []
    for label, row in zip(LABELS, rows):
        r = dict(kernel=label, name=row[col["Kernel Name"]])
        r.update({key: number(row, metric) for key, metric in METRICS.items()})
        r["stalls_per_issue"] = {s: number(row, f"smsp__average_warps_issue_stalled_{s}_per_issue_active.ratio")
                                 for s in STALLS}
        out.append(r)
    return out


def report(rows: list[dict], device: str, out: Path) -> None:
    keys = list(METRICS)
    print(f"{device}; plan none, N=32K, S=T=4096, H=32, Hk=8, D=128, bf16 (segcompile: the last segment)")
    print(f"{'':22}" + "".join(f"{k:>17}" for k in keys))
    for r in rows:
        print(f"{r['kernel']:22}" + "".join(f"{r[k]:17.2f}" for k in keys))
    print(f"\nwarps stalled per issued instruction\n{'':22}" + "".join(f"{s[:16]:>17}" for s in STALLS))
    for r in rows:
        print(f"{r['kernel']:22}" + "".join(f"{r['stalls_per_issue'][s]:17.2f}" for s in STALLS))
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"profile_kernels-{device.replace(' ', '_')}.json"
    meta = dict(device=device, command="python bench/profile_kernels.py", sections=SECTIONS, metrics=METRICS)
    path.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    print(f"wrote {path}")


def main(argv=None):
    args = parse_args(argv)
    if args.workload:
        workload()
        return
    raw, device = profile(args.ncu)
    report(summarize(raw), device, args.out)


if __name__ == "__main__":
    main()
