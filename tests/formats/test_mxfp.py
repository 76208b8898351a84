"""mxptq/formats/mxfp.py: OCP minifloat elements, every code, ties, saturation, bit patterns."""

import itertools
import math
from fractions import Fraction

import pytest
import torch
from mx_oracle import FP_SPEC, fp_decode, fp_grid, round_element

from mxptq.formats import ELEMENT_FORMATS, Format, ScaleRule, decode, encode, quantize, quantize_elements
from mxptq.formats.mxfp import bits_to_element, element_to_bits

FP_NAMES = list(FP_SPEC)


def all_codes(name):
    return torch.arange(2 ** ELEMENT_FORMATS[name].bits, dtype=torch.int32).to(torch.uint8)


@pytest.mark.parametrize("name", FP_NAMES)
def test_decode_every_bit_pattern_matches_spec_formula(name):
    codes = all_codes(name)
    got = bits_to_element(codes, ELEMENT_FORMATS[name]).tolist()
    for code, value in zip(codes.tolist(), got):
        expected = fp_decode(name, code)
        if math.isnan(expected):
            assert math.isnan(value), hex(code)
        else:
            assert value == expected and math.copysign(1, value) == math.copysign(1, expected), hex(code)


@pytest.mark.parametrize("name", FP_NAMES)
def test_spec_table_extremes(name):
    spec, elem = FP_SPEC[name], ELEMENT_FORMATS[name]
    values = bits_to_element(all_codes(name), elem)
    finite_pos = values[torch.isfinite(values) & (values > 0)]
    assert finite_pos.max().item() == spec["max"]
    assert finite_pos.min().item() == spec["min_subnormal"]
    normal = finite_pos[finite_pos >= spec["min_normal"]]
    assert normal.min().item() == spec["min_normal"]


@pytest.mark.parametrize("name", FP_NAMES)
def test_every_finite_code_encodes_back_to_itself(name):
    elem = ELEMENT_FORMATS[name]
    codes = all_codes(name)
    values = bits_to_element(codes, elem)
    finite = torch.isfinite(values)
    assert torch.equal(element_to_bits(values[finite], elem), codes[finite])


@pytest.mark.parametrize("name", FP_NAMES)
@pytest.mark.parametrize("scale_exp", [-127, -20, 0, 7, 100])
def test_every_representable_value_survives_quantize_elements(name, scale_exp):
    fmt = Format(ELEMENT_FORMATS[name])
    values = torch.tensor([float(v) for v, _ in fp_grid(name)])
    values = torch.cat([values, -values])
    scaled = values * 2.0**scale_exp
    assert torch.equal(quantize_elements(scaled, fmt, torch.tensor(scale_exp)), scaled)


@pytest.mark.parametrize("name", FP_NAMES)
@pytest.mark.parametrize("rule", [ScaleRule.OCP, ScaleRule.SYMMETRIC])
def test_every_representable_value_survives_block_quantize(name, rule):
    # each value in a block whose amax is max_value: both rules then pick scale 2^0
    fmt = Format(ELEMENT_FORMATS[name], block_size=2, scale_rule=rule)
    grid = [(float(v), c) for v, c in fp_grid(name)]
    x = torch.tensor([[s * v, FP_SPEC[name]["max"]] for v, _ in grid for s in (1.0, -1.0)])
    assert torch.equal(quantize(x, fmt), x)
    codes, scale = encode(x, fmt)
    assert (scale == 127).all()
    sign_bit = 1 << (ELEMENT_FORMATS[name].bits - 1)
    expected = [c | (sign_bit if s < 0 else 0) for _, c in grid for s in (1.0, -1.0)]
    assert codes[:, 0].tolist() == expected


@pytest.mark.parametrize("name", FP_NAMES)
def test_halfway_values_round_to_even_code(name):
    fmt = Format(ELEMENT_FORMATS[name])
    grid = fp_grid(name)
    mids = [(lo + hi) / 2 for (lo, _), (hi, _) in itertools.pairwise(grid)]
    expected_pos = [lo if lo_code % 2 == 0 else hi for ((lo, lo_code), (hi, _)) in itertools.pairwise(grid)]
    # sanity of the oracle itself: exactly one neighbour has an even code
    assert all((lc + hc) % 2 == 1 for (_, lc), (_, hc) in itertools.pairwise(grid))
    x = torch.tensor([float(m) for m in mids] + [-float(m) for m in mids])
    expected = torch.tensor([float(v) for v in expected_pos] + [-float(v) for v in expected_pos])
    assert torch.equal(quantize_elements(x, fmt, torch.tensor(0)), expected)


@pytest.mark.parametrize("name", FP_NAMES)
def test_off_grid_values_round_to_nearest(name):
    fmt = Format(ELEMENT_FORMATS[name])
    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(2000, generator=gen) * 2 - 1) * FP_SPEC[name]["max"] * 1.2
    x = torch.cat([x, x * 2.0**-12])  # also the subnormal range
    expected = [float(round_element(Fraction(v), name, "ocp")) for v in x.tolist()]
    assert quantize_elements(x, fmt, torch.tensor(0)).tolist() == expected


@pytest.mark.parametrize("name", FP_NAMES)
def test_beyond_max_saturates_never_inf(name):
    fmt = Format(ELEMENT_FORMATS[name])
    top = FP_SPEC[name]["max"]
    x = torch.tensor([top * 1.01, top * 1.5, top * 2, 1e30, 3.0e38])
    out = quantize_elements(torch.cat([x, -x]), fmt, torch.tensor(0))
    assert out.tolist() == [top] * 5 + [-top] * 5


def test_e4m3_between_448_and_480_saturates_instead_of_nan():
    # 464 is the midpoint of 448 and the NaN pattern's would-be value 480: OCP saturates to 448
    fmt = Format(ELEMENT_FORMATS["e4m3"])
    assert quantize_elements(torch.tensor([464.0, 479.0, -470.0]), fmt, torch.tensor(0)).tolist() == [
        448.0,
        448.0,
        -448.0,
    ]


def test_mxfp4_golden_block():
    # hand computed: amax 5.0 -> floor(log2 5) = 2, scale 2^(2-2) = 1; E2M1 grid 0 .5 1 1.5 2 3 4 6
    fmt = Format.from_keys("mxfp", exponent_width=2, frac_width=1, block_size=8)
    x = torch.tensor([5.0, -0.25, 0.75, 2.5, -3.5, 0.2, 1.25, -5.0])
    codes, scale = encode(x, fmt)
    assert quantize(x, fmt).tolist() == [4.0, -0.0, 1.0, 2.0, -4.0, 0.0, 1.0, -4.0]
    # 5 -> tie between 4 (0b110) and 6 (0b111): even code 4; -0.25 -> tie 0/0.5 -> -0
    assert codes.tolist() == [0b0110, 0b1000, 0b0010, 0b0100, 0b1110, 0b0000, 0b0010, 0b1110]
    assert scale.tolist() == [127]
    assert torch.equal(decode(codes, scale, fmt), quantize(x, fmt))
