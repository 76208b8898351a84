"""MX (microscaling) number formats: the one implementation of MX math in mxptq.

Modules: `spec` (element formats, scale rules, `Format`), `mxint` / `mxfp` (element grids and
codes), `mx` (blocks, shared exponent, quantize/encode/decode), `packing` (dense bit packing),
`exact` (exact powers of two). An optional `kernels` module (CUDA) is used by `quantize` when
it imports.
"""

from mxptq.formats.mx import (
    decode,
    encode,
    quantize,
    quantize_elements,
    quantize_reference,
    scale_exp_from_amax,
)
from mxptq.formats.packing import pack_codes, packed_nbytes, unpack_codes
from mxptq.formats.spec import (
    DEFAULT_SCALE_RULE,
    E8M0_BIAS,
    E8M0_NAN,
    ELEMENT_FORMATS,
    SCALE_EXP_NAN,
    SCALE_EXP_ZERO_BLOCK,
    ElementFormat,
    Format,
    ScaleRule,
    element_format,
)

__all__ = [
    "DEFAULT_SCALE_RULE",
    "E8M0_BIAS",
    "E8M0_NAN",
    "ELEMENT_FORMATS",
    "SCALE_EXP_NAN",
    "SCALE_EXP_ZERO_BLOCK",
    "ElementFormat",
    "Format",
    "ScaleRule",
    "decode",
    "element_format",
    "encode",
    "pack_codes",
    "packed_nbytes",
    "quantize",
    "quantize_elements",
    "quantize_reference",
    "scale_exp_from_amax",
    "unpack_codes",
]
