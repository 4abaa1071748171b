"""The built-in tiny model: a random-init Llama small enough to compile and check on a laptop CPU.

It is what ``segcompile demo`` (and the other CLI commands, when no model is named) runs on.
Nothing is downloaded: the weights come from ``torch.manual_seed(seed)``, so the same seed gives
the same model on every machine. Its outputs are meaningless text; it exists to exercise the
compiler (capture, the passes, the segment loop, prefill and decode) at realistic lengths.
"""

from __future__ import annotations

import torch

VOCAB_SIZE = 256
HIDDEN_SIZE = 64
INTERMEDIATE_SIZE = 128
NUM_HEADS = 4
NUM_KV_HEADS = 2  # GQA: two query heads per KV head, so find_attention has a repeat_kv to look through
MAX_POSITIONS = 8192


def tiny_llama(num_layers: int = 4, seed: int = 0, dtype: torch.dtype = torch.float32):
    """An eval-mode, random-init ``transformers.LlamaForCausalLM`` with SDPA attention.

    vocab 256, hidden 64, MLP 128, 4 query heads over 2 KV heads (head_dim 16), positions up
    to 8192. ``seed`` fixes the weights; the global RNG state is restored afterwards.
    """
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=HIDDEN_SIZE,
        intermediate_size=INTERMEDIATE_SIZE,
        num_hidden_layers=num_layers,
        num_attention_heads=NUM_HEADS,
        num_key_value_heads=NUM_KV_HEADS,
        max_position_embeddings=MAX_POSITIONS,
        attn_implementation="sdpa",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM(config)
    return model.to(dtype).eval()
