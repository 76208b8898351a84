"""mxptq.data: WikiText-2 raw forms against the published counts and checksums
(shared/data/wikitext-2-raw-v1/README.md), split errors, and seeded calibration windows."""

from __future__ import annotations

import hashlib
import re

import pytest
import torch
from offline import DATA_DIR, needs_data

from mxptq.data import (
    HF_DOCUMENTS_DATASET,
    HF_ROWS_DATASET,
    WikiText,
    calibration_windows,
    documents_from_raw,
    raw_from_rows,
    rows_from_raw,
    tokenize_joined,
)
from mxptq.errors import DataError

# Published figures (data README: sha256 of the zip's files, HF card num_examples / num_bytes,
# GPTQ-style "\n\n" join, lm-eval document counts).
EXPECTED = {
    "test": {
        "raw_bytes": 1_290_590,
        "raw_sha": "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08",
        "rows": 4358,
        "hf_num_bytes": 1_305_088,
        "joined_bytes": 1_296_370,
        "joined_sha": "696cca6b65a171b0a358a4be6732cdfdf2dd6164a32e20fd70e3c13fc4dfae83",
        "documents": 62,
    },
    "validation": {
        "raw_bytes": 1_146_846,
        "raw_sha": "4cd0f6876d07a413aa911261ff6d363c72d757d47f0fdd6015702014c89cb9c7",
        "rows": 3760,
        "hf_num_bytes": 1_159_288,
        "joined_bytes": 1_151_766,
        "joined_sha": "b44fb967f92b525731216a507d1fbc44b97446b7ef0a2b4d1a893f81f1bbc29e",
        "documents": 60,
    },
}


@pytest.fixture(scope="module")
def wikitext() -> WikiText:
    return WikiText(DATA_DIR)


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@needs_data
@pytest.mark.parametrize("split", ["test", "validation"])
def test_forms_reproduce_published_counts_and_checksums(wikitext, split):
    want = EXPECTED[split]
    raw = wikitext.raw(split)
    assert len(raw.encode("utf-8")) == want["raw_bytes"]
    assert _sha(raw) == want["raw_sha"]

    rows = wikitext.rows(split)
    assert len(rows) == want["rows"]
    # HF card num_bytes = UTF-8 bytes of the row texts + 4 bytes per row.
    assert sum(len(r.encode("utf-8")) for r in rows) + 4 * len(rows) == want["hf_num_bytes"]
    assert raw_from_rows(rows) == raw

    joined = wikitext.joined(split)
    assert len(joined.encode("utf-8")) == want["joined_bytes"]
    assert _sha(joined) == want["joined_sha"]


@needs_data
@pytest.mark.parametrize("split", ["test", "validation"])
def test_documents_are_the_top_level_articles(wikitext, split):
    raw = wikitext.raw(split)
    docs = wikitext.documents(split)
    assert len(docs) == EXPECTED[split]["documents"]
    # Independent count: lines that are exactly a level-1 heading " = Title = ".
    heading = re.compile(r"^ = [^=].* = $")
    headings = [line for line in raw.split("\n") if heading.match(line)]
    assert len(headings) == len(docs)
    assert [doc.split("\n", 1)[0] for doc in docs] == headings
    # Pages partition the file's lines after a leading blank line (the dropped blank page):
    # re-joined they give the raw file back.
    assert raw == " \n" + "\n".join(docs)


@needs_data
def test_first_test_document_is_robert_boulter(wikitext):
    first = wikitext.documents("test")[0]
    assert first.startswith(" = Robert Boulter = \n \n Robert Boulter is an English film , television")
    assert " = = Career = = " in first


@needs_data
def test_joined_with_n_documents_is_a_prefix(wikitext):
    full = wikitext.joined("test")
    previous = ""
    for n in (1, 2, 10, 61):
        part = wikitext.joined("test", n_documents=n)
        assert full.startswith(part) and len(part) > len(previous)
        previous = part
    assert wikitext.joined("test", n_documents=62) == full
    # The first article with the blank line before it, in row form.
    first_doc = wikitext.documents("test")[0]
    assert wikitext.joined("test", n_documents=1) == "\n\n".join(rows_from_raw(" \n" + first_doc + "\n"))


def test_row_and_document_forms_on_a_hand_made_file():
    raw = " \n = A = \n \n a b \n = = S = = \n x \n = B = \n y \n"
    assert rows_from_raw(raw) == [
        "",
        " = A = \n",
        "",
        " a b \n",
        " = = S = = \n",
        " x \n",
        " = B = \n",
        " y \n",
    ]
    assert raw_from_rows(rows_from_raw(raw)) == raw
    # The leading blank page is dropped; a section heading does not start a page.
    assert documents_from_raw(raw) == [" = A = \n \n a b \n = = S = = \n x ", " = B = \n y \n"]


def test_missing_split_names_split_and_path_and_never_falls_back(tmp_path):
    (tmp_path / "wiki.valid.raw").write_text(" = A = \n text \n", encoding="utf-8")
    data = WikiText(tmp_path)
    assert data.documents("validation") == [" = A = \n text \n"]
    for split, file_name in (("test", "wiki.test.raw"), ("train", "wiki.train.raw")):
        with pytest.raises(DataError, match=re.escape(str(tmp_path / file_name))) as err:
            data.documents(split)
        assert repr(split) in str(err.value)
        assert "wiki.valid.raw" in str(err.value)  # says what is there


def test_empty_split_is_an_error(tmp_path):
    (tmp_path / "wiki.test.raw").write_text(" \n \n", encoding="utf-8")
    with pytest.raises(DataError, match="empty"):
        WikiText(tmp_path).rows("test")


def test_unknown_split_and_missing_directory(tmp_path):
    with pytest.raises(DataError, match="allowed: train, validation, test"):
        WikiText(tmp_path).raw("valid")
    with pytest.raises(DataError, match="does not exist"):
        WikiText(tmp_path / "nope")


def test_environment_variable_sets_the_directory(tmp_path, monkeypatch):
    (tmp_path / "wiki.test.raw").write_text(" = A = \n t \n", encoding="utf-8")
    monkeypatch.setenv("MXPTQ_DATA_DIR", str(tmp_path))
    data = WikiText()
    assert data.data_dir == tmp_path
    assert data.source == f"local:{tmp_path.resolve()}"
    assert data.rows("test") == [" = A = \n", " t \n"]


def test_hugging_face_datasets_are_used_without_a_directory(monkeypatch):
    datasets = pytest.importorskip("datasets")  # a runtime dependency; absent on the GPU box

    monkeypatch.delenv("MXPTQ_DATA_DIR", raising=False)
    calls = []

    def fake_load_dataset(path, name, split):
        calls.append((path, name, split))
        if path == HF_ROWS_DATASET[0]:
            return {"text": ["", " = A = \n", "", " t \n"]}
        return {"page": [" = A = \n \n t \n"]}

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    data = WikiText()
    assert data.source == "hf:wikitext/wikitext-2-raw-v1"
    assert data.rows("test") == ["", " = A = \n", "", " t \n"]
    assert data.raw("test") == " \n = A = \n \n t \n"
    assert data.documents("test") == [" = A = \n \n t \n"]
    assert calls == [(*HF_ROWS_DATASET, "test"), (*HF_DOCUMENTS_DATASET, "test")]


def test_hugging_face_failure_is_a_data_error(monkeypatch):
    datasets = pytest.importorskip("datasets")

    monkeypatch.delenv("MXPTQ_DATA_DIR", raising=False)

    def offline(path, name, split):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="could not load split 'test'.*--data-dir"):
        WikiText().documents("test")


# -- calibration windows ------------------------------------------------------------------------


class _WordTokenizer:
    """Deterministic stand-in tokenizer: one id per whitespace-separated word (id = hash mod 1000)."""

    def __call__(self, text, verbose=True):
        return {"input_ids": [int(hashlib.md5(w.encode()).hexdigest()[:6], 16) % 1000 for w in text.split()]}


def _small_source(tmp_path) -> WikiText:
    lines = [f" = Title {i} = \n" if i % 20 == 0 else f" word{i} a{i % 7} b{i % 5} c \n" for i in range(400)]
    (tmp_path / "wiki.valid.raw").write_text("".join(lines), encoding="utf-8")
    (tmp_path / "wiki.test.raw").write_text(" = Other = \n zzz \n", encoding="utf-8")
    return WikiText(tmp_path)


def test_calibration_windows_are_seeded_slices_of_the_split(tmp_path):
    source = _small_source(tmp_path)
    tokenizer = _WordTokenizer()
    windows = calibration_windows(tokenizer, source, "validation", nsamples=6, seqlen=16, seed=3)
    assert windows.shape == (6, 16) and windows.dtype == torch.long
    assert torch.equal(windows, calibration_windows(tokenizer, source, "validation", 6, 16, seed=3))
    assert not torch.equal(windows, calibration_windows(tokenizer, source, "validation", 6, 16, seed=4))
    # Every window is a run of consecutive tokens of the validation text.
    tokens = tokenize_joined(tokenizer, source.joined("validation"))
    every_slice = tokens.unfold(0, 16, 1)
    for window in windows:
        assert (every_slice == window).all(dim=1).any()


def test_calibration_window_errors(tmp_path):
    source = _small_source(tmp_path)
    with pytest.raises(DataError, match="fewer than seqlen"):
        calibration_windows(_WordTokenizer(), source, "test", nsamples=2, seqlen=16, seed=0)
    with pytest.raises(DataError, match="nsamples must be a positive integer"):
        calibration_windows(_WordTokenizer(), source, "validation", nsamples=0, seqlen=16, seed=0)
    with pytest.raises(DataError, match="'train' not found"):
        calibration_windows(_WordTokenizer(), source, "train", nsamples=2, seqlen=16, seed=0)
