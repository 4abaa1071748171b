"""Time each Triton segment_attention kernel over candidate tiles, one kernel at a time.

At the shape of ``bench_kernel.py`` (B=1, H=32, Hk=8, D=128, N=32K, S=T=4096, bf16), for every
candidate (BLOCK_M, BLOCK_N, warps, stages[, register cap]) of one kernel, the other kernels keeping the tiles in
``segcompile.kernels.triton_common.TILES`` for that head dim:

* ``fwd``: the forward over all N / S segments;
* ``dq``: the dQ kernel alone, the forward's output and log-sum-exp given;
* ``dkdv``: the dK/dV kernel alone (tail and current keys), log-sum-exp and delta given.

Plans none and all for ``fwd`` and ``dq`` (their work grows with history), none for ``dkdv``
(which does no work for history). A tile that does not compile (shared memory, registers) is
reported and skipped. Prints a table per kernel, the best tile, and writes
``results/tune_kernels-<device>.json``. The tiles to commit into ``TILES`` are read from it.

    python bench/tune_kernels.py                     # the tiles TILES was chosen from
    python bench/tune_kernels.py --set two-per-sm    # tiles that fit two programs a multiprocessor
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
import triton

from segcompile.kernels import triton_attention as ta
from segcompile.kernels import triton_common
from segcompile.kernels.dispatch import segment_attention_forward
from segcompile.kernels.problem import prepare

from bench_kernel import add_shape_arguments, long_range_heads, segments  # noqa: E402

CANDIDATES = {
    "fwd": [(128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 8, 4),
            (64, 64, 4, 4), (64, 128, 4, 3), (128, 32, 4, 4)],
    "dq": [(64, 64, 8, 2), (128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 4, 3), (128, 32, 8, 3), (64, 64, 4, 3),
           (64, 32, 4, 4), (128, 128, 8, 2)],
    "dkdv": [(32, 128, 8, 3), (64, 128, 8, 3), (64, 128, 8, 2), (32, 128, 4, 3), (32, 128, 4, 5), (64, 64, 4, 3),
             (16, 128, 4, 4), (32, 64, 4, 3), (128, 128, 8, 2)],
}
# Tiles of which two or more programs fit a multiprocessor (registers, shared memory: by
# ``kernel_resources.py``), some through a register cap, beside the tuned tile of each kernel
# (first): the tuned ones take all 65,536 registers at 8 warps, one program an SM.
TWO_PER_SM = {
    "fwd": [(128, 128, 8, 3), (128, 32, 8, 2, 128), (128, 32, 8, 3, 128), (64, 64, 4, 3), (64, 64, 4, 2),
            (64, 32, 4, 3), (128, 64, 8, 2, 128)],
    "dq": [(128, 64, 8, 3), (64, 32, 4, 3), (64, 64, 4, 2), (128, 32, 8, 2, 128)],
    "dkdv": [(32, 64, 4, 3), (32, 64, 4, 2, 168), (32, 32, 4, 3, 168), (32, 64, 4, 2)],
}
SETS = {"tiles": CANDIDATES, "two-per-sm": TWO_PER_SM}
PLANS = {"fwd": ["none", "all"], "dq": ["none", "all"], "dkdv": ["none"]}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_arguments(p)
    p.add_argument("--kernels", nargs="+", default=list(CANDIDATES))
    p.add_argument("--set", choices=list(SETS), default="tiles", help="the candidate tiles (results file suffix if not 'tiles')")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    return p.parse_args(argv)


def backward_inputs(parts, grads, long_range, scale) -> list:
    """Per segment, what the backward kernels take: the problem, the forward's output and
    log-sum-exp, the output gradient and delta (computed once per plan, with the table's tiles)."""
    prepared = []
    for a, g in zip(parts, grads):
        out, lse = segment_attention_forward(*a, long_range, scale, return_lse=True)
        problem = prepare(*a, long_range)
        _, _, delta = ta.launch_dq(problem, out, g, scale, lse)
        prepared.append((problem, out, g, lse, delta))
    return prepared


def runner(kernel: str, parts, prepared, long_range, scale):
    """A function running ``kernel`` once over every segment, on inputs computed beforehand."""
    if kernel == "fwd":
        return lambda: [segment_attention_forward(*a, long_range, scale) for a in parts]
    if kernel == "dq":  # with the forward's log-sum-exp, as autograd runs it
        return lambda: [ta.launch_dq(p, o, g, scale, lse) for p, o, g, lse, _ in prepared]
    return lambda: [ta.launch_dkdv(p, g, lse, delta, scale, True) for p, _, g, lse, delta in prepared]


def main(argv=None):
    args = parse_args(argv)
    N, S, H, hk, D = args.seq_len, args.segment_len, args.heads, args.kv_heads, args.head_dim
    torch.manual_seed(0)
    q, do = (torch.randn(1, H, N, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    k, v = (torch.randn(1, hk, N, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    scale = D ** -0.5
    grads = [do[:, :, a : a + S] for a in range(0, N, S)]
    tiles = triton_common.TILES  # what every launch reads: candidates are swapped in place
    defaults = copy.deepcopy(tiles)
    bucket = min(b for b in tiles["fwd"] if b >= triton_common.block_d(D))
    rows = []
    for kernel in args.kernels:
        for plan in PLANS[kernel]:
            long_range = long_range_heads(plan, hk)
            parts = list(segments(q, k, v, S, long_range))
            tiles.update(copy.deepcopy(defaults))
            prepared = backward_inputs(parts, grads, long_range, scale) if kernel != "fwd" else None
            for tile in SETS[args.set][kernel]:
                tiles.update(copy.deepcopy(defaults))
                tiles[kernel][bucket] = tile
                m, n, w, st, *cap = tile
                row = dict(kernel=kernel, plan=plan, block_m=m, block_n=n, warps=w, stages=st, maxnreg=cap[0] if cap else None)
                try:
                    fn = runner(kernel, parts, prepared, long_range, scale)
                    fn()
                    torch.cuda.synchronize()
                    row["ms"] = triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
                except Exception as e:  # a tile that does not fit: reported, skipped
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
                rows.append(row)
                print(row, flush=True)
    tiles.update(defaults)
    report(args, rows)


def report(args, rows):
    device = torch.cuda.get_device_name()
    best = {}
    for kernel in args.kernels:
        timed = [r for r in rows if r["kernel"] == kernel and "ms" in r]
        totals: dict[tuple, float] = {}
        counts: dict[tuple, int] = {}
        for r in timed:
            key = (r["block_m"], r["block_n"], r["warps"], r["stages"], r.get("maxnreg"))
            totals[key] = totals.get(key, 0.0) + r["ms"]
            counts[key] = counts.get(key, 0) + 1
        complete = {key: t for key, t in totals.items() if counts[key] == len(PLANS[kernel])}
        print(f"\n{kernel}: ms summed over plans {PLANS[kernel]} (M, N, warps, stages, register cap)")
        for key, t in sorted(complete.items(), key=lambda kv: kv[1]):
            print(f"  {key!s:20} {t:8.2f}")
        if complete:
            key = min(complete, key=complete.get)
            best[kernel] = dict(BLOCK_M=key[0], BLOCK_N=key[1], num_warps=key[2], num_stages=key[3], maxnreg=key[4],
                                ms=complete[key])
    print("\nbest:", json.dumps(best))
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "" if args.set == "tiles" else f"-{args.set}"
    path = args.out / f"tune_kernels{suffix}-{device.replace(' ', '_')}.json"
    meta = dict(device=device, torch=torch.__version__, triton=triton.__version__, command=" ".join(sys.argv),
                seq_len=args.seq_len, segment_len=args.segment_len, heads=args.heads, kv_heads=args.kv_heads,
                head_dim=args.head_dim, dtype="bfloat16", tiles=triton_common.TILES)
    path.write_text(json.dumps(dict(meta=meta, best=best, rows=rows), indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
