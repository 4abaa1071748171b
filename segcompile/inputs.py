"""Checks of what a caller feeds a segmented model (or the oracle): token ids and labels.

A bad id reaches an embedding lookup deep inside the step graph, where torch fails with an
index error (or, on CUDA, a device-side assert that poisons the context); a bad label reaches
``cross_entropy`` the same way. Both are checked once per call, before any step runs, with one
min/max reduction each: on CUDA that reads two numbers back from the device (one sync per
call, never one per step). Integer ids of any width are accepted and converted to int64 (what
the embedding and the step graph's position arithmetic take): a uint8 or int32 id means the same
token.
"""

from __future__ import annotations

import torch

from .errors import InputError
from .loss import IGNORE_INDEX


def token_ids(ids, *, vocab_size: int | None, device: torch.device | None, owner: str,
              what: str = "input_ids", check_range: bool = True) -> torch.Tensor:
    """``ids`` as an int64 ``[batch, tokens]`` tensor, checked (``check_token_tensor``) and, with
    ``check_range``, inside ``[0, vocab_size)``. An ``InputError`` names what is wrong."""
    check_token_tensor(ids, device, owner, what)
    ids = ids if ids.dtype == torch.int64 else ids.long()
    if check_range and vocab_size is not None:
        check_in_vocabulary(ids, vocab_size, owner, what)
    return ids


def check_token_tensor(ids, device: torch.device | None, owner: str, what: str = "input_ids") -> None:
    """``ids`` must be an integer ``[batch, tokens]`` tensor with at least one token and one row,
    on ``device``'s type (where ``owner``, the model's class, runs; ``None``: not checked)."""
    if not isinstance(ids, torch.Tensor):
        raise InputError(f"{what} must be an integer tensor [batch, tokens], got a {type(ids).__name__}")
    if ids.dim() != 2 or not _is_integer(ids.dtype):
        raise InputError(
            f"{what} must be an integer tensor [batch, tokens], got {ids.dtype} of shape {tuple(ids.shape)}"
        )
    if ids.shape[1] == 0:
        raise InputError(f"{what} has no tokens")
    if ids.shape[0] == 0:
        raise InputError(f"{what} has no rows (shape {tuple(ids.shape)}); pass at least one sequence")
    if device is not None and ids.device.type != device.type:
        raise InputError(
            f"{what} are on {ids.device} but {owner} was captured on {device}; the traced graph is "
            "device-specific: move the model first, then call transform"
        )


def check_in_vocabulary(ids: torch.Tensor, vocab_size: int, owner: str, what: str = "input_ids") -> None:
    """Every id in ``[0, vocab_size)``, the rows of ``owner``'s input embedding (one reduction)."""
    low, high = torch.stack(torch.aminmax(ids)).tolist()
    if low < 0 or high >= vocab_size:
        row, column = _first((ids < 0) | (ids >= vocab_size))
        raise InputError(
            f"{what} hold ids outside the vocabulary of {owner} (ids 0..{vocab_size - 1}): min {low}, max {high}, "
            f"the first at [{row}, {column}] is {int(ids[row, column])}; use the tokenizer made for this model"
        )


def label_ids(labels, input_ids: torch.Tensor, num_classes: int | None, owner: str) -> torch.Tensor:
    """``labels`` (the targets of a causal-LM loss: ``labels[i + 1]`` is what position ``i``
    predicts) as int64, checked: an integer tensor of ``input_ids``' shape whose values are
    ``IGNORE_INDEX`` (-100, no loss) or classes of the logits, ``[0, num_classes)``."""
    if not isinstance(labels, torch.Tensor):
        raise InputError(f"labels must be an integer tensor [batch, tokens], got a {type(labels).__name__}")
    if not _is_integer(labels.dtype):
        raise InputError(
            f"labels must be an integer tensor of token ids ({IGNORE_INDEX} to ignore a position), got "
            f"{labels.dtype}; for a soft-target loss take seg(input_ids).logits and compute it yourself"
        )
    if labels.shape != input_ids.shape:
        raise InputError(f"labels {tuple(labels.shape)} must have the shape of input_ids {tuple(input_ids.shape)}")
    if labels.device != input_ids.device:
        raise InputError(f"labels are on {labels.device} but input_ids on {input_ids.device}; put them on one device")
    labels = labels if labels.dtype == torch.int64 else labels.long()
    if num_classes is not None:
        ignored = labels == IGNORE_INDEX
        low, high = torch.stack(torch.aminmax(labels.masked_fill(ignored, 0))).tolist()
        if low < 0 or high >= num_classes:
            row, column = _first(~ignored & ((labels < 0) | (labels >= num_classes)))
            raise InputError(
                f"labels hold values outside the {num_classes} classes of {owner}'s logits: min {low}, max {high} "
                f"(besides {IGNORE_INDEX}), the first at [{row}, {column}] is {int(labels[row, column])}; labels are "
                f"token ids, or {IGNORE_INDEX} for a position without loss"
            )
    return labels


def _is_integer(dtype: torch.dtype) -> bool:
    return not dtype.is_floating_point and not dtype.is_complex and dtype != torch.bool


def _first(bad: torch.Tensor) -> tuple[int, int]:
    """The ``[row, column]`` of the first True of ``bad`` (an error path: the extra sync is free)."""
    row, column = bad.nonzero()[0].tolist()
    return row, column
