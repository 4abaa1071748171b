"""``segcompile generate``: compile a model and generate text from a prompt, streaming it.

Stages: load the model and its tokenizer (a local Hugging Face folder, a ``.gguf`` file or a
folder holding one; never their own code) -> capture -> passes -> ``seg.generate``
(``runtime/generation.py``: prefill, then one decode step per token), the text streamed by
transformers' ``TextStreamer`` as it comes. Ends with one line: tokens, prefill time, decode
tokens/s, the kernels that ran.

The prompt: ``--prompt TEXT``, through the chat template when the tokenizer has one (``--no-chat``
feeds the text as it is; ``--chat`` insists on a template), or ``--prompt-ids IDS.npy`` (token ids,
``[tokens]`` or ``[batch, tokens]`` of one length), which needs no tokenizer: the built-in tiny
Llama has none, so it takes ``--prompt-ids`` only and prints ids. Generation stops at the
tokenizer's and the model's end-of-sequence tokens (``--ignore-eos``: at ``--max-new-tokens``).
"""

from __future__ import annotations

import argparse
import secrets
import time
from pathlib import Path

from . import (
    HelpFormatter,
    UsageError,
    add_segment_flags,
    check_plan_file,
    fraction,
    history_phrase,
    make_console,
    positive_int,
    segment_config,
    stage,
    torch_device,
)
from .models import add_model_args, check_model_args, has_tokenizer, load_model, load_tokenizer, model_label

name = "generate"
help = "generate text from a prompt with the segmented model, streaming it"

SAMPLING_FLAGS = ("temperature", "top_k", "top_p", "seed")
DTYPES = ("auto", "float32", "bfloat16", "float16")


def subparser_init(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        name,
        help=help,
        description=(
            "Compile a causal LM (a local Hugging Face model folder, a .gguf file, or the built-in tiny Llama) "
            "into the segment loop and generate from a prompt: prefill it a segment at a time, then decode one "
            "token at a time, streaming the text. Greedy unless --do-sample."
        ),
        formatter_class=HelpFormatter,
    )
    model = add_model_args(parser)
    model.add_argument("--device", default=None, help="torch device to run on (default: cuda if available, else cpu)")
    model.add_argument("--dtype", choices=DTYPES, default="auto", help="weights dtype (auto: as loaded)")
    model.add_argument("--cuda-graphs", action="store_true",
                       help="decode through CUDA graphs of a fixed-shape step (seg.enable_cuda_graphs())")
    model.add_argument("--compile", action="store_true",
                       help="with --cuda-graphs: compile the fixed-shape step (torch.compile) before capturing it: "
                       "faster tokens after a compile of tens of seconds")
    prompt = parser.add_argument_group("prompt")
    given = prompt.add_mutually_exclusive_group(required=True)
    given.add_argument("--prompt", metavar="TEXT", help="the prompt text (needs MODEL's tokenizer)")
    given.add_argument("--prompt-ids", metavar="IDS.npy",
                       help="prompt token ids: an integer .npy array [tokens] or [batch, tokens]")
    prompt.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                        help="wrap --prompt in the tokenizer's chat template as one user message "
                        "(default: when the tokenizer has a template)")
    add_segment_flags(parser, segment_len=2048, sinks=0)
    run = parser.add_argument_group("generation")
    run.add_argument("--max-new-tokens", type=positive_int, default=64, help="most tokens to generate")
    run.add_argument("--ignore-eos", action="store_true",
                     help="do not stop at end-of-sequence tokens: always generate --max-new-tokens")
    run.add_argument("--repetition-penalty", type=float, default=None,
                     help="divide the scores of tokens already in the sequence by this (> 1 repeats less)")
    sample = parser.add_argument_group("sampling (--do-sample)")
    sample.add_argument("--do-sample", action="store_true", help="sample the next token instead of the argmax")
    sample.add_argument("--temperature", type=float, default=None, help="divide the scores by this (default: 1)")
    sample.add_argument("--top-k", type=positive_int, default=None, help="sample among the k most likely tokens")
    sample.add_argument("--top-p", type=fraction, default=None,
                        help="sample among the most likely tokens whose probabilities sum to p")
    sample.add_argument("--seed", type=int, default=None, help="seed of the sampling (default: a random one, printed)")
    return parser


def validate(args: argparse.Namespace) -> None:
    check_model_args(args)
    check_plan_file(args)
    _check_prompt(args)
    given = [f"--{flag.replace('_', '-')}" for flag in SAMPLING_FLAGS if getattr(args, flag) is not None]
    if given and not args.do_sample:
        raise UsageError(f"{', '.join(given)}: for sampling only", hint="add --do-sample, or leave them out for greedy")
    if args.temperature is not None and not args.temperature > 0:
        raise UsageError(f"--temperature {args.temperature}: must be > 0", hint="leave out --do-sample for greedy")
    if args.top_p is not None and args.top_p == 0:
        raise UsageError("--top-p 0 keeps no token", hint="use a p in (0, 1]")
    if args.repetition_penalty is not None and not args.repetition_penalty > 0:
        raise UsageError(f"--repetition-penalty {args.repetition_penalty}: must be > 0", hint="1 is no penalty")
    if args.compile and not args.cuda_graphs:
        raise UsageError("--compile compiles the CUDA-graph decode step", hint="add --cuda-graphs, or leave out --compile")


def _check_prompt(args: argparse.Namespace) -> None:
    if args.prompt_ids is not None:
        if not Path(args.prompt_ids).is_file():
            raise UsageError(f"--prompt-ids {args.prompt_ids}: no such file",
                             hint="save the ids with numpy.save('ids.npy', ids)")
        if args.chat:
            raise UsageError("--chat applies to --prompt text", hint="leave out --chat with --prompt-ids")
        return
    if args.model_dir is None:
        raise UsageError("the built-in tiny Llama has no tokenizer, so it takes no --prompt text",
                         hint="give --prompt-ids IDS.npy (token ids), or a MODEL folder with its tokenizer")
    if not has_tokenizer(args):
        raise UsageError(f"{args.model_dir} has no tokenizer (tokenizer.json, tokenizer_config.json, ...)",
                         hint="save it beside the model with tokenizer.save_pretrained(folder), or give --prompt-ids")


def cmd(args: argparse.Namespace) -> int:
    import torch

    import segcompile as sc

    cfg = segment_config(args)  # bad S/T/G or plan: ConfigError/PlanError (exit 2) before any work
    console = make_console(args)
    device = torch_device(args.device)
    stages = ["load model", "capture", "passes"]
    seconds: dict[str, float] = {}
    label = model_label(args) + (" and its tokenizer" if args.model_dir is not None else "")
    with stage(console, stages, 0, seconds, label):
        model = _on(load_model(args), device, args.dtype)
        tokenizer = load_tokenizer(args)
    prompt, chat = _prompt(args, tokenizer, device)
    _check_positions(model, prompt.shape[1], args.max_new_tokens)
    with stage(console, stages, 1, seconds, f"capture {type(model).__name__} (torch.export)"):
        graph = sc.capture(model)
    with stage(console, stages, 2, seconds, "passes"):
        seg = sc.transform(graph, cfg)
    if args.cuda_graphs:
        seg.enable_cuda_graphs(compile=args.compile)

    console.print(f"prompt: {prompt.shape[0]} x {prompt.shape[1]} tokens{' (chat template)' if chat else ''}",
                  markup=False, soft_wrap=True)
    streamer = TimedStreamer(_streamer(tokenizer, prompt.shape[0]))
    seed = args.seed if args.seed is not None else secrets.randbelow(2**31)  # torch's own RNG starts seeded
    out = seg.generate(
        prompt, args.max_new_tokens, args.do_sample, args.temperature or 1.0, args.top_k, args.top_p,
        eos_token_id=None if args.ignore_eos else _eos_ids(model, tokenizer), streamer=streamer,
        repetition_penalty=args.repetition_penalty,
        generator=torch.Generator(device=device).manual_seed(seed) if args.do_sample else None,
    )
    new = out[:, prompt.shape[1]:]
    if prompt.shape[0] > 1:  # nothing was streamed
        _print_rows(console, tokenizer, new)
    console.print(_summary(seg, cfg, streamer, prompt, new, args, seed), markup=False, soft_wrap=True)
    return 0


# ---- model and prompt ---------------------------------------------------------------------------

def _on(model, device, dtype: str):
    import torch

    return model.to(device=device, dtype=None if dtype == "auto" else getattr(torch, dtype))


def _prompt(args: argparse.Namespace, tokenizer, device) -> tuple:
    """The prompt ids ``[B, N]`` on ``device``, and whether the chat template made them."""
    import torch

    if args.prompt_ids is not None:
        return _load_ids(args.prompt_ids).to(device), False
    chat = args.chat if args.chat is not None else bool(getattr(tokenizer, "chat_template", None))
    if chat and not getattr(tokenizer, "chat_template", None):
        raise UsageError(f"--chat: the tokenizer of {args.model_dir} has no chat template",
                         hint="leave out --chat to feed the prompt text as it is")
    if chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], tokenize=False,
                                             add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]  # the template writes the special tokens
    else:
        ids = tokenizer(args.prompt)["input_ids"]
    if not ids:
        raise UsageError("--prompt: the text has no tokens", hint="give a prompt that is not empty")
    return torch.tensor([ids], dtype=torch.long, device=device), chat


def _load_ids(path: str):
    import numpy as np
    import torch

    try:
        ids = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise UsageError(f"--prompt-ids {path}: not a numpy array file ({e})",
                         hint="save the ids with numpy.save('ids.npy', ids)") from None
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.shape[1] == 0 or ids.dtype.kind not in "iu":
        raise UsageError(f"--prompt-ids {path}: {ids.dtype} array of shape {ids.shape}, not token ids",
                         hint="save integer ids [tokens] or [batch, tokens]")
    return torch.from_numpy(ids.astype(np.int64))


def _check_positions(model, prompt_len: int, max_new_tokens: int) -> None:
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and prompt_len + max_new_tokens > limit:
        raise UsageError(
            f"the prompt's {prompt_len} tokens + --max-new-tokens {max_new_tokens} = {prompt_len + max_new_tokens} "
            f"positions, but the model has max_position_embeddings={limit}",
            hint=f"use --max-new-tokens {max(limit - prompt_len, 1)} or fewer, or a shorter prompt",
        )


def _eos_ids(model, tokenizer) -> list[int]:
    """The end-of-sequence ids of the tokenizer and of the model's generation config (an
    instruct model's config often adds its end-of-turn token)."""
    ids: list[int] = []
    generation_config = getattr(model, "generation_config", None)
    for given in (getattr(tokenizer, "eos_token_id", None), getattr(generation_config, "eos_token_id", None)):
        values = [] if given is None else [given] if isinstance(given, int) else list(given)
        ids += [v for v in values if v not in ids]
    return ids


# ---- output -------------------------------------------------------------------------------------
class TimedStreamer:
    """A streamer (transformers' ``put``/``end``) that notes when the prompt and each new token
    arrive and hands them on to ``inner``: the prefill time is from the prompt to the first token."""

    def __init__(self, inner=None):
        self.inner = inner
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())
        if self.inner is not None:
            self.inner.put(value)

    def end(self) -> None:
        if self.inner is not None:
            self.inner.end()


class IdStreamer:
    """Prints the new ids of a batch of one as they come, on one line."""

    def __init__(self):
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        print(" ".join(str(int(v)) for v in value.reshape(-1)), end=" ", flush=True)

    def end(self) -> None:
        print(flush=True)


def _streamer(tokenizer, batch: int):
    """Text as it comes for one prompt (ids without a tokenizer); nothing for a batch (rows at the end)."""
    if batch > 1:
        return None
    if tokenizer is None:
        return IdStreamer()
    from transformers import TextStreamer

    return TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def _print_rows(console, tokenizer, new) -> None:
    for row, ids in enumerate(new.tolist()):
        text = " ".join(map(str, ids)) if tokenizer is None else tokenizer.decode(ids, skip_special_tokens=True)
        console.print(f"[{row}] {text}", markup=False, soft_wrap=True)


def _summary(seg, cfg, streamer: TimedStreamer, prompt, new, args, seed: int) -> str:
    """One line: tokens, prefill time, decode speed, why it stopped, the kernels, the segments."""
    times = streamer.times  # the prompt, then each new token (of every row)
    tokens, rows = new.shape[1], prompt.shape[0]
    prefill = times[1] - times[0] if len(times) > 1 else 0.0
    decode = f"{rows * (len(times) - 2) / (times[-1] - times[1]):.1f} tokens/s" if len(times) > 2 else "n/a"
    stopped = "end of sequence" if tokens < args.max_new_tokens else "--max-new-tokens"
    impls = ", ".join(sorted(set(seg.implementations.values())))
    sampling = (f"sampled (seed {seed})" if args.do_sample else "greedy")
    history = history_phrase(cfg.history_dtype)
    return (
        f"{tokens} new tokens x {rows} ({stopped}, {sampling}): prefill {prompt.shape[1]} tokens "
        f"{prefill:.2f} s, decode {decode} ({seg.last_decode_path}); impl {impls}; S={cfg.segment_len} T={cfg.tail_len} G={cfg.sink_tokens}"
        + (f", {history}" if history else "")
    )
