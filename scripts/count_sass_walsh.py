"""SASS instruction counts of the Gluon Walsh-rotated kernel, compiled for sm_90 without a GPU.

Usage (any machine with Triton >= 3.6 and its bundled ptxas / cuobjdump):

    python scripts/count_sass_walsh.py [--log-n 11] [--warps 4] [--register-bits 6]
                                       [--dtype fp16|bf16|fp32] [--format MXINT4|MXFP4|MXFP8]
    python scripts/count_sass_walsh.py --check-all     # every length the dispatch uses, JSON lines

Prints the kernel's register count and its SASS instructions, total and per element of the
tile each thread handles per loop iteration (the loop body dominates). On the H100 the kernel's
time followed this count (benchmarks/walsh_sass.md, benchmarks/h100/walsh_prototype.md), so it
is the number to lower. A measurement aid, not a test.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from bench_kernels import FORMATS  # the benchmark's formats (this script's folder is on sys.path)
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource

from mxptq.formats import _gluon_mx, kernels

POINTERS = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16"}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def compile_sm90(log_n: int, warps: int, register_bits: int, dtype: str = "fp16", fmt: str = "MXINT4",
                 even: bool = True, max_registers: int = 0):
    """Compile the kernel for sm_90 here (no GPU): (CompiledKernel, SASS text, resource usage text)."""
    plan, _rows_per_tile = kernels._walsh_plan(log_n, warps, register_bits)
    pointer = POINTERS[dtype]
    constexprs = kernels._walsh_constexprs(plan, even, DTYPES[dtype], 32, kernels._format_entry(FORMATS[fmt]),
                                           warps)
    signature = {"x_ptr": pointer, "y_ptr": pointer, "n_rows": "i32", "n_tiles": "i32", "scale": "fp32"}
    signature.update(dict.fromkeys(constexprs, "constexpr"))
    source = GluonASTSource(fn=_gluon_mx.mx_walsh_rotated_kernel, signature=signature, constexprs=constexprs,
                            attrs={(0,): [["tt.divisibility", 16]], (1,): [["tt.divisibility", 16]]})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, **({"maxnreg": max_registers} if max_registers else {})})
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        sass = subprocess.run([cuobjdump, "-sass", cubin.name], capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", cubin.name], capture_output=True, text=True,
                               check=True).stdout
    return compiled, sass, usage


# Every length the dispatch may send to the kernel (fp16, whole and ragged tiles), plus bf16 / fp32.
CHECK_CASES = [(log_n, "fp16", log_n % 2 == 0) for log_n in range(8, 16)] + [(11, "bf16", True), (12, "fp32", False)]


def check_all() -> int:
    """One JSON line per CHECK_CASES entry, with the settings kernels.WALSH_CONFIGS gives that
    length: layout conversions in the compiled IR against the plan's own, spills, registers,
    instructions per element (tests/formats/test_walsh_kernel.py reads these)."""
    for log_n, dtype, even in CHECK_CASES:
        warps, register_bits, _, max_registers = kernels.WALSH_CONFIGS.get(log_n, kernels.WALSH_DEFAULT_CONFIG)
        plan, _rows_per_tile = kernels._walsh_plan(log_n, warps, register_bits)
        compiled, sass, usage = compile_sm90(log_n, warps, register_bits, dtype, "MXINT4", even, max_registers)
        local = re.search(r"LOCAL:(\d+)", usage)
        registers = re.search(r"REG:(\d+)", usage)
        instructions = len(re.findall(r"^\s+/\*[0-9a-f]+\*/\s+[A-Z]", sass, re.MULTILINE))
        print(json.dumps({
            "log_n": log_n, "dtype": dtype, "even": even, "warps": warps, "register_bits": register_bits,
            "conversions": compiled.asm["ttgir"].count("ttg.convert_layout"),
            "plan_conversions": 2 * (plan["N_STAGES"] + 1),
            "local_bytes": int(local.group(1)) if local else None,
            "registers": int(registers.group(1)) if registers else None,
            "instructions_per_element": round(instructions / (1 << register_bits), 1),
        }), flush=True)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check-all", action="store_true", help="every length the dispatch uses, as JSON lines")
    ap.add_argument("--log-n", type=int, default=11)
    ap.add_argument("--warps", type=int, default=4)
    ap.add_argument("--register-bits", type=int, default=_gluon_mx.REGISTER_BITS)
    ap.add_argument("--max-registers", type=int, default=0, help="ptxas register cap (maxnreg); 0 = its choice")
    ap.add_argument("--dtype", choices=sorted(POINTERS), default="fp16")
    ap.add_argument("--format", choices=sorted(FORMATS), default="MXINT4")
    args = ap.parse_args()
    if args.check_all:
        return check_all()
    _compiled, sass, usage = compile_sm90(args.log_n, args.warps, args.register_bits, args.dtype, args.format,
                                          max_registers=args.max_registers)
    ops = collections.Counter(m.split(".")[0] for m in re.findall(r"^\s+/\*[0-9a-f]+\*/\s+([A-Z][A-Z0-9._]*)", sass, re.MULTILINE))
    total = sum(ops.values())
    per_thread = 1 << args.register_bits
    registers = re.search(r"REG:(\d+)", usage)
    print(f"triton {triton.__version__}, sm_90, n = 2^{args.log_n}, {args.warps} warps, {per_thread} values/thread, "
          f"{args.dtype} {args.format}: {registers.group(1) if registers else '?'} registers, {total} SASS "
          f"instructions = {total / per_thread:.1f} per element")
    print(", ".join(f"{op} {count}" for op, count in ops.most_common(16)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
