"""MXLinear: an `nn.Linear` whose weight is MX-quantized once, when the module is built, and whose
input activation is MX-quantized on every forward.

Blocks run along the input (reduction) dimension for both operands (DESIGN.md "Number formats"):
the weight is [out_features, in_features], so its blocks are along axis -1; the activation's
last axis is in_features too. The weight is stored already dequantized ("fake-quantized") in the
model dtype, so a forward costs one activation quantization plus the usual matmul.

GPTQ weights: the GPTQ stage writes its weights into the `nn.Linear` and sets
`linear._mxptq_gptq_fmt` to the Format it used (and, optionally, `linear._mxptq_gptq_scale_exp`,
the shared exponent it chose per block, shape [out_features, ceil(in_features / block)]). Those
weights are kept as they are -- re-deriving the scale from the block absmax would undo the
clipping GPTQ's scale search chose (the tutorial: "the linear classes consume the calibrated
weights instead of re-quantizing"). We only check they are on the format's grid; a failure is an
internal error (`AssertionError`), since only a GPTQ bug can cause it:
  - with the scale exponents: `quantize_elements(W, fmt, scale_exp) == W` exactly;
  - without them: RTN re-quantization `quantize(W, fmt) == W` exactly.
A GPTQ format different from the selector's weight format is a recipe mistake (`ModelError`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mxptq.errors import ModelError
from mxptq.formats import Format, quantize, quantize_elements
from mxptq.nn.quantizer import ActQuantizer, SharedInputCache

GPTQ_FORMAT_ATTR = "_mxptq_gptq_fmt"
GPTQ_SCALE_EXP_ATTR = "_mxptq_gptq_scale_exp"
# Set by the offline rotation stage (mxptq/stages/rotate.py) on an `nn.Linear` whose weight it
# replaced by W Rᵀ: the Rotation R its input must go through (there a forward pre-hook; here the
# input quantizer's `fused_rotation`).
INPUT_ROTATION_ATTR = "_mxptq_input_rotation"


class MXLinear(nn.Module):
    """Drop-in replacement for `nn.Linear` (same `weight`/`bias` state-dict keys and shapes).

    Args:
        linear: the source layer (its weight dtype/device are kept).
        config: a `recipe.LinearConfig` (weight, data_in, bias: Format | None; bypass: bool).
        name: the qualified module name; its last component is the `matmul_type` ("q_proj", ...)
            that rotation search toggles.
        input_cache: the model's `SharedInputCache` (the transform stage passes one per model), so
            that q/k/v (gate/up) share one quantized input; None: the input is always quantized.
    """

    def __init__(
        self, linear: nn.Linear, config: Any, name: str = "", *, input_cache: SharedInputCache | None = None
    ) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.matmul_type = name.rsplit(".", 1)[-1] if name else ""
        bypass = bool(getattr(config, "bypass", False))
        self.bypass = bypass
        self.weight_fmt: Format | None = None if bypass else getattr(config, "weight", None)
        self.bias_fmt: Format | None = None if bypass else getattr(config, "bias", None)
        # input_cache: F.linear never modifies its input, so q/k/v (gate/up) may share one result.
        self.input_quantizer = ActQuantizer(
            None if bypass else getattr(config, "data_in", None),
            input_cache=input_cache,
            fused_rotation=getattr(linear, INPUT_ROTATION_ATTR, None),
        )
        self.weight_source = "float"

        with torch.no_grad():
            weight = linear.weight.detach()
            gptq_fmt = getattr(linear, GPTQ_FORMAT_ATTR, None)
            if gptq_fmt is not None and self.weight_fmt is not None:
                weight = _checked_gptq_weight(linear, gptq_fmt, self.weight_fmt, name)
                self.weight_source = "gptq"
            elif self.weight_fmt is not None:
                weight = quantize(weight, self.weight_fmt, axis=-1)
                self.weight_source = "rtn"
            bias = None if linear.bias is None else linear.bias.detach()
            if bias is not None and self.bias_fmt is not None:
                bias = quantize(bias, self.bias_fmt, axis=-1)
        # Buffers, not parameters: post-training quantization never trains, and the values must
        # stay on the MX grid. Clones so the source layer's storage is not shared.
        self.register_buffer("weight", weight.clone())
        self.register_buffer("bias", None if bias is None else bias.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.input_quantizer(x), self.weight, self.bias)

    def extra_repr(self) -> str:
        weight = self.weight_fmt.label if self.weight_fmt is not None else "float"
        if self.weight_source == "gptq":
            weight += " (gptq)"
        parts = [
            f"in_features={self.in_features}",
            f"out_features={self.out_features}",
            f"bias={self.bias is not None}",
            f"weight={weight}",
            f"data_in={self.input_quantizer.describe()}",
        ]
        if self.bias_fmt is not None:
            parts.append(f"bias_fmt={self.bias_fmt.label}")
        return ", ".join(parts)


def _checked_gptq_weight(linear: nn.Linear, gptq_fmt: Format, weight_fmt: Format, name: str) -> torch.Tensor:
    """The GPTQ weights, unchanged, after checking they lie on `weight_fmt`'s grid (module doc)."""
    if gptq_fmt != weight_fmt:
        raise ModelError(
            f"{name or 'linear'}: GPTQ weights were computed as {gptq_fmt.label} but the selector asks for "
            f"{weight_fmt.label}; make [gptq.weight_config] and the selector's weight keys agree"
        )
    weight = linear.weight.detach()
    scale_exp = getattr(linear, GPTQ_SCALE_EXP_ATTR, None)
    if scale_exp is not None:
        on_grid = _requantize_with_scale_exp(weight, weight_fmt, scale_exp)
        how = "quantize_elements with GPTQ's scale exponents"
    else:
        on_grid = quantize(weight, weight_fmt, axis=-1)
        how = "RTN re-quantization"
    if not torch.equal(on_grid, weight):
        changed = (on_grid != weight).sum().item()
        raise AssertionError(
            f"{name or 'linear'}: GPTQ weights are not on the {weight_fmt.label} grid "
            f"({changed} of {weight.numel()} elements move under {how})"
        )
    return weight


def _requantize_with_scale_exp(weight: torch.Tensor, fmt: Format, scale_exp: torch.Tensor) -> torch.Tensor:
    """Round `weight` with one given shared exponent per [row, block]; blocks along the input dim,
    zero-padded at the end of each row as everywhere else."""
    out_features, in_features = weight.shape
    block = fmt.block_size
    n_blocks = -(-in_features // block)
    padded = F.pad(weight.float(), (0, n_blocks * block - in_features))
    blocks = padded.view(out_features, n_blocks, block)
    exps = scale_exp.to(device=weight.device).reshape(out_features, n_blocks, 1)
    rounded = quantize_elements(blocks, fmt, exps).reshape(out_features, n_blocks * block)
    return rounded[:, :in_features].to(weight.dtype)
