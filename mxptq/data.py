"""WikiText-2 (raw, v1) text for calibration and evaluation, from a local directory or HF `datasets`.

Where the text comes from, in order:
1. the `data_dir` argument (recipe `[data] dir`, CLI `--data-dir`);
2. the environment variable `MXPTQ_DATA_DIR`;
3. Hugging Face `datasets` (`wikitext` / `wikitext-2-raw-v1` for rows, and
   `EleutherAI/wikitext_document_level` / `wikitext-2-raw-v1` for lm-eval's document pages).

A local directory holds the original files `wiki.{train,valid,test}.raw`. A split that is not
there is a `DataError` naming the split and the path looked at: we never fall back to another
split (calibrating on test by accident would make every number in a report meaningless).

Three forms of one split (see shared/data/wikitext-2-raw-v1/README.md for the counts they must
reproduce: test 4358 rows / 62 documents, validation 3760 rows / 60 documents):

* `rows(split)`: the HF `wikitext` row form - one row per line, trailing "\\n" kept,
  whitespace-only lines become "".
* `joined(split)`: "\\n\\n".join(rows) - the text GPTQ and the HF perplexity guide tokenize.
* `documents(split)`: the page form of `EleutherAI/wikitext_document_level`, which
  lm-eval-harness's `wikitext` task scores (a new page starts at every top-level heading
  " = Title = ").

`calibration_windows` cuts seeded random token windows out of the joined text (GPTQ protocol).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import torch

from mxptq.errors import DataError

Split = Literal["train", "validation", "test"]
SPLITS: tuple[str, ...] = ("train", "validation", "test")

# File names inside wikitext-2-raw-v1.zip (and our local copy).
RAW_FILE_NAMES: dict[str, str] = {
    "train": "wiki.train.raw",
    "validation": "wiki.valid.raw",
    "test": "wiki.test.raw",
}
DATA_DIR_ENV = "MXPTQ_DATA_DIR"
HF_ROWS_DATASET = ("wikitext", "wikitext-2-raw-v1")
HF_DOCUMENTS_DATASET = ("EleutherAI/wikitext_document_level", "wikitext-2-raw-v1")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"unknown WikiText split {split!r}; allowed: {', '.join(SPLITS)}")


def rows_from_raw(raw: str) -> list[str]:
    """HF `wikitext` row form of a raw file: one row per line with its "\\n"; blank lines -> ""."""
    return [line if line.strip() else "" for line in raw.splitlines(keepends=True)]


def raw_from_rows(rows: list[str]) -> str:
    """Inverse of `rows_from_raw`: the raw file writes every blank line as " \\n"."""
    return "".join(row if row else " \n" for row in rows)


def _is_top_level_heading(line: str) -> bool:
    # " = Title = " starts a page; " = = Section = = " (and deeper) does not. Collapsing
    # "= = =" / "= =" first makes section headings start with "==" so they fail the test.
    collapsed = line.replace("= = =", "===").replace("= =", "==").strip()
    return collapsed.startswith("= ") and collapsed.endswith(" =")


def documents_from_raw(raw: str) -> list[str]:
    """Page form of `EleutherAI/wikitext_document_level` (lm-eval's `wikitext` task).

    Split the raw file on "\\n"; a new page starts before every top-level heading; each page is
    its lines re-joined with "\\n"; whitespace-only pages are dropped except the last one.
    """
    pages: list[str] = []
    current: list[str] = []
    for line in raw.split("\n"):
        if _is_top_level_heading(line):
            page = "\n".join(current)
            if page.strip():
                pages.append(page)
            current = []
        current.append(line)
    pages.append("\n".join(current))
    return pages


class WikiText:
    """WikiText-2 raw v1 splits from a local directory, `$MXPTQ_DATA_DIR`, or HF `datasets`."""

    def __init__(self, data_dir: Path | str | None = None):
        if data_dir is None and os.environ.get(DATA_DIR_ENV):
            data_dir = os.environ[DATA_DIR_ENV]
        self.data_dir: Path | None = Path(data_dir).expanduser() if data_dir is not None else None
        if self.data_dir is not None and not self.data_dir.is_dir():
            raise DataError(f"WikiText data directory {self.data_dir} does not exist or is not a directory")
        self._cache: dict[tuple[str, str], object] = {}

    @property
    def source(self) -> str:
        """Where the text comes from, for reports: 'local:<dir>' or 'hf:wikitext/wikitext-2-raw-v1'."""
        if self.data_dir is not None:
            return f"local:{self.data_dir.resolve()}"
        return f"hf:{HF_ROWS_DATASET[0]}/{HF_ROWS_DATASET[1]}"

    def describe(self) -> dict:
        """JSON-able description for reports."""
        return {"name": "wikitext-2-raw-v1", "source": self.source}

    def raw_path(self, split: str) -> Path:
        """Path of the local raw file of `split` (only with a data directory)."""
        _check_split(split)
        if self.data_dir is None:
            raise DataError("no WikiText data directory is set (use --data-dir or $MXPTQ_DATA_DIR)")
        return self.data_dir / RAW_FILE_NAMES[split]

    # -- the three forms ---------------------------------------------------------------------

    def raw(self, split: str) -> str:
        """The raw file text of `split` (rebuilt from HF rows when no directory is set)."""
        _check_split(split)
        key = ("raw", split)
        if key not in self._cache:
            if self.data_dir is not None:
                text = self._read_local(split)
            else:
                text = raw_from_rows(self._hf(HF_ROWS_DATASET, split, "text"))
            if not text.strip():
                raise DataError(f"WikiText split {split!r} is empty ({self._where(split)})")
            self._cache[key] = text
        return self._cache[key]  # type: ignore[return-value]

    def rows(self, split: str) -> list[str]:
        """HF `wikitext` row form (test: 4358 rows, validation: 3760)."""
        if self.data_dir is None:
            _check_split(split)
            rows = self._hf(HF_ROWS_DATASET, split, "text")
            if not any(row.strip() for row in rows):
                raise DataError(f"WikiText split {split!r} is empty ({self._where(split)})")
            return list(rows)
        return rows_from_raw(self.raw(split))

    def joined(self, split: str, n_documents: int | None = None) -> str:
        """GPTQ / HF-perplexity-guide text: '\\n\\n'.join(rows).

        With `n_documents`, only the rows of the lines of the first `n_documents` pages (used for
        token-level perplexity under `--limit`); the result is a prefix of the full joined text.
        """
        rows = self.rows(split)
        if n_documents is not None:
            # Pages partition the raw file's lines (after blank lines before the first heading),
            # so the lines before page n are all lines minus those of pages n, n+1, ...; the raw
            # file's split("\n") has one more element than there are rows (the final "").
            remaining_lines = sum(page.count("\n") + 1 for page in self.documents(split)[n_documents:])
            rows = rows[: len(rows) + 1 - remaining_lines]
        return "\n\n".join(rows)

    def documents(self, split: str) -> list[str]:
        """lm-eval's document pages (test: 62, validation: 60), in file order."""
        if self.data_dir is None:
            _check_split(split)
            pages = self._hf(HF_DOCUMENTS_DATASET, split, "page")
            if not any(page.strip() for page in pages):
                raise DataError(f"WikiText split {split!r} is empty ({self._where(split)})")
            return list(pages)
        return documents_from_raw(self.raw(split))

    # -- helpers -----------------------------------------------------------------------------

    def _hf(self, dataset: tuple[str, str], split: str, column: str) -> list[str]:
        key = (dataset[0], split)
        if key not in self._cache:
            self._cache[key] = _load_hf(dataset, split, column)
        return self._cache[key]  # type: ignore[return-value]

    def _where(self, split: str) -> str:
        if self.data_dir is not None:
            return str(self.data_dir / RAW_FILE_NAMES[split])
        return f"HF datasets {HF_ROWS_DATASET[0]}/{HF_ROWS_DATASET[1]} split {split}"

    def _read_local(self, split: str) -> str:
        path = self.raw_path(split)
        if not path.is_file():
            present = sorted(p.name for p in self.data_dir.glob("wiki.*.raw"))  # type: ignore[union-attr]
            raise DataError(
                f"WikiText split {split!r} not found: expected {path} "
                f"(files present: {', '.join(present) or 'none'}); splits are never substituted"
            )
        # newline="" keeps the file's line endings exactly as stored (LF in the original zip).
        with path.open(encoding="utf-8", newline="") as fh:
            return fh.read()


def _load_hf(dataset: tuple[str, str], split: str, column: str) -> list[str]:
    try:
        import datasets  # lazy: only users without a local copy need it
    except ImportError as exc:
        raise DataError(
            f"no WikiText data directory set and Hugging Face `datasets` is not installed "
            f"(needed for split {split!r}); pass --data-dir or set ${DATA_DIR_ENV}"
        ) from exc
    try:
        ds = datasets.load_dataset(dataset[0], dataset[1], split=split)
    except Exception as exc:  # network, missing split, offline cache miss: all user-fixable
        raise DataError(
            f"could not load split {split!r} of HF dataset {dataset[0]}/{dataset[1]}: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
            f"(pass --data-dir or set ${DATA_DIR_ENV} to use local wiki.*.raw files)"
        ) from exc
    return list(ds[column])


# -- tokenization shared by calibration and token-level perplexity -----------------------------


def tokenize_joined(tokenizer, text: str) -> torch.Tensor:
    """Token ids of a joined text as a 1-D LongTensor, tokenized the way GPTQ's `get_wikitext2`
    does: `tokenizer(text)` with the tokenizer's default special tokens (so a BOS appears only at
    the very start, and only for tokenizers that add one)."""
    if not text.strip():
        raise DataError("cannot tokenize an empty text")
    # verbose=False: the whole split is far longer than model_max_length, which is intended here.
    ids = tokenizer(text, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def calibration_windows(
    tokenizer,
    source: WikiText,
    split: str = "validation",
    nsamples: int = 128,
    seqlen: int = 2048,
    seed: int = 0,
) -> torch.Tensor:
    """Seeded random calibration windows, GPTQ protocol: LongTensor[nsamples, seqlen].

    Protocol (GPTQ `datautils.get_wikitext2`, Frantar et al. 2022): tokenize
    `source.joined(split)` once (see `tokenize_joined`), then draw `nsamples` start offsets
    uniformly from [0, n_tokens - seqlen - 1] (GPTQ's `random.randint(0, n - seqlen - 1)`) and
    take `seqlen` consecutive tokens from each. Windows
    may overlap; no BOS is inserted. Offsets come from `torch.Generator().manual_seed(seed)`,
    so the same (tokenizer, text, split, nsamples, seqlen, seed) always gives the same tensor.
    """
    for name, value in (("nsamples", nsamples), ("seqlen", seqlen)):
        if not isinstance(value, int) or value < 1:
            raise DataError(f"calibration {name} must be a positive integer, got {value!r}")
    tokens = tokenize_joined(tokenizer, source.joined(split))
    n_tokens = int(tokens.numel())
    if n_tokens < seqlen + 1:
        raise DataError(
            f"calibration split {split!r} has {n_tokens} tokens, fewer than seqlen + 1 = {seqlen + 1}"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, n_tokens - seqlen, (nsamples,), generator=generator)
    offsets = starts[:, None] + torch.arange(seqlen)[None, :]
    return tokens[offsets]
