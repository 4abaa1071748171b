"""fuse_projections: one matrix product for the small projections that read the same input.

A decode step at batch 1 runs matrix-vector products, bound by reading the weights. A large one
reads them near the memory bandwidth; a small one does not: on an H200 (Llama-3-8B shape,
``bench/profile_generate.py``) the 117 MB MLP products ran at about 3.8 TB/s, the 32 MB query
projection at 3.0 and the 8 MB key and value projections at 1.6, each with a split-K reduction
kernel of its own. Reading the query, key and value weights as one ``[q + k + v, hidden]``
matrix makes one product of 48 MB out of five kernels.

Matches ``aten.linear`` nodes that read the same input node, whose weights are ``get_attr``
nodes of one dtype, device and in-features, all with a ``get_attr`` bias or none, and whose
weights together hold at most ``max_bytes`` (larger products gain nothing and would cost their
size again in memory).

Produces one ``aten.linear`` over a weight (and bias) concatenated along the out-features, held
by the graph module as a buffer (``fused_projection_<i>``, a copy: the model's parameters are
left as they are), and ``aten.split_with_sizes`` whose pieces replace the original products.
``gm.meta[FUSED]`` lists each buffer's name and its ``StackedCopy`` (which holds the sources);
``refresh_fused_projections(gm)`` copies the sources again when any of them changed in place
since (an optimizer step between two decodes), so the copy never serves stale weights.

Both decode paths read the fused products (the eager decode's step graph and the CUDA-graph
decoder's program), so that they round alike: cuBLAS sums a ``[6144, 4096]`` product in another
order than the three it replaces, which moved a few outputs a layer by one bf16 unit and the
logits of a random 8B-shaped model by 10 units after 32 layers (bench/README.md, generation).
Programs fused from the same weights hold one stacked copy (``StackedCopy``, found in
``SHARED``), which a change of the weights then refreshes once for all of them: the eager decode's
step graph and the CUDA-graph decoder's program, and those of every program transformed from one
model (another history dtype or segment length: 1.5 GB once for an 8B model, not once a program).
"""

from __future__ import annotations

import operator
import weakref

import torch
from torch import fx

FUSED = "segcompile.fused_projections"  # per stacked buffer: (its name, its StackedCopy)
MAX_BYTES = 64 << 20  # the q, k and v weights of an 8B model (48 MiB) fuse; its 117 MB MLP products do not

_LINEAR = torch.ops.aten.linear.default
# stacked copies by their sources' ids, process-wide; held weakly, so a copy goes with the last
# program that reads it (each program's ``FUSED`` record holds it, and it holds its sources)
SHARED: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def fuse_projections(gm: fx.GraphModule, max_bytes: int = MAX_BYTES) -> fx.GraphModule:
    """``gm`` with every group of small sibling projections read as one product (module docstring); in place.
    Stacked copies of the same sources are reused (``SHARED``)."""
    fused = []
    for i, group in enumerate(_sibling_groups(gm, max_bytes)):
        fused += _fuse(gm, group, f"fused_projection_{i}")
    gm.meta[FUSED] = fused
    if fused:
        gm.graph.lint()
        gm.recompile()
    return gm


def refresh_fused_projections(gm: fx.GraphModule) -> None:
    """Copy the fused weights from their sources again if any source changed in place (once for
    every program that shares the copy)."""
    for _, stacked in gm.meta.get(FUSED, ()):
        stacked.refresh()


class StackedCopy:
    """``sources`` concatenated along dim 0 (``tensor``) and the sources' versions when copied.
    Programs fused from the same weights hold the same one (``SHARED``), so a change of the
    weights is copied once for all of them."""

    def __init__(self, sources: list[torch.Tensor]):
        self.sources = sources
        self.versions = [t._version for t in sources]
        # a normal tensor even when the first decode runs under torch.inference_mode: a later decode
        # outside it refreshes the copy in place
        with torch.inference_mode(False), torch.no_grad():
            self.tensor = torch.cat(sources, dim=0)

    def holds(self, sources: list[torch.Tensor]) -> bool:
        """Whether this copy has the shape, device and dtype of ``sources`` stacked."""
        t = self.tensor
        return (t.device == sources[0].device and t.dtype == sources[0].dtype
                and t.shape[0] == sum(s.shape[0] for s in sources))

    def refresh(self) -> None:
        now = [t._version for t in self.sources]
        if now != self.versions:
            with torch.inference_mode(False), torch.no_grad():
                torch.cat(self.sources, dim=0, out=self.tensor)
            self.versions = now


def _sibling_groups(gm: fx.GraphModule, max_bytes: int) -> list[list[fx.Node]]:
    by_input: dict[tuple, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not _LINEAR:
            continue
        weight, bias = node.args[1], node.args[2] if len(node.args) > 2 else None
        if not _is_attr(weight) or not (bias is None or _is_attr(bias)):
            continue
        w = _attr(gm, weight)
        key = (node.args[0], w.dtype, w.device, w.shape[1], bias is None)
        by_input.setdefault(key, []).append(node)
    groups = []
    for nodes in by_input.values():
        size = sum(_attr(gm, n.args[1]).nbytes for n in nodes)
        if len(nodes) > 1 and size <= max_bytes:
            groups.append(nodes)
    return groups


def _fuse(gm: fx.GraphModule, group: list[fx.Node], name: str) -> list[tuple[str, StackedCopy]]:
    """One product for ``group``; its ``FUSED`` records: the stacked weight's, and the bias's if any."""
    weights = [_attr(gm, n.args[1]) for n in group]
    biases = [_attr(gm, n.args[2]) for n in group] if len(group[0].args) > 2 and group[0].args[2] is not None else []
    stacked = [(name, weights)] + ([(name + "_bias", biases)] if biases else [])
    copies = [_stacked(sources) for _, sources in stacked]
    for (buffer, _), copy in zip(stacked, copies):
        gm.register_buffer(buffer, copy.tensor, persistent=False)
    graph, first = gm.graph, group[0]
    with graph.inserting_before(first):
        product = graph.call_function(_LINEAR, (first.args[0], *(graph.get_attr(buffer) for buffer, _ in stacked)))
        pieces = graph.call_function(torch.ops.aten.split_with_sizes.default, (product, [w.shape[0] for w in weights], -1))
        for i, node in enumerate(group):
            piece = graph.call_function(operator.getitem, (pieces, i))
            piece.meta.update(node.meta)
            node.replace_all_uses_with(piece)
    for node in group:
        graph.erase_node(node)
    return [(buffer, copy) for (buffer, _), copy in zip(stacked, copies)]


def _stacked(sources: list[torch.Tensor]) -> StackedCopy:
    """``sources`` stacked, up to date: ``SHARED``'s copy where it holds them (copied again if a
    source changed since), else a new one, which ``SHARED`` then keeps."""
    key = tuple(id(t) for t in sources)  # ids stay unique while the copy lives: it holds the sources
    copy = SHARED.get(key)
    if copy is None or not copy.holds(sources):
        copy = SHARED[key] = StackedCopy(sources)
    else:
        copy.refresh()
    return copy


def _is_attr(node) -> bool:
    return isinstance(node, fx.Node) and node.op == "get_attr"


def _attr(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor:
    return operator.attrgetter(node.target)(gm)
