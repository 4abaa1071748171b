"""The plot of an evaluation's results (matplotlib, an optional dependency: ``available()`` says
whether it is installed; nothing here imports it before a plot is drawn)."""

from __future__ import annotations

import importlib.util
import os

from ..files import atomic_path
from .passkey import DEPTH_BINS, PasskeyResult, depth_bin_label
from .perplexity import BANDS, PerplexityResult


def available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def plot_perplexity(path: str | os.PathLike, results: dict[str, dict[int, PerplexityResult]], title: str) -> None:
    """One panel per length: perplexity overall and per band, one bar per plan."""
    plt = _pyplot()
    lengths = sorted({n for by_length in results.values() for n in by_length})
    fig, axes = plt.subplots(1, len(lengths), figsize=(5 * len(lengths), 4), squeeze=False)
    groups = ["overall", *BANDS]
    width = 0.8 / max(len(results), 1)
    for ax, n in zip(axes[0], lengths):
        for i, (label, by_length) in enumerate(results.items()):
            if n not in by_length:
                continue
            r = by_length[n]
            values = [r.overall.perplexity, *(r.bands[b].perplexity for b in BANDS)]
            ax.bar([g + i * width for g in range(len(groups))], values, width, label=label)
        ax.set_xticks([g + width * (len(results) - 1) / 2 for g in range(len(groups))], groups)
        ax.set_title(f"{n} tokens")
        ax.set_ylabel("perplexity")
    axes[0][0].legend(fontsize="small", loc="lower right")
    _save(plt, fig, path, title)


def plot_passkey(path: str | os.PathLike, results: dict[str, PasskeyResult], title: str) -> None:
    """Accuracy by length (left) and by depth over every length (right), one line or bar per plan."""
    plt = _pyplot()
    fig, (by_length, by_depth) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / max(len(results), 1)
    for i, (label, result) in enumerate(results.items()):
        accuracy = result.by_length()
        by_length.plot(list(accuracy), [a["accuracy"] for a in accuracy.values()], marker="o", label=label)
        depths = result.by_depth()
        by_depth.bar([g + i * width for g in range(len(DEPTH_BINS))],
                     [_or_zero(depths[depth_bin_label(b)]["accuracy"]) for b in DEPTH_BINS], width, label=label)
    lengths = sorted({t.length for result in results.values() for t in result.trials})
    by_length.set_xscale("log", base=2)
    by_length.set_xticks(lengths, [str(n) for n in lengths])
    by_length.minorticks_off()
    by_length.set_xlabel("context (tokens)")
    by_length.set_ylabel("passkey accuracy (teacher forcing)")
    by_length.set_ylim(-0.05, 1.05)
    by_depth.set_xticks([g + width * (len(results) - 1) / 2 for g in range(len(DEPTH_BINS))],
                        [depth_bin_label(b) for b in DEPTH_BINS])
    by_depth.set_xlabel("depth of the key")
    by_depth.set_ylim(0, 1.05)
    by_length.legend(fontsize="small")
    _save(plt, fig, path, title)


def _or_zero(value):
    return 0.0 if value is None or value != value else value  # no trial in the bin: an empty bar


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path, title: str) -> None:
    fig.suptitle(title, fontsize="medium")
    fig.tight_layout()
    suffix = os.path.splitext(str(path))[1].lstrip(".") or "png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=suffix, dpi=120)
    plt.close(fig)
