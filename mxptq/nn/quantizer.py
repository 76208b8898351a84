"""Activation quantizer: MX fake-quantization of a tensor along its last axis, with an optional
online rotation (DESIGN.md "Online rotation": Q(x) becomes R^-1 Q(R x), weights untouched).

Deliberately not an `nn.Module`: quantizers must not add entries to `model.named_modules()`
(selectors and reports address modules by name) and hold no trainable state. A rotation, when
set, owns its own tensors and device placement (`mxptq.nn.hadamard.get_rotation(..., device=)`).
"""

from __future__ import annotations

from typing import Protocol

import torch

from mxptq.formats import Format, quantize


class Rotation(Protocol):
    """What rotation search attaches (see `mxptq.nn.hadamard.get_rotation`)."""

    n: int
    kind: str
    description: str

    def forward(self, x: torch.Tensor) -> torch.Tensor: ...

    def inverse(self, x: torch.Tensor) -> torch.Tensor: ...


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
        return self.rotation.inverse(quantize(self.rotation.forward(x), self.fmt, axis=-1))

    def describe(self) -> str:
        """Short label for reprs and reports, e.g. "MXINT4(b32,tutorial)+walsh"."""
        if self.fmt is None:
            return "bypass"
        label = self.fmt.label
        return label if self.rotation is None else f"{label}+{self.rotation.kind}"

    def __repr__(self) -> str:
        return f"ActQuantizer({self.describe()})"
