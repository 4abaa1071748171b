"""Peak memory and throughput of one training step: segcompile TBPTT vs full attention.

One Llama-shaped model (random init from a config), bf16 autocast, AdamW, batch 1. For every N:

* ``segcompile``: ``seg.tbptt_backward(ids)`` with S = --segment-len, T = S, K = 1 and
  fraction(--long-range) long-range KV heads;
* ``full``: ``model(ids, labels=ids).loss.backward()`` with the model's own SDPA attention;
* ``full+ckpt``: the same with HF gradient checkpointing;
* ``segcompile+ckpt``: segcompile with ``tbptt_backward(..., checkpoint=True)`` (each live segment
  graph keeps only its inputs);
* ``segcompile+compile``: segcompile after ``seg.compile()`` (the step under ``torch.compile``;
  its first, timed-out warm-up step compiles).

Memory is ``torch.cuda.max_memory_allocated`` over the timed steps; ``static`` is what is
allocated between steps (weights, gradients, optimizer state). The state segcompile carries
grows by ``layers * long_range_kv_heads * (d_k + d_v) * bytes`` per token: the script fits
segcompile's peak against N and prints both slopes.

    python bench/bench_training.py --seq-lens 8192 16384 32768 65536
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers

import segcompile as sc
from segcompile.files import atomic_write_text
from segcompile.quality import report

import memory_trace  # noqa: E402

GiB = 1 << 30


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-lens", type=int, nargs="+", default=[8192, 16384, 32768, 65536])
    add_model_args(p)
    add_compile_args(p)
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--regimes", nargs="+", default=["segcompile", "segcompile+ckpt", "full", "full+ckpt"],
                   choices=["segcompile", "segcompile+ckpt", "segcompile+compile", "full", "full+ckpt"])
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--gc-freeze", action="store_true",
                   help="measure each regime a second time with Python's garbage collector frozen (gc.freeze)")
    p.add_argument("--profile-warmup", action="store_true",
                   help="run the warm-up steps under cProfile; each row then lists the host functions that took "
                        "the most time (compiling, recording CUDA graphs)")
    p.add_argument("--memory-snapshot", type=Path, default=None, metavar="FILE",
                   help="also record the allocator's history of one segcompile step at the largest N, write it to "
                        "FILE and print what is alive at its peak")
    return p.parse_args(argv)


def add_compile_args(p: argparse.ArgumentParser) -> None:
    """How ``seg.compile()`` compiles (``segcompile+compile``; profile_training.py's ``--compiled``)."""
    p.add_argument("--compile-mode", default=None,
                   choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                   help="torch.compile's mode for seg.compile() (default: torch's default)")
    p.add_argument("--inductor-option", action="append", default=[], metavar="NAME=VALUE",
                   help="an Inductor option for seg.compile(), e.g. cpp_wrapper=true (repeatable)")


def compile_options(args) -> dict:
    """``seg.compile``'s keyword arguments from ``add_compile_args``'s options."""
    if args.compile_mode and args.inductor_option:  # torch.compile takes one or the other
        raise SystemExit("--compile-mode and --inductor-option: give one (CUDA graphs as an option: "
                         "--inductor-option triton.cudagraphs=true)")
    if args.inductor_option:
        return {"options": dict(_inductor_option(text) for text in args.inductor_option)}
    return {"mode": args.compile_mode} if args.compile_mode else {}


def _inductor_option(text: str) -> tuple[str, object]:
    name, sep, value = text.partition("=")
    if not sep:
        raise SystemExit(f"--inductor-option {text!r}: expected NAME=VALUE")
    return name, json.loads(value.lower()) if value.lower() in ("true", "false") or value.isdigit() else value


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The model shape (443M Llama by default) and the segment settings, shared with profile_training.py."""
    p.add_argument("--segment-len", type=int, default=2048)
    p.add_argument("--long-range", type=float, default=0.25)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--intermediate", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=32000)


def build_model(args) -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(args.seq_lens) * 2, attn_implementation="sdpa",
    )
    with torch.device("cuda"):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(config)
    return model


def measure(step, n_tokens: int, iters: int, warmup: int = 1, profile_warmup: bool = False) -> dict:
    warmup_times, warmup_profiles = [], []
    for i in range(warmup):  # allocates gradients and optimizer state, autotunes (and records CUDA graphs)
        profiler = cProfile.Profile() if profile_warmup else contextlib.nullcontext()
        start = time.perf_counter()
        with profiler:
            step()
            torch.cuda.synchronize()
        warmup_times.append(time.perf_counter() - start)
        progress(f"warm-up step {i + 1}/{warmup}: {warmup_times[-1]:.2f} s")
        if profile_warmup:
            warmup_profiles.append(heaviest_functions(profiler))
            for row in warmup_profiles[-1]["cumulative"][:15]:  # now, in case the run is cut off before its file
                progress(f"    {row['cumulative_s']:9.2f} s {row['calls']:9d} calls  {row['function']}")
    torch.cuda.synchronize()
    static = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    recordings = cuda_graph_recordings()
    times = []
    with collector_pauses() as pauses:
        for _ in range(iters):
            start = time.perf_counter()
            step()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            progress(f"timed step {len(times)}/{iters}: {times[-1]:.2f} s")
    peak = torch.cuda.max_memory_allocated()
    seconds = statistics.median(times)
    return {
        "peak_gib": peak / GiB,
        "static_gib": static / GiB,
        "peak_above_static_gib": (peak - static) / GiB,
        "step_s": seconds,
        "tokens_per_s": n_tokens / seconds,
        # what a user waits before the first fast step: compiling and recording CUDA graphs happen here
        "warmup_s": warmup_times,
        **({"warmup_host_profile": warmup_profiles} if profile_warmup else {}),
        # a timed step that records CUDA graphs again measures the recording, not the replay
        "cuda_graphs_recorded_while_timed": cuda_graph_recordings() > recordings,
        # Python's garbage collector, which stops everything: a full collection after a compile walks millions of objects
        "gc_pause_s_per_step": sum(pauses) / iters,
    }


def heaviest_functions(profiler: cProfile.Profile, top: int = 25) -> dict:
    """The ``top`` functions of a cProfile run by their own time and by the time under them:
    ``{"self": [...], "cumulative": [...]}``, each ``{"function", "calls", "self_s", "cumulative_s"}``."""
    stats = pstats.Stats(profiler).stats  # {(file, line, name): (primitive calls, calls, self, cumulative, callers)}
    rows = [{"function": f"{Path(file).name}:{line}({name})", "calls": calls, "self_s": round(own, 3),
             "cumulative_s": round(cum, 3)} for (file, line, name), (_, calls, own, cum, _) in stats.items()]
    return {order: sorted(rows, key=lambda r: -r[key])[:top] for order, key in
            (("self", "self_s"), ("cumulative", "cumulative_s"))}


def progress(line: str) -> None:
    # a run cut short by its time limit still says how far it got
    print("  " + line, file=sys.stderr, flush=True)


def warmup_steps(seg) -> int:
    """Untimed steps before a measurement: CUDA-graph trees run a function eagerly once, record it
    the next time, then replay it."""
    return 2 if seg.uses_cuda_graphs else 1


def cuda_graph_recordings() -> int:
    # Inductor counts the inputs of every CUDA graph it records; the count moves only when one is recorded
    return torch._dynamo.utils.counters["inductor"]["cudagraph_recorded_non_static_inputs"]


@contextlib.contextmanager
def collector_pauses():
    """The seconds each garbage collection took while the block ran (a list, filled as they end)."""
    pauses, started = [], []

    def note(phase, info):
        if phase == "start":
            started.append(time.perf_counter())
        elif started:
            pauses.append(time.perf_counter() - started.pop())

    gc.callbacks.append(note)
    try:
        yield pauses
    finally:
        gc.callbacks.remove(note)


def sequence(n: int, args) -> torch.Tensor:
    """The ``n``-token batch every regime trains on at that length."""
    return torch.randint(0, args.vocab, (1, n), device="cuda", generator=torch.Generator("cuda").manual_seed(n))


def backward(regime, model, seg, ids) -> None:
    """One forward and backward of ``regime`` on ``ids`` (bf16 autocast); gradients in ``.grad``.
    ``seg``: the SegmentedModel of the regime (compiled for ``segcompile+compile``)."""
    with torch.autocast("cuda", dtype=torch.bfloat16):
        if regime.startswith("segcompile"):
            seg.tbptt_backward(ids, checkpoint=regime == "segcompile+ckpt")
        else:
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()


def run_regime(regime, model, seg, n, args) -> dict:
    ids = sequence(n, args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step():
        backward(regime, model, seg, ids)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if regime == "full+ckpt":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    progress(f"{regime} at {n} tokens")
    try:
        row = measure(step, n, args.iters, warmup=warmup_steps(seg), profile_warmup=args.profile_warmup)
        progress(f"{regime} at {n} tokens: {row['tokens_per_s']:.0f} tokens/s, peak {row['peak_gib']:.2f} GiB, "
                 f"GC {row['gc_pause_s_per_step']:.3f} s a step")
        if args.gc_freeze:
            row["gc_frozen"] = measure_gc_frozen(step, n, args.iters)
        return row
    except torch.OutOfMemoryError:
        return {"oom": True}
    finally:
        model.gradient_checkpointing_disable()
        optimizer.zero_grad(set_to_none=True)
        del optimizer
        gc.collect()
        torch.cuda.empty_cache()


def measure_gc_frozen(step, n_tokens: int, iters: int) -> dict:
    """``measure`` again once every live object is in the collector's permanent generation
    (``gc.freeze``, what serving engines do after their warm-up): full collections then skip what
    compiling made. Unfrozen afterwards, so that the next regime starts as this one did."""
    gc.collect()
    gc.freeze()
    try:
        return measure(step, n_tokens, iters)
    finally:
        gc.unfreeze()


def snapshot_step(model, seg, n, args) -> None:
    """One segcompile step at ``n`` tokens (after a warm-up step) under the allocation recorder."""
    ids = sequence(n, args)
    model.train()

    def step():
        backward("segcompile", model, seg, ids)

    step()
    model.zero_grad(set_to_none=True)
    memory_trace.record(step, args.memory_snapshot)
    model.zero_grad(set_to_none=True)


def fit_slope(points: list[tuple[int, float]]) -> float:
    """Least-squares bytes per token of peak memory against N."""
    xs, ys = [p[0] for p in points], [p[1] * GiB for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def main(argv=None):
    args = parse_args(argv)
    model = build_model(args)
    params = sum(p.numel() for p in model.parameters())
    model.eval()
    cfg = sc.SegmentConfig(args.segment_len, long_range=sc.HeadPlan.fraction(args.long_range), tbptt_k=1)
    start = time.perf_counter()
    seg = sc.transform(model, cfg)
    transform_s = time.perf_counter() - start
    n_lr = sum(len(s.long_range) for s in seg.sites)
    head_dim = args.hidden // args.heads
    # The history is kept in the autocast dtype (bf16), though Llama's K/V leave RoPE in fp32.
    state_bytes_per_token = n_lr * 2 * head_dim * 2

    compiled = sc.transform(model, cfg).compile(**compile_options(args)) if "segcompile+compile" in args.regimes else None
    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "command": report.recorded_command("bench/bench_training.py", sys.argv[1:], {"--out", "--memory-snapshot"}),
        "model": {"params": params, "layers": args.layers, "hidden": args.hidden, "heads": args.heads,
                  "kv_heads": args.kv_heads, "intermediate": args.intermediate, "vocab": args.vocab},
        "segment_len": args.segment_len, "long_range_fraction": args.long_range,
        "compile_options": compile_options(args), "long_range_kv_heads_total": n_lr, "transform_s": transform_s,
        "implementations": sorted(set(seg.implementations.values())),
        "carried_state_bytes_per_token": state_bytes_per_token,
        "segcompile_peak_slope_bytes_per_token": None,
        "complete": False,
        "rows": [],
    }
    rows = result["rows"]
    for n in args.seq_lens:
        for regime in args.regimes:
            row = run_regime(regime, model, compiled if regime == "segcompile+compile" else seg, n, args)
            rows.append({"regime": regime, "seq_len": n, **row})
            print(json.dumps(rows[-1]), flush=True)
            # rewritten after every row: a run cut off by its time limit keeps what it measured
            write_result(result, "bench_training", args.out, quiet=True)

    seg_points = [(r["seq_len"], r["peak_gib"]) for r in rows if r["regime"] == "segcompile" and "oom" not in r]
    result["segcompile_peak_slope_bytes_per_token"] = fit_slope(seg_points) if len(seg_points) >= 2 else None
    result["complete"] = True
    print_table(result)
    write_result(result, "bench_training", args.out)
    if args.memory_snapshot is not None:  # after the result file: the recording is slow and optional
        snapshot_step(model, seg, max(args.seq_lens), args)


def write_result(result: dict, script: str, out: Path, quiet: bool = False) -> None:
    """``out/<script>-<device>.json``, the file the bench README cites."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / (script + "-" + result["device"].replace(" ", "_") + ".json")
    atomic_write_text(path, json.dumps(result, indent=2) + "\n")
    if not quiet:
        print(f"wrote {path}")


def print_table(result):
    print(f"\n{result['device']}, {result['model']['params'] / 1e6:.0f}M params, S={result['segment_len']}, "
          f"long-range fraction {result['long_range_fraction']}")
    print(f"{'N':>7} | {'regime':<18} | {'peak GiB':>8} | {'above static':>12} | {'tokens/s':>9} | {'GC s/step':>9}")
    for r in result["rows"]:
        if r.get("oom"):
            print(f"{r['seq_len']:>7} | {r['regime']:<18} | {'OOM':>8} |")
            continue
        rerecorded = "  (CUDA graphs recorded while timed)" if r.get("cuda_graphs_recorded_while_timed") else ""
        print(f"{r['seq_len']:>7} | {r['regime']:<18} | {r['peak_gib']:8.2f} | {r['peak_above_static_gib']:12.2f} | "
              f"{r['tokens_per_s']:9.0f} | {r.get('gc_pause_s_per_step', 0):9.3f}{rerecorded}")
        if "gc_frozen" in r:
            f = r["gc_frozen"]
            print(f"{'':>7} | {'  gc frozen':<18} | {f['peak_gib']:8.2f} | {f['peak_above_static_gib']:12.2f} | "
                  f"{f['tokens_per_s']:9.0f} | {f['gc_pause_s_per_step']:9.3f}")
    if result["segcompile_peak_slope_bytes_per_token"] is not None:
        print(f"segcompile peak grows {result['segcompile_peak_slope_bytes_per_token']:.0f} B/token; carried "
              f"long-range KV is {result['carried_state_bytes_per_token']} B/token")


if __name__ == "__main__":
    main()
