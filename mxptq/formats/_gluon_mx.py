"""Gluon kernels for the rotated MX fake-quantizer y = R^T Q(R x) along rows: R = H_2^L / sqrt(n)
for n = 2^L (`mx_walsh_rotated_kernel`, bit-exact), and R = s (A kron H_P) for n = K * P with A a
+-1 matrix of order K, e.g. H_12 or H_36 (`mx_kron_rotated_kernel`, the same butterflies on
each of a row's K slices plus A as adds in registers; see it).

`mxptq.formats.kernels` imports this module inside a try (no Triton, or a Triton without this
Gluon API: the MMA kernel serves every rotation). Gluon is Triton's explicit-layout dialect:
every tensor says which of its index bits live in a thread's registers, which across the 32
lanes of a warp and which across warps (a "linear layout", Zhou et al. 2025, arXiv:2505.23819).
That is what a fast Walsh-Hadamard transform needs, and what plain Triton cannot express (there,
the compiler moved the tile through shared memory between every butterfly level, or fed tensor
cores with three bf16 pieces of the fp32 intermediate; benchmarks/h100/ncu_rotated.md).

The transform, read against `mxptq.nn.hadamard.fwht`: a row of n = 2^L elements is indexed by
L bits; butterfly level h = 2^b pairs the elements whose index differs only in bit b and
replaces (a, c) by (a + c, a - c). A level is pure register arithmetic when bit b is a
register bit of the current layout. So the tile runs through a few layouts ("stages"), each
holding the next run of bits in registers; `walsh_plan` chooses them. Between stages one
`convert_layout` moves the tile (through shared memory or warp shuffles, the compiler's choice).

The Walsh kernel is bit-exact against the reference, not just close: the levels run in the reference's order
(b = 0, 1, ..., L-1), each in IEEE fp32 like torch's, the normalization is the same fp32 multiply
by 1/sqrt(n), H x and Q(H x) are rounded to the activation dtype where the reference rounds
them, and Q is `_triton_mx._fake_quantize_given_amax`, the plain kernel's exact MX math in its
LEAN form (the same values in fewer instructions). fp16 and bf16 values are rounded straight
at the block quantum, never divided by the scale (`_triton_mx._round_at_block_quantum`; bf16
blocks beyond fp32's normal range at a 2^-+64 scale, WIDE, so no tile branches), and Q(H x)
comes out as a value of the activation dtype through clamp bounds rounded to it (OUT_IO: bf16
always, fp16 where the format's Q cannot overflow fp16); fp32 tiles take the general path.

Cost of the Walsh kernel: 40.6-46.9 SASS instructions per element on sm_90 (n = 2048..8192, fp16 MXINT4; 2 log2 n of
them the butterfly adds; `scripts/count_sass_walsh.py`, benchmarks/walsh_sass.md). On the H100
the transform alone ran near copy speed and the quantizer's instructions set the time
(benchmarks/h100/walsh_prototype.md, benchmarks/walsh_sass.md).
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from mxptq.formats import _triton_mx as _mx

LANE_BITS = 5  # 32 lanes per warp
REGISTER_BITS = 6  # 64 fp32 values of the tile per thread (128 registers at n = 2048, no spills)
VECTOR_BITS = 3  # 8 consecutive elements per thread at load/store (16 bytes of fp16)
MAX_STAGES = 4  # layouts per direction the kernel signature carries (L <= 15 needs at most 4)


@gluon.jit
def _butterfly(x, H: gl.constexpr, M: gl.constexpr):
    """One level of the Walsh transform on a flat tile of M elements: pairs (a, c) at index
    distance H become (a + c, a - c). Viewing the tile as [M / 2H, 2, H] and splitting the middle
    axis is a relabelling of registers when that bit is a register bit (the stage guarantees it)."""
    y = gl.permute(gl.reshape(x, (M // (2 * H), 2, H)), (0, 2, 1))
    a, c = gl.split(y)
    y = gl.permute(gl.join(a + c, a - c), (0, 2, 1))
    return gl.reshape(y, (M,))


@gluon.jit
def _lane_butterfly(x, ASM: gl.constexpr):
    """Levels of the Walsh transform whose bits are lane-id bits of x's layout: for each level
    ASM (`lane_butterfly_asm`) swaps each value with its partner lane's by a butterfly shuffle
    (4 bytes of crossbar traffic, no shared memory, no barrier) and returns partner + x on the
    lower lane (a + c) or partner - x on the upper one (a - c)."""
    return gl.inline_asm_elementwise(ASM, "=f,f", [x], dtype=gl.float32, is_pure=True, pack=1)


def lane_butterfly_asm(*lane_masks: int) -> str:
    """The PTX of `_lane_butterfly` for the lane-id bits lane_masks, one level after another:
    fma(x, +-1, partner) rounds the sum or difference once, the same IEEE fp32 add or subtract
    as `_butterfly`; a lane's sign is the same in every use, so ptxas computes it once."""
    if not lane_masks or len(set(lane_masks)) < len(lane_masks) or any(m not in (1, 2, 4, 8, 16) for m in lane_masks):
        raise ValueError(f"lane_butterfly_asm: lane-id bits, got {lane_masks}")
    levels = "".join(
        f"shfl.sync.bfly.b32 p, v, {mask}, 0x1f, -1; "
        f"and.b32 l, i, {mask}; setp.ne.u32 u, l, 0; selp.f32 s, 0fBF800000, 0f3F800000, u; fma.rn.f32 v, v, s, p; "
        for mask in lane_masks)
    return ("{ .reg .b32 p, l, i; .reg .pred u; .reg .f32 s, v; mov.u32 i, %laneid; mov.b32 v, $1; "
            f"{levels}mov.b32 $0, v; }}")


@gluon.jit
def _stage(x, LAYOUT: gl.constexpr, FIRST: gl.constexpr, LAST: gl.constexpr, M: gl.constexpr):
    """Move the tile to LAYOUT (whose registers hold bits FIRST..LAST-1), then run those levels."""
    x = gl.convert_layout(x, LAYOUT)
    for b in gl.static_range(FIRST, LAST):
        x = _butterfly(x, 1 << b, M)
    return x


@gluon.jit
def _walsh(x, S0: gl.constexpr, S1: gl.constexpr, S2: gl.constexpr, S3: gl.constexpr,
           E0: gl.constexpr, E1: gl.constexpr, E2: gl.constexpr, E3: gl.constexpr,
           N_STAGES: gl.constexpr, M: gl.constexpr, FIRST: gl.constexpr = 0,
           LANE_STAGE: gl.constexpr = -1, LANE_ASM: gl.constexpr = None):
    """Unnormalized Walsh transform of every row of the tile: stage k runs bits E(k-1)..Ek-1
    (E(-1) = FIRST, the row's lowest index bit), in registers of layout Sk, except that stage
    LANE_STAGE runs its last bit across lanes (`_lane_butterfly` with LANE_ASM)."""
    x = _stage(x, S0, FIRST, E0 - (LANE_STAGE == 0), M)
    if LANE_STAGE == 0:
        x = _lane_butterfly(x, LANE_ASM)
    if N_STAGES > 1:
        x = _stage(x, S1, E0, E1 - (LANE_STAGE == 1), M)
        if LANE_STAGE == 1:
            x = _lane_butterfly(x, LANE_ASM)
    if N_STAGES > 2:
        x = _stage(x, S2, E1, E2 - (LANE_STAGE == 2), M)
        if LANE_STAGE == 2:
            x = _lane_butterfly(x, LANE_ASM)
    if N_STAGES > 3:
        x = _stage(x, S3, E2, E3, M)
    return x


@gluon.jit
def mx_walsh_rotated_kernel(
    x_ptr, y_ptr, n_rows, n_tiles, scale,
    IO_LAYOUT: gl.constexpr, S0: gl.constexpr, S1: gl.constexpr, S2: gl.constexpr,
    S3: gl.constexpr, E0: gl.constexpr, E1: gl.constexpr, E2: gl.constexpr, E3: gl.constexpr,
    N_STAGES: gl.constexpr, LOG_N: gl.constexpr, M: gl.constexpr, EVEN: gl.constexpr,
    IO: gl.constexpr, BLOCK: gl.constexpr,
    MODE: gl.constexpr, QMAX_LOG2: gl.constexpr, QMAX_SIGNIFICAND: gl.constexpr,
    SHARED_OFFSET: gl.constexpr, SHARED_MIN: gl.constexpr, SHARED_MAX: gl.constexpr,
    ZERO_SHARED: gl.constexpr, CODE_SHIFT: gl.constexpr, IS_INT: gl.constexpr,
    CODE_MAX_POS: gl.constexpr, CODE_MAX_NEG: gl.constexpr, ELEM_EMIN: gl.constexpr,
    ELEM_MAN_BITS: gl.constexpr, ELEM_MAX: gl.constexpr, NONFINITE: gl.constexpr,
    OUT_IO: gl.constexpr, LANE_STAGE: gl.constexpr, LANE_ASM: gl.constexpr, CLAMPS: gl.constexpr = 3,
):
    """y = H^T Q(H x) for every row of a row-major [n_rows, 2^LOG_N] tensor, H = H_2^L / sqrt(n)
    (Sylvester order, symmetric: the inverse is the same transform), one read and one write.

    Persistent: each program loops over tiles of M / 2^LOG_N consecutive rows (a flat tile of M
    elements). Loads and stores use IO_LAYOUT (8 consecutive elements per thread, lanes over the
    next 32 groups: coalesced); the MX blocks are BLOCK consecutive row elements, reduced in the
    same layout. EVEN: the row count is a multiple of the tile's, no masks."""
    gl.static_assert(NONFINITE == 0, "the rotated kernel implements the block-NaN policy only")
    local = gl.arange(0, M, layout=IO_LAYOUT)
    for tile in range(gl.program_id(0), n_tiles, gl.num_programs(0)):
        base = tile.to(gl.int64) * M
        if EVEN:
            mask = None
        else:
            mask = (local >> LOG_N) < n_rows - tile.to(gl.int64) * (M >> LOG_N)
        x = _mx._load_f32_fast(x_ptr + base + local, mask, IO)
        x = _walsh(x, S0, S1, S2, S3, E0, E1, E2, E3, N_STAGES, M, 0, LANE_STAGE, LANE_ASM)
        # The reference rounds H x to the activation dtype (Rotation.forward keeps the dtype)
        # and Q's output too (quantize keeps it).
        x = gl.convert_layout(x, IO_LAYOUT)
        x = _mx._round_through_io(x * scale, IO)
        blocks = gl.reshape(x, (M // BLOCK, BLOCK))
        # Block amax as fp32 max of |x|: it ignores NaN, but a NaN or Inf anywhere in the input
        # row reaches every element of H x (NaN or +-Inf), so a non-finite block still has a
        # non-finite amax; the kernel's NaN policy follows from it as in the plain kernel.
        amax = gl.max(gl.abs(blocks), axis=1)
        amax_bits = gl.expand_dims(amax.to(gl.int32, bitcast=True), 1)
        # 16-bit values are rounded straight at the block quantum (bf16: WIDE, for blocks
        # beyond fp32's normal range); fp32 takes the general path.
        q = _mx._fake_quantize_given_amax(blocks, amax_bits, MODE, QMAX_LOG2, QMAX_SIGNIFICAND,
                                          SHARED_OFFSET, SHARED_MIN, SHARED_MAX, ZERO_SHARED,
                                          CODE_SHIFT, IS_INT, CODE_MAX_POS, CODE_MAX_NEG,
                                          ELEM_EMIN, ELEM_MAN_BITS, ELEM_MAX, AT_QUANTUM=IO != 0,
                                          LEAN=True, OUT_IO=OUT_IO, WIDE=IO >= 2, CLAMPS=CLAMPS)
        x = gl.reshape(q, (M,))
        if OUT_IO == 0:  # (else q is already Q(x) rounded to the activation dtype)
            x = _mx._round_through_io(x, IO)
        x = _walsh(x, S0, S1, S2, S3, E0, E1, E2, E3, N_STAGES, M, 0, LANE_STAGE, LANE_ASM)
        x = gl.convert_layout(x, IO_LAYOUT)
        _mx._store_f32_fast(y_ptr + base + local, x * scale, mask, IO)


@gluon.jit
def _walsh_reversed(x, S0: gl.constexpr, S1: gl.constexpr, S2: gl.constexpr, S3: gl.constexpr,
                    E0: gl.constexpr, E1: gl.constexpr, E2: gl.constexpr, E3: gl.constexpr,
                    N_STAGES: gl.constexpr, M: gl.constexpr, FIRST: gl.constexpr = 0):
    """`_walsh` with its stages in reverse order (the levels commute in exact arithmetic): it
    starts in the layout where `_walsh` ended and ends in S0, the IO layout."""
    if N_STAGES > 3:
        x = _stage(x, S3, E2, E3, M)
    if N_STAGES > 2:
        x = _stage(x, S2, E1, E2, M)
    if N_STAGES > 1:
        x = _stage(x, S1, E0, E1, M)
    return _stage(x, S0, FIRST, E0, M)


@gluon.jit
def _mix(xs, K: gl.constexpr, GROUP: gl.constexpr, TERMS: gl.constexpr, FLIP: gl.constexpr):
    """out_j = sum_i A[j, i] xs[i] for a +-1 matrix A (the H_K factor), every xs[i] a tile in
    the same layout. The columns go in groups of GROUP (2 or 4): up to sign, a row's part on
    a group is one of its signed combinations, computed once for all rows, so a row costs
    K / GROUP - 1 adds. Pairs (a, b): a + b and a - b, 1 add per element. Quads (a, b, c, d):
    the 8 sums (a + b or a - b) +- (c + d or c - d), 3 adds per element, rows K/4 - 1; at
    K = 36, 11 adds per element instead of 18 (and K - 1 without groups). Combinations no row
    uses are never computed (dead code).

    TERMS[j * K/GROUP + t] codes term t of row j as (group * 2^(GROUP-1) + combination) * 2 +
    negate, combination = use_a_minus_b for pairs and use_a_minus_b * 4 + use_c_minus_d * 2 +
    subtract for quads (`kron_mix`); each row starts with a positive term where it has one,
    and FLIP[j] negates a row that has none."""
    gl.static_assert(GROUP == 2 or GROUP == 4, "columns mix in pairs or quads")
    TERMS_PER_ROW: gl.constexpr = K // GROUP
    combos = ()
    for i in gl.static_range(TERMS_PER_ROW):
        s1 = xs[GROUP * i] + xs[GROUP * i + 1]
        d1 = xs[GROUP * i] - xs[GROUP * i + 1]
        if GROUP == 2:
            combos = combos + (s1, d1)
        else:
            s2 = xs[GROUP * i + 2] + xs[GROUP * i + 3]
            d2 = xs[GROUP * i + 2] - xs[GROUP * i + 3]
            combos = combos + (s1 + s2, s1 - s2, s1 + d2, s1 - d2, d1 + s2, d1 - s2, d1 + d2, d1 - d2)
    out = ()
    for j in gl.static_range(K):
        acc = combos[TERMS[j * TERMS_PER_ROW] >> 1]
        for t in gl.static_range(1, TERMS_PER_ROW):
            if TERMS[j * TERMS_PER_ROW + t] & 1:
                acc = acc - combos[TERMS[j * TERMS_PER_ROW + t] >> 1]
            else:
                acc = acc + combos[TERMS[j * TERMS_PER_ROW + t] >> 1]
        if FLIP[j]:
            acc = -acc
        out = out + (acc,)
    return out


@gluon.jit
def _quantize_kron(xs, scale, K: gl.constexpr, LOG_P: gl.constexpr, M: gl.constexpr,
                   IO: gl.constexpr, BLOCK: gl.constexpr,
                   MODE: gl.constexpr, QMAX_LOG2: gl.constexpr, QMAX_SIGNIFICAND: gl.constexpr,
                   SHARED_OFFSET: gl.constexpr, SHARED_MIN: gl.constexpr, SHARED_MAX: gl.constexpr,
                   ZERO_SHARED: gl.constexpr, CODE_SHIFT: gl.constexpr, IS_INT: gl.constexpr,
                   CODE_MAX_POS: gl.constexpr, CODE_MAX_NEG: gl.constexpr, ELEM_EMIN: gl.constexpr,
                   ELEM_MAN_BITS: gl.constexpr, ELEM_MAX: gl.constexpr, OUT_IO: gl.constexpr,
                   CLAMPS: gl.constexpr):
    """Q(round(scale * x)) rounded to the activation dtype, for every k-slice of the tile. A
    row's MX blocks are BLOCK consecutive elements: BLOCK / P consecutive slices when a block
    is longer than a slice (P = 2^LOG_P), else BLOCK consecutive elements of one slice."""
    P: gl.constexpr = 1 << LOG_P
    # Blocks of G slices x SPAN elements: one slice and BLOCK elements, or G slices whole.
    G: gl.constexpr = BLOCK // P if BLOCK > P else 1
    SPAN: gl.constexpr = P if BLOCK > P else BLOCK  # noqa: FURB136 - a kernel constexpr
    out = ()
    for g in gl.static_range(K // G):
        group = ()
        for t in gl.static_range(G):
            x = _mx._round_through_io(xs[g * G + t] * scale, IO)
            group = group + (gl.reshape(x, (M // SPAN, SPAN)),)
        magnitude = gl.abs(group[0])  # the G slices' maximum first: one reduction across lanes, not G
        for t in gl.static_range(1, G):
            magnitude = gl.maximum(magnitude, gl.abs(group[t]))
        amax = gl.max(magnitude, axis=1)
        amax_bits = gl.expand_dims(amax.to(gl.int32, bitcast=True), 1)
        for t in gl.static_range(G):
            q = _mx._fake_quantize_given_amax(group[t], amax_bits, MODE, QMAX_LOG2, QMAX_SIGNIFICAND,
                                              SHARED_OFFSET, SHARED_MIN, SHARED_MAX, ZERO_SHARED,
                                              CODE_SHIFT, IS_INT, CODE_MAX_POS, CODE_MAX_NEG,
                                              ELEM_EMIN, ELEM_MAN_BITS, ELEM_MAX,
                                              AT_QUANTUM=IO != 0, LEAN=True, OUT_IO=OUT_IO, WIDE=IO >= 2,
                                              CLAMPS=CLAMPS)
            q = gl.reshape(q, (M,))
            if OUT_IO == 0:  # (else q is already Q(x) rounded to the activation dtype)
                q = _mx._round_through_io(q, IO)
            out = out + (q,)
    return out


@gluon.jit
def _join_group(a, b, c, d, M: gl.constexpr):
    """Four slice tiles as one tile of M elements, the slice in the two lowest index bits."""
    return gl.reshape(gl.join(gl.join(a, b), gl.join(c, d)), (M,))


@gluon.jit
def _split_group(x, M: gl.constexpr):
    """`_join_group` undone: the four slice tiles, in order."""
    ab, cd = gl.split(gl.reshape(x, (M // 4, 2, 2)))
    a, b = gl.split(ab)
    c, d = gl.split(cd)
    return a, b, c, d


@gluon.jit
def mx_kron_rotated_kernel(
    x_ptr, y_ptr, n_rows, n_tiles, scale,
    SLICE_LAYOUT: gl.constexpr, IO_LAYOUT: gl.constexpr, S0: gl.constexpr, S1: gl.constexpr,
    S2: gl.constexpr, S3: gl.constexpr, E0: gl.constexpr, E1: gl.constexpr, E2: gl.constexpr,
    E3: gl.constexpr, N_STAGES: gl.constexpr, LOG_N: gl.constexpr, M: gl.constexpr,
    VECTOR: gl.constexpr, EVEN: gl.constexpr, K: gl.constexpr, MIX_GROUP: gl.constexpr, FORWARD_TERMS: gl.constexpr,
    FORWARD_FLIP: gl.constexpr, INVERSE_TERMS: gl.constexpr, INVERSE_FLIP: gl.constexpr,
    IO: gl.constexpr, BLOCK: gl.constexpr,
    MODE: gl.constexpr, QMAX_LOG2: gl.constexpr, QMAX_SIGNIFICAND: gl.constexpr,
    SHARED_OFFSET: gl.constexpr, SHARED_MIN: gl.constexpr, SHARED_MAX: gl.constexpr,
    ZERO_SHARED: gl.constexpr, CODE_SHIFT: gl.constexpr, IS_INT: gl.constexpr,
    CODE_MAX_POS: gl.constexpr, CODE_MAX_NEG: gl.constexpr, ELEM_EMIN: gl.constexpr,
    ELEM_MAN_BITS: gl.constexpr, ELEM_MAX: gl.constexpr, NONFINITE: gl.constexpr, OUT_IO: gl.constexpr,
    LANE_ASM: gl.constexpr, CLAMPS: gl.constexpr = 3,
):
    """y = R^T Q(R x) for every row of a row-major [n_rows, K * 2^LOG_N] tensor, R = s (A kron
    H_P) with A a +-1 K x K matrix (FORWARD_TERMS codes A, INVERSE_TERMS A^T; `_mix`) and s
    = 1 / sqrt(n): a row is K slices of P = 2^LOG_N, X[k, p] = x[k * P + p], and R x is
    s * A X H_P (mxptq.nn.hadamard.Rotation, kind "kron").

    A tile holds its rows' K slices as K tiles of M / 4 elements in one layout (SLICE_LAYOUT at
    load and store: VECTOR consecutive elements per thread, 16 bytes for fp16 at K = 12). For
    the H_P butterflies four slices are joined into one tile of M elements (`kron_plan`), so
    that each layout conversion moves four slices at once (one trip through shared memory, not
    four); with LANE_ASM, the levels on lane bits run by warp shuffle (`_lane_butterfly`) and
    the tile never leaves the IO layout. A mixes the slices element by element in registers
    (`_mix`). The inverse runs A^T first, then the butterflies in reverse. Not bit-exact (the
    reference's H_K is an fp32 matmul): R x agrees with the reference to fp32 rounding, as the
    MMA kernel's does."""
    gl.static_assert(NONFINITE == 0, "the rotated kernel implements the block-NaN policy only")
    gl.static_assert(K % 4 == 0, "slices are joined in fours")
    P: gl.constexpr = 1 << LOG_N
    MS: gl.constexpr = M // 4  # elements of one slice tile
    ROWS: gl.constexpr = MS >> LOG_N
    local = gl.arange(0, MS, layout=SLICE_LAYOUT)
    # row * K * P + p, in runs of VECTOR consecutive elements (Triton cannot see that itself)
    offsets = local + (local >> LOG_N) * ((K - 1) * P)
    offsets = gl.max_contiguous(gl.multiple_of(offsets, VECTOR), VECTOR)
    for tile in range(gl.program_id(0), n_tiles, gl.num_programs(0)):
        base = tile.to(gl.int64) * (ROWS * K * P)
        if EVEN:
            mask = None
        else:
            mask = (local >> LOG_N) < n_rows - tile.to(gl.int64) * ROWS
        xs = ()
        for g in gl.static_range(K // 4):
            quad = ()
            for t in gl.static_range(4):
                quad = quad + (_mx._load_f32_fast(x_ptr + base + (4 * g + t) * P + offsets, mask, IO),)
            x = gl.convert_layout(_join_group(quad[0], quad[1], quad[2], quad[3], M), IO_LAYOUT)
            x = _walsh(x, S0, S1, S2, S3, E0, E1, E2, E3, N_STAGES, M, 2)
            if LANE_ASM != "":
                x = _lane_butterfly(x, LANE_ASM)
            xs = xs + _split_group(x, M)
        xs = _mix(xs, K, MIX_GROUP, FORWARD_TERMS, FORWARD_FLIP)
        xs = _quantize_kron(xs, scale, K, LOG_N, MS, IO, BLOCK, MODE, QMAX_LOG2, QMAX_SIGNIFICAND,
                            SHARED_OFFSET, SHARED_MIN, SHARED_MAX, ZERO_SHARED, CODE_SHIFT, IS_INT,
                            CODE_MAX_POS, CODE_MAX_NEG, ELEM_EMIN, ELEM_MAN_BITS, ELEM_MAX, OUT_IO, CLAMPS)
        xs = _mix(xs, K, MIX_GROUP, INVERSE_TERMS, INVERSE_FLIP)
        for g in gl.static_range(K // 4):
            x = _join_group(xs[4 * g], xs[4 * g + 1], xs[4 * g + 2], xs[4 * g + 3], M)
            if LANE_ASM != "":
                x = _lane_butterfly(x, LANE_ASM)
            x = _walsh_reversed(x, S0, S1, S2, S3, E0, E1, E2, E3, N_STAGES, M, 2)
            quad = _split_group(x, M)
            for t in gl.static_range(4):
                out = gl.convert_layout(quad[t], SLICE_LAYOUT) * scale
                _mx._store_f32_fast(y_ptr + base + (4 * g + t) * P + offsets, out, mask, IO)


def kron_plan(log_p: int, num_warps: int, register_bits: int, lane_levels: bool = False) -> dict:
    """Layouts and stages of the kron kernel (rows of P = 2^log_p per slice), as `walsh_plan`
    gives them for a tile of four joined slices: index bits 0-1 are the slice (registers
    throughout), then the slice tile's bits. SLICE_LAYOUT, one slice's tile: each thread holds
    2^register_bits consecutive elements (its 16-byte accesses at 8), lanes the next 5 bits,
    warps the rest; a slice tile holds (M / 4) >> log_p rows. IO_LAYOUT = S0 is the same
    for the joined tile, with the slice bits in registers.

    lane_levels: where a slice lies within one warp (log_p <= register_bits + 5), no stages
    after S0: the slice bits on lanes of the IO layout run by warp shuffle (LANE_ASM, one
    `lane_butterfly_asm` for all of them; "" in the staged plan)."""
    warp_bits = num_warps.bit_length() - 1
    if (1 << warp_bits) != num_warps or not 1 <= register_bits <= log_p:
        raise ValueError(f"kron_plan: {num_warps} warps, 2^{register_bits} values per thread, rows of 2^{log_p}")
    slice_total = register_bits + LANE_BITS + warp_bits
    if log_p > slice_total:
        raise ValueError(f"kron_plan: {num_warps} warps cannot hold a slice of 2^{log_p}")
    regs = list(range(register_bits))
    lanes = list(range(register_bits, register_bits + LANE_BITS))
    warps = list(range(register_bits + LANE_BITS, slice_total))
    slice_layout = _linear_layout(regs, lanes, warps, slice_total)
    io_regs, io_lanes, io_warps = [0, 1] + [b + 2 for b in regs], [b + 2 for b in lanes], [b + 2 for b in warps]
    if not lane_levels or log_p > register_bits + LANE_BITS:  # (a slice over several warps: stages)
        plan = _stage_plan(io_regs, io_lanes, io_warps, slice_total + 2, log_p, register_bits + 2, first=2)
        return dict(plan, SLICE_LAYOUT=slice_layout, VECTOR=1 << register_bits, LANE_ASM="")
    # The levels on register bits in the IO layout, the rest by warp shuffle: no layout stages.
    # The stage plan covers the register bits only, so LOG_N is set back to the slice's.
    plan = _stage_plan(io_regs, io_lanes, io_warps, slice_total + 2, register_bits, register_bits + 2, first=2)
    lane_bits = range(register_bits + 2, log_p + 2)
    lane_asm = lane_butterfly_asm(*(1 << io_lanes.index(b) for b in lane_bits)) if lane_bits else ""
    return dict(plan, LOG_N=log_p, SLICE_LAYOUT=slice_layout, VECTOR=1 << register_bits, LANE_ASM=lane_asm)


def kron_mix(matrix, group: int) -> tuple[tuple, tuple]:
    """(TERMS, FLIP) of `_mix` for a +-1 matrix (nested sequences of ints, order a multiple of
    `group`) mixed in pairs (group 2) or quads (group 4)."""
    k = len(matrix)
    if group not in (2, 4):
        raise ValueError(f"kron_mix: columns mix in pairs or quads, not groups of {group}")
    if k % group or any(len(row) != k or any(v not in (1, -1) for v in row) for row in matrix):
        raise ValueError(f"kron_mix: a square +-1 matrix of order a multiple of {group}")
    terms, flip = [], []
    for row in matrix:
        codes = []
        for i in range(k // group):
            # the row's part on the group, sign a taken out: a * (x_a + (b/a) x_b [+ (c/a) (x_c + (d/c) x_d)])
            a, b, *cd = row[group * i:group * (i + 1)]
            combination = int(b != a)
            if cd:
                c, d = cd
                combination = combination * 4 + (d != c) * 2 + (c != a)
            codes.append(((i << (group - 1)) + combination) * 2 + (a < 0))
        flipped = all(code & 1 for code in codes)
        if flipped:  # every term negative: sum them positively, negate the row at the end
            codes = [code ^ 1 for code in codes]
        first = next(code for code in codes if not code & 1)
        codes.remove(first)
        terms += [first, *codes]
        flip.append(int(flipped))
    return tuple(terms), tuple(flip)


def walsh_plan(log_n: int, num_warps: int, register_bits: int = REGISTER_BITS) -> dict:
    """Layouts and stage boundaries for rows of 2^log_n (8 <= log_n <= 15), as the kernel's
    constexprs (IO_LAYOUT, S0..S3, E0..E3, N_STAGES, LOG_N, M); a tile holds M >> log_n rows.

    A tile has T index bits: the row's log_n bits (0 = contiguous), then row bits. Each thread
    holds 2^register_bits values; a row shorter than a warp's share puts row bits in registers
    (so a thread still has that many values), a longer one spreads over warp bits; the remaining
    warp bits take further rows. The IO layout keeps bits 0-2 in registers and 3-7 in lanes
    (coalesced 16-byte accesses) and the row's top bits in registers; a stage layout holds the
    next run of unprocessed bits in registers, stopping where the IO layout's register bits
    resume."""
    if not 8 <= log_n <= 15:
        raise ValueError(f"walsh_plan: log_n must be in [8, 15], got {log_n}")
    if not VECTOR_BITS <= register_bits <= 7:
        raise ValueError(f"walsh_plan: register_bits must be in [3, 7], got {register_bits}")
    warp_bits = num_warps.bit_length() - 1
    row_warp_bits_needed = max(0, log_n - (register_bits + LANE_BITS))
    if (1 << warp_bits) != num_warps or warp_bits < row_warp_bits_needed:
        raise ValueError(f"walsh_plan: {num_warps} warps cannot hold a row of 2^{log_n}")
    register_row_bits = max(0, register_bits + LANE_BITS - log_n)
    warp_row_bits = warp_bits - row_warp_bits_needed
    total = log_n + register_row_bits + warp_row_bits
    top_in_registers = register_bits - VECTOR_BITS - register_row_bits
    io_regs = (list(range(VECTOR_BITS)) + list(range(log_n - top_in_registers, log_n))
               + list(range(log_n, log_n + register_row_bits)))
    io_lanes = list(range(VECTOR_BITS, VECTOR_BITS + LANE_BITS))
    io_warps = [b for b in range(total) if b not in io_regs and b not in io_lanes]
    return _stage_plan(io_regs, io_lanes, io_warps, total, log_n, register_bits, lane_level=True)


def _linear_layout(regs: list, lanes: list, warps: list, total: int):
    """The 1-D layout of a tile of 2^total elements whose index bits `regs` are register bits,
    `lanes` lane bits and `warps` warp bits (together every bit once)."""
    assert sorted(regs + lanes + warps) == list(range(total)), (regs, lanes, warps)
    return gl.DistributedLinearLayout(
        reg_bases=[[1 << b] for b in regs], lane_bases=[[1 << b] for b in lanes],
        warp_bases=[[1 << b] for b in warps], block_bases=[], shape=[1 << total])


def _stage_plan(io_regs: list, io_lanes: list, io_warps: list, total: int, log_n: int,
                register_bits: int, first: int = 0, lane_level: bool = False) -> dict:
    """The constexprs of a tile of 2^total elements whose rows are 2^log_n long, given its IO
    layout's register, lane and warp bits: the IO layout and the stages that bring every
    butterfly bit first..first+log_n-1 into registers in turn (stage 0 is the IO layout). Bits
    below `first` (the kron kernel's slice bits) stay in registers in every stage.

    lane_level: a single bit left between a stage's registers and the IO layout's (8192 on 64
    values per thread: bit 9) would cost a stage of its own, two more trips through shared
    memory; where it is a lane bit of the stage before, that stage runs it by warp shuffle
    instead (LANE_STAGE, LANE_ASM: `_lane_butterfly`)."""

    def layout(regs, lanes, warps):
        return _linear_layout(regs, lanes, warps, total)

    fixed = list(range(first))
    assert all(b in io_regs for b in fixed), io_regs
    io_layout = layout(io_regs, io_lanes, io_warps)
    stages = []  # (layout, end bit)
    lane_stage, lane_asm = -1, ""
    current, current_regs, current_lanes = io_layout, io_regs, io_lanes
    last = first + log_n
    b = first
    while b < last:
        if b in io_regs and b not in current_regs:
            current, current_regs, current_lanes = io_layout, io_regs, io_lanes
        elif (lane_level and lane_stage < 0 and stages and b not in current_regs and b in current_lanes
              and (b + 1 == last or b + 1 in io_regs)):
            lane_stage, lane_asm = len(stages) - 1, lane_butterfly_asm(1 << current_lanes.index(b))
            stages[-1] = (current, b + 1)
            b += 1
            continue
        elif b not in current_regs:
            stop = min([last, b + register_bits - first] + [i for i in io_regs if i > b])
            regs = fixed + list(range(b, stop))
            rest = [i for i in range(total) if i not in regs]
            regs += rest[: register_bits - len(regs)]
            rest = [i for i in range(total) if i not in regs]
            current, current_regs, current_lanes = layout(regs, rest[:LANE_BITS], rest[LANE_BITS:]), regs, rest[:LANE_BITS]
        end = b
        while end < last and end in current_regs:
            end += 1
        stages.append((current, end))
        b = end
    assert lane_stage <= MAX_STAGES - 2, lane_stage  # `_walsh` runs a lane level after stages 0-2 only
    if len(stages) > MAX_STAGES:
        raise ValueError(f"{len(stages)} layout stages for rows of 2^{log_n} (at most {MAX_STAGES})")
    consts = {"IO_LAYOUT": io_layout, "N_STAGES": len(stages), "LOG_N": log_n, "M": 1 << total}
    if lane_level:  # (the kron kernel's plan has neither)
        consts.update(LANE_STAGE=lane_stage, LANE_ASM=lane_asm)
    for k in range(MAX_STAGES):
        stage_layout, end = stages[min(k, len(stages) - 1)]
        consts[f"S{k}"] = stage_layout
        consts[f"E{k}"] = end
    return consts


def stage_register_bits(consts: dict, first: int = 0) -> list[tuple[list[int], int, int, list[int]]]:
    """For tests: each stage's register bits, its bit range [first, end) (levels from `first`)
    and the lane bits among them (the LANE_STAGE's last bit, run by `_lane_butterfly`)."""
    out = []
    for k in range(consts["N_STAGES"]):
        regs = [basis[0].bit_length() - 1 for basis in consts[f"S{k}"].reg_bases]
        end = consts[f"E{k}"]
        out.append((regs, first, end, [end - 1] if consts.get("LANE_STAGE", -1) == k else []))
        first = end
    return out
