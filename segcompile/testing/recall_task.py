"""A synthetic long-context task: key-value recall among distractors, generated on the fly.

Vocabulary (``RecallVocab``; ids are contiguous from 0):

    0                                   QUERY: marks a question
    [1, 1 + num_filler)                 filler: the distractor text
    [key_start, key_start + num_keys)   keys
    [value_start, value_start + ...)    values

A sequence of ``n`` tokens is a context of ``n - 3Q`` tokens followed by Q questions:

    context:   filler ... k1 v1 ... filler ... k2 v2 ... filler          (P pairs, distinct keys)
    questions: QUERY k v  QUERY k v ...                                  (Q of the P pairs)

The P (key, value) pairs sit at uniformly random, non-overlapping positions of the context; keys
are distinct within a sequence and never occur as filler, values are drawn with replacement.
Each question asks a pair chosen uniformly among the P (without repeats), so answers lie
anywhere in the context, many segments back as often as one. The value in a question is the
answer: its label is the value, every other label is -100, and since position i predicts
``labels[i+1]`` the model predicts the answer from the question's key token. The answer token
stays in the input (teacher forcing) so later questions see a regular layout.

Keyed values (``RecallVocab(values_per_key=m)``, ``num_values = num_keys * m``): key ``k`` (the
k-th key) takes its value from its own block ``[value_start + k*m, value_start + (k+1)*m)``. The
value token then names its key, so a question is answered by one attention hop (the question's key
finds the value of its block that occurs in the context), while with shared values (the default)
the value must be found through the key before it, a two-layer induction circuit. Chance given the
question is ``1 / m`` (the block is known from the key, the member only from the context). Why
this exists: a 2-layer, 64-wide decoder trained from scratch on the shared-value task stayed at the
"copy any value of the context" plateau for 800-1000 steps at every setting tried on a CPU
(N = 48-256, 4-16 pairs, batch 16-128, lr 5e-4 to 1e-2), while the keyed task at N = 256 (12 pairs,
16 values per key) reaches a loss of 0.04 by step 800 of batch 32 (bench/tbptt_regimes.py
--cpu-defaults).

``distances[b, q]`` is how far back the answer is: the position of question q's key (where the
prediction is made) minus the position of the value it must recall; ``distances // S`` buckets
the questions by how many segments back their answer lies.

Everything comes from one ``torch.Generator``: the same generator state gives the same batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100  # segcompile.loss.IGNORE_INDEX


@dataclass(frozen=True)
class RecallVocab:
    num_filler: int = 64
    num_keys: int = 64
    num_values: int = 64
    values_per_key: int | None = None  # keyed values (see the module docstring); None: shared values

    query: int = 0

    def __post_init__(self) -> None:
        m = self.values_per_key
        if m is not None and (m < 1 or self.num_values != self.num_keys * m):
            raise ValueError(
                f"keyed values need values_per_key >= 1 and num_values = num_keys * values_per_key, got "
                f"num_keys={self.num_keys}, num_values={self.num_values}, values_per_key={m}"
            )

    @property
    def chance(self) -> float:
        """Accuracy of a guess that knows the question's key but not the context."""
        return 1 / (self.values_per_key or self.num_values)

    @property
    def filler_start(self) -> int:
        return 1

    @property
    def key_start(self) -> int:
        return 1 + self.num_filler

    @property
    def value_start(self) -> int:
        return self.key_start + self.num_keys

    @property
    def size(self) -> int:
        """Tokens used: the model's vocabulary must be at least this large."""
        return self.value_start + self.num_values


def context_len(n: int, queries: int) -> int:
    return n - 3 * queries


def check_sizes(n: int, pairs: int, queries: int, vocab: RecallVocab) -> None:
    if not 1 <= queries <= pairs:
        raise ValueError(f"need 1 <= queries <= pairs, got queries={queries}, pairs={pairs}")
    if pairs > vocab.num_keys:
        raise ValueError(f"{pairs} pairs need {pairs} distinct keys; the vocabulary has {vocab.num_keys}")
    if context_len(n, queries) < 2 * pairs:
        raise ValueError(
            f"a sequence of {n} tokens holds {queries} questions ({3 * queries} tokens) and a context of "
            f"{context_len(n, queries)} tokens, too short for {pairs} pairs (2 tokens each)"
        )


def batch(
    generator: torch.Generator,
    batch_size: int,
    n: int,
    *,
    pairs: int = 16,
    queries: int = 8,
    vocab: RecallVocab = RecallVocab(),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(input_ids [B, n], labels [B, n], distances [B, queries])``, on the generator's device (CPU)."""
    check_sizes(n, pairs, queries, vocab)
    B, L, P, Q = batch_size, context_len(n, queries), pairs, queries
    g = dict(generator=generator)

    ids = torch.randint(vocab.filler_start, vocab.key_start, (B, n), **g)
    # P non-overlapping 2-token slots, uniform: choose P of L - P starts, sorted, and spread the
    # k-th by k (stars and bars), so consecutive starts differ by >= 2 and the last ends <= L - 1.
    starts = torch.rand(B, L - P, **g).argsort(dim=1)[:, :P].sort(dim=1).values
    key_pos = starts + torch.arange(P)
    keys = torch.rand(B, vocab.num_keys, **g).argsort(dim=1)[:, :P] + vocab.key_start
    if vocab.values_per_key is None:
        values = torch.randint(vocab.value_start, vocab.size, (B, P), **g)
    else:
        m = vocab.values_per_key
        values = vocab.value_start + (keys - vocab.key_start) * m + torch.randint(0, m, (B, P), **g)
    ids.scatter_(1, key_pos, keys)
    ids.scatter_(1, key_pos + 1, values)

    asked = torch.rand(B, P, **g).argsort(dim=1)[:, :Q]  # which pair each question asks
    q_pos = L + 3 * torch.arange(Q).expand(B, Q)  # QUERY token of each question
    ids.scatter_(1, q_pos, vocab.query)
    ids.scatter_(1, q_pos + 1, keys.gather(1, asked))
    answers = values.gather(1, asked)
    ids.scatter_(1, q_pos + 2, answers)

    labels = torch.full_like(ids, IGNORE_INDEX)
    labels.scatter_(1, q_pos + 2, answers)
    distances = (q_pos + 1) - (key_pos.gather(1, asked) + 1)
    return ids, labels, distances


def answer_positions(n: int, queries: int) -> torch.Tensor:
    """Positions of the questions' key tokens: ``logits[:, answer_positions]`` predict the answers."""
    return context_len(n, queries) + 3 * torch.arange(queries) + 1


def correct(logits: torch.Tensor, labels: torch.Tensor, queries: int) -> torch.Tensor:
    """``[B, queries]`` bool: the argmax (over the whole vocabulary) at each question's key is its answer."""
    n = labels.shape[1]
    at = answer_positions(n, queries).to(logits.device)
    predicted = logits.index_select(1, at).argmax(-1)
    return predicted == labels.index_select(1, (at + 1).to(labels.device)).to(predicted.device)


if __name__ == "__main__":
    g = torch.Generator().manual_seed(0)
    ids, labels, distances = batch(g, 2, 64, pairs=6, queries=3)
    print(ids)
    print("answers:", labels[labels != IGNORE_INDEX].view(2, -1))
    print("distances:", distances)
