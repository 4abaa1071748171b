"""Compile the Triton segment_attention kernels for a GPU without one, and print their resources.

For each kernel and tile (the module's own tiles first, then any given with --tile), Triton
compiles for the target (default sm_90a, Hopper) and ptxas reports registers, spill stores and
stack frame; the Triton GPU IR says whether the products are Hopper ``wgmma`` (warp_group_dot)
or the older ``mma.sync``; "per SM" is how many programs fit one Hopper multiprocessor (65,536
registers, 228 KB of shared memory, 1 KB of it reserved per program, 64 warps). No GPU is needed: a spill or a missing wgmma shows here before any
device time is spent. Needs Triton's bundled ``ptxas-blackwell`` (or a ``ptxas`` new enough for
the PTX Triton writes).

    python bench/kernel_resources.py                       # bf16, head dim 128
    python bench/kernel_resources.py --tile dkdv 64 64 8 2 --tile dq 128 32 8 3 --tile fwd 128 64 8 2 128

``--decode``: the CUDA-graph decoder's split kernel (``triton_decode.STATIC_SPLIT_KERNEL``) over a
bf16 and an fp8 history, with the SASS instructions of each loop of matrix products (one per key
range: sinks, history, tail, current segment) and the most frequent instructions of the longest:
what the loop over an fp8 history spends beside the products. Needs Triton's ``nvdisasm`` too.

    python bench/kernel_resources.py --decode

``--gluon``: the warp-specialised Hopper kernels (``gluon_attention.py``: the forward, dK/dV, dK/dV
adding dQ) at a small problem, with the SASS instructions of each loop of matrix products. Their
consumers' loops are bound by issuing instructions, not by shared memory or the tensor cores: a
forward whose history loop had 6.7% more instructions ran 5.8% slower (bench/README.md, "the
scale folded into the exponent"), so count a change's instructions here first, and see that its
barrier arrivals stay where the 16-bit loop has them (a load before an arrival holds it back).

    python bench/kernel_resources.py --gluon
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
from collections import Counter
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from segcompile.kernels import triton_common, triton_decode
from segcompile.kernels.history_format import HISTORY_SCALE_BLOCK
from segcompile.kernels.triton_attention import KERNELS
POINTERS = {"Q", "K", "V", "TK", "TV", "SK", "SV", "HK", "HV", "Out", "dOut", "dQ", "dK", "dV", "dTK", "dTV"}


# the static decode kernel's other pointers, and the history's in fp8 (``--decode``)
DECODE_POINTERS = {"LK": "bf16", "LV": "bf16", "Position": "i64", "BufferHead": "i32", "Acc": "fp32", "Max": "fp32",
                   "Sum": "fp32", "HKS": "fp32", "HVS": "fp32"}


def signature(fn, constants: dict, dtype: str, pointers: dict | None = None):
    """Argument types as a launch with contiguous tensors would specialise them (16-divisible
    pointers and strides); ``pointers``: element types of pointers other than ``dtype``."""
    sig, attrs = {}, {}
    pointers = pointers or {}
    for i, name in enumerate(fn.arg_names):
        if name in constants:
            sig[name] = "constexpr"
            continue
        if name in pointers:
            sig[name] = "*" + pointers[name]
        elif name in POINTERS:
            sig[name] = "*" + dtype
        elif name in ("Lse", "Delta"):
            sig[name] = "*fp32"
        elif name == "Slot":
            sig[name] = "*i32"
        elif name in ("qk_scale", "sm_scale"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
        if sig[name].startswith("*") or name.startswith("s_"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def ptxas_report(ptx: str, arch: str) -> dict:
    ptxas = next((p for p in (BIN / "ptxas-blackwell", BIN / "ptxas") if p.exists()), "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        out = subprocess.run([str(ptxas), "--gpu-name", arch, "-v", f.name, "-o", os.devnull],
                             capture_output=True, text=True).stderr
    finally:
        os.unlink(f.name)
    found = {key: re.search(pattern, out) for key, pattern in
             (("registers", r"Used (\d+) registers"), ("spill_bytes", r"(\d+) bytes spill stores"),
              ("stack_bytes", r"(\d+) bytes stack frame"))}
    if found["registers"] is None:
        return {"ptxas": " ".join(out.split())[:200]}
    return {key: int(m.group(1)) if m else 0 for key, m in found.items()}


def resources(kernel: str, tile: dict, head_dim: int, dtype: str, capability: int) -> dict:
    fn = KERNELS[kernel]
    constants = dict(BLOCK_M=tile["BLOCK_M"], BLOCK_N=tile["BLOCK_N"], BLOCK_DK=head_dim, BLOCK_DV=head_dim,
                     D_K=head_dim, D_V=head_dim, DOT=getattr(tl, {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[dtype]),
                     PRECISION="ieee" if dtype == "fp32" else "tf32")
    # the autograd path: the forward keeps the log-sum-exp, the dQ kernel takes it
    constants.update({flag: True for flag in ("STORE_LSE", "LSE_GIVEN") if flag in fn.arg_names})
    # the other flags at their defaults (``PREFIX_ONLY`` off: the whole dQ, as the Triton backward runs it)
    constants.update({p.name: p.default for p in fn.params
                      if p.is_constexpr and p.has_default and p.name not in constants})
    compiled, report = compile_for(fn, constants, signature(fn, constants, dtype), tile, capability)
    return dict(shared_bytes=compiled.metadata.shared, wgmma=compiled.asm["ttgir"].count("warp_group_dot"), **report)


def compile_for(fn, constants: dict, signature_and_attrs: tuple, tile: dict, capability: int) -> tuple:
    """``fn`` compiled for compute capability ``capability`` at ``tile``'s warps, stages and
    register cap, and ptxas's report of it (``ptxas_report``)."""
    sig, attrs = signature_and_attrs
    options = dict(num_warps=tile["num_warps"], num_stages=tile["num_stages"], **triton_common.register_cap(tile),
                   **triton_common.COMPILE_OPTIONS)  # compiled as the launches compile it
    compiled = triton.compile(ASTSource(fn, sig, constants, attrs), target=GPUTarget("cuda", capability, 32),
                              options=options)
    arch = f"sm_{capability}a" if capability == 90 else f"sm_{capability}"
    return compiled, ptxas_report(compiled.asm["ptx"], arch)


def decode_resources(history: str, head_dim: int, capability: int) -> dict:
    """``resources`` of the static decode kernel over a ``history`` ("bf16" or "fp8") at its
    decode tile (``triton_decode.tile_kind``), with ``product_loops`` of its SASS."""
    fn = triton_decode.STATIC_SPLIT_KERNEL
    tile = triton_common.tile(triton_decode.tile_kind(16, head_dim, history == "fp8"), head_dim, 1)
    constants = dict(ROWS=16, BLOCK_N=tile["BLOCK_N"], BLOCK_DK=head_dim, BLOCK_DV=head_dim, D_K=head_dim,
                     D_V=head_dim, DOT=tl.bfloat16, PRECISION="tf32", HAS_HISTORY=True,
                     HIST_SCALED=history == "fp8", SCALE_BLOCK=HISTORY_SCALE_BLOCK)
    pointers = dict(DECODE_POINTERS, **({"HK": "fp8e4nv", "HV": "fp8e4nv"} if history == "fp8" else {}))
    compiled, report = compile_for(fn, constants, signature(fn, constants, "bf16", pointers), tile, capability)
    return dict(tile=tile, shared_bytes=compiled.metadata.shared, **report, loops=product_loops(compiled.asm["cubin"]))


def on_cubin(cubin: bytes, tool: str, *options: str) -> str:
    """The output of Triton's bundled ``tool`` (``nvdisasm``, ``cuobjdump``) run on ``cubin``."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        return subprocess.run([str(BIN / tool), *options, f.name], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)


def product_loops(cubin: bytes) -> list[Counter]:
    """The instructions (opcode with modifiers: count) of each loop of a kernel's SASS that holds
    matrix products (HMMA, or HGMMA and QGMMA: 16-bit and fp8 ``wgmma``), in program order: from a
    branch target to the branch back."""
    sass = on_cubin(cubin, "nvdisasm", "-c")
    code, labels, pending = [], {}, []
    for line in sass.splitlines():
        label = re.match(r"\s*\.(L_x_\d+):", line)
        if label:
            pending.append(label.group(1))
        found = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if found:
            labels.update({name: len(code) for name in pending})
            pending = []
            code.append(re.sub(r"^@!?U?P\w+\s+", "", found.group(2)))  # without its predicate
    spans = []
    for end, text in enumerate(code):
        target = re.match(r"BRA\s+`\(\.(L_x_\d+)\)", text)
        if target and labels.get(target.group(1), end) < end:
            spans.append((labels[target.group(1)], end))
    loops = []
    for start, end in spans:
        if any(start <= a and b <= end and (a, b) != (start, end) for a, b in spans):
            continue  # an outer loop (a warp-specialised partition's, around the loops of its ranges)
        body = Counter(t.split()[0] for t in code[start : end + 1])
        if any(op.startswith(("HMMA", "HGMMA", "QGMMA")) for op in body):
            loops.append(body)
    return loops


def gluon_launch(kernel: str, head_dim: int, dtype: torch.dtype = torch.bfloat16):
    """``(jit function, runtime arguments, constexprs)`` of a Gluon kernel ("forward", "dkdv" or
    "dkdv+dq") at a small problem (CPU tensors: only their dtypes, shapes and strides matter)."""
    from segcompile.kernels import gluon_attention
    from segcompile.kernels.problem import prepare

    r = lambda *shape: torch.randn(*shape, dtype=dtype)  # noqa: E731
    B, H, Hk, Lq, T, P = 1, 4, 2, 256, 128, 256
    args = [r(B, H, Lq, head_dim)] + [r(B, Hk, n, head_dim) for n in (Lq, Lq, T, T, 0, 0)] + [r(B, 1, P, head_dim)] * 2
    problem = prepare(*args, [0])
    if kernel == "forward":
        _, runtime, consts, _, _ = gluon_attention.launch_args(problem, 0.1, return_lse=True)
        return gluon_attention.KERNELS["forward"], runtime, consts
    rows = torch.zeros(problem.B * problem.H * problem.Lq)
    dq = torch.zeros(*args[0].shape, dtype=torch.float32) if kernel == "dkdv+dq" else None
    _, runtime, consts, _ = gluon_attention.dkdv_launch_args(problem, torch.randn_like(args[0]), rows, rows,
                                                             0.1, tail_needs_grad=True, dq=dq)
    return gluon_attention.KERNELS["dkdv"], runtime, consts


def compile_gluon(kernel: str, head_dim: int, capability: int = 90):
    """A Gluon kernel (``gluon_launch``) compiled for ``capability`` as its launches compile it."""
    from segcompile.kernels import gluon_attention
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    fn, runtime, consts = gluon_launch(kernel, head_dim)
    values = iter(runtime)
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        else:
            a = next(values)
            sig[name] = "fp32" if isinstance(a, float) else "i32" if isinstance(a, int) else mangle_type(a)
    src = GluonASTSource(fn, sig, {(fn.arg_names.index(k),): v for k, v in consts.items()})
    options = dict(num_warps=gluon_attention.NUM_WARPS, **triton_common.COMPILE_OPTIONS)
    return triton.compile(src, target=GPUTarget("cuda", capability, 32), options=options)


def gluon_resources(kernel: str, head_dim: int, capability: int) -> dict:
    """A Gluon kernel's registers at launch (each partition then sets its own) and stack frame (its
    spills), as its cubin records them, its shared memory, and ``product_loops`` of its SASS."""
    compiled = compile_gluon(kernel, head_dim, capability)
    cubin = compiled.asm["cubin"]
    usage = on_cubin(cubin, "cuobjdump", "-res-usage")
    found = {key: re.search(rf"{field}:(\d+)", usage) for key, field in (("registers", "REG"), ("stack_bytes", "STACK"))}
    return dict(shared_bytes=compiled.metadata.shared, **{k: int(m.group(1)) for k, m in found.items() if m},
                loops=product_loops(cubin))


def print_gluon(head_dim: int, capability: int) -> None:
    print(f"{'kernel':8} {'regs':>5} {'stack B':>8} {'smem KB':>8}  instructions of each product loop "
          "(spill loads and stores in it)")
    for kernel in ("forward", "dkdv", "dkdv+dq"):
        r = gluon_resources(kernel, head_dim, capability)
        sizes = ", ".join(f"{sum(loop.values())}" + (f" ({spills(loop)})" if spills(loop) else "") for loop in r["loops"])
        print(f"{kernel:8} {r.get('registers', '?'):>5} {r.get('stack_bytes', '?'):>8} {r['shared_bytes'] / 1024:8.0f}  {sizes}")
        loop = max(r["loops"], key=lambda body: sum(body.values()), default=Counter())
        print("         its longest loop: " + ", ".join(f"{op} {n}" for op, n in loop.most_common(10)))


def spills(loop: Counter) -> int:
    """Local-memory loads and stores in a loop: what a stack frame costs where it is hot."""
    return sum(n for op, n in loop.items() if op.startswith(("LDL", "STL")))


def print_decode(head_dim: int, capability: int) -> None:
    print(f"{'history':7} {'regs':>5} {'spill B':>8} {'smem KB':>8} {'per SM':>6}  instructions of each product loop")
    longest = {}
    for history in ("bf16", "fp8"):
        r = decode_resources(history, head_dim, capability)
        per_sm = programs_per_sm(r["registers"], r["shared_bytes"], r["tile"]["num_warps"]) if "registers" in r else "?"
        sizes = ", ".join(str(sum(loop.values())) for loop in r["loops"])
        print(f"{history:7} {r.get('registers', '?'):>5} {r.get('spill_bytes', '?'):>8} {r['shared_bytes'] / 1024:8.0f} "
              f"{per_sm:>6}  {sizes}" + (f"  {r['ptxas']}" if "ptxas" in r else ""))
        longest[history] = max(r["loops"], key=lambda loop: sum(loop.values()), default=Counter())
    for history, loop in longest.items():
        top = ", ".join(f"{op} {n}" for op, n in loop.most_common(12))
        print(f"\n{history} history, its longest loop ({sum(loop.values())} instructions): {top}")


def programs_per_sm(registers: int, shared_bytes: int, warps: int) -> int:
    """Programs that fit one Hopper multiprocessor at once (registers are allocated per warp in
    units of 256)."""
    regs_per_warp = -(-registers * 32 // 256) * 256
    return min(65536 // (regs_per_warp * warps), 233472 // (shared_bytes + 1024), 64 // warps)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--capability", type=int, default=90)
    p.add_argument("--tile", nargs="+", action="append", default=[],
                   help="KERNEL M N WARPS STAGES [REGISTER_CAP]")
    p.add_argument("--decode", action="store_true",
                   help="the static decode kernel over a bf16 and an fp8 history, with its loops' instructions")
    p.add_argument("--gluon", action="store_true",
                   help="the warp-specialised Hopper kernels, with their loops' instructions")
    args = p.parse_args(argv)
    if args.gluon:
        print_gluon(args.head_dim, args.capability)
        return
    if args.decode:
        print_decode(args.head_dim, args.capability)
        return
    table = "fp32" if args.dtype == "fp32" else "16-bit"
    tiles = [(name, triton_common.tile(name, args.head_dim, 4096, table)) for name in KERNELS]
    tiles += [(kernel, triton_common.tile_options(tuple(map(int, numbers)))) for kernel, *numbers in args.tile]
    print(f"{'kernel':6} {'M x N':>9} {'warps':>5} {'stages':>6} {'cap':>4} {'regs':>5} {'spill B':>8} {'stack B':>8} "
          f"{'smem KB':>8} {'wgmma':>6} {'per SM':>6}")
    for kernel, tile in tiles:
        r = resources(kernel, tile, args.head_dim, args.dtype, args.capability)
        per_sm = programs_per_sm(r["registers"], r["shared_bytes"], tile["num_warps"]) if "registers" in r else "?"
        print(f"{kernel:6} {tile['BLOCK_M']:>4} x {tile['BLOCK_N']:<4} {tile['num_warps']:5} {tile['num_stages']:6} "
              f"{tile.get('maxnreg') or '-':>4} {r.get('registers', '?'):>5} {r.get('spill_bytes', '?'):>8} "
              f"{r.get('stack_bytes', '?'):>8} {r['shared_bytes'] / 1024:8.0f} {r['wgmma']:6} {per_sm:>6}"
              + (f"  {r['ptxas']}" if "ptxas" in r else ""))


if __name__ == "__main__":
    main()
