"""Training checkpoints: model, optimizer, step and RNG streams, with no pickle (DESIGN.md section 5).

A checkpoint is a directory:

    model.safetensors      the model's ``state_dict``; a tensor tied to another (shared
                           embeddings) is stored once and named in the file's metadata
    optimizer.safetensors  every tensor of ``optimizer.state_dict()["state"]`` as ``state.<idx>.<name>``
    rng.safetensors        uint8 RNG states: ``torch.cpu``, ``torch.cuda.<i>``, ``generator.<name>``
    trainer.json           format and version, step, the optimizer's param_groups and non-tensor
                           state values, the caller's ``extra`` (JSON), and what the RNG file holds

Saving writes everything into a hidden temporary sibling directory, fsyncs every file and the
directory, then renames it over the target (an existing checkpoint is renamed away first and
deleted last). An interrupted save therefore leaves either the previous checkpoint or none at
the target path, never a partial one; the temporary directory is removed on error.

Loading checks that the checkpoint fits the model and the optimizer (names, shapes, parameter
groups) before it changes anything, and raises ``SegcompileError`` when it does not.

Resuming with the same data order, RNG and optimizer state gives the same losses as a run that
was never interrupted, provided every random stream the loop draws from is either the global
torch RNG or one of the named ``generators`` (the CUDA RNG is restored on machines with CUDA).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .errors import SegcompileError

FORMAT = "segcompile-checkpoint"
VERSION = 1
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
TRAINER_FILE = "trainer.json"
FILES = (MODEL_FILE, OPTIMIZER_FILE, RNG_FILE, TRAINER_FILE)
_ALIASES_KEY = "segcompile.aliases"  # safetensors metadata: {alias name: stored name}


def save_checkpoint(
    directory: str | os.PathLike,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    step: int,
    extra: Mapping[str, Any] | None = None,
    generators: Mapping[str, torch.Generator] | None = None,
) -> Path:
    """Write a checkpoint of ``model``, ``optimizer``, ``step``, ``extra`` and the RNG states to ``directory``.

    ``extra`` must be JSON-serialisable (it goes into ``trainer.json``). ``generators``: named
    ``torch.Generator`` objects whose states are saved beside the global CPU (and CUDA) RNG.
    Replaces an existing checkpoint at ``directory`` atomically.
    """
    directory = Path(directory)
    generators = dict(generators or {})
    extra = dict(extra or {})
    trainer: dict[str, Any] = {"format": FORMAT, "version": VERSION, "step": int(step)}
    _check_json(extra, "extra")

    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.tmp-"))
    try:
        _save_model(model, tmp / MODEL_FILE)
        trainer["optimizer"] = _save_optimizer(optimizer, tmp / OPTIMIZER_FILE)
        trainer["rng"] = _save_rng(generators, tmp / RNG_FILE)
        trainer["extra"] = extra
        _write_json(tmp / TRAINER_FILE, trainer)
        _fsync_dir(tmp)
        _replace_dir(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def load_checkpoint(
    directory: str | os.PathLike,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    generators: Mapping[str, torch.Generator] | None = None,
) -> tuple[int, dict[str, Any]]:
    """Restore ``model``, ``optimizer`` and the RNG states from ``directory``; return ``(step, extra)``.

    Every named generator in ``generators`` must be in the checkpoint; its state is set in place.
    Nothing is modified unless the checkpoint fits the model and the optimizer.
    """
    directory = Path(directory)
    trainer = _read_trainer(directory)
    state_dict = _read_model(directory / MODEL_FILE, model)
    optimizer_state = _read_optimizer(directory / OPTIMIZER_FILE, trainer["optimizer"], optimizer) if optimizer else None
    rng = _read_rng(directory / RNG_FILE, trainer["rng"], generators or {})

    # Everything was checked: apply.
    model.load_state_dict(state_dict, strict=True)
    if optimizer is not None:
        optimizer.load_state_dict(optimizer_state)
    torch.set_rng_state(rng["torch.cpu"])
    if torch.cuda.is_available():
        for i in range(min(trainer["rng"]["cuda_devices"], torch.cuda.device_count())):
            torch.cuda.set_rng_state(rng[f"torch.cuda.{i}"], i)
    for name, generator in (generators or {}).items():
        generator.set_state(rng[f"generator.{name}"])
    return trainer["step"], trainer["extra"]


# ---- model ------------------------------------------------------------------------------------
def _save_model(model: torch.nn.Module, path: Path) -> None:
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach()
        view = (
            tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(),
            tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype,
        )
        if tensor.numel() and view in seen:  # tied weights: one tensor under two names
            aliases[name] = seen[view]
            continue
        seen[view] = name
        # clone: a view into a larger storage (or one overlapping another tensor) is stored on its own
        tensors[name] = tensor.to("cpu", copy=True).contiguous()
    _write_safetensors(path, tensors, {_ALIASES_KEY: json.dumps(aliases, sort_keys=True)})


def _read_model(path: Path, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    _require(path)
    with safe_open(str(path), framework="pt") as f:
        aliases = json.loads((f.metadata() or {}).get(_ALIASES_KEY, "{}"))
    stored = load_file(str(path))
    state_dict = {**stored, **{alias: stored[kept] for alias, kept in aliases.items() if kept in stored}}

    want = model.state_dict()
    missing = sorted(set(want) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(want))
    mismatched = [
        f"{name}: checkpoint {tuple(state_dict[name].shape)}, model {tuple(want[name].shape)}"
        for name in want
        if name in state_dict and state_dict[name].shape != want[name].shape
    ]
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f"missing from the checkpoint: {_few(missing)}")
        if unexpected:
            problems.append(f"not in the model: {_few(unexpected)}")
        if mismatched:
            problems.append(f"shapes differ: {_few(mismatched)}")
        raise SegcompileError(
            f"checkpoint {path.parent} was made for another model ({type(model).__name__} does not match): "
            + "; ".join(problems)
            + ". Load it into the model it was saved from, or start a new run in another directory"
        )
    return state_dict


# ---- optimizer --------------------------------------------------------------------------------
def _save_optimizer(optimizer: torch.optim.Optimizer, path: Path) -> dict[str, Any]:
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    values: dict[str, dict[str, Any]] = {}
    for index, entries in sd["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{name}"] = value.detach().to("cpu", copy=True).contiguous()
            else:
                _check_json(value, f"optimizer state {index}.{name}")
                values.setdefault(str(index), {})[name] = value
    groups = []
    for i, group in enumerate(sd["param_groups"]):
        plain = {}
        for key, value in group.items():
            if isinstance(value, torch.Tensor):  # e.g. a tensor learning rate
                tensors[f"param_groups.{i}.{key}"] = value.detach().to("cpu", copy=True).contiguous()
            else:
                _check_json(value, f"optimizer param_groups[{i}][{key!r}]")
                plain[key] = value
        groups.append(plain)
    _write_safetensors(path, tensors, {})
    return {"class": type(optimizer).__name__, "param_groups": groups, "state_values": values}


def _read_optimizer(path: Path, saved: dict[str, Any], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    _require(path)
    tensors = load_file(str(path))
    if saved["class"] != type(optimizer).__name__:
        raise SegcompileError(
            f"checkpoint {path.parent} holds the state of a {saved['class']} optimizer, not {type(optimizer).__name__}: "
            "resume with the optimizer it was saved with"
        )
    current = optimizer.state_dict()["param_groups"]
    shape = [len(g["params"]) for g in saved["param_groups"]]
    want = [len(g["params"]) for g in current]
    if shape != want:
        raise SegcompileError(
            f"checkpoint {path.parent} was made for an optimizer over other parameters: parameters per group "
            f"{shape} in the checkpoint, {want} in this optimizer; was it saved from another model?"
        )

    state: dict[int, dict[str, Any]] = {}
    groups = [dict(g) for g in saved["param_groups"]]
    for key, value in tensors.items():
        kind, index, name = key.split(".", 2)
        if kind == "state":
            state.setdefault(int(index), {})[name] = value
        else:
            groups[int(index)][name] = value
    for index, entries in saved["state_values"].items():
        state.setdefault(int(index), {}).update(entries)
    for group, template in zip(groups, current):  # JSON has no tuples: give back e.g. betas=(0.9, 0.999)
        for key, value in group.items():
            if isinstance(template.get(key), tuple) and isinstance(value, list):
                group[key] = tuple(value)
    return {"state": state, "param_groups": groups}


# ---- RNG --------------------------------------------------------------------------------------
def _save_rng(generators: Mapping[str, torch.Generator], path: Path) -> dict[str, Any]:
    states = {"torch.cpu": torch.get_rng_state()}
    cuda_devices = 0
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            states[f"torch.cuda.{i}"] = s
        cuda_devices = torch.cuda.device_count()
    for name, generator in generators.items():
        if not isinstance(generator, torch.Generator):
            raise SegcompileError(f"generators[{name!r}] must be a torch.Generator, got {type(generator).__name__}")
        states[f"generator.{name}"] = generator.get_state()
    _write_safetensors(path, {k: v.contiguous() for k, v in states.items()}, {})
    return {"cuda_devices": cuda_devices, "generators": sorted(generators)}


def _read_rng(path: Path, saved: dict[str, Any], generators: Mapping[str, torch.Generator]) -> dict[str, torch.Tensor]:
    _require(path)
    states = load_file(str(path))
    missing = sorted(name for name in generators if f"generator.{name}" not in states)
    if missing:
        raise SegcompileError(
            f"checkpoint {path.parent} has no state for generator(s) {missing}; it saved {saved['generators']}"
        )
    return states


# ---- files ------------------------------------------------------------------------------------
def _read_trainer(directory: Path) -> dict[str, Any]:
    path = directory / TRAINER_FILE
    if not directory.is_dir():
        leftovers = sorted(p.name for p in directory.parent.glob(f".{directory.name}.old-*"))
        hint = (
            f"; an interrupted save left the previous checkpoint at {leftovers[-1]} beside it: rename it to {directory.name}"
            if leftovers
            else ""
        )
        raise SegcompileError(f"no checkpoint at {directory}{hint}")
    _require(path)
    try:
        trainer = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise SegcompileError(f"checkpoint {directory}: cannot read {TRAINER_FILE}: {e}") from e
    if trainer.get("format") != FORMAT:
        raise SegcompileError(f"{directory} is not a segcompile checkpoint ({TRAINER_FILE} format {trainer.get('format')!r})")
    if trainer.get("version") != VERSION:
        raise SegcompileError(
            f"checkpoint {directory} has version {trainer.get('version')!r}; this segcompile reads version {VERSION}"
        )
    return trainer


def _require(path: Path) -> None:
    if not path.is_file():
        raise SegcompileError(f"checkpoint {path.parent} is incomplete: {path.name} is missing")


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    save_file(tensors, str(path), metadata=metadata or None)
    _fsync_file(path)


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True, allow_nan=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _check_json(value: Any, what: str) -> None:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise SegcompileError(
            f"{what} cannot be stored without pickle: {e}. Use JSON values (numbers, strings, lists, dicts)"
        ) from e


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    if os.name == "nt":  # directories cannot be opened for fsync on Windows
        return
    _fsync_file(path)


def _replace_dir(new: Path, target: Path) -> None:
    """Rename ``new`` to ``target``; an existing ``target`` is renamed away first and deleted last."""
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
        os.rmdir(old)
        os.rename(target, old)
    try:
        os.rename(new, target)
    except BaseException:
        if old is not None:
            os.rename(old, target)
        raise
    _fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _few(items: list[str], n: int = 5) -> str:
    shown = ", ".join(items[:n])
    return shown + (f" and {len(items) - n} more" if len(items) > n else "")
