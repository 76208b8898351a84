"""MX block codec: the one reference implementation of MX quantization in mxptq.

A tensor is cut into blocks of `fmt.block_size` consecutive elements along `axis`. Each block
gets a shared exponent `scale_exp` from its absolute maximum (`scale_exp_from_amax`, formula set
by `fmt.scale_rule`), and each element is rounded onto the element grid of x / 2^scale_exp
(`quantize_elements`). `quantize` returns the dequantized ("fake-quantized") tensor; `encode` /
`decode` give the exact integer codes and E8M0 scale bytes behind it.

Policies (tested in tests/formats/test_mx.py):

* Blocking: the blocked axis is zero-padded at its end, per row, to a multiple of block_size; a
  block never straddles two rows. Padding zeros never raise a block's amax.
* Arithmetic: in fp32 whatever the input dtype; scales are exact powers of two and log2 is exact
  (frexp), so every dequantized value is exact in fp32. The result is cast back to x's dtype,
  which rounds only values outside that dtype's range (e.g. fp16 subnormals, or -2^16 produced
  by the tutorial rule from an fp16 block whose amax is near 65504).
* Shared exponent: clamped to the E8M0 range [-127, 127] (OCP MX v1.0 section 5.4.1).
* All-zero block: scale_exp = -127 (E8M0 byte 0x00), codes 0, decodes to exact zeros.
* NaN / Inf: following OCP MX v1.0 section 6.3, a block containing any NaN or +-Inf gets the NaN
  scale (E8M0 byte 0xFF, int32 scale_exp 128 = SCALE_EXP_NAN) and the whole block decodes to
  NaN; its stored element codes are 0. Under the OCP rule finite inputs never become inf
  (elements saturate). The tutorial and symmetric rules may round a value within one element
  step of 2^128 (beyond fp32's max) up to +-2^128, which fp32 can only hold as +-inf.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from mxptq.formats import mxfp, mxint
from mxptq.formats.exact import exp2i, frexp_exponent
from mxptq.formats.spec import (
    E8M0_BIAS,
    E8M0_NAN,
    SCALE_EXP_MAX,
    SCALE_EXP_MIN,
    SCALE_EXP_NAN,
    SCALE_EXP_ZERO_BLOCK,
    Format,
    ScaleRule,
)

# --- shared exponent ------------------------------------------------------------------------


def scale_exp_from_amax(amax: torch.Tensor, fmt: Format) -> torch.Tensor:
    """Shared exponent (int32) of blocks with absolute maximum `amax`, per `fmt.scale_rule`.

    With amax = m * 2^E (frexp, m in [0.5, 1)): floor(log2 amax) = E - 1 and
    ceil(log2 amax) = E - 1 + [m != 0.5]. Zero -> SCALE_EXP_ZERO_BLOCK (-127); NaN or Inf ->
    SCALE_EXP_NAN (128); otherwise clamped to [-127, 127].
    """
    amax = amax.to(torch.float32).abs()
    mantissa, exponent = frexp_exponent(amax)
    elem = fmt.element
    floor_log2 = exponent - 1
    rule = fmt.scale_rule
    if rule is ScaleRule.MSE:  # the exponent the search starts from (block_scale_exp searches)
        rule = ScaleRule.TUTORIAL if elem.kind == "int" else ScaleRule.OCP
    if rule is ScaleRule.OCP:
        # OCP MX v1.0 section 6.3: X = 2^(floor(log2 amax) - emax_elem)
        scale_exp = floor_log2 - elem.emax
    elif rule is ScaleRule.TUTORIAL:
        # tutorial: e = ceil(log2 amax), step 2^(e-(b-1)) = 2^(scale_exp - (b-2))
        ceil_log2 = floor_log2 + (mantissa != 0.5).to(torch.int32)
        scale_exp = ceil_log2 - 1
    elif rule is ScaleRule.SYMMETRIC:
        # smallest s with amax <= max_value * 2^s. Write max_value = top * 2^emax, top in [1, 2):
        # s = E - 1 - emax fits iff 2m <= top, else one more. (2m and top are exact in fp32.)
        top = elem.max_value / 2.0**elem.emax
        scale_exp = floor_log2 - elem.emax + (2.0 * mantissa > top).to(torch.int32)
    else:  # pragma: no cover - ScaleRule is closed
        raise AssertionError(rule)
    scale_exp = scale_exp.clamp(SCALE_EXP_MIN, SCALE_EXP_MAX)
    scale_exp = torch.where(amax == 0, SCALE_EXP_ZERO_BLOCK, scale_exp)
    return torch.where(torch.isfinite(amax), scale_exp, SCALE_EXP_NAN).to(torch.int32)


def block_scale_exp(blocks: torch.Tensor, fmt: Format) -> torch.Tensor:
    """Shared exponent of each block [..., n_blocks, block_size] -> [..., n_blocks, 1] (int32):
    `scale_exp_from_amax` of its amax, or for the `mse` rule the searched one (ScaleRule.MSE)."""
    if fmt.scale_rule is ScaleRule.MSE:
        return _mse_search(blocks, fmt)[0]
    return scale_exp_from_amax(blocks.abs().amax(dim=-1, keepdim=True), fmt)


def _mse_search(blocks: torch.Tensor, fmt: Format) -> tuple[torch.Tensor, torch.Tensor]:
    """ScaleRule.MSE: (searched exponent [..., n_blocks, 1], the blocks quantized with it)."""
    base = scale_exp_from_amax(blocks.abs().amax(dim=-1, keepdim=True), fmt)
    searchable = (base != SCALE_EXP_NAN) & (base != SCALE_EXP_ZERO_BLOCK)
    best, best_q = base, quantize_elements(blocks, fmt, base)
    best_error = (best_q - blocks).square().sum(dim=-1, keepdim=True)
    for step in (-1, 1):  # strict improvement only: ties stay with r, then r - 1
        candidate = torch.where(searchable, (base + step).clamp(SCALE_EXP_MIN, SCALE_EXP_MAX), base)
        q = quantize_elements(blocks, fmt, candidate)
        error = (q - blocks).square().sum(dim=-1, keepdim=True)
        better = error < best_error
        best = torch.where(better, candidate, best)
        best_q = torch.where(better, q, best_q)
        best_error = torch.where(better, error, best_error)
    return best, best_q


def _scale_factor(scale_exp: torch.Tensor) -> torch.Tensor:
    """2^scale_exp in fp32, NaN where scale_exp is the NaN marker (so the block decodes to NaN)."""
    scale_exp = scale_exp.to(torch.int32)
    factor = exp2i(scale_exp.clamp(SCALE_EXP_MIN, SCALE_EXP_MAX))
    return torch.where(scale_exp == SCALE_EXP_NAN, torch.nan, factor)


# --- elements -------------------------------------------------------------------------------


def _round_elements(x: torch.Tensor, fmt: Format, scale_exp: torch.Tensor) -> torch.Tensor:
    """x / 2^scale_exp rounded onto the element grid (element values, fp32). NaN-block entries
    are garbage here; callers apply the NaN scale (quantize) or zero them (encode)."""
    if fmt.element.kind == "int":
        return _round_int_codes(x, fmt, scale_exp) * float(2.0**-fmt.element.man_bits)
    return mxfp.round_to_element(_divide_by_scale(x, scale_exp), fmt.element)


def _divide_by_scale(x: torch.Tensor, scale_exp: torch.Tensor) -> torch.Tensor:
    # exact: multiplying by a power of two only rounds results below 2^-126, and those are far
    # below half the smallest element step (2^-17), so they round to zero either way.
    inv_scale = exp2i(-scale_exp.to(torch.int32).clamp(SCALE_EXP_MIN, SCALE_EXP_MAX))
    return x.to(torch.float32) * inv_scale


def _round_int_codes(x: torch.Tensor, fmt: Format, scale_exp: torch.Tensor) -> torch.Tensor:
    return mxint.round_to_codes(_divide_by_scale(x, scale_exp), fmt.element, fmt.scale_rule)


def quantize_elements(x: torch.Tensor, fmt: Format, scale_exp: torch.Tensor) -> torch.Tensor:
    """Round x / 2^scale_exp onto `fmt`'s element grid (with the rule's code range), multiply back.

    `scale_exp` (int) broadcasts against x; SCALE_EXP_NAN (128) yields NaN. Returns fp32. Used by
    GPTQ and clip search, which choose the scale themselves; `quantize` = this with
    scale_exp_from_amax of each block.
    """
    if fmt.element.kind == "int":
        # fold the element step 2^-(b-2) into the block factor: 2^(scale_exp-(b-2)) >= 2^-133 is
        # still exact in fp32 (subnormal), and it saves a pass over the data.
        step = _scale_factor(scale_exp) * float(2.0**-fmt.element.man_bits)
        return _round_int_codes(x, fmt, scale_exp) * step
    return _round_elements(x, fmt, scale_exp) * _scale_factor(scale_exp)


# --- blocks ---------------------------------------------------------------------------------


def _to_blocks(x: torch.Tensor, axis: int, block_size: int) -> torch.Tensor:
    """[..., n] along `axis` -> [..., n_blocks, block_size] (axis moved last, zero-padded per row)."""
    rows = x.movedim(axis, -1)
    n = rows.shape[-1]
    n_blocks = -(-n // block_size)
    pad = n_blocks * block_size - n
    if pad:
        rows = F.pad(rows, (0, pad))
    return rows.reshape(*rows.shape[:-1], n_blocks, block_size)


def _from_blocks(blocks: torch.Tensor, n: int, axis: int) -> torch.Tensor:
    rows = blocks.reshape(*blocks.shape[:-2], blocks.shape[-2] * blocks.shape[-1])
    return rows[..., :n].movedim(-1, axis)


def _check_float(x: torch.Tensor) -> None:
    if not x.is_floating_point():
        raise TypeError(f"MX quantization needs a floating-point tensor, got {x.dtype}")


def quantize_reference(x: torch.Tensor, fmt: Format, axis: int = -1) -> torch.Tensor:
    """The torch reference of `quantize` (never dispatches to kernels); kernels test against it."""
    _check_float(x)
    if x.dim() == 0:
        return quantize_reference(x.reshape(1), fmt, 0).reshape(())
    blocks = _to_blocks(x.to(torch.float32), axis, fmt.block_size)
    if fmt.scale_rule is ScaleRule.MSE:  # the search has already quantized every block
        dequantized = _mse_search(blocks, fmt)[1]
    else:
        dequantized = quantize_elements(blocks, fmt, block_scale_exp(blocks, fmt))
    return _from_blocks(dequantized, x.shape[axis], axis).to(x.dtype)


@functools.cache
def available_kernels():
    """mxptq.formats.kernels if it imports (CUDA/triton present), else None (torch reference)."""
    try:
        from mxptq.formats import kernels
    except ImportError:
        return None
    return kernels


def quantize(x: torch.Tensor, fmt: Format, axis: int = -1) -> torch.Tensor:
    """Fake-quantize x to MX format `fmt` in blocks along `axis`; same shape and dtype as x.

    On CUDA a fused kernel is used when `mxptq.formats.kernels` provides one for this case;
    it must agree with `quantize_reference` bit for bit.
    """
    if x.is_cuda:
        kernels = available_kernels()
        if kernels is not None:
            y = kernels.try_quantize(x, fmt, axis)
            if y is not None:
                return y
    return quantize_reference(x, fmt, axis)


# --- exact codes ----------------------------------------------------------------------------


def encode(x: torch.Tensor, fmt: Format, axis: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact MX codes of x: (codes, scale_e8m0).

    codes: x's shape; int8 two's complement for MXINT, uint8 OCP bit patterns for MXFP.
    scale_e8m0: uint8, x's shape with `axis` replaced by ceil(n / block_size); byte = scale_exp
    + 127, 0xFF = NaN block. `decode(*encode(x, fmt, axis), fmt, axis)` equals `quantize(x, ...)`.
    """
    _check_float(x)
    if x.dim() == 0:
        codes, scale = encode(x.reshape(1), fmt, 0)
        return codes.reshape(()), scale
    blocks = _to_blocks(x.to(torch.float32), axis, fmt.block_size)
    scale_exp = block_scale_exp(blocks, fmt)
    elements = _round_elements(blocks, fmt, scale_exp)
    elements = torch.where(scale_exp == SCALE_EXP_NAN, 0.0, elements)
    if fmt.element.kind == "int":
        block_codes = mxint.element_to_codes(elements, fmt.element)
    else:
        block_codes = mxfp.element_to_bits(elements, fmt.element)
    codes = _from_blocks(block_codes, x.shape[axis], axis)
    scale_e8m0 = (scale_exp.squeeze(-1) + E8M0_BIAS).to(torch.uint8).movedim(-1, axis)
    return codes, scale_e8m0


def decode(
    codes: torch.Tensor,
    scale_e8m0: torch.Tensor,
    fmt: Format,
    axis: int = -1,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of `encode`: element values times 2^(scale_e8m0 - 127), NaN for byte 0xFF."""
    if codes.dim() == 0:
        return decode(codes.reshape(1), scale_e8m0.reshape(1), fmt, 0, dtype).reshape(())
    n = codes.shape[axis]
    n_blocks = -(-n // fmt.block_size)
    if scale_e8m0.shape[axis] != n_blocks:
        raise ValueError(
            f"scale_e8m0 has {scale_e8m0.shape[axis]} blocks along axis {axis}; "
            f"{n} codes in blocks of {fmt.block_size} need {n_blocks}"
        )
    if fmt.element.kind == "int":
        elements = mxint.codes_to_element(codes, fmt.element)
    else:
        elements = mxfp.bits_to_element(codes, fmt.element)
    scale_byte = scale_e8m0.to(torch.int32)
    factor = torch.where(scale_byte == E8M0_NAN, torch.nan, exp2i(scale_byte - E8M0_BIAS))
    factor = factor.movedim(axis, -1).repeat_interleave(fmt.block_size, dim=-1)[..., :n].movedim(-1, axis)
    return (elements * factor).to(dtype)
