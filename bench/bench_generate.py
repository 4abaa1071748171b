"""Generation speed of a Llama-3-8B-shaped model after a long prompt: segcompile's decode (eager,
CUDA graphs) vs transformers (SDPA with its full cache, static cache under torch.compile).

Random bf16 weights from a config (hidden 4096, 32 layers, 32 heads, 8 KV heads, intermediate
14336, vocab 128256; no download); segcompile with S = --segment-len, T = S, no sinks,
fraction(--long-range). Per prompt length N, the prompt ends --boundary tokens before a segment
boundary, so every decode run crosses a segment end. Per batch size B (the batch-1 prefill
repeated B times: the decode work is that of B different prompts), greedy, under ``torch.no_grad()``:

* ``seg-eager``: ``seg.decode(state, token, check_ids=False)`` a token at a time (the step graph,
  Triton kernels; no vocabulary check of the model's own tokens, a device sync, as ``seg.generate``);
* ``seg-cuda-graph``: the same after ``seg.enable_cuda_graphs()`` (the fixed-shape step replayed
  from CUDA graphs, ``segcompile/runtime/static_decode.py``);
* ``seg-static``: ``seg.enable_cuda_graphs(capture=False)``: the fixed-shape step that the graphs
  replay, run eagerly (the program without the capture: slow, a reference for the two below);
* ``seg-compiled-graph``: ``seg.enable_cuda_graphs(compile=True)``: the fixed-shape step under
  ``torch.compile`` (Inductor), then captured; ``first_s`` includes the compile;
* ``hf-sdpa``: the model's own forward with a ``DynamicCache`` (the full cache), SDPA;
* ``hf-static-compile``: transformers' fast path: a ``StaticCache`` and the one-token forward under
  ``torch.compile(mode="reduce-overhead", fullgraph=True)`` (CUDA graphs by Inductor), as the
  transformers documentation's static-cache example; the cache is prefilled eagerly, in chunks.

Each path decodes --new-tokens tokens; ms per token is the wall time of all but the first
(which pays for loading the state or the compile), divided by their number, with no host sync
inside the loop; tokens/s = B * 1000 / ms. The segcompile paths also report ``steady_ms_per_token``:
the tokens after the segment end (the 32-token run has one segment end where a generation has one
in S tokens). ``first_s`` is the first decode call (CUDA-graph
capture, compile), ``warmup_s`` the run before the timed one (segcompile: the same tokens from
the same state, so that every kernel compile and graph capture of the boundary is done before
the timed run; transformers: its first three tokens). ``max_rel_error``: the CUDA-graph path's
logits against the eager path's, fed the same tokens (``max |got - want| / max |want|`` per
token, the worst token), across the segment end; with ``--fp32-reference`` also every path's
against a float32 copy of the model fed the same tokens (what bf16 rounding alone moves). A case that runs out of memory is reported as
such.

    python bench/bench_generate.py                                  # N = 32K, B = 1, every path
    python bench/bench_generate.py --prompt-lens 131072 --paths seg-eager seg-cuda-graph hf-sdpa
    python bench/bench_generate.py --batches 8 32 --paths seg-cuda-graph hf-sdpa
    python bench/bench_generate.py --tiny                           # a small shape (CPU smoke run)
    python bench/bench_generate.py --model smollm2 --paths seg-eager seg-static seg-cuda-graph seg-compiled-graph
                                                                    # agreement on trained weights (SmolLM2-135M)
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import transformers

import segcompile as sc
from segcompile.kernels.history_format import QuantizedHistory
from segcompile.quality.report import recorded_command
from segcompile.runtime.state import reserve_history

sys.path.insert(0, str(Path(__file__).parent))  # bench_prefill, run as a script or loaded

from bench_prefill import cache_args  # noqa: E402

PATHS = ("seg-eager", "seg-static", "seg-cuda-graph", "seg-compiled-graph", "hf-sdpa", "hf-static-compile")
REFERENCE_PATHS = ("seg-eager", "seg-static")  # the paths whose logits the others are compared with
GiB = 1 << 30


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompt-lens", type=int, nargs="+", default=[32768])
    p.add_argument("--batches", type=int, nargs="+", default=[1])
    p.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--boundary", type=int, default=8, help="the prompt ends this many tokens before a segment boundary")
    p.add_argument("--segment-len", type=int, default=4096)
    p.add_argument("--long-range", type=float, default=0.25)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--tiny", action="store_true", help="a 2-layer model of hidden 256, S=64 (a smoke run, CPU or GPU)")
    p.add_argument("--model", default=None, metavar="SOURCE",
                   help="a pretrained model instead of the random 8B shape: 'smollm2', a .gguf file or a Hugging Face "
                        "folder (segcompile.pretrained), in bf16 on a GPU; where agreement is the question, trained "
                        "weights rather than random ones")
    p.add_argument("--fp32-reference", action="store_true",
                   help="also decode the eager path's tokens with a float32 copy of the model (batch 1) and report every "
                        "path's logits against it: how far bf16 arithmetic alone moves them, the scale agreement is judged on")
    p.add_argument("--history-dtype", choices=("model", "fp8"), default="model",
                   help="the long-range history in the model's dtype or in fp8 (SegmentConfig.history_dtype); "
                        "fp8 results go to their own file (bench_generate-fp8-history-...)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args(argv)
    if args.new_tokens <= args.boundary:
        p.error(f"--new-tokens must exceed --boundary ({args.boundary}): the decode must cross a segment end")
    if args.tiny:
        args.segment_len = min(args.segment_len, 64)
        args.prompt_lens = [min(n, 4 * args.segment_len) for n in args.prompt_lens]
    return args


def build_model(args, device) -> transformers.PreTrainedModel:
    if getattr(args, "model", None):
        from segcompile.pretrained import load_model

        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        return load_model(args.model, dtype=dtype).to(device)
    shape = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                 num_key_value_heads=8, num_hidden_layers=args.layers)
    if args.tiny:
        shape = dict(vocab_size=1024, hidden_size=256, intermediate_size=512, num_attention_heads=8,
                     num_key_value_heads=4, num_hidden_layers=2)
    config = transformers.LlamaConfig(**shape, max_position_embeddings=max(args.prompt_lens) + args.new_tokens + 64,
                                      rope_theta=500000.0, attn_implementation="sdpa")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)
    with device:
        model = transformers.LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    return model.eval()


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def free(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---- segcompile ---------------------------------------------------------------------------------
def batched(state: sc.SegmentState, batch: int, total: int | None) -> sc.SegmentState:
    """``state`` repeated ``batch`` times, as fresh tensors with the history reserved for ``total``
    positions (the eager path decodes into them), or, for ``total=None``, as views that take no
    memory (the CUDA-graph paths copy the state into buffers of their own: at batch 32 after 32K a
    repeated copy of the state, 47 GiB, beside those buffers ran the H200 out of memory)."""
    def batch_of(t: torch.Tensor) -> torch.Tensor:
        if isinstance(t, QuantizedHistory):  # values and scales alike
            return QuantizedHistory.of(batch_of(t.values()), batch_of(t.scales), t.geometry)
        return t.repeat(batch, *[1] * (t.dim() - 1)) if total is not None else t.expand(batch, *[-1] * (t.dim() - 1))

    layers = tuple(
        replace(layer, **{name: batch_of(getattr(layer, name)) for name in
                          ("sink_k", "sink_v", "hist_k", "hist_v", "tail_k", "tail_v", "current_k", "current_v")},
                hist_store_k=None, hist_store_v=None)
        for layer in state.layers
    )
    repeated = sc.SegmentState(state.position, layers, state.logits.repeat(batch, 1))
    return repeated if total is None else reserve_history(repeated, total)


def seg_run(seg, state, steps: int, teacher=None, keep_logits=False, steady_from: int | None = None) -> dict:
    """Decode ``steps`` tokens from ``state``: greedy, or ``teacher [B, steps]``'s tokens. Timed
    from the end of the first token (kernels compiled, state loaded) to the last; with
    ``steady_from``, also from the end of that token on (after the segment end: tokens that move
    no state, what almost every token of a long generation is)."""
    device = state.logits.device
    token = state.logits.argmax(-1, keepdim=True)
    tokens, logits, times = [], [], []
    sync(device)
    start = time.perf_counter()
    for i in range(steps):
        if teacher is not None:
            token = teacher[:, i : i + 1]
        tokens.append(token)
        step_logits, state = seg.decode(state, token, check_ids=False)
        if keep_logits:
            logits.append(step_logits[:, -1])
        token = step_logits[:, -1].argmax(-1, keepdim=True)
        if i == 0 or i == steady_from:
            sync(device)
            times.append(time.perf_counter())
    sync(device)
    end = time.perf_counter()
    del state
    out = dict(tokens=torch.cat(tokens, dim=1), logits=logits, first_s=times[0] - start,
               ms_per_token=(end - times[0]) * 1e3 / max(steps - 1, 1), total_s=end - start)
    if steady_from:
        out["steady_ms_per_token"] = (end - times[-1]) * 1e3 / (steps - 1 - steady_from)
    return out


def relative_error(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    """The worst token's ``max |got - want| / max |want|``; inf where either has a non-finite logit
    (a NaN must not read as agreement)."""
    if not got or len(got) != len(want):
        raise ValueError(f"{len(got)} tokens' logits to compare with {len(want)}")
    worst = 0.0
    for g, w in zip(got, want):
        g, w = g.double(), w.double()
        if not (torch.isfinite(g).all() and torch.isfinite(w).all()):
            return float("inf")
        worst = max(worst, ((g - w).abs().max() / w.abs().max().clamp_min(1e-300)).item())
    return worst


def ulps_at_largest(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    """The worst token's ``max |got - want|`` in units in the last place of ``got``'s dtype at
    that token's largest ``|want|``: what a relative error means for logits stored in 16 bits
    (one bf16 unit is 0.4-0.8% of the value it sits at)."""
    worst = 0.0
    for g, w in zip(got, want):
        top = w.double().abs().max().clamp_min(1e-300)
        unit = torch.finfo(g.dtype).eps * 2.0 ** torch.floor(torch.log2(top))
        worst = max(worst, ((g.double() - w.double()).abs().max() / unit).item())
    return worst


def same_greedy_tokens(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    """The fraction of (token, sequence) pairs whose argmax agrees: whether greedy decoding would
    pick the same tokens."""
    same = [(g.argmax(-1) == w.argmax(-1)).double().mean().item() for g, w in zip(got, want)]
    return sum(same) / len(same)


def agreement(got: list[torch.Tensor], want: list[torch.Tensor]) -> dict:
    """The measures of ``got``'s logits against ``want``'s that a result row records."""
    return dict(max_rel_error=relative_error(got, want), ulps_at_largest=ulps_at_largest(got, want),
                same_greedy_tokens=same_greedy_tokens(got, want))


def segcompile_cases(args, seg, model, prompt_len, device) -> tuple[list[dict], list[dict]]:
    """Rows of the segcompile paths at every batch size, and the CUDA-graph accuracy rows."""
    rows, accuracy = [], []
    n = prompt_len - args.boundary
    total = n + args.new_tokens + args.segment_len
    ids = torch.randint(0, model.config.vocab_size, (1, n), device=device)
    sync(device)
    start = time.perf_counter()
    prompt_state = seg.prefill(ids)
    sync(device)
    prefill_s = time.perf_counter() - start
    finite = bool(torch.isfinite(prompt_state.logits).all())
    print(f"segcompile prefill of {n} tokens: {prefill_s:.1f} s; last logits finite: {finite}", flush=True)
    kept = {}  # path: its batch-1 logits, for the fp32 reference
    for batch in args.batches:
        references = {}  # REFERENCE_PATHS that ran: their batch run
        for path in [p for p in args.paths if p.startswith("seg-")]:
            row = dict(prompt_len=prompt_len, prompt_tokens=n, batch=batch, path=path, prefill_s=prefill_s,
                       prefill_logits_finite=finite)
            try:
                if path != "seg-eager":
                    seg.enable_cuda_graphs(compile=path == "seg-compiled-graph", capture=False if path == "seg-static" else None,
                                           max_context=total)
                else:
                    seg.disable_cuda_graphs()
                # the same tokens from the same state first: every kernel compile and graph capture on the way
                reserve = total if path == "seg-eager" else None
                warm = seg_run(seg, batched(prompt_state, batch, reserve), args.new_tokens)
                row.update(first_s=warm["first_s"], warmup_s=warm["total_s"])
                del warm
                eager = references.get("seg-eager")
                teacher = eager["tokens"] if eager is not None else None
                run = seg_run(seg, batched(prompt_state, batch, reserve), args.new_tokens, teacher=teacher,
                              keep_logits=path in REFERENCE_PATHS or bool(references), steady_from=args.boundary)
                row.update(ms_per_token=run["ms_per_token"], tokens_per_s=batch * 1e3 / run["ms_per_token"],
                           steady_ms_per_token=run["steady_ms_per_token"], decode_path=seg.last_decode_path)
                for against, reference in references.items():
                    measures = agreement(run["logits"], reference["logits"])
                    if against == "seg-eager":
                        row["max_rel_error"] = measures["max_rel_error"]
                    accuracy.append(dict(prompt_len=prompt_len, batch=batch, path=path, against=against,
                                         tokens=args.new_tokens, segment_end_after=args.boundary, **measures))
                if path in REFERENCE_PATHS:
                    references[path] = run
                if args.fp32_reference and batch == 1:
                    kept[path] = run["logits"]
                del run
            except torch.OutOfMemoryError:
                row["oom"] = True
            seg.disable_cuda_graphs()  # frees the static buffers and graphs
            free(device)
            rows.append(row)
            print({k: v for k, v in row.items()}, flush=True)
        eager = references.get("seg-eager")
        if eager is not None and batch == 1 and args.fp32_reference:
            reference = fp32_reference(seg.cfg, model, ids, eager["tokens"], total)
            for path, logits in kept.items():
                measures = agreement(logits, reference)
                print(f"{path} against the fp32 model: {measures['max_rel_error']:.2e}", flush=True)
                accuracy.append(dict(prompt_len=prompt_len, batch=batch, path=path, against="float32 model",
                                     tokens=args.new_tokens, segment_end_after=args.boundary, **measures))
        del eager, references
        free(device)
    del prompt_state
    free(device)
    return rows, accuracy


def fp32_reference(cfg: sc.SegmentConfig, model, ids, tokens, total) -> list[torch.Tensor]:
    """The logits of ``tokens`` after ``ids`` from a float32 copy of ``model`` transformed with
    ``cfg`` (eager decode): every bf16 path differs from these by its rounding alone."""
    model32 = copy.deepcopy(model)
    # tensor by tensor: transformers refuses .float() on a model loaded from a (dequantised) GGUF file
    for t in [*model32.parameters(), *model32.buffers()]:
        if t.is_floating_point():
            t.data = t.data.float()
    model32.config.torch_dtype = torch.float32
    seg32 = sc.transform(model32, cfg)
    state = reserve_history(seg32.prefill(ids), total)
    logits = seg_run(seg32, state, tokens.shape[1], teacher=tokens, keep_logits=True)["logits"]
    del model32, seg32, state
    free(ids.device)
    return logits


# ---- transformers -------------------------------------------------------------------------------
def hf_prefill(model, ids, cache, chunk: int) -> torch.Tensor:
    """Fill ``cache`` with ``ids`` a chunk at a time (a whole 128K prompt at once would build a
    128K x 128K mask for the static cache); returns the last token's logits."""
    for start in range(0, ids.shape[1], chunk):
        end = min(start + chunk, ids.shape[1])
        position = torch.arange(start, end, device=ids.device)
        out = model(ids[:, start:end], **cache_args(model, cache, position), use_cache=True, logits_to_keep=1)
    return out.logits[:, -1]


def hf_decode_one(model, token, cache: dict):
    """One token through the model (what transformers' static-cache example compiles); ``cache``:
    ``cache_args``' keywords, made outside the compiled function."""
    return model(token, **cache, use_cache=True, return_dict=False)[0][:, -1]


def hf_case(args, model, prompt_len, batch, path, device) -> dict:
    n = prompt_len - args.boundary
    row = dict(prompt_len=prompt_len, prompt_tokens=n, batch=batch, path=path)
    warm = 3 if path == "hf-static-compile" else 1
    try:
        ids = torch.randint(0, model.config.vocab_size, (batch, n), device=device)
        if path == "hf-sdpa":
            cache = transformers.DynamicCache()
            step = lambda token, position: hf_decode_one(model, token, cache_args(model, cache, position))  # noqa: E731
        else:
            cache = transformers.StaticCache(config=model.config, max_cache_len=n + args.new_tokens + warm + 1)
            compiled = torch.compile(hf_decode_one, mode="reduce-overhead", fullgraph=True)
            step = lambda token, position: compiled(model, token, cache_args(model, cache, position))  # noqa: E731
        sync(device)
        start = time.perf_counter()
        logits = hf_prefill(model, ids, cache, args.segment_len)
        sync(device)
        row["prefill_s"] = time.perf_counter() - start
        position = torch.tensor([n], device=device)
        token = logits.argmax(-1, keepdim=True)
        start = time.perf_counter()
        for i in range(warm + args.new_tokens):
            if i == warm:
                sync(device)
                timed = time.perf_counter()
                row["warmup_s"] = timed - start
            token = step(token.clone(), position).argmax(-1, keepdim=True)
            position += 1
            if i == 0:
                sync(device)
                row["first_s"] = time.perf_counter() - start
        sync(device)
        ms = (time.perf_counter() - timed) * 1e3 / args.new_tokens
        row.update(ms_per_token=ms, tokens_per_s=batch * 1e3 / ms)
    except torch.OutOfMemoryError:
        row["oom"] = True
    cache = step = compiled = None  # noqa: F841
    free(device)
    print(row, flush=True)
    return row


# ---- report --------------------------------------------------------------------------------------
def report(args, rows, accuracy, meta, device):
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"\n{name}; {model_name(args)}, {meta['layers']} layers, {meta['dtype']}; "
          f"S=T={args.segment_len}, fraction({args.long_range}); {args.new_tokens} new tokens, greedy")
    print(f"{'prompt':>7} {'B':>3} {'path':18} {'ms/token':>9} {'steady':>7} {'tokens/s':>9} {'first s':>8} {'warm-up s':>10} "
          f"{'vs hf-sdpa':>10} {'max rel err':>11}")
    by = {(r["prompt_len"], r["batch"], r["path"]): r for r in rows}
    for r in rows:
        if r.get("oom"):
            print(f"{r['prompt_len']:7} {r['batch']:3} {r['path']:18} {'out of memory':>9}")
            continue
        base = by.get((r["prompt_len"], r["batch"], "hf-sdpa"))
        speedup = f"{base['ms_per_token'] / r['ms_per_token']:.2f}x" if base and not base.get("oom") else ""
        error = f"{r['max_rel_error']:.2e}" if "max_rel_error" in r else ""
        steady = f"{r['steady_ms_per_token']:7.2f}" if "steady_ms_per_token" in r else " " * 7
        print(f"{r['prompt_len']:7} {r['batch']:3} {r['path']:18} {r['ms_per_token']:9.2f} {steady} {r['tokens_per_s']:9.1f} "
              f"{r.get('first_s', float('nan')):8.2f} {r.get('warmup_s', float('nan')):10.2f} {speedup:>10} {error:>11}")
    if accuracy:
        print("\nlogits agreement across the segment end: the worst token's max |got - want| / max |want|, the same in"
              "\nunits in the last place at its largest logit, and the tokens whose greedy choice agrees:")
        for a in accuracy:
            extra = (f" {a['ulps_at_largest']:6.1f} ulp {a['same_greedy_tokens']:7.1%}"
                     if "ulps_at_largest" in a else "")
            print(f"{a['prompt_len']:7} {a['batch']:3} {a['path']:18} against {a['against']:15} {a['max_rel_error']:.2e}{extra}")
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = f"-{Path(args.model).stem}" if args.model else "-tiny" if args.tiny else ""
    suffix += "-fp8-history" if args.history_dtype == "fp8" else ""
    stem = args.out / f"bench_generate{suffix}-{name.replace(' ', '_')}"
    merged = merge(stem.with_suffix(".json"), meta, rows, accuracy)
    stem.with_suffix(".json").write_text(json.dumps(merged, indent=1))
    plot(merged["rows"], stem.with_suffix(".png"), name, f"{model_name(args)}, {meta['dtype']}")
    print(f"wrote {stem}.json/.png")


def merge(path: Path, meta: dict, rows: list[dict], accuracy: list[dict]) -> dict:
    """This run's rows over those of earlier runs in ``path`` (same prompt, batch and path: this
    run's win), so that runs of a subset each (a call's time limit) build one result file."""
    old = json.loads(path.read_text()) if path.exists() else {"runs": [], "rows": [], "accuracy": []}
    key = lambda r: (r["prompt_len"], r["batch"], r.get("path"), r.get("against"))  # noqa: E731
    rows_mine, accuracy_mine = {key(r) for r in rows}, {key(r) for r in accuracy}
    return dict(runs=[*old.get("runs", []), meta],
                rows=[r for r in old["rows"] if key(r) not in rows_mine] + rows,
                accuracy=[r for r in old["accuracy"] if key(r) not in accuracy_mine and r.get("path")] + accuracy)


def plot(rows: list[dict], path: Path, device: str, title: str) -> None:
    """ms per token at batch 1 and tokens/s at every batch, per path and prompt length."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    done = [r for r in rows if not r.get("oom")]
    prompts = sorted({r["prompt_len"] for r in done})
    batches = sorted({r["batch"] for r in done})
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        for i, name in enumerate(PATHS):
            points = {r["prompt_len"]: r for r in done if r["batch"] == batch and r["path"] == name}
            width = 0.8 / len(PATHS)
            xs = [j + width * (i - (len(PATHS) - 1) / 2) for j, n in enumerate(prompts) if n in points]
            ys = [points[n]["ms_per_token" if batch == 1 else "tokens_per_s"] for n in prompts if n in points]
            ax.bar(xs, ys, width=width, label=name)
        ax.set_xticks(range(len(prompts)), [f"{n // 1024}K" for n in prompts])
        ax.set(xlabel="prompt", ylabel="ms per token" if batch == 1 else "tokens/s", title=f"batch {batch}")
        ax.grid(alpha=0.3, axis="y")
    axes[0][0].legend()
    fig.suptitle(f"generation after a long prompt, {title}, {device}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def model_name(args) -> str:
    return f"{args.model} (pretrained)" if args.model else "tiny shape" if args.tiny else "Llama-3-8B shape"


def main(argv=None):
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(args, device)
    cfg = sc.SegmentConfig(args.segment_len, long_range=sc.HeadPlan.fraction(args.long_range), tbptt_k=0,
                           history_dtype=torch.float8_e4m3fn if args.history_dtype == "fp8" else None)
    start = time.perf_counter()
    seg = sc.transform(model, cfg)
    transform_s = time.perf_counter() - start
    print(seg, f"\ntransform: {transform_s:.1f} s", flush=True)
    rows, accuracy = [], []
    hf_paths = [p for p in args.paths if p.startswith("hf-") and (device.type == "cuda" or p == "hf-sdpa")]
    with torch.no_grad():
        for prompt_len in args.prompt_lens:
            seg_rows, seg_accuracy = segcompile_cases(args, seg, model, prompt_len, device)
            rows += seg_rows
            accuracy += seg_accuracy
            for batch in args.batches:
                rows += [hf_case(args, model, prompt_len, batch, path, device) for path in hf_paths]
    meta = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", torch=torch.__version__,
                transformers=transformers.__version__, tiny=args.tiny,
                command=recorded_command("bench/bench_generate.py", sys.argv[1:], {"--out"}),
                model=model_name(args),
                layers=model.config.num_hidden_layers, dtype=str(model.dtype).removeprefix("torch."),
                segment_len=args.segment_len, long_range=args.long_range, new_tokens=args.new_tokens,
                boundary=args.boundary, history_dtype=args.history_dtype, transform_seconds=transform_s,
                weights_gib=sum(p.numel() * p.element_size() for p in model.parameters()) / GiB)
    report(args, rows, accuracy, meta, device)


if __name__ == "__main__":
    main()
