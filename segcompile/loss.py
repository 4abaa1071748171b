"""The causal-LM loss of a span of positions (HF convention: position i predicts labels[i+1])."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def label_count(labels: torch.Tensor) -> int:
    """Label tokens of a whole sequence: the denominator of the mean reduction."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def span_loss(logits: torch.Tensor, labels: torch.Tensor, start: int) -> torch.Tensor:
    """Summed loss of the logits of positions ``[start, start + logits.shape[1])``.

    Computed in at least fp32 (fp64 stays fp64). The sequence's last position has no label.
    """
    stop = min(start + logits.shape[1], labels.shape[1] - 1)
    if stop <= start:
        return logits.sum() * 0
    target = labels[:, start + 1 : stop + 1]
    pred = logits[:, : stop - start]
    pred = pred.to(torch.promote_types(pred.dtype, torch.float32))
    return F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
