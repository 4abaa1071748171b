"""End-to-end prefill of a Llama-3-8B-shaped model: segcompile vs full-attention SDPA vs HF chunked prefill.

Random bf16 weights from a config (hidden 4096, 32 layers, 32 heads, 8 KV heads, intermediate
14336, vocab 128256; no download). For every N, batch 1, under ``torch.no_grad()``:

* ``segcompile``: ``seg.prefill(ids)`` with S = --segment-len, T = S, no sinks and
  fraction(--long-range) long-range KV heads (Triton kernels); the state it returns (tail,
  current and long-range history per layer) is what a decode would continue from;
* ``sdpa``: ``model(ids, use_cache=True, logits_to_keep=1)``, the model's own full attention;
* ``chunked``: HF chunked prefill, ``--chunk`` tokens at a time into one ``DynamicCache`` (the
  full cache), ``logits_to_keep=1``.

Memory is ``torch.cuda.max_memory_allocated()`` during the prefill minus what was allocated
before it (the weights), with the returned state or cache still alive; time is wall-clock
around the call after a warm-up prefill (kernel autotuning and compilation, first-call
allocations) of three segments and a short one: the kernels see every case the timed prefills
do (no tail; a tail without history; a tail and history; a short last segment).

    python bench/bench_prefill.py --seq-lens 32768 65536 131072
    python bench/bench_prefill.py --regimes segcompile --seq-lens 131072 --memory-snapshot OUT/prefill.pickle
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch
import transformers

import segcompile as sc

import memory_trace  # noqa: E402

GiB = 1 << 30


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-lens", type=int, nargs="+", default=[32768, 65536, 131072])
    p.add_argument("--segment-len", type=int, default=4096)
    p.add_argument("--long-range", type=float, default=0.25)
    p.add_argument("--chunk", type=int, default=4096)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--regimes", nargs="+", default=["segcompile", "sdpa", "chunked"])
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--memory-snapshot", type=Path, default=None, metavar="FILE",
                   help="also record the allocator's history of segcompile's prefill at the largest N and write it "
                        "to FILE (a pickle that https://pytorch.org/memory_viz shows: what is alive at the peak)")
    return p.parse_args(argv)


def build_model(args) -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=args.layers,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=max(args.seq_lens) + 1,
        rope_theta=500000.0, attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    return model.eval()


def sdpa_prefill(model, ids):
    return model(ids, use_cache=True, logits_to_keep=1).past_key_values


def chunked_prefill(model, ids, chunk):
    cache = transformers.DynamicCache()
    for start in range(0, ids.shape[1], chunk):
        model(ids[:, start : start + chunk], past_key_values=cache, use_cache=True, logits_to_keep=1)
    return cache


def measure(fn) -> dict:
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    kept = fn()  # the state / cache stays alive while the peak is read
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() - before
    kept_bytes = torch.cuda.memory_allocated() - before
    del kept
    return dict(seconds=seconds, peak_gib=peak / GiB, kept_gib=kept_bytes / GiB)


def main(argv=None):
    args = parse_args(argv)
    model = build_model(args)
    weights = torch.cuda.memory_allocated()
    cfg = sc.SegmentConfig(args.segment_len, long_range=sc.HeadPlan.fraction(args.long_range), tbptt_k=0)
    start = time.perf_counter()
    seg = sc.transform(model, cfg)
    transform_s = time.perf_counter() - start
    print(seg, f"\ntransform: {transform_s:.1f} s", flush=True)
    runs = {
        "segcompile": lambda ids: seg.prefill(ids),
        "sdpa": lambda ids: sdpa_prefill(model, ids),
        "chunked": lambda ids: chunked_prefill(model, ids, args.chunk),
    }
    rows = []
    with torch.no_grad():
        warm = torch.randint(0, 128256, (1, 3 * args.segment_len + 5), device="cuda")
        for name in args.regimes:
            runs[name](warm)
        for n in args.seq_lens:
            ids = torch.randint(0, 128256, (1, n), device="cuda")
            for name in args.regimes:
                try:
                    row = dict(n=n, regime=name, **measure(lambda: runs[name](ids)))
                except torch.OutOfMemoryError:
                    row = dict(n=n, regime=name, seconds=None, peak_gib=None, kept_gib=None, oom=True)
                rows.append(row)
                print(row, flush=True)
    report(args, rows, weights, transform_s, seg)
    if args.memory_snapshot is not None:  # after the result files: the recording is slow and optional
        with torch.no_grad():
            memory_trace.record(lambda: seg.prefill(ids), args.memory_snapshot)


def report(args, rows, weights, transform_s, seg):
    device = torch.cuda.get_device_name()
    by = {(r["n"], r["regime"]): r for r in rows}
    print(f"\n{device}; Llama-3-8B shape, {args.layers} layers, bf16, weights {weights / GiB:.1f} GiB; "
          f"S={args.segment_len}, fraction({args.long_range}) long-range KV heads")
    print(f"{'N':>7} {'regime':11} {'peak GiB':>9} {'kept GiB':>9} {'seconds':>8} {'sdpa/this mem':>14} {'sdpa/this time':>15}")
    for r in rows:
        base = by.get((r["n"], "sdpa"))
        if r.get("oom"):
            print(f"{r['n']:7} {r['regime']:11} {'OOM':>9}")
            continue
        mem = f"{base['peak_gib'] / r['peak_gib']:.2f}x" if base and base.get("peak_gib") else ""
        tim = f"{base['seconds'] / r['seconds']:.2f}x" if base and base.get("seconds") else ""
        r["sdpa_over_this_memory"] = base["peak_gib"] / r["peak_gib"] if base and base.get("peak_gib") else None
        r["sdpa_over_this_time"] = base["seconds"] / r["seconds"] if base and base.get("seconds") else None
        print(f"{r['n']:7} {r['regime']:11} {r['peak_gib']:9.2f} {r['kept_gib']:9.2f} {r['seconds']:8.2f} {mem:>14} {tim:>15}")
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"bench_prefill-{device.replace(' ', '_')}"
    meta = dict(device=device, torch=torch.__version__, transformers=transformers.__version__, command=" ".join(sys.argv),
                weights_gib=weights / GiB, transform_seconds=transform_s, segment_len=args.segment_len,
                long_range=args.long_range, chunk=args.chunk, layers=args.layers,
                implementations=sorted(set(seg.implementations.values())))
    stem.with_suffix(".json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    plot(rows, stem.with_suffix(".png"), device)
    print(f"wrote {stem}.json/.png")


def plot(rows, path, device):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for regime in sorted({r["regime"] for r in rows}):
        pts = [r for r in rows if r["regime"] == regime and not r.get("oom")]
        a.plot([r["n"] / 1024 for r in pts], [r["peak_gib"] for r in pts], "o-", label=regime)
        b.plot([r["n"] / 1024 for r in pts], [r["seconds"] for r in pts], "o-", label=regime)
    a.set(xlabel="prompt length (K tokens)", ylabel="peak GiB above the weights", title="prefill memory")
    b.set(xlabel="prompt length (K tokens)", ylabel="seconds", title="prefill time")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"Llama-3-8B shape, bf16, {device}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
