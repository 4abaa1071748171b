"""The oracle against hand-worked cases (docs/design.md section 1).

The oracle judges the compiler, so it is judged here only against values worked out by hand
from the table of docs/design.md section 1: literal 0/1 masks, means of literal key sets, closed-form softmax
derivatives, and (invariant 1, ``S >= N``) the plain model's own loss and ``backward``.
Nothing here compares the oracle with other code of the package.

Tolerances: fp64 everywhere numerics matter; ``FP64_ATOL = 1e-12`` absolute.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from segcompile import HeadPlan, SegcompileError, SegmentConfig, oracle
from segcompile.testing.tolerances import tolerance

FP64_ATOL = tolerance(torch.float64).logits
DT = torch.float64


def _mask(rows: list[str]) -> torch.Tensor:
    """``["1000", "1100"]`` -> bool matrix; row i is query i, column j is key j."""
    return torch.tensor([[c == "1" for c in row.replace(" ", "")] for row in rows], dtype=torch.bool)


def _assert_mask(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == torch.bool
    assert got.shape == want.shape, (got.shape, want.shape)
    bad = (got != want).nonzero().tolist()
    assert not bad, f"(query, key) pairs that differ: {bad}\ngot:\n{got.int()}\nwant:\n{want.int()}"


def _assert_close(got: torch.Tensor, want: torch.Tensor, atol: float = FP64_ATOL, what: str = "") -> None:
    assert got.shape == want.shape, (what, got.shape, want.shape)
    diff = (got.to(DT) - want.to(DT)).abs()
    bad = (diff > atol).nonzero().tolist()
    assert not bad, f"{what}: indices off by more than {atol}: {bad}\ngot:\n{got}\nwant:\n{want}"


# ---- 1. visibility ------------------------------------------------------------------------
# Each matrix is derived by hand from the table of docs/design.md section 1; segment boundaries are marked by spaces.
LOWER_8 = _mask([
    "100 000 00",
    "110 000 00",
    "111 000 00",
    "111 100 00",
    "111 110 00",
    "111 111 00",
    "111 111 10",
    "111 111 11",
])
LOWER_6 = _mask(["10 00 00", "11 00 00", "11 10 00", "11 11 00", "11 11 10", "11 11 11"])

VISIBILITY_CASES = {
    # N=8, S=3, T=1, G=1. Segment 1 (a=3): tail {2}, sink {0}; segment 2 (a=6): tail {5}, sink {0}.
    "N8_S3_T1_G1": (
        SegmentConfig(3, tail_len=1, sink_tokens=1),
        8,
        _mask([
            "100 000 00",
            "110 000 00",
            "111 000 00",
            "101 100 00",
            "101 110 00",
            "101 111 00",
            "100 001 10",
            "100 001 11",
        ]),
    ),
    # N=6, S=2, T=0, G=0: local heads see their own segment only (block-diagonal causal).
    "N6_S2_T0_G0": (
        SegmentConfig(2, tail_len=0, sink_tokens=0),
        6,
        _mask(["10 00 00", "11 00 00", "00 10 00", "00 11 00", "00 00 10", "00 00 11"]),
    ),
    # N=6, S=2, T=0, G=1: own segment plus the sink, key 0.
    "N6_S2_T0_G1": (
        SegmentConfig(2, tail_len=0, sink_tokens=1),
        6,
        _mask(["10 00 00", "11 00 00", "10 10 00", "10 11 00", "10 00 10", "10 00 11"]),
    ),
    # N=6, S=2, T=S (default), G=0: own segment plus the whole previous segment.
    "N6_S2_TS_G0": (
        SegmentConfig(2),
        6,
        _mask(["10 00 00", "11 00 00", "11 10 00", "11 11 00", "00 11 10", "00 11 11"]),
    ),
    # N=8, S=3, T=1, G=4: G > a-T. Segment 1 (a-T=2): sinks {0,1} then tail {2}, i.e. all of
    # segment 0 (sinks never reach into the tail or past it). Segment 2 (a-T=5): sinks {0,1,2,3},
    # key 4 is history (hidden), tail {5}.
    "N8_S3_T1_G4": (
        SegmentConfig(3, tail_len=1, sink_tokens=4),
        8,
        _mask([
            "100 000 00",
            "110 000 00",
            "111 000 00",
            "111 100 00",
            "111 110 00",
            "111 111 00",
            "111 101 10",
            "111 101 11",
        ]),
    ),
    # N=6, S=2, T=1, G=5: G exceeds a-T and even i; sinks stop at a-T, so no query sees a
    # future key. Segment 1: sink {0}, tail {1}; segment 2: sinks {0,1,2}, tail {3}: causal.
    "N6_S2_T1_G5": (
        SegmentConfig(2, tail_len=1, sink_tokens=5),
        6,
        LOWER_6,
    ),
    # N < S: one segment, plain causal attention for every head.
    "N4_S8": (
        SegmentConfig(8, sink_tokens=2),
        4,
        _mask(["1000", "1100", "1110", "1111"]),
    ),
}

# Long-range heads: current + tail + history = every j <= i, whatever S, T, G.
LONG_RANGE_CASES = {
    "N8_S3_T1_G1": (SegmentConfig(3, tail_len=1, sink_tokens=1), 8, LOWER_8),
    "N6_S2_T0_G0": (SegmentConfig(2, tail_len=0, sink_tokens=0), 6, LOWER_6),
    "N6_S2_TS_G0": (SegmentConfig(2), 6, LOWER_6),
    "N8_S3_T1_G4": (SegmentConfig(3, tail_len=1, sink_tokens=4), 8, LOWER_8),
    "N4_S8": (SegmentConfig(8, sink_tokens=2), 4, _mask(["1000", "1100", "1110", "1111"])),
}


@pytest.mark.parametrize("case", list(VISIBILITY_CASES))
def test_visibility_local_head(case):
    cfg, n, want = VISIBILITY_CASES[case]
    _assert_mask(oracle.visibility(cfg, n, long_range=False), want)


@pytest.mark.parametrize("case", list(LONG_RANGE_CASES))
def test_visibility_long_range_head(case):
    cfg, n, want = LONG_RANGE_CASES[case]
    _assert_mask(oracle.visibility(cfg, n, long_range=True), want)


# ---- 2. live keys -------------------------------------------------------------------------
LIVE_CASES = {
    # N=6, S=2, T=2, loss on segment 2.
    # K=0: the tail is a constant too, only current-segment pairs carry gradient.
    ("T2", 0, 2): (SegmentConfig(2, tbptt_k=0), 6,
                   _mask(["10 00 00", "11 00 00", "00 10 00", "00 11 00", "00 00 10", "00 00 11"])),
    # K=1: segment 2's tail (segment 1) is live; segment 1's tail (segment 0) is not.
    ("T2", 1, 2): (SegmentConfig(2, tbptt_k=1), 6,
                   _mask(["10 00 00", "11 00 00", "00 10 00", "00 11 00", "00 11 10", "00 11 11"])),
    # K=2: both tails are live.
    ("T2", 2, 2): (SegmentConfig(2, tbptt_k=2), 6,
                   _mask(["10 00 00", "11 00 00", "11 10 00", "11 11 00", "00 11 10", "00 11 11"])),
    # K=1, loss on segment 1: segment 1's tail is segment 0 >= 1-1, live (segment 2 lies past
    # the loss, its row is what the definition gives, the prefix run never uses it).
    ("T2", 1, 1): (SegmentConfig(2, tbptt_k=1), 6,
                   _mask(["10 00 00", "11 00 00", "11 10 00", "11 11 00", "00 11 10", "00 11 11"])),
    # N=6, S=2, T=1, K=1, loss on segment 2: only key 3 (segment 2's tail) is live outside the
    # current segments; key 1 (segment 1's tail, in segment 0) is not.
    ("T1", 1, 2): (SegmentConfig(2, tail_len=1, tbptt_k=1), 6,
                   _mask(["10 00 00", "11 00 00", "00 10 00", "00 11 00", "00 01 10", "00 01 11"])),
    # Same with K=2: key 1 becomes live for segment 1's queries.
    ("T1", 2, 2): (SegmentConfig(2, tail_len=1, tbptt_k=2), 6,
                   _mask(["10 00 00", "11 00 00", "01 10 00", "01 11 00", "00 01 10", "00 01 11"])),
}


@pytest.mark.parametrize("case", list(LIVE_CASES), ids=lambda c: f"{c[0]}_K{c[1]}_loss{c[2]}")
def test_live_keys(case):
    cfg, n, want = LIVE_CASES[case]
    _assert_mask(oracle.live_keys(cfg, n, loss_segment=case[2]), want)


def test_live_keys_never_include_history_or_sinks():
    # N=8, S=3, T=1, G=1, K=5 (more than the segments): for loss segment 2 every tail is live,
    # but sink 0 and history keys {0, 1} (for segment 1) / {0..4} (for segment 2) never are.
    cfg = SegmentConfig(3, tail_len=1, sink_tokens=1, tbptt_k=5)
    want = _mask([
        "100 000 00",
        "110 000 00",
        "111 000 00",
        "001 100 00",
        "001 110 00",
        "001 111 00",
        "000 001 10",
        "000 001 11",
    ])
    _assert_mask(oracle.live_keys(cfg, 8, loss_segment=2), want)


# ---- 3. forward numerics on a hand-checkable attention layer ------------------------------
class UniformAttention(nn.Module):
    """One attention layer, H=4 query heads, Hkv=2 KV heads, D=2, q = 0.

    With q = 0 every score is 0, so each query averages the values of exactly the keys it
    sees. The value of KV head g at position j is ``[j + 10 g, j * j]``. The "logits" are the
    attention output laid out ``[B, N, H * D]`` (head-major).
    """

    def __init__(self, repeat_kv: bool):
        super().__init__()
        self.config = SimpleNamespace(num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
        self.repeat_kv = repeat_kv
        self.calls = 0

    def forward(self, input_ids):
        B, n = input_ids.shape
        j = torch.arange(n, dtype=DT)
        v = torch.stack([torch.stack([j + 10 * g, j * j], dim=-1) for g in range(2)])  # [2, n, 2]
        v = v.expand(B, 2, n, 2)
        k = torch.randn(B, 2, n, 2, dtype=DT, generator=torch.Generator().manual_seed(0))
        q = torch.zeros(B, 4, n, 2, dtype=DT)
        self.calls += 1
        if self.repeat_kv:  # HF-style: K/V already repeated to all query heads
            k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, None, 0.0, True, enable_gqa=True)
        return out.transpose(1, 2).reshape(B, n, 8)


def _expected_uniform(key_sets_by_kv_head: list[list[set[int]]], batch: int) -> torch.Tensor:
    """Output of ``UniformAttention`` given, per KV head, the literal key set of each query."""
    n = len(key_sets_by_kv_head[0])
    out = torch.zeros(batch, n, 4, 2, dtype=DT)
    for h in range(4):
        g = h // 2
        for i, keys in enumerate(key_sets_by_kv_head[g]):
            out[:, i, h, 0] = sum(j + 10 * g for j in keys) / len(keys)
            out[:, i, h, 1] = sum(j * j for j in keys) / len(keys)
    return out.reshape(batch, n, 8)


CAUSAL_6 = [{0}, {0, 1}, {0, 1, 2}, {0, 1, 2, 3}, {0, 1, 2, 3, 4}, {0, 1, 2, 3, 4, 5}]

FORWARD_CASES = {
    # N=6, S=2, T=1, G=0: local queries see {tail key a-1} + own segment prefix.
    "T1_G0": (SegmentConfig(2, tail_len=1, long_range=HeadPlan.from_dict({0: [1]})),
              [{0}, {0, 1}, {1, 2}, {1, 2, 3}, {3, 4}, {3, 4, 5}]),
    # N=6, S=2, T=1, G=1: plus the sink, key 0.
    "T1_G1": (SegmentConfig(2, tail_len=1, sink_tokens=1, long_range=HeadPlan.from_dict({0: [1]})),
              [{0}, {0, 1}, {0, 1, 2}, {0, 1, 2, 3}, {0, 3, 4}, {0, 3, 4, 5}]),
    # N=6, S=2, T=0, G=1: own segment plus the sink.
    "T0_G1": (SegmentConfig(2, tail_len=0, sink_tokens=1, long_range=HeadPlan.from_dict({0: [1]})),
              [{0}, {0, 1}, {0, 2}, {0, 2, 3}, {0, 4}, {0, 4, 5}]),
}


@pytest.mark.parametrize("repeat_kv", [False, True], ids=["gqa_unrepeated", "kv_prerepeated"])
@pytest.mark.parametrize("case", list(FORWARD_CASES))
def test_forward_local_and_long_range_heads(case, repeat_kv):
    cfg, local_keys = FORWARD_CASES[case]
    model = UniformAttention(repeat_kv)
    ids = torch.zeros(2, 6, dtype=torch.long)
    got = oracle.forward(model, cfg, ids)
    # KV head 0 (query heads 0, 1) is local, KV head 1 (query heads 2, 3) long-range (causal).
    want = _expected_uniform([local_keys, CAUSAL_6], batch=2)
    _assert_close(got, want, what=case)
    assert model.calls == 1


def test_forward_literal_values():
    # The same case as "T1_G0" with the numbers written out: v[.., 0] = j (KV head 0, local)
    # and j + 10 (KV head 1, long-range).
    cfg = SegmentConfig(2, tail_len=1, long_range=HeadPlan.from_dict({0: [1]}))
    got = oracle.forward(UniformAttention(repeat_kv=False), cfg, torch.zeros(1, 6, dtype=torch.long))
    got = got.reshape(1, 6, 4, 2)
    local_mean = torch.tensor([0.0, 0.5, 1.5, 2.0, 3.5, 4.0], dtype=DT)  # {0},{0,1},{1,2},{1,2,3},{3,4},{3,4,5}
    local_sq = torch.tensor([0.0, 0.5, 2.5, 14 / 3, 12.5, 50 / 3], dtype=DT)  # means of j*j
    long_mean = torch.tensor([10.0, 10.5, 11.0, 11.5, 12.0, 12.5], dtype=DT)
    for h in (0, 1):
        _assert_close(got[0, :, h, 0], local_mean, what=f"head {h} value 0")
        _assert_close(got[0, :, h, 1], local_sq, what=f"head {h} value 1")
    for h in (2, 3):
        _assert_close(got[0, :, h, 0], long_mean, what=f"head {h} value 0")


def test_forward_plain_model_is_causal():
    # Sanity of the test model itself, without the oracle: every head is plain causal.
    model = UniformAttention(repeat_kv=False)
    got = model(torch.zeros(1, 6, dtype=torch.long))
    _assert_close(got, _expected_uniform([CAUSAL_6, CAUSAL_6], batch=1), what="plain model")


class MaskedUniformAttention(UniformAttention):
    """``UniformAttention`` passing an explicit causal + padding mask (key 1 is padding) the way
    HF's SDPA path does: ``attn_mask`` given, ``is_causal=False``; bool or additive float."""

    def __init__(self, float_mask: bool):
        super().__init__(repeat_kv=True)
        self.float_mask = float_mask

    def forward(self, input_ids):
        B, n = input_ids.shape
        j = torch.arange(n, dtype=DT)
        v = torch.stack([torch.stack([j + 10 * g, j * j], dim=-1) for g in range(2)]).expand(B, 2, n, 2)
        v = v.repeat_interleave(2, dim=1)
        k = torch.ones(B, 4, n, 2, dtype=DT)
        q = torch.zeros(B, 4, n, 2, dtype=DT)
        keep = torch.ones(n, n, dtype=torch.bool).tril() & (torch.arange(n) != 1)[None, :]
        mask = keep[None, None].expand(B, 1, n, n)
        if self.float_mask:
            mask = torch.zeros(B, 1, n, n, dtype=DT).masked_fill(~mask, torch.finfo(DT).min)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=False)
        return out.transpose(1, 2).reshape(B, n, 8)


@pytest.mark.parametrize("float_mask", [False, True], ids=["bool_mask", "float_mask"])
def test_forward_explicit_padding_mask_intersects_visibility(float_mask):
    # N=6, S=2, T=1, G=0, KV head 1 long-range; key 1 is padding, removed from every set.
    cfg = SegmentConfig(2, tail_len=1, long_range=HeadPlan.from_dict({0: [1]}))
    local = [{0}, {0}, {2}, {2, 3}, {3, 4}, {3, 4, 5}]
    long = [{0}, {0}, {0, 2}, {0, 2, 3}, {0, 2, 3, 4}, {0, 2, 3, 4, 5}]
    got = oracle.forward(MaskedUniformAttention(float_mask), cfg, torch.zeros(1, 6, dtype=torch.long))
    _assert_close(got, _expected_uniform([local, long], batch=1))


class TwoCallUniformAttention(nn.Module):
    """Two SDPA calls (layers 0 and 1) on the same fixed q = 0, k, v (H=Hkv=2, D=1, v_j = j);
    returns both outputs side by side: ``[B, N, layer * 2 + head]``."""

    config = SimpleNamespace(num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2)

    def forward(self, input_ids):
        B, n = input_ids.shape
        v = torch.arange(n, dtype=DT).view(1, 1, n, 1).expand(B, 2, n, 1)
        q = torch.zeros(B, 2, n, 1, dtype=DT)
        outs = [F.scaled_dot_product_attention(q, torch.ones_like(v), v, is_causal=True) for _ in range(2)]
        return torch.cat([o[..., 0].transpose(1, 2) for o in outs], dim=-1)


def test_forward_plan_is_per_layer():
    # Plan {1: [0]}: layer 0 all local; layer 1 KV head 0 long-range, KV head 1 local.
    # N=6, S=2, T=0, G=0: local means {0},{0,1},{2},{2,3},{4},{4,5}; long-range causal means.
    cfg = SegmentConfig(2, tail_len=0, long_range=HeadPlan.from_dict({1: [0]}))
    got = oracle.forward(TwoCallUniformAttention(), cfg, torch.zeros(1, 6, dtype=torch.long))[0]
    local = torch.tensor([0.0, 0.5, 2.0, 2.5, 4.0, 4.5], dtype=DT)
    long = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 2.5], dtype=DT)
    _assert_close(got, torch.stack([local, local, long, local], dim=-1))


# ---- 4. gradient semantics, one layer -----------------------------------------------------
class ScalarAttention(nn.Module):
    """One head, D=1, with q, k, v of every position a parameter of its own.

    The logits of position i are ``[o_i, 0]`` where ``o_i`` is the attention output, so with
    target 0 the loss is ``log(1 + exp(-o_i))`` and every derivative has a closed form.
    """

    def __init__(self, q, k, v, n_kv_heads=1, scale=None):
        super().__init__()
        self.scale = scale
        self.config = SimpleNamespace(num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=n_kv_heads)
        self.q = nn.Parameter(torch.tensor(q, dtype=DT))
        self.k = nn.Parameter(torch.tensor(k, dtype=DT))
        self.v = nn.Parameter(torch.tensor(v, dtype=DT))

    def forward(self, input_ids):
        B, n = input_ids.shape
        q, k, v = (p[:n].view(1, 1, n, 1).expand(B, 1, n, 1) for p in (self.q, self.k, self.v))
        if self.scale is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        o = o[:, 0, :, 0]  # [B, n]
        return torch.stack([o, torch.zeros_like(o)], dim=-1)


Q = [0.3, -0.7, 1.0, 0.4]
K = [2.0, -1.5, 0.5, 0.9]
V = [3.0, 0.25, -1.0, 2.0]
# N=4, S=2: segments {0,1} and {2,3}. Only position 2 has a label (labels[3] = 0), so the loss
# is l_1 = log(1 + exp(-o_2)); segment 0 has no label.
LABELS = torch.tensor([[-100, -100, -100, 0]])


def _hand_grads(keys: list[int], live: set[int], c: float = 1.0):
    """Loss and gradients of ``ScalarAttention`` for query 2 seeing ``keys``, gradient flowing
    into K/V[j] only for j in ``live``; ``c`` is the softmax scale (1 / sqrt(D) = 1 by default).

    s_j = c q k_j, p = softmax(s), o = sum_j p_j v_j, L = log(1 + e^-o), dL/do = -1 / (1 + e^o).
    do/dq = c sum_j p_j (v_j - o) k_j;  do/dk_j = c p_j (v_j - o) q;  do/dv_j = p_j.
    """
    q = Q[2]
    z = sum(math.exp(c * q * K[j]) for j in keys)
    p = {j: math.exp(c * q * K[j]) / z for j in keys}
    o = sum(p[j] * V[j] for j in keys)
    loss = math.log1p(math.exp(-o))
    dl = -1.0 / (1.0 + math.exp(o))
    gq, gk, gv = [0.0] * 4, [0.0] * 4, [0.0] * 4
    gq[2] = dl * c * sum(p[j] * (V[j] - o) * K[j] for j in keys)  # queries: from every visible key
    for j in keys:
        if j in live:
            gk[j] = dl * c * p[j] * (V[j] - o) * q
            gv[j] = dl * p[j]
    return loss, {"q": gq, "k": gk, "v": gv}


# name -> (config, keys seen by query 2, keys live for l_1[, SDPA scale])
GRAD_CASES = {
    # Local head, T=0, G=1: query 2 sees the sink 0 (detached) and itself.
    "local_T0_sink": (SegmentConfig(2, tail_len=0, sink_tokens=1, long_range=HeadPlan.none()), [0, 2], {2}),
    # Local head, T=1, K=1: tail key 1 is live.
    "local_T1_K1": (SegmentConfig(2, tail_len=1, long_range=HeadPlan.none(), tbptt_k=1), [1, 2], {1, 2}),
    # Local head, T=1, K=0: tail key 1 detached (Transformer-XL).
    "local_T1_K0": (SegmentConfig(2, tail_len=1, long_range=HeadPlan.none(), tbptt_k=0), [1, 2], {2}),
    # Long-range head, T=1, K=1: history 0 detached, tail 1 live.
    "long_T1_K1": (SegmentConfig(2, tail_len=1, long_range=HeadPlan.all(), tbptt_k=1), [0, 1, 2], {1, 2}),
    # Long-range head, T=0, K=3: history {0, 1} detached whatever K.
    "long_T0_K3": (SegmentConfig(2, tail_len=0, long_range=HeadPlan.all(), tbptt_k=3), [0, 1, 2], {2}),
    # An explicit scale= reaches the scores: local head, T=1, G=1, K=1, scale 0.5.
    "local_T1_G1_scale": (SegmentConfig(2, tail_len=1, sink_tokens=1, long_range=HeadPlan.none()), [0, 1, 2], {1, 2},
                          0.5),
}


def _check_hand_grads(case: str, atol: float) -> None:
    cfg, keys, live, *scale = GRAD_CASES[case]
    model = ScalarAttention(Q, K, V, scale=scale[0] if scale else None)
    ids = torch.zeros(1, 4, dtype=torch.long)
    want_loss, want = _hand_grads(keys, live, c=scale[0] if scale else 1.0)
    for reduction in ("sum", "mean"):  # one label token: mean == sum
        loss, grads = oracle.gradients(model, cfg, ids, LABELS, reduction=reduction)
        _assert_close(loss.reshape(()), torch.tensor(want_loss, dtype=DT), atol=atol, what=f"{case} loss")
        assert set(grads) == {"q", "k", "v"}
        for name in ("q", "k", "v"):
            _assert_close(grads[name], torch.tensor(want[name], dtype=DT), atol=atol, what=f"{case} grad {name}")
    for name in ("q", "k", "v"):
        assert model.get_parameter(name).grad is None  # the oracle leaves .grad alone


@pytest.mark.parametrize("case", list(GRAD_CASES))
def test_gradients_hand_worked(case):
    cfg, keys, live, *scale = GRAD_CASES[case]
    _check_hand_grads(case, atol=FP64_ATOL)
    # Exact zeros are exact whatever the precision: detached keys and unseen positions.
    model = ScalarAttention(Q, K, V, scale=scale[0] if scale else None)
    _, grads = oracle.gradients(model, cfg, torch.zeros(1, 4, dtype=torch.long), LABELS)
    for j in range(4):
        if j not in live:
            assert grads["k"][j] == 0 and grads["v"][j] == 0, (case, j)
        else:
            assert grads["v"][j].abs() > 1e-3, (case, j)
    assert grads["q"][2].abs() > 1e-3
    assert grads["q"][[0, 1, 3]].eq(0).all()


@pytest.mark.parametrize("case", ["local_T0_sink", "long_T1_K1", "local_T1_G1_scale"])
def test_gradients_hand_worked_fp64(case):
    _check_hand_grads(case, atol=FP64_ATOL)


def test_query_gradient_from_detached_keys_only():
    # Query 2 sees the sink 0 (detached) and itself. With k_2 = 0 the query's gradient
    # dL/dq = dL/do * p_0 (v_0 - o) k_0 comes only through the detached key: an oracle that
    # stopped the query's gradient at detached scores would give 0 here.
    cfg = SegmentConfig(2, tail_len=0, sink_tokens=1, long_range=HeadPlan.none())
    k = list(K)
    k[2] = 0.0
    model = ScalarAttention(Q, k, V)
    _, grads = oracle.gradients(model, cfg, torch.zeros(1, 4, dtype=torch.long), LABELS, reduction="sum")
    q = Q[2]
    p0 = math.exp(q * k[0]) / (math.exp(q * k[0]) + 1.0)
    o = p0 * V[0] + (1 - p0) * V[2]
    want = -1.0 / (1.0 + math.exp(o)) * p0 * (V[0] - o) * k[0]
    assert abs(want) > 0.05
    assert abs(float(grads["q"][2]) - want) < FP64_ATOL
    assert grads["k"][0] == 0 and grads["v"][0] == 0


# ---- 4b. per-position parameters on a random one-layer model ------------------------------
class PerPositionLayer(nn.Module):
    """Random fp64 decoder layer(s) with per-position scales on q, k and v (``qscale[j]`` etc.
    only touch position j's q / k / v) and on the embedding (``escale``).

    H=2 query heads, Hkv=2 KV heads (no GQA), D=3, vocab 5. ``layers`` attention layers with a
    residual stream; the per-position q/k/v scales act in every layer.
    """

    def __init__(self, n: int, layers: int = 1, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.config = SimpleNamespace(num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2)
        d, self.h, self.dh = 6, 2, 3
        self.emb = nn.Parameter(torch.randn(5, d, generator=g, dtype=DT))
        self.wqkv = nn.ParameterList(nn.Parameter(torch.randn(d, 3 * d, generator=g, dtype=DT) / d**0.5) for _ in range(layers))
        self.out = nn.Parameter(torch.randn(d, 5, generator=g, dtype=DT))
        self.escale = nn.Parameter(torch.ones(n, dtype=DT))
        self.qscale = nn.Parameter(torch.ones(n, dtype=DT))
        self.kscale = nn.Parameter(torch.ones(n, dtype=DT))
        self.vscale = nn.Parameter(torch.ones(n, dtype=DT))

    def forward(self, input_ids):
        B, n = input_ids.shape
        x = self.emb[input_ids] * self.escale[:n, None]
        for w in self.wqkv:
            q, k, v = (x @ w).split(x.shape[-1], dim=-1)
            q, k, v = (t.view(B, n, self.h, self.dh).transpose(1, 2) for t in (q, k, v))
            q = q * self.qscale[:n, None]
            k = k * self.kscale[:n, None]
            v = v * self.vscale[:n, None]
            a = F.scaled_dot_product_attention(query=q, key=k, value=v, is_causal=True)
            x = x + a.transpose(1, 2).reshape(B, n, -1)
        return SimpleNamespace(logits=x @ self.out)


def _nonzero(t: torch.Tensor) -> list[int]:
    return [j for j in range(t.shape[0]) if abs(float(t[j])) > 1e-8]


def _zero(t: torch.Tensor) -> list[int]:
    return [j for j in range(t.shape[0]) if float(t[j]) == 0.0]


IDS_8 = torch.tensor([[1, 4, 2, 0, 3, 1, 2, 4]])
# N=8, S=2, T=1, G=1: loss only on segment 2 (positions 4, 5 predict labels[5], labels[6]).
LABELS_SEG2_OF_8 = torch.tensor([[-100, -100, -100, -100, -100, 1, 3, -100]])


@pytest.mark.parametrize("plan", ["none", "all", "mixed"])
@pytest.mark.parametrize("K", [0, 1, 2])
def test_gradients_one_layer_which_positions(K, plan):
    # Query positions 4, 5 (segment 2, a=4): current {4, 5}; tail {3}; sink {0} (local) or
    # history {0, 1, 2} (long-range). Only current keys and, with K >= 1, the tail get K/V
    # gradient; queries of positions 4, 5 always do; the embedding of position j reaches the
    # loss through K/V[j], so escale follows K/V.
    plans = {"none": HeadPlan.none(), "all": HeadPlan.all(), "mixed": HeadPlan.from_dict({0: [1]})}
    cfg = SegmentConfig(2, tail_len=1, sink_tokens=1, long_range=plans[plan], tbptt_k=K)
    model = PerPositionLayer(8)
    _, grads = oracle.gradients(model, cfg, IDS_8, LABELS_SEG2_OF_8)
    live = [3, 4, 5] if K >= 1 else [4, 5]
    dead = [j for j in range(8) if j not in live]
    for name in ("kscale", "vscale", "escale"):
        assert _nonzero(grads[name]) == live, (name, grads[name])
        assert _zero(grads[name]) == dead, (name, grads[name])
    assert _nonzero(grads["qscale"]) == [4, 5]
    assert _zero(grads["qscale"]) == [0, 1, 2, 3, 6, 7]


def _plain_loss(model, ids, labels, reduction):
    """Causal LM loss computed by hand: position i predicts labels[i + 1]."""
    logits = model(ids).logits[:, :-1]
    target = labels[:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100, reduction=reduction)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("S", [8, 11])
@pytest.mark.parametrize("plan", ["none", "all"])
@pytest.mark.parametrize("K", [0, 1])
def test_gradients_one_segment_equal_plain_backward(S, plan, reduction, K):
    # Invariant 1 (S >= N): loss and every gradient equal the plain model's, whatever K, G, T.
    labels = torch.tensor([[-100, 4, 2, -100, 3, 1, 2, 0]])  # 5 label tokens at positions 1..7
    cfg = SegmentConfig(S, tail_len=1, sink_tokens=2, tbptt_k=K,
                        long_range=HeadPlan.all() if plan == "all" else HeadPlan.none())
    model = PerPositionLayer(8, layers=2)
    loss, grads = oracle.gradients(model, cfg, IDS_8, labels, reduction=reduction)
    want = _plain_loss(model, IDS_8, labels, reduction)
    want.backward()
    want = want.detach()
    assert abs(float(loss) - float(want)) < FP64_ATOL
    for name, p in model.named_parameters():
        _assert_close(grads[name], p.grad, what=name)


def test_gradients_mean_divides_by_label_tokens_of_whole_sequence():
    # Two segments, 4 label tokens in all: mean = sum / 4 (HF's causal-LM loss), for the loss
    # and every gradient.
    labels = torch.tensor([[-100, 4, -100, 0, 3, -100, 2, -100]])
    cfg = SegmentConfig(4, tail_len=2, long_range=HeadPlan.none())
    model = PerPositionLayer(8)
    loss_sum, g_sum = oracle.gradients(model, cfg, IDS_8, labels, reduction="sum")
    loss_mean, g_mean = oracle.gradients(model, cfg, IDS_8, labels, reduction="mean")
    assert abs(float(loss_mean) * 4 - float(loss_sum)) < FP64_ATOL
    for name in g_sum:
        _assert_close(g_mean[name] * 4, g_sum[name], what=name)


# ---- 5. TBPTT depth across layers ---------------------------------------------------------
# N=6, S=2, T=S: segments {0,1} {2,3} {4,5}. Only position 4 has a target (labels[5]), so the
# loss is l_2. Through layer 1, query 4 reads K/V of {2, 3} (tail), which depend on layer 0's
# attention of queries 2, 3 over keys {0, 1}: that path is live only when segment 0 >= 2 - K.
IDS_6 = torch.tensor([[1, 4, 2, 0, 3, 1]])
LABELS_SEG2_OF_6 = torch.tensor([[-100, -100, -100, -100, -100, 2]])


@pytest.mark.parametrize("plan", ["none", "all"])
@pytest.mark.parametrize("K, live", [(0, [4]), (1, [2, 3, 4]), (2, [0, 1, 2, 3, 4]), (5, [0, 1, 2, 3, 4])])
def test_tbptt_depth_two_layers(K, live, plan):
    cfg = SegmentConfig(2, long_range=HeadPlan.all() if plan == "all" else HeadPlan.none(), tbptt_k=K)
    model = PerPositionLayer(6, layers=2, seed=1)
    _, grads = oracle.gradients(model, cfg, IDS_6, LABELS_SEG2_OF_6, reduction="sum")
    dead = [j for j in range(6) if j not in live]
    for name in ("escale", "kscale", "vscale"):
        assert _nonzero(grads[name]) == live, (name, K, grads[name])
        assert _zero(grads[name]) == dead, (name, K, grads[name])
    # Queries of position 4 always; layer-0 queries of positions 2, 3 feed the tail K/V of
    # layer 1, which is live for K >= 1; those of 0, 1 would need segment -1: never.
    q_live = {0: [4], 1: [2, 3, 4], 2: [2, 3, 4], 5: [2, 3, 4]}[K]
    assert _nonzero(grads["qscale"]) == q_live, (K, grads["qscale"])
    assert _zero(grads["qscale"]) == [j for j in range(6) if j not in q_live]


def test_tbptt_k1_forward_still_sees_segment_0():
    # K=1 cuts the gradient from l_2 into segment 0, not the forward: scaling the embedding of
    # position 0 changes l_2 (through layer 0 of positions 2, 3 and layer 1 of position 4),
    # while its gradient stays exactly zero.
    cfg = SegmentConfig(2, long_range=HeadPlan.none(), tbptt_k=1)
    model = PerPositionLayer(6, layers=2, seed=1)
    loss_a, grads_a = oracle.gradients(model, cfg, IDS_6, LABELS_SEG2_OF_6, reduction="sum")
    with torch.no_grad():
        model.escale[0] = 3.0
    loss_b, grads_b = oracle.gradients(model, cfg, IDS_6, LABELS_SEG2_OF_6, reduction="sum")
    assert abs(float(loss_a) - float(loss_b)) > 1e-6  # forward: position 0 still reaches l_2
    assert grads_a["escale"][0] == 0 and grads_b["escale"][0] == 0


# ---- errors -------------------------------------------------------------------------------
def test_gradients_rejects_unknown_reduction():
    with pytest.raises(SegcompileError, match="reduction"):
        oracle.gradients(ScalarAttention(Q, K, V), SegmentConfig(2), torch.zeros(1, 4, dtype=torch.long), LABELS,
                         reduction="none")


def test_layer_count_mismatch_is_an_error():
    model = PerPositionLayer(6, layers=2)
    model.config.num_hidden_layers = 3
    with pytest.raises(SegcompileError, match="attention calls"):
        oracle.forward(model, SegmentConfig(2), IDS_6)
