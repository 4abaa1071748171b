"""``segcompile viz``: compile a model with the pass dumps on and write the visualiser's pages.

Stages: load the model (a local Hugging Face folder, or the built-in tiny Llama) -> capture
(torch.export; the slow step, about 0.3-0.8 s per layer on a CPU) -> ``transform`` with
``dump_dir=OUT``, which runs the passes and writes, per pass, the text dump, the HTML page and
the DOT graph, then ``OUT/index.html``. Prints a summary and the path of ``index.html``.

OUT is checked before the model is loaded: it must be in a place that can be written, and
missing, empty or an earlier output, which is replaced as a whole. The files are written to a
temporary folder beside it, renamed to OUT when the last page is written: a plan the model
refuses, or an interruption, leaves nothing.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from . import (
    HelpFormatter,
    UsageError,
    add_segment_flags,
    check_out_dir,
    check_plan_file,
    make_console,
    segment_config,
    segments_row,
    stage,
)
from .models import add_model_args, check_model_args, load_model, model_label
from .. import ir
from ..passes.manager import check_dump_dir

name = "viz"
help = "write pages that show what every compiler pass did to the model's graph"


def subparser_init(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        name,
        help=help,
        description=(
            "Compile a causal LM (a local Hugging Face model folder, a .gguf file, smollm2, or the built-in tiny Llama) and write "
            "pages that show its graph after every pass: what each pass added, removed or rewired, the "
            "attention sites with their head plan, and the carried state of the segment-step graph. "
            "Open OUT/index.html in any browser; the pages need no network."
        ),
        formatter_class=HelpFormatter,
    )
    add_model_args(parser)
    add_segment_flags(parser, segment_len=2048, sinks=0)
    parser.add_argument("--out", default="viz",
                        help="output folder: created, or replaced if it holds an earlier output")
    return parser


def validate(args: argparse.Namespace) -> None:
    check_model_args(args)
    check_plan_file(args)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {args.out} exists and is not a folder", hint="name a folder (it is created if missing)")
    check_out_dir(args.out, check_dump_dir)  # before the model is loaded and captured


def cmd(args: argparse.Namespace) -> int:
    import segcompile as sc

    cfg = segment_config(args)  # bad S/T/G or plan: ConfigError/PlanError (exit 2) before any work
    console = make_console(args)
    out = Path(args.out)
    seconds: dict[str, float] = {}
    stages = ["load model", "capture", "passes + pages"]

    with stage(console, stages, 0, seconds, model_label(args)):
        model = load_model(args)
    with stage(console, stages, 1, seconds, f"capture {type(model).__name__} (torch.export)"):
        graph = sc.capture(model)
    with stage(console, stages, 2, seconds, f"passes, pages -> {out}"):
        seg = sc.transform(graph, cfg, dump_dir=out)

    _summary(console, seg, cfg, seconds, out)
    return 0


def _summary(console, seg, cfg, seconds: dict[str, float], out: Path) -> None:
    from rich import box
    from rich.table import Table

    step = seg.step_graph
    kinds = {"segment_attention": 0, "state_in": 0, "state_out": 0}
    state_outputs = len(step.graph.output_node().args[0]) - step.meta[ir.NUM_MODEL_OUTPUTS]
    for node in step.graph.nodes:
        if node.meta.get(ir.STATE):
            kinds["state_in"] += 1
        if ir.ATTENTION in node.meta and "segment_attention" in str(node.target):
            kinds["segment_attention"] += 1
    passes = sum(seg.pass_timings.values())
    dumps = step.meta.get(ir.DUMP_SECONDS, 0.0)
    pages = sorted(out.glob("*.html"))
    largest = max(pages, key=lambda p: p.stat().st_size)

    table = Table(title="segcompile viz", show_header=False, box=box.SIMPLE_HEAD, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("model", f"{seg.capture_info.model_class}, {len(seg.sites)} attention layers")
    table.add_row("segments", segments_row(cfg))
    table.add_row("passes", " -> ".join(["capture", *seg.pass_timings]))
    table.add_row(
        "step graph",
        f"{len(step.graph.nodes)} nodes, {kinds['segment_attention']} segment_attention, "
        f"carried state {kinds['state_in']} in / {state_outputs} out",
    )
    table.add_row("pages", f"{len(pages)} pages, largest {largest.name} {largest.stat().st_size / 1e6:.2f} MB")
    table.add_row("time", f"load {seconds['load model']:.2f} s, capture {seconds['capture']:.2f} s, "
                  f"passes {passes:.2f} s, dumps and pages {dumps:.2f} s")
    console.print()
    console.print(table)
    console.print(f"open {out / 'index.html'}", markup=False, soft_wrap=True)
