"""Property-based tests: no silent wrong answers (hypothesis).

Configs, head plans, lengths and token ids are drawn at random, invalid ones included (0,
negative, T > S, bools, floats, layers and KV heads the model lacks, ids outside the vocabulary,
of the wrong dtype or shape, a state from another program). Every call must then either equal
the oracle (docs/design.md section 1, invariants 3 and 4) or raise a ``SegcompileError``: never
another exception type, never a wrong answer, and never a refusal of valid input.

What is valid is decided here, from docs/design.md and the docstrings, not by the code under
test; where the contract allows both (ids of another integer dtype, an empty batch, a state from
an equal program) a call may refuse, but an answer must still equal the oracle.

Tolerances: ``segcompile.testing.tolerances``: the fp32 row's max abs logit error for the
forward, prefill, decode and generate (fp32 models); the fp64 row's relative error for the loss
and gradients of ``tbptt_backward`` (an fp64 model).

Bounded and reproducible: a fixed number of examples per test, ``derandomize=True`` (the same
examples on every run), no example database. Two tiny models (Llama: GQA, 2 KV heads a layer,
RoPE; GPT-2: 4 KV heads, learned positions) are captured once (conftest.captured); each drawn
config is transformed once (``program``).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace

import torch
from conftest import VOCAB, captured
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import segcompile as sc
from segcompile.loss import IGNORE_INDEX
from segcompile.testing.tolerances import assert_close, tolerance

# derandomize: the examples come from a fixed seed, so every run (CI's too) draws the same ones;
# database=None: nothing is written into the repository. The examples per test (below) keep the
# module well under a minute on two CPU cores.
PROPERTIES = settings(
    deadline=None, derandomize=True, database=None, print_blob=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

FAMILIES = ("llama", "gpt2")
LAYERS = 2  # conftest.captured's default
FP32 = tolerance(torch.float32)
FP64 = tolerance(torch.float64)


# ---- what a call may do ------------------------------------------------------------------------
class Expect(enum.Enum):
    MATCH = "equal the oracle"
    REFUSE = "raise a SegcompileError"
    EITHER = "equal the oracle or raise a SegcompileError"


def worst(*expects: Expect) -> Expect:
    """A call given several inputs: refused if any is invalid, optional if any may be refused."""
    for e in (Expect.REFUSE, Expect.EITHER):
        if e in expects:
            return e
    return Expect.MATCH


@dataclass(frozen=True)
class Refused:
    error: sc.SegcompileError


def attempt(call: Callable):
    """``call()``, or ``Refused`` when it raised a ``SegcompileError``. Any other exception
    propagates, so that hypothesis reports it (and shrinks to it) as what it is."""
    try:
        return call()
    except sc.SegcompileError as e:
        return Refused(e)


def refused(outcome) -> bool:
    return isinstance(outcome, Refused)


def allowed(expect: Expect, outcome) -> bool:
    return expect is Expect.EITHER or refused(outcome) == (expect is Expect.REFUSE)


def why(outcome, what: str) -> str:
    """The message of a failed ``assert allowed(...)``: asserted at each call site, so that
    hypothesis tells the call sites' failures apart (it keys failures by where they are raised)."""
    if refused(outcome):
        return f"{what}: valid input refused: {type(outcome.error).__name__}: {outcome.error}"
    return f"{what}: invalid input accepted (an answer where an error was due)"


def is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def is_index(x) -> bool:
    """A layer or KV-head index: an int >= 0 (plan files' JSON keys are digit strings)."""
    return (is_int(x) and x >= 0) or (isinstance(x, str) and x.isdigit())


# ---- token ids -----------------------------------------------------------------------------------
def out_of_vocabulary(vocab: int) -> list[int]:
    return [vocab, vocab + 1, 2**40, -1, IGNORE_INDEX, -vocab]


# How drawn ids are handed over: [batch, tokens] is what the API takes; the rest are defects.
LAYOUTS: dict[str, Callable[[torch.Tensor], object]] = {
    "batch x tokens": lambda t: t,
    "tokens only (1-D)": lambda t: t[0],
    "batch x tokens x 1 (3-D)": lambda t: t[..., None],
    "no tokens": lambda t: t[:, :0],
    "no rows": lambda t: t[:0],
    "one row more": lambda t: torch.cat([t, t[:1]]),
    "python lists": lambda t: t.tolist(),
}
BATCH_CHANGING = ("no rows", "one row more")
OTHER_DTYPES = ["int32", "int16", "uint8", "float32", "bool"]


@dataclass(frozen=True)
class Ids:
    """Token ids as drawn: in-vocabulary rows, then at most one defect in how they are given
    (one id replaced, another dtype, another layout)."""

    rows: tuple[tuple[int, ...], ...]
    poison: tuple[int, int, int] | None = None  # (row, column, id)
    dtype: str = "int64"
    layout: str = "batch x tokens"

    def value(self):
        t = torch.tensor(self.rows, dtype=torch.long)
        if self.poison is not None:
            row, column, token = self.poison
            t[row, column] = token
        return LAYOUTS[self.layout](t.to(getattr(torch, self.dtype)))

    def valid(self) -> Ids:
        """The same ids without the defect."""
        return Ids(self.rows)


def rows_of(values: st.SearchStrategy[int], batch: int, tokens: int) -> st.SearchStrategy[tuple]:
    row = st.lists(values, min_size=tokens, max_size=tokens).map(tuple)
    return st.lists(row, min_size=batch, max_size=batch).map(tuple)


def valid_token_ids(batch: int, tokens: int, vocab: int = VOCAB) -> st.SearchStrategy[Ids]:
    return rows_of(st.integers(0, vocab - 1), batch, tokens).map(Ids)


@st.composite
def token_ids(draw, batch: int, tokens: int, vocab: int = VOCAB, layouts=tuple(LAYOUTS)) -> Ids:
    """Half the draws valid ids, half with one defect (``layouts``: the layouts a defect may take)."""
    rows = draw(rows_of(st.integers(0, vocab - 1), batch, tokens))
    if not draw(st.booleans()):
        return Ids(rows)
    defect = draw(st.sampled_from(["poison", "dtype", "layout"]))
    if defect == "poison":
        return Ids(rows, poison=(draw(st.integers(0, batch - 1)), draw(st.integers(0, tokens - 1)),
                                 draw(st.sampled_from(out_of_vocabulary(vocab)))))
    if defect == "dtype":
        return Ids(rows, dtype=draw(st.sampled_from(OTHER_DTYPES)))
    return Ids(rows, layout=draw(st.sampled_from([l for l in layouts if l != "batch x tokens"])))


def ids_verdict(ids, vocab: int = VOCAB, batch: int | None = None, lists: bool = False) -> Expect:
    """What a call taking token ids ``ids`` may do (docs/design.md section 3): an integer tensor
    ``[batch, tokens]`` of ids in ``[0, vocab)``. ``batch``: the batch a state fixes. ``lists``:
    the call also takes a list of prompts (``generate``)."""
    if lists and isinstance(ids, list):
        ids = torch.tensor(ids, dtype=torch.long) if ids and ids[0] else None
    if not isinstance(ids, torch.Tensor) or ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
        return Expect.REFUSE
    if ids.dim() != 2 or ids.shape[1] == 0 or (batch is not None and ids.shape[0] != batch):
        return Expect.REFUSE
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        return Expect.REFUSE
    if ids.shape[0] == 0 or ids.dtype != torch.long:
        return Expect.EITHER  # an empty batch, ids of another integer dtype: an answer or a clear error
    return Expect.MATCH


def as_long(ids) -> torch.Tensor:
    """The ids the oracle is run on when a call accepted ``ids``."""
    return torch.as_tensor(ids).long()


# ---- labels --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Labels:
    """Labels as drawn: none (the ids are the labels), or ids and -100s with at most one defect."""

    rows: tuple[tuple[int, ...], ...] | None
    poison: tuple[int, int, int] | None = None  # (row, column, label)
    dtype: str = "int64"
    layout: str = "as the ids"

    def value(self):
        if self.rows is None:
            return None
        t = torch.tensor(self.rows, dtype=torch.long)
        if self.poison is not None:
            row, column, label = self.poison
            t[row, column] = label
        t = t.to(getattr(torch, self.dtype))
        return {"as the ids": t, "one token short": t[:, :-1], "python lists": t.tolist()}[self.layout]


@st.composite
def labels_for(draw, batch: int, tokens: int, vocab: int = VOCAB, defective: bool | None = None) -> Labels:
    """No labels, valid labels, or labels with one defect: a third each, or (``defective``) the
    last, or (``defective=False``) either of the first two."""
    kinds = {None: ["the ids", "valid", "defective"], True: ["defective"], False: ["the ids", "valid"]}[defective]
    kind = draw(st.sampled_from(kinds))
    if kind == "the ids":
        return Labels(None)
    rows = draw(rows_of(st.integers(0, vocab - 1) | st.just(IGNORE_INDEX), batch, tokens))
    if kind == "valid":
        return Labels(rows)
    defect = draw(st.sampled_from(["poison", "dtype", "layout"]))
    if defect == "poison":
        return Labels(rows, poison=(draw(st.integers(0, batch - 1)), draw(st.integers(0, tokens - 1)),
                                    draw(st.sampled_from([vocab, 2**40, -1, -vocab]))))
    if defect == "dtype":
        return Labels(rows, dtype=draw(st.sampled_from(["int32", "float64", "bool"])))
    return Labels(rows, layout=draw(st.sampled_from(["one token short", "python lists"])))


def labels_verdict(labels, ids, vocab: int = VOCAB) -> Expect:
    """Labels (``tbptt_backward``, ``oracle.gradients``): an integer tensor shaped as the ids, of
    ids in ``[0, vocab)`` or -100 (ignored). Position i predicts labels[i + 1]: an invalid label in
    the first column is never read, so it may be refused or not."""
    if not isinstance(labels, torch.Tensor) or labels.dtype == torch.bool or labels.is_floating_point():
        return Expect.REFUSE
    if not isinstance(ids, torch.Tensor) or labels.shape != ids.shape or labels.dim() != 2:
        return Expect.REFUSE
    wrong = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= vocab))
    if wrong[:, 1:].any():
        return Expect.REFUSE
    return Expect.EITHER if wrong.any() or labels.dtype != torch.long else Expect.MATCH


REDUCTIONS = st.sampled_from(["mean", "sum"]) | st.sampled_from(["none", None, "MEAN"])


def reduction_verdict(reduction) -> Expect:
    return Expect.MATCH if reduction in ("mean", "sum") else Expect.REFUSE


# ---- head plans ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class PlanSpec:
    """A head plan as drawn: a ``HeadPlan`` constructor and its argument, valid or not."""

    kind: str  # "none", "all", "fraction", "layers", "from_dict"
    argument: object = None

    def build(self) -> sc.HeadPlan:
        constructor = getattr(sc.HeadPlan, self.kind)
        return constructor() if self.kind in ("none", "all") else constructor(self.argument)

    def fits(self, kv_heads: list[int]) -> bool:
        """Whether the plan is well formed and names only layers and KV heads the model has
        (docs/design.md section 1 and plan.py: never remapped)."""
        n, arg = len(kv_heads), self.argument
        if self.kind in ("none", "all"):
            return True
        if self.kind == "fraction":
            return is_number(arg) and 0 <= arg <= 1
        if self.kind == "layers":
            return is_list(arg) and all(is_index(l) and int(l) < n for l in arg)
        if not isinstance(arg, Mapping):
            return False
        return all(
            is_index(l) and int(l) < n and is_list(hs) and all(is_index(h) and int(h) < kv_heads[int(l)] for h in hs)
            for l, hs in arg.items()
        )

    def resolution(self, kv_heads: list[int]) -> dict[int, tuple[int, ...]] | None:
        """The long-range KV heads of every layer, for the plans that name them (not fraction)."""
        if self.kind == "none":
            return {l: () for l in range(len(kv_heads))}
        if self.kind == "all":
            return {l: tuple(range(h)) for l, h in enumerate(kv_heads)}
        if self.kind == "layers":
            named = {int(l) for l in self.argument}
            return {l: tuple(range(h)) if l in named else () for l, h in enumerate(kv_heads)}
        if self.kind == "from_dict":
            named = {int(l): tuple(sorted({int(h) for h in hs})) for l, hs in self.argument.items()}
            return {l: named.get(l, ()) for l in range(len(kv_heads))}
        return None


def is_list(x) -> bool:
    return isinstance(x, Iterable) and not isinstance(x, (str, bytes, Mapping))


NOT_AN_INDEX = st.sampled_from([-1, True, 0.5, 1.0, None, "one"])
NOT_A_FRACTION = st.sampled_from([-0.25, 1.5, math.nan, math.inf, True, False, "0.5", None])


def head_plans(kv_heads: int = 2, layers: int = LAYERS, valid_only: bool = False) -> st.SearchStrategy[PlanSpec]:
    """Plan specs for a model of ``layers`` layers of ``kv_heads`` KV heads; unless ``valid_only``,
    half of them may name a layer or KV head one past the model's, or give a value of the wrong
    kind. Dict keys are all ints or all digit strings (one layer named twice, as 0 and "0", is
    not drawn)."""
    def index(limit: int, bad: bool):
        return st.one_of(st.integers(0, limit), NOT_AN_INDEX) if bad else st.integers(0, limit - 1)

    def spec(bad: bool):
        layer, head = index(layers, bad), index(kv_heads, bad)
        fraction = st.floats(0, 1) | st.integers(0, 1)
        layer_list = st.lists(layer, max_size=3)
        mapping = st.dictionaries(layer, st.lists(head, max_size=3), max_size=3)
        if bad:
            fraction = fraction | NOT_A_FRACTION
            layer_list = layer_list | st.sampled_from([0, "0", None])
            mapping = mapping | st.sampled_from([[0, 1], {0: 1}, {0: "1"}, None])
        else:
            mapping = mapping | mapping.map(lambda m: {str(k): v for k, v in m.items()})
        return st.one_of(
            st.builds(PlanSpec, st.sampled_from(["none", "all"])),
            st.builds(PlanSpec, st.just("fraction"), fraction),
            st.builds(PlanSpec, st.just("layers"), layer_list),
            st.builds(PlanSpec, st.just("from_dict"), mapping),
        )

    return spec(False) if valid_only else st.one_of(spec(False), spec(True))


# ---- programs: a model, a config, a plan, transformed once ---------------------------------------
@dataclass(frozen=True)
class Program:
    """A tiny captured model and a SegmentConfig for it, as drawn."""

    family: str
    segment_len: int
    tail_len: int | None
    sink_tokens: int
    plan: PlanSpec
    tbptt_k: int = 1
    dtype: str = "float32"

    def model_and_graph(self):
        return captured(self.family, dtype=getattr(torch, self.dtype))

    def model(self) -> torch.nn.Module:
        return self.model_and_graph()[0]

    def kv_heads(self) -> list[int]:
        config = self.model().config
        return [getattr(config, "num_key_value_heads", None) or config.num_attention_heads] * config.num_hidden_layers

    def fits(self) -> bool:
        return self.plan.fits(self.kv_heads())

    def config(self) -> sc.SegmentConfig:
        return sc.SegmentConfig(self.segment_len, tail_len=self.tail_len, sink_tokens=self.sink_tokens,
                                long_range=self.plan.build(), tbptt_k=self.tbptt_k)

    def transform(self) -> sc.SegmentedModel:
        """A fresh transform (``program`` keeps one per spec)."""
        return sc.transform(self.model_and_graph()[1], self.config())

    def forward_signature(self) -> tuple:
        """What the forward depends on: the model, S, T, G and the resolved plan (not K, not the dtype)."""
        cfg = self.config()
        return self.family, cfg.segment_len, cfg.tail_len, cfg.sink_tokens, str(cfg.long_range.resolve(self.kv_heads()))


# Transforms by the spec's repr (a plan's argument may be a dict or a list: not hashable)
PROGRAMS: dict[str, sc.SegmentedModel] = {}


def program(spec: Program) -> sc.SegmentedModel:
    """The spec's program, transformed once: transform is the slow step."""
    key = repr(spec)
    if key not in PROGRAMS:
        PROGRAMS[key] = spec.transform()
    return PROGRAMS[key]


@st.composite
def programs(draw, families=FAMILIES, dtypes=("float32",), max_segment: int = 5, tbptt=(1, 1),
             valid_plans: bool = True) -> Program:
    family = draw(st.sampled_from(families))
    S = draw(st.integers(1, max_segment))
    T = draw(st.one_of(st.none(), st.integers(0, S)))
    kv = 4 if family == "gpt2" else 2
    return Program(
        family, S, T, draw(st.integers(0, 3)), draw(head_plans(kv, valid_only=valid_plans)),
        tbptt_k=draw(st.integers(*tbptt)), dtype=draw(st.sampled_from(dtypes)),
    )


def logits(output) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output


# ---- SegmentConfig and HeadPlan alone --------------------------------------------------------------
ANY_SIZE = st.one_of(st.integers(-3, 9), st.sampled_from([True, False, 2.0, 0.5, math.nan, "4", None]))
ANY_LONG_RANGE = st.one_of(st.just(sc.HeadPlan.fraction(0.25)), st.sampled_from([0.25, "all", None]))


@settings(PROPERTIES, max_examples=300)
@given(S=ANY_SIZE, T=ANY_SIZE, G=ANY_SIZE, K=ANY_SIZE, long_range=ANY_LONG_RANGE)
def test_segment_config_takes_valid_sizes_and_refuses_the_rest(S, T, G, K, long_range):
    valid = (is_int(S) and S > 0 and (T is None or (is_int(T) and 0 <= T <= S)) and is_int(G) and G >= 0
             and is_int(K) and K >= 0 and isinstance(long_range, sc.HeadPlan))
    expect = Expect.MATCH if valid else Expect.REFUSE
    cfg = attempt(lambda: sc.SegmentConfig(S, tail_len=T, sink_tokens=G, long_range=long_range, tbptt_k=K))
    assert allowed(expect, cfg), why(cfg, "SegmentConfig")
    if not refused(cfg):
        assert (cfg.segment_len, cfg.tail_len, cfg.sink_tokens, cfg.tbptt_k) == (S, S if T is None else T, G, K)


@settings(PROPERTIES, max_examples=300)
@given(kv_heads=st.lists(st.integers(1, 4), min_size=1, max_size=4), data=st.data())
def test_head_plan_resolves_to_what_it_names_or_refuses(kv_heads, data):
    spec = data.draw(head_plans(max(kv_heads), len(kv_heads)), label="plan")
    expect = Expect.MATCH if spec.fits(kv_heads) else Expect.REFUSE
    resolved = attempt(lambda: spec.build().resolve(kv_heads))
    assert allowed(expect, resolved), why(resolved, f"{spec} resolved on {kv_heads}")
    if refused(resolved):
        return
    assert sorted(resolved) == list(range(len(kv_heads)))
    want = spec.resolution(kv_heads)
    if want is not None:
        assert resolved == want
    else:
        check_fraction_dealt(spec.argument, kv_heads, resolved)
    # what a plan file holds resolves the same
    assert sc.HeadPlan.from_json_dict(spec.build().to_json_dict()).resolve(kv_heads) == resolved


def check_fraction_dealt(f: float, kv_heads: list[int], resolved: dict[int, tuple[int, ...]]) -> None:
    """``fraction(f)`` (HeadPlan.fraction's docstring): round(f * total) heads, at least one when
    f > 0, dealt round-robin over layers, lowest KV-head index first."""
    want = max(round(f * sum(kv_heads)), 1 if f > 0 else 0)
    counts = [len(resolved[l]) for l in range(len(kv_heads))]
    assert sum(counts) == want, (f, kv_heads, resolved)
    assert all(resolved[l] == tuple(range(c)) for l, c in enumerate(counts)), resolved
    for ca in counts:  # round-robin: at most one more than any layer that still has room
        assert all(ca <= cb + 1 or cb == kv_heads[b] for b, cb in enumerate(counts)), resolved


# ---- transform ------------------------------------------------------------------------------------
NOT_A_CONFIG = st.sampled_from([8, 8.0, "8", {"segment_len": 8}, sc.HeadPlan.all()])
IMPLEMENTATIONS = st.sampled_from(["auto", "reference"]) | st.sampled_from(["bogus", "", None, "Reference", 1])


@settings(PROPERTIES, max_examples=40)
@given(spec=programs(valid_plans=False), given_config=st.sampled_from(["drawn", "default (None)", "not a config"]),
       not_a_config=NOT_A_CONFIG, implementation=IMPLEMENTATIONS)
def test_transform_takes_a_config_that_fits_or_refuses(spec, given_config, not_a_config, implementation):
    model, graph = spec.model_and_graph()
    fits = spec.fits() if given_config == "drawn" else given_config == "default (None)"
    expect = Expect.MATCH if fits and implementation in ("auto", "reference") else Expect.REFUSE

    def make():
        configs = {"drawn": spec.config, "default (None)": lambda: None, "not a config": lambda: not_a_config}
        return sc.transform(graph, configs[given_config](), implementation=implementation)

    seg = attempt(make)
    assert allowed(expect, seg), why(seg, "transform")
    if refused(seg):
        return
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2]])
    with torch.no_grad():
        assert_close(logits(seg(ids)), sc.oracle.forward(model, seg.cfg, ids), torch.float32, what="seg(ids)")


# ---- the oracle: public API too, it refuses what the programs refuse -------------------------------
@settings(PROPERTIES, max_examples=80)
@given(spec=programs(), data=st.data())
def test_oracle_answers_valid_input_and_refuses_the_rest(spec, data):
    model, cfg = spec.model(), spec.config()
    batch = data.draw(st.integers(1, 2), label="batch")
    n = data.draw(st.integers(1, 3 * spec.segment_len + 1), label="tokens")
    ids = data.draw(token_ids(batch, n), label="ids").value()
    expect = ids_verdict(ids)
    got = attempt(lambda: sc.oracle.forward(model, cfg, ids))
    assert allowed(expect, got), why(got, "oracle.forward")
    if not refused(got) and expect is Expect.EITHER and as_long(ids).numel():
        assert_close(got, sc.oracle.forward(model, cfg, as_long(ids)), torch.float32, what="oracle.forward")
    labels = data.draw(labels_for(batch, n), label="labels").value()
    reduction = data.draw(REDUCTIONS, label="reduction")
    labels = ids if labels is None else labels
    expect = worst(expect, labels_verdict(labels, ids), reduction_verdict(reduction))
    grads = attempt(lambda: sc.oracle.gradients(model, cfg, ids, labels, reduction=reduction))
    assert allowed(expect, grads), why(grads, "oracle.gradients")


# ---- the forward ----------------------------------------------------------------------------------
@settings(PROPERTIES, max_examples=100)
@given(spec=programs(valid_plans=False), data=st.data())
def test_forward_equals_the_oracle_or_refuses(spec, data):
    seg = attempt(lambda: program(spec))
    assert allowed(Expect.MATCH if spec.fits() else Expect.REFUSE, seg), why(seg, "transform")
    if refused(seg):
        return
    n = data.draw(st.integers(1, 3 * spec.segment_len + 1), label="tokens")
    ids = data.draw(token_ids(data.draw(st.integers(1, 2), label="batch"), n), label="ids").value()
    with torch.no_grad():
        got = attempt(lambda: seg(ids))
        assert allowed(ids_verdict(ids), got), why(got, "seg(ids)")
        if not refused(got):
            want = sc.oracle.forward(spec.model(), seg.cfg, as_long(ids))
            assert_close(logits(got), want, torch.float32, what="seg(ids)")


# ---- prefill and decode ---------------------------------------------------------------------------
@dataclass
class Stream:
    """A sequence fed piece by piece, each answer checked against the oracle's logits."""

    seg: sc.SegmentedModel
    ids: torch.Tensor  # [B, n], valid
    want: torch.Tensor  # the oracle's logits [B, n, V]
    state: object = None
    done: int = 0
    steps: list[str] = field(default_factory=list)

    def feed(self, size: int, how: str, given: Ids, replay: bool) -> None:
        """Feed the next ``size`` tokens with ``how`` ("decode", or "prefill" from the state) as
        ``given`` presents them; after a refusal, feed the valid tokens instead (a refused call
        must leave the state usable). ``replay``: feed them twice from the same state."""
        self.steps.append(f"{how} {size}")
        batch = None if self.state is None else self.ids.shape[0]  # a first prefill takes any batch
        state = self.state
        result = attempt(lambda: self.run(state, given.value(), how))
        expect = ids_verdict(given.value(), batch=batch)
        assert allowed(expect, result), why(result, f"{how} of {given} after {self.done} tokens")
        if refused(result):
            result = self.run(state, given.valid().value(), how)
        if replay:  # the first call must not have changed the state it started from
            self.check(self.run(state, given.valid().value(), how), size, f"{how} again from the same state")
        self.check(result, size, how)
        self.state = result[1]
        self.done += size

    def run(self, state, ids, how: str):
        with torch.no_grad():
            if how == "decode":
                return self.seg.decode(state, ids)
            return None, self.seg.prefill(ids, state=state)

    def check(self, result, size: int, what: str) -> None:
        got, state = result
        end = self.done + size
        where = f"{what}, tokens {self.done}..{end - 1} (steps: {', '.join(self.steps)})"
        if got is not None:
            assert_close(got, self.want[:, self.done : end], torch.float32, what=where)
        assert state.position == end, where
        assert_close(state.logits, self.want[:, end - 1], torch.float32, what=f"state.logits after {where}")


def piece_of(drawn: Ids, tokens: torch.Tensor) -> Ids:
    """``drawn``'s defect on the sequence's own ``tokens`` (those the oracle ran on)."""
    return Ids(tuple(map(tuple, tokens.tolist())), drawn.poison, drawn.dtype, drawn.layout)


@settings(PROPERTIES, max_examples=80)
@given(spec=programs(), data=st.data())
def test_prefill_then_decode_equals_the_oracle(spec, data):
    seg, S = program(spec), spec.segment_len
    batch = data.draw(st.integers(1, 2), label="batch")
    n = data.draw(st.integers(2, 3 * S + 1), label="tokens")
    full = data.draw(valid_token_ids(batch, n), label="sequence").value()
    stream = Stream(seg, full, sc.oracle.forward(spec.model(), seg.cfg, full))
    prompt = data.draw(st.integers(1, n - 1), label="prompt")
    # the sequence's batch: a first prefill of another batch is valid, but not this sequence's
    layouts = [l for l in LAYOUTS if l not in BATCH_CHANGING]
    stream.feed(prompt, "prefill", piece_of(data.draw(token_ids(batch, prompt, layouts=layouts), label="prompt ids"),
                                            full[:, :prompt]), replay=False)
    by_token = data.draw(st.booleans(), label="token by token")
    replay = data.draw(st.booleans(), label="every piece twice from the same state")
    while stream.done < n:
        size = 1 if by_token else data.draw(st.integers(1, min(2 * S, n - stream.done)), label="piece")
        how = data.draw(st.sampled_from(["decode", "prefill"]), label="how")
        piece = data.draw(token_ids(batch, size), label="piece ids")
        stream.feed(size, how, piece_of(piece, full[:, stream.done : stream.done + size]), replay)


CHANGES = ["nothing", "transformed again", "family", "segment_len", "tail_len", "sink_tokens", "plan", "tbptt_k",
           "dtype"]


@st.composite
def changed(draw, first: Program, change: str) -> Program | str:
    """``first`` with ``change`` made: another value of one field (a plan may still resolve alike)."""
    if change in ("nothing", "transformed again"):
        return change
    S = first.segment_len
    if change == "family":
        family = "gpt2" if first.family == "llama" else "llama"
        return replace(first, family=family, plan=draw(head_plans(4 if family == "gpt2" else 2, valid_only=True)))
    old = S if change == "tail_len" and first.tail_len is None else getattr(first, change)
    value = {
        "segment_len": st.integers(1, 6),
        "tail_len": st.integers(0, S),
        "sink_tokens": st.integers(0, 3),
        "plan": head_plans(4 if first.family == "gpt2" else 2, valid_only=True),
        "tbptt_k": st.integers(0, 2),
        "dtype": st.sampled_from(["float32", "float64"]),
    }[change]
    second = replace(first, **{change: draw(value.filter(lambda v: v != old))})
    if change == "segment_len" and second.tail_len is not None:
        second = replace(second, tail_len=min(second.tail_len, second.segment_len))
    return second


@settings(PROPERTIES, max_examples=80)
@given(first=programs(dtypes=("float32", "float64"), tbptt=(0, 2)), data=st.data())
def test_a_state_continues_only_in_its_own_program(first, data):
    """A state from another program (model, S, T, G or plan) is refused; one from an equal program
    (another K, dtype or transform of the same config) is refused or continued exactly."""
    second = data.draw(st.sampled_from(CHANGES).flatmap(lambda change: changed(first, change)), label="continued by")
    n = data.draw(st.integers(2, 3 * first.segment_len + 1), label="tokens")
    ids = data.draw(valid_token_ids(1, n), label="ids").value()
    prompt = data.draw(st.integers(1, n - 1), label="prompt")
    how = data.draw(st.sampled_from(["decode", "prefill"]), label="how")
    with torch.no_grad():
        state = program(first).prefill(ids[:, :prompt])
    seg, model, expect = continuation(first, second)
    stream = Stream(seg, ids, sc.oracle.forward(model, seg.cfg, ids), state, prompt)
    result = attempt(lambda: stream.run(state, ids[:, prompt:], how))
    assert allowed(expect, result), why(result, f"{how} by {second}")
    if not refused(result):
        stream.check(result, n - prompt, f"{how} by {second}")


def continuation(first: Program, second: Program | str) -> tuple[sc.SegmentedModel, torch.nn.Module, Expect]:
    """The program that continues a state ``first``'s program made, its model, and what it may do."""
    if second == "nothing":
        return program(first), first.model(), Expect.MATCH
    if second == "transformed again":
        return first.transform(), first.model(), Expect.EITHER
    equal = first.forward_signature() == second.forward_signature()
    return program(second), second.model(), Expect.EITHER if equal else Expect.REFUSE


NOT_A_STATE = {"None": None, "a string": "state", "token ids": torch.zeros(1, 1, dtype=torch.long)}


@settings(PROPERTIES, max_examples=10)
@given(spec=programs(), given=st.sampled_from([*NOT_A_STATE, "the state's layers"]),
       how=st.sampled_from(["decode", "prefill"]))
def test_what_is_not_a_state_is_refused(spec, given, how):
    seg, ids = program(spec), torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        state = seg.prefill(ids[:, :2])
        not_a_state = state.layers if given == "the state's layers" else NOT_A_STATE[given]
        if how == "decode":
            result = attempt(lambda: seg.decode(not_a_state, ids[:, 2:]))
        elif not_a_state is not None:  # prefill(state=None) starts afresh
            result = attempt(lambda: seg.prefill(ids[:, 2:], state=not_a_state))
        else:
            return
    assert refused(result), why(result, f"{how} from {given}")


# ---- generate -------------------------------------------------------------------------------------
NOT_A_COUNT = st.sampled_from([-1, 1.5, True, "3", None])


@settings(PROPERTIES, max_examples=40)
@given(spec=programs(), data=st.data())
def test_greedy_generate_continues_with_the_oracle_argmax(spec, data):
    seg, S = program(spec), spec.segment_len
    batch = data.draw(st.integers(1, 2), label="batch")
    prompt = data.draw(token_ids(batch, data.draw(st.integers(1, 2 * S + 1), label="prompt length")),
                       label="prompt").value()
    new = data.draw(st.one_of(st.integers(0, 2 * S + 1), NOT_A_COUNT), label="max_new_tokens")
    expect = worst(ids_verdict(prompt, lists=True), Expect.MATCH if is_int(new) and new >= 0 else Expect.REFUSE)
    out = attempt(lambda: seg.generate(prompt, max_new_tokens=new))
    assert allowed(expect, out), why(out, "generate")
    if refused(out):
        return
    prompt = as_long(prompt)
    assert out.shape == (prompt.shape[0], prompt.shape[1] + new) and torch.equal(out[:, : prompt.shape[1]], prompt)
    if new == 0 or prompt.shape[0] == 0:
        return
    want = sc.oracle.forward(spec.model(), seg.cfg, out[:, :-1])[:, prompt.shape[1] - 1 :]
    chosen = want.gather(-1, out[:, prompt.shape[1] :, None])[..., 0]
    # each token is the argmax of logits within the fp32 row of the oracle's: a near tie may go either way
    shortfall = (want.max(dim=-1).values - chosen).max().item()
    assert shortfall <= 2 * FP32.logits, f"generated {out.tolist()}: a token {shortfall:.3g} below the oracle's argmax"


# ---- tbptt_backward -------------------------------------------------------------------------------
def assert_gradients_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    """Every parameter's gradient within the fp64 row's relative error. A gradient that is zero
    by symmetry (the queries', with one token) is compared at a millionth of the largest gradient:
    rounding leaves ~1e-18 there, which no relative measure of zero can pass."""
    floor = 1e-6 * max(g.abs().max().item() for g in want.values())
    for name, g in want.items():
        scale = max(g.abs().max().item(), floor, 1e-300)
        error = (got[name] - g).abs().max().item() / scale
        assert error <= FP64.relative, f"gradient of {name}: relative error {error:.3g} > {FP64.relative:g}"


@settings(PROPERTIES, max_examples=30)
@given(spec=programs(families=("llama",), dtypes=("float64",), max_segment=4, tbptt=(0, 3)), data=st.data())
def test_tbptt_backward_equals_the_oracle_gradients_or_refuses(spec, data):
    seg, model = program(spec), spec.model()
    batch = data.draw(st.integers(1, 2), label="batch")
    n = data.draw(st.integers(1, 3 * spec.segment_len), label="tokens")
    # half the draws valid, the others with one defect: in the ids, the labels or the reduction
    defect = data.draw(st.none() | st.sampled_from(["ids", "labels", "reduction"]), label="defect")
    ids = data.draw(token_ids(batch, n) if defect == "ids" else valid_token_ids(batch, n), label="ids").value()
    labels = data.draw(labels_for(batch, n, defective=defect == "labels"), label="labels").value()
    reduction = data.draw(REDUCTIONS if defect == "reduction" else st.sampled_from(["mean", "sum"]), label="reduction")
    labelled = ids if labels is None else labels  # labels default to the ids
    expect = worst(ids_verdict(ids), labels_verdict(labelled, ids), reduction_verdict(reduction))
    model.zero_grad(set_to_none=True)
    loss = attempt(lambda: seg.tbptt_backward(ids, labels, reduction=reduction))
    assert allowed(expect, loss), why(loss, "tbptt_backward")
    got = {name: p.grad if p.grad is not None else torch.zeros_like(p) for name, p in model.named_parameters()}
    touched = [name for name, p in model.named_parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    if refused(loss):
        # checked before the first segment's backward: a refused step leaves no partial gradient behind
        assert not touched, f"a refused tbptt_backward left gradients in .grad: {touched[:3]}..."
        return
    want_loss, want = sc.oracle.gradients(model, seg.cfg, as_long(ids), as_long(labelled), reduction=reduction)
    assert_close(torch.as_tensor(float(loss)), torch.as_tensor(float(want_loss)), torch.float64, "relative",
                 what="loss")
    assert_gradients_close(got, want)
