"""``select_heads``: choose the long-range KV heads of a model from data.

Two methods score every KV head of every layer; the plan keeps the best ``budget`` fraction.

* ``attention_mass``: run the original model on calibration sequences and score a KV head by the
  attention mass its queries (the whole GQA group, averaged) put on keys a local head could not
  see under the config (outside sinks + tail + current segment), averaged over the queries that
  have such keys, or only over the ``query_positions`` that have them (the rows that predict an
  answer: most queries of real text spread their attention whatever the head, so the average
  over every query hardly tells a retrieval head from another). A head that never looks past its
  local window scores 0.
* ``gate`` (DuoAttention-style): one trainable gate per KV head mixes the head's full-attention
  output with its local (sinks + tail + segment) output, ``g * full + (1 - g) * local`` with
  ``g = sigmoid(logit)``. The model is frozen; only the gates are trained (Adam) to make the gated
  model's logits match the full model's (at every query that has keys beyond its window, or at
  the ``query_positions`` among them), plus ``sparsity * mean(g)``. A head whose local output is
  as good as its full one loses its gate. Heads are ranked by gate logit (the same order as the
  gate value, without sigmoid's saturation ties).

Both methods see attention the way the oracle does: a ``TorchFunctionMode`` intercepts
``F.scaled_dot_product_attention`` (the n-th call of a forward is layer n; HF models loaded with
eager attention run with SDPA meanwhile), the local/long-range masks are ``oracle.visibility`` and
the layer and KV-head counts are ``sdpa_hook.kv_heads_per_layer``.

Selection is deterministic: ``round(budget * total KV heads)`` heads (at least one when
budget > 0), highest score first, ties broken by (layer, KV head); with ``granularity="layer"``
layers are scored by the sum of their heads' scores and ``round(budget * layers)`` whole layers
are kept. Data comes from ``calibration_ids`` or, without them, from a seeded generator of
synthetic retrieval sequences (key-value pairs among filler, questions at the end).
``text_retrieval_calibration`` builds calibration data for a model with a tokenizer: pass-key
prompts whose filler is real text (the calibration split of ``segcompile.quality.texts``, never
the held-out one) with the answer's rows as ``query_positions``. The returned
plan records the scores, budget, granularity, S/T/G, seed, method parameters and a sha256 of
every token the method saw, so the selection can be reproduced and checked.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .config import SegmentConfig
from .errors import ConfigError, PlanError, SegcompileError, UnsupportedAttentionError
from .reference.oracle import visibility
from .reference.sdpa_hook import kv_heads_per_layer, model_logits, run_per_layer_attention
from .frontend import attention_through_sdpa, device_of
from .plan import HeadPlan, model_fingerprint

METHODS = ("attention_mass", "gate")
GRANULARITIES = ("head", "layer")

# Gate defaults. A gate starts at sigmoid(4) = 0.98, almost full attention, as in DuoAttention.
# On the hand-built test decoder (tests/test_heads.py) the kept and dropped gates lie on either
# side of 0.5 after 60 steps at lr 0.1. A random-init model has no head that needs its history:
# on the 4-layer tiny Llama (S=32, 128 tokens) the gates stay within 0.64..0.90 and the order of
# the top ones still changes between 50 and 200 steps, so its plan is as arbitrary as the model.
# Real models need their own measurement (steps, lr, sparsity are arguments). On SmolLM2-135M
# (bench/head_selection.py, S = T = 256, 4 sinks) 16 steps on 768-token pass-key prompts,
# distilled at the answer rows only, took 67 s on 2 CPU cores and kept 1/3 of the KV heads that
# retrieve as well as full attention at 2K and 4K; the same 16 steps on synthetic sequences,
# distilled at every query, took 347 s and kept mostly early layers (half the keys found).
GATE_STEPS = 100
GATE_LR = 0.1
GATE_SPARSITY = 0.05
GATE_INIT_LOGIT = 4.0

# attention_mass computes dense probabilities in blocks of query rows: at most this many scores
# (fp32) at a time, i.e. 256 MiB.
MASS_BLOCK_ELEMENTS = 1 << 26


class CalibrationError(SegcompileError, ValueError):
    """Calibration data that cannot score heads (wrong shape or type, too short, ids out of vocab)."""


# ---- synthetic retrieval data --------------------------------------------------------------
def retrieval_ids(
    generator: torch.Generator, batch_size: int, n: int, vocab_size: int, *, pairs: int = 8, queries: int = 4
) -> torch.Tensor:
    """``[batch_size, n]`` token ids: key-value pairs at random places among filler, then questions.

    The vocabulary is split into a question marker (id 0), filler, keys and values, in that order;
    a sequence is filler with ``pairs`` (key, value) pairs at uniformly random non-overlapping
    places, ending with ``queries`` questions ``marker key value`` about pairs chosen at random, so
    the answers lie anywhere in the context, many segments back as often as one. Everything comes
    from ``generator``: the same state gives the same batch.
    """
    if vocab_size < 8:
        raise CalibrationError(f"synthetic retrieval data needs a vocabulary of at least 8 tokens, got {vocab_size}")
    third = (vocab_size - 1) // 3
    filler, key_start, value_start = (1, 1 + third), 1 + third, 1 + 2 * third
    pairs = min(pairs, third)
    queries = min(queries, pairs)
    context = n - 3 * queries
    if context < 2 * pairs:
        raise CalibrationError(f"synthetic retrieval sequences of {n} tokens are too short for {pairs} pairs")
    g = dict(generator=generator)
    ids = torch.randint(*filler, (batch_size, n), **g)
    starts = torch.rand(batch_size, context - pairs, **g).argsort(dim=1)[:, :pairs].sort(dim=1).values
    key_pos = starts + torch.arange(pairs)
    keys = torch.rand(batch_size, third, **g).argsort(dim=1)[:, :pairs] + key_start
    values = torch.randint(value_start, value_start + third, (batch_size, pairs), **g)
    ids.scatter_(1, key_pos, keys)
    ids.scatter_(1, key_pos + 1, values)
    asked = torch.rand(batch_size, pairs, **g).argsort(dim=1)[:, :queries]
    q_pos = context + 3 * torch.arange(queries).expand(batch_size, queries)
    ids.scatter_(1, q_pos, 0)
    ids.scatter_(1, q_pos + 1, keys.gather(1, asked))
    ids.scatter_(1, q_pos + 2, values.gather(1, asked))
    return ids


# ---- pass-key prompts on real text -----------------------------------------------------------
@dataclass(frozen=True)
class RetrievalCalibration:
    """Pass-key prompts of ``n`` tokens whose filler is real text, answer included, for
    ``select_heads(model, c.ids, ..., query_positions=c.query_positions)``."""

    ids: torch.Tensor  # [B, n] int64
    query_positions: torch.Tensor  # [B, n] bool: the rows that predict the key's digits
    key_positions: torch.Tensor  # [B, n] bool: the key's digits in the needle sentence
    keys: tuple[str, ...]
    needle_starts: tuple[int, ...]
    documents: tuple[dict, ...]  # the filler texts: name, split, sha256

    def describe(self) -> dict[str, Any]:
        from .quality import passkey

        return {"prompt": {"instruction": passkey.INSTRUCTION, "needle": passkey.NEEDLE,
                           "question": passkey.QUESTION, "answer": passkey.ANSWER},
                "shape": list(self.ids.shape), "keys": list(self.keys), "needle_starts": list(self.needle_starts),
                "query_positions": int(self.query_positions.sum()), "key_positions": int(self.key_positions.sum()),
                "filler_documents": list(self.documents)}


def text_retrieval_calibration(tokenizer, n: int, samples: int, seed: int = 0, split: str = "calibration",
                               depths: tuple[float, float] = (0.1, 0.9)) -> RetrievalCalibration:
    """``samples`` pass-key prompts of exactly ``n`` tokens: the eval's instruction, then the first
    tokens of one document of ``split`` (``segcompile.quality.texts``; the calibration split never
    shares a text with the held-out one) with the needle sentence inserted at a depth drawn from
    ``depths``, then the question and the answer. The query positions are the rows that predict
    the answer's digit tokens (where a model must retrieve), the key positions the needle's digit
    tokens (what it must retrieve). Keys and depths come from ``seed``."""
    import random

    from .quality import passkey, texts

    sequences = texts.token_sequences(tokenizer, n, samples, split)
    if len(sequences) < samples:
        raise CalibrationError(f"only {len(sequences)} {split} documents have {n} tokens, {samples} asked for; "
                               "use fewer samples or a shorter length")
    instruction, question = texts.encode(tokenizer, passkey.INSTRUCTION), texts.encode(tokenizer, passkey.QUESTION)
    rows, keys, starts = [], [], []
    positions, needles = torch.zeros(samples, n, dtype=torch.bool), torch.zeros(samples, n, dtype=torch.bool)
    for i, sequence in enumerate(sequences):
        draw = random.Random(f"heads-calibration:{seed}:{n}:{i}")
        key = str(draw.randint(10000, 99999))
        needle = texts.encode(tokenizer, passkey.NEEDLE.format(key=key))
        answer, digits = _answer_tokens(tokenizer, key, question)
        room = n - len(instruction) - len(needle) - len(question) - len(answer)
        if room < 1:
            raise CalibrationError(f"pass-key prompts need more than {n - room} tokens with this tokenizer, got n={n}")
        filler = sequence.ids[:room].tolist()
        at = min(room, max(0, round(draw.uniform(*depths) * n) - len(instruction)))
        rows.append(instruction + filler[:at] + needle + filler[at:] + question + answer)
        first = n - len(answer)
        positions[i, [first + j - 1 for j, digit in enumerate(digits) if digit]] = True
        start = len(instruction) + at
        needles[i, [start + j for j, t in enumerate(needle) if any(c.isdigit() for c in tokenizer.decode([t]))]] = True
        keys.append(key)
        starts.append(start)
    return RetrievalCalibration(torch.tensor(rows, dtype=torch.long), positions, needles, tuple(keys), tuple(starts),
                                tuple(s.describe() for s in sequences))


def _answer_tokens(tokenizer, key: str, question: list[int]) -> tuple[list[int], list[bool]]:
    """The answer's tokens as they follow the question, and which of them hold digits."""
    from .quality import passkey, texts

    together = texts.encode(tokenizer, passkey.QUESTION + passkey.ANSWER.format(key=key))
    answer = (together[len(question):] if together[: len(question)] == question
              else texts.encode(tokenizer, passkey.ANSWER.format(key=key)))
    digits = [any(c.isdigit() for c in tokenizer.decode([t])) for t in answer]
    if not any(digits):
        raise CalibrationError(f"the tokenizer gives the answer {key!r} no token with a digit")
    return answer, digits


# ---- public --------------------------------------------------------------------------------
def select_heads(
    model: torch.nn.Module,
    calibration_ids: torch.Tensor | Any | None,
    budget: float,
    method: str = "attention_mass",
    cfg: SegmentConfig | None = None,
    *,
    granularity: str = "head",
    seed: int = 0,
    seq_len: int | None = None,
    samples: int = 8,
    batch_size: int = 1,
    steps: int = GATE_STEPS,
    lr: float = GATE_LR,
    sparsity: float = GATE_SPARSITY,
    progress: Callable[[int, int], None] | None = None,
    query_positions: torch.Tensor | Any | None = None,
    key_positions: torch.Tensor | Any | None = None,
) -> HeadPlan:
    """Score every KV head of ``model`` and return the plan keeping the best ``budget`` fraction.

    calibration_ids: ``[B, n]`` (or ``[n]``) token ids, a tensor or an integer array; ``None``
        for ``samples`` synthetic retrieval sequences of ``seq_len`` tokens (generated from
        ``seed``; the gate method draws a fresh batch every step).
    budget: fraction of KV heads (or of layers) that become long-range, in [0, 1].
    cfg: S, T and G to score against (its ``long_range`` is ignored). Default: S = n // 4 with
        the whole previous segment as tail and no sinks.
    granularity: ``"head"``, or ``"layer"`` to keep whole layers (LongGen-style).
    batch_size: sequences per forward (attention_mass) or per training step (gate).
    steps, lr, sparsity: the gate's Adam steps, learning rate and weight of ``mean(gate)``.
    progress: called as ``progress(done, total)`` after every batch or step.
    query_positions: ``[B, n]`` (or ``[n]``, the same for every row) bool, the query rows that
        score (attention_mass) or that the gates are distilled on (gate), e.g. the rows that
        predict an answer; needs ``calibration_ids``. Default: every query.
    key_positions: ``[B, n]`` (or ``[n]``) bool, attention_mass only: count only the mass put on
        these keys beyond the window (e.g. the key a prompt asks for), not on every key beyond it.
    """
    _check_choice(method, METHODS, "method")
    _check_choice(granularity, GRANULARITIES, "granularity")
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0.0 <= float(budget) <= 1.0:
        raise PlanError(f"budget must be a fraction of KV heads in [0, 1] (e.g. 0.25), got {budget!r}")
    for what, value in (("samples", samples), ("batch_size", batch_size), ("steps", steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise PlanError(f"{what} must be an int >= 1, got {value!r}")
    if method == "gate" and not (lr > 0 and sparsity >= 0):
        raise PlanError(f"the gate method needs lr > 0 and sparsity >= 0, got lr={lr!r}, sparsity={sparsity!r}")
    if cfg is not None and not isinstance(cfg, SegmentConfig):
        raise ConfigError(f"cfg must be a SegmentConfig, got {type(cfg).__name__}")

    kv = kv_heads_per_layer(model)
    vocab = _vocab_size(model)
    device = device_of(model)
    ids = _calibration(calibration_ids, vocab)
    positions = _query_positions(query_positions, ids)
    labelled = _query_positions(key_positions, ids, "key_positions")
    if labelled is not None and method != "attention_mass":
        raise PlanError("key_positions apply to method='attention_mass' only (the gate is distilled on the logits)")
    n = ids.shape[1] if ids is not None else (seq_len or (4 * cfg.segment_len if cfg is not None else 256))
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise CalibrationError(f"seq_len must be an int >= 1, got {seq_len!r}")
    if cfg is None:
        cfg = SegmentConfig(segment_len=max(1, n // 4))
    _check_length(cfg, n)
    _check_positions_see_beyond(positions, cfg, n)

    data = _Data(ids, positions, labelled, vocab, n, samples, batch_size, seed)
    was_training = model.training
    model.eval()
    try:
        if method == "attention_mass":
            scores, params = _attention_mass(model, cfg, kv, data, device, progress), {}
            ranking = scores
        else:
            scores, ranking, params = _gate(model, cfg, kv, data, device, steps, lr, sparsity, progress)
    finally:
        model.train(was_training)

    chosen, layer_scores = _choose(scores, ranking, kv, budget, granularity)
    extra = {
        "budget": float(budget),
        "granularity": granularity,
        "seed": seed,
        "config": {"segment_len": cfg.segment_len, "tail_len": cfg.tail_len, "sink_tokens": cfg.sink_tokens},
        "scores": {str(l): [float(s) for s in row] for l, row in enumerate(scores)},
        "selected": sum(len(h) for h in chosen.values()),
        "total_kv_heads": sum(kv),
        "data": data.describe(),
        "params": params,
        "torch": torch.__version__.split("+")[0],
    }
    if granularity == "layer":
        extra["layer_scores"] = [float(s) for s in layer_scores]
    fingerprint = model_fingerprint(type(model).__name__, kv)
    return HeadPlan.from_dict(chosen, method=method, fingerprint=fingerprint, extra=extra)


def plan_at_budget(plan: HeadPlan, budget: float) -> HeadPlan:
    """The plan ``select_heads`` returns at another ``budget`` from the same scores (no rescoring:
    the scores, and for the gate its logits, are in ``plan.extra``)."""
    if plan.method not in METHODS or "scores" not in plan.extra:
        raise PlanError(f"plan_at_budget needs a plan made by select_heads (with its scores), got a {plan.kind} plan "
                        f"of method {plan.method!r}")
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0.0 <= float(budget) <= 1.0:
        raise PlanError(f"budget must be a fraction of KV heads in [0, 1] (e.g. 0.25), got {budget!r}")
    extra = dict(plan.extra)
    scores = [extra["scores"][str(l)] for l in range(len(extra["scores"]))]
    logits = extra.get("params", {}).get("gate_logits")
    ranking = [logits[str(l)] for l in range(len(scores))] if plan.method == "gate" else scores
    kv = [len(row) for row in scores]
    chosen, layer_scores = _choose(scores, ranking, kv, budget, extra["granularity"])
    extra.update(budget=float(budget), selected=sum(len(h) for h in chosen.values()))
    if extra["granularity"] == "layer":
        extra["layer_scores"] = [float(s) for s in layer_scores]
    return HeadPlan.from_dict(chosen, method=plan.method, fingerprint=plan.fingerprint, extra=extra)


# ---- selection -----------------------------------------------------------------------------
def _count(budget: float, total: int) -> int:
    want = round(budget * total)
    return max(want, 1) if budget > 0 else 0


def _choose(scores, ranking, kv: list[int], budget: float, granularity: str):
    """``({layer: [kv_heads]}, layer_scores)``: the best heads by ``ranking`` (or layers by summed
    ``scores``), ties broken by (layer, head)."""
    layer_scores = [math.fsum(row) for row in scores]
    if granularity == "layer":
        order = sorted(range(len(kv)), key=lambda l: (-layer_scores[l], l))
        keep = set(order[: _count(budget, len(kv))])
        return {l: list(range(kv[l])) if l in keep else [] for l in range(len(kv))}, layer_scores
    order = sorted(((l, h) for l in range(len(kv)) for h in range(kv[l])), key=lambda lh: (-ranking[lh[0]][lh[1]], lh))
    keep = order[: _count(budget, sum(kv))]
    return {l: sorted(h for ll, h in keep if ll == l) for l in range(len(kv))}, layer_scores


# ---- data ----------------------------------------------------------------------------------
class _Data:
    """Batches ``(ids, query_positions or None)`` of calibration ids, or seeded synthetic retrieval
    batches; hashes what it hands out."""

    def __init__(self, ids, positions, keys, vocab: int, n: int, samples: int, batch_size: int, seed: int):
        self.ids, self.positions, self.keys, self.vocab, self.n = ids, positions, keys, vocab, n
        self.samples, self.batch_size, self.seed = samples, batch_size, seed
        self.generator = torch.Generator().manual_seed(seed)
        self.hash = hashlib.sha256()
        self.sequences = 0

    def fixed(self):
        """The whole calibration set (or ``samples`` synthetic sequences), in batches."""
        ids = self.ids if self.ids is not None else retrieval_ids(self.generator, self.samples, self.n, self.vocab)
        batches = [slice(i, i + self.batch_size) for i in range(0, ids.shape[0], self.batch_size)]
        return [(*self._seen(ids[b], self._rows(b)), None if self.keys is None else self.keys[b]) for b in batches]

    def step(self, t: int) -> torch.Tensor:
        """The batch of training step ``t``: calibration rows in turn, or a fresh synthetic batch."""
        if self.ids is None:
            return self._seen(retrieval_ids(self.generator, self.batch_size, self.n, self.vocab), None)
        rows = torch.arange(t * self.batch_size, (t + 1) * self.batch_size) % self.ids.shape[0]
        return self._seen(self.ids[rows], self._rows(rows))

    def _rows(self, rows) -> torch.Tensor | None:
        return None if self.positions is None else self.positions[rows]

    def _seen(self, ids: torch.Tensor, positions: torch.Tensor | None):
        self.hash.update(ids.to(torch.int64).contiguous().numpy().astype("<i8").tobytes())
        if positions is not None:
            self.hash.update(positions.numpy().tobytes())
        if self.keys is not None:
            self.hash.update(self.keys.numpy().tobytes())
        self.sequences += ids.shape[0]
        return ids, positions

    def describe(self) -> dict[str, Any]:
        base = {"sequences_seen": self.sequences, "seq_len": self.n, "sha256": self.hash.hexdigest()}
        if self.ids is not None:
            whole = hashlib.sha256(self.ids.numpy().astype("<i8").tobytes()).hexdigest()
            rows = {f"{what}_positions": int(marked.sum())
                    for what, marked in (("query", self.positions), ("key", self.keys)) if marked is not None}
            return {"source": "calibration", "shape": list(self.ids.shape), "calibration_sha256": whole, **rows, **base}
        return {"source": "synthetic_retrieval", "vocab_size": self.vocab, "samples": self.samples,
                "batch_size": self.batch_size, **base}


def _calibration(ids, vocab: int) -> torch.Tensor | None:
    if ids is None:
        return None
    if not isinstance(ids, torch.Tensor):
        try:
            ids = torch.as_tensor(ids)
        except (TypeError, ValueError, RuntimeError) as e:
            raise CalibrationError(
                f"calibration ids must be an integer tensor or array [B, n], got {type(ids).__name__}: {e}"
            ) from None
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise CalibrationError(f"calibration ids must be integer token ids, got dtype {ids.dtype}")
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.numel() == 0:
        raise CalibrationError(f"calibration ids must have shape [B, n] or [n] with B, n >= 1, got {list(ids.shape)}")
    ids = ids.detach().to("cpu", torch.int64)
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab:
        raise CalibrationError(
            f"calibration ids must lie in [0, {vocab}) (the model's vocabulary), got ids in [{low}, {high}]"
        )
    return ids


def _query_positions(positions, ids: torch.Tensor | None, what: str = "query_positions") -> torch.Tensor | None:
    """``[B, n]`` bool on the CPU, checked against the calibration ids (``[n]`` applies to every row)."""
    if positions is None:
        return None
    if ids is None:
        raise CalibrationError(f"{what} mark positions of calibration_ids; pass calibration_ids with them "
                               "(synthetic data has its own questions)")
    try:
        positions = torch.as_tensor(positions).detach().to("cpu")
    except (TypeError, ValueError, RuntimeError) as e:
        raise CalibrationError(f"{what} must be a bool tensor or array [B, n], got {type(positions).__name__}: "
                               f"{e}") from None
    if positions.dtype != torch.bool:
        whole = not (positions.dtype.is_floating_point or positions.dtype.is_complex)
        if not whole or not bool(((positions == 0) | (positions == 1)).all()):
            raise CalibrationError(f"{what} must be bool (or 0/1 integers), got dtype {positions.dtype}")
        positions = positions.bool()
    if positions.dim() == 1:
        positions = positions[None].expand(ids.shape[0], -1)
    if tuple(positions.shape) != tuple(ids.shape):
        raise CalibrationError(f"{what} must have the calibration ids' shape {list(ids.shape)} (or "
                               f"[{ids.shape[1]}]), got {list(positions.shape)}")
    return positions.contiguous()


def _check_positions_see_beyond(positions: torch.Tensor | None, cfg: SegmentConfig, n: int) -> None:
    """Refuse query positions of which none has a key beyond its local window: they score nothing."""
    if positions is None:
        return
    _, beyond = _masks(cfg, n, "cpu")
    if not bool((positions & beyond.any(dim=-1)).any()):
        raise CalibrationError(
            f"none of the {int(positions.sum())} query positions (over {positions.shape[0]} sequences) has a key "
            "beyond its local window "
            f"(segment_len={cfg.segment_len}, tail_len={cfg.tail_len}, sink_tokens={cfg.sink_tokens}), so they "
            "cannot tell heads apart; mark later positions (the answer of a long prompt) or use a smaller segment_len"
        )


def _check_length(cfg: SegmentConfig, n: int) -> None:
    """Refuse sequences in which no query has a key outside its local window."""
    S, T, G = cfg.segment_len, cfg.tail_len, cfg.sink_tokens
    first = S * ((T + G) // S + 1)  # first query whose segment start a has a - T > G
    if n <= first:
        raise CalibrationError(
            f"calibration sequences of {n} tokens are too short for segment_len={S}, tail_len={T}, "
            f"sink_tokens={G}: before position {first} every key is in a local head's window, so no head can "
            f"be told from another; use sequences of at least {first + 1} tokens (several segments) "
            "or a smaller segment_len"
        )


def _vocab_size(model) -> int:
    config = getattr(model, "config", None)
    for name in ("vocab_size", "n_vocab"):
        if getattr(config, name, None) is not None:
            return int(getattr(config, name))
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None:
        return int(embeddings.num_embeddings)
    raise SegcompileError(f"{type(model).__name__}.config has no vocab_size; select_heads needs the vocabulary size")


# ---- interception --------------------------------------------------------------------------
def _run(model, ids: torch.Tensor, kv: list[int], on_call) -> torch.Tensor:
    """The model's logits with every attention call handed to ``on_call(layer, args, sdpa)``."""
    logits, calls = run_per_layer_attention(model, ids, on_call, who="select_heads")
    if calls == 0:
        raise UnsupportedAttentionError(
            f"select_heads: {type(model).__name__} made no call to F.scaled_dot_product_attention, so no attention "
            "was matched; heads can be scored in models whose attention is SDPA (transformers models with "
            "attn_implementation 'sdpa' or 'eager', or a decoder that calls F.scaled_dot_product_attention)"
        )
    if calls != len(kv):
        raise UnsupportedAttentionError(
            f"select_heads: {type(model).__name__} made {calls} attention calls in one forward, but its config "
            f"names {len(kv)} layers; every layer must call F.scaled_dot_product_attention exactly once"
        )
    return logits


def _masks(cfg: SegmentConfig, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(local, beyond)`` ``[n, n]`` bool: a local head's keys, and the keys only a long-range head sees."""
    local = visibility(cfg, n, False).to(device)
    return local, visibility(cfg, n, True).to(device) & ~local


def _group_mean(per_query_head: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """``[H] -> [Hk]``: mean over each KV head's query group."""
    return per_query_head.view(kv_heads, -1).mean(dim=1)


# ---- attention_mass ------------------------------------------------------------------------
def _attention_mass(model, cfg, kv, data: _Data, device, progress) -> list[list[float]]:
    """Per KV head: the mean, over the scored queries, of the mass put beyond the local window."""
    totals = [torch.zeros(h, dtype=torch.float64) for h in kv]
    queries = [0] * len(kv)
    batches = data.fixed()
    positions = keys = None  # the query and key positions of the batch running

    def on_call(layer, a, sdpa):
        q, k = a["query"], a["key"]
        H, n = q.shape[1], q.shape[2]
        if k.shape[1] != H:  # un-repeated GQA K/V (enable_gqa=True)
            k = k.repeat_interleave(H // k.shape[1], dim=1)
        _, beyond = _masks(cfg, n, q.device)
        scored = _scored_rows(beyond, positions)
        for b in range(q.shape[0]):
            rows = scored[b].nonzero().flatten()
            counted = beyond if keys is None else beyond & keys[b][None, :]
            totals[layer] += _group_mean(_mass_beyond(a, q, k, b, rows, cfg, counted).cpu(), kv[layer])
            queries[layer] += rows.numel()
        return sdpa()

    with torch.no_grad():
        for i, (ids, positions, keys) in enumerate(batches):
            positions = None if positions is None else positions.to(device)
            keys = None if keys is None else keys.to(device)
            _run(model, ids.to(device), kv, on_call)
            if progress is not None:
                progress(i + 1, len(batches))
    return [(t / max(1, q)).tolist() for t, q in zip(totals, queries)]


def _scored_rows(beyond: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
    """``[B or 1, n]`` bool: the queries that score, those with keys beyond their window (among
    ``positions`` when given)."""
    has_beyond = beyond.any(dim=-1)[None]
    return has_beyond if positions is None else has_beyond & positions


def _mass_beyond(a, q, k, b: int, rows: torch.Tensor, cfg, beyond: torch.Tensor) -> torch.Tensor:
    """``[H]`` float64: the attention mass batch row ``b``'s queries at ``rows`` put on the keys
    ``beyond`` ``[n, n]`` marks, summed over those queries (dense probabilities, in blocks of rows)."""
    H, n = q.shape[1], q.shape[2]
    causal = visibility(cfg, n, True).to(q.device)
    scale = a["scale"] if a["scale"] is not None else 1.0 / math.sqrt(q.shape[-1])
    mask = a["attn_mask"]
    if mask is not None:
        mask = mask[..., -n:, -n:]
        mask = mask[b] if mask.dim() == 4 and mask.shape[0] > 1 else mask.reshape(-1, n, n)
    block = max(1, MASS_BLOCK_ELEMENTS // max(1, H * n))
    mass = torch.zeros(H, dtype=torch.float64, device=q.device)
    keys = k[b].float().transpose(-1, -2)
    for r in range(0, rows.numel(), block):
        picked = rows[r : r + block]
        scores = q[b][:, picked].float() @ keys * scale  # [H, r, n]
        visible = causal[picked]
        if mask is not None:
            if mask.dtype == torch.bool:
                visible = visible & mask[:, picked]
            else:
                scores = scores + mask[:, picked].float()
        p = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
        mass += (p * beyond[picked]).sum(dim=(-1, -2)).double()
    return mass


# ---- gate ----------------------------------------------------------------------------------
def _gate(model, cfg, kv, data: _Data, device, steps, lr, sparsity, progress):
    gates = [torch.full((h,), GATE_INIT_LOGIT, device=device, requires_grad=True) for h in kv]
    optimizer = torch.optim.Adam(gates, lr=lr)
    frozen = [p for p in model.parameters() if p.requires_grad]
    first_loss = last_loss = None

    def on_call(layer, a, sdpa):
        q = a["query"]
        n, H = q.shape[2], q.shape[1]
        local, _ = _masks(cfg, n, q.device)
        mask = a["attn_mask"]
        if mask is None:
            local_mask = local
        elif mask.dtype == torch.bool:
            local_mask = mask[..., -n:, -n:] & local
        else:
            local_mask = mask[..., -n:, -n:] + torch.zeros((), dtype=mask.dtype, device=q.device).masked_fill(
                ~local, float("-inf")
            )
        full = sdpa()
        short = sdpa(attn_mask=local_mask, is_causal=False)
        g = torch.sigmoid(gates[layer]).repeat_interleave(H // kv[layer]).to(full.dtype)[None, :, None, None]
        return g * full + (1 - g) * short

    _, beyond = _masks(cfg, data.n, device)
    for p in frozen:
        p.requires_grad_(False)
    try:
        for t in range(steps):
            ids, positions = data.step(t)
            ids = ids.to(device)
            # the rows where local and full attention can differ (among the query positions)
            rows = _scored_rows(beyond, None if positions is None else positions.to(device)).expand(ids.shape[0], -1)
            with torch.no_grad():
                with attention_through_sdpa(model):
                    target = model_logits(model, ids)[rows].float()
            gated = _run(model, ids, kv, on_call)[rows].float()
            distill = (gated - target).pow(2).mean() / target.var().clamp(min=1e-12)
            penalty = torch.sigmoid(torch.cat(gates)).mean()
            loss = distill + sparsity * penalty
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            last_loss = {"total": float(loss.detach()), "distill": float(distill.detach())}
            first_loss = last_loss if first_loss is None else first_loss
            if progress is not None:
                progress(t + 1, steps)
    finally:
        for p in frozen:
            p.requires_grad_(True)

    logits = [g.detach().cpu().double() for g in gates]
    scores = [torch.sigmoid(g).tolist() for g in logits]
    params = {
        "steps": steps, "lr": lr, "sparsity": sparsity, "init_logit": GATE_INIT_LOGIT, "optimizer": "adam",
        "batch_size": data.batch_size, "gate_logits": {str(l): g.tolist() for l, g in enumerate(logits)},
        "loss": {"first": first_loss, "last": last_loss},
    }
    return scores, [g.tolist() for g in logits], params


def _check_choice(value, choices, what: str) -> None:
    if value not in choices:
        raise PlanError(f"unknown {what} {value!r}; choose one of {', '.join(map(repr, choices))}")
