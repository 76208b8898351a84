"""The kron-rotated MX kernel with A on the tensor cores (`_gluon_kron_tc`), R = s (A kron H_P),
A of order 36.

Independent expectations:
- the plan (CPU): the kernel's data flow replayed in float64 torch from the plan's own
  regroupings and matrices (`_replay_forward`, `_replay_inverse`: torch's reshape and permute
  have Gluon's row-major meaning; the MMAs as matmuls; H_P as butterflies along the m bits the
  plan names) must equal the rotation's forward and inverse maps, `mxptq.nn.hadamard`;
- the MMA fragment layout (CPU): the PTX ISA's m16n8k16 accumulator puts row groupID =
  laneid >> 2 (m bits 0-2 on lane bits 2-4) and row + 8 in a register, so the butterfly bits
  the plan runs in registers / by shuffle must be those;
- MX blocks (CPU): the quantizer's regrouping must gather exactly the aligned runs of BLOCK
  consecutive row elements;
- the kernel (CUDA only; the device tool): the reference path, to the tolerance of a rotation
  that is not bit-exact (test_kron_kernel.py's check), and the dispatch must have chosen it.
"""

from __future__ import annotations

import re

import pytest
import torch

pytest.importorskip("triton")
tc = pytest.importorskip("mxptq.formats._gluon_kron_tc", exc_type=ImportError)

from rotated_cases import FORMATS, reference, sample_rows
from test_kron_kernel import _assert_close_to_reference

from mxptq.formats import ELEMENT_FORMATS, Format, ScaleRule, kernels, quantize_reference
from mxptq.nn import hadamard

HAS_CUDA = torch.cuda.is_available()
TC_SIZES = [576, 1152, 2304]  # H_36 x H_16, H_36 x H_32, H_36 x H_64


def _regroup(t: torch.Tensor, split, order, shape) -> torch.Tensor:
    return t.reshape(split).permute(order).reshape(shape)


def _lane_m_bits(plan: dict) -> list[int]:
    """m bits the plan runs by warp shuffle: lane mask 1 << (2 + m bit) (`lane_butterfly_asm`)."""
    masks = [int(m) for m in re.findall(r"shfl\.sync\.bfly\.b32 p, v, (\d+),", plan["LANE_ASM"])]
    return [mask.bit_length() - 1 - 2 for mask in masks]


def _butterflies(c: torch.Tensor, plan: dict) -> torch.Tensor:
    """H_P (unnormalized) along the m bits the plan names: REG_H's, then the lane bits."""
    mt, nc = c.shape
    for h in [*plan["REG_H"], *(1 << b for b in _lane_m_bits(plan))]:
        y = c.reshape(mt // (2 * h), 2, h, nc)
        c = torch.stack((y[:, 0] + y[:, 1], y[:, 0] - y[:, 1]), 1).reshape(mt, nc)
    return c


def _setup(n: int, num_warps: int, block: int = 32):
    rotation = hadamard.get_rotation(n, block_size=32)
    kron = kernels._build_kron_plan(rotation)
    assert kron is not None and kron.k == tc.TC_K
    plan = tc.kron_tc_plan(kron.log_p, num_warps, block)
    forward, inverse = (torch.tensor(m, dtype=torch.float64)
                        for m in tc.kron_tc_matrices(kron.forward_matrix, kron.inverse_matrix))
    return rotation, kron, plan, forward, inverse


def _replay_forward(x: torch.Tensor, kron, plan: dict, forward: torch.Tensor):
    """The kernel's accumulators after H_P, [MT, 32] and [MT, 8], from a tile of rows x."""
    rows, p, mt, k = plan["ROWS"], plan["P"], plan["MT"], kron.k
    tile = x.reshape(rows, k, p)
    chunk2 = torch.zeros(rows, 16, p, dtype=x.dtype)
    chunk2[:, : k - 32] = tile[:, 32:]
    a1 = _regroup(tile[:, :32], plan["SPLIT1"], plan["ORDER1"], (mt, 32))
    a2 = _regroup(chunk2, plan["SPLIT2"], plan["ORDER2"], (mt, 16))
    c1 = a1 @ forward[:32, :32] + a2 @ forward[32:, :32]
    c2 = a1 @ forward[:32, 32:] + a2 @ forward[32:, 32:]
    return _butterflies(c1, plan), _butterflies(c2, plan)


def _as_rows(c1: torch.Tensor, c2: torch.Tensor, kron, plan: dict) -> torch.Tensor:
    rows, p = plan["ROWS"], plan["P"]
    o1 = _regroup(c1, plan["OUT_SPLIT1"], plan["OUT_ORDER1"], (rows, 32, p))
    o2 = _regroup(c2, plan["OUT_SPLIT2"], plan["OUT_ORDER2"], (rows, 8, p))
    return torch.cat([o1, o2[:, : kron.k - 32]], 1).reshape(rows, -1)


def _replay_inverse(q1: torch.Tensor, q2: torch.Tensor, plan: dict, inverse: torch.Tensor):
    """The inverse half from Q's accumulator-shaped output: q2 joined with zeros and regrouped
    by the kernel's JOIN_ORDER, the MMAs, H_P."""
    mt = plan["MT"]
    q2 = torch.stack((q2, torch.zeros_like(q2)), -1).reshape(mt, 2, 2, 2, 2).permute(tc.JOIN_ORDER.value).reshape(mt, 16)
    y1 = q1 @ inverse[:32, :32] + q2 @ inverse[32:, :32]
    y2 = q1 @ inverse[:32, 32:] + q2 @ inverse[32:, 32:]
    return _butterflies(y1, plan), _butterflies(y2, plan)


@pytest.mark.parametrize("n", TC_SIZES)
@pytest.mark.parametrize("num_warps", [1, 2, 4])
def test_replayed_plan_is_the_rotations_forward_and_inverse_map(n, num_warps) -> None:
    rotation, kron, plan, forward, inverse = _setup(n, num_warps)
    x = torch.randn(plan["ROWS"], n, dtype=torch.float64, generator=torch.Generator().manual_seed(n + num_warps))
    c1, c2 = _replay_forward(x, kron, plan, forward)
    assert bool((c2[:, kron.k - 32:] == 0).all()), "the padded output columns must be exactly zero"
    torch.testing.assert_close(_as_rows(c1, c2, kron, plan) * kron.scale, rotation.forward(x))
    # the inverse half, fed R x in the accumulator's shape (as Q's output would be)
    y1, y2 = _replay_inverse(c1 * kron.scale, c2 * kron.scale, plan, inverse)
    torch.testing.assert_close(_as_rows(y1, y2, kron, plan) * kron.scale, x)
    torch.testing.assert_close(_as_rows(y1, y2, kron, plan) * kron.scale,
                               rotation.inverse(rotation.forward(x)))


@pytest.mark.parametrize("n", TC_SIZES)
@pytest.mark.parametrize("num_warps", [1, 2, 4])
def test_butterflies_run_on_the_fragments_register_and_lane_bits_of_p(n, num_warps) -> None:
    """Which m bits are p bits, read off the regrouping of element offsets; those must be the
    plan's butterfly bits, in registers (m bit 3 and above the warp bits) or on lanes (0-2)."""
    _rotation, kron, plan, _forward, _inverse = _setup(n, num_warps)
    rows, p, mt = plan["ROWS"], plan["P"], plan["MT"]
    offsets = torch.arange(rows * 32 * p).reshape(rows, 32, p)
    as_mk = _regroup(offsets, plan["SPLIT1"], plan["ORDER1"], (mt, 32))
    m_bits = mt.bit_length() - 1
    p_bits = {b for b in range(m_bits) if int(as_mk[1 << b, 0]) < p}  # m bit b moves within a slice
    assert len(p_bits) == kron.log_p
    warp_bits = set(range(4, 4 + num_warps.bit_length() - 1))
    register_bits = {b.bit_length() - 1 for b in plan["REG_H"]}
    lane_bits = set(_lane_m_bits(plan))
    assert register_bits | lane_bits == p_bits and not register_bits & lane_bits
    assert lane_bits <= {0, 1, 2} and not register_bits & ({0, 1, 2} | warp_bits)
    assert len(lane_bits) == kron.log_p - 3  # one shuffle level per direction at P = 16


@pytest.mark.parametrize("n,block", [(576, 32), (576, 16), (576, 64), (576, 2), (1152, 32), (1152, 128),
                                     (2304, 16), (2304, 256)])
def test_quantizer_blocks_are_aligned_runs_of_row_elements(n, block) -> None:
    _rotation, kron, plan, _forward, _inverse = _setup(n, 2, block)
    rows, p, mt = plan["ROWS"], plan["P"], plan["MT"]
    row_bits = rows.bit_length() - 1
    for chunk, nc, first in ((1, 32, 0), (2, 8, 32)):
        # each element's index in its row (j * P + p, offset by row * 64 P), in the [m, j] shape
        # the kernel's [m, k] regrouping gives a [rows, nc, P] tile (its k axis read as j)
        element = (torch.arange(nc)[:, None] + first) * p + torch.arange(p)[None, :]
        index = torch.arange(rows)[:, None, None] * (64 * p) + element
        split = (2,) * row_bits + (nc,) + (2,) * kron.log_p
        as_mk = _regroup(index, split, plan["ORDER1"], (mt, nc))
        blocks = _regroup(as_mk, plan[f"QSPLIT{chunk}"], plan[f"QORDER{chunk}"], (mt * nc // block, block))
        ordered = blocks.sort(dim=1).values
        assert bool((ordered[:, 0] % block == 0).all())
        assert bool((ordered - ordered[:, :1] == torch.arange(block)).all())
        back = _regroup(blocks, plan[f"QSHAPE{chunk}"], plan[f"QBACK{chunk}"], (mt, nc))
        assert torch.equal(back, as_mk)


def test_plan_and_matrices_reject_what_the_kernel_cannot_hold() -> None:
    for log_p, warps, block in ((3, 2, 32), (7, 2, 32), (4, 3, 32), (4, 2, 24), (4, 2, 128)):
        with pytest.raises(ValueError, match="kron_tc_plan"):
            tc.kron_tc_plan(log_p, warps, block)
    with pytest.raises(ValueError, match="kron_tc_matrices"):
        tc.kron_tc_matrices([[1] * 12] * 12, [[1] * 12] * 12)


def test_dispatch_takes_order_36_in_16_bit_dtypes_with_blocks_of_up_to_four_slices() -> None:
    k576 = kernels._build_kron_plan(hadamard.get_rotation(576, block_size=32))
    k1536 = kernels._build_kron_plan(hadamard.get_rotation(1536, block_size=32))
    applies = kernels._kron_tc_applies
    assert applies(torch.float16, k576, 32) and applies(torch.bfloat16, k576, 16) and applies(torch.float16, k576, 2)
    assert not applies(torch.float32, k576, 32)  # fp32 rows are not exact MMA inputs
    assert applies(torch.float16, k576, 64) and applies(torch.bfloat16, k576, 64)  # four slices (two-step amax)
    assert not applies(torch.float16, k576, 128)  # a block over 8 slices would span both column chunks
    assert not applies(torch.float16, k1536, 32)  # H_12: the CUDA-core kron kernel


class _FakeCuda:
    """Stands in for a CUDA tensor in the dispatch tests: device, dtype, is_cuda."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype, self.device, self.is_cuda = dtype, torch.device("cuda", 0), True


def test_a_failed_tensor_core_launch_leaves_the_cuda_core_kron_kernel_in_service(monkeypatch) -> None:
    """The tensor-core kernel's failures have their own key: after one, the CUDA-core kron
    kernel (not the MMA kernel) serves those rows, and the warning says so."""
    kron = kernels._build_kron_plan(hadamard.get_rotation(576, block_size=32))
    fmt = FORMATS[0]
    entry = kernels._format_entry(fmt)
    served = []
    monkeypatch.setattr(kernels, "_has_ampere_mma", lambda device: True)
    monkeypatch.setattr(kernels, "_KRON_TC_OPERANDS", {(kron, torch.device("cuda", 0), torch.float16): ()})

    def fake_gluon_rotated(kernel, what, x, n, scale, rows_per_tile, entry, variant, constexprs, setting,
                           failure_key, operands=()):
        served.append(what)
        if what == "tensor-core kron":  # as `_launch_gluon` records a failed launch
            kernels.GLUON_FAILURES[failure_key] = "boom"
            return None
        return "served"

    monkeypatch.setattr(kernels, "_gluon_rotated", fake_gluon_rotated)
    x = _FakeCuda(torch.float16)
    assert kernels._kron_rotated(x, entry, fmt, kron) == "served"
    assert served == ["tensor-core kron", "kron"]
    assert list(kernels.GLUON_FAILURES) == [(x.device, 576, torch.float16, "kron-tc")]
    served.clear()
    assert kernels._kron_rotated(x, entry, fmt, kron) == "served"  # the failure is remembered
    assert served == ["kron"]


def test_tensor_core_kron_kernel_declines_old_gpus_bad_settings_and_capture(monkeypatch) -> None:
    kron = kernels._build_kron_plan(hadamard.get_rotation(576, block_size=32))
    entry = kernels._format_entry(FORMATS[0])
    x = _FakeCuda(torch.bfloat16)
    monkeypatch.setattr(kernels, "_gluon_rotated", lambda *args, **kwargs: "launched")
    monkeypatch.setattr(kernels, "_has_ampere_mma", lambda device: False)  # before sm_80
    assert kernels._kron_tc_rotated(x, entry, kron, 32) is None
    monkeypatch.setattr(kernels, "_has_ampere_mma", lambda device: True)
    monkeypatch.setattr(kernels, "_KRON_TC_OPERANDS", {})
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)  # matrices not on the GPU yet
    assert kernels._kron_tc_rotated(x, entry, kron, 32) is None
    monkeypatch.setattr(kernels, "_KRON_TC_OPERANDS", {(kron, x.device, x.dtype): ()})
    assert kernels._kron_tc_rotated(x, entry, kron, 32) == "launched"
    monkeypatch.setattr(kernels, "KRON_TC_SETTING", (3, 4, 0, 3))  # 3 warps: no plan
    kernels._kron_tc_tile.cache_clear()
    assert kernels._kron_tc_rotated(x, entry, kron, 32) is None
    monkeypatch.setattr(kernels, "KRON_TC_SETTING", (2, 4, 0, 1))  # a ring of one stage
    with pytest.raises(ValueError, match="at least 2"):
        kernels._kron_tc_rotated(x, entry, kron, 32)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("n", TC_SIZES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f"{f.element.name}-{f.scale_rule.value}")
def test_tc_kernel_matches_the_reference(n, dtype, fmt) -> None:
    """bf16 MXINT8 is checked against the rotations computed in float64 (each result rounded to
    bf16 once, where the reference rounds) instead: on the H100 all three kron kernels gave the
    same bits there, 5.8 % of the quantization error away from the reference, just past the
    5 % the check allows; against that float64 pipeline the reference's fp32 inverse is the
    less exact one (benchmarks/h100/kron_tc_sweep.md)."""
    kernels.clear_caches()
    rotation = hadamard.get_rotation(n, block_size=32)
    for rows in (37, 64):  # a ragged last tile and whole tiles
        x = sample_rows(rows, n, dtype, seed=n + rows)
        got = kernels.rotated_fake_quantize(x, fmt, rotation)
        if dtype == torch.bfloat16 and fmt.element.name == "int8":
            expected = _float64_pipeline(x, fmt, rotation)
        else:
            expected = reference(x, fmt, rotation)
        _assert_close_to_reference(got, expected, x, f"n={n} rows={rows}", rotation)
    assert not kernels.GLUON_FAILURES
    assert kernels._gluon_compiled(fmt, "kron-tc", n, dtype), "the tensor-core kron kernel did not run"


def _float64_pipeline(x: torch.Tensor, fmt, rotation) -> torch.Tensor:
    """R^T Q(R x) with both rotations in float64, R x and the result rounded to x's dtype."""
    rotated = rotation.forward(x.double()).to(x.dtype)
    return rotation.inverse(quantize_reference(rotated, fmt).double()).to(x.dtype)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("n,block_size", [(576, 16), (576, 8), (1152, 16), (1152, 64), (2304, 128),
                                          (576, 64), (1152, 128)])
def test_tc_kernel_blocks_within_and_across_slices(n, block_size) -> None:
    """Blocks inside a slice (lanes and registers of p), over two slices (plus the accumulator's
    column register bit) and over four (576 / 64, 1152 / 128: the two-step amax)."""
    fmt = Format(ELEMENT_FORMATS["e2m1"], block_size, ScaleRule.OCP)
    rotation = hadamard.get_rotation(n, block_size=32)
    x = sample_rows(40, n, torch.bfloat16, seed=block_size)
    _assert_close_to_reference(kernels.rotated_fake_quantize(x, fmt, rotation), reference(x, fmt, rotation), x,
                               f"block {block_size}", rotation)
    assert not kernels.GLUON_FAILURES
    assert kernels._gluon_compiled(fmt, "kron-tc", n, torch.bfloat16), "the tensor-core kron kernel did not run"


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_tc_kernel_nonfinite_rows_become_nan_as_in_the_reference() -> None:
    fmt = FORMATS[0]
    rotation = hadamard.get_rotation(576, block_size=32)
    x = sample_rows(16, 576, torch.float16, seed=9)
    x[2, 17] = float("nan")
    x[5, 570] = float("inf")  # in the last chunk's slices
    got = kernels.rotated_fake_quantize(x, fmt, rotation)
    ref = reference(x, fmt, rotation)
    assert not kernels.GLUON_FAILURES and kernels._gluon_compiled(fmt, "kron-tc", 576, torch.float16)
    assert all(bool(out[row].isnan().all()) for out in (got, ref) for row in (2, 5))
    keep = [r for r in range(16) if r not in (2, 5)]
    assert not bool(got[keep].isnan().any())
    _assert_close_to_reference(got[keep], ref[keep], x[keep], "finite rows", rotation)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_tc_kernel_one_program_loops_over_every_tile(monkeypatch) -> None:
    """One program: the copy ring wraps around many times, the last tile ragged."""
    monkeypatch.setattr(kernels, "_sm_count", lambda device: 1)
    monkeypatch.setattr(kernels, "KRON_TC_SETTING", (2, 1, 0, 3))
    kernels.clear_caches()
    try:
        fmt = FORMATS[3]
        rotation = hadamard.get_rotation(576, block_size=32)
        for rows in (45, 45, 46, 3):
            x = sample_rows(rows, 576, torch.float16, seed=rows)
            _assert_close_to_reference(kernels.rotated_fake_quantize(x, fmt, rotation),
                                       reference(x, fmt, rotation), x, f"rows={rows}", rotation)
        assert not kernels.GLUON_FAILURES
    finally:
        kernels.clear_caches()
