"""ONNX export of the segment-step program and its onnxruntime runner.

Against ``SegmentedModel`` (itself tested against the oracle): prefill 5 segments and 3 tokens,
then decode 2*S tokens, logits within 1e-4. The state rewrite (fixed-size local buffers, history
capacity, the in-graph segment-end move) is checked over the whole grid (3 families x 3 plans x
G in {0, 4}) in PyTorch, where it is cheap; the exported files over a subset that covers every
family, plan and G (an export takes 5-20 s on 2 cores), the rest of the grid and short tails
(T in {0, 3}, also checked in PyTorch) with SEGCOMPILE_SLOW_TESTS=1.
"""

from __future__ import annotations

import os
import sys
import warnings

import numpy as np
import onnx
import pytest
import torch
from conftest import VOCAB, captured, make_model, max_abs, random_ids

import segcompile as sc
from segcompile.errors import SegcompileError
from segcompile.deploy import onnx_export
from segcompile.deploy.onnx_export import example_inputs, export_onnx
from segcompile.deploy.onnxruntime_backend import OnnxSegmentedModel
from segcompile.deploy.step_module import state_specs, step_module
from segcompile.testing.tolerances import tolerance

S = 8
TOL = tolerance(torch.float32).logits  # the exported fp32 program against SegmentedModel
PLANS = {"none": sc.HeadPlan.none(), "fraction(0.5)": sc.HeadPlan.fraction(0.5), "all": sc.HeadPlan.all()}
GRID = [(f, p, g) for f in ("llama", "qwen2", "gpt2") for p in PLANS for g in (0, 4)]
# every family, every plan and both G; gpt2 also exports the logits of every position
ONNX_CASES = [("llama", "fraction(0.5)", 4), ("qwen2", "none", 0), ("gpt2", "all", 4)]
SLOW = os.environ.get("SEGCOMPILE_SLOW_TESTS") == "1"


def _seg(family, plan, sinks, tail=None):
    _, graph = captured(family)
    cfg = sc.SegmentConfig(segment_len=S, tail_len=tail, sink_tokens=sinks, long_range=PLANS[plan])
    return sc.transform(graph, cfg)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(family, plan, G) -> (seg, path): each file exported once per module."""
    cache = {}

    def get(family, plan, sinks, tail=None):
        key = (family, plan, sinks, tail)
        if key not in cache:
            seg = _seg(family, plan, sinks, tail)
            path = tmp_path_factory.mktemp("onnx") / f"{family}-{sinks}-{tail}.onnx"
            export_onnx(seg, path, logits="all" if family == "gpt2" else "last")
            cache[key] = seg, path
        return cache[key]

    return get


def _compare(seg, prefill, decode, prompt_len=5 * S + 3, batch=2):
    """Max abs logit difference, (prefill's last token, the 2*S decoded tokens), PyTorch vs ``prefill/decode``."""
    ids = random_ids(batch, prompt_len)
    with torch.no_grad():
        ref = seg.prefill(ids)
        got = prefill(ids)
        diffs = [max_abs(torch.as_tensor(got[1]), ref.logits)]
        state = got[0]
        for _ in range(2 * S):
            token = ref.logits.argmax(-1, keepdim=True)
            want, ref = seg.decode(ref, token)
            logits, state = decode(state, token)
            diffs.append(max_abs(torch.as_tensor(logits), want))
    return diffs[0], max(diffs[1:])


# ---- the state rewrite, in PyTorch, over the whole grid ------------------------------------------
class _TorchSteps:
    """The runner's loop in PyTorch over ``step_module`` (fixed local buffers, history capacity)."""

    def __init__(self, seg, history):
        self.module = step_module(seg, logits="all")
        self.seg = seg
        self.history = history

    def prefill(self, ids):
        args = example_inputs(self.seg, batch=ids.shape[0], history=self.history)
        state = [0, list(args[2:])]
        logits = self._feed(state, ids)
        return state, logits[:, -1]

    def decode(self, state, ids):
        return self._feed(state, ids), state

    def _feed(self, state, ids):
        pieces, done = [], 0
        while done < ids.shape[1]:
            take = min(S - state[0] % S, ids.shape[1] - done)
            out = self.module(ids[:, done : done + take], torch.tensor(state[0]), *state[1])
            pieces.append(out[0])
            state[0] += take
            state[1] = list(out[1:])
            done += take
        return torch.cat(pieces, dim=1)


@pytest.mark.parametrize("family,plan,sinks", GRID)
def test_step_module_matches_segmented_model(family, plan, sinks):
    seg = _seg(family, plan, sinks)
    steps = _TorchSteps(seg, history=8 * S)
    prefill, decode = _compare(seg, steps.prefill, steps.decode)
    assert prefill < TOL and decode < TOL, (prefill, decode)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("tail,sinks", [(3, 4), (0, 0)])
def test_step_module_short_tails(family, tail, sinks):
    seg = _seg(family, "fraction(0.5)", sinks, tail)
    steps = _TorchSteps(seg, history=8 * S)
    prefill, decode = _compare(seg, steps.prefill, steps.decode)
    assert prefill < TOL and decode < TOL, (prefill, decode)


def test_last_logits_slice_before_the_lm_head():
    # a prefill step computes one row of logits, not S: the slice is the LM head's input
    seg = _seg("llama", "none", 0)
    module = step_module(seg, logits="last")
    head = module.graph.output_node().args[0][0]
    assert head.target is torch.ops.aten.linear.default
    assert head.args[0].target is torch.ops.aten.slice.Tensor and head.args[0].args[1:] == (1, -1, None)
    args = example_inputs(seg, batch=1, step=5)
    assert module(*args)[0].shape == (1, 1, VOCAB)


# ---- the exported files ----------------------------------------------------------------------------
def _check_file(seg, path):
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}
    shapes = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in model.graph.input}
    assert shapes["input_ids"] == ["batch", "step"] and shapes["position_offset"] == []
    G, T = seg.cfg.sink_tokens, seg.cfg.tail_len
    for site in seg.sites:
        for kv, dim in (("k", site.head_dim), ("v", site.v_head_dim)):
            # local heads: a fixed G + T + S whatever the context length
            assert shapes[f"layer{site.layer}_local_{kv}"] == ["batch", site.num_kv_heads, G + T + S, dim]
            hist = shapes.get(f"layer{site.layer}_hist_{kv}")
            assert hist == (["batch", len(site.long_range), "history", dim] if site.long_range else None)
    assert len(shapes) == 2 + len(state_specs(seg))


def test_shared_axis_names_give_no_warning(tmp_path):
    # torch.onnx warns that a dynamic axis name shared by several inputs "will not be used"; the
    # file carries it on every input (``_check_file``), so the warning would only mislead
    seg = _seg("llama", "fraction(0.5)", 0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export_onnx(seg, tmp_path / "m.onnx")
    assert not [str(w.message) for w in caught if "will not be used" in str(w.message)]
    _check_file(seg, tmp_path / "m.onnx")


def _run_onnx(family, plan, sinks, exported, tail=None):
    seg, path = exported(family, plan, sinks, tail)
    _check_file(seg, path)
    runner = OnnxSegmentedModel(path)

    def prefill(ids):
        state = runner.prefill(ids.numpy())
        return state, state.logits

    prefill_diff, decode_diff = _compare(seg, prefill, lambda st, ids: runner.decode(st, ids.numpy()))
    print(f"{family} {plan} G={sinks} T={seg.cfg.tail_len}: prefill {prefill_diff:.1e}, decode {decode_diff:.1e}")
    assert prefill_diff < TOL and decode_diff < TOL, (prefill_diff, decode_diff)
    return seg, runner


@pytest.mark.parametrize("family,plan,sinks", ONNX_CASES)
def test_onnx_matches_segmented_model(family, plan, sinks, exported):
    seg, runner = _run_onnx(family, plan, sinks, exported)
    if runner.logits_mode == "all":  # every position of a prefill, too
        ids = random_ids(1, 3 * S + 2, seed=3)
        got = runner.decode(runner.initial_state(1), ids.numpy())[0]
        with torch.no_grad():
            assert max_abs(torch.from_numpy(got), seg(ids).logits) < TOL


@pytest.mark.skipif(not SLOW, reason="the rest of the ONNX grid: set SEGCOMPILE_SLOW_TESTS=1 (about 15 exports)")
@pytest.mark.slow
@pytest.mark.parametrize("family,plan,sinks", [c for c in GRID if c not in ONNX_CASES])
def test_onnx_grid(family, plan, sinks, exported):
    _run_onnx(family, plan, sinks, exported)


@pytest.mark.skipif(not SLOW, reason="short tails in ONNX (zero-size tail slots): set SEGCOMPILE_SLOW_TESTS=1")
@pytest.mark.slow
@pytest.mark.parametrize("tail", [0, 3])
def test_onnx_short_tails(tail, exported):
    _run_onnx("qwen2", "fraction(0.5)", 4, exported, tail)


@pytest.mark.skipif(not SLOW, reason="fp16 in ONNX: set SEGCOMPILE_SLOW_TESTS=1")
@pytest.mark.slow
def test_onnx_fp16(tmp_path):
    _, graph = captured("llama", dtype=torch.float16)
    seg = sc.transform(graph, sc.SegmentConfig(segment_len=S, sink_tokens=4, long_range=PLANS["fraction(0.5)"]))
    export_onnx(seg, tmp_path / "fp16.onnx")
    runner = OnnxSegmentedModel(tmp_path / "fp16.onnx")
    ids = random_ids(2, 5 * S + 3)
    state = runner.prefill(ids.numpy())
    with torch.no_grad():
        ref = seg.prefill(ids)
    assert state.logits.dtype == np.float16
    assert max_abs(torch.from_numpy(state.logits), ref.logits) < 1e-3  # logits ~0.3: a few fp16 ulps


def test_moe_experts_export_as_batched_products_and_name_the_op_they_cannot_export_as(tmp_path):
    # a Mixtral's experts run transformers' grouped_mm op by default, which torch.onnx cannot
    # translate: the error names it and the modules calling it; as batched products the file runs
    model = make_model("mixtral")
    seg = sc.transform(model, sc.SegmentConfig(segment_len=S, sink_tokens=2, long_range=PLANS["fraction(0.5)"]))
    with pytest.raises(SegcompileError, match=r"no ONNX function for `transformers\.grouped_mm_fallback\.default`, "
                       r"called by `model\.layers\.0\.mlp\.experts` \(MixtralExperts\), `model\.layers\.1.*"
                       r"set_experts_implementation\(\"batched_mm\"\)"):
        export_onnx(seg, tmp_path / "grouped.onnx")
    assert not (tmp_path / "grouped.onnx").exists()
    model.set_experts_implementation("batched_mm")
    seg = sc.transform(model, seg.cfg)
    export_onnx(seg, tmp_path / "moe.onnx")
    runner = OnnxSegmentedModel(tmp_path / "moe.onnx")
    prefill_diff, decode_diff = _compare(seg, lambda ids: (state := runner.prefill(ids.numpy()), state.logits),
                                         lambda st, ids: runner.decode(st, ids.numpy()))
    assert prefill_diff < TOL and decode_diff < TOL, (prefill_diff, decode_diff)


def test_weights_past_the_protobuf_limit_go_to_a_data_file(tmp_path, monkeypatch):
    # an 8B-shaped model's weights pass protobuf's 2 GiB: they go to PATH.data, which the file
    # names by its final name (the limit is lowered here so that a tiny model takes that path)
    monkeypatch.setattr(onnx_export, "PROTOBUF_LIMIT", onnx_export.GRAPH_ROOM + 1)
    _, graph = captured("llama")
    seg = sc.transform(graph, sc.SegmentConfig(segment_len=S, sink_tokens=2, long_range=PLANS["fraction(0.5)"]))
    path = tmp_path / "big.onnx"
    export_onnx(seg, path)
    data = tmp_path / ("big.onnx" + onnx_export.WEIGHTS_SUFFIX)
    assert data.stat().st_size > 0 and data.stat().st_mode == path.stat().st_mode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", data.name]
    ids = random_ids(2, 2 * S + 3)
    state = OnnxSegmentedModel(path).prefill(ids.numpy())
    with torch.no_grad():
        assert max_abs(torch.from_numpy(state.logits), seg.prefill(ids).logits) < TOL


def test_one_file_serves_any_length(exported):
    seg, path = exported(*ONNX_CASES[0])
    before = path.stat().st_mtime_ns
    runner = OnnxSegmentedModel(path)
    for n in (2 * S + 1, 11 * S + 5):  # history 9 and 77 positions: the capacity grows in between
        ids = random_ids(1, n, seed=n)
        state = runner.prefill(ids.numpy())
        with torch.no_grad():
            ref = seg.prefill(ids)
        assert max_abs(torch.from_numpy(state.logits), ref.logits) < TOL
        assert state.history >= n - n % S - S
    assert path.stat().st_mtime_ns == before


def test_bad_inputs_are_clear_errors(exported):
    _, path = exported(*ONNX_CASES[0])
    _, other_path = exported(*ONNX_CASES[1])
    runner, other = OnnxSegmentedModel(path), OnnxSegmentedModel(other_path)
    ids = random_ids(2, S).numpy()
    with pytest.raises(SegcompileError, match="integer array"):
        runner.prefill(ids.astype(np.float32))
    with pytest.raises(SegcompileError, match="integer array"):
        runner.prefill(ids[0])
    with pytest.raises(SegcompileError, match="outside the vocabulary"):
        runner.prefill(ids + VOCAB)
    state = runner.initial_state(2)
    with pytest.raises(SegcompileError, match="crosses a segment boundary"):
        runner.step(state, random_ids(2, S + 1).numpy())
    runner.step(state, ids[:, :3])
    with pytest.raises(SegcompileError, match="crosses a segment boundary"):
        runner.step(state, ids)  # 3 + 8 > S
    with pytest.raises(SegcompileError, match="batch size 1"):
        runner.decode(state, ids[:1, :1])
    with pytest.raises(SegcompileError, match="another exported model"):
        other.decode(state, ids[:, :1])
    with pytest.raises(SegcompileError, match="not a segcompile"):
        bare = path.parent / "bare.onnx"
        model = onnx.load(str(path))
        del model.metadata_props[:]
        onnx.save(model, str(bare))
        OnnxSegmentedModel(bare)


def test_a_state_decoded_twice_is_an_error(exported):
    # The buffers are updated in place: decoding the same state again would read what the first
    # decode wrote (logits 0.022 off before this was checked). Each decode returns a new state.
    seg, path = exported(*ONNX_CASES[0])
    runner = OnnxSegmentedModel(path)
    ids = random_ids(1, 2 * S + 3)
    token = random_ids(1, 1, seed=7)
    state = runner.prefill(ids.numpy())
    first, after = runner.decode(state, token.numpy())
    assert after is not state and state.stale and not after.stale
    with pytest.raises(SegcompileError, match="(?i)continue from the state the last decode returned"):
        runner.decode(state, token.numpy())
    with pytest.raises(SegcompileError, match="was continued already"):
        runner.prefill(token.numpy(), state)
    with pytest.raises(SegcompileError, match="was continued already"):
        runner.step(state, token.numpy())
    with torch.no_grad():
        want, _ = seg.decode(seg.prefill(ids), token)
    assert max_abs(torch.from_numpy(first), want) < TOL
    runner.decode(after, token.numpy())  # the state returned continues


def test_a_copied_state_branches(exported):
    _, path = exported(*ONNX_CASES[0])
    runner = OnnxSegmentedModel(path)
    state = runner.prefill(random_ids(2, 2 * S - 1).numpy())  # the next token ends a segment
    branch = runner.copy_state(state)
    tokens = random_ids(2, 3, seed=8).numpy()
    first, _ = runner.decode(state, tokens)
    again, moved = runner.decode(branch, tokens)
    assert np.array_equal(first, again)
    assert moved.position == 2 * S + 2


def test_a_decode_refused_before_it_ran_leaves_the_state_live(exported):
    _, path = exported(*ONNX_CASES[0])
    runner = OnnxSegmentedModel(path)
    state = runner.prefill(random_ids(2, S).numpy())
    with pytest.raises(SegcompileError, match="batch size 1"):
        runner.decode(state, random_ids(1, 1).numpy())
    assert not state.stale
    runner.decode(state, random_ids(2, 1).numpy())


def test_cli_export_with_the_history_in_fp8(tmp_path, capsys, monkeypatch):
    from segcompile.cli.main import main
    from segcompile.deploy.format import HISTORY_DTYPE_KEY

    monkeypatch.setenv("COLUMNS", "200")
    out = tmp_path / "tiny.onnx"
    assert main(["export", "--layers", "1", "--segment-len", "16", "--long-range", "0.5", "--history-dtype", "fp8",
                 "--out", str(out), "--no-color"]) == 0
    assert "head plan fraction(0.5); history fp8" in capsys.readouterr().out
    assert OnnxSegmentedModel(out).metadata[HISTORY_DTYPE_KEY] == "float8_e4m3fn"  # the program rounds it so
    np.save(tmp_path / "ids.npy", np.arange(40) % 200)
    assert main(["run", str(out), "--prompt-ids", str(tmp_path / "ids.npy"), "--max-new-tokens", "2", "--no-color"]) == 0
    assert "S=16 T=16 G=0, history rounded to float8_e4m3fn; runs on" in capsys.readouterr().out


def test_cli_export_and_run(tmp_path, capsys, monkeypatch):
    from segcompile.cli.main import main

    monkeypatch.setenv("COLUMNS", "200")
    out = tmp_path / "tiny.onnx"
    rc = main(["export", "--layers", "1", "--segment-len", "16", "--sinks", "2", "--long-range", "0.5",
               "--out", str(out), "--no-color"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert out.is_file() and not list(tmp_path.glob(".*.tmp"))
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # the mode open() gives, not mkstemp's 0600
    assert "opset      20" in text and f"file       {out}" in text
    assert "layer0_local_k float[batch, 2, 34, 16]" in text  # G + T + S = 2 + 16 + 16
    assert "layer0_hist_k float[batch, 1, history, 16]" in text
    assert OnnxSegmentedModel(out).metadata["segcompile.segment_len"] == "16"

    np.save(tmp_path / "ids.npy", np.arange(40) % 200)
    rc = main(["run", str(out), "--prompt-ids", str(tmp_path / "ids.npy"), "--max-new-tokens", "5",
               "--out", str(tmp_path / "new.npy"), "--no-color"])
    text = capsys.readouterr().out
    assert rc == 0, text
    new = np.load(tmp_path / "new.npy")
    assert new.shape == (1, 5)
    assert "new ids [0]: " + " ".join(map(str, new[0])) in text

    monkeypatch.setitem(sys.modules, "tensorrt", None)  # as where TensorRT is not installed
    assert main(["export", "--format", "tensorrt", "--out", str(tmp_path / "x.plan")]) == 2
    err = capsys.readouterr().err
    assert 'pip install "segcompile[tensorrt]"' in err and "NVIDIA GPU" in err
    assert main(["run", str(tmp_path / "missing.onnx"), "--prompt-ids", str(tmp_path / "ids.npy")]) == 2
