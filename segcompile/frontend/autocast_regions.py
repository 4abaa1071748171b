"""Keep a model's autocast-disabled regions in the traced graph.

transformers computes RoPE angles (and a few norms) in fp32 inside
``maybe_autocast(device_type, enabled=False)`` (``transformers.utils.generic``). That helper
returns a no-op context when autocast is off at the call, so a model traced without autocast
records no region at all; the graph, replayed later under a user's ``torch.autocast``, then
runs the angles' matmul in bf16, where positions past 256 round to multiples of 2 or more and
every rotation is wrong (measured: SmolLM2-135M segmented on an H200 under bf16 autocast, held-out
loss 3.16 against 2.46 in the first segment, with the model's own forward unaffected).

While capture traces, ``regions_recorded()`` makes every imported module's ``maybe_autocast``
return the real ``torch.autocast`` context, which export records as a ``wrap_with_autocast``
region (``capture._export``). It is one patch for every model family: all of them use the helper.
The check in ``capture._check_against_model`` under autocast catches a region lost any other way.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import torch

HELPER = "maybe_autocast"


@contextlib.contextmanager
def regions_recorded() -> Iterator[None]:
    """Within the block, transformers' ``maybe_autocast`` always enters ``torch.autocast``
    (module docstring); restored on exit. A no-op where transformers is not imported."""
    generic = sys.modules.get("transformers.utils.generic")
    helper = getattr(generic, HELPER, None) if generic is not None else None
    if helper is None:
        yield
        return

    def always_entered(device_type: str, dtype: torch.dtype | None = None, enabled: bool = True,
                       cache_enabled: bool | None = None):
        if device_type == "meta":
            return helper(device_type, dtype, enabled, cache_enabled)
        return torch.autocast(device_type, dtype=dtype, enabled=enabled, cache_enabled=cache_enabled)

    # Modeling files import the helper by name, so each module holding it is patched; read
    # through __dict__, as transformers' lazy modules import on attribute access.
    holders = [m for m in list(sys.modules.values()) if getattr(m, "__dict__", {}).get(HELPER) is helper]
    for module in holders:
        setattr(module, HELPER, always_entered)
    try:
        yield
    finally:
        for module in holders:
            setattr(module, HELPER, helper)
