"""mxptq.evaluate.ModelForward: the native evaluator's CUDA-graph path.

Independent expectation: the eager evaluator (itself checked against an unbatched reference and
lm-eval in tests/test_evaluate.py). On the CPU the graph path's input shapes (rows padded to the
batch size, widths padded to buckets) run eagerly, which tests the padding; on CUDA the graphs
are captured and replayed. No lm-eval needed, so these also run on the GPU machine.
"""

from __future__ import annotations

import pytest
import torch
from offline import EVAL_MODEL, EVAL_PAGES, byte_tokenizer

from mxptq.evaluate import ModelForward, token_perplexity, word_perplexity_native

PAGES = EVAL_PAGES  # window widths at max_length 48: 48 (x 10) and 18 (the short page)
tokenizer = pytest.fixture(scope="module")(byte_tokenizer)


@pytest.fixture
def model(tiny_llama):
    return tiny_llama(**EVAL_MODEL)


# -- CUDA graphs: padded shapes (CPU: the padding alone; CUDA: capture and replay) -------------


class PaddedEagerForward(ModelForward):
    """The CUDA-graph path's input shapes (batch rows padded to the batch size, widths padded to
    a bucket) with plain eager forwards, so the padding is testable on the CPU."""

    MIN_BUCKET = 8

    def __init__(self, model):
        super().__init__(model)
        self.graphs_enabled = True
        self.shapes: set[tuple[int, int]] = set()

    def __call__(self, input_ids):
        self.shapes.add(tuple(input_ids.shape))
        return self.model(input_ids=input_ids, use_cache=False).logits


def test_graph_shaped_batches_leave_word_perplexity_unchanged(model, tokenizer):
    max_length = 48
    eager = word_perplexity_native(model, tokenizer, PAGES, max_length=max_length, batch_size=1)
    word_ppl, byte_ppl = eager["word_perplexity"], eager["byte_perplexity"]
    # Window widths: 48 x 10 and 18 (the short page). Batch 1: the short window alone, padded to
    # the 24 bucket; batch 3: it shares a batch of width 48 with a full window.
    for batch_size, expected_widths in ((1, {48, 24}), (3, {48})):
        forward = PaddedEagerForward(model)
        result = word_perplexity_native(
            model, tokenizer, PAGES, max_length=max_length, batch_size=batch_size, forward=forward
        )
        assert result["word_perplexity"] == pytest.approx(word_ppl, rel=1e-5)
        assert result["byte_perplexity"] == pytest.approx(byte_ppl, rel=1e-6)
        assert {rows for rows, _ in forward.shapes} == {batch_size}  # the last batch too
        assert {width for _, width in forward.shapes} == expected_widths


def test_graph_shaped_batches_leave_token_perplexity_unchanged(model, tokenizer):
    text = "abcdefghij" * 13  # 4 windows of 32: batches of 3 + 1 (padded to 3)
    eager = token_perplexity(model, tokenizer, text, max_length=32, batch_size=3)
    forward = PaddedEagerForward(model)
    padded = token_perplexity(model, tokenizer, text, max_length=32, batch_size=3, forward=forward)
    assert padded["token_perplexity"] == pytest.approx(eager["token_perplexity"], rel=1e-6)
    assert forward.shapes == {(3, 32)}


def test_graph_batches_hold_no_more_rows_than_there_are_windows(model, tokenizer):
    forward = PaddedEagerForward(model)
    word_perplexity_native(model, tokenizer, PAGES[1:2], max_length=48, batch_size=8, forward=forward)
    assert forward.shapes == {(1, 18)}  # one window of width 18: one row, the widest bucket = 18


def test_graphs_are_off_on_the_cpu(model):
    forward = ModelForward(model, cuda_graphs=True)
    assert not forward.graphs_enabled and forward.describe() == "eager"
    assert forward.padded_shape(2, 17, 8, 48) == (2, 17)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@needs_cuda
def test_cuda_graph_replay_equals_eager(model, tokenizer):
    model = model.cuda()
    eager = word_perplexity_native(model, tokenizer, PAGES, max_length=48, batch_size=3)
    forward = ModelForward(model, cuda_graphs=True)
    graphed = word_perplexity_native(model, tokenizer, PAGES, max_length=48, batch_size=3, forward=forward)
    assert graphed["protocol"]["forward"].startswith("cuda graphs (3x48")
    assert graphed["word_perplexity"] == pytest.approx(eager["word_perplexity"], rel=1e-5)
    forward.close()


def _item_every_call(out) -> None:
    out.logits.sum().item()  # a host sync in every forward


def _sync_while_capturing(out) -> None:
    if torch.cuda.is_current_stream_capturing():  # the warmups pass; the capture itself raises
        torch.cuda.synchronize()


@needs_cuda
@pytest.mark.parametrize("host_sync", [_item_every_call, _sync_while_capturing], ids=["item", "sync-in-capture"])
def test_a_forward_that_cannot_be_captured_runs_eagerly(model, tokenizer, host_sync):
    """A host sync is not allowed while capturing: the evaluation goes on eagerly, says why, and
    leaves the CUDA RNG usable (a failed capture must not leave it in capture mode)."""
    model = model.cuda()
    inner = model.forward

    def syncing_forward(*args, **kwargs):
        out = inner(*args, **kwargs)
        host_sync(out)
        return out

    model.forward = syncing_forward
    eager = word_perplexity_native(model, tokenizer, PAGES, max_length=48, batch_size=3)
    forward = ModelForward(model, cuda_graphs=True)
    result = word_perplexity_native(model, tokenizer, PAGES, max_length=48, batch_size=3, forward=forward)
    assert result["protocol"]["forward"].startswith("eager (no CUDA graphs:")
    assert result["word_perplexity"] == pytest.approx(eager["word_perplexity"], rel=1e-6)
    torch.randn(4, device="cuda")
