"""The exported ONNX step program on onnxruntime's CUDA provider against ``SegmentedModel`` on the
same GPU: parity and speed, per model, dtype and head plan.

Models: segcompile.testing's tiny Llama, and the Llama-3-8B shape of ``bench_generate.py``'s
``build_model`` (random weights, ``--layers`` decoder layers, 2 by default so that its exports fit
the run's time). Per model, dtype (fp32, fp16) and plan (none, fraction(0.25), all), one case:

1. ``sc.transform`` (S = T = --segment-len, no sinks) and ``export_onnx`` (``logits="last"``);
2. ``OnnxSegmentedModel(path, device=--device)``: the CUDA provider on a GPU, the CPU provider
   with ``--device cpu``;
3. parity: prefill --segments segments less --boundary tokens, then decode --new-tokens tokens a
   token at a time (the reference's greedy tokens fed to both), which crosses a segment end.
   fp32: the largest ``|onnx - torch|`` over the prefill's last logits and every decoded token's
   (target 1e-4); fp16: the worst token's ``max |onnx - torch| / max |torch|`` (target 1e-2):
   the fp32 and fp16 rows of ``segcompile.testing.tolerances``;
4. speed, after the parity run warmed both up: prefill tokens/s of the same prompt and decode ms
   per token (greedy, the first token left out) for the ONNX runner, ``seg.prefill``/``seg.decode``
   (eager) and ``seg.decode`` after ``seg.enable_cuda_graphs()`` (where it runs).

A case that fails (an export error, an out-of-memory) is a row that says why; the next case
runs. Cases start while the run is inside --budget-s seconds; the rest are rows marked skipped.
The table is printed and written to ``results/bench_onnx_gpu-<device>.json``.

    python bench/bench_onnx_gpu.py                        # one GPU: tiny and 8B shape, every dtype and plan
    python bench/bench_onnx_gpu.py --models 8b --dtypes float16 --plans "fraction(0.25)"
    python bench/bench_onnx_gpu.py --tiny --device cpu    # the tiny model on the CPU provider (smoke run)

The CUDA provider needs onnxruntime-gpu first on ``sys.path`` (``bench/onnxruntime_gpu.sh``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch  # before onnxruntime: the CUDA provider uses the CUDA libraries torch loads

import segcompile as sc
from segcompile.deploy.onnx_export import export_onnx
from segcompile.deploy.onnxruntime_backend import OnnxSegmentedModel
from segcompile.quality import report
from segcompile.testing.models import tiny_model
from segcompile.testing.tolerances import max_abs_error, relative_error, tolerance

sys.path.insert(0, str(Path(__file__).parent))  # the other benches, run as scripts or loaded

from bench_generate import build_model, free, seg_run, sync  # noqa: E402
from bench_training import write_result  # noqa: E402

MODELS = ("tiny", "8b")
DTYPES = {"float32": torch.float32, "float16": torch.float16}
# fraction(0.25) first: bench_generate.py's plan, the one a run cut short by its budget should have
PLANS = {"fraction(0.25)": sc.HeadPlan.fraction(0.25), "none": sc.HeadPlan.none(), "all": sc.HeadPlan.all()}
# the error each dtype is judged by, and its target (segcompile.testing.tolerances)
MEASURES = {torch.float32: "logits", torch.float16: "relative"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--tiny", action="store_true", help="the tiny model only (--models tiny)")
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    p.add_argument("--plans", nargs="+", choices=list(PLANS), default=list(PLANS))
    p.add_argument("--layers", type=int, default=2, help="decoder layers of the 8B shape")
    p.add_argument("--segment-len", type=int, default=None, help="S = T (default: 16 tiny, 512 for the 8B shape)")
    p.add_argument("--segments", type=int, default=4, help="the prompt spans this many segments, less --boundary")
    p.add_argument("--boundary", type=int, default=4, help="the prompt ends this many tokens before a segment end")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--budget-s", type=float, default=240.0,
                   help="start no case after this many seconds (an 8B-shaped case takes about a minute)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args(argv)
    if args.tiny:
        args.models = ["tiny"]
    if args.new_tokens <= args.boundary:
        p.error(f"--new-tokens must exceed --boundary ({args.boundary}): the decode must cross a segment end")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no GPU here; use --device cpu")
    return args


def segment_len(args, model_name: str) -> int:
    return args.segment_len or (16 if model_name == "tiny" else 512)


# ---- models -----------------------------------------------------------------------------------------
def make_model(args, model_name: str, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """The tiny Llama, or the 8B shape of ``bench_generate.build_model`` with ``--layers`` layers, in ``dtype``."""
    if model_name == "tiny":
        return tiny_model("llama", "sdpa", 2, dtype).to(device)
    prompt = args.segments * segment_len(args, model_name)
    shape = SimpleNamespace(tiny=False, layers=args.layers, prompt_lens=[prompt], new_tokens=args.new_tokens)
    return build_model(shape, device).to(dtype)  # build_model's bf16 (CUDA) weights, cast


class Graphs:
    """One model and its capture per (model, dtype), made when a case first needs it."""

    def __init__(self, args, device):
        self.args, self.device, self.cache = args, device, {}

    def get(self, model_name: str, dtype: torch.dtype):
        key = (model_name, dtype)
        if key not in self.cache:
            model = make_model(self.args, model_name, dtype, self.device)
            self.cache[key] = model, sc.capture(model)
        return self.cache[key]


# ---- one case ---------------------------------------------------------------------------------------
def timed(device, fn):
    """``(fn(), seconds)``, the device synchronised on both sides."""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


def errors(got: np.ndarray, want: torch.Tensor) -> tuple[float, float]:
    """(max abs, relative) error of the runner's logits ``got`` against ``want``."""
    got = torch.from_numpy(np.asarray(got)).reshape(want.shape)
    want = want.detach().cpu()
    if not (torch.isfinite(got).all() and torch.isfinite(want).all()):
        return float("inf"), float("inf")  # a NaN must not read as agreement
    return max_abs_error(got, want), relative_error(got, want)


def parity(seg, runner, ids: torch.Tensor, new_tokens: int) -> dict:
    """Prefill ``ids`` in both, then decode the reference's greedy tokens in both; the worst errors."""
    state = runner.prefill(ids.cpu().numpy())
    ref = seg.prefill(ids)
    worst = errors(state.logits, ref.logits)
    for _ in range(new_tokens):
        token = ref.logits.argmax(-1, keepdim=True)
        want, ref = seg.decode(ref, token)
        got, state = runner.decode(state, token.cpu().numpy())
        worst = tuple(map(max, worst, errors(got, want)))
    return dict(max_abs_error=worst[0], max_rel_error=worst[1])


def onnx_speed(runner, ids: np.ndarray, new_tokens: int) -> dict:
    """Prefill tokens/s and greedy decode ms per token (the first token left out) of the runner."""
    start = time.perf_counter()
    state = runner.prefill(ids)
    prefill_s = time.perf_counter() - start
    token = runner.backend.next_token(state.logits)
    times = []
    for _ in range(new_tokens):
        logits, state = runner.decode(state, token)  # returns with the logits on the host
        token = runner.backend.next_token(logits[:, -1])
        times.append(time.perf_counter())
    return dict(onnx_prefill_tokens_per_s=ids.size / prefill_s,
                onnx_decode_ms=(times[-1] - times[0]) * 1e3 / max(len(times) - 1, 1))


def torch_speed(seg, ids: torch.Tensor, new_tokens: int, device: torch.device) -> dict:
    """``seg.prefill`` tokens/s and eager ``seg.decode`` ms per token."""
    state, prefill_s = timed(device, lambda: seg.prefill(ids))
    run = seg_run(seg, state, new_tokens)
    return dict(torch_prefill_tokens_per_s=ids.numel() / prefill_s, torch_decode_ms=run["ms_per_token"])


def cuda_graph_speed(seg, ids: torch.Tensor, new_tokens: int) -> dict:
    """``seg.decode`` ms per token after ``seg.enable_cuda_graphs()`` (a warm-up run first: capture)."""
    seg.enable_cuda_graphs()
    try:
        seg_run(seg, seg.prefill(ids), new_tokens)
        run = seg_run(seg, seg.prefill(ids), new_tokens)
        return dict(cuda_graph_decode_ms=run["ms_per_token"], cuda_graph_path=seg.last_decode_path)
    except Exception as e:  # a path that does not run at this dtype is a note, not a failed case
        return dict(cuda_graph_error=one_line(e))
    finally:
        seg.disable_cuda_graphs()


def run_case(args, graphs: Graphs, model_name: str, dtype: torch.dtype, plan: str, device, workdir: Path) -> dict:
    model, graph = graphs.get(model_name, dtype)
    S = segment_len(args, model_name)
    row = dict(model=model_name, dtype=str(dtype).removeprefix("torch."), plan=plan, segment_len=S)
    seg = sc.transform(graph, sc.SegmentConfig(S, long_range=PLANS[plan], tbptt_k=0))
    path = workdir / f"{model_name}-{row['dtype']}-{plan}.onnx"
    try:
        _, row["export_s"] = timed(device, lambda: export_onnx(seg, path))
    except Exception as e:
        raise ExportFailed(one_line(e)) from e
    row["file_gib"] = sum(f.stat().st_size for f in workdir.iterdir()) / (1 << 30)
    runner, row["open_s"] = timed(device, lambda: OnnxSegmentedModel(path, device=args.device))
    row["provider"] = runner.provider
    n = args.segments * S - args.boundary
    ids = torch.randint(0, model.config.vocab_size, (args.batch, n), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    row["prompt_tokens"] = n
    row.update(parity(seg, runner, ids, args.new_tokens))
    measure = MEASURES[dtype]
    row["measure"] = "max_abs_error" if measure == "logits" else "max_rel_error"
    row["target"] = getattr(tolerance(dtype), measure)
    row["within_target"] = row[row["measure"]] <= row["target"]
    row.update(onnx_speed(runner, ids.cpu().numpy(), args.new_tokens))
    row.update(torch_speed(seg, ids, args.new_tokens, device))
    if device.type == "cuda":
        row.update(cuda_graph_speed(seg, ids, args.new_tokens))
    return row


class ExportFailed(Exception):
    """The export of a case failed: the other plans of its model and dtype would fail alike."""


def one_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"


def cases(args) -> list[tuple[str, torch.dtype, str]]:
    """Every (model, dtype, plan) asked for; per model the plans in turn, each in every dtype, so
    that a run cut short by its budget has covered plans in both dtypes first."""
    return [(m, DTYPES[d], p) for m in args.models for p in args.plans for d in args.dtypes]


def run_all(args, device) -> list[dict]:
    graphs, rows, start = Graphs(args, device), [], time.perf_counter()
    failed_exports = {}  # (model, dtype) -> the case whose export failed
    for model_name, dtype, plan in cases(args):
        row = dict(model=model_name, dtype=str(dtype).removeprefix("torch."), plan=plan)
        if time.perf_counter() - start > args.budget_s:
            row["skipped"] = f"the run's budget of {args.budget_s:.0f} s was spent"
        elif (model_name, dtype) in failed_exports:  # an export takes most of a case's time: spend it elsewhere
            row["skipped"] = f"the export of {failed_exports[model_name, dtype]} failed"
        else:
            with tempfile.TemporaryDirectory(prefix="bench_onnx_gpu-") as workdir, torch.no_grad():
                try:
                    row = run_case(args, graphs, model_name, dtype, plan, device, Path(workdir))
                except Exception as e:  # reported in the table; the next case runs
                    traceback.print_exc()
                    row["error"] = one_line(e)
                    if isinstance(e, ExportFailed):
                        failed_exports[model_name, dtype] = f"{model_name} {row['dtype']} {plan}"
            free(device)
        row["elapsed_s"] = time.perf_counter() - start
        rows.append(row)
        print({k: v for k, v in row.items()}, flush=True)
    return rows


# ---- report -----------------------------------------------------------------------------------------
def print_table(result: dict) -> None:
    print(f"\n{result['device']}; onnxruntime {result['onnxruntime']} ({', '.join(result['onnxruntime_providers'])}); "
          f"prompt {result['segments']} segments less {result['boundary']} tokens, {result['new_tokens']} decoded, "
          f"batch {result['batch']}")
    print(f"{'model':5} {'dtype':7} {'plan':14} {'provider':22} {'error':>9} {'target':>7} {'ok':3} "
          f"{'export s':>8} | {'prefill tok/s: onnx':>19} {'torch':>9} | {'decode ms: onnx':>15} {'torch':>7} "
          f"{'graphs':>7}")
    for r in result["rows"]:
        head = f"{r['model']:5} {r['dtype']:7} {r['plan']:14}"
        if "skipped" in r or "error" in r:
            print(f"{head} {'skipped: ' + r['skipped'] if 'skipped' in r else 'failed: ' + r['error']}")
            continue
        graphs = f"{r['cuda_graph_decode_ms']:7.2f}" if "cuda_graph_decode_ms" in r else f"{'-':>7}"
        print(f"{head} {r['provider']:22} {r[r['measure']]:9.2e} {r['target']:7.0e} {'yes' if r['within_target'] else 'NO':3} "
              f"{r['export_s']:8.1f} | {r['onnx_prefill_tokens_per_s']:19.0f} {r['torch_prefill_tokens_per_s']:9.0f} | "
              f"{r['onnx_decode_ms']:15.2f} {r['torch_decode_ms']:7.2f} {graphs}")
    print("error: fp32 max |onnx - torch| over the logits; fp16 the worst token's max |onnx - torch| / max |torch|")


def onnxruntime_build(ort) -> str:
    """The distribution the imported ``onnxruntime`` module ``ort`` comes from (``onnxruntime-gpu``
    or the CPU ``onnxruntime``: both install that package), by the metadata folder beside it."""
    site = Path(ort.__file__).parent.parent
    names = sorted(p.name.split("-")[0].replace("_", "-") for p in site.glob("onnxruntime*.dist-info"))
    return ", ".join(names) or "unknown"


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 products in fp32, as the CUDA provider's (no TF32)
    import onnxruntime as ort

    if args.device == "cuda" and hasattr(ort, "preload_dlls"):
        ort.preload_dlls()  # the CUDA libraries torch has not loaded yet, from the nvidia-* packages
    print(f"onnxruntime {ort.__version__} ({onnxruntime_build(ort)}); providers {ort.get_available_providers()}", flush=True)
    rows = run_all(args, device)
    result = dict(
        device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        torch=torch.__version__, onnxruntime=ort.__version__, onnxruntime_build=onnxruntime_build(ort),
        onnxruntime_providers=ort.get_available_providers(),
        command=report.recorded_command("bench/bench_onnx_gpu.py", sys.argv[1:], {"--out"}),
        layers_8b=args.layers, segments=args.segments, boundary=args.boundary, new_tokens=args.new_tokens,
        batch=args.batch, budget_s=args.budget_s, rows=rows,
    )
    print_table(result)
    write_result(result, "bench_onnx_gpu", args.out)
    return result


if __name__ == "__main__":
    main()
