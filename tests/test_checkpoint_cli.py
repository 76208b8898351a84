"""`mxptq eval-ppl --checkpoint DIR` on bad checkpoints (issue 8): one `error:` line on stderr,
exit code 2, before any model is built. Also a good checkpoint's stored recipe is readable."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mxptq.checkpoint import (
    CHECKPOINT_FORMAT_VERSION,
    MANIFEST_FILE,
    TENSORS_FILE,
    read_recipe,
    save_quantized,
)
from mxptq.cli import app
from mxptq.recipe import load_recipe
from mxptq.stages.transform import quantize_model

RECIPE = """by = "regex_name"
['model\\.layers\\.\\d+\\.(self_attn|mlp)\\.\\w+_proj']
name = "mxint"
weight_block_size = 32
weight_width = 4
"""


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory):
    from conftest import make_tiny_llama

    tmp_path = tmp_path_factory.mktemp("cli")
    (tmp_path / "w4.toml").write_text(RECIPE)
    recipe = load_recipe(tmp_path / "w4.toml")
    model = quantize_model(make_tiny_llama(), recipe, None)
    save_quantized(model, recipe, tmp_path / "ckpt")
    return tmp_path / "ckpt", recipe


def _damaged(good: Path, tmp_path: Path, damage) -> Path:
    copy = Path(shutil.copytree(good, tmp_path / "ckpt"))
    damage(copy)
    return copy


def _newer(ckpt: Path) -> None:
    manifest = json.loads((ckpt / MANIFEST_FILE).read_text())
    manifest["format_version"] = CHECKPOINT_FORMAT_VERSION + 1
    (ckpt / MANIFEST_FILE).write_text(json.dumps(manifest))


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))


CASES = {
    "missing file": (lambda c: (c / "config.json").unlink(), "missing file config.json"),
    "truncated": (lambda c: (c / TENSORS_FILE).write_bytes((c / TENSORS_FILE).read_bytes()[:1000]),
                  "(truncated or altered)"),
    "altered": (lambda c: _flip(c / TENSORS_FILE), "sha256 does not match the manifest"),
    "newer": (_newer, "newer than this mxptq"),
    "not a checkpoint": (lambda c: (c / MANIFEST_FILE).unlink(), "not an mxptq checkpoint"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_eval_ppl_bad_checkpoint_exits_2_with_one_line(good_checkpoint, tmp_path, case):
    damage, expected = CASES[case]
    ckpt = _damaged(good_checkpoint[0], tmp_path, damage)
    result = CliRunner().invoke(app, ["eval-ppl", "--checkpoint", str(ckpt)])
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"error: {ckpt}")
    assert expected in result.stderr


def test_eval_ppl_missing_directory_exits_2(tmp_path):
    result = CliRunner().invoke(app, ["eval-ppl", "--checkpoint", str(tmp_path / "nope")])
    assert result.exit_code == 2
    assert "not a checkpoint directory" in result.stderr


def test_read_recipe_of_good_checkpoint(good_checkpoint):
    ckpt, recipe = good_checkpoint
    stored = read_recipe(ckpt)
    assert stored.sha256 == recipe.sha256
    assert stored.selectors == recipe.selectors
