"""``segcompile export``: compile a model and write its segment-step program as an ONNX file or a TensorRT engine.

The folder of ``--out`` is checked writable first (a file created and removed there), so that a
place the export cannot write fails at once, not after the work. Stages: load the model (a local
Hugging Face folder, or the built-in tiny Llama) -> capture ->
passes -> ONNX export (``segcompile.deploy.onnx_export``: fixed-size local state, dynamic history,
checked with onnx.checker and shape inference, written atomically) -> with ``--format tensorrt``,
an engine built from that file (``segcompile.deploy.tensorrt``; the ONNX file is a temporary
one), written with its metadata file beside it. Prints a summary: file, size, opset, inputs and
outputs (and the engine's precision and profile). Without TensorRT, ``--format tensorrt`` exits 2
with the install hint.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..deploy.format import INPUT_IDS, POSITION_OFFSET
from ..deploy.tensorrt_common import missing_tensorrt
from . import (
    HelpFormatter,
    UsageError,
    add_segment_flags,
    check_out_file,
    check_plan_file,
    make_console,
    positive_int,
    quiet,
    segment_config,
    segments_row,
    stage,
)
from .models import add_model_args, check_model_args, load_model, model_label

name = "export"
help = "write the compiled segment-step program as an ONNX file or a TensorRT engine"

TENSORRT_HINT = (
    'TensorRT engines need `pip install "segcompile[tensorrt]"` and an NVIDIA GPU; until then export '
    "--format onnx, which TensorRT's ONNX parser reads"
)
TENSORRT_FLAGS = ("precision", "max_batch", "max_context")


def subparser_init(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        name,
        help=help,
        description=(
            "Compile a causal LM (a local Hugging Face model folder, a .gguf file, smollm2, or the built-in tiny Llama) into the "
            "segment loop and write the program that runs once per segment or decode step as one ONNX file: "
            "segment token ids, position offset and the carried state in; logits and the new state out. "
            "The state of local heads has a fixed size, so one file serves any context length. "
            "Run it with `segcompile run`. With --format tensorrt, build a TensorRT engine from that file "
            "(needs TensorRT and an NVIDIA GPU)."
        ),
        formatter_class=HelpFormatter,
    )
    add_model_args(parser)
    parser.add_argument("--format", choices=["onnx", "tensorrt"], default="onnx", help="what to write")
    add_segment_flags(parser, segment_len=2048, sinks=0)
    parser.add_argument("--logits", choices=["last", "all"], default="last",
                        help="logits of the step's last position only, or of every position")
    parser.add_argument("--out", default=None,
                        help="the file to write, replaced atomically (default: model.onnx, or model.engine)")
    group = parser.add_argument_group("TensorRT (--format tensorrt)")
    group.add_argument("--precision", choices=["fp32", "fp16", "bf16", "typed"], default=None,
                       help="fp32 (TF32 off; the default), fp16/bf16 (TensorRT may run layers in that type), "
                       "typed (every tensor keeps the exported model's dtype)")
    group.add_argument("--max-batch", type=positive_int, default=None,
                       help="largest batch the engine runs (default: 1)")
    group.add_argument("--max-context", type=positive_int, default=None,
                       help="longest context in tokens the engine runs; TensorRT sizes its memory for it "
                       "(default: 8 segments)")
    return parser


def validate(args: argparse.Namespace) -> None:
    given = [f"--{flag.replace('_', '-')}" for flag in TENSORRT_FLAGS if getattr(args, flag) is not None]
    if args.format == "onnx" and given:
        raise UsageError(f"{', '.join(given)}: for --format tensorrt only",
                         hint="add --format tensorrt, or leave them out")
    if args.format == "tensorrt":
        problem = missing_tensorrt()
        if problem:
            raise UsageError(f"--format tensorrt: TensorRT does not import here ({problem})", hint=TENSORRT_HINT)
    if args.out is None:
        args.out = "model.onnx" if args.format == "onnx" else "model.engine"
    if Path(args.out).is_dir():
        suffix = ".onnx" if args.format == "onnx" else ".engine"
        raise UsageError(f"--out {args.out} is a folder", hint=f"name the {suffix} file to write")
    check_model_args(args)
    check_plan_file(args)
    check_out_file(args.out)  # the export takes seconds to minutes: a place it cannot write fails now


def cmd(args: argparse.Namespace) -> int:
    import tempfile

    import segcompile as sc

    from ..deploy.onnx_export import export_onnx

    cfg = segment_config(args)
    console = make_console(args)
    engine = args.format == "tensorrt"
    stages = ["load model", "capture", "passes", "export"] + (["engine"] if engine else [])
    seconds: dict[str, float] = {}
    with stage(console, stages, 0, seconds, model_label(args)):
        model = load_model(args)
        experts = _exportable_experts(model)
    with stage(console, stages, 1, seconds, f"capture {type(model).__name__} (torch.export)"):
        graph = sc.capture(model)
    with stage(console, stages, 2, seconds, "passes"):
        seg = sc.transform(graph, cfg)
    with tempfile.TemporaryDirectory(prefix="segcompile-export-") as tmp:
        onnx_path = Path(tmp) / "step.onnx" if engine else Path(args.out)
        with stage(console, stages, 3, seconds, f"ONNX export, check -> {onnx_path.name if engine else args.out}"):
            summary = quiet(export_onnx, seg, onnx_path, logits=args.logits)
        built = _build_engine(console, stages, seconds, args, onnx_path) if engine else None
    _summary(console, summary, seg, cfg, seconds, built, experts)
    return 0


def _exportable_experts(model) -> str | None:
    """An MoE model's experts as batched products (transformers' ``batched_mm``) where they would
    run transformers' grouped_mm op, which torch.onnx cannot translate; the implementation it
    replaced, or None where nothing changed. The same products, in another kernel."""
    config = getattr(model, "config", None)
    impl = getattr(config, "_experts_implementation", None)
    if impl in (None, "eager", "batched_mm") or not hasattr(model, "set_experts_implementation"):
        return None
    model.set_experts_implementation("batched_mm")
    return impl


def _build_engine(console, stages, seconds, args, onnx_path: Path):
    from ..deploy.tensorrt import build_engine

    precision = args.precision or "fp32"
    with stage(console, stages, 4, seconds, f"TensorRT engine ({precision}) -> {args.out}"):
        return build_engine(onnx_path, args.out, precision=precision, max_batch=args.max_batch or 1,
                            max_context=args.max_context, verbose=getattr(args, "debug", False))


def _summary(console, summary, seg, cfg, seconds, engine=None, experts: str | None = None) -> None:
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    def shape(dims):
        return escape("[" + ", ".join(str(d) for d in dims) + "]")

    table = Table(title="segcompile export", show_header=False, box=box.SIMPLE_HEAD, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    if engine is None:
        table.add_row("file", str(summary.path))
        table.add_row("size", f"{summary.bytes / 1e6:.2f} MB")
    else:
        table.add_row("file", f"{engine.path} (TensorRT {engine.tensorrt_version}, {engine.precision})")
        table.add_row("size", f"{engine.bytes / 1e6:.2f} MB; metadata {engine.metadata_path.name}")
        table.add_row("profile", _profile_text(engine))
    table.add_row("opset", str(summary.opset))
    table.add_row("model", f"{seg.capture_info.model_class}, {len(seg.sites)} attention layers")
    if experts is not None:
        table.add_row("experts", f"batched products (the model's {experts} does not export to ONNX)")
    table.add_row("segments", segments_row(cfg))
    state_in = [v for v in summary.inputs if v[0] not in (INPUT_IDS, POSITION_OFFSET)]
    table.add_row("inputs", ", ".join(f"{n} {t}{shape(s)}" for n, t, s in summary.inputs[:2])
                  + f", {len(state_in)} state buffers")
    for n, t, s in state_in[:4]:
        table.add_row("", f"{n} {t}{shape(s)}")
    if len(state_in) > 4:
        table.add_row("", f"... {len(state_in) - 4} more (local: fixed size; hist: dynamic history)")
    table.add_row("outputs", f"{summary.outputs[0][0]} {summary.outputs[0][1]}{shape(summary.outputs[0][2])}, "
                  f"{len(summary.outputs) - 1} updated state buffers (*_out)")
    table.add_row("time", ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()))
    console.print()
    console.print(table)
    if engine is None:
        console.print(f"run it: segcompile run {summary.path} --prompt-ids IDS.npy", markup=False, soft_wrap=True)
    else:
        console.print(f"run it: segcompile.deploy.tensorrt.TensorRTSegmentedModel({str(engine.path)!r})",
                      markup=False, soft_wrap=True)


def _profile_text(engine) -> str:
    """The engine's dynamic axes as ranges: batch, step and (with long-range heads) history."""
    low, _, high = engine.profile[INPUT_IDS]
    text = f"batch {low[0]}..{high[0]}, step {low[1]}..{high[1]}"
    hist = next((shapes for name, shapes in engine.profile.items() if name.endswith("_hist_k")), None)
    if hist is not None:
        text += f", history {hist[0][2]}..{hist[2][2]}"
    return text + f"; context up to {engine.max_context} tokens"
