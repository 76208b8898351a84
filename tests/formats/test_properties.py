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
    assume(fmt.scale_rule is not ScaleRule.MSE)  # its exponent is searched: see the next test
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
def test_mse_rule_never_worse_than_the_rule_it_starts_from(case):
    """Per block, the searched exponent's squared error is at most that of the family's default
    rule (which is one of its candidates), computed in float64 from the two quantizations."""
    fmt, x = case
    assume(fmt.scale_rule is ScaleRule.MSE)
    base = Format(fmt.element, block_size=fmt.block_size)  # the kind's default rule
    pad = (-x.numel()) % fmt.block_size

    def block_errors(q):
        d = torch.nn.functional.pad((q.double() - x.double()), (0, pad))
        return d.square().reshape(-1, fmt.block_size).sum(dim=1)

    searched, default = block_errors(quantize(x, fmt)), block_errors(quantize(x, base))
    assert bool((searched <= default * (1 + 1e-6)).all()), (searched, default)


def test_mse_rule_hand_values():
    """MXINT4 (tutorial codes -8..7, value = code/4 * 2^s): a block [1.1, 0.2]. Tutorial: s = 0,
    codes round(4.4) = 4, round(0.8) = 1 -> [1.0, 0.25], error 0.01 + 0.0025 = 0.0125.
    s = -1: codes 8.8 -> 7 (clipped), 1.6 -> 2 -> [0.875, 0.25], error 0.050625 + 0.0025: worse.
    s = +1: codes 2.2 -> 2, 0.4 -> 0 -> [1.0, 0.0], error 0.01 + 0.04: worse. So mse = tutorial.
    A block [1.05, -1.0, 0.4]: tutorial s = 0 -> [1.0, -1.0, 0.5] (codes 4, -4, 2; 1.6 -> 2), error
    0.0025 + 0 + 0.01 = 0.0125; s = -1 -> codes 8.4 -> 7, -8, 3.2 -> 3: [0.875, -1.0, 0.375], error
    0.030625 + 0 + 0.000625 = 0.03125: worse. FP4 E2M1 (max 6, OCP s = floor(log2 amax) - 2):
    [7.0, 1.0]: OCP s = 0 -> [6.0, 1.0] (7 saturates), error 1; s = 1 -> 7/2 = 3.5 -> 4 (tie to
    even), 0.5 -> [8.0, 1.0], error 1: a tie, kept at OCP's. [7.5, 1.0]: OCP -> [6, 1], error 2.25;
    s = 1 -> 3.75 -> 4 -> [8, 1], error 0.25: the coarser scale wins."""
    int4 = Format.from_keys("mxint", width=4, block_size=2, scale_rule="mse")
    assert quantize(torch.tensor([1.1, 0.2]), int4).tolist() == [1.0, 0.25]
    int4_3 = Format.from_keys("mxint", width=4, block_size=3, scale_rule="mse")
    assert quantize(torch.tensor([1.05, -1.0, 0.4]), int4_3).tolist() == [1.0, -1.0, 0.5]
    fp4 = Format.from_keys("mxfp", exponent_width=2, frac_width=1, block_size=2, scale_rule="mse")
    assert quantize(torch.tensor([7.0, 1.0]), fp4).tolist() == [6.0, 1.0]
    assert quantize(torch.tensor([7.5, 1.0]), fp4).tolist() == [8.0, 1.0]
    # a lone maximum just above a power of two: the finer MXINT scale that clips it wins
    # [1.0625, 0.3, 0.3, 0.3] tutorial s = 0 (codes 4.25 -> 4, 1.2 -> 1): [1, .25, .25, .25], error
    # 0.00390625 + 3 * 0.0025 = 0.01140625; s = -1 (codes 8.5 -> 7, 2.4 -> 2): [0.875, .25, ...],
    # error 0.03515625 + 0.0075: worse. Negative lone maximum: [-1.0625, 0.3, 0.3, 0.3], s = -1 ->
    # codes -8.5 -> -8 = -1.0, 2.4 -> 2 = 0.25: error 0.00390625 + 0.0075 = 0.01140625, a tie with
    # s = 0 ([-1, .25, .25, .25]): both give the same values.
    int4_4 = Format.from_keys("mxint", width=4, block_size=4, scale_rule="mse")
    assert quantize(torch.tensor([1.0625, 0.3, 0.3, 0.3]), int4_4).tolist() == [1.0, 0.25, 0.25, 0.25]
    # [-1.2, 0.1, 0.1, 0.1]: s = 0 -> codes -4.8 -> -5, 0.4 -> 0: [-1.25, 0, 0, 0], error
    # 0.0025 + 0.03 = 0.0325; s = -1 -> codes -9.6 -> -8 = -1.0, 0.8 -> 1 = 0.125: error 0.04 +
    # 3 * 0.000625 = 0.041875: worse; s = -1 wins only when small elements dominate:
    # [-1.1, 0.15, 0.15, 0.15]: s = 0 -> [-1.0 (4.4 -> 4), 0.25 (0.6 -> 1)...]: error 0.01 + 3 * 0.01
    # = 0.04; s = -1 -> [-1.0 (-8.8 -> -8), 0.125 (1.2 -> 1)]: error 0.01 + 3 * 0.000625 = 0.011875.
    assert quantize(torch.tensor([-1.1, 0.15, 0.15, 0.15]), int4_4).tolist() == [-1.0, 0.125, 0.125, 0.125]


@SETTINGS
@given(blocks())
def test_sign_symmetry_for_symmetric_rules(case):
    fmt, x = case
    # the tutorial rule (and mse for MXINT, which searches with its codes) use -2^(b-1)..2^(b-1)-1
    assume(fmt.scale_rule is not ScaleRule.TUTORIAL)
    assume(not (fmt.scale_rule is ScaleRule.MSE and fmt.element.kind == "int"))
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
