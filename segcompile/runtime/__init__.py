"""What runs the compiled program: the segment driver, exact TBPTT training, data parallelism
(docs/design.md section 9).

Imports point one way: ``driver`` (``SegmentedModel``) uses ``training``, ``generation``
(``seg.generate``), ``static_decode`` (decoding through CUDA graphs), ``state`` (the carried
state and its buffers), ``wrapping`` (the "transform, then wrap" checks) and the step-graph
``variants``; ``training`` drives the driver's loop (``SegmentedModel.segments``) without
importing it; ``distributed`` wraps a ``SegmentedModel``. ``checkpoint`` stands alone. Nothing
here imports the passes, the deployment code or the CLI.
"""

from . import distributed
from .driver import SegmentedModel, SegmentRun
from .state import SegmentState

__all__ = ["SegmentRun", "SegmentState", "SegmentedModel", "distributed"]
