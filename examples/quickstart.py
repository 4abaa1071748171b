"""Quickstart: compile a tiny Llama into a segment loop, check it, prefill and decode.

    python examples/quickstart.py
"""

import torch
import transformers

import segcompile as sc

torch.manual_seed(0)
config = transformers.LlamaConfig(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa",
)
model = transformers.LlamaForCausalLM(config).eval()

cfg = sc.SegmentConfig(segment_len=64, sink_tokens=4, long_range=sc.HeadPlan.fraction(0.25))
seg = sc.transform(model, cfg)
print(seg)

ids = torch.randint(0, 256, (1, 300))
with torch.no_grad():
    logits = seg(ids).logits                        # segmented forward, 5 segments
    reference = sc.oracle.forward(model, cfg, ids)  # dense, obviously correct
    print("max |segmented - oracle| =", (logits - reference).abs().max().item())

    state = seg.prefill(ids)                        # carry the state ...
    next_id = state.logits.argmax(-1, keepdim=True)
    for _ in range(8):                              # ... and decode greedily
        step_logits, state = seg.decode(state, next_id)
        next_id = step_logits[:, -1].argmax(-1, keepdim=True)
    print("position after decoding:", state.position)
    print("local-head cache entries per layer:", [layer.local_entries() for layer in state.layers])
