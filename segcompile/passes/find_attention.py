"""find_attention: match every attention site and record what the rewrite needs.

Matches
* SDPA nodes (``aten.scaled_dot_product_attention``, or the opaque form capture records), and
* the eager pattern ``matmul(q, k^T) -> [* scale] -> [+ mask] -> softmax(-1) -> [cast] ->
  [dropout] -> matmul(p, v)``.

For each site it records (``node.meta[ir.ATTENTION]`` and, in layer order,
``gm.meta[ir.SITES]``) the layer index (order of appearance), the module path and
class from ``nn_module_stack``, q and the **un-repeated** k/v (GQA's ``repeat_kv`` -
``unsqueeze(2) -> expand -> reshape`` - or ``repeat_interleave(dim=1)`` is looked through),
head counts, head dims, scale and the node whose value is the attention output. RoPE and
everything else stays where it is. The graph itself is not changed.

It refuses (``UnsupportedAttentionError``), never silently rewrites, when the rewrite would be
wrong: a mask that is not exactly causal when evaluated on the capture example (non-causal,
padded, sliding-window, or an additive bias such as ALiBi), a config that declares
sliding-window layers, attention dropout in training mode, a softmax over positions that is not
part of a recognised pattern, or a model with no attention at all. A softmax over an axis of fixed
size (an MoE router's, over its experts) is not attention and is left alone.
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx
from torch.fx.operator_schemas import normalize_function

from ..errors import UnsupportedAttentionError
from ..frontend.opaque_sdpa import OPAQUE_SDPA
from .. import ir
from ..ir import AttentionSite

aten = torch.ops.aten

SDPA = (aten.scaled_dot_product_attention.default, OPAQUE_SDPA)
SOFTMAX = (aten.softmax.int, aten._softmax.default)
MATMUL = (aten.matmul.default, aten.bmm.default)
PASS_THROUGH = (aten.clone.default, aten.contiguous.default)
CASTS = (aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout, aten.type_as.default)
RESHAPES = (aten.reshape.default, aten.view.default, aten._unsafe_view.default)
# the scores' scale and mask, out of place or in place (Falcon's `scores /= sqrt(d)` under transformers 5.17)
ADD, MUL, DIV = (aten.add.Tensor, aten.add_.Tensor), (aten.mul.Tensor, aten.mul_.Tensor), (aten.div.Tensor, aten.div_.Tensor)


def find_attention(gm: fx.GraphModule) -> fx.GraphModule:
    """Annotate every attention site; refuse anything that is not causal full attention."""
    info = gm.meta[ir.CAPTURE]
    _refuse_layers_besides_full_attention(info.model_config, info.model_class)
    sites: list[AttentionSite] = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in SDPA:
            sites.append(_sdpa_site(node, len(sites)))
        elif node.target in SOFTMAX and _over_positions(node):
            sites.append(_eager_site(node, len(sites)))
    if not sites:
        raise UnsupportedAttentionError(
            f"no attention found in {info.model_class}: segcompile matches "
            "F.scaled_dot_product_attention and matmul -> softmax -> matmul attention"
        )
    _check_masks_are_causal(gm, sites)
    for site in sites:
        site.output.meta[ir.ATTENTION] = site
    gm.meta[ir.SITES] = sites
    return gm


# ---- SDPA ----------------------------------------------------------------------------------
def _sdpa_site(node: fx.Node, layer: int) -> AttentionSite:
    args = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True).kwargs
    module, cls = ir.module_of(node)
    where = f"layer {layer} (`{module}`, {cls}), node `{node.name}`"
    if args.get("dropout_p", 0.0):
        raise UnsupportedAttentionError(
            f"{where}: attention dropout p={args['dropout_p']} is not supported; put the model in eval mode "
            "or set its attention dropout to 0"
        )
    q, k, v = args["query"], args["key"], args["value"]
    if not args.get("enable_gqa", False):
        k, v = unrepeated(k), unrepeated(v)
    return _make_site(
        layer, module, cls, "sdpa", node, q, k, v, args.get("scale"), args.get("attn_mask"), bool(args.get("is_causal"))
    )


# ---- eager matmul-softmax-matmul -----------------------------------------------------------
def _over_positions(softmax: fx.Node) -> bool:
    """Whether ``softmax`` may normalise over positions of the sequence, as attention does over its
    keys: its axis has a symbolic size in the captured graph (capture exports with a dynamic
    length), or its size is unknown. A softmax over an axis of fixed size (an MoE router's
    experts) mixes no positions: not attention, and none of the rewrite's business."""
    value = softmax.meta.get("val")
    if not isinstance(value, torch.Tensor):
        return True
    return not isinstance(value.shape[softmax.args[1]], int)


def _eager_site(softmax: fx.Node, layer: int) -> AttentionSite:
    module, cls = ir.module_of(softmax)
    where = f"layer {layer} (`{module}`, {cls})"
    unmatched = UnsupportedAttentionError(
        f"{where}: softmax node `{softmax.name}` is not part of an attention pattern segcompile recognises "
        "(matmul(q, k^T) -> [scale] -> [+ causal mask] -> softmax -> [dropout] -> matmul(p, v)); "
        "use attn_implementation='sdpa' or F.scaled_dot_product_attention"
    )
    dim = softmax.args[1]
    if dim not in (-1, 3):
        raise unmatched
    # upstream: scale and mask, in either order, down to matmul(q, k^T)
    scores, scale, mask = softmax.args[0], 1.0, None
    while isinstance(scores, fx.Node) and scores.target in (*ADD, *MUL, *DIV):
        a, b = scores.args[:2]
        if scores.target in ADD and isinstance(b, fx.Node) and mask is None:
            scores, mask = (a, b) if _reaches_matmul(a) else (b, a)
        elif scores.target in MUL and isinstance(b, (int, float)):
            scores, scale = a, scale * b
        elif scores.target in DIV and isinstance(b, (int, float)):
            scores, scale = a, scale / b
        else:
            raise unmatched
    if not (isinstance(scores, fx.Node) and scores.target in MATMUL):
        raise unmatched
    q, k_t = scores.args
    k = _untransposed(k_t)
    if k is None:
        raise unmatched
    # downstream: casts and dropout, up to matmul(p, v)
    p = softmax
    while len(p.users) == 1 and next(iter(p.users)).target in (*CASTS, aten.dropout.default):
        user = next(iter(p.users))
        if user.target is aten.dropout.default and user.args[1] and user.args[2]:
            raise UnsupportedAttentionError(
                f"{where}: attention dropout p={user.args[1]} in training mode is not supported; "
                "call model.eval() or set the attention dropout to 0"
            )
        p = user
    users = list(p.users)
    if len(users) != 1 or users[0].target not in MATMUL or users[0].args[0] is not p:
        raise unmatched
    out = users[0]
    v = users[0].args[1]
    return _make_site(layer, module, cls, "eager", out, q, unrepeated(k), unrepeated(v), scale, mask, False)


def _reaches_matmul(node: fx.Node) -> bool:
    while isinstance(node, fx.Node) and node.target in (*MUL, *DIV):
        node = node.args[0]
    return isinstance(node, fx.Node) and node.target in MATMUL


def _untransposed(node: fx.Node) -> fx.Node | None:
    if node.target is aten.transpose.int and sorted(d % 4 for d in node.args[1:3]) == [2, 3]:
        return node.args[0]
    if node.target is aten.permute.default and list(node.args[1]) in ([0, 1, 3, 2], [0, 1, -1, -2]):
        return node.args[0]
    return None


# ---- shared --------------------------------------------------------------------------------
def unrepeated(node: fx.Node) -> fx.Node:
    """Look through GQA's repeat_kv to the [B, Hk, L, D] tensor it repeats."""
    n = _skip(node, PASS_THROUGH)
    if n.target in RESHAPES:
        expand = _skip(n.args[0], PASS_THROUGH)
        if expand.target is aten.expand.default:
            unsqueeze = _skip(expand.args[0], PASS_THROUGH)
            if unsqueeze.target is aten.unsqueeze.default and unsqueeze.args[1] == 2:
                return _skip(unsqueeze.args[0], PASS_THROUGH)
    if n.target is aten.repeat_interleave.self_int and n.args[2:3] == (1,):
        return n.args[0]
    return node


def _skip(node: fx.Node, targets) -> fx.Node:
    while isinstance(node, fx.Node) and (node.target in targets or _is_full_slice(node)):
        node = node.args[0]
    return node


def _is_full_slice(node: fx.Node) -> bool:
    """``x[:, :, None]`` leaves no-op ``slice(x, dim, 0, INT_MAX)`` nodes in some torch versions (2.11)."""
    if node.target is not aten.slice.Tensor:
        return False
    given = list(node.args[1:])
    _dim, start, end, step = given + [0, None, None, 1][len(given) :]  # schema defaults
    return start in (None, 0) and (end is None or end >= 2**62) and step == 1


def _make_site(layer, module, cls, kind, out, q, k, v, scale, mask, is_causal) -> AttentionSite:
    qv, kv, vv = (n.meta["val"] for n in (q, k, v))
    heads, kv_heads = int(qv.shape[1]), int(kv.shape[1])
    if qv.dim() != 4 or kv.dim() != 4 or heads % kv_heads:
        raise UnsupportedAttentionError(
            f"layer {layer} (`{module}`, {cls}): expected q [B, H, L, D] and k/v [B, Hk, L, D] with H a multiple "
            f"of Hk, got q {tuple(qv.shape)}, k {tuple(kv.shape)}"
        )
    head_dim = int(qv.shape[-1])
    return AttentionSite(
        layer=layer,
        module=module,
        module_class=cls,
        kind=kind,
        output=out,
        q=q,
        k=k,
        v=v,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        v_head_dim=int(vv.shape[-1]),
        scale=float(scale) if scale is not None else 1.0 / math.sqrt(head_dim),
        dtype=kv.dtype,
        mask=mask,
        is_causal=is_causal,
    )


def _refuse_layers_besides_full_attention(config, model_class: str) -> None:
    """Refuse a config that declares layers other than full attention: sliding-window (or chunked)
    attention, or layers that mix positions without attention at all (``layer_types`` such as
    "conv", "linear_attention", "mamba"), whose state a segment loop would cut at every segment end."""
    if config is None:
        return
    # hybrid models name their layers' kinds in one of the two (transformers 5.2x: both)
    layer_types = getattr(config, "layer_types", None) or getattr(config, "layers_block_type", None)
    if layer_types:
        windowed = [i for i, t in enumerate(layer_types) if _windowed_type(t)]
        others = {i: t for i, t in enumerate(layer_types) if t not in HANDLED_LAYER_TYPES and not _windowed_type(t)}
        if others:
            raise UnsupportedAttentionError(
                f"{model_class}: layers {list(others)} are {sorted(set(others.values()))} layers (layer_types="
                f"{layer_types}), not full attention alone; segcompile segments full attention, and what else "
                "carries positions forward (a convolution's, a state-space or linear-attention layer's state) "
                "would be cut at every segment end: the model is not supported"
            )
    elif getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        windowed = list(range(getattr(config, "num_hidden_layers", 0) or 1))
    else:
        windowed = []
    if windowed:
        raise UnsupportedAttentionError(
            f"{model_class}: layers {windowed} use sliding-window attention "
            f"(config.sliding_window={getattr(config, 'sliding_window', None)}, layer_types="
            f"{layer_types}); segcompile rewrites full causal attention only. If the model was trained "
            "with full attention, set config.sliding_window=None (and layer_types to 'full_attention')"
        )


# ``layer_types`` entries of layers the segment loop handles: full attention, or no mixing of positions
HANDLED_LAYER_TYPES = ("full_attention", "attention", "mlp", "moe")


def _windowed_type(layer_type: str) -> bool:
    """A ``layer_types`` entry that names windowed attention: "sliding_attention", "chunked_attention"..."""
    return any(word in layer_type for word in ("sliding", "chunked", "local"))


class _Recorder(fx.Interpreter):
    def __init__(self, gm, wanted):
        super().__init__(gm)
        self.wanted, self.values = wanted, {}

    def run_node(self, n):
        result = super().run_node(n)
        if n in self.wanted:
            self.values[n] = result
        return result


def _check_masks_are_causal(gm: fx.GraphModule, sites: list[AttentionSite]) -> None:
    """Evaluate every site's mask on the capture example; it must be exactly causal."""
    info = gm.meta[ir.CAPTURE]
    wanted = {s.mask for s in sites if s.mask is not None} | {s.q for s in sites}
    recorder = _Recorder(gm, wanted)
    with torch.no_grad():
        recorder.run(info.example_input_ids, info.example_position_ids)
    for site in sites:
        n = recorder.values[site.q].shape[2]
        causal = torch.ones(n, n, dtype=torch.bool, device=info.device).tril()
        if site.mask is None:
            if not site.is_causal:
                raise UnsupportedAttentionError(
                    f"{site.where()}: attention is not causal (no mask and is_causal=False); segcompile only "
                    "compiles causal decoders, not encoders or bidirectional attention"
                )
            continue
        mask = recorder.values[site.mask]
        if mask.dtype == torch.bool:
            allowed = mask
        else:
            allowed = mask > torch.finfo(mask.dtype).min / 2
            if (mask[allowed] != 0).any():
                raise UnsupportedAttentionError(
                    f"{site.where()}: the additive attention mask carries a bias (e.g. ALiBi), not just "
                    "0/-inf; segcompile supports plain causal attention"
                )
        if site.is_causal:
            allowed = allowed & causal
        if allowed.shape[-2:] != (n, n) or not bool((allowed == causal).all()):
            raise UnsupportedAttentionError(
                f"{site.where()}: the attention mask (node `{site.mask.name}`) is not the causal mask "
                "(non-causal, padded, sliding-window or custom); segcompile only rewrites causal full attention"
            )


