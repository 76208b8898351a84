"""mxptq/formats/mx.py: shared exponent, blocking, padding, zero/NaN blocks, dtypes, codes."""

import math

import numpy as np
import pytest
import torch
from mx_oracle import ALL_ELEMENTS, quantize_rows
from mx_oracle import scale_exp as oracle_scale_exp

from mxptq.formats import (
    ELEMENT_FORMATS,
    SCALE_EXP_NAN,
    Format,
    ScaleRule,
    decode,
    encode,
    pack_codes,
    quantize,
    quantize_elements,
    quantize_reference,
    scale_exp_from_amax,
    unpack_codes,
)
from mxptq.formats.spec import ALLOWED_SCALE_RULES

ALL_FORMATS = [
    Format(ELEMENT_FORMATS[name], block_size=8, scale_rule=rule)
    for name in ALL_ELEMENTS
    for rule in ALLOWED_SCALE_RULES[ELEMENT_FORMATS[name].kind]
]


def fmt_id(fmt):
    return fmt.label


def below(v):
    """The largest fp32 value below v (top of the binade under a power of two)."""
    return float(np.nextafter(np.float32(v), np.float32(0)))


# amax exactly a power of two, in the top binade just under one, ordinary, and fp32-denormal range
HAND_AMAX = [1.0, 2.0, 0.5, 2.0**-20, below(2.0), below(8.0), below(1.0), 3.0, 6.0, 7.0, 448.0, 500.0]
HAND_AMAX += [57344.0, 1e-30, 2.0**-126, 2.0**-127, 2.0**-130, 1e-45, 3e38, 2.0**127]


@pytest.mark.parametrize("fmt", ALL_FORMATS, ids=fmt_id)
def test_shared_exponent_matches_spec_formula(fmt):
    amax = torch.tensor(HAND_AMAX, dtype=torch.float32)
    expected = [oracle_scale_exp(a, fmt.element.name, fmt.scale_rule.value) for a in amax.tolist()]
    assert scale_exp_from_amax(amax, fmt).tolist() == expected
    assert scale_exp_from_amax(amax, fmt).dtype == torch.int32


def test_shared_exponent_hand_values():
    e2m1 = Format(ELEMENT_FORMATS["e2m1"])
    int4 = Format(ELEMENT_FORMATS["int4"])
    amax = torch.tensor([4.0, below(8.0), 6.0, 2.0**-130])
    # OCP: floor(log2 amax) - 2 ; 2^-130 -> -132 clamped to -127
    assert scale_exp_from_amax(amax, e2m1).tolist() == [0, 0, 0, -127]
    # tutorial: ceil(log2 amax) - 1
    assert scale_exp_from_amax(amax, int4).tolist() == [1, 2, 2, -127]
    # symmetric e2m1: smallest s with amax <= 6 * 2^s
    sym = Format(ELEMENT_FORMATS["e2m1"], scale_rule="symmetric")
    assert scale_exp_from_amax(amax, sym).tolist() == [0, 1, 0, -127]


def test_zero_and_nonfinite_amax():
    for fmt in ALL_FORMATS:
        out = scale_exp_from_amax(torch.tensor([0.0, math.nan, math.inf]), fmt).tolist()
        assert out == [-127, SCALE_EXP_NAN, SCALE_EXP_NAN] and SCALE_EXP_NAN == 128


@pytest.mark.parametrize("fmt", ALL_FORMATS, ids=fmt_id)
def test_quantize_matches_independent_oracle(fmt):
    gen = torch.Generator().manual_seed(hash(fmt.label) % 2**31)
    # rows of 19 (two full blocks of 8 and a tail of 3), magnitudes spread over many binades
    x = torch.randn(6, 19, generator=gen) * torch.exp2(torch.randint(-12, 12, (6, 1), generator=gen).float())
    x[1, :8] = 0.0  # an all-zero block
    x[2, 8:16] = x[2, 8:16] * 2.0**-140  # a block deep in the fp32-denormal range
    x[3, 3] = 2.0 ** round(math.log2(x[3].abs().max().item()) + 1)  # amax an exact power of two
    expected = quantize_rows(x.tolist(), fmt.element.name, fmt.scale_rule.value, fmt.block_size)
    assert quantize(x, fmt).tolist() == expected


@pytest.mark.parametrize("axis", [0, 1, 2, -1, -2])
def test_blocks_along_any_axis(axis):
    fmt = Format.from_keys("mxfp", exponent_width=2, frac_width=1, block_size=4)
    x = torch.randn(5, 6, 7, generator=torch.Generator().manual_seed(axis + 3))
    moved = x.movedim(axis, -1)
    expected = quantize_rows(moved.reshape(-1, moved.shape[-1]).tolist(), "e2m1", "ocp", 4)
    expected = torch.tensor(expected).reshape(moved.shape).movedim(-1, axis)
    assert torch.equal(quantize(x, fmt, axis=axis), expected)


def test_rows_are_padded_per_row_never_straddled():
    fmt = Format.from_keys("mxint", width=4, block_size=32)
    x = torch.randn(3, 40, generator=torch.Generator().manual_seed(1))
    x[1, 35] = 100.0  # a big outlier in row 1's tail block must not touch row 2's head
    q = quantize(x, fmt)
    tail_fmt = Format.from_keys("mxint", width=4, block_size=8)
    assert torch.equal(q[:, 32:], quantize(x[:, 32:], tail_fmt))
    assert torch.equal(q[:, :32], quantize(x[:, :32], fmt))
    codes, scale = encode(x, fmt)
    assert scale.shape == (3, 2) and codes.shape == (3, 40)


def test_all_zero_blocks_decode_to_zero_with_smallest_scale():
    for fmt in ALL_FORMATS:
        x = torch.zeros(2, 16)
        codes, scale = encode(x, fmt)
        assert (scale == 0).all() and (codes == 0).all()
        assert torch.equal(quantize(x, fmt), x)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("fmt", [ALL_FORMATS[0], ALL_FORMATS[-1]], ids=fmt_id)
def test_nan_or_inf_poisons_exactly_its_block(bad, fmt):
    x = torch.randn(2, 24, generator=torch.Generator().manual_seed(2))
    x[1, 10] = bad  # block 1 of row 1 (elements 8..15)
    q = quantize(x, fmt)
    assert q[1, 8:16].isnan().all()
    poisoned = torch.zeros_like(x, dtype=torch.bool)
    poisoned[1, 8:16] = True
    assert torch.isfinite(q[~poisoned]).all()
    assert torch.equal(q[~poisoned], quantize(torch.where(poisoned, 0.0, x), fmt)[~poisoned])
    codes, scale = encode(x, fmt)
    assert scale[1, 1].item() == 255 and (codes[1, 8:16] == 0).all()
    assert decode(codes, scale, fmt)[1, 8:16].isnan().all()


def test_finite_inputs_never_overflow():
    x = torch.tensor([3.4e38, -3.4e38, 1.0, 0.0] * 2)
    for fmt in ALL_FORMATS:
        if fmt.scale_rule is ScaleRule.OCP:
            assert torch.isfinite(quantize(x, fmt)).all(), fmt.label
    # documented exception: tutorial rule, amax > 2^127 -> scale 2^127, code -2^(b-1) = -2^128
    q = quantize(x, Format.from_keys("mxint", width=4, block_size=8))
    assert q[1].item() == -math.inf and q[0].item() == 1.75 * 2.0**127


def test_e8m0_every_scale_byte_decodes():
    fmt = Format.from_keys("mxint", width=8, block_size=1, scale_rule="ocp")
    scale = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    codes = torch.full((256,), 64, dtype=torch.int8)  # element value 64 * 2^-6 = 1.0
    out = decode(codes, scale, fmt).tolist()
    assert out[:255] == [2.0 ** (b - 127) for b in range(255)] and math.isnan(out[255])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fmt", ALL_FORMATS[::3], ids=fmt_id)
def test_dtype_in_dtype_out_and_math_in_fp32(dtype, fmt):
    x = (torch.randn(4, 40, generator=torch.Generator().manual_seed(4)) * 3).to(dtype)
    q = quantize(x, fmt)
    assert q.dtype == dtype and q.shape == x.shape
    assert torch.equal(q, quantize(x.float(), fmt).to(dtype))
    assert torch.equal(q.float(), quantize(x.float(), fmt))  # exact in fp16/bf16 at this range


def test_float64_and_integer_inputs():
    fmt = Format.from_keys("mxint", width=4)
    x = torch.randn(64, dtype=torch.float64)
    assert quantize(x, fmt).dtype == torch.float64
    with pytest.raises(TypeError, match="floating-point"):
        quantize(torch.ones(4, dtype=torch.int32), fmt)


def test_scalar_and_empty_tensors():
    fmt = Format.from_keys("mxfp", exponent_width=4, frac_width=3)
    assert quantize(torch.tensor(3.3), fmt).shape == ()
    assert quantize(torch.tensor(3.3), fmt).item() == 3.25
    assert quantize(torch.empty(3, 0), fmt).shape == (3, 0)


def test_quantize_elements_with_caller_chosen_scale_broadcasts():
    # the GPTQ use: scale_exp per row-block, one column at a time
    fmt = Format.from_keys("mxint", width=4, block_size=32)
    W = torch.randn(8, 32, generator=torch.Generator().manual_seed(5))
    scale_exp = scale_exp_from_amax(W.abs().amax(dim=1), fmt)
    columns = torch.stack([quantize_elements(W[:, j], fmt, scale_exp) for j in range(32)], dim=1)
    assert torch.equal(columns, quantize(W, fmt))
    nan_out = quantize_elements(W[:, 0], fmt, torch.full((8,), SCALE_EXP_NAN))
    assert nan_out.isnan().all()


def test_quantize_dispatch_falls_back_to_reference_on_cpu():
    fmt = Format.from_keys("mxint", width=4)
    x = torch.randn(4, 64)
    assert torch.equal(quantize(x, fmt), quantize_reference(x, fmt))


@pytest.mark.parametrize("elem", list(ELEMENT_FORMATS.values()), ids=lambda e: e.name)
def test_contract_every_registered_element_format(elem):
    """One contract over every registered element format and each allowed rule."""
    for rule in ALLOWED_SCALE_RULES[elem.kind]:
        fmt = Format(elem, block_size=16, scale_rule=rule)
        assert Format.from_dict(fmt.to_dict()) == fmt and fmt.bits == elem.bits
        x = torch.randn(3, 5, 37, generator=torch.Generator().manual_seed(elem.bits)) * 10
        for axis in (0, 1, 2):
            for dtype in (torch.float32, torch.float16, torch.bfloat16):
                q = quantize(x.to(dtype), fmt, axis=axis)
                assert q.shape == x.shape and q.dtype == dtype
            q = quantize(x, fmt, axis=axis)
            codes, scale = encode(x, fmt, axis=axis)
            assert codes.dtype == elem.code_dtype and scale.dtype == torch.uint8
            n_blocks = -(-x.shape[axis] // 16)
            assert scale.shape == tuple(n_blocks if d == axis else s for d, s in enumerate(x.shape))
            assert torch.equal(decode(codes, scale, fmt, axis=axis), q)
            assert torch.equal(quantize(q, fmt, axis=axis), q) or rule is ScaleRule.TUTORIAL
            signed = elem.kind == "int"
            packed = pack_codes(codes, elem.bits)
            assert packed.numel() == -(-codes.numel() * elem.bits // 8)
            assert torch.equal(
                unpack_codes(packed, elem.bits, codes.numel(), signed=signed).reshape(codes.shape), codes
            )


def test_missing_kernels_module_falls_back_silently(monkeypatch):
    import sys

    import mxptq.formats
    from mxptq.formats import mx

    monkeypatch.setitem(sys.modules, "mxptq.formats.kernels", None)  # makes the import fail
    # An earlier import leaves the submodule as a package attribute, which `from ... import` prefers.
    monkeypatch.delattr(mxptq.formats, "kernels", raising=False)
    mx.available_kernels.cache_clear()
    try:
        assert mx.available_kernels() is None
    finally:
        mx.available_kernels.cache_clear()
