"""Tiny random-init models of every supported family (no downloads) and shared helpers."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import pytest
import torch

# Without CUDA, the Triton kernels run in Triton's interpreter; the variable must be set before
# the kernels are defined (tests/test_triton_kernels.py).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The models here are tiny: splitting their products over threads costs more than it saves
# (tests/test_training.py: 180 s with 2 threads on a 2-core machine, 77 s with one). Subprocesses
# (the distributed tests' workers, the CLI) inherit the setting through the environment.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

import transformers  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from plain_decoder import tiny_plain_decoder  # noqa: E402

transformers.logging.set_verbosity_error()

VOCAB = 96
_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)


def make_model(family: str, impl: str = "sdpa", layers: int = 2, dtype=torch.float32, seed: int = 0):
    """A tiny eval-mode causal LM of ``family`` with ``attn_implementation=impl``."""
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
    elif family == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=VOCAB, n_embd=32, n_layer=layers, n_head=4, n_positions=512,
            bos_token_id=0, eos_token_id=0, attn_implementation=impl,
        )
        model = transformers.GPT2LMHeadModel(config)
    elif family == "plain":
        model = tiny_plain_decoder(seed=seed, vocab_size=VOCAB, num_hidden_layers=layers)
    else:
        raise ValueError(family)
    return model.to(dtype).eval()


@functools.cache
def captured(family: str, impl: str = "sdpa", layers: int = 2, dtype=torch.float32):
    """``(model, graph)``: a tiny model and its capture, made once per session (export is the slow
    step, about a second per layer). Pass the graph to ``sc.transform``; do not modify the model."""
    import segcompile as sc

    model = make_model(family, impl, layers, dtype)
    return model, sc.capture(model)


HF_FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "gpt2"]
# (family, attn_implementation): every HF family with both implementations, and the plain decoder
ALL_MODELS = [(f, impl) for f in HF_FAMILIES for impl in ("sdpa", "eager")] + [("plain", "sdpa")]


def random_ids(batch: int, n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, n), generator=g)


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@pytest.fixture(scope="session")
def llama():
    return captured("llama")
