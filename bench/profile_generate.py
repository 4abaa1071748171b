"""Where a decoded token's time goes: the decode paths of ``bench_generate.py`` under ``torch.profiler``.

The model and prompt are ``bench_generate.py``'s (Llama-3-8B shape, random bf16 weights, S = T =
--segment-len, fraction(--long-range), batch 1). After prefilling --prompt-len tokens, each path
decodes --tokens tokens once as a warm-up and once more, all but the first token (which loads the
prompt's state into the path's buffers) under the profiler:

* ``static``: the fixed-shape step of ``seg.enable_cuda_graphs(capture=False)``, run eagerly: the
  same kernels a CUDA-graph replay runs, one launch each, so the profile names them;
* ``cuda-graph``: the replayed graphs (their GPU time is the floor the static step can reach);
* ``compiled-graph``: the same step under ``torch.compile`` (Inductor), then captured;
* ``eager``: the step graph, ``seg.decode`` as it runs without ``enable_cuda_graphs``.

Reported per token: wall time, GPU-busy time, kernel launches, host-device synchronisations, the
top operators by device and host time; and the bytes a token must read (weights and carried K/V)
over the device's bandwidth, the floor no path can beat.

    python bench/profile_generate.py [--prompt-len 32768] [--paths static cuda-graph eager]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import segcompile as sc
from segcompile.quality import report

from bench_generate import batched, build_model
from bench_training import write_result
from profile_training import print_profiles, profiled, summary

PATHS = ("static", "cuda-graph", "compiled-graph", "eager")
HBM_BYTES_PER_S = 4.8e12  # H200


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompt-len", type=int, default=32768)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--segment-len", type=int, default=4096)
    p.add_argument("--long-range", type=float, default=0.25)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    p.add_argument("--trace", type=Path, default=None, help="also write the Chrome trace of the static path")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args(argv)
    args.tiny, args.new_tokens, args.prompt_lens = False, args.tokens, [args.prompt_len]
    return args


def floor_bytes(model, seg, position: int) -> int:
    """Bytes one token must read: every weight once and the K/V it attends to."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    cfg, kv = seg.cfg, 0
    visible_local = cfg.sink_tokens + cfg.tail_len + cfg.segment_len
    for site in seg.sites:
        per_token = (site.head_dim + site.v_head_dim) * torch.tensor([], dtype=site.dtype).element_size()
        kv += per_token * (site.num_kv_heads * visible_local + len(site.long_range) * position)
    return weights + kv


def main(argv=None):
    args = parse_args(argv)
    device = torch.device("cuda")
    model = build_model(args, device)
    seg = sc.transform(model, sc.SegmentConfig(args.segment_len, long_range=sc.HeadPlan.fraction(args.long_range),
                                               tbptt_k=0))
    n = args.prompt_len
    with torch.no_grad():
        prompt = seg.prefill(torch.randint(0, model.config.vocab_size, (1, n), device=device))
    rows = {}
    for path in args.paths:
        if path == "eager":
            seg.disable_cuda_graphs()
        else:
            seg.enable_cuda_graphs(capture=path != "static", compile=path == "compiled-graph",
                                   max_context=n + 2 * args.segment_len)
        tokens = torch.randint(0, model.config.vocab_size, (1, args.tokens), device=device)

        def decode(state, steps: range):
            with torch.no_grad():
                for i in steps:
                    _, state = seg.decode(state, tokens[:, i : i + 1], check_ids=False)
            return state

        decode(batched(prompt, 1, n + 2 * args.segment_len), range(args.tokens))  # kernels compiled, graphs captured
        # the first token loads the prompt's state into the path's buffers (once per generation): not profiled
        state = decode(batched(prompt, 1, n + 2 * args.segment_len), range(1))
        wall, prof, pauses = profiled(lambda: decode(state, range(1, args.tokens)),
                                     args.trace if path == "static" else None, warmup=0)
        rows[path] = summary(wall, prof, args.tokens - 1, pauses)
        rows[path]["decode_path"] = seg.last_decode_path
        print(path, {k: v for k, v in rows[path].items() if not k.startswith("top")}, flush=True)
    seg.disable_cuda_graphs()
    floor = floor_bytes(model, seg, n)
    result = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "command": report.recorded_command("bench/profile_generate.py", sys.argv[1:], {"--out", "--trace"}),
        "prompt_len": n, "segment_len": args.segment_len, "long_range_fraction": args.long_range,
        "layers": args.layers, "floor_bytes_per_token": floor, "floor_ms_per_token": floor / HBM_BYTES_PER_S * 1e3,
        "rows": rows,
    }
    print_table(result)
    write_result(result, "profile_generate", args.out)


def print_table(result) -> None:
    print(f"\n{result['device']}, after {result['prompt_len']} tokens, S={result['segment_len']}, per token "
          f"(bandwidth floor {result['floor_ms_per_token']:.2f} ms: {result['floor_bytes_per_token'] / 1e9:.2f} GB):")
    print_profiles(result["rows"], "path", "token", digits=2)


if __name__ == "__main__":
    main()
