"""segcompile: compile full-attention decoders into training-inference consistent segment loops."""

from . import oracle
from .config import SegmentConfig
from .errors import CaptureError, ConfigError, PlanError, SegcompileError, UnsupportedAttentionError
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
    "capture",
    "oracle",
    "transform",
]
