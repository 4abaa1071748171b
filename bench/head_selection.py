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
reused when present, so a rerun does not score again.

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
there is skipped (``--redo`` to measure again). Prints one table of everything in the file.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import shlex
import sys
import time
from fractions import Fraction
from pathlib import Path

import torch
import torch.nn.functional as F

import segcompile as sc
from segcompile import quality
from segcompile.files import atomic_write_text
from segcompile.heads import plan_at_budget, text_retrieval_calibration
from segcompile.pretrained import load_pretrained
from segcompile.quality import report
from segcompile.reference.sdpa_hook import PerLayerSDPA, kv_heads_per_layer, sdpa_attention

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
        with torch.no_grad(), sdpa_attention(self.model), mode:
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
            q_rows = torch.tensor([h * group + i for h in heads for i in range(group)])
            kv_rows = q_rows if k.shape[1] == q.shape[1] else torch.tensor(heads)
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
            keys = torch.cat([torch.arange(min(G, window)), torch.arange(window, stop)])
            mask = _segment_mask(start, stop, keys)
            out[:, :, start:stop] = F.scaled_dot_product_attention(
                q[:, :, start:stop], k[:, :, keys], v[:, :, keys], attn_mask=mask, scale=a["scale"],
                enable_gqa=a["enable_gqa"])
        return out


def _segment_mask(start: int, stop: int, keys: torch.Tensor) -> torch.Tensor:
    """Queries ``start..stop`` see every key before the segment (sinks and tail) and the causal part
    of their own segment."""
    return keys[None, :] <= torch.arange(start, stop)[:, None]


# ---- plans ------------------------------------------------------------------------------------------
def budget_label(budget: float) -> str:
    return str(Fraction(budget).limit_denominator(12))


def make_plans(model, tokenizer, budgets, args, log) -> dict[str, dict]:
    """``{label: {"plan": HeadPlan | None, "file", "seconds", ...}}`` for every plan of the table."""
    kv = kv_heads_per_layer(model)
    plans = {"full": {"plan": None, "file": None}, "none": {"plan": sc.HeadPlan.none(), "file": None}}
    cfg = sc.SegmentConfig(**CFG)
    scored = {}  # method -> plan at the first budget (its scores serve every budget)
    for budget in budgets:
        prefix = budget_label(budget)
        layers = round(budget * len(kv))
        plans[f"{prefix} first-layers"] = _plan_file(
            f"{prefix} first-layers", lambda: sc.HeadPlan.from_dict(
                {l: range(kv[l]) for l in range(layers)}, method="first_layers", extra={"budget": budget}))
        for seed in RANDOM_SEEDS:
            plans[f"{prefix} random-s{seed}"] = _plan_file(f"{prefix} random-s{seed}",
                                                           lambda seed=seed: _random_plan(kv, budget, seed))
        for method, score in _methods(model, tokenizer, cfg, args, log).items():
            def select(method=method, score=score):
                saved = [_plan_path(f"{budget_label(b)} {method}") for b in budgets]
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
            plans[f"{prefix} {method}"] = _plan_file(f"{prefix} {method}", select)
    return plans


def _plan_path(label: str) -> Path:
    return RESULTS / "plans" / (label.replace("/", "_").replace(" ", "-") + ".json")


def _plan_file(label: str, make) -> dict:
    path = _plan_path(label)
    if path.is_file():
        return {"plan": sc.HeadPlan.load(path), "file": str(path.relative_to(RESULTS.parent.parent))}
    plan = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    plan.save(path)
    return {"plan": plan, "file": str(path.relative_to(RESULTS.parent.parent))}


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
    plans = make_plans(model, tokenizer, args.budgets, args, log)
    chosen = {label: p for label, p in plans.items() if any(fnmatch.fnmatch(label, g) for g in args.plans)}
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
    for n in args.lengths:
        for label, program in programs.items():
            key = f"{label}|passkey|{n}"
            if key not in rows or args.redo:
                start = time.perf_counter()
                result = quality.measure_passkey(program, [p for p in prompts if p.length == n])
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
            if key not in rows or args.redo:
                start = time.perf_counter()
                result = quality.measure_perplexity(program, texts, CFG["segment_len"])
                rows[key] = {"plan": label, "task": "ppl", "length": n, "seconds": time.perf_counter() - start,
                             **result.to_json()}
                log(f"{label:<24} ppl {n}: {rows[key]['bands']['2+ back']['perplexity']:.3f} at 2+ back "
                    f"({rows[key]['seconds']:.0f} s)")
                _save(out, document)
    return document


def _header(args, model, tokenizer, plans) -> dict:
    commands = _commands(args)
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


def _commands(args) -> list[str]:
    previous = json.loads(Path(args.out).read_text()).get("commands", []) if Path(args.out).is_file() else []
    this = shlex.join(["python", "bench/head_selection.py", *sys.argv[1:]])
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
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    args.out = args.out or str(RESULTS / f"head_selection-{_device_name(args.device)}.json")
    document = run(args)
    print_table(document)
    return 0


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device)).replace(" ", "_")
    return "cpu"


if __name__ == "__main__":
    sys.exit(main())
