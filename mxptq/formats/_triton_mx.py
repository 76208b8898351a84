"""Triton kernels for MX fake-quantization (quantize + dequantize in one pass over memory).

Only `mxptq.formats.kernels` imports this module, and only after `import triton` succeeded.
Everything here is plain integer / IEEE-fp32 arithmetic chosen so that the result is *bit-exact*
against the torch reference in `mxptq.formats` (see kernels.py for the argument, and
tests/formats/test_kernels.py for the check):

* the block exponent comes from the fp32 bit pattern of the block's amax (no log2),
* scaling by 2^k is a multiplication by an exactly-constructed power of two, split in two
  factors so that neither factor is an fp32 subnormal (2^-127 would be flushed to zero on GPUs
  that flush denormals; the split keeps every intermediate exact wherever it can matter),
* round-half-to-even onto a grid of quantum 2^q is `(m + 1.5*2^(q+23)) - 1.5*2^(q+23)`, the
  classic IEEE "magic number" rounding, exact for m < 2^(q+22) (Goldberg 1991, sec. 2.4; it is
  what IEEE-754 addition does in round-to-nearest-even mode).
"""

import triton
import triton.language as tl

# Block-exponent modes (what `_block_exponent` returns, before the format's offset is added).
MODE_FLOOR = 0  # floor(log2 amax)                       OCP MX v1.0 sec. 6.3 (MXFP, MXINT8)
MODE_CEIL = 1  # ceil(log2 amax)                         tutorial MXINT rule
MODE_SYMMETRIC = 2  # smallest e with amax <= qmax * 2^e   symmetric MXINT rule

# What a block containing NaN / Inf becomes (mirrors the reference's policy, see kernels.py).
NONFINITE_BLOCK_NAN = 0  # the whole block becomes NaN (OCP: a NaN scale makes every element NaN)
NONFINITE_ELEMENTWISE = 1  # only the non-finite elements stay non-finite


@triton.jit
def _pow2(k):
    """2^k as fp32 for integer k in [-126, 127], built from the exponent bits (exact)."""
    return ((k + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _mul_pow2(v, k):
    """v * 2^k for integer k in [-254, 254], as two exact power-of-two multiplications.

    One factor 2^k would be an fp32 subnormal for k = -127 (flushed to zero under FTZ); the split
    keeps both factors normal. The first product is exact whenever the final one can be non-zero
    on any element grid we round to (see module docstring)."""
    k_lo = k >> 1  # floor(k / 2)
    return (v * _pow2(k_lo)) * _pow2(k - k_lo)


@triton.jit
def _floor_log2_and_significand(a):
    """For fp32 a > 0 (normal or subnormal): floor(log2 a) and a's significand as a 24-bit integer
    with the leading one at bit 23 (so a = significand * 2^(floor - 23) exactly)."""
    bits = a.to(tl.int32, bitcast=True)
    biased = (bits >> 23) & 0xFF
    mantissa = bits & 0x7FFFFF
    # Subnormal a = mantissa * 2^-149; mantissa < 2^23 converts to fp32 exactly, and its exponent
    # field gives floor(log2 mantissa) without a count-leading-zeros instruction.
    lead = ((mantissa.to(tl.float32).to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    lead = tl.maximum(lead, 0)
    is_normal = biased > 0
    floor_log2 = tl.where(is_normal, biased - 127, lead - 149)
    significand = tl.where(is_normal, mantissa | 0x800000, mantissa << (23 - lead))
    return floor_log2, significand


@triton.jit
def _block_exponent(amax, MODE: tl.constexpr, QMAX_LOG2: tl.constexpr, QMAX_SIGNIFICAND: tl.constexpr):
    """Integer block exponent from the block's amax (> 0, finite) by MODE (see constants above)."""
    floor_log2, significand = _floor_log2_and_significand(amax)
    if MODE == 0:
        e = floor_log2
    elif MODE == 1:
        # ceil(log2 a) = floor(log2 a) unless a is not a power of two.
        e = floor_log2 + (significand != 0x800000).to(tl.int32)
    else:
        # Smallest e with amax <= qmax * 2^e. With amax = sa * 2^(f-23), qmax = sq * 2^(k-23)
        # (sa, sq 24-bit significands), the candidate e = f - k works iff sa <= sq, else e + 1.
        e = floor_log2 - QMAX_LOG2 + (significand > QMAX_SIGNIFICAND).to(tl.int32)
    return e


@triton.jit
def _round_to_element_grid(scaled, IS_INT: tl.constexpr, CODE_MAX_POS: tl.constexpr,
                           CODE_MAX_NEG: tl.constexpr, ELEM_EMIN: tl.constexpr,
                           ELEM_MAN_BITS: tl.constexpr, ELEM_MAX: tl.constexpr):
    """Round an fp32 element already divided by its scale onto the element grid (RNE, saturate).

    Works on the magnitude and puts the sign bit back, so -0.3 -> -0.0 like torch.round."""
    sign_bit = scaled.to(tl.int32, bitcast=True) & (-2147483648)
    mag = tl.abs(scaled)
    if IS_INT:
        # Integer grid (quantum 1); magic constant 1.5 * 2^23 rounds half to even for mag < 2^22.
        rounded = tl.where(mag < 4194304.0, (mag + 12582912.0) - 12582912.0, mag)
        limit = tl.where(sign_bit != 0, CODE_MAX_NEG, CODE_MAX_POS)
        rounded = tl.minimum(rounded, limit)
    else:
        # Minifloat grid: the element exponent is max(floor(log2 mag), emin) (subnormals share
        # emin), quantum 2^(that - man_bits). OCP MX v1.0 sec. 5.3 / 6.3: RNE, saturate to max.
        biased = (mag.to(tl.int32, bitcast=True) >> 23) & 0xFF
        elem_exp = tl.maximum(biased - 127, ELEM_EMIN)
        magic = _pow2(elem_exp - ELEM_MAN_BITS + 23) * 1.5
        rounded = (mag + magic) - magic
        rounded = tl.minimum(rounded, ELEM_MAX)
    return (rounded.to(tl.int32, bitcast=True) | sign_bit).to(tl.float32, bitcast=True)


@triton.jit
def _fake_quantize_blocks(x, MODE: tl.constexpr, QMAX_LOG2: tl.constexpr,
                          QMAX_SIGNIFICAND: tl.constexpr, SHARED_OFFSET: tl.constexpr,
                          SHARED_MIN: tl.constexpr, SHARED_MAX: tl.constexpr,
                          ZERO_SHARED: tl.constexpr, CODE_SHIFT: tl.constexpr,
                          IS_INT: tl.constexpr, CODE_MAX_POS: tl.constexpr,
                          CODE_MAX_NEG: tl.constexpr, ELEM_EMIN: tl.constexpr,
                          ELEM_MAN_BITS: tl.constexpr, ELEM_MAX: tl.constexpr,
                          NONFINITE: tl.constexpr):
    """Fake-quantize an fp32 tile [G, B] whose rows are MX blocks; returns fp32 [G, B]."""
    is_nan = x != x  # noqa: PLR0124 - the IEEE NaN test
    is_inf = tl.abs(x) == float("inf")
    finite = tl.abs(x) < float("inf")  # False for NaN and +-Inf
    x_finite = tl.where(finite, x, 0.0)
    amax = tl.max(tl.abs(x_finite), axis=1)
    block_exp = _block_exponent(tl.where(amax == 0.0, 1.0, amax), MODE, QMAX_LOG2, QMAX_SIGNIFICAND)
    shared_exp = tl.minimum(tl.maximum(block_exp + SHARED_OFFSET, SHARED_MIN), SHARED_MAX)
    shared_exp = tl.where(amax == 0.0, ZERO_SHARED, shared_exp)
    code_exp = (shared_exp + CODE_SHIFT)[:, None]
    scaled = _mul_pow2(x_finite, -code_exp)
    rounded = _round_to_element_grid(scaled, IS_INT, CODE_MAX_POS, CODE_MAX_NEG, ELEM_EMIN,
                                     ELEM_MAN_BITS, ELEM_MAX)
    out = _mul_pow2(rounded, code_exp)
    if NONFINITE == 0:
        block_nonfinite = tl.max((~finite).to(tl.int32), axis=1) > 0
        out = tl.where(block_nonfinite[:, None], float("nan"), out)
    else:
        out = tl.where(is_nan, float("nan"), out)
        out = tl.where(is_inf, x, out)
    return out


# IO dtype codes (constexpr): the activation dtype the kernel loads and stores.
IO_FP32 = 0
IO_FP16 = 1
IO_BF16 = 2  # passed as int16 views and converted with bit operations (see _load_f32)


@triton.jit
def _load_f32(ptr, offsets, mask, IO: tl.constexpr):
    """Load activations as fp32. bf16 -> fp32 is a 16-bit left shift of the bit pattern (exact,
    subnormals included); we do it by hand because Triton's CPU interpreter flushes bf16
    subnormals, and on the GPU it costs the same."""
    if IO == 2:
        bits = tl.load(ptr + offsets, mask=mask, other=0).to(tl.int32) & 0xFFFF
        return (bits << 16).to(tl.float32, bitcast=True)
    else:
        return tl.load(ptr + offsets, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _bf16_bits(v):
    """fp32 -> bf16 bit pattern (int32; low 16 bits meaningful), round half to even, like
    torch's `.to(torch.bfloat16)`: add 0x7FFF plus the lowest kept bit, drop 16 bits. Overflow
    carries into the exponent and gives inf, as it should; NaN stays a (quiet) NaN."""
    bits = v.to(tl.int32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return tl.where(v != v, (bits >> 16) | 0x40, rounded)  # noqa: PLR0124 - NaN test


@triton.jit
def _round_through_io(v, IO: tl.constexpr):
    """v (fp32) rounded to the activation dtype and back: what a torch `.to(dtype)` does."""
    if IO == 2:
        return (_bf16_bits(v) << 16).to(tl.float32, bitcast=True)
    elif IO == 1:
        return v.to(tl.float16).to(tl.float32)
    else:
        return v


@triton.jit
def _store_f32(ptr, offsets, v, mask, IO: tl.constexpr):
    if IO == 2:
        tl.store(ptr + offsets, _bf16_bits(v).to(tl.int16), mask=mask)
    else:
        tl.store(ptr + offsets, v.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def mx_fake_quantize_kernel(
    x_ptr, y_ptr, n_blocks_total, row_len, blocks_per_row,
    BLOCK: tl.constexpr, GROUP: tl.constexpr, EVEN_ROWS: tl.constexpr, WIDE_INDEX: tl.constexpr,
    IO: tl.constexpr,
    MODE: tl.constexpr, QMAX_LOG2: tl.constexpr, QMAX_SIGNIFICAND: tl.constexpr,
    SHARED_OFFSET: tl.constexpr, SHARED_MIN: tl.constexpr, SHARED_MAX: tl.constexpr,
    ZERO_SHARED: tl.constexpr, CODE_SHIFT: tl.constexpr, IS_INT: tl.constexpr,
    CODE_MAX_POS: tl.constexpr, CODE_MAX_NEG: tl.constexpr, ELEM_EMIN: tl.constexpr,
    ELEM_MAN_BITS: tl.constexpr, ELEM_MAX: tl.constexpr, NONFINITE: tl.constexpr,
):
    """One program = GROUP consecutive MX blocks of a row-major [rows, row_len] tensor.

    Blocks are numbered row by row; a row whose length is not a multiple of BLOCK ends in a
    partial block whose missing elements are masked loads of 0 (= the reference's zero padding)."""
    block_ids = tl.program_id(0) * GROUP + tl.arange(0, GROUP)
    if WIDE_INDEX:
        block_ids = block_ids.to(tl.int64)
    lanes = tl.arange(0, BLOCK)
    if EVEN_ROWS:
        # Blocks tile rows exactly: block b covers elements [b*BLOCK, (b+1)*BLOCK).
        offsets = block_ids[:, None] * BLOCK + lanes[None, :]
        mask = (block_ids < n_blocks_total)[:, None] & (lanes < BLOCK)[None, :]
    else:
        row = block_ids // blocks_per_row
        col = (block_ids - row * blocks_per_row)[:, None] * BLOCK + lanes[None, :]
        offsets = row[:, None] * row_len + col
        mask = (block_ids < n_blocks_total)[:, None] & (col < row_len)
    x = _load_f32(x_ptr, offsets, mask, IO)
    y = _fake_quantize_blocks(x, MODE, QMAX_LOG2, QMAX_SIGNIFICAND, SHARED_OFFSET, SHARED_MIN,
                              SHARED_MAX, ZERO_SHARED, CODE_SHIFT, IS_INT, CODE_MAX_POS,
                              CODE_MAX_NEG, ELEM_EMIN, ELEM_MAN_BITS, ELEM_MAX, NONFINITE)
    _store_f32(y_ptr, offsets, y, mask, IO)


@triton.jit
def _kron_apply(X, a_ptr, b_ptr, ROWS: tl.constexpr, A_PAD: tl.constexpr, B_DIM: tl.constexpr,
                HAS_A: tl.constexpr, FIRST_DTYPE: tl.constexpr):
    """Per row r of the fp32 tile X [ROWS, A_PAD, B_DIM]: Y_r = A X_r B^T (row-major
    vec(Y_r) = (A kron B) vec(X_r)). The factors come transposed (A^T [A_PAD, A_PAD],
    B^T [B_DIM, B_DIM], fp32, zero-padded), so both stages are right-multiplications.

    First stage X @ B^T: with FIRST_DTYPE fp16/bf16 the caller guarantees X and B are exact in
    it (16-bit activations, quantized values, +-1 factors), so the MMA is exact up to fp32
    accumulation; with fp32 it runs as 3xTF32 (about fp32 accuracy). The second stage always
    reads an fp32 intermediate and runs as 3xTF32."""
    kb = tl.arange(0, B_DIM)
    bt = tl.load(b_ptr + kb[:, None] * B_DIM + kb[None, :])
    X2 = tl.reshape(X, (ROWS * A_PAD, B_DIM))
    if FIRST_DTYPE == tl.float32:
        Z = tl.dot(X2, bt, input_precision="tf32x3")
    else:
        Z = tl.dot(X2.to(FIRST_DTYPE), bt.to(FIRST_DTYPE))
    if HAS_A:
        ka = tl.arange(0, A_PAD)
        at = tl.load(a_ptr + ka[:, None] * A_PAD + ka[None, :])
        Zt = tl.reshape(tl.permute(tl.reshape(Z, (ROWS, A_PAD, B_DIM)), (0, 2, 1)),
                        (ROWS * B_DIM, A_PAD))
        Yt = tl.dot(Zt, at, input_precision="tf32x3")
        Y = tl.permute(tl.reshape(Yt, (ROWS, B_DIM, A_PAD)), (0, 2, 1))
    else:
        Y = tl.reshape(Z, (ROWS, A_PAD, B_DIM))
    return Y


@triton.jit
def mx_rotated_fake_quantize_kernel(
    x_ptr, y_ptr, n_rows, row_len, a_dim, b_dim,
    fa_ptr, fb_ptr, ia_ptr, ib_ptr, forward_scale, inverse_scale,
    ROWS: tl.constexpr, A_PAD: tl.constexpr, B_DIM: tl.constexpr, HAS_A: tl.constexpr,
    FORWARD_DTYPE: tl.constexpr, INVERSE_DTYPE: tl.constexpr, WIDE_INDEX: tl.constexpr,
    IO: tl.constexpr, BLOCK: tl.constexpr,
    MODE: tl.constexpr, QMAX_LOG2: tl.constexpr, QMAX_SIGNIFICAND: tl.constexpr,
    SHARED_OFFSET: tl.constexpr, SHARED_MIN: tl.constexpr, SHARED_MAX: tl.constexpr,
    ZERO_SHARED: tl.constexpr, CODE_SHIFT: tl.constexpr, IS_INT: tl.constexpr,
    CODE_MAX_POS: tl.constexpr, CODE_MAX_NEG: tl.constexpr, ELEM_EMIN: tl.constexpr,
    ELEM_MAN_BITS: tl.constexpr, ELEM_MAX: tl.constexpr, NONFINITE: tl.constexpr,
):
    """x -> R^-1 Q(R x) for ROWS rows of length row_len = a_dim * b_dim per program, where the
    rotation R = forward_scale * (A kron B) and R^-1 likewise come as small matrices.
    One read, one write. B_DIM is b_dim padded to a power of two; that only happens without A
    (a dense R of any size <= 256), so the flat tile index stays the row index."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    if WIDE_INDEX:
        rows = rows.to(tl.int64)
    i = tl.arange(0, A_PAD)
    j = tl.arange(0, B_DIM)
    offsets = rows[:, None, None] * row_len + i[None, :, None] * b_dim + j[None, None, :]
    mask = (rows < n_rows)[:, None, None] & (i < a_dim)[None, :, None] & (j < b_dim)[None, None, :]
    x = _load_f32(x_ptr, offsets, mask, IO)
    rotated = _kron_apply(x, fa_ptr, fb_ptr, ROWS, A_PAD, B_DIM, HAS_A, FORWARD_DTYPE)
    # The reference path casts R x to the activation dtype before quantizing (Rotation.forward
    # keeps the dtype), and Q's output too (quantize keeps it): round the same way here.
    rotated = _round_through_io(rotated * forward_scale, IO)
    # MX blocks run along the rotated row (flat index i * B_DIM + j); padded rows i >= a_dim are
    # zero, so a last partial block is zero-padded exactly like the reference pads it.
    blocks = tl.reshape(rotated, (ROWS * A_PAD * B_DIM // BLOCK, BLOCK))
    quantized = _fake_quantize_blocks(blocks, MODE, QMAX_LOG2, QMAX_SIGNIFICAND, SHARED_OFFSET,
                                      SHARED_MIN, SHARED_MAX, ZERO_SHARED, CODE_SHIFT, IS_INT,
                                      CODE_MAX_POS, CODE_MAX_NEG, ELEM_EMIN, ELEM_MAN_BITS,
                                      ELEM_MAX, NONFINITE)
    quantized = _round_through_io(tl.reshape(quantized, (ROWS, A_PAD, B_DIM)), IO)
    restored = _kron_apply(quantized, ia_ptr, ib_ptr, ROWS, A_PAD, B_DIM, HAS_A, INVERSE_DTYPE)
    _store_f32(y_ptr, offsets, restored * inverse_scale, mask, IO)
