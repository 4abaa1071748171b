"""Train (or fine-tune) a causal LM with segcompile's exact truncated BPTT on the recall task.

    python examples/train.py --model tiny-llama --steps 50 --out runs/tiny
    python examples/train.py --model tiny-llama --steps 100 --out runs/tiny --resume   # continue to step 100
    python examples/train.py --model path/to/hf-model --seq-len 4096 --segment-len 512 --dtype bf16 --out runs/ft
    torchrun --nproc-per-node 2 examples/train.py --model tiny-llama --steps 50 --out runs/fsdp --fsdp

Each step draws a batch from ``segcompile.testing.recall_task`` with a seeded generator, runs
``seg.tbptt_backward(ids, labels)`` (gradients through ``--tbptt-k`` previous segments) and an
AdamW step. ``--out`` receives ``losses.jsonl`` (one ``{"step", "loss"}`` line per step),
``checkpoint/`` (model, optimizer, data generator and RNG states; no pickle) every
``--checkpoint-every`` steps and at the end, and ``eval.json`` (answer accuracy on held-out
batches, by how many segments back the answer was). ``--resume`` continues from
``--out/checkpoint`` with the same data order, RNG and optimizer state, so the losses are the
ones an uninterrupted run would have logged. ``--steps`` is the total: a resume with ``--steps``
below the checkpoint's step is refused (nothing is written); at the checkpoint's step it trains
nothing, leaves the checkpoint as it is and evaluates. A damaged checkpoint (its manifest) is
refused.

Models are captured in eval mode (segcompile refuses attention dropout), so dropout is off.
On one CUDA process the segment step runs under ``torch.compile`` (``seg.compile()``; ``--compile
off`` for the eager step); the progress bar shows the loss and the training tokens a second.

Under torchrun, ``--fsdp`` (FSDP2) or ``--ddp`` trains data parallel over sequences: every rank
builds the same model (``--seed``), transforms it, wraps the SegmentedModel
(``segcompile.distributed``) and draws its own ``--batch-size`` sequences from its own data stream
(a seed per rank), so a step sees ``batch-size x ranks`` sequences. Gradients are synchronised once
per sequence; the logged loss is the mean over ranks. Rank 0 alone shows the progress bar and
writes ``losses.jsonl`` and ``eval.json``; the checkpoint is sharded (``segcompile.runtime.checkpoint``:
DCP, safetensors, one RNG file per rank) and a run resumes with as many ranks as it was saved by.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch

import segcompile as sc
from segcompile.files import atomic_write_text
from segcompile.runtime.checkpoint import load_checkpoint, save_checkpoint
from segcompile.testing import recall_task

# Flags that define the run: a resumed run must use the same ones.
RUN_FLAGS = (
    "model", "layers", "seq_len", "segment_len", "tail_len", "sinks", "long_range", "tbptt_k",
    "batch_size", "lr", "warmup", "clip", "seed", "dtype", "pairs", "queries",
)
EVAL_SEED_OFFSET = 1_000_003  # held-out batches come from seed + this, never from the training stream
RANK_SEED_STRIDE = 10_007  # rank r draws its training data from seed + r * this (rank 0: the single-process stream)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="tiny-llama", help="'tiny-llama', 'plain' (segcompile/testing/plain_decoder.py) or a local HF model directory")
    p.add_argument("--layers", type=int, default=2, help="layers of the built-in models (tiny-llama, plain)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--segment-len", type=int, default=64)
    p.add_argument("--tail-len", type=int, default=None, help="default: the segment length")
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--long-range", type=float, default=0.25, help="fraction of KV heads that see the whole history")
    p.add_argument("--tbptt-k", type=int, default=1)
    p.add_argument("--steps", type=int, default=100, help="total steps (a resumed run continues up to this step)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=0, help="linear learning-rate warmup steps")
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip (0: none)")
    p.add_argument("--pairs", type=int, default=16, help="key-value pairs per sequence")
    p.add_argument("--queries", type=int, default=8, help="questions per sequence")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16: autocast, parameters stay fp32")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute each segment's activations in backward")
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                   help="run the segment step under torch.compile (seg.compile()); auto: on for one CUDA process "
                        "(about 2x the eager step's tokens/s on an H200), off on the CPU and under --fsdp/--ddp")
    p.add_argument("--compile-mode", choices=["default", "reduce-overhead"], default="default",
                   help="torch.compile's mode when compiling. reduce-overhead replays CUDA graphs: the fast path "
                        "for large models at long lengths (a 443M model at 32K on an H200: 1.10x full attention "
                        "with checkpointing; the first two steps record them, minutes), but 0.24x the default "
                        "mode's tokens/s for the built-in 2-layer model (bench/README.md, training)")
    p.add_argument("--checkpoint-every", type=int, default=0, help="save every N steps (0: only at the end)")
    p.add_argument("--eval-batches", type=int, default=1, help="held-out batches evaluated at the end")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    parallel = p.add_mutually_exclusive_group()
    parallel.add_argument("--fsdp", action="store_true", help="under torchrun: FSDP2, parameters, gradients and optimizer state sharded")
    parallel.add_argument("--ddp", action="store_true", help="under torchrun: DDP, everything replicated")
    return p


def validate(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    vocab = recall_task.RecallVocab()
    try:
        recall_task.check_sizes(args.seq_len, args.pairs, args.queries, vocab)
        sc.SegmentConfig(args.segment_len, args.tail_len, args.sinks, sc.HeadPlan.fraction(args.long_range), args.tbptt_k)
    except (ValueError, sc.SegcompileError) as e:
        p.error(str(e))
    if args.steps < 0 or args.batch_size < 1:
        p.error("--steps must be >= 0 and --batch-size >= 1")
    checkpoint = args.out / "checkpoint"
    if args.resume and not checkpoint.exists():
        p.error(f"--resume: no checkpoint at {checkpoint}")
    if not args.resume and checkpoint.exists():
        p.error(f"{checkpoint} exists: pass --resume to continue that run, or choose another --out")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available")
    if (args.fsdp or args.ddp) and "RANK" not in os.environ:
        flag = "--fsdp" if args.fsdp else "--ddp"
        p.error(f"{flag} runs under torchrun: torchrun --nproc-per-node N examples/train.py ... {flag}")


def build_model(args, vocab_size: int) -> torch.nn.Module:
    if args.model == "tiny-llama":
        from segcompile.testing.models import VOCAB_SIZE, tiny_llama

        model = tiny_llama(num_layers=args.layers, seed=args.seed)
        assert VOCAB_SIZE >= vocab_size
    elif args.model == "plain":
        from segcompile.testing.plain_decoder import tiny_plain_decoder

        model = tiny_plain_decoder(
            seed=args.seed, vocab_size=vocab_size, num_hidden_layers=args.layers,
            max_position_embeddings=max(4096, args.seq_len),
        )
    else:
        from segcompile.pretrained import ModelSourceError, load_model

        try:  # a model folder, a .gguf file (or a folder holding one), or "smollm2"
            model = load_model(args.model, dtype=torch.float32)
        except ModelSourceError as e:
            raise SystemExit(f"--model {args.model}: {e} (not 'tiny-llama' or 'plain' either)") from e
        if model.config.vocab_size < vocab_size:
            raise SystemExit(f"{args.model}: vocabulary of {model.config.vocab_size} tokens; the recall task needs {vocab_size}")
    return model.float().eval()  # eval: segcompile captures without dropout


def lr_at(step: int, args) -> float:
    """Learning rate of step ``step`` (0-based): a pure function of the step, so resuming needs no scheduler state."""
    if args.warmup and step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    return args.lr


def run_config(args) -> dict:
    return {name: (str(v) if isinstance(v, Path) else v) for name in RUN_FLAGS for v in [getattr(args, name)]}


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    validate(parser, args)
    parallel = args.fsdp or args.ddp
    if parallel:
        import torch.distributed as dist

        dist.init_process_group("nccl" if args.device != "cpu" and torch.cuda.is_available() else "gloo")
    try:
        return train(parser, args)
    finally:
        if parallel:
            dist.destroy_process_group()


def train(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict:
    rank, ranks = _rank()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else "cpu" if args.device == "auto" else args.device)
    if device.type == "cuda" and ranks > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    vocab = recall_task.RecallVocab()
    lead = rank == 0  # logs, writes the run's files and shows the progress bar
    args.quiet = args.quiet or not lead

    torch.manual_seed(args.seed)  # the same model on every rank
    model = build_model(args, vocab.size).to(device)
    cfg = sc.SegmentConfig(
        segment_len=args.segment_len, tail_len=args.tail_len, sink_tokens=args.sinks,
        long_range=sc.HeadPlan.fraction(args.long_range), tbptt_k=args.tbptt_k,
    )
    seg = sc.transform(model, cfg)
    if args.compile == "on" or (args.compile == "auto" and device.type == "cuda" and ranks == 1):
        seg.compile(**({} if args.compile_mode == "default" else {"mode": args.compile_mode}))
    if args.fsdp:
        seg = sc.distributed.fsdp(seg)
    elif args.ddp:
        seg = sc.distributed.ddp(seg, device_ids=[device.index] if device.type == "cuda" else None)
    # Under FSDP the model keeps its own (now stale) full tensors: train and save seg instead.
    trained = seg if args.fsdp or args.ddp else model
    optimizer = torch.optim.AdamW(trained.parameters(), lr=args.lr)
    if ranks > 1:
        torch.manual_seed(args.seed + RANK_SEED_STRIDE * rank)
    data = torch.Generator().manual_seed(args.seed + RANK_SEED_STRIDE * rank)  # this rank's stream; saved in checkpoints

    args.out.mkdir(parents=True, exist_ok=True)
    losses_path, checkpoint_dir = args.out / "losses.jsonl", args.out / "checkpoint"
    start = 0
    if args.resume:
        start = resume(parser, args, checkpoint_dir, trained, optimizer, data)
        # Drop lines logged after the checkpoint (an interrupted run may have gone further).
        kept = [line for line in _read_lines(losses_path) if json.loads(line)["step"] <= start]
        if lead:
            atomic_write_text(losses_path, "".join(line + "\n" for line in kept))
    elif lead:
        atomic_write_text(losses_path, "")

    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")

    def save(step: int) -> None:
        save_checkpoint(checkpoint_dir, trained, optimizer, step=step, extra={"config": run_config(args)}, generators={"data": data})

    losses = []
    started = time.perf_counter()
    log_file = open(losses_path, "a", encoding="utf-8") if lead else open(os.devnull, "w")  # noqa: SIM115
    tokens_per_step = args.batch_size * args.seq_len * ranks
    with _progress(args.quiet, args.steps, start, tokens_per_step) as advance, log_file as log:
        for step in range(start, args.steps):
            ids, labels, _ = recall_task.batch(data, args.batch_size, args.seq_len, pairs=args.pairs, queries=args.queries, vocab=vocab)
            ids, labels = ids.to(device), labels.to(device)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, args)
            optimizer.zero_grad(set_to_none=True)
            with autocast:
                loss = _mean_over_ranks(seg.tbptt_backward(ids, labels, checkpoint=args.grad_checkpointing), ranks)
            if args.clip:
                torch.nn.utils.clip_grad_norm_(trained.parameters(), args.clip)
            optimizer.step()
            if not math.isfinite(loss):
                raise SystemExit(f"step {step + 1}: loss is {loss}; lower --lr")
            losses.append(loss)
            log.write(json.dumps({"step": step + 1, "loss": loss}) + "\n")
            log.flush()
            advance(loss)
            if args.checkpoint_every and (step + 1) % args.checkpoint_every == 0 and step + 1 < args.steps:
                save(step + 1)
    seconds = time.perf_counter() - started
    if args.steps > start or not args.resume:  # a resume at its checkpoint's step has nothing new to save
        save(args.steps)

    evaluation = evaluate(seg, args, vocab, device, autocast)  # every rank: under FSDP a forward is collective
    if lead:
        atomic_write_text(args.out / "eval.json", json.dumps(evaluation, indent=1) + "\n")
    if not args.quiet:
        _summary(args, losses, evaluation, seconds, start)
    return {"losses": losses, "eval": evaluation, "start": start, "seconds": seconds}


def resume(parser, args, checkpoint_dir: Path, trained, optimizer, data: torch.Generator) -> int:
    """Load the checkpoint into ``trained``, ``optimizer`` and ``data``; return its step. Exits
    (nothing written) when it is damaged, was made with other settings, or is past ``--steps``."""
    try:
        start, extra = load_checkpoint(checkpoint_dir, trained, optimizer, {"data": data})
    except sc.SegcompileError as e:
        parser.error(f"--resume: {e}")
    saved = extra.get("config", {})
    changed = {k: (saved.get(k), v) for k, v in run_config(args).items() if saved.get(k) != v}
    if changed:
        parser.error(
            "--resume with other settings than the checkpoint's: "
            + ", ".join(f"{k}={new!r} (checkpoint: {old!r})" for k, (old, new) in changed.items())
        )
    # Going on would save step start's weights as step --steps: a later resume would then
    # train steps the weights have already seen, from the wrong place in the data stream.
    if args.steps < start:
        parser.error(
            f"--resume: the checkpoint in {checkpoint_dir} is at step {start}, past --steps {args.steps}; "
            f"--steps is the total to train to: pass --steps {start} or more, or start a new run in another --out"
        )
    if args.steps == start and not args.quiet:
        print(f"{checkpoint_dir} is at step {start} already: nothing to train; evaluating")
    return start


@torch.no_grad()
def evaluate(seg, args, vocab, device, autocast) -> dict:
    """Answer accuracy on held-out batches, overall and by ``distance // segment_len``."""
    if args.eval_batches <= 0:
        return {}
    held_out = torch.Generator().manual_seed(args.seed + EVAL_SEED_OFFSET)
    hits, buckets = [], []
    for _ in range(args.eval_batches):
        ids, labels, distances = recall_task.batch(held_out, args.batch_size, args.seq_len, pairs=args.pairs, queries=args.queries, vocab=vocab)
        with autocast:
            logits = seg(ids.to(device)).logits
        hits.append(recall_task.correct(logits, labels.to(device), args.queries).cpu().flatten())
        buckets.append((distances // args.segment_len).flatten())
    hits, buckets = torch.cat(hits), torch.cat(buckets)
    by_bucket = {str(int(b)): hits[buckets == b].float().mean().item() for b in buckets.unique()}
    return {"accuracy": hits.float().mean().item(), "accuracy_by_segments_back": by_bucket, "answers": hits.numel()}


def _rank() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _mean_over_ranks(loss: torch.Tensor, ranks: int) -> float:
    if ranks == 1:
        return float(loss)
    import torch.distributed as dist

    total = loss.double().to("cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(total)
    return float(total) / ranks


def _read_lines(path: Path) -> list[str]:
    if not path.exists():
        return []
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


class _progress:
    """A rich progress bar showing the loss and the training tokens a second (all ranks, over the
    last step); ``advance(loss)`` per step. Silent when ``quiet``."""

    def __init__(self, quiet: bool, total: int, done: int, tokens_per_step: int):
        self.quiet, self.total, self.done, self.tokens_per_step = quiet, total, done, tokens_per_step

    def __enter__(self):
        if self.quiet:
            return lambda loss: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.bar = Progress(
            TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[speed]} tokens/s"), TimeElapsedColumn(), TimeRemainingColumn(),
        )
        self.bar.start()
        task = self.bar.add_task("train", total=self.total, completed=self.done, loss="-", speed="-")
        last = time.perf_counter()

        def advance(loss: float) -> None:
            nonlocal last
            now = time.perf_counter()
            speed = f"{self.tokens_per_step / max(now - last, 1e-9):,.0f}"
            last = now
            self.bar.update(task, advance=1, loss=f"{loss:.4f}", speed=speed)

        return advance

    def __exit__(self, *exc):
        if not self.quiet:
            self.bar.stop()
        return False


def _summary(args, losses, evaluation, seconds, start) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if losses:
        tokens = len(losses) * args.batch_size * args.seq_len * max(1, int(os.environ.get("WORLD_SIZE", 1)))
        console.print(f"steps {start + 1}..{args.steps} in {seconds:.1f}s ({tokens / seconds:,.0f} tokens/s); "
                      f"loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    if evaluation:
        table = Table(title=f"held-out accuracy, {evaluation['answers']} answers")
        table.add_column("segments back")
        table.add_column("accuracy", justify="right")
        for bucket, acc in sorted(evaluation["accuracy_by_segments_back"].items(), key=lambda kv: int(kv[0])):
            table.add_row(bucket, f"{acc:.3f}")
        table.add_row("all", f"{evaluation['accuracy']:.3f}")
        console.print(table)
    console.print(f"wrote {args.out / 'losses.jsonl'}, {args.out / 'eval.json'}, {args.out / 'checkpoint'}")


if __name__ == "__main__":
    main()
