"""What the CLI leaves on disk and says (issue 29): `eval-ppl --checkpoint` never overwrites the
quantize run's report, a bad --out / [output].dir is refused in one line before any model work,
files get the mode a plain open() gives under the umask, Ctrl-C says "interrupted" and exits 130.

A tiny random Llama with a byte tokenizer, saved as an HF directory, and three short pages: no
network, a few seconds per command.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from offline import EVAL_MODEL, EVAL_PAGES, byte_tokenizer
from typer.testing import CliRunner

import mxptq.models
from mxptq.cli import app

REPO = Path(__file__).resolve().parents[1]
RECIPE = """by = "regex_name"
['model\\.layers\\.\\d+\\.(self_attn|mlp)\\.\\w+_proj']
name = "mxint"
weight_block_size = 32
weight_width = 4
"""


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """(recipe file, tiny model directory, data directory)."""
    from conftest import make_tiny_llama

    root = tmp_path_factory.mktemp("inputs")
    make_tiny_llama(**EVAL_MODEL).save_pretrained(root / "model")
    byte_tokenizer().save_pretrained(root / "model")
    (root / "data").mkdir()
    (root / "data" / "wiki.test.raw").write_text("".join(EVAL_PAGES), encoding="utf-8")
    (root / "w4.toml").write_text(RECIPE)
    return root / "w4.toml", root / "model", root / "data"


def _invoke(*args):
    return CliRunner().invoke(app, [*map(str, args), "--no-progress"])


def _flags(inputs, out: Path | None) -> list:
    _recipe, model, data = inputs
    flags = ["--model", model, "--data-dir", data, "--max-length", 128, "--device", "cpu"]
    return flags + (["--out", out] if out is not None else [])


@pytest.fixture(scope="module")
def quantize_run(inputs, tmp_path_factory):
    """A finished `mxptq quantize` run directory, written under umask 0o022."""
    run = tmp_path_factory.mktemp("quantize") / "run"
    previous = os.umask(0o022)
    try:
        result = _invoke("quantize", inputs[0], *_flags(inputs, run))
    finally:
        os.umask(previous)
    assert result.exit_code == 0, (result.output, result.exception)
    return run


# -- 1. eval-ppl --checkpoint keeps the quantize run's report ------------------------------------


def test_eval_ppl_of_a_checkpoint_writes_beside_it_not_over_the_run_report(quantize_run, inputs, tmp_path):
    run = Path(shutil.copytree(quantize_run, tmp_path / "run"))
    quantize_report = (run / "report.json").read_bytes()
    _recipe, _model, data = inputs
    result = _invoke("eval-ppl", "--checkpoint", run / "checkpoint", "--data-dir", data)
    assert result.exit_code == 0, (result.output, result.exception)

    assert (run / "report.json").read_bytes() == quantize_report
    eval_report = run / "checkpoint_eval_report.json"
    assert result.stdout.endswith(f"report: {eval_report}\n")
    assert json.loads(eval_report.read_text())["command"] == "eval-ppl"
    assert json.loads(quantize_report)["command"] == "quantize"

    # Overwriting the run's report takes an explicit --out.
    result = _invoke("eval-ppl", "--checkpoint", run / "checkpoint", "--data-dir", data, "--out", run)
    assert result.exit_code == 0, (result.output, result.exception)
    assert json.loads((run / "report.json").read_text())["command"] == "eval-ppl"


def test_eval_ppl_help_says_where_the_checkpoint_report_goes():
    result = CliRunner().invoke(app, ["eval-ppl", "--help"])
    assert "checkpoint_eval_report.json" in " ".join(result.stdout.split())


# -- 2. a bad output directory: one line, exit 2, before any model work --------------------------


@pytest.fixture
def no_model_work(monkeypatch):
    def refuse(*_args, **_kwargs):
        raise AssertionError("a model was loaded before the output directory was checked")

    monkeypatch.setattr(mxptq.models, "load_model", refuse)
    monkeypatch.setattr("mxptq.checkpoint.load_quantized", refuse)


def _assert_one_line(result, line: str) -> None:
    assert result.exit_code == 2, (result.output, result.exception)
    assert result.stderr == f"error: {line}\n"
    assert result.stdout == ""


ALLOWED = "allowed: a directory that exists or can be created, with write permission"


@pytest.mark.parametrize("command", ["quantize", "eval-ppl"])
def test_out_that_is_a_file(inputs, tmp_path, no_model_work, command):
    taken = tmp_path / "taken"
    taken.write_text("a file")
    result = _invoke(command, inputs[0], *_flags(inputs, taken))
    _assert_one_line(result, f"--out: cannot write to {taken} ({taken} is a file); {ALLOWED}")
    result = _invoke(command, inputs[0], *_flags(inputs, taken / "run"))
    _assert_one_line(result, f"--out: cannot write to {taken / 'run'} ({taken} is a file); {ALLOWED}")
    assert taken.read_text() == "a file"


def _read_only(directory: Path, monkeypatch) -> Path:
    directory.mkdir(exist_ok=True)
    directory.chmod(0o555)
    if os.geteuid() == 0:  # root writes anywhere: let the check see the mode as any other user would
        access = os.access
        monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != directory and access(path, mode))
    return directory


def test_out_in_a_read_only_directory(inputs, tmp_path, no_model_work, monkeypatch):
    locked = _read_only(tmp_path / "locked", monkeypatch)
    result = _invoke("quantize", inputs[0], *_flags(inputs, locked / "run"))
    _assert_one_line(result, f"--out: cannot write to {locked / 'run'} ({locked} is not writable); {ALLOWED}")


def test_output_dir_of_the_recipe_names_the_toml_key(inputs, tmp_path, no_model_work):
    taken = tmp_path / "taken"
    taken.write_text("a file")
    recipe = tmp_path / "out.toml"
    recipe.write_text(RECIPE + f"[output]\ndir = '{taken}'\n")
    result = _invoke("quantize", recipe, *_flags(inputs, None))
    _assert_one_line(result, f"{recipe}: [output.dir] cannot write to {taken} ({taken} is a file); {ALLOWED}")


def test_eval_ppl_of_a_checkpoint_in_a_read_only_directory(quantize_run, tmp_path, no_model_work, monkeypatch):
    locked = tmp_path / "locked"
    shutil.copytree(quantize_run / "checkpoint", locked / "checkpoint")
    _read_only(locked, monkeypatch)
    result = _invoke("eval-ppl", "--checkpoint", locked / "checkpoint")
    _assert_one_line(result, f"--checkpoint: cannot write to {locked} ({locked} is not writable); {ALLOWED}; "
                             "or pass --out DIR (without it the report goes beside the checkpoint, as "
                             "checkpoint_eval_report.json)")


# -- 3. file modes: what a plain open() gives under the umask ------------------------------------


def test_written_files_have_the_umask_mode(quantize_run):
    # Written under umask 0o022 (the fixture); mkstemp/mkdtemp used to leave 0600 and 0700.
    assert _mode(quantize_run / "report.json") == 0o644
    assert _mode(quantize_run / "checkpoint") == 0o755
    assert {p.name: _mode(p) for p in (quantize_run / "checkpoint").iterdir()} == dict.fromkeys(
        ["config.json", "manifest.json", "model.safetensors", "recipe.json", "recipe.toml", "report.json",
         "rotation.json", "tokenizer.json", "tokenizer_config.json"], 0o644)


# -- 4. Ctrl-C -----------------------------------------------------------------------------------


def test_sigint_prints_interrupted_with_the_stage_and_exits_130(inputs, tmp_path):
    # A real SIGINT to a real `mxptq eval-ppl` process, sent by the process itself when the
    # evaluation starts (deterministic, unlike a signal from outside at some moment).
    code = (
        "import os, signal, sys, time\n"
        "import mxptq.evaluate\n"
        "def interrupted(*args, **kwargs):\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    time.sleep(30)\n"
        "mxptq.evaluate.evaluate_wikitext = interrupted\n"
        "from mxptq.cli import main\n"
        "sys.argv = ['mxptq', *sys.argv[1:]]\n"
        "main()\n"
    )
    out = tmp_path / "run"
    args = ["eval-ppl", *map(str, _flags(inputs, out)), "--no-progress"]
    result = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 130, result.stderr
    assert result.stderr.splitlines()[-1] == "interrupted during stage eval_fp", result.stderr
    assert "Traceback" not in result.stderr
    assert not (out / "report.json").exists()


def test_interrupt_outside_a_stage(monkeypatch):
    import types

    module = types.ModuleType("mxptq.pipeline")

    def run_eval_ppl(_recipe, _opts):
        raise KeyboardInterrupt

    module.run_eval_ppl = run_eval_ppl
    monkeypatch.setitem(sys.modules, "mxptq.pipeline", module)
    result = CliRunner().invoke(app, ["eval-ppl", "--model", "smollm2-135m"])
    assert (result.exit_code, result.stderr, result.stdout) == (130, "interrupted\n", "")
