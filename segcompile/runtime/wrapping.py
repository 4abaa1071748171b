"""Checks of the order "transform, then wrap" for data-parallel training (docs/design.md section 3).

After capture the step graph runs in place of the model's modules, so hooks that FSDP or DDP put
on a model wrapped before ``transform`` would never fire, nor would ``fully_shard`` hooks put on
a ``SegmentedModel`` by hand: only ``segcompile.distributed.fsdp`` and ``ddp`` make its
``tbptt_backward`` synchronise the gradients (``segcompile/runtime/distributed.py`` says how).
``transform`` refuses a wrapped model, the driver a program wrapped by hand, the wrappers a
program wrapped twice. Here, below all three, so that none imports another for its checks.
"""

from __future__ import annotations

import torch

from ..errors import WrappingError

HOW_TO_WRAP = (
    "transform the unwrapped model first, then wrap the SegmentedModel: seg = sc.transform(model, cfg); "
    "seg = sc.distributed.fsdp(seg) (or sc.distributed.ddp(seg))"
)


def check_not_wrapped(model: torch.nn.Module) -> None:
    """Refuse a model that FSDP, DDP or DTensor parallelism already wraps (``transform`` calls this)."""
    found = wrapped_parts(model)
    if found:
        raise WrappingError(
            f"{type(model).__name__} is already wrapped for distributed training ({found}); segcompile runs "
            f"its own segment-step graph in place of the modules' forward, so the wrapper's hooks would never "
            f"fire: {HOW_TO_WRAP}"
        )


def check_sync_owner(seg: torch.nn.Module) -> None:
    """Refuse a SegmentedModel that was given to ``fully_shard`` directly instead of to ``fsdp``
    (``seg.gradient_sync`` is what ``segcompile.distributed`` sets)."""
    if seg.gradient_sync is None and (found := wrapped_parts(seg)):
        raise WrappingError(
            f"this SegmentedModel was wrapped by hand ({found}): its tbptt_backward would "
            f"never synchronise the gradients; {HOW_TO_WRAP}"
        )


def wrapped_parts(model: torch.nn.Module) -> str:
    """A description of what wraps ``model`` or its submodules, or ``""``."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return ""  # nothing can be wrapped without a process group
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    from torch.distributed.tensor import DTensor
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, (DistributedDataParallel, torch.nn.DataParallel)):
        return f"it is a {type(model).__name__}"
    for name, module in model.named_modules():
        if isinstance(module, (FSDPModule, FullyShardedDataParallel)):
            return f"`{name or '<root>'}` is wrapped by {'fully_shard' if isinstance(module, FSDPModule) else 'FSDP'}"
    for name, p in model.named_parameters():
        if isinstance(p, DTensor):
            return f"parameter `{name}` is a DTensor"
    return ""
