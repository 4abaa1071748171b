"""examples/train.py in-process: it trains, logs, checkpoints, and a resumed run logs the same losses."""

from __future__ import annotations

import json

import importlib.util
import re
from pathlib import Path

import pytest


def _load_example(name: str):
    """The example script as a module (examples/ is not a package: the scripts run as files)."""
    path = Path(__file__).resolve().parents[1] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train = _load_example("train")

SMALL = [
    "--model", "tiny-llama", "--layers", "1", "--seq-len", "64", "--segment-len", "16", "--pairs", "6",
    "--queries", "4", "--batch-size", "2", "--lr", "3e-3", "--device", "cpu", "--eval-batches", "1",
]


def logged(out):
    return [json.loads(line) for line in (out / "losses.jsonl").read_text().splitlines()]


def test_trains_and_writes_its_files(tmp_path, capsys):
    result = train.main(SMALL + ["--steps", "3", "--out", str(tmp_path / "run")])
    out = tmp_path / "run"
    assert [r["step"] for r in logged(out)] == [1, 2, 3]
    assert [r["loss"] for r in logged(out)] == result["losses"]
    assert sorted(p.name for p in (out / "checkpoint").iterdir()) == [
        "model.safetensors", "optimizer.safetensors", "rng.safetensors", "trainer.json",
    ]
    evaluation = json.loads((out / "eval.json").read_text())
    assert 0 <= evaluation["accuracy"] <= 1 and evaluation["answers"] == 2 * 4
    printed = capsys.readouterr().out
    assert "held-out accuracy" in printed
    assert re.search(r"steps 1\.\.3 in [0-9.]+s \([0-9,]+ tokens/s\)", printed), printed


def test_resumed_run_logs_the_same_losses(tmp_path):
    straight = tmp_path / "straight"
    train.main(SMALL + ["--steps", "4", "--out", str(straight), "--quiet"])

    resumed = tmp_path / "resumed"
    train.main(SMALL + ["--steps", "2", "--out", str(resumed), "--quiet"])
    with (resumed / "losses.jsonl").open("a") as f:  # a step logged after the checkpoint by a run that then died
        f.write(json.dumps({"step": 3, "loss": 123.0}) + "\n")
    result = train.main(SMALL + ["--steps", "4", "--out", str(resumed), "--resume", "--quiet"])

    assert result["start"] == 2
    assert logged(resumed) == logged(straight)
    assert len({r["loss"] for r in logged(straight)}) == 4
    assert json.loads((resumed / "eval.json").read_text()) == json.loads((straight / "eval.json").read_text())


def test_refuses_to_overwrite_or_to_resume_with_other_settings(tmp_path, capsys):
    out = str(tmp_path / "run")
    train.main(SMALL + ["--steps", "1", "--out", out, "--quiet", "--eval-batches", "0"])
    with pytest.raises(SystemExit):
        train.main(SMALL + ["--steps", "2", "--out", out, "--quiet"])
    assert "pass --resume" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.main(SMALL + ["--steps", "2", "--out", out, "--quiet", "--resume", "--lr", "1e-2"])
    assert "lr=0.01 (checkpoint: 0.003)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.main(SMALL + ["--steps", "2", "--out", str(tmp_path / "other"), "--resume"])
    assert "no checkpoint at" in capsys.readouterr().err
