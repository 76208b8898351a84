"""MX format specifications as data: element formats, scale rules, and the `Format` value object.

An MX block of `block_size` elements shares one power-of-two scale X = 2^scale_exp, stored as
an E8M0 byte (`scale_e8m0 = scale_exp + 127`). Each element stores a code of an element format
(OCP Microscaling Formats (MX) v1.0, section 5). Every fact about a format lives here exactly
once; the codecs in `mxint.py`, `mxfp.py` and `mx.py` read it from these objects.

Element value conventions (so that one shared-exponent formula serves every format):

* minifloat elements (E2M1 ... E5M2): the usual sign/exponent/mantissa value with the OCP bias;
  the largest binade is 2^emax (OCP v1.0 Table 1/2).
* integer elements int<b>: two's-complement code c with an implied scale 2^-(b-2), i.e. the
  value c * 2^-(b-2) in [-2, 2). For b = 8 this is exactly OCP MXINT8 (section 5.3.3: implied
  scale 2^-6, emax_elem = 0); other widths generalise it the same way, so every integer element
  also has emax = 0.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Literal, Self

import torch

from mxptq.errors import FormatError

# --- E8M0 shared scale (OCP MX v1.0 section 5.4.1) ---------------------------------------------
E8M0_BIAS = 127  # scale_e8m0 byte = scale_exp + 127
SCALE_EXP_MIN = -127  # byte 0x00 -> 2^-127
SCALE_EXP_MAX = 127  # byte 0xFE -> 2^127
E8M0_NAN = 255  # byte 0xFF is NaN: the whole block decodes to NaN
SCALE_EXP_NAN = E8M0_NAN - E8M0_BIAS  # 128: the int32 scale_exp we use to mean "NaN block"
# An all-zero block stores the smallest scale (byte 0x00); its codes are all zero, so it decodes
# to exact zeros whatever the scale. (OCP leaves the scale of an all-zero block open.)
SCALE_EXP_ZERO_BLOCK = SCALE_EXP_MIN

BLOCK_SIZE_DEFAULT = 32  # OCP MX v1.0: k = 32 for every concrete MX format
BLOCK_SIZE_MAX = 4096
MXINT_WIDTHS = range(2, 9)  # total bits including the sign


@dataclass(frozen=True)
class ElementFormat:
    """One element format of an MX block.

    Attributes:
        name: registry key, e.g. "int4", "e2m1".
        kind: "int" (two's-complement fixed point) or "fp" (OCP minifloat).
        bits: total storage bits incl. sign.
        exp_bits: exponent field width (0 for int).
        man_bits: mantissa field width (fp) or fraction bits (int: value = code * 2^-man_bits).
        emax: exponent of the largest binade (OCP emax_elem; 0 for int).
        max_value: largest finite magnitude.
        bias: exponent bias (fp; 0 for int).
        has_inf: S.11..1.00..0 encodes infinity (E5M2 only).
        nan_fields: magnitude fields (sign bit excluded) that encode NaN.
    """

    name: str
    kind: Literal["int", "fp"]
    bits: int
    exp_bits: int
    man_bits: int
    emax: int
    max_value: float
    bias: int = 0
    has_inf: bool = False
    nan_fields: tuple[int, ...] = field(default=())

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal binade (fp: 1 - bias; int: the fixed-point step)."""
        return 1 - self.bias if self.kind == "fp" else -self.man_bits

    @property
    def code_min(self) -> int:
        """Smallest int code (two's complement); fp codes are bit patterns, see `max_field`."""
        return -(2 ** (self.bits - 1))

    @property
    def code_max(self) -> int:
        return 2 ** (self.bits - 1) - 1

    @property
    def max_field(self) -> int:
        """fp: the magnitude bit pattern of max_value (sign bit clear)."""
        exponent = math.floor(math.log2(self.max_value))
        mantissa = round((self.max_value / 2.0**exponent - 1.0) * 2**self.man_bits)
        return ((exponent + self.bias) << self.man_bits) | mantissa

    @property
    def code_dtype(self) -> torch.dtype:
        """int codes are signed two's complement (int8); fp codes are OCP bit patterns (uint8)."""
        return torch.int8 if self.kind == "int" else torch.uint8


def _int_element(bits: int) -> ElementFormat:
    # OCP v1.0 section 5.3.3 (INT8): code * 2^-6, emax 0; we use the symmetric max 2 - 2^-(b-2).
    frac_bits = bits - 2
    return ElementFormat(
        name=f"int{bits}",
        kind="int",
        bits=bits,
        exp_bits=0,
        man_bits=frac_bits,
        emax=0,
        max_value=(2 ** (bits - 1) - 1) / 2**frac_bits,
    )


def _fp_element(name: str, exp_bits: int, man_bits: int, emax: int, max_value: float, **special: Any):
    return ElementFormat(
        name=name,
        kind="fp",
        bits=1 + exp_bits + man_bits,
        exp_bits=exp_bits,
        man_bits=man_bits,
        emax=emax,
        max_value=max_value,
        bias=2 ** (exp_bits - 1) - 1,
        **special,
    )


ELEMENT_FORMATS: dict[str, ElementFormat] = {}


def register_element_format(elem: ElementFormat) -> ElementFormat:
    """Add an element format to the registry; a duplicate name is a programming error."""
    if elem.name in ELEMENT_FORMATS:
        raise ValueError(f"element format {elem.name!r} is already registered")
    ELEMENT_FORMATS[elem.name] = elem
    return elem


for _bits in MXINT_WIDTHS:
    register_element_format(_int_element(_bits))

# OCP MX v1.0 Table 1 (FP8) and Table 2 (FP6/FP4): bias, emax, max normal, special values.
register_element_format(_fp_element("e2m1", 2, 1, emax=2, max_value=6.0))  # FP4: no inf/NaN
register_element_format(_fp_element("e2m3", 2, 3, emax=2, max_value=7.5))  # FP6: no inf/NaN
register_element_format(_fp_element("e3m2", 3, 2, emax=4, max_value=28.0))  # FP6: no inf/NaN
# FP8 E4M3: no infinities, S.1111.111 is NaN, so 1111.110 = 1.75 * 2^8 = 448 is the max.
register_element_format(_fp_element("e4m3", 4, 3, emax=8, max_value=448.0, nan_fields=(0x7F,)))
# FP8 E5M2: IEEE-like, S.11111.00 is inf, S.11111.{01,10,11} NaN; max 1.75 * 2^15 = 57344.
register_element_format(
    _fp_element("e5m2", 5, 2, emax=15, max_value=57344.0, has_inf=True, nan_fields=(0x7D, 0x7E, 0x7F))
)

#: (exponent_width, frac_width) recipe pairs -> element format name
MXFP_PAIRS: dict[tuple[int, int], str] = {
    (e.exp_bits, e.man_bits): e.name for e in ELEMENT_FORMATS.values() if e.kind == "fp"
}


def element_format(name: str) -> ElementFormat:
    """Look up a registered element format by name; unknown -> FormatError with a suggestion."""
    try:
        return ELEMENT_FORMATS[name]
    except KeyError:
        close = difflib.get_close_matches(str(name).lower(), list(ELEMENT_FORMATS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise FormatError(
            f"unknown element format {name!r}{hint}; allowed: {', '.join(ELEMENT_FORMATS)}"
        ) from None


class ScaleRule(str, Enum):
    """How a block's shared exponent (and the element code range) follow from its amax.

    Each member's docstring gives its formula and source, in terms of the stored shared exponent
    `scale_exp` (X = 2^scale_exp) and this module's element conventions (int<b> values are
    code * 2^-(b-2)). log2 is exact (frexp); results are clamped to the E8M0 range [-127, 127].
    """

    def __new__(cls, value: str, doc: str) -> Self:
        member = str.__new__(cls, value)
        member._value_ = value
        member.__doc__ = doc
        return member

    TUTORIAL = (
        "tutorial",
        """MXINT only. The rule that produced the tutorial's (Mase `mxint`) numbers:
        e = ceil(log2 amax), codes clamp(round_half_even(x * 2^(b-1-e)), -2^(b-1), 2^(b-1)-1),
        i.e. scale_exp = ceil(log2 amax) - 1. Uses the full asymmetric code range and therefore
        clips a positive block maximum near 2^e (at b = 4, amax = 2^e decodes to 7/8 * 2^e); it is
        not idempotent (a requantized block can move to a smaller scale and clip again).
        Source: ../shared/seed/tutorial_7_mx_ptq.txt and DESIGN.md "Number formats".""",
    )
    SYMMETRIC = (
        "symmetric",
        """Symmetric, never clips: codes in +-(2^(b-1)-1) (fp: +-max_value) and the smallest
        power-of-two scale with amax / scale <= max code, i.e. the smallest scale_exp with
        amax <= max_value * 2^scale_exp. For MXFP this is an explicit non-OCP option.
        Source: DESIGN.md "Number formats" (the no-clip alternative to the tutorial rule).""",
    )
    OCP = (
        "ocp",
        """OCP MX v1.0 section 6.3: scale_exp = floor(log2 amax) - emax_elem, elements rounded
        half-to-even with subnormals and saturated to +-max_value. MXFP default; with int8
        elements this is OCP MXINT8 (emax_elem 0, implied scale 2^-6). Integer codes are kept
        symmetric (+-(2^(b-1)-1)) as the OCP reference library (microsoft/microxcaling) clamps
        INT8 to +-max_norm; decode still accepts the code -2^(b-1).""",
    )
    MSE = (
        "mse",
        """Searched per block (issue 22): of the three shared exponents r - 1, r, r + 1, where r is
        the family's default rule (tutorial for MXINT, with its code range; OCP for MXFP), the
        one whose decoded block has the least squared error against the input; ties go to r,
        then r - 1. An encoder choice only: every block is an ordinary MX block (E8M0 scale,
        the same elements), so decoders and checkpoints are unchanged. Costs about three
        quantizations and runs in the torch path (the fused kernels implement the fixed rules).
        Measured on the demo model's rotated activations: 10-28% less squared error than the
        tutorial rule for MXINT4 (a finer scale that clips a lone maximum wins), 2-21% less
        than OCP for MXFP4 (a coarser scale that stops saturation wins).
        Source: DESIGN.md "Number formats" (other rules are explicit, named options); issue 22;
        measurement in benchmarks/cpu_config_d/README.md.""",
    )


#: the one place the default rule per element kind is defined
DEFAULT_SCALE_RULE: dict[str, ScaleRule] = {"int": ScaleRule.TUTORIAL, "fp": ScaleRule.OCP}
ALLOWED_SCALE_RULES: dict[str, tuple[ScaleRule, ...]] = {
    "int": (ScaleRule.TUTORIAL, ScaleRule.SYMMETRIC, ScaleRule.OCP, ScaleRule.MSE),
    "fp": (ScaleRule.OCP, ScaleRule.SYMMETRIC, ScaleRule.MSE),
}
FORMAT_NAMES = ("mxint", "mxfp")


def _parse_scale_rule(value: ScaleRule | str | None, kind: str) -> ScaleRule:
    allowed = ALLOWED_SCALE_RULES[kind]
    allowed_text = ", ".join(r.value for r in allowed)
    if value is None:
        return DEFAULT_SCALE_RULE[kind]
    try:
        rule = ScaleRule(value.lower() if isinstance(value, str) else value)
    except ValueError:
        raise FormatError(f"unknown scale_rule {value!r}; allowed for mx{kind}: {allowed_text}") from None
    if rule not in allowed:
        raise FormatError(f"scale_rule {rule.value!r} does not apply to mx{kind}; allowed: {allowed_text}")
    return rule


def _check_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise FormatError(f"{key} must be an integer, got {value!r}")
    return value


@dataclass(frozen=True)
class Format:
    """One MX format: element format + block size + scale rule.

    `scale_rule=None` (or omitted) selects the kind's default from DEFAULT_SCALE_RULE; after
    construction `scale_rule` is always a ScaleRule.
    """

    element: ElementFormat
    block_size: int = BLOCK_SIZE_DEFAULT
    scale_rule: ScaleRule = None  # type: ignore[assignment]  # None -> DEFAULT_SCALE_RULE[kind]

    def __post_init__(self) -> None:
        if not isinstance(self.element, ElementFormat):
            raise TypeError(f"Format.element must be an ElementFormat, got {type(self.element).__name__}")
        block_size = _check_int("block_size", self.block_size)
        if not 1 <= block_size <= BLOCK_SIZE_MAX:
            raise FormatError(f"block_size {block_size} is out of range; allowed: 1..{BLOCK_SIZE_MAX}")
        object.__setattr__(self, "scale_rule", _parse_scale_rule(self.scale_rule, self.element.kind))

    @classmethod
    def from_keys(
        cls,
        name: str,
        *,
        width: int | None = None,
        exponent_width: int | None = None,
        frac_width: int | None = None,
        block_size: int | None = BLOCK_SIZE_DEFAULT,
        scale_rule: ScaleRule | str | None = None,
    ) -> Format:
        """Build a Format from recipe keys (`name`, `*_width`, `*_block_size`, `scale_rule`).

        mxint: `width` = total bits incl. sign, 2..8. mxfp: (`exponent_width`, `frac_width`) must
        be an OCP pair; `width`, if given, must equal 1 + exponent_width + frac_width.
        `block_size=None` and `scale_rule=None` mean the defaults (32; the kind's default rule).
        """
        if block_size is None:
            block_size = BLOCK_SIZE_DEFAULT
        kind_name = name.lower() if isinstance(name, str) else name
        if kind_name == "mxint":
            if exponent_width is not None or frac_width is not None:
                raise FormatError(
                    "mxint takes `width` (total bits incl. sign), not exponent_width/frac_width"
                )
            if width is None:
                raise FormatError(
                    f"mxint needs `width`; allowed: {MXINT_WIDTHS.start}..{MXINT_WIDTHS.stop - 1}"
                )
            width = _check_int("width", width)
            if width not in MXINT_WIDTHS:
                raise FormatError(
                    f"mxint width {width} is out of range; allowed: "
                    f"{MXINT_WIDTHS.start}..{MXINT_WIDTHS.stop - 1} (total bits incl. sign)"
                )
            element = ELEMENT_FORMATS[f"int{width}"]
        elif kind_name == "mxfp":
            allowed = ", ".join(f"({e}, {m}) {n}" for (e, m), n in MXFP_PAIRS.items())
            if exponent_width is None or frac_width is None:
                raise FormatError(f"mxfp needs exponent_width and frac_width; allowed pairs: {allowed}")
            pair = (_check_int("exponent_width", exponent_width), _check_int("frac_width", frac_width))
            if pair not in MXFP_PAIRS:
                raise FormatError(
                    f"mxfp (exponent_width={pair[0]}, frac_width={pair[1]}) is not an OCP MX element "
                    f"format; allowed pairs: {allowed}"
                )
            element = ELEMENT_FORMATS[MXFP_PAIRS[pair]]
            if width is not None and _check_int("width", width) != element.bits:
                raise FormatError(
                    f"mxfp width {width} does not match 1 + exponent_width + frac_width = {element.bits}"
                )
        else:
            raise FormatError(f"unknown MX format name {name!r}; allowed: {', '.join(FORMAT_NAMES)}")
        return cls(element=element, block_size=block_size, scale_rule=scale_rule)  # type: ignore[arg-type]

    @property
    def bits(self) -> int:
        """Bits per element (the E8M0 scale adds 8 / block_size bits per element)."""
        return self.element.bits

    @property
    def kind(self) -> str:
        return self.element.kind

    @property
    def label(self) -> str:
        """Short human label, e.g. "MXINT4(b32,tutorial)", "MXFP4_E2M1(b32,ocp)"."""
        if self.element.kind == "int":
            head = f"MXINT{self.element.bits}"
        else:
            head = f"MXFP{self.element.bits}_{self.element.name.upper()}"
        return f"{head}(b{self.block_size},{self.scale_rule.value})"

    def __str__(self) -> str:
        return self.label

    def to_dict(self) -> dict[str, Any]:
        """JSON-able recipe keys (plus `element` for readers); `Format.from_dict` inverts it."""
        out: dict[str, Any] = {"name": f"mx{self.element.kind}", "element": self.element.name}
        if self.element.kind == "int":
            out["width"] = self.element.bits
        else:
            out["exponent_width"] = self.element.exp_bits
            out["frac_width"] = self.element.man_bits
        out["block_size"] = self.block_size
        out["scale_rule"] = self.scale_rule.value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Format:
        keys = dict(data)
        element_name = keys.pop("element", None)
        allowed = {"name", "width", "exponent_width", "frac_width", "block_size", "scale_rule"}
        unknown = sorted(set(keys) - allowed)
        if unknown:
            raise FormatError(f"unknown format key(s) {unknown}; allowed: {sorted(allowed | {'element'})}")
        if "name" not in keys:
            raise FormatError(f"format dict needs `name`; allowed: {', '.join(FORMAT_NAMES)}")
        fmt = cls.from_keys(keys.pop("name"), **keys)
        if element_name is not None and element_name != fmt.element.name:
            raise FormatError(
                f"format dict element {element_name!r} disagrees with its keys ({fmt.element.name})"
            )
        return fmt
