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
# (IO_BF16_NATIVE = 3, defined below: bf16 as bf16, for compiled GPU code)


@triton.jit
def _load_f32(ptr, offsets, mask, IO: tl.constexpr):
    """Load activations as fp32. bf16 -> fp32 is a 16-bit left shift of the bit pattern (exact,
    subnormals included); we do it by hand because Triton's CPU interpreter flushes bf16
    subnormals, and on the GPU it costs the same."""
    return _load_f32_fast(ptr + offsets, mask, IO)


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
    elif IO == 3:
        return v.to(tl.bfloat16).to(tl.float32)
    elif IO == 1:
        return v.to(tl.float16).to(tl.float32)
    else:
        return v


@triton.jit
def _store_f32(ptr, offsets, v, mask, IO: tl.constexpr):
    _store_f32_fast(ptr + offsets, v, mask, IO)


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
    y = _fake_quantize_tile(x, MODE, QMAX_LOG2, QMAX_SIGNIFICAND, SHARED_OFFSET, SHARED_MIN,
                            SHARED_MAX, ZERO_SHARED, CODE_SHIFT, IS_INT, CODE_MAX_POS,
                            CODE_MAX_NEG, ELEM_EMIN, ELEM_MAN_BITS, ELEM_MAX, NONFINITE)
    _store_f32(y_ptr, offsets, y, mask, IO)



IO_BF16_NATIVE = 3  # bf16 loaded/stored as bf16 (compiled GPU code: the conversions are exact / RNE)


@triton.jit
def _load_f32_fast(ptrs, mask, IO: tl.constexpr):
    """Load as fp32; masked-off elements read as 0 (the reference's zero padding). `mask` may
    be None (whole tiles): then no `other` either."""
    if mask is None:
        raw = tl.load(ptrs)
    else:
        raw = tl.load(ptrs, mask=mask, other=0)
    if IO == 2:
        bits = raw.to(tl.int32) & 0xFFFF
        return (bits << 16).to(tl.float32, bitcast=True)
    else:
        return raw.to(tl.float32)


@triton.jit
def _store_f32_fast(ptrs, v, mask, IO: tl.constexpr):
    if IO == 2:
        tl.store(ptrs, _bf16_bits(v).to(tl.int16), mask=mask)
    elif IO == 3:
        # cvt.rn.bf16.f32: round half to even, like torch's .to(torch.bfloat16)
        tl.store(ptrs, v.to(tl.bfloat16), mask=mask)
    else:
        tl.store(ptrs, v.to(ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _fake_quantize_tile(x, MODE: tl.constexpr, QMAX_LOG2: tl.constexpr,
                        QMAX_SIGNIFICAND: tl.constexpr, SHARED_OFFSET: tl.constexpr,
                        SHARED_MIN: tl.constexpr, SHARED_MAX: tl.constexpr,
                        ZERO_SHARED: tl.constexpr, CODE_SHIFT: tl.constexpr,
                        IS_INT: tl.constexpr, CODE_MAX_POS: tl.constexpr,
                        CODE_MAX_NEG: tl.constexpr, ELEM_EMIN: tl.constexpr,
                        ELEM_MAN_BITS: tl.constexpr, ELEM_MAX: tl.constexpr,
                        NONFINITE: tl.constexpr):
    """Same math as `_fake_quantize_blocks` (fp32 tile [G, B], rows = MX blocks), fewer
    instructions per element, for the block-NaN policy:

    * one reduction: the max of |x|'s bit patterns (sign cleared). Non-negative IEEE floats order
      like their bit patterns, and NaN / Inf patterns (exponent all ones) sort above every finite
      value, so this max is the bit pattern of amax for a finite block and >= 0x7F800000 exactly
      when the block holds a NaN or an Inf (which then becomes all NaN, as in the reference);
    * the power-of-two factors are built once per block and broadcast;
    * the integer grid needs no range select: |scaled| <= 2^(bits) in any finite block, and the
      clamp to the code range follows;
    * the minifloat rounding constant 1.5 * 2^k is assembled from its bits."""
    if NONFINITE != 0:
        return _fake_quantize_blocks(x, MODE, QMAX_LOG2, QMAX_SIGNIFICAND, SHARED_OFFSET,
                                     SHARED_MIN, SHARED_MAX, ZERO_SHARED, CODE_SHIFT, IS_INT,
                                     CODE_MAX_POS, CODE_MAX_NEG, ELEM_EMIN, ELEM_MAN_BITS,
                                     ELEM_MAX, NONFINITE)
    bits = x.to(tl.int32, bitcast=True)
    sign_bit = bits & (-2147483648)
    amax_bits = tl.max(bits & 0x7FFFFFFF, axis=1)
    nonfinite = amax_bits >= 0x7F800000
    is_zero = amax_bits == 0
    amax = tl.where(is_zero, 1065353216, amax_bits).to(tl.float32, bitcast=True)  # 1.0 if zero
    block_exp = _block_exponent(amax, MODE, QMAX_LOG2, QMAX_SIGNIFICAND)
    shared_exp = tl.minimum(tl.maximum(block_exp + SHARED_OFFSET, SHARED_MIN), SHARED_MAX)
    shared_exp = tl.where(is_zero, ZERO_SHARED, shared_exp)
    code_exp = shared_exp + CODE_SHIFT
    # 2^-code_exp and 2^code_exp, each as two normal factors (see _mul_pow2)
    down_lo = (-code_exp) >> 1
    down_1 = _pow2(down_lo)[:, None]
    down_2 = _pow2(-code_exp - down_lo)[:, None]
    up_lo = code_exp >> 1
    up_1 = _pow2(up_lo)[:, None]
    up_2 = _pow2(code_exp - up_lo)[:, None]
    mag = tl.abs((x * down_1) * down_2)
    if IS_INT:
        rounded = (mag + 12582912.0) - 12582912.0  # RNE to an integer (mag < 2^22 here)
        limit = tl.where(sign_bit != 0, CODE_MAX_NEG, CODE_MAX_POS)
        rounded = tl.minimum(rounded, limit)
    else:
        biased = (mag.to(tl.int32, bitcast=True) >> 23) & 0xFF
        elem_exp = tl.maximum(biased - 127, ELEM_EMIN)
        # 1.5 * 2^(elem_exp - man_bits + 23): exponent field plus the top mantissa bit
        magic = (((elem_exp - ELEM_MAN_BITS + 150) << 23) | 0x400000).to(tl.float32, bitcast=True)
        rounded = tl.minimum((mag + magic) - magic, ELEM_MAX)
    signed = (rounded.to(tl.int32, bitcast=True) | sign_bit).to(tl.float32, bitcast=True)
    out = (signed * up_1) * up_2
    return tl.where(nonfinite[:, None], float("nan"), out)


@triton.jit
def mx_fake_quantize_flat_kernel(
    x_ptr, y_ptr, n_elements,
    BLOCK: tl.constexpr, GROUP: tl.constexpr, NEED_MASK: tl.constexpr, IO: tl.constexpr,
    MODE: tl.constexpr, QMAX_LOG2: tl.constexpr, QMAX_SIGNIFICAND: tl.constexpr,
    SHARED_OFFSET: tl.constexpr, SHARED_MIN: tl.constexpr, SHARED_MAX: tl.constexpr,
    ZERO_SHARED: tl.constexpr, CODE_SHIFT: tl.constexpr, IS_INT: tl.constexpr,
    CODE_MAX_POS: tl.constexpr, CODE_MAX_NEG: tl.constexpr, ELEM_EMIN: tl.constexpr,
    ELEM_MAN_BITS: tl.constexpr, ELEM_MAX: tl.constexpr, NONFINITE: tl.constexpr,
):
    """Rows that are a whole number of MX blocks: the tensor is a flat run of blocks of BLOCK
    contiguous elements; one program = GROUP consecutive blocks. The program's base offset is
    one 64-bit scalar; the per-element offsets inside the tile stay 32-bit. No mask unless the
    element count is not a multiple of the tile (NEED_MASK)."""
    TILE: tl.constexpr = GROUP * BLOCK
    base = tl.program_id(0).to(tl.int64) * TILE
    offsets = tl.arange(0, GROUP)[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    if NEED_MASK:
        mask = offsets < n_elements - base
    else:
        mask = None
    x = _load_f32_fast(x_ptr + base + offsets, mask, IO)
    y = _fake_quantize_tile(x, MODE, QMAX_LOG2, QMAX_SIGNIFICAND, SHARED_OFFSET, SHARED_MIN,
                            SHARED_MAX, ZERO_SHARED, CODE_SHIFT, IS_INT, CODE_MAX_POS,
                            CODE_MAX_NEG, ELEM_EMIN, ELEM_MAN_BITS, ELEM_MAX, NONFINITE)
    _store_f32_fast(y_ptr + base + offsets, y, mask, IO)


@triton.jit
def _split_dot(a, b, acc, B_SPLIT: tl.constexpr, MMA: tl.constexpr):
    """acc + a @ b where a is exact in bf16 (+-1 / 0 Hadamard factor) and b is fp32.

    MMA == 0 (Triton's CPU interpreter): plain fp32 IEEE dot. Otherwise b is written as
    B_SPLIT bf16 pieces b = hi + mid + lo (each the bf16 rounding of what is left; three pieces
    carry all 24 significand bits of fp32), and each piece goes through the tensor cores with
    exact products and fp32 accumulation. B_SPLIT == 1 means b is already exact in bf16."""
    if MMA == 0:
        return tl.dot(a, b, acc, input_precision="ieee")
    a16 = a.to(tl.bfloat16)
    hi = b.to(tl.bfloat16)
    acc = tl.dot(a16, hi, acc)
    if B_SPLIT >= 2:
        rest = b - hi.to(tl.float32)
        mid = rest.to(tl.bfloat16)
        acc = tl.dot(a16, mid, acc)
        if B_SPLIT >= 3:
            lo = (rest - mid.to(tl.float32)).to(tl.bfloat16)
            acc = tl.dot(a16, lo, acc)
    return acc


@triton.jit
def _split_dot_right(a, b, A_SPLIT: tl.constexpr, A16: tl.constexpr, MMA: tl.constexpr):
    """a @ b where b is exact in bf16/fp16 (Hadamard factor, transposed) and a is fp32 whose
    values are exact in A16 when A_SPLIT == 1 (16-bit activations, quantized values);
    A_SPLIT == 3: a is split into three bf16 pieces like in _split_dot."""
    if MMA == 0:
        return tl.dot(a, b, input_precision="ieee")
    if A_SPLIT == 1:
        return tl.dot(a.to(A16), b.to(A16))
    b16 = b.to(tl.bfloat16)
    hi = a.to(tl.bfloat16)
    rest = a - hi.to(tl.float32)
    mid = rest.to(tl.bfloat16)
    lo = (rest - mid.to(tl.float32)).to(tl.bfloat16)
    acc = tl.dot(hi, b16)
    acc = tl.dot(mid, b16, acc)
    return tl.dot(lo, b16, acc)


@triton.jit
def mx_rotated_kernel(
    x_ptr, y_ptr, n_rows, row_len, a_dim, b_dim,
    fa_ptr, fb_t_ptr, ia_ptr, ib_t_ptr, forward_scale, inverse_scale,
    M: tl.constexpr, B_PAD: tl.constexpr, HAS_A: tl.constexpr, MMA: tl.constexpr,
    IN_SPLIT: tl.constexpr, IN16: tl.constexpr, MID_SPLIT: tl.constexpr,
    IO: tl.constexpr, BLOCK: tl.constexpr,
    MODE: tl.constexpr, QMAX_LOG2: tl.constexpr, QMAX_SIGNIFICAND: tl.constexpr,
    SHARED_OFFSET: tl.constexpr, SHARED_MIN: tl.constexpr, SHARED_MAX: tl.constexpr,
    ZERO_SHARED: tl.constexpr, CODE_SHIFT: tl.constexpr, IS_INT: tl.constexpr,
    CODE_MAX_POS: tl.constexpr, CODE_MAX_NEG: tl.constexpr, ELEM_EMIN: tl.constexpr,
    ELEM_MAN_BITS: tl.constexpr, ELEM_MAX: tl.constexpr, NONFINITE: tl.constexpr,
):
    """x -> R^-1 Q(R x), one read and one write, with R = forward_scale * (A kron B).

    HAS_A: one program = one row, seen as the tile X [M = a_dim padded, B_PAD = b_dim]
    (row-major: vec(X) is the row), and R x = vec(A X B^T): a right multiplication by B^T
    along the contiguous axis, then a left multiplication by A -- two plain MMAs, no transpose.
    Without A (R = s * B dense, n <= 128): one program = M rows, one right multiplication.
    Exactness: 16-bit activations and quantized values are exact MMA inputs (IN_SPLIT 1 /
    the inverse's first stage); fp32 intermediates are split into MID_SPLIT bf16 pieces."""
    pid = tl.program_id(0)
    i = tl.arange(0, M)
    j = tl.arange(0, B_PAD)
    kb = tl.arange(0, B_PAD)
    if HAS_A:
        base = pid.to(tl.int64) * row_len
        offsets = i[:, None] * b_dim + j[None, :]
        mask = (i < a_dim)[:, None] & (j < b_dim)[None, :]
    else:
        base = pid.to(tl.int64) * M * row_len
        offsets = i[:, None] * row_len + j[None, :]
        mask = (i < n_rows - pid * M)[:, None] & (j < b_dim)[None, :]
    x = _load_f32_fast(x_ptr + base + offsets, mask, IO)
    fb_t = tl.load(fb_t_ptr + kb[:, None] * B_PAD + kb[None, :])
    z = _split_dot_right(x, fb_t, IN_SPLIT, IN16, MMA)
    if HAS_A:
        ka = tl.arange(0, M)
        fa = tl.load(fa_ptr + ka[:, None] * M + ka[None, :])
        z = _split_dot(fa, z, tl.zeros((M, B_PAD), tl.float32), MID_SPLIT, MMA)
    # The reference casts R x to the activation dtype before quantizing (Rotation.forward keeps
    # the dtype), and Q's output too (quantize keeps it): round the same way here.
    rotated = _round_through_io(z * forward_scale, IO)
    blocks = tl.reshape(rotated, (M * B_PAD // BLOCK, BLOCK))
    quantized = _fake_quantize_tile(blocks, MODE, QMAX_LOG2, QMAX_SIGNIFICAND, SHARED_OFFSET,
                                    SHARED_MIN, SHARED_MAX, ZERO_SHARED, CODE_SHIFT, IS_INT,
                                    CODE_MAX_POS, CODE_MAX_NEG, ELEM_EMIN, ELEM_MAN_BITS,
                                    ELEM_MAX, NONFINITE)
    quantized = _round_through_io(tl.reshape(quantized, (M, B_PAD)), IO)
    ib_t = tl.load(ib_t_ptr + kb[:, None] * B_PAD + kb[None, :])
    # quantized values carry <= 8 significant bits: exact in bf16
    w = _split_dot_right(quantized, ib_t, 1, tl.bfloat16, MMA)
    if HAS_A:
        ia = tl.load(ia_ptr + ka[:, None] * M + ka[None, :])
        w = _split_dot(ia, w, tl.zeros((M, B_PAD), tl.float32), MID_SPLIT, MMA)
    _store_f32_fast(y_ptr + base + offsets, w * inverse_scale, mask, IO)
