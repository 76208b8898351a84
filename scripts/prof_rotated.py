"""Three calls of the rotated MX kernel on [8, 2048, N] (MXINT4, tutorial rule), for a profiler
to pick one (Nsight Compute: --launch-skip 2 --launch-count 1). Not a benchmark: it times
nothing (scripts/bench_kernels.py does).

    ncu --clock-control none -k regex:'mx_.*rotated' --launch-skip 2 --launch-count 1 \\
        --metrics ... python3 scripts/prof_rotated.py 2048 fp16
"""

from __future__ import annotations

import argparse

import torch
from bench_kernels import FORMATS  # (this script's folder is on sys.path)

from mxptq.formats import kernels
from mxptq.nn import hadamard


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("n", type=int, help="row length (a rotation size of mxptq.nn.hadamard)")
    ap.add_argument("dtype", choices=["fp16", "bf16"])
    ap.add_argument("--format", choices=sorted(FORMATS), default="MXINT4")
    args = ap.parse_args()
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    x = torch.randn(8, 2048, args.n, device="cuda", dtype=dtype)
    rotation = hadamard.get_rotation(args.n, block_size=32)
    for _ in range(3):
        y = kernels.rotated_fake_quantize(x, FORMATS[args.format], rotation)
    torch.cuda.synchronize()
    print(args.n, args.dtype, "ok" if y is not None else "no kernel took these rows", kernels.GLUON_FAILURES or "")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
