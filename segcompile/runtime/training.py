"""Exact truncated BPTT through the segment loop (docs/design.md section 1, ``tbptt_k``).

The objective is ``sum_s l_s`` where the K/V that segment ``s`` sees from segments
``s-1 .. s-K`` are functions of the parameters unrolled from the constant state carried into
segment ``s-K``. Each segment's graph is built once by the forward and kept while a later loss
can still reach it:

* after segment ``r``'s forward, ``l_r`` is backpropagated through graph ``r`` (depth 0); the
  gradient that reaches ``r``'s tail inputs is a gradient on the tail outputs of graph ``r-1``;
* that gradient is backpropagated through graph ``r-1`` (depth 1), whose tail-input gradient
  goes to graph ``r-2`` (depth 2), and so on; at depth K it stops: graph ``r-K``'s tail
  input is the constant carried state of ``l_r``'s unroll.

The depths are kept apart because the same graph passes a depth-``d < K`` gradient on and
stops a depth-``K`` one. At most K+1 segment graphs are alive; nothing is recomputed; history
and sinks are constants. Parameter gradients accumulate into ``.grad`` through ordinary
``torch.autograd.backward`` calls, exactly as ``loss.backward()`` would for this objective.

The loop is the driver's (``SegmentedModel.segments``): it runs each segment from the tails this
module made autograd leaves, hands over the segment's logits and tail outputs, and ends the
segment; what is kept of a segment, and for how long, is decided here.
"""

from __future__ import annotations

import contextlib
import gc
from collections import deque
from dataclasses import dataclass

import torch

from ..errors import SegcompileError
from ..loss import IGNORE_INDEX, label_count, span_loss
from ..inputs import label_ids, token_ids

# The loss is taken over pieces of positions of about this many logits, so that its fp32 copies of
# the logits exist for one piece at a time: at a 128K vocabulary, ~128 positions (rows of a
# causal-LM loss are independent, so the gradient does not depend on it).
LOSS_PIECE_ELEMENTS = 1 << 24


@dataclass
class _LiveSegment:
    tail_inputs: list[torch.Tensor]  # leaves this segment's graph read the tail from
    tail_outputs: list[torch.Tensor]  # the slices of its K/V the next segment reads as tail


def tbptt_backward(
    seg, input_ids: torch.Tensor, labels: torch.Tensor | None = None, reduction: str = "mean", checkpoint: bool = False
):
    """Accumulate the TBPTT gradient of ``seg`` (a ``SegmentedModel``) into the parameters'
    ``.grad``; return the (detached) loss. ``SegmentedModel.tbptt_backward`` documents the arguments."""
    if reduction not in ("mean", "sum"):
        raise SegcompileError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    input_ids, labels = _checked_inputs(seg, input_ids, labels)
    denominator = max(label_count(labels), 1) if reduction == "mean" else 1
    params = _differentiated_parameters(seg)
    if seg.uses_cuda_graphs:
        _one_graph_generation(seg, params)
    # labelled[i]: position i has a label to predict (labels[i+1]); read once, not once per segment
    labelled = (labels[:, 1:] != IGNORE_INDEX).any(dim=0).cpu()

    # A compiled step graph (torch.compile) must not donate its saved buffers to the first backward:
    # every graph here is backpropagated again, by the deeper TBPTT passes (retain_graph=True).
    with torch._functorch.config.patch(donated_buffer=False), _young_collection_after():
        total = _run_segments(seg, input_ids, labels, params, labelled, denominator, checkpoint)
    return total.cpu()


@contextlib.contextmanager
def _young_collection_after():
    """No automatic garbage collection while the sequence runs; one collection of the young
    generations after it (unless the caller turned the collector off).

    A step keeps thousands of Python objects alive across its segments (autograd contexts, runs,
    compiled graphs' wrappers): the collections that run meanwhile move them to the oldest
    generation, and soon a full collection walks every object in the process, which after
    ``torch.compile`` is over a million (0.5 s on the CPU for a 24-layer model; a 0.6 s stall of
    this kind took 42% of a compiled 32K step on an H200, bench/README.md, training). Collected
    once at the end, the step's objects are dead and none is promoted. Megatron-LM's ``--manual-gc``
    turns the automatic collector off during training for the same reason."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.collect(1)


def _differentiated_parameters(seg) -> list[torch.Tensor] | None:
    """The parameters each backward accumulates into (its ``inputs``), or ``None``: every leaf it
    reaches. ``None`` under a gradient sync whose hooks swap the parameters while the sequence runs
    (FSDP2 sharded per layer: a layer's gathered tensors exist only while the layer runs), so that
    no list made before the sequence names the tensors the step graphs read."""
    if getattr(seg.gradient_sync, "swaps_parameters", False):
        return None
    return [p for p in seg.parameters() if p.requires_grad]


def _one_graph_generation(seg, params: list[torch.Tensor] | None) -> None:
    """Make the sequence one generation of Inductor's CUDA-graph trees, and keep the parameters'
    gradients out of the graphs' memory.

    The trees start a generation, and invalidate the outputs of the one before, at a compiled
    call that follows a backward; here every segment's forward does, while the deeper TBPTT passes
    still need the graphs of the segments before it. Once ``cudagraph_mark_step_begin`` has been
    called, a generation starts only at that call (for every compiled function of the process):
    here, once a sequence. A parameter without a gradient would take the first backward's output,
    a tensor of a graph's memory, as its ``.grad`` (the next sequence would overwrite it): it gets
    zeros first, which the backward passes accumulate into."""
    seg._start_graph_generation()
    for p in params or ():
        if p.grad is None:
            p.grad = torch.zeros_like(p)


def _checked_inputs(seg, input_ids, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``labels`` (default: the ids) checked as int64 before any segment runs
    (``segcompile/inputs.py``: integer tensors of one shape, ids in the vocabulary, labels classes
    of the logits or ``IGNORE_INDEX``): a bad label found by the loss would fail after some
    gradients had accumulated, with torch's index error."""
    info = seg.capture_info
    input_ids = token_ids(input_ids, vocab_size=seg.vocab_size, device=info.device, owner=info.model_class)
    labels = input_ids if labels is None else labels
    return input_ids, label_ids(labels, input_ids, info.logits_size, info.model_class)


def _run_segments(seg, input_ids, labels, params, labelled, denominator, checkpoint: bool) -> torch.Tensor:
    """Drive ``seg.segments`` over the sequence, backpropagating each segment's loss as soon as its
    forward has run."""
    K = seg.cfg.tbptt_k
    carries_gradient = K >= 1 and seg.cfg.tail_len > 0
    # the K segments before the current one: the deeper passes of the current loss reach them
    live: deque[_LiveSegment] = deque(maxlen=K)
    total = torch.zeros((), dtype=torch.float64, device=input_ids.device)
    runs = seg.segments(input_ids, checkpoint=checkpoint, tails=_as_leaf if carries_gradient else None,
                        check_ids=False)  # checked by _checked_inputs
    for tokens, logits, tail_inputs, tail_outputs in runs:
        # A segment without label tokens has l_s = 0: no gradient starts from it (its graph is
        # still kept, as later segments' losses reach it through their tails).
        if labelled[tokens].any():
            total += _backward_segment_loss(logits, labels, tokens.start, denominator, params, tail_inputs, live)
        del logits
        if carries_gradient:
            live.append(_LiveSegment(tail_inputs, tail_outputs))
    return total


def _backward_segment_loss(logits, labels, start: int, denominator, params, tail_inputs, live) -> torch.Tensor:
    """Backpropagate the segment's loss through its graph and, by its tails, through the graphs
    in ``live``; return the loss (fp64, detached). The gradients on the tails are locals here, so
    none outlives the segment that made it."""
    loss, logits_grad = _loss_and_its_gradient(logits, labels, start, denominator)
    grads = _backward([logits], [logits_grad], params, tail_inputs, retain=bool(tail_inputs))
    del logits_grad
    if grads is not None:
        _backward_through_older(live, grads, params)
    return loss


def _backward_through_older(live, grads, params) -> None:
    """Carry the gradient on the current segment's tails back through the graphs in ``live``
    (newest first, depth 1..K); the oldest one, at depth K, passes nothing further and its graph is
    freed. A function of its own, so that its loop variable does not keep a segment alive into the
    next (its K/V and the gradients on its tails)."""
    K = live.maxlen
    for depth, older in enumerate(reversed(live), start=1):
        deeper = depth < K
        grads = _backward(older.tail_outputs, grads, params, older.tail_inputs if deeper else [], retain=deeper)


def _loss_and_its_gradient(logits, labels, start: int, denominator):
    """The segment's loss (fp64, detached) and its gradient on ``logits``.

    The loss is differentiated on graphs of its own, freed at once: the segment's graph is kept
    for the deeper TBPTT passes and would otherwise keep the loss's fp32 log-softmax (positions x
    vocabulary) alive with it. It is taken over pieces of positions (``LOSS_PIECE_ELEMENTS``)."""
    grad = torch.empty_like(logits, requires_grad=False)
    loss = torch.zeros((), dtype=torch.float64, device=logits.device)
    rows = max(1, LOSS_PIECE_ELEMENTS // max(1, logits.shape[0] * logits.shape[-1]))
    for lo in range(0, logits.shape[1], rows):
        piece = logits[:, lo : lo + rows].detach().requires_grad_()
        piece_loss = span_loss(piece, labels, start + lo) / denominator
        (grad[:, lo : lo + rows],) = torch.autograd.grad(piece_loss, piece)
        loss += piece_loss.detach().double()
    return loss, grad


def _as_leaf(tail: torch.Tensor) -> torch.Tensor:
    """A carried tail as an autograd leaf, so that the gradient reaching it can be passed on."""
    return tail.detach().requires_grad_()


def _backward(tensors, grads, params, tail_inputs, retain: bool):
    """Backpropagate ``grads`` on ``tensors`` into the parameters (accumulating ``.grad``) and
    return the gradient on ``tail_inputs`` (``None`` when not asked for). ``params`` ``None``:
    into every leaf reached (``_differentiated_parameters``)."""
    for t in tail_inputs:
        t.grad = None
    inputs = None if params is None else params + tail_inputs
    torch.autograd.backward(tensors, grads, retain_graph=retain, inputs=inputs)
    if not tail_inputs:
        return None
    tail_grads = [t.grad if t.grad is not None else torch.zeros_like(t) for t in tail_inputs]
    for t in tail_inputs:  # held by the returned list alone: freed once the deeper pass has used it
        t.grad = None
    return tail_grads
