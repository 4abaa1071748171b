"""Training checkpoints: model, optimizer, step and RNG streams, with no pickle (docs/design.md section 5).

A checkpoint is a directory:

    model.safetensors      the model's ``state_dict``; a tensor tied to another (shared
                           embeddings) is stored once and named in the file's metadata
    optimizer.safetensors  every tensor of ``optimizer.state_dict()["state"]`` as ``state.<idx>.<name>``
    rng.safetensors        uint8 RNG states: ``torch.cpu``, ``torch.cuda.<i>``, ``generator.<name>``
    trainer.json           format and version, step, the optimizer's param_groups and non-tensor
                           state values, the caller's ``extra`` (JSON), and what the RNG file holds
    manifest.json          every other file's size and SHA-256, written last

Saving writes everything into a hidden temporary sibling directory, fsyncs every file and the
directory, then renames it over the target (an existing checkpoint is renamed away first and
deleted last). An interrupted save therefore leaves either the previous checkpoint or none at
the target path, never a partial one; the temporary directory is removed on error.

Loading checks that the checkpoint fits the model and the optimizer (names, shapes, parameter
groups) before it changes anything, and raises ``SegcompileError`` when it does not.

**Damage.** Loading first checks every file against the manifest (size, then SHA-256) and refuses
a checkpoint whose bytes changed after the save (a truncated copy, an overwritten block, an
edited ``trainer.json``) with a ``SegcompileError`` naming the file: a changed optimizer moment
otherwise loads without complaint and the run goes on from wrong numbers. A file that cannot be
parsed, and a ``trainer.json`` whose step is not a whole number >= 0, are refused too. Version 1
checkpoints (written before manifests) still load, with a warning: only their structure can be
checked.

Resuming with the same data order, RNG and optimizer state gives the same losses as a run that
was never interrupted, provided every random stream the loop draws from is either the global
torch RNG or one of the named ``generators`` (the CUDA RNG is restored on machines with CUDA).

**Sharded layout.** While a ``torch.distributed`` process group is initialized (a run under
torchrun, with ``segcompile.distributed``), every rank calls ``save_checkpoint`` and
``load_checkpoint`` with its own (sharded or replicated) model and optimizer, and the directory is

    model/                 torch.distributed.checkpoint (DCP) of ``get_model_state_dict(model)``:
                           one safetensors file per rank holding its shards, their offsets in the
                           file's metadata (DCP's HuggingFaceStorageWriter); a replicated tensor is
                           written by one rank; a tensor the model lists under several names
                           (tied weights) is stored once, under its first name
    optimizer/             the same for every tensor of ``get_optimizer_state_dict``, named
                           ``state.<parameter name>.<name>``
    rng.<rank>.safetensors each rank's RNG streams (each rank draws its own data)
    trainer.json           as above, with ``"layout": "sharded"`` and the world size
    manifest.json          as above, over every file of every rank (each rank hashes a share)

No file holds pickle (DCP's default writer pickles its metadata; this one does not). Rank 0 makes
the temporary directory, every rank writes its part into it, and rank 0 renames it after all
have succeeded, so the atomicity above holds; the ranks must share the filesystem. Loading needs
the same number of ranks (the RNG streams are per rank); DCP reads the shards into whatever
sharding the model has now.
"""

from __future__ import annotations

import hashlib
import json
import operator
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..errors import SegcompileError
from ..files import fsync_file

FORMAT = "segcompile-checkpoint"
VERSION = 2  # 2: with manifest.json
UNCHECKED_VERSION = 1  # written before manifests: loaded, but its bytes cannot be checked
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
TRAINER_FILE = "trainer.json"
MANIFEST_FILE = "manifest.json"
FILES = (MODEL_FILE, OPTIMIZER_FILE, RNG_FILE, TRAINER_FILE, MANIFEST_FILE)
ALIASES_KEY = "segcompile.aliases"  # safetensors metadata: {alias name: stored name}
SHARDED = "sharded"  # trainer.json "layout" of a checkpoint written by several ranks
MODEL_DIR, OPTIMIZER_DIR = "model", "optimizer"


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
    trainer: dict[str, Any] = {"format": FORMAT, "version": VERSION, "step": _checked_step(step)}
    _check_json(extra, "extra")
    if _distributed():
        return _save_sharded(directory, model, optimizer, trainer, extra, generators)

    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.tmp-"))
    try:
        _save_model(model, tmp / MODEL_FILE)
        trainer["optimizer"] = _save_optimizer(optimizer, tmp / OPTIMIZER_FILE)
        trainer["rng"] = _save_rng(generators, tmp / RNG_FILE)
        trainer["extra"] = extra
        write_json(tmp / TRAINER_FILE, trainer)
        _write_manifest(tmp, {name: _describe_file(tmp / name) for name in _files_under(tmp)})
        fsync_dir(tmp)
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
    Nothing is modified unless the checkpoint is intact (its manifest) and fits the model and the
    optimizer.
    """
    directory = Path(directory)
    trainer = _read_trainer(directory)
    sharded = trainer.get("layout") == SHARDED
    if sharded != _distributed():
        raise SegcompileError(
            f"checkpoint {directory} was written by "
            + (f"{trainer.get('world_size')} ranks: load it under torchrun with as many" if sharded else "one process: load it without a process group")
        )
    _verify_files(directory, trainer)
    _check_trainer_fields(directory, trainer)
    if sharded:
        return _load_sharded(directory, trainer, model, optimizer, generators or {})
    state_dict = _read_model(directory / MODEL_FILE, model)
    optimizer_state = _read_optimizer(directory / OPTIMIZER_FILE, trainer["optimizer"], optimizer) if optimizer else None
    rng = _read_rng(directory / RNG_FILE, trainer["rng"], generators or {})

    # Everything was checked: apply.
    model.load_state_dict(state_dict, strict=True)
    if optimizer is not None:
        optimizer.load_state_dict(optimizer_state)
    _set_rng(rng, trainer["rng"], generators or {})
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
    write_safetensors(path, tensors, {ALIASES_KEY: json.dumps(aliases, sort_keys=True)})


def _read_model(path: Path, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    _require(path)
    with _unreadable_as_damage(path):
        with safe_open(str(path), framework="pt") as f:
            aliases = json.loads((f.metadata() or {}).get(ALIASES_KEY, "{}"))
        stored = load_file(str(path))
    state_dict = {**stored, **{alias: stored[kept] for alias, kept in aliases.items() if kept in stored}}

    _check_shapes(path.parent, model, {n: t.shape for n, t in model.state_dict().items()}, {n: t.shape for n, t in state_dict.items()})
    return state_dict


def _check_shapes(directory: Path, model: torch.nn.Module, want: dict[str, torch.Size], stored: dict[str, torch.Size]) -> None:
    missing = sorted(set(want) - set(stored))
    unexpected = sorted(set(stored) - set(want))
    mismatched = [
        f"{name}: checkpoint {tuple(stored[name])}, model {tuple(want[name])}"
        for name in want
        if name in stored and tuple(stored[name]) != tuple(want[name])
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
            f"checkpoint {directory} was made for another model ({type(model).__name__} does not match): "
            + "; ".join(problems)
            + ". Load it into the model it was saved from, or start a new run in another directory"
        )


# ---- optimizer --------------------------------------------------------------------------------
def _save_optimizer(optimizer: torch.optim.Optimizer, path: Path) -> dict[str, Any]:
    tensors, saved = _split_optimizer_state(optimizer.state_dict(), optimizer)
    write_safetensors(path, {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}, {})
    return saved


def _split_optimizer_state(sd: dict[str, Any], optimizer: torch.optim.Optimizer):
    """The tensors of an optimizer state dict (``state.<key>.<name>``, ``param_groups.<i>.<name>``)
    and the JSON rest; ``<key>`` is the parameter's index, or its name in a sharded checkpoint."""
    tensors: dict[str, torch.Tensor] = {}
    values: dict[str, dict[str, Any]] = {}
    for index, entries in sd["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{name}"] = value
            else:
                _check_json(value, f"optimizer state {index}.{name}")
                values.setdefault(str(index), {})[name] = value
    groups = []
    for i, group in enumerate(sd["param_groups"]):
        plain = {}
        for key, value in group.items():
            if isinstance(value, torch.Tensor):  # e.g. a tensor learning rate
                tensors[f"param_groups.{i}.{key}"] = value
            else:
                _check_json(value, f"optimizer param_groups[{i}][{key!r}]")
                plain[key] = value
        groups.append(plain)
    return tensors, {"class": type(optimizer).__name__, "param_groups": groups, "state_values": values}


def _read_optimizer(path: Path, saved: dict[str, Any], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    _require(path)
    with _unreadable_as_damage(path):
        tensors = load_file(str(path))
    current = optimizer.state_dict()["param_groups"]
    _check_optimizer(path.parent, saved, current, optimizer)
    return _join_optimizer_state(tensors, saved, current, int)


def _check_optimizer(directory: Path, saved: dict[str, Any], current: list[dict], optimizer) -> None:
    if saved["class"] != type(optimizer).__name__:
        raise SegcompileError(
            f"checkpoint {directory} holds the state of a {saved['class']} optimizer, not {type(optimizer).__name__}: "
            "resume with the optimizer it was saved with"
        )
    shape = [len(g["params"]) for g in saved["param_groups"]]
    want = [len(g["params"]) for g in current]
    if shape != want:
        raise SegcompileError(
            f"checkpoint {directory} was made for an optimizer over other parameters: parameters per group "
            f"{shape} in the checkpoint, {want} in this optimizer; was it saved from another model?"
        )


def _join_optimizer_state(tensors: dict[str, torch.Tensor], saved: dict[str, Any], current: list[dict], key_type) -> dict[str, Any]:
    state: dict[Any, dict[str, Any]] = {}
    groups = [dict(g) for g in saved["param_groups"]]
    for key, value in tensors.items():
        kind, rest = key.split(".", 1)
        index, name = rest.rsplit(".", 1)  # a parameter name has dots; a state entry's name has none
        if kind == "state":
            state.setdefault(key_type(index), {})[name] = value
        else:
            groups[int(index)][name] = value
    for index, entries in saved["state_values"].items():
        state.setdefault(key_type(index), {}).update(entries)
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
    write_safetensors(path, {k: v.contiguous() for k, v in states.items()}, {})
    return {"cuda_devices": cuda_devices, "generators": sorted(generators)}


def _set_rng(rng: dict[str, torch.Tensor], saved: dict[str, Any], generators: Mapping[str, torch.Generator]) -> None:
    torch.set_rng_state(rng["torch.cpu"])
    if torch.cuda.is_available():
        for i in range(min(saved["cuda_devices"], torch.cuda.device_count())):
            torch.cuda.set_rng_state(rng[f"torch.cuda.{i}"], i)
    for name, generator in generators.items():
        generator.set_state(rng[f"generator.{name}"])


def _read_rng(path: Path, saved: dict[str, Any], generators: Mapping[str, torch.Generator]) -> dict[str, torch.Tensor]:
    _require(path)
    with _unreadable_as_damage(path):
        states = load_file(str(path))
    missing = sorted(name for name in generators if f"generator.{name}" not in states)
    if missing:
        raise SegcompileError(
            f"checkpoint {path.parent} has no state for generator(s) {missing}; it saved {saved['generators']}"
        )
    return states


# ---- sharded layout ---------------------------------------------------------------------------
def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _save_sharded(directory: Path, model, optimizer, trainer: dict[str, Any], extra, generators) -> Path:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    rank = dist.get_rank()
    tmp = _shared_temporary_dir(directory, rank)
    try:
        tensors, trainer["optimizer"] = _split_optimizer_state(get_optimizer_state_dict(model, optimizer), optimizer)
        # Collective: a failure on any rank raises on every rank.
        dcp.save(_without_aliases(get_model_state_dict(model), model), storage_writer=_writer(tmp / MODEL_DIR))
        dcp.save(tensors, storage_writer=_writer(tmp / OPTIMIZER_DIR))
        failure = None
        try:
            trainer["rng"] = _save_rng(generators, tmp / _rng_file(rank))
        except Exception as e:  # noqa: BLE001 - re-raised below, after the other ranks know
            failure = e
        if not _all_ranks(failure is None):
            raise failure or SegcompileError(f"checkpoint {directory}: another rank failed to write its part")
        described = _describe_files_collectively(tmp, rank)
        if rank == 0:
            trainer.update(layout=SHARDED, world_size=dist.get_world_size(), extra=extra)
            write_json(tmp / TRAINER_FILE, trainer)
            _write_manifest(tmp, {**described, TRAINER_FILE: _describe_file(tmp / TRAINER_FILE)})
            for d in (tmp / MODEL_DIR, tmp / OPTIMIZER_DIR, tmp):
                fsync_dir(d)
            _replace_dir(tmp, directory)
        dist.barrier()  # no rank returns before the checkpoint is in place
    except BaseException:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _load_sharded(directory: Path, trainer: dict[str, Any], model, optimizer, generators) -> tuple[int, dict[str, Any]]:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict,
    )

    if trainer["world_size"] != dist.get_world_size():
        raise SegcompileError(
            f"checkpoint {directory} was written by {trainer['world_size']} ranks, this run has "
            f"{dist.get_world_size()}: resume with as many (each rank's data stream and RNG are in it)"
        )
    model_state = _without_aliases(get_model_state_dict(model), model)
    model_reader = HuggingFaceStorageReader(str(_require_dir(directory / MODEL_DIR)))
    _check_shapes(directory, model, {n: t.shape for n, t in model_state.items()}, _stored_shapes(model_reader, directory / MODEL_DIR))
    if optimizer is not None:
        _check_optimizer(directory, trainer["optimizer"], optimizer.state_dict()["param_groups"], optimizer)
        current = get_optimizer_state_dict(model, optimizer)  # makes the state entries a fresh optimizer lacks
        tensors, _ = _split_optimizer_state(current, optimizer)
        optimizer_reader = HuggingFaceStorageReader(str(_require_dir(directory / OPTIMIZER_DIR)))
        _check_shapes(directory / OPTIMIZER_DIR, model, {n: t.shape for n, t in tensors.items()}, _stored_shapes(optimizer_reader, directory / OPTIMIZER_DIR))
    rng_path = directory / _rng_file(dist.get_rank())
    rng = _read_rng(rng_path, trainer["rng"], generators)

    # Everything was checked: apply (DCP reads into the tensors of the state dicts, in place).
    dcp.load(model_state, storage_reader=model_reader)
    aliases = _alias_names(model)
    set_model_state_dict(model, {**model_state, **{alias: model_state[kept] for alias, kept in aliases.items()}})
    if optimizer is not None:
        dcp.load(tensors, storage_reader=optimizer_reader)
        state = _join_optimizer_state(tensors, trainer["optimizer"], current["param_groups"], str)
        set_optimizer_state_dict(model, optimizer, state)
    _set_rng(rng, trainer["rng"], generators)
    return trainer["step"], trainer["extra"]


def _without_aliases(state: dict[str, torch.Tensor], model) -> dict[str, torch.Tensor]:
    """``state`` with every tensor once, under its first name: a safetensors file refuses a tensor
    stored twice (tied weights; a SegmentedModel's step-graph variants, which share its parameters)."""
    aliases = _alias_names(model)
    return {name: tensor for name, tensor in state.items() if name not in aliases}


def _alias_names(model) -> dict[str, str]:
    """``{name: first name}`` of every parameter or buffer that ``model`` lists under more than one
    name. From the module tree, not from the tensors' storage: the same on every rank, whatever
    each rank's shard holds."""
    first: dict[int, str] = {}
    aliases = {}
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for name, tensor in named:
        if id(tensor) in first:
            aliases[name] = first[id(tensor)]
        else:
            first[id(tensor)] = name
    return aliases


def _writer(path: Path):
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    # safetensors files, one per rank, with the shards' offsets in their metadata; no pickle
    return HuggingFaceStorageWriter(str(path), save_distributed=True)


def _stored_shapes(reader, directory: Path) -> dict[str, torch.Size]:
    with _unreadable_as_damage(directory):
        return {name: meta.size for name, meta in reader.read_metadata().state_dict_metadata.items()}


def _shared_temporary_dir(directory: Path, rank: int) -> Path:
    """A temporary sibling of ``directory`` made by rank 0; every rank gets its name."""
    import torch.distributed as dist

    name = [None]
    if rank == 0:
        directory.parent.mkdir(parents=True, exist_ok=True)
        name[0] = tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.tmp-")
    dist.broadcast_object_list(name, src=0)
    return Path(name[0])


def _all_ranks(ok: bool) -> bool:
    import torch.distributed as dist

    flag = torch.tensor([int(ok)], device=_collective_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _collective_device() -> torch.device:
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _rng_file(rank: int) -> str:
    return f"rng.{rank}.safetensors"


def _require_dir(path: Path) -> Path:
    if not path.is_dir():
        raise SegcompileError(f"checkpoint {path.parent} is incomplete: {path.name}/ is missing")
    return path


# ---- manifest ---------------------------------------------------------------------------------
# manifest.json: {"files": {relative path: {"size": bytes, "sha256": hex digest}}} for every file
# but itself, written after all of them. Under a process group each rank hashes (and checks) a
# share of the files, so that the time grows with the largest rank's share, not with the total.
HASH_CHUNK_BYTES = 1 << 20


def _describe_file(path: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return {"size": path.stat().st_size, "sha256": digest.hexdigest()}


def _write_manifest(directory: Path, files: dict[str, dict[str, Any]]) -> None:
    write_json(directory / MANIFEST_FILE, {"files": dict(sorted(files.items()))})


def _files_under(directory: Path) -> list[str]:
    """Every file in ``directory`` and below but the manifest, as sorted relative POSIX paths."""
    return sorted(
        path.relative_to(directory).as_posix()
        for path in directory.rglob("*")
        if path.is_file() and path != directory / MANIFEST_FILE
    )


def _describe_files_collectively(directory: Path, rank: int) -> dict[str, dict[str, Any]]:
    """Every rank calls this: rank 0 lists the files (all ranks have written theirs), each rank
    hashes every world-size-th one, and every rank gets the whole description."""
    import torch.distributed as dist

    names = [_files_under(directory) if rank == 0 else None]
    dist.broadcast_object_list(names, src=0)
    mine: dict[str, dict[str, Any]] = {}
    failure = None
    try:
        for name in names[0][rank :: dist.get_world_size()]:
            mine[name] = _describe_file(directory / name)
    except OSError as e:  # raised below on every rank: one rank raising alone would leave the others waiting
        failure = f"rank {rank} could not read {e.filename}: {e.strerror}"
    parts = _gathered((mine, failure))
    failures = [f for _, f in parts if f]
    if failures:
        raise SegcompileError(f"checkpoint {directory}: cannot hash the files just written: {'; '.join(failures)}")
    return {name: entry for part, _ in parts for name, entry in part.items()}


def _verify_files(directory: Path, trainer: dict[str, Any]) -> None:
    """Refuse a checkpoint whose files differ from its manifest (every rank calls this under a
    process group, and every rank raises the same error)."""
    manifest = _read_manifest(directory, trainer)
    if manifest is None:
        return
    rank, ranks = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if _distributed() else (0, 1)
    problems = _size_problems(directory, manifest)
    to_hash = [name for name in sorted(manifest) if name not in problems]
    for name in to_hash[rank::ranks]:
        problem = _hash_problem(directory / name, manifest[name]["sha256"])
        if problem:
            problems[name] = f"{name} {problem}"
    found = sorted(problems.values())
    if ranks > 1:
        found = sorted({p for part in _gathered(found) for p in part})
    if found:
        raise _damaged(directory, "; ".join(found) + ". Its files changed after the save (a truncated copy, a disk error, an edit)")


def _size_problems(directory: Path, manifest: dict[str, dict[str, Any]]) -> dict[str, str]:
    """{file: problem} for missing, truncated or extended files (cheap: nothing is read), and for
    safetensors files the save did not write (DCP's reader reads every one in model/ and optimizer/)."""
    problems = {}
    for name, entry in manifest.items():
        path = directory / name
        if not path.is_file():
            problems[name] = f"{name} is missing"
        elif path.stat().st_size != entry["size"]:
            problems[name] = f"{name} has {path.stat().st_size:,} bytes, {MANIFEST_FILE} says {entry['size']:,}"
    for name in _files_under(directory):
        if name.endswith(".safetensors") and name not in manifest:
            problems[name] = f"{name} is not in {MANIFEST_FILE} (the save did not write it: remove it)"
    return problems


def _hash_problem(path: Path, sha256: str) -> str | None:
    try:
        if _describe_file(path)["sha256"] == sha256:
            return None
    except OSError as e:  # a problem, not a raise: under a process group the other ranks are waiting
        return f"cannot be read ({e.strerror})"
    return f"does not match its SHA-256 in {MANIFEST_FILE}"


def _read_manifest(directory: Path, trainer: dict[str, Any]) -> dict[str, dict[str, Any]] | None:
    if trainer["version"] == UNCHECKED_VERSION:
        warnings.warn(
            f"checkpoint {directory} has no manifest (version {UNCHECKED_VERSION}): damaged files cannot be "
            "detected, only a wrong structure; the next save writes one",
            stacklevel=4,  # load_checkpoint's caller
        )
        return None
    path = directory / MANIFEST_FILE
    _require(path)
    try:
        files = json.loads(path.read_text(encoding="utf-8"))["files"]
        manifest = {name: {"size": entry["size"], "sha256": entry["sha256"]} for name, entry in files.items()}
        bad = [n for n, e in manifest.items() if not _inside(n) or type(e["size"]) is not int or not isinstance(e["sha256"], str)]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise _damaged(directory, f"{MANIFEST_FILE} cannot be read ({type(e).__name__}: {e})") from e
    if bad:
        raise _damaged(directory, f"{MANIFEST_FILE} has malformed entries ({_few(bad)})")
    if TRAINER_FILE not in manifest:  # every save lists it: an empty manifest would check nothing
        raise _damaged(directory, f"{MANIFEST_FILE} does not list {TRAINER_FILE}")
    return manifest


def _inside(name: str) -> bool:
    """A relative path that stays inside the checkpoint (the manifest names no other files)."""
    parts = Path(name).parts
    return bool(parts) and not Path(name).is_absolute() and ".." not in parts


def _gathered(obj: Any) -> list[Any]:
    import torch.distributed as dist

    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, obj)
    return parts


@contextmanager
def _unreadable_as_damage(path: Path) -> Iterator[None]:
    """A safetensors file (or DCP folder of them) that does not parse is a damaged checkpoint,
    not a traceback from the library (a version 1 checkpoint has no manifest to catch it first)."""
    try:
        yield
    except (SafetensorError, OSError, ValueError, KeyError) as e:
        raise _damaged(path.parent, f"{path.name} cannot be read ({type(e).__name__}: {e})") from e


def _damaged(directory: Path, problem: str) -> SegcompileError:
    return SegcompileError(
        f"checkpoint {directory} is damaged: {problem}; restore it from a copy, or resume from an earlier checkpoint"
    )


# ---- files ------------------------------------------------------------------------------------
# Every file of a checkpoint is written by write_safetensors or write_json, and fsynced; the
# directories by fsync_dir. Public so that a test can interrupt a save at any of them.
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
    if trainer.get("version") not in (UNCHECKED_VERSION, VERSION):
        raise SegcompileError(
            f"checkpoint {directory} has version {trainer.get('version')!r}; "
            f"this segcompile reads versions {UNCHECKED_VERSION} and {VERSION}"
        )
    return trainer


def _check_trainer_fields(directory: Path, trainer: dict[str, Any]) -> None:
    """Refuse a ``trainer.json`` that parses but cannot be right: a loop resumed at step -5 (or
    2.5) would log and schedule steps that never happened."""
    step = trainer.get("step")
    if type(step) is not int or step < 0:  # not isinstance: JSON true is a bool, and a bool is an int
        raise SegcompileError(
            f"checkpoint {directory}: {TRAINER_FILE} has step {step!r}, not a whole number >= 0; the file was "
            "edited or damaged: restore it from a copy, or start a new run in another directory"
        )
    for key in ("optimizer", "rng", "extra"):
        if not isinstance(trainer.get(key), dict):
            raise SegcompileError(
                f"checkpoint {directory}: {TRAINER_FILE} has no {key!r} object; the file was edited or damaged: "
                "restore it from a copy, or start a new run in another directory"
            )


def _checked_step(step: Any) -> int:
    if isinstance(step, bool):
        step = None  # True is an int to Python; as a step it is a mistake
    try:
        value = operator.index(step)
    except TypeError:
        raise SegcompileError(f"save_checkpoint: step must be a whole number >= 0, got {step!r}") from None
    if value < 0:
        raise SegcompileError(f"save_checkpoint: step must be a whole number >= 0, got {value}")
    return value


def _require(path: Path) -> None:
    if not path.is_file():
        raise SegcompileError(f"checkpoint {path.parent} is incomplete: {path.name} is missing")


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    save_file(tensors, str(path), metadata=metadata or None)
    fsync_file(path)


def write_json(path: Path, obj: Any) -> None:
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


def fsync_dir(path: Path) -> None:
    if os.name == "nt":  # directories cannot be opened for fsync on Windows
        return
    fsync_file(path)


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
    fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _few(items: list[str], n: int = 5) -> str:
    shown = ", ".join(items[:n])
    return shown + (f" and {len(items) - n} more" if len(items) > n else "")
