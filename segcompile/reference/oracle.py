"""The oracle: a slow, obviously correct implementation of the segmented semantics.

It runs the *original* model over the whole sequence and replaces every attention call by
dense attention under two per-head boolean masks built straight from docs/design.md section 1:

* ``visible[h, i, j]``: may the query at position ``i`` of query head ``h`` see key ``j``;
* ``live[i, j]``: does gradient flow from that score into K/V[j] (else K/V[j] is a constant).

Forward: the segment loop computes every K/V of a layer from that layer's input at the same
absolute position, and positions mix only through attention, so the segmented forward equals
the full-sequence forward under ``visible``.

TBPTT gradients: ``l_s`` (the loss on segment ``s``'s tokens) is differentiated through a
forward over the prefix ``[0, end of s)`` in which a score carries gradient into K/V[j] only if
``j`` is in the query's current segment, or in its tail and ``j``'s segment is at least
``s - K``. That is the definition: segments ``s-K .. s`` are recomputed from the constant
carried state of segment ``s - K`` (its tail is a constant, as are history and sinks
everywhere), and nothing earlier than ``s - K`` can reach ``l_s`` except through constants.
The total gradient is the sum over ``s``. Queries always receive gradient.

Quantised history (``cfg.history_dtype``): where a long-range head sees key ``j`` as history
(``j < a - T``), it sees K/V[j] as the history stores them, ``history_format.round_trip`` of the
layer's K/V (the format's blocks depend on positions alone, so quantising the whole sequence at
once gives what the runtime stores segment by segment); everywhere else, the exact K/V.

Attention calls are intercepted with a ``TorchFunctionMode`` on
``F.scaled_dot_product_attention`` (``sdpa_hook.run_per_layer_attention``, which head selection
uses too); the n-th call of a forward is layer n. Run models in eval mode (no dropout).

Inputs are checked as ``SegmentedModel`` checks them (``segcompile/inputs.py``): ids an integer
``[batch, tokens]`` tensor on the model's device inside its vocabulary (the input embedding's
rows, else ``config.vocab_size``), labels classes of its logits or -100; an ``InputError``
otherwise, never an index error from inside the model.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..config import SegmentConfig
from ..errors import SegcompileError
from ..frontend import device_of
from ..loss import label_count, span_loss
from ..inputs import label_ids, token_ids
from ..kernels.history_format import round_trip
from .sdpa_hook import kv_heads_per_layer, run_per_layer_attention


# ---- masks ---------------------------------------------------------------------------------
def visibility(cfg: SegmentConfig, n: int, long_range: bool) -> torch.Tensor:
    """``[n, n]`` bool: which keys ``j`` the query at position ``i`` sees (docs/design.md section 1, the table)."""
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    a = (i // cfg.segment_len) * cfg.segment_len
    current = (a <= j) & (j <= i)
    tail = (j >= (a - cfg.tail_len).clamp(min=0)) & (j < a)
    if long_range:
        history = j < a - cfg.tail_len
        return current | tail | history
    sinks = j < torch.minimum(torch.full_like(a, cfg.sink_tokens), a - cfg.tail_len)
    return current | tail | sinks


def history_keys(cfg: SegmentConfig, n: int) -> torch.Tensor:
    """``[n, n]`` bool: the keys a long-range head's query at ``i`` sees as history (``j < a - T``)."""
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    return j < (i // cfg.segment_len) * cfg.segment_len - cfg.tail_len


def live_keys(cfg: SegmentConfig, n: int, loss_segment: int) -> torch.Tensor:
    """``[n, n]`` bool: pairs through which ``l_{loss_segment}`` sends gradient into K/V[j]."""
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    S = cfg.segment_len
    a = (i // S) * S
    current = (a <= j) & (j <= i)
    tail = (j >= (a - cfg.tail_len).clamp(min=0)) & (j < a)
    return current | (tail & (j // S >= loss_segment - cfg.tbptt_k))


# ---- attention under the masks -------------------------------------------------------------
def _masked_attention(q, k, v, attn_mask, scale, visible_by_kv_head, live, stored=None):
    """Dense attention, ``q [B,H,n,D]``, ``k/v [B,Hk,n,D]`` (Hk == H when repeated upstream).
    ``stored``: ``(k, v, history_by_kv_head)``, the K/V as a quantised history stores them and,
    per KV head, the keys read from it (``[n, n]`` bool, or None)."""
    H, n = q.shape[1], q.shape[2]
    group = H // len(visible_by_kv_head)
    visible = torch.stack([visible_by_kv_head[h // group] for h in range(H)])  # [H, n, n]
    if k.shape[1] != H:  # un-repeated GQA K/V (enable_gqa=True)
        k = k.repeat_interleave(H // k.shape[1], dim=1)
        v = v.repeat_interleave(H // v.shape[1], dim=1)
    if stored is not None:  # stored K/V come one per KV head
        stored = (stored[0].repeat_interleave(group, dim=1), stored[1].repeat_interleave(group, dim=1), stored[2])
    compute = torch.promote_types(q.dtype, torch.float32)
    q, k, v = q.to(compute), k.to(compute), v.to(compute)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.where(live, q @ k.transpose(-1, -2), q @ k.detach().transpose(-1, -2)) * scale
    if stored is not None:
        return _with_stored_history(q, v, scores, attn_mask, visible, live, scale, stored, group, compute)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            visible = visible & attn_mask[..., -n:, -n:]
        else:
            scores = scores + attn_mask[..., -n:, -n:].to(compute)
    scores = scores.masked_fill(~visible, float("-inf"))
    p = torch.softmax(scores, dim=-1)
    return (p * live) @ v + (p * ~live) @ v.detach()


def _with_stored_history(q, v, scores, attn_mask, visible, live, scale, stored, group, compute):
    """``_masked_attention`` where the keys read from a quantised history take their stored K/V
    (constants: history never carries gradient)."""
    hist_k, hist_v, by_kv_head = stored
    none = torch.zeros_like(visible[0])
    history = torch.stack([none if by_kv_head[h // group] is None else by_kv_head[h // group]
                           for h in range(q.shape[1])])
    hist_k, hist_v = hist_k.to(compute).detach(), hist_v.to(compute).detach()
    scores = torch.where(history, q @ hist_k.transpose(-1, -2) * scale, scores)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            visible = visible & attn_mask[..., -q.shape[2]:, -q.shape[2]:]
        else:
            scores = scores + attn_mask[..., -q.shape[2]:, -q.shape[2]:].to(compute)
    p = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    exact = ~history
    return (p * (live & exact)) @ v + (p * (~live & exact)) @ v.detach() + (p * history) @ hist_v


def _run(model, cfg: SegmentConfig, input_ids, live: Callable[[int], torch.Tensor]) -> torch.Tensor:
    kv = kv_heads_per_layer(model)
    plan = cfg.long_range.resolve(kv)

    def attend(layer, args, _sdpa):
        if layer >= len(kv):
            raise SegcompileError(f"oracle: attention call {layer} but the config names {len(kv)} layers")
        q = args["query"]
        n = q.shape[2]
        masks = {flag: visibility(cfg, n, flag).to(q.device) for flag in (False, True)}
        by_kv_head = [masks[h in plan[layer]] for h in range(kv[layer])]
        stored = _stored_history(cfg, args["key"], args["value"], plan[layer], kv[layer])
        out = _masked_attention(q, args["key"], args["value"], args["attn_mask"], args["scale"], by_kv_head,
                                live(n).to(q.device), stored)
        return out.to(q.dtype)

    logits, calls = run_per_layer_attention(model, input_ids, attend)
    if calls == 0 and len(kv):
        impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
        raise SegcompileError(
            f"oracle: {type(model).__name__} made no F.scaled_dot_product_attention call: its attention "
            f"({impl or 'its own code'}) computes attention itself and could not be switched to SDPA, which is "
            "where the oracle applies its masks; it cannot run this model (the segmented model can)"
        )
    if calls != len(kv):
        raise SegcompileError(f"oracle: saw {calls} attention calls, expected {len(kv)} (one per layer)")
    return logits


def _stored_history(cfg: SegmentConfig, k, v, long_range, num_kv_heads: int):
    """``_masked_attention``'s ``stored`` for a quantised history (``None`` without one, or
    without long-range heads in this layer). K/V come un-repeated (``[B, Hk, n, D]``) or repeated
    per query head; the stored values of a repeated head are its KV head's."""
    if cfg.history_dtype is None or not long_range:
        return None
    n = k.shape[2]
    if k.shape[1] != num_kv_heads:  # repeated upstream: one copy per KV head
        step = k.shape[1] // num_kv_heads
        k, v = k[:, ::step], v[:, ::step]
    geometry = cfg.history_geometry()
    keys = history_keys(cfg, n).to(k.device)
    by_kv_head = [keys if h in long_range else None for h in range(num_kv_heads)]
    # dequantised in fp32, as the kernels read it (not rounded back to the model's dtype)
    stored_k, stored_v = (round_trip(t.detach().float(), geometry, cfg.history_dtype) for t in (k, v))
    return stored_k, stored_v, by_kv_head


# ---- the inputs ----------------------------------------------------------------------------
def _checked_ids(model: torch.nn.Module, input_ids) -> torch.Tensor:
    return token_ids(input_ids, vocab_size=_vocabulary(model), device=device_of(model), owner=type(model).__name__)


def _vocabulary(model: torch.nn.Module) -> int | None:
    """Rows of the model's input embedding (transformers' ``get_input_embeddings``), else ``config.vocab_size``."""
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if isinstance(embedding, torch.nn.Embedding):
        return embedding.num_embeddings
    return _config_vocabulary(model)


def _classes(model: torch.nn.Module) -> int | None:
    """Width of the model's logits (its output embedding, else ``config.vocab_size``): what labels index."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, torch.nn.Linear):
        return head.out_features
    return _config_vocabulary(model)


def _config_vocabulary(model: torch.nn.Module) -> int | None:
    value = getattr(getattr(model, "config", None), "vocab_size", None)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


# ---- public --------------------------------------------------------------------------------
def forward(model: torch.nn.Module, cfg: SegmentConfig, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits ``[B, N, V]`` of the segmented model, computed densely."""
    input_ids = _checked_ids(model, input_ids)
    with torch.no_grad():
        return _run(model, cfg, input_ids, lambda n: torch.ones(n, n, dtype=torch.bool))


def gradients(
    model: torch.nn.Module,
    cfg: SegmentConfig,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    reduction: str = "mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """TBPTT loss and gradients (docs/design.md section 1, ``tbptt_k``) of every parameter, by name.

    ``reduction="mean"`` divides the summed token loss by the number of label tokens of the
    whole sequence (HF's causal-LM loss); ``"sum"`` does not.
    """
    if reduction not in ("mean", "sum"):
        raise SegcompileError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    input_ids = _checked_ids(model, input_ids)
    labels = label_ids(labels, input_ids, _classes(model), type(model).__name__)
    n = input_ids.shape[1]
    S = cfg.segment_len
    denominator = max(label_count(labels), 1) if reduction == "mean" else 1
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    grads = {name: torch.zeros_like(p) for name, p in params.items()}
    total = torch.zeros((), dtype=torch.float64)
    for s in range(cfg.num_segments(n)):
        start, end = s * S, min((s + 1) * S, n)
        with torch.enable_grad():
            logits = _run(model, cfg, input_ids[:, :end], lambda m, s=s: live_keys(cfg, m, s))
            loss = span_loss(logits[:, start:end], labels, start) / denominator
            got = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for (name, _), g in zip(params.items(), got):
            if g is not None:
                grads[name] += g
        total += loss.detach().double().cpu()
    return total, grads
