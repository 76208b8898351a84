"""Inputs shared by the Gluon rotated-kernel tests (test_walsh_kernel.py, test_kron_kernel.py)."""

from __future__ import annotations

import torch

from mxptq.formats import ELEMENT_FORMATS, Format, ScaleRule, quantize_reference

# One format per element kind and scale rule the kernels implement differently.
FORMATS = [
    Format(ELEMENT_FORMATS["int4"], 32, ScaleRule.TUTORIAL),
    Format(ELEMENT_FORMATS["int4"], 32, ScaleRule.SYMMETRIC),
    Format(ELEMENT_FORMATS["int8"], 32, ScaleRule.OCP),
    Format(ELEMENT_FORMATS["e2m1"], 32, ScaleRule.OCP),
    Format(ELEMENT_FORMATS["e4m3"], 32, ScaleRule.OCP),
    Format(ELEMENT_FORMATS["e5m2"], 32, ScaleRule.OCP),
]


def sample_rows(count: int, n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """count rows of n on CUDA, scaled over five decades (finite in fp16), with an outlier
    channel and an all-zero first row (zero blocks)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(count, n, generator=gen) * torch.logspace(-3, 2, count)[:, None]
    x[:, 5] *= 40.0
    x[0] = 0.0
    return x.to(dtype).cuda()


def reference(x: torch.Tensor, fmt: Format, rotation) -> torch.Tensor:
    """The reference path the rotated kernels reproduce."""
    return rotation.inverse(quantize_reference(rotation.forward(x), fmt))
