"""The exported step program's names: its inputs and outputs, its ``segcompile.*`` metadata keys,
and how a runner reads the metadata (docs/design.md section 8).

``deploy.onnx_export`` writes these keys into the ONNX file's ``metadata_props`` (every value a
string, as ONNX stores them); a TensorRT engine's JSON record carries the same map under
``onnx_metadata``. The format's name and version keys are ``ir.FORMAT_KEY`` and
``ir.FORMAT_VERSION_KEY``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..errors import SegcompileError
from ..ir import FORMAT_KEY, FORMAT_VERSION_KEY, ONNX_FORMAT, ONNX_FORMAT_VERSION

# The program's inputs and outputs besides its state buffers (named by ``STATE_KEY``; the buffer
# after the step is an output named the buffer's name + OUTPUT_SUFFIX).
INPUT_IDS = "input_ids"  # int64 [batch, step]
POSITION_OFFSET = "position_offset"  # int64 []: absolute position of input_ids[:, 0]
LOGITS = "logits"  # [batch, 1 or step, vocab]
OUTPUT_SUFFIX = "_out"

# metadata_props keys
PREFIX = "segcompile."  # every key below starts with it
VERSION_KEY = "segcompile.version"  # the segcompile package that exported the file
EXPORT_ID_KEY = "segcompile.export_id"  # a fresh uuid per export: a state belongs to one file
SEGMENT_LEN_KEY = "segcompile.segment_len"  # S
TAIL_LEN_KEY = "segcompile.tail_len"  # T
SINK_TOKENS_KEY = "segcompile.sink_tokens"  # G
PLAN_KEY = "segcompile.plan"  # JSON {layer: [long-range KV heads]}
PLAN_DESCRIPTION_KEY = "segcompile.plan_description"  # the HeadPlan, in words
MODEL_KEY = "segcompile.model"  # JSON fingerprint: architecture, layers, heads, head_dim, vocab_size, dtype
LOGITS_KEY = "segcompile.logits"  # "last" (logits of a step's last position) or "all"
STATE_KEY = "segcompile.state"  # JSON [[name, kv_heads, head_dim, entries or null for history], ...]
HISTORY_DTYPE_KEY = "segcompile.history_dtype"  # the rounding the history buffers' values carry (absent: none)


@dataclass(frozen=True)
class StepProgram:
    """What a runner needs to know about an exported step program."""

    export_id: str
    segment_len: int
    tail_len: int
    sink_tokens: int
    plan: dict[int, list[int]]  # layer -> long-range KV heads
    model: dict  # the fingerprint (MODEL_KEY)
    logits: str  # "last" | "all"
    state_specs: list[tuple[str, int, int, int | None]]  # (name, kv_heads, head_dim, entries; None: history)

    @property
    def vocab_size(self) -> int | None:
        return self.model.get("vocab_size")


def check_format(meta: Mapping[str, str], path: str | Path, error: type[SegcompileError] = SegcompileError,
                 reads: str = "reads") -> None:
    """Raise ``error`` unless ``meta`` is a segment-step program of the format version this segcompile
    ``reads`` (or "builds from"). Files of every release so far carry the version as the string "1"."""
    if meta.get(FORMAT_KEY) != ONNX_FORMAT:
        raise error(f"{path} is not a segcompile segment-step ONNX file (run `segcompile export`)")
    if meta.get(FORMAT_VERSION_KEY) != ONNX_FORMAT_VERSION:
        raise error(f"{path} has format version {meta.get(FORMAT_VERSION_KEY)}; "
                    f"this segcompile {reads} {ONNX_FORMAT_VERSION}")


def read_step_program(meta: Mapping[str, str]) -> StepProgram:
    """The ``StepProgram`` that ``meta`` (checked by ``check_format``) describes."""
    return StepProgram(
        export_id=meta[EXPORT_ID_KEY],
        segment_len=int(meta[SEGMENT_LEN_KEY]),
        tail_len=int(meta[TAIL_LEN_KEY]),
        sink_tokens=int(meta[SINK_TOKENS_KEY]),
        plan={int(k): v for k, v in json.loads(meta[PLAN_KEY]).items()},
        model=json.loads(meta[MODEL_KEY]),
        logits=meta[LOGITS_KEY],
        state_specs=[tuple(s) for s in json.loads(meta[STATE_KEY])],
    )
