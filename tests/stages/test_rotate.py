"""Stage `rotate` (mxptq/stages/rotate.py, issue 22): the offline rotation preserves the model's
function, GPTQ after it beats RTN after it, a rotated quantized model reloads bit for bit, and
layouts it cannot fold are refused in one line."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from conftest import make_tiny_llama

from mxptq.checkpoint import load_quantized, save_quantized
from mxptq.errors import ModelError
from mxptq.nn.hadamard import hadamard_matrix
from mxptq.recipe import parse_recipe
from mxptq.stages.gptq import run_gptq
from mxptq.stages.rotate import random_hadamard, run_rotation
from mxptq.stages.rotsearch import collect_candidates
from mxptq.stages.transform import quantize_model

LINEARS = r"model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"


def _recipe(rotation: str = "", *, gptq: bool = False, kv_cache: bool = True, data_in: bool = True) -> object:
    """MXINT4 W4 (A4) (KV4) on every projection, with `rotation` as the [rotation] table body."""
    text = 'by = "regex_name"\n'
    if gptq:
        text += ("[gptq]\nformat = \"mxint\"\nnsamples = 4\nseqlen = 16\ncali_batch_size = 2\n"
                 "[gptq.weight_config]\nweight_block_size = 32\nweight_width = 4\n")
    if rotation is not None:
        text += "[rotation]\n" + rotation + "\n"
    if kv_cache:
        text += ("['model\\.layers\\.\\d+\\.self_attn$']\nname = \"mxint\"\n"
                 "['model\\.layers\\.\\d+\\.self_attn$'.kv_cache]\ndata_in_block_size = 32\ndata_in_width = 4\n")
    text += f"['{LINEARS}']\nname = \"mxint\"\nweight_block_size = 32\nweight_width = 4\n"
    if data_in:
        text += "data_in_block_size = 32\ndata_in_width = 4\n"
    if gptq:
        text += "gptq = true\n"
    return parse_recipe(text)


def _with_random_norms(model: torch.nn.Module, seed: int = 3) -> torch.nn.Module:
    """Norm scales away from 1, so that folding them is exercised."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(torch.rand(param.shape, generator=generator) + 0.5)
    return model


def _ids(vocab: int, shape=(2, 24), seed: int = 5) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def _qwen2_with_bias() -> torch.nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, max_position_embeddings=128,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # biases are zero at init: make them count
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.5)
    return model


MODELS = {
    "llama": lambda: make_tiny_llama(seed=1),
    "llama_tied": lambda: make_tiny_llama(seed=2, tie_word_embeddings=True),
    # hidden 96 = 12 * 8 (H_12 ⊗ H_8), head_dim 24 = 12 * 2, intermediate 192 = 12 * 16
    "llama_kron": lambda: make_tiny_llama(seed=3, hidden_size=96, intermediate_size=192, head_dim=24,
                                          num_attention_heads=4, num_key_value_heads=2),
    "qwen2_bias_tied": _qwen2_with_bias,
}


def test_random_hadamard_is_orthogonal_with_random_signs():
    R = random_hadamard(96, torch.Generator().manual_seed(0))
    assert torch.allclose(R @ R.T, torch.eye(96, dtype=torch.float64), atol=1e-12)
    signs = R[0] / hadamard_matrix(96)[0]
    assert set(signs.round().tolist()) == {-1.0, 1.0}  # columns of H scaled by +-1, both occur
    again = random_hadamard(96, torch.Generator().manual_seed(0))
    assert torch.equal(R, again)


@pytest.mark.parametrize("name", list(MODELS))
def test_rotation_preserves_the_function_in_float32(name):
    model = _with_random_norms(MODELS[name]())
    ids = _ids(model.config.vocab_size)
    with torch.no_grad():
        expected = model(ids).logits
    tied_before = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    recipe = _recipe('online = ["down_proj", "o_proj"]')
    rotated = run_rotation(copy.deepcopy(model), recipe, SimpleNamespace(device=torch.device("cpu"), report=None))
    with torch.no_grad():
        got = rotated(ids).logits
    assert (got - expected).abs().max().item() < 1e-5 * max(1.0, expected.abs().max().item())
    # the weights really changed (an identity "rotation" would pass the check above too)
    layer = rotated.model.layers[0]
    assert not torch.allclose(layer.self_attn.q_proj.weight, model.model.layers[0].self_attn.q_proj.weight)
    assert torch.equal(layer.input_layernorm.weight, torch.ones_like(layer.input_layernorm.weight))
    if tied_before:
        assert rotated.get_output_embeddings().weight is not rotated.get_input_embeddings().weight
        assert rotated.config.tie_word_embeddings is False


def test_rotation_spreads_an_outlier_channel():
    """R1 exists to flatten outlier channels: a residual channel 50x larger than the rest sets the
    q_proj input's MX scale before rotation, and is spread over all channels after it."""
    model = make_tiny_llama(seed=4, num_hidden_layers=1)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 7] *= 50.0
    ids = _ids(model.config.vocab_size)
    captured = {}

    def grab(key):
        return lambda module, args: captured.__setitem__(key, args[0].detach().clone())

    handle = model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(grab("before"))
    with torch.no_grad():
        model(ids)
    handle.remove()
    run_rotation(model, _recipe("heads = false\nonline = []"), SimpleNamespace(device=torch.device("cpu")))
    model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(grab("after"))
    with torch.no_grad():
        model(ids)

    def peak_to_rms(x):
        return (x.abs().amax(-1) / x.square().mean(-1).sqrt()).mean().item()

    assert peak_to_rms(captured["before"]) > 3 * peak_to_rms(captured["after"])


def test_gptq_after_rotation_beats_rtn_after_rotation():
    """Weights only (no activation quantization), so the difference is the weights' alone:
    error of the logits against the unquantized model on held-out tokens."""
    torch.manual_seed(0)
    base = make_tiny_llama(seed=6)
    ids = _ids(base.config.vocab_size, shape=(4, 32), seed=11)
    with torch.no_grad():
        reference = base(ids).logits
    ctx = SimpleNamespace(device=torch.device("cpu"), report=None, force=True, progress=False, model_info=None)
    windows = _ids(base.config.vocab_size, shape=(16, 32), seed=12)

    def error(gptq: bool) -> float:
        recipe = _recipe("", gptq=gptq, kv_cache=False, data_in=False)
        model = run_rotation(copy.deepcopy(base), recipe, ctx)
        if gptq:
            model = run_gptq(model, recipe, ctx, windows=windows)
        model = quantize_model(model, recipe, None)
        with torch.no_grad():
            return (model(ids).logits - reference).square().mean().item()

    rtn, gptq = error(False), error(True)
    assert gptq < 0.9 * rtn, (gptq, rtn)


def test_rotated_checkpoint_reloads_bit_identical(tmp_path):
    model = _with_random_norms(make_tiny_llama(seed=7, tie_word_embeddings=True))
    recipe = _recipe('online = ["down_proj"]')
    model = run_rotation(model, recipe, SimpleNamespace(device=torch.device("cpu")))
    model = quantize_model(model, recipe, None)
    down = model.model.layers[0].mlp.down_proj
    assert down.input_quantizer.fused_rotation is not None
    ids = _ids(model.config.vocab_size)
    with torch.no_grad():
        expected = model(ids).logits
    save_quantized(model, recipe, tmp_path / "ckpt")
    reloaded, _, meta = load_quantized(tmp_path / "ckpt")
    with torch.no_grad():
        got = reloaded(ids).logits
    assert torch.equal(got.view(torch.int32), expected.view(torch.int32))
    assert reloaded.get_output_embeddings().weight is not reloaded.get_input_embeddings().weight
    slots = {(r["module"], r.get("slot", "rotation")) for r in meta.header["rotations"]}
    assert ("model.layers.0.mlp.down_proj", "fused_rotation") in slots


def test_online_rotation_needs_a_quantizing_selector():
    """A linear no selector quantizes keeps its plain weights: a checkpoint could not restore the
    pre-hook, so the stage leaves it and says why."""
    model = make_tiny_llama(seed=8)
    recipe = parse_recipe('[rotation]\nonline = ["down_proj"]\n'
                          "['model\\.layers\\.\\d+\\.self_attn\\.q_proj']\nname = \"mxint\"\n"
                          "weight_block_size = 32\nweight_width = 4\n")
    report: dict = {}
    ctx = SimpleNamespace(device=torch.device("cpu"), report=report)
    run_rotation(model, recipe, ctx)
    assert report["offline_rotation"]["online"] == {}
    assert set(report["offline_rotation"]["skipped"]) == {"model.layers.0.mlp.down_proj",
                                                          "model.layers.1.mlp.down_proj"}


def test_rotation_search_skips_fused_inputs():
    model = make_tiny_llama(seed=9)
    recipe = _recipe('online = ["down_proj"]')
    model = quantize_model(run_rotation(model, recipe, SimpleNamespace(device=torch.device("cpu"))), recipe)
    candidates, skipped = collect_candidates(model, ["down_proj", "up_proj"])
    assert [c.matmul_type for c in candidates] == ["up_proj"]
    assert "already rotated" in skipped["down_proj"]


def test_unsupported_norm_layout_is_refused_in_one_line():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                          num_key_value_heads=1, head_dim=32, vocab_size=256)
    model = Gemma2ForCausalLM(config).eval()
    with pytest.raises(ModelError) as info:
        run_rotation(model, _recipe("", kv_cache=False), SimpleNamespace(device=torch.device("cpu")))
    message = str(info.value)
    assert "\n" not in message and "[rotation]" in message and "RMSNorm" in message
