"""Exact power-of-two helpers shared by the MX codecs.

MX math is only correct if scales are exact powers of two and log2 is exact. Float `log2` can
be off by one next to powers of two, and `torch.exp2`/`torch.ldexp` go through `pow`, which is
not guaranteed exact in vectorised math libraries. So exponents come from `torch.frexp` and
powers of two are built from their IEEE-754 bit pattern.
"""

from __future__ import annotations

import torch

FP32_EXP_BIAS = 127  # largest fp32 exponent of a finite power of two
FP32_MIN_SUBNORMAL_EXP = -149  # 2^-149 is the smallest fp32 subnormal
FP64_EXP_BIAS = 1023
FP64_MANTISSA_BITS = 52


def exp2i(k: torch.Tensor) -> torch.Tensor:
    """Exact fp32 2^k for integer k in [-149, 127] (k is clamped to that range).

    Built as the fp64 bit pattern (biased exponent k + 1023, zero mantissa) and converted to
    fp32, which is exact for every k in range, fp32 subnormals (k < -126) included. Four
    elementwise ops, which matters in eager mode where each op is a pass.
    """
    k = k.to(torch.int64).clamp(FP32_MIN_SUBNORMAL_EXP, FP32_EXP_BIAS)
    return ((k + FP64_EXP_BIAS) << FP64_MANTISSA_BITS).view(torch.float64).to(torch.float32)


def frexp_exponent(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mantissa in [0.5, 1), exponent E) with a = mantissa * 2^E, so floor(log2 a) = E - 1 for
    a > 0. Exact for every finite fp32 value including subnormals; a = 0 gives (0, 0)."""
    mantissa, exponent = torch.frexp(a)
    return mantissa, exponent.to(torch.int32)
