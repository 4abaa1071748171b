"""Data-parallel TBPTT training on 1 and 2 GPUs: tokens/s and per-GPU peak memory (torchrun, NCCL).

One Llama-shaped model of 1.2B parameters by default (the Llama-3.2-1B shape: 16 layers, hidden
2048, 32 heads, 8 KV heads, MLP 8192, 128K vocabulary; random init), sequences of --seq-len
tokens (32K), bf16, AdamW. Each rank trains on its own sequences (--batch-size per rank), wrapped
by ``sc.distributed.fsdp`` (per layer, or one unit with --one-unit) or ``sc.distributed.ddp``.

    torchrun --nproc-per-node 1 bench/bench_distributed.py
    torchrun --nproc-per-node 2 bench/bench_distributed.py     # then compare the two result files
    python bench/bench_distributed.py --tiny                   # one process, CPU, gloo: a smoke run

The parameters, gradients and optimizer state are fp32 and the steps run under bf16 autocast, as in
bench_training.py (FSDP2's ``MixedPrecisionPolicy(param_dtype=bf16)`` does not apply: the captured
fp32 graph casts its activations to fp32 by name, which bf16 parameters then meet in a matrix
product). Measured per rank over the timed steps (after --warmup steps): tokens/s (all ranks' tokens
over the slowest rank's time), ``torch.cuda.max_memory_allocated`` (peak) and what is allocated
between steps (static). ``--gathered`` also records the bytes of gathered parameters and unsharded
gradients at every point of one sequence (``record_gathered_bytes``; slow: for small shapes). The
result is ``<out>/bench_distributed-<wrap>-<W>x<device>.json``; when the file of the 1-rank run of
the same wrap is there, the 2-rank run prints the scaling efficiency against it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
import transformers

import segcompile as sc
from segcompile.runtime.distributed import record_gathered_bytes

GiB = 1 << 30
TINY = dict(seq_len=64, segment_len=16, layers=2, hidden=64, heads=4, kv_heads=2, intermediate=128, vocab=256,
            steps=2, warmup=1)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--wrap", choices=["fsdp", "ddp"], default="fsdp")
    p.add_argument("--one-unit", action="store_true", help="FSDP2 over the whole program as one unit, not per layer")
    p.add_argument("--reduce-every", choices=["sequence", "backward"], default="sequence",
                   help="per-layer FSDP2: reduce-scatter the gradients once per sequence or after every backward pass")
    p.add_argument("--seq-len", type=int, default=32768)
    p.add_argument("--segment-len", type=int, default=2048)
    p.add_argument("--long-range", type=float, default=0.25)
    p.add_argument("--tbptt-k", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=1, help="sequences per rank and step")
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--intermediate", type=int, default=8192)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--gathered", action="store_true", help="record the gathered parameter bytes of one sequence")
    p.add_argument("--tiny", action="store_true", help="a tiny shape on the CPU (gloo, fp32): checks the script runs")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args(argv)
    if args.tiny:
        for name, value in TINY.items():
            setattr(args, name, value)
    if args.seq_len % args.segment_len:
        p.error(f"--seq-len {args.seq_len} is not a multiple of --segment-len {args.segment_len}")
    if args.one_unit and args.wrap != "fsdp":
        p.error("--one-unit is an FSDP2 option")
    return args


def start_process_group(args) -> torch.device:
    """The process group torchrun describes (NCCL on CUDA, gloo on the CPU), or one of one rank."""
    cuda = torch.cuda.is_available() and not args.tiny
    backend = "nccl" if cuda else "gloo"
    if "RANK" in os.environ:
        dist.init_process_group(backend)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    if not cuda:
        return torch.device("cpu")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.cuda.set_device(device)
    return device


def build_program(args, device: torch.device):
    """The model (the same weights on every rank), transformed and wrapped."""
    config = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.seq_len * 2, attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    with device:
        model = transformers.LlamaForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())
    cfg = sc.SegmentConfig(args.segment_len, long_range=sc.HeadPlan.fraction(args.long_range), tbptt_k=args.tbptt_k)
    seg = sc.transform(model, cfg)
    del model  # the program holds the parameters now; the wrappers replace them
    if args.wrap == "ddp":
        seg = sc.distributed.ddp(seg, device_ids=[device.index] if device.type == "cuda" else None)
    elif args.one_unit:
        seg = sc.distributed.fsdp(seg, per_layer=False)
    else:
        seg = sc.distributed.fsdp(seg, per_layer=True, reduce_every=args.reduce_every)
    return seg, params


def train_step(seg, optimizer, ids, autocast) -> float:
    with autocast:
        loss = seg.tbptt_backward(ids)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss)


def measure(args, seg, device: torch.device) -> dict:
    """Warm-up steps, then the timed ones; per-rank seconds, peak and static memory."""
    rank = dist.get_rank()
    optimizer = torch.optim.AdamW(seg.parameters(), lr=1e-5)
    data = torch.Generator().manual_seed(1000 + rank)  # each rank its own sequences
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def ids():
        return torch.randint(0, args.vocab, (args.batch_size, args.seq_len), generator=data).to(device)

    for _ in range(args.warmup):
        train_step(seg, optimizer, ids(), autocast)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        static = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    seconds, losses = [], []
    for _ in range(args.steps):
        batch = ids()
        dist.barrier()
        start = time.perf_counter()
        losses.append(train_step(seg, optimizer, batch, autocast))
        if cuda:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    row = {"rank": rank, "step_seconds": seconds, "losses": losses,
           "peak_gib": torch.cuda.max_memory_allocated() / GiB if cuda else None,
           "static_gib": static / GiB if cuda else None}
    if args.gathered and args.wrap == "fsdp":
        with record_gathered_bytes(seg) as samples, autocast:
            seg.tbptt_backward(ids())
        optimizer.zero_grad(set_to_none=True)
        row["gathered_peak_bytes"] = {
            "layers": max(sum(b for unit, b in s["gathered"].items() if unit) for s in samples),
            "root": max(s["gathered"][""] for s in samples),
            "unsharded_gradients": max(sum(s["gradients"].values()) for s in samples),
        }
    return row


def summarise(args, rows: list[dict], params: int, device: torch.device) -> dict:
    world = len(rows)
    slowest = [max(r["step_seconds"][i] for r in rows) for i in range(args.steps)]
    step = statistics.median(slowest)
    if args.wrap == "ddp":
        wrap = "ddp"
    else:
        wrap = "fsdp-one-unit" if args.one_unit else f"fsdp-per-layer-{args.reduce_every}"
    return {
        "wrap": wrap, "ranks": world,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "model": {"params": params, "layers": args.layers, "hidden": args.hidden, "vocab": args.vocab},
        "seq_len": args.seq_len, "segment_len": args.segment_len, "tbptt_k": args.tbptt_k,
        "long_range_fraction": args.long_range, "batch_size_per_rank": args.batch_size,
        "median_step_seconds": step,
        "tokens_per_s": world * args.batch_size * args.seq_len / step,
        "peak_gib_per_rank": [r["peak_gib"] for r in rows],
        "static_gib_per_rank": [r["static_gib"] for r in rows],
        "gathered_peak_bytes": rows[0].get("gathered_peak_bytes"),
        "losses_rank0": rows[0]["losses"],
    }


def write_and_print(args, result: dict) -> Path:
    args.out.mkdir(parents=True, exist_ok=True)
    device = result["device"].replace(" ", "_")
    path = args.out / f"bench_distributed-{result['wrap']}-{result['ranks']}x{device}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    peaks = ", ".join("-" if p is None else f"{p:.2f}" for p in result["peak_gib_per_rank"])
    print(f"{result['wrap']} on {result['ranks']} x {result['device']}, {result['model']['params'] / 1e9:.2f}B params, "
          f"N={result['seq_len']}: {result['tokens_per_s']:.0f} tokens/s, peak GiB per rank [{peaks}]")
    single = args.out / f"bench_distributed-{result['wrap']}-1x{device}.json"
    if result["ranks"] > 1 and single.exists():
        one = json.loads(single.read_text())
        efficiency = result["tokens_per_s"] / (result["ranks"] * one["tokens_per_s"])
        print(f"scaling efficiency against 1 rank: {efficiency:.2f}")
    print(f"wrote {path}")
    return path


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = start_process_group(args)
    try:
        seg, params = build_program(args, device)
        row = measure(args, seg, device)
        rows = [None] * dist.get_world_size()
        dist.all_gather_object(rows, row)
        result = summarise(args, rows, params, device)
        if dist.get_rank() == 0:
            write_and_print(args, result)
        return result
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
