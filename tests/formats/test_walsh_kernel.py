"""The Gluon Walsh-rotated MX kernel (mxptq/formats/_gluon_mx.py).

Independent expectations:
- the layout plan (CPU): a linear layout is a bijection between (register, lane, warp) bits and
  the tile's index bits; every butterfly level must run while its bit is a register bit; the
  levels must come in the reference's order (bit 0 first, as `mxptq.nn.hadamard.fwht`); the
  IO layout must give each thread 8 consecutive elements and the lanes the next 32 groups;
- the kernel (CUDA only; the device tool): the reference path
  `rotation.inverse(quantize_reference(rotation.forward(x)))`, *bit for bit* — the kernel runs
  the same fp32 butterflies in the same order and the same MX math, so nothing may differ.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
gluon_mx = pytest.importorskip("mxptq.formats._gluon_mx", exc_type=ImportError)

from rotated_cases import FORMATS, reference, sample_rows

from mxptq.formats import ELEMENT_FORMATS, Format, ScaleRule, kernels
from mxptq.nn import hadamard

HAS_CUDA = torch.cuda.is_available()


def _bits(bases) -> list[int]:
    return [basis[0].bit_length() - 1 for basis in bases]


def _configs():
    for log_n in range(8, 16):
        yield (log_n, *kernels.WALSH_CONFIGS.get(log_n, kernels.WALSH_DEFAULT_CONFIG)[:2])
    yield (11, 8, 5)  # the alternative settings the sweep also ran
    yield (12, 8, 6)
    yield (13, 4, 6)  # 8192 on 64 values per thread: bit 9 runs by warp shuffle
    yield (13, 8, 6)


@pytest.mark.parametrize("log_n,num_warps,register_bits", list(_configs()))
def test_walsh_plan_runs_every_level_in_registers_in_reference_order(log_n, num_warps, register_bits) -> None:
    plan = gluon_mx.walsh_plan(log_n, num_warps, register_bits)
    total = plan["M"].bit_length() - 1
    assert kernels._walsh_plan(log_n, num_warps, register_bits)[1] == 1 << (total - log_n)  # rows per tile
    layouts = [plan["IO_LAYOUT"]] + [plan[f"S{k}"] for k in range(plan["N_STAGES"])]
    for layout in layouts:
        regs, lanes, warps = _bits(layout.reg_bases), _bits(layout.lane_bases), _bits(layout.warp_bases)
        assert sorted(regs + lanes + warps) == list(range(total)), "not a bijection onto the tile"
        assert (len(regs), len(lanes), len(warps)) == (register_bits, 5, num_warps.bit_length() - 1)
    io = plan["IO_LAYOUT"]
    assert _bits(io.reg_bases)[:3] == [0, 1, 2] and _bits(io.lane_bases) == [3, 4, 5, 6, 7]
    levels = []
    for k, (regs, first, end, lanes) in enumerate(gluon_mx.stage_register_bits(plan)):
        assert first < end and all(b in regs or b in lanes for b in range(first, end)), "a level off registers"
        if lanes:  # the one level run by warp shuffle: a lane bit of this stage, its last level
            stage_lanes = _bits(plan[f"S{k}"].lane_bases)
            assert lanes == [end - 1] and lanes[0] in stage_lanes and lanes[0] not in regs
            assert plan["LANE_ASM"] == gluon_mx.lane_butterfly_asm(1 << stage_lanes.index(lanes[0]))
        levels.extend(range(first, end))
    assert levels == list(range(log_n)), "levels out of the reference's order"
    # a lane level replaces a stage that would have held one bit: 8192 on 64 values per thread
    assert (plan["LANE_STAGE"] >= 0) == ((log_n, register_bits) in ((13, 6), (11, 5))), plan["LANE_STAGE"]


def test_lane_butterfly_asm_is_a_shuffle_and_one_fused_add() -> None:
    """The PTX of the shuffle level: a butterfly shuffle across the given lane-id bit, the
    lane's sign from that bit of %laneid, and one fma (one rounding: a + c or a - c)."""
    asm = gluon_mx.lane_butterfly_asm(8)
    assert "shfl.sync.bfly.b32 p, v, 8, 0x1f, -1;" in asm and "and.b32 l, i, 8;" in asm and "%laneid" in asm
    assert asm.count("fma.rn.f32") == 1 and "0fBF800000" in asm  # -1.0 on the upper lane
    with pytest.raises(ValueError):
        gluon_mx.lane_butterfly_asm(3)


def test_dispatch_sends_walsh_rotations_to_the_gluon_kernel_and_others_to_the_mma_kernel(monkeypatch) -> None:
    """Routing only: a stand-in for the Gluon kernel records its calls and declines (None), after
    which the MMA kernel serves the call (on CUDA, or in Triton's interpreter on CPU)."""
    device = "cuda" if HAS_CUDA else "cpu"
    calls = []
    monkeypatch.setattr(kernels, "_walsh_rotated", lambda x, entry, fmt, rotation: calls.append(rotation.n))
    monkeypatch.setattr(kernels, "HAVE_GLUON", True)
    kernels.clear_caches()
    try:
        fmt = Format(ELEMENT_FORMATS["int4"], 32, ScaleRule.TUTORIAL)
        for n in (256, 96, 256):  # Walsh, block-diagonal, the Walsh one again (cached decision)
            x = torch.randn(16, n, generator=torch.Generator().manual_seed(n)).to(device)
            assert kernels.rotated_fake_quantize(x, fmt, hadamard.get_rotation(n, block_size=32)) is not None
        assert calls == [256, 256]
        monkeypatch.setattr(kernels, "USE_WALSH_KERNEL", False)
        kernels.rotated_fake_quantize(torch.randn(16, 256, device=device), fmt, hadamard.get_rotation(256))
        assert calls == [256, 256], "switched off, the Gluon kernel must not be asked"
    finally:
        kernels.clear_caches()


def test_walsh_plan_rejects_what_it_cannot_lay_out() -> None:
    with pytest.raises(ValueError, match="log_n"):
        gluon_mx.walsh_plan(7, 4)
    with pytest.raises(ValueError, match="warps cannot hold"):
        gluon_mx.walsh_plan(13, 2)  # 2 warps x 32 lanes x 64 values = 4096 < 8192
    with pytest.raises(ValueError, match="register_bits"):
        gluon_mx.walsh_plan(11, 4, register_bits=2)


class _NamedWalshButIdentity:
    """Says it is a Walsh rotation; is the identity map."""

    n = 256
    kind = "walsh"

    def forward(self, x):
        return x

    inverse = forward


def test_only_walsh_rotations_of_covered_lengths_qualify() -> None:
    assert not kernels._is_walsh(_NamedWalshButIdentity()), "the name alone must not qualify"
    assert kernels._is_walsh(hadamard.get_rotation(2048))
    assert kernels._is_walsh(hadamard.get_rotation(256))
    assert not kernels._is_walsh(hadamard.get_rotation(128))  # below the kernel's range
    assert not kernels._is_walsh(hadamard.get_rotation(1536))  # H_12 kron H_128
    assert not kernels._is_walsh(hadamard.get_rotation(96, block_size=32))  # block-diagonal
    assert not kernels._is_walsh(hadamard.KeyAxisRotation(32))


def test_gluon_kernels_compile_for_sm90_with_only_the_plans_layout_conversions() -> None:
    """The installed Triton compiles the Walsh kernel for an H100 (sm_90; no GPU needed) for
    every length the dispatch may send it, the kron kernel for 576, 1152, 1536 and 2560, and the
    tensor-core kron kernel for 576, 1152 and 2304: the Gluon API they use exists here. The
    compiler must add no layout conversion of its own to the Walsh kernel (each is a trip
    through shared memory). Spills (STL / LDL in the SASS, the stack frame;
    `count_sass_walsh._usage`): none in the Walsh settings the sweeps measured (2^11..2^13) or in
    an uncapped kron setting, at most a few under the kron kernel's timed 128-register cap and
    in the tensor-core kernel at 255. Compiled in a child
    process: Triton's CPU interpreter, which other kernel tests switch on, cannot compile for a
    GPU."""
    import triton

    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    if not ((tools / "ptxas").exists() and (tools / "cuobjdump").exists()):
        pytest.skip(f"this Triton install has no sm_90 toolchain in {tools}")
    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=str(repo))
    run = subprocess.run([sys.executable, str(repo / "scripts" / "count_sass_walsh.py"), "--check-all"],
                         check=False, capture_output=True, text=True, env=env, cwd=repo, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    cases = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    walsh = [case for case in cases if case["kernel"] == "walsh"]
    kron = [case for case in cases if case["kernel"] == "kron"]
    kron_tc = [case for case in cases if case["kernel"] == "kron-tc"]
    assert len(walsh) == 10 and len(kron) == 7 and len(kron_tc) == 4
    for case in walsh:
        assert case["conversions"] <= case["plan_conversions"], case
        if 11 <= case["log_n"] <= 13:
            assert case["spill_instructions"] == case["stack_bytes"] == case["local_bytes"] == 0, f"spills: {case}"
    for case in kron:
        if case["setting"][2] == 0:  # no register cap: nothing forces a spill
            assert case["spill_instructions"] == case["stack_bytes"] == 0, f"spills: {case}"
        else:  # the timed 128 cap: a few spills the timing accepted (576 bf16: 72 bytes with Triton 3.6,
            # 48 with 3.9); the same cap at 1152 spilled 336
            assert case["stack_bytes"] <= 128, f"spills: {case}"
    for case in kron_tc:  # uncapped at ptxas's 255 registers: a few spills (576 bf16: 48 bytes with Triton 3.9,
        # none with 3.6); its shared memory lets 4 programs share an SM (228 KiB on an H100, 1 KiB
        # of it reserved per block)
        assert case["stack_bytes"] <= 64 and 4 * (case["shared_memory_bytes"] + 1024) <= 228 * 1024, case


def _ran_walsh(fmt: Format, n: int, dtype: torch.dtype) -> bool:
    return kernels._gluon_compiled(fmt, "walsh", n, dtype)


def _assert_bit_exact(got, ref, what) -> None:
    assert got is not None, f"{what}: not covered"
    same = (got == ref) | (got.isnan() & ref.isnan())
    assert bool(same.all()), f"{what}: {int((~same).sum())} of {same.numel()} elements differ"
    # bit for bit includes the sign of zero (== takes -0.0 for +0.0)
    assert torch.equal(torch.signbit(got[got == 0]), torch.signbit(ref[ref == 0])), f"{what}: a zero's sign differs"


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("n", [256, 512, 1024, 2048, 4096, 8192, 16384, 32768])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_walsh_kernel_bit_exact_every_length_and_dtype(n, dtype) -> None:
    rotation = hadamard.get_rotation(n)
    fmt = FORMATS[0]
    for rows in (37, 64):  # a ragged last tile (masked) and whole tiles
        x = sample_rows(rows, n, dtype, seed=n + rows)
        _assert_bit_exact(kernels.rotated_fake_quantize(x, fmt, rotation), reference(x, fmt, rotation), f"n={n} rows={rows}")
    assert not kernels.GLUON_FAILURES
    assert _ran_walsh(fmt, n, dtype), "the Gluon kernel did not run"


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("n,setting", [(8192, (4, 6, 8, 0)), (8192, (8, 6, 2, 0)), (2048, (8, 5, 4, 0))])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_walsh_kernel_lane_level_bit_exact(n, setting, dtype, monkeypatch) -> None:
    """Settings whose plan runs one level by warp shuffle (`_gluon_mx._lane_butterfly`): bit
    for bit the reference, every format, whole and ragged tiles, a NaN row."""
    log_n = n.bit_length() - 1
    assert gluon_mx.walsh_plan(log_n, setting[0], setting[1])["LANE_STAGE"] >= 0
    monkeypatch.setitem(kernels.WALSH_CONFIGS, log_n, setting)
    kernels.clear_caches()
    try:
        rotation = hadamard.get_rotation(n)
        for i, fmt in enumerate(FORMATS):
            rows = (37, 64)[i % 2]
            x = sample_rows(rows, n, dtype, seed=i)
            if i == 0:
                x[3, 7] = float("nan")
            _assert_bit_exact(kernels.rotated_fake_quantize(x, fmt, rotation), reference(x, fmt, rotation),
                              f"n={n} {setting} {fmt}")
            assert _ran_walsh(fmt, n, dtype), "the Gluon kernel did not run"
        assert not kernels.GLUON_FAILURES
    finally:
        kernels.clear_caches()


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f"{f.element.name}-{f.scale_rule.value}")
def test_walsh_kernel_bit_exact_every_format(fmt) -> None:
    rotation = hadamard.get_rotation(2048)
    x = sample_rows(48, 2048, torch.float16, seed=3)
    _assert_bit_exact(kernels.rotated_fake_quantize(x, fmt, rotation), reference(x, fmt, rotation), str(fmt))
    assert _ran_walsh(fmt, 2048, torch.float16)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("block_size", [16, 64, 256])
def test_walsh_kernel_bit_exact_other_block_sizes(block_size) -> None:
    fmt = Format(ELEMENT_FORMATS["e2m1"], block_size, ScaleRule.OCP)
    rotation = hadamard.get_rotation(1024)
    x = sample_rows(20, 1024, torch.bfloat16, seed=block_size)
    _assert_bit_exact(kernels.rotated_fake_quantize(x, fmt, rotation), reference(x, fmt, rotation), f"block {block_size}")
    assert _ran_walsh(fmt, 1024, torch.bfloat16)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_walsh_kernel_nonfinite_rows_follow_the_reference() -> None:
    """A NaN or Inf spreads over its whole row through the transform; the block-NaN policy then
    makes every block of that row NaN, in the kernel as in the reference."""
    fmt = FORMATS[0]
    rotation = hadamard.get_rotation(512)
    x = sample_rows(8, 512, torch.float16, seed=9)
    x[2, 17] = float("nan")
    x[5, 300] = float("inf")
    got = kernels.rotated_fake_quantize(x, fmt, rotation)
    _assert_bit_exact(got, reference(x, fmt, rotation), "non-finite rows")
    assert bool(got[2].isnan().all()) and bool(got[5].isnan().all()) and not bool(got[3].isnan().any())


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f"{f.element.name}-{f.scale_rule.value}")
def test_walsh_kernel_bit_exact_on_blocks_of_extreme_scale(dtype, fmt) -> None:
    """Rows whose H x blocks sit at the ends of the dtype's range, bit-exact: fp16 at its
    smallest subnormal (2^-24) and near 2^14; bf16 around 2^-120 and 2^100, where the kernel
    rounds at a 2^-+64 scale (`_triton_mx._round_at_block_quantum`, WIDE: code exponents below
    -100 or above 88)."""
    rotation = hadamard.get_rotation(2048)
    x = sample_rows(16, 2048, dtype, seed=11).float()
    tiny, huge = (2.0**-24, 1.2 * 2.0**14) if dtype == torch.float16 else (2.0**-120, 2.0**100)
    x[5] = x[5].sign() * tiny if dtype == torch.float16 else x[5] / x[5].abs().max() * tiny
    x[10] = huge / 2048**0.5  # a constant row: its H x has one element `huge`, the rest 0
    x = x.to(dtype)
    amax = rotation.forward(x).float().reshape(16, -1, 32).abs().amax(-1)
    low, high = (2.0**-20, 2.0**13) if dtype == torch.float16 else (2.0**-100, 2.0**95)
    assert bool(((amax[5] < low) & (amax[5] > 0)).any()) and bool((amax[10] >= high).any())
    _assert_bit_exact(kernels.rotated_fake_quantize(x, fmt, rotation), reference(x, fmt, rotation), f"{dtype} {fmt}")


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("n", [2048, 8192])
def test_walsh_kernel_fp16_blocks_quantized_past_fp16(n) -> None:
    """fp16 MXINT4 under the tutorial rule quantizes a block value of -61440 or below to -65536,
    inf in fp16 (the reference's Q is rounded to fp16), so the kernel rounds each of Q's values
    to fp16 there (OUT_IO 0): rows whose rotation holds such a value must come out as the
    reference's inf / NaN rows, bit for bit, next to ordinary rows of the same tile and of other
    tiles."""
    fmt = FORMATS[0]  # int4, tutorial rule
    assert kernels._out_io(torch.float16, kernels._format_entry(fmt)) == 0
    rotation = hadamard.get_rotation(n)
    x = sample_rows(64, n, torch.float16, seed=3)
    # rows x = H y (H is its own inverse), so that H x holds y's large values up to fp16 rounding
    y = torch.zeros(3, n, dtype=torch.float64)
    y[:, 9] = -65000.0  # quantizes to -65536: -inf
    y[1, 100] = 64000.0  # (positive values saturate at 7 * 2^13)
    y[2, 77] = -62000.0
    y[:, 200:300] = torch.linspace(-3000.0, 3000.0, 100, dtype=torch.float64)
    x[[1, 2, 41]] = rotation.forward(y).to(torch.float16).cuda()
    ref = reference(x, fmt, rotation)
    finite = ref.isfinite().all(dim=1).tolist()
    assert [row for row, ok in enumerate(finite) if not ok] == [1, 2, 41], "the overflow should reach those rows only"
    _assert_bit_exact(kernels.rotated_fake_quantize(x, fmt, rotation), ref, f"n={n}")
    assert _ran_walsh(fmt, n, torch.float16)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_walsh_kernel_one_program_loops_over_every_tile(monkeypatch) -> None:
    """A grid of one persistent program walks all tiles (the loop, not just the first tile),
    and the second call goes through the compiled-kernel launch path."""
    monkeypatch.setattr(kernels, "_sm_count", lambda device: 1)
    monkeypatch.setitem(kernels.WALSH_CONFIGS, 11, (4, 6, 1, 0))
    kernels.clear_caches()
    try:
        fmt = Format(ELEMENT_FORMATS["int4"], 32, ScaleRule.TUTORIAL)
        rotation = hadamard.get_rotation(2048)
        for rows in (45, 45, 46):  # 12 tiles of 4 rows, the last ragged; repeated; a new size
            x = sample_rows(rows, 2048, torch.float16, seed=rows)
            _assert_bit_exact(kernels.rotated_fake_quantize(x, fmt, rotation), reference(x, fmt, rotation), f"rows={rows}")
        assert _ran_walsh(fmt, 2048, torch.float16)
    finally:
        kernels.clear_caches()


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_a_failing_gluon_launch_falls_back_to_the_mma_kernel_with_a_warning(monkeypatch) -> None:
    real_launch = kernels._launch

    def failing(config, grid, args):
        if config.kernel is gluon_mx.mx_walsh_rotated_kernel:
            raise RuntimeError("simulated Gluon compile error")
        real_launch(config, grid, args)

    monkeypatch.setattr(kernels, "_launch", failing)
    fmt = Format(ELEMENT_FORMATS["int4"], 32, ScaleRule.TUTORIAL)
    rotation = hadamard.get_rotation(2048)
    x = sample_rows(8, 2048, torch.float16, seed=4)
    with pytest.warns(RuntimeWarning, match="simulated Gluon compile error"):
        got = kernels.rotated_fake_quantize(x, fmt, rotation)
    assert got is not None, "the MMA kernel should have served the call"
    ref = reference(x, fmt, rotation)
    assert float((got.float() - ref.float()).norm()) <= 0.05 * float((ref.float() - x.float()).norm())
    assert list(kernels.GLUON_FAILURES) == [(x.device, 2048, torch.float16)]


def test_gluon_launch_helper_sizes_the_persistent_grid_and_caches_each_variant(monkeypatch) -> None:
    """`kernels._gluon_rotated` (CPU, the launch itself recorded instead of run): a grid of
    min(tiles, SMs x programs per SM) programs over ceil(rows / rows per tile) tiles, the
    arguments the kernels take, constants built once per variant (whole tiles or a ragged last
    one), and `_gluon_compiled` naming what ran."""
    launches = []
    monkeypatch.setattr(kernels, "_launch", lambda config, grid, args: launches.append((config, grid, args)))
    monkeypatch.setattr(kernels, "_sm_count", lambda device: 3)
    fmt = Format(ELEMENT_FORMATS["e2m1"], 32, ScaleRule.OCP)
    entry = kernels._format_entry(fmt)
    built = []

    def run(rows: int):
        x = torch.zeros(rows, 256, dtype=torch.float16)
        return kernels._gluon_rotated(gluon_mx.mx_walsh_rotated_kernel, "Walsh", x, 256, 0.0625, 4, entry,
                                      ("walsh", 6), lambda even: built.append(even) or {"EVEN": even},
                                      (4, 2, 0), (x.device, 256, x.dtype))

    assert not kernels._gluon_compiled(fmt, "walsh", 256, torch.float16)
    for rows in (37, 37, 40, 2):
        y = run(rows)
        config, grid, args = launches[-1]
        tiles = -(-rows // 4)
        assert grid == (min(tiles, 3 * 2), 1, 1)
        assert args[1] is y and y.shape == (rows, 256)
        assert args[2:] == (rows, tiles, 0.0625)
        assert config.constexprs == {"EVEN": rows % 4 == 0} and config.num_warps == 4
    assert built == [False, True]  # 37 and 2 rows: a ragged last tile (built once), 40: whole tiles
    assert kernels._gluon_compiled(fmt, "walsh", 256, torch.float16)
    assert not kernels._gluon_compiled(fmt, "walsh", 256, torch.bfloat16)
    assert not kernels._gluon_compiled(fmt, "kron", 256, torch.float16)
