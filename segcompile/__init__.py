"""segcompile: compile full-attention decoders into training-inference consistent segment loops."""

from . import distributed, oracle
from .config import SegmentConfig
from .errors import CaptureError, ConfigError, PlanError, SegcompileError, UnsupportedAttentionError, WrappingError
from .heads import select_heads
from .passes import capture
from .plan import HeadPlan
from .runtime import SegmentedModel, SegmentState
from .transform import transform

__all__ = [
    "CaptureError",
    "ConfigError",
    "HeadPlan",
    "PlanError",
    "SegcompileError",
    "SegmentConfig",
    "SegmentState",
    "SegmentedModel",
    "UnsupportedAttentionError",
    "WrappingError",
    "capture",
    "distributed",
    "oracle",
    "select_heads",
    "transform",
]
