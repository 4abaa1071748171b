"""``segcompile run``: prefill a prompt and decode greedily with an exported ONNX step program.

Reads the prompt ids from a ``.npy`` file (integers, ``[tokens]`` or ``[batch, tokens]``; numpy
reads it with ``allow_pickle=False``), runs ``segcompile.deploy.onnxruntime_backend.OnnxSegmentedModel``
on ``--device`` (``cuda``: onnxruntime's CUDA provider, an error where this onnxruntime lacks it;
``cpu``; default: CUDA when onnxruntime has it, the CPU otherwise), prints the provider that
ran, the new ids and the speed, and writes the ids with ``--out`` (atomically).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..files import atomic_write_bytes
from . import HelpFormatter, UsageError, check_out_file, make_console, non_negative_int

name = "run"
help = "prefill a prompt and decode greedily with an exported ONNX file"


def subparser_init(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        name,
        help=help,
        description="Run a file written by `segcompile export` with onnxruntime: prefill the prompt a segment "
        "at a time, then decode greedily.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("model", metavar="MODEL.onnx", help="a file written by `segcompile export`")
    parser.add_argument("--prompt-ids", required=True, metavar="IDS.npy",
                        help="prompt token ids: an integer .npy array [tokens] or [batch, tokens]")
    parser.add_argument("--max-new-tokens", type=non_negative_int, default=64, help="tokens to decode")
    # --provider: the flag's first name, kept for the commands already written with it
    parser.add_argument("--device", "--provider", dest="device", choices=["auto", "cuda", "cpu"], default="auto",
                        help="where onnxruntime runs the file: its CUDA or CPU execution provider (auto: CUDA when "
                        "this onnxruntime has it; `pip install onnxruntime-gpu` brings it)")
    parser.add_argument("--out", default=None, metavar="NEW.npy", help="write the new ids [batch, tokens] here")
    return parser


def validate(args: argparse.Namespace) -> None:
    if not Path(args.model).is_file():
        raise UsageError(f"{args.model}: no such file", hint="write one with `segcompile export --out MODEL.onnx`")
    if not Path(args.prompt_ids).is_file():
        raise UsageError(f"--prompt-ids {args.prompt_ids}: no such file",
                         hint="save the ids with numpy.save('ids.npy', ids)")
    if args.out is not None:
        if Path(args.out).is_dir():
            raise UsageError(f"--out {args.out} is a folder", hint="name the .npy file to write")
        check_out_file(args.out)


def cmd(args: argparse.Namespace) -> int:
    import numpy as np

    from ..deploy.onnxruntime_backend import OnnxSegmentedModel

    console = make_console(args)
    try:
        ids = np.load(args.prompt_ids, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise UsageError(f"--prompt-ids {args.prompt_ids}: not a numpy array file ({e})",
                         hint="save the ids with numpy.save('ids.npy', ids)") from None
    if ids.ndim == 1:
        ids = ids[None]
    model = OnnxSegmentedModel(args.model, device=None if args.device == "auto" else args.device)
    console.print(
        f"{model.path.name}: {model.model['architecture']}, {model.model['num_layers']} layers, {model.dtype}, "
        f"S={model.segment_len} T={model.tail_len} G={model.sink_tokens}{_history(model.metadata)}; "
        f"runs on {model.provider} ({model.device})",
        markup=False, soft_wrap=True,
    )
    new = _generate(console, model, ids, args.max_new_tokens)
    t = model.timings
    console.print(f"prompt {ids.shape[0]} x {ids.shape[1]} tokens, prefill {t['prefill_s']:.2f} s "
                  f"({t['prefill_tokens'] / max(t['prefill_s'], 1e-9):.0f} tok/s)", markup=False)
    console.print(f"decoded {new.shape[1]} tokens, {t['decode_s']:.2f} s "
                  f"({t['decode_tokens'] / max(t['decode_s'], 1e-9):.0f} tok/s)", markup=False)
    for row, seq in enumerate(new):
        console.print(f"new ids [{row}]: {' '.join(map(str, seq.tolist()))}", markup=False, soft_wrap=True)
    if args.out:
        _save(args.out, new)
        console.print(f"wrote {args.out}", markup=False)
    return 0


def _generate(console, model, ids, max_new_tokens: int):
    """``model.generate(ids, max_new_tokens)`` with a progress bar (on a terminal)."""
    import numpy as np
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=console, transient=True, disable=not console.is_terminal)
    with progress:
        task = progress.add_task("prefill", total=None)
        out = []
        for token in model.greedy_tokens(ids, max_new_tokens):
            if not out:  # the prompt is in: decoding starts
                progress.update(task, description="decode", total=max_new_tokens, completed=0)
            out.append(token)
            progress.advance(task)
    return np.concatenate(out, axis=1) if out else np.zeros((ids.shape[0], 0), np.int64)


def _save(path: str, array) -> None:
    """``numpy.save`` ``array`` to ``path``, atomically."""
    import io

    import numpy as np

    data = io.BytesIO()
    np.save(data, array, allow_pickle=False)
    atomic_write_bytes(path, data.getbuffer())


def _history(metadata) -> str:
    """What the summary adds where the exported program rounds its history (``--history-dtype``)."""
    from ..deploy.format import HISTORY_DTYPE_KEY

    rounding = metadata.get(HISTORY_DTYPE_KEY)
    return "" if rounding is None else f", history rounded to {rounding}"
