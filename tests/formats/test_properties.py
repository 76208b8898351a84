"""Property tests (hypothesis) of mxptq/formats/mx.py over every element format and scale rule."""

import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from mxptq.formats import ELEMENT_FORMATS, Format, ScaleRule, decode, encode, quantize, scale_exp_from_amax
from mxptq.formats.mxint import code_range
from mxptq.formats.spec import ALLOWED_SCALE_RULES

FORMATS = [(elem, rule) for elem in ELEMENT_FORMATS.values() for rule in ALLOWED_SCALE_RULES[elem.kind]]
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# finite fp32 values across many binades (times the block scale below: at most ~2^120, so no
# rule can round past fp32's max)
values = st.floats(min_value=-(2.0**100), max_value=2.0**100, allow_nan=False, allow_infinity=False, width=32)


@st.composite
def blocks(draw, max_len=40):
    elem, rule = draw(st.sampled_from(FORMATS))
    block_size = draw(st.sampled_from([1, 2, 5, 8, 32]))
    xs = draw(st.lists(values, min_size=1, max_size=max_len))
    # also exercise blocks whose magnitudes sit in one narrow range
    scale = draw(st.sampled_from([1.0, 2.0**-30, 2.0**-140, 2.0**20]))
    x = torch.tensor(xs, dtype=torch.float32) * scale
    return Format(elem, block_size=block_size, scale_rule=rule), x


def grid_bounds(fmt):
    """(lowest, highest) element value the rule can produce (element units)."""
    elem = fmt.element
    if elem.kind == "fp":
        return -elem.max_value, elem.max_value
    lowest, highest = code_range(elem, fmt.scale_rule)
    return lowest * 2.0**-elem.man_bits, highest * 2.0**-elem.man_bits


def half_step(v, fmt):
    """Half the element-grid spacing around |v| (element units)."""
    elem = fmt.element
    if elem.kind == "int":
        return 2.0**-elem.man_bits / 2
    binade = max(math.frexp(v)[1] - 1 if v else elem.emin, elem.emin)  # exact floor(log2 |v|)
    return 2.0 ** (binade - elem.man_bits) / 2


@SETTINGS
@given(blocks())
def test_idempotent_except_tutorial(case):
    fmt, x = case
    q = quantize(x, fmt)
    if fmt.scale_rule is not ScaleRule.TUTORIAL:
        assert torch.equal(quantize(q, fmt), q)


def test_tutorial_rule_is_not_idempotent_counterexample():
    # int4 tutorial: 1.1 -> e = 1, step 1/4 -> 1.0; requantized: e = 0, step 1/8, code 8 -> 7 -> 0.875
    fmt = Format.from_keys("mxint", width=4, block_size=1)
    once = quantize(torch.tensor([1.1]), fmt)
    assert once.item() == 1.0 and quantize(once, fmt).item() == 0.875


@SETTINGS
@given(blocks())
def test_error_at_most_half_a_step_unless_clipped(case):
    fmt, x = case
    q = quantize(x, fmt)
    n = x.numel()
    pad = (-n) % fmt.block_size
    xb = torch.nn.functional.pad(x, (0, pad)).reshape(-1, fmt.block_size)
    scale_exp = scale_exp_from_amax(xb.abs().amax(dim=1), fmt).repeat_interleave(fmt.block_size)[:n]
    lowest, highest = grid_bounds(fmt)
    for xi, qi, s in zip(x.tolist(), q.tolist(), scale_exp.tolist()):
        v, qv = xi / 2.0**s, qi / 2.0**s  # exact: powers of two in double
        if v > highest:
            assert qv == highest and fmt.scale_rule is not ScaleRule.SYMMETRIC
        elif v < lowest:
            assert qv == lowest and fmt.scale_rule is not ScaleRule.SYMMETRIC
        else:
            assert abs(qv - v) <= half_step(v, fmt)


@SETTINGS
@given(blocks())
def test_sign_symmetry_for_symmetric_rules(case):
    fmt, x = case
    assume(fmt.scale_rule is not ScaleRule.TUTORIAL)
    assert torch.equal(quantize(-x, fmt), -quantize(x, fmt))


@SETTINGS
@given(blocks(), st.sampled_from([torch.float16, torch.bfloat16, torch.float32]))
def test_dtype_round_trip(case, dtype):
    fmt, x = case
    x = x.clamp(-6e4, 6e4).to(dtype)  # stay inside fp16's range
    q = quantize(x, fmt)
    assert q.dtype == dtype and q.shape == x.shape
    assert torch.equal(q, quantize(x.float(), fmt).to(dtype))


@SETTINGS
@given(blocks())
def test_decode_encode_is_quantize(case):
    fmt, x = case
    codes, scale = encode(x, fmt)
    assert torch.equal(decode(codes, scale, fmt), quantize(x, fmt))


@pytest.mark.parametrize("elem", [e for e, r in FORMATS if r is ScaleRule.SYMMETRIC], ids=lambda e: e.name)
def test_symmetric_rule_never_clips(elem):
    fmt = Format(elem, block_size=1, scale_rule=ScaleRule.SYMMETRIC)
    # blocks of one element: each value is its block's amax and must fit the grid unclipped
    x = torch.linspace(-64.0, 64.0, 2001)
    scale_exp = scale_exp_from_amax(x.abs(), fmt).tolist()
    for xi, qi, s in zip(x.tolist(), quantize(x, fmt).tolist(), scale_exp):
        assert abs(xi) / 2.0**s <= elem.max_value and abs(qi) / 2.0**s <= elem.max_value
