"""MXFP element grid: OCP MX v1.0 minifloats E2M1, E2M3, E3M2, E4M3, E5M2 (section 5.3).

Inputs here are already divided by the block scale 2^scale_exp (see `mx.quantize_elements`).
Conversion follows OCP section 6.3: round half to even, subnormals kept, magnitudes beyond the
largest normal saturate to +-max_value (never to inf/NaN, also for E5M2 which has infinities).
Bit patterns are S | exponent field | mantissa field with the OCP bias.
"""

from __future__ import annotations

import torch

from mxptq.formats.exact import exp2i, frexp_exponent
from mxptq.formats.spec import ElementFormat

FP32_EXPONENT_MASK = 0x7F800000
FP32_RECIPROCAL_BITS = 254 << 23  # bits(2^-e) = bits(1 / 2^e) = (254 << 23) - bits(2^e)


def _binade_exponent(magnitude: torch.Tensor, elem: ElementFormat) -> torch.Tensor:
    """Exponent of the element binade holding `magnitude`: floor(log2 |v|), but never below emin
    because subnormals share the step 2^(emin - man_bits) of the first normal binade."""
    _, exponent = frexp_exponent(magnitude)
    return (exponent - 1).clamp(min=elem.emin)


def round_to_element(scaled: torch.Tensor, elem: ElementFormat) -> torch.Tensor:
    """fp32 values (x / 2^scale_exp) -> nearest element value, RNE, saturating (fp32 out)."""
    # 2^floor(log2 |v|) exactly: keep only the fp32 exponent field (drops sign and mantissa).
    # Clamped to the element's binades: fp32 subnormals and zero (field 0) take the first normal
    # binade 2^emin like element subnormals do; anything above 2^emax saturates anyway.
    binade = (scaled.view(torch.int32) & FP32_EXPONENT_MASK).view(torch.float32)
    ulp = binade.clamp_(2.0**elem.emin, 2.0**elem.emax) * 2.0**-elem.man_bits
    # 1/ulp from the bit pattern (biased exponent 254 - e): exact, and avoids a division whose
    # rounding a compiler might relax. ulp lies in [2^-16, 2^15] for every OCP element.
    inv_ulp = (FP32_RECIPROCAL_BITS - ulp.view(torch.int32)).view(torch.float32)
    # Scaling by powers of two is exact, so torch.round (half to even, symmetric in sign, so
    # -0.0 and negative values need no special case) is the only rounding step; a value that
    # rounds up into the next binade lands on that binade's first grid point, as it should.
    return (torch.round(scaled * inv_ulp) * ulp).clamp_(-elem.max_value, elem.max_value)


def element_to_bits(values: torch.Tensor, elem: ElementFormat) -> torch.Tensor:
    """Element values already on the grid (|v| <= max_value) -> OCP bit patterns (uint8).

    The magnitude field is ((binade - emin) << man_bits) + significand, where the significand
    |v| / ulp is an integer in [0, 2^(man_bits+1)); this single formula gives subnormals
    (exponent field 0) and normals (exponent field binade + bias) alike. -0.0 keeps its sign bit.
    """
    magnitude = values.abs()
    binade = _binade_exponent(magnitude, elem)
    significand = (magnitude * exp2i(elem.man_bits - binade)).to(torch.int32)
    field = ((binade - elem.emin) << elem.man_bits) + significand
    field = torch.where(magnitude == 0, torch.zeros_like(field), field)
    sign = torch.signbit(values).to(torch.int32) << (elem.bits - 1)
    return (field | sign).to(torch.uint8)


def bits_to_element(bits: torch.Tensor, elem: ElementFormat) -> torch.Tensor:
    """OCP bit patterns (low `elem.bits` bits of each uint8) -> element values (fp32).

    NaN patterns decode to NaN, E5M2's S.11111.00 to +-inf (OCP v1.0 Tables 1 and 2).
    """
    word = bits.to(torch.int32) & ((1 << elem.bits) - 1)
    negative = ((word >> (elem.bits - 1)) & 1).bool()
    magnitude_field = word & ((1 << (elem.bits - 1)) - 1)
    exp_field = magnitude_field >> elem.man_bits
    man_field = magnitude_field & ((1 << elem.man_bits) - 1)
    is_normal = exp_field > 0
    significand = man_field + is_normal.to(torch.int32) * (1 << elem.man_bits)
    # normals: 2^(E - bias) * (1 + M/2^m); subnormals: 2^(1 - bias) * (M/2^m)
    ulp_exp = exp_field.clamp(min=1) - elem.bias - elem.man_bits
    values = significand.to(torch.float32) * exp2i(ulp_exp)
    values = torch.where(negative, -values, values)
    if elem.has_inf:
        inf_field = ((1 << elem.exp_bits) - 1) << elem.man_bits
        values = torch.where(
            magnitude_field == inf_field, torch.where(negative, -torch.inf, torch.inf), values
        )
    for nan_field in elem.nan_fields:
        values = torch.where(magnitude_field == nan_field, torch.nan, values)
    return values
