"""Exceptions segcompile raises on bad input.

Every message names what was wrong (the model, layer, module or op) and what to do about it.
User input is never checked with ``assert``.
"""


class SegcompileError(Exception):
    """Base class of every error segcompile raises on purpose."""


class ConfigError(SegcompileError, ValueError):
    """A ``SegmentConfig`` value is out of range."""


class PlanError(SegcompileError, ValueError):
    """A ``HeadPlan`` does not fit the model (unknown layer or KV head, wrong fingerprint)."""


class CaptureError(SegcompileError):
    """The model could not be traced into an FX graph."""


class UnsupportedAttentionError(SegcompileError):
    """An attention site is not causal full attention, or its pattern is not recognised."""


class WrappingError(SegcompileError, TypeError):
    """A model wrapped by FSDP or DDP was given to ``transform``, or a SegmentedModel was wrapped
    other than by ``segcompile.distributed`` (docs/design.md section 2: the step graph runs, not the modules)."""


class InputError(SegcompileError, ValueError):
    """Token ids or labels given to a ``SegmentedModel`` (or the oracle) do not fit the model: not an
    integer ``[batch, tokens]`` tensor, on another device, or outside the vocabulary."""


class StateError(SegcompileError, ValueError):
    """A decode state was made by another program (another model, segment sizes or head plan), or
    was already continued where states are updated in place (``seg.enable_cuda_graphs``)."""
