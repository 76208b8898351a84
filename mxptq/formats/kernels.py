"""Optional fused GPU kernels for MX fake-quantization (Triton), gated at import.

`mxptq.formats.quantize` calls `try_quantize(x, fmt, axis)` for CUDA tensors; the online
Hadamard quantizer calls `try_rotated_quantize(x, fmt, rotation)`. Both return None whenever the
kernel does not cover the case (no Triton, CPU tensor, unsupported dtype / block size / rotation
size, `MXPTQ_DISABLE_KERNELS=1`), and the caller then uses the torch reference, which stays the
one definition of the MX math (issue 9; STYLE.md rule 1).

Exactness. `try_quantize` is bit-exact against the reference (tests/formats/test_kernels.py):
the shared exponent is computed from the fp32 bits of the block amax with integer logic, the
element rounding is IEEE round-half-to-even, and every scaling is by an exact power of two, so
both implementations compute the same correctly rounded fp32 numbers, then cast to the output
dtype with round-to-nearest-even.

`try_rotated_quantize` computes R^-1 Q(R x). For a Walsh rotation (n = 2^m, 2^8..2^15) on CUDA
it runs `_gluon_mx`: the reference's fp32 butterflies in the reference's order, in registers,
so the result is bit-exact (see that module). A rotation R = s (A kron H_P) with A a +-1 matrix
of order K = 12 (8 <= P <= 1024), 20 (P <= 256) or 28-44 (P <= 64, `_build_kron_plan`)
(H_12 kron H_128 = 1536, H_36 kron H_16 = 576) runs the Gluon kron kernel on CUDA: the
butterflies on each of the K slices of a row (by warp shuffle where a slice lies in one warp),
and A as add/subtract of slices in registers, columns in pairs or quads
(`_gluon_mx.mx_kron_rotated_kernel`); where A has order 36 (576, 1152, 2304), the rows are
fp16 or bf16 and an MX block spans at most four slices, A runs on the tensor cores instead
(`_gluon_kron_tc`, `_kron_tc_applies`; sm_80 and later). Like
the MMA kernel they agree with the reference to fp32 rounding, not bit for bit. Every other +-1 Kronecker rotation
(R = s (A kron B)), and all of them in Triton's CPU interpreter, runs the MMA kernel, in two MMA stages per direction
on the tensor cores: the +-1 Hadamard factors and 16-bit activations (and the quantized values)
are exact MMA inputs, the fp32 intermediate between the stages is split into three bf16 pieces
(all 24 significand bits), and the normalization is one fp32 multiply. Like the reference path
(Rotation.forward and quantize keep the activation dtype), R x and Q(R x) are rounded to the activation dtype in registers.
So R x agrees with the reference's R x to about fp32 rounding (relative error ~1e-6) before
that cast, Q is the reference's exact math, and the result can differ
from the reference only where R x sits within that rounding of a rounding boundary of the
element grid (one quantum, in a small fraction of elements; the tests bound both).

Why one pass: the straightforward torch fake-quantization reads and writes the activation about
ten times (abs, amax, log2, ceil, divide, round, clamp, multiply, cast); here each element is
loaded once and stored once, so the plain kernel runs at close to copy bandwidth
(scripts/bench_kernels.py). On an H100 the Walsh kernel reaches 72-76 % of copy at n = 2048
fp16, 66-69 % at 4096 and 59-61 % at 8192; bf16 55-72 % (41-48 instructions per element, 2 log2 n
= 22-26 of them butterfly adds; time followed the count, and at n = 2048 Nsight Compute saw 68 %
of issue slots busy at 25 % occupancy: benchmarks/walsh_sass.md, benchmarks/h100/walsh_direct.md,
benchmarks/h100/ncu_walsh.md); the kron kernel 52-53 % at 1536 (bf16 49-53 %; before its quad
mix and lane levels it was latency-bound, profiled uncapped on 4 warps: 3 programs per SM,
benchmarks/h100/ncu_kron.md), the tensor-core kron kernel 47-49 % at 576 (bf16 42-48 %; the
CUDA-core one 38-42 % and 36-38 %, benchmarks/h100/kron_tc_sweep.md), where the MMA kernel,
bound by shared-memory layout traffic between its MMA stages (benchmarks/h100/ncu_rotated.md),
ran 25-26 % and 18-19 % (benchmarks/h100/bench_kernels.md).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import warnings
from dataclasses import dataclass, replace

import torch

try:  # Triton is optional: it ships with CUDA torch wheels, never needed on CPU.
    import triton

    from mxptq.formats import _triton_mx

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - depends on the install
    triton = None
    _triton_mx = None
    HAVE_TRITON = False

try:  # Gluon (Triton's explicit-layout dialect, experimental): the Walsh-rotated kernel.
    from mxptq.formats import _gluon_mx

    HAVE_GLUON = HAVE_TRITON
except Exception:  # noqa: BLE001 - ImportError, or a Triton whose Gluon API differs
    _gluon_mx = None
    HAVE_GLUON = False

try:  # the kron kernel with A on the tensor cores (Gluon's Ampere MMA and cp.async)
    from mxptq.formats import _gluon_kron_tc

    HAVE_KRON_TC = HAVE_GLUON
except Exception:  # noqa: BLE001 - as above
    _gluon_kron_tc = None
    HAVE_KRON_TC = False

__all__ = [
    "HAVE_GLUON",
    "HAVE_TRITON",
    "clear_caches",
    "fake_quantize_last_axis",
    "kernels_enabled",
    "rotated_fake_quantize",
    "try_quantize",
    "try_rotated_quantize",
]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_IO_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # _triton_mx.IO_*
MAX_BLOCK_SIZE = 1024  # one block must fit in one program's registers
_MAX_DENSE_ROTATION = 128  # rotations up to this size run as one dense matrix


def kernels_enabled(x: torch.Tensor) -> bool:
    """True if the fused kernels may run for x: Triton imported, x on CUDA (or Triton's CPU
    interpreter is on, for tests), and not disabled by MXPTQ_DISABLE_KERNELS=1."""
    if not HAVE_TRITON or os.environ.get("MXPTQ_DISABLE_KERNELS", "0") == "1":
        return False
    return x.is_cuda or os.environ.get("TRITON_INTERPRET", "0") == "1"


# --------------------------------------------------------------------------------------------
# Format -> kernel constants
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _KernelSpec:
    """The integer constants the kernel needs to reproduce the reference for one Format."""

    mode: int  # _triton_mx.MODE_*: how the block exponent follows from amax
    qmax_log2: int  # symmetric rule: floor(log2 qmax)
    qmax_significand: int  # symmetric rule: qmax's significand, leading one at bit 23
    shared_offset: int  # shared exponent (E8M0 scale_exp) = block exponent + shared_offset
    shared_min: int  # E8M0 range of scale_exp (OCP MX v1.0 sec. 5.4: 2^-127 .. 2^127)
    shared_max: int
    zero_shared: int  # scale_exp of an all-zero block (only matters for encode; values are 0)
    code_shift: int  # element quantum exponent = scale_exp + code_shift (int formats)
    is_int: bool
    code_max_pos: float  # int formats: largest positive / negative code magnitude
    code_max_neg: float
    elem_emin: int  # fp formats: exponent of the smallest normal element (1 - bias)
    elem_man_bits: int
    elem_max: float  # fp formats: largest finite element (saturation)
    nonfinite: int  # _triton_mx.NONFINITE_*

    def constexprs(self) -> dict:
        return {
            "MODE": self.mode, "QMAX_LOG2": self.qmax_log2, "QMAX_SIGNIFICAND": self.qmax_significand,
            "SHARED_OFFSET": self.shared_offset, "SHARED_MIN": self.shared_min,
            "SHARED_MAX": self.shared_max, "ZERO_SHARED": self.zero_shared, "CODE_SHIFT": self.code_shift,
            "IS_INT": self.is_int, "CODE_MAX_POS": self.code_max_pos, "CODE_MAX_NEG": self.code_max_neg,
            "ELEM_EMIN": self.elem_emin, "ELEM_MAN_BITS": self.elem_man_bits, "ELEM_MAX": self.elem_max,
            "NONFINITE": self.nonfinite,
        }


def _significand_of(value: float) -> tuple[int, int]:
    """(floor(log2 value), significand with the leading one at bit 23) of a positive float that
    fits 24 bits of significand (every element max_value does)."""
    exponent = math.floor(math.log2(value))
    significand = value / 2.0**exponent * 2**23
    assert significand == int(significand), value
    return exponent, int(significand)


@functools.lru_cache(maxsize=256)
def _cached_spec(fmt) -> tuple[_KernelSpec | None, dict]:
    """Per-Format constants, computed once (the per-call host cost matters: an activation
    quantizer runs several times per layer per forward)."""
    spec = _kernel_spec(fmt)
    return spec, ({} if spec is None else spec.constexprs())


def _spec_for(fmt) -> tuple[_KernelSpec | None, dict]:
    try:
        return _cached_spec(fmt)
    except TypeError:  # unhashable format object
        spec = _kernel_spec(fmt)
        return spec, ({} if spec is None else spec.constexprs())


def _kernel_spec(fmt) -> _KernelSpec | None:
    """Translate a Format into kernel constants (conventions of mxptq.formats.spec: int<b>
    element value = code * 2^-(b-2), scale_exp clamped to [-127, 127]), or None."""
    from mxptq.formats import spec

    element = fmt.element
    rule = fmt.scale_rule
    bs = fmt.block_size
    if bs < 1 or bs > MAX_BLOCK_SIZE or bs & (bs - 1):
        return None
    if rule == spec.ScaleRule.TUTORIAL:
        mode, offset = _triton_mx.MODE_CEIL, -1  # scale_exp = ceil(log2 amax) - 1
    elif rule == spec.ScaleRule.OCP:
        mode, offset = _triton_mx.MODE_FLOOR, -element.emax  # floor(log2 amax) - emax_elem
    elif rule == spec.ScaleRule.SYMMETRIC:
        mode, offset = _triton_mx.MODE_SYMMETRIC, 0  # smallest e: amax <= max_value * 2^e
    else:
        return None
    qmax_log2, qmax_significand = _significand_of(element.max_value)
    fields = {
        "mode": mode, "qmax_log2": qmax_log2, "qmax_significand": qmax_significand, "shared_offset": offset,
        "shared_min": spec.SCALE_EXP_MIN, "shared_max": spec.SCALE_EXP_MAX,
        "zero_shared": spec.SCALE_EXP_ZERO_BLOCK, "nonfinite": _triton_mx.NONFINITE_BLOCK_NAN,
    }
    if element.kind == "int":
        lowest, highest = _int_code_range(element, rule)
        return _KernelSpec(code_shift=-element.man_bits, is_int=True, code_max_pos=float(highest),
                           code_max_neg=float(-lowest), elem_emin=0, elem_man_bits=0,
                           elem_max=0.0, **fields)
    return _KernelSpec(code_shift=0, is_int=False, code_max_pos=0.0, code_max_neg=0.0,
                       elem_emin=element.emin, elem_man_bits=element.man_bits,
                       elem_max=float(element.max_value), **fields)


def _int_code_range(element, rule) -> tuple[int, int]:
    from mxptq.formats.mxint import code_range

    return code_range(element, rule)


# --------------------------------------------------------------------------------------------
# Launching with little host time
# --------------------------------------------------------------------------------------------

# Issue 9: the kernels run at copy bandwidth, so on a small model a quantized eval is bound by
# host time, and most of it was Triton's generic launch path: `kernel[grid](...)` re-binds ~25
# arguments, rebuilds the specialization and its cache-key string and re-checks the kernel's
# globals on every call. Once a kernel is compiled for one specialization we launch the compiled
# kernel directly (`CompiledKernel[grid](*args)`, the same launcher the generic path ends in),
# keyed on everything Triton specializes on: every constexpr and num_warps (the launch config),
# each tensor argument's dtype and 16-byte alignment, each int's (== 1, % 16 == 0, 32-bit range).
# Off with MXPTQ_KERNEL_FAST_LAUNCH=0 (read at import) or `kernels.FAST_LAUNCH = False`.
FAST_LAUNCH = os.environ.get("MXPTQ_KERNEL_FAST_LAUNCH", "1") != "0"


class _LaunchConfig:
    """One kernel's compile-time side of a launch: constexprs + num_warps, and the constexpr
    values in the kernel's parameter order (the compiled launcher takes every parameter, as
    `JITFunction.run` passes them). Built once per (format, dtype, layout); compared by identity."""

    __slots__ = ("compiled", "constexprs", "kernel", "num_warps", "options", "tail")

    def __init__(self, kernel, n_runtime: int, constexprs: dict, num_warps: int, options: dict | None = None) -> None:
        self.kernel = kernel
        self.constexprs = constexprs
        self.num_warps = num_warps
        self.options = options or {}  # further compile options (e.g. maxnreg), fixed per config
        names = list(getattr(kernel, "arg_names", ()))
        tail = names[n_runtime:]
        # None = the parameter list is not what we expect: always use the generic launch.
        self.tail = tuple(constexprs[n] for n in tail) if tail and set(tail) == set(constexprs) else None
        self.compiled: dict = {}  # runtime-argument specialization key -> CompiledKernel


def _arg_key(arg):
    """What Triton specializes a runtime argument on (see the comment above)."""
    if isinstance(arg, torch.Tensor):
        # the device too: a compiled kernel's handle is loaded on one GPU only
        return arg.dtype, arg.data_ptr() % 16 == 0, arg.device
    if isinstance(arg, bool):
        return "b", arg
    if isinstance(arg, int):
        return arg == 1, arg % 16 == 0, -(2**31) <= arg < 2**31
    if isinstance(arg, float):
        return "f"
    raise TypeError(type(arg))


def _launch(config: _LaunchConfig, grid: tuple, args: tuple) -> None:
    """kernel[grid](*args, **constexprs, num_warps=...), through the compiled kernel when one
    exists for this specialization. Grid is a 3-tuple."""
    global FAST_LAUNCH
    if FAST_LAUNCH and config.tail is not None:
        key = tuple(map(_arg_key, args))
        compiled = config.compiled.get(key)
        if compiled is not None:
            try:
                compiled[grid](*args, *config.tail)
                return
            except (TypeError, AttributeError):  # pragma: no cover - a Triton without this API
                # The launcher parses its arguments before launching: nothing ran.
                FAST_LAUNCH = False
        result = config.kernel[grid](*args, num_warps=config.num_warps, **config.options, **config.constexprs)
        if result is not None and hasattr(result, "__getitem__") and hasattr(result, "function"):
            config.compiled[key] = result  # a CompiledKernel (the interpreter returns none)
        return
    config.kernel[grid](*args, num_warps=config.num_warps, **config.options, **config.constexprs)


class _FormatEntry:
    __slots__ = ("configs", "constexprs", "fmt", "spec")

    def __init__(self, fmt, spec, constexprs) -> None:
        self.fmt = fmt
        self.spec = spec
        self.constexprs = constexprs
        self.configs: dict = {}  # (kernel kind, layout constants...) -> _LaunchConfig


_FORMAT_ENTRIES: dict[int, _FormatEntry] = {}


def _format_entry(fmt) -> _FormatEntry:
    """Per-Format constants, found by the object's id: hashing a frozen dataclass Format walks
    all its fields (~1 us), and a model uses a handful of Format objects for every call. The
    entry holds the Format, so its id is never reused while the entry exists."""
    entry = _FORMAT_ENTRIES.get(id(fmt))
    if entry is None or entry.fmt is not fmt:
        spec, constexprs = _spec_for(fmt)
        entry = _FormatEntry(fmt, spec, constexprs)
        if len(_FORMAT_ENTRIES) > 1024:  # formats built per call (tests): keep it bounded
            _FORMAT_ENTRIES.clear()
        _FORMAT_ENTRIES[id(fmt)] = entry
    return entry


# --------------------------------------------------------------------------------------------
# Plain fake-quantization along the last axis
# --------------------------------------------------------------------------------------------


def _on_device(x: torch.Tensor):
    """Launch on x's GPU (Triton launches on the current device); a no-op context when x is
    already on the current device (the common case, and it costs host time)."""
    if x.is_cuda and x.get_device() != torch.cuda.current_device():
        return torch.cuda.device(x.device)
    return _NO_GUARD


_NO_GUARD = contextlib.nullcontext()


def _io_code(x: torch.Tensor) -> int:
    """IO mode for the kernels: bf16 natively in compiled GPU code; as int16 bit patterns in
    Triton's CPU interpreter, which flushes bf16 subnormals (converted bit-exactly in-kernel)."""
    if x.dtype == torch.bfloat16 and not x.is_cuda:
        return _triton_mx.IO_BF16
    if x.dtype == torch.bfloat16:
        return _triton_mx.IO_BF16_NATIVE
    return _IO_CODES[x.dtype]


def _compiled_io(dtype: torch.dtype) -> int:
    """IO mode of the Gluon kernels, which run as compiled GPU code only: `_io_code` of a CUDA
    tensor of this dtype (bf16 natively)."""
    return _triton_mx.IO_BF16_NATIVE if dtype == torch.bfloat16 else _IO_CODES[dtype]


def _io_views(x: torch.Tensor, y: torch.Tensor, io: int):
    if io == _triton_mx.IO_BF16:
        return x.view(torch.int16), y.view(torch.int16)
    return x, y


# Flat kernel tile: (elements per program, warps). Swept on an H200 (scripts/bench_kernels.py
# --sweep): 4096 elements on 4 warps was best or within 2% of best at every size.
PLAIN_TILE_ELEMENTS = 4096
PLAIN_NUM_WARPS = 4


def fake_quantize_last_axis(x: torch.Tensor, fmt) -> torch.Tensor | None:
    """Run the fused kernel on x (any device Triton can run on) along its last axis, or return
    None if the kernel does not cover (dtype, format). Does not check kernels_enabled()."""
    if not HAVE_TRITON or x.dtype not in _IO_CODES or x.dim() == 0:
        return None
    numel = x.numel()
    if numel == 0:
        return None
    entry = _format_entry(fmt)
    if entry.spec is None:
        return None
    x = x.contiguous()
    y = torch.empty_like(x)
    io = _io_code(x)
    x_arg, y_arg = _io_views(x, y, io)
    row_len = x.shape[-1]
    bs = fmt.block_size
    group = max(1, PLAIN_TILE_ELEMENTS // bs)
    if row_len % bs == 0:
        # Every MX block is bs contiguous elements: tile the flat tensor.
        tile = group * bs
        need_mask = numel % tile != 0
        key = ("flat", io, need_mask, PLAIN_TILE_ELEMENTS, PLAIN_NUM_WARPS)
        config = entry.configs.get(key)
        if config is None:
            config = entry.configs[key] = _LaunchConfig(
                _triton_mx.mx_fake_quantize_flat_kernel, 3,
                dict(BLOCK=bs, GROUP=group, NEED_MASK=need_mask, IO=io, **entry.constexprs),
                PLAIN_NUM_WARPS if tile >= 2048 else 4)
        grid = (-(-numel // tile), 1, 1)
        args = (x_arg, y_arg, numel)
    else:
        blocks_per_row = -(-row_len // bs)
        n_blocks = (numel // row_len) * blocks_per_row
        wide = (n_blocks + group) * bs >= 2**31
        key = ("rows", io, wide, PLAIN_TILE_ELEMENTS)
        config = entry.configs.get(key)
        if config is None:
            config = entry.configs[key] = _LaunchConfig(
                _triton_mx.mx_fake_quantize_kernel, 5,
                dict(BLOCK=bs, GROUP=group, EVEN_ROWS=False, IO=io, WIDE_INDEX=wide, **entry.constexprs),
                8 if group * bs >= 2048 else 4)
        grid = (-(-n_blocks // group), 1, 1)
        args = (x_arg, y_arg, n_blocks, row_len, blocks_per_row)
    with _on_device(x):
        _launch(config, grid, args)
    return y


def try_quantize(x: torch.Tensor, fmt, axis: int = -1) -> torch.Tensor | None:
    """Fused `quantize(x, fmt, axis)` for CUDA tensors; None means "use the reference".

    A non-last axis costs one transposing copy in and one out (still far fewer passes than the
    reference); non-contiguous inputs cost one copy."""
    if not kernels_enabled(x) or x.dim() == 0:
        return None
    axis = axis % x.dim()
    if axis == x.dim() - 1:
        return fake_quantize_last_axis(x, fmt)
    moved = fake_quantize_last_axis(x.movedim(axis, -1), fmt)
    return None if moved is None else moved.movedim(-1, axis).contiguous()


# --------------------------------------------------------------------------------------------
# Fused rotate -> quantize -> rotate back
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _RotationPlan:
    """R = s * (A kron B) and R^-1 = s_inv * (A_inv kron B_inv) with integer (+-1 / 0) factors,
    zero-padded to tensor-core friendly powers of two: A as is (left multiplication), B
    transposed (right multiplication). `a_first`: which factor the kernel applies first (the
    first stage reads exact 16-bit data, the second a split fp32 intermediate)."""

    n: int
    a_dim: int  # A is a_dim x a_dim (1 = no A: R = s * B, n = b_dim)
    a_pad: int  # 1 without A
    b_dim: int
    b_pad: int  # b_dim padded to a power of two >= 16 (differs only for a dense R, a_dim = 1)
    a_first: bool
    forward_a: torch.Tensor
    forward_b_t: torch.Tensor
    inverse_a: torch.Tensor
    inverse_b_t: torch.Tensor
    forward_scale: float
    inverse_scale: float

def _apply_rotation(rotation, which: str, rows: torch.Tensor) -> torch.Tensor:
    """rotation.<which> on float64 row vectors, on the rotation's device if it is bound to one."""
    try:
        return getattr(rotation, which)(rows).double().cpu()
    except RuntimeError:
        device = next((v.device for v in vars(rotation).values() if torch.is_tensor(v)), "cpu")
        return getattr(rotation, which)(rows.to(device)).double().cpu()


def _factor_kron(rotation, which: str, n: int, b_dim: int):
    """Write the map M = rotation.<which> as A kron B with B b_dim x b_dim, or return None.

    Only a + b columns of M are computed (M is 8192^2 for the largest sizes): with
    M[i*b + p, k*b + q] = A[i, k] B[p, q], the first b columns give B up to a factor and the
    columns k*b give A. The factorization is then checked on random probe vectors."""
    a_dim = n // b_dim
    cols = list(range(b_dim)) + [k * b_dim for k in range(1, a_dim)]
    unit = torch.zeros(len(cols), n, dtype=torch.float64)
    unit[torch.arange(len(cols)), torch.tensor(cols)] = 1.0
    columns = _apply_rotation(rotation, which, unit).T  # [n, len(cols)]: M[:, cols]
    b_factor = columns[:b_dim, :b_dim].clone()
    pivot = b_factor[0, 0]
    if pivot == 0:
        return None
    a_first = columns[0::b_dim, 0:1]  # A[i, 0] * B[0, 0]
    a_rest = columns[0::b_dim, b_dim:]  # A[i, k] * B[0, 0], k >= 1
    a_factor = torch.cat([a_first, a_rest], dim=1) / pivot
    probes = torch.randn(4, n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    expected = _apply_rotation(rotation, which, probes)
    ours = (a_factor @ probes.reshape(4, a_dim, b_dim) @ b_factor.T).reshape(4, n)
    if (ours - expected).abs().max() > 1e-5 * expected.abs().max():
        return None
    return a_factor, b_factor


def _integerize(factor: torch.Tensor):
    """factor = scale * integer matrix with entries in {-1, 0, 1}? -> (int matrix, scale) or None."""
    peak = factor.abs().max()
    unit = factor / peak
    rounded = unit.round()
    if (unit - rounded).abs().max() > 1e-5:
        return None
    return rounded, float(peak)


def _padded(factor: torch.Tensor, size: int, device, transpose: bool) -> torch.Tensor:
    out = torch.zeros(size, size, dtype=torch.float64)
    out[: factor.shape[0], : factor.shape[1]] = factor.T if transpose else factor
    return out.to(device=device, dtype=torch.float32).contiguous()


def _pow2_at_least(v: int, floor: int = 16) -> int:
    return max(floor, 1 << (v - 1).bit_length())


# Bf16 pieces of an fp32 intermediate in the second-stage MMAs (3 = all 24 significand bits).
ROTATION_MID_SPLIT = 3
# Largest padded factor the kernel keeps in registers (a 128 x 128 16-bit factor is 32 KiB).
_MAX_FACTOR = 128


def _tensor_core_cost(a_dim: int, a_pad: int, b_dim: int, b_pad: int, a_first: bool) -> float:
    """MMA flops per real element of one direction of the two-stage kernel: a stage of size m
    costs 2 m per padded element and per bf16 piece; the first stage reads exact 16-bit data
    (one piece), the second a split fp32 intermediate (ROTATION_MID_SPLIT pieces); padded rows
    (a_pad > a_dim, or b_pad > b_dim for a dense R) are computed and thrown away."""
    first, second = (a_pad, b_pad) if a_first else (b_pad, a_pad)
    if a_pad == 1:
        return (b_pad / b_dim) * 2.0 * b_pad
    return (a_pad / a_dim) * (2.0 * first + 2.0 * ROTATION_MID_SPLIT * second)


def _build_rotation_plan(rotation, device: torch.device) -> _RotationPlan | None:
    """Write R as A kron B with +-1 factors, choosing the split and the stage order with the
    fewest tensor-core flops per element (`_tensor_core_cost`). Up to 128, a dense R is one
    candidate (one MMA per direction on exact data)."""
    n = int(rotation.n)
    pow2_part = n & -n
    candidates = []  # (cost, b_dim, a_dim, a_pad, a_first)
    if n <= _MAX_DENSE_ROTATION:
        candidates.append((_tensor_core_cost(1, 1, n, _pow2_at_least(n), False), n, 1, 1, False))
    for b_dim in (128, 64, 32, 16):
        if b_dim > pow2_part or b_dim >= n:
            continue
        a_dim = n // b_dim
        a_pad = _pow2_at_least(a_dim)
        if a_pad > _MAX_FACTOR:
            continue
        for a_first in (False, True):
            candidates.append((_tensor_core_cost(a_dim, a_pad, b_dim, b_dim, a_first), b_dim, a_dim, a_pad, a_first))
    for _cost, b_dim, a_dim, a_pad, a_first in sorted(candidates, key=lambda c: (c[0], -c[1])):
        fwd = _factor_kron(rotation, "forward", n, b_dim)
        inv = _factor_kron(rotation, "inverse", n, b_dim)
        if fwd is None or inv is None:
            continue
        factors = [_integerize(f) for f in (*fwd, *inv)]
        if any(f is None for f in factors):
            continue  # not a +-1 Hadamard: the kernel's exact 16-bit MMA inputs do not apply
        (fa, sa), (fb, sb), (ia, sia), (ib, sib) = factors
        b_pad = _pow2_at_least(b_dim)
        return _RotationPlan(
            n=n, a_dim=a_dim, a_pad=a_pad, b_dim=b_dim, b_pad=b_pad, a_first=a_first,
            forward_a=_padded(fa, a_pad, device, transpose=False),
            forward_b_t=_padded(fb, b_pad, device, transpose=True),
            inverse_a=_padded(ia, a_pad, device, transpose=False),
            inverse_b_t=_padded(ib, b_pad, device, transpose=True),
            forward_scale=sa * sb, inverse_scale=sia * sib,
        )
    return None


@functools.lru_cache(maxsize=64)
def _cached_plan(rotation, device) -> _RotationPlan | None:
    return _build_rotation_plan(rotation, device)


_NOT_BUILT = object()


@dataclass(frozen=True, eq=False)  # compared and hashed by identity: a launch-config key (cheap)
class _KronPlan:
    """R = scale * (A kron H_P) and R^-1 = scale * (A' kron H_P), A and A' +-1 K x K matrices
    (A' = A^T for an orthogonal R) and H_P the Sylvester Walsh matrix, P = 2^log_p: the Gluon
    kron kernel's constants (`_gluon_mx.kron_mix` codes A and A')."""

    k: int
    log_p: int
    register_bits: int
    mix_group: int
    forward_terms: tuple
    forward_flip: tuple
    inverse_terms: tuple
    inverse_flip: tuple
    scale: float
    forward_matrix: tuple = ()  # A and A' themselves (rows of +-1), for the tensor-core kernel
    inverse_matrix: tuple = ()


def _kron_register_bits(k: int) -> int:
    """log2 of the values per slice per thread: as many as KRON_MAX_VALUES allows over K
    slices, at most 8 (16-byte fp16 accesses); 0 = the kernel does not take K."""
    bits = min(3, math.floor(math.log2(KRON_MAX_VALUES / k)))
    return bits if bits >= 1 else 0


def _kron_mix_group(k: int) -> int:
    """Columns of A per group in `_gluon_mx._mix`: quads from KRON_QUAD_MIN_K on, else pairs."""
    return 4 if k >= KRON_QUAD_MIN_K else 2


def _build_kron_plan(rotation) -> _KronPlan | None:
    """Write R as scale * (A kron H_P) with the order K of A a multiple of 4 (the kernel joins
    slices in fours) and not a power of two (those are Walsh rotations: the bit-exact Walsh
    kernel or the MMA kernel), taking the largest P for which the rotation's own forward and
    inverse maps factor so (checked as `_build_rotation_plan` checks them), or None. The
    values per thread (`_kron_register_bits`) and at most four layout stages bound P: K = 12
    takes 8 <= P <= 1024, K = 20 P <= 256, K = 28..44 (2 values per slice) P <= 16 with
    stages and P <= 64 with lane levels (a slice within one warp; the setting of every dtype at
    n must have them), so 576 = 36 * 16, 1152 and 2304 qualify and 4608 = 36 * 128 does not."""
    n = getattr(rotation, "n", None)
    if not isinstance(n, int) or n < 2:
        return None
    p = n & -n
    while p >= 2:
        k = n // p
        if k % 4 == 0 and k & (k - 1) and _kron_register_bits(k):
            plan = _kron_plan_for(rotation, k, p)
            if plan is not None:
                return plan
        p //= 2
    return None


def _kron_plan_for(rotation, k: int, p: int) -> _KronPlan | None:
    from mxptq.nn.hadamard import fwht  # here: mxptq.nn imports mxptq.formats

    n = k * p
    register_bits = _kron_register_bits(k)
    settings = {_kron_setting(dtype, n) for dtype in SUPPORTED_DTYPES}  # (outside the try: a bad table raises)
    try:  # the layouts exist for the setting of every dtype at n (`_kron_tile` builds them again, cached)
        for num_warps, _, _, lane_levels in settings:
            _gluon_mx.kron_plan(p.bit_length() - 1, num_warps, register_bits, bool(lane_levels))
    except ValueError:
        return None
    sylvester = fwht(torch.eye(p, dtype=torch.float64), normalize=False)
    codes, scales, matrices = [], [], []
    for which in ("forward", "inverse"):
        factors = _factor_kron(rotation, which, n, p)
        if factors is None:
            return None
        (a_int, a_scale), (b_int, b_scale) = (_integerize(f) or (None, 0.0) for f in factors)
        if a_int is None or b_int is None or not (a_int.abs() == 1).all():
            return None
        if torch.equal(b_int, -sylvester):  # the same map: A and B both negated
            a_int, b_int = -a_int, -b_int
        if not torch.equal(b_int, sylvester):
            return None
        codes.append(_gluon_mx.kron_mix(a_int.long().tolist(), _kron_mix_group(k)))
        matrices.append(tuple(map(tuple, a_int.long().tolist())))
        scales.append(a_scale * b_scale)
    if abs(scales[0] - scales[1]) > 1e-12 * scales[0]:
        return None  # the kernel has one normalization for both directions
    (forward_terms, forward_flip), (inverse_terms, inverse_flip) = codes
    return _KronPlan(k=k, log_p=p.bit_length() - 1, register_bits=register_bits, mix_group=_kron_mix_group(k),
                     forward_terms=forward_terms, forward_flip=forward_flip, inverse_terms=inverse_terms,
                     inverse_flip=inverse_flip, scale=scales[0], forward_matrix=matrices[0],
                     inverse_matrix=matrices[1])


class _PlanEntry:
    """Per (rotation object, device): whether the Gluon Walsh kernel applies (decided once), and
    the Gluon kron kernel's plan and the MMA kernel's plan, each built on first use (the MMA
    plan is then only the fallback)."""

    __slots__ = ("_kron", "_plan", "device", "rotation", "walsh")

    def __init__(self, rotation, device: torch.device) -> None:
        self.rotation = rotation
        self.device = device
        self.walsh = HAVE_GLUON and _is_walsh(rotation)
        self._plan = _NOT_BUILT
        self._kron = _NOT_BUILT

    @property
    def kron(self) -> _KronPlan | None:
        """The Gluon kron kernel's factors (None: not A kron H_P, or the kernel cannot take it)."""
        if self._kron is _NOT_BUILT:
            self._kron = _build_kron_plan(self.rotation) if HAVE_GLUON and not self.walsh else None
        return self._kron

    @property
    def plan(self) -> _RotationPlan | None:
        if self._plan is _NOT_BUILT:
            try:
                self._plan = _cached_plan(self.rotation, self.device)
            except TypeError:  # unhashable rotation object
                self._plan = _build_rotation_plan(self.rotation, self.device)
        return self._plan


_PLAN_ENTRIES: dict[tuple, _PlanEntry] = {}


def _plan_entry(rotation, device: torch.device) -> _PlanEntry:
    """The rotation's entry for (rotation object, device), found by id like `_format_entry`
    (hashing a rotation on every call would cost more than the lookup)."""
    key = (id(rotation), device)
    entry = _PLAN_ENTRIES.get(key)
    if entry is None or entry.rotation is not rotation:
        entry = _PlanEntry(rotation, device)
        if len(_PLAN_ENTRIES) > 256:
            _PLAN_ENTRIES.clear()
        _PLAN_ENTRIES[key] = entry
    return entry


def clear_caches() -> None:
    """Forget every rotation plan and per-format launch configuration, so that the next call
    rebuilds them from the current module settings (tests and benchmarks that change the plan
    builder or the tuning constants)."""
    _cached_plan.cache_clear()
    _walsh_plan.cache_clear()
    _kron_tile.cache_clear()
    _kron_tc_tile.cache_clear()
    _KRON_TC_OPERANDS.clear()
    _PLAN_ENTRIES.clear()
    _FORMAT_ENTRIES.clear()


# Rotated kernel launch: padded elements per tile (ROWS rows of a_pad * b_pad), warps, and
# persistent programs per SM (each converts the factors once, then loops over tiles). Swept on
# an H100 (benchmarks/h100/rotated_sweep*.md): 4096-element tiles, 4 warps, 8 programs per SM
# for B-first plans (1536, 2048, 4096, ...); A-first plans (576 = H_36 (x) H_16: a 64-wide padded
# A stage first) run best at half that tile. Software-pipelining the tile loop was slower.
ROTATION_TILE_ELEMENTS = 4096
ROTATION_TILE_ELEMENTS_A_FIRST = 2048
ROTATION_NUM_WARPS = 4
ROTATION_PROGRAMS_PER_SM = 8


@functools.lru_cache(maxsize=16)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # Triton's CPU interpreter: a few programs, each looping over tiles
    return torch.cuda.get_device_properties(device).multi_processor_count


# Walsh-rotated kernel (Gluon): (num_warps, log2 of the values per thread, programs per SM,
# register cap (maxnreg; 0 = ptxas's choice)) by log2 of the row length, from the sweeps on an
# H100 (benchmarks/h100/walsh_sweep.md): rows up to 2^12 run 64 values per thread on 4 warps,
# 2^13 32 values on 8 warps. The caps keep programs per SM: 2^12 at 128 registers (its bf16
# minifloat kernel took 135, 3 programs per SM instead of 4), 2^13 at 64 (bf16 MXINT4 took 68:
# 350 -> 317 us). 2^14 and 2^15 (not measured) take 64 values per thread on as many warps as
# one row needs.
WALSH_CONFIGS = {12: (4, 6, 8, 128), 13: (8, 5, 4, 64), 14: (8, 6, 4, 0), 15: (16, 6, 2, 0)}
WALSH_DEFAULT_CONFIG = (4, 6, 8, 0)
WALSH_LOG_N_RANGE = (8, 15)
# Tests switch this off to run the MMA kernel on Walsh sizes too.
USE_WALSH_KERNEL = True
# Kron kernel (Gluon) for R = s (A kron H_P), A a +-1 K x K matrix: (num_warps, persistent
# programs per SM, register cap (maxnreg; 0 = ptxas's choice), lane levels) by (activation dtype,
# row length), else KRON_DEFAULT_CONFIG (`_kron_setting`). Lane levels (1): H_P's levels on lane
# bits run by warp shuffle (`_gluon_mx._lane_butterfly`) instead of through layout conversions (0).
# 576 and 1536, from the sweeps on an H100 (benchmarks/h100/kron_sweep.md): 8 warps capped at 128
# registers with lane levels; bf16 1536 went from 76.9 to 69.0 us (MXINT4) and 87.4 to 74.0 us
# (MXFP4) against its old 4 uncapped warps without them, fp16 and 576 moved by at most 1.2 us
# either way. 576 bf16 spills a little there (44 SASS spill instructions) and still ran fastest.
# Other lengths (not timed): 4 warps, no cap, lane levels, the setting without spills at every
# length `scripts/count_sass_walsh.py` compiled (1152-6144; the 128 cap spilled at 1152, 2304,
# 2560 and 6144).
_KRON_TIMED = (8, 4, 128, 1)
KRON_CONFIGS = {(dtype, n): _KRON_TIMED for dtype in (torch.float16, torch.bfloat16) for n in (576, 1536)}
KRON_DEFAULT_CONFIG = (4, 8, 0, 1)
# KRON_MAX_VALUES: values per thread across the K slices (K * 2^register_bits,
# `_kron_register_bits`): H_12 kron H_128 holds 96 (8 per slice; 167 registers uncapped).
KRON_MAX_VALUES = 96
# KRON_QUAD_MIN_K: A's columns mix in quads from this order on (`_gluon_mx._mix`). Quads save
# K/4 - 2 adds per element per direction over pairs: 7 at K = 36 (576: 76.9 -> 64.8 SASS
# instructions per element, fp16 MXINT4, no spills at 128 registers), 1 at K = 12, where the 8
# combinations of a quad spilled at 128 registers (1536 fp16: 50.2 -> 51.1 per element).
KRON_QUAD_MIN_K = 20
USE_KRON_KERNEL = True
# The kron kernel with A on the tensor cores (`_gluon_kron_tc`), for A of order 36 (576 =
# H_36 kron H_16; 1152, 2304) in fp16 and bf16: (num_warps, persistent programs per SM, register
# cap, ring stages: tiles copied ahead + 1, at least 2). Chosen on an H100 with the kernel's
# prototype (benchmarks/h100/kron_tc_sweep.md): 2 warps (8 rows per tile at 576), 4 programs per
# SM, 3 stages. The kernel as committed: 24.1 us against the CUDA-core kron kernel's 28.5 (fp16
# MXINT4, benchmarks/h100/bench_kernels.md).
KRON_TC_SETTING = (2, 4, 0, 3)
USE_KRON_TC_KERNEL = True
# (device, row length, dtype) -> the error of a Gluon kernel that failed to compile or launch
# there (a Triton whose experimental Gluon API differs): that case then runs the MMA kernel,
# with one warning.
GLUON_FAILURES: dict[tuple, str] = {}


def _is_walsh(rotation) -> bool:
    """The rotation is the normalized Sylvester Walsh-Hadamard transform (mxptq.nn.hadamard's
    "walsh" kind: forward == inverse == fwht / sqrt(n)) on a row length the Gluon kernel takes:
    the name is checked first, then the map itself on probe vectors against `fwht`, the
    transform the kernel reproduces. `_plan_entry` asks once per rotation object."""
    from mxptq.nn.hadamard import fwht  # here: mxptq.nn imports mxptq.formats

    n = getattr(rotation, "n", None)
    if getattr(rotation, "kind", None) != "walsh" or not isinstance(n, int) or n < 1 or n & (n - 1):
        return False
    if not WALSH_LOG_N_RANGE[0] <= n.bit_length() - 1 <= WALSH_LOG_N_RANGE[1]:
        return False
    probes = torch.randn(2, n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    expected = fwht(probes)
    return all(
        float((_apply_rotation(rotation, which, probes) - expected).abs().max()) <= 1e-9 * float(expected.abs().max())
        for which in ("forward", "inverse")
    )


@functools.lru_cache(maxsize=32)
def _walsh_plan(log_n: int, num_warps: int, register_bits: int) -> tuple[dict, int]:
    """The Gluon kernel's layout constexprs for rows of 2^log_n, and rows per tile."""
    plan = _gluon_mx.walsh_plan(log_n, num_warps, register_bits)
    return plan, plan["M"] >> log_n


@functools.lru_cache(maxsize=64)
def _fp16_q_stays_finite(fmt) -> bool:
    """Whether the reference's Q keeps every fp16 block within fp16's range (|Q(x)| <= 65504),
    checked exhaustively: one block per positive finite fp16 magnitude a, holding a and -a (Q is
    monotonic, so they bound the block). Then the rotated kernels need not round Q's output of an
    fp16 tile to fp16 (`_triton_mx._round_at_block_quantum`, OUT_IO). Rules that scale a
    block's amax up (the symmetric integer rule: 65504 / 2^14 rounds to 4, Q = 65536, which
    fp16 makes inf) keep the rounding."""
    from mxptq.formats.mx import quantize_reference  # here: mx imports this module

    # Blocks of two whatever the format's size (the scale rule depends on the amax only): both
    # signs are needed, an integer code range such as -8..7 is uneven.
    pair = replace(fmt, block_size=2)
    magnitudes = _finite_magnitudes(torch.float16)
    blocks = torch.stack([magnitudes, -magnitudes], dim=1)
    return bool((quantize_reference(blocks, pair).abs() <= 65504.0).all())


def _finite_magnitudes(dtype: torch.dtype) -> torch.Tensor:
    """Every positive finite value of a 16-bit dtype, as fp32 (ascending)."""
    top = 0x7C00 if dtype == torch.float16 else 0x7F80  # the bit pattern of +inf
    return torch.arange(1, top, dtype=torch.int16).view(dtype).float()


@functools.lru_cache(maxsize=64)
def _int_clamps(fmt, dtype: torch.dtype) -> int:
    """CLAMPS of the Gluon kernels (`_triton_mx._round_at_block_quantum`): which of an integer
    format's clamp bounds can bind on blocks of this 16-bit dtype, bit 0 the lower
    (-code_max_neg), bit 1 the upper (+code_max_pos); 3 (both) for minifloats and fp32.

    Checked on every positive finite magnitude a of the dtype as a block's amax: the block's codes
    lie within +-round_half_even(a / 2^(scale_exp + code_shift)), with scale_exp from the
    reference's rule (`scale_exp_from_amax`), and a bound binds iff that code passes it. The
    tutorial rule gives 3 - 1 = 2 (codes reach -2^(b-1), never below); the symmetric rule 0
    where no scale is clamped at 2^127."""
    from mxptq.formats.mx import scale_exp_from_amax  # here: mx imports this module

    spec = _spec_for(fmt)[0]
    if spec is None or not spec.is_int or dtype not in (torch.float16, torch.bfloat16):
        return 3
    amax = _finite_magnitudes(dtype)
    exponent = scale_exp_from_amax(amax, fmt).double() + spec.code_shift
    codes = torch.round(amax.double() * torch.exp2(-exponent))  # exact in float64; half to even
    return int(bool((codes > spec.code_max_neg).any())) | 2 * int(bool((codes > spec.code_max_pos).any()))


def _quantum_constexprs(dtype: torch.dtype, entry: _FormatEntry) -> dict:
    """OUT_IO and CLAMPS of the Gluon kernels' rounding at the block quantum."""
    return {"OUT_IO": _out_io(dtype, entry), "CLAMPS": _int_clamps(entry.fmt, dtype)}


def _walsh_constexprs(plan: dict, even: bool, dtype: torch.dtype, block: int, entry: _FormatEntry) -> dict:
    """Every constexpr of `_gluon_mx.mx_walsh_rotated_kernel` (compiled GPU code only: bf16
    loads and stores as bf16, see _triton_mx.IO_BF16_NATIVE)."""
    io = _compiled_io(dtype)
    return dict(plan, EVEN=even, IO=io, BLOCK=block, **entry.constexprs, **_quantum_constexprs(dtype, entry))


def _out_io(dtype: torch.dtype, entry: _FormatEntry) -> int:
    """OUT_IO of the Gluon kernels: the IO code whose dtype Q's output is rounded to through the
    clamp bounds, so that no element needs rounding (1.5 SASS instructions per element: a pack
    and an unpack); 0 where each result is rounded. bf16 always; fp16 where the format allows
    (`_fp16_q_stays_finite`); fp32 needs no rounding."""
    if dtype == torch.bfloat16 or (dtype == torch.float16 and _fp16_q_stays_finite(entry.fmt)):
        return _compiled_io(dtype)
    return 0


def _walsh_rotated(x: torch.Tensor, entry: _FormatEntry, fmt, rotation) -> torch.Tensor | None:
    """The Walsh-rotated kernel (`_gluon_mx`), or None where it does not apply."""
    block = fmt.block_size
    n = rotation.n
    if block & (block - 1) or block > n or not x.is_cuda or entry.spec.nonfinite != 0:
        return None
    failure_key = _failure_key("walsh", x.device, n, x.dtype)
    if failure_key in GLUON_FAILURES:
        return None
    log_n = n.bit_length() - 1
    num_warps, register_bits, programs_per_sm, max_registers = WALSH_CONFIGS.get(log_n, WALSH_DEFAULT_CONFIG)
    plan, rows_per_tile = _walsh_plan(log_n, num_warps, register_bits)
    # 1 / sqrt(n) as the reference's fp32 multiply uses it (a Python float, rounded to fp32)
    return _gluon_rotated(
        _gluon_mx.mx_walsh_rotated_kernel, "Walsh", x, n, 1.0 / math.sqrt(n), rows_per_tile, entry,
        ("walsh", register_bits), lambda even: _walsh_constexprs(plan, even, x.dtype, block, entry),
        (num_warps, programs_per_sm, max_registers), failure_key)


def _gluon_rotated(kernel, what: str, x: torch.Tensor, n: int, scale: float, rows_per_tile: int,
                   entry: _FormatEntry, variant: tuple, constexprs, setting: tuple, failure_key: tuple,
                   operands: tuple = ()):
    """Run a Gluon rotated kernel (signature x, y, n_rows, n_tiles, scale) over x's rows of n:
    persistent programs, `setting` = (num_warps, programs per SM, register cap), over tiles of
    rows_per_tile rows. The compiled variant is cached in the format's entry under the key
    (kernel name, n, dtype, device, plan, setting, whether the rows fill whole tiles), where
    variant = (kernel name, what identifies its plan: the Walsh register bits; the kron plan and
    lane levels; for "kron-tc" the kron plan, block size and ring stages); constexprs(even)
    builds its constants on first use; `operands` follow scale
    in the kernel's arguments. None where the launch failed (`_launch_gluon`)."""
    num_warps, programs_per_sm, max_registers = setting
    x = x.contiguous()
    n_rows = x.numel() // n
    even = n_rows % rows_per_tile == 0
    key = (variant[0], n, x.dtype, x.device, variant[1], setting, even)
    config = entry.configs.get(key)
    if config is None:
        config = entry.configs[key] = _LaunchConfig(kernel, 5 + len(operands), constexprs(even), num_warps,
                                                    {"maxnreg": max_registers} if max_registers else None)
    n_tiles = -(-n_rows // rows_per_tile)
    y = torch.empty_like(x)
    grid = (min(n_tiles, _sm_count(x.device) * programs_per_sm), 1, 1)
    return y if _launch_gluon(config, grid, (x, y, n_rows, n_tiles, scale, *operands), failure_key, what) else None


def _failure_key(kernel: str, device: torch.device, n: int, dtype: torch.dtype) -> tuple:
    """The GLUON_FAILURES key of a Gluon kernel ("walsh", "kron" or "kron-tc") on rows of n:
    (device, n, dtype), and the tensor-core kron kernel's own, so that its failure leaves the
    CUDA-core kron kernel in service."""
    return (device, n, dtype, "kron-tc") if kernel == "kron-tc" else (device, n, dtype)


def _gluon_compiled(fmt, kernel: str, n: int, dtype: torch.dtype) -> bool:
    """Whether the Gluon kernel `kernel` ("walsh", "kron" or "kron-tc") has a variant for this
    format, rows of n and dtype (`_gluon_rotated`'s cache keys) that did not fail
    (GLUON_FAILURES: a fallback served those): tests and the benchmark ask which kernel served a
    call."""
    return any(key[:3] == (kernel, n, dtype) and _failure_key(kernel, key[3], n, dtype) not in GLUON_FAILURES
               for key in _format_entry(fmt).configs)


def _launch_gluon(config: _LaunchConfig, grid: tuple, args: tuple, failure_key: tuple, what: str) -> bool:
    """Launch a Gluon kernel; on an error (a Triton whose experimental Gluon API differs) record
    it in GLUON_FAILURES, warn once and return False, so that a fallback serves the call: the
    CUDA-core kron kernel after the tensor-core one (`what` "tensor-core kron"), else the MMA
    kernel."""
    x = args[0]
    try:
        with _on_device(x):
            _launch(config, grid, args)
    except Exception as exc:
        if torch.cuda.is_current_stream_capturing():
            raise
        message = f"{type(exc).__name__}: {exc}".splitlines()[0]
        GLUON_FAILURES[failure_key] = message
        fallback = "the CUDA-core kron kernel" if what == "tensor-core kron" else "the MMA kernel"
        warnings.warn(f"mxptq: the Gluon {what} kernel failed for rows of {failure_key[1]} {x.dtype} on {x.device} "
                      f"({message}); {fallback} serves them (within fp32 rounding, not bit-exact)",
                      RuntimeWarning, stacklevel=4)
        return False
    return True


@functools.lru_cache(maxsize=32)
def _kron_tile(log_p: int, num_warps: int, register_bits: int, lane_levels: bool = False) -> tuple[dict, int]:
    """The kron kernel's layout constexprs for slices of 2^log_p, and rows per tile (M counts
    the elements of four joined slice tiles)."""
    plan = _gluon_mx.kron_plan(log_p, num_warps, register_bits, lane_levels)
    return plan, (plan["M"] // 4) >> log_p


def _kron_constexprs(plan: dict, even: bool, dtype: torch.dtype, block: int, entry: _FormatEntry,
                     kron: _KronPlan) -> dict:
    """Every constexpr of `_gluon_mx.mx_kron_rotated_kernel` (compiled GPU code only)."""
    io = _compiled_io(dtype)
    return dict(plan, EVEN=even, K=kron.k, MIX_GROUP=kron.mix_group, FORWARD_TERMS=kron.forward_terms,
                FORWARD_FLIP=kron.forward_flip, INVERSE_TERMS=kron.inverse_terms, INVERSE_FLIP=kron.inverse_flip,
                IO=io, BLOCK=block,
                **entry.constexprs, **_quantum_constexprs(dtype, entry))


def _kron_setting(dtype: torch.dtype, n: int) -> tuple[int, int, int, int]:
    """(num_warps, programs per SM, register cap, lane levels) of the kron kernel on rows of n
    (KRON_CONFIGS)."""
    setting = KRON_CONFIGS.get((dtype, n)) or KRON_CONFIGS.get(dtype, KRON_DEFAULT_CONFIG)
    if len(setting) != 4:  # (a hand-edited table: say so rather than fall back to the MMA kernel silently)
        raise ValueError(f"KRON_CONFIGS setting {setting} for {dtype} rows of {n}: (warps, programs per SM, "
                         "register cap, lane levels)")
    return setting


def _kron_rotated(x: torch.Tensor, entry: _FormatEntry, fmt, kron: _KronPlan) -> torch.Tensor | None:
    """The Gluon kron kernel (`_gluon_mx.mx_kron_rotated_kernel`), or None where it does not
    apply: an MX block must lie in one slice or cover whole slices of one group."""
    block = fmt.block_size
    p = 1 << kron.log_p
    if block & (block - 1) or (block > p and kron.k % (block // p)) or not x.is_cuda or entry.spec.nonfinite != 0:
        return None
    n = kron.k * p
    if USE_KRON_TC_KERNEL and _kron_tc_applies(x.dtype, kron, block):
        y = _kron_tc_rotated(x, entry, kron, block)
        if y is not None:
            return y
    failure_key = _failure_key("kron", x.device, n, x.dtype)
    if failure_key in GLUON_FAILURES:
        return None
    num_warps, programs_per_sm, max_registers, lane_levels = _kron_setting(x.dtype, n)
    try:
        plan, rows_per_tile = _kron_tile(kron.log_p, num_warps, kron.register_bits, bool(lane_levels))
    except ValueError:  # KRON_CONFIGS changed after the plan was built (a benchmark sweep)
        return None
    return _gluon_rotated(
        _gluon_mx.mx_kron_rotated_kernel, "kron", x, n, kron.scale, rows_per_tile, entry,
        ("kron", (kron, bool(lane_levels))), lambda even: _kron_constexprs(plan, even, x.dtype, block, entry, kron),
        (num_warps, programs_per_sm, max_registers), failure_key)


def _kron_tc_applies(dtype: torch.dtype, kron: _KronPlan, block: int) -> bool:
    """Whether the tensor-core kron kernel takes these rows: A of order 36, slices of 16-64,
    16-bit activations (the MMA's exact inputs; fp32 rows keep the CUDA-core kron kernel) and
    blocks of at most four slices. (Blocks of four came out wrong on the H100 while Triton 3.6
    reduced their amax in one step, with the wrong shuffles, benchmarks/h100/kron_tc_sweep.md;
    the kernel's two-step amax gives the right ones.)"""
    return (HAVE_KRON_TC and kron.k == _gluon_kron_tc.TC_K and 4 <= kron.log_p <= 6
            and dtype in (torch.float16, torch.bfloat16) and 2 <= block <= 4 << kron.log_p)


@functools.lru_cache(maxsize=32)
def _kron_tc_tile(log_p: int, num_warps: int, block: int) -> dict:
    """The tensor-core kron kernel's layout constexprs (its rows per tile: ROWS)."""
    return _gluon_kron_tc.kron_tc_plan(log_p, num_warps, block)


def _kron_tc_constexprs(plan: dict, dtype: torch.dtype, block: int, entry: _FormatEntry, kron: _KronPlan,
                        stages: int) -> dict:
    """Every constexpr of `_gluon_kron_tc.mx_kron_tc_rotated_kernel` (compiled GPU code only;
    it masks every tile, so whole and ragged tiles share one variant)."""
    return dict(plan, K=kron.k, STAGES=stages, IO=_compiled_io(dtype), BLOCK=block, **entry.constexprs,
                **_quantum_constexprs(dtype, entry))


# (A kron plan, device, dtype) -> A and A' as the tensor-core kron kernel's MMA B operands there.
_KRON_TC_OPERANDS: dict[tuple, tuple] = {}


@functools.lru_cache(maxsize=8)
def _has_ampere_mma(device: torch.device) -> bool:
    """sm_80 or later: mma.sync m16n8k16 on bf16 and cp.async, which the kernel needs."""
    return torch.cuda.get_device_capability(device) >= (8, 0)


def _kron_tc_rotated(x: torch.Tensor, entry: _FormatEntry, kron: _KronPlan, block: int) -> torch.Tensor | None:
    """The kron kernel with A on the tensor cores (`_gluon_kron_tc.mx_kron_tc_rotated_kernel`),
    or None (then the CUDA-core kron kernel serves): a GPU before sm_80, a setting the plan
    cannot lay out, an earlier failure, or a first call during CUDA-graph capture (its matrices
    are copied to the GPU on first use, which capture does not allow)."""
    n = kron.k << kron.log_p
    failure_key = _failure_key("kron-tc", x.device, n, x.dtype)
    if failure_key in GLUON_FAILURES or not _has_ampere_mma(x.device):
        return None
    num_warps, programs_per_sm, max_registers, stages = KRON_TC_SETTING
    if stages < 2:  # (a hand-edited setting: the ring needs a stage to copy into while one computes)
        raise ValueError(f"KRON_TC_SETTING {KRON_TC_SETTING}: tiles in flight must be at least 2")
    try:
        plan = _kron_tc_tile(kron.log_p, num_warps, block)
    except ValueError:  # a setting the plan cannot lay out (e.g. warps not a power of two)
        return None
    operands = _KRON_TC_OPERANDS.get((kron, x.device, x.dtype))
    if operands is None:
        if torch.cuda.is_current_stream_capturing():
            return None
        forward, inverse = _gluon_kron_tc.kron_tc_matrices(kron.forward_matrix, kron.inverse_matrix)
        operands = _KRON_TC_OPERANDS[(kron, x.device, x.dtype)] = tuple(
            torch.tensor(m, dtype=x.dtype, device=x.device) for m in (forward, inverse))
    return _gluon_rotated(
        _gluon_kron_tc.mx_kron_tc_rotated_kernel, "tensor-core kron", x, n, kron.scale, plan["ROWS"], entry,
        ("kron-tc", (kron, block, stages)), lambda even: _kron_tc_constexprs(plan, x.dtype, block, entry, kron, stages),
        (num_warps, programs_per_sm, max_registers), failure_key, operands)


def rotated_fake_quantize(x: torch.Tensor, fmt, rotation) -> torch.Tensor | None:
    """R^-1 Q(R x) along the last axis in one fused kernel, or None if not covered.
    Does not check kernels_enabled(). Walsh rotations on CUDA run the Gluon butterfly kernel
    (bit-exact), s (A kron H_P) rotations the Gluon kron kernel (`_build_kron_plan`), with A
    on the tensor cores where `_kron_tc_applies`; every other +-1 Kronecker rotation, and every
    rotation off CUDA, the two-stage MMA kernel."""
    if not HAVE_TRITON or x.dtype not in _IO_CODES or x.dim() == 0:
        return None
    numel = x.numel()
    n = x.shape[-1]
    if numel == 0 or not isinstance(getattr(rotation, "n", None), int) or rotation.n != n:
        return None  # e.g. the key-axis rotation of P, whose length varies
    entry = _format_entry(fmt)
    if entry.spec is None:
        return None
    plan_entry = _plan_entry(rotation, x.device)
    if USE_WALSH_KERNEL and plan_entry.walsh:
        y = _walsh_rotated(x, entry, fmt, rotation)
        if y is not None:
            return y
    if USE_KRON_KERNEL and x.is_cuda and plan_entry.kron is not None:
        y = _kron_rotated(x, entry, fmt, plan_entry.kron)
        if y is not None:
            return y
    plan = plan_entry.plan
    if plan is None:
        return None
    if fmt.block_size > plan.a_pad * plan.b_pad:
        return None
    x = x.contiguous()
    y = torch.empty_like(x)
    io = _io_code(x)
    x_arg, y_arg = _io_views(x, y, io)
    n_rows = numel // n
    per_row = plan.a_pad * plan.b_pad
    tile = ROTATION_TILE_ELEMENTS_A_FIRST if plan.a_first else ROTATION_TILE_ELEMENTS
    rows = max(1, tile // per_row)
    if plan.a_pad == 1:
        rows = max(rows, 16)  # tl.dot needs M >= 16
    key = ("rotated", plan_entry, x.dtype, io, x.is_cuda, ROTATION_MID_SPLIT, rows, ROTATION_NUM_WARPS)
    config = entry.configs.get(key)
    if config is None:
        v16 = {torch.float16: _triton_mx.tl.float16}.get(x.dtype, _triton_mx.tl.bfloat16)
        config = entry.configs[key] = _LaunchConfig(
            _triton_mx.mx_rotated_kernel, 10,
            dict(A_DIM=plan.a_dim, A_PAD=plan.a_pad, B_DIM=plan.b_dim, B_PAD=plan.b_pad, ROWS=rows,
                 HAS_A=plan.a_pad > 1, A_FIRST=plan.a_first, MMA=1 if x.is_cuda else 0,
                 IN_SPLIT=3 if x.dtype == torch.float32 else 1, MID_SPLIT=ROTATION_MID_SPLIT,
                 V16=v16, IO=io, BLOCK=fmt.block_size, **entry.constexprs),
            ROTATION_NUM_WARPS)
    n_tiles = -(-n_rows // rows)
    grid = (min(n_tiles, _sm_count(x.device) * ROTATION_PROGRAMS_PER_SM), 1, 1)
    args = (x_arg, y_arg, n_rows, n_tiles,
            plan.forward_a, plan.forward_b_t, plan.inverse_a, plan.inverse_b_t,
            plan.forward_scale, plan.inverse_scale)
    with _on_device(x):
        _launch(config, grid, args)
    return y


def try_rotated_quantize(x: torch.Tensor, fmt, rotation) -> torch.Tensor | None:
    """Fused `rotation.inverse(quantize(rotation.forward(x), fmt))` for CUDA tensors; None
    means "use the reference path". See the module docstring for the tolerance."""
    if not kernels_enabled(x):
        return None
    return rotated_fake_quantize(x, fmt, rotation)
