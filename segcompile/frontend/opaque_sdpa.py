"""``segcompile::scaled_dot_product_attention``: SDPA kept opaque while a model is traced.

Tracing through ``F.scaled_dot_product_attention`` runs its device-specific fake kernel; on CUDA
the efficient-attention kernel pads the mask to a multiple of 8 and adds shape guards that
torch.export (2.11) cannot prove for a dynamic length, so capture fails. The attention node is
replaced by ``segment_attention`` anyway, so capture routes every SDPA call through this custom
op instead: it runs SDPA for real (the captured graph stays executable, e.g. for the mask
check) and its fake only states the output shape. The captured graph is then the same on every
device. ``find_attention`` matches it like ``aten.scaled_dot_product_attention``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


@torch.library.custom_op("segcompile::scaled_dot_product_attention", mutates_args=())
def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    return F.scaled_dot_product_attention(
        query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
        enable_gqa=enable_gqa,
    )


@scaled_dot_product_attention.register_fake
def _(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    return query.new_empty((*query.shape[:-1], value.shape[-1]))


OPAQUE_SDPA = scaled_dot_product_attention._opoverload


class OpaqueSDPA(TorchFunctionMode):
    """While active, ``F.scaled_dot_product_attention`` calls become ``OPAQUE_SDPA`` nodes."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return OPAQUE_SDPA(*args, **kwargs)
        return func(*args, **kwargs)
