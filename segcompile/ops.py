"""The ``segcompile::segment_attention`` op: the node every attention site becomes.

It stays one node in segcompile's graphs (the passes, the exporters and the visualiser see one
tensor per attention site), and ``torch.compile`` traces it into ``segment_attention_lse``, a
``torch.library`` custom op with a fake (meta) implementation for shape propagation and the
autograd formula. Its ``impl`` argument names the implementation the ``lower`` pass chose for
this node, so the graph itself says which kernel runs.

Gradient contract (docs/design.md section 1): q, the current segment's k/v and the tail k/v receive
gradient; sinks and history never do (no gradient work is spent on them).

Implementations: ``reference`` (PyTorch, any device; its backward differentiates a recomputed
forward) and ``triton`` (``kernels/dispatch.py``, which picks among the Triton and Gluon kernels:
CUDA, or the CPU under ``TRITON_INTERPRET=1``; a dedicated backward kernel that takes the
forward's output and log-sum-exp).

``segcompile::release_storage`` (at the end) frees the old tails of a prefill step once they are read.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import NamedTuple

import torch

from .kernels.history_format import QuantizedHistory
from .kernels.reference import segment_attention_reference

Implementation = Callable[..., torch.Tensor]


def _triton_forward(*args):
    # imported on first use: importing the kernels compiles nothing, but it needs triton, and a
    # CPU run under TRITON_INTERPRET=1 must set that variable before the kernels are defined
    from .kernels.dispatch import segment_attention_forward

    return segment_attention_forward(*args)


def _triton_forward_with_lse(*args):
    from .kernels.dispatch import segment_attention_forward

    return segment_attention_forward(*args, return_lse=True)


def _triton_backward(grad_out, out, lse, *args, tail_needs_grad):
    from .kernels.dispatch import segment_attention_backward

    return segment_attention_backward(grad_out, out, *args, tail_needs_grad=tail_needs_grad, lse=lse)


IMPLEMENTATIONS: dict[str, Implementation] = {"reference": segment_attention_reference, "triton": _triton_forward}


class OwnBackward(NamedTuple):
    """An implementation's backward (run as the op below) and the forward that keeps what it
    takes: ``(output, log-sum-exp)``."""

    forward_with_lse: Callable
    backward: Callable


# Implementations with a backward of their own; the others differentiate a recomputed forward.
BACKWARDS: dict[str, OwnBackward] = {"triton": OwnBackward(_triton_forward_with_lse, _triton_backward)}

_GRAD_INPUTS = 5  # q, k, v, tail_k, tail_v


def implementation(name: str) -> Implementation:
    try:
        return IMPLEMENTATIONS[name]
    except KeyError:
        raise ValueError(f"segment_attention has no implementation {name!r}; known: {sorted(IMPLEMENTATIONS)}") from None


# The node every attention site becomes, with one output. Its kernel is the output of
# ``segment_attention_lse`` below, the op that carries the autograd formula: implementations with
# a backward of their own keep the forward's log-sum-exp for it (as aten's
# ``scaled_dot_product_attention`` is the one-output face of ``_scaled_dot_product_flash_attention``).
_lib = torch.library.Library("segcompile", "FRAGMENT")
_lib.define(
    "segment_attention(Tensor q, Tensor k, Tensor v, Tensor tail_k, Tensor tail_v, Tensor sink_k, Tensor sink_v, "
    "Tensor hist_k, Tensor hist_v, int[] long_range, float scale, str impl) -> Tensor"
)


@torch.library.impl(_lib, "segment_attention", "CompositeImplicitAutograd")
def _segment_attention(q, k, v, tail_k, tail_v, sink_k, sink_v, hist_k, hist_v, long_range, scale, impl):
    """Attention of the current segment's queries over [sinks or history | tail | current]."""
    tensors = _autocast_inputs(q, k, v, tail_k, tail_v, sink_k, sink_v, hist_k, hist_v)
    return segment_attention_lse(*tensors, long_range, scale, impl)[0]


def _autocast_inputs(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Under autocast, the inputs in the autocast dtype, as autocast casts SDPA's: Llama's K leaves
    RoPE in fp32, and a kernel handed fp32 K/V must read twice the bytes through narrower tiles
    (and cannot use the Hopper kernels). The op decomposes into this cast and ``segment_attention_lse``
    where it is traced, so a compiled step casts in its graph: inside compiled code the ambient
    autocast state is no longer visible to the kernels, which would then multiply in fp32
    (measured on an H200 at 8K: 20x slower attention under ``SegmentedModel.compile``). The casts
    are differentiable: gradients reach the fp32 K and tail in their own dtype. A quantised
    history (``SegmentConfig.history_dtype``) stays as it is stored: its reader scales it."""
    device = tensors[0].device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(
        t.to(dtype) if t.is_floating_point() and t.dtype != dtype and not isinstance(t, QuantizedHistory) else t
        for t in tensors
    )


segment_attention = torch.ops.segcompile.segment_attention.default


@torch.library.custom_op("segcompile::segment_attention_lse", mutates_args=())
def segment_attention_lse(
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """``segment_attention`` and, for an implementation with its own backward, the log-sum-exp of
    every query row that backward takes (empty for the others)."""
    if impl in BACKWARDS:
        return BACKWARDS[impl].forward_with_lse(q, k, v, tail_k, tail_v, sink_k, sink_v, hist_k, hist_v, long_range, scale)
    out = implementation(impl)(q, k, v, tail_k, tail_v, sink_k, sink_v, hist_k, hist_v, long_range, scale)
    return out, q.new_empty(0, dtype=torch.float32)


@segment_attention_lse.register_fake
def _(q, k, v, tail_k, tail_v, sink_k, sink_v, hist_k, hist_v, long_range, scale, impl):
    rows = q.shape[0] * q.shape[1] * q.shape[2] if impl in BACKWARDS else 0
    return q.new_empty((*q.shape[:-1], v.shape[-1])), q.new_empty(rows, dtype=torch.float32)


@torch.library.custom_op("segcompile::segment_attention_backward", mutates_args=())
def segment_attention_backward(
    grad_out: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
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
    tail_needs_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients into q, k, v, tail_k, tail_v of an implementation with its own backward (the tail's
    are empty when ``tail_needs_grad`` is false). An op of its own so that AOTAutograd traces it as
    one opaque node (a kernel launch cannot run on the fake tensors of a trace)."""
    grads = BACKWARDS[impl].backward(grad_out, out, lse, q, k, v, tail_k, tail_v, sink_k, sink_v, hist_k, hist_v,
                                     long_range, scale, tail_needs_grad=tail_needs_grad)
    inputs = (q, k, v, tail_k, tail_v)
    wanted = (True, True, True, tail_needs_grad, tail_needs_grad)
    return tuple(g if g is not None else _empty_grad(t, w) for g, t, w in zip(grads, inputs, wanted))


def _empty_grad(t: torch.Tensor, wanted: bool) -> torch.Tensor:
    # a wanted gradient of an empty tail (first segment, or T = 0) has the tail's (empty) shape
    return torch.empty_like(t, memory_format=torch.contiguous_format) if wanted else t.new_empty(0)


@segment_attention_backward.register_fake
def _(grad_out, out, lse, q, k, v, tail_k, tail_v, sink_k, sink_v, hist_k, hist_v, long_range, scale, impl, tail_needs_grad):
    return tuple(_empty_grad(t, w) for t, w in zip((q, k, v, tail_k, tail_v), (True, True, True, tail_needs_grad, tail_needs_grad)))


def _setup_context(ctx, inputs, output):
    ctx.long_range, ctx.scale, ctx.impl = inputs[9], inputs[10], inputs[11]
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(*inputs[:9], *((out, lse) if ctx.impl in BACKWARDS else ()))
    # the backward runs in the forward's autocast state (the engine calls it outside the region)
    ctx.autocast_dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None


def _backward(ctx, grad_out, _grad_lse):
    region = torch.autocast("cuda", dtype=ctx.autocast_dtype) if ctx.autocast_dtype is not None else nullcontext()
    with region:
        grads = _input_grads(ctx, grad_out)
    return (*grads, None, None, None, None, None, None, None)


def _input_grads(ctx, grad_out):
    saved = ctx.saved_tensors
    if ctx.impl in BACKWARDS:
        tail_needs_grad = ctx.needs_input_grad[3] or ctx.needs_input_grad[4]
        grads = segment_attention_backward(
            grad_out, saved[9], saved[10], *saved[:9], ctx.long_range, ctx.scale, ctx.impl, tail_needs_grad
        )
        computed = (True, True, True, tail_needs_grad, tail_needs_grad)
        return [g if needs and done else None for g, done, needs in zip(grads, computed, ctx.needs_input_grad)]
    # Recompute the forward of the chosen implementation and differentiate it.
    with torch.enable_grad():
        live = [t.detach().requires_grad_(needs) for t, needs in zip(saved[:_GRAD_INPUTS], ctx.needs_input_grad)]
        # a quantised history is never differentiable, and detaching it would drop its scales
        constants = [t if isinstance(t, QuantizedHistory) else t.detach() for t in saved[_GRAD_INPUTS:]]
        out = implementation(ctx.impl)(*live, *constants, ctx.long_range, ctx.scale)
        wanted = [t for t in live if t.requires_grad]
        got = iter(torch.autograd.grad(out, wanted, grad_out, allow_unused=True)) if wanted else iter(())
    return [next(got) if t.requires_grad else None for t in live]


segment_attention_lse.register_autograd(_backward, setup_context=_setup_context)


# ``segcompile::release_storage``: frees a tensor's memory whatever still refers to it, as FSDP frees
# unsharded parameters (``runtime/variants/release_tails.py`` puts it after the last reader of a prefill step's
# old tails). A custom op with a mutable schema rather than a plain function: FX's dead-code
# elimination, and any pass after it, see from the schema alone that the node, which has no users,
# does something; and the graph names it as it names segment_attention. No fake implementation: the
# graphs that hold it run eagerly only (compiled steps never free anything).
@torch.library.custom_op("segcompile::release_storage", mutates_args=("t",))
def _release_storage(t: torch.Tensor) -> None:
    """Free ``t``'s storage; ``t`` (and every view of its storage) must never be read again."""
    t.untyped_storage().resize_(0)


release_storage = torch.ops.segcompile.release_storage.default
