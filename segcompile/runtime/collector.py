"""Python's garbage collector after ``torch.compile``.

Compilation leaves millions of Python objects alive for the life of the process: Dynamo's guards
and bytecode, FX graphs, Inductor's kernels and wrappers, the CUDA-graph trees. CPython's full
(oldest-generation) collections walk every one of them, and the allocations of a training step
trigger one every step or so: on an H200, one such collection paused a compiled 32K-token TBPTT
step for 0.6 s of its 1.4 s, the GPU idle throughout (bench/README.md, training).

``after_compiling`` wraps the entry points of a compiled ``SegmentedModel``: after a call in which
a graph was compiled or a CUDA graph recorded, it collects once and moves every object alive into
the collector's permanent generation (``gc.freeze``), which later collections skip. Serving engines
do the same after their warm-up. What is frozen is never freed by the collector (reference counting
still frees what has no cycle); ``gc.unfreeze()`` undoes it.
"""

from __future__ import annotations

import functools
import gc

import torch._dynamo.utils


def compilation_events() -> tuple[int, int]:
    """How many graphs Dynamo has compiled and how many CUDA-graph inputs Inductor has recorded
    in this process: each moves when (and only when) something new is compiled or recorded."""
    counters = torch._dynamo.utils.counters
    return counters["stats"]["unique_graphs"], counters["inductor"]["cudagraph_recorded_non_static_inputs"]


def after_compiling(method):
    """Decorate a ``SegmentedModel`` entry point: if the call compiled or recorded something (and
    the model is compiled), collect and freeze what is alive once it returns."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        before = compilation_events()
        result = method(self, *args, **kwargs)
        if self._compiled and compilation_events() != before:
            freeze_alive_objects()
        return result

    return wrapper


def freeze_alive_objects() -> None:
    """Collect the garbage there is, then move every live object to the permanent generation."""
    gc.collect()
    gc.freeze()
