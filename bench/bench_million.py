"""A million-token prompt on one GPU: segcompile with an fp8 long-range history against SDPA and
HF chunked prefill, then greedy decoding after it.

The Llama-3-8B shape of ``bench_prefill.py`` (random bf16 weights, no download), batch 1, a
prompt of ``--seq-len`` tokens (default 1,048,576), under ``torch.no_grad()``:

* ``segcompile``: ``seg.prefill(ids)`` with S = T = ``--segment-len`` (4096), no sinks,
  fraction(``--long-range``) (0.25) long-range KV heads, the history stored in fp8 (e4m3, a
  scale per 64 positions; ``SegmentConfig.history_dtype``), then ``--new-tokens`` (64) greedy
  tokens by ``seg.decode``, one token a call, on the CUDA-graph decoder (``--decode
  cuda-graphs``, the default: ``seg.enable_cuda_graphs(max_context=...)`` before the prefill, so
  that its buffers take over the prefill's fp8 history and scales instead of copying them; off
  CUDA the same fixed-shape program run eagerly) or the eager step
  (``--decode eager``). The same with the history in the model's dtype (bf16: 32 KiB a token,
  32 GiB at 1M) when the time left allows it (below);
* ``sdpa``: ``model(ids, use_cache=True, logits_to_keep=1)``, the model's own full attention
  (at 1M its activations and cache do not fit: the row says OOM);
* ``chunked``: HF chunked prefill, ``--chunk`` tokens at a time into one ``DynamicCache``.

Per row: prefill wall time, the peak of allocated memory above the weights
(``torch.cuda.max_memory_allocated``), the long-range history's bytes (values and scales),
decode milliseconds a token (the first token apart: its first call at this length) and the
tokens chosen. An out-of-memory error is caught, its memory freed, and the run goes on.

Time. The whole run keeps within ``--budget-s`` (default 450 s, on top of building the model):
the fp8 row runs first, then SDPA; the bf16-history row only if the fp8 row's time says it fits
in what is left (else it is skipped, and ``--history-dtypes model --regimes segcompile`` runs it
alone: the result file is merged, keyed by N, regime and history dtype); chunked prefill last.
SDPA and chunked prefill stop after ``--baseline-limit-s`` (default 60 s) or at the budget,
recording how far they got. Estimate for one H200 at 1M: the long-range heads' causal attention
is 8 query heads x 32 layers x 2 N^2 D = 7 x 10^16 FLOP, about 3 minutes at 400 TFLOP/s, and the
per-token work (projections, MLP) about 25 s (``bench_prefill``: 6.1 s for 128K in all), so
~3.5 minutes a segcompile row; SDPA runs out of memory in its first layers. Progress is printed
every ``--progress-every`` tokens (64K) and per layer of SDPA.

    python bench/bench_million.py                          # 1M tokens, ~8 minutes on one H200
    python bench/bench_million.py --seq-len 262144         # a shorter run
    python bench/bench_million.py --tiny --out OUT         # CPU smoke: a tiny Llama, a few segments

Writes ``bench/results/bench_million-<device>.json`` (``--out`` folder).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import torch
import transformers

import segcompile as sc

sys.path.insert(0, str(Path(__file__).parent))  # bench_prefill and its memory_trace, run as scripts or loaded

import bench_prefill  # noqa: E402

GiB = bench_prefill.GiB
HISTORY_DTYPES = bench_prefill.HISTORY_DTYPES
REGIMES = ("segcompile", "sdpa", "chunked")
TINY = dict(seq_len=4 * 32 + 16, segment_len=32, chunk=32, progress_every=64, long_range=0.5)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-len", type=int, default=None, help="prompt tokens (default 1,048,576; --tiny: 144)")
    p.add_argument("--segment-len", type=int, default=None, help="S = T (default 4096; --tiny: 32)")
    p.add_argument("--long-range", type=float, default=None, help="fraction of KV heads (default 0.25; --tiny: 0.5)")
    p.add_argument("--new-tokens", type=int, default=64, help="greedy tokens decoded after the prompt")
    p.add_argument("--decode", choices=("cuda-graphs", "eager"), default="cuda-graphs",
                   help="decode on seg.enable_cuda_graphs() (enabled before the prefill, whose history its "
                        "buffers take over) or the eager step")
    p.add_argument("--chunk", type=int, default=None, help="HF chunked prefill's chunk (default 4096; --tiny: 32)")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--regimes", nargs="+", choices=REGIMES, default=list(REGIMES))
    p.add_argument("--history-dtypes", nargs="+", choices=list(HISTORY_DTYPES), default=["fp8", "model"],
                   help="segcompile's history storage, one row each; fp8 first")
    p.add_argument("--budget-s", type=float, default=450.0, help="the whole run's time, from after building the model")
    p.add_argument("--baseline-limit-s", type=float, default=60.0,
                   help="stop SDPA and HF chunked prefill after this long (chunked is quadratic in N and fills "
                        "memory slowly)")
    p.add_argument("--progress-every", type=int, default=None, help="tokens between progress lines (default 65536)")
    p.add_argument("--tiny", action="store_true", help="a tiny random Llama on the CPU: a smoke run of the script")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args(argv)
    defaults = TINY if args.tiny else dict(seq_len=1 << 20, segment_len=4096, chunk=4096, progress_every=65536,
                                             long_range=0.25)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.history_dtypes = sorted(set(args.history_dtypes), key=["fp8", "model"].index)
    return args


# ---- time and memory -----------------------------------------------------------------------------
class TimeLimit(Exception):
    """A baseline ran past its time limit; ``reached`` says how far it got."""

    def __init__(self, reached: str):
        super().__init__(reached)
        self.reached = reached


class Clock:
    """The run's time budget, from when it was made."""

    def __init__(self, budget_s: float):
        self.start = time.perf_counter()
        self.budget_s = budget_s

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.start)


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def allocated() -> int:
    return torch.cuda.memory_allocated() if torch.cuda.is_available() else 0


def peak_above(weights: int) -> float | None:
    """GiB of the allocator's peak since the last reset, above ``weights`` bytes (None off CUDA)."""
    return (torch.cuda.max_memory_allocated() - weights) / GiB if torch.cuda.is_available() else None


def reset_peak() -> None:
    bench_prefill.free_memory()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


class Progress:
    """Prints a line each time ``tokens`` crosses a multiple of ``every``, with the seconds since
    ``start`` (the device synchronised, so the time is the work's). ``deadline``: raise
    ``TimeLimit`` past it (perf_counter seconds)."""

    def __init__(self, label: str, every: int, total: int, deadline: float | None = None):
        self.label, self.every, self.total, self.deadline = label, every, total, deadline
        self.start = time.perf_counter()
        self.printed = 0

    def tokens(self, done: int) -> None:
        if done // self.every > self.printed or done == self.total:
            self.printed = done // self.every
            synchronize()
            seconds = time.perf_counter() - self.start
            print(f"  {self.label}: {done:,}/{self.total:,} tokens, {seconds:.1f} s, "
                  f"{done / max(seconds, 1e-9):,.0f} tokens/s", flush=True)
        self.check(f"{done:,} of {self.total:,} tokens")

    def layer(self, index: int, layers: int) -> None:
        synchronize()
        print(f"  {self.label}: layer {index}/{layers}, {time.perf_counter() - self.start:.1f} s", flush=True)
        self.check(f"{index} of {layers} layers")

    def check(self, reached: str) -> None:
        if self.deadline is not None and time.perf_counter() > self.deadline:
            raise TimeLimit(reached)


@contextmanager
def segment_progress(seg, progress: Progress):
    """Report ``seg``'s position at every segment end of the calls inside (an instance attribute
    over ``SegmentedModel.end_segment``, removed on exit)."""
    end_segment = seg.end_segment

    def reporting(state, *args, **kwargs):
        state = end_segment(state, *args, **kwargs)
        progress.tokens(state.position)
        return state

    seg.end_segment = reporting
    try:
        yield
    finally:
        del seg.end_segment


@contextmanager
def layer_progress(model, progress: Progress):
    """Report each decoder layer of ``model`` as it starts (forward pre-hooks, removed on exit)."""
    layers = model.model.layers
    hooks = [layer.register_forward_pre_hook(lambda module, inputs, i=i: progress.layer(i, len(layers)))
             for i, layer in enumerate(layers)]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def attempt(run: Callable[[], dict], weights: int) -> dict:
    """``run()``'s row with ``status`` "ok", or "oom" / "stopped" (``reached``) when it raised
    ``torch.OutOfMemoryError`` / ``TimeLimit``; ``peak_gib`` above ``weights`` either way, and
    everything it allocated freed before returning."""
    reset_peak()
    start = time.perf_counter()
    try:
        row = dict(status="ok", **run())
    except torch.OutOfMemoryError:
        row = dict(status="oom", seconds=time.perf_counter() - start)
    except TimeLimit as stop:
        row = dict(status="stopped", reached=stop.reached, seconds=time.perf_counter() - start)
    row["peak_gib"] = peak_above(weights)  # read before freeing: the frames of the error are gone by now
    bench_prefill.free_memory()
    return row


# ---- the regimes ---------------------------------------------------------------------------------
def segcompile_run(seg, ids: torch.Tensor, new_tokens: int, every: int, weights: int, decode: str) -> dict:
    """Prefill ``ids``, then ``new_tokens`` greedy tokens one ``seg.decode`` at a time, on the
    ``decode`` path ("cuda-graphs" or "eager")."""
    progress = Progress(f"segcompile {history_word(seg)} history", every, ids.shape[1])
    if decode == "cuda-graphs":  # before the prefill, which then sizes the history for the decoder to take over
        seg.enable_cuda_graphs(max_context=ids.shape[1] + new_tokens + seg.cfg.segment_len)  # room for every token
    start = time.perf_counter()
    with segment_progress(seg, progress):
        state = seg.prefill(ids)
    synchronize()
    prefill_s = time.perf_counter() - start
    if ids.shape[1] % seg.cfg.segment_len:  # a last segment in part: no segment end reported it
        progress.tokens(ids.shape[1])
    row = dict(seconds=prefill_s, tokens_per_s=ids.shape[1] / prefill_s, prefill_peak_gib=peak_above(weights),
               state_gib=(allocated() - weights) / GiB if torch.cuda.is_available() else None,
               **bench_prefill.history_gib(state))
    try:
        tokens, times, last = greedy_decode(seg, state, new_tokens)
        row.update(decode_first_ms=times[0] * 1e3, decode_path=seg.last_decode_path,
                   decode_ms_per_token=1e3 * sum(times[1:]) / max(len(times) - 1, 1), tokens=tokens,
                   history_taken_over=getattr(getattr(last, "buffers", None), "taken", False))
    finally:
        seg.disable_cuda_graphs()  # frees the buffers and graphs
    return row


def greedy_decode(seg, state, new_tokens: int) -> tuple[list[int], list[float], object]:
    """The greedy tokens after ``state``, the seconds each ``decode`` took (synchronised), the last state."""
    next_ids = state.logits.argmax(-1, keepdim=True)
    tokens, times = [next_ids.item()], []
    for _ in range(new_tokens):
        start = time.perf_counter()
        logits, state = seg.decode(state, next_ids, check_ids=False)
        next_ids = logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(next_ids.item())  # the sync that makes the time the token's
        times.append(time.perf_counter() - start)
    return tokens[:new_tokens], times, state


def sdpa_run(model, ids: torch.Tensor, deadline: float) -> dict:
    progress = Progress("sdpa", 1, ids.shape[1], deadline)
    start = time.perf_counter()
    with layer_progress(model, progress):
        cache = bench_prefill.sdpa_prefill(model, ids)
    synchronize()
    seconds = time.perf_counter() - start
    del cache
    return dict(seconds=seconds, tokens_per_s=ids.shape[1] / seconds)


def chunked_run(model, ids: torch.Tensor, chunk: int, every: int, deadline: float) -> dict:
    """``bench_prefill.chunked_prefill``, with progress and a time limit between chunks."""
    progress = Progress("chunked", every, ids.shape[1], deadline)
    cache = transformers.DynamicCache()
    start = time.perf_counter()
    for first in range(0, ids.shape[1], chunk):
        model(ids[:, first: first + chunk], **bench_prefill.cache_args(model, cache), use_cache=True, logits_to_keep=1)
        progress.tokens(min(first + chunk, ids.shape[1]))
    seconds = time.perf_counter() - start
    del cache
    return dict(seconds=seconds, tokens_per_s=ids.shape[1] / seconds)


def history_word(seg) -> str:
    return "fp8" if seg.cfg.history_dtype is not None else "model"


# ---- the run -------------------------------------------------------------------------------------
def build(args):
    """``(model, graph, device)``: the 8B shape on CUDA (``bench_prefill.build_model``), or with
    ``--tiny`` the tests' tiny Llama on the CPU; ``graph`` its capture, transformed per history dtype."""
    if args.tiny:
        from segcompile.testing.models import tiny_llama

        model = tiny_llama(num_layers=2).eval()
        device = torch.device("cpu")
    else:
        model = bench_prefill.build_model(SimpleNamespace(seq_lens=[args.seq_len + args.new_tokens], layers=args.layers))
        device = torch.device("cuda")
    return model, sc.capture(model), device


def main(argv=None):
    args = parse_args(argv)
    model, graph, device = build(args)
    weights = allocated()
    vocab = model.config.vocab_size
    clock = Clock(args.budget_s)
    programs = {}
    for word in args.history_dtypes if "segcompile" in args.regimes else []:
        cfg = sc.SegmentConfig(args.segment_len, long_range=sc.HeadPlan.fraction(args.long_range), tbptt_k=0,
                               history_dtype=HISTORY_DTYPES[word])
        programs[word] = sc.transform(graph, cfg)
    args.layers = model.config.num_hidden_layers  # --tiny: the tiny Llama's
    print(f"{describe_device(device)}; {args.layers} layers, weights "
          f"{weights / GiB:.1f} GiB; N={args.seq_len:,}, S=T={args.segment_len}, "
          f"fraction({args.long_range}); budget {args.budget_s:.0f} s", flush=True)
    rows = []
    with torch.no_grad():
        warm_up(args, programs, vocab, device)
        ids = torch.randint(0, vocab, (1, args.seq_len), device=device, generator=seeded(device))
        for regime, word in run_order(args):
            row = dict(n=args.seq_len, regime=regime, history_dtype=word)
            skip = skip_reason(args, regime, word, rows, clock)
            if skip:
                row.update(status="skipped", reason=skip)
            elif regime == "segcompile":
                row.update(attempt(lambda: segcompile_run(programs[word], ids, args.new_tokens,
                                                          args.progress_every, weights, args.decode), weights))
            elif regime == "sdpa":
                row.update(attempt(lambda: sdpa_run(model, ids, deadline(clock, args.baseline_limit_s)), weights))
            else:
                row.update(attempt(lambda: chunked_run(model, ids, args.chunk, args.progress_every,
                                                       deadline(clock, args.baseline_limit_s)), weights))
            rows.append(row)
            print(f"  -> {summary(row)}", flush=True)
    compare_tokens(rows)
    report(args, rows, weights, device, programs)


def warm_up(args, programs, vocab: int, device: torch.device) -> None:
    """Compile and autotune the kernels on a short prompt of every case the timed run meets (no
    tail, a tail without history, with history, a short last segment; decode steps on the timed
    run's decode path). The CUDA-graph decoder is disabled again after, which frees its stacked
    copy of the q/k/v weights (1.5 GiB for the 8B shape): the rows that follow hold only what they
    make. (The eager decode keeps its copy, one for every program of the model, while the program
    lives: with ``--decode eager`` every row's peak includes it.)"""
    ids = torch.randint(0, vocab, (1, 3 * args.segment_len + 5), device=device, generator=seeded(device))
    for seg in programs.values():
        if args.decode == "cuda-graphs":
            seg.enable_cuda_graphs()
        state = seg.prefill(ids)
        greedy_decode(seg, state, 2)
        del state
        seg.disable_cuda_graphs()
    bench_prefill.free_memory()


def seeded(device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(0)


def run_order(args) -> list[tuple[str, str]]:
    """fp8 segcompile first (the row this measures), SDPA (it fails fast), model-dtype segcompile,
    chunked last (it takes what time is left)."""
    order = [("segcompile", "fp8"), ("sdpa", "model"), ("segcompile", "model"), ("chunked", "model")]
    wanted = {("segcompile", w) for w in args.history_dtypes} | {(r, "model") for r in args.regimes if r != "segcompile"}
    return [pair for pair in order if pair in wanted and (pair[0] in args.regimes)]


def skip_reason(args, regime: str, word: str, rows: list[dict], clock: Clock) -> str | None:
    """Why a regime is not run: the budget left cannot hold it."""
    left = clock.left()
    if regime == "segcompile" and word == "model":
        fp8 = next((r for r in rows if r["regime"] == "segcompile" and r.get("status") == "ok"), None)
        if fp8 is not None:
            need = 1.1 * (fp8["seconds"] + args.new_tokens * fp8["decode_ms_per_token"] / 1e3)
            if need > left:
                return (f"the fp8 row took {fp8['seconds']:.0f} s and {need:.0f} s are needed, {left:.0f} s of the "
                        "budget are left; run --regimes segcompile --history-dtypes model alone")
    elif left < 10:
        return f"{left:.0f} s of the budget left"
    return None


def deadline(clock: Clock, limit_s: float) -> float:
    return time.perf_counter() + max(0.0, min(limit_s, clock.left()))


def compare_tokens(rows: list[dict]) -> None:
    """How many leading greedy tokens the fp8 row shares with the model-dtype row (both ran)."""
    ran = {r["history_dtype"]: r for r in rows if r["regime"] == "segcompile" and r.get("status") == "ok"}
    if len(ran) == 2:
        same = 0
        for a, b in zip(ran["fp8"]["tokens"], ran["model"]["tokens"]):
            if a != b:
                break
            same += 1
        ran["fp8"]["tokens_same_as_model_history"] = same


def summary(row: dict) -> str:
    head = f"{row['regime']} ({row['history_dtype']} history)" if row["regime"] == "segcompile" else row["regime"]
    if row["status"] == "skipped":
        return f"{head}: skipped ({row['reason']})"
    if row["status"] != "ok":
        return (f"{head}: {row['status'].upper()} after {row['seconds']:.1f} s"
                + (f" at {row['reached']}" if row.get("reached") else "") + f", peak {gib(row['peak_gib'])}")
    text = f"{head}: {row['seconds']:.1f} s ({row['tokens_per_s']:,.0f} tokens/s), peak {gib(row['peak_gib'])}"
    if "decode_ms_per_token" in row:
        text += (f", history {row['history_gib']:.2f} GiB, decode {row['decode_ms_per_token']:.2f} ms/token "
                 f"(first {row['decode_first_ms']:.0f} ms, {row.get('decode_path', 'eager')}"
                 + (", the prefill's history taken over" if row.get("history_taken_over") else "") + ")")
    return text


def gib(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} GiB"


def describe_device(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def report(args, rows, weights, device, programs) -> None:
    name = describe_device(device)
    print(f"\n{name}; N={args.seq_len:,}, batch 1, S=T={args.segment_len}, fraction({args.long_range}), "
          f"{args.new_tokens} greedy tokens; memory is the peak above the weights ({weights / GiB:.1f} GiB)")
    print(f"{'regime':11} {'history':>7} {'status':>8} {'prefill s':>10} {'tokens/s':>9} {'peak GiB':>9} "
          f"{'history GiB':>11} {'decode ms/tok':>13}")
    for r in rows:
        ok = r["status"] == "ok"
        print(f"{r['regime']:11} {r['history_dtype']:>7} {r['status']:>8} "
              f"{_cell(r.get('seconds'), 10, 1)} {_cell(r.get('tokens_per_s') if ok else None, 9, 0)} "
              f"{_cell(r.get('peak_gib'), 9, 2)} {_cell(r.get('history_gib'), 11, 2)} "
              f"{_cell(r.get('decode_ms_per_token'), 13, 2)}"
              + (f"  ({r['reason'] if r['status'] == 'skipped' else r.get('reached', '')})" if not ok else ""))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"bench_million-{'tiny-' if args.tiny else ''}{name.replace(' ', '_')}.json"
    meta = dict(device=name, torch=torch.__version__, transformers=transformers.__version__,
                command=" ".join(["python", "bench/bench_million.py", *sys.argv[1:]]) if not args.tiny else "tiny",
                weights_gib=weights / GiB, seq_len=args.seq_len, segment_len=args.segment_len,
                long_range=args.long_range, new_tokens=args.new_tokens, chunk=args.chunk, layers=args.layers,
                budget_s=args.budget_s, baseline_limit_s=args.baseline_limit_s,
                implementations=sorted({impl for seg in programs.values() for impl in seg.implementations.values()}))
    document = bench_prefill.merged_document(path, meta, rows)
    path.write_text(json.dumps(document, indent=1))
    print(f"wrote {path}")


def _cell(value: float | None, width: int, digits: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:{width},.{digits}f}"


if __name__ == "__main__":
    main()
