"""What a pass did: the difference between the graph before it and the graph after it.

Nodes are matched by name: FX keeps the name of every node a pass did not create, so

    added     names only in ``after``
    removed   names only in ``before``
    rewired   names in both whose inputs (which node feeds which argument slot) or target changed
    modified  names in both, not rewired, whose constant arguments (``args``) or segcompile
              annotations (``notes``) changed: a pass that set ``impl=`` or recorded a site

A pure function of two ``networkx.DiGraph`` (``graph_of`` makes them; tests build them by
hand): inputs are read from the edges (``slots`` attribute, the argument positions an edge
feeds; an edge without it counts as slot 0), targets, args and notes from the node attributes.
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx

STATUSES = ("added", "removed", "rewired", "modified")


@dataclass(frozen=True)
class GraphDiff:
    added: frozenset[str] = frozenset()
    removed: frozenset[str] = frozenset()
    rewired: frozenset[str] = frozenset()
    modified: frozenset[str] = frozenset()

    def status(self, name: str) -> str | None:
        """``added``, ``removed``, ``rewired``, ``modified``, or None for an untouched node."""
        for status in STATUSES:
            if name in getattr(self, status):
                return status
        return None

    def counts(self) -> dict[str, int]:
        return {status: len(getattr(self, status)) for status in STATUSES}

    def __bool__(self) -> bool:
        return any(self.counts().values())


def diff_graphs(before: nx.DiGraph | None, after: nx.DiGraph) -> GraphDiff:
    """The nodes ``after`` added, removed, rewired or modified relative to ``before``.

    ``before=None`` (the first graph of a pipeline) is no change at all, not "everything added".
    """
    if before is None:
        return GraphDiff()
    old, new = set(before.nodes), set(after.nodes)
    rewired, modified = set(), set()
    for name in old & new:
        a, b = before.nodes[name], after.nodes[name]
        if a.get("target") != b.get("target") or _inputs(before, name) != _inputs(after, name):
            rewired.add(name)
        elif a.get("args") != b.get("args") or a.get("notes") != b.get("notes"):
            modified.add(name)
    return GraphDiff(frozenset(new - old), frozenset(old - new), frozenset(rewired), frozenset(modified))


def _inputs(g: nx.DiGraph, name: str) -> list[tuple[int, str]]:
    """(argument slot, input name) pairs of ``name``, in slot order."""
    pairs = [(slot, u) for u, _, slots in g.in_edges(name, data="slots") for slot in (slots or (0,))]
    return sorted(pairs)


def input_names(g: nx.DiGraph, name: str) -> list[str]:
    """The input names of ``name`` in argument order (read from the edges)."""
    return [u for _, u in _inputs(g, name)]
