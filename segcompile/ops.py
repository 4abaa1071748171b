"""The ``segcompile::segment_attention`` custom op: the node every attention site becomes.

It is a ``torch.library`` custom op, so it stays one node under ``torch.export`` and
``torch.compile``, with a fake (meta) implementation for shape propagation and an autograd
formula. Its ``impl`` argument names the implementation the ``lower`` pass chose for this
node, so the graph itself says which kernel runs.

Gradient contract (DESIGN.md section 1): q, the current segment's k/v and the tail k/v receive
gradient; sinks and history never do (no gradient work is spent on them).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .kernels.reference import segment_attention_reference

Implementation = Callable[..., torch.Tensor]

IMPLEMENTATIONS: dict[str, Implementation] = {"reference": segment_attention_reference}

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
    ctx.save_for_backward(*inputs[:9])
    ctx.long_range, ctx.scale, ctx.impl = inputs[9], inputs[10], inputs[11]


def _backward(ctx, grad_out):
    # Recompute the forward of the chosen implementation and differentiate it; kernels with a
    # dedicated backward replace this per implementation.
    saved = ctx.saved_tensors
    with torch.enable_grad():
        live = [t.detach().requires_grad_(needs) for t, needs in zip(saved[:_GRAD_INPUTS], ctx.needs_input_grad)]
        constants = [t.detach() for t in saved[_GRAD_INPUTS:]]
        out = implementation(ctx.impl)(*live, *constants, ctx.long_range, ctx.scale)
        wanted = [t for t in live if t.requires_grad]
        got = iter(torch.autograd.grad(out, wanted, grad_out, allow_unused=True)) if wanted else iter(())
    grads = [next(got) if t.requires_grad else None for t in live]
    return (*grads, None, None, None, None, None, None, None)


segment_attention.register_autograd(_backward, setup_context=_setup_context)
