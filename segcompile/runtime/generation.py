"""``SegmentedModel.generate``: a prompt in, the prompt and its continuation out, as
transformers' ``generate`` does it (docs/design.md section 3).

The loop is ``seg.prefill(prompt)``, then ``seg.decode(state, token)`` one token at a time: only
the public prefill/decode calls, so whatever runs a decode step (eager, compiled) runs here, and
the tokens follow the segment semantics of docs/design.md section 1 exactly as a hand-written
decode loop would. Choosing a token uses transformers' generation utilities, so the options mean
what they mean to ``model.generate``:

* the scores are the last position's logits in float32, through a ``LogitsProcessorList``:
  ``RepetitionPenaltyLogitsProcessor`` always (when set), then, only with ``do_sample``,
  ``TemperatureLogitsWarper``, ``TopKLogitsWarper``, ``TopPLogitsWarper`` (transformers' order),
  then the caller's ``logits_processor``;
* greedy takes the argmax; sampling draws from the softmax with ``torch.multinomial`` and the
  caller's ``generator`` (the global RNG without one, as transformers does);
* a row stops when it produces an end-of-sequence or stop token (``EosTokenCriteria``) or the
  caller's ``stopping_criteria`` say so; a stopped row gets ``pad_token_id`` (default: the first
  stop token) from then on, and the loop ends once every row has stopped or after
  ``max_new_tokens``;
* a ``streamer`` (transformers' ``BaseStreamer``: ``put``, ``end``; ``TextStreamer`` works) gets
  the prompt ``[B, N]`` first, then every new token ``[B]``, on the CPU, then ``end()`` once.

The length limit is counted on the host (transformers' ``MaxLengthCriteria`` would be a device
tensor read every step); rows are only checked for stop tokens when there are any, so a run
without stop tokens and without a streamer never waits on the device between steps.

Prompts of one length only: the segment semantics have no padding (a pad would take a position
and a place in a segment), so a ragged batch, or an ``attention_mask`` with zeros, is an error.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence

import torch

from ..errors import SegcompileError
from ..inputs import token_ids

RAGGED_HINT = (
    "segcompile has no padding: every token takes its absolute position and a place in a segment "
    "(docs/design.md section 1), so a pad token would change what every later token sees; generate "
    "each prompt length as its own batch"
)


def generate(
    seg,
    input_ids,
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    streamer=None,
    *,
    repetition_penalty: float | None = None,
    stop_token_ids: Iterable[int] | None = None,
    pad_token_id: int | None = None,
    attention_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    logits_processor=None,
    stopping_criteria=None,
) -> torch.Tensor:
    """Generate up to ``max_new_tokens`` after ``input_ids`` with ``seg`` (a ``SegmentedModel``);
    returns ``[B, N + new]`` token ids, the prompt first. The module docstring says what each
    option does; ``SegmentedModel.generate`` documents them for users."""
    prompt = prompt_ids(input_ids, attention_mask, seg.capture_info.device)
    # checked here too, not only by prefill: with max_new_tokens=0 no prefill runs
    prompt = token_ids(prompt, vocab_size=seg.vocab_size, device=seg.capture_info.device,
                       owner=seg.capture_info.model_class)
    check_options(max_new_tokens, do_sample, temperature, top_k, top_p, repetition_penalty, generator)
    stops = stop_tokens(eos_token_id, stop_token_ids)
    pad = pad_token_id if pad_token_id is not None else (stops[0] if stops else None)
    check_pad(pad, seg.vocab_size)
    criteria = stopping(stops, stopping_criteria)
    if criteria and pad is None and prompt.shape[0] > 1:
        raise SegcompileError(
            "generate: stopping_criteria without eos_token_id, stop_token_ids or pad_token_id; a batch "
            "needs a pad_token_id to fill the rows that stop before the others"
        )
    processors = logits_processors(do_sample, temperature, top_k, top_p, repetition_penalty, logits_processor)
    with torch.no_grad():
        return _loop(seg, prompt, max_new_tokens, processors, criteria, pad, do_sample, generator, streamer)


def _loop(seg, prompt, max_new_tokens, processors, criteria, pad, do_sample, generator, streamer) -> torch.Tensor:
    """Prefill, then one decode step per token until every row stopped or the limit."""
    if streamer is not None:
        streamer.put(prompt.cpu())
    batch, length = prompt.shape
    # one buffer for the whole output: each step writes one column, instead of copying the
    # sequence so far (a long prompt) once per token
    out = prompt.new_empty(batch, length + max_new_tokens)
    out[:, :length] = prompt
    if max_new_tokens > 0:
        state = seg.prefill(prompt)
        logits = state.logits  # the last prompt token's, [B, V]
        # a chosen token indexes the logits, and the pad was checked: with logits no wider than
        # the vocabulary, the decode steps need not check their ids (a device sync per token)
        check_ids = seg.vocab_size is not None and logits.shape[-1] > seg.vocab_size
        unfinished = torch.ones(batch, dtype=torch.bool, device=prompt.device)
        for step in range(max_new_tokens):
            scores = processors(out[:, :length], logits.to(torch.float32, copy=True))
            new = _choose(scores, do_sample, generator)
            if pad is not None:
                new = torch.where(unfinished, new, torch.full_like(new, pad))
            out[:, length] = new
            length += 1
            if streamer is not None:
                streamer.put(new.cpu())
            if criteria:
                unfinished = unfinished & ~criteria(out[:, :length], None)
                if not bool(unfinished.any()):
                    break
            if step + 1 < max_new_tokens:  # the last token's logits are never needed
                step_logits, state = seg.decode(state, new[:, None], check_ids=check_ids)
                logits = step_logits[:, -1]
    if streamer is not None:
        streamer.end()
    return out[:, :length].clone() if length < out.shape[1] else out


def _choose(scores: torch.Tensor, do_sample: bool, generator: torch.Generator | None) -> torch.Tensor:
    if not do_sample:
        return scores.argmax(dim=-1)
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)


# ---- the inputs ---------------------------------------------------------------------------------
def prompt_ids(input_ids, attention_mask: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """``input_ids`` as a long ``[B, N]`` tensor; a SegcompileError for ragged prompts or padding.

    A list of prompts (lists of ids) of one length is stacked onto ``device``."""
    if not isinstance(input_ids, torch.Tensor):
        input_ids = _stack(input_ids, device)
    if input_ids.dim() != 2 or input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
        raise SegcompileError(
            f"generate: input_ids must be an integer tensor [batch, tokens], got {input_ids.dtype} of shape "
            f"{tuple(input_ids.shape)}"
        )
    if attention_mask is not None:
        if tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise SegcompileError(
                f"generate: attention_mask has shape {tuple(attention_mask.shape)}, input_ids {tuple(input_ids.shape)}"
            )
        if not bool(attention_mask.bool().all()):
            raise SegcompileError(f"generate: attention_mask masks some prompt tokens (padding). {RAGGED_HINT}")
    return input_ids.long()


def _stack(prompts, device: torch.device) -> torch.Tensor:
    try:
        rows = [list(map(int, row)) for row in prompts]
    except TypeError:
        raise SegcompileError(
            f"generate: input_ids must be an integer tensor [batch, tokens] or a list of prompts (lists of "
            f"ids), got {type(prompts).__name__}"
        ) from None
    lengths = sorted({len(row) for row in rows})
    if len(lengths) > 1:
        raise SegcompileError(f"generate: prompts of different lengths {lengths} (a ragged batch). {RAGGED_HINT}")
    return torch.tensor(rows, dtype=torch.long, device=device)


def check_options(max_new_tokens, do_sample, temperature, top_k, top_p, repetition_penalty, generator) -> None:
    """SegcompileError for a value no run can use; a warning for sampling options without
    ``do_sample`` (they are ignored, as transformers ignores them)."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise SegcompileError(f"generate: max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if do_sample and (not _number(temperature) or not temperature > 0):
        raise SegcompileError(
            f"generate: temperature must be a number > 0, got {temperature!r} (greedy: do_sample=False)"
        )
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
        raise SegcompileError(f"generate: top_k must be an int >= 1 (0 or None: no top-k), got {top_k!r}")
    if top_p is not None and (not _number(top_p) or not 0 < top_p <= 1):
        raise SegcompileError(f"generate: top_p must be a number in (0, 1], got {top_p!r}")
    if repetition_penalty is not None and (not _number(repetition_penalty) or not repetition_penalty > 0):
        raise SegcompileError(
            f"generate: repetition_penalty must be a number > 0 (1: none), got {repetition_penalty!r}"
        )
    if generator is not None and not isinstance(generator, torch.Generator):
        raise SegcompileError(f"generate: generator must be a torch.Generator, got {type(generator).__name__}")
    if not do_sample:
        ignored = [name for name, value, off in (("temperature", temperature, 1.0), ("top_k", top_k, None),
                                                  ("top_p", top_p, None)) if value != off]
        if ignored:
            verb = "applies" if len(ignored) == 1 else "apply"
            warnings.warn(f"generate: {', '.join(ignored)} {verb} to sampling only; pass do_sample=True to sample",
                          stacklevel=4)  # the caller of seg.generate


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_pad(pad: int | None, vocab_size: int | None) -> None:
    """The pad token is fed to the model (a stopped row's next input): it must be in the vocabulary."""
    if pad is None:
        return
    if isinstance(pad, bool) or not isinstance(pad, int) or pad < 0:
        raise SegcompileError(f"generate: pad_token_id must be a token id (an int >= 0), got {pad!r}")
    if vocab_size is not None and pad >= vocab_size:
        raise SegcompileError(
            f"generate: pad token {pad} is outside the model's vocabulary (ids 0..{vocab_size - 1}); a stopped row "
            "is fed its pad token: pass a pad_token_id (or stop tokens) of this model's tokenizer"
        )


def stop_tokens(eos_token_id, stop_token_ids) -> list[int]:
    """The ids that stop a row: ``eos_token_id`` (an int, several, or a tensor of them) and
    ``stop_token_ids``, in order."""
    ids: list[int] = []
    for given in (eos_token_id, stop_token_ids):
        if given is None:
            continue
        values = given.reshape(-1).tolist() if isinstance(given, torch.Tensor) else given
        values = [values] if isinstance(values, int) else list(values)
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
            raise SegcompileError(f"generate: stop and end-of-sequence tokens must be ids (ints >= 0), got {given!r}")
        ids += [v for v in values if v not in ids]
    return ids


# ---- transformers' processors and criteria --------------------------------------------------------
def logits_processors(do_sample, temperature, top_k, top_p, repetition_penalty, extra):
    """The ``LogitsProcessorList`` transformers' ``generate`` would build for these options."""
    from transformers import (
        LogitsProcessorList,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    processors = LogitsProcessorList()
    if repetition_penalty is not None and repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(float(repetition_penalty)))
    if do_sample:
        if temperature != 1.0:
            processors.append(TemperatureLogitsWarper(float(temperature)))
        if top_k:
            processors.append(TopKLogitsWarper(top_k))
        if top_p is not None and top_p < 1.0:
            processors.append(TopPLogitsWarper(float(top_p)))
    processors.extend(extra or [])
    return processors


def stopping(stops: list[int], extra):
    """A ``StoppingCriteriaList`` (per row) for the stop tokens and the caller's criteria; None if empty."""
    from transformers import EosTokenCriteria, StoppingCriteriaList

    criteria = StoppingCriteriaList([EosTokenCriteria(stops)] if stops else [])
    criteria.extend(extra or [])
    return criteria or None
