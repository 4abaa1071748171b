"""How many programs a multiprocessor the CUDA-graph decoder's attention wants, with a bf16 and
an fp8 history: one layer of the 8B shape, one token, by length of the history.

The decode kernels split every KV head's keys into about ``PROGRAMS_PER_SM`` programs a
multiprocessor, over an fp8 history into splits of about ``KEYS_A_SPLIT_FP8`` keys between the
bounds of ``PROGRAMS_PER_SM_FP8_HISTORY`` (``kernels/triton_decode.py``); the long-range heads
(2 of 8) hold nearly all the keys, so their programs are the ones that stream the history. This
times ``static_decode_forward`` (the split kernel over the decoder's buffers and the combine
kernel, replayed in a CUDA graph as the decoder runs them) with the decoder's own split counts
(programs a multiprocessor 0) and with each fixed count given, over a bf16 history and over the
same history quantised to fp8 (``history_format``'s blocks and scales), and reports the keys a
split and the history's read rate. The eager decode's ``split_len`` uses the same counts, so both
paths keep summing in the same order whatever they are. ``--decode-tiles`` also sweeps the decode
kernels' tile (``triton_common.TILES["decode"]`` and ``["decode-fp8"]``: rows, keys a block,
warps, pipeline stages, register cap) for both histories; ``--tiny`` runs a small case on the CPU
(Triton's interpreter) as a smoke test.

    python bench/decode_splits.py                                  # 32K, 128K and 1M tokens
    python bench/decode_splits.py --history-lens 122880 --programs-per-sm 4 8
    python bench/decode_splits.py --history-lens 1040384 --programs-per-sm 8 --decode-tiles 16,64,4,3 16,32,1,3
    python bench/decode_splits.py --shape smollm2 --history-lens 7680 31744 130560 --programs-per-sm 0
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

if "--tiny" in sys.argv:  # before the kernels are defined
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch
import triton

from segcompile.kernels import triton_common, triton_decode
from segcompile.kernels.history_format import HistoryGeometry, quantize_history
from segcompile.quality import report

SHAPE_8B = dict(B=1, H=32, HK=8, N_LR=2, D=128, S=4096, T=4096, G=4)  # S = T = 4096, fraction(0.25), 4 sinks
# SmolLM2-135M's attention (9 query heads, 3 KV heads of 64) at ``segcompile eval``'s S = 512, one
# long-range KV head: the 64 column of the decode tiles
SHAPE_SMOLLM2 = dict(B=1, H=9, HK=3, N_LR=1, D=64, S=512, T=512, G=4)
SHAPES = {"8b": SHAPE_8B, "smollm2": SHAPE_SMOLLM2}
TINY = dict(B=1, H=4, HK=2, N_LR=1, D=16, S=64, T=64, G=2)  # --tiny: the CPU smoke test's shape


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--history-lens", type=int, nargs="+", default=[32768 - 8192, 131072 - 8192, 1048576 - 8192],
                   help="history positions (the context less the tail and the current segment)")
    p.add_argument("--programs-per-sm", type=int, nargs="+", default=[0, 4, 8, 16, 32],
                   help="programs a multiprocessor to split for, both histories (0: the decoder's own rule)")
    p.add_argument("--decode-tiles", nargs="+", default=None, metavar="M,N,WARPS,STAGES[,CAP]",
                   help="decode tiles to sweep (default: the table's)")
    p.add_argument("--tiny", action="store_true", help="a small case on the CPU, Triton interpreted (a smoke test): one history length, "
                        "1 and 2 programs a multiprocessor")
    p.add_argument("--shape", choices=sorted(SHAPES), default="8b",
                   help="the layer: the 8B shape (head dim 128) or SmolLM2-135M's (head dim 64)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args(argv)
    if args.tiny:
        args.history_lens, args.programs_per_sm = [200], [0, 1, 2]
    return args


def median_ms(fn, device: str, n: int = 15, replays: int = 20) -> float:
    """Milliseconds a call of ``fn``: on a GPU, ``fn`` captured in a CUDA graph (as the decoder
    runs it) and replayed ``replays`` times between two events, the median of ``n`` such samples,
    so that neither the host's launches nor one replay's clock ramp is timed; on the CPU, the
    median of three calls by the wall clock. Three untimed calls first."""
    for _ in range(3):
        fn()
    if device == "cpu":
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return sorted(times)[1]
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    times = []
    for _ in range(n):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / replays)
    return sorted(times)[n // 2]


def buffers(P: int, shape: dict, device: str):
    """The decoder's buffers after ``P`` history positions: local K/V ``[Hk, B, G + T + S, D]``, the
    history ``[n_lr, B, P, D]`` in bf16 and in fp8 with its scales, the position, the head rows."""
    B, H, HK, N_LR, D, S, T, G = (shape[k] for k in ("B", "H", "HK", "N_LR", "D", "S", "T", "G"))
    r = lambda *size: torch.randn(*size, device=device, dtype=torch.bfloat16)  # noqa: E731
    q, local_k, local_v = r(B, H, 1, D), r(HK, B, G + T + S, D), r(HK, B, G + T + S, D)
    hist_k, hist_v = r(N_LR, B, P, D), r(N_LR, B, P, D)
    geometry = HistoryGeometry(S, T)

    def fp8(x):  # quantise as [B, heads, P, D], keep the decoder's [heads, B, ...] order
        values, scales = quantize_history(x.transpose(0, 1), 0, geometry, torch.float8_e4m3fn)
        return values.transpose(0, 1).contiguous(), scales.transpose(0, 1).contiguous()

    (k8, k_scales), (v8, v_scales) = fp8(hist_k), fp8(hist_v)
    position = torch.tensor([P + T + min(100, S - 1)], device=device)  # into the current segment
    rows = torch.arange(HK, dtype=torch.int32, device=device)  # the last N_LR KV heads are long-range
    return q, local_k, local_v, (hist_k, hist_v, None), (k8, v8, (k_scales, v_scales)), position, rows


def tiles(args) -> list[tuple[int, ...] | None]:
    """The decode tiles to sweep (None: the tables' as they are)."""
    return [tuple(int(x) for x in t.split(",")) for t in args.decode_tiles] if args.decode_tiles else [None]


KINDS = ("decode", "decode-fp8")  # the bf16 history's tile kind, the fp8 history's (``triton_decode.tile_kind``)


def run(args, shape: dict, device: str) -> list[dict]:
    """Every (history length, tile, programs a multiprocessor) timed over both histories; the
    decode's constants and tile tables are as they were afterwards."""
    bucket = min(b for b in (64, 128, 256) if b >= triton_common.block_d(shape["D"]))
    table_tiles = [triton_common.TILES[kind][bucket] for kind in KINDS]
    constants = triton_decode.PROGRAMS_PER_SM, triton_decode.PROGRAMS_PER_SM_FP8_HISTORY
    try:
        return [row for P in args.history_lens
                for row in _sweep(args, shape, device, P, bucket, table_tiles, constants)]
    finally:
        for kind, tile in zip(KINDS, table_tiles):
            triton_common.TILES[kind][bucket] = tile
        triton_decode.PROGRAMS_PER_SM, triton_decode.PROGRAMS_PER_SM_FP8_HISTORY = constants


def _sweep(args, shape: dict, device: str, P: int, bucket: int, table_tiles: list, constants: tuple) -> list[dict]:
    """The rows of history length ``P``; ``constants``: the decoder's own split counts (what
    ``run`` found before any row changed them)."""
    q, local_k, local_v, bf16, fp8, position, rows = buffers(P, shape, device)
    common = dict(n_local=shape["HK"] - shape["N_LR"], segment_len=shape["S"], tail_len=shape["T"],
                  sinks=shape["G"], scale=shape["D"] ** -0.5)
    longest = int(position) + 1  # the keys the token sees: every position up to its own

    def step(hist):
        k, v, scales = hist
        return lambda: triton_decode.static_decode_forward(q, local_k, local_v, k, v, position, rows,
                                                           hist_scales=scales, **common)

    out = []
    for tile in tiles(args):
        used = [tile or table_tile for table_tile in table_tiles]
        for kind, t in zip(KINDS, used):
            triton_common.TILES[kind][bucket] = t
        for per_sm in args.programs_per_sm:
            # 0: the decoder's own counts (a bf16 history's constant, an fp8 one's bounds and keys a split)
            triton_decode.PROGRAMS_PER_SM, triton_decode.PROGRAMS_PER_SM_FP8_HISTORY = (
                constants if per_sm == 0 else (per_sm, (per_sm, per_sm)))
            bf16_ms, fp8_ms = median_ms(step(bf16), device), median_ms(step(fp8), device)
            history_bytes = 2 * shape["N_LR"] * P * shape["D"] * 2
            out.append(dict(history_len=P, tile=list(used[0]), fp8_tile=list(used[1]),
                            programs_per_sm=per_sm or "decoder's",
                            bf16_keys_a_split=_keys_a_split(longest, shape, device, used[0], False),
                            fp8_keys_a_split=_keys_a_split(longest, shape, device, used[1], True),
                            bf16_ms=bf16_ms, fp8_ms=fp8_ms, bf16_tb_per_s=history_bytes / bf16_ms / 1e9,
                            fp8_tb_per_s=history_bytes / 2 / fp8_ms / 1e9))
            print(out[-1], flush=True)
    return out


def _keys_a_split(longest: int, shape: dict, device: str, tile: tuple, scaled: bool) -> int:
    """The decoder's keys a split (``triton_decode.split_plan``) for ``longest`` keys, at the
    constants set now."""
    bounds = triton_decode.split_bounds(torch.device(device), shape["B"] * shape["HK"], scaled)
    return triton_decode.split_plan(longest, tile[1], bounds)[1]


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(0)
    shape = TINY if args.tiny else SHAPES[args.shape]
    device = "cpu" if args.tiny else "cuda"
    rows = run(args, shape, device)
    name = "cpu" if args.tiny else torch.cuda.get_device_name()
    print(f"\n{name}; one layer, one token, H={shape['H']} Hk={shape['HK']} D={shape['D']}, S=T={shape['S']}, "
          f"{shape['N_LR']} of {shape['HK']} KV heads long-range")
    print(f"{'history':>9} {'tile (bf16 / fp8)':>24} {'programs/SM':>11} {'keys/split':>12} {'bf16 ms':>8} "
          f"{'fp8 ms':>8} {'bf16 TB/s':>9} {'fp8 TB/s':>8}")
    for r in rows:
        tile = f"{','.join(map(str, r['tile']))} / {','.join(map(str, r['fp8_tile']))}"
        print(f"{r['history_len']:9} {tile:>24} {r['programs_per_sm']:>11} "
              f"{r['bf16_keys_a_split']:>5} / {r['fp8_keys_a_split']:<4} {r['bf16_ms']:8.3f} {r['fp8_ms']:8.3f} "
              f"{r['bf16_tb_per_s']:9.2f} {r['fp8_tb_per_s']:8.2f}")
    write_rows("decode_splits", args, argv, name, rows, shape=shape)
    return rows


def write_rows(script: str, args, argv, device: str, rows: list[dict], **meta) -> None:
    """``args.out/<script>-[tiny-|<shape>-]<device>.json`` (a ``--shape`` other than the 8B one
    named): the rows, the device, versions and the command
    that reproduces them (``argv``, or the process's own when None), ``meta`` beside them."""
    args.out.mkdir(parents=True, exist_ok=True)
    variant = "tiny-" if args.tiny else ("" if getattr(args, "shape", "8b") == "8b" else f"{args.shape}-")
    path = args.out / f"{script}-{variant}{device.replace(' ', '_')}.json"
    meta = dict(device=device, torch=torch.__version__, triton=triton.__version__, **meta,
                command=report.recorded_command(f"bench/{script}.py", sys.argv[1:] if argv is None else argv,
                                                {"--out"}))
    path.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
