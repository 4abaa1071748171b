"""bench/kernel_resources.py --decode compiles the CUDA-graph decoder's split kernel for sm_90a on
the CPU (no GPU, Triton not interpreted) over a bf16 and an fp8 history, and finds in its SASS one
loop of matrix products per key range: the fp8 history's widens e4m3 values, the bf16 one's none."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_decode_kernel_loops_over_both_histories():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, do not interpret
    env["PYTHONPATH"] = os.pathsep.join([str(BENCH.parent), env.get("PYTHONPATH", "")])
    code = ("import kernel_resources as kr\n"
            "for h in ('bf16', 'fp8'):\n"
            "    r = kr.decode_resources(h, 128, 90)\n"
            "    print(h, r['registers'], len(r['loops']), any('E4M3' in op for loop in r['loops'] for op in loop))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=BENCH, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {h: (int(regs), int(loops), widens == "True") for h, regs, loops, widens in
            (line.split() for line in out.stdout.splitlines())}
    # sinks or history, tail, current; over an fp8 history the sinks (bf16) get a loop of their own
    assert rows["bf16"][1:] == (3, False)
    assert rows["fp8"][1:] == (4, True)
    assert 0 < rows["bf16"][0] <= rows["fp8"][0] <= 255
