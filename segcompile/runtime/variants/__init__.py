"""Variants of the step graph that ``SegmentedModel`` derives on first use (not compiler passes:
``step_graph`` stays what export, ``print(seg)`` and the pass pages show)."""
