"""End to end through the CLI on the packaged demo model (CPU): `mxptq quantize` with the
tutorial's config A unchanged, then `mxptq eval-ppl --checkpoint` on what it wrote."""

from __future__ import annotations

import json

import pytest
from offline import DATA_DIR, needs_data
from typer.testing import CliRunner

from mxptq.cli import app


@pytest.fixture(scope="module")
def quantized_run(tmp_path_factory, demo_model):
    """One `mxptq quantize` run shared by the tests below (the demo fixture checks the wheel)."""
    out = tmp_path_factory.mktemp("run_a")
    result = CliRunner().invoke(app, [
        "quantize", "recipes/tutorial_a_rtn.toml", "--model", "smollm2-135m", "--device", "cpu",
        "--data-dir", str(DATA_DIR), "--limit", "1", "--out", str(out), "--no-progress",
    ])
    assert result.exit_code == 0, result.output
    return out, result


@pytest.mark.demo
@needs_data
def test_quantize_tutorial_a_writes_report_and_checkpoint(quantized_run):
    out, result = quantized_run
    report = json.loads((out / "report.json").read_text())
    fp, quantized = report["metrics"]["fp"], report["metrics"]["quantized"]
    # Same documents, same protocol: W4A4KV4 round-to-nearest must cost perplexity.
    assert fp["n_words"] == quantized["n_words"] and fp["n_documents"] == 1
    assert 1.0 < fp["word_perplexity"] < quantized["word_perplexity"]
    assert report["metrics"]["word_perplexity"] == quantized["word_perplexity"]
    assert report["recipe_name"] == "tutorial_a_rtn"
    assert report["data"]["eval_split"] == "test"
    assert {"load", "eval_fp", "transform", "save", "eval_quantized"} <= set(report["stages"])
    # 30 layers x 7 linears quantized, all MXINT4 with the tutorial's scale rule.
    assert report["transform"]["num_linear"] == 210
    assert report["checkpoint"]["quantized_ratio_to_fp16"] == pytest.approx(4.25 / 16)
    assert (out / "checkpoint" / "manifest.json").is_file()
    assert str(out / "report.json") in result.output


@pytest.mark.demo
@needs_data
def test_eval_ppl_of_the_checkpoint_reproduces_the_quantized_perplexity(quantized_run, tmp_path):
    out, _ = quantized_run
    report = json.loads((out / "report.json").read_text())
    result = CliRunner().invoke(app, [
        "eval-ppl", "--checkpoint", str(out / "checkpoint"), "--device", "cpu", "--data-dir", str(DATA_DIR),
        "--limit", "1", "--out", str(tmp_path), "--no-progress",
    ])
    assert result.exit_code == 0, result.output
    again = json.loads((tmp_path / "report.json").read_text())
    # The reloaded model is bit-identical, so the metric is too (same device, same batch).
    assert again["metrics"]["word_perplexity"] == report["metrics"]["quantized"]["word_perplexity"]
