"""Data-parallel training of a ``SegmentedModel`` with PyTorch's FSDP2 and DDP.

    seg = sc.transform(model, cfg)                    # transform first,
    seg = sc.distributed.fsdp(seg)                    # then wrap (or sc.distributed.ddp(seg))
    optimizer = torch.optim.AdamW(seg.parameters())   # after wrapping: under FSDP2 they are DTensor shards
    loss = seg.tbptt_backward(ids, labels)            # this rank's sequences; gradients averaged over ranks
    optimizer.step()

**Order.** After capture the step graph runs in place of the model's modules: their ``forward`` is
never called, so the module hooks that FSDP2 (all-gather, reshard, reduce-scatter) and DDP (arming
its reducer) put on a wrapped model would never fire. ``transform`` therefore refuses a wrapped
model (``WrappingError``; the checks are in ``runtime/wrapping.py``), and the SegmentedModel is
wrapped instead, by ``fsdp`` or ``ddp`` below, which decide when the engines communicate. The step graph reads the parameters as attributes of
its own submodules (named like the model's), so a wrapper that swaps those attributes (FSDP2)
changes what the graph reads; the user's model keeps its original tensors, which are no longer
trained: save and optimise ``seg``, and drop the model to free its copy.

**FSDP2** (``fsdp``): ``fully_shard`` is applied to the SegmentedModel as one unit. Outside a
sequence its parameters are DTensor shards (``seg.parameters()`` yields them: give those to the
optimizer). One ``tbptt_backward`` runs as:

1. ``reshard(); unshard()``: one all-gather; the graph now reads plain unsharded parameters with
   the values of the last optimizer step;
2. the segment loop, plain autograd: the backward of every segment and depth accumulates into the
   unsharded parameters' ``.grad``. These backwards pass through no FSDP hook, so nothing is
   communicated (there is nothing for ``set_requires_gradient_sync(False)`` to turn off);
3. a sync step: ``0 * (sum of every parameter)``, run as an FSDP forward
   (``register_fsdp_forward_method``) and backpropagated. FSDP's post-backward reduce-scatters
   the accumulated gradients into the shards' ``.grad`` (the mean over ranks) and reshards.

One all-gather and one reduce-scatter per sequence, whatever the number of segments and
``tbptt_k``. The parameters stay gathered across the K+1 live segment graphs instead of being
gathered per segment step: the step graph is one flat graph over all layers, so a segment step
needs every layer at once, and each live graph has saved the unsharded parameters for the
backwards that later segments run through it. Gathering per step would not lower the peak and
would cost an all-gather per segment or more. Measured on 2 ranks (tiny Llama, 5 segments,
``tbptt_k=2``): FSDP's own hooks put on each segment step (``register_fsdp_forward_method`` on
``run_step``) all-gather 14 times per sequence (9 without resharding after forward), and with the
backwards spread over 12 autograd calls they leave no gradient at all on the shards.

Memory per rank, with P the bytes of the parameters, W ranks and AdamW: during a sequence P/W
(shards) + P (gathered) + P (unsharded gradients, kept until the one reduce-scatter) + P/W
(sharded gradients) + 2P/W (optimizer state) = 2P + 4P/W; between sequences 4P/W. DDP holds 4P
throughout, plus its reducer's buckets (another P unless ``gradient_as_bucket_view``).
FSDP2 saves the optimizer state and the parameters outside a sequence; sharding the parameters
during a sequence would need a step graph cut at layer boundaries, which is not done.

**DDP** (``ddp``): DDP's reducer all-reduces the gradients that the backward after a DDP forward
produces, each bucket as soon as all its parameters have received theirs in that backward. The
segment steps are not DDP forwards, so their backwards communicate nothing (``no_sync`` is not
needed). TBPTT's own last backward cannot be the synchronised one: it runs through an older
segment's graph from the carried tail and reaches only the parameters the tail depends on, and
the last segment's depth-0 backward, which reaches them all, is followed by the deeper ones. So a
sequence ends with the same sync step, as the forward of a DDP over the SegmentedModel's
parameters: its backward reaches every parameter once, with a zero gradient, and the reducer
averages the accumulated ``.grad`` over ranks, bucket by bucket (comm hooks apply). One
all-reduce of every gradient per sequence. DDP broadcasts rank 0's parameters when it is built.

With ``reduction="mean"`` each rank divides by its own label tokens and the engines average over
ranks: that is the global batch's mean when every rank has as many label tokens.
"""

from __future__ import annotations

import contextlib
import types

import torch

from ..errors import WrappingError
from .driver import SegmentedModel
from .wrapping import HOW_TO_WRAP, wrapped_parts

_SYNC_METHOD = "_segcompile_sync_step"


def fsdp(seg, **fully_shard_kwargs):
    """Shard ``seg`` with FSDP2 (``torch.distributed.fsdp.fully_shard``, as one unit) and make its
    ``tbptt_backward`` gather the parameters once and reduce-scatter the gradients once per
    sequence. Keyword arguments go to ``fully_shard`` (``mesh``, ...). Returns ``seg`` (its class
    becomes FSDP's subclass of it). ``prefill``, ``decode`` and ``forward`` gather the parameters
    too, and leave them gathered (FSDP keeps its root unit's parameters after forward) until the
    next sequence or ``seg.reshard()``."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    _check_wrappable(seg, "fsdp")
    fully_shard(seg, **fully_shard_kwargs)
    setattr(seg, _SYNC_METHOD, types.MethodType(_touch_every_parameter, seg))
    for method in (_SYNC_METHOD, "prefill", "decode"):
        register_fsdp_forward_method(seg, method)
    seg.gradient_sync = _FSDPSync()
    return seg


def ddp(seg, **ddp_kwargs):
    """Replicate ``seg`` with DDP (``torch.nn.parallel.DistributedDataParallel``): its
    ``tbptt_backward`` all-reduces the gradients once per sequence. Keyword arguments go to DDP
    (``device_ids``, ``bucket_cap_mb``, ...). Returns ``seg``; rank 0's parameters are broadcast."""
    from torch.nn.parallel import DistributedDataParallel

    _check_wrappable(seg, "ddp")
    seg.gradient_sync = _DDPSync(DistributedDataParallel(_EveryParameter(seg), **ddp_kwargs))
    return seg


class _FSDPSync:
    @contextlib.contextmanager
    def sequence(self, seg):
        seg.reshard()  # unsharded parameters left by an inference call may predate an optimizer step
        seg.unshard()
        try:
            yield
        except BaseException:
            for p in seg.parameters():  # the unsharded ones: drop the partial gradients, then free
                p.grad = None
            seg.reshard()
            raise
        getattr(seg, _SYNC_METHOD)().backward()


class _DDPSync:
    def __init__(self, module):
        self.module = module  # not an nn.Module attribute of seg: DDP's module holds seg

    @contextlib.contextmanager
    def sequence(self, seg):
        yield
        self.module().backward()


class _EveryParameter(torch.nn.Module):
    """What DDP wraps: the SegmentedModel, with the sync step as forward."""

    def __init__(self, seg):
        super().__init__()
        self.seg = seg

    def forward(self):
        return _touch_every_parameter(self.seg)


def _touch_every_parameter(module: torch.nn.Module) -> torch.Tensor:
    """``0 * (sum of every trainable parameter)``: its backward adds zero to each ``.grad``."""
    return torch.stack([p.sum().float() for p in module.parameters() if p.requires_grad]).sum() * 0


# ---- checks -----------------------------------------------------------------------------------
def _check_wrappable(seg, how: str) -> None:
    if not isinstance(seg, SegmentedModel):
        raise WrappingError(f"sc.distributed.{how} takes a SegmentedModel, got a {type(seg).__name__}; {HOW_TO_WRAP}")
    if seg.gradient_sync is not None or wrapped_parts(seg):
        raise WrappingError(f"this SegmentedModel is already wrapped for distributed training; wrap it once, with {how}")
    if not torch.distributed.is_initialized():
        raise WrappingError(
            f"sc.distributed.{how}: no process group; call torch.distributed.init_process_group() first "
            "(torchrun sets the environment it reads)"
        )
