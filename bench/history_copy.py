"""The fp8 history's widening copy, which an fp8-history prefill runs before the Gluon forward at
every (layer, segment): one layer of the 8B shape, by history length.

The Gluon forward reads a bf16 history; over an fp8 one each call first widens the layer's K and V
history into a transient bf16 copy (``triton_history.dequantize_pair``, one launch). That copy is
what makes a 128K prefill with the fp8 history slower than with the bf16 one (bench/README.md,
prefill). Rows, L2 flushed before each timed call:

* ``pair``: the copy at each ``--tiles`` entry (positions a program, warps:
  ``triton_history.COPY_TILE``), and ``two launches``: K and V widened one after the other
  (``dequantize``); GB/s counts what the copy reads and writes (3 bytes a value into bf16);
* ``torch copy_``: the same history already in bf16 copied by PyTorch (4 bytes a value), the rate
  a plain copy reaches on this device;
* on Hopper, ``forward after pair`` and ``forward over bf16``: the Gluon forward of the layer
  (32 query heads, 8 KV heads, 2 long-range, a 4096-token segment and tail) right after the copy,
  over the copy's output, and over a bf16 history with no copy before it: whether the copy's last
  blocks, the first the forward reads, are still in L2 for it; ``copy + forward``: the copy and
  the forward timed together (what a call over the fp8 history costs). These rows take turns.

    python bench/history_copy.py                                   # 64K and 122,880 positions
    python bench/history_copy.py --history-lens 122880 --tiles 64,4 128,8
    python bench/history_copy.py --tiny                            # CPU, Triton interpreted: a smoke test
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

if "--tiny" in sys.argv:  # before the kernels are defined
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch

from decode_splits import write_rows  # noqa: E402 (a sibling script)
from segcompile.kernels import dispatch, triton_history
from segcompile.kernels.history_format import HistoryGeometry, QuantizedHistory, quantize_history

SHAPE_8B = dict(H=32, HK=8, N_LR=2, D=128, S=4096)  # fraction(0.25), S = T
TINY = dict(H=4, HK=2, N_LR=1, D=16, S=64)
# read before each timed call: more than any GPU's L2. Read, not written: a written buffer leaves
# dirty lines that the timed kernel would pay to write back
L2_FLUSH_BYTES = 256 << 20
HOST_COVER_CYCLES = 1_000_000  # the GPU's spin before each timed call: about 0.5 ms at 2 GHz


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--history-lens", type=int, nargs="+", default=[65536, 131072 - 8192])
    p.add_argument("--tiles", nargs="+", default=["32,2", "32,4", "64,2", "64,4", "64,8", "128,4", "128,8", "256,8"],
                   metavar="POSITIONS,WARPS", help="launches of the copy to time (positions a program, warps)")
    p.add_argument("--repeats", type=int, default=40)
    p.add_argument("--tiny", action="store_true", help="a small case on the CPU, Triton interpreted (a smoke test)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args(argv)
    if args.tiny:
        args.history_lens, args.tiles, args.repeats = [200], ["64,4"], 3
    return args


def timed_us(fn, device: str, repeats: int, before=None) -> float:
    """Median microseconds of ``fn(*before())`` (``fn()`` without ``before``), the L2 flushed and
    ``before`` run untimed ahead of each call (CUDA events; on the CPU, the wall clock). On the
    GPU a spin of about half a millisecond is queued before the start event, so that the host's
    work in ``fn`` before its launches (which differs from row to row) is done while the GPU
    spins, not timed as idle GPU between the events."""
    flush = torch.ones(L2_FLUSH_BYTES if device == "cuda" else 1, dtype=torch.uint8, device=device)
    times = []
    for _ in range(repeats + 2):  # the first two warm up
        flush.sum()
        args = before() if before is not None else ()
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda._sleep(HOST_COVER_CYCLES)
            start.record()
            fn(*args)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
        else:
            start = time.perf_counter()
            fn(*args)
            times.append((time.perf_counter() - start) * 1e6)
    return sorted(times[2:])[len(times[2:]) // 2]


def histories(P: int, shape: dict, device: str):
    """The layer's K and V history, ``[1, N_LR, P, D]``, in bf16 and quantised (blocks of 64)."""
    geometry = HistoryGeometry(shape["S"], shape["S"])
    wide = [torch.randn(1, shape["N_LR"], P, shape["D"], device=device, dtype=torch.bfloat16) * s for s in (1, 3)]
    fp8 = [QuantizedHistory.of(*quantize_history(x, 0, geometry, torch.float8_e4m3fn), geometry) for x in wide]
    return wide, fp8


def copy_rows(P: int, args, shape: dict, device: str) -> list[dict]:
    (k, v), (k8, v8) = histories(P, shape, device)
    want = [h.dequantized(torch.bfloat16) for h in (k8, v8)]
    copies = {}
    for tile in args.tiles:
        block_p, warps = (int(x) for x in tile.split(","))
        copies[f"pair {block_p},{warps}"] = _with_tile(block_p, warps)
    copies["two launches"] = lambda a, b: (triton_history.dequantize(a, torch.bfloat16),
                                           triton_history.dequantize(b, torch.bfloat16))
    rows = []
    values = 2 * k.numel()
    for name, copy in copies.items():
        if not all(_same(x, y) for x, y in zip(copy(k8, v8), want)):
            raise AssertionError(f"{name}: the copy differs from history_format's dequantisation")
        us = timed_us(lambda: copy(k8, v8), device, args.repeats)
        rows.append(dict(history_len=P, what=name, us=us, gb_per_s=3 * values / us / 1e3))
    us = timed_us(lambda: (torch.empty_like(k).copy_(k), torch.empty_like(v).copy_(v)), device, args.repeats)
    rows.append(dict(history_len=P, what="torch copy_ (bf16)", us=us, gb_per_s=4 * values / us / 1e3))
    return rows


def _same(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Bit for bit on a GPU; within a bf16 ulp under the interpreter, which rounds toward zero."""
    if got.is_cuda:
        return torch.equal(got, want)
    return bool(((got.float() - want.float()).abs() <= want.float().abs() * 2 ** -7).all())


def _with_tile(block_p: int, warps: int):
    def copy(k8, v8):
        saved = dict(triton_history.COPY_TILE)
        triton_history.COPY_TILE.update(block_p=block_p, num_warps=warps)
        try:
            return triton_history.dequantize_pair(k8, v8, torch.bfloat16)
        finally:
            triton_history.COPY_TILE.update(saved)
    return copy


def forward_rows(P: int, args, shape: dict) -> list[dict]:
    """The Gluon forward of one layer after the copy, over a bf16 history, and both timed as one
    (Hopper only)."""
    H, HK, D, S = shape["H"], shape["HK"], shape["D"], shape["S"]
    r = lambda *size: torch.randn(*size, device="cuda", dtype=torch.bfloat16)  # noqa: E731
    inputs = (r(1, H, S, D), r(1, HK, S, D), r(1, HK, S, D), r(1, HK, S, D), r(1, HK, S, D),
              r(1, HK, 0, D), r(1, HK, 0, D))
    long_range = list(range(shape["N_LR"]))
    (k, v), (k8, v8) = histories(P, shape, "cuda")
    if not dispatch.gluon_applies(dispatch.prepare(*inputs, k, v, long_range)):
        return []

    def forward(hist_k, hist_v):
        dispatch.segment_attention_forward(*inputs, hist_k, hist_v, long_range, D ** -0.5)

    variants = {
        "forward after pair": (forward, lambda: triton_history.dequantize_pair(k8, v8, torch.bfloat16)),
        "forward over bf16": (forward, lambda: (k, v)),
        "copy + forward": (lambda: forward(k8, v8), None),  # what a call over the fp8 history costs
    }
    # the variants take turns, a quarter of the repeats at a time: clocks that drift reach all alike
    times = {name: [] for name in variants}
    for _ in range(4):
        for name, (fn, before) in variants.items():
            times[name].append(timed_us(fn, "cuda", max(args.repeats // 4, 1), before=before))
    return [dict(history_len=P, what=name, us=sorted(t)[len(t) // 2]) for name, t in times.items()]


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(0)
    shape = TINY if args.tiny else SHAPE_8B
    device = "cpu" if args.tiny else "cuda"
    rows = []
    for P in args.history_lens:
        rows += copy_rows(P, args, shape, device)
        if device == "cuda":
            rows += forward_rows(P, args, shape)
    name = "cpu" if args.tiny else torch.cuda.get_device_name()
    print(f"\n{name}; one layer's K and V history, {shape['N_LR']} long-range KV heads x {shape['D']}, L2 flushed")
    print(f"{'history':>9} {'what':>22} {'us':>9} {'GB/s':>7}")
    for r in rows:
        rate = f"{r['gb_per_s']:7.0f}" if "gb_per_s" in r else ""
        print(f"{r['history_len']:9} {r['what']:>22} {r['us']:9.1f} {rate}")
    write_rows("history_copy", args, argv, name, rows, shape=shape, tile=dict(triton_history.COPY_TILE))
    return rows


if __name__ == "__main__":
    main()
