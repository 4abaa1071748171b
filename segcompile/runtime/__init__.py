"""What runs the compiled program: the segment driver, exact TBPTT training, data parallelism.

Imports point one way: ``driver`` (``SegmentedModel``) uses ``training`` and ``state``;
``training`` uses ``state``; ``distributed`` wraps a ``SegmentedModel``. Nothing here imports
the passes, the deployment code or the CLI.
"""

from .driver import SegmentedModel, SegmentState

__all__ = ["SegmentState", "SegmentedModel"]
