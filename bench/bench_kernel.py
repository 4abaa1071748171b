"""segment_attention kernel speed: segcompile's Triton kernels vs FlexAttention vs SDPA dense causal.

One sequence of N tokens, B=1, H query heads over Hk KV heads, head dim D, bf16; segments of
S tokens, tail T = S, no sinks, a plan of long-range KV heads (none / fraction(0.25) / all):

* ``segcompile``: what the segment loop runs, ``N / S`` calls of the Triton forward (and
  backward, with gradient into the tail: ``tbptt_k = 1``), each over [history | tail | current];
* ``flex``: one ``torch.compile``'d ``flex_attention`` call over the whole sequence with a
  BlockMask from ``create_block_mask(..., _compile=True)`` giving the same visible pairs and the
  same detach semantics: keys are passed twice, a detached copy (history and sinks) and a live
  one (tail and current), so that no gradient reaches history keys;
* ``sdpa``: ``F.scaled_dot_product_attention(is_causal=True)`` over the whole sequence (dense causal,
  whatever backend PyTorch picks; K/V repeated to H heads before timing).

Useful TFLOP/s count only the visible query-key pairs: ``4 * D`` flops a pair forward, 2.5 times
that backward (so forward+backward is ``14 * D`` a pair), whatever each implementation
actually computes. Times are medians of ``triton.testing.do_bench``.

    python bench/bench_kernel.py                    # N=32K, S=4096, H=32, Hk=8, D=128
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

from segcompile.kernels import dispatch
from segcompile.kernels.dispatch import segment_attention_backward, segment_attention_forward
from segcompile.kernels.problem import prepare

PLANS = {"none": 0.0, "fraction(0.25)": 0.25, "all": 1.0}


def add_shape_arguments(p: argparse.ArgumentParser) -> None:
    """The benchmark shape (also ``tune_kernels.py``'s): B=1, N, S = T, H query heads, Hk KV heads, D."""
    p.add_argument("--seq-len", type=int, default=32768)
    p.add_argument("--segment-len", type=int, default=4096)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_arguments(p)
    p.add_argument("--plans", nargs="+", default=list(PLANS))
    p.add_argument("--peers", nargs="+", default=["segcompile", "flex", "sdpa"])
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    return p.parse_args(argv)


def long_range_heads(plan: str, kv_heads: int) -> list[int]:
    return list(range(round(PLANS[plan] * kv_heads)))


def visible_pairs(N: int, S: int, T: int, H: int, kv_heads: int, long_range: list[int]) -> int:
    """Query-key pairs the segment semantics make visible, summed over query heads."""
    group = H // kv_heads
    i = torch.arange(N, dtype=torch.float64)
    start = (i // S) * S
    local = i - torch.clamp(start - T, min=0) + 1
    long = i + 1
    per_kv_head = [long.sum() if c in long_range else local.sum() for c in range(kv_heads)]
    return int(sum(per_kv_head).item()) * group


def segments(q, k, v, S, long_range):
    """Per segment: the nine tensor arguments of segment_attention (views, as the driver passes them)."""
    N = q.shape[2]
    empty = k[:, :, :0]
    lr = torch.tensor(long_range, dtype=torch.long, device=q.device)
    hist_k_all, hist_v_all = k.index_select(1, lr), v.index_select(1, lr)
    for a in range(0, N, S):
        tail = slice(max(a - S, 0), a)
        hist = slice(0, max(a - S, 0))
        yield [q[:, :, a : a + S], k[:, :, a : a + S], v[:, :, a : a + S], k[:, :, tail], v[:, :, tail],
               empty, empty, hist_k_all[:, :, hist], hist_v_all[:, :, hist]]


def segcompile_runs(q, k, v, do, S, long_range, scale):
    parts = list(segments(q, k, v, S, long_range))
    grads = [do[:, :, a : a + S] for a in range(0, q.shape[2], S)]

    def fwd():
        for args in parts:
            segment_attention_forward(*args, long_range, scale)

    def fwd_bwd():  # as autograd runs them: the backward takes the forward's log-sum-exp
        for args, g in zip(parts, grads):
            out, lse = segment_attention_forward(*args, long_range, scale, return_lse=True)
            segment_attention_backward(g, out, *args, long_range, scale, lse=lse)

    return fwd, fwd_bwd


def kernels_run(args, long_range, grad_out) -> dict:
    """The forward and dK/dV kernels a ``segment_attention`` call on ``args`` runs (the backward
    given the forward's log-sum-exp, as autograd runs it), for the result files."""
    problem = prepare(*args, long_range)
    return dict(forward=dispatch.forward_kernel(problem),
                dkdv=dispatch.dkdv_kernel(problem, grad_out, lse_given=True, tail_grads=problem.T > 0))


def flex_runs(q, k, v, do, S, long_range, scale):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    N, H, hk = q.shape[2], q.shape[1], k.shape[1]
    group = H // hk
    long_head = torch.zeros(H, dtype=torch.bool, device=q.device)
    for c in long_range:
        long_head[c * group : (c + 1) * group] = True

    def mask_mod(b, h, q_idx, kv_idx):
        live = kv_idx >= N
        j = torch.where(live, kv_idx - N, kv_idx)
        seg_start = (q_idx // S) * S
        tail_start = seg_start - S
        live_visible = live & (j <= q_idx) & (j >= tail_start)
        history_visible = ~live & (j < tail_start) & long_head[h]
        return live_visible | history_visible

    block_mask = create_block_mask(mask_mod, B=None, H=H, Q_LEN=N, KV_LEN=2 * N, device=q.device, _compile=True)
    compiled = torch.compile(flex_attention)
    qg = q.detach().requires_grad_()
    kg = k.detach().requires_grad_()
    vg = v.detach().requires_grad_()

    def run():
        k2 = torch.cat([kg.detach(), kg], dim=2)
        v2 = torch.cat([vg.detach(), vg], dim=2)
        return compiled(qg, k2, v2, block_mask=block_mask, scale=scale, enable_gqa=True)

    def fwd():
        with torch.no_grad():
            run()

    def fwd_bwd():
        run().backward(do)

    return fwd, fwd_bwd


def sdpa_runs(q, k, v, do, scale):
    group = q.shape[1] // k.shape[1]
    qg = q.detach().requires_grad_()
    kg = k.repeat_interleave(group, 1).detach().requires_grad_()
    vg = v.repeat_interleave(group, 1).detach().requires_grad_()

    def fwd():
        with torch.no_grad():
            F.scaled_dot_product_attention(qg, kg, vg, is_causal=True, scale=scale)

    def fwd_bwd():
        F.scaled_dot_product_attention(qg, kg, vg, is_causal=True, scale=scale).backward(do)

    return fwd, fwd_bwd


def timed(fn) -> float:
    return triton.testing.do_bench(fn, warmup=100, rep=500, return_mode="median")


def main(argv=None):
    args = parse_args(argv)
    N, S, H, hk, D = args.seq_len, args.segment_len, args.heads, args.kv_heads, args.head_dim
    torch.manual_seed(0)
    q = torch.randn(1, H, N, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, hk, N, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, hk, N, D, device="cuda", dtype=torch.bfloat16)
    do = torch.randn(1, H, N, D, device="cuda", dtype=torch.bfloat16)
    scale = D ** -0.5
    rows = []
    for plan in args.plans:
        long_range = long_range_heads(plan, hk)
        pairs = visible_pairs(N, S, S, H, hk, long_range)
        peers = {
            "segcompile": lambda: segcompile_runs(q, k, v, do, S, long_range, scale),
            "flex": lambda: flex_runs(q, k, v, do, S, long_range, scale),
        }
        for name in args.peers:
            if name == "sdpa":
                continue
            fwd, fwd_bwd = peers[name]()
            ms_f, ms_fb = timed(fwd), timed(fwd_bwd)
            rows.append(dict(plan=plan, impl=name, fwd_ms=ms_f, fwd_bwd_ms=ms_fb,
                             fwd_tflops=4 * D * pairs / ms_f / 1e9, fwd_bwd_tflops=14 * D * pairs / ms_fb / 1e9))
            if name == "segcompile":
                rows[-1]["kernels"] = kernels_run(list(segments(q, k, v, S, long_range))[-1], long_range, do)
            print(rows[-1], flush=True)
    if "sdpa" in args.peers:
        pairs = H * N * (N + 1) // 2
        fwd, fwd_bwd = sdpa_runs(q, k, v, do, scale)
        ms_f, ms_fb = timed(fwd), timed(fwd_bwd)
        rows.append(dict(plan="dense causal", impl="sdpa", fwd_ms=ms_f, fwd_bwd_ms=ms_fb,
                         fwd_tflops=4 * D * pairs / ms_f / 1e9, fwd_bwd_tflops=14 * D * pairs / ms_fb / 1e9))
    report(args, rows)


def report(args, rows):
    device = torch.cuda.get_device_name()
    flex = {r["plan"]: r for r in rows if r["impl"] == "flex"}
    print(f"\n{device}; N={args.seq_len} S={args.segment_len} H={args.heads} Hk={args.kv_heads} D={args.head_dim} bf16")
    print(f"{'plan':16} {'impl':11} {'fwd ms':>8} {'fwd TF/s':>9} {'f+b ms':>8} {'f+b TF/s':>9} {'vs flex f / f+b':>16}")
    for r in rows:
        f = flex.get(r["plan"])
        ratio = f"{f['fwd_ms'] / r['fwd_ms']:.2f}x / {f['fwd_bwd_ms'] / r['fwd_bwd_ms']:.2f}x" if f else ""
        r["vs_flex_fwd"], r["vs_flex_fwd_bwd"] = (f["fwd_ms"] / r["fwd_ms"], f["fwd_bwd_ms"] / r["fwd_bwd_ms"]) if f else (None, None)
        print(f"{r['plan']:16} {r['impl']:11} {r['fwd_ms']:8.2f} {r['fwd_tflops']:9.0f} {r['fwd_bwd_ms']:8.2f} "
              f"{r['fwd_bwd_tflops']:9.0f} {ratio:>16}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"bench_kernel-{device.replace(' ', '_')}.json"
    meta = dict(device=device, torch=torch.__version__, triton=triton.__version__, command=" ".join(sys.argv),
                seq_len=args.seq_len, segment_len=args.segment_len, heads=args.heads, kv_heads=args.kv_heads,
                head_dim=args.head_dim, dtype="bfloat16")
    path.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
