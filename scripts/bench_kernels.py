"""Bandwidth of the fused MX kernels vs copy, the torch reference and torch.compile'd reference.

Usage (on a CUDA machine; writes bench_kernels.{json,md} into --out):

    python scripts/bench_kernels.py --out "$OUT"

Achieved bandwidth = (bytes read + bytes written) / median time, with bytes = 2 * numel *
element size for every op (each op reads the activation once and writes one of the same size;
extra traffic an op makes for itself is its own cost). The ceiling is `x.clone()` measured in
the same run. Timing: CUDA events around each call, `--warmup` calls first, median of `--iters`.
A benchmark, not a test: nothing here asserts a time (STYLE.md rule 12).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from mxptq.formats import ELEMENT_FORMATS, Format, ScaleRule, kernels, quantize_reference

FORMATS = {
    "MXINT4": Format(ELEMENT_FORMATS["int4"], 32, ScaleRule.TUTORIAL),
    "MXFP4": Format(ELEMENT_FORMATS["e2m1"], 32, ScaleRule.OCP),
    "MXFP8": Format(ELEMENT_FORMATS["e4m3"], 32, ScaleRule.OCP),
}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def time_op(fn, warmup: int, iters: int) -> float:
    """Median seconds per call, eager (CUDA events around each call): includes the host's
    dispatch cost whenever that is longer than the kernel."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def time_device(fn, inputs: list, iters: int, inner: int = 10) -> float:
    """Median device seconds per call: `inner` calls captured in one CUDA graph (cycling over
    `inputs`, several copies of x so that the footprint exceeds L2), replayed `iters` times."""
    fn(inputs[0])
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn(inputs[0])
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for k in range(inner):
            fn(inputs[k % len(inputs)])
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / inner)
    del graph
    return statistics.median(times)


def bench_shape(x: torch.Tensor, n: int, dtype_name: str, rotation, compiled: dict, args) -> list[dict]:
    """All ops on one activation tensor x = [8, 2048, n]; rows for the table. `time` is device
    time (CUDA graph); `eager` the per-call time with host dispatch."""
    rows: list[dict] = []
    nbytes = 2 * x.numel() * x.element_size()
    copies = max(1, min(8, -(-(256 << 20) // (x.numel() * x.element_size()))))
    inputs = [x] + [x.clone() for _ in range(copies - 1)]
    copy_s = time_device(lambda t: t.clone(), inputs, args.iters)
    copy_bw = nbytes / copy_s

    def record(op: str, fmt_name: str, seconds: float | None, note: str = "", eager: float | None = None) -> None:
        bw = nbytes / seconds if seconds else None
        rows.append({"n": n, "dtype": dtype_name, "format": fmt_name, "op": op,
                         "time_us": None if seconds is None else seconds * 1e6,
                         "eager_us": None if eager is None else eager * 1e6,
                         "gbps": None if bw is None else bw / 1e9,
                         "pct_of_copy": None if bw is None else 100 * bw / copy_bw, "note": note})

    record("copy (x.clone)", "-", copy_s, eager=time_op(lambda: x.clone(), args.warmup, args.iters))
    for fmt_name in args.formats.split(","):
        fmt = FORMATS[fmt_name]
        ref = quantize_reference(x, fmt)
        got = kernels.try_quantize(x, fmt)
        exact = got is not None and torch.equal(got, ref)
        record("kernel", fmt_name, time_device(lambda t, f=fmt: kernels.try_quantize(t, f), inputs, args.iters),
               "bit-exact" if exact else "MISMATCH vs reference",
               eager=time_op(lambda f=fmt: kernels.try_quantize(x, f), args.warmup, args.iters))
        rotated = kernels.try_rotated_quantize(x, fmt, rotation)
        if rotated is None:
            record("rotated kernel", fmt_name, None, f"not covered ({rotation.description})")
        else:
            ref_rot = rotation.inverse(quantize_reference(rotation.forward(x), fmt))
            ran_tc = kernels._gluon_compiled(fmt, "kron-tc", n, x.dtype)
            ran_kron = ran_tc or kernels._gluon_compiled(fmt, "kron", n, x.dtype)
            which = ("Gluon butterflies" if kernels._gluon_compiled(fmt, "walsh", n, x.dtype) else
                     "Gluon kron, A on tensor cores" if ran_tc else "Gluon kron" if ran_kron else "two-stage MMA")

            def agreement(out, ref_rot=ref_rot):
                diff = (out.float() - ref_rot.float()).abs()
                return ("bit-exact" if float(diff.max()) == 0 else
                        f"{100 * float((diff > 0).float().mean()):.3f}% elems differ from reference, "
                        f"max |diff| {float(diff.max()):.3g}")

            record("rotated kernel", fmt_name,
                   time_device(lambda t, f=fmt: kernels.try_rotated_quantize(t, f, rotation), inputs, args.iters),
                   f"{rotation.description}; {which}; {agreement(rotated)}",
                   eager=time_op(lambda f=fmt: kernels.try_rotated_quantize(x, f, rotation), args.warmup, args.iters))
            def beside(op: str, switch: str, kernel: str, fmt=fmt, fmt_name=fmt_name, agreement=agreement) -> None:
                """The kernel that `switch` (a kernels.USE_* flag) turns off, timed side by side."""
                was = getattr(kernels, switch)
                setattr(kernels, switch, False)
                try:
                    out = kernels.try_rotated_quantize(x, fmt, rotation)
                    record(op, fmt_name,
                           time_device(lambda t: kernels.try_rotated_quantize(t, fmt, rotation), inputs, args.iters),
                           f"{rotation.description}; {kernel}; {agreement(out)}")
                finally:
                    setattr(kernels, switch, was)

            if ran_tc:  # the CUDA-core kron kernel it replaced
                beside("rotated kernel (kron, CUDA cores)", "USE_KRON_TC_KERNEL", "Gluon kron")
            if ran_kron:  # the MMA kernel both replaced
                beside("rotated kernel (MMA)", "USE_KRON_KERNEL", "two-stage MMA")
            del ref_rot
        if not args.no_reference:
            record("torch reference", fmt_name, None, "eager time only",
                   eager=time_op(lambda f=fmt: quantize_reference(x, f), 2, max(3, args.iters // 5)))
            record("rotated torch reference", fmt_name, None, "eager time only",
                   eager=time_op(lambda f=fmt: rotation.inverse(quantize_reference(rotation.forward(x), f)),
                                 2, max(3, args.iters // 5)))
        if compiled:
            try:
                fn = compiled[fmt_name]
                record("torch.compile reference", fmt_name, time_device(lambda t, g=fn: g(t), inputs, args.iters),
                       eager=time_op(lambda g=fn: g(x), 3, args.iters))
            except Exception as exc:  # noqa: BLE001 - record it and go on: the table is still useful
                record("torch.compile reference", fmt_name, None, f"failed: {type(exc).__name__}: {exc}"[:200])
        del ref, got
    return rows


def _time_gluon_setting(label, n, dtype_name, fmt_name, fmt, rot, inputs, copy_s, args) -> None:
    """Time the rotated kernel under the settings just made and print one sweep row; a setting
    that the Gluon kernel cannot take (no plan, or it fell back to the MMA kernel) is recorded
    as failed."""
    try:
        if not (kernels._plan_entry(rot, inputs[0].device).walsh or kernels._build_kron_plan(rot)):
            raise RuntimeError("no Gluon plan")
        t = time_device(lambda v, f=fmt, r=rot: kernels.try_rotated_quantize(v, f, r), inputs, args.iters)
        if kernels.GLUON_FAILURES:  # it fell back to the MMA kernel: not this setting
            raise RuntimeError(next(iter(kernels.GLUON_FAILURES.values())))
    except Exception as exc:  # noqa: BLE001 - e.g. a row that does not fit the warps: record it
        kernels.GLUON_FAILURES.clear()
        print(f"| {n} | {dtype_name} | {fmt_name} | {label} | failed: {type(exc).__name__} | |", flush=True)
        return
    print(f"| {n} | {dtype_name} | {fmt_name} | {label} | {t * 1e6:.1f} | {100 * copy_s / t:.0f} |", flush=True)


# The Walsh kernel's sweep: (warps, log2 values per thread, programs per SM, register cap).
WALSH_SWEEP = ((4, 6, 4, 0), (4, 6, 8, 0), (4, 6, 5, 96), (4, 6, 6, 80), (4, 6, 8, 80), (4, 6, 7, 72), (8, 6, 4, 0),
               (8, 6, 3, 80), (4, 5, 8, 0), (8, 5, 4, 0), (8, 5, 2, 0), (16, 5, 2, 0), (4, 7, 2, 0), (8, 7, 1, 0))


# The kron kernel's sweep: (warps, programs per SM, values per thread over the K slices, register cap,
# lane levels).
KRON_SWEEP = ((4, 8, 96, 0, 1), (4, 8, 96, 0, 0), (4, 4, 96, 128, 1), (4, 8, 96, 128, 1), (4, 8, 96, 128, 0),
              (4, 5, 96, 96, 1), (4, 6, 96, 80, 1), (8, 2, 96, 128, 1), (8, 4, 96, 128, 1), (8, 4, 96, 128, 0),
              (4, 8, 48, 0, 1), (4, 8, 160, 0, 1))


# The tensor-core kron kernel's sweep: (warps, programs per SM, register cap, ring stages).
KRON_TC_SWEEP = ((2, 4, 0, 3), (2, 4, 0, 2), (2, 4, 0, 4), (2, 3, 0, 3), (4, 2, 0, 3), (1, 8, 0, 3))


def _settings(text: str, length: int) -> tuple:
    """--walsh-settings and --kron-tc-settings (4 integers each) / --kron-settings (5):
    '4,6,8,0:8,5,4,0' -> ((4, 6, 8, 0), (8, 5, 4, 0))."""
    settings = tuple(tuple(int(v) for v in item.split(",")) for item in text.split(":"))
    if any(len(setting) != length for setting in settings):
        raise argparse.ArgumentTypeError(f"{length} integers per setting, ':' between settings; got {text!r}")
    return settings


@contextlib.contextmanager
def _overwriting(table: dict, key):
    """Let a sweep overwrite table[key] (a kernels settings table); afterwards put back what was
    there, or nothing, and drop the kernels compiled meanwhile."""
    missing = object()
    saved = table.get(key, missing)
    try:
        yield
    finally:
        if saved is missing:
            table.pop(key, None)
        else:
            table[key] = saved
        kernels.clear_caches()


def _sweep_walsh(n, dtype_name, fmt_name, fmt, rot, inputs, copy_s, args) -> None:
    """The Gluon Walsh kernel's (warps, log2 values per thread, programs per SM, register cap)
    settings (a cap of 0: ptxas's choice; a lower cap lets more programs share an SM)."""
    log_n = n.bit_length() - 1
    with _overwriting(kernels.WALSH_CONFIGS, log_n):
        for warps, bits, per_sm, cap in args.walsh_settings:
            kernels.WALSH_CONFIGS[log_n] = (warps, bits, per_sm, cap)
            kernels.clear_caches()
            label = f"walsh warps={warps} values/thread={1 << bits} programs/SM={per_sm} registers<={cap or '-'}"
            _time_gluon_setting(label, n, dtype_name, fmt_name, fmt, rot, inputs, copy_s, args)


def _sweep_kron_tc(n, dtype_name, fmt_name, fmt, rot, inputs, copy_s, args) -> None:
    """The tensor-core kron kernel's (warps, programs per SM, register cap, ring stages), where it
    serves these rows."""
    kron = kernels._build_kron_plan(rot)
    if not kernels._kron_tc_applies(DTYPES[dtype_name], kron, fmt.block_size):
        return
    default = kernels.KRON_TC_SETTING
    try:
        for warps, per_sm, cap, stages in args.kron_tc_settings:
            kernels.KRON_TC_SETTING = (warps, per_sm, cap, stages)
            kernels.clear_caches()
            label = f"kron-tc warps={warps} programs/SM={per_sm} registers<={cap or '-'} stages={stages}"
            try:  # (a setting the plan cannot lay out would be timed on the CUDA-core kron kernel)
                kernels._kron_tc_tile(kron.log_p, warps, fmt.block_size)
            except ValueError:
                print(f"| {n} | {dtype_name} | {fmt_name} | {label} | failed: no plan | |", flush=True)
                continue
            _time_gluon_setting(label, n, dtype_name, fmt_name, fmt, rot, inputs, copy_s, args)
    finally:
        kernels.KRON_TC_SETTING = default
        kernels.clear_caches()


def _sweep_kron(n, dtype_name, fmt_name, fmt, rot, inputs, copy_s, args) -> None:
    """The Gluon kron kernel's (warps, programs per SM, values per thread over the K slices,
    register cap, lane levels): a cap of 0 is ptxas's choice; 128 / 96 / 80 registers let 4 / 5
    / 6 programs of 4 warps share an SM; lane levels 1 runs H_P's lane bits by warp shuffle. The
    tensor-core kron kernel is switched off meanwhile (it would serve 16-bit rows of order 36)."""
    key = (DTYPES[dtype_name], n)  # this size's own setting (kernels._kron_setting looks it up first)
    default_values = kernels.KRON_MAX_VALUES
    tensor_cores = kernels.USE_KRON_TC_KERNEL
    kernels.USE_KRON_TC_KERNEL = False
    with _overwriting(kernels.KRON_CONFIGS, key):
        try:
            for warps, per_sm, values, cap, lanes in args.kron_settings:
                kernels.KRON_CONFIGS[key] = (warps, per_sm, cap, lanes)
                kernels.KRON_MAX_VALUES = values
                kernels.clear_caches()
                label = (f"kron warps={warps} programs/SM={per_sm} values/thread<={values} registers<={cap or '-'}"
                         f" lane levels={'yes' if lanes else 'no'}")
                _time_gluon_setting(label, n, dtype_name, fmt_name, fmt, rot, inputs, copy_s, args)
        finally:  # (before _overwriting clears the caches: plans depend on it)
            kernels.KRON_MAX_VALUES = default_values
            kernels.USE_KRON_TC_KERNEL = tensor_cores


def sweep(args) -> None:
    """Tile / warp / split settings of the kernels, device time only, printed as a table."""
    import itertools

    from mxptq.nn.hadamard import get_rotation

    print("| n | dtype | format | setting | time (us) | % of copy |")
    for n, dtype_name in itertools.product([int(s) for s in args.sizes.split(",")], args.dtypes.split(",")):
        x = torch.randn(8, 2048, n, device="cuda", dtype=DTYPES[dtype_name])
        copies = max(1, min(8, -(-(256 << 20) // (x.numel() * x.element_size()))))
        inputs = [x] + [x.clone() for _ in range(copies - 1)]
        copy_s = time_device(lambda t: t.clone(), inputs, args.iters)
        for fmt_name in args.formats.split(","):
            fmt = FORMATS[fmt_name]
            for tile, warps in (() if args.sweep_rotated_only or args.sweep_walsh_only else
                                ((2048, 4), (4096, 4), (4096, 8), (8192, 8), (8192, 16), (16384, 16))):
                kernels.PLAIN_TILE_ELEMENTS, kernels.PLAIN_NUM_WARPS = tile, warps
                t = time_device(lambda v, f=fmt: kernels.try_quantize(v, f), inputs, args.iters)
                print(f"| {n} | {dtype_name} | {fmt_name} | plain tile={tile} warps={warps} | {t * 1e6:.1f} | "
                      f"{100 * copy_s / t:.0f} |", flush=True)
            rot = get_rotation(n, block_size=32)
            if kernels._is_walsh(rot) and kernels.HAVE_GLUON:
                _sweep_walsh(n, dtype_name, fmt_name, fmt, rot, inputs, copy_s, args)
                if args.sweep_walsh_only:
                    continue
            elif kernels.HAVE_GLUON and kernels._build_kron_plan(rot) is not None:
                _sweep_kron_tc(n, dtype_name, fmt_name, fmt, rot, inputs, copy_s, args)
                _sweep_kron(n, dtype_name, fmt_name, fmt, rot, inputs, copy_s, args)
                if args.sweep_walsh_only:
                    continue
            names = ("ROTATION_TILE_ELEMENTS", "ROTATION_NUM_WARPS", "ROTATION_PROGRAMS_PER_SM", "ROTATION_MID_SPLIT")
            defaults = tuple(getattr(kernels, name) for name in names)
            default_a_first_tile = kernels.ROTATION_TILE_ELEMENTS_A_FIRST
            settings = [(tile, warps, per_sm, 3) for tile, warps in ((2048, 4), (4096, 4), (4096, 8))
                        for per_sm in (2, 4, 8)] + [(*defaults[:3], 2)]
            for setting in settings:
                for name, value in zip(names, setting):
                    setattr(kernels, name, value)
                kernels.ROTATION_TILE_ELEMENTS_A_FIRST = setting[0]  # the sweep's tile for every plan
                try:
                    t = time_device(lambda v, f=fmt, r=rot: kernels.try_rotated_quantize(v, f, r), inputs, args.iters)
                except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory / registers: record it
                    print(f"| {n} | {dtype_name} | {fmt_name} | rotated {setting} | failed: {type(exc).__name__} | |")
                    continue
                tile, warps, per_sm, split = setting
                print(f"| {n} | {dtype_name} | {fmt_name} | rotated tile={tile} warps={warps} programs/SM={per_sm} "
                      f"split={split} | {t * 1e6:.1f} | {100 * copy_s / t:.0f} |", flush=True)
            for name, value in zip(names, defaults):
                setattr(kernels, name, value)
            kernels.ROTATION_TILE_ELEMENTS_A_FIRST = default_a_first_tile
        kernels.PLAIN_TILE_ELEMENTS, kernels.PLAIN_NUM_WARPS = 4096, 4
        del x, inputs
        torch.cuda.empty_cache()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="directory for bench_kernels.{json,md}")
    ap.add_argument("--sizes", default="576,1536,2048,4096,8192", help="last-axis sizes n of [8, 2048, n]")
    ap.add_argument("--dtypes", default="fp16,bf16")
    ap.add_argument("--formats", default="MXINT4,MXFP4,MXFP8")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd reference")
    ap.add_argument("--no-reference", action="store_true", help="skip the eager torch reference")
    ap.add_argument("--sweep", action="store_true", help="only time kernel settings (tile, warps, split)")
    ap.add_argument("--sweep-rotated-only", action="store_true", help="with --sweep: only the rotated kernel")
    ap.add_argument("--walsh-settings", type=functools.partial(_settings, length=4), default=WALSH_SWEEP,
                    help="with --sweep: the Walsh kernel's settings, warps,log2 values per thread,programs per SM,"
                         "register cap (0: none), ':' between settings")
    ap.add_argument("--kron-settings", type=functools.partial(_settings, length=5), default=KRON_SWEEP,
                    help="with --sweep: the kron kernel's settings, warps,programs per SM,values per thread,"
                         "register cap (0: none),lane levels (0/1), ':' between settings")
    ap.add_argument("--kron-tc-settings", type=functools.partial(_settings, length=4), default=KRON_TC_SWEEP,
                    help="with --sweep: the tensor-core kron kernel's settings, warps,programs per SM,"
                         "register cap (0: none),ring stages (>= 2), ':' between settings")
    ap.add_argument("--sweep-walsh-only", action="store_true", help="with --sweep: only the Gluon kernels (Walsh, kron)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_kernels.py needs a CUDA device", file=sys.stderr)
        return 2
    import triton

    from mxptq.nn.hadamard import get_rotation

    if args.sweep:
        sweep(args)
        return 0

    device = torch.device("cuda")
    # dynamic=True: one compile per (format, dtype) serves every size (keeps the run short).
    compiled = {} if args.no_compile else {
        name: torch.compile(lambda x, f=fmt: quantize_reference(x, f), dynamic=True) for name, fmt in FORMATS.items()
    }
    rows = []
    t_start = time.time()
    for n in [int(s) for s in args.sizes.split(",")]:
        rotation = get_rotation(n, block_size=32)
        for dtype_name in args.dtypes.split(","):
            dtype = DTYPES[dtype_name]
            x = torch.randn(8, 2048, n, device=device, dtype=dtype)
            rows += bench_shape(x, n, dtype_name, rotation, compiled, args)
            del x
            torch.cuda.empty_cache()
            print(f"n={n} {dtype_name} done ({time.time() - t_start:.0f} s)", file=sys.stderr)

    meta = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
        "cuda": torch.version.cuda, "python": platform.python_version(),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "shape": "[8, 2048, n]", "bytes_per_op": "2 * numel * element_size (one read + one write)",
        "timing": (f"time: device time per call, CUDA graph of 10 calls cycling over copies of x (>= 256 MiB "
                f"footprint), median of {args.iters} replays; eager: CUDA events around one call incl. host "
                f"dispatch, {args.warmup} warmup, median of {args.iters} (torch reference: of {max(3, args.iters // 5)})"),
        "wall_s": round(time.time() - t_start, 1), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_kernels.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# MX kernel bandwidth on {meta['device']}", "",
             *[f"- {k}: `{v}`" for k, v in meta.items() if k != "device"], "",
             "| n | dtype | format | op | time (us) | GB/s | % of copy | eager (us) | note |",
             "|---|---|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        fmt_num = (lambda v, spec: "-" if v is None else format(v, spec))
        lines.append(f"| {r['n']} | {r['dtype']} | {r['format']} | {r['op']} | {fmt_num(r['time_us'], '.1f')} | "
                     f"{fmt_num(r['gbps'], '.0f')} | {fmt_num(r['pct_of_copy'], '.0f')} | {fmt_num(r['eager_us'], '.1f')} | {r['note']} |")
    (args.out / "bench_kernels.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
