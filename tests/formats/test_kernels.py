"""Fused Triton MX kernels (mxptq/formats/kernels.py) against the torch reference.

Independent expectation: `mxptq.formats.quantize_reference` (the one definition of the MX math)
for the plain kernel, bit for bit; for the rotated kernel, the reference path
`rotation.inverse(quantize_reference(rotation.forward(x)))` up to the documented tolerance.

Where the kernels run: on CUDA when a GPU is present (the device tool; the compiled kernels),
otherwise on CPU through Triton's interpreter (TRITON_INTERPRET=1, set below before the kernels
are imported). Without Triton the module is skipped; `test_try_quantize_*` check the gating.
"""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Must be set before `triton.jit` decorates the kernels (it reads the variable then).
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from mxptq.formats import ELEMENT_FORMATS, Format, ScaleRule, kernels, quantize_reference
from mxptq.formats.spec import ALLOWED_SCALE_RULES

DEVICE = "cuda" if HAS_CUDA else "cpu"
if not HAS_CUDA and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and Triton's interpreter is off", allow_module_level=True)

# The kernels implement the fixed rules; the searched `mse` rule runs in the torch path (declined
# below, in test_kernels_decline_the_searched_rule).
ALL_FORMATS = [
    Format(elem, 32, rule)
    for elem in ELEMENT_FORMATS.values()
    for rule in ALLOWED_SCALE_RULES[elem.kind]
    if rule is not ScaleRule.MSE
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _ids(fmt: Format) -> str:
    return f"{fmt.element.name}-{fmt.scale_rule.value}"


def _with_block(fmt: Format, block_size: int) -> Format:
    return Format(fmt.element, block_size, fmt.scale_rule)


def _hard_rows(row_len: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Rows that exercise every branch: block scales from tiny to huge, exact rounding ties,
    an all-zero stretch, negative zeros, values at the dtype's extremes, a ragged last block."""
    gen = torch.Generator().manual_seed(seed)
    info = torch.finfo(dtype)
    max_exp = 9 if dtype == torch.float16 else 100  # 64 * 2^9 < 65504
    rows = []
    # small integers times a power of two: coarse values, so many land exactly on grid
    # midpoints (round-half-to-even ties) at every element format
    for exp in (-max_exp, -20, -3, 0, 5, max_exp):
        ints = torch.randint(-64, 65, (row_len,), generator=gen).to(torch.float32)
        rows.append(ints * 2.0**exp)
    rows.append(torch.randn(row_len, generator=gen) * 2.0 ** torch.randint(-12, 12, (row_len,), generator=gen))
    zeros = torch.zeros(row_len)
    zeros[1::2] = -0.0
    rows.append(zeros)
    extremes = torch.full((row_len,), float(info.max))
    extremes[::3] = -float(info.max)
    extremes[1::3] = float(info.tiny)  # smallest normal of the dtype
    rows.append(extremes)
    tiny = torch.randint(-8, 9, (row_len,), generator=gen).to(torch.float32) * float(info.smallest_normal) / 4
    rows.append(tiny)  # subnormals of the dtype (fp32: fp32 subnormals)
    return torch.stack(rows).to(dtype)


def _assert_same(got: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert got.dtype == ref.dtype and got.shape == ref.shape, what
    same = (got == ref) | (got.isnan() & ref.isnan())
    if not bool(same.all()):
        idx = (~same).nonzero()[0].tolist()
        raise AssertionError(f"{what}: first mismatch at {idx}: kernel {got[tuple(idx)].item()!r} "
                             f"vs reference {ref[tuple(idx)].item()!r}; {int((~same).sum())} differ")
    # bit-exact includes the sign of zero
    assert torch.equal(torch.signbit(got[got == 0]), torch.signbit(ref[ref == 0])), what


@pytest.mark.parametrize("fmt", ALL_FORMATS, ids=_ids)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_quantize_bit_exact_every_format(fmt: Format, dtype: torch.dtype) -> None:
    for block_size, row_len in ((16, 48), (32, 70), (64, 64)):
        f = _with_block(fmt, block_size)
        x = _hard_rows(row_len, dtype).to(DEVICE)
        got = kernels.fake_quantize_last_axis(x, f)
        _assert_same(got.cpu(), quantize_reference(x.cpu(), f), f"{f.label} {dtype} n={row_len}")


@pytest.mark.parametrize("name", ["int4", "e2m1"])
def test_kernels_decline_the_searched_rule(name: str) -> None:
    fmt = Format(ELEMENT_FORMATS[name], 32, ScaleRule.MSE)
    x = _hard_rows(64, torch.float32).to(DEVICE)
    assert kernels.try_quantize(x, fmt, -1) is None
    from mxptq.formats import quantize

    _assert_same(quantize(x, fmt).cpu(), quantize_reference(x.cpu(), fmt), f"{fmt.label} dispatch")


@pytest.mark.parametrize("fmt", [Format(ELEMENT_FORMATS["int4"], 32), Format(ELEMENT_FORMATS["e2m1"], 32)], ids=_ids)
def test_quantize_nan_inf_blocks_become_nan(fmt: Format) -> None:
    x = torch.linspace(-3, 3, 128).reshape(2, 64)
    x[0, 3] = float("nan")
    x[1, 40] = float("inf")
    x[1, 1] = -float("inf")
    got = kernels.fake_quantize_last_axis(x.to(DEVICE), fmt).cpu()
    _assert_same(got, quantize_reference(x, fmt), fmt.label)
    # reference policy (mx.py): a block holding NaN/Inf is all NaN, other blocks are untouched
    assert got[0, :32].isnan().all() and got[1, :32].isnan().all() and got[1, 32:].isnan().all()
    assert not got[0, 32:].isnan().any()


@pytest.mark.parametrize("block_size", [1, 2, 8, 128, 1024])
def test_quantize_other_power_of_two_blocks_and_ragged_rows(block_size: int) -> None:
    fmt = Format(ELEMENT_FORMATS["e4m3"], block_size)
    row_len = block_size * 3 + max(1, block_size // 2) if block_size > 1 else 7
    x = torch.randn(3, row_len, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    got = kernels.fake_quantize_last_axis(x, fmt)
    _assert_same(got.cpu(), quantize_reference(x.cpu(), fmt), fmt.label)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_quantize_whole_tiles_without_mask(dtype: torch.dtype) -> None:
    """numel a multiple of the kernel's tile: the flat kernel runs without load/store masks."""
    fmt = Format(ELEMENT_FORMATS["e2m1"], 32)
    tile = kernels.PLAIN_TILE_ELEMENTS
    x = (torch.randn(3, tile, generator=torch.Generator().manual_seed(3)) * 4).to(dtype).to(DEVICE)
    _assert_same(kernels.fake_quantize_last_axis(x, fmt).cpu(), quantize_reference(x.cpu(), fmt), "whole tiles")


def test_quantize_unsupported_cases_return_none() -> None:
    x = torch.randn(2, 96, device=DEVICE)
    assert kernels.fake_quantize_last_axis(x, Format(ELEMENT_FORMATS["int4"], 48)) is None  # not 2^k
    assert kernels.fake_quantize_last_axis(x, Format(ELEMENT_FORMATS["int4"], 2048)) is None  # > 1024
    assert kernels.fake_quantize_last_axis(x.double(), Format(ELEMENT_FORMATS["int4"], 32)) is None


def test_try_quantize_other_axis_and_non_contiguous() -> None:
    fmt = Format(ELEMENT_FORMATS["int4"], 16)
    x = torch.randn(40, 6, 3, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    got = kernels.try_quantize(x, fmt, axis=0)
    assert got is not None
    _assert_same(got.cpu(), quantize_reference(x.cpu(), fmt, axis=0), "axis 0")
    xt = x.transpose(0, 2)  # non-contiguous, blocks along the (strided) last axis
    _assert_same(kernels.try_quantize(xt, fmt, -1).cpu(), quantize_reference(xt.cpu(), fmt), "strided")


def test_try_quantize_gating(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(2, 32, device=DEVICE)
    fmt = Format(ELEMENT_FORMATS["int4"], 32)
    monkeypatch.setenv("MXPTQ_DISABLE_KERNELS", "1")
    assert kernels.try_quantize(x, fmt) is None
    monkeypatch.delenv("MXPTQ_DISABLE_KERNELS")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert (kernels.try_quantize(x.cpu(), fmt) is None), "CPU tensors stay on the reference"


# --- fused rotate -> quantize -> rotate back --------------------------------------------------

hadamard = pytest.importorskip("mxptq.nn.hadamard")

ROTATED_CASES = [
    (64, "int4", ScaleRule.TUTORIAL),
    (128, "e2m1", ScaleRule.OCP),
    (256, "int8", ScaleRule.OCP),
    (576, "int4", ScaleRule.TUTORIAL),  # 36 * 16: H_36 kron H_16
    (1536, "e4m3", ScaleRule.OCP),  # 12 * 128
    (2048, "int4", ScaleRule.SYMMETRIC),
    (96, "int4", ScaleRule.TUTORIAL),  # block-diagonal 3 x H_32
]


def _reference_rotated(x: torch.Tensor, fmt: Format, rotation) -> torch.Tensor:
    return rotation.inverse(quantize_reference(rotation.forward(x), fmt))


@pytest.mark.parametrize("n,elem,rule", ROTATED_CASES, ids=[f"{c[0]}-{c[1]}" for c in ROTATED_CASES])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_rotated_quantize_matches_reference(n: int, elem: str, rule: ScaleRule, dtype) -> None:
    """Tolerance (kernels.py docstring): R x differs from the reference's R x by fp32 rounding,
    so an element may land on the other side of a rounding boundary: such flips are rare
    (< 1 % of elements) and each costs about one element step of its block."""
    fmt = Format(ELEMENT_FORMATS[elem], 32, rule)
    rotation = hadamard.get_rotation(n, block_size=32)
    rows = 20 if n <= 256 else 3
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(rows, n, generator=gen)
    x[:, 5] *= 40.0  # an outlier channel, the case rotations are for
    x = x.to(dtype)
    got = kernels.rotated_fake_quantize(x.to(DEVICE), fmt, rotation)
    assert got is not None, f"rotation {rotation.description} not covered"
    got = got.cpu().float()
    ref = _reference_rotated(x, fmt, rotation).float()
    err_ref = (ref - x.float()).norm()  # the quantization error itself
    assert (got - ref).norm() <= 0.05 * err_ref, "differences beyond rare boundary flips"
    assert (got - ref).abs().gt(1e-3 * x.float().abs().max()).float().mean() < 0.01


@pytest.mark.parametrize("a_first", [True, False], ids=["A-first", "B-first"])
@pytest.mark.parametrize("n", [576, 1536, 2048])
def test_rotated_quantize_either_stage_order_over_several_tiles(monkeypatch, n: int, a_first: bool) -> None:
    """The kernel applies A or B first (the plan picks the cheaper order); both orders, with MX
    blocks inside one B-run (1536, 2048: b >= 32) and spanning two (576: b = 16), over several
    tiles of several rows each, must match the reference row by row. (On Triton 3.6 a permute of
    the A-first tile scrambled rows 0 and 3 of every 4-row tile; one bad row fails this.)"""
    import dataclasses

    build = kernels._build_rotation_plan

    def forced(rotation, device):
        plan = build(rotation, device)
        return dataclasses.replace(plan, a_first=a_first and plan.a_dim > 1)

    monkeypatch.setattr(kernels, "_build_rotation_plan", forced)
    monkeypatch.setattr(kernels, "USE_WALSH_KERNEL", False)  # 2048 would take the Gluon kernels on CUDA,
    monkeypatch.setattr(kernels, "USE_KRON_KERNEL", False)  # 576 and 1536 too
    kernels.clear_caches()
    try:
        fmt = Format(ELEMENT_FORMATS["int4"], 32, ScaleRule.TUTORIAL)
        rotation = hadamard.get_rotation(n, block_size=32)
        x = torch.randn(11, n, generator=torch.Generator().manual_seed(1)).to(torch.float16)
        x[:, 7] *= 30.0
        got = kernels.rotated_fake_quantize(x.to(DEVICE), fmt, rotation).cpu().float()
        ref = _reference_rotated(x, fmt, rotation).float()
        err_ref = (ref - x.float()).norm(dim=1)
        assert ((got - ref).norm(dim=1) <= 0.05 * err_ref).all(), "a row differs beyond boundary flips"
    finally:
        kernels.clear_caches()  # no forced plan outlives the test


def test_rotated_quantize_exact_on_exactly_rotatable_input() -> None:
    """With R x exactly representable (x a scaled column of H^T, so R x is a scaled unit vector),
    rotation rounding cannot flip anything: the result equals the reference exactly."""
    n = 64
    rotation = hadamard.get_rotation(n)
    fmt = Format(ELEMENT_FORMATS["int4"], 32)
    H = hadamard.hadamard_matrix(n)
    x = (H.T[:, :8].T * 3.0).float().contiguous()  # rows: 3 * (column j of H^T) -> R x = 3 e_j
    x = torch.cat([x, torch.zeros(8, n)])  # also 8 all-zero rows (tile needs >= 16 rows)
    got = kernels.rotated_fake_quantize(x.to(DEVICE), fmt, rotation).cpu()
    ref = _reference_rotated(x, fmt, rotation)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)


def test_rotated_quantize_uncovered_returns_none() -> None:
    fmt = Format(ELEMENT_FORMATS["int4"], 32)
    x = torch.randn(4, 64, device=DEVICE)
    assert kernels.rotated_fake_quantize(x, fmt, hadamard.get_rotation(128)) is None  # size mismatch
    assert kernels.rotated_fake_quantize(x, fmt, hadamard.KeyAxisRotation(32)) is None  # variable n
    assert kernels.rotated_fake_quantize(x, Format(ELEMENT_FORMATS["int4"], 48), hadamard.get_rotation(64)) is None


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_dispatch_from_formats_quantize_on_cuda() -> None:
    """On CUDA, mxptq.formats.quantize goes through the kernel and still equals the reference
    on a realistic activation shape (a large tensor: many programs, wide grid)."""
    from mxptq.formats import quantize

    fmt = Format(ELEMENT_FORMATS["int4"], 32)
    x = torch.randn(8, 512, 2048, device="cuda", dtype=torch.bfloat16) * 3
    _assert_same(quantize(x, fmt).cpu(), quantize_reference(x.cpu(), fmt), "dispatch")


# ---- the compiled-kernel launch path (issue 9: host time per call) ----
# On CPU the interpreter compiles nothing, so these drive `kernels._launch` with a stand-in
# for a @triton.jit function: it records which path each launch took and with what arguments.


class _FakeCompiled:
    function = object()

    def __init__(self, log):
        self.log = log

    def __getitem__(self, grid):
        return lambda *args: self.log.append(("compiled", grid, args))


class _FakeJit:
    arg_names = ("x_ptr", "y_ptr", "n", "A", "B")

    def __init__(self):
        self.log = []

    def __getitem__(self, grid):
        def run(*args, num_warps, **constexprs):
            self.log.append(("jit", grid, args, num_warps, constexprs))
            return _FakeCompiled(self.log)

        return run


def test_launch_reuses_the_compiled_kernel_with_constexprs_in_parameter_order(monkeypatch) -> None:
    monkeypatch.setattr(kernels, "FAST_LAUNCH", True)
    jit = _FakeJit()
    config = kernels._LaunchConfig(jit, 3, {"B": 7, "A": 5}, num_warps=4)
    x, y = torch.zeros(64), torch.zeros(64)
    kernels._launch(config, (2, 1, 1), (x, y, 64))
    kernels._launch(config, (3, 1, 1), (x, y, 64 + 16))  # same specialization (n % 16 == 0)
    assert jit.log[0] == ("jit", (2, 1, 1), (x, y, 64), 4, {"B": 7, "A": 5})
    assert jit.log[1] == ("compiled", (3, 1, 1), (x, y, 80, 5, 7))  # A, B: the kernel's order


@pytest.mark.parametrize("change", ["misaligned", "int_one", "int_not_16", "int_64bit", "dtype"])
def test_launch_recompiles_where_triton_would_specialize_differently(monkeypatch, change) -> None:
    monkeypatch.setattr(kernels, "FAST_LAUNCH", True)
    jit = _FakeJit()
    config = kernels._LaunchConfig(jit, 3, {"A": 5, "B": 7}, num_warps=4)
    x, y = torch.zeros(64), torch.zeros(64)
    kernels._launch(config, (1, 1, 1), (x, y, 64))
    args = {
        "misaligned": (x[1:], y, 64),  # 4-byte offset: no 16-byte alignment
        "int_one": (x, y, 1),  # Triton makes an int 1 a constant
        "int_not_16": (x, y, 65),
        "int_64bit": (x, y, 2**33),
        "dtype": (x.half(), y, 64),
    }[change]
    kernels._launch(config, (1, 1, 1), args)
    assert [entry[0] for entry in jit.log] == ["jit", "jit"]


def test_launch_switched_off_always_takes_the_generic_path(monkeypatch) -> None:
    monkeypatch.setattr(kernels, "FAST_LAUNCH", False)
    jit = _FakeJit()
    config = kernels._LaunchConfig(jit, 3, {"A": 5, "B": 7}, num_warps=4)
    x = torch.zeros(64)
    for _ in range(3):
        kernels._launch(config, (1, 1, 1), (x, x, 64))
    assert [entry[0] for entry in jit.log] == ["jit"] * 3


def test_launch_config_for_an_unexpected_parameter_list_uses_the_generic_path(monkeypatch) -> None:
    monkeypatch.setattr(kernels, "FAST_LAUNCH", True)
    jit = _FakeJit()
    config = kernels._LaunchConfig(jit, 3, {"A": 5}, num_warps=4)  # B missing: never guess
    assert config.tail is None
    x = torch.zeros(64)
    kernels._launch(config, (1, 1, 1), (x, x, 64))
    kernels._launch(config, (1, 1, 1), (x, x, 64))
    assert [entry[0] for entry in jit.log] == ["jit", "jit"]


def test_real_kernels_parameter_lists_match_the_launch_configs() -> None:
    """The three kernels take their runtime arguments first and the constexprs after, as the
    configs built in kernels.py assume (n_runtime = 3, 5, 12)."""
    from mxptq.formats import _triton_mx

    fmt = Format(ELEMENT_FORMATS["int4"], 32)
    x = torch.randn(4, 64, device=DEVICE)
    kernels.fake_quantize_last_axis(x, fmt)  # flat
    kernels.fake_quantize_last_axis(torch.randn(4, 48, device=DEVICE), fmt)  # ragged rows
    kernels.rotated_fake_quantize(torch.randn(16, 64, device=DEVICE), fmt, hadamard.get_rotation(64))
    configs = kernels._format_entry(fmt).configs.values()
    kinds = {c.kernel for c in configs}
    assert kinds == {_triton_mx.mx_fake_quantize_flat_kernel, _triton_mx.mx_fake_quantize_kernel,
                     _triton_mx.mx_rotated_kernel}
    for config in configs:
        assert config.tail is not None, config.kernel


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_repeated_calls_stay_exact(dtype) -> None:
    """The second and later launches (the compiled-kernel path on CUDA) give the reference too,
    across sizes that share and that change the specialization."""
    fmt = Format(ELEMENT_FORMATS["int4"], 32)
    for rows in (3, 64, 3, 65, 64):
        x = (torch.randn(rows, 96, generator=torch.Generator().manual_seed(rows)) * 4).to(dtype)
        _assert_same(kernels.fake_quantize_last_axis(x.to(DEVICE), fmt).cpu(), quantize_reference(x, fmt), "rep")


# ---------------------------------------------------------------- the rotated kernels' MX math
# The Gluon Walsh and kron kernels quantize with `_fake_quantize_given_amax` in two forms:
# AT_QUANTUM (`_round_at_block_quantum`: rounding at the block's quantum without scaling; fp16,
# and bf16 with WIDE; OUT_IO: the result already rounded to the dtype) and LEAN (the general
# path, fp32). Gluon has no CPU interpreter, so that math is checked here on its own, through a
# plain Triton kernel that Triton's interpreter runs, against the reference on fp16 and bf16
# values.
if HAS_CUDA or os.environ.get("TRITON_INTERPRET") == "1":
    import triton
    import triton.language as tl

    from mxptq.formats import _triton_mx

    @triton.jit
    def _given_amax_kernel(x_ptr, y_ptr, BLOCK: tl.constexpr, GROUP: tl.constexpr, AT_QUANTUM: tl.constexpr,
                           LEAN: tl.constexpr, MODE: tl.constexpr, QMAX_LOG2: tl.constexpr,
                           QMAX_SIGNIFICAND: tl.constexpr, SHARED_OFFSET: tl.constexpr,
                           SHARED_MIN: tl.constexpr, SHARED_MAX: tl.constexpr, ZERO_SHARED: tl.constexpr,
                           CODE_SHIFT: tl.constexpr, IS_INT: tl.constexpr, CODE_MAX_POS: tl.constexpr,
                           CODE_MAX_NEG: tl.constexpr, ELEM_EMIN: tl.constexpr, ELEM_MAN_BITS: tl.constexpr,
                           ELEM_MAX: tl.constexpr, NONFINITE: tl.constexpr, OUT_IO: tl.constexpr = 0,
                           WIDE: tl.constexpr = False, CLAMPS: tl.constexpr = 3):
        offsets = tl.arange(0, GROUP)[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
        x = tl.load(x_ptr + offsets)
        # the Walsh kernel's block amax: a float max of |x| (all of a block is finite or none is)
        amax_bits = tl.max(tl.abs(x), axis=1).to(tl.int32, bitcast=True)[:, None]
        y = _triton_mx._fake_quantize_given_amax(x, amax_bits, MODE, QMAX_LOG2, QMAX_SIGNIFICAND, SHARED_OFFSET,
                                                 SHARED_MIN, SHARED_MAX, ZERO_SHARED, CODE_SHIFT, IS_INT,
                                                 CODE_MAX_POS, CODE_MAX_NEG, ELEM_EMIN, ELEM_MAN_BITS, ELEM_MAX,
                                                 AT_QUANTUM=AT_QUANTUM, LEAN=LEAN, OUT_IO=OUT_IO, WIDE=WIDE,
                                                 CLAMPS=CLAMPS)
        tl.store(y_ptr + offsets, y)


def _dtype_blocks(block: int, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """Values of dtype as fp32 blocks (what the Walsh kernel quantizes): every scale from
    subnormal to the dtype's max, exact grid ties, negative zeros and values that round to -0.0,
    random finite bit patterns, an all-zero block and one NaN and one Inf block (a non-finite
    block is all non-finite there)."""
    rows = _hard_rows(8 * block, dtype, seed=5).float().reshape(-1, block)
    rows = rows[~(rows.isinf().any(1) | rows.isnan().any(1))]
    gen = torch.Generator().manual_seed(7)
    finite_limit = 0x7C00 if dtype == torch.float16 else 0x7F80
    patterns = torch.randint(0, finite_limit, (64, block), generator=gen, dtype=torch.int32)
    patterns |= torch.randint(0, 2, (64, block), generator=gen, dtype=torch.int32) << 15
    random = patterns.to(torch.int16).view(dtype).float()
    small = torch.full((1, block), -0.25)
    small[0, 0] = 1024.0  # the rest rounds to -0.0
    nonfinite = torch.stack([torch.full((block,), float("nan")), torch.full((block,), float("-inf"))])
    nonfinite[1, ::2] = float("inf")
    blocks = torch.cat([rows, random, small, torch.zeros(1, block), nonfinite])
    pad = (-blocks.shape[0]) % 8
    return torch.cat([blocks, torch.zeros(pad, block)]).contiguous()


@pytest.mark.parametrize("fmt", ALL_FORMATS, ids=_ids)
@pytest.mark.parametrize("at_quantum", [False, True], ids=["lean", "at-quantum"])
def test_walsh_kernels_fp16_quantizer_equals_the_reference_bit_for_bit(fmt: Format, at_quantum: bool) -> None:
    """At the block quantum with the clamp bounds the dispatch keeps for fp16 (`_int_clamps`)."""
    x = _dtype_blocks(32).to(DEVICE)
    y = _given_amax(x, fmt, at_quantum=at_quantum, clamps=kernels._int_clamps(fmt, torch.float16))
    ref = quantize_reference(x, fmt)
    _assert_same(y, ref, f"{_ids(fmt)} at_quantum={at_quantum}")
    same_sign = torch.signbit(y) == torch.signbit(ref)
    assert bool((same_sign | ref.isnan()).all()), "a zero's sign differs from the reference"


def _given_amax(x: torch.Tensor, fmt: Format, at_quantum: bool, out_io: int = 0, wide: bool = False,
                clamps: int = 3) -> torch.Tensor:
    """The rotated kernels' quantizer on x's blocks: AT_QUANTUM (with OUT_IO, WIDE, CLAMPS), or
    else the LEAN general path."""
    y = torch.empty_like(x)
    for start in range(0, x.shape[0], 8):
        _given_amax_kernel[(1,)](x[start:start + 8], y[start:start + 8], BLOCK=32, GROUP=8,
                                 AT_QUANTUM=at_quantum, LEAN=True, OUT_IO=out_io, WIDE=wide, CLAMPS=clamps,
                                 **kernels._format_entry(fmt).constexprs)
    return y


@pytest.mark.parametrize("fmt", ALL_FORMATS, ids=_ids)
def test_walsh_kernels_fp16_out_equals_the_reference_rounded_to_fp16(fmt: Format) -> None:
    """OUT_IO = fp16 (the rotated kernels on fp16 tiles, where kernels._fp16_q_stays_finite allows):
    with the block's bounds rounded to fp16 instead of each result, the quantizer gives exactly
    the reference's Q(x).to(float16) on fp16 blocks of every scale, zero signs included. Where it
    is not allowed, some fp16 block really does quantize past 65504 (to inf in fp16)."""
    x = _dtype_blocks(32).to(DEVICE)
    ref = quantize_reference(x, fmt)
    if not kernels._fp16_q_stays_finite(fmt):
        # blocks of one repeated fp16 value, each of them: one quantizes past +-65504
        magnitudes = torch.arange(1, 0x7C00, dtype=torch.int16).view(torch.float16).float()
        blocks = torch.cat([magnitudes, -magnitudes])[:, None].expand(-1, fmt.block_size)
        assert float(quantize_reference(blocks, fmt).abs().max()) > 65504.0
        return
    y = _given_amax(x, fmt, at_quantum=True, out_io=_triton_mx.IO_FP16, clamps=kernels._int_clamps(fmt, torch.float16))
    expected = ref.to(torch.float16).float()
    _assert_same(y, expected, f"{_ids(fmt)} OUT_IO fp16")
    assert bool(((torch.signbit(y) == torch.signbit(expected)) | expected.isnan()).all())


def test_fp16_q_stays_finite_against_hand_computed_tops() -> None:
    """int4 under the tutorial rule: a block of amax 65504 gets the element quantum 2^13
    (codes -8..7 of 1.2 fixed point, scale 2^floor(log2 65504) = 2^15), so -65504 / 2^13 =
    -7.996 rounds to code -8, Q = -65536, past fp16's range (inf there); +65504 saturates at
    7 * 2^13 = 57344. The OCP minifloat rule takes 2^(floor(log2 65504) - emax) and saturates on
    both sides: e2m1 6 * 2^13 = 49152, e4m3 448 * 2^7 = 57344."""
    int4, e2m1, e4m3 = (Format(ELEMENT_FORMATS[name], 32) for name in ("int4", "e2m1", "e4m3"))
    top = torch.zeros(1, 32)
    top[0, 0], top[0, 1] = 65504.0, -65504.0
    assert quantize_reference(top, int4)[0, :2].tolist() == [57344.0, -65536.0]
    assert quantize_reference(top, e2m1)[0, :2].tolist() == [49152.0, -49152.0]
    assert quantize_reference(top, e4m3)[0, :2].tolist() == [57344.0, -57344.0]
    assert not kernels._fp16_q_stays_finite(int4)
    assert kernels._fp16_q_stays_finite(e2m1) and kernels._fp16_q_stays_finite(e4m3)
    # int4's smallest overflowing value: -61440 / 2^13 = -7.5 rounds half to even to -8
    assert quantize_reference(torch.tensor([[61440.0, -61440.0], [61408.0, -61408.0]]), replace(int4, block_size=2))[
        :, 1].tolist() == [-65536.0, -57344.0]
    # a block of one element: only -65504 overflows, and the check still sees it
    single = Format(ELEMENT_FORMATS["int4"], 1)
    assert quantize_reference(torch.tensor([[65504.0, -65504.0]]).T, single)[:, 0].tolist() == [57344.0, -65536.0]
    assert not kernels._fp16_q_stays_finite(single)


def test_int_clamps_follow_the_scale_rules() -> None:
    """Which integer clamp bounds can bind (kernels._int_clamps: bit 0 lower, bit 1 upper), from
    the rules' definitions (spec.ScaleRule): the tutorial rule's codes stay within +-2^(b-1) of a
    block amax below 2^e, so only the upper bound (2^(b-1) - 1) binds; the symmetric rule picks
    the smallest scale that holds amax, so neither binds, except in bf16, whose largest values
    need a scale above the E8M0 maximum 2^127; the OCP rule (floor(log2 amax) - emax) overshoots
    both symmetric bounds. Minifloats keep both (their bounds make NaN blocks NaN)."""
    fp16, bf16 = torch.float16, torch.bfloat16
    for bits in (2, 3, 4, 8):
        tutorial, symmetric, ocp = (Format(ELEMENT_FORMATS[f"int{bits}"], 32, rule)
                                    for rule in (ScaleRule.TUTORIAL, ScaleRule.SYMMETRIC, ScaleRule.OCP))
        assert [kernels._int_clamps(tutorial, dtype) for dtype in (fp16, bf16)] == [2, 2], bits
        assert [kernels._int_clamps(symmetric, dtype) for dtype in (fp16, bf16)] == [0, 3], bits
        assert [kernels._int_clamps(ocp, dtype) for dtype in (fp16, bf16)] == [3, 3], bits
    for name in ("e2m1", "e4m3"):
        assert kernels._int_clamps(Format(ELEMENT_FORMATS[name], 32), fp16) == 3
    assert kernels._int_clamps(Format(ELEMENT_FORMATS["int4"], 32), torch.float32) == 3
    # the bf16 exception: int4's symmetric top is 7/4 * 2^127 < bf16's largest value, so a block
    # holding that value clips on both sides
    top = torch.finfo(torch.bfloat16).max
    q = quantize_reference(torch.tensor([[top, -top]]), Format(ELEMENT_FORMATS["int4"], 2, ScaleRule.SYMMETRIC))
    assert q[0].tolist() == [1.75 * 2.0**127, -1.75 * 2.0**127]


@pytest.mark.parametrize("fmt", ALL_FORMATS, ids=_ids)
def test_walsh_kernels_bf16_quantizer_is_exact_at_every_scale(fmt: Format) -> None:
    """WIDE (the rotated kernels on bf16 tiles): rounding straight at the block quantum, with
    blocks beyond fp32's normal range (c above 88 or below -100) rounded at a 2^-+64 scale and
    scaled back, equals the reference on bf16 blocks of every scale, fp32 subnormals included;
    with OUT_IO = bf16 (its bounds rounded to bf16) it equals the reference rounded to bf16."""
    # plus blocks of bf16 subnormals (amax 2^-133 .. 2^-127: code exponents down to the lowest)
    gen = torch.Generator().manual_seed(11)
    tiny = torch.randint(-127, 128, (16, 32), generator=gen, dtype=torch.int32).float() * 2.0**-133
    tiny[torch.arange(16), torch.arange(16)] = 2.0**-133 * torch.tensor([1, 2, 3, 127] * 4).float()
    tiny = tiny / torch.logspace(0, 6, 16, base=2.0)[:, None].round()  # smaller amax per row
    tiny = tiny.to(torch.bfloat16).float()
    x = torch.cat([_dtype_blocks(32, torch.bfloat16), tiny]).to(DEVICE)
    amax = x.abs().amax(dim=1)
    assert bool((amax > 2.0**110).any()) and bool(((amax < 2.0**-110) & (amax > 0)).any()), \
        "the data should hold blocks on both sides of the scaled range"
    assert bool(((amax < 2.0**-127) & (amax > 0)).any()), "and blocks of bf16 subnormals"
    ref = quantize_reference(x, fmt)
    clamps = kernels._int_clamps(fmt, torch.bfloat16)
    y = _given_amax(x, fmt, at_quantum=True, wide=True, clamps=clamps)
    _assert_same(y, ref, f"{_ids(fmt)} WIDE")
    assert bool(((torch.signbit(y) == torch.signbit(ref)) | ref.isnan()).all())
    y = _given_amax(x, fmt, at_quantum=True, out_io=_triton_mx.IO_BF16_NATIVE, wide=True, clamps=clamps)
    expected = ref.to(torch.bfloat16).float()
    _assert_same(y, expected, f"{_ids(fmt)} WIDE, OUT_IO bf16")
    assert bool(((torch.signbit(y) == torch.signbit(expected)) | expected.isnan()).all())
