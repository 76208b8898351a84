"""Activation quantizer: MX fake-quantization of a tensor along its last axis, with an optional
online rotation (DESIGN.md "Online rotation": Q(x) becomes R^-1 Q(R x), weights untouched).

Deliberately not an `nn.Module`: quantizers must not add entries to `model.named_modules()`
(selectors and reports address modules by name) and hold no trainable state. A rotation, when
set, owns its own tensors and device placement (`mxptq.nn.hadamard.get_rotation(..., device=)`).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Protocol

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


class SharedInputCache:
    """One held quantized input, shared by the input quantizers of one quantized model.

    Issue 9: q_proj/k_proj/v_proj read the same hidden states, and gate_proj/up_proj too; with
    the same format and rotation their quantized inputs are identical, so the second and third
    calls reuse the first result (quantizers built with `input_cache=` this object: the
    transform stage gives every MXLinear input quantizer of a model the same cache, reachable
    as `model.mxptq_input_cache`). Only the last result is held (memory does not grow). The
    result is returned unchanged only if its own version counter shows no in-place change
    either. A hit needs the very same tensor object (held by a weak reference: a freed tensor's
    address may be reused by a new one, a dead weak reference never matches), unchanged since
    -- same version counter (bumped by every in-place op, also through views), data pointer,
    shape, strides, dtype -- and an equal format and rotation. Inference-mode tensors carry no
    version counter: for them a hit relies on the object identity within the one-entry window
    (each quantizer call replaces the entry), i.e. on no in-place change of a quantizer's input
    between two consecutive quantizer calls on it, which holds in the forward of every
    supported model (the projections consume the same hidden states back to back). Code that
    does modify an inference tensor in place between such calls calls `clear()`.
    Off: `enabled = False` (every call computes). Copies and pickles start empty.
    """

    __slots__ = ("enabled", "entry")

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        # (weakref to x, x's version, data_ptr, shape, stride, dtype, fmt, rotation, result,
        #  result's version)
        self.entry: tuple | None = None

    def clear(self) -> None:
        """Forget the held quantized input."""
        self.entry = None

    def __getstate__(self) -> dict:
        return {"enabled": self.enabled}  # a weak reference cannot be copied or pickled

    def __setstate__(self, state: dict) -> None:
        self.enabled = state["enabled"]
        self.entry = None

    def __repr__(self) -> str:
        return f"SharedInputCache(enabled={self.enabled}, held={self.entry is not None})"


def _version(x: torch.Tensor) -> int:
    # Inference tensors have no version counter (reading it raises, which costs ~10 us).
    return -1 if x.is_inference() else x._version


class ActQuantizer:
    """`q(x)`: x unchanged if `fmt` is None (bypass); `quantize(x, fmt)` along the last axis;
    `rotation.inverse(quantize(rotation.forward(x), fmt))` once rotation search sets `.rotation`.

    A rotation without a format is meaningless (it would cancel out), so it is ignored when
    bypassed.

    `fused_rotation` (issue 22, the `[rotation] online` linears): an input rotation R whose
    inverse is folded into the consumer's weight (W Rᵀ), so it is *not* undone here:
    q(x) = quantize(R x) (or R x when bypassed -- the rotated weight needs the rotated input
    whether or not it is quantized). It is applied before `rotation`, which rotation search
    leaves unset on such inputs.

    Quantizers given the same `input_cache` share one result between consecutive calls on the
    same unchanged tensor with the same format and rotation (see SharedInputCache);
    `input_cache=None` never shares (nor does a quantizer with a `fused_rotation`)."""

    __slots__ = ("fmt", "fused_rotation", "input_cache", "rotation")

    def __init__(
        self,
        fmt: Format | None,
        rotation: Rotation | None = None,
        *,
        input_cache: SharedInputCache | None = None,
        fused_rotation: Rotation | None = None,
    ) -> None:
        self.fmt = fmt
        self.rotation = rotation
        self.fused_rotation = fused_rotation
        # Only for consumers that never modify the quantized tensor in place (MXLinear: F.linear),
        # since the consumers of one shared result see the same tensor.
        self.input_cache = input_cache

    @property
    def enabled(self) -> bool:
        return self.fmt is not None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        fmt = self.fmt
        if self.fused_rotation is not None:
            # Not shared through the input cache: the rotated tensor is new on every call.
            x = self.fused_rotation.forward(x)
            return x if fmt is None else self._compute(x)
        if fmt is None:
            return x
        cache = self.input_cache
        if cache is None or not cache.enabled or (x.requires_grad and torch.is_grad_enabled()):
            return self._compute(x)
        rotation = self.rotation
        entry = cache.entry  # one read: another thread may replace it meanwhile
        version = _version(x)
        if (
            entry is not None
            and entry[0]() is x
            and entry[1] == version
            and entry[2] == x.data_ptr()
            and entry[3] == x.shape
            and entry[4] == x.stride()
            and entry[5] == x.dtype
            and (entry[6] is fmt or entry[6] == fmt)
            and (entry[7] is rotation or (entry[7] is not None and entry[7] == rotation))
            and entry[9] == _version(entry[8])
        ):
            return entry[8]
        y = self._compute(x)
        cache.entry = (weakref.ref(x), version, x.data_ptr(), x.shape, x.stride(), x.dtype, fmt, rotation, y,
                       _version(y))
        return y

    def _compute(self, x: torch.Tensor) -> torch.Tensor:
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
        label = "bypass" if self.fmt is None else self.fmt.label
        if self.fused_rotation is not None:
            label = f"{self.fused_rotation.kind}(fused)->{label}"
        return label if self.rotation is None or self.fmt is None else f"{label}+{self.rotation.kind}"

    def __repr__(self) -> str:
        return f"ActQuantizer({self.describe()})"
