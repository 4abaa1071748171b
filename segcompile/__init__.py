"""segcompile: compile full-attention decoders into training-inference consistent segment loops."""

from .config import SegmentConfig
from .errors import (
    CaptureError,
    ConfigError,
    InputError,
    PlanError,
    SegcompileError,
    StateError,
    UnsupportedAttentionError,
    WrappingError,
)
from .frontend import capture
from .heads import select_heads
from .plan import HeadPlan
from .reference import oracle
from .runtime import SegmentedModel, SegmentState, distributed
from .transform import transform

__all__ = [
    "CaptureError",
    "ConfigError",
    "HeadPlan",
    "InputError",
    "PlanError",
    "SegcompileError",
    "SegmentConfig",
    "SegmentState",
    "SegmentedModel",
    "StateError",
    "UnsupportedAttentionError",
    "WrappingError",
    "capture",
    "distributed",
    "oracle",
    "select_heads",
    "transform",
]
