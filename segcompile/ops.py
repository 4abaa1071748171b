"""The ``segcompile::segment_attention`` custom op: the node every attention site becomes.

It is a ``torch.library`` custom op, so it stays one node under ``torch.export`` and
``torch.compile``, with a fake (meta) implementation for shape propagation and an autograd
formula. Its ``impl`` argument names the implementation the ``lower`` pass chose for this
node, so the graph itself says which kernel runs.

Gradient contract (DESIGN.md section 1): q, the current segment's k/v and the tail k/v receive
gradient; sinks and history never do (no gradient work is spent on them).

Implementations: ``reference`` (PyTorch, any device; its backward differentiates a recomputed
forward) and ``triton`` (``kernels/triton_attention.py``: CUDA, or the CPU under
``TRITON_INTERPRET=1``; a dedicated backward kernel that needs the forward's output).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch

from .kernels.reference import segment_attention_reference

Implementation = Callable[..., torch.Tensor]



def _triton_forward(*args):
    # imported on first use: importing the kernels compiles nothing, but it needs triton, and a
    # CPU run under TRITON_INTERPRET=1 must set that variable before the kernels are defined
    from .kernels.triton_attention import segment_attention_forward

    return segment_attention_forward(*args)


def _triton_backward(grad_out, out, saved, needs_input_grad, long_range, scale):
    from .kernels.triton_attention import segment_attention_backward

    tail_needs_grad = needs_input_grad[3] or needs_input_grad[4]
    return segment_attention_backward(grad_out, out, *saved, long_range, scale, tail_needs_grad=tail_needs_grad)


IMPLEMENTATIONS: dict[str, Implementation] = {"reference": segment_attention_reference, "triton": _triton_forward}
# Implementations with a backward of their own; the others differentiate a recomputed forward.
BACKWARDS: dict[str, Callable] = {"triton": _triton_backward}

_GRAD_INPUTS = 5  # q, k, v, tail_k, tail_v


def implementation(name: str) -> Implementation:
    try:
        return IMPLEMENTATIONS[name]
    except KeyError:
        raise ValueError(f"segment_attention has no implementation {name!r}; known: {sorted(IMPLEMENTATIONS)}") from None


@torch.library.custom_op("segcompile::segment_attention", mutates_args=())
def segment_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tail_k: torch.Tensor,
    tail_v: torch.Tensor,
    sink_k: torch.Tensor,
    sink_v: torch.Tensor,
    hist_k: torch.Tensor,
    hist_v: torch.Tensor,
    long_range: list[int],
    scale: float,
    impl: str,
) -> torch.Tensor:
    """Attention of the current segment's queries over [sinks or history | tail | current]."""
    return implementation(impl)(q, k, v, tail_k, tail_v, sink_k, sink_v, hist_k, hist_v, long_range, scale)


@segment_attention.register_fake
def _(q, k, v, tail_k, tail_v, sink_k, sink_v, hist_k, hist_v, long_range, scale, impl):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def _setup_context(ctx, inputs, output):
    ctx.long_range, ctx.scale, ctx.impl = inputs[9], inputs[10], inputs[11]
    ctx.save_for_backward(*inputs[:9], *((output,) if ctx.impl in BACKWARDS else ()))
    # the backward runs in the forward's autocast state (the engine calls it outside the region)
    ctx.autocast_dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None


def _backward(ctx, grad_out):
    region = torch.autocast("cuda", dtype=ctx.autocast_dtype) if ctx.autocast_dtype is not None else nullcontext()
    with region:
        grads = _input_grads(ctx, grad_out)
    return (*grads, None, None, None, None, None, None, None)


def _input_grads(ctx, grad_out):
    saved = ctx.saved_tensors
    if ctx.impl in BACKWARDS:
        grads = BACKWARDS[ctx.impl](grad_out, saved[9], saved[:9], ctx.needs_input_grad, ctx.long_range, ctx.scale)
        return [g if needs else None for g, needs in zip(grads, ctx.needs_input_grad)]
    # Recompute the forward of the chosen implementation and differentiate it.
    with torch.enable_grad():
        live = [t.detach().requires_grad_(needs) for t, needs in zip(saved[:_GRAD_INPUTS], ctx.needs_input_grad)]
        constants = [t.detach() for t in saved[_GRAD_INPUTS:]]
        out = implementation(ctx.impl)(*live, *constants, ctx.long_range, ctx.scale)
        wanted = [t for t in live if t.requires_grad]
        got = iter(torch.autograd.grad(out, wanted, grad_out, allow_unused=True)) if wanted else iter(())
    return [next(got) if t.requires_grad else None for t in live]


segment_attention.register_autograd(_backward, setup_context=_setup_context)
