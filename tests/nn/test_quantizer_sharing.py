"""ActQuantizer's shared-input cache (issue 9): q/k/v (gate/up) projections read the same hidden
states, so their input quantizers may compute the quantized input once. One SharedInputCache per
quantized model (the transform stage's `model.mxptq_input_cache`).

Independent expectation: the uncached path, `quantize_reference(x)` (the one definition of the
MX math) or the same quantizer with sharing switched off; results must be bit-identical, and a
changed, replaced or freed input must never get a stale result.
"""

from __future__ import annotations

import copy
import gc
import pickle
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from mxptq.formats import Format, quantize_reference
from mxptq.nn.hadamard import get_rotation
from mxptq.nn.linear import MXLinear
from mxptq.nn.quantizer import ActQuantizer, SharedInputCache
from mxptq.recipe import parse_recipe
from mxptq.stages.transform import quantize_model

MXINT4 = Format.from_keys("mxint", width=4, block_size=32, scale_rule="tutorial")
MXINT8 = Format.from_keys("mxint", width=8, block_size=32, scale_rule="tutorial")

W4A4_RECIPE = """
by = "regex_name"
['model\\.layers\\.\\d+\\..*_proj']
name = "mxint"
weight_block_size = 32
weight_width = 4
data_in_block_size = {data_in_block_size}
data_in_width = {data_in_width}
"""


@pytest.fixture
def cache():
    """A fresh cache, as the transform stage makes one per model."""
    return SharedInputCache()


@pytest.fixture
def computes(monkeypatch):
    """Counts the quantizations actually computed (cache misses)."""
    calls = []
    original = ActQuantizer._compute

    def counting(self, x):
        calls.append(x)
        return original(self, x)

    monkeypatch.setattr(ActQuantizer, "_compute", counting)
    return calls


def _x(seed=0, shape=(3, 5, 64)):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 3


def test_same_input_same_format_computes_once_and_matches_reference(cache, computes):
    x = _x()
    q, k, v = (ActQuantizer(MXINT4, input_cache=cache) for _ in range(3))
    with torch.no_grad():
        outs = [q(x), k(x), v(x)]
    assert len(computes) == 1
    for out in outs:
        assert torch.equal(out, quantize_reference(x, MXINT4))


def test_equal_but_distinct_format_objects_share(cache, computes):
    x = _x()
    other = Format.from_keys("mxint", width=4, block_size=32, scale_rule="tutorial")
    assert other is not MXINT4 and other == MXINT4
    with torch.no_grad():
        ActQuantizer(MXINT4, input_cache=cache)(x)
        out = ActQuantizer(other, input_cache=cache)(x)
    assert len(computes) == 1
    assert torch.equal(out, quantize_reference(x, MXINT4))


def test_different_format_or_rotation_is_not_shared(cache, computes):
    x = _x()
    rotation = get_rotation(64)
    with torch.no_grad():
        a = ActQuantizer(MXINT4, input_cache=cache)(x)
        b = ActQuantizer(MXINT8, input_cache=cache)(x)
        c = ActQuantizer(MXINT4, rotation, input_cache=cache)(x)
        d = ActQuantizer(MXINT4, input_cache=cache)(x)
    assert len(computes) == 4
    assert torch.equal(a, quantize_reference(x, MXINT4))
    assert torch.equal(b, quantize_reference(x, MXINT8))
    assert torch.equal(c, rotation.inverse(quantize_reference(rotation.forward(x), MXINT4)))
    assert torch.equal(d, a)


def test_same_rotation_is_shared(cache, computes):
    x = _x()
    rotation = get_rotation(64)
    with torch.no_grad():
        a = ActQuantizer(MXINT4, rotation, input_cache=cache)(x)
        b = ActQuantizer(MXINT4, get_rotation(64), input_cache=cache)(x)  # an equal rotation object
    assert len(computes) == 1
    assert torch.equal(b, a)
    assert torch.equal(a, rotation.inverse(quantize_reference(rotation.forward(x), MXINT4)))


@pytest.mark.parametrize("mode", ["grad", "no_grad"])
def test_in_place_change_of_input_is_seen(cache, mode, computes):
    """(Inference tensors carry no version counter: quantizer.py documents what holds for them.)"""
    context = torch.no_grad() if mode == "no_grad" else torch.enable_grad()
    q = ActQuantizer(MXINT4, input_cache=cache)
    x = _x()
    with context:
        first = q(x)
        x.mul_(-0.5)  # same object, same address, new values
        second = q(x)
        expected_second = quantize_reference(x, MXINT4)
        x[0, 0, :4] = 100.0  # through a view (shares the version counter)
        third = q(x)
    assert len(computes) == 3
    assert not torch.equal(first, second)
    assert torch.equal(second, expected_second)
    assert torch.equal(third, quantize_reference(x, MXINT4))


def test_in_place_change_through_another_view_is_seen(cache, computes):
    q = ActQuantizer(MXINT4, input_cache=cache)
    base = _x()
    x = base.view(15, 64)
    with torch.no_grad():
        q(x)
        base.add_(1.0)  # the base, not x: views share one version counter
        out = q(x)
    assert len(computes) == 2
    assert torch.equal(out, quantize_reference(x, MXINT4))


def test_in_place_change_of_the_shared_result_is_seen(cache, computes):
    q = ActQuantizer(MXINT4, input_cache=cache)
    x = _x()
    with torch.no_grad():
        first = q(x)
        first.zero_()  # a consumer wrote into the result
        out = q(x)
    assert len(computes) == 2
    assert torch.equal(out, quantize_reference(x, MXINT4))


def test_new_tensor_at_a_reused_address_is_never_served_stale(cache, computes):
    """A freed activation's memory is reused by the next one of the same size (the allocators
    do this all the time); the cache must not mistake it for the old tensor."""
    q = ActQuantizer(MXINT4, input_cache=cache)
    with torch.no_grad():
        for seed in range(6):
            x = _x(seed)
            assert torch.equal(q(x), quantize_reference(x, MXINT4))
            del x
            gc.collect()
    assert len(computes) == 6


def test_the_cache_does_not_keep_the_input_alive_and_holds_one_result(cache):
    q = ActQuantizer(MXINT4, input_cache=cache)
    x = _x()
    with torch.no_grad():
        q(x)
        q(_x(1))
    entry = cache.entry
    assert entry is not None and entry[0]() is None  # the second input is gone already
    import weakref

    ref = weakref.ref(x)
    del x
    gc.collect()
    assert ref() is None  # the first one was not kept either


def test_reshaped_or_transposed_input_of_same_storage_is_not_shared(cache, computes):
    q = ActQuantizer(MXINT4, input_cache=cache)
    x = _x(shape=(64, 64))
    with torch.no_grad():
        a = q(x)
        b = q(x.t())  # another object: a miss even though the storage is the same
    assert len(computes) == 2
    assert torch.equal(b, quantize_reference(x.t(), MXINT4))
    assert not torch.equal(a, b)


def test_quantizers_without_a_cache_never_share(computes):
    x = _x()
    with torch.no_grad():
        ActQuantizer(MXINT4)(x)
        ActQuantizer(MXINT4)(x)
    assert len(computes) == 2


def test_switch_off(cache, computes):
    cache.enabled = False
    x = _x()
    with torch.no_grad():
        ActQuantizer(MXINT4, input_cache=cache)(x)
        ActQuantizer(MXINT4, input_cache=cache)(x)
    assert len(computes) == 2


def test_inputs_that_require_grad_are_not_shared_under_autograd(cache, computes):
    x = _x().requires_grad_()
    q = ActQuantizer(MXINT4, input_cache=cache)
    q(x)
    q(x)
    assert len(computes) == 2


def _mx_llama(tiny_llama, dtype=torch.float32):
    """The tiny Llama with every projection an MXLinear (W4A4, tutorial rule), all sharing one
    cache stored as the transform stage stores it."""
    model = tiny_llama(seed=3, dtype=dtype)
    config = SimpleNamespace(weight=MXINT4, data_in=MXINT4, bias=None, bypass=False, gptq=False)
    cache = SharedInputCache()
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child_name.endswith("_proj"):
                setattr(module, child_name, MXLinear(child, config, f"{name}.{child_name}", input_cache=cache))
    model.mxptq_input_cache = cache
    return model


@pytest.mark.parametrize("mode", ["no_grad", "inference"])
def test_model_forward_is_bit_identical_with_fewer_quantizations(tiny_llama, computes, mode):
    model = _mx_llama(tiny_llama)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    context = torch.no_grad if mode == "no_grad" else torch.inference_mode
    with context():
        shared = model(ids).logits
        n_shared = len(computes)
        model.mxptq_input_cache.enabled = False
        computes.clear()
        plain = model(ids).logits
        n_plain = len(computes)
    assert torch.equal(shared, plain)
    layers = model.config.num_hidden_layers
    assert n_plain == 7 * layers  # q, k, v, o, gate, up, down
    assert n_shared == 4 * layers  # (q = k = v), o, (gate = up), down


def test_rotation_on_one_of_the_siblings_is_respected(tiny_llama, computes):
    """Rotation search turns rotations on per matmul type: a rotated k_proj must not reuse the
    unrotated q_proj result (and vice versa)."""
    model = _mx_llama(tiny_llama)
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(1))
    for layer in model.model.layers:
        layer.self_attn.k_proj.input_quantizer.rotation = get_rotation(64)
    with torch.no_grad():
        shared = model(ids).logits
        model.mxptq_input_cache.enabled = False
        plain = model(ids).logits
    assert torch.equal(shared, plain)


def _quantized(tiny_llama, data_in_width=4):
    """The tiny Llama through the transform stage: every projection W4, inputs MXINT<width>."""
    text = W4A4_RECIPE.format(data_in_block_size=32, data_in_width=data_in_width)
    return quantize_model(tiny_llama(seed=3), parse_recipe(text, source="<test>"))


def _input_quantizers(model):
    return [m.input_quantizer for m in model.modules() if isinstance(m, MXLinear)]


def test_the_transform_stage_gives_each_model_one_cache(tiny_llama):
    first, second = _quantized(tiny_llama), _quantized(tiny_llama)
    for model in (first, second):
        quantizers = _input_quantizers(model)
        assert len(quantizers) == 7 * model.config.num_hidden_layers
        assert isinstance(model.mxptq_input_cache, SharedInputCache)
        assert all(q.input_cache is model.mxptq_input_cache for q in quantizers)
    assert first.mxptq_input_cache is not second.mxptq_input_cache


def test_separately_quantized_models_never_share_a_result(tiny_llama, computes):
    """Same input object, equal formats: still one computation per model; clearing one model's
    cache leaves the other's entry alone."""
    first, second = _quantized(tiny_llama), _quantized(tiny_llama)
    q1 = first.model.layers[0].self_attn.q_proj.input_quantizer
    q2 = second.model.layers[0].self_attn.q_proj.input_quantizer
    k1 = first.model.layers[0].self_attn.k_proj.input_quantizer
    x = _x()
    with torch.no_grad():
        a = q1(x)
        b = q2(x)
        assert len(computes) == 2 and b is not a
        assert torch.equal(b, a)
        second.mxptq_input_cache.clear()
        assert second.mxptq_input_cache.entry is None and first.mxptq_input_cache.entry is not None
        assert k1(x) is a  # the first model's entry survived the second model's call and clear
    assert len(computes) == 2


def test_models_with_different_formats_get_their_own_results(tiny_llama, computes):
    w4a4, w4a8 = _quantized(tiny_llama, 4), _quantized(tiny_llama, 8)
    x = _x()
    with torch.no_grad():
        a = w4a4.model.layers[0].mlp.gate_proj.input_quantizer(x)
        b = w4a8.model.layers[0].mlp.gate_proj.input_quantizer(x)
        c = w4a8.model.layers[0].mlp.up_proj.input_quantizer(x)
    assert len(computes) == 2 and c is b
    assert torch.equal(a, quantize_reference(x, MXINT4))
    assert torch.equal(b, quantize_reference(x, MXINT8))


def test_a_copied_model_gets_its_own_empty_cache(tiny_llama):
    model = _quantized(tiny_llama)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.input_quantizer(_x())
    assert model.mxptq_input_cache.entry is not None
    copied = copy.deepcopy(model)
    cache = copied.mxptq_input_cache
    assert cache is not model.mxptq_input_cache and cache.entry is None and cache.enabled
    assert all(q.input_cache is cache for q in _input_quantizers(copied))
    restored = pickle.loads(pickle.dumps(model.mxptq_input_cache))
    assert restored.entry is None and restored.enabled
