"""Decode attention speed: one new token against the caches, the Triton decode split over the keys
vs the one-pass forward kernel vs SDPA over a full-attention cache.

Llama-3-8B's attention shape (H=32 query heads, Hk=8 KV heads, D=128, bf16) at one layer, batch B,
one query token; segcompile's caches for S = T = 4096, fraction(0.25) long-range KV heads (2 of
8) and 4 sinks: a long-range head sees [history | tail | current], a local one [sinks | tail |
current], with ``current`` the tokens of the unfinished segment (half of one here). SDPA sees the
whole context on every head (the cache of the same model without segcompile, ``enable_gqa``).

* ``split keys``: ``segment_attention_forward`` (few queries: ``kernels/triton_decode.py``);
* ``one pass``: ``triton_attention.one_pass_forward``, one program per query head;
* ``sdpa``: ``F.scaled_dot_product_attention`` over the full cache (whatever backend it picks).

Reports microseconds per call (median of ``triton.testing.do_bench``), eager and replayed from a
CUDA graph (the same call captured once: the GPU's time without the host's launch work, what a
serving loop that replays graphs pays), the K/V bytes each reads and the rate at the eager time,
and the split kernel's error against the fp32 reference.

    python bench/bench_decode.py                  # contexts 32K and 128K, B = 1 and 8
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

from segcompile.kernels import triton_attention as ta
from segcompile.kernels.dispatch import segment_attention_forward
from segcompile.kernels.problem import prepare
from segcompile.kernels.reference import segment_attention_reference
from segcompile.quality import report


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--segment-len", type=int, default=4096)
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--long-range", type=int, default=2, help="long-range KV heads")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    return p.parse_args(argv)


def caches(args, B: int, context: int) -> tuple[list[torch.Tensor], list[int]]:
    """The nine tensor arguments of one decode step at ``context`` tokens, and the long-range heads."""
    S, G, H, hk, D = args.segment_len, args.sinks, args.heads, args.kv_heads, args.head_dim
    current = S // 2 + 1  # the new token is the last of a half-full segment
    history = context - S - current
    shapes = [(B, H, 1, D), (B, hk, current, D), (B, hk, current, D), (B, hk, S, D), (B, hk, S, D),
              (B, hk, G, D), (B, hk, G, D), (B, args.long_range, history, D), (B, args.long_range, history, D)]
    return [torch.randn(s, device="cuda", dtype=torch.bfloat16) for s in shapes], list(range(args.long_range))


def kv_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors[1:])


def timed(fn) -> float:
    return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median") * 1e3  # microseconds


def graphed(fn):
    """``fn`` captured in a CUDA graph (after warm-up calls on a side stream), as a replay function."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def run_case(args, B: int, context: int) -> list[dict]:
    tensors, long_range = caches(args, B, context)
    scale = args.head_dim ** -0.5
    problem = prepare(*tensors, long_range)
    full_k = torch.randn(B, args.kv_heads, context, args.head_dim, device="cuda", dtype=torch.bfloat16)
    full_v = torch.randn_like(full_k)
    q = tensors[0]
    peers = {
        "split keys": (lambda: segment_attention_forward(*tensors, long_range, scale), kv_bytes(tensors)),
        "one pass": (lambda: ta.one_pass_forward(problem, scale, False), kv_bytes(tensors)),
        "sdpa": (lambda: F.scaled_dot_product_attention(q, full_k, full_v, scale=scale, enable_gqa=True),
                 2 * full_k.numel() * full_k.element_size()),
    }
    want = segment_attention_reference(*[t.float() for t in tensors], long_range, scale)
    got = segment_attention_forward(*tensors, long_range, scale)
    error = ((got.float() - want).abs().max() / want.abs().max()).item()
    rows = []
    for name, (fn, nbytes) in peers.items():
        us, us_graph = timed(fn), timed(graphed(fn))
        rows.append(dict(batch=B, context=context, impl=name, us=us, us_graph=us_graph, kv_bytes=nbytes,
                         gb_per_s=nbytes / us / 1e3, gb_per_s_graph=nbytes / us_graph / 1e3,
                         max_rel_error=error if name == "split keys" else None))
        print(rows[-1], flush=True)
    return rows


def warm_up() -> None:
    """A second of matrix products first: the clocks of an idle GPU ramp up under load, and the
    first case timed would pay for it (it measured 1.7x slower as the first case than later)."""
    x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(1000):
        x @ x
    torch.cuda.synchronize()


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(0)
    warm_up()
    rows = [r for B in args.batches for n in args.contexts for r in run_case(args, B, n)]
    device = torch.cuda.get_device_name()
    print(f"\n{device}; H={args.heads} Hk={args.kv_heads} D={args.head_dim} bf16, one query token, S=T={args.segment_len}, "
          f"{args.long_range} long-range KV heads, {args.sinks} sinks")
    print(f"{'B':>3} {'context':>8} {'impl':11} {'us':>9} {'graph us':>9} {'K/V MB':>8} {'GB/s':>7} {'graph GB/s':>10} "
          f"{'vs sdpa':>8} {'graph vs sdpa':>13}")
    for r in rows:
        same = {x["impl"]: x for x in rows if x["batch"] == r["batch"] and x["context"] == r["context"]}
        print(f"{r['batch']:3} {r['context']:8} {r['impl']:11} {r['us']:9.1f} {r['us_graph']:9.1f} "
              f"{r['kv_bytes'] / 1e6:8.1f} {r['gb_per_s']:7.0f} {r['gb_per_s_graph']:10.0f} "
              f"{same['sdpa']['us'] / r['us']:7.2f}x {same['sdpa']['us_graph'] / r['us_graph']:12.2f}x")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"bench_decode-{device.replace(' ', '_')}.json"
    meta = dict(device=device, torch=torch.__version__, triton=triton.__version__,
                command=report.recorded_command("bench/bench_decode.py", sys.argv[1:], {"--out"}),
                heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim, segment_len=args.segment_len,
                sinks=args.sinks, long_range_kv_heads=args.long_range, dtype="bfloat16")
    path.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
