"""``SegmentConfig``: the segment, tail and sink sizes and the head plan (docs/design.md section 1)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .errors import ConfigError
from .kernels.history_format import HISTORY_DTYPES, HistoryGeometry, supported_history_dtypes
from .plan import HeadPlan


@dataclass(frozen=True)
class SegmentConfig:
    """How a model is cut into segments.

    segment_len: S, tokens per segment (the last segment may be shorter).
    tail_len: T, keys of the previous segment every head sees (0 <= T <= S); ``None`` means S.
    sink_tokens: G, first tokens of the sequence every head sees.
    long_range: which KV heads also see the whole history.
    tbptt_k: K, segments of recomputed (non-constant) tail a training step unrolls through.
    history_dtype: the dtype the long-range history is stored in: ``None`` (the carried K/V
        dtype, docs/design.md section 6) or ``torch.float8_e4m3fn``, fp8 values with one fp32
        scale per block of positions (``kernels/history_format.py``), half the memory and bytes
        read of a 16-bit history.
    """

    segment_len: int
    tail_len: int | None = None
    sink_tokens: int = 0
    long_range: HeadPlan = field(default_factory=lambda: HeadPlan.fraction(0.25))
    tbptt_k: int = 1
    history_dtype: torch.dtype | None = None

    def __post_init__(self):
        if not _is_int(self.segment_len) or self.segment_len <= 0:
            raise ConfigError(f"segment_len must be a positive int, got {self.segment_len!r}")
        if self.tail_len is None:
            object.__setattr__(self, "tail_len", self.segment_len)
        if not _is_int(self.tail_len) or not 0 <= self.tail_len <= self.segment_len:
            raise ConfigError(
                f"tail_len must be an int in [0, segment_len={self.segment_len}], got {self.tail_len!r}: "
                "the tail is a suffix of the previous segment; use tail_len <= segment_len"
            )
        if not _is_int(self.sink_tokens) or self.sink_tokens < 0:
            raise ConfigError(f"sink_tokens must be an int >= 0, got {self.sink_tokens!r}")
        if not _is_int(self.tbptt_k) or self.tbptt_k < 0:
            raise ConfigError(f"tbptt_k must be an int >= 0, got {self.tbptt_k!r}")
        if not isinstance(self.long_range, HeadPlan):
            raise ConfigError(
                f"long_range must be a HeadPlan (e.g. HeadPlan.fraction(0.25)), got {type(self.long_range).__name__}"
            )
        if self.history_dtype is not None and not (
            isinstance(self.history_dtype, torch.dtype) and self.history_dtype in HISTORY_DTYPES
        ):
            raise ConfigError(
                f"history_dtype {self.history_dtype!r} is not supported; pass one of: {supported_history_dtypes()}"
            )

    def history_geometry(self) -> HistoryGeometry | None:
        """Where a quantised history's scale blocks lie (``None`` when the history is not quantised)."""
        return None if self.history_dtype is None else HistoryGeometry(self.segment_len, self.tail_len)

    # Segment geometry, shared by the oracle, the driver and the tests.
    def segment_start(self, position: int) -> int:
        """First position of the segment holding ``position``."""
        return segment_start(position, self.segment_len)

    def offset_in_segment(self, position: int) -> int:
        """How many positions of its segment come before ``position`` (0: it starts a segment)."""
        return offset_in_segment(position, self.segment_len)

    def num_segments(self, n: int) -> int:
        return -(-n // self.segment_len)


def offset_in_segment(position: int, segment_len: int) -> int:
    """How many positions of its segment come before ``position`` (0: it starts a segment)."""
    return position % segment_len


def segment_start(position: int, segment_len: int) -> int:
    """First position of the segment holding ``position``."""
    return position - offset_in_segment(position, segment_len)


def segment_pieces(position: int, total: int, segment_len: int) -> list[slice]:
    """Slices of ``total`` new tokens, the first at absolute ``position``, cut at segment
    boundaries: each runs as one step (the PyTorch driver and the ONNX and TensorRT runners)."""
    pieces, done = [], 0
    while done < total:
        take = min(segment_len - offset_in_segment(position + done, segment_len), total - done)
        pieces.append(slice(done, done + take))
        done += take
    return pieces


def _is_int(x) -> bool:
    """An int that is not a bool (``True`` would otherwise pass as 1)."""
    return isinstance(x, int) and not isinstance(x, bool)
