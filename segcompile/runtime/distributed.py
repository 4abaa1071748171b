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
wrapped instead, by ``fsdp`` or ``ddp`` below, which decide when the engines communicate. The step
graph reads the parameters as attributes of its own submodules (named like the model's), so a
wrapper that swaps those attributes (FSDP2) changes what the graph reads; the user's model keeps its
original tensors, which are no longer trained: save and optimise ``seg``, and drop the model to free
its copy.

**FSDP2 per layer** (``fsdp``, the default). The step graph is one flat graph whose root reads
every parameter, so no module runs when a layer runs and ``fully_shard`` on the model's layers
would never gather anything. ``fsdp`` therefore first cuts the step graph
(``runtime/variants/layer_units.py``): each layer's nodes become a submodule at the layer's own
path (``model.layers.3``) that owns the layer's parameters, under their old names (state dicts
and checkpoints are those of the flat graph), and the root graph calls it. ``fully_shard`` is
applied to every layer unit, then to the SegmentedModel, whose own unit (the root) is what is
left: the embeddings, the final norm and the head. One ``tbptt_backward`` runs as:

1. the root unit is gathered (an FSDP forward of the root, which also makes it FSDP's root);
   every unit's gradient sync is turned off;
2. the segment loop: each layer unit's forward hooks gather the layer, run it, and free it again;
   every backward pass through a live segment graph gathers each layer it reaches again (FSDP2's
   pre-backward hook on the unit's outputs) and frees it after (its post-backward), prefetching
   the next layer's all-gather. A layer's gradient accumulates, unsharded, on FSDP's gathered
   tensor across the segments and depths of the sequence; the root unit stays gathered;
3. a sync step: a zero computed as an FSDP forward of the root and backpropagated, with sync on.
   Its backward runs the root's pre-backward, which queues FSDP's end-of-backward callback; that
   callback runs the post-backward of every unit, which reduce-scatters the accumulated gradients
   into the shards' ``.grad`` (the mean over ranks) and frees what is still gathered.

With ``reduce_every="backward"`` the sync stays on: each backward pass reduce-scatters the
gradients of the units it reached as it leaves them, into the shards' ``.grad``, where they
accumulate (a reduce-scatter is linear: the sum of the reductions is the reduction of the sum, up
to rounding). Per sequence of n segments with b backward passes (b = sum over segments s of
min(s, tbptt_k) + 1) and L layers: 1 + L(n + b) all-gathers (the root once, every layer once per
segment forward and once per backward pass) and L + 1 reduce-scatters, or (L + 1) b with
``reduce_every="backward"``. Measured on 2 and 4 ranks (tiny Llama, 3 layers, 5 segments,
``tbptt_k=2``, b = 12): 52 all-gathers and 4 reduce-scatters, or 48 with "backward".

Which to reduce after. Per sequence is the default: it is the one reduction the one-unit path
and DDP make, and on a long sequence the all-gathers already move each layer n + b times. Its cost
is memory: every layer's unsharded gradient lives from the layer's first backward to the end of
the sequence. Reducing per segment would not lower that peak (every backward pass of a segment
reaches every layer, so all their gradients are unsharded together before the segment's
reduction); reducing per backward pass does: a layer's gradient is reduced as soon as the pass has
left the layer, so at most a layer or two of unsharded gradients exist at once. It costs b/(n + b)
more traffic than the gathers alone (n = 16, ``tbptt_k=1``: b = 31, about 1.6 times the bytes):
use it when the gradients do not fit.

**Memory per rank**, with P the bytes of the parameters, W ranks, P_l the bytes of one layer, P_r
those of the root unit (embeddings, norm, head), fp32 and AdamW. Between sequences: the shards,
their gradients and the optimizer state, 4P/W (3P/W after ``zero_grad``). During a sequence, 4P/W
plus what is unsharded: the root unit and at most two layers gathered, P_r + 2P_l, and the
unsharded gradients, P when reducing per sequence (every unit's, until the end), at most
P_r + 2P_l when reducing per backward pass. ``record_gathered_bytes`` (the test hook) samples
both at every operator that saves or reads back a tensor for backward. Measured on 2 ranks (tiny
Llama, 3 layers of 37,120 B and a root of 24,704 B, P = 136,064 B, fp32, 5 segments,
``tbptt_k=2``): one layer gathered during a segment's forward, two during backward (the layer
being differentiated and the next, prefetched), so 98,944 B at the peak (24,704 + 2 x 37,120),
whatever the number of layers; unsharded gradients 136,064 B (= P) at the end of a sequence
reduced once, 49,536 B at most when reduced per backward pass (12,416 of the root's and one
layer's); nothing at all between sequences.

When the cut fails (a layer whose nodes interleave with another's, a parameter read by two
layers: ``layer_units`` names it), ``fsdp`` logs why and shards the program as one unit;
``per_layer=True`` raises ``WrappingError`` instead, and ``per_layer=False`` asks for one unit.
Mixed precision is ``torch.autocast``: FSDP2's ``MixedPrecisionPolicy(param_dtype=...)`` does not
apply to a graph captured in fp32, whose casts name fp32.

**FSDP2 as one unit** (``per_layer=False``): ``fully_shard`` is applied to the SegmentedModel as
one unit. Outside a sequence its parameters are DTensor shards. One ``tbptt_backward`` runs as:

1. ``reshard(); unshard()``: one all-gather; the graph now reads plain unsharded parameters with
   the values of the last optimizer step;
2. the segment loop, plain autograd: the backward of every segment and depth accumulates into the
   unsharded parameters' ``.grad``. These backwards pass through no FSDP hook, so nothing is
   communicated;
3. the sync step: ``0 * (sum of every parameter)``, run as an FSDP forward
   (``register_fsdp_forward_method``) and backpropagated. FSDP's post-backward reduce-scatters
   the accumulated gradients into the shards' ``.grad`` (the mean over ranks) and reshards.

One all-gather and one reduce-scatter per sequence, whatever the number of segments and
``tbptt_k``, but every parameter stays gathered across the K+1 live segment graphs: during a
sequence P/W (shards) + P (gathered) + P (unsharded gradients) + P/W (sharded gradients) + 2P/W
(optimizer state) = 2P + 4P/W; between sequences 4P/W. (FSDP's own hooks put on each segment step
of the uncut graph, ``register_fsdp_forward_method`` on ``run_step``, all-gathered 14 times per
sequence on 2 ranks and, with the backwards spread over 12 autograd calls, left no gradient on
the shards: the cut is what makes the per-layer hooks work.)

**DDP** (``ddp``) holds 4P throughout, plus its reducer's buckets (another P unless
``gradient_as_bucket_view``). DDP's reducer all-reduces the gradients that the backward after a
DDP forward produces, each bucket as soon as all its parameters have received theirs in that
backward. The segment steps are not DDP forwards, so their backwards communicate nothing
(``no_sync`` is not needed). TBPTT's own last backward cannot be the synchronised one: it runs
through an older segment's graph from the carried tail and reaches only the parameters the tail
depends on, and the last segment's depth-0 backward, which reaches them all, is followed by the
deeper ones. So a sequence ends with the same sync step, as the forward of a DDP over the
SegmentedModel's parameters: its backward reaches every parameter once, with a zero gradient,
and the reducer averages the accumulated ``.grad`` over ranks, bucket by bucket (comm hooks
apply). One all-reduce of every gradient per sequence. DDP broadcasts rank 0's parameters when it
is built. DDP does not cut the step graph: its one reduction finds every gradient ready at once,
so buckets aligned with layers would change nothing (the reducer fills its buckets in reverse
parameter order, which is already layer order); they would matter only to a reduction inside the
sequence, which a full replica per rank has no memory reason to make.

With ``reduction="mean"`` each rank divides by its own label tokens and the engines average over
ranks: that is the global batch's mean when every rank has as many label tokens.
"""

from __future__ import annotations

import contextlib
import logging
import types
from collections.abc import Iterator

import torch

from ..errors import WrappingError
from .driver import SegmentedModel
from .variants.layer_units import layer_units
from .wrapping import HOW_TO_WRAP, wrapped_parts

log = logging.getLogger(__name__)

_SYNC_METHOD = "_segcompile_sync_step"
_BEGIN_METHOD = "_segcompile_begin_sequence"
REDUCE_EVERY = ("sequence", "backward")  # when per-layer FSDP2 reduce-scatters the gradients


def fsdp(seg, *, per_layer: bool | None = None, reduce_every: str = "sequence", **fully_shard_kwargs):
    """Shard ``seg`` with FSDP2 (``torch.distributed.fsdp.fully_shard``); returns ``seg`` (its class
    becomes FSDP's subclass of it). Keyword arguments go to every ``fully_shard`` (``mesh``, ...).

    ``per_layer`` (default: when the step graph can be cut): cut the step graph into one unit per
    layer (``runtime/variants/layer_units.py``) and shard each, with the embeddings, final norm and
    head in the root unit: a sequence gathers one layer at a time, the gradients accumulate
    unsharded and are reduce-scattered once per sequence. ``False``: the whole program as one unit,
    gathered once per sequence (module docstring). When the default cannot cut the graph it logs
    why and shards one unit; ``per_layer=True`` raises ``WrappingError`` instead.

    ``reduce_every`` (per layer only): ``"sequence"`` keeps each layer's gradient unsharded until
    the end of the sequence and reduce-scatters it once; ``"backward"`` reduce-scatters the layers
    each backward pass reached at its end, so no unsharded gradient outlives a backward pass, for
    about ``(tbptt_k + 1)`` times the gradient traffic per segment (module docstring).

    ``prefill``, ``decode`` and ``forward`` gather the root unit (and, per layer, each layer as it
    runs) and leave the root gathered until the next sequence or ``seg.reshard()``."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    _check_wrappable(seg, "fsdp")
    if reduce_every not in REDUCE_EVERY:
        raise WrappingError(f"sc.distributed.fsdp: reduce_every must be one of {REDUCE_EVERY}, got {reduce_every!r}")
    layers = _cut_into_layers(seg, per_layer)
    for path in layers:
        fully_shard(seg.step_graph.get_submodule(path), **fully_shard_kwargs)
    fully_shard(seg, **fully_shard_kwargs)
    if layers:
        setattr(seg, _BEGIN_METHOD, types.MethodType(_begin_sequence, seg))
        setattr(seg, _SYNC_METHOD, types.MethodType(_start_the_reduction, seg))
        methods = (_BEGIN_METHOD, _SYNC_METHOD, "prefill", "decode")
        seg.gradient_sync = _PerLayerFSDPSync(layers, reduce_every)
    else:
        setattr(seg, _SYNC_METHOD, types.MethodType(_touch_every_parameter, seg))
        methods = (_SYNC_METHOD, "prefill", "decode")
        seg.gradient_sync = _FSDPSync()
    for method in methods:
        register_fsdp_forward_method(seg, method)
    return seg


def _cut_into_layers(seg, per_layer: bool | None) -> list[str]:
    """Replace ``seg``'s step graph with its per-layer cut; return the layer units' paths (none
    when sharding one unit)."""
    if per_layer is False:
        seg.use_step_graph(seg.step_graph)  # derives prefill's graphs now, before fully_shard
        return []
    try:
        units = layer_units(seg.step_graph, error=WrappingError)
    except WrappingError as e:
        if per_layer:
            raise WrappingError(f"sc.distributed.fsdp(per_layer=True): {e}; shard one unit with per_layer=False") from e
        log.warning("sharding the program as one unit, not per layer: %s", e)
        seg.use_step_graph(seg.step_graph)
        return []
    seg.use_step_graph(units.graph)
    return units.layers


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


class _PerLayerFSDPSync:
    """One sequence under per-layer FSDP2: the layer units' own hooks gather and free them, the root
    unit (embeddings, norm, head) stays gathered, and the gradients are reduce-scattered at the
    end of the sequence (``reduce_every="sequence"``) or of each backward pass (``"backward"``)."""

    swaps_parameters = True  # training backpropagates into every leaf: the gathered tensors come and go

    def __init__(self, layers: list[str], reduce_every: str):
        self.layers = layers  # the paths of the layer units in the step graph
        self.reduce_every = reduce_every

    @contextlib.contextmanager
    def sequence(self, seg):
        seg.reshard()  # the root's tensors left gathered by an inference call may predate an optimizer step
        seg.set_requires_gradient_sync(self.reduce_every == "backward")
        seg.set_reshard_after_backward(False, recurse=False)  # the root stays gathered between backwards
        try:
            getattr(seg, _BEGIN_METHOD)()
            yield
        except BaseException:
            self._drop_gradients(seg)
            raise
        finally:
            seg.set_requires_gradient_sync(True)
            seg.set_reshard_after_backward(True, recurse=False)
        getattr(seg, _SYNC_METHOD)().backward()

    def _drop_gradients(self, seg) -> None:
        """After a failed sequence: drop its partial gradients and free what is gathered. A layer's
        unsharded gradient sits on FSDP's gathered tensor, which no module registers once the layer
        is freed: it is reached through FSDP's records of its parameters (torch internals). With
        ``reduce_every="backward"`` part of the sequence is already in the shards' gradients, which
        are dropped too (with what earlier sequences accumulated there)."""
        from torch.distributed.fsdp import FSDPModule

        for module in seg.modules():
            if not isinstance(module, FSDPModule):
                continue
            for param in _fsdp_parameters(module):
                if hasattr(param, "_unsharded_param"):
                    param._unsharded_param.grad = None
                param.unsharded_accumulated_grad = None
            module.reshard()
            if self.reduce_every == "backward":
                module.zero_grad(set_to_none=True)


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


def _begin_sequence(seg) -> None:
    """Run as an FSDP forward of the root: it initialises FSDP (the root's forward must run before
    any unit's) and gathers the root unit for the sequence."""


def _start_the_reduction(seg) -> torch.Tensor:
    """Run as an FSDP forward of the root: a zero whose backward runs the root's pre-backward, which
    queues FSDP's end-of-backward callback; that callback runs the post-backward of every unit, which
    reduce-scatters the gradients accumulated during the sequence and frees what is gathered."""
    return torch.zeros((), device=seg.capture_info.device, requires_grad=True) * 0


# ---- what a rank holds unsharded (tests, the README's memory model) ---------------------------------
@contextlib.contextmanager
def record_gathered_bytes(seg) -> Iterator[list[dict[str, dict[str, int]]]]:
    """Record what FSDP2 holds unsharded while the context is open: a list of samples, one per
    change, each ``{"gathered": {unit: bytes}, "gradients": {unit: bytes}}`` with a unit's path as
    key (``""``: the root unit, with the embeddings, norm and head): its gathered parameters (and an
    all-gather issued for it, not yet copied out: a prefetch) and its unsharded gradients. Sampled
    wherever autograd saves a tensor (every forward operator that backward needs) and wherever it
    reads one back (every backward operator), so each unit's forward and each backward through it
    are seen. For tests: it reads FSDP's records of every parameter (torch internals) at every
    sample."""
    layers = list(getattr(seg.gradient_sync, "layers", []))
    samples: list[dict[str, dict[str, int]]] = []

    def sample(t: torch.Tensor) -> torch.Tensor:
        now = _unsharded_bytes(seg, layers)
        if not samples or samples[-1] != now:
            samples.append(now)
        return t

    with torch.autograd.graph.saved_tensors_hooks(sample, sample):
        yield samples
    sample(None)


def _unsharded_bytes(seg, layers: list[str]) -> dict[str, dict[str, int]]:
    from torch.distributed.fsdp import FSDPModule

    gathered, gradients = dict.fromkeys(["", *layers], 0), dict.fromkeys(["", *layers], 0)
    units = {seg: ""} | {seg.step_graph.get_submodule(path): path for path in layers}
    for module, unit in units.items():
        group = module._get_fsdp_state()._fsdp_param_group if isinstance(module, FSDPModule) else None
        if group is None:
            continue
        for param in group.fsdp_params:
            held = getattr(param, "_unsharded_param", None)
            if held is not None and held.untyped_storage().size() > 0:
                gathered[unit] += _bytes(held)
            for grad in (held.grad if held is not None else None, param.unsharded_accumulated_grad):
                gradients[unit] += _bytes(grad) if grad is not None else 0
        if (pending := group._all_gather_result) is not None:
            gathered[unit] += _bytes(pending.all_gather_output)
    return {"gathered": gathered, "gradients": gradients}


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _fsdp_parameters(module) -> list:
    """FSDP2's records (``FSDPParam``) of the parameters ``module`` shards itself (torch internals)."""
    group = module._get_fsdp_state()._fsdp_param_group
    return group.fsdp_params if group is not None else []


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
