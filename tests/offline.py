"""Offline test helpers shared by several test modules (imported as `from offline import ...`;
pytest puts tests/ on sys.path): where the local WikiText-2 files are, and a byte-level tokenizer
built without any download."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest


def find_data_dir() -> Path | None:
    """$MXPTQ_DATA_DIR, else a `shared/data/wikitext-2-raw-v1` beside any parent of this file."""
    candidates = [os.environ.get("MXPTQ_DATA_DIR")]
    candidates += [str(p / "shared" / "data" / "wikitext-2-raw-v1") for p in Path(__file__).resolve().parents]
    for candidate in candidates:
        if candidate and (Path(candidate) / "wiki.test.raw").is_file():
            return Path(candidate)
    return None


DATA_DIR = find_data_dir()
needs_data = pytest.mark.skipif(DATA_DIR is None, reason="local WikiText-2 raw files not found (set MXPTQ_DATA_DIR)")


def byte_tokenizer():
    """An offline byte-level tokenizer: 256 byte tokens + <s> (256) + </s> (257)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update({"<s>": 256, "</s>": 257})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")


# The tiny Llama every model test builds (tests/conftest.py: make_tiny_llama).
TINY_LLAMA_CONFIG: dict[str, Any] = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "intermediate_size": 128,
    "vocab_size": 256,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
}

# A tiny Llama for the evaluator tests (vocabulary = the byte tokenizer's 256 bytes + 2 specials).
EVAL_MODEL = {"seed": 0, "vocab_size": 258, "max_position_embeddings": 512}

# Short pages in the WikiText style (so the detokenizer has work), of different lengths so that
# windows of several lengths share a padded batch.
EVAL_PAGES = [
    ' = Alpha = \n \n The 1 @,@ 000 @-@ year test ( of a , b ) is " quoted " . \n',
    " = Beta = \n \n Short . \n",
    " = Gamma = \n \n " + " ".join(f"word{i} ," for i in range(40)) + " end . \n = = Section = = \n x \n",
]
