"""What the quality measures share: running a *program*, which is either a model itself (full
attention, the reference every measure compares against) or a ``SegmentedModel`` (the segment
loop), with the same calls, and the error they raise.

Every function runs without autograd and with batch 1. The segmented program's logits come from
its own loop (``segments`` for a whole sequence, ``prefill`` then ``decode`` for the last few
positions), never from the model's modules, so what is measured is what the program computes.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator

import torch

from ..errors import SegcompileError
from ..frontend import cache_off
from ..reference.sdpa_hook import model_logits
from ..runtime import SegmentedModel


class EvalError(SegcompileError, ValueError):
    """A quality measurement cannot run as asked (a length too short for its prompt, too few
    documents that long, a model that cannot generate). The message says what to change."""


def is_segmented(program) -> bool:
    return isinstance(program, SegmentedModel)


def program_device(program) -> torch.device:
    """The device a program's inputs go to: where the model was when it was captured, or where
    the model's parameters are."""
    if is_segmented(program):
        return program.capture_info.device
    for parameter in program.parameters():
        return parameter.device
    return torch.device("cpu")


@torch.no_grad()  # on a generator: autograd is off while it runs, not while its consumer does
def position_logits(program, ids: torch.Tensor) -> Iterator[tuple[slice, torch.Tensor]]:
    """The logits of every position of ``ids [1, N]`` as ``(positions, logits [n, V])`` pieces in
    order: one per segment for a segmented program (its whole-sequence loop, ``segments``), one
    piece for a model, so that at most one segment's logits are alive at a time."""
    ids = ids.to(program_device(program))
    if is_segmented(program):
        for run in program.segments(ids):
            yield run.tokens, run.logits[0]
    else:
        yield slice(0, ids.shape[1]), model_logits(program, ids)[0]


def last_logits(program, ids: torch.Tensor, count: int) -> torch.Tensor:
    """The logits ``[count, V]`` of the last ``count`` positions of ``ids [1, N]``: for a
    segmented program a prefill of the positions up to the first of them, then one decode of the
    rest (the path generation takes); for a model one forward, keeping only those logits where
    the model's ``forward`` can (``logits_to_keep``)."""
    ids = ids.to(program_device(program))
    n = ids.shape[1]
    if not 1 <= count <= n:
        raise EvalError(f"asked for the logits of the last {count} of {n} positions")
    with torch.no_grad():
        if is_segmented(program):
            state = program.prefill(ids[:, : n - count + 1])
            first = state.logits[:, None]
            if count == 1:
                return first[0]
            rest, _ = program.decode(state, ids[:, n - count + 1:])
            return torch.cat([first, rest], dim=1)[0]
        if "logits_to_keep" in inspect.signature(program.forward).parameters:
            return program(ids, logits_to_keep=count, **cache_off(program)).logits[0, -count:]
        return model_logits(program, ids)[0, -count:]


def greedy_tokens(program, ids: torch.Tensor, new_tokens: int) -> list[int]:
    """``new_tokens`` tokens chosen greedily after ``ids [1, N]``, never stopping early: the
    segmented program's ``generate``, or the model's own (transformers') ``generate``."""
    ids = ids.to(program_device(program))
    with torch.no_grad():
        if is_segmented(program):
            out = program.generate(ids, max_new_tokens=new_tokens)
        elif hasattr(program, "generate"):
            mask = torch.ones_like(ids)
            pad = getattr(getattr(program, "generation_config", None), "pad_token_id", None)
            out = program.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                   do_sample=False, pad_token_id=0 if pad is None else pad)
        else:
            raise EvalError(f"{type(program).__name__} has no generate(): score it by teacher forcing only")
    return out[0, ids.shape[1]:].tolist()
