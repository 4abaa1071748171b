"""Tiny random-init models of every supported family (no downloads) and shared helpers."""

from __future__ import annotations

import functools
import importlib.util
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
if not os.environ.get("OMP_NUM_THREADS"):  # unset, or set to nothing
    os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

import transformers  # noqa: E402

from segcompile.testing.models import ALL_MODELS, FAMILY_VOCAB, HF_FAMILIES, random_ids  # noqa: E402,F401
from segcompile.testing.models import tiny_model as make_model  # noqa: E402,F401

transformers.logging.set_verbosity_error()

VOCAB = FAMILY_VOCAB

# The tiny models run on the CPU, where their Triton kernels run in the interpreter; on a machine
# with CUDA (the variable unset) the kernel tests run compiled on the GPU instead.
CPU_TRITON = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="a CPU model's Triton kernels need TRITON_INTERPRET=1")


@functools.cache
def captured(family: str, impl: str = "sdpa", layers: int = 2, dtype=torch.float32):
    """``(model, graph)``: a tiny model and its capture, made once per session (export is the slow
    step, about a second per layer). Pass the graph to ``sc.transform``; do not modify the model."""
    import segcompile as sc

    model = make_model(family, impl, layers, dtype)
    return model, sc.capture(model)


def require_smollm2() -> None:
    """Skip with the install command where the SmolLM2 wheel (or the GGUF packages) is missing,
    but fail under CI=true: CI installs it, and a skip there would hide a broken install step."""
    from segcompile import pretrained

    try:
        pretrained.smollm2_gguf()
        pretrained.check_gguf_packages(pretrained.SMOLLM2)
    except pretrained.MissingPackageError as e:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI installs the real model, but: {e}")
        pytest.skip(str(e))


def load_script(folder: str, name: str):
    """``folder/name.py`` of the repository (``bench``, ``examples``: folders of scripts, not
    packages) as a module; its folder is on ``sys.path`` while it loads, as when it runs as a
    script, so that it can import its siblings."""
    path = Path(__file__).resolve().parents[1] / folder / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    return module


@torch.no_grad()
def _rope_in_fp32_region(self, x, position_ids):
    # transformers 5.17's Llama RoPE: under no_grad, angles from a matmul in a region that its
    # maybe_autocast opens only when autocast is on or enabled=True, i.e. never while capture traces.
    from transformers.utils.generic import maybe_autocast

    inv_freq = self.inv_freq[None, :, None].float().expand(position_ids.shape[0], -1, 1).to(x.device)
    with maybe_autocast(device_type=x.device.type, enabled=False):
        freqs = (inv_freq.float() @ position_ids[:, None, :].float()).transpose(1, 2)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling
    return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


def model_with_rope_region(layers: int = 2):
    """The tiny Llama with transformers 5.17's RoPE (a no_grad region, its angles in an
    autocast-disabled one, which later versions dropped), whatever transformers is installed, and
    sharp attention."""
    model = make_model("llama", layers=layers)
    model.config.max_position_embeddings = 8192  # RoPE has no table: the check's far positions are in range
    rotary = model.model.rotary_emb
    rotary.forward = _rope_in_fp32_region.__get__(rotary)
    with torch.no_grad():  # sharp attention, as a trained model's: a random one barely feels a wrong rotation
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(16), layer.self_attn.k_proj.weight.mul_(16)
    return model


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@pytest.fixture(scope="session")
def llama():
    return captured("llama")


@pytest.fixture
def one_rank_group():
    """A gloo process group of one rank in this process (checkpoints then take the sharded layout;
    wrapping checks see a process group)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
