"""``HeadPlan``: which KV heads of which layers are long-range (docs/design.md section 1).

A plan is either symbolic (``all``, ``none``, ``fraction``, ``layers``), resolved against a
model's shape when it is transformed, or explicit (``from_dict``). Resolution validates the plan
against the model: a layer or KV head that does not exist is a ``PlanError``, never remapped.
Plans travel as JSON files that carry the fingerprint of the model they were made for.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import PlanError
from .files import atomic_write_text

PLAN_FORMAT = "segcompile.headplan"
PLAN_VERSION = 1

Resolved = dict[int, tuple[int, ...]]


def model_fingerprint(architecture: str, kv_heads_per_layer: Sequence[int]) -> dict[str, Any]:
    """What a plan file records about the model it was made for."""
    return {
        "architecture": architecture,
        "num_layers": len(kv_heads_per_layer),
        "kv_heads": list(kv_heads_per_layer),
    }


@dataclass(frozen=True)
class HeadPlan:
    kind: str
    fraction_value: float | None = None
    layer_list: tuple[int, ...] = ()
    heads: Mapping[int, tuple[int, ...]] = field(default_factory=dict)
    method: str | None = None
    fingerprint: Mapping[str, Any] | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    # ---- constructors ---------------------------------------------------------------------
    @classmethod
    def all(cls) -> HeadPlan:
        """Every KV head long-range: the segmented model equals full attention in the forward."""
        return cls("all")

    @classmethod
    def none(cls) -> HeadPlan:
        """No KV head long-range: every head sees sinks, tail and current segment only."""
        return cls("none")

    @classmethod
    def fraction(cls, f: float) -> HeadPlan:
        """``round(f * total KV heads)`` long-range heads (at least one when f > 0), dealt
        round-robin over layers, lowest KV-head index first. Without a profile every head is
        as good as any other; ``select_heads`` makes an informed choice."""
        # a bool is an int to Python: fraction(True) would silently mean "every head"
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 <= float(f) <= 1.0 or math.isnan(f):
            raise PlanError(f"HeadPlan.fraction needs 0 <= f <= 1, got {f!r}")
        return cls("fraction", fraction_value=float(f))

    @classmethod
    def layers(cls, layers: Iterable[int]) -> HeadPlan:
        """Every KV head of the listed layers long-range (LongGen-style full layers)."""
        if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable):
            raise PlanError(f"HeadPlan.layers needs a list of layer indices, e.g. layers([0, 3]), got {layers!r}")
        return cls("layers", layer_list=tuple(sorted({_as_index(l, "layer") for l in layers})))

    @classmethod
    def from_dict(cls, mapping: Mapping[int | str, Iterable[int]], **meta: Any) -> HeadPlan:
        """Explicit plan: ``{layer: [kv_head, ...]}``; layers not named have no long-range head."""
        if not isinstance(mapping, Mapping):
            raise PlanError(
                f"HeadPlan.from_dict needs a mapping {{layer: [kv_head, ...]}}, got {type(mapping).__name__}"
            )
        for layer, hs in mapping.items():
            if isinstance(hs, (str, bytes)) or not isinstance(hs, Iterable):
                raise PlanError(
                    f"HeadPlan.from_dict needs a list of KV heads for layer {layer!r}, got {hs!r} (write [{hs!r}])"
                )
        heads: dict[int, tuple[int, ...]] = {}
        for layer, hs in mapping.items():
            index = _as_index(layer, "layer")
            if index in heads:  # {1: [...], "1": [...]}: one would silently replace the other
                raise PlanError(f"HeadPlan.from_dict names layer {index} twice (keys {index!r} and {str(index)!r}); "
                                "give each layer once")
            heads[index] = tuple(sorted({_as_index(h, "KV head") for h in hs}))
        return cls("explicit", heads=heads, **meta)

    # ---- resolution -----------------------------------------------------------------------
    def resolve(self, kv_heads_per_layer: Sequence[int], architecture: str | None = None) -> Resolved:
        """The long-range KV heads of every layer, checked against the model's shape."""
        n_layers = len(kv_heads_per_layer)
        if self.fingerprint is not None and architecture is not None:
            theirs = dict(self.fingerprint)
            ours = model_fingerprint(architecture, kv_heads_per_layer)
            if theirs != ours:
                raise PlanError(
                    f"this head plan was made for {theirs}, but the model is {ours}; "
                    "make a plan for this model (segcompile heads) instead of reusing another model's"
                )
        if self.kind == "all":
            return {l: tuple(range(h)) for l, h in enumerate(kv_heads_per_layer)}
        if self.kind == "none":
            return {l: () for l in range(n_layers)}
        if self.kind == "fraction":
            return _deal_fraction(self.fraction_value, kv_heads_per_layer)
        if self.kind == "layers":
            for l in self.layer_list:
                _check_layer(l, n_layers)
            return {l: tuple(range(h)) if l in self.layer_list else () for l, h in enumerate(kv_heads_per_layer)}
        if self.kind == "explicit":
            for l, hs in self.heads.items():
                _check_layer(l, n_layers)
                for h in hs:
                    if h >= kv_heads_per_layer[l]:
                        raise PlanError(
                            f"head plan names KV head {h} of layer {l}, but that layer has "
                            f"{kv_heads_per_layer[l]} KV heads (0..{kv_heads_per_layer[l] - 1})"
                        )
            return {l: tuple(self.heads.get(l, ())) for l in range(n_layers)}
        raise PlanError(f"unknown head plan kind {self.kind!r}")

    def describe(self) -> str:
        if self.kind == "fraction":
            return f"fraction({self.fraction_value:g})"
        if self.kind == "layers":
            return f"layers({list(self.layer_list)})"
        if self.kind == "explicit":
            return "from_dict(" + ", ".join(f"{l}: {list(h)}" for l, h in sorted(self.heads.items())) + ")"
        return f"{self.kind}()"

    # ---- files ----------------------------------------------------------------------------
    def to_json_dict(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "version": PLAN_VERSION,
            "kind": self.kind,
            "fraction": self.fraction_value,
            "layers": list(self.layer_list),
            "long_range": {str(l): list(h) for l, h in sorted(self.heads.items())},
            "method": self.method,
            "model": dict(self.fingerprint) if self.fingerprint is not None else None,
            "extra": dict(self.extra),
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write the plan as JSON (atomically)."""
        atomic_write_text(path, json.dumps(self.to_json_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_json_dict(cls, data: Mapping[str, Any], source: str = "plan") -> HeadPlan:
        if not isinstance(data, Mapping):
            raise PlanError(f"{source} is not a segcompile head plan (a JSON {type(data).__name__}, not an object)")
        if data.get("format") != PLAN_FORMAT:
            raise PlanError(f"{source} is not a segcompile head plan (format={data.get('format')!r})")
        if data.get("version") != PLAN_VERSION:
            raise PlanError(
                f"{source} has plan version {data.get('version')!r}; this segcompile reads version {PLAN_VERSION}"
            )
        kind = data.get("kind")
        if data.get("model") is not None and not isinstance(data.get("model"), Mapping):
            raise PlanError(f"{source}: `model` must be the model fingerprint (an object) or null, got {data['model']!r}")
        meta = {"method": data.get("method"), "fingerprint": data.get("model"), "extra": data.get("extra") or {}}
        try:
            if kind == "explicit":
                return cls.from_dict(data.get("long_range") or {}, **meta)
            if kind == "fraction":
                plan = cls.fraction(data.get("fraction"))
            elif kind == "layers":
                if "layers" not in data:
                    raise PlanError("a `layers` plan has no `layers` list")
                plan = cls.layers(data["layers"])
            elif kind in ("all", "none"):
                plan = cls(kind)
            else:
                raise PlanError(f"unknown plan kind {kind!r}")
        except PlanError as e:
            raise PlanError(f"{source}: {e}") from None
        return cls(plan.kind, plan.fraction_value, plan.layer_list, plan.heads, **meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> HeadPlan:
        """Read a plan written by ``save``. JSON only: nothing in the file is executed."""
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise PlanError(f"{path} is not valid JSON: {e}") from None
        return cls.from_json_dict(data, source=str(path))

    from_json = load


def _as_index(x: Any, what: str) -> int:
    try:
        i = int(x)
    except (TypeError, ValueError):
        raise PlanError(f"{what} index must be an int, got {x!r}") from None
    if i < 0 or str(i) != str(x).strip():
        raise PlanError(f"{what} index must be a non-negative int, got {x!r}")
    return i


def _check_layer(layer: int, n_layers: int) -> None:
    if layer >= n_layers:
        raise PlanError(f"head plan names layer {layer}, but the model has {n_layers} attention layers (0..{n_layers - 1})")


def _deal_fraction(f: float, kv_heads_per_layer: Sequence[int]) -> Resolved:
    total = sum(kv_heads_per_layer)
    want = round(f * total)
    if f > 0 and want == 0:
        want = 1
    chosen: dict[int, list[int]] = {l: [] for l in range(len(kv_heads_per_layer))}
    rank = 0
    while want > 0:
        for l, h in enumerate(kv_heads_per_layer):
            if want > 0 and rank < h:
                chosen[l].append(rank)
                want -= 1
        rank += 1
    return {l: tuple(hs) for l, hs in chosen.items()}
