"""bench/kernel_resources.py compiles kernels for sm_90a on the CPU (no GPU, Triton not
interpreted) and finds their loops of matrix products in the SASS. ``--decode``: the CUDA-graph
decoder's split kernel over a bf16 and an fp8 history, one loop per key range, the fp8 history's
widening e4m3 values, the bf16 one's none. ``--gluon``: the warp-specialised forward, one loop
per range and consumer, every loop with its products and no spills."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _run(code: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, do not interpret
    env["PYTHONPATH"] = os.pathsep.join([str(BENCH.parent), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", code], cwd=BENCH, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_decode_kernel_loops_over_both_histories():
    out = _run("import kernel_resources as kr\n"
               "for h in ('bf16', 'fp8'):\n"
               "    r = kr.decode_resources(h, 128, 90)\n"
               "    print(h, r['registers'], len(r['loops']), any('E4M3' in op for loop in r['loops'] for op in loop))\n")
    rows = {h: (int(regs), int(loops), widens == "True") for h, regs, loops, widens in
            (line.split() for line in out.splitlines())}
    # sinks or history, tail, current; over an fp8 history the sinks (bf16) get a loop of their own
    assert rows["bf16"][1:] == (3, False)
    assert rows["fp8"][1:] == (4, True)
    assert 0 < rows["bf16"][0] <= rows["fp8"][0] <= 255


def test_gluon_forward_loops():
    pytest.importorskip("segcompile.kernels.gluon_attention")
    out = _run("import kernel_resources as kr\n"
               "r = kr.gluon_resources('forward', 128, 90)\n"
               "print(r['stack_bytes'], len(r['loops']))\n"
               "for loop in r['loops']:\n"
               "    print(sum(n for op, n in loop.items() if op.startswith('HGMMA')), kr.spills(loop), loop['MUFU.EX2'])\n")
    lines = out.splitlines()
    stack, loops = map(int, lines[0].split())
    # prefix (sinks or history), tail, current segment; full blocks and the masked last one; two consumers
    assert (stack, loops) == (0, 12)
    for line in lines[1:]:
        products, spilled, exps = map(int, line.split())
        # Q K^T and P V of a 128-key block at head dim 128: 8 instructions each; a score's exponential each
        assert products == 16 and spilled == 0 and exps >= 64
