"""MX modules: `ActQuantizer` (activation fake-quantization, optional online rotation),
`MXLinear` (quantized nn.Linear), `MXAttention` (Llama-family attention with MX stages).
`mxptq.nn.hadamard` (rotations) is imported on its own by the stages that need it."""

from mxptq.nn.attention import SUPPORTED_ATTENTION, MXAttention
from mxptq.nn.linear import MXLinear
from mxptq.nn.quantizer import ActQuantizer

__all__ = ["SUPPORTED_ATTENTION", "ActQuantizer", "MXAttention", "MXLinear"]
