"""The kron-rotated MX fake-quantizer with A on the tensor cores: y = R^T Q(R x) along rows for
R = s (A kron H_P), A a +-1 matrix of order K = 36 (H_36 kron H_16 = 576, the demo model's
hidden size; also P = 32, 64), fp16 and bf16 activations (`mx_kron_tc_rotated_kernel`).

Why. `_gluon_mx.mx_kron_rotated_kernel` mixes the 36 slices of a row with adds in registers: 11
adds per element per direction even in quads, 57 SASS instructions per element in all, which
held 576 at 38-42 % of copy on the H100 (fp16; this kernel: 47-49 %, benchmarks/h100/). Here
A runs as an MMA (m16n8k16, fp32 accumulate) whose inputs are exact 16-bit values: the raw x
forward, and Q's output, which the reference rounds to the activation dtype, for the inverse.
The butterflies of H_P stay in fp32 on the CUDA cores.

The MMA's M index is a (row, p) pair and its K index the slice. Which bits of m mean which row or
p bit is the plan's choice (`kron_tc_plan`): the fragment layout puts m bits 0-2 on lanes, bit 3
in registers, then the warps, then registers again, so with P = 16 one p bit on lanes and the
others in registers leave one butterfly level per direction to a warp shuffle
(`_gluon_mx._lane_butterfly`) and the rest to register adds, and a 32-element MX block (two
slices of 16) needs one shuffle for its amax (P = 32, 64: two and three p bits on lanes). The accumulator (m, j) is Q's input as it stands, and Q's output, rounded to 16 bits,
is the inverse MMA's A operand without moving (the fragment layouts agree).

K = 36 does not fill the MMA shapes: the K index runs in chunks 32 + 16 (slices 36-47 read as
zeros) and the output index in chunks 32 + 8 (columns 36-39 of the matrices are zero, so their
results are exactly 0: blocks of zeros, quantized to zeros; never stored). Q's 8-column chunk
becomes the inverse's 16-deep operand by joining it with zeros, the k order permuted so that
the join is a relabelling of registers (JOIN_ORDER; `kron_tc_matrices` orders the inverse
matrix's rows to match). The padded slices 36-47 are read as zeros because a masked
`cp.async` zero-fills.

Memory. Each program loops over tiles of ROWS rows through a ring of STAGES shared-memory
buffers: `cp.async` copies the next STAGES - 1 tiles while the current one computes (without it,
waits on global loads were the largest stall: Nsight Compute, 1.3 cycles per issued
instruction). Each thread reads back only the 16-byte pieces it copied itself (the same copy
layout both ways), so a stage needs no barrier between its copy and its read. The compiler's
layout conversions move a tile from its coalesced copy layout to the MMA operand and back.

Not bit-exact (the MMA's fp32 accumulation order is the hardware's): R x agrees with the
reference to fp32 rounding, as the other kron kernels' does.
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy, mma_v2

from mxptq.formats import _triton_mx as _mx
from mxptq.formats._gluon_mx import LANE_BITS, _lane_butterfly, lane_butterfly_asm

# cp.async from global to shared memory: `async_load` from Triton 3.7 on (the old name raises
# there), `async_copy_global_to_shared` before (the H100 tool's Triton 3.6).
_async_load = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared

TC_K = 36  # the order of A this kernel's chunking is written for
# A's columns (the MMA's K index: slices) in a chunk of 32 and one of 16 (slices 36-47 zero); its
# rows (the output slices) in a chunk of 32 and one of 8 (36-39 zero). The B operands are
# [PADDED_K, PADDED_N] matrices (`kron_tc_matrices`).
K1, K2 = gl.constexpr(32), gl.constexpr(16)
N1, N2 = gl.constexpr(32), gl.constexpr(8)
PADDED_K = K1.value + K2.value
PADDED_N = N1.value + N2.value
_MATRIX_STRIDE = gl.constexpr(PADDED_N)
# The inverse's second K chunk is Q's N2-column chunk joined with zeros (a new minor axis z):
# thread (g, t) of the accumulator holds columns n = 2t + n0, so [MT, 8, 2] split as
# [MT, t1, t0, n0, z] and put in JOIN_ORDER, (n0, t1, t0, z), is k = 8 n0 + 2t + z, the order in
# which the MMA operand holds its registers: the join moves no data. `kron_tc_matrices` orders
# the inverse matrix's rows to match.
JOIN_ORDER = gl.constexpr((0, 3, 1, 2, 4))


@gluon.jit
def _permute(x, O: gl.constexpr):
    """gl.permute(x, O) for an order O passed as a constexpr: spelled out element by element,
    the one form Triton 3.6 (a constexpr-wrapped tuple) and 3.9 (a plain tuple) both accept."""
    gl.static_assert(len(O) >= 3 and len(O) <= 14, "orders of 3 to 14 axes")
    if len(O) == 3:
        y = gl.permute(x, (O[0], O[1], O[2]))
    elif len(O) == 4:
        y = gl.permute(x, (O[0], O[1], O[2], O[3]))
    elif len(O) == 5:
        y = gl.permute(x, (O[0], O[1], O[2], O[3], O[4]))
    elif len(O) == 6:
        y = gl.permute(x, (O[0], O[1], O[2], O[3], O[4], O[5]))
    elif len(O) == 7:
        y = gl.permute(x, (O[0], O[1], O[2], O[3], O[4], O[5], O[6]))
    elif len(O) == 8:
        y = gl.permute(x, (O[0], O[1], O[2], O[3], O[4], O[5], O[6], O[7]))
    elif len(O) == 9:
        y = gl.permute(x, (O[0], O[1], O[2], O[3], O[4], O[5], O[6], O[7], O[8]))
    elif len(O) == 10:
        y = gl.permute(x, (O[0], O[1], O[2], O[3], O[4], O[5], O[6], O[7], O[8], O[9]))
    elif len(O) == 11:
        y = gl.permute(x, (O[0], O[1], O[2], O[3], O[4], O[5], O[6], O[7], O[8], O[9], O[10]))
    elif len(O) == 12:
        y = gl.permute(x, (O[0], O[1], O[2], O[3], O[4], O[5], O[6], O[7], O[8], O[9], O[10], O[11]))
    elif len(O) == 13:
        y = gl.permute(x, (O[0], O[1], O[2], O[3], O[4], O[5], O[6], O[7], O[8], O[9], O[10], O[11], O[12]))
    elif len(O) == 14:
        y = gl.permute(x, (O[0], O[1], O[2], O[3], O[4], O[5], O[6], O[7], O[8], O[9], O[10], O[11], O[12], O[13]))
    return y


@gluon.jit
def _regroup(x, SPLIT: gl.constexpr, ORDER: gl.constexpr, SHAPE: gl.constexpr):
    """x viewed as SPLIT (its index bits as axes), the axes permuted to ORDER, viewed as SHAPE:
    a relabelling of registers, lanes and warps, no data moves."""
    return gl.reshape(_permute(gl.reshape(x, SPLIT), ORDER), SHAPE)


@gluon.jit
def _m_butterfly(x, H: gl.constexpr, MT: gl.constexpr, NC: gl.constexpr):
    """One butterfly level on bit log2(H) of the m index of an [MT, NC] tile (a register bit of
    its layout): pairs (a, c) at m distance H become (a + c, a - c)."""
    y = gl.permute(gl.reshape(x, (MT // (2 * H), 2, H, NC)), (0, 2, 3, 1))
    a, c = gl.split(y)
    y = gl.permute(gl.join(a + c, a - c), (0, 3, 1, 2))
    return gl.reshape(y, (MT, NC))


@gluon.jit
def _p_butterflies(x, MT: gl.constexpr, NC: gl.constexpr, REG_H: gl.constexpr, LANE_ASM: gl.constexpr):
    """H_P (unnormalized) along the p bits of m: the register bits, then the lane bits."""
    for i in gl.static_range(len(REG_H)):
        x = _m_butterfly(x, REG_H[i], MT, NC)
    return _lane_butterfly(x, LANE_ASM)


@gluon.jit
def _quantize_tile(x, scale, MT: gl.constexpr, NC: gl.constexpr, QSPLIT: gl.constexpr, QORDER: gl.constexpr,
                   QSHAPE: gl.constexpr, QBACK: gl.constexpr, BLOCK: gl.constexpr, P: gl.constexpr, IO: gl.constexpr,
                   MODE: gl.constexpr, QMAX_LOG2: gl.constexpr, QMAX_SIGNIFICAND: gl.constexpr,
                   SHARED_OFFSET: gl.constexpr, SHARED_MIN: gl.constexpr, SHARED_MAX: gl.constexpr,
                   ZERO_SHARED: gl.constexpr, CODE_SHIFT: gl.constexpr, IS_INT: gl.constexpr,
                   CODE_MAX_POS: gl.constexpr, CODE_MAX_NEG: gl.constexpr, ELEM_EMIN: gl.constexpr,
                   ELEM_MAN_BITS: gl.constexpr, ELEM_MAX: gl.constexpr, OUT_IO: gl.constexpr,
                   CLAMPS: gl.constexpr):
    """Q(round(scale * x)) rounded to the activation dtype, for an accumulator tile [MT, NC]:
    regrouped as [blocks, BLOCK] (QSPLIT/QORDER, the block's index bits last), quantized by the
    Walsh kernel's exact MX math (`_triton_mx._fake_quantize_given_amax`), regrouped back."""
    x = _mx._round_through_io(x * scale, IO)
    # [blocks, groups, SUB]: a block of more than two slices reduces its pairs of slices first.
    # Triton 3.6 lowered one reduction over lane bits 0 and 2 with shuffles over lanes xor 2 and
    # xor 1 (wrong blocks on the H100; 3.9 shuffles xor 1 and 4); each of these two reductions
    # covers one contiguous run of lane bits, and 3.6 compiles them to xor 4, then xor 1 (right
    # on an H200: benchmarks/h200/cuda_tests.txt).
    SUB: gl.constexpr = BLOCK if BLOCK <= 2 * P else 2 * P  # noqa: FURB136 - a kernel constexpr
    blocks = gl.reshape(_permute(gl.reshape(x, QSPLIT), QORDER), ((MT * NC) // BLOCK, BLOCK // SUB, SUB))
    amax = gl.max(gl.max(gl.abs(blocks), axis=2), axis=1)
    amax_bits = gl.expand_dims(gl.expand_dims(amax.to(gl.int32, bitcast=True), 1), 2)
    q = _mx._fake_quantize_given_amax(blocks, amax_bits, MODE, QMAX_LOG2, QMAX_SIGNIFICAND,
                                      SHARED_OFFSET, SHARED_MIN, SHARED_MAX, ZERO_SHARED,
                                      CODE_SHIFT, IS_INT, CODE_MAX_POS, CODE_MAX_NEG,
                                      ELEM_EMIN, ELEM_MAN_BITS, ELEM_MAX,
                                      AT_QUANTUM=True, LEAN=True, OUT_IO=OUT_IO, WIDE=IO >= 2, CLAMPS=CLAMPS)
    if OUT_IO == 0:  # (else q is already Q(x) rounded to the activation dtype)
        q = _mx._round_through_io(q, IO)
    return _regroup(q, QSHAPE, QBACK, (MT, NC))


@gluon.jit
def _load_matrix(ptr, ROW0: gl.constexpr, COL0: gl.constexpr, KB: gl.constexpr, NB: gl.constexpr,
                 LAYOUT: gl.constexpr):
    """Rows ROW0.. and columns COL0.. of a [PADDED_K, PADDED_N] matrix as an MMA B operand."""
    k = gl.arange(0, KB, layout=gl.SliceLayout(1, LAYOUT))
    n = gl.arange(0, NB, layout=gl.SliceLayout(0, LAYOUT))
    return gl.load(ptr + gl.expand_dims(k + ROW0, 1) * _MATRIX_STRIDE + gl.expand_dims(n + COL0, 0))


@gluon.jit
def _tile_offsets(ROWS: gl.constexpr, KC: gl.constexpr, K0: gl.constexpr, P: gl.constexpr, N: gl.constexpr,
                  LAYOUT: gl.constexpr):
    """Offsets of slices K0..K0+KC-1 of a tile's rows, [ROWS, KC, P]; their row and slice index."""
    r = gl.arange(0, ROWS, layout=gl.SliceLayout(1, gl.SliceLayout(2, LAYOUT)))
    k = gl.arange(0, KC, layout=gl.SliceLayout(0, gl.SliceLayout(2, LAYOUT)))
    p = gl.arange(0, P, layout=gl.SliceLayout(0, gl.SliceLayout(1, LAYOUT)))
    r3 = gl.expand_dims(gl.expand_dims(r, 1), 2)
    k3 = gl.expand_dims(gl.expand_dims(k, 0), 2)
    offsets = r3 * N + (k3 + K0) * P + gl.expand_dims(gl.expand_dims(p, 0), 1)
    return offsets, r3, k3


@gluon.jit
def _copy_tile(buf1, buf2, x_ptr, t, n_rows, offs1, row1, offs2, row2, slice2, ROWS: gl.constexpr,
               K: gl.constexpr, N: gl.constexpr):
    """cp.async tile t's rows into one stage of the ring (rows past the end: zeros, no reads)."""
    left = n_rows - t * ROWS
    base = x_ptr + t.to(gl.int64) * (ROWS * N)
    _async_load(buf1, base + offs1, mask=row1 < left)
    _async_load(buf2, base + offs2, mask=(row2 < left) & (slice2 < K - K1))
    async_copy.commit_group()


@gluon.jit
def mx_kron_tc_rotated_kernel(
    x_ptr, y_ptr, n_rows, n_tiles, scale, forward_ptr, inverse_ptr,
    MMA: gl.constexpr, COPY1: gl.constexpr, COPY2: gl.constexpr, STORE2: gl.constexpr,
    ROWS: gl.constexpr, K: gl.constexpr, P: gl.constexpr, MT: gl.constexpr, STAGES: gl.constexpr,
    SPLIT1: gl.constexpr, ORDER1: gl.constexpr, SPLIT2: gl.constexpr, ORDER2: gl.constexpr,
    OUT_SPLIT1: gl.constexpr, OUT_ORDER1: gl.constexpr, OUT_SPLIT2: gl.constexpr, OUT_ORDER2: gl.constexpr,
    REG_H: gl.constexpr, LANE_ASM: gl.constexpr,
    QSPLIT1: gl.constexpr, QORDER1: gl.constexpr, QSHAPE1: gl.constexpr, QBACK1: gl.constexpr,
    QSPLIT2: gl.constexpr, QORDER2: gl.constexpr, QSHAPE2: gl.constexpr, QBACK2: gl.constexpr,
    IO: gl.constexpr, BLOCK: gl.constexpr,
    MODE: gl.constexpr, QMAX_LOG2: gl.constexpr, QMAX_SIGNIFICAND: gl.constexpr,
    SHARED_OFFSET: gl.constexpr, SHARED_MIN: gl.constexpr, SHARED_MAX: gl.constexpr,
    ZERO_SHARED: gl.constexpr, CODE_SHIFT: gl.constexpr, IS_INT: gl.constexpr,
    CODE_MAX_POS: gl.constexpr, CODE_MAX_NEG: gl.constexpr, ELEM_EMIN: gl.constexpr,
    ELEM_MAN_BITS: gl.constexpr, ELEM_MAX: gl.constexpr, NONFINITE: gl.constexpr, OUT_IO: gl.constexpr,
    CLAMPS: gl.constexpr = 3,
):
    """y = R^T Q(R x) for every row of a row-major [n_rows, K * P] fp16 or bf16 tensor, R = s
    (A kron H_P), s = `scale`: a row is K slices of P, X[k, p] = x[k * P + p], and R x is
    s * A X H_P (mxptq.nn.hadamard.Rotation, kind "kron"). forward_ptr and inverse_ptr hold
    the [PADDED_K, PADDED_N] MMA B operands of A and of the inverse's A' (`kron_tc_matrices`).

    Per tile of ROWS rows: C = X^T-as-[m, k] @ B (two K chunks, two N chunks), H_P's butterflies
    along m, Q per block, Q's output as the next A operand, the same back, stores. The tile's
    [m, k] view is a regrouping of its [row, slice, p] copy (SPLITn/ORDERn); the output's
    [row, slice, p] view of [m, j] likewise (OUT_SPLITn/OUT_ORDERn)."""
    gl.static_assert(NONFINITE == 0, "the rotated kernel implements the block-NaN policy only")
    gl.static_assert(K > K1 and K <= K1 + K2 and K <= N1 + N2, "A's columns run in chunks of 32 and 16 (K = 36)")
    gl.static_assert(STAGES >= 2, "a ring of at least 2 stages: the copy of tile i + 1 overlaps tile i")
    N: gl.constexpr = K * P
    DT: gl.constexpr = x_ptr.dtype.element_ty
    A_OP: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
    B_OP: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=2)
    # f<k chunk><n chunk>: blocks of A's B operand (forward), g..: of A''s (inverse)
    f11 = _load_matrix(forward_ptr, 0, 0, K1, N1, B_OP)
    f12 = _load_matrix(forward_ptr, 0, N1, K1, N2, B_OP)
    f21 = _load_matrix(forward_ptr, K1, 0, K2, N1, B_OP)
    f22 = _load_matrix(forward_ptr, K1, N1, K2, N2, B_OP)
    g11 = _load_matrix(inverse_ptr, 0, 0, K1, N1, B_OP)
    g12 = _load_matrix(inverse_ptr, 0, N1, K1, N2, B_OP)
    g21 = _load_matrix(inverse_ptr, K1, 0, K2, N1, B_OP)
    g22 = _load_matrix(inverse_ptr, K1, N1, K2, N2, B_OP)
    offs1, row1, _slice1 = _tile_offsets(ROWS, K1, 0, P, N, COPY1)
    offs2, row2, slice2 = _tile_offsets(ROWS, K2, K1, P, N, COPY2)
    out2, out_row2, out_slice2 = _tile_offsets(ROWS, N2, N1, P, N, STORE2)

    SMEM: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [2, 1, 0])
    ring1 = gl.allocate_shared_memory(DT, [STAGES, ROWS, K1, P], SMEM)
    ring2 = gl.allocate_shared_memory(DT, [STAGES, ROWS, K2, P], SMEM)
    pid = gl.program_id(0)
    step = gl.num_programs(0)
    for s in gl.static_range(STAGES - 1):
        _copy_tile(ring1.index(s), ring2.index(s), x_ptr, pid + s * step, n_rows, offs1, row1, offs2, row2,
                   slice2, ROWS, K, N)
    for i in range(gl.cdiv(n_tiles - pid, step)):
        tile = pid + i * step
        async_copy.wait_group(STAGES - 2)  # (this thread's copies of tile i: it reads only those)
        raw1 = ring1.index(i % STAGES).load(COPY1)
        raw2 = ring2.index(i % STAGES).load(COPY2)
        # The next copy goes to the stage read one iteration ago, by this same thread.
        _copy_tile(ring1.index((i + STAGES - 1) % STAGES), ring2.index((i + STAGES - 1) % STAGES), x_ptr,
                   tile + (STAGES - 1) * step, n_rows, offs1, row1, offs2, row2, slice2, ROWS, K, N)
        a1 = gl.convert_layout(_regroup(raw1, SPLIT1, ORDER1, (MT, K1)), A_OP)
        a2 = gl.convert_layout(_regroup(raw2, SPLIT2, ORDER2, (MT, K2)), A_OP)
        c1 = mma_v2(a2, f21, mma_v2(a1, f11, gl.zeros((MT, N1), gl.float32, MMA)))
        c2 = mma_v2(a2, f22, mma_v2(a1, f12, gl.zeros((MT, N2), gl.float32, MMA)))
        c1 = _p_butterflies(c1, MT, N1, REG_H, LANE_ASM)
        c2 = _p_butterflies(c2, MT, N2, REG_H, LANE_ASM)
        q1 = _quantize_tile(c1, scale, MT, N1, QSPLIT1, QORDER1, QSHAPE1, QBACK1, BLOCK, P, IO,
                            MODE, QMAX_LOG2, QMAX_SIGNIFICAND, SHARED_OFFSET, SHARED_MIN, SHARED_MAX,
                            ZERO_SHARED, CODE_SHIFT, IS_INT, CODE_MAX_POS, CODE_MAX_NEG, ELEM_EMIN,
                            ELEM_MAN_BITS, ELEM_MAX, OUT_IO, CLAMPS)
        q2 = _quantize_tile(c2, scale, MT, N2, QSPLIT2, QORDER2, QSHAPE2, QBACK2, BLOCK, P, IO,
                            MODE, QMAX_LOG2, QMAX_SIGNIFICAND, SHARED_OFFSET, SHARED_MIN, SHARED_MAX,
                            ZERO_SHARED, CODE_SHIFT, IS_INT, CODE_MAX_POS, CODE_MAX_NEG, ELEM_EMIN,
                            ELEM_MAN_BITS, ELEM_MAX, OUT_IO, CLAMPS)
        # Q's values are values of the activation dtype, exact as 16-bit MMA inputs.
        q1 = gl.convert_layout(q1.to(DT), A_OP)  # (the accumulator's own fragment layout)
        # q2 joined with zeros into a K2-deep operand (JOIN_ORDER: no data moves)
        q2 = gl.join(q2.to(DT), gl.zeros_like(q2.to(DT)))  # [MT, N2, 2]: (n, z)
        q2 = gl.convert_layout(_regroup(q2, (MT, 2, 2, 2, 2), JOIN_ORDER, (MT, K2)), A_OP)
        y1 = mma_v2(q2, g21, mma_v2(q1, g11, gl.zeros((MT, N1), gl.float32, MMA)))
        y2 = mma_v2(q2, g22, mma_v2(q1, g12, gl.zeros((MT, N2), gl.float32, MMA)))
        y1 = (_p_butterflies(y1, MT, N1, REG_H, LANE_ASM) * scale).to(DT)
        y2 = (_p_butterflies(y2, MT, N2, REG_H, LANE_ASM) * scale).to(DT)
        left = n_rows - tile * ROWS
        base = tile.to(gl.int64) * (ROWS * N)
        o1 = gl.convert_layout(_regroup(y1, OUT_SPLIT1, OUT_ORDER1, (ROWS, N1, P)), COPY1)
        gl.store(y_ptr + base + offs1, o1, mask=row1 < left)
        o2 = gl.convert_layout(_regroup(y2, OUT_SPLIT2, OUT_ORDER2, (ROWS, N2, P)), STORE2)
        gl.store(y_ptr + base + out2, o2, mask=(out_row2 < left) & (out_slice2 < K - N1))
    async_copy.wait_group(0)  # (the last prefetches, all masked off, before the program exits)


def kron_tc_plan(log_p: int, num_warps: int, block: int) -> dict:
    """The layout constexprs of `mx_kron_tc_rotated_kernel` for slices of P = 2^log_p (4 <= log_p
    <= 6), num_warps warps and MX blocks of `block` consecutive row elements (a power of two up
    to four slices, 4 P: a block of the 36 slices covers whole slices, so it must divide 36), and
    the rows per tile (ROWS).

    The m index of the MMA tile: bits 0-2 are lane bits of the fragment layout, bit 3 a register
    bit, the next log2(num_warps) bits warp bits, the rest register bits. p bits go to m bits 0..
    (log_p - 4) (lanes: one shuffle level per direction at P = 16), 3, and the top register bits;
    row bits fill the other lane bits and the warp bits. So a thread holds 2^(log_p - lanes) p
    values of its rows, and rows per tile = 2^(3 - lanes) * num_warps."""
    warp_bits = num_warps.bit_length() - 1
    if not 4 <= log_p <= 6 or (1 << warp_bits) != num_warps or block & (block - 1) or not 2 <= block <= 4 << log_p:
        raise ValueError(f"kron_tc_plan: slices of 2^{log_p}, {num_warps} warps, blocks of {block}")
    p_lanes = log_p - 3  # p bits on lanes; the other 3 in registers
    meaning = [("p", b) for b in range(p_lanes)] + [("r", b) for b in range(3 - p_lanes)]  # m bits 0-2
    meaning += [("p", p_lanes)] + [("r", b) for b in range(3 - p_lanes, 3 - p_lanes + warp_bits)]
    meaning += [("p", b) for b in range(p_lanes + 1, log_p)]
    row_bits = 3 - p_lanes + warp_bits
    m_bits = len(meaning)
    p = 1 << log_p

    def m_axis(name):  # the axis of an m bit when the tile is split into its bits, highest first
        return m_bits - 1 - meaning.index(name)

    def to_mk(kc):  # [ROWS, kc, P] -> [MT, kc]: split into bits, m bits highest first, then k
        split = (2,) * row_bits + (kc,) + (2,) * log_p
        axis = {("r", b): row_bits - 1 - b for b in range(row_bits)}
        axis.update({("p", b): row_bits + log_p - b for b in range(log_p)})
        return split, tuple(axis[meaning[m_bits - 1 - t]] for t in range(m_bits)) + (row_bits,)

    def to_rows(nc):  # [MT, nc] -> [ROWS, nc, P]
        rows = tuple(m_axis(("r", b)) for b in reversed(range(row_bits)))
        ps = tuple(m_axis(("p", b)) for b in reversed(range(log_p)))
        return (2,) * m_bits + (nc,), rows + (m_bits,) + ps

    def blocks(nc):  # [MT, nc] -> [.., BLOCK]: the block's bits of the row element j * P + p last
        block_bits = block.bit_length() - 1
        n_bits = nc.bit_length() - 1
        split = (2,) * (m_bits + n_bits)  # m bits highest first, then n bits highest first
        n_axis = {b: m_bits + n_bits - 1 - b for b in range(n_bits)}
        element = [m_axis(("p", b)) for b in range(log_p)] + [n_axis[b] for b in range(n_bits)]  # low to high
        inside = element[:block_bits]
        order = tuple(a for a in range(len(split)) if a not in inside) + tuple(reversed(inside))
        shape = tuple(split[a] for a in order)
        return split, order, shape, tuple(order.index(a) for a in range(len(order)))

    lanes = [1 << (2 + i) for i, name in enumerate(meaning[:3]) if name[0] == "p"]
    mma = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, 8])
    consts = {"MMA": mma, "ROWS": 1 << row_bits, "P": p, "MT": 1 << m_bits,
              "REG_H": tuple(1 << i for i, name in enumerate(meaning) if name[0] == "p" and i >= 3),
              "LANE_ASM": lane_butterfly_asm(*lanes),
              "COPY1": _copy_layout(1 << row_bits, 32, p, num_warps),
              "COPY2": _copy_layout(1 << row_bits, 16, p, num_warps),
              "STORE2": _copy_layout(1 << row_bits, 8, p, num_warps)}
    consts["SPLIT1"], consts["ORDER1"] = to_mk(K1.value)
    consts["SPLIT2"], consts["ORDER2"] = to_mk(K2.value)
    consts["OUT_SPLIT1"], consts["OUT_ORDER1"] = to_rows(N1.value)
    consts["OUT_SPLIT2"], consts["OUT_ORDER2"] = to_rows(N2.value)
    consts["QSPLIT1"], consts["QORDER1"], consts["QSHAPE1"], consts["QBACK1"] = blocks(N1.value)
    consts["QSPLIT2"], consts["QORDER2"], consts["QSHAPE2"], consts["QBACK2"] = blocks(N2.value)
    return consts


_VECTOR = 8  # consecutive 16-bit elements per thread in a copy: 16 bytes, one cp.async / LDG.128
_WARP = 1 << LANE_BITS


def _copy_layout(rows: int, slices: int, p: int, num_warps: int):
    """A coalesced layout of a [rows, slices, p] tile: _VECTOR consecutive elements per thread,
    lanes over p, then slices, then rows; warps over rows."""
    lanes_p = p // _VECTOR
    lanes_k = min(slices, _WARP // lanes_p)
    return gl.BlockedLayout([1, 1, _VECTOR], [_WARP // (lanes_p * lanes_k), lanes_k, lanes_p], [num_warps, 1, 1],
                            [2, 1, 0])


def kron_tc_matrices(forward, inverse) -> tuple[list, list]:
    """The kernel's [PADDED_K, PADDED_N] MMA B operands (nested lists) for R = s (A kron H_P) and
    R^-1 = s (A' kron H_P), A and A' +-1 matrices of order K (33..36): forward[k][j] = A[j][k],
    zero outside; inverse[k][i] = A'[i][j] where row k of the inverse's operand meets output
    column j of the forward: j = k in the first chunk, and in the second the column that
    JOIN_ORDER puts at position k - K1 of the joined chunk (zeros where it is a joined zero or
    j >= K)."""
    k1, n1, n2 = K1.value, N1.value, N2.value
    k_order = len(forward)
    if not k1 < k_order <= TC_K or len(inverse) != k_order:
        raise ValueError(f"kron_tc_matrices: A of order {k1 + 1}..{TC_K}, got {k_order}")
    fwd = [[0] * PADDED_N for _ in range(PADDED_K)]
    inv = [[0] * PADDED_N for _ in range(PADDED_K)]
    for k in range(k_order):
        for j in range(k_order):
            fwd[k][j] = forward[j][k]
    # The joined chunk [N2, 2] (column n, zero flag z) as the kernel regroups it: its 4 index
    # bits (t1, t0, n0, z), n = 4 t1 + 2 t0 + n0, permuted by JOIN_ORDER (axis 0 is the tile's m).
    bit_order = [axis - 1 for axis in JOIN_ORDER.value[1:]]
    joined = []
    for position in range(2 * n2):
        bits = [(position >> (3 - i)) & 1 for i in range(4)]  # position's bits, highest first
        source = [0] * 4
        for i, axis in enumerate(bit_order):
            source[axis] = bits[i]
        t1, t0, n0, z = source
        joined.append(None if z else n1 + 4 * t1 + 2 * t0 + n0)
    rows = list(range(k1)) + joined
    for k, j in enumerate(rows):
        if j is not None and j < k_order:
            for i in range(k_order):
                inv[k][i] = inverse[i][j]
    return fwd, inv
