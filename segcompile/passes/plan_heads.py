"""plan_heads: attach the HeadPlan to every attention site.

Resolves ``SegmentConfig.long_range`` against the layers and KV heads find_attention found and
stores each site's long-range KV heads on it (``site.long_range``) and the whole plan in
``gm.meta[ir.PLAN]``. A plan naming a layer or KV head the model does not have, or a
plan file made for another model (fingerprint mismatch), is a ``PlanError``: remapping it
silently would give another model's plan. The graph is not changed.
"""

from __future__ import annotations

import torch.fx as fx

from .. import ir
from ..plan import model_fingerprint


def plan_heads(gm: fx.GraphModule) -> fx.GraphModule:
    """Resolve the head plan against the matched attention sites."""
    cfg = gm.meta[ir.CONFIG]
    sites = gm.meta[ir.SITES]
    architecture = gm.meta[ir.CAPTURE].model_class
    kv_heads = [s.num_kv_heads for s in sites]
    resolved = cfg.long_range.resolve(kv_heads, architecture=architecture)
    for site in sites:
        site.long_range = resolved[site.layer]
    gm.meta[ir.PLAN] = resolved
    gm.meta[ir.FINGERPRINT] = model_fingerprint(architecture, kv_heads)
    return gm
