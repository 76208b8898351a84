"""mxptq.recipe: the tutorial's recipes load verbatim, formats resolve as the tutorial and OCP
say, overrides and the canonical hash behave. Expectations are written out by hand from the
tutorial text (../shared/seed/tutorial_7_mx_ptq.txt) and the OCP MX v1.0 element tables."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from mxptq.errors import RecipeError
from mxptq.formats import ScaleRule
from mxptq.recipe import (
    MATMUL_TYPES,
    AttentionConfig,
    LinearConfig,
    Recipe,
    default_recipe,
    load_recipe,
    parse_recipe,
    toml_key,
)

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
TUTORIAL = {name: RECIPES / f"tutorial_{name}.toml" for name in ("a_rtn", "b_gptq", "c_rotsearch")}
ATTN = r"model\.layers\.\d+\.self_attn$"
QKVO = r"model\.layers\.\d+\.self_attn\.(q|k|v|o)_proj"
MLP = r"model\.layers\.\d+\.mlp\.(gate|up|down)_proj"


def _headers_in_file_order(path: Path) -> list[str]:
    """Selector keys read with a regex over the file text (independent of tomllib)."""
    return [m[1] for m in re.finditer(r"^\['([^']*)'\]\s*$", path.read_text(), flags=re.MULTILINE)]


def _assert_int4_b32_tutorial(fmt) -> None:
    # Tutorial "MX4": 4-bit integer elements (sign incl.), block size 32; the tutorial's own rule.
    assert fmt.element.kind == "int"
    assert fmt.element.bits == 4
    assert fmt.block_size == 32
    assert fmt.scale_rule == ScaleRule.TUTORIAL


@pytest.mark.parametrize("name", sorted(TUTORIAL))
def test_tutorial_recipes_parse_verbatim_in_toml_order(name):
    recipe = load_recipe(TUTORIAL[name])
    assert recipe.by == "regex_name"
    assert [s.pattern for s in recipe.selectors] == _headers_in_file_order(TUTORIAL[name]) == [ATTN, QKVO, MLP]
    assert [s.kind for s in recipe.selectors] == ["attention", "linear", "linear"]


@pytest.mark.parametrize("name", sorted(TUTORIAL))
def test_tutorial_formats_resolve(name):
    recipe = load_recipe(TUTORIAL[name])
    attention, qkvo, mlp = (s.config for s in recipe.selectors)
    assert isinstance(attention, AttentionConfig)
    # qk_matmul, av_matmul, softmax, rope: `bypass = true` in every tutorial config.
    assert (attention.qk_matmul, attention.av_matmul, attention.softmax, attention.rope) == (None,) * 4
    _assert_int4_b32_tutorial(attention.kv_cache)
    uses_gptq = name != "a_rtn"
    for linear in (qkvo, mlp):
        assert isinstance(linear, LinearConfig)
        _assert_int4_b32_tutorial(linear.weight)
        _assert_int4_b32_tutorial(linear.data_in)
        assert linear.bias is None and linear.bypass is False
        assert linear.gptq is uses_gptq


def test_tutorial_b_gptq_section():
    gptq = load_recipe(TUTORIAL["b_gptq"]).gptq
    assert gptq is not None
    assert (gptq.model_name, gptq.format, gptq.dataset) == ("unsloth/Llama-3.2-1B", "mxint", "wikitext2")
    assert (gptq.nsamples, gptq.seqlen, gptq.cali_batch_size) == (32, 512, 8)
    assert gptq.quantile_search is True and gptq.clip_search_y is True
    # Relative paths stay relative: they resolve against the working directory, like the tutorial.
    assert gptq.checkpoint_dir == Path("tutorial_7_output/checkpoints/config_b_gptq")
    _assert_int4_b32_tutorial(gptq.weight)


def test_tutorial_c_rotation_search_section():
    recipe = load_recipe(TUTORIAL["c_rotsearch"])
    rs = recipe.rotation_search
    assert rs is not None
    assert (rs.calib_nsamples, rs.calib_seqlen, rs.improvement_eps) == (32, 512, 0.0)
    assert rs.cache_path == Path("tutorial_7_output/checkpoints/config_c_rotsearch/rotation_decisions.json")
    # Not set in the tutorial's TOML: every matmul type is a candidate.
    assert rs.matmul_types == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                               "kv_cache", "qk_matmul", "av_matmul"] == list(MATMUL_TYPES)


def test_model_name_resolution_and_defaults():
    a, b = load_recipe(TUTORIAL["a_rtn"]), load_recipe(TUTORIAL["b_gptq"])
    assert a.model_name is None  # config A names no model: --model or [model].name must
    assert b.model_name == "unsloth/Llama-3.2-1B"  # from [gptq].model_name
    assert a.output_dir == Path("mxptq_output/tutorial_a_rtn")
    assert a.name == "tutorial_a_rtn"
    text = TUTORIAL["b_gptq"].read_text() + '\n[model]\nname = "smollm2-135m"\n'
    with_model = parse_recipe(text)
    assert with_model.model_name == "smollm2-135m"  # [model].name wins over [gptq].model_name
    with pytest.raises(RecipeError, match=r"^<recipe>: \[model.name\] no model given; allowed: "):
        parse_recipe(TUTORIAL["a_rtn"].read_text()).require_model_name()


def test_with_overrides_applies_and_validates():
    recipe = load_recipe(TUTORIAL["b_gptq"])
    changed = recipe.with_overrides(model="smollm2-135m", device="cpu", dtype="float32", out="runs/x",
                                    data_dir="/data/wt2", limit=5, max_length=512, batch_size=2,
                                    backend="lm-eval")
    assert changed.model_name == "smollm2-135m"
    assert changed.gptq.model_name == "smollm2-135m"  # GPTQ calibrates the model actually loaded
    assert (changed.model.device, changed.model.dtype) == ("cpu", "float32")
    assert changed.output_dir == Path("runs/x") and changed.data.dir == Path("/data/wt2")
    assert (changed.eval.limit, changed.eval.max_length, changed.eval.batch_size) == (5, 512, 2)
    assert changed.eval.backend == "lm-eval"
    assert recipe.model_name == "unsloth/Llama-3.2-1B"  # the original is untouched
    assert recipe.with_overrides() == recipe
    assert changed.sha256 != recipe.sha256
    with pytest.raises(RecipeError) as err:
        recipe.with_overrides(dtype="fp16")
    assert str(err.value) == '--dtype: "fp16" is not allowed; allowed: float16, bfloat16, float32, auto'
    with pytest.raises(RecipeError) as err:
        recipe.with_overrides(limit=0)
    assert str(err.value) == "--limit: 0 is out of range; allowed: >= 1"


def _reordered_tutorial_c() -> str:
    """Tutorial C with every table's keys reversed, the sections moved, comments dropped and
    `improvement_eps = 0` written as an integer: the same recipe."""
    return r"""
[rotation_search]
cache_path = "tutorial_7_output/checkpoints/config_c_rotsearch/rotation_decisions.json"
improvement_eps = 0
calib_seqlen = 512
calib_nsamples = 32
[gptq.weight_config]
weight_width = 4
weight_block_size = 32
['model\.layers\.\d+\.self_attn$'.rope]
bypass = true
['model\.layers\.\d+\.self_attn$'.softmax]
bypass = true
['model\.layers\.\d+\.self_attn$'.kv_cache]
data_in_width = 4
data_in_block_size = 32
['model\.layers\.\d+\.self_attn$'.av_matmul]
bypass = true
['model\.layers\.\d+\.self_attn$'.qk_matmul]
bypass = true
['model\.layers\.\d+\.self_attn$']
name = "mxint"
['model\.layers\.\d+\.self_attn\.(q|k|v|o)_proj']
gptq = true
data_in_width = 4
data_in_block_size = 32
weight_width = 4
weight_block_size = 32
name = "mxint"
['model\.layers\.\d+\.mlp\.(gate|up|down)_proj']
gptq = true
data_in_width = 4
data_in_block_size = 32
weight_width = 4
weight_block_size = 32
name = "mxint"
[gptq]
checkpoint_dir = "tutorial_7_output/checkpoints/config_b_gptq"
clip_search_y = true
quantile_search = true
cali_batch_size = 8
seqlen = 512
nsamples = 32
dataset = "wikitext2"
format = "mxint"
model_name = "unsloth/Llama-3.2-1B"
"""


def test_hash_is_stable_across_key_order_and_spelling():
    original = load_recipe(TUTORIAL["c_rotsearch"])
    reordered = parse_recipe(_reordered_tutorial_c(), source_path=TUTORIAL["c_rotsearch"])
    assert reordered == original
    assert reordered.sha256 == original.sha256
    assert re.fullmatch(r"[0-9a-f]{64}", original.sha256)
    # Where the file lives is not part of the recipe's identity...
    assert original.model_copy(update={"source_path": Path("elsewhere.toml")}).sha256 == original.sha256
    # ...but selector order is (first match wins), and so is any value.
    swapped = original.model_copy(update={"selectors": [original.selectors[i] for i in (0, 2, 1)]})
    assert swapped.sha256 != original.sha256
    more_samples = parse_recipe(TUTORIAL["c_rotsearch"].read_text().replace("nsamples = 32", "nsamples = 64"),
                                source_path=TUTORIAL["c_rotsearch"])
    assert more_samples.sha256 != original.sha256


@pytest.mark.parametrize("name", sorted(TUTORIAL))
def test_to_dict_is_json_and_round_trips(name):
    recipe = load_recipe(TUTORIAL[name])
    data = json.loads(json.dumps(recipe.to_dict()))
    assert data["selectors"][0]["config"]["kv_cache"] == {
        "name": "mxint", "element": "int4", "width": 4, "block_size": 32, "scale_rule": "tutorial"}
    again = Recipe.from_dict(data)
    assert again == recipe
    assert again.sha256 == recipe.sha256


def test_scale_rule_defaults_and_overrides():
    text = r"""
[formats]
mxint_scale_rule = "symmetric"
['a\.\d+']
name = "mxint"
weight_width = 4
['b\.\d+']
name = "mxint"
weight_width = 4
scale_rule = "ocp"
['c\.\d+']
name = "mxfp"
weight_exponent_width = 2
weight_frac_width = 1
data_in_exponent_width = 4
data_in_frac_width = 3
data_in_block_size = 16
"""
    a, b, c = (s.config for s in parse_recipe(text).selectors)
    assert a.weight.scale_rule == ScaleRule.SYMMETRIC  # [formats] default for mxint
    assert b.weight.scale_rule == ScaleRule.OCP  # the selector's own key wins
    # OCP MX v1.0 Table 2 / Table 1: E2M1 is FP4, E4M3 is FP8; MXFP defaults to OCP's rule.
    assert (c.weight.element.name, c.weight.element.bits, c.weight.block_size) == ("e2m1", 4, 32)
    assert (c.data_in.element.name, c.data_in.element.bits, c.data_in.block_size) == ("e4m3", 8, 16)
    assert c.weight.scale_rule == ScaleRule.OCP


def test_linear_bypass_and_gptq_inheritance():
    text = r"""
[gptq]
[gptq.weight_config]
weight_width = 3
['lm_head']
bypass = true
['x\.\d+']
name = "mxint"
data_in_width = 8
gptq = true
"""
    recipe = parse_recipe(text)
    bypass, inherits = (s.config for s in recipe.selectors)
    assert bypass.bypass is True and (bypass.weight, bypass.data_in, bypass.bias) == (None, None, None)
    # gptq = true without weight keys: the weight format is [gptq.weight_config]'s.
    assert inherits.weight == recipe.gptq.weight
    assert (inherits.weight.element.bits, inherits.weight.block_size) == (3, 32)
    assert inherits.data_in.element.bits == 8
    assert recipe.gptq.model_name is None and recipe.gptq.nsamples == 32  # tutorial defaults


def test_attention_stage_name_defaults_to_parent_and_can_differ():
    text = r"""
['m\.self_attn$']
name = "mxint"
['m\.self_attn$'.kv_cache]
data_in_width = 8
['m\.self_attn$'.qk_matmul]
name = "mxfp"
data_in_exponent_width = 2
data_in_frac_width = 3
"""
    config = parse_recipe(text).selectors[0].config
    assert config.kv_cache.element.name == "int8"
    assert config.qk_matmul.element.name == "e2m3"
    assert config.av_matmul is None and config.softmax is None and config.rope is None  # not given


def test_other_select_modes_do_not_compile_keys_as_regex():
    recipe = parse_recipe('by = "name"\n["model.layers.0.mlp.up_proj"]\nname = "mxint"\nweight_width = 4\n')
    assert recipe.by == "name" and recipe.selectors[0].pattern == "model.layers.0.mlp.up_proj"
    unbalanced = parse_recipe('by = "type"\n["Linear("]\nbypass = true\n')
    assert unbalanced.selectors[0].pattern == "Linear("


def test_default_recipe_has_no_selectors():
    recipe = default_recipe(model="smollm2-135m")
    assert recipe.selectors == [] and recipe.model_name == "smollm2-135m" and recipe.gptq is None


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.toml"
    with pytest.raises(RecipeError) as err:
        load_recipe(missing)
    assert str(err.value) == f"{missing}: file not found; allowed: a path to a TOML recipe file"


@pytest.mark.parametrize(
    ("key", "written"),
    [("gptq", "gptq"), ("weight_width", "weight_width"), (MLP, f"'{MLP}'"), ("it's", '"it\'s"')],
)
def test_toml_key_is_rendered_as_written(key, written):
    assert toml_key(key) == written


@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
def test_non_finite_floats_are_refused(value):
    # Issue 30: TOML's inf passed [rotation_search] validation and failed later, at the JSON save.
    with pytest.raises(RecipeError) as err:
        parse_recipe(f"[rotation_search]\nimprovement_eps = {value}\n")
    assert str(err.value) == (
        f"<recipe>: [rotation_search.improvement_eps] {value} is not a finite number; "
        "allowed: a finite number >= 0.0"
    )
