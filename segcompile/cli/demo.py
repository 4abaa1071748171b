"""``segcompile demo``: the whole pipeline on the built-in tiny model, checked as it goes.

Stages: build the tiny Llama (``segcompile.testing.models``) -> ``transform`` (capture and the passes, the
graph after each pass written to ``<out>/passes``, a folder renamed into place when complete; ``<out>``
is checked writable before any work) -> segmented forward over the sequence ->
prefill, one segment per call -> greedy decoding -> the oracle over the final sequence -> ONNX
export of the segment-step program (``<out>/model.onnx``), prefilled and decoded with onnxruntime.

Checks (exit status 1 if one fails):
* the segmented forward equals the oracle (docs/design.md invariant 3);
* prefill + decode give the oracle's logits at the positions they produce (invariant 4);
* a local KV head never holds more than G + T + S entries;
* a long-range KV head's history is every token before the tail;
* the exported program, run by onnxruntime, serves the same logits as the PyTorch program.
"""

from __future__ import annotations

import argparse
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from . import (
    HelpFormatter,
    UsageError,
    add_segment_flags,
    check_out_dir,
    check_plan_file,
    history_phrase,
    make_console,
    non_negative_int,
    positive_int,
    quiet,
    segment_config,
)
from ..files import check_writable
from ..passes.manager import check_dump_dir

name = "demo"
help = "compile the built-in tiny Llama, check it against the oracle, prefill and decode"

# fp32 logits on a random-init model: the segmented and dense computations differ only by
# summation order. Measured max |diff| on the defaults: 2.4e-7 (torch 2.13, CPU).
TOLERANCE = 1e-4


def subparser_init(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        name,
        help=help,
        description=(
            "Compile the built-in tiny Llama (random init, nothing downloaded) into a segment loop, "
            "compare it with the oracle, prefill the sequence and decode greedily; print what was "
            "built and measured. Exit status 1 if a check fails."
        ),
        formatter_class=HelpFormatter,
    )
    model = parser.add_argument_group("model")
    model.add_argument("--layers", type=positive_int, default=4, help="decoder layers of the tiny model")
    model.add_argument("--seed", type=int, default=0, help="seed of the weights and of the input tokens")
    add_segment_flags(parser, segment_len=64, sinks=4)
    run = parser.add_argument_group("run")
    run.add_argument("--tokens", type=positive_int, default=1024, help="sequence length (random tokens)")
    run.add_argument(
        "--decode-tokens", type=non_negative_int, default=16, help="tokens decoded greedily after the prefill"
    )
    run.add_argument("--batch", type=positive_int, default=1, help="sequences in the batch")
    run.add_argument("--no-export", action="store_true", help="skip the ONNX export and its onnxruntime run")
    run.add_argument("--out", default="segcompile-out",
                     help="output folder; the pass dumps go to OUT/passes (replaced if it holds earlier dumps)")
    return parser


def validate(args: argparse.Namespace) -> None:
    from ..testing.models import MAX_POSITIONS

    check_plan_file(args)
    total = args.tokens + args.decode_tokens
    if total > MAX_POSITIONS:
        raise UsageError(
            f"--tokens {args.tokens} + --decode-tokens {args.decode_tokens} = {total} positions, but the "
            f"built-in tiny model has max_position_embeddings={MAX_POSITIONS}",
            hint=f"use --tokens {MAX_POSITIONS - args.decode_tokens} or fewer "
            "(the oracle is dense: its memory grows as tokens^2)",
        )
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(
            f"--out {args.out} exists and is not a folder", hint="name a folder (it is created if missing)"
        )
    # OUT holds model.onnx (written atomically) and the pass dumps OUT/passes (a folder renamed into place)
    check_out_dir(args.out, check_writable, hint="give --out a folder in a place you can write to")
    check_out_dir(str(out / "passes"), check_dump_dir)


# ---- what the demo measured ------------------------------------------------------------------
@dataclass
class Check:
    name: str
    measured: str
    expected: str
    passed: bool | None  # None: not applicable


@dataclass
class DemoReport:
    """Everything the demo built and measured: printed now, and what the visualiser will read."""

    rows: list[tuple[str, str, str]] = field(default_factory=list)  # (section, key, value)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)
    dump_dir: Path | None = None
    dump_files: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.passed is not False for c in self.checks)


# ---- the command -----------------------------------------------------------------------------
def cmd(args: argparse.Namespace) -> int:
    import transformers

    cfg = segment_config(args)  # bad S/T/G or plan: ConfigError/PlanError (exit 2) before any work
    transformers.logging.set_verbosity_error()
    console = make_console(args)
    report = _run(args, cfg, _Stages(console, count=5 + bool(args.decode_tokens) + (not args.no_export)))

    _print(console, report)
    # The visualiser's pages: `transform(dump_dir=...)` wrote them beside the text dumps.
    console.print(f"pages: {report.dump_dir / 'index.html'}", markup=False, soft_wrap=True)
    return 0 if report.passed else 1


def _run(args: argparse.Namespace, cfg, stages: _Stages) -> DemoReport:
    import torch

    import segcompile as sc

    from ..testing.models import tiny_llama

    N, D, B, S = args.tokens, args.decode_tokens, args.batch, cfg.segment_len
    report = DemoReport(dump_dir=Path(args.out) / "passes", stage_seconds=stages.seconds)
    started = time.perf_counter()
    stages.console.print(f"[bold]segcompile demo[/]: built-in tiny Llama, {N} tokens in segments of {S}")

    with torch.no_grad():
        with stages.run("build model", f"build the tiny Llama (random init, seed {args.seed})"):
            model = tiny_llama(num_layers=args.layers, seed=args.seed)
            ids = torch.randint(0, model.config.vocab_size, (B, N), generator=torch.Generator().manual_seed(args.seed))

        with stages.run("transform", "transform: capture + passes") as st:
            seg = sc.transform(model, cfg, dump_dir=report.dump_dir)
            st.note = f"-> {report.dump_dir}"

        with stages.run("segmented forward", f"segmented forward, {N} tokens"):
            forward_logits = seg(ids).logits

        # Prefill one segment per call (the driver cuts one prefill call at the same places) so
        # that progress and the cache held at every step can be shown.
        cache = _CacheWatch(seg, cfg)
        state = seg.initial_state(ids)
        with stages.run("prefill", f"prefill {N} tokens", steps=cfg.num_segments(N)) as st:
            for a in range(0, N, S):
                chunk = ids[:, a : a + S]
                cache.before_step(state, chunk.shape[1])
                state = seg.prefill(chunk, state)
                st.advance()
        served = [state.logits]  # logits the model serves: position N-1, then one per decoded token

        generated = []
        if D:
            with stages.run("decode", f"decode {D} tokens greedily", steps=D) as st:
                for _ in range(D):
                    token = state.logits.argmax(-1, keepdim=True)
                    generated.append(token)
                    cache.before_step(state, 1)
                    logits, state = seg.decode(state, token)
                    served.append(logits[:, -1])
                    st.advance()

        full = torch.cat([ids, *generated], dim=1)
        with stages.run("oracle", f"oracle (dense masks), {full.shape[1]} tokens"):
            oracle_logits = sc.oracle.forward(model, cfg, full)

    # One check per output: a single difference over everything would hide which one is off.
    fwd = _max_diff(forward_logits, oracle_logits[:, :N])
    served_diff = _max_diff(torch.stack(served, dim=1), oracle_logits[:, N - 1 :])
    served_name = f"{'decode' if D else 'prefill'} vs oracle ({len(served)} position{'s' * (len(served) > 1)})"
    report.checks += [
        Check("forward vs oracle (max |diff|)", f"{fwd:.1e}", f"< {TOLERANCE:.0e}", fwd < TOLERANCE),
        Check(served_name, f"{served_diff:.1e}", f"< {TOLERANCE:.0e}", served_diff < TOLERANCE),
        cache.local_check(),
        cache.history_check(state),
    ]
    if not args.no_export:
        report.checks.append(_export_check(seg, ids, generated, served, Path(args.out), stages))
    report.dump_files = sorted(p.name for p in report.dump_dir.glob("*.txt"))
    _describe(report, args, model, seg, cfg)
    report.stage_seconds["total"] = time.perf_counter() - started
    return report


def _export_check(seg, ids, generated, served, out: Path, stages: _Stages) -> Check:
    """Export the step program, prefill and decode the same tokens with onnxruntime, and compare
    the logits it serves with the PyTorch program's."""
    import numpy as np
    import torch

    from ..deploy.onnx_export import export_onnx
    from ..deploy.onnxruntime_backend import OnnxSegmentedModel

    path = out / "model.onnx"
    with stages.run("export", "export to ONNX, run with onnxruntime") as st:
        summary = quiet(export_onnx, seg, path)
        runner = OnnxSegmentedModel(path)
        state = runner.prefill(ids.numpy())
        got = [state.logits]
        for token in generated:
            logits, state = runner.decode(state, token.numpy())
            got.append(logits[:, -1])
        st.note = f"-> {path} ({summary.bytes / 1e6:.1f} MB)"
    diff = np.abs(np.stack(got, axis=1) - torch.stack(served, dim=1).double().numpy()).max()
    return Check(f"ONNX vs PyTorch ({len(got)} pos.)", f"{diff:.1e}", f"< {TOLERANCE:.0e}", bool(diff < TOLERANCE))


# ---- measurements ----------------------------------------------------------------------------
class _CacheWatch:
    """Cache sizes read off the carried state (``SegmentState.layers[i]``) before every step."""

    def __init__(self, seg, cfg):
        self.seg, self.cfg, self.peak = seg, cfg, 0
        self.local_layers = [i for i, s in enumerate(seg.sites) if len(s.long_range) < s.num_kv_heads]

    def before_step(self, state, new_tokens: int) -> None:
        """A local KV head attends over sinks + tail + current + the step's own tokens (the step
        graph appends them to ``current`` before attention): that is what it holds at its peak."""
        for i in self.local_layers:
            held = sum(state.layers[i].local_entries().values()) + new_tokens
            self.peak = max(self.peak, held)

    def local_check(self) -> Check:
        G, T, S = self.cfg.sink_tokens, self.cfg.tail_len, self.cfg.segment_len
        if not self.local_layers:
            return Check("peak local-head cache", "-", "no local heads", None)
        return Check("peak local-head cache", str(self.peak), f"<= G+T+S = {G + T + S}", self.peak <= G + T + S)

    def history_check(self, state) -> Check:
        layers = [layer for site, layer in zip(self.seg.sites, state.layers) if site.long_range]
        if not layers:
            return Check("long-range history", "-", "no long-range heads", None)
        a = self.cfg.segment_start(state.position)
        tail, current = min(self.cfg.tail_len, a), state.position - a
        lengths = sorted({layer.hist_k.shape[2] for layer in layers})
        ok = lengths == [a - tail] and all(
            (layer.tail_k.shape[2], layer.current_k.shape[2]) == (tail, current) for layer in layers
        )
        expected = f"{state.position} - {tail} - {current} = {a - tail}"  # all tokens - tail - current segment
        return Check("long-range history", ", ".join(map(str, lengths)), expected, ok)


def _max_diff(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()


# ---- output ----------------------------------------------------------------------------------
class _Stage:
    def __init__(self, progress, task):
        self._progress, self._task, self.note = progress, task, ""

    def advance(self) -> None:
        self._progress.advance(self._task)


class _Stages:
    """Runs the demo's stages under a rich progress display; one line per finished stage."""

    def __init__(self, console, count: int):
        self.console, self.count, self.index = console, count, 0
        self.seconds: dict[str, float] = {}

    @contextmanager
    def run(self, key: str, label: str, steps: int | None = None):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
        )

        self.index += 1
        prefix = f"[{self.index}/{self.count}]"
        columns = [SpinnerColumn(), TextColumn(f"{prefix} {label}")]
        if steps is not None:
            columns += [BarColumn(), MofNCompleteColumn()]
        # Not a terminal (a pipe, a log, a test): no live display, only the finished-stage lines.
        progress = Progress(
            *columns, TimeElapsedColumn(), console=self.console, transient=True, disable=not self.console.is_terminal
        )
        start = time.perf_counter()
        with progress:
            stage = _Stage(progress, progress.add_task(label, total=steps))
            yield stage
        self.seconds[key] = time.perf_counter() - start
        note = f"  {stage.note}" if stage.note else ""
        self.console.print(f"{prefix} {label:<40} {self.seconds[key]:6.2f} s{note}", markup=False, soft_wrap=True)


def _describe(report: DemoReport, args, model, seg, cfg) -> None:
    import torch

    N, D, B = args.tokens, args.decode_tokens, args.batch
    c = model.config
    sites = seg.sites
    total_kv = sum(s.num_kv_heads for s in sites)
    long_kv = sum(len(s.long_range) for s in sites)
    nodes = list(seg.step_graph.graph.nodes)
    attention_nodes = seg.step_graph.graph.find_nodes(
        op="call_function", target=torch.ops.segcompile.segment_attention.default
    )
    t = report.stage_seconds
    add = report.rows.append

    dtype = str(sites[0].dtype).removeprefix("torch.")
    add(("model", "model", f"{seg.capture_info.model_class}, tiny, random init (seed {args.seed})"))
    heads = f"{c.num_attention_heads} heads / {c.num_key_value_heads} KV heads"
    add(("model", "shape", f"{len(sites)} layers, {heads}, head_dim {sites[0].head_dim}, {dtype}"))
    add(("model", "input", f"batch {B} x {N} tokens = {cfg.num_segments(N)} segments, then {D} decoded"))
    sizes = f"S={cfg.segment_len}  T={cfg.tail_len}  G={cfg.sink_tokens}  tbptt_k={cfg.tbptt_k}"
    add(("model", "segments", "  ".join(filter(None, [sizes, history_phrase(cfg.history_dtype)]))))
    add(("compiled", "head plan", f"{cfg.long_range.describe()}: {long_kv} of {total_kv} KV heads long-range"))
    for s in sites:
        local = [h for h in range(s.num_kv_heads) if h not in s.long_range]
        add((
            "compiled",
            f"layer {s.layer}",
            f"long-range KV heads {list(s.long_range)}, local {local}; {s.kind} -> {seg.implementations[s.layer]}",
        ))
    add((
        "compiled",
        "step graph",
        f"{len(attention_nodes)} segment_attention nodes ({len(sites)} layers), {len(nodes)} nodes",
    ))
    add(("time", "build model", f"{t['build model']:.2f} s"))
    add(("time", "transform", f"{t['transform']:.2f} s (capture {seg.capture_info.seconds:.2f} s)"))
    for key in ("segmented forward", "prefill", "decode", "oracle", "export"):
        if key in t:
            add(("time", key, f"{t[key]:.2f} s"))


def _print(console, report: DemoReport) -> None:
    from rich import box
    from rich.table import Table

    summary = Table(title="segcompile demo", show_header=False, box=box.SIMPLE_HEAD, title_justify="left")
    summary.add_column(style="bold")
    summary.add_column()
    section = None
    for sec, key, value in report.rows:
        if section is not None and sec != section:
            summary.add_section()
        section = sec
        summary.add_row(key, value)
    summary.add_row("total", f"{report.stage_seconds['total']:.2f} s")
    console.print()
    console.print(summary)

    checks = Table(title="checks", box=box.SIMPLE_HEAD, title_justify="left")
    checks.add_column("check")
    checks.add_column("measured", justify="right")
    checks.add_column("expected")
    checks.add_column("result")
    for c in report.checks:
        result = {True: "[green]PASS[/]", False: "[bold red]FAIL[/]", None: "n/a"}[c.passed]
        checks.add_row(c.name, c.measured, c.expected, result)
    console.print(checks)

    files = f" ({report.dump_files[0]} .. {report.dump_files[-1]})" if report.dump_files else ""
    console.print(f"pass dumps: {report.dump_dir}{files}", markup=False, soft_wrap=True)
    failed = [c.name for c in report.checks if c.passed is False]
    if failed:
        console.print(f"[bold red]FAIL[/]: {', '.join(failed)}")
    else:
        console.print(f"[green]all {sum(c.passed is True for c in report.checks)} checks passed[/]")
