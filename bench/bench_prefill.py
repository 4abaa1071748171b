"""End-to-end prefill of a Llama-3-8B-shaped model: segcompile vs full-attention SDPA vs HF chunked prefill.

Random bf16 weights from a config (hidden 4096, 32 layers, 32 heads, 8 KV heads, intermediate
14336, vocab 128256; no download). For every N, batch 1, under ``torch.no_grad()``:

* ``segcompile``: ``seg.prefill(ids)`` with S = --segment-len, T = S, no sinks and
  fraction(--long-range) long-range KV heads (Triton kernels); the state it returns (tail,
  current and long-range history per layer) is what a decode would continue from. The history
  is stored in the model's dtype, or with ``--history-dtype fp8`` in fp8 (e4m3, a scale per 64
  positions: ``SegmentConfig.history_dtype``); ``history GiB`` is what the returned state's
  long-range history takes (values and scales);
* ``sdpa``: ``model(ids, use_cache=True, logits_to_keep=1)``, the model's own full attention;
* ``chunked``: HF chunked prefill, ``--chunk`` tokens at a time into one ``DynamicCache`` (the
  full cache), ``logits_to_keep=1``.

Memory is ``torch.cuda.max_memory_allocated()`` during the prefill minus what was allocated
before it (the weights), with the returned state or cache still alive; time is wall-clock
around the call after a warm-up prefill (kernel autotuning and compilation, first-call
allocations) of three segments and a short one: the kernels see every case the timed prefills
do (no tail; a tail without history; a tail and history; a short last segment).

    python bench/bench_prefill.py --seq-lens 32768 65536 131072
    python bench/bench_prefill.py --regimes segcompile --history-dtype fp8
    python bench/bench_prefill.py --regimes segcompile --seq-lens 131072 --history-dtype model fp8 --repeats 3

The result file is merged, not replaced: a row is keyed by (N, regime, history dtype), and a run
replaces only the rows it measured, so fp8 and model-dtype rows stand side by side.
    python bench/bench_prefill.py --regimes segcompile --seq-lens 131072 --memory-snapshot OUT/prefill.pickle
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import sys
import time
from pathlib import Path

import torch
import transformers

import segcompile as sc
from segcompile.cli import HISTORY_DTYPE_WORDS, history_dtype_of
from segcompile.kernels.history_format import history_bytes
from segcompile.quality.report import recorded_command

import memory_trace  # noqa: E402

GiB = 1 << 30
# --history-dtype words (the CLI's) and the SegmentConfig.history_dtype each means
HISTORY_DTYPES = {word: history_dtype_of(word) for word in HISTORY_DTYPE_WORDS}


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The model's depth and the segment settings, shared with profile_prefill.py."""
    p.add_argument("--segment-len", type=int, default=4096)
    p.add_argument("--long-range", type=float, default=0.25)
    p.add_argument("--layers", type=int, default=32)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-lens", type=int, nargs="+", default=[32768, 65536, 131072])
    add_model_args(p)
    p.add_argument("--chunk", type=int, default=4096)
    p.add_argument("--regimes", nargs="+", default=["segcompile", "sdpa", "chunked"])
    p.add_argument("--history-dtype", choices=list(HISTORY_DTYPES), nargs="+", default=["model"],
                   help="how segcompile stores the long-range history: the model's dtype (bf16) or fp8; several: "
                        "each is a segcompile row of its own, measured in the same process")
    p.add_argument("--repeats", type=int, default=1,
                   help="time each prefill this many times (after the warm-up), the regimes taking turns; the row "
                        "keeps the fastest")
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


def cache_args(model, cache, cache_position=None) -> dict:
    """The keywords that hand a transformers ``cache`` (and ``cache_position``) to ``model``'s
    forward, as the installed version names them: ``cache`` where it takes that (transformers 5.2x
    deprecates ``past_key_values``, which 5.40 removes, and Llama's forward no longer takes
    ``cache_position``), ``past_key_values`` before."""
    params = inspect.signature(model.forward).parameters
    kwargs = {"cache" if "cache" in params else "past_key_values": cache}
    if cache_position is not None and "cache_position" in params:
        kwargs["cache_position"] = cache_position
    return kwargs


def sdpa_prefill(model, ids):
    cache = transformers.DynamicCache()
    model(ids, **cache_args(model, cache), use_cache=True, logits_to_keep=1)
    return cache


def chunked_prefill(model, ids, chunk):
    cache = transformers.DynamicCache()
    for start in range(0, ids.shape[1], chunk):
        model(ids[:, start : start + chunk], **cache_args(model, cache), use_cache=True, logits_to_keep=1)
    return cache


def measure(fn, keep=None) -> dict:
    """Time and memory of ``fn()``, the state or cache it returns alive while the peak is read.
    ``keep(result)``: more fields of the row, from the result (``history_gib``). Off CUDA the
    memory fields are None (the CPU smoke runs)."""
    cuda = torch.cuda.is_available()
    free_memory()
    before = torch.cuda.memory_allocated() if cuda else 0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    kept = fn()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    row = dict(seconds=seconds, peak_gib=None, kept_gib=None)
    if cuda:
        row.update(peak_gib=(torch.cuda.max_memory_allocated() - before) / GiB,
                   kept_gib=(torch.cuda.memory_allocated() - before) / GiB)
    row.update(keep(kept) if keep is not None else {})
    del kept
    return row


def free_memory() -> None:
    """Collect what is unreachable and return the allocator's cached blocks (after an OOM too)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def history_gib(state) -> dict:
    """The bytes of a state's long-range history (values and scales), in GiB."""
    total = sum(history_bytes(getattr(layer, f"hist_{kv}")) for layer in state.layers for kv in ("k", "v"))
    return dict(history_gib=total / GiB)


def row_key(row: dict) -> tuple:
    """What a row measured: rows of older files, which predate --history-dtype, are "model"."""
    return row["n"], row["regime"], row.get("history_dtype", "model")


def merge_rows(old: list[dict], new: list[dict]) -> list[dict]:
    """``old`` without the rows ``new`` measures again, then ``new``; ordered by N, then regime
    (segcompile, sdpa, chunked) and history dtype."""
    replaced = {row_key(r) for r in new}
    rows = [r for r in old if row_key(r) not in replaced] + list(new)
    order = ("segcompile", "sdpa", "chunked")
    return sorted(rows, key=lambda r: (r["n"], order.index(r["regime"]) if r["regime"] in order else len(order),
                                       r["regime"], row_key(r)[2]))


def main(argv=None):
    args = parse_args(argv)
    model = build_model(args)
    weights = torch.cuda.memory_allocated()
    segs, transform_s = {}, {}
    for word in args.history_dtype:
        cfg = sc.SegmentConfig(args.segment_len, long_range=sc.HeadPlan.fraction(args.long_range), tbptt_k=0,
                               history_dtype=HISTORY_DTYPES[word])
        start = time.perf_counter()
        segs[word] = sc.transform(model, cfg)
        transform_s[word] = time.perf_counter() - start
        print(segs[word], f"\ntransform: {transform_s[word]:.1f} s", flush=True)
    # (regime, history dtype) -> a prefill; each history dtype of segcompile is a regime of its own
    runs = {("segcompile", word): seg.prefill for word, seg in segs.items()}
    runs.update({
        ("sdpa", "model"): lambda ids: sdpa_prefill(model, ids),
        ("chunked", "model"): lambda ids: chunked_prefill(model, ids, args.chunk),
    })
    runs = {key: run for key, run in runs.items() if key[0] in args.regimes}
    rows = []
    with torch.no_grad():
        warm = torch.randint(0, 128256, (1, 3 * args.segment_len + 5), device="cuda")
        for run in runs.values():
            run(warm)
        for n in args.seq_lens:
            ids = torch.randint(0, 128256, (1, n), device="cuda")
            for (name, dtype), timing in interleaved(runs, ids, args.repeats).items():
                row = dict(n=n, regime=name, history_dtype=dtype, **timing)
                rows.append(row)
                print(row, flush=True)
    seg = next(iter(segs.values()))
    report(args, rows, weights, transform_s, seg)
    if args.memory_snapshot is not None:  # after the result files: the recording is slow and optional
        with torch.no_grad():
            memory_trace.record(lambda: seg.prefill(ids), args.memory_snapshot)


def interleaved(runs: dict, ids, repeats: int) -> dict:
    """Each of ``runs`` on ``ids``, ``repeats`` times, one round of every run after another, every
    other round in reverse order (so that a steady drift of the clocks reaches every run alike: in
    a fixed order the last run of each round would always meet the drift latest): per run, the
    first run's memory, the fastest run's time (``seconds``) and every run's (``seconds_each``); an
    OOM row where the first run ran out of memory."""
    measured = {key: [] for key in runs}
    order = list(runs.items())
    for round_ in range(repeats):
        for key, run in order if round_ % 2 == 0 else order[::-1]:
            if measured[key] is None:  # ran out of memory in an earlier round
                continue
            try:
                measured[key].append(measure(lambda: run(ids), history_gib if key[0] == "segcompile" else None))
            except torch.OutOfMemoryError:
                free_memory()
                measured[key] = None
    return {key: _row(m) for key, m in measured.items()}


def _row(measured: list[dict] | None) -> dict:
    if measured is None:
        return dict(seconds=None, peak_gib=None, kept_gib=None, oom=True)
    seconds_each = [r["seconds"] for r in measured]
    return dict(measured[0], seconds=min(seconds_each), seconds_each=seconds_each)


def report(args, rows, weights, transform_s, seg):
    device = torch.cuda.get_device_name()
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"bench_prefill-{device.replace(' ', '_')}"
    meta = dict(device=device, torch=torch.__version__, transformers=transformers.__version__,
                command=recorded_command("bench/bench_prefill.py", sys.argv[1:], {"--out"}),
                weights_gib=weights / GiB, transform_seconds=transform_s, segment_len=args.segment_len,
                long_range=args.long_range, chunk=args.chunk, layers=args.layers, history_dtype=args.history_dtype,
                implementations=sorted(set(seg.implementations.values())))
    document = merged_document(stem.with_suffix(".json"), meta, rows)
    print(f"\n{device}; Llama-3-8B shape, {args.layers} layers, bf16, weights {weights / GiB:.1f} GiB; "
          f"S={args.segment_len}, fraction({args.long_range}) long-range KV heads")
    print_table(document["rows"])
    stem.with_suffix(".json").write_text(json.dumps(document, indent=1))
    plot(document["rows"], stem.with_suffix(".png"), device)
    print(f"wrote {stem}.json/.png")


def merged_document(path: Path, meta: dict, rows: list[dict]) -> dict:
    """The result file's new content: this run's rows merged into the file's (``merge_rows``),
    ``meta`` this run's, with every command whose rows the file still holds (``commands``)."""
    old = json.loads(path.read_text()) if path.is_file() else dict(meta={}, rows=[])
    merged = merge_rows(old["rows"], rows)
    earlier = old["meta"].get("commands", [old["meta"]["command"]] if "command" in old["meta"] else [])
    kept_old = len(merged) > len(rows)
    meta = dict(meta, commands=[*(earlier if kept_old else []), meta["command"]])
    add_ratios(merged)
    return dict(meta=meta, rows=merged)


def add_ratios(rows: list[dict]) -> None:
    """Each row's SDPA-over-this memory and time (None without an SDPA row of its N)."""
    sdpa = {r["n"]: r for r in rows if r["regime"] == "sdpa" and not failed(r)}
    for r in rows:
        base = sdpa.get(r["n"])
        ok = base is not None and not failed(r)
        r["sdpa_over_this_memory"] = base["peak_gib"] / r["peak_gib"] if ok and base["peak_gib"] and r["peak_gib"] else None
        r["sdpa_over_this_time"] = base["seconds"] / r["seconds"] if ok and r["seconds"] else None


def failed(row: dict) -> bool:
    """A row without a measurement: out of memory (``oom``), or a ``status`` other than "ok"
    (bench_million.py's rows: "oom", "stopped", "skipped")."""
    return bool(row.get("oom")) or row.get("status", "ok") != "ok"


def print_table(rows: list[dict]) -> None:
    print(f"{'N':>7} {'regime':11} {'history':>11} {'peak GiB':>9} {'kept GiB':>9} {'history GiB':>11} {'seconds':>8} "
          f"{'sdpa/this mem':>14} {'sdpa/this time':>15}")
    for r in rows:
        head = f"{r['n']:7} {r['regime']:11} {r.get('history_dtype', 'model'):>11}"
        if r.get("oom"):
            print(f"{head} {'OOM':>9}")
            continue
        hist = f"{r['history_gib']:11.2f}" if r.get("history_gib") is not None else f"{'':11}"
        mem = f"{r['sdpa_over_this_memory']:.2f}x" if r.get("sdpa_over_this_memory") else ""
        tim = f"{r['sdpa_over_this_time']:.2f}x" if r.get("sdpa_over_this_time") else ""
        print(f"{head} {r['peak_gib']:9.2f} {r['kept_gib']:9.2f} {hist} {r['seconds']:8.2f} {mem:>14} {tim:>15}")


def plot(rows, path, device):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for regime, dtype in sorted({(r["regime"], r.get("history_dtype", "model")) for r in rows}):
        pts = [r for r in rows if (r["regime"], r.get("history_dtype", "model")) == (regime, dtype) and not r.get("oom")]
        label = f"{regime} ({dtype} history)" if regime == "segcompile" else regime
        a.plot([r["n"] / 1024 for r in pts], [r["peak_gib"] for r in pts], "o-", label=label)
        b.plot([r["n"] / 1024 for r in pts], [r["seconds"] for r in pts], "o-", label=label)
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
