"""MXINT element grid: two's-complement fixed-point elements int<b> (value = code * 2^-(b-2)).

Inputs here are already divided by the block scale 2^scale_exp (see `mx.quantize_elements`).
The code range depends on the scale rule: the tutorial rule uses the full two's-complement range
[-2^(b-1), 2^(b-1)-1] (which is why it clips a positive maximum), the symmetric and OCP rules use
+-(2^(b-1)-1). Rounding is round-half-to-even (`torch.round`), as in the tutorial and OCP.
"""

from __future__ import annotations

import torch

from mxptq.formats.spec import ElementFormat, ScaleRule


def code_range(elem: ElementFormat, rule: ScaleRule) -> tuple[int, int]:
    """(lowest, highest) integer code the rule may produce for `elem`."""
    if rule is ScaleRule.TUTORIAL or rule is ScaleRule.MSE:  # mse searches around the tutorial rule
        return elem.code_min, elem.code_max
    return -elem.code_max, elem.code_max


def round_to_codes(scaled: torch.Tensor, elem: ElementFormat, rule: ScaleRule) -> torch.Tensor:
    """fp32 element values (x / 2^scale_exp) -> integer codes as fp32 (RNE, clamped).

    The multiply by 2^(b-2) is exact (power of two), so the only rounding is the RNE below.
    """
    lowest, highest = code_range(elem, rule)
    return torch.round(scaled * float(2**elem.man_bits)).clamp_(lowest, highest)


def round_to_element(scaled: torch.Tensor, elem: ElementFormat, rule: ScaleRule) -> torch.Tensor:
    """fp32 element values -> nearest representable int<b> element value (fp32)."""
    return round_to_codes(scaled, elem, rule) * float(2.0**-elem.man_bits)


def element_to_codes(values: torch.Tensor, elem: ElementFormat) -> torch.Tensor:
    """Element values already on the grid -> int8 two's-complement codes (exact)."""
    return (values * float(2**elem.man_bits)).to(torch.int8)


def codes_to_element(codes: torch.Tensor, elem: ElementFormat) -> torch.Tensor:
    """int8 codes -> element values (fp32). Accepts the full range incl. -2^(b-1)."""
    return codes.to(torch.float32) * float(2.0**-elem.man_bits)
