"""mxptq.cli: exit codes, one-line user errors (the broken-recipe corpus), stage dispatch to
mxptq.pipeline with overrides applied, `validate --model`, `report`."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
from typer.testing import CliRunner

import mxptq
from mxptq.cli import app, markdown_table, summarize_module_names
from mxptq.options import RunOptions, RunResult
from mxptq.report import as_number, format_number, get_path

REPO = Path(__file__).resolve().parents[1]
BAD = "tests/recipes_bad"
MLP = r"['model\.layers\.\d+\.mlp\.(gate|up|down)_proj'"
QKVO = r"['model\.layers\.\d+\.self_attn\.(q|k|v|o)_proj'"
ATTN = r"['model\.layers\.\d+\.self_attn$'"
LINEAR_KEYS = ("name, weight_block_size, weight_width, weight_exponent_width, weight_frac_width, "
               "data_in_block_size, data_in_width, data_in_exponent_width, data_in_frac_width, "
               "bias_block_size, bias_width, bias_exponent_width, bias_frac_width, scale_rule, bypass, gptq")
OCP_PAIRS = "(2, 1) e2m1, (2, 3) e2m3, (3, 2) e3m2, (4, 3) e4m3, (5, 2) e5m2"  # OCP MX v1.0 Tables 1-2
SECTIONS = "[gptq], [rotation], [rotation_search], [model], [data], [eval], [output], [formats], or a selector table"

# file -> the exact stderr line (after "error: <file>: ").
BROKEN_RECIPES = {
    "01_toml_syntax.toml": "line 2, column 48: invalid TOML: Expected ']' at the end of a table declaration",
    "02_unknown_key_did_you_mean.toml":
        f"{MLP}.weight_widht] unknown key (did you mean 'weight_width'?); allowed: {LINEAR_KEYS}",
    "03_wrong_type_string_width.toml": f'{MLP}.weight_width] expected an integer, got string "4"',
    "04_mxint_width_out_of_range.toml":
        f"{MLP}.weight_width] mxint width 9 is out of range; allowed: 2..8 (total bits incl. sign)",
    "05_block_size_out_of_range.toml":
        f"{QKVO}.data_in_block_size] block_size 0 is out of range; allowed: 1..4096",
    "06_unknown_format_name.toml":
        f"{MLP}.name] \"mxin\" is not allowed (did you mean 'mxint'?); allowed: mxint, mxfp",
    "07_mxfp_pair_not_ocp.toml":
        f"{MLP}.weight_exponent_width] mxfp (exponent_width=3, frac_width=3) is not an OCP MX element "
        f"format; allowed pairs: {OCP_PAIRS}",
    "08_gptq_true_without_gptq_table.toml":
        f"{MLP}.gptq] gptq = true needs a [gptq] table; allowed: add [gptq] with [gptq.weight_config], "
        "or set gptq = false",
    "09_regex_does_not_compile.toml":
        r"['model\.layers\.(\d+\.mlp\.(gate|up|down)_proj'] invalid regular expression: missing ), "
        "unterminated subpattern at position 15; allowed: a Python regex, matched with re.fullmatch "
        "against module names",
    "10_by_not_allowed.toml":
        "[by] \"regex\" is not allowed (did you mean 'regex_name'?); allowed: regex_name, name, type",
    "11_unknown_matmul_type.toml":
        "[rotation_search.matmul_types] \"qproj\" is not allowed (did you mean 'q_proj'?); allowed: "
        "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, kv_cache, qk_matmul, av_matmul",
    "12_negative_nsamples.toml": "[gptq.nsamples] -4 is out of range; allowed: >= 1",
    "13_misspelt_section.toml":
        f"[rotation_serach] unknown table (did you mean [rotation_search]?); allowed: {SECTIONS}",
    "14_unknown_top_level_key.toml":
        "[byy] unknown key (did you mean 'by'?); allowed: by, gptq, rotation, rotation_search, model, data, eval, "
        "output, formats, or a selector table",
    "15_gptq_without_weight_config.toml":
        "[gptq.weight_config] missing table [gptq.weight_config] (the weight format GPTQ targets); "
        "allowed: weight_block_size with weight_width (mxint) or weight_exponent_width + "
        "weight_frac_width (mxfp)",
    "16_attention_stage_unknown_key.toml":
        f"{ATTN}.kv_cache.weight_width] unknown key; allowed: name, bypass, data_in_block_size, "
        "data_in_width, data_in_exponent_width, data_in_frac_width, scale_rule",
    "17_attention_stage_without_format.toml": f"{ATTN}.kv_cache.data_in_width] mxint needs `width`; allowed: 2..8",
    "18_scale_rule_not_for_mxfp.toml":
        "[formats.mxfp_scale_rule] scale_rule 'tutorial' does not apply to mxfp; allowed: ocp, symmetric, mse",
    "19_mxint_with_exponent_width.toml":
        f"{MLP}.weight_exponent_width] mxint takes `width` (total bits incl. sign), not "
        "exponent_width/frac_width",
    "20_gptq_weight_format_mismatch.toml":
        f"{MLP}.weight_width] weight format MXINT8(b32,tutorial) differs from [gptq.weight_config] "
        "MXINT4(b32,tutorial); allowed: MXINT4(b32,tutorial) when gptq = true",
    "21_model_dtype_not_allowed.toml":
        '[model.dtype] "fp16" is not allowed; allowed: float16, bfloat16, float32, auto',
    "22_eval_batch_size_zero.toml": "[eval.batch_size] 0 is out of range; allowed: >= 1",
    "23_bypass_not_boolean.toml": f'{ATTN}.softmax.bypass] expected true or false, got string "yes"',
    "24_width_without_name.toml":
        f"{MLP}.name] missing key 'name' (needed by the weight_* keys); allowed: mxint, mxfp",
    "25_model_device_not_allowed.toml":
        '[model.device] "gpu" is not allowed; allowed: auto, cpu, mps, cuda, cuda:N',
    "26_unknown_scale_rule.toml":
        f"{MLP}.scale_rule] unknown scale_rule 'symetric'; allowed for mxint: tutorial, symmetric, ocp, mse",
    "27_mxfp_width_disagrees.toml":
        f"{MLP}.data_in_width] mxfp width 8 does not match 1 + exponent_width + frac_width = 4",
    "28_eval_cuda_graphs_not_boolean.toml": '[eval.cuda_graphs] expected true or false, got string "yes"',
    "29_rotation_online_not_a_linear_type.toml":
        '[rotation.online] "lm_head" is not allowed; allowed: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj',
    "30_rotation_residual_not_boolean.toml": "[rotation.residual] expected true or false, got integer 1",
    "31_rotation_unknown_key.toml": "[rotation.learned] unknown key; allowed: residual, heads, online, seed",
    "32_rotation_seed_not_integer.toml": '[rotation.seed] expected an integer, got string "zero"',
}


@pytest.fixture
def runner(monkeypatch):
    monkeypatch.chdir(REPO)  # error lines name the recipe as given: a path relative to the repo
    monkeypatch.setenv("MXPTQ_NO_PROGRESS", "1")
    return CliRunner()


def test_corpus_is_complete():
    files = sorted(p.name for p in (REPO / BAD).glob("*.toml"))
    assert files == sorted(BROKEN_RECIPES)  # every broken recipe has an asserted line
    assert len(files) >= 15


@pytest.mark.parametrize("name", sorted(BROKEN_RECIPES))
def test_broken_recipe_gives_one_line_and_exit_2(runner, name):
    result = runner.invoke(app, ["validate", f"{BAD}/{name}"])
    assert result.exit_code == 2, result.output
    assert result.stderr == f"error: {BAD}/{name}: {BROKEN_RECIPES[name]}\n"
    assert result.stdout == ""
    assert "Traceback" not in result.output


@pytest.mark.parametrize("command", ["validate", "quantize", "gptq", "rotsearch", "eval-ppl"])
def test_every_command_validates_before_running(runner, command):
    result = runner.invoke(app, [command, f"{BAD}/10_by_not_allowed.toml"])
    assert result.exit_code == 2
    assert result.stderr == f"error: {BAD}/10_by_not_allowed.toml: {BROKEN_RECIPES['10_by_not_allowed.toml']}\n"


def test_missing_recipe_file(runner):
    result = runner.invoke(app, ["validate", "recipes/nope.toml"])
    assert (result.exit_code, result.stderr) == (
        2, "error: recipes/nope.toml: file not found; allowed: a path to a TOML recipe file\n")


@pytest.mark.parametrize("name", ["tutorial_a_rtn", "tutorial_b_gptq", "tutorial_c_rotsearch"])
def test_validate_tutorial_recipes_exit_0(runner, name):
    result = runner.invoke(app, ["validate", f"recipes/{name}.toml"])
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    assert result.stdout.splitlines()[-1].startswith(f"ok: recipes/{name}.toml is valid (sha256 ")
    assert "3 selectors (by = regex_name)" in result.stdout


def test_version(runner):
    result = runner.invoke(app, ["--version"])
    assert (result.exit_code, result.stdout) == (0, f"mxptq {mxptq.__version__}\n")


@pytest.mark.parametrize("command", ["validate", "quantize", "gptq", "rotsearch", "eval-ppl", "report"])
def test_help_on_every_command(runner, command):
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0
    assert "Usage:" in result.stdout


def test_python_dash_m_help():
    result = subprocess.run([sys.executable, "-m", "mxptq", "--help"], check=False, cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    for command in ("validate", "quantize", "gptq", "rotsearch", "eval-ppl", "report"):
        assert command in result.stdout


# --- dispatch to mxptq.pipeline ----------------------------------------------------------------


@pytest.fixture
def fake_pipeline(monkeypatch):
    """A stand-in mxptq.pipeline recording what the CLI passes."""
    calls = []
    module = types.ModuleType("mxptq.pipeline")

    def make(name):
        def run(recipe, opts):
            calls.append((name, recipe, opts))
            return RunResult(report_path=Path("out/report.json"), metrics={"word_perplexity": 12.88354})
        return run

    for name in ("run_quantize", "run_gptq", "run_rotsearch", "run_eval_ppl"):
        setattr(module, name, make(name))
    monkeypatch.setitem(sys.modules, "mxptq.pipeline", module)
    return module, calls


def test_quantize_applies_overrides_and_calls_pipeline(runner, fake_pipeline):
    _module, calls = fake_pipeline
    result = runner.invoke(app, ["quantize", "recipes/tutorial_b_gptq.toml", "--model", "smollm2-135m",
                                 "--device", "cpu", "--dtype", "float32", "--out", "runs/b", "--limit", "3",
                                 "--data-dir", "/data", "--no-progress", "--force"])
    assert result.exit_code == 0, result.output
    assert result.stdout == "word_perplexity = 12.8835\nreport: out/report.json\n"
    (name, recipe, opts), = calls
    assert name == "run_quantize"
    assert (recipe.model_name, recipe.gptq.model_name) == ("smollm2-135m", "smollm2-135m")
    assert (recipe.model.device, recipe.model.dtype, recipe.eval.limit) == ("cpu", "float32", 3)
    assert (recipe.output_dir, recipe.data.dir) == (Path("runs/b"), Path("/data"))
    assert isinstance(opts, RunOptions)
    assert (opts.quiet, opts.progress, opts.force, opts.command) == (False, False, True, "quantize")
    assert opts.overrides == {"model": "smollm2-135m", "device": "cpu", "dtype": "float32",
                              "out": Path("runs/b"), "data_dir": Path("/data"), "limit": 3}


def test_quiet_prints_only_the_report_path(runner, fake_pipeline):
    result = runner.invoke(app, ["gptq", "recipes/tutorial_b_gptq.toml", "-q"])
    assert (result.exit_code, result.stdout) == (0, "out/report.json\n")
    assert fake_pipeline[1][0][2].quiet is True


def test_eval_ppl_without_recipe(runner, fake_pipeline):
    _module, calls = fake_pipeline
    result = runner.invoke(app, ["eval-ppl", "--model", "smollm2-135m", "--backend", "lm-eval",
                                 "--max-length", "1024", "--batch-size", "4"])
    assert result.exit_code == 0, result.output
    (_name, recipe, _opts), = calls
    assert recipe.selectors == [] and recipe.model_name == "smollm2-135m"
    assert (recipe.eval.backend, recipe.eval.max_length, recipe.eval.batch_size) == ("lm-eval", 1024, 4)
    # --checkpoint alone: the pipeline uses the checkpoint's stored recipe plus opts.overrides.
    result = runner.invoke(app, ["eval-ppl", "--checkpoint", "runs/b/checkpoint", "--limit", "2"])
    assert result.exit_code == 0, result.output
    _name, recipe, opts = calls[-1]
    assert recipe is None and opts.checkpoint == Path("runs/b/checkpoint") and opts.overrides == {"limit": 2}


def test_eval_ppl_needs_something_to_evaluate(runner, fake_pipeline):
    result = runner.invoke(app, ["eval-ppl"])
    assert (result.exit_code, result.stderr) == (2, "error: Invalid value: give a RECIPE, --model or --checkpoint\n")


@pytest.mark.parametrize(
    ("flags", "line"),
    [
        (["--dtype", "f16"], ("--dtype: \"f16\" is not allowed (did you mean 'float16'?); "
                              "allowed: float16, bfloat16, float32, auto")),
        (["--device", "gpu0"], '--device: "gpu0" is not allowed; allowed: auto, cpu, mps, cuda, cuda:N'),
        (["--limit", "0"], "--limit: 0 is out of range; allowed: >= 1"),
    ],
)
def test_bad_override_flag(runner, fake_pipeline, flags, line):
    result = runner.invoke(app, ["quantize", "recipes/tutorial_a_rtn.toml", *flags])
    assert (result.exit_code, result.stderr) == (2, f"error: {line}\n")
    assert fake_pipeline[1] == []


def test_stage_not_built_is_a_clear_error(runner, monkeypatch):
    monkeypatch.setitem(sys.modules, "mxptq.pipeline", types.ModuleType("mxptq.pipeline"))
    result = runner.invoke(app, ["rotsearch", "recipes/tutorial_c_rotsearch.toml"])
    assert result.exit_code == 2
    assert result.stderr == ("error: `mxptq rotsearch` is not built yet: the recipe is valid, but "
                             "mxptq.pipeline has no run_rotsearch()\n")
    monkeypatch.setitem(sys.modules, "mxptq.pipeline", None)  # import of the module fails
    result = runner.invoke(app, ["quantize", "recipes/tutorial_a_rtn.toml"])
    assert result.exit_code == 2
    assert result.stderr == ("error: `mxptq quantize` is not built yet: the recipe is valid, but "
                             "mxptq.pipeline does not exist\n")


def test_internal_error_keeps_traceback_exit_1(runner, fake_pipeline):
    def broken(recipe, opts):
        raise ZeroDivisionError("a bug")

    fake_pipeline[0].run_quantize = broken
    result = runner.invoke(app, ["quantize", "recipes/tutorial_a_rtn.toml"])
    assert result.exit_code == 1
    assert isinstance(result.exception, ZeroDivisionError)  # not swallowed into a one-liner
    assert "error:" not in result.stderr


# --- validate --model ----------------------------------------------------------------------


@pytest.fixture
def tiny_model_loader(monkeypatch, tiny_llama):
    import mxptq.models

    model = tiny_llama(num_hidden_layers=2)
    monkeypatch.setattr(mxptq.models, "load_model", lambda cfg: (model, None, None))
    return model


def test_validate_with_model_lists_matches(runner, tiny_model_loader):
    result = runner.invoke(app, ["validate", "recipes/tutorial_c_rotsearch.toml", "--model", "tiny"])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "model.layers.{0-1}.self_attn" in out
    for proj in ("q", "k", "v", "o"):
        assert f"model.layers.{{0-1}}.self_attn.{proj}_proj" in out
    for proj in ("gate", "up", "down"):
        assert f"model.layers.{{0-1}}.mlp.{proj}_proj" in out
    assert out.splitlines()[-1].startswith("ok: recipes/tutorial_c_rotsearch.toml is valid for tiny")


def test_validate_with_model_reports_selector_matching_nothing(runner, tiny_model_loader, tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text((REPO / "recipes/tutorial_a_rtn.toml").read_text()
                      + "['model\\.decoder\\.\\d+\\.fc1']\nname = \"mxint\"\nweight_width = 4\n")
    result = runner.invoke(app, ["validate", str(recipe), "--model", "tiny"])
    assert result.exit_code == 2
    assert "(each selector alone)" in result.stdout and "no match (see the error line)" in result.stdout
    assert "model.layers.{0-1}.mlp.up_proj" in result.stdout
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: selector 'model\\\\.decoder") and "matches no module" in lines[0]
    assert "Traceback" not in result.output


def test_summarize_module_names():
    names = [f"model.layers.{i}.mlp.up_proj" for i in (0, 1, 2, 5, 7, 8)] + ["lm_head"]
    assert summarize_module_names(names) == ["model.layers.{0-2,5,7-8}.mlp.up_proj", "lm_head"]


# --- report --------------------------------------------------------------------------------


def test_report_markdown_table(runner, tmp_path):
    a = tmp_path / "a.json"
    a.write_text(json.dumps({
        "recipe_name": "tutorial_a_rtn",
        "metrics": {"word_perplexity": 54.88721, "token_perplexity": 9.5},
        "stages": {"load": {"wall_s": 2.04, "peak_mem_bytes": 2**30},
                   "transform": {"wall_s": 10.0, "peak_mem_bytes": 3 * 2**30}},
    }))
    b = tmp_path / "b.json"  # an older/partial report: missing keys become "-"
    b.write_text(json.dumps({"metrics": {"word_perplexity": {"value": 31.0363}},
                             "stages": {"gptq": {"wall_s": 600.25}}}))
    result = runner.invoke(app, ["report", str(a), str(b)])
    assert result.exit_code == 0, result.output
    assert result.stdout == (
        "| config | word ppl | token ppl | load s | transform s | gptq s | peak mem GiB |\n"
        "|---|---:|---:|---:|---:|---:|---:|\n"
        "| tutorial_a_rtn | 54.8872 | 9.5000 | 2.0 | 10.0 | - | 3.00 |\n"
        "| b | 31.0363 | - | - | - | 600.2 | - |\n"
    )


def test_report_of_a_non_report_is_a_user_error(runner, tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text("[1, 2]")
    result = runner.invoke(app, ["report", str(bad)])
    assert (result.exit_code, result.stderr) == (2, f"error: {bad}: not a JSON report (top level is not an object)\n")


def test_report_reading_helpers():
    data = {"metrics": {"word_perplexity": {"value": 31.0363, "stderr": 0.1}, "n": True}}
    assert get_path(data, "metrics", "word_perplexity", "value") == 31.0363
    assert get_path(data, "metrics", "missing") is None and get_path(data, "metrics", "n", "x") is None
    assert as_number(get_path(data, "metrics", "word_perplexity")) == 31.0363
    assert as_number(True) is None and as_number("1") is None and as_number(3) == 3.0
    assert [format_number(v, 2) for v in (None, 1, float("nan"), "x")] == ["-", "1.00", "nan", "x"]


def test_cli_starts_without_torch():
    code = "import sys, mxptq.cli; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, check=False).returncode == 0


def test_markdown_escapes_pipes():
    assert markdown_table(["a"], [["x|y"]]).splitlines()[-1] == "| x\\|y |"
