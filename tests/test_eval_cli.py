"""`mxptq eval-ppl` through the CLI (typer CliRunner): the unquantized model's report, and bad
input (missing split, max_length beyond the model's context, empty text) -> exit 2, one line.

Independent expectations: HF's built-in causal-LM loss for the demo model's first test document
(it fits one rolling window), lm-eval's word count on the original page, and the error lines the
issue asks for.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from offline import DATA_DIR, byte_tokenizer, needs_data
from typer.testing import CliRunner

from mxptq.cli import app
from mxptq.data import WikiText

CONTEXT = 512  # the tiny model's max_position_embeddings


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A random tiny Llama (context 512) + byte tokenizer, saved as an HF model directory."""
    from conftest import make_tiny_llama

    directory = tmp_path_factory.mktemp("tiny_llama")
    make_tiny_llama(seed=0, vocab_size=258, max_position_embeddings=CONTEXT).save_pretrained(directory)
    byte_tokenizer().save_pretrained(directory)
    return directory


def _eval_ppl(*args: str):
    return CliRunner().invoke(app, ["eval-ppl", *map(str, args)])


def _message_lines(stderr: str) -> list[str]:
    """stderr without progress output: transformers' tqdm bars ("\r...") and mxptq's plain
    progress lines ("[mxptq] ...")."""
    return [line for line in stderr.split("\n") if line and not line.startswith(("\r", "[mxptq]"))]


def _assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    (line,) = _message_lines(result.stderr)
    assert line.startswith("error: ")
    assert result.stderr.endswith(line + "\n")  # the error is the last thing written
    for fragment in fragments:
        assert fragment in line, line


# -- the unquantized model, end to end ----------------------------------------------------------


@needs_data
@pytest.mark.demo
def test_eval_ppl_without_recipe_reports_the_unquantized_model(demo_model, monkeypatch, tmp_path):
    model, tokenizer, info = demo_model
    loaded = []

    def load_shared_demo_model(cfg):
        # Loading is tested in tests/test_models.py; reuse the session's demo model (saves ~20 s).
        loaded.append(cfg)
        return model, tokenizer, info

    monkeypatch.setattr("mxptq.models.load_model", load_shared_demo_model)
    out = tmp_path / "run"
    result = _eval_ppl(
        "--model",
        "smollm2-135m",
        "--limit",
        "1",
        "--data-dir",
        DATA_DIR,
        "--backend",
        "native",
        "--device",
        "cpu",
        "--out",
        out,
    )
    assert result.exit_code == 0, (result.output, result.exception)
    assert [cfg.name for cfg in loaded] == ["smollm2-135m"]

    report = json.loads((out / "report.json").read_text())
    fp = report["metrics"]["fp"]
    assert "quantized" not in report["metrics"] and report["recipe"]["selectors"] == []
    assert fp["n_documents"] == 1 and fp["protocol"]["limit"] == 1 and fp["protocol"]["split"] == "test"
    assert fp["protocol"]["backend"] == "native" and fp["protocol"]["dtype"] == "float32"
    assert report["metrics"]["word_perplexity"] == fp["word_perplexity"]
    # The first page is 1407 tokens: shorter than max_length 2048, so no token-level windows ...
    assert fp["token_perplexity"] is None and "skipped" in fp["protocol"]["token_perplexity"]
    assert f"word_perplexity = {fp['word_perplexity']:.4f}" in result.stdout

    # ... and one rolling window: [BOS] + tokens, every token scored. HF's loss on that sequence
    # gives the page's log-likelihood; lm-eval divides by the words of the original page.
    page = WikiText(DATA_DIR).documents("test")[0]
    from lm_eval.tasks.wikitext.preprocess_wikitext import wikitext_detokenizer

    tokens = tokenizer.encode(wikitext_detokenizer({"page": page}))
    assert fp["n_tokens"] == len(tokens) == 1407
    ids = torch.tensor([[tokenizer.bos_token_id, *tokens]])
    with torch.inference_mode():
        mean_nll = model(input_ids=ids, labels=ids).loss.double().item()
    expected = math.exp(mean_nll * len(tokens) / len(re.split(r"\s+", page)))
    assert fp["word_perplexity"] == pytest.approx(expected, rel=1e-4)


# -- bad input: exit 2, one line, no traceback --------------------------------------------------


def test_data_dir_without_the_test_split(tiny_model_dir, tmp_path):
    (tmp_path / "wiki.valid.raw").write_text(" = A = \n \n Text . \n", encoding="utf-8")
    result = _eval_ppl(
        "--model", tiny_model_dir, "--data-dir", tmp_path, "--max-length", 64, "--out", tmp_path / "out"
    )
    _assert_one_line_error(
        result, "'test' not found", str(tmp_path / "wiki.test.raw"), "files present: wiki.valid.raw"
    )
    assert not (tmp_path / "out" / "report.json").exists()


def test_max_length_beyond_the_model_context(tiny_model_dir, tmp_path):
    (tmp_path / "wiki.test.raw").write_text(" = A = \n \n Text . \n", encoding="utf-8")
    result = _eval_ppl(
        "--model",
        tiny_model_dir,
        "--data-dir",
        tmp_path,
        "--max-length",
        2 * CONTEXT,
        "--out",
        tmp_path / "out",
    )
    _assert_one_line_error(
        result, f"max_length {2 * CONTEXT} is larger than the model's context", f"max_length <= {CONTEXT}"
    )


@pytest.mark.parametrize("text", ["", " \n \n\n"], ids=["empty-file", "blank-lines"])
def test_empty_text(tiny_model_dir, tmp_path, text):
    (tmp_path / "wiki.test.raw").write_text(text, encoding="utf-8")
    result = _eval_ppl(
        "--model", tiny_model_dir, "--data-dir", tmp_path, "--max-length", 64, "--out", tmp_path / "out"
    )
    _assert_one_line_error(result, "split 'test' is empty", str(tmp_path / "wiki.test.raw"))


def test_unknown_backend_names_the_allowed_ones(tiny_model_dir, tmp_path):
    result = _eval_ppl("--model", tiny_model_dir, "--backend", "vllm", "--out", tmp_path / "out")
    _assert_one_line_error(result, "--backend", "allowed: native, lm-eval, both")
