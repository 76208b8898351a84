"""MXLinear: weight quantized once, input per forward, against a hand-written MXINT (tutorial
rule) reference and the formats API; bypass; bias format; dtypes; GPTQ weights."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mxptq.nn.linear as linear_module
from mxptq.errors import ModelError
from mxptq.formats import Format, quantize, scale_exp_from_amax
from mxptq.nn.linear import GPTQ_FORMAT_ATTR, GPTQ_SCALE_EXP_ATTR, MXLinear

MXINT4 = Format.from_keys("mxint", width=4, block_size=32, scale_rule="tutorial")
MXINT8_B16 = Format.from_keys("mxint", width=8, block_size=16, scale_rule="tutorial")


def linear_config(weight=None, data_in=None, bias=None, bypass=False):
    return SimpleNamespace(weight=weight, data_in=data_in, bias=bias, bypass=bypass, gptq=False)


def hand_mxint_tutorial(x: torch.Tensor, bits: int, block: int) -> torch.Tensor:
    """Independent reference of the tutorial's MXINT rule, one block at a time in float64:
    e = ceil(log2 amax); codes = clamp(round_half_even(x * 2^(b-1-e)), -2^(b-1), 2^(b-1)-1);
    value = code * 2^(e-(b-1)). Blocks along the last axis, rows zero-padded."""
    rows = x.detach().double().reshape(-1, x.shape[-1])
    out = torch.zeros_like(rows)
    for r in range(rows.shape[0]):
        for start in range(0, rows.shape[1], block):
            values = rows[r, start : start + block]
            amax = values.abs().max().item()
            if amax == 0:
                continue
            e = math.ceil(math.log2(amax))
            codes = torch.round(values * 2.0 ** (bits - 1 - e)).clamp(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
            out[r, start : start + block] = codes * 2.0 ** (e - (bits - 1))
    return out.reshape(x.shape).to(x.dtype)


def make_linear(in_features=80, out_features=48, bias=True, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    layer = nn.Linear(in_features, out_features, bias=bias)
    return layer.to(dtype)


def test_weight_and_input_match_hand_computation():
    layer = make_linear(in_features=80)  # 80 = 2 full blocks + a zero-padded block of 16
    mx = MXLinear(layer, linear_config(weight=MXINT4, data_in=MXINT4), name="model.layers.0.mlp.up_proj")
    x = torch.randn(3, 5, 80)

    expected_weight = hand_mxint_tutorial(layer.weight, bits=4, block=32)
    assert torch.equal(mx.weight, expected_weight)
    expected = hand_mxint_tutorial(x, bits=4, block=32) @ expected_weight.T + layer.bias
    torch.testing.assert_close(mx(x), expected, rtol=1e-6, atol=1e-6)
    # and through the formats API (the one implementation everything else uses)
    assert torch.equal(mx(x), F.linear(quantize(x, MXINT4), quantize(layer.weight, MXINT4), layer.bias))
    assert mx.matmul_type == "up_proj"
    assert mx.weight_source == "rtn"


def test_weight_is_quantized_once_not_per_forward(monkeypatch):
    layer = make_linear()
    mx = MXLinear(layer, linear_config(weight=MXINT4, data_in=MXINT4))
    calls = []
    real_quantize = linear_module.quantize

    def counting(x, fmt, axis=-1):
        calls.append(tuple(x.shape))
        return real_quantize(x, fmt, axis)

    monkeypatch.setattr("mxptq.nn.quantizer.quantize", counting)
    monkeypatch.setattr(linear_module, "quantize", counting)
    mx(torch.randn(2, 80))
    mx(torch.randn(2, 80))
    assert calls == [(2, 80), (2, 80)]  # only the inputs


def test_source_layer_untouched_and_state_dict_keys_kept():
    layer = make_linear()
    before = layer.weight.detach().clone()
    mx = MXLinear(layer, linear_config(weight=MXINT4))
    assert torch.equal(layer.weight, before)
    assert set(mx.state_dict()) == {"weight", "bias"}
    assert mx.weight.shape == layer.weight.shape


def test_bypass_is_exactly_nn_linear():
    layer = make_linear()
    mx = MXLinear(layer, linear_config(weight=MXINT4, data_in=MXINT4, bypass=True))
    x = torch.randn(4, 80)
    assert torch.equal(mx(x), layer(x))
    assert mx.weight_fmt is None and not mx.input_quantizer.enabled


def test_weight_only_leaves_input_float():
    layer = make_linear()
    mx = MXLinear(layer, linear_config(weight=MXINT4))
    x = torch.randn(4, 80)
    assert torch.equal(mx(x), F.linear(x, hand_mxint_tutorial(layer.weight, 4, 32), layer.bias))


def test_bias_left_alone_unless_configured():
    layer = make_linear(out_features=48)
    plain = MXLinear(layer, linear_config(weight=MXINT4))
    assert torch.equal(plain.bias, layer.bias)
    with_bias_fmt = MXLinear(layer, linear_config(weight=MXINT4, bias=MXINT8_B16))
    assert torch.equal(with_bias_fmt.bias, hand_mxint_tutorial(layer.bias, bits=8, block=16))
    no_bias = MXLinear(make_linear(bias=False), linear_config(weight=MXINT4, bias=MXINT8_B16))
    assert no_bias.bias is None
    no_bias(torch.randn(2, 80))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_dtypes(dtype):
    layer = make_linear(dtype=dtype)
    mx = MXLinear(layer, linear_config(weight=MXINT4, data_in=MXINT4))
    x = torch.randn(2, 3, 80, dtype=dtype)
    y = mx(x)
    assert mx.weight.dtype == dtype and y.dtype == dtype
    # MXINT4 values are small integers times powers of two: exact in fp16/bf16 at these scales
    assert torch.equal(mx.weight, hand_mxint_tutorial(layer.weight, 4, 32))
    assert torch.isfinite(y).all()


def test_rotation_hook_on_input():
    """Q(x) becomes R^T Q(R x) once rotation search sets `.rotation` (weights untouched)."""
    layer = make_linear(in_features=64)
    mx = MXLinear(layer, linear_config(weight=MXINT4, data_in=MXINT4))
    torch.manual_seed(1)
    orthogonal, _ = torch.linalg.qr(torch.randn(64, 64))

    class Rotation:
        n, kind, description = 64, "test", "random orthogonal"

        def forward(self, x):
            return x @ orthogonal

        def inverse(self, x):
            return x @ orthogonal.T

        def conjugate(self, x, fn):
            return self.inverse(fn(self.forward(x)))

    mx.input_quantizer.rotation = Rotation()
    x = torch.randn(5, 64)
    expected = F.linear(quantize(x @ orthogonal, MXINT4) @ orthogonal.T, mx.weight, layer.bias)
    assert torch.equal(mx(x), expected)


# --- GPTQ weights ------------------------------------------------------------------------------


def test_gptq_weights_on_grid_are_kept():
    layer = make_linear()
    with torch.no_grad():
        layer.weight.copy_(quantize(layer.weight, MXINT4))
    setattr(layer, GPTQ_FORMAT_ATTR, MXINT4)
    mx = MXLinear(layer, linear_config(weight=MXINT4, data_in=MXINT4))
    assert mx.weight_source == "gptq"
    assert torch.equal(mx.weight, layer.weight)


def test_gptq_weights_with_scale_exp_skip_rtn():
    """A GPTQ scale smaller than absmax's (clip search) is kept, even where RTN would move values."""
    layer = make_linear(in_features=64, out_features=4)
    weight = layer.weight.detach().float()
    blocks = weight.view(4, 2, 32)
    scale_exp = scale_exp_from_amax(blocks.abs().amax(-1), MXINT4) - 1  # one step of clipping
    from mxptq.formats import quantize_elements

    clipped = quantize_elements(blocks, MXINT4, scale_exp[..., None]).reshape(4, 64)
    with torch.no_grad():
        layer.weight.copy_(clipped)
    setattr(layer, GPTQ_FORMAT_ATTR, MXINT4)
    setattr(layer, GPTQ_SCALE_EXP_ATTR, scale_exp)
    mx = MXLinear(layer, linear_config(weight=MXINT4))
    assert torch.equal(mx.weight, clipped)


def test_gptq_weights_off_grid_are_an_internal_error():
    layer = make_linear()
    setattr(layer, GPTQ_FORMAT_ATTR, MXINT4)  # but the weights were never quantized
    with pytest.raises(AssertionError, match="not on the MXINT4"):
        MXLinear(layer, linear_config(weight=MXINT4))


def test_gptq_format_mismatch_is_a_user_error():
    layer = make_linear()
    setattr(layer, GPTQ_FORMAT_ATTR, MXINT8_B16)
    with pytest.raises(ModelError, match=r"GPTQ weights were computed as MXINT8\(b16"):
        MXLinear(layer, linear_config(weight=MXINT4), name="model.layers.0.mlp.up_proj")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cuda_matches_cpu(dtype):
    layer = make_linear(dtype=dtype)
    cpu = MXLinear(layer, linear_config(weight=MXINT4, data_in=MXINT4))
    gpu = MXLinear(layer.cuda(), linear_config(weight=MXINT4, data_in=MXINT4))
    assert gpu.weight.is_cuda and torch.equal(gpu.weight.cpu(), cpu.weight)
    x = torch.randn(4, 7, 80, dtype=dtype)
    # same quantized operands; the matmuls may round differently on the two devices
    assert torch.equal(gpu.input_quantizer(x.cuda()).cpu(), cpu.input_quantizer(x))
    tolerance = {torch.float16: 1e-2, torch.bfloat16: 5e-2, torch.float32: 1e-5}[dtype]
    torch.testing.assert_close(gpu(x.cuda()).cpu(), cpu(x), rtol=tolerance, atol=tolerance)
