"""Checkpoints: exact round trip of parameters, optimizer and RNG streams; atomic writes; clear refusals."""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, make_model

import segcompile as sc
from segcompile.runtime import checkpoint as ckpt
from segcompile.runtime.checkpoint import load_checkpoint, save_checkpoint

S = 4
N = 13  # 4 segments, the last one short


def adamw(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)


def plain_step(model, optimizer, data: torch.Generator):
    """One step of ordinary training; draws from ``data`` and from the global RNG (the label mask)."""
    ids = torch.randint(0, VOCAB, (2, N), generator=data)
    labels = ids.masked_fill(torch.rand(ids.shape) < 0.2, -100)
    logits = model(ids).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def params_of(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_bitwise_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_round_trip_continues_bit_identically(tmp_path):
    model = make_model("plain", layers=1)
    optimizer = adamw(model)
    data = torch.Generator().manual_seed(7)
    torch.manual_seed(3)
    for _ in range(3):
        plain_step(model, optimizer, data)
    save_checkpoint(tmp_path / "ck", model, optimizer, step=3, extra={"note": "three"}, generators={"data": data})
    for _ in range(3):
        plain_step(model, optimizer, data)
    want = params_of(model)

    fresh = make_model("plain", layers=1, seed=99)
    fresh_optimizer = adamw(fresh)
    other = torch.Generator().manual_seed(12345)
    torch.manual_seed(999)
    step, extra = load_checkpoint(tmp_path / "ck", fresh, fresh_optimizer, {"data": other})
    assert (step, extra) == (3, {"note": "three"})
    assert fresh_optimizer.param_groups[0]["betas"] == (0.9, 0.95)
    for _ in range(3):
        plain_step(fresh, fresh_optimizer, other)
    assert_bitwise_equal(params_of(fresh), want)


def test_tied_weights_are_stored_once_and_restored(tmp_path):
    model = make_model("gpt2", layers=1)
    assert model.lm_head.weight is model.transformer.wte.weight
    optimizer = adamw(model)
    save_checkpoint(tmp_path / "ck", model, optimizer, step=0)
    meta = json.loads(ckpt.safe_open(str(tmp_path / "ck" / ckpt.MODEL_FILE), "pt").metadata()[ckpt.ALIASES_KEY])
    assert meta == {"lm_head.weight": "transformer.wte.weight"}

    fresh = make_model("gpt2", layers=1, seed=5)
    load_checkpoint(tmp_path / "ck", fresh, adamw(fresh))
    assert fresh.lm_head.weight is fresh.transformer.wte.weight
    assert_bitwise_equal(params_of(fresh), params_of(model))


def test_rng_streams_continue(tmp_path):
    model = make_model("plain", layers=1)
    gens = {"data": torch.Generator().manual_seed(1), "noise": torch.Generator().manual_seed(2)}
    torch.manual_seed(4)
    torch.rand(3)
    gens["data"].manual_seed(11)
    save_checkpoint(tmp_path / "ck", model, adamw(model), step=5, generators=gens)
    want = [torch.rand(4), torch.rand(4, generator=gens["data"]), torch.randn(4, generator=gens["noise"])]

    torch.manual_seed(0)
    restored = {"data": torch.Generator(), "noise": torch.Generator()}
    load_checkpoint(tmp_path / "ck", model, adamw(model), restored)
    got = [torch.rand(4), torch.rand(4, generator=restored["data"]), torch.randn(4, generator=restored["noise"])]
    for a, b in zip(want, got):
        assert torch.equal(a, b)


def _segmented_run(tmp_path, steps, resume_from=None, save_at=None):
    """TBPTT training of a fresh tiny Llama; returns the per-step losses."""
    model = make_model("llama", layers=1, seed=0)
    seg = sc.transform(model, sc.SegmentConfig(S, sink_tokens=1, long_range=sc.HeadPlan.fraction(0.5), tbptt_k=1))
    optimizer = adamw(model)
    data = torch.Generator().manual_seed(21)
    torch.manual_seed(22)
    start = 0
    if resume_from is not None:
        start, _ = load_checkpoint(resume_from, model, optimizer, {"data": data})
    losses = []
    for step in range(start, steps):
        ids = torch.randint(0, VOCAB, (2, N), generator=data)
        labels = ids.masked_fill(torch.rand(ids.shape) < 0.2, -100)  # global RNG
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(seg.tbptt_backward(ids, labels)))
        optimizer.step()
        if save_at == step + 1:
            save_checkpoint(tmp_path / "ck", model, optimizer, step=step + 1, generators={"data": data})
    return losses


def test_interrupted_and_resumed_run_gives_the_same_losses(tmp_path):
    straight = _segmented_run(tmp_path, 6)
    first = _segmented_run(tmp_path, 3, save_at=3)
    torch.manual_seed(1234)  # whatever happened in between, the checkpoint's RNG state wins
    second = _segmented_run(tmp_path, 6, resume_from=tmp_path / "ck")
    assert first + second == straight
    assert len(set(straight)) == 6  # the losses really move


class Boom(RuntimeError):
    pass


def _fail_on(monkeypatch, function: str, file: str | None = None):
    """Interrupt ``ckpt.<function>`` (one of the checkpoint's file writers), for ``file`` only when given."""
    original = getattr(ckpt, function)

    def fail(path, *args, **kwargs):
        if file is None or Path(path).name == file:
            raise Boom(f"interrupted in {function}({path})")
        return original(path, *args, **kwargs)

    monkeypatch.setattr(ckpt, function, fail)


# Interrupted after the model file (and each file before the failing one) was written, and after
# every file was written but before the directory was synced and renamed.
@pytest.mark.parametrize(
    "function,file",
    [("write_safetensors", ckpt.OPTIMIZER_FILE), ("write_safetensors", ckpt.RNG_FILE),
     ("write_json", ckpt.TRAINER_FILE), ("write_json", ckpt.MANIFEST_FILE), ("fsync_dir", None)],
)
def test_interrupted_save_leaves_no_checkpoint(tmp_path, monkeypatch, function, file):
    model = make_model("plain", layers=1)
    _fail_on(monkeypatch, function, file)
    with pytest.raises(Boom):
        save_checkpoint(tmp_path / "ck", model, adamw(model), step=1)
    assert list(tmp_path.iterdir()) == []  # no target, and the temporary directory is gone


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model = make_model("plain", layers=1)
    save_checkpoint(tmp_path / "ck", model, adamw(model), step=1, extra={"run": "first"})
    _fail_on(monkeypatch, "write_json")
    with pytest.raises(Boom):
        save_checkpoint(tmp_path / "ck", model, adamw(model), step=2, extra={"run": "second"})
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]
    assert load_checkpoint(tmp_path / "ck", model, adamw(model)) == (1, {"run": "first"})


def test_save_replaces_an_existing_checkpoint(tmp_path):
    model = make_model("plain", layers=1)
    for step in (1, 2):
        save_checkpoint(tmp_path / "ck", model, adamw(model), step=step)
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == sorted(ckpt.FILES)
    assert load_checkpoint(tmp_path / "ck", model, adamw(model))[0] == 2


def test_no_pickle_in_the_files(tmp_path):
    model = make_model("plain", layers=1)
    optimizer = adamw(model)
    plain_step(model, optimizer, torch.Generator().manual_seed(0))
    save_checkpoint(tmp_path / "ck", model, optimizer, step=1, generators={"g": torch.Generator()})
    # Every file is either plain JSON or safetensors: an 8-byte header length, a JSON header, raw bytes.
    for path in (tmp_path / "ck").iterdir():
        data = path.read_bytes()
        if path.suffix == ".json":
            json.loads(data)
            continue
        size = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + size])
        end = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
        assert 8 + size + end == len(data), path  # nothing else hides in the file
    trainer = json.loads((tmp_path / "ck" / ckpt.TRAINER_FILE).read_text())
    assert trainer["format"] == ckpt.FORMAT and trainer["step"] == 1


def test_wrong_model_is_a_clear_error(tmp_path):
    model = make_model("plain", layers=1)
    save_checkpoint(tmp_path / "ck", model, adamw(model), step=1)

    deeper = make_model("plain", layers=2)
    before = params_of(deeper)
    with pytest.raises(sc.SegcompileError, match=r"made for another model.*missing from the checkpoint: layers\.1\."):
        load_checkpoint(tmp_path / "ck", deeper, adamw(deeper))
    assert_bitwise_equal(params_of(deeper), before)  # nothing was changed

    wider = make_model("llama", layers=1)
    with pytest.raises(sc.SegcompileError, match=r"made for another model.*LlamaForCausalLM.*not in the model"):
        load_checkpoint(tmp_path / "ck", wider, adamw(wider))

    from segcompile.testing.plain_decoder import tiny_plain_decoder

    other_vocab = tiny_plain_decoder(num_hidden_layers=1, vocab_size=VOCAB + 1)
    with pytest.raises(sc.SegcompileError, match=r"shapes differ: embed_tokens\.weight: checkpoint \(96, 64\), model \(97, 64\)"):
        load_checkpoint(tmp_path / "ck", other_vocab, adamw(other_vocab))


def test_wrong_optimizer_and_missing_generator_are_clear_errors(tmp_path):
    model = make_model("plain", layers=1)
    save_checkpoint(tmp_path / "ck", model, adamw(model), step=1, generators={"data": torch.Generator()})
    with pytest.raises(sc.SegcompileError, match=r"AdamW optimizer, not SGD"):
        load_checkpoint(tmp_path / "ck", model, torch.optim.SGD(model.parameters(), lr=0.1))
    two_groups = torch.optim.AdamW([{"params": [model.embed_tokens.weight]}, {"params": list(model.layers.parameters())}])
    with pytest.raises(sc.SegcompileError, match=r"parameters per group"):
        load_checkpoint(tmp_path / "ck", model, two_groups)
    with pytest.raises(sc.SegcompileError, match=r"no state for generator\(s\) \['eval'\]"):
        load_checkpoint(tmp_path / "ck", model, adamw(model), {"eval": torch.Generator()})


def test_missing_or_foreign_directory_is_a_clear_error(tmp_path):
    model = make_model("plain", layers=1)
    with pytest.raises(sc.SegcompileError, match=r"no checkpoint at"):
        load_checkpoint(tmp_path / "nothing", model, adamw(model))
    (tmp_path / "ck").mkdir()
    with pytest.raises(sc.SegcompileError, match=r"incomplete: trainer\.json is missing"):
        load_checkpoint(tmp_path / "ck", model, adamw(model))
    (tmp_path / "ck" / "trainer.json").write_text('{"format": "something-else"}')
    with pytest.raises(sc.SegcompileError, match=r"not a segcompile checkpoint"):
        load_checkpoint(tmp_path / "ck", model, adamw(model))


def test_extra_must_be_json(tmp_path):
    model = make_model("plain", layers=1)
    with pytest.raises(sc.SegcompileError, match=r"extra cannot be stored without pickle"):
        save_checkpoint(tmp_path / "ck", model, adamw(model), step=1, extra={"t": torch.zeros(1)})
    assert not (tmp_path / "ck").exists()


# ---- damage: the manifest, unreadable files, impossible steps ------------------------------------
def _saved(tmp_path):
    """A checkpoint after one step (the optimizer has state), and a fresh model and optimizer to load it into."""
    model = make_model("plain", layers=1)
    optimizer = adamw(model)
    plain_step(model, optimizer, torch.Generator().manual_seed(0))
    save_checkpoint(tmp_path / "ck", model, optimizer, step=3, generators={"data": torch.Generator()})
    fresh = make_model("plain", layers=1, seed=9)
    return tmp_path / "ck", fresh, adamw(fresh)


def _overwrite_tail(path: Path, n: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:-n] + bytes(b ^ 0xFF for b in data[-n:]))  # every byte changed


def _truncate(path: Path, n: int) -> None:
    path.write_bytes(path.read_bytes()[:-n])


def _edit_trainer(directory: Path, **fields) -> None:
    """Change trainer.json and its manifest entry, as a deliberate edit of both would."""
    trainer = json.loads((directory / ckpt.TRAINER_FILE).read_text())
    (directory / ckpt.TRAINER_FILE).write_text(json.dumps({**trainer, **fields}))
    manifest = json.loads((directory / ckpt.MANIFEST_FILE).read_text())
    data = (directory / ckpt.TRAINER_FILE).read_bytes()
    manifest["files"][ckpt.TRAINER_FILE] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (directory / ckpt.MANIFEST_FILE).write_text(json.dumps(manifest))


def _as_version_1(directory: Path) -> None:
    """What a save made before manifests left: no manifest.json, version 1."""
    (directory / ckpt.MANIFEST_FILE).unlink()
    trainer = json.loads((directory / ckpt.TRAINER_FILE).read_text())
    (directory / ckpt.TRAINER_FILE).write_text(json.dumps({**trainer, "version": 1}))


def test_manifest_lists_every_file(tmp_path):
    directory, _, _ = _saved(tmp_path)
    files = json.loads((directory / ckpt.MANIFEST_FILE).read_text())["files"]
    assert sorted(files) == sorted(set(ckpt.FILES) - {ckpt.MANIFEST_FILE})
    for name, entry in files.items():
        data = (directory / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


# The optimizer's moments with their last 1000 bytes overwritten loaded without complaint (the
# next steps logged "loss is nan"); a truncated model file was a raw SafetensorError.
@pytest.mark.parametrize(
    "damage,match",
    [
        (lambda d: _overwrite_tail(d / ckpt.OPTIMIZER_FILE, 1000), r"optimizer\.safetensors does not match its SHA-256"),
        (lambda d: _overwrite_tail(d / ckpt.RNG_FILE, 8), r"rng\.safetensors does not match its SHA-256"),
        (lambda d: _truncate(d / ckpt.MODEL_FILE, 100), r"model\.safetensors has [0-9,]+ bytes, manifest\.json says"),
        (lambda d: (d / ckpt.TRAINER_FILE).write_text((d / ckpt.TRAINER_FILE).read_text().replace('"step": 3', '"step": 30')),
         r"trainer\.json has [0-9,]+ bytes"),
        (lambda d: (d / ckpt.OPTIMIZER_FILE).unlink(), r"optimizer\.safetensors is missing"),
        (lambda d: (d / "stray.safetensors").write_bytes((d / ckpt.RNG_FILE).read_bytes()), r"stray\.safetensors is not in manifest\.json"),
    ],
    ids=["optimizer-overwritten", "rng-overwritten", "model-truncated", "step-edited", "file-missing", "file-added"],
)
def test_damaged_checkpoint_is_refused_before_anything_changes(tmp_path, damage, match):
    directory, fresh, optimizer = _saved(tmp_path)
    damage(directory)
    before = params_of(fresh)
    with pytest.raises(sc.SegcompileError, match=rf"checkpoint .*ck is damaged: {match}.*restore it from a copy"):
        load_checkpoint(directory, fresh, optimizer, {"data": torch.Generator()})
    assert_bitwise_equal(params_of(fresh), before)
    assert optimizer.state_dict()["state"] == {}


def test_damaged_or_missing_manifest_is_refused(tmp_path):
    directory, fresh, optimizer = _saved(tmp_path)
    (directory / ckpt.MANIFEST_FILE).write_text('{"files": {"../../elsewhere": {"size": 1, "sha256": "00"}}}')
    with pytest.raises(sc.SegcompileError, match=r"is damaged: manifest\.json has malformed entries \(\.\./\.\./elsewhere\)"):
        load_checkpoint(directory, fresh, optimizer)
    (directory / ckpt.MANIFEST_FILE).write_text("{not json")
    with pytest.raises(sc.SegcompileError, match=r"is damaged: manifest\.json cannot be read"):
        load_checkpoint(directory, fresh, optimizer)
    (directory / ckpt.MANIFEST_FILE).unlink()
    with pytest.raises(sc.SegcompileError, match=r"incomplete: manifest\.json is missing"):
        load_checkpoint(directory, fresh, optimizer)


def test_checkpoint_without_a_manifest_loads_with_a_warning(tmp_path):
    directory, fresh, optimizer = _saved(tmp_path)
    _as_version_1(directory)
    with pytest.warns(UserWarning, match=r"has no manifest \(version 1\): damaged files cannot be detected"):
        assert load_checkpoint(directory, fresh, optimizer, {"data": torch.Generator()})[0] == 3
    assert optimizer.state_dict()["state"]  # the moments were restored


@pytest.mark.parametrize("name", [ckpt.MODEL_FILE, ckpt.OPTIMIZER_FILE, ckpt.RNG_FILE])
def test_unreadable_file_without_a_manifest_is_a_clear_error(tmp_path, name):
    directory, fresh, optimizer = _saved(tmp_path)
    _as_version_1(directory)
    _truncate(directory / name, 100)
    before = params_of(fresh)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no manifest: expected here
        with pytest.raises(sc.SegcompileError, match=rf"checkpoint .*ck is damaged: {name} cannot be read \(SafetensorError"):
            load_checkpoint(directory, fresh, optimizer, {"data": torch.Generator()})
    assert_bitwise_equal(params_of(fresh), before)


# A step edited to -5 (trainer.json and its manifest entry alike) trained and logged steps -4, -3, ...
@pytest.mark.parametrize("step", [-5, 2.5, "3", True, None])
def test_impossible_step_is_refused_on_load(tmp_path, step):
    directory, fresh, optimizer = _saved(tmp_path)
    _edit_trainer(directory, step=step)
    with pytest.raises(sc.SegcompileError, match=rf"trainer\.json has step {re.escape(repr(step))}, not a whole number >= 0"):
        load_checkpoint(directory, fresh, optimizer)


def test_impossible_step_is_refused_on_save(tmp_path):
    model = make_model("plain", layers=1)
    for step in (-1, 2.5, True):
        with pytest.raises(sc.SegcompileError, match=r"step must be a whole number >= 0"):
            save_checkpoint(tmp_path / "ck", model, adamw(model), step=step)
    assert list(tmp_path.iterdir()) == []


def test_edited_trainer_fields_are_refused(tmp_path):
    directory, fresh, optimizer = _saved(tmp_path)
    _edit_trainer(directory, extra=[1, 2])
    with pytest.raises(sc.SegcompileError, match=r"trainer\.json has no 'extra' object"):
        load_checkpoint(directory, fresh, optimizer)


def test_damaged_sharded_checkpoint_is_refused(tmp_path, one_rank_group):
    directory, fresh, optimizer = _saved(tmp_path)
    files = json.loads((directory / ckpt.MANIFEST_FILE).read_text())["files"]
    shards = sorted(name for name in files if name.startswith((ckpt.MODEL_DIR + "/", ckpt.OPTIMIZER_DIR + "/")))
    assert shards and "rng.0.safetensors" in files and ckpt.TRAINER_FILE in files
    assert load_checkpoint(directory, fresh, optimizer, {"data": torch.Generator()})[0] == 3

    _overwrite_tail(directory / shards[-1], 1000)
    with pytest.raises(sc.SegcompileError, match=rf"is damaged: {re.escape(shards[-1])} does not match its SHA-256"):
        load_checkpoint(directory, fresh, optimizer, {"data": torch.Generator()})
