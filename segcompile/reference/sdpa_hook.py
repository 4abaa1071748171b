"""Run a model with every ``F.scaled_dot_product_attention`` call handed to a function of ours.

The oracle replaces each call by dense attention under its masks; head selection measures each
call's attention. The n-th call of a forward is layer n. HF models loaded with the eager
implementation are switched to SDPA for the duration (the two are numerically the same
computation). Run models in eval mode: attention dropout is refused.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..errors import SegcompileError
from ..frontend import attention_through_sdpa, cache_off


# ---- the model's shape, read from its config ---------------------------------------------------
def _config_value(model: torch.nn.Module, *names: str) -> int:
    config = getattr(model, "config", None)
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    raise SegcompileError(
        f"{type(model).__name__}.config has none of {names}; the oracle and head selection read "
        "the layer and head counts from the model's config"
    )


def kv_heads_per_layer(model: torch.nn.Module) -> list[int]:
    layers = _config_value(model, "num_hidden_layers", "n_layer", "num_layers")
    kv = _config_value(model, "num_key_value_heads", "num_attention_heads", "n_head")
    return [kv] * layers


# ---- the hook ----------------------------------------------------------------------------------
class PerLayerSDPA(TorchFunctionMode):
    """Hands the n-th ``F.scaled_dot_product_attention`` call of a forward to
    ``on_call(n, args, sdpa)`` (``args``: the call's arguments by name, defaults filled in;
    ``sdpa(**overrides)``: the original call) and returns what it returns."""

    def __init__(self, on_call, who: str):
        super().__init__()
        self.on_call, self.who, self.layer = on_call, who, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        bound = inspect.signature(_sdpa_signature).bind(*args, **kwargs)
        bound.apply_defaults()
        if bound.arguments["dropout_p"]:
            raise SegcompileError(f"{self.who}: attention dropout must be 0 (put the model in eval mode)")
        out = self.on_call(self.layer, bound.arguments, lambda **over: func(**{**bound.arguments, **over}))
        self.layer += 1
        return out


def run_per_layer_attention(model: torch.nn.Module, input_ids: torch.Tensor, on_call, who: str = "oracle"):
    """Run ``model`` with every attention call replaced by ``on_call`` (see ``PerLayerSDPA``);
    returns the logits and the number of attention calls made."""
    mode = PerLayerSDPA(on_call, who)
    with attention_through_sdpa(model), mode:  # eager's too: the hook needs the SDPA call
        logits = model_logits(model, input_ids)
    return logits, mode.layer


def _sdpa_signature(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    pass


def model_logits(model, input_ids):
    """The model's logits for ``input_ids`` (no KV cache)."""
    out = model(input_ids, **cache_off(model))
    return out.logits if hasattr(out, "logits") else out
