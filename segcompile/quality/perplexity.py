"""Perplexity of a program over sequences of N tokens, overall and by distance band.

A token is scored by the position that predicts it: the logits at position ``p`` predict token
``p + 1``, and which keys position ``p`` sees is what the segment semantics change. The band of
a scored token is the segment of its predicting position, ``p // S``:

* ``segment 0``: the first segment. Nothing lies before it, so the segmented program equals full
  attention there, whatever the plan.
* ``1 back``: the second segment. Its local heads see sinks, a tail of the first segment (all of
  it when T = S) and their own segment.
* ``2+ back``: every later segment, where keys two or more segments back are history that only
  long-range heads see.

The model itself (full attention) is banded the same way, by position with the same S, so the
two compare band by band. Sequences of N tokens score N - 1 tokens; the exact count of every band
is in the result (``band_token_counts`` says what it must be).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .scoring import EvalError, position_logits
from .texts import TextSequence

BANDS = ("segment 0", "1 back", "2+ back")


@dataclass
class Score:
    """Summed negative log-likelihood (nats) over ``tokens`` scored tokens."""

    tokens: int = 0
    nll: float = 0.0

    def add(self, tokens: int, nll: float) -> None:
        self.tokens += tokens
        self.nll += nll

    @property
    def mean_nll(self) -> float:
        return self.nll / self.tokens if self.tokens else math.nan

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_nll) if self.tokens else math.nan

    def to_json(self) -> dict:
        """JSON has no NaN: a band without tokens has no mean and no perplexity (null)."""
        if not self.tokens:
            return {"tokens": 0, "nll": 0.0, "mean_nll": None, "perplexity": None}
        return {"tokens": self.tokens, "nll": self.nll, "mean_nll": self.mean_nll, "perplexity": self.perplexity}


@dataclass
class PerplexityResult:
    """Perplexity of one program over ``sequences``: overall, by band, by segment, per sequence."""

    segment_len: int
    length: int
    overall: Score = field(default_factory=Score)
    bands: dict[str, Score] = field(default_factory=lambda: {band: Score() for band in BANDS})
    by_segment: list[Score] = field(default_factory=list)
    sequences: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "segment_len": self.segment_len,
            "length": self.length,
            "overall": self.overall.to_json(),
            "bands": {band: score.to_json() for band, score in self.bands.items()},
            "by_segment": [score.to_json() for score in self.by_segment],
            "sequences": self.sequences,
        }


def band_of(position: int, segment_len: int) -> str:
    """The band of the token predicted at ``position`` (the token at ``position + 1``)."""
    return BANDS[min(position // segment_len, len(BANDS) - 1)]


def band_token_counts(length: int, segment_len: int) -> dict[str, int]:
    """How many tokens of a sequence of ``length`` each band scores (together ``length - 1``)."""
    counts = dict.fromkeys(BANDS, 0)
    for start in range(0, length - 1, segment_len):
        counts[band_of(start, segment_len)] += min(start + segment_len, length - 1) - start
    return counts


def token_nll(program, ids: torch.Tensor) -> torch.Tensor:
    """The negative log-likelihood of tokens ``1 .. N-1`` of ``ids [N]``, each given the ones
    before it, as ``[N - 1]`` float64 on the CPU (the log-softmax in float32 at least)."""
    ids = ids.reshape(1, -1)
    n = ids.shape[1]
    nll = torch.empty(n - 1, dtype=torch.float64)
    for positions, logits in position_logits(program, ids):
        stop = min(positions.stop, n - 1)  # the last position predicts nothing
        if stop <= positions.start:
            continue
        scored = logits[: stop - positions.start].float()
        targets = ids[0, positions.start + 1: stop + 1].to(scored.device)
        logprobs = torch.log_softmax(scored, dim=-1).gather(-1, targets[:, None])[:, 0]
        nll[positions.start: stop] = -logprobs.double().cpu()
    return nll


def measure_perplexity(program, sequences: Sequence[TextSequence], segment_len: int,
               progress: Callable[[int, int], None] | None = None) -> PerplexityResult:
    """Perplexity of ``program`` (a model, or a ``SegmentedModel``) over ``sequences`` of one
    length, token-weighted over all of them, with the bands of ``segment_len`` (the program's S;
    for a model, the S it is compared at). ``progress(done, total)`` after every sequence."""
    if not sequences:
        raise EvalError("no sequences to measure perplexity on")
    lengths = {int(s.ids.numel()) for s in sequences}
    if len(lengths) != 1:
        raise EvalError(f"perplexity sequences must have one length, got {sorted(lengths)}")
    length = lengths.pop()
    result = PerplexityResult(segment_len, length)
    result.by_segment = [Score() for _ in range(-(-(length - 1) // segment_len))]
    for i, sequence in enumerate(sequences):
        nll = token_nll(program, sequence.ids)
        _add_sequence(result, nll, segment_len)
        result.sequences.append({**sequence.describe(), "perplexity": math.exp(nll.mean().item())})
        if progress is not None:
            progress(i + 1, len(sequences))
    return result


def _add_sequence(result: PerplexityResult, nll: torch.Tensor, segment_len: int) -> None:
    result.overall.add(nll.numel(), nll.sum().item())
    for index, start in enumerate(range(0, nll.numel(), segment_len)):
        piece = nll[start: start + segment_len]
        result.bands[band_of(start, segment_len)].add(piece.numel(), piece.sum().item())
        result.by_segment[index].add(piece.numel(), piece.sum().item())
