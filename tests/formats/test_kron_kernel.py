"""The Gluon kron-rotated MX kernel (`_gluon_mx.mx_kron_rotated_kernel`), R = s (A kron H_P).

Independent expectations:
- the factorization and the mixing code (CPU): the kernel's algorithm, replayed in float64 torch
  from the plan's constants (`_replay` below: the butterflies of `mxptq.nn.hadamard.fwht` on
  each slice, then `_gluon_mx._mix`'s pair or quad sums term by term), must equal the rotation's own
  forward and inverse maps;
- the layout plan (CPU): every butterfly level runs while its bit is a register bit, or, with
  lane levels, by one warp shuffle per lane bit of the IO layout;
- the kernel (CUDA only; the device tool): the reference path
  `rotation.inverse(quantize_reference(rotation.forward(x)))` up to the documented tolerance of
  a rotation that is not bit-exact (kernels.py docstring: R x agrees to fp32 rounding, so rare
  elements flip to the neighbouring grid point).
"""

from __future__ import annotations

import re

import pytest
import torch

pytest.importorskip("triton")
gluon_mx = pytest.importorskip("mxptq.formats._gluon_mx", exc_type=ImportError)

from rotated_cases import FORMATS, reference, sample_rows

from mxptq.formats import ELEMENT_FORMATS, Format, ScaleRule, kernels
from mxptq.nn import hadamard

HAS_CUDA = torch.cuda.is_available()
# H_36 x H_16, H_12 x H_128, H_12 x H_8, H_20 x H_128, H_12 x H_256, H_36 x H_32 (lane levels only),
# H_36 x H_64 (lane levels on all five lane bits), H_12 x H_512 (a slice over several warps: staged)
KRON_SIZES = [576, 1536, 96, 2560, 3072, 1152, 2304, 6144]


def _combinations(xs: list, group: int) -> list:
    """`_gluon_mx._mix`'s signed combinations of each column group, in its order."""
    combos = []
    for i in range(0, len(xs), group):
        s1, d1 = xs[i] + xs[i + 1], xs[i] - xs[i + 1]
        if group == 2:
            combos += [s1, d1]
        else:
            s2, d2 = xs[i + 2] + xs[i + 3], xs[i + 2] - xs[i + 3]
            combos += [s1 + s2, s1 - s2, s1 + d2, s1 - d2, d1 + s2, d1 - s2, d1 + d2, d1 - d2]
    return combos


def _mixed(xs: list, group: int, terms, flip) -> list:
    """Rows of A x from the codes of `kron_mix`, term by term as the kernel adds them."""
    combos, per_row = _combinations(xs, group), len(xs) // group
    rows = []
    for j in range(len(xs)):
        acc = combos[terms[j * per_row] >> 1]
        for code in terms[j * per_row + 1:(j + 1) * per_row]:
            acc = acc - combos[code >> 1] if code & 1 else acc + combos[code >> 1]
        rows.append(-acc if flip[j] else acc)
    return rows


def _replay(x: torch.Tensor, plan, terms, flip) -> torch.Tensor:
    """The kernel's transform in float64: butterflies on every slice, then the grouped mix."""
    k, p = plan.k, 1 << plan.log_p
    slices = hadamard.fwht(x.reshape(-1, k, p), normalize=False)
    out = _mixed([slices[:, i] for i in range(k)], plan.mix_group, terms, flip)
    return torch.stack(out, 1).reshape(x.shape) * plan.scale


@pytest.mark.parametrize("n", KRON_SIZES)
def test_kron_plan_replays_the_rotations_forward_and_inverse_maps(n) -> None:
    rotation = hadamard.get_rotation(n, block_size=32)
    plan = kernels._build_kron_plan(rotation)
    assert plan is not None and plan.k == rotation.k and 1 << plan.log_p == rotation.pow2
    x = torch.randn(5, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    torch.testing.assert_close(_replay(x, plan, plan.forward_terms, plan.forward_flip), rotation.forward(x))
    torch.testing.assert_close(_replay(x, plan, plan.inverse_terms, plan.inverse_flip), rotation.inverse(x))


@pytest.mark.parametrize("group", [2, 4])
def test_kron_mix_codes_rows_without_a_positive_term_as_flipped(group) -> None:
    """-H_12 has rows whose every term is negative; the code must sum those positively and
    flip the row, and still give -H_12 x."""
    h = torch.from_numpy(hadamard.hadamard_k(12)).long()
    per_row = 12 // group
    for matrix in (h, -h):
        terms, flip = gluon_mx.kron_mix(matrix.tolist(), group)
        assert all(terms[j * per_row] & 1 == 0 for j in range(12)), "each row starts with a positive term"
        x = torch.randn(3, 12, 4, dtype=torch.float64)
        rows = _mixed([x[:, i] for i in range(12)], group, terms, flip)
        torch.testing.assert_close(torch.stack(rows, 1), torch.einsum("jk,bkp->bjp", matrix.double(), x))
    assert any(gluon_mx.kron_mix((-h).tolist(), group)[1])


def test_kron_mix_codes_every_sign_pattern_of_a_quad() -> None:
    """Two 8 x 8 matrices whose rows put each of a quad's 16 sign patterns in both quads
    (rows with both quads led by -1 are flipped)."""
    patterns = [[1 - 2 * (v >> b & 1) for b in range(4)] for v in range(16)]
    x = torch.randn(2, 8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    for matrix in ([patterns[v] + patterns[v + 8] for v in range(8)], [patterns[v + 8] + patterns[v] for v in range(8)]):
        terms, flip = gluon_mx.kron_mix(matrix, 4)
        assert list(flip) == [v & 1 for v in range(8)], "flipped: the rows whose both quads lead with -1"
        out = _mixed([x[:, i] for i in range(8)], 4, terms, flip)
        torch.testing.assert_close(torch.stack(out, 1), torch.einsum("jk,bkp->bjp", torch.tensor(matrix).double(), x))


def test_kron_mix_rejects_what_it_cannot_code() -> None:
    with pytest.raises(ValueError, match="square"):
        gluon_mx.kron_mix([[1, 1, 1], [1, -1, 1], [1, 1, -1]], 2)  # odd order
    with pytest.raises(ValueError, match="multiple of 4"):
        gluon_mx.kron_mix(torch.ones(6, 6, dtype=torch.long).tolist(), 4)
    with pytest.raises(ValueError, match="pairs or quads"):
        gluon_mx.kron_mix(torch.ones(6, 6, dtype=torch.long).tolist(), 3)


def test_a_settings_entry_of_the_wrong_length_raises(monkeypatch) -> None:
    """A KRON_CONFIGS entry without its lane-level field is an error, not a silent fallback to
    the MMA kernel (the plan check catches only layout errors)."""
    monkeypatch.setitem(kernels.KRON_CONFIGS, (torch.float16, 576), (8, 4, 128))
    with pytest.raises(ValueError, match="lane levels"):
        kernels._build_kron_plan(hadamard.get_rotation(576, block_size=32))


def test_only_kron_rotations_the_kernel_can_hold_qualify() -> None:
    assert kernels._build_kron_plan(hadamard.get_rotation(2048)) is None  # Walsh: K a power of two
    assert kernels._build_kron_plan(hadamard.get_rotation(4608)) is None  # H_36 x H_128: too many stages
    assert kernels._build_kron_plan(hadamard.get_rotation(11008)) is None  # K = 172: too many values
    assert kernels._build_kron_plan(hadamard.KeyAxisRotation(32)) is None  # no fixed size


@pytest.mark.parametrize("num_warps", [4, 8])
@pytest.mark.parametrize("log_p,register_bits", [(7, 3), (8, 3), (3, 3), (4, 1), (7, 2)])
def test_kron_plan_runs_every_level_in_registers(log_p, register_bits, num_warps) -> None:
    plan = gluon_mx.kron_plan(log_p, num_warps, register_bits)
    io = plan["SLICE_LAYOUT"]
    assert [b[0].bit_length() - 1 for b in io.reg_bases] == list(range(register_bits)), "IO: consecutive elements"
    assert plan["VECTOR"] == 1 << register_bits
    levels = []
    for regs, first, end, lanes in gluon_mx.stage_register_bits(plan, first=2):
        assert first < end and all(b in regs for b in range(first, end)) and not lanes, "a level off registers"
        levels.extend(range(first, end))
    assert sorted(levels) == list(range(2, log_p + 2)), "bits 0-1 are the slice within a group of four"
    assert all(b in regs for regs, _, _, _ in gluon_mx.stage_register_bits(plan, first=2) for b in (0, 1))
    # a slice tile has warps x 32 lanes x 2^register_bits elements: that many / 2^log_p rows
    assert kernels._kron_tile(log_p, num_warps, register_bits)[1] == (num_warps * 32 << register_bits) >> log_p


@pytest.mark.parametrize("num_warps", [4, 8])
@pytest.mark.parametrize("log_p,register_bits", [(7, 3), (4, 1), (3, 3), (7, 2)])
def test_kron_lane_plan_runs_the_register_levels_then_each_lane_bit_once(log_p, register_bits, num_warps) -> None:
    """Lane levels: one stage (the IO layout) for the slice bits in registers, and the shuffle
    masks of LANE_ASM name exactly the IO layout's lanes that hold the remaining slice bits."""
    plan = gluon_mx.kron_plan(log_p, num_warps, register_bits, lane_levels=True)
    assert plan["N_STAGES"] == 1 and plan["S0"] == plan["IO_LAYOUT"] and plan["LOG_N"] == log_p
    [(regs, first, end, _)] = gluon_mx.stage_register_bits(plan, first=2)
    assert (first, end) == (2, register_bits + 2) and all(b in regs for b in range(2, end))
    lane_bit = {1 << i: basis[0].bit_length() - 1 for i, basis in enumerate(plan["IO_LAYOUT"].lane_bases)}
    masks = [int(m) for m in re.findall(r"shfl\.sync\.bfly\.b32 p, v, (\d+),", plan["LANE_ASM"])]
    assert sorted(lane_bit[m] for m in masks) == list(range(register_bits + 2, log_p + 2))
    staged = gluon_mx.kron_plan(log_p, num_warps, register_bits)
    assert staged["LANE_ASM"] == "" and staged["IO_LAYOUT"] == plan["IO_LAYOUT"]


def test_kron_lane_plan_stages_a_slice_that_spans_warps() -> None:
    """2^8 per slice on 2^2 values x 32 lanes: no warp holds a slice, so the plan has stages."""
    plan = gluon_mx.kron_plan(8, 4, 2, lane_levels=True)
    assert plan["LANE_ASM"] == "" and plan["N_STAGES"] > 1
    assert plan == gluon_mx.kron_plan(8, 4, 2)


def test_lane_butterfly_asm_runs_one_level_per_mask() -> None:
    asm = gluon_mx.lane_butterfly_asm(4, 1, 2)
    assert re.findall(r"bfly\.b32 p, v, (\d+),", asm) == ["4", "1", "2"]
    assert asm.count("fma.rn.f32 v, v, s, p;") == 3 and asm.count("and.b32 l, i, ") == 3
    for bad in ((), (3,), (32,), (2, 2)):
        with pytest.raises(ValueError, match="lane-id bits"):
            gluon_mx.lane_butterfly_asm(*bad)


def test_dispatch_sends_kron_rotations_to_the_kron_kernel_on_cuda_only(monkeypatch) -> None:
    """Routing: a stand-in records the calls and declines, after which the MMA kernel serves;
    CPU tensors (Triton's interpreter) never ask the Gluon kernel, nor does the off switch."""
    calls = []
    monkeypatch.setattr(kernels, "_kron_rotated", lambda x, entry, fmt, kron: calls.append((x.device.type, kron.k)))
    monkeypatch.setattr(kernels, "HAVE_GLUON", True)
    kernels.clear_caches()
    try:
        fmt = Format(ELEMENT_FORMATS["int4"], 32, ScaleRule.TUTORIAL)
        rotation = hadamard.get_rotation(1536, block_size=32)
        entry = kernels._plan_entry(rotation, torch.device("cuda" if HAS_CUDA else "cpu"))
        assert entry.kron is not None and entry.kron.k == 12 and not entry.walsh
        if not HAS_CUDA:  # Triton's interpreter: the MMA kernel, never the Gluon kernel
            x = torch.randn(4, 1536)
            assert kernels.rotated_fake_quantize(x, fmt, rotation) is not None
            assert calls == []
        else:
            x = torch.randn(4, 1536, device="cuda")
            assert kernels.rotated_fake_quantize(x, fmt, rotation) is not None  # served by the MMA kernel
            assert calls == [("cuda", 12)]
            monkeypatch.setattr(kernels, "USE_KRON_KERNEL", False)
            kernels.rotated_fake_quantize(x, fmt, rotation)
            assert calls == [("cuda", 12)], "switched off, the kron kernel must not be asked"
    finally:
        kernels.clear_caches()


@pytest.fixture(autouse=True)
def _cuda_core_kron_kernel(monkeypatch) -> None:
    """This file tests the CUDA-core kron kernel: the tensor-core one, which would take 16-bit
    rows of order 36 (576, 1152, 2304), is switched off (test_kron_tc_kernel.py tests it)."""
    monkeypatch.setattr(kernels, "USE_KRON_TC_KERNEL", False)


@pytest.fixture
def kron_launches(monkeypatch) -> list:
    """(row length, dtype) of every kron kernel launch that succeeded during the test (a failed
    one falls back to the MMA kernel, which the tolerance checks alone would not notice)."""
    launches = []
    launch = kernels._launch_gluon

    def recording(config, grid, args, failure_key, what):
        ok = launch(config, grid, args, failure_key, what)
        if ok and what == "kron":
            launches.append((failure_key[1], args[0].dtype))
        return ok

    monkeypatch.setattr(kernels, "_launch_gluon", recording)
    return launches


def _assert_close_to_reference(got: torch.Tensor, ref: torch.Tensor, x: torch.Tensor, what: str, rotation) -> None:
    """A flip moves one element of R x by one step of its block's grid, which the orthogonal
    R^T carries back as a difference of the same norm; a row's quantization error is about
    sqrt(n / 12) such steps. So: over the whole tensor, differences of at most 5 % of the
    quantization error, none in an all-zero row, at most a third of it in any row (a few flips),
    and under 1 % of the elements of R x moved by more than 1 % of the row's largest |R x| (in
    R x, not in the output: R^T spreads one flip over the whole row, so at n = 6144 a single flip
    changed every element of its row). That count catches coarse grids only (an MXINT8 or fp8
    step is about that size); the norm checks bound the flips of every format."""
    assert got is not None, f"{what}: not covered"
    got, ref, x = got.float().cpu(), ref.float().cpu(), x.float().cpu()
    err = (ref - x).norm(dim=1)
    diff = (got - ref).norm(dim=1)
    assert float(diff.norm()) <= 0.05 * float(err.norm()), f"{what}: differences beyond rare flips"
    assert bool((diff <= err / 3).all()), f"{what}: a row differs beyond a few flips"
    rotated = rotation.forward(x.double())
    scale = rotated.abs().amax(dim=1, keepdim=True)
    moved = (rotation.forward(got.double()) - rotation.forward(ref.double())).abs().gt(1e-2 * scale)
    assert float(moved.float().mean()) < 0.01, f"{what}: too many flips"


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("n", KRON_SIZES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_kron_kernel_matches_the_reference_every_size_and_dtype(n, dtype, kron_launches) -> None:
    rotation = hadamard.get_rotation(n, block_size=32)
    fmt = FORMATS[0]
    for rows in (37, 64):  # a ragged last tile (masked) and whole tiles
        x = sample_rows(rows, n, dtype, seed=n + rows)
        _assert_close_to_reference(kernels.rotated_fake_quantize(x, fmt, rotation), reference(x, fmt, rotation),
                                   x, f"n={n} rows={rows}", rotation)
    assert not kernels.GLUON_FAILURES
    assert (n, dtype) in kron_launches, "the kron kernel did not run"


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("n", [576, 1536])
@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f"{f.element.name}-{f.scale_rule.value}")
def test_kron_kernel_matches_the_reference_every_format(n, fmt, kron_launches) -> None:
    rotation = hadamard.get_rotation(n, block_size=32)
    x = sample_rows(48, n, torch.float16, seed=3)
    _assert_close_to_reference(kernels.rotated_fake_quantize(x, fmt, rotation), reference(x, fmt, rotation), x,
                               str(fmt), rotation)
    assert (n, torch.float16) in kron_launches


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("n,block_size", [(576, 16), (576, 64), (1536, 16), (1536, 128)])
def test_kron_kernel_blocks_within_and_across_slices(n, block_size, kron_launches) -> None:
    """576 has slices of 16: a block of 64 covers 4 slices, one of 16 exactly one; 1536 has
    slices of 128: blocks of 16 and 128 lie within one."""
    fmt = Format(ELEMENT_FORMATS["e2m1"], block_size, ScaleRule.OCP)
    rotation = hadamard.get_rotation(n, block_size=32)
    x = sample_rows(20, n, torch.bfloat16, seed=block_size)
    _assert_close_to_reference(kernels.rotated_fake_quantize(x, fmt, rotation), reference(x, fmt, rotation), x,
                               f"block {block_size}", rotation)
    assert (n, torch.bfloat16) in kron_launches


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_kron_kernel_nonfinite_rows_become_nan_as_in_the_reference(kron_launches) -> None:
    fmt = FORMATS[0]
    rotation = hadamard.get_rotation(1536, block_size=32)
    x = sample_rows(8, 1536, torch.float16, seed=9)
    x[2, 17] = float("nan")
    x[5, 300] = float("inf")
    got = kernels.rotated_fake_quantize(x, fmt, rotation)
    ref = reference(x, fmt, rotation)
    assert (1536, torch.float16) in kron_launches
    assert all(bool(out[row].isnan().all()) for out in (got, ref) for row in (2, 5))
    keep = [0, 1, 3, 4, 6, 7]
    assert not bool(got[keep].isnan().any())
    _assert_close_to_reference(got[keep], ref[keep], x[keep], "finite rows", rotation)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_kron_kernel_one_program_loops_over_every_tile(monkeypatch, kron_launches) -> None:
    monkeypatch.setattr(kernels, "_sm_count", lambda device: 1)
    monkeypatch.setitem(kernels.KRON_CONFIGS, (torch.float16, 1536), (4, 1, 0, 1))
    kernels.clear_caches()
    try:
        fmt = FORMATS[0]
        rotation = hadamard.get_rotation(1536, block_size=32)
        for rows in (45, 45, 46):  # several tiles of 8 rows, the last ragged; repeated; a new size
            x = sample_rows(rows, 1536, torch.float16, seed=rows)
            _assert_close_to_reference(kernels.rotated_fake_quantize(x, fmt, rotation),
                                       reference(x, fmt, rotation), x, f"rows={rows}", rotation)
        assert (1536, torch.float16) in kron_launches
    finally:
        kernels.clear_caches()
