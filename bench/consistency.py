"""Train-inference consistency on a real model: SmolLM2-135M fine-tuned on long real text with full
attention and with segcompile's segmented training, then evaluated segmented and in full.

The claim (the paper's): a model trained with the segmented execution it is served with (gradients
through the previous segments' carried K/V only, long-range heads reading detached history) matches
full attention under segmented inference, while a full-attention model run segmented loses quality.

Regimes (same tokens, steps, learning rate and seed for every trained one):

    a    the pretrained model, full attention
    b    the pretrained model, run segmented (no training)
    a'   fine-tuned with full attention, evaluated with full attention
    c    the same fine-tuned model (a'), evaluated segmented
    d    fine-tuned with segcompile TBPTT K = 1 under the plan, evaluated segmented
    e    as d with K = 0 (the carried tail a constant, as Transformer-XL)
    f    as d with K = 2

Segmented means ``sc.transform`` with S = T = ``--segment-len`` (1024), 4 sinks and the long-range
plan ``results/plans/1_3-gate-answer.json`` (the gate at the answer rows, a third of the KV heads:
the best method of ``head_selection.py``), checked against the model's fingerprint before any work.
The model is captured once; each regime transforms that one graph, so every program shares the one
model object's parameters, which are reset to the pretrained weights (kept on the CPU) before each
fine-tuning run.

Data: the Python standard library's top-level modules, one document per file, split by
``segcompile.quality.texts`` (a hash of the name): training draws ``--seq-len``-token windows of the
``calibration`` split (each window inside one document; every non-overlapping window of every long
enough file), in an order drawn from the seed, epoch after epoch; evaluation uses the ``heldout``
split only (the first ``--seq-len`` tokens of each long enough file). Training: fp32 master weights,
bf16 autocast on CUDA (fp32 on the CPU), AdamW, linear warmup then cosine decay to a tenth of
``--lr``, gradient-norm clip 1; full attention is the model's own forward with labels (SDPA),
segmented training is ``seg.tbptt_backward(ids, labels)``.

Metrics per regime: held-out perplexity overall and by distance band (``segment 0``, ``1 back``,
``2+ back``: ``segcompile.quality.measure_perplexity``) and passkey accuracy at 4K and 8K
(``measure_passkey``, teacher forcing); per training run: tokens/s, seconds per step, peak memory
(``torch.cuda.max_memory_allocated``; none on the CPU), the training loss of every step and the
held-out loss every ``--eval-every`` steps, with full attention and segmented.

    PYTHONPATH=. python bench/consistency.py --max-minutes 9     # repeat until it prints "complete"
    PYTHONPATH=. python bench/consistency.py --report-only       # the table and plot of the result file
    PYTHONPATH=. python bench/consistency.py --tiny --device cpu # the CPU smoke run (~1 min)

**Resumable.** The work is a list of units (the pretrained evaluations, then per seed the runs
full, K = 1, K = 0, K = 2, each trained then evaluated). ``--max-minutes M`` starts no step,
held-out point or evaluation that would end past M minutes after the process started (less the
time a checkpoint takes to save); it then saves the run in progress (model, AdamW state, step,
curves) and exits. The same command continues where it stopped. Progress lives in
``--state-dir`` (default ``segcompile-out/consistency-<device>/``, outside version control:
``progress.json`` and ``checkpoint/``, ~1.6 GB for SmolLM2: weights and two AdamW moments in fp32);
the result file is written beside it after every unit. A machine that lost the state dir starts
again from the result file: finished units are kept, a run whose checkpoint is gone restarts from
step 0 (recorded under ``restarts``). Each invocation's wall time from process start is recorded;
their sum is ``device_seconds_total``. The settings that define the experiment must match the
saved ones (``--restart`` discards them); ``--max-minutes``, ``--stop-after-steps`` and the paths
may change between invocations.

**Budget (one H200, the whole experiment, results/consistency-NVIDIA_H200.json).** Per step of
one 8K-token sequence, bf16 autocast, the step graph eager: full attention 0.11 s (~70,000
tokens/s, peak 13.4 GiB); segmented, 8 segments of 1024: K = 0 1.4 s, K = 1 2.2 s (3,700-3,800
tokens/s, peak 5.0 GiB), K = 2 2.7 s: the 30 thin layers make each segment launch-bound
(bench/README.md, the training profile). Per seed at 80 steps ~525 s of training, ~2 s a held-out
point after the first (16 s: Triton's first compiles), ~10 s a final evaluation; in all 1,455 s
(24.3 minutes) in three invocations of --max-minutes 8.8, 9.3 and 7.6, ~50 s of start-up each
(imports, dequantising the GGUF file, capture, tokenizing) and ~5 s per checkpoint saved: under the
25 minutes. The script prints the measured seconds per step of every run and the training time
left at those speeds.
"""

from __future__ import annotations

import time

PROCESS_STARTED = time.monotonic()  # before the heavy imports: an invocation's time counts them

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
from typing import NamedTuple  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

import segcompile as sc  # noqa: E402
from segcompile import quality  # noqa: E402
from segcompile.files import atomic_write_text  # noqa: E402
from segcompile.plan import model_fingerprint  # noqa: E402
from segcompile.pretrained import SMOLLM2, load_pretrained  # noqa: E402
from segcompile.quality import report  # noqa: E402
from segcompile.quality.texts import STDLIB, encode  # noqa: E402
from segcompile.reference.sdpa_hook import kv_heads_per_layer  # noqa: E402
from segcompile.runtime.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PLAN_FILE = RESULTS / "plans" / "1_3-gate-answer.json"
FORMAT = "segcompile.bench.consistency"
VERSION = 1

# training name -> tbptt_k (None: full attention), in the order they run for each seed
TRAININGS = {"full": None, "tbptt-k1": 1, "tbptt-k0": 0, "tbptt-k2": 2}
# regime -> (training, evaluated as), as in the module's docstring
REGIMES = {
    "a": (None, "full"), "b": (None, "segmented"),
    "a'": ("full", "full"), "c": ("full", "segmented"),
    "d": ("tbptt-k1", "segmented"), "e": ("tbptt-k0", "segmented"), "f": ("tbptt-k2", "segmented"),
}
REGIME_TEXT = {
    "a": "pretrained, full attention", "b": "pretrained, segmented",
    "a'": "fine-tuned full, evaluated full", "c": "fine-tuned full, evaluated segmented",
    "d": "fine-tuned TBPTT K=1, segmented", "e": "fine-tuned TBPTT K=0, segmented",
    "f": "fine-tuned TBPTT K=2, segmented",
}
MIN_LR_SHARE = 0.1  # the cosine decay ends at this share of --lr
DATA_SEED_STRIDE = 1_000_003  # epoch e of seed s is the permutation drawn from s * stride + e
# Cost guesses before anything is measured in this invocation (the first step of a run also
# compiles kernels): a unit is started only when this much time is left.
FIRST_STEP_GUESS_S = {"cuda": 45.0, "cpu": 10.0}
EVAL_GUESS_S = {"cuda": 60.0, "cpu": 10.0}
SAVE_BYTES_PER_S = 2e8  # a checkpoint's write and hash, for the reserve before a save is measured
# seconds per step of one 8K sequence on an H200, as estimated in the docstring
ASSUMED_H200_STEP_S = {"full": 0.15, "tbptt-k1": 1.3, "tbptt-k0": 1.0, "tbptt-k2": 1.6}

GPU_DEFAULTS = dict(
    seq_len=8192, segment_len=1024, sinks=4, steps=80, batch_size=1, lr=3e-5, warmup=8, seeds=[0, 1],
    eval_every=10, curve_sequences=4, ppl_sequences=10, passkey_lengths=[4096, 8192], passkey_trials=8,
    layers=None,
)
TINY_DEFAULTS = dict(
    seq_len=512, segment_len=128, sinks=4, steps=2, batch_size=1, lr=1e-5, warmup=1, seeds=[0],
    eval_every=2, curve_sequences=1, ppl_sequences=1, passkey_lengths=[512], passkey_trials=1,
    layers=4,
)
# the settings that define the experiment: a resumed invocation must have the same
EXPERIMENT_KEYS = (*GPU_DEFAULTS, "tiny", "device_type", "dtype", "compile", "plan_file", "plan_sha256")


# ---- settings ---------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true",
                   help="CPU smoke run: the first 4 layers, 512-token sequences, S = 128, 2 steps, one seed")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    for name, value in GPU_DEFAULTS.items():
        if name == "layers":
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, list):
            p.add_argument(flag, type=type(value[0]), nargs="+", default=None, help=f"default {value} (--tiny: {TINY_DEFAULTS[name]})")
        else:
            p.add_argument(flag, type=type(value), default=None, help=f"default {value} (--tiny: {TINY_DEFAULTS[name]})")
    p.add_argument("--compile", action="store_true", help="run the segment step under torch.compile (seg.compile())")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="stop, saving the state, before this many minutes after the process started")
    p.add_argument("--stop-after-steps", type=int, default=None,
                   help="stop, saving the state, after this many training steps in this invocation")
    p.add_argument("--out", type=Path, default=None, help="result file (default results/consistency-<device>.json)")
    p.add_argument("--state-dir", type=Path, default=None,
                   help="progress and checkpoint (default segcompile-out/consistency-<device>/)")
    p.add_argument("--restart", action="store_true", help="discard the saved progress and start again")
    p.add_argument("--report-only", action="store_true", help="run nothing: print the table and draw the plot")
    return p


def settings_of(args: argparse.Namespace) -> dict:
    """The experiment's settings: the defaults (GPU or ``--tiny``) with the flags given."""
    defaults = TINY_DEFAULTS if args.tiny else GPU_DEFAULTS
    settings = {name: (getattr(args, name, None) if getattr(args, name, None) is not None else value)
                for name, value in defaults.items()}
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    settings.update(tiny=args.tiny, device_type=device.type, dtype="bf16" if device.type == "cuda" else "fp32",
                    compile=args.compile, plan_file=_shown(PLAN_FILE), plan_sha256=_sha256(PLAN_FILE))
    if settings["steps"] < 1 or settings["batch_size"] < 1 or settings["eval_every"] < 1:
        raise SystemExit("--steps, --batch-size and --eval-every must be at least 1")
    if settings["seq_len"] <= settings["segment_len"]:
        raise SystemExit("--seq-len must be longer than --segment-len: a single segment is full attention")
    return settings


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).replace(" ", "_")
    return "cpu"


# ---- time limit -------------------------------------------------------------------------------------
class Deadline:
    """When this invocation stops: ``max_minutes`` after the process started, keeping back the time
    a checkpoint takes to save, or after ``max_steps`` training steps."""

    def __init__(self, max_minutes: float | None, max_steps: int | None, save_seconds: float,
                 clock=time.monotonic, started: float | None = None):
        self.limit = None if max_minutes is None else 60.0 * max_minutes
        self.max_steps = max_steps
        self.save_seconds = save_seconds
        self.steps = 0
        self.clock = clock
        self.started = clock() if started is None else started
        self.reason: str | None = None

    def elapsed(self) -> float:
        return self.clock() - self.started

    def allows(self, seconds: float, what: str, step: bool = False) -> bool:
        """Whether ``what``, expected to take ``seconds``, can start; remembers why not."""
        if step and self.max_steps is not None and self.steps >= self.max_steps:
            self.reason = f"{self.max_steps} training steps done in this invocation (--stop-after-steps)"
        elif self.limit is not None and self.elapsed() + seconds + self.save_seconds > self.limit:
            self.reason = (f"{what} (~{seconds:.0f} s) would end past --max-minutes "
                           f"({self.elapsed():.0f} s spent, {self.save_seconds:.0f} s kept to save)")
        else:
            return True
        return False

    def measured_save(self, seconds: float) -> None:
        self.save_seconds = max(self.save_seconds, 1.5 * seconds)


# ---- data -------------------------------------------------------------------------------------------
class Window(NamedTuple):
    """``ids`` = tokens ``[start, start + len(ids))`` of one training document."""

    document: str
    start: int
    ids: torch.Tensor


def training_windows(tokenizer, length: int) -> list[Window]:
    """Every non-overlapping ``length``-token window of every calibration-split standard-library
    module: never two documents in one window, never a held-out document."""
    windows = []
    for document in quality.documents("calibration", sources=(STDLIB,)):
        if document.path.stat().st_size < length:  # a token covers at least one byte
            continue
        ids = encode(tokenizer, document.text())
        windows += [Window(document.name, start, torch.tensor(ids[start:start + length], dtype=torch.long))
                    for start in range(0, len(ids) - length + 1, length)]
    if not windows:
        raise SystemExit(f"no calibration document of this Python's standard library has {length} tokens")
    return windows


def window_indices(count: int, seed: int, step: int, batch: int) -> list[int]:
    """The windows of step ``step`` (0-based): the training order is a permutation of the ``count``
    windows per epoch, drawn from ``seed`` and the epoch, so a resumed run needs no data state."""
    out = []
    for position in range(step * batch, (step + 1) * batch):
        epoch, index = divmod(position, count)
        out.append(_epoch_order(count, seed, epoch)[index])
    return out


@functools.cache
def _epoch_order(count: int, seed: int, epoch: int) -> tuple[int, ...]:
    generator = torch.Generator().manual_seed(seed * DATA_SEED_STRIDE + epoch)
    return tuple(torch.randperm(count, generator=generator).tolist())


def describe_windows(windows: list[Window], settings: dict) -> dict:
    documents = sorted({w.document for w in windows})
    tokens_trained = settings["steps"] * settings["batch_size"] * settings["seq_len"]
    return {"split": "calibration", "sources": [STDLIB], "windows": len(windows), "documents": len(documents),
            "tokens": len(windows) * settings["seq_len"], "epochs_per_run": tokens_trained / (len(windows) * settings["seq_len"]),
            "document_names": documents}


class EvalSet(NamedTuple):
    """What every regime is measured on: held-out sequences and passkey prompts."""

    perplexity: list  # [TextSequence], the held-out split
    curve: list  # the first few of them: the held-out loss during training
    passkey: list  # [PasskeyPrompt]


def evaluation_set(tokenizer, settings: dict) -> EvalSet:
    sequences = quality.token_sequences(tokenizer, settings["seq_len"], settings["ppl_sequences"], "heldout",
                                        sources=(STDLIB,))
    if len(sequences) < settings["curve_sequences"]:
        raise SystemExit(f"only {len(sequences)} held-out documents have {settings['seq_len']} tokens; "
                         "lower --curve-sequences or --seq-len")
    prompts = quality.passkey_prompts(tokenizer, settings["passkey_lengths"], settings["passkey_trials"], seed=0)
    return EvalSet(sequences, sequences[: settings["curve_sequences"]], prompts)


# ---- model and plan ---------------------------------------------------------------------------------
def load_model(settings: dict, device: torch.device):
    """SmolLM2 in fp32 (``--tiny``: its first layers only), its tokenizer, and the fingerprint of
    the whole model (what the plan file is checked against)."""
    model, tokenizer = load_pretrained(SMOLLM2, dtype=torch.float32)
    whole = model_fingerprint(type(model).__name__, kv_heads_per_layer(model))
    if settings["layers"] is not None:
        model.model.layers = model.model.layers[: settings["layers"]]
        model.config.num_hidden_layers = settings["layers"]
    return model.to(device).eval(), tokenizer, whole


def load_plan(model, settings: dict, full_fingerprint: dict) -> sc.HeadPlan:
    """The plan file, refused (``PlanError``) unless it was made for this model; with ``--tiny``
    cut to the layers kept (the cut plan carries the cut model's fingerprint)."""
    plan = sc.HeadPlan.load(PLAN_FILE)
    plan.resolve(full_fingerprint["kv_heads"], architecture=full_fingerprint["architecture"])
    if settings["layers"] is None:
        return plan
    kv = kv_heads_per_layer(model)
    return sc.HeadPlan.from_dict({l: h for l, h in plan.heads.items() if l < len(kv)}, method=plan.method,
                                 fingerprint=model_fingerprint(type(model).__name__, kv),
                                 extra={"cut_from": _shown(PLAN_FILE), "layers": len(kv)})


def segment_config(settings: dict, plan: sc.HeadPlan, tbptt_k: int = 1) -> sc.SegmentConfig:
    return sc.SegmentConfig(segment_len=settings["segment_len"], tail_len=settings["segment_len"],
                            sink_tokens=settings["sinks"], long_range=plan, tbptt_k=tbptt_k)


class Programs:
    """The model, its one capture, and a segmented program per K made from it on demand."""

    def __init__(self, model, settings: dict, plan: sc.HeadPlan):
        self.model, self.settings, self.plan = model, settings, plan
        self.graph = sc.capture(model)
        self._segmented: dict[int, sc.SegmentedModel] = {}

    def segmented(self, tbptt_k: int = 1) -> sc.SegmentedModel:
        if tbptt_k not in self._segmented:
            seg = sc.transform(self.graph, segment_config(self.settings, self.plan, tbptt_k))
            self._segmented[tbptt_k] = seg.compile() if self.settings["compile"] else seg
        return self._segmented[tbptt_k]

    def program(self, evaluated_as: str):
        return self.model if evaluated_as == "full" else self.segmented()


# ---- measuring --------------------------------------------------------------------------------------
def autocast(settings: dict):
    return torch.autocast(settings["device_type"], dtype=torch.bfloat16, enabled=settings["dtype"] == "bf16")


def evaluate_regime(program, eval_set: EvalSet, settings: dict) -> dict:
    start = time.perf_counter()
    with autocast(settings):
        ppl = quality.measure_perplexity(program, eval_set.perplexity, settings["segment_len"])
        passkey = quality.measure_passkey(program, eval_set.passkey)
    return {"perplexity": ppl.to_json(), "passkey": passkey.to_json(), "seconds": time.perf_counter() - start}


def heldout_point(programs: Programs, eval_set: EvalSet, settings: dict, step: int) -> dict:
    """Held-out mean NLL (nats per token) with full attention and segmented, overall and 2+ back."""
    start = time.perf_counter()
    point = {"step": step}
    with autocast(settings):
        for evaluated_as in ("full", "segmented"):
            result = quality.measure_perplexity(programs.program(evaluated_as), eval_set.curve, settings["segment_len"])
            point[evaluated_as] = {"mean_nll": result.overall.mean_nll,
                                   "2+ back": result.bands["2+ back"].mean_nll}
    point["seconds"] = time.perf_counter() - start
    return point


# ---- training ---------------------------------------------------------------------------------------
def lr_at(step: int, settings: dict) -> float:
    """Linear warmup, then cosine decay to ``MIN_LR_SHARE`` of the peak at the last step: a pure
    function of the step, so a resumed run needs no scheduler state."""
    peak, warmup, steps = settings["lr"], settings["warmup"], settings["steps"]
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - 1 - warmup)
    return peak * (MIN_LR_SHARE + (1 - MIN_LR_SHARE) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def make_optimizer(model, settings: dict) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=settings["lr"], betas=(0.9, 0.95), weight_decay=0.0)


def train_step(programs: Programs, tbptt_k: int | None, ids: torch.Tensor, optimizer, lr: float,
               settings: dict) -> float:
    """One step on ``ids [B, N]``: full attention (the model's own forward with labels) or TBPTT."""
    model = programs.model
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    with autocast(settings):
        if tbptt_k is None:
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
        else:
            loss = programs.segmented(tbptt_k).tbptt_backward(ids, ids)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    value = float(loss.detach())  # a device sync: the step's time is complete
    if not math.isfinite(value):
        raise SystemExit(f"the training loss is {value}; lower --lr")
    return value


# ---- the work ---------------------------------------------------------------------------------------
class Experiment:
    """The units of work and what they need: the model, the programs, the data, the progress
    document and where it is saved."""

    def __init__(self, settings, device, model, tokenizer, plan, windows, eval_set, document, paths, deadline):
        self.settings, self.device, self.model, self.tokenizer = settings, device, model, tokenizer
        self.plan, self.windows, self.eval_set = plan, windows, eval_set
        self.document, self.paths, self.deadline = document, paths, deadline
        self.programs = Programs(model, settings, plan)
        self.pretrained = {name: t.detach().to("cpu", copy=True) for name, t in model.state_dict().items()}
        # what an evaluation and a held-out point take: measured by an earlier invocation, else guessed
        measured = document.setdefault("measured_seconds", {})
        self.eval_guess = 1.2 * measured["evaluation"] if "evaluation" in measured else EVAL_GUESS_S[device.type]
        self.point_guess = 1.3 * measured["heldout_point"] if "heldout_point" in measured else self.eval_guess / 4
        self.progressed = False  # whether this invocation did any unit of work
        self.step_seconds: dict[str, float] = {}  # the longest step of each training in this process

    # -- bookkeeping
    def save(self) -> None:
        invocation = self.document["invocations"][-1]
        invocation["seconds"] = self.deadline.elapsed()
        self.document["device_seconds_total"] = sum(i["seconds"] for i in self.document["invocations"])
        text = json.dumps(self.document, indent=1, allow_nan=False) + "\n"
        for path in (self.paths["progress"], self.paths["out"]):
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, text)

    def measured(self, what: str, seconds: float) -> float:
        """The longest ``what`` so far, ``seconds`` included (kept in the document for the next
        invocation's first guesses)."""
        longest = self.document["measured_seconds"][what] = max(seconds, self.document["measured_seconds"].get(what, 0.0))
        return longest

    def log(self, text: str) -> None:
        print(f"[{self.deadline.elapsed():6.0f} s] {text}", flush=True)

    # -- units
    def run(self) -> bool:
        """Every unit not done yet; False when the deadline stopped it (the state is saved)."""
        if not self.evaluate_pretrained():
            return False
        for seed in self.settings["seeds"]:
            for training, tbptt_k in TRAININGS.items():
                if not self.train_and_evaluate(f"{training}-seed{seed}", training, tbptt_k, seed):
                    return False
        self.document["complete"] = True
        self.save()
        return True

    def evaluate_pretrained(self) -> bool:
        self.model.load_state_dict(self.pretrained)
        regimes = self.document["regimes"]
        if "step0" not in self.document:
            if not self.deadline.allows(self.point_guess, "the pretrained held-out point"):
                return False
            self.document["step0"] = heldout_point(self.programs, self.eval_set, self.settings, 0)
            self.point_guess = 1.3 * self.measured("heldout_point", self.document["step0"]["seconds"])
            self.progressed = True
            self.save()
        for regime in ("a", "b"):
            if regime in regimes:
                continue
            if not self.deadline.allows(self.eval_guess, f"regime {regime}"):
                return False
            self.evaluate(regime, REGIMES[regime][1], seed=None)
        return True

    def evaluate(self, regime: str, evaluated_as: str, seed: int | None) -> dict:
        result = {"regime": regime, "what": REGIME_TEXT[regime], "seed": seed, "evaluated": evaluated_as,
                  **evaluate_regime(self.programs.program(evaluated_as), self.eval_set, self.settings)}
        self.eval_guess = 1.2 * self.measured("evaluation", result["seconds"])
        self.progressed = True
        bands = result["perplexity"]["bands"]
        by_length = result["passkey"]["by_length"]
        self.log(f"{regime:<3} {REGIME_TEXT[regime]:<38} ppl {result['perplexity']['overall']['perplexity']:.3f} "
                 f"(2+ back {bands['2+ back']['perplexity']:.3f}); passkey "
                 + ", ".join(f"{n}: {a['correct']}/{a['trials']}" for n, a in by_length.items())
                 + f" ({result['seconds']:.0f} s)")
        self.document["regimes"][f"{regime}-seed{seed}" if seed is not None else regime] = result
        self.save()
        return result

    def train_and_evaluate(self, name: str, training: str, tbptt_k: int | None, seed: int) -> bool:
        runs = self.document["runs"]
        run = runs.get(name)
        wanted = [r for r, (t, _) in REGIMES.items() if t == training]
        if run is not None and run["status"] == "done":
            return True
        optimizer = make_optimizer(self.model, self.settings)
        run = self.resume_or_start(name, training, tbptt_k, seed, optimizer)
        if not self.train(run, name, tbptt_k, seed, optimizer):
            return self.stop_inside(run, optimizer)
        for regime in wanted:
            if f"{regime}-seed{seed}" in self.document["regimes"]:
                continue
            if not self.deadline.allows(self.eval_guess, f"regime {regime} of {name}"):
                return self.stop_inside(run, optimizer)
            self.evaluate(regime, REGIMES[regime][1], seed)
        run["status"] = "done"
        shutil.rmtree(self.paths["checkpoint"], ignore_errors=True)
        self.save()
        return True

    def resume_or_start(self, name, training, tbptt_k, seed, optimizer) -> dict:
        """The run's record, its model and optimizer state from the checkpoint, or a fresh start
        from the pretrained weights (also when a checkpoint it needs is gone)."""
        run = self.document["runs"].get(name)
        if run is not None and run["step"] > 0:
            if self.load_checkpoint(name, run, optimizer):
                self.log(f"{name}: resumed at step {run['step']}")
                return run
            self.document.setdefault("restarts", []).append(
                {"run": name, "lost_steps": run["step"], "why": "no checkpoint of this run in the state dir"})
            for regime in (r for r, (t, _) in REGIMES.items() if t == training):
                self.document["regimes"].pop(f"{regime}-seed{seed}", None)
            self.log(f"{name}: its checkpoint is gone, restarting from step 0")
        self.model.load_state_dict(self.pretrained)
        torch.manual_seed(seed)
        run = {"training": training, "tbptt_k": tbptt_k, "seed": seed, "status": "training", "step": 0,
               "train_loss": [], "step_seconds": [], "heldout": [dict(self.document["step0"], step=0)],
               "peak_memory_bytes": None}
        self.document["runs"][name] = run
        return run

    def load_checkpoint(self, name: str, run: dict, optimizer) -> bool:
        path = self.paths["checkpoint"]
        if not (path / "trainer.json").is_file():
            return False
        trainer = json.loads((path / "trainer.json").read_text())
        if trainer.get("extra", {}).get("run") != name or trainer.get("step") != run["step"]:
            return False
        start = time.perf_counter()
        load_checkpoint(path, self.model, optimizer)
        self.log(f"{name}: checkpoint loaded ({time.perf_counter() - start:.0f} s)")
        return True

    def train(self, run: dict, name: str, tbptt_k: int | None, seed: int, optimizer) -> bool:
        """Steps ``run["step"]`` .. ``steps`` with held-out points; False when the deadline stops it."""
        settings = self.settings
        if run.get("heldout_pending") and self.deadline.allows(self.point_guess, f"the held-out point of {name}"):
            del run["heldout_pending"]
            self.heldout(run, name)
        self.reset_memory()
        step_guess = self.first_step_guess(run["training"])
        while run["step"] < settings["steps"] and "heldout_pending" not in run:
            if not self.deadline.allows(step_guess, f"step {run['step'] + 1} of {name}", step=True):
                return False
            ids = self.batch(seed, run["step"])
            start = time.perf_counter()
            loss = train_step(self.programs, tbptt_k, ids, optimizer, lr_at(run["step"], settings), settings)
            run["step_seconds"].append(time.perf_counter() - start)
            run["train_loss"].append(loss)
            run["step"] += 1
            self.deadline.steps += 1
            self.progressed = True
            step_guess = 1.3 * max(run["step_seconds"][-3:])
            self.step_seconds[run["training"]] = max(run["step_seconds"][-1], self.step_seconds.get(run["training"], 0.0))
            self.record_memory(run)
            if run["step"] % settings["eval_every"] == 0 or run["step"] == settings["steps"]:
                run["heldout_pending"] = True
                if not self.deadline.allows(self.point_guess, f"the held-out point at step {run['step']} of {name}"):
                    return False
                del run["heldout_pending"]
                self.heldout(run, name)
        if "heldout_pending" in run:
            return False
        self.summarise(run, name)
        self.save()
        return True

    def first_step_guess(self, training: str) -> float:
        """A run's first step in this process: as long as its training's steps were (1.3x), else
        three times the longest step of another training (the kernels are compiled by then), else
        the guess for a fresh process."""
        if training in self.step_seconds:
            return 1.3 * self.step_seconds[training]
        if self.step_seconds:
            return 3.0 * max(self.step_seconds.values())
        return FIRST_STEP_GUESS_S[self.device.type]

    def heldout(self, run: dict, name: str) -> None:
        point = heldout_point(self.programs, self.eval_set, self.settings, run["step"])
        self.point_guess = 1.3 * self.measured("heldout_point", point["seconds"])
        self.progressed = True
        run["heldout"].append(point)
        self.reset_memory()
        recent = run["step_seconds"][-self.settings["eval_every"]:]
        self.log(f"{name} step {run['step']}/{self.settings['steps']}: train loss {run['train_loss'][-1]:.4f}, "
                 f"held-out full {point['full']['mean_nll']:.4f} segmented {point['segmented']['mean_nll']:.4f}; "
                 f"{sum(recent) / len(recent):.3f} s/step")
        self.save()

    def batch(self, seed: int, step: int) -> torch.Tensor:
        indices = window_indices(len(self.windows), seed, step, self.settings["batch_size"])
        return torch.stack([self.windows[i].ids for i in indices]).to(self.device)

    def reset_memory(self) -> None:
        """The peak from here on (reset again after each held-out point: the peak is the steps')."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def record_memory(self, run: dict) -> None:
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
            run["peak_memory_bytes"] = max(run["peak_memory_bytes"] or 0, peak)

    def summarise(self, run: dict, name: str) -> None:
        """Tokens/s and seconds per step (the first step, which compiles kernels, left out when
        there are others), and what the runs left would take at the speeds measured so far."""
        seconds = run["step_seconds"][1:] or run["step_seconds"]
        per_step = sum(seconds) / len(seconds)
        tokens = self.settings["batch_size"] * self.settings["seq_len"]
        run.update(seconds_per_step=per_step, tokens_per_s=tokens / per_step, training_seconds=sum(run["step_seconds"]))
        self.log(f"{name}: {per_step:.3f} s/step, {tokens / per_step:,.0f} tokens/s"
                 + (f", peak {run['peak_memory_bytes'] / 2**30:.2f} GiB" if run["peak_memory_bytes"] else "")
                 + f"; the training steps left: ~{self.training_seconds_left():.0f} s")

    def training_seconds_left(self) -> float:
        """Seconds of training steps still to run, at each training's measured speed (the H200
        estimate of the docstring where none is measured yet)."""
        measured = {r["training"]: r["seconds_per_step"] for r in self.document["runs"].values() if "seconds_per_step" in r}
        left = 0.0
        for seed in self.settings["seeds"]:
            for training in TRAININGS:
                run = self.document["runs"].get(f"{training}-seed{seed}", {"step": 0})
                per_step = measured.get(training, ASSUMED_H200_STEP_S[training])
                left += (self.settings["steps"] - run["step"]) * per_step
        return left

    def stop_inside(self, run: dict, optimizer) -> bool:
        """Save the run in progress (model, optimizer, step) and the document; False."""
        if run["step"] > 0:
            start = time.perf_counter()
            save_checkpoint(self.paths["checkpoint"], self.model, optimizer, step=run["step"],
                            extra={"run": f"{run['training']}-seed{run['seed']}"})
            seconds = time.perf_counter() - start
            self.deadline.measured_save(seconds)
            self.log(f"checkpoint of {run['training']}-seed{run['seed']} at step {run['step']} saved ({seconds:.0f} s)")
        self.save()
        return False


# ---- the document -----------------------------------------------------------------------------------
def open_document(settings: dict, paths: dict, restart: bool) -> dict:
    """The saved progress (the state dir's, else the result file's), checked against ``settings``;
    a new document when there is none or ``restart``."""
    if restart:
        shutil.rmtree(paths["state"], ignore_errors=True)
    for path in (paths["progress"], paths["out"]):
        if not restart and path.is_file():
            document = json.loads(path.read_text())
            differ = {k: (document["settings"].get(k), settings[k]) for k in EXPERIMENT_KEYS
                      if document["settings"].get(k) != settings[k]}
            if differ:
                raise SystemExit(f"{_shown(path)} holds an experiment with other settings "
                                 f"({', '.join(f'{k}: {a} -> {b}' for k, (a, b) in differ.items())}); rerun with the "
                                 "same arguments to continue it, or pass --restart (or another --out and --state-dir)")
            return document
    return {"format": FORMAT, "version": VERSION, "settings": settings, "commands": [], "invocations": [],
            "runs": {}, "regimes": {}, "complete": False}


def start_invocation(document: dict, argv: list[str]) -> None:
    command = shlex.join(["python", "bench/consistency.py", *defining_arguments(argv)])
    if command not in document["commands"]:
        document["commands"].append(command)
    # where an invocation writes is that machine's business, not the experiment's: its paths stay out
    document["invocations"].append({"started": time.strftime("%Y-%m-%d %H:%M:%S"),
                                    "argv": report.without_options(argv, {"--out", "--state-dir"}), "seconds": 0.0})


def defining_arguments(argv: list[str]) -> list[str]:
    """The command line less the options that only decide where one invocation stops or writes."""
    return [arg for arg in report.without_options(argv, {"--max-minutes", "--stop-after-steps", "--out", "--state-dir"})
            if arg != "--restart"]


def describe(document: dict, settings, model, tokenizer, plan, windows, eval_set, device) -> None:
    kv = kv_heads_per_layer(model)
    resolved = plan.resolve(kv)
    document.update(
        model=report.describe_model(model, tokenizer, SMOLLM2),
        device=report.describe_device(device),
        plan={"file": _shown(PLAN_FILE), "method": plan.method, "fingerprint": dict(plan.fingerprint or {}),
              "long_range_kv_heads": sum(len(h) for h in resolved.values()), "kv_heads": sum(kv),
              "per_layer": {str(l): list(h) for l, h in resolved.items() if h}},
        segments={"segment_len": settings["segment_len"], "tail_len": settings["segment_len"],
                  "sink_tokens": settings["sinks"], "segments_per_sequence": -(-settings["seq_len"] // settings["segment_len"])},
        training_texts=describe_windows(windows, settings),
        heldout_texts=report.describe_perplexity_texts({settings["seq_len"]: eval_set.perplexity}, "heldout"),
        passkey_texts=report.describe_passkey_texts(),
        optimizer={"name": "AdamW", "betas": [0.9, 0.95], "weight_decay": 0.0, "clip": 1.0,
                   "schedule": f"linear warmup {settings['warmup']} steps, cosine to {MIN_LR_SHARE} x lr"},
    )


# ---- report -----------------------------------------------------------------------------------------
def print_table(document: dict) -> None:
    head = ["regime", "what", "seed", "ppl", "segment 0", "1 back", "2+ back",
            *(f"passkey {n}" for n in document["settings"]["passkey_lengths"]), "train tokens/s", "peak GiB"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for key, r in document["regimes"].items():
        training = REGIMES[r["regime"]][0]
        run = document["runs"].get(f"{training}-seed{r['seed']}", {}) if training else {}
        bands = r["perplexity"]["bands"]
        cells = [r["regime"], r["what"], "-" if r["seed"] is None else str(r["seed"]),
                 _ppl(r["perplexity"]["overall"]), *(_ppl(bands[b]) for b in quality.BANDS)]
        cells += [f"{a['correct']}/{a['trials']}" for a in r["passkey"]["by_length"].values()]
        cells += [f"{run['tokens_per_s']:,.0f}" if run.get("tokens_per_s") else "-",
                  f"{run['peak_memory_bytes'] / 2**30:.2f}" if run.get("peak_memory_bytes") else "-"]
        print("| " + " | ".join(cells) + " |")
    total = document.get("device_seconds_total", 0.0)
    print(f"{len(document['invocations'])} invocation(s), {total:.0f} s ({total / 60:.1f} min) in all; "
          + ("complete" if document.get("complete") else "not complete: rerun the same command to continue"))


def _ppl(score: dict) -> str:
    return "-" if score["perplexity"] is None else f"{score['perplexity']:.3f}"


COLOURS = {"full": "black", "tbptt-k0": "tab:blue", "tbptt-k1": "tab:red", "tbptt-k2": "tab:green"}


def plot(document: dict, path: Path) -> None:
    """Training loss (a running mean), held-out loss segmented and full attention, per run."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    for name, run in document["runs"].items():
        style = dict(color=COLOURS[run["training"]], linestyle="-" if run["seed"] == document["settings"]["seeds"][0] else "--",
                     label=name)
        losses = run["train_loss"]
        window = max(1, len(losses) // 20)
        smooth = [sum(losses[max(0, i - window + 1): i + 1]) / len(losses[max(0, i - window + 1): i + 1])
                  for i in range(len(losses))]
        axes[0].plot(range(1, len(losses) + 1), smooth, **style)
        for ax, evaluated_as in ((axes[1], "segmented"), (axes[2], "full")):
            points = run["heldout"]
            ax.plot([p["step"] for p in points], [p[evaluated_as]["mean_nll"] for p in points], marker="o", markersize=3, **style)
    s = document["settings"]
    titles = (f"training loss (running mean of {max(1, s['steps'] // 20)} steps)",
              "held-out loss, evaluated segmented", "held-out loss, evaluated with full attention")
    for ax, title in zip(axes, titles):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("nats / token")
    axes[0].legend(fontsize=7)
    model, device = document.get("model", {}), document.get("device", {})
    fig.suptitle(f"{model.get('source')} fine-tuned at N = {s['seq_len']}, S = T = {s['segment_len']}, {s['sinks']} sinks, "
                 f"plan {Path(s['plan_file']).stem}; {device.get('name')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {_shown(path)}")


# ---- main -------------------------------------------------------------------------------------------
def paths_of(args, settings: dict, device: torch.device) -> dict:
    label = device_label(device) + ("-tiny" if settings["tiny"] else "")
    out = args.out or RESULTS / f"consistency-{label}.json"
    state = args.state_dir or ROOT / "segcompile-out" / f"consistency-{label}"
    return {"out": Path(out), "state": Path(state), "progress": Path(state) / "progress.json",
            "checkpoint": Path(state) / "checkpoint"}


def main(argv: list[str] | None = None, started: float | None = None) -> dict:
    """Run (or continue) the experiment; ``started``: when this invocation began (default: now),
    the time ``--max-minutes`` and the recorded device time count from."""
    started = time.monotonic() if started is None else started
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    settings = settings_of(args)
    device = torch.device(args.device or settings["device_type"])
    paths = paths_of(args, settings, device)
    if args.report_only:
        document = json.loads(paths["out"].read_text())
        print_table(document)
        plot(document, paths["out"].with_suffix(".png"))
        return document
    document = open_document(settings, paths, args.restart)
    if document["complete"]:
        print(f"{_shown(paths['out'])}: the experiment is complete (--restart to run it again)")
        print_table(document)
        return document
    start_invocation(document, argv)
    model, tokenizer, whole = load_model(settings, device)
    plan = load_plan(model, settings, whole)
    windows = training_windows(tokenizer, settings["seq_len"])
    eval_set = evaluation_set(tokenizer, settings)
    describe(document, settings, model, tokenizer, plan, windows, eval_set, device)
    parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    deadline = Deadline(args.max_minutes, args.stop_after_steps, save_seconds=5 + 3 * parameter_bytes / SAVE_BYTES_PER_S,
                        started=started)
    experiment = Experiment(settings, device, model, tokenizer, plan, windows, eval_set, document, paths, deadline)
    experiment.log(f"ready: {len(windows)} training windows of {settings['seq_len']} tokens, "
                   f"{len(eval_set.perplexity)} held-out sequences, {len(eval_set.passkey)} passkey prompts")
    complete = experiment.run()
    if not complete:
        hint = "the same command continues" if experiment.progressed else "nothing fitted: give it more --max-minutes"
        experiment.log(f"stopped: {deadline.reason}; {hint}")
    experiment.save()
    print_table(document)
    if complete:
        plot(document, paths["out"].with_suffix(".png"))
    return document


def _shown(path: Path) -> str:
    resolved = Path(path).resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else str(path)


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


if __name__ == "__main__":
    main(started=PROCESS_STARTED)
