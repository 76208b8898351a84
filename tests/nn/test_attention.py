"""MXAttention: bit-identity when bypassed (Llama, Mistral, Qwen2, Qwen3), the five stages against
a hand-written reference, K/V quantization in prefill and decode, SDPA kept when allowed,
generate()."""

from __future__ import annotations

import copy
import inspect
from types import SimpleNamespace

import pytest
import torch
from offline import TINY_LLAMA_CONFIG
from transformers.modeling_utils import AttentionInterface

from mxptq.errors import ModelError
from mxptq.formats import Format, quantize
from mxptq.nn.attention import MXAttention

MXINT4 = Format.from_keys("mxint", width=4, block_size=32, scale_rule="tutorial")
MXINT8 = Format.from_keys("mxint", width=8, block_size=32, scale_rule="tutorial")
MXFP8 = Format.from_keys("mxfp", exponent_width=4, frac_width=3, block_size=32)
MXFP6 = Format.from_keys("mxfp", exponent_width=2, frac_width=3, block_size=16)

BYPASS = SimpleNamespace(rope=None, kv_cache=None, qk_matmul=None, softmax=None, av_matmul=None)
KV4 = SimpleNamespace(rope=None, kv_cache=MXINT4, qk_matmul=None, softmax=None, av_matmul=None)
QK_KV = SimpleNamespace(rope=None, kv_cache=MXINT4, qk_matmul=MXINT8, softmax=None, av_matmul=None)
ALL_STAGES = SimpleNamespace(rope=MXFP8, kv_cache=MXINT4, qk_matmul=MXINT8, softmax=MXFP8, av_matmul=MXFP6)

# The shared tiny config, with the embeddings tied as each architecture's default has them.
SMALL = {key: value for key, value in TINY_LLAMA_CONFIG.items() if key != "tie_word_embeddings"}


def swap_attention(model, config):
    for index, layer in enumerate(model.model.layers):
        layer.self_attn = MXAttention(layer.self_attn, config, name=f"model.layers.{index}.self_attn")
    return model


def family_model(family: str, attn_implementation: str, seed: int = 0):
    import transformers

    config_cls, model_cls = {
        "llama": ("LlamaConfig", "LlamaForCausalLM"),
        "mistral": ("MistralConfig", "MistralForCausalLM"),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
        "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    }[family]
    config = getattr(transformers, config_cls)(**SMALL)
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    return getattr(transformers, model_cls)(config).eval()


def with_cache(model, cache):
    """The cache keyword of this transformers version (5.17: past_key_values; 5.24: cache)."""
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: cache}


def input_ids(n=12, batch=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, n), generator=generator)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
@torch.no_grad()
def test_all_bypassed_is_bit_identical(family, attn_implementation):
    model = family_model(family, attn_implementation)
    reference = copy.deepcopy(model)
    swap_attention(model, BYPASS)
    ids = input_ids()
    expected = reference(ids, use_cache=True)
    got = model(ids, use_cache=True)
    assert torch.equal(got.logits, expected.logits)
    # one decode step through the cache
    next_ids = input_ids(n=1, seed=1)
    assert torch.equal(
        model(next_ids, **with_cache(model, got.past_key_values)).logits,
        reference(next_ids, **with_cache(reference, expected.past_key_values)).logits,
    )


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def hand_attention(attn, hidden, cos, sin, cfg):
    """Independent reference of MXAttention's forward for one prefill without a cache."""
    b, s, _ = hidden.shape
    d = attn.head_dim

    def q_or_identity(x, fmt):
        return x if fmt is None else quantize(x, fmt)

    q = (hidden @ attn.q_proj.weight.T).view(b, s, -1, d).transpose(1, 2)
    k = (hidden @ attn.k_proj.weight.T).view(b, s, -1, d).transpose(1, 2)
    v = (hidden @ attn.v_proj.weight.T).view(b, s, -1, d).transpose(1, 2)
    q, k = q_or_identity(q, cfg.rope), q_or_identity(k, cfg.rope)
    cos, sin = cos[:, None], sin[:, None]
    q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    k, v = q_or_identity(k, cfg.kv_cache), q_or_identity(v, cfg.kv_cache)
    q = q_or_identity(q, cfg.qk_matmul)
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = q @ k.transpose(2, 3) / d**0.5
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    scores = q_or_identity(scores.masked_fill(~causal, 0.0), cfg.softmax)
    probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
    probs = q_or_identity(probs, cfg.av_matmul)
    out = (probs @ v).transpose(1, 2).reshape(b, s, -1)
    return out @ attn.o_proj.weight.T


@pytest.mark.parametrize("cfg", [KV4, QK_KV, ALL_STAGES], ids=["kv", "qk+kv", "all"])
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@torch.no_grad()
def test_stages_match_hand_computation(tiny_llama, cfg, attn_implementation):
    model = tiny_llama(seed=3, attn_implementation=attn_implementation, initializer_range=0.2)
    hidden = torch.randn(2, 40, 64)  # 40 keys: the score rows span a full and a padded block
    position_ids = torch.arange(40)[None].expand(2, -1)
    cos, sin = model.model.rotary_emb(hidden, position_ids)
    source = model.model.layers[0].self_attn
    expected = hand_attention(source, hidden, cos, sin, cfg)
    mx = MXAttention(source, cfg)
    if attn_implementation == "eager":  # the float mask the eager implementation gets
        mask = torch.full((40, 40), torch.finfo(torch.float32).min).triu(1)[None, None]
    else:  # SDPA gets None for a plain causal prefill and applies causality itself
        mask = None
    got, _ = mx(hidden, position_embeddings=(cos, sin), attention_mask=mask)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    if cfg is not KV4:
        # quantization is visible: without it the result is different
        plain, _ = MXAttention(source, BYPASS)(hidden, position_embeddings=(cos, sin), attention_mask=mask)
        assert not torch.allclose(plain, got, atol=1e-4)


@torch.no_grad()
def test_kv_cache_quantized_in_prefill_and_decode(tiny_llama):
    """Layer 0 sees the same K/V inputs in both models, so its cached K/V must be exactly the
    quantized K/V of the float model -- for the prefill tokens and for a decoded token."""
    reference = tiny_llama(seed=1)
    model = swap_attention(copy.deepcopy(reference), KV4)
    ids = input_ids(n=9)
    float_out = reference(ids, use_cache=True)
    mx_out = model(ids, use_cache=True)
    float_layer, mx_layer = float_out.past_key_values.layers[0], mx_out.past_key_values.layers[0]
    assert torch.equal(mx_layer.keys, quantize(float_layer.keys, MXINT4))
    assert torch.equal(mx_layer.values, quantize(float_layer.values, MXINT4))
    assert not torch.equal(mx_layer.keys, float_layer.keys)

    step = input_ids(n=1, seed=5)
    reference(step, **with_cache(reference, float_out.past_key_values))
    model(step, **with_cache(model, mx_out.past_key_values))
    assert mx_layer.keys.shape[-2] == 10
    assert torch.equal(mx_layer.keys[..., -1:, :], quantize(float_layer.keys[..., -1:, :], MXINT4))
    assert torch.equal(mx_layer.values[..., -1:, :], quantize(float_layer.values[..., -1:, :], MXINT4))


@pytest.mark.parametrize("cfg", [KV4, ALL_STAGES], ids=["kv", "all"])
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@torch.no_grad()
def test_prefill_and_decode_give_the_same_last_logits(tiny_llama, cfg, attn_implementation):
    model = swap_attention(tiny_llama(seed=2, attn_implementation=attn_implementation), cfg)
    ids = input_ids(n=40)
    full = model(ids).logits[:, -1]
    prefix = model(ids[:, :-1], use_cache=True)
    decoded = model(ids[:, -1:], **with_cache(model, prefix.past_key_values)).logits[:, -1]
    torch.testing.assert_close(decoded, full, rtol=1e-5, atol=1e-5)
    # and without any cache object, token by token recomputation gives the same answer
    no_cache = model(ids, use_cache=False).logits[:, -1]
    torch.testing.assert_close(no_cache, full, rtol=1e-6, atol=1e-6)


def test_sdpa_kept_unless_scores_are_needed(tiny_llama, monkeypatch):
    calls = []
    sdpa = AttentionInterface._global_mapping["sdpa"]

    def spy(*args, **kwargs):
        calls.append(1)
        return sdpa(*args, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, "sdpa", spy)
    ids = input_ids(n=6)
    with torch.no_grad():
        swap_attention(tiny_llama(attn_implementation="sdpa"), QK_KV)(ids)
        assert len(calls) == 2  # one per layer: rope/kv_cache/qk_matmul do not need the scores
        calls.clear()
        swap_attention(tiny_llama(attn_implementation="sdpa"), ALL_STAGES)(ids)
        assert calls == []  # softmax/av_matmul: the eager score path


@pytest.mark.parametrize("cfg", [KV4, ALL_STAGES], ids=["kv", "all"])
def test_generate(tiny_llama, cfg):
    model = swap_attention(tiny_llama(seed=4, initializer_range=0.2), cfg)
    prompt = input_ids(n=7, batch=1)
    cached = model.generate(
        prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0
    )
    recomputed = model.generate(
        prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0
    )
    assert cached.shape == (1, 13)
    assert torch.equal(cached, recomputed)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@torch.no_grad()
def test_half_precision(tiny_llama, dtype):
    model = swap_attention(tiny_llama(dtype=dtype, initializer_range=0.2), ALL_STAGES)
    logits = model(input_ids(n=20)).logits
    assert logits.dtype == dtype and torch.isfinite(logits).all()


def test_unsupported_cases_are_model_errors(tiny_llama):
    model = tiny_llama()
    with pytest.raises(ModelError, match="attention class LlamaMLP is not supported"):
        MXAttention(model.model.layers[0].mlp, KV4, name="model.layers.0.mlp")
    model.config._attn_implementation = "flex_attention"
    MXAttention(model.model.layers[0].self_attn, KV4)  # no scores needed: any kernel is fine
    with pytest.raises(ModelError, match="need the attention scores"):
        MXAttention(model.model.layers[0].self_attn, ALL_STAGES)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cfg", [KV4, ALL_STAGES], ids=["kv", "all"])
@torch.no_grad()
def test_cuda_prefill_decode_and_generate(tiny_llama, cfg, dtype):
    model = swap_attention(tiny_llama(seed=2, dtype=dtype, initializer_range=0.2), cfg).cuda()
    ids = input_ids(n=40).cuda()
    full = model(ids).logits[:, -1].float()
    prefix = model(ids[:, :-1], use_cache=True)
    decoded = model(ids[:, -1:], **with_cache(model, prefix.past_key_values)).logits[:, -1].float()
    torch.testing.assert_close(decoded, full, rtol=0.05, atol=0.05)
    out = model.generate(ids[:1, :7], max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 12)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@torch.no_grad()
def test_cuda_bypassed_is_bit_identical(tiny_llama):
    model = tiny_llama(seed=0, dtype=torch.float16).cuda()
    reference = copy.deepcopy(model)
    swap_attention(model, BYPASS)
    ids = input_ids().cuda()
    assert torch.equal(model(ids).logits, reference(ids).logits)


@torch.no_grad()
def test_kv_rotation_hook(tiny_llama):
    """Rotation search sets `.rotation` on the K/V quantizers: the cache then holds R^-1 Q(R k)."""
    from mxptq.nn.hadamard import get_rotation

    reference = tiny_llama(seed=1)
    model = swap_attention(copy.deepcopy(reference), KV4)
    rotation = get_rotation(32)
    for layer in model.model.layers:
        layer.self_attn.k_quantizer.rotation = rotation
        layer.self_attn.v_quantizer.rotation = rotation
    ids = input_ids(n=9)
    float_keys = reference(ids, use_cache=True).past_key_values.layers[0].keys
    mx_keys = model(ids, use_cache=True).past_key_values.layers[0].keys
    expected = rotation.inverse(quantize(rotation.forward(float_keys), MXINT4))
    assert torch.equal(mx_keys, expected)
    assert not torch.equal(mx_keys, quantize(float_keys, MXINT4))
