"""The compiler's passes, in the order they run (DESIGN.md section 2).

``capture`` produces the first GraphModule; every other pass is a function
``GraphModule -> GraphModule`` reading what earlier passes left in ``gm.meta``.
"""

from .capture import capture, copy_captured, is_captured
from .find_attention import find_attention
from .lower import lower
from .manager import PassManager
from .plan_heads import plan_heads
from .segment_loop import segment_loop

PASSES = [find_attention, plan_heads, segment_loop, lower]

__all__ = ["PASSES", "PassManager", "capture", "copy_captured", "is_captured", "find_attention", "lower", "plan_heads", "segment_loop"]
