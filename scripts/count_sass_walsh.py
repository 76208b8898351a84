"""SASS instruction counts of the Gluon rotated kernels (Walsh; kron with --kron-n), compiled for
sm_90 without a GPU.

Usage (any machine with Triton >= 3.6 and its bundled ptxas / cuobjdump):

    python scripts/count_sass_walsh.py [--log-n 11] [--warps 4] [--register-bits 6]
                                       [--dtype fp16|bf16|fp32] [--format MXINT4|MXFP4|MXFP8]
    python scripts/count_sass_walsh.py --kron-n 1536 [--dtype ...]   # the kron kernel, KRON_CONFIGS settings
    python scripts/count_sass_walsh.py --kron-n 576 --tensor-cores   # the kron kernel with A on the tensor cores
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

from mxptq.formats import _gluon_kron_tc, _gluon_mx, kernels

POINTERS = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16"}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _compile(kernel, constexprs: dict, dtype: str, warps: int, max_registers: int, operands: tuple = ()):
    """(CompiledKernel, SASS text, resource usage text) of a rotated Gluon kernel for sm_90
    (`operands`: names of further pointer arguments after scale, of the activation dtype)."""
    pointer = POINTERS[dtype]
    signature = {"x_ptr": pointer, "y_ptr": pointer, "n_rows": "i32", "n_tiles": "i32", "scale": "fp32"}
    signature.update(dict.fromkeys(operands, pointer))
    signature.update(dict.fromkeys(constexprs, "constexpr"))
    aligned = [0, 1] + [5 + i for i in range(len(operands))]
    source = GluonASTSource(fn=kernel, signature=signature, constexprs=constexprs,
                            attrs={(i,): [["tt.divisibility", 16]] for i in aligned})
    options = {"num_warps": warps, **({"maxnreg": max_registers} if max_registers else {})}
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        sass = subprocess.run([cuobjdump, "-sass", cubin.name], capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", cubin.name], capture_output=True, text=True,
                               check=True).stdout
    return compiled, sass, usage


def compile_sm90(log_n: int, warps: int, register_bits: int, dtype: str = "fp16", fmt: str = "MXINT4",
                 even: bool = True, max_registers: int = 0):
    """Compile the Walsh kernel for sm_90 here (no GPU): (CompiledKernel, SASS text, resource usage text)."""
    plan, _rows_per_tile = kernels._walsh_plan(log_n, warps, register_bits)
    constexprs = kernels._walsh_constexprs(plan, even, DTYPES[dtype], 32, kernels._format_entry(FORMATS[fmt]))
    return _compile(_gluon_mx.mx_walsh_rotated_kernel, constexprs, dtype, warps, max_registers)


def compile_kron_sm90(n: int, dtype: str = "fp16", fmt: str = "MXINT4", even: bool = True):
    """Compile the kron kernel for rows of n (a kron rotation of mxptq.nn.hadamard) with the
    settings kernels.KRON_CONFIGS gives dtype: (CompiledKernel, SASS, usage, values per thread)."""
    from mxptq.nn.hadamard import get_rotation

    kron = kernels._build_kron_plan(get_rotation(n, block_size=32))
    if kron is None:
        raise SystemExit(f"rows of {n}: the kron kernel does not take them")
    warps, _per_sm, max_registers, lane_levels = kernels._kron_setting(DTYPES[dtype], n)
    plan, _rows_per_tile = kernels._kron_tile(kron.log_p, warps, kron.register_bits, bool(lane_levels))
    constexprs = kernels._kron_constexprs(plan, even, DTYPES[dtype], 32, kernels._format_entry(FORMATS[fmt]), kron)
    compiled, sass, usage = _compile(_gluon_mx.mx_kron_rotated_kernel, constexprs, dtype, warps, max_registers)
    return compiled, sass, usage, kron.k << kron.register_bits


def compile_kron_tc_sm90(n: int, dtype: str = "fp16", fmt: str = "MXINT4", block: int = 32):
    """Compile the tensor-core kron kernel for rows of n with kernels.KRON_TC_SETTING:
    (CompiledKernel, SASS, usage, values per thread)."""
    from mxptq.nn.hadamard import get_rotation

    kron = kernels._build_kron_plan(get_rotation(n, block_size=32))
    if kron is None or not kernels._kron_tc_applies(DTYPES[dtype], kron, block):
        raise SystemExit(f"rows of {n} {dtype}: the tensor-core kron kernel does not take them")
    warps, _per_sm, max_registers, stages = kernels.KRON_TC_SETTING
    plan = kernels._kron_tc_tile(kron.log_p, warps, block)
    constexprs = kernels._kron_tc_constexprs(plan, DTYPES[dtype], block, kernels._format_entry(FORMATS[fmt]), kron,
                                             stages)
    compiled, sass, usage = _compile(_gluon_kron_tc.mx_kron_tc_rotated_kernel, constexprs, dtype, warps,
                                     max_registers, ("forward_ptr", "inverse_ptr"))
    return compiled, sass, usage, plan["ROWS"] * n // (32 * warps)


# Kron lengths the check also compiles: the demo model's 576 and 1536 (their timed settings), and
# 1152 / 2560 on the default setting (H_36 x H_32 by lane levels only; H_20 x H_128).
KRON_CHECK_CASES = [(576, "fp16"), (576, "bf16"), (1536, "fp16"), (1536, "bf16"), (1536, "fp32"), (1152, "fp16"),
                    (2560, "bf16")]
# The tensor-core kron kernel: 576 in both 16-bit dtypes, 1152 and 2304 (more p bits on lanes).
KRON_TC_CHECK_CASES = [(576, "fp16"), (576, "bf16"), (1152, "fp16"), (2304, "bf16")]
# Every length the dispatch may send to the kernel (fp16, whole and ragged tiles), plus bf16 / fp32.
CHECK_CASES = [(log_n, "fp16", log_n % 2 == 0) for log_n in range(8, 16)] + [(11, "bf16", True), (12, "fp32", False)]


def check_all() -> int:
    """One JSON line per CHECK_CASES entry, with the settings kernels.WALSH_CONFIGS gives that
    length: layout conversions in the compiled IR against the plan's own, spills, registers,
    instructions per element; then one per KRON_CHECK_CASES entry (the kron kernel with the
    settings of kernels.KRON_CONFIGS): spills, registers, instructions per element
    (tests/formats/test_walsh_kernel.py reads these)."""
    for log_n, dtype, even in CHECK_CASES:
        warps, register_bits, _, max_registers = kernels.WALSH_CONFIGS.get(log_n, kernels.WALSH_DEFAULT_CONFIG)
        plan, _rows_per_tile = kernels._walsh_plan(log_n, warps, register_bits)
        compiled, sass, usage = compile_sm90(log_n, warps, register_bits, dtype, "MXINT4", even, max_registers)
        print(json.dumps({
            "kernel": "walsh", "log_n": log_n, "dtype": dtype, "even": even, "warps": warps,
            "register_bits": register_bits, "conversions": compiled.asm["ttgir"].count("ttg.convert_layout"),
            "plan_conversions": 2 * (plan["N_STAGES"] + 1), **_usage(sass, usage, 1 << register_bits),
        }), flush=True)
    for n, dtype in KRON_CHECK_CASES:
        compiled, sass, usage, values = compile_kron_sm90(n, dtype)
        setting = kernels._kron_setting(DTYPES[dtype], n)
        print(json.dumps({"kernel": "kron", "n": n, "dtype": dtype, "setting": setting, **_usage(sass, usage, values)}),
              flush=True)
    for n, dtype in KRON_TC_CHECK_CASES:
        compiled, sass, usage, values = compile_kron_tc_sm90(n, dtype)
        print(json.dumps({"kernel": "kron-tc", "n": n, "dtype": dtype, "setting": kernels.KRON_TC_SETTING,
                          "shared_memory_bytes": compiled.metadata.shared, **_usage(sass, usage, values)}), flush=True)
    return 0


def _usage(sass: str, usage: str, values_per_thread: int) -> dict:
    """Spills, registers and instructions per element of a compiled kernel. ptxas keeps register
    spills in the stack frame (STACK in the resource usage, STL / LDL in the SASS), not in
    LOCAL, which counts local arrays: spill_instructions is the number to keep at 0."""
    local = re.search(r"LOCAL:(\d+)", usage)
    stack = re.search(r"STACK:(\d+)", usage)
    registers = re.search(r"REG:(\d+)", usage)
    instructions = len(re.findall(r"^\s+/\*[0-9a-f]+\*/\s+[A-Z]", sass, re.MULTILINE))
    spills = len(re.findall(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?(?:STL|LDL)\b", sass, re.MULTILINE))
    return {"local_bytes": int(local.group(1)) if local else None,
            "stack_bytes": int(stack.group(1)) if stack else None,
            "spill_instructions": spills,
            "registers": int(registers.group(1)) if registers else None,
            "instructions_per_element": round(instructions / values_per_thread, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check-all", action="store_true", help="every length the dispatch uses, as JSON lines")
    ap.add_argument("--kron-n", type=int, default=0, help="compile the kron kernel for rows of this length instead")
    ap.add_argument("--tensor-cores", action="store_true", help="with --kron-n: the tensor-core kron kernel")
    ap.add_argument("--log-n", type=int, default=11)
    ap.add_argument("--warps", type=int, default=4)
    ap.add_argument("--register-bits", type=int, default=_gluon_mx.REGISTER_BITS)
    ap.add_argument("--max-registers", type=int, default=0, help="ptxas register cap (maxnreg); 0 = its choice")
    ap.add_argument("--dtype", choices=sorted(POINTERS), default="fp16")
    ap.add_argument("--format", choices=sorted(FORMATS), default="MXINT4")
    args = ap.parse_args()
    if args.check_all:
        return check_all()
    if args.kron_n:
        compile_kron = compile_kron_tc_sm90 if args.tensor_cores else compile_kron_sm90
        _compiled, sass, usage, per_thread = compile_kron(args.kron_n, args.dtype, args.format)
        what = "tensor-core kron kernel (kernels.KRON_TC_SETTING)" if args.tensor_cores else "kron kernel (kernels.KRON_CONFIGS)"
        print(f"triton {triton.__version__}, sm_90, {what}, n = {args.kron_n}, {args.dtype} {args.format}: "
              f"{json.dumps(_usage(sass, usage, per_thread))}")
        return 0
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
