"""The pass visualiser: what every pass did to the graph, as pages that open offline.

    graph_of(gm, name)            an FX graph and its metadata as a networkx.DiGraph of plain data
    diff_graphs(before, after)    the nodes a pass added, removed, rewired or modified
    write_pages(graphs, out_dir)  index.html, one page per pass, DOT (and SVG where Graphviz is)
    to_dot(graph, diff, before)   one pass as DOT text

``PassManager(..., dump_dir=...)`` (hence ``segcompile.transform(..., dump_dir=...)`` and the
``segcompile viz`` command) takes a snapshot after every pass and writes the pages at the end.
"""

from .diff import GraphDiff, diff_graphs
from .dot import to_dot
from .graph import graph_of
from .pages import write_pages

__all__ = ["GraphDiff", "diff_graphs", "graph_of", "to_dot", "write_pages"]
