"""GPU accuracy check of the Triton segment_attention kernels at the benchmark shape.

For every plan and a few segments of an N-token sequence (N=32K, D=128; then D=64, 96 and 256
on smaller shapes, so that every head-dim bucket of the tile table runs) (the first, the second and the last),
the Triton forward and all five gradients (q, current k/v, tail k/v) are compared with the
PyTorch reference computed in fp32 from the same inputs: bf16 inputs must stay within 1e-2 and
fp32 inputs within 1e-3 (relative error ``max|got - want| / max|want|``, and the norm ratio
``|got - want| / |want|`` reported beside it). Fresh random inputs per case. Then decode
(one query) against the reference, and the tiny Llama's prefill and decode under ``seg.compile()``.

    python bench/check_kernels_cuda.py          # writes results/check_kernels_cuda-<device>.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from segcompile.kernels.reference import segment_attention_reference
from segcompile.kernels.dispatch import segment_attention_backward, segment_attention_forward

from bench_kernel import PLANS, kernels_run, long_range_heads, segments  # noqa: E402

TOLERANCE = {torch.bfloat16: 1e-2, torch.float32: 1e-3}
NAMES = ("out", "dq", "dk", "dv", "dtail_k", "dtail_v")


def errors(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    diff = got.float() - want.float()
    return (diff.abs().max() / want.abs().max()).item(), (diff.norm() / want.norm()).item()


def check_segment(args, long_range, scale, dtype, seed) -> tuple[dict, dict]:
    torch.manual_seed(seed)
    args = [torch.randn_like(a, dtype=torch.float32).to(dtype) for a in args]  # fresh inputs per case
    live = [a.float().requires_grad_(i < 5) for i, a in enumerate(args)]
    want = segment_attention_reference(*live, long_range, scale)
    grad_out = torch.randn_like(want)
    want.backward(grad_out)
    got, lse = segment_attention_forward(*args, long_range, scale, return_lse=True)
    grads = segment_attention_backward(grad_out.to(dtype), got, *args, long_range, scale, lse=lse)
    result = {}
    for name, g, w in zip(NAMES, (got, *grads), (want, *[t.grad for t in live[:5]])):
        if w.numel() == 0:
            continue
        result[name] = errors(g, w)
    return result, kernels_run(args, long_range, grad_out.to(dtype))


def check_compiled_step_graph() -> dict:
    from segcompile.testing.models import random_ids
    from segcompile.testing.models import tiny_model as make_model

    import segcompile as sc

    model = make_model("llama").cuda()
    cfg = sc.SegmentConfig(8, tail_len=4, sink_tokens=2, long_range=sc.HeadPlan.fraction(0.5))
    seg = sc.transform(model, cfg)
    ids = random_ids(2, 29).cuda()
    with torch.no_grad():
        eager = [seg.prefill(ids[:, :20]).logits]
        state = seg.prefill(ids[:, :20])
        eager_decode = [seg.decode(state, ids[:, 20:21])[0]]
        seg.compile()
        torch._dynamo.utils.counters.clear()
        state = seg.prefill(ids[:, :20])
        compiled = state.logits
        for t in range(20, 29):
            logits, state = seg.decode(state, ids[:, t : t + 1])
            if t == 20:
                first_decode = logits
        frames = dict(torch._dynamo.utils.counters["stats"])
    return dict(
        impl=sorted(set(seg.implementations.values())),
        prefill_max_abs=(compiled - eager[0]).abs().max().item(),
        decode_max_abs=(first_decode - eager_decode[0]).abs().max().item(),
        dynamo_stats=frames,
    )


# (N, S, H, Hk, D, plans): the benchmark shape, then the other head-dim buckets' tiles (D=64
# and D=256 on small shapes; D=96 pads to 128 with masked columns)
SHAPES = [(32768, 4096, 32, 8, 128, list(PLANS)), (4096, 1024, 8, 2, 64, ["fraction(0.25)"]),
          (3000, 1024, 8, 2, 96, ["all"]), (4096, 1024, 8, 2, 256, ["none", "all"])]


def main():
    rows, failed = [], 0
    for N, S, H, hk, D, plans in SHAPES:
        q = torch.empty(1, H, N, D, device="cuda")
        k = torch.empty(1, hk, N, D, device="cuda")
        for dtype in (torch.bfloat16, torch.float32):
            for plan in plans:
                if dtype == torch.float32 and N > 4096 and plan != "fraction(0.25)":
                    continue  # fp32 at N=32K: one plan (the reference's fp32 products are slow)
                lr = long_range_heads(plan, hk)
                parts = list(segments(q, k, k, S, lr))
                for s in (0, 1, len(parts) - 1):
                    res, kernels = check_segment(parts[s], lr, D ** -0.5, dtype, seed=s)
                    worst = max(v[0] for v in res.values())
                    ok = worst <= TOLERANCE[dtype]
                    failed += not ok
                    rows.append(dict(head_dim=D, seq_len=N, dtype=str(dtype), plan=plan, segment=s, ok=ok, **res,
                                     kernels=kernels))
                    print(f"D={D:<4} {str(dtype):15} {plan:15} segment {s}: "
                          + " ".join(f"{n}={v[0]:.1e}" for n, v in res.items())
                          + f"  [{kernels['forward']}, {kernels['dkdv']}]" + ("" if ok else "  FAILED"), flush=True)
                    save(rows)  # after every case: a run stopped at its time limit keeps what it checked
    N, S, H, hk, D = SHAPES[0][:5]
    # decode: one query token after a partial segment, against the whole cache
    lr = long_range_heads("fraction(0.25)", hk)
    decode = [torch.randn(1, H, 1, D), torch.randn(1, hk, 777, D), torch.randn(1, hk, 777, D),
              torch.randn(1, hk, S, D), torch.randn(1, hk, S, D), torch.randn(1, hk, 4, D), torch.randn(1, hk, 4, D),
              torch.randn(1, len(lr), 20000, D), torch.randn(1, len(lr), 20000, D)]
    decode = [t.cuda().bfloat16() for t in decode]
    err = errors(segment_attention_forward(*decode, lr, D ** -0.5),
                 segment_attention_reference(*[t.float() for t in decode], lr, D ** -0.5))
    print(f"decode bf16: {err[0]:.1e}")
    failed += err[0] > TOLERANCE[torch.bfloat16]
    compiled = check_compiled_step_graph()
    print("compiled step graph:", compiled)
    failed += compiled["prefill_max_abs"] > 1e-4 or compiled["decode_max_abs"] > 1e-4
    out = save(rows, decode=err, compiled=compiled, complete=True)
    print(f"{'FAILED' if failed else 'all passed'}; wrote {out}")
    sys.exit(1 if failed else 0)


def save(rows, decode=None, compiled=None, complete: bool = False) -> Path:
    device = torch.cuda.get_device_name()
    out = Path(__file__).parent / "results" / f"check_kernels_cuda-{device.replace(' ', '_')}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(dict(device=device, torch=torch.__version__, complete=complete, rows=rows, decode=decode,
                                   compiled_step_graph=compiled, command="python bench/check_kernels_cuda.py"), indent=1))
    return out


if __name__ == "__main__":
    main()
