"""``segcompile eval``: quality under segmented execution against full attention.

``--task ppl``: perplexity on held-out real text (the Python standard library's sources and
Debian's licence texts, one document per sequence; ``segcompile.quality.texts``), overall and by
distance band (``segment 0``, ``1 back``, ``2+ back``). ``--task passkey``: passkey retrieval by
length and depth, scored by teacher forcing (and with ``--generate`` by greedy generation).

Every ``--long-range`` PLAN is one program: ``full`` (the model itself), ``none``, ``all``,
``fraction(X)`` (or a bare X), ``layers(0,1,5-9)``, or a head-plan JSON file. With
``--history-dtype model fp8`` every segmented plan runs twice, its long-range history stored in
the model's dtype and in fp8 (``SegmentConfig.history_dtype``; the fp8 row's label ends in
``fp8``). The model is captured once and transformed once per program. Stages: load the model and its tokenizer
(``segcompile.pretrained``, through ``cli/models.py``; without MODEL the built-in tiny Llama,
whose tokens are UTF-8 bytes) -> the texts or prompts -> capture -> per plan: transform, then
every length, under a progress bar. Prints one table, writes a JSON result file (the texts
used, the model, the config, the device and the command) and, with ``--plot`` and matplotlib
installed, a plot.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import time
from dataclasses import dataclass
from pathlib import Path

from ..files import atomic_write_text
from . import (
    HISTORY_DTYPE_HELP,
    HISTORY_DTYPE_WORDS,
    HelpFormatter,
    ProgressBar,
    UsageError,
    add_segment_flags,
    check_out_file,
    fraction_or_plan,
    history_dtype_of,
    make_console,
    positive_int,
    stage,
    torch_device,
)
from .models import DEFAULT_TINY_LAYERS, add_model_args, check_model_args, load_model, load_tokenizer, model_label

name = "eval"
help = "measure perplexity by distance band or passkey retrieval, segmented against full attention"

TASKS = ("ppl", "passkey")
DEFAULT_PLANS = ["full", "none", "fraction(0.25)", "all"]
PLAN_HINT = "a PLAN is full, none, all, fraction(X) or X in [0, 1], layers(0,1,5-9), or a head-plan JSON file"


@dataclass(frozen=True)
class PlanSpec:
    """One ``--long-range`` value: its label in the table, and what it means."""

    label: str
    kind: str  # "full", "none", "all", "fraction", "layers" or "file"
    fraction: float | None = None
    layers: tuple[int, ...] = ()
    path: str | None = None


def plan_spec(text: str) -> PlanSpec:
    """argparse type of a PLAN (a bad one is an argparse error: exit 2 with the usage line)."""
    word = text.strip().lower()
    if word in ("full", "none", "all"):
        return PlanSpec(word, word)
    call = re.fullmatch(r"(fraction|layers)\((.*)\)", word)
    if call and call.group(1) == "fraction":
        value = fraction_or_plan(call.group(2).strip())
        if not isinstance(value, float):
            raise argparse.ArgumentTypeError(f"fraction(X) needs a number X in [0, 1], got {text!r}")
        return PlanSpec(f"fraction({value:g})", "fraction", fraction=value)
    if call:
        return PlanSpec(f"layers({call.group(2).replace(' ', '')})", "layers", layers=_layer_list(call.group(2), text))
    value = fraction_or_plan(text)  # a bare fraction, as --long-range takes elsewhere, or a plan file
    if isinstance(value, float):
        return PlanSpec(f"fraction({value:g})", "fraction", fraction=value)
    return PlanSpec(Path(text).stem, "file", path=text)


def _layer_list(body: str, text: str) -> tuple[int, ...]:
    layers: set[int] = set()
    for part in filter(None, (p.strip() for p in body.split(","))):
        bounds = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if bounds is None or (bounds.group(2) is not None and int(bounds.group(2)) < int(bounds.group(1))):
            raise argparse.ArgumentTypeError(
                f"layers(...) takes layer indices and ranges such as 0,1,5-9, got {text!r}")
        low, high = int(bounds.group(1)), int(bounds.group(2) or bounds.group(1))
        layers.update(range(low, high + 1))
    if not layers:
        raise argparse.ArgumentTypeError(f"layers(...) names no layer: {text!r}")
    return tuple(sorted(layers))


def subparser_init(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        name,
        help=help,
        description=(
            "Measure the quality of a causal LM under segmented execution, for several head plans, against "
            "the model itself (full attention): perplexity on held-out real text by distance band (--task ppl), "
            "or passkey retrieval by context length and depth (--task passkey). Writes a JSON result file "
            "naming the texts, model, config, device and command, and optionally a plot."
        ),
        formatter_class=HelpFormatter,
    )
    model = add_model_args(parser)  # MODEL (a folder, a .gguf file, smollm2; none: the tiny Llama) and --layers
    model.add_argument("--device", default=None, help="torch device to run on (default: cuda if available, else cpu)")
    parser.add_argument("--task", choices=TASKS, required=True, help="perplexity by band, or passkey retrieval")
    parser.add_argument("--lengths", type=positive_int, nargs="+", default=[2048, 4096, 8192], metavar="N",
                        help="tokens per sequence (ppl) or per prompt (passkey)")
    add_segment_flags(parser, segment_len=512, sinks=4, long_range=False, history_dtype=False)
    parser.add_argument("--long-range", type=plan_spec, nargs="+", default=None,
                        metavar="PLAN", help=f"the programs to compare, one table row each; {PLAN_HINT} "
                        f"(default: {' '.join(DEFAULT_PLANS)})")
    parser.add_argument("--history-dtype", choices=HISTORY_DTYPE_WORDS, nargs="+", default=["model"],
                        help=f"{HISTORY_DTYPE_HELP}; several: every segmented plan runs once per dtype")
    ppl = parser.add_argument_group("ppl")
    ppl.add_argument("--sequences", type=positive_int, default=None,
                     help="held-out documents per length, one sequence each (default: 4)")
    ppl.add_argument("--split", choices=["heldout", "calibration"], default=None,
                     help="which documents (default: heldout; calibration is what head selection may see)")
    passkey = parser.add_argument_group("passkey")
    passkey.add_argument("--trials", type=positive_int, default=None,
                         help="prompts per length, keys at depths evenly over 10-90%% (default: 8)")
    passkey.add_argument("--generate", action="store_true",
                         help="also score by greedy generation (the first number generated must be the key)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the pass keys")
    parser.add_argument("--out", default=None, help="the JSON result file (default: eval-TASK.json)")
    parser.add_argument("--plot", default=None, metavar="FILE.png", help="also draw the results (needs matplotlib)")
    return parser


def validate(args: argparse.Namespace) -> None:
    _check_task_flags(args)
    check_model_args(args)
    args.lengths = sorted(set(args.lengths))  # the table's columns and the result's keys, in order
    args.long_range = args.long_range or [plan_spec(p) for p in DEFAULT_PLANS]
    args.history_dtype = list(dict.fromkeys(args.history_dtype))  # once each, in the order given
    _check_plans(args.long_range)
    if args.task == "ppl" and min(args.lengths) < 2:
        raise UsageError("--lengths: a perplexity sequence needs at least 2 tokens", hint="use lengths such as 2048")
    args.out = args.out or f"eval-{args.task}.json"
    for flag, path in (("--out", args.out), ("--plot", args.plot)):
        if path is not None:
            if Path(path).is_dir():
                raise UsageError(f"{flag} {path} is a folder", hint="name the file to write")
            check_out_file(path, flag)  # the run takes minutes on a real model: a place it cannot write fails now


def _check_task_flags(args: argparse.Namespace) -> None:
    only = {"ppl": ("sequences", "split"), "passkey": ("trials",)}
    for task, flags in only.items():
        given = [f"--{f}" for f in flags if getattr(args, f) is not None]
        if given and args.task != task:
            raise UsageError(f"{', '.join(given)}: for --task {task} only", hint=f"leave it out, or use --task {task}")
    if args.generate and args.task != "passkey":
        raise UsageError("--generate: for --task passkey only", hint="leave it out, or use --task passkey")


def _check_plans(plans: list[PlanSpec]) -> None:
    labels = [p.label for p in plans]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise UsageError(f"--long-range names {', '.join(repeated)} more than once", hint="give each plan once")
    for plan in plans:
        if plan.kind == "file" and not Path(plan.path).is_file():
            raise UsageError(f"--long-range {plan.path}: not a plan name and no such plan file", hint=PLAN_HINT)


def cmd(args: argparse.Namespace) -> int:
    import segcompile as sc

    from ..quality import plot

    configs = _configs(args)  # bad S/T/G or plan file: exit 2 now
    console = make_console(args)
    device = torch_device(args.device)
    if args.plot is not None and not plot.available():
        console.print(f"--plot {args.plot}: matplotlib is not installed (pip install matplotlib), so no plot "
                      "will be drawn", markup=False, soft_wrap=True)
    stages = ["load model", "data", "capture"]
    seconds: dict[str, float] = {}
    with stage(console, stages, 0, seconds, model_label(args) + (" and its tokenizer" if args.model_dir else "")):
        model, tokenizer = _load(args)
        model = model.to(device).eval()
    with stage(console, stages, 1, seconds, _data_label(args)):
        data = _data(args, tokenizer)
    with stage(console, stages, 2, seconds, f"capture {type(model).__name__} (torch.export)"):
        graph = sc.capture(model) if any(cfg is not None for cfg in configs.values()) else None

    results, timings, programs = _run_plans(args, configs, model, graph, data, tokenizer, console)
    _print_table(console, args, results, timings, data)
    document = _result_document(args, configs, programs, model, tokenizer, device, data, results,
                                {"stages": seconds, "plans": timings})
    atomic_write_text(args.out, json.dumps(document, indent=2, allow_nan=False) + "\n")
    console.print(f"wrote {args.out}", markup=False, soft_wrap=True)
    if args.plot is not None and plot.available():
        title = f"{_model_name(args)}: {args.task}, S={args.segment_len} T={_tail_len(args)} G={args.sinks}"
        if args.task == "ppl":
            plot.plot_perplexity(args.plot, results, title)
        else:
            plot.plot_passkey(args.plot, results, title)
        console.print(f"wrote {args.plot}", markup=False, soft_wrap=True)
    return 0


# ---- plans, model, data -------------------------------------------------------------------------
def _configs(args: argparse.Namespace) -> dict:
    """Every program by its row label: each plan once per ``--history-dtype`` (``full``, the model
    itself, has no segment history: once)."""
    configs = {}
    for plan in args.long_range:
        for word in args.history_dtype if plan.kind != "full" else ["model"]:
            configs[program_label(plan.label, word)] = _config(args, plan, word)
    return configs


def program_label(plan_label: str, history_dtype: str) -> str:
    """A table row's label: the plan's, with `` fp8`` when its history is stored in fp8."""
    return plan_label if history_dtype == "model" else f"{plan_label} {history_dtype}"


def _config(args: argparse.Namespace, plan: PlanSpec, history_dtype: str = "model"):
    """The SegmentConfig of a plan (None for ``full``: the model itself runs)."""
    import segcompile as sc

    if plan.kind == "full":
        # the segment sizes are still checked, since the bands of the model use S
        sc.SegmentConfig(segment_len=args.segment_len, tail_len=args.tail_len, sink_tokens=args.sinks)
        return None
    head_plan = {
        "none": sc.HeadPlan.none, "all": sc.HeadPlan.all,
        "fraction": lambda: sc.HeadPlan.fraction(plan.fraction),
        "layers": lambda: sc.HeadPlan.layers(plan.layers),
        "file": lambda: sc.HeadPlan.load(plan.path),
    }[plan.kind]()
    return sc.SegmentConfig(segment_len=args.segment_len, tail_len=args.tail_len, sink_tokens=args.sinks,
                            long_range=head_plan, history_dtype=history_dtype_of(history_dtype))


def _tail_len(args: argparse.Namespace) -> int:
    return args.segment_len if args.tail_len is None else args.tail_len



def _model_name(args: argparse.Namespace) -> str:
    return args.model_dir if args.model_dir is not None else f"tiny Llama ({args.layers or DEFAULT_TINY_LAYERS} layers)"


def _load(args: argparse.Namespace):
    """``(model, tokenizer)``: MODEL and its tokenizer (``segcompile.pretrained``, through the
    commands' model loader), or the tiny Llama, whose tokens are UTF-8 bytes."""
    model = load_model(args)
    if args.model_dir is None:
        from ..quality import ByteTokenizer

        return model, ByteTokenizer()
    tokenizer = load_tokenizer(args)
    if tokenizer is None:
        raise UsageError(f"{args.model_dir} has no tokenizer, and eval turns text into tokens",
                         hint="save the tokenizer beside the model with tokenizer.save_pretrained(folder)")
    return model, tokenizer


def _data_label(args: argparse.Namespace) -> str:
    lengths = ", ".join(map(str, args.lengths))
    if args.task == "ppl":
        return f"tokenize {args.split or 'heldout'} texts ({args.sequences or 4} per length: {lengths})"
    return f"build passkey prompts ({args.trials or 8} per length: {lengths})"


def _data(args: argparse.Namespace, tokenizer) -> dict:
    """Per length: the perplexity sequences, or the passkey prompts."""
    from ..quality import EvalError, passkey_prompts, texts, token_sequences

    if args.task == "passkey":
        prompts = passkey_prompts(tokenizer, args.lengths, args.trials or 8, args.seed)
        return {n: [p for p in prompts if p.length == n] for n in args.lengths}
    data = {}
    for n in args.lengths:
        data[n] = token_sequences(tokenizer, n, args.sequences or 4, args.split or "heldout")
        if not data[n]:
            found = len(texts.documents(args.split or "heldout"))
            raise EvalError(f"none of the {found} {args.split or 'heldout'} documents has {n} tokens; "
                            "use shorter --lengths")
    return data


# ---- the runs -----------------------------------------------------------------------------------
def _run_plans(args, configs, model, graph, data, tokenizer, console):
    """Every plan over every length: ``results[label][length]``, ``timings[label]`` (seconds) and
    ``programs[label]`` (the SegmentedModel, or None for the model itself)."""
    import segcompile as sc

    from .. import quality

    results: dict[str, dict] = {}
    timings: dict[str, dict] = {}
    programs: dict[str, object] = {}
    total = len(configs) * sum(len(items) for items in data.values())
    with ProgressBar(console, total=total) as progress:
        for label, cfg in configs.items():
            start = time.perf_counter()
            program = model if cfg is None else sc.transform(graph, cfg)
            programs[label] = None if cfg is None else program
            timings[label] = {"transform": time.perf_counter() - start}
            results[label] = {}
            for n, items in data.items():
                progress.describe(f"{label}, {n} tokens")
                start = time.perf_counter()
                results[label][n] = _measure(args, program, items, tokenizer, progress.step)
                timings[label][str(n)] = time.perf_counter() - start
            if args.task == "passkey":  # one result over every length: accuracy by length and by depth
                results[label] = quality.PasskeyResult([t for r in results[label].values() for t in r.trials])
            console.print(f"  {label:<24} {sum(timings[label].values()):8.2f} s", markup=False, soft_wrap=True)
    return results, timings, programs


def _measure(args, program, items, tokenizer, progress):
    """One program over one length's sequences or prompts."""
    from .. import quality

    if args.task == "ppl":
        return quality.measure_perplexity(program, items, args.segment_len, progress)
    return quality.measure_passkey(program, items, tokenizer, args.generate, progress)


# ---- output -------------------------------------------------------------------------------------
def _print_table(console, args, results, timings, data) -> None:
    from rich import box
    from rich.table import Table

    table = Table(box=box.SIMPLE_HEAD, title_justify="left",
                  title=f"{args.task} of {_model_name(args)}: S={args.segment_len} T={_tail_len(args)} G={args.sinks}")
    table.add_column("plan")
    if args.task == "ppl":
        from ..quality import BANDS

        for column in ("N", "overall", *BANDS, "seconds"):
            table.add_column(column, justify="right", no_wrap=True)
        for label, by_length in results.items():
            for n, r in by_length.items():
                table.add_row(label, str(n), _perplexity_cell(r.overall),
                              *(_perplexity_cell(r.bands[b]) for b in BANDS), f"{timings[label][str(n)]:.1f}")
    else:
        depths = list(next(iter(results.values())).by_depth())
        for column in (*(f"{n}" for n in args.lengths), *(f"depth {d}" for d in depths), "seconds"):
            table.add_column(column, justify="right", no_wrap=True)
        for label, r in results.items():
            cells = [_accuracy_cell(forced, greedy, args.generate)
                     for group in ("by_length", "by_depth")
                     for forced, greedy in zip(getattr(r, group)().values(), getattr(r, group)(generated=True).values())]
            table.add_row(label, *cells, f"{sum(v for k, v in timings[label].items() if k != 'transform'):.1f}")
    console.print()
    console.print(table)
    if args.task == "ppl":
        from ..quality import band_token_counts

        for n, sequences in data.items():
            counts = band_token_counts(n, args.segment_len)
            console.print(f"{n} tokens: {len(sequences)} sequences x ("
                          + ", ".join(f"{b} {c}" for b, c in counts.items()) + ") scored tokens",
                          markup=False, soft_wrap=True)
    else:
        console.print("passkey cells: correct/trials by teacher forcing"
                      + (" (greedy generation in brackets)" if args.generate else ""), markup=False, soft_wrap=True)


def _perplexity_cell(score) -> str:
    return f"{score.perplexity:.3f}" if score.tokens else "-"  # a band the length does not reach


def _accuracy_cell(forced: dict, greedy: dict, generated: bool) -> str:
    """``correct/trials`` by teacher forcing, then by greedy generation in brackets when it ran."""
    cell = f"{forced['correct']}/{forced['trials']}"
    return cell + f" ({greedy['correct']}/{greedy['trials']})" if generated else cell


def _result_document(args, configs, programs, model, tokenizer, device, data, results, seconds) -> dict:
    from ..quality import report

    source = args.model_dir if args.model_dir is not None else "built-in tiny Llama (random init, seed 0)"
    texts = (report.describe_perplexity_texts(data, args.split or "heldout") if args.task == "ppl"
             else report.describe_passkey_texts())
    return {
        "format": report.RESULT_FORMAT,
        "version": report.RESULT_VERSION,
        "task": args.task,
        "command": command_line(args),
        "model": report.describe_model(model, tokenizer, source),
        "config": {"segment_len": args.segment_len, "tail_len": _tail_len(args), "sink_tokens": args.sinks,
                   "lengths": args.lengths, "seed": args.seed, "history_dtypes": args.history_dtype},
        "plans": {label: report.describe_program(programs[label]) for label in configs},
        "device": report.describe_device(device),
        "texts": texts,
        "results": {label: ({str(n): r.to_json() for n, r in by_length.items()} if args.task == "ppl"
                            else by_length.to_json()) for label, by_length in results.items()},
        "seconds": seconds,
    }


def command_line(args: argparse.Namespace) -> str:
    """The command that repeats this run, every value spelled out (defaults included)."""
    words = ["segcompile", "eval", *([args.model_dir] if args.model_dir is not None else []), "--task", args.task]
    if args.layers is not None:
        words += ["--layers", str(args.layers)]
    words += ["--lengths", *map(str, args.lengths), "--segment-len", str(args.segment_len),
              "--tail-len", str(_tail_len(args)), "--sinks", str(args.sinks),
              "--long-range", *(p.path if p.kind == "file" else p.label for p in args.long_range),
              "--history-dtype", *args.history_dtype]
    if args.task == "ppl":
        words += ["--sequences", str(args.sequences or 4), "--split", args.split or "heldout"]
    else:
        words += ["--trials", str(args.trials or 8), *(["--generate"] if args.generate else [])]
    words += ["--seed", str(args.seed), "--out", args.out, *(["--plot", args.plot] if args.plot else [])]
    if args.device is not None:
        words += ["--device", args.device]
    return shlex.join(words)
