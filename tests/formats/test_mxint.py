"""mxptq/formats/mxint.py: integer elements, every code under every rule, ties, clamping, goldens."""

import pytest
import torch

from mxptq.formats import ELEMENT_FORMATS, Format, ScaleRule, decode, encode, quantize, quantize_elements
from mxptq.formats.mxint import code_range, codes_to_element, element_to_codes

INT_RULES = [ScaleRule.TUTORIAL, ScaleRule.SYMMETRIC, ScaleRule.OCP]
WIDTHS = range(2, 9)


def expected_range(bits, rule):
    top = 2 ** (bits - 1) - 1
    return (-top - 1 if rule is ScaleRule.TUTORIAL else -top), top


@pytest.mark.parametrize("bits", WIDTHS)
@pytest.mark.parametrize("rule", INT_RULES)
def test_code_range_per_rule(bits, rule):
    assert code_range(ELEMENT_FORMATS[f"int{bits}"], rule) == expected_range(bits, rule)


@pytest.mark.parametrize("bits", WIDTHS)
def test_codes_round_trip_through_element_values(bits):
    elem = ELEMENT_FORMATS[f"int{bits}"]
    codes = torch.arange(-(2 ** (bits - 1)), 2 ** (bits - 1), dtype=torch.int8)
    values = codes_to_element(codes, elem)
    assert values.tolist() == [c / 2 ** (bits - 2) for c in codes.tolist()]
    assert torch.equal(element_to_codes(values, elem), codes)


@pytest.mark.parametrize("bits", WIDTHS)
@pytest.mark.parametrize("rule", INT_RULES)
@pytest.mark.parametrize("scale_exp", [-127, -9, 0, 5, 120])
def test_every_code_survives_quantize_elements(bits, rule, scale_exp):
    fmt = Format(ELEMENT_FORMATS[f"int{bits}"], scale_rule=rule)
    lowest, highest = expected_range(bits, rule)
    x = torch.tensor([c * 2.0 ** (scale_exp - (bits - 2)) for c in range(lowest, highest + 1)])
    assert torch.equal(quantize_elements(x, fmt, torch.tensor(scale_exp)), x)


@pytest.mark.parametrize("bits", WIDTHS)
@pytest.mark.parametrize("rule", INT_RULES)
def test_every_code_survives_block_quantize(bits, rule):
    fmt = Format(ELEMENT_FORMATS[f"int{bits}"], block_size=2, scale_rule=rule)
    lowest, highest = expected_range(bits, rule)
    step = 2.0 ** -(bits - 2)
    # anchor each block at the value that makes the rule choose scale_exp = 0
    anchor = lowest * step if rule is ScaleRule.TUTORIAL else highest * step
    x = torch.tensor([[c * step, anchor] for c in range(lowest, highest + 1)])
    assert torch.equal(quantize(x, fmt), x)
    codes, scale = encode(x, fmt)
    assert codes[:, 0].tolist() == list(range(lowest, highest + 1)) and (scale == 127).all()


@pytest.mark.parametrize("bits", WIDTHS)
@pytest.mark.parametrize("rule", INT_RULES)
def test_halfway_codes_round_to_even(bits, rule):
    fmt = Format(ELEMENT_FORMATS[f"int{bits}"], scale_rule=rule)
    lowest, highest = expected_range(bits, rule)
    step = 2.0 ** -(bits - 2)
    halves = [c + 0.5 for c in range(lowest, highest)]
    expected = [(c if c % 2 == 0 else c + 1) for c in range(lowest, highest)]
    out = quantize_elements(torch.tensor([h * step for h in halves]), fmt, torch.tensor(0))
    assert out.tolist() == [e * step for e in expected]


@pytest.mark.parametrize("bits", WIDTHS)
@pytest.mark.parametrize("rule", INT_RULES)
def test_beyond_range_clamps_to_the_rule_code_range(bits, rule):
    fmt = Format(ELEMENT_FORMATS[f"int{bits}"], scale_rule=rule)
    lowest, highest = expected_range(bits, rule)
    step = 2.0 ** -(bits - 2)
    x = torch.tensor([(highest + 0.6) * step, 100.0, 1e30, (lowest - 0.6) * step, -100.0, -1e30])
    out = quantize_elements(x, fmt, torch.tensor(0))
    assert out.tolist() == [highest * step] * 3 + [lowest * step] * 3


def test_tutorial_mxint4_golden_block():
    # Hand computation, tutorial rule, b = 4, block of 8: amax = 2.0 -> e = ceil(log2 2) = 1,
    # codes = clamp(rne(x * 2^(4-1-1)), -8, 7) = clamp(rne(4x), -8, 7), value = code / 4.
    #   2.0 -> 8 -> clipped to 7 (the 7/8 clip) ; -2.0 -> -8 ; 1.9 -> 7.6 -> 8 -> 7 ;
    #   0.3 -> 1.2 -> 1 ; -0.26 -> -1.04 -> -1 ; 0.125 -> 0.5 -> 0 (tie, even) ;
    #   0.375 -> 1.5 -> 2 (tie, even) ; 0.625 -> 2.5 -> 2 (tie, even)
    fmt = Format.from_keys("mxint", width=4, block_size=8)
    x = torch.tensor([2.0, -2.0, 1.9, 0.3, -0.26, 0.125, 0.375, 0.625])
    codes, scale = encode(x, fmt)
    assert codes.tolist() == [7, -8, 7, 1, -1, 0, 2, 2]
    assert scale.tolist() == [127 + 0]  # stored scale_exp = e - 1 = 0 (int4 values are code / 4)
    assert quantize(x, fmt).tolist() == [1.75, -2.0, 1.75, 0.25, -0.25, 0.0, 0.5, 0.5]
    assert torch.equal(decode(codes, scale, fmt), quantize(x, fmt))


def test_tutorial_clips_power_of_two_max_to_seven_eighths():
    fmt = Format.from_keys("mxint", width=4, block_size=4)
    for e in (-3, 0, 5):
        x = torch.tensor([2.0**e, 0.0, 0.0, 0.0])
        assert quantize(x, fmt)[0].item() == 7 / 8 * 2.0**e
        assert quantize(-x, fmt)[0].item() == -(2.0**e)  # the negative end is representable


def test_symmetric_mxint4_golden_block():
    # symmetric, b = 4: codes +-7, smallest step 2^k with 2.0 / 2^k <= 7 -> k = -1 (step 0.5)
    #   2.0 -> 4 ; -2.0 -> -4 ; 1.9 -> 3.8 -> 4 ; 0.3 -> 0.6 -> 1 ; -0.26 -> -0.52 -> -1 ;
    #   0.125 -> 0.25 -> 0 ; -1.75 -> -3.5 -> -4 (tie, even) ; 1.25 -> 2.5 -> 2 (tie, even)
    fmt = Format.from_keys("mxint", width=4, block_size=8, scale_rule="symmetric")
    x = torch.tensor([2.0, -2.0, 1.9, 0.3, -0.26, 0.125, -1.75, 1.25])
    codes, scale = encode(x, fmt)
    assert codes.tolist() == [4, -4, 4, 1, -1, 0, -4, 2]
    assert scale.tolist() == [127 + 1]  # step 2^-1 = 2^(scale_exp - 2)
    assert quantize(x, fmt).tolist() == [2.0, -2.0, 2.0, 0.5, -0.5, 0.0, -2.0, 1.0]


def test_symmetric_uses_seven_at_the_top_without_clipping():
    fmt = Format.from_keys("mxint", width=4, block_size=2, scale_rule="symmetric")
    x = torch.tensor([7.0, -3.0])  # 7 = 7 * 2^0 fits exactly
    assert quantize(x, fmt).tolist() == [7.0, -3.0]
    x = torch.tensor([7.5, -3.0])  # 7.5 > 7: step doubles to 2, codes 4 (7.5/2 = 3.75) and -2 (tie)
    assert quantize(x, fmt).tolist() == [8.0, -4.0]


def test_ocp_mxint8_golden_block():
    # OCP MX v1.0 MXINT8: X = 2^floor(log2 amax) (emax 0), element = code * 2^-6.
    # amax 1.5 -> X = 1; codes rne(64 x): 1.5 -> 96 ; -0.3 -> -19.2 -> -19 ; 0.0078125 -> 0.5 -> 0 ;
    # 1.99 not present; 0.0234375 -> 1.5 -> 2 (tie, even)
    fmt = Format.from_keys("mxint", width=8, block_size=4, scale_rule="ocp")
    x = torch.tensor([1.5, -0.3, 0.0078125, 0.0234375])
    codes, scale = encode(x, fmt)
    assert codes.tolist() == [96, -19, 0, 2] and scale.tolist() == [127]
    assert quantize(x, fmt).tolist() == [1.5, -19 / 64, 0.0, 2 / 64]
    # amax in the top binade: 1.999 -> rne(127.94) = 128 -> clamped to 127 (symmetric +-127)
    assert encode(torch.tensor([1.999, -1.999, 0.0, 0.0]), fmt)[0].tolist() == [127, -127, 0, 0]
