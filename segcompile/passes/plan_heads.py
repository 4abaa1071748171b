"""plan_heads: attach the HeadPlan to every attention site.

Resolves ``SegmentConfig.long_range`` against the layers and KV heads find_attention found and
stores each site's long-range KV heads on it (``site.long_range``) and the whole plan in
``gm.meta["segcompile.plan"]``. A plan naming a layer or KV head the model does not have, or a
plan file made for another model (fingerprint mismatch), is a ``PlanError``: remapping it
silently would give another model's plan. The graph is not changed.
"""

from __future__ import annotations

import torch.fx as fx

from ..plan import model_fingerprint


def plan_heads(gm: fx.GraphModule) -> fx.GraphModule:
    """Resolve the head plan against the matched attention sites."""
    cfg = gm.meta["segcompile.config"]
    sites = gm.meta["segcompile.sites"]
    architecture = gm.meta["segcompile.capture"].model_class
    kv_heads = [s.num_kv_heads for s in sites]
    resolved = cfg.long_range.resolve(kv_heads, architecture=architecture)
    for site in sites:
        site.long_range = resolved[site.layer]
    gm.meta["segcompile.plan"] = resolved
    gm.meta["segcompile.fingerprint"] = model_fingerprint(architecture, kv_heads)
    return gm
