"""Head selection: both methods recover hand-set long-range heads; budgets, ties, files, errors, CLI."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import segcompile as sc
from segcompile.cli.main import main
from segcompile.heads import CalibrationError, plan_at_budget, retrieval_ids, text_retrieval_calibration
from segcompile.plan import model_fingerprint
from segcompile.testing.tolerances import tolerance

from conftest import captured, random_ids

V, HEADS, KV_HEADS, HEAD_DIM = 32, 4, 2, 4
CFG = sc.SegmentConfig(segment_len=8)  # T = S = 8, no sinks: keys 2+ segments back are beyond a local window
N = 64
FAR = {0: [1], 1: [0, 1], 2: []}  # the KV heads built to look far back; the rest look at the last few tokens


class HandSetDecoder(nn.Module):
    """A decoder whose attention pattern is set by hand, not learned.

    The residual stream holds the token (one-hot), a constant 1, the position, and one slot per
    layer that the layer's attention output is written to (later layers read only the first
    three, so every layer sees the same input). Every query is the constant; a key is
    ``-SLOPE * position`` for a far KV head and ``+SLOPE * position`` for a local one, so a far
    head's attention decays by e^-2 per position *away from the first token* and a local head's
    per position away from the query: all but e^-16 of a far head's mass lies on the first 8
    tokens and of a local head's on the last 8. Values are random projections of the token.
    """

    SLOPE = 2.0

    def __init__(self, far: dict[int, list[int]], layers: int = 3, seed: int = 0):
        super().__init__()
        self.config = SimpleNamespace(
            num_hidden_layers=layers, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, vocab_size=V
        )
        g = torch.Generator().manual_seed(seed)
        inputs, slot = V + 2, HEADS * HEAD_DIM
        hidden = inputs + layers * slot
        self.q_proj = nn.ParameterList()
        self.k_proj = nn.ParameterList()
        self.v_proj = nn.ParameterList()
        self.o_proj = nn.ParameterList()
        for layer in range(layers):
            q = torch.zeros(hidden, HEADS, HEAD_DIM)
            q[V, :, 0] = 1.0  # constant
            k = torch.zeros(hidden, KV_HEADS, HEAD_DIM)
            for h in range(KV_HEADS):
                k[V + 1, h, 0] = -self.SLOPE if h in far.get(layer, []) else self.SLOPE  # position
            v = torch.zeros(hidden, KV_HEADS, HEAD_DIM)
            v[:V] = torch.randn(V, KV_HEADS, HEAD_DIM, generator=g)
            o = torch.zeros(slot, hidden)
            o[:, inputs + layer * slot : inputs + (layer + 1) * slot] = torch.eye(slot)
            for plist, w in ((self.q_proj, q), (self.k_proj, k), (self.v_proj, v), (self.o_proj, o)):
                plist.append(nn.Parameter(w.flatten(1) if w.dim() == 3 else w))
        self.lm_head = nn.Parameter(torch.randn(hidden, V, generator=g) / math.sqrt(slot))
        self.lm_head.data[:inputs] = 0

    def forward(self, input_ids, position_ids=None):
        B, n = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(n)[None]
        x = torch.zeros(B, n, self.lm_head.shape[0])
        x[..., :V] = F.one_hot(input_ids, V).float()
        x[..., V] = 1.0
        x[..., V + 1] = position_ids.float()
        for wq, wk, wv, wo in zip(self.q_proj, self.k_proj, self.v_proj, self.o_proj):
            q = (x @ wq).view(B, n, HEADS, HEAD_DIM).transpose(1, 2)
            k = (x @ wk).view(B, n, KV_HEADS, HEAD_DIM).transpose(1, 2).repeat_interleave(HEADS // KV_HEADS, dim=1)
            v = (x @ wv).view(B, n, KV_HEADS, HEAD_DIM).transpose(1, 2).repeat_interleave(HEADS // KV_HEADS, dim=1)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0)
            x = x + y.transpose(1, 2).reshape(B, n, HEADS * HEAD_DIM) @ wo
        return x @ self.lm_head


def calibration(batch: int = 4, n: int = N, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (batch, n), generator=torch.Generator().manual_seed(seed))


def heads_of(plan: sc.HeadPlan) -> dict[int, list[int]]:
    return {l: list(h) for l, h in plan.heads.items()}


# ---- both methods recover the hand-set heads -----------------------------------------------
def test_attention_mass_recovers_the_far_heads():
    plan = sc.select_heads(HandSetDecoder(FAR), calibration(), budget=0.5, method="attention_mass", cfg=CFG)
    assert heads_of(plan) == FAR
    scores = plan.extra["scores"]
    for layer, row in scores.items():
        for h, s in enumerate(row):
            # far heads: nearly all mass on the first tokens, beyond the window of every query from 16 on
            assert (s > 0.99) if h in FAR[int(layer)] else (s < 1e-5), (layer, h, s)


@pytest.mark.parametrize("data", ["calibration", "synthetic"])
def test_gate_recovers_the_far_heads(data):
    ids = calibration() if data == "calibration" else None
    plan = sc.select_heads(HandSetDecoder(FAR), ids, budget=0.5, method="gate", cfg=CFG, seq_len=N, steps=60)
    assert heads_of(plan) == FAR
    gates = plan.extra["scores"]
    kept = [gates[str(l)][h] for l, hs in FAR.items() for h in hs]
    dropped = [gates[str(l)][h] for l in FAR for h in range(KV_HEADS) if h not in FAR[l]]
    assert min(kept) > 0.5 > max(dropped), gates
    loss = plan.extra["params"]["loss"]
    assert loss["last"]["total"] < loss["first"]["total"]


@pytest.mark.parametrize("method", ["attention_mass", "gate"])
def test_layer_granularity_keeps_the_layer_with_most_far_heads(method):
    plan = sc.select_heads(HandSetDecoder(FAR), calibration(), budget=1 / 3, method=method, cfg=CFG,
                           granularity="layer", steps=60)
    assert heads_of(plan) == {0: [], 1: [0, 1], 2: []}
    assert plan.resolve([2, 2, 2]) == {0: (), 1: (0, 1), 2: ()}
    assert plan.extra["granularity"] == "layer" and len(plan.extra["layer_scores"]) == 3


# ---- budgets, ties, determinism --------------------------------------------------------------
@pytest.mark.parametrize("budget, count", [(0.0, 0), (0.01, 1), (0.25, 2), (0.5, 3), (1.0, 6)])
def test_budget_is_round_of_the_fraction_at_least_one(budget, count):
    plan = sc.select_heads(HandSetDecoder(FAR), calibration(batch=1), budget=budget, cfg=CFG)
    assert plan.extra["selected"] == sum(len(h) for h in plan.heads.values()) == count


def test_ties_go_to_the_lowest_layer_and_head():
    # every head identical (all local): equal scores, so the plan is the first heads in (layer, head) order
    plan = sc.select_heads(HandSetDecoder({}), calibration(batch=1), budget=0.5, cfg=CFG)
    assert len({s for row in plan.extra["scores"].values() for s in row}) == 1
    assert heads_of(plan) == {0: [0, 1], 1: [0], 2: []}


def test_same_seed_same_plan_and_the_file_records_the_data():
    model = HandSetDecoder(FAR)

    def run(seed):
        return sc.select_heads(model, None, 0.5, "gate", CFG, seq_len=N, steps=5, seed=seed).to_json_dict()

    first, again, other = run(0), run(0), run(1)
    assert first == again
    data = first["extra"]["data"]
    assert data["source"] == "synthetic_retrieval" and data["sequences_seen"] == 5 and data["seq_len"] == N
    assert other["extra"]["data"]["sha256"] != data["sha256"]
    assert first["extra"]["config"] == {"segment_len": 8, "tail_len": 8, "sink_tokens": 0}
    assert first["extra"]["params"]["steps"] == 5 and first["extra"]["seed"] == 0


def test_retrieval_ids_are_seeded_and_ask_about_the_context():
    ids = retrieval_ids(torch.Generator().manual_seed(3), 2, 64, vocab_size=V, pairs=4, queries=2)
    assert torch.equal(ids, retrieval_ids(torch.Generator().manual_seed(3), 2, 64, vocab_size=V, pairs=4, queries=2))
    assert ids.shape == (2, 64) and int(ids.min()) >= 0 and int(ids.max()) < V
    for row in ids:
        context = row[:58].tolist()
        for q in range(2):
            marker, key, value = row[58 + 3 * q : 61 + 3 * q].tolist()
            assert marker == 0 and context[context.index(key) + 1] == value


# ---- files: the plan feeds transform -------------------------------------------------------------
def test_saved_plan_is_accepted_by_transform(tmp_path):
    model, graph = captured("llama")
    cfg = sc.SegmentConfig(segment_len=8, sink_tokens=1)
    plan = sc.select_heads(model, random_ids(2, 40), budget=0.5, cfg=cfg)
    plan.save(tmp_path / "heads.json")
    loaded = sc.HeadPlan.from_json(tmp_path / "heads.json")
    assert loaded == plan
    assert loaded.fingerprint == model_fingerprint("LlamaForCausalLM", [2, 2])
    data = json.loads((tmp_path / "heads.json").read_text())
    assert data["method"] == "attention_mass" and data["extra"]["data"]["shape"] == [2, 40]

    seg = sc.transform(graph, sc.SegmentConfig(segment_len=8, sink_tokens=1, long_range=loaded))
    assert {site.layer: list(site.long_range) for site in seg.sites} == heads_of(plan)
    ids = random_ids(1, 40, seed=5)
    reference = sc.oracle.forward(model, sc.SegmentConfig(segment_len=8, sink_tokens=1, long_range=loaded), ids)
    with torch.no_grad():
        assert (seg(ids).logits - reference).abs().max() <= tolerance(torch.float32).logits

    with pytest.raises(sc.PlanError, match="this head plan was made for"):
        sc.transform(captured("llama", layers=1)[1], sc.SegmentConfig(segment_len=8, long_range=loaded))


# ---- errors ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, error, message", [
    (dict(budget=1.5), sc.PlanError, r"budget must be a fraction of KV heads in \[0, 1\]"),
    (dict(budget=-0.1), sc.PlanError, "budget must be a fraction"),
    (dict(budget=float("nan")), sc.PlanError, "budget must be a fraction"),
    (dict(budget=True), sc.PlanError, "budget must be a fraction"),
    (dict(method="entropy"), sc.PlanError, "unknown method 'entropy'; choose one of 'attention_mass', 'gate'"),
    (dict(granularity="block"), sc.PlanError, "unknown granularity 'block'"),
    (dict(steps=0, method="gate"), sc.PlanError, "steps must be an int >= 1"),
])
def test_bad_arguments_are_clear_errors(kwargs, error, message):
    with pytest.raises(error, match=message):
        sc.select_heads(HandSetDecoder(FAR), calibration(batch=1), **{"budget": 0.5, "cfg": CFG, **kwargs})


@pytest.mark.parametrize("ids, message", [
    (calibration(batch=1, n=8), "calibration sequences of 8 tokens are too short for segment_len=8, tail_len=8, "
                                "sink_tokens=0: before position 16 .* at least 17 tokens"),
    (calibration(batch=1, n=16), "16 tokens are too short"),
    (torch.rand(1, 64), "must be integer token ids"),
    (torch.full((1, 64), V), r"must lie in \[0, 32\)"),
    (torch.zeros(1, 2, 64, dtype=torch.long), r"shape \[B, n\] or \[n\]"),
])
def test_bad_calibration_data_is_a_clear_error(ids, message):
    with pytest.raises(CalibrationError, match=message):
        sc.select_heads(HandSetDecoder(FAR), ids, budget=0.5, cfg=CFG)


def test_seventeen_tokens_are_enough_and_sinks_raise_the_minimum():
    sc.select_heads(HandSetDecoder(FAR), calibration(batch=1, n=17), budget=0.5, cfg=CFG)
    with pytest.raises(CalibrationError, match="at least 25 tokens"):
        sc.select_heads(HandSetDecoder(FAR), calibration(batch=1, n=24), 0.5, cfg=sc.SegmentConfig(8, sink_tokens=8))


class NoSDPA(nn.Module):
    """A causal LM whose attention is hand-written matmuls: nothing for select_heads to intercept."""

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(num_hidden_layers=1, num_key_value_heads=1, vocab_size=V)
        self.embed = nn.Embedding(V, 8)

    def forward(self, input_ids, position_ids=None):
        x = self.embed(input_ids)
        scores = (x @ x.transpose(-1, -2)).masked_fill(torch.ones(x.shape[1], x.shape[1]).triu(1).bool(), -1e9)
        return (scores.softmax(-1) @ x) @ self.embed.weight.T


def test_model_without_matched_attention_is_a_clear_error():
    with pytest.raises(sc.UnsupportedAttentionError, match="made no call to F.scaled_dot_product_attention"):
        sc.select_heads(NoSDPA(), calibration(batch=1), budget=0.5, cfg=CFG)


def test_model_with_more_layers_in_its_config_than_attention_calls():
    model = HandSetDecoder(FAR)
    model.config.num_hidden_layers = 4
    message = "made 3 attention calls in one forward, but its config names 4"
    with pytest.raises(sc.UnsupportedAttentionError, match=message):
        sc.select_heads(model, calibration(batch=1), budget=0.5, cfg=CFG)


# ---- command line ----------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["attention_mass", "gate"])
def test_cli_writes_a_plan_for_the_tiny_model(method, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    out = tmp_path / "heads.json"
    rc = main(["heads", "--layers", "2", "--method", method, "--budget", "0.5", "--segment-len", "16",
               "--seq-len", "64", "--samples", "2", *(["--steps", "3"] if method == "gate" else []),
               "--out", str(out), "--no-color"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    plan = sc.HeadPlan.load(out)
    assert plan.method == method and plan.extra["selected"] == 2
    assert plan.fingerprint == model_fingerprint("LlamaForCausalLM", [2, 2])
    assert f"wrote {out}" in printed and "2 of 4 KV heads long-range" in printed


def test_cli_reads_calibration_ids(tmp_path, capsys):
    ids = tmp_path / "ids.npy"
    np.save(ids, random_ids(2, 48).numpy())
    out = tmp_path / "heads.json"
    assert main(["heads", "--layers", "1", "--segment-len", "8", "--calibration-ids", str(ids), "--out", str(out)]) == 0
    data = json.loads(out.read_text())["extra"]["data"]
    assert data["source"] == "calibration" and data["shape"] == [2, 48]


@pytest.mark.parametrize("flags, message", [
    (["--budget", "2"], "argument --budget: must be a number in [0, 1], got '2'"),
    (["--long-range", "0.5"], "error: --long-range does not apply to `segcompile heads`"),
    (["--calibration-ids", "missing.npy"], "error: --calibration-ids missing.npy: no such file"),
    (["--segment-len", "64", "--seq-len", "64"], "error: calibration sequences of 64 tokens are too short"),
    (["--steps", "5"], "error: --steps, --lr and --sparsity apply to --method gate only"),
])
def test_cli_user_errors(flags, message, tmp_path, capsys):
    assert main(["heads", "--layers", "1", *flags, "--out", str(tmp_path / "h.json")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "h.json").exists()


# ---- scoring the positions that matter ------------------------------------------------------------
MARK, NEEDLE = 0, 1  # the question token, and the token it retrieves
PLANTED_N = 64


class PlantedRetrievalDecoder(nn.Module):
    """One layer, two KV heads (one query head each), attention set by hand.

    KV head 0 spreads its attention evenly over every key it can see, so any late query puts most
    of its mass beyond a local window. KV head 1 looks at the last few keys, except at a query
    holding ``MARK``, which attends to the ``NEEDLE`` token wherever it is: a retrieval head that
    looks far back at the question only.
    """

    SLOPE, PULL = 2.0, 400.0  # PULL outweighs SLOPE * position for every n <= 64

    def __init__(self, seed: int = 0):
        super().__init__()
        self.config = SimpleNamespace(num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, vocab_size=V)
        g = torch.Generator().manual_seed(seed)
        hidden = V + 2  # one-hot token, a constant 1, the position
        self.q = torch.zeros(hidden, 2, 2)
        self.k = torch.zeros(hidden, 2, 2)
        self.q[MARK, 1, 0] = self.PULL
        self.q[V, 1, 1] = 1.0
        self.k[NEEDLE, 1, 0] = 1.0
        self.k[V + 1, 1, 1] = self.SLOPE
        self.v = torch.zeros(hidden, 2, HEAD_DIM)
        self.v[:V] = torch.randn(V, 2, HEAD_DIM, generator=g)
        self.out = nn.Parameter(torch.randn(2 * HEAD_DIM, V, generator=g))

    def forward(self, input_ids, position_ids=None):
        B, n = input_ids.shape
        x = torch.cat([F.one_hot(input_ids, V).float(), torch.ones(B, n, 1), torch.arange(n).float().expand(B, n)[..., None]],
                      dim=-1)
        q, k, v = (torch.einsum("bnx,xhd->bhnd", x, w) for w in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0)
        return y.transpose(1, 2).reshape(B, n, -1) @ self.out


def planted_prompts(batch: int = 4, seed: int = 2):
    """``(ids, query_positions, key_positions)``: filler tokens (never MARK or NEEDLE), one NEEDLE in
    the first quarter, MARK at the last position (the question)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, V, (batch, PLANTED_N), generator=g)
    needles = torch.randint(2, PLANTED_N // 4, (batch,), generator=g)
    ids[torch.arange(batch), needles] = NEEDLE
    ids[:, -1] = MARK
    queries = torch.zeros(batch, PLANTED_N, dtype=torch.bool)
    queries[:, -1] = True
    return ids, queries, ids == NEEDLE


def test_every_query_ranks_the_spread_head_first_the_question_ranks_the_retrieval_head_first():
    model, (ids, queries, keys) = PlantedRetrievalDecoder(), planted_prompts()
    every = sc.select_heads(model, ids, 0.5, "attention_mass", CFG)
    assert heads_of(every) == {0: [0]}, every.extra["scores"]  # what the average over every query picks
    at_question = sc.select_heads(model, ids, 0.5, "attention_mass", CFG, query_positions=queries)
    assert heads_of(at_question) == {0: [1]}, at_question.extra["scores"]
    spread, retrieval = at_question.extra["scores"]["0"]
    assert retrieval > 0.99 and spread < 0.9  # the spread head still reaches past the window: 40 of 64 keys
    on_needle = sc.select_heads(model, ids, 0.5, "attention_mass", CFG, query_positions=queries, key_positions=keys)
    spread, retrieval = on_needle.extra["scores"]["0"]
    assert retrieval > 0.99 and spread < 1 / 32  # the spread head gives the needle 1 / 64 of its mass
    assert on_needle.extra["data"]["query_positions"] == 4 and on_needle.extra["data"]["key_positions"] == 4


def test_gate_distilled_at_the_question_keeps_the_retrieval_head():
    model, (ids, queries, _) = PlantedRetrievalDecoder(), planted_prompts()
    plan = sc.select_heads(model, ids, 0.5, "gate", CFG, query_positions=queries, steps=60)
    assert heads_of(plan) == {0: [1]}, plan.extra["scores"]
    dropped, kept = plan.extra["scores"]["0"]
    assert kept > 0.95 and dropped < kept - 0.1  # the spread head's output differs too, so its gate falls less


def test_plan_at_budget_equals_scoring_again():
    model, ids = HandSetDecoder(FAR), calibration()
    for method in ("attention_mass", "gate"):
        half = sc.select_heads(model, ids, 0.5, method, CFG, steps=20)
        for budget in (1 / 6, 2 / 3):
            again = sc.select_heads(model, ids, budget, method, CFG, steps=20)
            assert plan_at_budget(half, budget) == again, (method, budget)
    with pytest.raises(sc.PlanError, match="needs a plan made by select_heads"):
        plan_at_budget(sc.HeadPlan.fraction(0.5), 0.25)


@pytest.mark.parametrize("kwargs, message", [
    (dict(calibration_ids=None, query_positions=torch.ones(N, dtype=torch.bool)), "pass calibration_ids with them"),
    (dict(query_positions=torch.ones(2, N, dtype=torch.bool)), r"must have the calibration ids' shape \[4, 64\]"),
    (dict(query_positions=torch.full((N,), 0.5)), "must be bool"),
    (dict(query_positions=torch.arange(N) < 16), r"none of the 64 query positions \(over 4 sequences\) has a key beyond its local window"),
])
def test_bad_positions_are_clear_errors(kwargs, message):
    with pytest.raises(CalibrationError, match=message):
        sc.select_heads(HandSetDecoder(FAR), **{"calibration_ids": calibration(), "budget": 0.5, "cfg": CFG, **kwargs})


def test_key_positions_are_for_attention_mass_only():
    with pytest.raises(sc.PlanError, match="key_positions apply to method='attention_mass' only"):
        sc.select_heads(HandSetDecoder(FAR), calibration(), 0.5, "gate", CFG, key_positions=torch.ones(N, dtype=bool))


def test_text_retrieval_calibration_asks_for_the_key_it_hides():
    from segcompile.quality import ByteTokenizer

    tokenizer = ByteTokenizer()
    data = text_retrieval_calibration(tokenizer, 600, 3, seed=4)
    assert data.ids.shape == (3, 600) and data.query_positions.shape == (3, 600)
    again = text_retrieval_calibration(tokenizer, 600, 3, seed=4)
    assert torch.equal(data.ids, again.ids) and data.keys == again.keys
    for row, rows, keys, key, start in zip(data.ids, data.query_positions, data.key_positions, data.keys,
                                           data.needle_starts):
        text = tokenizer.decode(row.tolist())
        assert text.endswith(f"The pass key is {key}")  # the prompt ends on its answer
        predicted = tokenizer.decode(row[rows.nonzero().flatten() + 1].tolist())
        assert predicted == key  # the query rows are the ones that predict the key's digits
        assert tokenizer.decode(row[keys].tolist()) == key * 2  # the needle states it twice
        assert tokenizer.decode(row[start : start + 20].tolist()) == " The pass key is " + key[:3]
        assert 0.1 * 600 - 200 <= start <= 0.9 * 600
    assert all(d["split"] == "calibration" for d in data.describe()["filler_documents"])


@pytest.mark.parametrize("method", ["attention_mass", "gate"])
def test_cli_scores_passkey_prompts_on_real_text(method, tmp_path, capsys):
    out = tmp_path / "heads.json"
    rc = main(["heads", "--layers", "2", "--method", method, "--data", "passkey-text", "--segment-len", "32",
               "--seq-len", "400", "--samples", "2", *(["--steps", "2"] if method == "gate" else []),
               "--out", str(out), "--no-color"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    data = json.loads(out.read_text())["extra"]["data"]
    assert data["source"] == "calibration" and data["shape"] == [2, 400]
    assert data["query_positions"] == 10  # five digits a prompt, ByteTokenizer: one token each
    assert data.get("key_positions") == (20 if method == "attention_mass" else None)  # the needle states it twice
    assert "10 query positions" in printed


def test_cli_reads_query_positions(tmp_path, capsys):
    ids, rows = tmp_path / "ids.npy", tmp_path / "rows.npy"
    np.save(ids, random_ids(2, 48).numpy())
    np.save(rows, np.arange(48) >= 40)
    out = tmp_path / "heads.json"
    assert main(["heads", "--layers", "1", "--segment-len", "8", "--calibration-ids", str(ids),
                 "--query-positions", str(rows), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["extra"]["data"]["query_positions"] == 16


@pytest.mark.parametrize("flags, message", [
    (["--query-positions", "rows.npy"], "error: --query-positions marks positions of --calibration-ids"),
    (["--data", "passkey-text", "--calibration-ids", "ids.npy"], "are two sources of data"),
    (["--method", "gate", "--calibration-ids", "ids.npy", "--key-positions", "ids.npy"],
     "--key-positions applies to --method attention_mass only"),
])
def test_cli_position_errors(flags, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    np.save(tmp_path / "ids.npy", random_ids(1, 48).numpy())
    assert main(["heads", "--layers", "1", *flags, "--out", str(tmp_path / "h.json")]) == 2
    assert message in capsys.readouterr().err
