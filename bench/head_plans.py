"""Which long-range heads: the plan ``sc.select_heads`` chooses against random and first-layers plans.

Takes a model trained by ``bench/tbptt_regimes.py --save-models DIR`` (the recall task, from
scratch) and evaluates its segmented retrieval accuracy under several head plans of the same
budget, on the same held-out set the four-regime run uses (so the ``fraction`` row of the ``full``
model is that run's ``full->seg``):

    attention_mass     sc.select_heads(method="attention_mass") on calibration sequences of the task
    attention_mass/syn the same on select_heads' own synthetic retrieval sequences (calibration_ids=None)
    gate               sc.select_heads(method="gate") on the task's calibration sequences
    layers:mass        sc.select_heads(granularity="layer"): whole layers (only where the budget is a
                       whole number of layers, rounded as select_heads rounds)
    fraction           sc.HeadPlan.fraction(budget): round-robin over layers, KV head 0 first (what
                       the four-regime run evaluates)
    first layers       the first round(budget * KV heads) KV heads in layer order (layer 0's first)
    random             R plans of round(budget * KV heads) KV heads drawn uniformly (seeded): mean,
                       min and max over the R
    all / none         every KV head long-range (equals full attention) / none (local only)

Calibration sequences come from a seed no other set uses; every plan runs with the run's S, T and
G (``sc.SegmentConfig(long_range=plan)``, evaluated with ``seg(ids).logits``).

    python bench/tbptt_regimes.py --cpu-defaults --save-models segcompile-out/tbptt-cpu
    python bench/head_plans.py --models segcompile-out/tbptt-cpu

Writes ``results/head_plans-<device>.json`` (every plan's long-range heads, accuracy by segments
back and overall, the selection's scores and time, the command line).

Result on a CPU (2026-12-01, ``results/head_plans-cpu.json``: the models of the
``--cpu-defaults`` run, 2 layers x 4 KV heads, S=T=64, G=2, 2048 held-out answers, chance 1/16).
Keyed values are answered in one attention hop, and both models retrieve in layer 0, so here the
first-layers plan is the right one a priori; overall accuracy:

    model     budget   attention_mass  attention_mass/syn  gate   layers:mass  fraction  first layers  random (min-max)
    full      0.25     0.730           0.778               0.778  -            0.632     0.778         0.556 (0.479-0.632)
    full      0.5      0.878           0.878               1.000  1.000        0.778     1.000         0.721 (0.628-0.878)
    seg k=1   0.25     0.677           0.719               0.798  -            0.719     0.798         0.705 (0.652-0.753)
    seg k=1   0.5      0.731           0.816               0.842  0.731        0.816     0.891         0.803 (0.763-0.857)

(all: 1.000 and 0.917; none: 0.479 and 0.634.) The gate beats random and fraction everywhere and
picks the first-layers plan itself three times in four; on the k=1 model at budget 0.5 it loses to
first layers (0.842 against 0.891). attention_mass on the task's data is no better than random:
its scores are flat (0.47-0.52 for every KV head of both models), because it averages over every
query of the sequence and only the 8 question positions are trained, so most queries spread their
attention and put about half of it beyond the window whatever the head. The gate, scored on the
logits, separates the layers cleanly on the full model (gates 0.75-0.84 in layer 0, 0.015 in
layer 1). The k=1 model was trained with fraction(0.25) (KV head 0 of each layer) and still does
better with two layer-0 heads (0.798 against 0.719) and with every head long-range (0.917).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
import tbptt_regimes as regimes  # noqa: E402

from segcompile.testing import recall_task  # noqa: E402

import segcompile as sc  # noqa: E402
from segcompile.files import atomic_write_text  # noqa: E402

CALIBRATION_SEED_OFFSET = 2_000_003  # apart from the training stream and the held-out set


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", type=Path, required=True, help="the folder tbptt_regimes.py --save-models wrote")
    p.add_argument("--regimes", nargs="+", default=["full", "seg k=1"], help="whose trained models to evaluate")
    p.add_argument("--budgets", nargs="+", type=float, default=[0.25, 0.5], help="fractions of KV heads that are long-range")
    p.add_argument("--random-plans", type=int, default=8)
    p.add_argument("--calibration", type=int, default=16, help="task sequences select_heads scores on")
    p.add_argument("--gate-steps", type=int, default=100, help="gate method: Adam steps (select_heads' default)")
    p.add_argument("--selection-batch", type=int, default=4, help="select_heads batch_size")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    return p.parse_args(argv)


def first_heads(count: int, kv: list[int]) -> sc.HeadPlan:
    chosen = [(l, h) for l, n in enumerate(kv) for h in range(n)][:count]
    return sc.HeadPlan.from_dict({l: [h for ll, h in chosen if ll == l] for l in range(len(kv))})


def random_heads(count: int, kv: list[int], generator: torch.Generator) -> sc.HeadPlan:
    heads = [(l, h) for l, n in enumerate(kv) for h in range(n)]
    chosen = [heads[i] for i in torch.randperm(len(heads), generator=generator)[:count].tolist()]
    return sc.HeadPlan.from_dict({l: [h for ll, h in chosen if ll == l] for l in range(len(kv))})


def resolved(plan: sc.HeadPlan, kv: list[int]) -> dict[str, list[int]]:
    return {str(l): list(h) for l, h in plan.resolve(kv).items()}


def main(argv=None) -> dict:
    args = parse_args(argv)
    with regimes.torch_threads(args.threads):
        return run(args, argv)


def run(args, argv) -> dict:
    device = torch.device("cpu")
    report: dict = {"benchmark": "head_plans", "models": {}}
    for regime in args.regimes:
        model, cfg_args = regimes.load_model(args.models, regime, device)
        vocab = regimes.vocab_of(cfg_args)
        kv = [cfg_args.kv_heads] * cfg_args.layers
        total = sum(kv)
        base = regimes.segment_config(cfg_args, 1)
        eval_set = regimes.held_out_set(cfg_args, vocab)
        calibration = recall_task.batch(
            torch.Generator().manual_seed(cfg_args.seed + CALIBRATION_SEED_OFFSET), args.calibration, cfg_args.seq_len,
            pairs=cfg_args.pairs, queries=cfg_args.queries, vocab=vocab,
        )[0]

        def evaluate(plan: sc.HeadPlan) -> dict:
            cfg = sc.SegmentConfig(base.segment_len, tail_len=base.tail_len, sink_tokens=base.sink_tokens, long_range=plan)
            seg = sc.transform(model, cfg)
            r = regimes.evaluate(lambda ids: seg(ids).logits, eval_set, cfg_args, device)
            return {"long_range": resolved(plan, kv), **r}

        def select(method: str, budget: float, data, granularity: str = "head") -> tuple[sc.HeadPlan, dict]:
            start = time.perf_counter()
            plan = sc.select_heads(
                model, data, budget, method, base, granularity=granularity, seed=cfg_args.seed,
                seq_len=cfg_args.seq_len, samples=args.calibration, batch_size=args.selection_batch, steps=args.gate_steps,
            )
            seconds = time.perf_counter() - start
            return plan, {"select_seconds": seconds, "scores": plan.extra["scores"], **({"layer_scores": plan.extra["layer_scores"]} if granularity == "layer" else {})}

        print(f"{regime}: {cfg_args.layers} layers x {cfg_args.kv_heads} KV heads, S={base.segment_len}, "
              f"T={base.tail_len}, G={base.sink_tokens}; {len(eval_set) * cfg_args.batch_size * cfg_args.queries} held-out answers", flush=True)
        budgets: dict[str, dict] = {}
        for budget in args.budgets:
            count = max(1, round(budget * total)) if budget > 0 else 0
            rows: dict[str, dict] = {}
            for name, method, data in (("attention_mass", "attention_mass", calibration),
                                       ("attention_mass/syn", "attention_mass", None), ("gate", "gate", calibration)):
                plan, info = select(method, budget, data)
                rows[name] = {**evaluate(plan), **info}
            layers = budget * cfg_args.layers
            if abs(layers - round(layers)) < 1e-9 and 0 < round(layers) < cfg_args.layers:
                plan, info = select("attention_mass", budget, calibration, granularity="layer")
                rows["layers:mass"] = {**evaluate(plan), **info}
            rows["fraction"] = evaluate(sc.HeadPlan.fraction(budget))
            rows["first layers"] = evaluate(first_heads(count, kv))
            generator = torch.Generator().manual_seed(cfg_args.seed)
            draws = [evaluate(random_heads(count, kv, generator)) for _ in range(args.random_plans)]
            rows["random"] = summarise(draws)
            budgets[f"{budget:g}"] = {"heads": count, "total_kv_heads": total, "plans": rows}
            print_table(regime, budget, count, total, rows)
        bounds = {"all": evaluate(sc.HeadPlan.all()), "none": evaluate(sc.HeadPlan.none())}
        print_table(regime, None, None, total, bounds)
        report["models"][regime] = {"budgets": budgets, "bounds": bounds}
        run_info = json.loads((args.models / "run.json").read_text())
    report = {
        "benchmark": "head_plans",
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "device": "cpu",
        "torch": torch.__version__,
        "trained_by": run_info["command"],
        "training_config": run_info["config"],
        "calibration": {"sequences": args.calibration, "seed": cfg_args.seed + CALIBRATION_SEED_OFFSET,
                        "gate_steps": args.gate_steps, "batch_size": args.selection_batch},
        "random_plans": args.random_plans,
        "chance_accuracy": vocab.chance,
        "models": report["models"],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "head_plans-cpu.json"
    atomic_write_text(path, json.dumps(report, indent=1) + "\n")
    print(f"wrote {path}")
    return report


def summarise(draws: list[dict]) -> dict:
    acc = [d["accuracy"] for d in draws]
    buckets = sorted({b for d in draws for b in d["accuracy_by_segments_back"]}, key=int)
    return {
        "accuracy": sum(acc) / len(acc), "accuracy_min": min(acc), "accuracy_max": max(acc),
        "accuracy_by_segments_back": {b: sum(d["accuracy_by_segments_back"][b] for d in draws) / len(draws) for b in buckets},
        "draws": draws,
    }


def print_table(regime: str, budget, count, total, rows: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    buckets = sorted({b for r in rows.values() for b in r["accuracy_by_segments_back"]}, key=int)
    title = (f"{regime} model, budget {budget:g} ({count} of {total} KV heads): accuracy by segments back"
             if budget is not None else f"{regime} model, bounds: accuracy by segments back")
    table = Table(title=title)
    table.add_column("plan")
    table.add_column("long-range (layer: KV heads)")
    for b in buckets:
        table.add_column(b, justify="right")
    table.add_column("all", justify="right")
    for name, r in rows.items():
        heads = "; ".join(f"{l}: {h}" for l, h in r["long_range"].items() if h) if "long_range" in r else f"{len(r['draws'])} draws"
        overall = f"{r['accuracy']:.3f}" + (f" ({r['accuracy_min']:.3f}-{r['accuracy_max']:.3f})" if "draws" in r else "")
        table.add_row(name, heads or "-", *[f"{r['accuracy_by_segments_back'][b]:.3f}" for b in buckets], overall)
    Console(width=max(110, 10 * (len(buckets) + 6))).print(table)


if __name__ == "__main__":
    main()
