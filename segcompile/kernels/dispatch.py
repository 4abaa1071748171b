"""Which kernel runs a ``segment_attention`` call, and the entry points that run it
(docs/design.md section 7).

* Forward (``forward_kernel``): ``"split-keys"`` for a few queries (decode, ``triton_decode.py``);
  ``"gluon-ws"``, the warp-specialised Hopper kernel of ``gluon_attention.py``, where it applies
  and Gluon imports; ``"one-pass"`` (``triton_attention.one_pass_forward``) otherwise.
* Backward: ``triton_attention.launch_dq`` always (dQ, or with the fused Hopper dK/dV only the
  prefix keys' part of it), then the dK/dV kernel ``dkdv_kernel`` names: ``"gluon-ws+dq"``
  (``gluon_attention.dkdv`` adding the tail's and current keys' part of dQ: five matrix
  products a visible pair, not seven), ``"gluon-ws"`` (dK/dV alone) or ``"triton"``
  (``triton_attention.launch_dkdv``).

A quantised history (``SegmentConfig.history_dtype``, ``history_format.py``): both Triton
forwards read its fp8 values and scale them in registers; where the Gluon forward applies to the
problem, a prefill's call dequantises the layer's history into a transient copy and runs it
(faster than scaling in the one-pass kernel; decode's split-keys kernel keeps reading fp8);
on a GPU, the quantisation at a segment end and that copy (K and V together) are single Triton
kernels (``triton_history.py``);
the backward reads it dequantised to the sinks' dtype (a transient copy per call: history is a
constant, and enters dQ only). Each call's choice is logged at debug level, naming the history's
format.
"""

from __future__ import annotations

import functools
import logging

import torch

from . import triton_attention, triton_decode, triton_history
from .history_format import HistoryGeometry, QuantizedHistory, dequantized, quantize_history
from .problem import Problem, prepare, usable
from .triton_common import INTERPRET


def segment_attention_forward(q, k, v, tail_k, tail_v, sink_k, sink_v, hist_k, hist_v, long_range, scale,
                              return_lse: bool = False):
    """Triton forward; same arguments and result as ``segment_attention_reference``. With
    ``return_lse``: ``(out, lse)``, the log-sum-exp of every query row (base 2, of the scaled
    scores; ``[B * H * Lq]`` fp32), which the backward then need not recompute."""
    p = prepare(q, k, v, tail_k, tail_v, sink_k, sink_v, hist_k, hist_v, long_range)
    if p.hist_scaled and not triton_decode.splits_keys(p):
        p = _dequantized_for_gluon(p, q, k, v, tail_k, tail_v, sink_k, sink_v, hist_k, hist_v, long_range)
    kernel = forward_kernel(p)
    if kernel == "gluon-ws":
        out, lse = gluon().forward(p, scale, return_lse)
    elif kernel == "split-keys":
        out, lse = triton_decode.split_keys_forward(p, scale, return_lse)
    else:
        out, lse = triton_attention.one_pass_forward(p, scale, return_lse)
    return (out, lse) if return_lse else out


def _dequantized_for_gluon(p: Problem, q, k, v, tail_k, tail_v, sink_k, sink_v, hist_k, hist_v, long_range) -> Problem:
    """The problem over the history dequantised to the sinks' dtype where the Gluon forward then
    applies, else ``p``. That kernel has no fp8 history, and the one-pass kernel that scales it in
    registers ran a 128K prefill of the 8B shape 3x slower than the bf16 history on an H200 (bench/
    README.md, prefill); a segment's many queries amortise one transient copy of the layer's
    history (what decode, which reads each key once, cannot)."""
    if (gluon() is None or INTERPRET or not gluon().runs_on(q.device)
            or not gluon().takes(q.dtype) or sink_k.dtype != q.dtype):
        return p  # the Gluon forward could not run on the copy either: make none
    wide = prepare(q, k, v, tail_k, tail_v, sink_k, sink_v, *_widened_pair(hist_k, hist_v, sink_k.dtype, sink_v.dtype),
                   long_range)
    if not gluon_applies(wide):
        return p
    _log_kernel("gluon-ws", history="fp8 history dequantised for the call")
    return wide


def quantized_history(x: torch.Tensor, start: int, geometry: HistoryGeometry, dtype: torch.dtype,
                      out: tuple[torch.Tensor, torch.Tensor] | None = None,
                      heads: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``history_format.quantize_history``, by the one-pass kernel (``triton_history.py``) on a GPU:
    what a segment end appends to a quantised history; written into ``out`` (values, scales) if
    given. ``heads``: of ``x.index_select(1, heads)``, which the kernel reads from ``x`` in place
    (no gather a layer and segment)."""
    if x.is_cuda and not INTERPRET:
        return triton_history.quantize(x, start, geometry, dtype, out=out, heads=heads)
    x = x.index_select(1, heads) if heads is not None else x
    values, scales = quantize_history(x, start, geometry, dtype)
    if out is None:
        return values, scales
    out[0].copy_(values)
    out[1].copy_(scales)
    return out


def quantized_history_pair(xs: tuple[torch.Tensor, torch.Tensor], start: int, geometry: HistoryGeometry,
                           dtype: torch.dtype, outs: tuple[tuple[torch.Tensor, torch.Tensor], ...],
                           heads: torch.Tensor | None = None) -> None:
    """``quantized_history`` of a layer's K and V (same batch, heads and positions), written into
    ``outs`` (K's values and scales, then V's): one launch for both on a GPU."""
    if xs[0].is_cuda and not INTERPRET:
        triton_history.quantize_pair(*xs, start, geometry, dtype, outs, heads=heads)
        return
    for x, out in zip(xs, outs):
        quantized_history(x, start, geometry, dtype, out=out, heads=heads)


def _widened(hist: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``dequantized(hist, dtype)``, by the one-pass kernel (``triton_history.py``) on a GPU."""
    if isinstance(hist, QuantizedHistory) and hist.is_cuda and not INTERPRET:
        return triton_history.dequantize(hist, dtype)
    return dequantized(hist, dtype)


def _widened_pair(hist_k: torch.Tensor, hist_v: torch.Tensor, dtype_k: torch.dtype,
                  dtype_v: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``_widened`` of a layer's K and V histories, on a GPU in one launch where they agree in
    dtype and shape (``triton_history.dequantize_pair``)."""
    if (isinstance(hist_k, QuantizedHistory) and isinstance(hist_v, QuantizedHistory) and hist_k.is_cuda
            and not INTERPRET and dtype_k == dtype_v and hist_k.shape[:3] == hist_v.shape[:3]):
        return triton_history.dequantize_pair(hist_k, hist_v, dtype_k)
    return _widened(hist_k, dtype_k), _widened(hist_v, dtype_v)


def segment_attention_backward(grad_out, out, q, k, v, tail_k, tail_v, sink_k, sink_v, hist_k, hist_v,
                               long_range, scale, tail_needs_grad: bool = True, lse: torch.Tensor | None = None):
    """Gradients ``(dq, dk, dv, dtail_k, dtail_v)`` of ``segment_attention``; the tail's are
    ``None`` when ``tail_needs_grad`` is false (no work is done for them). ``lse``: the forward's
    (``return_lse``); without it the dQ kernel recomputes it in a pass of its own. A quantised
    history is read dequantised (the module docstring)."""
    hist_k, hist_v = _widened_pair(hist_k, hist_v, sink_k.dtype, sink_v.dtype)
    p = prepare(q, k, v, tail_k, tail_v, sink_k, sink_v, hist_k, hist_v, long_range)
    do = usable(grad_out)
    tail_grads = tail_needs_grad and p.T > 0
    kernel = dkdv_kernel(p, do, lse is not None, tail_grads)
    fused = kernel == "gluon-ws+dq"
    dq, lse, delta = triton_attention.launch_dq(p, usable(out), do, scale, lse, prefix_only=fused)
    if kernel == "triton":
        dk, dv, dtk, dtv = triton_attention.launch_dkdv(p, do, lse, delta, scale, tail_grads)
    else:
        dk, dv, dtk, dtv = gluon().dkdv(p, do, lse, delta, scale, tail_grads, dq=dq if fused else None)
    # each gradient in its input's dtype (they differ from the kernels' where prepare widened one)
    dtk, dtv = (None, None) if dtk is None else (dtk.to(tail_k.dtype), dtv.to(tail_v.dtype))
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dtk, dtv


def forward_kernel(p: Problem) -> str:
    """Which forward runs: ``"split-keys"``, ``"gluon-ws"`` or ``"one-pass"``."""
    if triton_decode.splits_keys(p):
        kernel = "split-keys"
    elif gluon_applies(p):
        kernel = "gluon-ws"
    else:
        kernel = "one-pass"
    _log_kernel(kernel, history="fp8 history scaled in registers" if p.hist_scaled else None)
    return kernel


def dkdv_kernel(p: Problem, grad_out: torch.Tensor, lse_given: bool = False, tail_grads: bool = True) -> str:
    """Which dK/dV kernel the backward runs. Where the Gluon kernels apply and the output
    gradient has the inputs' dtype: ``"gluon-ws+dq"`` when the forward's log-sum-exp is given and
    every tail key is differentiated (or there is no tail), else ``"gluon-ws"``. Elsewhere
    ``"triton"``."""
    if not (gluon_applies(p) and grad_out.dtype == p.q.dtype):
        kernel = "triton"
    elif lse_given and (tail_grads or p.T == 0):
        kernel = "gluon-ws+dq"
    else:
        kernel = "gluon-ws"
    _log_kernel(kernel, "dK/dV")
    return kernel


def gluon_applies(p: Problem) -> bool:
    """Gluon imports, Triton is not interpreting, the history is not quantised, and
    ``gluon_attention.supported`` holds."""
    return not INTERPRET and not p.hist_scaled and gluon() is not None and gluon().supported(p)


@functools.cache
def gluon():
    """``gluon_attention``, or None where this Triton has no Gluon for Hopper."""
    try:
        from . import gluon_attention  # optional: Triton builds without Gluon's Hopper API lack it
    except ImportError:
        return None
    return gluon_attention


@functools.cache
def _log_kernel(kernel: str, part: str = "forward", history: str | None = None) -> None:
    over = f" ({history})" if history else ""
    logging.getLogger(__name__).debug("segment_attention %s runs the %s kernel%s", part, kernel, over)
