"""Every kernel launch passes ``triton_common.COMPILE_OPTIONS``: floating-point contraction asked
for, not left to Triton's default, which Triton 3.10 turns off (the kernels' rounding and speed
were measured with it on). Each launcher runs once here with its launches recorded: forward and
backward over a tail, sinks and an fp8 history, a decode step split over the keys, the static
decoder's step, both history kernels and, on a Hopper GPU, the Gluon forward and dK/dV.

On a machine without CUDA they run in Triton's interpreter, which takes the option and ignores it:
what is checked is that each launch passes it.
"""

from __future__ import annotations

import os

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and TRITON_INTERPRET is not 1", allow_module_level=True)

from triton.runtime.jit import KernelInterface  # noqa: E402

from segcompile.kernels import dispatch, triton_attention, triton_decode, triton_history  # noqa: E402
from segcompile.kernels.history_format import HistoryGeometry, QuantizedHistory  # noqa: E402
from segcompile.kernels.problem import prepare  # noqa: E402
from segcompile.kernels.triton_common import COMPILE_OPTIONS  # noqa: E402

FP8 = torch.float8_e4m3fn
B, H, HK, D, T, G, S = 1, 4, 2, 16, 16, 2, 32
LONG_RANGE = [1]


def kernel_modules():
    gluon = dispatch.gluon()
    return [triton_attention, triton_decode, triton_history] + ([gluon] if gluon is not None else [])


def record_launches(monkeypatch) -> tuple[dict[str, str], list[tuple[str, dict]]]:
    """The kernels of the kernel modules (``name_kernel``: what a launcher runs, not the device
    functions they call) and the module of each; every launch of any of their functions is
    appended to the list, with its options."""
    launches, kernels = [], {}
    for module in kernel_modules():
        for fn in {id(f): f for f in vars(module).values() if isinstance(f, KernelInterface)}.values():
            name = fn.fn.__name__
            if name.endswith("_kernel"):
                kernels[name] = module.__name__

            def run(*args, _run=fn.run, _name=name, **kwargs):
                launches.append((_name, kwargs))
                return _run(*args, **kwargs)

            monkeypatch.setattr(fn, "run", run)
    return kernels, launches


def inputs(lq: int, lk: int, P: int, sinks: int = G, head_dim: int = D, dtype=torch.float32, seed: int = 0):
    """The nine tensor arguments of ``segment_attention``, random normal."""
    g = torch.Generator().manual_seed(seed)
    n_lr = len(LONG_RANGE)
    shapes = [(B, H, lq), (B, HK, lk), (B, HK, lk), (B, HK, T), (B, HK, T), (B, HK, sinks), (B, HK, sinks),
              (B, n_lr, P), (B, n_lr, P)]
    return [torch.randn(*shape, head_dim, generator=g).to(DEVICE, dtype) for shape in shapes]


def quantised(args: list[torch.Tensor]) -> list[torch.Tensor]:
    """``args`` with the history quantised by the Triton kernel (``_quantize_kernel``)."""
    geometry = HistoryGeometry(S, T)
    hist = [QuantizedHistory.of(*triton_history.quantize(h, 0, geometry, FP8), geometry) for h in args[7:]]
    return args[:7] + hist


def run_every_launcher():
    scale = D ** -0.5
    args = quantised(inputs(lq=S, lk=S, P=2 * S))
    out, lse = dispatch.segment_attention_forward(*args, LONG_RANGE, scale, return_lse=True)
    dispatch.segment_attention_backward(torch.randn_like(out), out, *args, LONG_RANGE, scale, lse=lse)
    triton_history.dequantize(args[7], torch.float32)
    dispatch.segment_attention_forward(*quantised(inputs(lq=1, lk=1, P=2 * S, seed=1)), LONG_RANGE, scale)

    # the prefix's part of dQ where no head has prefix keys: only the rows' delta is computed
    p = prepare(*inputs(lq=S, lk=S, P=0, sinks=0, seed=2), LONG_RANGE)
    o, do = torch.randn_like(p.q), torch.randn_like(p.q)
    triton_attention.launch_dq(p, o, do, scale, torch.zeros(B * H * S, device=DEVICE), prefix_only=True)

    local = [torch.randn(HK, B, G + T + S, D, device=DEVICE) for _ in range(2)]
    position, rows = torch.tensor(S + 3, device=DEVICE), torch.arange(HK, dtype=torch.int32, device=DEVICE)
    triton_decode.static_decode_forward(torch.randn(B, H, 1, D, device=DEVICE), *local, None, None, position, rows,
                                        n_local=HK, segment_len=S, tail_len=T, sinks=G, scale=scale)

    wide = inputs(lq=4 * S, lk=4 * S, P=S, head_dim=64, dtype=torch.bfloat16, seed=4)  # where Gluon applies
    if dispatch.gluon_applies(prepare(*wide, LONG_RANGE)):
        out, lse = dispatch.segment_attention_forward(*wide, LONG_RANGE, 0.125, return_lse=True)
        dispatch.segment_attention_backward(torch.randn_like(out), out, *wide, LONG_RANGE, 0.125, lse=lse)


def test_every_kernel_launch_asks_for_fp_contraction(monkeypatch):
    kernels, launches = record_launches(monkeypatch)
    run_every_launcher()
    gluon = dispatch.gluon()
    runs_gluon = DEVICE == "cuda" and gluon is not None and gluon.runs_on(torch.device(DEVICE))
    want = {name for name, module in kernels.items() if runs_gluon or gluon is None or module != gluon.__name__}
    launched = {name for name, _ in launches}
    assert want <= launched, f"never launched here: {sorted(want - launched)}"
    without = sorted({name for name, options in launches
                      if any(options.get(key) != value for key, value in COMPILE_OPTIONS.items())})
    assert not without, f"launched without {COMPILE_OPTIONS}: {without}"
