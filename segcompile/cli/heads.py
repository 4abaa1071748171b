"""``segcompile heads``: choose the long-range KV heads of a model and write the plan file.

Stages: load the model (a local Hugging Face folder, or the built-in tiny Llama) -> score every
KV head with ``select_heads`` (attention mass on calibration data, or trained gates), under a
progress bar -> write the plan JSON (atomically). The data: synthetic retrieval sequences, token
ids from a file (with the query and key positions that score, optionally), or ``--data
passkey-text``: pass-key prompts on real text, scored at the rows that predict the answer
(``heads.text_retrieval_calibration``). Prints the selected heads per layer with their
scores. ``segcompile viz/demo --long-range heads.json`` and
``SegmentConfig(long_range=HeadPlan.load(...))`` read the file.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from . import (
    HelpFormatter,
    ProgressBar,
    UsageError,
    add_segment_flags,
    check_out_file,
    fraction,
    make_console,
    positive_int,
)
from .models import add_model_args, check_model_args, load_model, load_tokenizer, model_label

name = "heads"
DATA = ("synthetic", "passkey-text")
help = "choose the long-range KV heads of a model from data and write a head-plan JSON file"


def subparser_init(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        name,
        help=help,
        description=(
            "Score every KV head of a causal LM (a local Hugging Face model folder, a .gguf file, smollm2, or the built-in tiny "
            "Llama) by how much it needs keys beyond a local window (sinks + tail + current segment), keep "
            "the best --budget fraction as long-range heads, and write the plan as JSON with the scores, "
            "the settings and a hash of the data, for `--long-range PLAN.json` and HeadPlan.load."
        ),
        formatter_class=HelpFormatter,
    )
    model = add_model_args(parser)
    model.add_argument("--device", default=None, help="torch device to run on (default: cuda if available, else cpu)")
    # the plan is what this command makes; the scores do not depend on how a history is stored
    add_segment_flags(parser, segment_len=512, sinks=0, long_range=False, history_dtype=False)
    parser.add_argument("--long-range", default=None, help=argparse.SUPPRESS)  # only to say why it does not apply
    select = parser.add_argument_group("selection")
    select.add_argument("--budget", type=fraction, default=0.25,
                        help="fraction of KV heads (or layers) kept long-range")
    select.add_argument("--method", choices=["attention_mass", "gate"], default="attention_mass",
                        help="attention mass beyond the local window, or DuoAttention-style trained gates")
    select.add_argument("--granularity", choices=["head", "layer"], default="head",
                        help="select KV heads, or whole layers by their summed scores")
    select.add_argument("--seed", type=int, default=0, help="seed of the synthetic data")
    data = parser.add_argument_group("data")
    data.add_argument(
        "--data", choices=DATA, default="synthetic",
        help="synthetic retrieval sequences (random tokens, every query scored), or pass-key prompts whose filler "
             "is real text (the calibration split of the eval texts), scored at the rows that predict the answer; "
             "attention_mass then counts the mass on the needle's digits only",
    )
    data.add_argument(
        "--calibration-ids", metavar="IDS.npy", default=None,
        help="token ids [B, n] or [n] as a .npy integer array (instead of --data)",
    )
    data.add_argument("--query-positions", metavar="POS.npy", default=None,
                      help="with --calibration-ids: bool [B, n] or [n], the query rows that score")
    data.add_argument("--key-positions", metavar="POS.npy", default=None,
                      help="with --calibration-ids, attention_mass: bool [B, n] or [n], the keys whose mass counts")
    data.add_argument("--seq-len", type=positive_int, default=None,
                      help="tokens per synthetic sequence or pass-key prompt (default: 4 x --segment-len)")
    data.add_argument("--samples", type=positive_int, default=8,
                      help="synthetic sequences scored by attention_mass, or pass-key prompts")
    data.add_argument("--batch-size", type=positive_int, default=1, help="sequences per forward or gate step")
    gate = parser.add_argument_group("gate")
    gate.add_argument("--steps", type=positive_int, default=None, help="Adam steps of the gates (default: 100)")
    gate.add_argument("--lr", type=float, default=None, help="learning rate of the gates (default: 0.1)")
    gate.add_argument("--sparsity", type=float, default=None, help="weight of mean(gate) in the loss (default: 0.05)")
    parser.add_argument("--out", default="heads.json", help="the plan file to write")
    return parser


def validate(args: argparse.Namespace) -> None:
    if args.long_range is not None:
        raise UsageError(
            "--long-range does not apply to `segcompile heads`: it chooses the long-range heads",
            hint="use --budget for the fraction of KV heads to keep",
        )
    check_model_args(args)
    for flag, path in (("--query-positions", args.query_positions), ("--key-positions", args.key_positions)):
        if path is not None and args.calibration_ids is None:
            raise UsageError(f"{flag} marks positions of --calibration-ids", hint="give --calibration-ids too")
        if path is not None and not Path(path).is_file():
            raise UsageError(f"{flag} {path}: no such file", hint="give a .npy array of bools")
    if args.key_positions is not None and args.method != "attention_mass":
        raise UsageError("--key-positions applies to --method attention_mass only", hint="leave it out")
    if args.calibration_ids is not None:
        if args.data != "synthetic":
            raise UsageError(f"--data {args.data} and --calibration-ids are two sources of data", hint="give one")
        if not Path(args.calibration_ids).is_file():
            raise UsageError(f"--calibration-ids {args.calibration_ids}: no such file",
                             hint="give a .npy file of integer token ids, or leave it out for synthetic data")
        if args.seq_len is not None:
            raise UsageError("--seq-len sets synthetic sequences; calibration ids have their own length",
                             hint="leave out --seq-len or --calibration-ids")
    if args.method != "gate" and any(v is not None for v in (args.steps, args.lr, args.sparsity)):
        raise UsageError("--steps, --lr and --sparsity apply to --method gate only", hint="add --method gate")
    if Path(args.out).is_dir():
        raise UsageError(f"--out {args.out} is a folder", hint="name the JSON file to write")
    check_out_file(args.out)  # scoring takes minutes on a real model: a place it cannot write fails now


def cmd(args: argparse.Namespace) -> int:
    import torch

    import segcompile as sc

    cfg = sc.SegmentConfig(segment_len=args.segment_len, tail_len=args.tail_len, sink_tokens=args.sinks)
    console = make_console(args)
    ids, positions = (_npy(args.calibration_ids, "--calibration-ids"), {"query_positions": args.query_positions,
                                                                         "key_positions": args.key_positions})
    positions = {k: _npy(path, "--" + k.replace("_", "-")) for k, path in positions.items() if path is not None}
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")

    start = time.perf_counter()
    model = load_model(args).to(device)
    if args.data == "passkey-text":
        ids, positions = _passkey_text(args, cfg)
    console.print(f"[1/3] {model_label(args):<56} {time.perf_counter() - start:6.2f} s", markup=False, soft_wrap=True)

    options = {k: getattr(args, k) for k in ("steps", "lr", "sparsity") if getattr(args, k) is not None}
    label = f"{args.method}, S={cfg.segment_len} T={cfg.tail_len} G={cfg.sink_tokens}"
    start = time.perf_counter()
    with ProgressBar(console, f"[2/3] score KV heads ({label})") as bar:
        plan = sc.select_heads(
            model, ids, args.budget, args.method, cfg, granularity=args.granularity, seed=args.seed,
            seq_len=None if ids is not None else args.seq_len, samples=args.samples, batch_size=args.batch_size,
            progress=bar.update, **positions, **options,
        )
    console.print(f"[2/3] score KV heads ({label})".ljust(62) + f" {time.perf_counter() - start:6.2f} s",
                  markup=False, soft_wrap=True)
    plan.save(args.out)
    console.print(f"[3/3] wrote {args.out}", markup=False, soft_wrap=True)
    _summary(console, plan)
    return 0


def _npy(path: str | None, flag: str):
    if path is None:
        return None
    import numpy as np

    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise UsageError(f"{flag} {path}: not a .npy array ({' '.join(str(e).split())[:200]})",
                         hint="save it with numpy.save(path, array): ids an integer array [B, n] or [n], "
                              "positions a bool one") from e


def _passkey_text(args: argparse.Namespace, cfg):
    """Pass-key prompts on real text (the model's tokenizer; UTF-8 bytes for the tiny Llama), and the
    positions that score: the answer's rows, and for attention_mass the needle's digits."""
    from ..heads import text_retrieval_calibration
    from ..quality import ByteTokenizer

    tokenizer = load_tokenizer(args) if args.model_dir is not None else ByteTokenizer()
    if tokenizer is None:
        raise UsageError(f"--data passkey-text: {args.model_dir} has no tokenizer to write the prompts with",
                         hint="save the tokenizer beside the model, or use --data synthetic")
    data = text_retrieval_calibration(tokenizer, args.seq_len or 4 * cfg.segment_len, args.samples, seed=args.seed)
    positions = {"query_positions": data.query_positions}
    if args.method == "attention_mass":
        positions["key_positions"] = data.key_positions
    return data.ids, positions


def _summary(console, plan) -> None:
    from rich import box
    from rich.table import Table

    extra = plan.extra
    kind = "gate value" if plan.method == "gate" else "attention mass beyond the local window"
    table = Table(title=f"long-range KV heads ({plan.method}, {extra['granularity']})", box=box.SIMPLE_HEAD,
                  title_justify="left")
    table.add_column("layer", justify="right")
    table.add_column("long-range")
    table.add_column(f"score per KV head ({kind})")
    for layer, row in sorted(extra["scores"].items(), key=lambda kv: int(kv[0])):
        chosen = plan.heads.get(int(layer), ())
        cells = "  ".join(f"{'*' if h in chosen else ' '}{h}:{s:.4f}" for h, s in enumerate(row))
        table.add_row(layer, str(list(chosen)), cells)
    console.print()
    console.print(table)
    data = extra["data"]
    source = (f"calibration ids {data['shape']}" if data["source"] == "calibration"
              else f"{data['sequences_seen']} synthetic retrieval sequences of {data['seq_len']} tokens")
    if "query_positions" in data:
        source += f", {data['query_positions']} query positions"
    console.print(
        f"{extra['selected']} of {extra['total_kv_heads']} KV heads long-range (budget {extra['budget']:g}); "
        f"data: {source}, sha256 {data['sha256'][:12]}",
        markup=False, soft_wrap=True,
    )
