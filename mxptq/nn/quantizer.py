"""Activation quantizer: MX fake-quantization of a tensor along its last axis, with an optional
online rotation (DESIGN.md "Online rotation": Q(x) becomes R^-1 Q(R x), weights untouched).

Deliberately not an `nn.Module`: quantizers must not add entries to `model.named_modules()`
(selectors and reports address modules by name) and hold no trainable state. A rotation, when
set, owns its own tensors and device placement (`mxptq.nn.hadamard.get_rotation(..., device=)`).
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch

from mxptq.formats import Format, quantize
from mxptq.formats.mx import available_kernels


class Rotation(Protocol):
    """What rotation search attaches (see `mxptq.nn.hadamard.get_rotation`)."""

    n: int
    kind: str
    description: str

    def forward(self, x: torch.Tensor) -> torch.Tensor: ...

    def inverse(self, x: torch.Tensor) -> torch.Tensor: ...

    def conjugate(self, x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """inverse(fn(forward(x))); a rotation whose length varies (the key axis of P) also
        restores what must stay exact (masked probabilities)."""
        ...


class ActQuantizer:
    """`q(x)`: x unchanged if `fmt` is None (bypass); `quantize(x, fmt)` along the last axis;
    `rotation.inverse(quantize(rotation.forward(x), fmt))` once rotation search sets `.rotation`.

    A rotation without a format is meaningless (it would cancel out), so it is ignored when
    bypassed."""

    __slots__ = ("fmt", "rotation")

    def __init__(self, fmt: Format | None, rotation: Rotation | None = None) -> None:
        self.fmt = fmt
        self.rotation = rotation

    @property
    def enabled(self) -> bool:
        return self.fmt is not None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.fmt is None:
            return x
        if self.rotation is None:
            return quantize(x, self.fmt, axis=-1)
        if x.is_cuda:
            # One pass over memory for rotate -> quantize -> rotate back (issue 9); None means the
            # kernel does not cover this size/format and the reference below runs.
            kernels = available_kernels()
            fused = kernels.try_rotated_quantize(x, self.fmt, self.rotation) if kernels else None
            if fused is not None:
                return fused
        return self.rotation.conjugate(x, self._quantize)

    def _quantize(self, x: torch.Tensor) -> torch.Tensor:
        return quantize(x, self.fmt, axis=-1)

    def describe(self) -> str:
        """Short label for reprs and reports, e.g. "MXINT4(b32,tutorial)+walsh"."""
        if self.fmt is None:
            return "bypass"
        label = self.fmt.label
        return label if self.rotation is None else f"{label}+{self.rotation.kind}"

    def __repr__(self) -> str:
        return f"ActQuantizer({self.describe()})"
