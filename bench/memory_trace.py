"""What is alive at the peak of a CUDA allocation trace, by the line of code that allocated it.

``record(fn, path)`` runs ``fn`` with the allocator's history on, writes the snapshot to ``path``
(a pickle that https://pytorch.org/memory_viz shows) and prints the blocks alive at the peak,
grouped by their allocating line: a line of the step graph's generated code (FX keeps its source
in ``linecache``), else the first frame of this project's, the model's or a benchmark's code.
"""

from __future__ import annotations

import gc
import linecache
from pathlib import Path

import torch

GiB = 1 << 30


def record(fn, path: Path, top: int = 15):
    """Run ``fn()`` with the allocation history recorded; return its result (kept alive while the
    snapshot is taken, as it would be by the caller)."""
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.memory._record_memory_history(max_entries=200_000, stacks="python")
    try:
        result = fn()
        torch.cuda.synchronize()
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.cuda.memory._dump_snapshot(str(path))
        trace = torch.cuda.memory._snapshot()["device_traces"][torch.cuda.current_device()]
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    print(f"wrote {path}")
    print_peak(trace, top)
    return result


def print_peak(trace, top: int = 15) -> None:
    """Replay the allocator's trace; print what was alive at its peak, by allocating line."""
    live, peak, at_peak, now = {}, 0, {}, 0
    for event in trace:
        if event["action"] == "alloc":
            live[event["addr"]] = event
            now += event["size"]
            if now > peak:
                peak, at_peak = now, dict(live)
        elif event["action"] == "free_requested" and event["addr"] in live:
            now -= live.pop(event["addr"])["size"]
    by_site: dict[str, list[int]] = {}
    for event in at_peak.values():
        by_site.setdefault(_allocating_line(event.get("frames", [])), []).append(event["size"])
    print(f"alive at the peak of the recorded run: {peak / GiB:.3f} GiB in {len(at_peak)} blocks")
    for site, sizes in sorted(by_site.items(), key=lambda kv: -sum(kv[1]))[:top]:
        print(f"  {sum(sizes) / GiB:8.3f} GiB  {len(sizes):5d} blocks  {site}")


def _allocating_line(frames) -> str:
    for frame in frames:  # innermost first
        name, line = frame.get("filename", ""), frame.get("line")
        if name.startswith("<eval_with_key"):
            return f"step graph: {linecache.getline(name, line).strip()[:100]}"
        if any(part in name for part in ("segcompile", "transformers", "bench_")):
            return f"{name.split('site-packages/')[-1]}:{line} {frame.get('name')}"
    return "(no Python frame)"
