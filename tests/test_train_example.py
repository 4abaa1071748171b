"""examples/train.py in-process: it trains, logs, checkpoints, and a resumed run logs the same losses."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest

from conftest import load_script


train = load_script("examples", "train")

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
        "manifest.json", "model.safetensors", "optimizer.safetensors", "rng.safetensors", "trainer.json",
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


# ---- resuming a finished, damaged or edited run -------------------------------------------------
@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
    """A run trained to step 2 (copied by each test that changes it)."""
    out = tmp_path_factory.mktemp("two_steps") / "run"
    train.main(SMALL + ["--steps", "2", "--out", str(out), "--quiet", "--eval-batches", "0"])
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


def _contents(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def _resume(out: Path, steps: int, *extra: str):
    return train.main(SMALL + ["--steps", str(steps), "--out", str(out), "--resume", "--quiet", "--eval-batches", "0", *extra])


# --steps 10 --resume from a step-30 checkpoint exited 0 and saved step 30's weights as step 10.
def test_resume_with_fewer_steps_than_the_checkpoint_is_refused(two_steps, tmp_path, capsys):
    out = _copy(two_steps, tmp_path)
    before = _contents(out)
    with pytest.raises(SystemExit) as exit_:
        _resume(out, 1)
    assert exit_.value.code != 0
    assert "is at step 2, past --steps 1; --steps is the total to train to: pass --steps 2 or more" in capsys.readouterr().err
    assert _contents(out) == before  # nothing written


def test_resume_at_the_checkpoint_step_trains_and_saves_nothing(two_steps, tmp_path):
    out = _copy(two_steps, tmp_path)
    before, inode = _contents(out), (out / "checkpoint").stat().st_ino
    result = _resume(out, 2)
    assert (result["start"], result["losses"]) == (2, [])
    assert _contents(out) == before
    assert (out / "checkpoint").stat().st_ino == inode  # not saved again (a save renames a new directory into place)


def _overwrite_optimizer_tail(out: Path) -> None:
    path = out / "checkpoint" / "optimizer.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-1000] + bytes(b ^ 0xFF for b in data[-1000:]))


def _negative_step(out: Path) -> None:
    """trainer.json's step set to -5, its manifest entry updated to match (a deliberate edit)."""
    checkpoint = out / "checkpoint"
    trainer = json.loads((checkpoint / "trainer.json").read_text())
    (checkpoint / "trainer.json").write_text(json.dumps({**trainer, "step": -5}))
    data = (checkpoint / "trainer.json").read_bytes()
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    manifest["files"]["trainer.json"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))


# Overwritten optimizer moments resumed and logged "loss is nan"; step -5 trained steps -4..4.
@pytest.mark.parametrize(
    "damage,message",
    [
        (_overwrite_optimizer_tail, "is damaged: optimizer.safetensors does not match its SHA-256 in manifest.json"),
        (_negative_step, "trainer.json has step -5, not a whole number >= 0"),
    ],
    ids=["optimizer-overwritten", "negative-step"],
)
def test_resume_from_a_damaged_checkpoint_is_refused(two_steps, tmp_path, capsys, damage, message):
    out = _copy(two_steps, tmp_path)
    damage(out)
    before = _contents(out)
    with pytest.raises(SystemExit) as exit_:
        _resume(out, 4)
    assert exit_.value.code != 0
    err = capsys.readouterr().err
    assert "--resume: checkpoint" in err and message in err, err
    assert _contents(out) == before
