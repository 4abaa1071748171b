"""The compiler's passes, in the order they run (docs/design.md section 2).

``frontend.capture`` produces the first GraphModule; every pass here is a function
``GraphModule -> GraphModule`` reading what earlier passes left in ``gm.meta`` (keys in ``ir``).
"""

from .find_attention import find_attention
from .lower import lower
from .manager import PassManager
from .plan_heads import plan_heads
from .segment_loop import segment_loop

PASSES = [find_attention, plan_heads, segment_loop, lower]

__all__ = ["PASSES", "PassManager", "find_attention", "lower", "plan_heads", "segment_loop"]
