"""Passkey retrieval: can a program find a number hidden far back in its context?

A prompt of exactly ``length`` tokens: an instruction, filler (the same neutral sentences over
and over), a random five-digit pass key stated at a chosen depth, more filler, and the question
"What is the pass key? The pass key is". Token sequences are built piece by piece (each piece
tokenized on its own), so the length is exact and the key's position known; the filler ends on
a whole sentence and is topped up to the exact length with newline tokens before the question.

Scoring, per trial:

* **teacher forcing** (always): the answer's tokens are fed after the prompt; the trial is
  correct when every *digit* token of the answer is the program's argmax (the tokens before the
  digits, such as a lone space, are fed but not scored);
* **greedy generation** (optional): the program generates a few tokens after the prompt, and
  the trial is correct when the first number in them is the key.

Trials are seeded: trial ``t`` of ``trials`` at a length puts the key at depth
``0.1 + 0.8 (t + 1/2) / trials`` (evenly over 10-90% of the context) with a key drawn from
``random.Random`` seeded by the seed, the length and ``t``. Accuracy is reported by length and
by depth (four bins of 20 points).
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

from .scoring import EvalError, greedy_tokens, last_logits
from .texts import encode

INSTRUCTION = ("There is an important piece of information hidden inside a lot of irrelevant text. "
               "Find it and memorize it. I will quiz you about it at the end.")
FILLER = (" The grass is green.", " The sky is blue.", " The sun is yellow.", " Here we go.",
          " There and back again.")
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"
ANSWER = " {key}"
PAD = "\n"
DEPTH_RANGE = (0.1, 0.9)
DEPTH_BINS = ((0.1, 0.3), (0.3, 0.5), (0.5, 0.7), (0.7, 0.9))
GENERATED_EXTRA = 2  # tokens generated beyond the answer's, so a late key still shows


@dataclass(frozen=True)
class PasskeyPrompt:
    """One trial's prompt (``ids``, exactly ``length`` tokens) and the answer it asks for."""

    length: int
    depth: float  # requested: the key's first token at about depth * length
    key: str
    trial: int
    ids: torch.Tensor  # [length] int64
    answer: torch.Tensor  # [A] int64: the answer's tokens, fed after the prompt
    scored: tuple[bool, ...]  # which answer tokens hold digits (the ones scored)
    needle_start: int  # the first token of the sentence stating the key
    needle_end: int

    @property
    def actual_depth(self) -> float:
        return self.needle_start / self.length


@dataclass
class PasskeyTrial:
    length: int
    depth: float
    actual_depth: float
    key: str
    correct: bool  # teacher forcing: every digit token the argmax
    digits_correct: int
    digits: int
    answer_logprob: float  # of the digit tokens, nats
    generated: str | None = None
    generated_correct: bool | None = None


@dataclass
class PasskeyResult:
    trials: list[PasskeyTrial]

    def accuracy(self, trials: Sequence[PasskeyTrial], generated: bool = False) -> dict:
        """``{"correct", "trials", "accuracy"}`` of ``trials`` (greedy generation's with ``generated``;
        ``correct`` None where it did not run). No trials: accuracy None."""
        flags = [t.generated_correct if generated else t.correct for t in trials]
        if any(f is None for f in flags):
            return {"correct": None, "trials": len(flags), "accuracy": None}
        correct = sum(flags)
        return {"correct": correct, "trials": len(flags), "accuracy": correct / len(flags) if flags else None}

    def by_length(self, generated: bool = False) -> dict[int, dict]:
        lengths = sorted({t.length for t in self.trials})
        return {n: self.accuracy([t for t in self.trials if t.length == n], generated) for n in lengths}

    def by_depth(self, generated: bool = False, length: int | None = None) -> dict[str, dict]:
        """Accuracy per depth bin (of the requested depth), over every length or one."""
        trials = [t for t in self.trials if length is None or t.length == length]
        return {depth_bin_label(b): self.accuracy([t for t in trials if depth_bin(t.depth) == b], generated)
                for b in DEPTH_BINS}

    def to_json(self) -> dict:
        generated = any(t.generated is not None for t in self.trials)
        out = {
            "overall": self.accuracy(self.trials),
            "by_length": {str(n): acc for n, acc in self.by_length().items()},
            "by_depth": self.by_depth(),
            "by_length_and_depth": {str(n): self.by_depth(length=n) for n in self.by_length()},
            "trials": [asdict(t) for t in self.trials],
        }
        if generated:
            out["generated"] = {"overall": self.accuracy(self.trials, True),
                                "by_length": {str(n): a for n, a in self.by_length(True).items()},
                                "by_depth": self.by_depth(True)}
        return out


# ---- prompts --------------------------------------------------------------------------------------
def trial_depth(trial: int, trials: int) -> float:
    low, high = DEPTH_RANGE
    return low + (high - low) * (trial + 0.5) / trials


def trial_key(seed: int, length: int, trial: int) -> str:
    return str(random.Random(f"passkey:{seed}:{length}:{trial}").randint(10000, 99999))


def depth_bin(depth: float) -> tuple[float, float]:
    for low, high in DEPTH_BINS:
        if low <= depth < high:
            return (low, high)
    return DEPTH_BINS[-1] if math.isclose(depth, DEPTH_BINS[-1][1]) else (math.nan, math.nan)


def depth_bin_label(bin_: tuple[float, float]) -> str:
    return f"{bin_[0]:.0%}-{bin_[1]:.0%}"


def passkey_prompts(tokenizer, lengths: Sequence[int], trials: int, seed: int = 0) -> list[PasskeyPrompt]:
    """``trials`` prompts per length (depths evenly over 10-90%, keys drawn from ``seed``)."""
    return [build_prompt(tokenizer, n, trial_depth(t, trials), trial_key(seed, n, t), t)
            for n in lengths for t in range(trials)]


def build_prompt(tokenizer, length: int, depth: float, key: str, trial: int = 0) -> PasskeyPrompt:
    """The prompt of ``length`` tokens with ``key`` stated at the sentence boundary nearest
    ``depth * length`` (the latest one that leaves room for the rest)."""
    instruction, needle, question = (encode(tokenizer, t) for t in (INSTRUCTION, NEEDLE.format(key=key), QUESTION))
    sentences = [encode(tokenizer, s) for s in FILLER]
    filler = length - len(instruction) - len(needle) - len(question)
    if filler < 0:
        raise EvalError(
            f"a passkey prompt needs at least {length - filler} tokens with this tokenizer, got length {length}; "
            "use a longer length"
        )
    before, next_sentence = _sentences_up_to(sentences, round(depth * length) - len(instruction), filler, 0)
    after, _ = _sentences_up_to(sentences, filler - len(before), filler - len(before), next_sentence)
    pad = encode(tokenizer, PAD)[:1] * (filler - len(before) - len(after))
    ids = instruction + before + needle + after + pad + question
    start = len(instruction) + len(before)
    answer, scored = _answer(tokenizer, key, question)
    return PasskeyPrompt(length, depth, key, trial, torch.tensor(ids, dtype=torch.long),
                         torch.tensor(answer, dtype=torch.long), scored, start, start + len(needle))


def _sentences_up_to(sentences: list[list[int]], target: int, limit: int, first: int) -> tuple[list[int], int]:
    """Filler sentences in turn from ``sentences[first]``: as many as end nearest ``target``
    tokens without passing ``limit``; also the index of the sentence that would come next."""
    out: list[int] = []
    i = first
    while True:
        nxt = sentences[i % len(sentences)]
        if len(out) + len(nxt) > limit or abs(len(out) + len(nxt) - target) >= abs(len(out) - target):
            return out, i
        out += nxt
        i += 1


def _answer(tokenizer, key: str, question: list[int]) -> tuple[list[int], tuple[bool, ...]]:
    """The answer's tokens as they follow the question (tokenized together when the question's
    tokens come out unchanged, else on their own), and which of them hold digits."""
    together = encode(tokenizer, QUESTION + ANSWER.format(key=key))
    if together[: len(question)] == question:
        answer = together[len(question):]
    else:
        answer = encode(tokenizer, ANSWER.format(key=key))
    scored = tuple(any(c.isdigit() for c in tokenizer.decode([t])) for t in answer)
    if not any(scored):
        raise EvalError(f"the tokenizer gives the answer {ANSWER.format(key=key)!r} no token with a digit")
    return answer, scored


# ---- scoring --------------------------------------------------------------------------------------
def score_trial(program, prompt: PasskeyPrompt, tokenizer=None, generate: bool = False) -> PasskeyTrial:
    """Score one prompt: teacher forcing, and greedy generation with ``generate`` (which needs
    ``tokenizer`` to read the number back)."""
    answer = prompt.answer
    fed = torch.cat([prompt.ids, answer[:-1]])[None]
    logits = last_logits(program, fed, answer.numel()).float()
    target = answer.to(logits.device)
    scored = torch.tensor(prompt.scored, device=logits.device)
    hits = (logits.argmax(-1) == target)[scored]
    logprob = torch.log_softmax(logits, -1).gather(-1, target[:, None])[:, 0][scored].sum().item()
    trial = PasskeyTrial(prompt.length, prompt.depth, prompt.actual_depth, prompt.key, bool(hits.all()),
                         int(hits.sum()), int(hits.numel()), logprob)
    if generate:
        if tokenizer is None:
            raise EvalError("scoring by greedy generation needs the tokenizer, to read the number back")
        tokens = greedy_tokens(program, prompt.ids[None], answer.numel() + GENERATED_EXTRA)
        trial.generated = tokenizer.decode(tokens)
        number = re.search(r"\d+", trial.generated)
        trial.generated_correct = number is not None and number.group() == prompt.key
    return trial


def measure_passkey(program, prompts: Sequence[PasskeyPrompt], tokenizer=None, generate: bool = False,
            progress: Callable[[int, int], None] | None = None) -> PasskeyResult:
    """Score every prompt (``score_trial``); ``progress(done, total)`` after each."""
    trials = []
    for i, prompt in enumerate(prompts):
        trials.append(score_trial(program, prompt, tokenizer, generate))
        if progress is not None:
            progress(i + 1, len(prompts))
    return PasskeyResult(trials)
