#!/usr/bin/env python
"""Throughput of MX fake quantization (GB/s of input read) — a benchmark, not a test.

Shapes: a 4096x4096 weight and an [8, 2048, 4096] activation (blocks along the last axis), in
fp16 and fp32, for MXINT4, MXFP4 (E2M1) and MXFP8 (E4M3), block size 32, each format's default
scale rule. Modes:
  quantize   mxptq.formats.quantize (on CUDA: the fused kernel when mxptq.formats.kernels has one)
  reference  the torch reference, eager (only listed separately on CUDA; on CPU it is `quantize`)
  compiled   torch.compile(quantize_reference)

`--check` records whether each mode's output equals the eager reference bit for bit.
Prints a markdown table and writes JSON (device, torch version, command, every timing) to --out.
    python scripts/bench_formats.py --devices cpu --repeats 3 --out benchmarks/formats_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from mxptq.formats import Format, quantize, quantize_reference

SHAPES = {"weight 4096x4096": (4096, 4096), "act 8x2048x4096": (8, 2048, 4096)}
FORMATS = {
    "MXINT4": Format.from_keys("mxint", width=4),
    "MXFP4": Format.from_keys("mxfp", exponent_width=2, frac_width=1),
    "MXFP8": Format.from_keys("mxfp", exponent_width=4, frac_width=3),
}
DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_call(fn, x, fmt, device: str, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn(x, fmt)
    _sync(device)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(x, fmt)
        _sync(device)
        seconds.append(time.perf_counter() - start)
    return seconds


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} logical cores, {torch.get_num_threads()} threads)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    default_devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    parser.add_argument("--devices", nargs="+", default=default_devices)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--modes", nargs="+", default=["quantize", "reference", "compiled"])
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--check",
        action="store_true",
        help="also record whether each mode's output equals the eager reference",
    )
    parser.add_argument("--out", type=Path, default=None, help="JSON output path")
    parser.add_argument("--md", type=Path, default=None, help="also write the markdown table here")
    args = parser.parse_args(argv)

    # one compiled graph per (shape, dtype, format): allow them all instead of silently falling
    # back to eager after dynamo's default limit of 8 recompilations
    for knob in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 256)
    compiled = torch.compile(quantize_reference, dynamic=False)
    mode_fns = {"quantize": quantize, "reference": quantize_reference, "compiled": compiled}
    rows = []
    for device in args.devices:
        for mode in args.modes:
            if mode == "reference" and not device.startswith("cuda"):
                continue  # on CPU `quantize` is the reference
            for shape_name in args.shapes:
                for dtype_name in args.dtypes:
                    gen = torch.Generator().manual_seed(0)
                    x = torch.randn(SHAPES[shape_name], generator=gen).to(DTYPES[dtype_name]).to(device)
                    for fmt_name in args.formats:
                        fmt = FORMATS[fmt_name]
                        row = {
                            "device": device,
                            "mode": mode,
                            "shape": shape_name,
                            "dtype": dtype_name,
                            "format": fmt.label,
                        }
                        try:
                            seconds = time_call(mode_fns[mode], x, fmt, device, args.warmup, args.repeats)
                        # a benchmark records a failure (e.g. no C++ compiler for inductor) and goes on
                        except Exception as exc:  # noqa: BLE001
                            row.update(error=f"{type(exc).__name__}: {exc}".splitlines()[0][:200])
                        else:
                            if args.check:
                                same = torch.equal(mode_fns[mode](x, fmt), quantize_reference(x, fmt))
                                row.update(matches_reference=same)
                            median = statistics.median(seconds)
                            row.update(
                                seconds=seconds,
                                median_s=median,
                                gbps=x.numel() * x.element_size() / median / 1e9,
                            )
                        rows.append(row)
                        print(_row_md(row), file=sys.stderr, flush=True)
                    del x

    table = "\n".join(
        ["| device | mode | shape | dtype | format | median ms | GB/s |", "|---|---|---|---|---|---:|---:|"]
        + [_row_md(r) for r in rows]
    )
    header = (
        f"Command: `{' '.join(['python', *sys.argv])}`  \n"
        f"torch {torch.__version__}; devices: "
        + "; ".join(f"{d} = {device_name(d)}" for d in args.devices)
        + f"; warmup {args.warmup}, repeats {args.repeats}, block 32, GB/s of input bytes.\n\n"
    )
    print(header + table)
    if args.md:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(header + table + "\n")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "command": " ".join(["python", *sys.argv]),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "devices": {d: device_name(d) for d in args.devices},
            "warmup": args.warmup,
            "repeats": args.repeats,
            "results": rows,
        }
        args.out.write_text(json.dumps(meta, indent=2) + "\n")
    return 0


def _row_md(r: dict) -> str:
    if "error" in r:
        return f"| {r['device']} | {r['mode']} | {r['shape']} | {r['dtype']} | {r['format']} | error | {r['error']} |"
    check = {True: " (= ref)", False: " (DIFFERS from ref)"}.get(r.get("matches_reference"), "")
    return (
        f"| {r['device']} | {r['mode']} | {r['shape']} | {r['dtype']} | {r['format']}{check} "
        f"| {r['median_s'] * 1e3:.1f} | {r['gbps']:.2f} |"
    )


if __name__ == "__main__":
    sys.exit(main())
