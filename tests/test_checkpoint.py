"""Packed MX checkpoints (mxptq/checkpoint.py, issue 8): round trip bit-identical logits for
every MX weight format, in this process and in a fresh one; on-disk size (b + 8/B)/16 of fp16;
exact codes for weights whose re-encoding is not the identity; the bad-input corpus; atomic
writes. Tiny random Llama models on CPU; one demo-model test (marked demo)."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mxptq.checkpoint import (
    CHECKPOINT_FORMAT_VERSION,
    MANIFEST_FILE,
    TENSORS_FILE,
    _encode_exact,
    load_quantized,
    save_quantized,
    verify_checkpoint,
)
from mxptq.errors import CheckpointError, MxptqError
from mxptq.formats import Format, decode, encode, quantize, quantize_elements
from mxptq.nn.hadamard import KeyAxisRotation, get_rotation
from mxptq.nn.linear import MXLinear
from mxptq.recipe import load_recipe
from mxptq.stages.transform import quantize_model

REPO = Path(__file__).resolve().parents[1]

# recipe keys per format (DESIGN.md "Recipe": mxint width = total bits incl. sign; mxfp
# exponent/frac widths = an OCP MX v1.0 element format), optional scale rule, bits b
FORMATS = {
    "mxint4": ('"mxint"', {"width": 4}, None, 4),
    "mxint4_symmetric": ('"mxint"', {"width": 4}, "symmetric", 4),
    "mxint8": ('"mxint"', {"width": 8}, None, 8),
    "mxfp4_e2m1": ('"mxfp"', {"exponent_width": 2, "frac_width": 1}, None, 4),
    "mxfp6_e2m3": ('"mxfp"', {"exponent_width": 2, "frac_width": 3}, None, 6),
    "mxfp6_e3m2": ('"mxfp"', {"exponent_width": 3, "frac_width": 2}, None, 6),
    "mxfp8_e4m3": ('"mxfp"', {"exponent_width": 4, "frac_width": 3}, None, 8),
}
DEMO_LAYERS = 4


def _tiny_llama(**overrides):
    from conftest import make_tiny_llama  # tests/conftest.py: hidden 64, head_dim 32, 2 layers

    return make_tiny_llama(**overrides)


def _recipe_file(tmp_path: Path, fmt_key: str, *, block: int = 32, kv_cache: bool = True) -> Path:
    """A recipe quantizing every projection's weight and input, and (optionally) the KV cache."""
    name, widths, rule, _ = FORMATS[fmt_key]
    lines = ['by = "regex_name"']
    if kv_cache:
        lines += [r"['model\.layers\.\d+\.self_attn$']", f"name = {name}",
                  r"['model\.layers\.\d+\.self_attn$'.kv_cache]", "data_in_block_size = 32"]
        lines += [f"data_in_{key} = {value}" for key, value in widths.items()]
    lines += [r"['model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj']", f"name = {name}",
              f"weight_block_size = {block}", f"data_in_block_size = {block}"]
    for tensor in ("weight", "data_in"):
        lines += [f"{tensor}_{key} = {value}" for key, value in widths.items()]
    if rule:
        lines.append(f'scale_rule = "{rule}"')
    path = tmp_path / f"{fmt_key}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _input_ids(vocab_size: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (2, 24), generator=generator)


@torch.no_grad()
def _logits(model, input_ids) -> torch.Tensor:
    return model(input_ids=input_ids).logits


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit patterns, so equality is bitwise (NaN == NaN, -0.0 != +0.0)."""
    return t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _quantized(tmp_path, fmt_key, dtype=torch.float32, **recipe_kw):
    recipe = load_recipe(_recipe_file(tmp_path, fmt_key, **recipe_kw))
    model = _tiny_llama().to(dtype).eval()
    return quantize_model(model, recipe, None), recipe


# ---------------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("fmt_key", list(FORMATS))
def test_round_trip_logits_bit_identical(tmp_path, fmt_key):
    model, recipe = _quantized(tmp_path, fmt_key)
    ids = _input_ids(model.config.vocab_size)
    expected = _logits(model, ids)

    save_quantized(model, recipe, tmp_path / "ckpt")
    reloaded, tokenizer, meta = load_quantized(tmp_path / "ckpt")

    assert tokenizer is None  # none was given to save
    assert sum(isinstance(m, MXLinear) for m in reloaded.modules()) == 14  # 2 layers x 7 projections
    got = _logits(reloaded, ids)
    assert got.dtype == expected.dtype
    assert torch.equal(_bits(got), _bits(expected))
    assert meta.recipe.sha256 == recipe.sha256


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_round_trip_half_precision_models(tmp_path, dtype):
    model, recipe = _quantized(tmp_path, "mxfp8_e4m3", dtype=dtype)
    ids = _input_ids(model.config.vocab_size)
    expected = _logits(model, ids)
    save_quantized(model, recipe, tmp_path / "ckpt")
    reloaded, _, _ = load_quantized(tmp_path / "ckpt")
    assert next(reloaded.parameters()).dtype == dtype
    assert torch.equal(_bits(_logits(reloaded, ids)), _bits(expected))


def test_round_trip_gptq_weights_with_clipped_scales(tmp_path):
    """Weights as the GPTQ stage leaves them (nn/linear.py: `_mxptq_gptq_fmt` and per-block
    `_mxptq_gptq_scale_exp`, here one below the absmax exponent, i.e. clipped) reload exactly."""
    recipe = load_recipe(_recipe_file(tmp_path, "mxint4"))
    model = _tiny_llama()
    fmt = recipe.selectors[-1].config.weight
    for name in ("model.layers.0.mlp.down_proj", "model.layers.1.self_attn.o_proj"):
        linear = model.get_submodule(name)
        rows, cols = linear.weight.shape
        scale_exp = encode(linear.weight, fmt)[1].to(torch.int32) - 127 - 1
        blocks = linear.weight.detach().view(rows, cols // 32, 32)
        linear.weight.data = quantize_elements(blocks, fmt, scale_exp[..., None]).reshape(rows, cols)
        linear._mxptq_gptq_fmt, linear._mxptq_gptq_scale_exp = fmt, scale_exp
    model = quantize_model(model, recipe, None)
    assert model.model.layers[0].mlp.down_proj.weight_source == "gptq"
    ids = _input_ids(model.config.vocab_size)
    expected = _logits(model, ids)

    save_quantized(model, recipe, tmp_path / "ckpt")
    reloaded, _, _ = load_quantized(tmp_path / "ckpt")

    assert torch.equal(_bits(_logits(reloaded, ids)), _bits(expected))
    assert reloaded.model.layers[0].mlp.down_proj.weight_source == "gptq"
    assert reloaded.model.layers[0].mlp.up_proj.weight_source == "rtn"


def test_load_with_dtype_override(tmp_path):
    """dtype= casts parameters and persistent buffers; weights decode straight into it."""
    model, recipe = _quantized(tmp_path, "mxint4")
    save_quantized(model, recipe, tmp_path / "ckpt")
    reloaded, _, _ = load_quantized(tmp_path / "ckpt", dtype="bfloat16")
    down = reloaded.model.layers[0].mlp.down_proj
    assert down.weight.dtype == reloaded.model.norm.weight.dtype == torch.bfloat16
    assert torch.equal(down.weight, model.model.layers[0].mlp.down_proj.weight.to(torch.bfloat16))
    assert reloaded.model.rotary_emb.inv_freq.dtype == torch.float32
    logits = _logits(reloaded, _input_ids(model.config.vocab_size))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


def test_round_trip_keeps_rotations(tmp_path):
    """Rotation decisions (ActQuantizer.rotation, as rotation search sets them) survive."""
    model, recipe = _quantized(tmp_path, "mxint4")
    layer = model.model.layers[0]
    layer.mlp.down_proj.input_quantizer.rotation = get_rotation(128)  # Walsh H_128
    layer.self_attn.q_proj.input_quantizer.rotation = get_rotation(64)
    layer.self_attn.k_quantizer.rotation = get_rotation(32)  # head_dim
    ids = _input_ids(model.config.vocab_size)
    expected = _logits(model, ids)
    decisions = {"decisions": {"down_proj": True, "q_proj": True, "kv_cache": True}}

    save_quantized(model, recipe, tmp_path / "ckpt", rotation_decisions=decisions)
    reloaded, _, meta = load_quantized(tmp_path / "ckpt")

    assert torch.equal(_bits(_logits(reloaded, ids)), _bits(expected))
    assert reloaded.model.layers[0].mlp.down_proj.input_quantizer.rotation == get_rotation(128)
    assert reloaded.model.layers[1].mlp.down_proj.input_quantizer.rotation is None
    assert meta.rotation["decisions"] == decisions
    assert len(meta.rotation["applied"]) == 3


def test_key_axis_rotation_is_saved(tmp_path):
    model, recipe = _quantized(tmp_path, "mxint8")
    model.model.layers[1].self_attn.k_quantizer.rotation = KeyAxisRotation(block=32)
    save_quantized(model, recipe, tmp_path / "ckpt")
    reloaded, _, _ = load_quantized(tmp_path / "ckpt")
    assert reloaded.model.layers[1].self_attn.k_quantizer.rotation == KeyAxisRotation(block=32)


def test_tied_embeddings_stay_tied(tmp_path):
    recipe = load_recipe(_recipe_file(tmp_path, "mxint4"))
    model = quantize_model(_tiny_llama(tie_word_embeddings=True).eval(), recipe, None)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = _input_ids(model.config.vocab_size)
    save_quantized(model, recipe, tmp_path / "ckpt")
    with safe_open(str(tmp_path / "ckpt" / TENSORS_FILE), framework="pt") as handle:
        stored = set(handle.keys())
    assert ("lm_head.weight" in stored) != ("model.embed_tokens.weight" in stored)  # stored once
    reloaded, _, _ = load_quantized(tmp_path / "ckpt")
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    assert torch.equal(_bits(_logits(reloaded, ids)), _bits(_logits(model, ids)))


def test_fresh_process_reload_gives_same_logits(tmp_path):
    """STYLE.md rule 11: reload in a fresh interpreter (no state shared with the writer)."""
    model, recipe = _quantized(tmp_path, "mxfp4_e2m1")
    ids = _input_ids(model.config.vocab_size)
    save_quantized(model, recipe, tmp_path / "ckpt")
    save_file({"input_ids": ids, "logits": _logits(model, ids)}, str(tmp_path / "expected.safetensors"))

    script = (
        "import sys, torch\n"
        "from safetensors.torch import load_file, save_file\n"
        "from mxptq.checkpoint import load_quantized\n"
        "model, _, _ = load_quantized(sys.argv[1])\n"
        "ids = load_file(sys.argv[2])['input_ids']\n"
        "with torch.no_grad():\n"
        "    save_file({'logits': model(input_ids=ids).logits}, sys.argv[3])\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "ckpt"), str(tmp_path / "expected.safetensors"),
         str(tmp_path / "got.safetensors")],
        check=True, env=env, cwd=tmp_path, timeout=300,
    )
    expected = load_file(str(tmp_path / "expected.safetensors"))["logits"]
    got = load_file(str(tmp_path / "got.safetensors"))["logits"]
    assert torch.equal(_bits(got), _bits(expected))


# ---------------------------------------------------------------------------------- size


@pytest.mark.parametrize("fmt_key", ["mxint4", "mxfp6_e3m2", "mxint8"])
def test_packed_size_is_b_plus_8_over_B_bits_per_element(tmp_path, fmt_key):
    model, recipe = _quantized(tmp_path, fmt_key)
    linears = {name: m for name, m in model.named_modules() if isinstance(m, MXLinear)}
    summary = save_quantized(model, recipe, tmp_path / "ckpt")

    b, block = FORMATS[fmt_key][3], 32
    with safe_open(str(tmp_path / "ckpt" / TENSORS_FILE), framework="pt") as handle:
        for name, module in linears.items():
            numel = module.weight.numel()
            codes = handle.get_tensor(f"{name}.weight.codes")
            scales = handle.get_tensor(f"{name}.weight.scale_e8m0")
            assert codes.dtype == scales.dtype == torch.uint8
            # (b * numel + 8 * numel / B) / 8 bytes: b-bit codes, one E8M0 byte per block
            assert codes.numel() + scales.numel() == (b * numel + 8 * numel // block) // 8
            assert f"{name}.weight" not in set(handle.keys())  # no fake-quantized copy

    numel = sum(m.weight.numel() for m in linears.values())
    assert summary.quantized_fp16_bytes == 2 * numel
    assert summary.quantized_bytes * 16 * block == summary.quantized_fp16_bytes * (b * block + 8)
    report = json.loads((tmp_path / "ckpt" / "report.json").read_text())["checkpoint"]
    assert report["quantized_ratio_to_fp16"] == pytest.approx((b + 8 / block) / 16)
    assert report["tensors_bytes"] < report["tensors_fp16_bytes"]
    assert report["tensor_file_bytes"] == (tmp_path / "ckpt" / TENSORS_FILE).stat().st_size


def test_report_object_gets_checkpoint_section(tmp_path):
    from mxptq.report import Report

    model, recipe = _quantized(tmp_path, "mxint4")
    report = Report("quantize")
    summary = save_quantized(model, recipe, tmp_path / "ckpt", report=report)
    assert report["checkpoint"] == summary.to_dict()
    stored = json.loads((tmp_path / "ckpt" / "report.json").read_text())
    assert stored["command"] == "quantize"
    assert stored["checkpoint"]["quantized_bytes"] == summary.quantized_bytes


# ---------------------------------------------------------------------------------- exact codes


def test_encode_exact_when_reencoding_moves_the_scale():
    """Tutorial MXINT4 rule, e = ceil(log2 amax): a block with amax just above 2^(e-1) gets
    codes up to 4 = 2^(b-2), so its fake-quantized max is exactly 2^(e-1); re-encoding that
    picks e-1 where +8 does not fit (DESIGN.md formats). The saved codes must still decode to
    the weight exactly."""
    fmt = Format.from_keys("mxint", width=4, scale_rule="tutorial")
    x = torch.tensor([[0.51] + [0.1] * 31, [-0.3] * 32])
    weight = quantize(x, fmt)
    assert weight[0, 0] == 0.5  # code 4 at scale 2^(0-3)
    naive = decode(*encode(weight, fmt), fmt, dtype=weight.dtype)
    assert not torch.equal(naive, weight)  # the case the repair exists for
    codes, scale = _encode_exact(weight, fmt, "w")
    assert torch.equal(decode(codes, scale, fmt, dtype=weight.dtype), weight)


@pytest.mark.parametrize("fmt_key", ["mxint4", "mxfp4_e2m1", "mxint8"])
def test_encode_exact_with_clipped_scales(fmt_key):
    """GPTQ's clip search picks scales below the absmax one; any on-grid weight must work,
    including rows whose length is not a multiple of the block."""
    name, widths, _, _ = FORMATS[fmt_key]
    fmt = Format.from_keys(name.strip('"'), **widths, block_size=8)
    x = torch.randn(6, 20, generator=torch.Generator().manual_seed(0)) * 3
    blocks = torch.nn.functional.pad(x, (0, 4)).view(6, 3, 8)
    base = encode(x, fmt)[1].to(torch.int32) - 127  # E8M0 bias 127 (OCP MX v1.0 5.4.1)
    lower = torch.randint(0, 3, (6, 3, 1), generator=torch.Generator().manual_seed(1))
    weight = quantize_elements(blocks, fmt, base.view(6, 3, 1) - lower).reshape(6, 24)[:, :20]
    weight = weight.to(torch.float16)
    codes, scale = _encode_exact(weight, fmt, "w")
    assert codes.shape == weight.shape
    assert torch.equal(decode(codes, scale, fmt, dtype=torch.float16), weight)


def test_weight_off_grid_is_refused(tmp_path):
    model, recipe = _quantized(tmp_path, "mxint4")
    model.model.layers[0].mlp.up_proj.weight[0, 0] = 0.123456  # not an MXINT4 value
    with pytest.raises(CheckpointError, match=r"mlp\.up_proj .*not representable"):
        save_quantized(model, recipe, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# ---------------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("good")
    model, recipe = _quantized(tmp_path, "mxint4")
    save_quantized(model, recipe, tmp_path / "ckpt")
    return tmp_path / "ckpt"


@pytest.fixture
def checkpoint_copy(saved_checkpoint, tmp_path):
    return Path(shutil.copytree(saved_checkpoint, tmp_path / "copy"))


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _rewrite_manifest(ckpt: Path, **changes) -> None:
    manifest = json.loads((ckpt / MANIFEST_FILE).read_text())
    manifest.update(changes)
    (ckpt / MANIFEST_FILE).write_text(json.dumps(manifest))


def _drop_from_manifest(ckpt: Path, name: str) -> None:
    files = json.loads((ckpt / MANIFEST_FILE).read_text())["files"]
    _rewrite_manifest(ckpt, files={k: v for k, v in files.items() if k != name})


BAD_INPUTS = {
    "missing config": (lambda c: (c / "config.json").unlink(), r"missing file config\.json"),
    "missing tensors": (lambda c: (c / TENSORS_FILE).unlink(), r"missing file model\.safetensors"),
    "truncated tensors": (
        lambda c: (c / TENSORS_FILE).write_bytes((c / TENSORS_FILE).read_bytes()[:-100]),
        r"model\.safetensors: size \d+ bytes, manifest says \d+",
    ),
    "altered byte": (lambda c: _flip_byte(c / TENSORS_FILE, -7), r"model\.safetensors: sha256 does not match"),
    "altered header": (lambda c: _flip_byte(c / TENSORS_FILE, 20), r"sha256 does not match"),
    "altered recipe": (lambda c: _flip_byte(c / "recipe.json", 10), r"recipe\.json: sha256 does not match"),
    "newer version": (
        lambda c: _rewrite_manifest(c, format_version=CHECKPOINT_FORMAT_VERSION + 1),
        r"format version \d+ .* newer than this mxptq",
    ),
    "no manifest": (lambda c: (c / MANIFEST_FILE).unlink(), r"not an mxptq checkpoint \(no manifest\.json\)"),
    "foreign manifest": (lambda c: _rewrite_manifest(c, format="something-else"), r"not an mxptq checkpoint"),
    "garbled manifest": (lambda c: (c / MANIFEST_FILE).write_text("{not json"), r"unreadable manifest"),
    "unlisted required": (lambda c: _drop_from_manifest(c, "config.json"),
                          r"does not list required file config\.json"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_checkpoint_is_one_line_error(checkpoint_copy, case):
    damage, message = BAD_INPUTS[case]
    damage(checkpoint_copy)
    with pytest.raises(CheckpointError, match=message) as info:
        load_quantized(checkpoint_copy)
    assert "\n" not in str(info.value)
    assert str(checkpoint_copy) in str(info.value)
    assert isinstance(info.value, MxptqError)


def test_not_a_checkpoint_directory(tmp_path):
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "config.json").write_text("{}")
    for path, message in [(tmp_path / "plain", "not an mxptq checkpoint"),
                          (tmp_path / "absent", "does not exist"),
                          (tmp_path / "plain" / "config.json", "is a file")]:
        with pytest.raises(CheckpointError, match=message):
            load_quantized(path)


def test_verify_accepts_good_checkpoint(saved_checkpoint):
    manifest = verify_checkpoint(saved_checkpoint)
    files = {p.name for p in saved_checkpoint.iterdir()} - {MANIFEST_FILE}
    assert set(manifest["files"]) == files
    assert manifest["format_version"] == CHECKPOINT_FORMAT_VERSION
    assert manifest["mxptq_version"]
    assert {"config.json", TENSORS_FILE, "recipe.json", "rotation.json", "report.json"} <= files


def test_nothing_is_pickled(saved_checkpoint):
    for path in saved_checkpoint.iterdir():
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".toml":
            tomllib.loads(path.read_text())
        else:
            assert path.name == TENSORS_FILE
            assert not path.read_bytes().startswith(b"\x80")  # pickle protocol marker


# ---------------------------------------------------------------------------------- atomic writes


def test_replacing_a_checkpoint_is_atomic_and_clean(tmp_path):
    model, recipe = _quantized(tmp_path, "mxint4")
    out = tmp_path / "out" / "ckpt"
    save_quantized(model, recipe, out)
    first = json.loads((out / MANIFEST_FILE).read_text())["files"][TENSORS_FILE]["sha256"]
    model.model.layers[0].mlp.up_proj.weight.mul_(2)  # still on the grid (power-of-two scale)
    save_quantized(model, recipe, out)
    second = json.loads((out / MANIFEST_FILE).read_text())["files"][TENSORS_FILE]["sha256"]
    assert first != second
    assert [p.name for p in out.parent.iterdir()] == ["ckpt"]  # no temp or old dirs left
    verify_checkpoint(out)


def test_failed_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    from mxptq import checkpoint

    model, recipe = _quantized(tmp_path, "mxint4")
    out = tmp_path / "out" / "ckpt"
    save_quantized(model, recipe, out)
    before = (out / MANIFEST_FILE).read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "_fsync_tree", boom)
    with pytest.raises(OSError, match="disk full"):
        save_quantized(model, recipe, out)
    assert (out / MANIFEST_FILE).read_bytes() == before
    assert [p.name for p in out.parent.iterdir()] == ["ckpt"]
    verify_checkpoint(out)


def test_refuses_to_replace_a_non_checkpoint_directory(tmp_path):
    model, recipe = _quantized(tmp_path, "mxint4")
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="not an mxptq checkpoint; refusing"):
        save_quantized(model, recipe, tmp_path / "precious")
    assert (tmp_path / "precious" / "notes.txt").read_text() == "keep me"


# ---------------------------------------------------------------------------------- demo model


@pytest.mark.demo
def test_demo_model_round_trip_tutorial_a(demo_model, tmp_path):
    """SmolLM2-135M (the packaged demo model: real weights, tied embeddings, GQA, its tokenizer)
    under tutorial config A unchanged (MXINT4 W4A4KV4, tutorial scale rule), CPU.

    Only the first DEMO_LAYERS decoder layers are kept, to stay within the test time budget on
    a 2-core CPU; every selector of the recipe still matches. (The whole 30-layer model round
    trips bit-identically too; it takes minutes on this CPU.)"""
    from mxptq.models import DEMO_MODEL

    model, tokenizer, info = demo_model
    model = copy.deepcopy(model)  # the session fixture must not be mutated
    model.model.layers = model.model.layers[:DEMO_LAYERS]
    model.config.num_hidden_layers = DEMO_LAYERS
    recipe = load_recipe(REPO / "recipes" / "tutorial_a_rtn.toml").with_overrides(
        model=DEMO_MODEL, device="cpu", dtype="float32")
    model = quantize_model(model.eval(), recipe, None)
    text = "The quick brown fox jumps over the lazy dog."
    ids = tokenizer(text, return_tensors="pt").input_ids
    expected = _logits(model, ids)

    summary = save_quantized(model, recipe, tmp_path / "ckpt", tokenizer=tokenizer, model_info=info)
    del model
    reloaded, reloaded_tokenizer, meta = load_quantized(tmp_path / "ckpt")

    assert torch.equal(_bits(_logits(reloaded, ids)), _bits(expected))
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    assert torch.equal(reloaded_tokenizer(text, return_tensors="pt").input_ids, ids)
    assert summary.quantized_bytes * 16 == summary.quantized_fp16_bytes * 4.25  # (4 + 8/32)/16
    assert len(summary.quantized) == 7 * DEMO_LAYERS
    assert meta.model_info is not None
