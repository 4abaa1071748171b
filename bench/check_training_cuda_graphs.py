"""GPU check of TBPTT under CUDA graphs (``seg.compile(mode="reduce-overhead")``): the gradients of
every step equal the eager step's, and after the recording steps no step records a graph again.

The tiny Llama (4 layers, head dim 16; Triton kernels on a GPU), S = T = 16, fraction(0.5), K = 1,
a 128-token sequence (8 segments: the re-recording that an aliasing tail leaf caused began at the
fourth). The same parameters every step (no optimizer step), so each step's gradients are compared
with one eager reference: the largest relative error ``max|got - want| / max|want|`` of any
parameter's gradient (``segcompile.testing.tolerances.relative_error``), within 1e-4 (fp32; the
compiled step fuses differently). The trees run a function eagerly once,
record it the next time, then replay it: steps 3 on must record nothing (Inductor's count of
recorded graph inputs does not move).

    python bench/check_training_cuda_graphs.py     # writes results/check_training_cuda_graphs-<device>.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import segcompile as sc
from segcompile.testing.models import random_ids, tiny_llama
from segcompile.testing.tolerances import relative_error

from bench_training import cuda_graph_recordings

TOLERANCE = 1e-4
STEPS = 5
RECORDING_STEPS = 2  # a function's first call runs eagerly, its second records


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda; cpu runs the same program without CUDA graphs")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    return p.parse_args(argv)


def gradients(seg, ids) -> dict[str, torch.Tensor]:
    seg.zero_grad(set_to_none=True)
    seg.tbptt_backward(ids)
    return {name: p.grad.detach().clone() for name, p in seg.named_parameters() if p.grad is not None}


def worst_relative_error(got: dict, want: dict) -> float:
    return max(relative_error(got[name], want[name]) for name in want)


def check(device: str) -> dict:
    model = tiny_llama(num_layers=4).to(device)
    cfg = sc.SegmentConfig(16, long_range=sc.HeadPlan.fraction(0.5), tbptt_k=1)
    ids = random_ids(1, 8 * cfg.segment_len, vocab=model.config.vocab_size).to(device)
    seg = sc.transform(model, cfg)
    want = gradients(seg, ids)
    seg.compile(mode="reduce-overhead")
    steps = []
    for step in range(STEPS):
        before = cuda_graph_recordings()
        got = gradients(seg, ids)
        steps.append({"step": step, "relative_error": worst_relative_error(got, want),
                      "recorded": cuda_graph_recordings() > before})
        print(json.dumps(steps[-1]), flush=True)
    replayed = [s for s in steps if s["step"] >= RECORDING_STEPS]
    ok = all(s["relative_error"] <= TOLERANCE for s in steps) and not any(s["recorded"] for s in replayed)
    return {"ok": ok, "uses_cuda_graphs": seg.uses_cuda_graphs, "implementations": sorted(set(seg.implementations.values())),
            "steps": steps}


def main(argv=None) -> int:
    args = parse_args(argv)
    result = check(args.device)
    device = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    result = {"device": device, "torch": torch.__version__, "command": "python bench/check_training_cuda_graphs.py",
              "tolerance": TOLERANCE, **result}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"check_training_cuda_graphs-{device.replace(' ', '_')}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{'all passed' if result['ok'] else 'FAILED'}; wrote {path}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
