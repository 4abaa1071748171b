"""Capture and run tiny models on CUDA against the oracle (the CPU suite cannot reach CUDA paths).

    python bench/cuda_smoke.py
"""

import sys

import torch

from segcompile.testing.models import ALL_MODELS, random_ids  # noqa: E402
from segcompile.testing.models import tiny_model as make_model  # noqa: E402

import segcompile as sc  # noqa: E402

failed = 0
for family, impl in ALL_MODELS:
    model = make_model(family, impl).cuda()
    cfg = sc.SegmentConfig(8, tail_len=4, sink_tokens=2, long_range=sc.HeadPlan.fraction(0.5))
    ids = random_ids(2, 29).cuda()
    try:
        seg = sc.transform(model, cfg)
        kv_heads = getattr(model.config, "num_key_value_heads", None) or getattr(model.config, "n_head", None)
        found = {s.num_kv_heads for s in seg.sites}
        if found != {kv_heads}:
            raise RuntimeError(f"find_attention found {found} KV heads per layer, the config says {kv_heads}")
        with torch.no_grad():
            err = (seg(ids).logits - sc.oracle.forward(model, cfg, ids)).abs().max().item()
        status = "ok" if err <= 1e-4 else "MISMATCH"
    except Exception as e:  # noqa: BLE001 - report every family, then fail
        err, status = float("nan"), f"FAILED {type(e).__name__}: {str(e)[:200]}"
    failed += status != "ok"
    print(f"{family:8} {impl:6} max|seg - oracle| = {err:.2e} {status}")
sys.exit(1 if failed else 0)
