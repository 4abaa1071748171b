"""Tiny random-init models: the built-in tiny Llama, and one model of every supported family.

``tiny_llama`` is the built-in model, small enough to compile and check on a laptop CPU.

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


# ---- one tiny model of every supported family (the tests, the benchmarks' smoke runs) -------------
FAMILY_VOCAB = 96
# the MoE ones: Mistral's and Qwen3's attention with a router and experts (a softmax over experts) for MLP
HF_FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gpt2", "mixtral", "qwen3_moe")
# (family, attn_implementation): every HF family with both implementations, and the plain decoder
ALL_MODELS = [(f, impl) for f in HF_FAMILIES for impl in ("sdpa", "eager")] + [("plain", "sdpa")]
_COMMON = dict(
    vocab_size=FAMILY_VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)


def tiny_model(family: str, impl: str = "sdpa", layers: int = 2, dtype: torch.dtype = torch.float32, seed: int = 0):
    """A tiny eval-mode causal LM of ``family`` (one of ``HF_FAMILIES`` or ``"plain"``, the plain
    PyTorch decoder) with ``attn_implementation=impl``: vocab 96, hidden 32, 4 query heads over 2
    KV heads (GPT-2: 4 heads, no GQA); the MoE families route each token to 2 of 4 experts.
    ``seed`` fixes the weights."""
    import transformers

    torch.manual_seed(seed)
    common = {**_COMMON, "num_hidden_layers": layers}
    if family == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, attn_implementation=impl))
    elif family == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common, attn_implementation=impl))
    elif family == "qwen3":
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**common, head_dim=8, attn_implementation=impl))
    elif family == "mistral":
        config = transformers.MistralConfig(**common, sliding_window=None, attn_implementation=impl)
        model = transformers.MistralForCausalLM(config)
    elif family == "mixtral":
        config = transformers.MixtralConfig(**common, sliding_window=None, num_local_experts=4, num_experts_per_tok=2,
                                            attn_implementation=impl)
        model = transformers.MixtralForCausalLM(config)
    elif family == "qwen3_moe":
        config = transformers.Qwen3MoeConfig(**common, head_dim=8, moe_intermediate_size=16, num_experts=4,
                                             num_experts_per_tok=2, attn_implementation=impl)
        model = transformers.Qwen3MoeForCausalLM(config)
    elif family == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=FAMILY_VOCAB, n_embd=32, n_layer=layers, n_head=4, n_positions=512,
            bos_token_id=0, eos_token_id=0, attn_implementation=impl,
        )
        model = transformers.GPT2LMHeadModel(config)
    elif family == "plain":
        from .plain_decoder import tiny_plain_decoder

        model = tiny_plain_decoder(seed=seed, vocab_size=FAMILY_VOCAB, num_hidden_layers=layers)
    else:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(HF_FAMILIES)}, plain")
    return model.to(dtype).eval()


def random_ids(batch: int, n: int, seed: int = 1, vocab: int = FAMILY_VOCAB) -> torch.Tensor:
    """``[batch, n]`` token ids drawn with their own generator (the global RNG is untouched)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, n), generator=g)
