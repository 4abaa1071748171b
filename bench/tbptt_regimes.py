"""Train-inference consistency at small scale: one tiny decoder, four regimes, the recall task.

The same Llama-style decoder (same initial weights, same training batches, same step budget) is
trained from scratch on ``segcompile/testing/recall_task.py`` and evaluated on one fixed held-out set:

    full            full attention (the model's own SDPA), evaluated with full attention
    full->seg       the same trained model, evaluated segmented (train/inference mismatch)
    seg k=1         segcompile training, exact TBPTT through 1 previous segment, evaluated segmented
    seg k=0         segcompile training with a detached tail (Transformer-XL), evaluated segmented

Segmented evaluation is ``sc.transform(model, cfg)`` then ``seg(ids).logits`` under no_grad, with
S = --segment-len, T = --tail-len (default S), G = --sinks and fraction(--long-range) long-range
KV heads. Accuracy is the argmax over the whole vocabulary at each question's key, reported by
how far back the answer is, in segments (``distance // S``), and overall. Training cost is
wall time and peak memory: ``torch.cuda.max_memory_allocated`` over the regime's training on CUDA;
on CPU (no allocator statistics) the most tensor memory held at once during training step 2's
forward+backward beyond what was held before it, from the profiler's memory events.

    python bench/tbptt_regimes.py                  # GPU defaults: 4 layers, hidden 256, N=2048, S=256
    python bench/tbptt_regimes.py --cpu-defaults   # a run that learns on a CPU, ~11 min (CPU_DEFAULTS)
    python bench/tbptt_regimes.py --cpu-defaults --device cuda   # the same on a GPU: ~2.5 min on an H200
    python bench/tbptt_regimes.py --quick          # CPU smoke test, well under a minute

Writes ``results/tbptt_regimes-<device>.json`` (config, per-regime accuracy by distance, memory,
time, the command line) and a plot beside it when matplotlib is installed. ``--eval-every N`` also
evaluates every regime on the held-out set every N steps (full->seg through a program transformed
before training, which reads the weights as they change): ``accuracy_curve`` per regime and a
second panel, accuracy against steps; that time is not counted as training time. ``--save-models DIR``
also writes every trained model (``full.safetensors``, ``seg_k1.safetensors``, ...) and the run's
settings, which ``bench/head_plans.py`` evaluates under other head plans.

Cost, measured on one H100 (torch 2.11, fp32 with TF32, batch 16, N=2048, 2026-11-23): full
attention 90 ms/step (peak 17.2 GB); segcompile with S=256 (8 segments) 477 ms/step at k=1 (peak
1.6 GB) and 363 ms/step at k=0 (0.75 GB); with S=512 (4 segments) 268 and 187 ms/step. The
segmented step costs about 45-60 ms per segment whatever S, so it is bound by per-segment overhead
(the PyTorch reference attention, one backward call per segment), not by arithmetic. The default
550 steps is therefore about 550 x 0.93 s = 8.5 min of training plus ~30 s of captures and
evaluation: under 10 minutes for all four regimes.

That budget is too small for the model to learn recall: with full attention the answer loss stays
at ln(64) (chance over the 64 values) for the first 1500 steps at N=2048 (accuracy 2.4%, H100).
The GPU defaults keep the task with shared values (every key draws from all values), which needs a
two-layer induction circuit; expect near-chance accuracy in every regime there.

Cost and learnability on a CPU (2 cores shared with another process, load ~3; one torch thread;
torch 2.13; 2026-12-01), ``--cpu-defaults``: 2 layers x 64, N=256, S=T=64 (4 segments), G=2,
fraction(0.25) = KV head 0 of each layer, 12 pairs, 8 questions, keyed values (16 per key: chance
1/16), batch 32, 1200 steps. Full attention 270 ms/step (peak 106 MiB a step), seg k=1 130 ms/step
(65 MiB), seg k=0 126 ms/step (54 MiB): 323 + 156 + 151 s of training, ~11 min in all. (With this
little work per segment the segmented step is cheaper than full attention on a CPU; the timings
move by up to 2x with the other process's load.) Full attention leaves the loss plateau at
ln(16) at ~500 steps and is at loss 0.04 by step 800. Result (``results/tbptt_regimes-cpu.json``),
accuracy at 0 / 1 / 2 / 3 segments back: full 1.00 / 1.00 / 1.00 / 1.00; full->seg 1.00 / 0.87 /
0.34 / 0.35; seg k=1 0.93 / 0.93 / 0.76 / 0.24; seg k=0 0.24 / 0.30 / 0.14 / 0.14. Answers 2-3
segments back are beyond every local head's window (S + T = 128 tokens).
1200 steps stop seg k=1 on its way up: with ``--steps 6000`` (the schedule stretched) it reaches
0.996 (full 1.000, full->seg 0.606, seg k=0 0.969; ``results/tbptt_regimes-cpu-6000steps.json``,
accuracy against steps with ``--eval-every 500``, bench/README.md).

How the CPU settings were found (full attention first, then the segmented regimes):

* Shared values (the GPU defaults' task) did not learn on the CPU at any setting tried: 2 layers x
  64 (and x 128), N = 48-256, 4-16 pairs, 16-64 values, batch 16-128, lr 5e-4 to 1e-2, attention
  biases, rope_theta 1e6, head_dim 32, initializer_range 0.08 / 0.2, up to 1000 steps. The model
  learns to copy some value of the context (loss ln(pairs)) but not which one: at most 38% with 4
  pairs and 3 questions (25% by copying). In one such model (N=128, 800 steps) the layer-0 heads put
  99% of the question's attention on the context's values and no head attends to the previous token. Questions = pairs is a trap: the last
  question is answered by elimination (97% against 37% for the first, 4 pairs).
* Keyed values (``RecallVocab(values_per_key=16)``) is answered in one attention hop and learns:
  100% after ~900 steps at N=256, batch 16.
* With S=32 (8 segments) the segmented regimes barely learn from scratch in this budget: at batch
  16 and 1200 steps full 0.93, full->seg 0.37, seg k=1 0.086, seg k=0 0.056 (chance 0.0625); seg k=1
  reaches 0.22 after 3000 steps and 0.28 after 1500 steps of batch 32. It is the truncated gradient,
  not the local heads: every head long-range (forward equal to full attention) with S=32 and k=1 is
  at 0.088 after 1200 steps, while S=128 (S + T >= N) logs the same losses as full attention at
  every step. With K/V more than one segment back constant, only the answers within S + T of their
  question train the keys and values a retrieval head reads; at S=32 that is 17% of them, at S=64
  45%.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

import segcompile as sc  # noqa: E402
from segcompile.testing import recall_task  # noqa: E402
from segcompile.files import atomic_write_text  # noqa: E402
from segcompile.loss import label_count, span_loss  # noqa: E402
from segcompile.quality import report as quality_report  # noqa: E402

REGIMES = ("full", "full->seg", "seg k=1", "seg k=0")
EVAL_SEED_OFFSET = 1_000_003  # the held-out set never overlaps the training stream's seed
MiB = 1 << 20
# fp32 (with TF32 matmuls on CUDA) is the default because the docstring's timings were measured so: on
# 2026-11-23 bf16 autocast failed on CUDA inside the reference segment_attention (SDPA autocast to
# bf16, then index_copy_ into an fp32 buffer). The library has since computed that op in fp32 under
# autocast; --dtype bf16 has not been timed on a GPU here.

# --quick: a CPU smoke test of every code path (the model learns little in 40 steps).
QUICK = dict(
    layers=2, hidden=64, heads=4, kv_heads=2, seq_len=128, segment_len=32, sinks=2, steps=30,
    batch_size=4, pairs=8, queries=6, eval_batches=2, log_every=10, threads=1,
)

# --cpu-defaults: a run on a CPU in which the model learns (see the docstring): keyed values (16
# values per key, chance 1/16), 2 layers x 64 (4 heads, 4 KV heads: fraction(0.25) is KV head 0 of
# each layer), N=256 in 4 segments of 64, 1200 steps of batch 32, one thread.
CPU_DEFAULTS = dict(
    layers=2, hidden=64, heads=4, kv_heads=4, intermediate=128, seq_len=256, segment_len=64, sinks=2,
    long_range=0.25, pairs=12, queries=8, num_filler=16, num_keys=16, num_values=256, values_per_key=16,
    steps=1200, batch_size=32, lr=1e-3, eval_batches=8, log_every=100, threads=1,
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=None, help="MLP width (default 4 * hidden)")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--segment-len", type=int, default=256)
    p.add_argument("--tail-len", type=int, default=None, help="default: the segment length")
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--long-range", type=float, default=0.25, help="fraction of KV heads that see the whole history")
    p.add_argument("--pairs", type=int, default=64, help="key-value pairs per sequence")
    p.add_argument("--queries", type=int, default=32, help="questions per sequence")
    p.add_argument("--num-filler", type=int, default=64, help="filler tokens in the vocabulary")
    p.add_argument("--num-keys", type=int, default=64, help="key tokens in the vocabulary")
    p.add_argument("--num-values", type=int, default=64, help="value tokens in the vocabulary")
    p.add_argument("--values-per-key", type=int, default=None,
                   help="keyed values: key k takes its value from its own block of this many (--num-values must be "
                        "--num-keys times this); default: every key draws from all values (see segcompile/testing/recall_task.py)")
    p.add_argument("--steps", type=int, default=550, help="training steps per regime (550: all regimes in < 10 min on an H100)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate (linear warmup, cosine to 10%%)")
    p.add_argument("--warmup", type=int, default=None, help="warmup steps (default 5%% of --steps)")
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="fp32 (TF32 matmuls on CUDA) or bf16 autocast; why fp32 is the default: see the note above MiB")
    p.add_argument("--regimes", nargs="+", choices=REGIMES, default=list(REGIMES))
    p.add_argument("--log-every", type=int, default=None, help="print the loss every N steps (default steps / 10)")
    p.add_argument("--eval-every", type=int, default=None,
                   help="also evaluate on the held-out set every N steps: accuracy against steps (not counted in train time)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's; --quick and --cpu-defaults: 1)")
    p.add_argument("--save-models", type=Path, default=None,
                   help="write each trained model's weights (<regime>.safetensors) and the run's settings (run.json) to this folder")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--quick", action="store_true", help="tiny settings for a smoke test, on CPU unless --device says otherwise (overrides the size and step flags)")
    p.add_argument("--cpu-defaults", action="store_true",
                   help="defaults for a run that learns on a CPU (see CPU_DEFAULTS), on CPU unless --device says otherwise; "
                        "flags given with it override its values")
    args = p.parse_args(argv)
    if args.quick and args.cpu_defaults:
        p.error("--quick and --cpu-defaults are two presets: give one")
    if args.cpu_defaults:
        p.set_defaults(**CPU_DEFAULTS)
        args = p.parse_args(argv)
    if args.quick:
        for name, value in QUICK.items():
            setattr(args, name, value)
    if args.quick or args.cpu_defaults:
        args.device = "cpu" if args.device == "auto" else args.device
    args.intermediate = args.intermediate or 4 * args.hidden
    args.warmup = args.warmup if args.warmup is not None else max(1, args.steps // 20)
    args.log_every = args.log_every or max(1, args.steps // 10)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available")
    if "full->seg" in args.regimes and "full" not in args.regimes:
        p.error("full->seg evaluates the model the full regime trains: keep 'full' in --regimes")
    try:
        recall_task.check_sizes(args.seq_len, args.pairs, args.queries, vocab_of(args))
        segment_config(args, 1)
    except (ValueError, sc.SegcompileError) as e:
        p.error(str(e))
    return args


def vocab_of(args) -> recall_task.RecallVocab:
    return recall_task.RecallVocab(
        num_filler=args.num_filler, num_keys=args.num_keys, num_values=args.num_values, values_per_key=args.values_per_key,
    )


def segment_config(args, tbptt_k: int) -> sc.SegmentConfig:
    return sc.SegmentConfig(
        args.segment_len, tail_len=args.tail_len, sink_tokens=args.sinks,
        long_range=sc.HeadPlan.fraction(args.long_range), tbptt_k=tbptt_k,
    )


def model_config(args, vocab_size: int):
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.seq_len, attn_implementation="sdpa", tie_word_embeddings=False,
    )


def build_model(args, vocab_size: int, device: torch.device):
    """The same random-init Llama-style decoder for every regime (seeded)."""
    import transformers

    config = model_config(args, vocab_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        model = transformers.LlamaForCausalLM(config)
    return model.to(device).eval()  # no dropout in this config; eval mode is what segcompile captures


def lr_lambda(args):
    def at(step: int) -> float:
        if step < args.warmup:
            return (step + 1) / args.warmup
        progress = (step - args.warmup) / max(1, args.steps - args.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return at


def train(name: str, model, backward, args, device, probes: dict | None = None, eval_set=None) -> dict:
    """Train ``model`` for ``args.steps`` steps; ``backward(ids, labels)`` accumulates gradients and returns the loss.
    With ``--eval-every``, ``probes`` (regime -> logits of ids) are evaluated on ``eval_set`` every so many
    steps: ``accuracy_curves`` (regime -> [step, accuracy, by segments back]), their time left out of the
    training time."""
    data = torch.Generator().manual_seed(args.seed)  # the same batches for every regime
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    curve, window, cpu_peak = [], [], None
    probes = probes if args.eval_every else {}
    accuracy_curves, probing = {regime: [] for regime in probes}, 0.0
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for step in range(args.steps):
        ids, labels, _ = recall_task.batch(data, args.batch_size, args.seq_len, pairs=args.pairs, queries=args.queries, vocab=vocab_of(args))
        ids, labels = ids.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            if device.type == "cpu" and step == min(1, args.steps - 1):
                loss, cpu_peak = _cpu_step_peak(lambda: backward(ids, labels))
            else:
                loss = backward(ids, labels)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        window.append(float(loss))
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            curve.append([step + 1, sum(window) / len(window)])
            window = []
            print(f"  {name:<9} step {step + 1:>5}/{args.steps}  loss {curve[-1][1]:.4f}  {time.perf_counter() - start - probing:6.1f}s", flush=True)
        if args.eval_every and ((step + 1) % args.eval_every == 0 or step + 1 == args.steps):
            began = time.perf_counter()
            for regime, logits_of in probes.items():
                e = evaluate(logits_of, eval_set, args, device)
                accuracy_curves[regime].append([step + 1, e["accuracy"], e["accuracy_by_segments_back"]])
                print(f"  {regime:<9} step {step + 1:>5}: held-out accuracy {e['accuracy']:.3f}", flush=True)
            probing += time.perf_counter() - began
    _sync(device)
    seconds = time.perf_counter() - start - probing
    peak = torch.cuda.max_memory_allocated(device) / MiB if device.type == "cuda" else cpu_peak
    trained = {"train_seconds": seconds, "train_step_ms": 1000 * seconds / max(1, args.steps), "train_peak_mib": peak, "loss_curve": curve}
    return trained, accuracy_curves


def _cpu_step_peak(step):
    """``(step(), peak MiB)``: the most tensor memory held at once during ``step`` beyond what was held
    before it, from the profiler's CPU memory events (each op's allocations net of its own frees, in
    start order; so a transient inside one op is not seen). CPU has no allocator statistics."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = step()
    held = top = 0
    for e in sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start):
        held += e.self_cpu_memory_usage
        top = max(top, held)
    return out, top / MiB


def full_backward(model):
    def backward(ids, labels):
        logits = model(input_ids=ids, use_cache=False).logits
        loss = span_loss(logits, labels, 0) / max(label_count(labels), 1)  # the loss tbptt_backward uses
        loss.backward()
        return loss.detach()

    return backward


@torch.no_grad()
def evaluate(logits_of, eval_set, args, device) -> dict:
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    hits, buckets = [], []
    _sync(device)
    start = time.perf_counter()
    for ids, labels, distances in eval_set:
        with autocast:
            logits = logits_of(ids.to(device))
        hits.append(recall_task.correct(logits, labels.to(device), args.queries).cpu().flatten())
        buckets.append((distances // args.segment_len).flatten())
    _sync(device)
    seconds = time.perf_counter() - start
    hits, buckets = torch.cat(hits).float(), torch.cat(buckets)
    by_bucket = {str(int(b)): hits[buckets == b].mean().item() for b in buckets.unique()}
    counts = {str(int(b)): int((buckets == b).sum()) for b in buckets.unique()}
    return {"accuracy": hits.mean().item(), "accuracy_by_segments_back": by_bucket, "answers_by_segments_back": counts,
            "eval_seconds": seconds}


def main(argv=None) -> dict:
    args = parse_args(argv)
    # --quick, --cpu-defaults: these tensors are too small to split: one thread is as fast, and it
    # does not collapse (measured 12 ms vs 400-600 ms a step) when another process holds one of two cores.
    with torch_threads(args.threads):
        return run(args, argv)


@contextlib.contextmanager
def torch_threads(threads: int | None):
    """torch's CPU threads set to ``threads`` (None: left as they are) inside, restored after."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def held_out_set(args, vocab) -> list:
    """The fixed evaluation batches of a run's config (also what bench/head_plans.py scores on)."""
    held_out = torch.Generator().manual_seed(args.seed + EVAL_SEED_OFFSET)
    return [
        recall_task.batch(held_out, args.batch_size, args.seq_len, pairs=args.pairs, queries=args.queries, vocab=vocab)
        for _ in range(args.eval_batches)
    ]


def run(args, argv) -> dict:
    device = torch.device(args.device)
    if device.type == "cuda" and args.dtype == "fp32":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls: fp32 accuracy is not what this measures
        torch.backends.cudnn.allow_tf32 = True
    vocab = vocab_of(args)
    eval_set = held_out_set(args, vocab)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{device_name}: {args.layers} layers, hidden {args.hidden}, {args.heads} heads / {args.kv_heads} KV heads; "
          f"N={args.seq_len}, S={args.segment_len}, {args.steps} steps x batch {args.batch_size}, {args.dtype}", flush=True)

    results: dict[str, dict] = {}
    if "full" in args.regimes:
        model = build_model(args, vocab.size, device)
        probes = {"full": lambda ids: model(input_ids=ids, use_cache=False).logits}
        if "full->seg" in args.regimes:  # the program shares the model's parameters: it sees every update
            seg = sc.transform(model, segment_config(args, 1))
            probes["full->seg"] = lambda ids: seg(ids).logits
        trained, curves = train("full", model, full_backward(model), args, device, probes, eval_set)
        for name, logits_of in probes.items():
            results[name] = {**trained, **({"shares_training_with": "full"} if name != "full" else {}),
                             **evaluate(logits_of, eval_set, args, device), **_accuracy_curve(curves, name)}
        save_model(model, "full", args, vocab)
        del model, probes
    for k in (1, 0):
        name = f"seg k={k}"
        if name not in args.regimes:
            continue
        model = build_model(args, vocab.size, device)
        seg = sc.transform(model, segment_config(args, k))
        probes = {name: lambda ids: seg(ids).logits}
        trained, curves = train(name, model, seg.tbptt_backward, args, device, probes, eval_set)
        results[name] = {**trained, **evaluate(probes[name], eval_set, args, device), **_accuracy_curve(curves, name)}
        save_model(model, name, args, vocab)
        del model, seg

    report = {
        "benchmark": "tbptt_regimes",
        "command": recorded_command(argv if argv is not None else sys.argv[1:]),
        "device": device_name,
        "torch": torch.__version__,
        "tf32_matmuls": bool(device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32),
        "config": config_of(args),
        "chance_accuracy": vocab.chance,
        "peak_memory": ("torch.cuda.max_memory_allocated over the regime's training" if device.type == "cuda" else
                        "tensor memory held at once in training step 2's forward+backward beyond what was held before it "
                        "(profiler CPU memory events)"),
        "regimes": results,
    }
    print_table(report, args)
    stem = "tbptt_regimes-" + ("quick-" if args.quick else "") + device_name.replace(" ", "_")
    if args.save_models is not None:
        args.save_models.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.save_models / "run.json", json.dumps({k: report[k] for k in ("command", "device", "torch", "config")}, indent=1) + "\n")
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / f"{stem}.json", json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out / f'{stem}.json'}")
    plot(report, args.out / f"{stem}.png")
    return report


def _accuracy_curve(curves: dict, name: str) -> dict:
    """``{"accuracy_curve": [[step, accuracy, by segments back], ...]}`` where --eval-every made one."""
    return {"accuracy_curve": curves[name]} if curves.get(name) else {}


def recorded_command(argv: list[str]) -> str:
    """The command line that reruns this experiment, quoted for a shell, less ``--out`` (where one
    run wrote is that machine's business)."""
    return quality_report.recorded_command("bench/tbptt_regimes.py", argv, {"--out"})


def config_of(args) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("out", "regimes", "save_models")}


def model_file(name: str) -> str:
    """``seg k=1`` -> ``seg_k1.safetensors``."""
    return name.replace(" ", "_").replace("=", "") + ".safetensors"


def save_model(model, name: str, args, vocab) -> None:
    if args.save_models is None:
        return
    from safetensors.torch import save

    from segcompile.files import atomic_write_bytes

    args.save_models.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(args.save_models / model_file(name), save(tensors, metadata={"regime": name, "vocab_size": str(vocab.size)}))


def load_model(folder: Path, name: str, device: torch.device | str = "cpu"):
    """The model ``--save-models`` wrote for regime ``name``, with the run's settings: ``(model, args)``."""
    from safetensors.torch import load_file

    run = json.loads((Path(folder) / "run.json").read_text())
    args = argparse.Namespace(**run["config"])
    model = build_model(args, vocab_of(args).size, torch.device("cpu"))
    model.load_state_dict(load_file(str(Path(folder) / model_file(name))))
    return model.to(device).eval(), args


def print_table(report, args) -> None:
    from rich.console import Console
    from rich.table import Table

    buckets = sorted({int(b) for r in report["regimes"].values() for b in r["accuracy_by_segments_back"]})
    table = Table(title=f"answer accuracy by segments back (S={args.segment_len}); chance {report['chance_accuracy']:.3f}")
    table.add_column("regime")
    for b in buckets:
        table.add_column(str(b), justify="right")
    for column in ("all", "train s", "ms/step", "peak MiB"):
        table.add_column(column, justify="right")
    for name, r in report["regimes"].items():
        acc = r["accuracy_by_segments_back"]
        peak = "-" if r["train_peak_mib"] is None else f"{r['train_peak_mib']:.0f}"
        shared = name == "full->seg"  # trained once with "full"
        table.add_row(
            name, *[f"{acc[str(b)]:.3f}" if str(b) in acc else "-" for b in buckets], f"{r['accuracy']:.3f}",
            "(full)" if shared else f"{r['train_seconds']:.1f}", "(full)" if shared else f"{r['train_step_ms']:.0f}",
            "(full)" if shared else peak,
        )
    Console(width=max(100, 12 * (len(buckets) + 6))).print(table)


def plot(report, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    curves = {name: r["accuracy_curve"] for name, r in report["regimes"].items() if r.get("accuracy_curve")}
    fig, axes = plt.subplots(1, 2 if curves else 1, figsize=(13 if curves else 7, 4.5), squeeze=False)
    ax = axes[0][0]
    for name, r in report["regimes"].items():
        points = sorted((int(b), a) for b, a in r["accuracy_by_segments_back"].items())
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"{name} (all {r['accuracy']:.2f})")
    ax.axhline(report["chance_accuracy"], color="grey", linestyle="--", linewidth=1, label="chance")
    c = report["config"]
    ax.set_xlabel(f"answer distance in segments (S={c['segment_len']})")
    ax.set_ylabel("answer accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"recall, N={c['seq_len']}, {c['layers']} layers x {c['hidden']}, {c['steps']} steps ({report['device']})", fontsize=9)
    ax.legend(fontsize=8)
    if curves:
        ax = axes[0][1]
        for name, curve in curves.items():
            ax.plot([p[0] for p in curve], [p[1] for p in curve], marker=".", label=name)
        ax.axhline(report["chance_accuracy"], color="grey", linestyle="--", linewidth=1, label="chance")
        ax.set_xlabel("training step")
        ax.set_ylabel("held-out answer accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title("accuracy against steps", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    main()
