"""The warp-specialised Hopper kernels (``kernels/gluon_attention.py``: the forward and dK/dV, with
and without dQ) without a GPU: they compile for sm_90a with this Triton, to the resources they
were measured with, and ``kernels/dispatch.py`` chooses them only where they apply. Their numerics
are checked on the GPU (``bench/check_kernels_cuda.py``): Gluon kernels do not run in the
interpreter."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

gluon_attention = pytest.importorskip("segcompile.kernels.gluon_attention")

from segcompile.kernels import dispatch  # noqa: E402
from segcompile.kernels.problem import prepare  # noqa: E402


def _args(D, dtype=torch.bfloat16, Lq=256, T=128, G=0, P=256, long_range=(0,)):
    r = lambda *shape: torch.randn(*shape, dtype=dtype)  # noqa: E731
    B, H, Hk = 1, 4, 2
    return [r(B, H, Lq, D), r(B, Hk, Lq, D), r(B, Hk, Lq, D), r(B, Hk, T, D), r(B, Hk, T, D),
            r(B, Hk, G, D), r(B, Hk, G, D), r(B, len(long_range), P, D), r(B, len(long_range), P, D)], list(long_range)


def compile_for_hopper(kernel: str, head_dim: int) -> dict:
    """Compile ``kernel`` ("forward", "dkdv" or "dkdv+dq") for sm_90a (no GPU needed); facts about the result."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from kernel_resources import compile_gluon

    kernel = compile_gluon(kernel, head_dim)
    ptx = kernel.asm["ptx"]
    return {
        "warps": kernel.metadata.num_warps,
        "shared": kernel.metadata.shared,
        "producer_regs_24": "setmaxnreg.dec.sync.aligned.u32 \t24" in ptx,
        "consumer_regs_240": "setmaxnreg.inc.sync.aligned.u32 \t240" in ptx,
        "tma": "cp.async.bulk.tensor" in ptx,
        "wgmma": "wgmma.mma_async" in ptx,
        "tma_reduce": "cp.reduce.async.bulk.tensor" in ptx,
    }


@pytest.mark.parametrize("kernel", ["forward", "dkdv", "dkdv+dq"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_the_kernel_compiles_for_hopper(kernel, head_dim):
    # in a process of its own: the test session runs Triton in the interpreter
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    # the package from this checkout, installed or not (the script's own folder is tests/)
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, __file__, kernel, str(head_dim)], env=env, capture_output=True, text=True,
                         timeout=600, cwd=root)
    assert run.returncode == 0, run.stderr[-3000:]
    facts = json.loads(run.stdout.strip().splitlines()[-1])
    # a producer warp and two consumer warpgroups; registers moved from the producer to the consumers
    assert facts["warps"] == 12
    assert facts["producer_regs_24"] and facts["consumer_regs_240"]
    assert facts["tma"] and facts["wgmma"]
    assert facts["shared"] <= 227 * 1024
    assert facts["tma_reduce"] == (kernel == "dkdv+dq")  # dQ leaves through TMA reduce-add, never atomics


def test_it_is_not_chosen_off_hopper_nor_for_decode():
    args, long_range = _args(128)
    problem = prepare(*args, long_range)
    assert not gluon_attention.supported(problem)  # CPU tensors
    assert dispatch.forward_kernel(problem) == "one-pass"
    decode, _ = _args(128, Lq=1)
    assert dispatch.forward_kernel(prepare(*decode, long_range)) == "split-keys"


def test_the_backward_keeps_the_triton_dkdv_kernel_off_hopper():
    args, long_range = _args(128)
    grad_out = torch.randn_like(args[0])
    assert dispatch.dkdv_kernel(prepare(*args, long_range), grad_out) == "triton"


if __name__ == "__main__":
    print(json.dumps(compile_for_hopper(sys.argv[1], int(sys.argv[2]))))
