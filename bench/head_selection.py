"""Which KV heads of SmolLM2-135M must keep their whole history: every selection method against
full attention, plan none, first layers and random plans of the same budget, on passkey retrieval
(by length and depth) and perplexity (by distance band).

Plans, per budget (fraction of the 90 KV heads; 1/3 is one head per layer on average):

    first-layers        every KV head of the first round(budget * 30) layers (layers(0-9) at 1/3)
    random-s0..s2       round(budget * 90) KV heads drawn uniformly, seeds 0, 1, 2
    mass-synthetic      select_heads(method="attention_mass") on its own synthetic retrieval data
                        (random tokens, every query scored): what `segcompile heads` does by default
    gate-synthetic      select_heads(method="gate") on the same kind of synthetic data (--gate-len
                        tokens, --gate-steps steps)
    mass-answer         attention_mass on pass-key prompts whose filler is real text (the calibration
                        split: no text the perplexity rows are measured on), scored on the rows that
                        predict the answer's digits only (heads.text_retrieval_calibration)
    mass-answer-key     the same rows, counting only the mass on the needle's digit tokens
    gate-answer         the gate distilled on the same prompts, at the answer rows only (768-token
                        prompts with the needle 2+ segments back: a step is a backward through the
                        model; 16 steps by default on the CPU, --gate-steps, --gate-len)

and ``full`` (the model itself) and ``none``. A method scores once; the plan of each budget comes
from the same scores (``heads.plan_at_budget``). Plan files go to ``results/plans/`` and are
reused when present, so a rerun does not score again; a method scores only when one of its plans
is measured. ``--plans-dir`` names another folder (e.g. a GPU run with more gate steps, whose
plans must not be the CPU's).

Evaluation runs the segment semantics as a masked forward of the model (``MaskedSegmentProgram``:
every attention call of layer l splits its heads into long-range ones, full causal attention,
and local ones, attention over sinks + tail + current segment one segment of queries at a time).
It computes what ``segcompile.reference.oracle`` defines, with SDPA's kernels, and is faster on
the CPU than the segment loop (a 2K passkey trial on 2 shared cores: 2.3 s against 3.7 s for the
SegmentedModel's prefill + decode). ``--check K`` runs the last K plans' first prompt through
``sc.transform`` too and records the largest difference of the answer logits. Scoring reuses ``segcompile.quality``
(``measure_passkey``, ``measure_perplexity``): the masked program is a model to it.

    PYTHONPATH=. python bench/head_selection.py --lengths 2048 --trials 8
    PYTHONPATH=. python bench/head_selection.py --lengths 4096 --trials 8 --plans full none '1/3 *'

Results accumulate in ``results/head_selection-<device>.json``: a row (plan, task, length) already
there with as many trials (perplexity: sequences) is skipped (``--redo`` to measure again), and the
file is saved after every row; ``--minutes M`` starts no new row after M minutes. Prints one table
of everything in the file and draws ``results/head_selection-<device>.png`` (passkey accuracy by
length, perplexity by band relative to full attention; needs matplotlib); ``--report-only`` does
only that.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import sys
import time
from fractions import Fraction
from pathlib import Path

import torch
import torch.nn.functional as F

import segcompile as sc
from segcompile import quality
from segcompile.files import atomic_write_text
from segcompile.frontend import attention_through_sdpa
from segcompile.heads import plan_at_budget, text_retrieval_calibration
from segcompile.pretrained import load_pretrained
from segcompile.quality import report
from segcompile.reference.sdpa_hook import PerLayerSDPA, kv_heads_per_layer

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = "smollm2"
CFG = dict(segment_len=256, tail_len=256, sink_tokens=4)
RANDOM_SEEDS = (0, 1, 2)
FORMAT = "segcompile.bench.head_selection"


# ---- the segment semantics as a masked forward ---------------------------------------------------
class MaskedSegmentProgram(torch.nn.Module):
    """The model under a head plan, computed as the oracle defines it: long-range KV heads attend
    causally to everything, local ones to sinks + tail + current segment. Called like the model
    (``logits_to_keep``, ``use_cache``), so ``segcompile.quality`` scores it as a model."""

    def __init__(self, model, cfg: sc.SegmentConfig):
        super().__init__()
        self.model, self.cfg = model, cfg
        self.kv = kv_heads_per_layer(model)
        self.long_range = cfg.long_range.resolve(self.kv)

    def forward(self, input_ids, logits_to_keep: int = 0, use_cache: bool = False):
        mode = PerLayerSDPA(self._attend, who="head_selection")
        with torch.no_grad(), attention_through_sdpa(self.model), mode:
            return self.model(input_ids, logits_to_keep=logits_to_keep, use_cache=False)

    def _attend(self, layer, a, sdpa):
        if a["attn_mask"] is not None or not a["is_causal"]:
            raise RuntimeError("MaskedSegmentProgram expects causal attention without a mask (batch 1, no padding)")
        long = self.long_range[layer]
        if len(long) == self.kv[layer]:
            return sdpa()
        q, k, v = a["query"], a["key"], a["value"]
        group = q.shape[1] // self.kv[layer]
        local = [h for h in range(self.kv[layer]) if h not in long]
        out = torch.empty_like(q)
        for heads, attend in ((list(long), self._causal), (local, self._local)):
            if not heads:
                continue
            q_rows = torch.tensor([h * group + i for h in heads for i in range(group)], device=q.device)
            kv_rows = q_rows if k.shape[1] == q.shape[1] else torch.tensor(heads, device=q.device)
            out[:, q_rows] = attend(q[:, q_rows], k[:, kv_rows], v[:, kv_rows], a)
        return out

    @staticmethod
    def _causal(q, k, v, a):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=a["scale"], enable_gqa=a["enable_gqa"])

    def _local(self, q, k, v, a):
        """Segment by segment: the queries of one segment against its sinks, tail and itself."""
        S, T, G = self.cfg.segment_len, self.cfg.tail_len, self.cfg.sink_tokens
        n = q.shape[2]
        out = torch.empty_like(q)
        for start in range(0, n, S):
            stop = min(n, start + S)
            window = max(0, start - T)
            keys = torch.cat([torch.arange(min(G, window), device=q.device),
                              torch.arange(window, stop, device=q.device)])
            mask = _segment_mask(start, stop, keys)
            out[:, :, start:stop] = F.scaled_dot_product_attention(
                q[:, :, start:stop], k[:, :, keys], v[:, :, keys], attn_mask=mask, scale=a["scale"],
                enable_gqa=a["enable_gqa"])
        return out


def _segment_mask(start: int, stop: int, keys: torch.Tensor) -> torch.Tensor:
    """Queries ``start..stop`` see every key before the segment (sinks and tail) and the causal part
    of their own segment."""
    return keys[None, :] <= torch.arange(start, stop, device=keys.device)[:, None]


# ---- plans ------------------------------------------------------------------------------------------
def budget_label(budget: float) -> str:
    return str(Fraction(budget).limit_denominator(12))


def make_plans(model, tokenizer, budgets, args, log, wanted=lambda label: True) -> dict[str, dict]:
    """``{label: {"plan": HeadPlan | None, "file"}}`` for every plan of the table that is
    ``wanted`` or already saved in ``args.plans_dir`` (a method scores only for a wanted plan)."""
    kv = kv_heads_per_layer(model)
    folder = Path(args.plans_dir)
    plans = {"full": {"plan": None, "file": None}, "none": {"plan": sc.HeadPlan.none(), "file": None}}
    cfg = sc.SegmentConfig(**CFG)
    scored = {}  # method -> plan at the first budget (its scores serve every budget)

    def add(label, make):
        path = _plan_path(folder, label)
        if wanted(label) or path.is_file():
            plans[label] = _plan_file(path, make)

    for budget in budgets:
        prefix = budget_label(budget)
        layers = round(budget * len(kv))
        add(f"{prefix} first-layers", lambda: sc.HeadPlan.from_dict(
            {l: range(kv[l]) for l in range(layers)}, method="first_layers", extra={"budget": budget}))
        for seed in RANDOM_SEEDS:
            add(f"{prefix} random-s{seed}", lambda seed=seed: _random_plan(kv, budget, seed))
        for method, score in _methods(model, tokenizer, cfg, args, log).items():
            def select(method=method, score=score):
                saved = [_plan_path(folder, f"{budget_label(b)} {method}") for b in budgets]
                if method not in scored and any(path.is_file() for path in saved):  # scored by an earlier run
                    plan = sc.HeadPlan.load(next(path for path in saved if path.is_file()))
                    scored[method] = (plan, plan.extra.get("scoring_seconds"))
                if method not in scored:
                    start = time.perf_counter()
                    log(f"scoring {method} ...")
                    scored[method] = (score(budget), time.perf_counter() - start)
                    log(f"scoring {method}: {scored[method][1]:.0f} s")
                first, seconds = scored[method]
                plan = plan_at_budget(first, budget)
                return sc.HeadPlan.from_dict(plan.heads, method=plan.method, fingerprint=plan.fingerprint,
                                             extra={**plan.extra, "bench_method": method, "scoring_seconds": seconds})
            add(f"{prefix} {method}", select)
    return plans


def _plan_path(folder: Path, label: str) -> Path:
    return folder / (label.replace("/", "_").replace(" ", "-") + ".json")


def _plan_file(path: Path, make) -> dict:
    """The plan saved at ``path``, or ``make()``'s, saved there."""
    if path.is_file():
        return {"plan": sc.HeadPlan.load(path), "file": _shown(path)}
    plan = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    plan.save(path)
    return {"plan": plan, "file": _shown(path)}


def _shown(path: Path) -> str:
    """``path`` relative to the repository when it lies in it (result files stay portable)."""
    root = RESULTS.parent.parent
    resolved = path.resolve()
    return str(resolved.relative_to(root)) if resolved.is_relative_to(root) else str(path)


def _random_plan(kv, budget: float, seed: int) -> sc.HeadPlan:
    heads = [(l, h) for l in range(len(kv)) for h in range(kv[l])]
    order = torch.randperm(len(heads), generator=torch.Generator().manual_seed(seed))[: round(budget * len(heads))]
    chosen = sorted(heads[i] for i in order.tolist())
    return sc.HeadPlan.from_dict({l: [h for ll, h in chosen if ll == l] for l in range(len(kv))},
                                 method="random", extra={"budget": budget, "seed": seed})


def _methods(model, tokenizer, cfg, args, log) -> dict:
    """Each method as ``score(budget) -> HeadPlan``; the data is built when a method first scores."""
    start = time.perf_counter()

    def progress(done, total):
        if done % 10 == 0 or done == total:
            log(f"  {done}/{total} ({time.perf_counter() - start:.0f} s)")
    def answer_data(n, depths):
        return text_retrieval_calibration(tokenizer, n, args.calibration_samples, seed=0, depths=depths)

    def mass_answer(keys: bool):
        def score(budget):
            data = answer_data(args.calibration_len, (0.1, 0.7))
            return sc.select_heads(model, data.ids, budget, "attention_mass", cfg,
                                   query_positions=data.query_positions,
                                   key_positions=data.key_positions if keys else None, progress=progress)
        return score

    def gate_answer(budget):
        # the gate trains on shorter prompts (its step costs a backward through the model):
        # the needle is kept 2+ segments before the answer, beyond the local window
        data = answer_data(args.gate_len, (0.1, _last_depth_beyond_window(args.gate_len)))
        return sc.select_heads(model, data.ids, budget, "gate", cfg, query_positions=data.query_positions,
                               steps=args.gate_steps, progress=progress)

    return {
        "mass-synthetic": lambda budget: sc.select_heads(model, None, budget, "attention_mass", cfg),
        "gate-synthetic": lambda budget: sc.select_heads(model, None, budget, "gate", cfg, seq_len=args.gate_len,
                                                         steps=args.gate_steps, progress=progress),
        "mass-answer": mass_answer(keys=False),
        "mass-answer-key": mass_answer(keys=True),
        "gate-answer": gate_answer,
    }


def _last_depth_beyond_window(n: int) -> float:
    """The deepest needle (as a fraction of ``n``) that still lies beyond the local window of the
    answer at the end of the prompt (the needle sentence is ~25 tokens)."""
    answer_segment = (n - 1) // CFG["segment_len"] * CFG["segment_len"]
    return (answer_segment - CFG["tail_len"] - 32) / n


# ---- measuring ----------------------------------------------------------------------------------------
def program_for(model, plan):
    if plan is None:
        return model
    return MaskedSegmentProgram(model, sc.SegmentConfig(**CFG, long_range=plan))


def check_against_transform(model, graph, label, plan, prompt) -> dict:
    """The answer logits of the masked program and of ``sc.transform``'s SegmentedModel on one prompt."""
    cfg = sc.SegmentConfig(**CFG, long_range=plan)
    fed = torch.cat([prompt.ids, prompt.answer[:-1]])[None]
    count = prompt.answer.numel()
    start = time.perf_counter()
    masked = quality.last_logits(MaskedSegmentProgram(model, cfg), fed, count).float()
    masked_s = time.perf_counter() - start
    start = time.perf_counter()
    segmented = quality.last_logits(sc.transform(graph, cfg), fed, count).float()
    segmented_s = time.perf_counter() - start
    return {"plan": label, "length": prompt.length, "max_abs_logit_diff": float((masked - segmented).abs().max()),
            "same_argmax": bool(torch.equal(masked.argmax(-1), segmented.argmax(-1))),
            "seconds": {"masked": masked_s, "segmented": segmented_s}}


def run(args) -> dict:
    out = Path(args.out)
    document = json.loads(out.read_text()) if out.is_file() else {}
    rows = document.setdefault("rows", {})
    log = lambda text: print(text, flush=True)  # noqa: E731

    model, tokenizer = load_pretrained(MODEL)
    model = model.to(args.device).eval()
    wanted = lambda label: any(fnmatch.fnmatch(label, g) for g in args.plans)  # noqa: E731
    plans = make_plans(model, tokenizer, args.budgets, args, log, wanted)
    chosen = {label: p for label, p in plans.items() if wanted(label)}
    document.update(_header(args, model, tokenizer, plans))

    prompts = quality.passkey_prompts(tokenizer, args.lengths, args.trials, args.seed)
    if args.check:
        checks = document.setdefault("checks", [])
        done = {(c["plan"], c["length"]) for c in checks}
        graph = sc.capture(model)
        mixed = [l for l, p in chosen.items() if p["plan"] is not None and p["plan"].kind == "explicit"]
        for label in mixed[-args.check:]:  # the selected plans come last
            if (label, prompts[0].length) not in done:
                checks.append(check_against_transform(model, graph, label, chosen[label]["plan"], prompts[0]))
                log(f"check {label}: {checks[-1]}")
                _save(out, document)

    # length by length, every plan at one length before the next: a run cut short has whole columns
    programs = {label: program_for(model, entry["plan"]) for label, entry in chosen.items()}
    began = time.perf_counter()
    for n in args.lengths:
        for label, program in programs.items():
            key = f"{label}|passkey|{n}"
            if args.redo or not _measured(rows.get(key), args.trials):
                if _out_of_time(began, args, log):
                    return document
                start = time.perf_counter()
                result = quality.measure_passkey(program, [p for p in prompts if p.length == n],
                                                 progress=_progress(f"{label} passkey {n}", start, log))
                rows[key] = {"plan": label, "task": "passkey", "length": n, "trials": args.trials,
                             "seconds": time.perf_counter() - start, **result.to_json()}
                log(f"{label:<24} passkey {n}: {rows[key]['overall']['correct']}/{args.trials} "
                    f"({rows[key]['seconds']:.0f} s)")
                _save(out, document)
    for n in args.ppl_lengths:
        texts = quality.token_sequences(tokenizer, n, args.sequences, "heldout")
        document.setdefault("texts", {})[str(n)] = report.describe_perplexity_texts({n: texts}, "heldout")
        for label, program in programs.items():
            key = f"{label}|ppl|{n}"
            if args.redo or not _measured(rows.get(key), len(texts)):
                if _out_of_time(began, args, log):
                    return document
                start = time.perf_counter()
                result = quality.measure_perplexity(program, texts, CFG["segment_len"],
                                                    progress=_progress(f"{label} ppl {n}", start, log))
                rows[key] = {"plan": label, "task": "ppl", "length": n, "seconds": time.perf_counter() - start,
                             **result.to_json()}
                log(f"{label:<24} ppl {n}: {rows[key]['bands']['2+ back']['perplexity']:.3f} at 2+ back "
                    f"({rows[key]['seconds']:.0f} s)")
                _save(out, document)
    return document


def _measured(row: dict | None, count: int) -> bool:
    """Whether ``row`` is in the file with as many passkey trials (or perplexity sequences) as this
    run asks for: a row of another count is measured again, under the same key."""
    if row is None:
        return False
    measured = row["overall"]["trials"] if row["task"] == "passkey" else len(row["sequences"])
    return measured == count


def _out_of_time(began: float, args, log) -> bool:
    """``--minutes`` spent: no new row starts (the rows measured so far are saved)."""
    if args.minutes is None or time.perf_counter() - began < 60 * args.minutes:
        return False
    log(f"stopping: {args.minutes} minutes spent, the rows left are not measured")
    return True


def _progress(what: str, start: float, log):
    def progress(done, total):
        log(f"  {what}: {done}/{total} ({time.perf_counter() - start:.0f} s)")
    return progress


def _header(args, model, tokenizer, plans) -> dict:
    commands = recorded_commands(args)
    return {
        "format": FORMAT, "commands": commands,
        "model": report.describe_model(model, tokenizer, MODEL),
        "config": CFG,
        "device": report.describe_device(torch.device(args.device)),
        "evaluation": "MaskedSegmentProgram (the oracle's segment semantics, SDPA kernels); see 'checks'",
        "passkey_texts": report.describe_passkey_texts(),
        "plans": {label: {"file": p["file"], **({} if p["plan"] is None else _plan_summary(p["plan"], kv_heads_per_layer(model)))}
                  for label, p in plans.items()},
    }


def _plan_summary(plan: sc.HeadPlan, kv: list[int]) -> dict:
    resolved = plan.resolve(kv)
    return {"describe": plan.describe(), "long_range_kv_heads": sum(len(h) for h in resolved.values()),
            "per_layer": [len(resolved[l]) for l in range(len(kv))], "method": plan.method,
            "data": plan.extra.get("data"), "scoring_seconds": plan.extra.get("scoring_seconds")}


def recorded_commands(args) -> list[str]:
    previous = json.loads(Path(args.out).read_text()).get("commands", []) if Path(args.out).is_file() else []
    this = report.recorded_command("bench/head_selection.py", sys.argv[1:], {"--minutes"})
    return previous + ([this] if this not in previous else [])


def _save(out: Path, document: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(document, indent=1, allow_nan=False) + "\n")


# ---- the table ---------------------------------------------------------------------------------------
def print_table(document: dict) -> None:
    rows = document["rows"]
    labels = list(dict.fromkeys(r["plan"] for r in rows.values()))
    lengths = sorted({r["length"] for r in rows.values() if r["task"] == "passkey"})
    ppl = sorted({r["length"] for r in rows.values() if r["task"] == "ppl"})
    head = ["plan", "KV heads", *(f"passkey {n}" for n in lengths), "depth 10-50% / 50-90% (all lengths)",
            *(f"ppl {n} overall / 2+ back" for n in ppl)]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for label in labels:
        info = document["plans"].get(label, {})
        cells = [label, str(info.get("long_range_kv_heads", 90 if label == "full" else "-"))]
        trials = []
        for n in lengths:
            r = rows.get(f"{label}|passkey|{n}")
            cells.append("-" if r is None else f"{r['overall']['correct']}/{r['overall']['trials']}")
            trials += [] if r is None else r["trials"]
        shallow = [t["correct"] for t in trials if t["depth"] < 0.5]
        deep = [t["correct"] for t in trials if t["depth"] >= 0.5]
        cells.append(f"{sum(shallow)}/{len(shallow)} / {sum(deep)}/{len(deep)}" if trials else "-")
        for n in ppl:
            r = rows.get(f"{label}|ppl|{n}")
            cells.append("-" if r is None else " / ".join(
                _ppl(x) for x in (r["overall"], r["bands"]["2+ back"])))
        print("| " + " | ".join(cells) + " |")


# ---- the plot ----------------------------------------------------------------------------------------
BANDS = ("segment 0", "1 back", "2+ back")
BASELINES = {"full": "black", "none": "grey", "first-layers": "tab:brown", "random": "tab:olive"}
METHOD_COLOURS = {"mass-synthetic": "tab:cyan", "gate-synthetic": "tab:purple", "mass-answer": "tab:blue",
                  "mass-answer-key": "tab:green", "gate-answer": "tab:red"}


def plot(document: dict, path: Path) -> None:
    """Passkey accuracy by length (top) and perplexity by distance band (bottom), one column per
    budget; the random plans are drawn as their mean with the range of the seeds."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    rows = document["rows"]
    budgets = sorted({label.split()[0] for label in document["plans"] if " " in label}, key=Fraction)
    fig, axes = plt.subplots(2, len(budgets), figsize=(6.5 * len(budgets), 8.5), squeeze=False)
    for column, budget in enumerate(budgets):
        series = _series(document, budget)
        _plot_passkey(axes[0][column], rows, series, budget)
        _plot_ppl(axes[1][column], rows, series, budget)
    model, device = document["model"], document["device"]
    fig.suptitle(f"{model['source']} ({model['class']}, {model['layers']} layers x {model['kv_heads']} KV heads); "
                 f"S = T = {CFG['segment_len']}, {CFG['sink_tokens']} sinks; {device['device']} ({device['name']})",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


def _series(document: dict, budget: str) -> list[tuple[str, list[str], str]]:
    """``(name, plan labels, colour)`` for every line of one budget's panels: the plans of a line are
    averaged (the random seeds)."""
    seeds = [f"{budget} random-s{s}" for s in RANDOM_SEEDS]
    lines = [("full", ["full"], BASELINES["full"]), ("none", ["none"], BASELINES["none"]),
             ("first layers", [f"{budget} first-layers"], BASELINES["first-layers"]),
             (f"random ({len(seeds)} seeds)", seeds, BASELINES["random"])]
    lines += [(method, [f"{budget} {method}"], colour) for method, colour in METHOD_COLOURS.items()]
    return [line for line in lines if any(label in document["plans"] for label in line[1])]


def _mean_and_range(values: list[float | None]) -> tuple[float, float, float]:
    known = [v for v in values if v is not None]
    if not known:
        return (float("nan"),) * 3
    return sum(known) / len(known), min(known), max(known)


def _plot_passkey(ax, rows, series, budget) -> None:
    lengths = sorted({r["length"] for r in rows.values() if r["task"] == "passkey"})
    for index, (name, labels, colour) in enumerate(series):
        nudge = 2 ** (0.025 * (index - len(series) / 2))  # lines on the same accuracy stay visible side by side
        points = []
        for n in lengths:
            found = [rows[k]["overall"]["accuracy"] for k in (f"{l}|passkey|{n}" for l in labels) if k in rows]
            if len(found) == len(labels):  # a line's point needs every plan of it measured
                points.append((n * nudge, *_mean_and_range(found)))
        if not points:
            continue
        x = [p[0] for p in points]
        ax.plot(x, [p[1] for p in points], marker="o", color=colour, label=name,
                linestyle="--" if name in ("full", "none") else "-")
        if len(labels) > 1:
            ax.fill_between(x, [p[2] for p in points], [p[3] for p in points], color=colour, alpha=0.2)
    trials = sorted({r["overall"]["trials"] for r in rows.values() if r["task"] == "passkey"})
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [f"{n // 1024}K" for n in lengths])
    ax.set_ylim(-0.04, 1.04)
    ax.set_xlabel("passkey prompt length (tokens)")
    ax.set_ylabel(f"passkey accuracy ({'/'.join(map(str, trials))} trials per point)")
    ax.set_title(f"passkey retrieval, long-range budget {budget} of the KV heads", fontsize=10)
    ax.legend(fontsize=7, loc="center left")


def _plot_ppl(ax, rows, series, budget) -> None:
    lengths = sorted({r["length"] for r in rows.values() if r["task"] == "ppl"})
    ticks = [(n, band) for n in lengths for band in BANDS]
    x_of = {tick: i + len(BANDS) * 0.5 * (i // len(BANDS)) for i, tick in enumerate(ticks)}  # a gap between lengths
    for name, labels, colour in series:
        for n in lengths:
            found = [rows[k]["bands"] for k in (f"{l}|ppl|{n}" for l in labels) if k in rows]
            full = rows.get(f"full|ppl|{n}")
            if len(found) != len(labels) or not found or full is None:
                continue
            # relative to full attention in the same band: the bands' own perplexities differ far more
            # (the first segment has the least context) than the plans do
            stats = [_mean_and_range([b[band]["perplexity"] / full["bands"][band]["perplexity"] for b in found])
                     for band in BANDS]
            x = [x_of[(n, band)] for band in BANDS]
            ax.plot(x, [s[0] for s in stats], marker="o", color=colour, label=name if n == lengths[0] else None,
                    linestyle="--" if name in ("full", "none") else "-")
            if len(labels) > 1:
                ax.fill_between(x, [s[1] for s in stats], [s[2] for s in stats], color=colour, alpha=0.2)
    ax.set_xticks([x_of[t] for t in ticks], [f"{band}\n{n // 1024}K" for n, band in ticks], fontsize=8)
    ax.set_ylabel("perplexity / full attention's (held-out text)")
    ax.set_title(f"perplexity by distance band (S = {CFG['segment_len']}), budget {budget}", fontsize=10)
    ax.legend(fontsize=7, loc="upper left")


def _ppl(score: dict) -> str:
    return "-" if score["perplexity"] is None else f"{score['perplexity']:.2f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--lengths", type=int, nargs="*", default=[2048], help="passkey prompt lengths")
    parser.add_argument("--trials", type=int, default=8, help="passkey prompts per length")
    parser.add_argument("--ppl-lengths", type=int, nargs="*", default=[2048], help="perplexity sequence lengths")
    parser.add_argument("--sequences", type=int, default=4, help="held-out documents per perplexity length")
    parser.add_argument("--budgets", type=float, nargs="+", default=[1 / 3, 2 / 3])
    parser.add_argument("--plans", nargs="+", default=["*"], help="which plans to measure (shell patterns)")
    parser.add_argument("--calibration-len", type=int, default=2048, help="tokens of the attention_mass prompts")
    parser.add_argument("--calibration-samples", type=int, default=8)
    parser.add_argument("--gate-len", type=int, default=768, help="tokens of the gate's training prompts")
    parser.add_argument("--gate-steps", type=int, default=16)
    parser.add_argument("--check", type=int, default=0, help="plans checked against sc.transform on one prompt")
    parser.add_argument("--seed", type=int, default=0, help="seed of the pass keys")
    parser.add_argument("--redo", action="store_true", help="measure rows already in the result file again")
    parser.add_argument("--minutes", type=float, default=None,
                        help="start no new row after this many minutes of measuring (the rows done are saved)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--report-only", action="store_true",
                        help="measure nothing: print the table and draw the plot of the result file")
    parser.add_argument("--plans-dir", default=str(RESULTS / "plans"),
                        help="where plans are saved and reused from (another folder scores the methods again)")
    args = parser.parse_args(argv)
    args.out = args.out or str(RESULTS / f"head_selection-{_device_name(args.device)}.json")
    document = json.loads(Path(args.out).read_text()) if args.report_only else run(args)
    print_table(document)
    plot(document, Path(args.out).with_suffix(".png"))
    return 0


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device)).replace(" ", "_")
    return "cpu"


if __name__ == "__main__":
    sys.exit(main())
