"""What "equal" means in the tests and the GPU checks, per dtype: one table.

Two measures, because logits and gradients have different scales:

* ``logits``: ``max |got - want|`` on logits or attention outputs (values of order one);
* ``relative``: ``max |got - want| / max |want|``, for gradients and anything else whose scale
  depends on the model and the loss.

fp64 is what exactness is proved in (measured ~1e-15); fp32 allows reassociation (the
segmented program sums attention in another order than the model); bf16 and fp16 allow a few
units in the last place of their 8 and 11 mantissa bits, accumulated over a few tiny layers.
A test that needs less than this states why beside its own number (e.g. two runs of one
program that should agree bit for bit).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tolerance:
    logits: float
    relative: float


TOLERANCES = {
    torch.float64: Tolerance(logits=1e-12, relative=1e-9),
    torch.float32: Tolerance(logits=1e-4, relative=1e-4),
    torch.float16: Tolerance(logits=5e-3, relative=1e-2),
    torch.bfloat16: Tolerance(logits=3e-2, relative=5e-2),
}


def tolerance(dtype: torch.dtype) -> Tolerance:
    """The row for ``dtype`` (the dtype the computation ran in, not the one compared)."""
    try:
        return TOLERANCES[dtype]
    except KeyError:
        raise ValueError(f"no tolerance for {dtype}; known: {', '.join(map(str, TOLERANCES))}") from None


def max_abs_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return (got.double() - want.double()).abs().max().item()


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """``max |got - want| / max |want|`` (0 where both are zero)."""
    scale = want.double().abs().max().clamp_min(1e-300)
    return ((got.double() - want.double()).abs().max() / scale).item()


def assert_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, measure: str = "logits", what: str = "") -> None:
    """Assert ``got`` equals ``want`` within ``dtype``'s ``measure`` ("logits" or "relative"); the
    message names the worst index and both values there."""
    if got.shape != want.shape:
        raise AssertionError(f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}")
    limit = getattr(tolerance(dtype), measure)
    error = max_abs_error(got, want) if measure == "logits" else relative_error(got, want)
    if error <= limit:
        return
    diff = (got.double() - want.double()).abs()
    worst = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
    raise AssertionError(
        f"{what}: {measure} error {error:.3g} > {limit:g} ({dtype}); worst at {worst}: "
        f"got {got[worst].item():.6g}, want {want[worst].item():.6g}"
    )
