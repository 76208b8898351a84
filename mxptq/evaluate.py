"""Perplexity: lm-eval-harness's `wikitext` task (run by lm-eval itself, or natively with the same
protocol), token-level perplexity on the joined text, and calibration-window perplexity.

The `wikitext` protocol (lm-eval-harness, `lm_eval/tasks/wikitext/`, task version 2.0):

1. the documents are the pages of `EleutherAI/wikitext_document_level` (62 in the test split);
2. each page goes through the task's `wikitext_detokenizer` and is tokenized as HFLM does
   (`tokenizer.encode(text)` with the tokenizer's default special tokens);
3. HFLM's `loglikelihood_rolling`: `get_rolling_token_windows(tokens, prefix_token,
   max_length, context_len=1)` + `make_disjoint_window`, where the prefix token is BOS (EOS when
   the tokenizer has no BOS); every token is predicted exactly once, the first one from the
   prefix token alone, each window holds at most `max_length` input tokens;
4. `process_results`: IMPORTANT - words and bytes are counted on the *original* page, before
   detokenization (`len(re.split(r"\\s+", page))`, `len(page.encode("utf-8"))`);
5. aggregation: word_perplexity = exp(-sum ll / sum words), byte_perplexity =
   exp(-sum ll / sum bytes), bits_per_byte = -sum ll / sum bytes / ln 2.

Where lm-eval is installed, the native evaluator imports its detokenizer, rolling-window and
`process_results` functions instead of re-implementing them; the fallbacks below are used only
without lm-eval (tests check they agree). The native evaluator differs from lm-eval in one
documented way: it always takes the log-softmax in float32 (lm-eval takes it in the model's
dtype, so a float16 model's window sums are rounded); on float32 models the two agree to ~1e-6.
"""

from __future__ import annotations

import copy
import importlib.metadata
import math
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

from mxptq.data import WikiText, tokenize_joined
from mxptq.errors import DataError

TASK_NAME = "wikitext"
# "both": the native evaluator's numbers are the metrics; lm-eval's are recorded beside them with
# their relative difference (issue 5: "the report records both").
BACKENDS = ("native", "lm-eval", "both")
LOG_SOFTMAX_DTYPE = torch.float32
# DESIGN.md "Evaluation": the native evaluator must match lm-eval to a relative difference <= 1e-4
# (on float32 models; lm-eval rounds a float16 model's log-softmax, see the module docstring).
AGREEMENT_TOLERANCE = 1e-4
LM_EVAL_METRICS = ("word_perplexity", "byte_perplexity", "bits_per_byte")


# ---------------------------------------------------------------------------------------------
# Protocol pieces: lm-eval's own functions when importable, our fallbacks otherwise.
# ---------------------------------------------------------------------------------------------

# The `wikitext` task's detokenizer as data: (kind, pattern, replacement) applied in order.
# Source: lm-eval-harness lm_eval/tasks/wikitext/preprocess_wikitext.py (behaviour reproduced;
# the odd "/' [0-9]/" rule is a regex that matches a literal "/' <digit>/" and is kept as is).
_DETOKENIZER_RULES: tuple[tuple[str, str, str], ...] = (
    ("str", "s '", "s'"),
    ("re", r"/' [0-9]/", r"/'[0-9]/"),
    ("str", " @-@ ", "-"),
    ("str", " @,@ ", ","),
    ("str", " @.@ ", "."),
    ("str", " : ", ": "),
    ("str", " ; ", "; "),
    ("str", " . ", ". "),
    ("str", " ! ", "! "),
    ("str", " ? ", "? "),
    ("str", " , ", ", "),
    ("re", r"\(\s*([^\)]*?)\s*\)", r"(\1)"),
    ("re", r"\[\s*([^\]]*?)\s*\]", r"[\1]"),
    ("re", r"{\s*([^}]*?)\s*}", r"{\1}"),
    ("re", r"\"\s*([^\"]*?)\s*\"", r'"\1"'),
    ("re", r"'\s*([^']*?)\s*'", r"'\1'"),
    ("str", "= = = =", "===="),
    ("str", "= = =", "==="),
    ("str", "= =", "=="),
    ("str", " \N{DEGREE SIGN} ", "\N{DEGREE SIGN}"),
    ("str", " \n", "\n"),
    ("str", "\n ", "\n"),
    ("str", " N ", " 1 "),
    ("str", " 's", "'s"),
)


def fallback_wikitext_detokenizer(doc: dict) -> str:
    """The `wikitext` task's detokenizer, for environments without lm-eval."""
    text = doc["page"]
    for kind, pattern, replacement in _DETOKENIZER_RULES:
        text = re.sub(pattern, replacement, text) if kind == "re" else text.replace(pattern, replacement)
    return text


def fallback_rolling_token_windows(
    token_list: Sequence[int], prefix_token: int, max_seq_len: int, context_len: int
) -> Iterator[tuple[list[int], list[int]]]:
    """(input_tokens, predicted_tokens) windows with lm-eval's `get_rolling_token_windows` contract.

    Let seq = [prefix] + tokens, so seq[i] is the last input token when predicting tokens[i].
    The first window predicts tokens[0:min(L, n)]; every later one predicts the next
    L - context_len + 1 tokens. A window predicting tokens[start:end] reads seq[max(0, end-L):end].
    """
    if not 1 <= context_len <= max_seq_len:
        raise ValueError(f"need 1 <= context_len <= max_seq_len, got {context_len}, {max_seq_len}")
    tokens = list(token_list)
    seq = [prefix_token, *tokens]
    stride = max_seq_len - context_len + 1
    start, end = 0, min(max_seq_len, len(tokens))
    while start < len(tokens):
        yield seq[max(0, end - max_seq_len) : end], tokens[start:end]
        start, end = end, min(end + stride, len(tokens))


def fallback_make_disjoint_window(pair: tuple[list[int], list[int]]) -> tuple[list[int], list[int]]:
    """Drop from the input the tokens that are also predicted: (context, continuation)."""
    inputs, predicted = pair
    return inputs[: len(inputs) - len(predicted) + 1], predicted


def fallback_process_results(doc: dict, results: Sequence[float]) -> dict[str, tuple[float, int]]:
    """The `wikitext` task's per-document metric items (IMPORTANT: counts on the original page)."""
    (loglikelihood,) = results
    words = len(re.split(r"\s+", doc["page"]))
    n_bytes = len(doc["page"].encode("utf-8"))
    return {
        "word_perplexity": (loglikelihood, words),
        "byte_perplexity": (loglikelihood, n_bytes),
        "bits_per_byte": (loglikelihood, n_bytes),
    }


class Protocol:
    """The functions that define the `wikitext` protocol, and where they came from."""

    def __init__(self, prefer_lm_eval: bool = True):
        self.detokenizer: Callable[[dict], str] = fallback_wikitext_detokenizer
        self.rolling_windows = fallback_rolling_token_windows
        self.make_disjoint = fallback_make_disjoint_window
        self.process_results = fallback_process_results
        self.source = "mxptq-fallback"
        if prefer_lm_eval:
            try:
                from lm_eval.tasks.wikitext import preprocess_wikitext
                from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
            except ImportError:
                return
            self.detokenizer = preprocess_wikitext.wikitext_detokenizer
            self.rolling_windows = get_rolling_token_windows
            self.make_disjoint = make_disjoint_window
            self.process_results = preprocess_wikitext.process_results
            self.source = "lm_eval"

    def describe(self) -> dict[str, str]:
        if self.source == "lm_eval":
            return {
                "detokenizer": "lm_eval.tasks.wikitext.preprocess_wikitext.wikitext_detokenizer",
                "windows": "lm_eval.utils.get_rolling_token_windows(context_len=1) + make_disjoint_window",
            }
        return {
            "detokenizer": "mxptq.evaluate.fallback_wikitext_detokenizer (lm-eval not installed)",
            "windows": "mxptq.evaluate.fallback_rolling_token_windows(context_len=1) (lm-eval not installed)",
        }


def lm_eval_version() -> str | None:
    try:
        return importlib.metadata.version("lm_eval")
    except importlib.metadata.PackageNotFoundError:
        return None


def prefix_token_id(tokenizer) -> int:
    """HFLM's prefix token: BOS, or EOS when the tokenizer has no BOS."""
    if tokenizer.bos_token_id is not None:
        return tokenizer.bos_token_id
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id
    raise DataError("the tokenizer has neither a BOS nor an EOS token to use as the rolling-window prefix")


def encode_like_hflm(tokenizer, text: str, prefix_token: int) -> list[int]:
    """HFLM.tok_encode with add_bos_token unset: the tokenizer's default special tokens, except
    none when the text already starts with the prefix token's string."""
    prefix_text = tokenizer.decode(prefix_token)
    kwargs = {"add_special_tokens": False} if prefix_text and text.startswith(prefix_text) else {}
    return tokenizer.encode(text, verbose=False, **kwargs)


# ---------------------------------------------------------------------------------------------
# Checks and small helpers
# ---------------------------------------------------------------------------------------------


def model_context_length(model) -> int | None:
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    for attr in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, attr, None)
        if value is not None:
            return int(value)
    return None


def check_max_length(model, max_length: int) -> None:
    if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 2:
        raise DataError(f"eval max_length must be an integer >= 2, got {max_length!r}")
    context = model_context_length(model)
    if context is not None and max_length > context:
        raise DataError(
            f"eval max_length {max_length} is larger than the model's context "
            f"(config.max_position_embeddings = {context}); use max_length <= {context}"
        )


def _check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise DataError(f"eval batch_size must be a positive integer, got {batch_size!r}")


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def _model_dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype


def _track(iterable: Iterable, description: str, total: int | None) -> Iterable:
    try:
        from mxptq.progress import track
    except ImportError:  # the progress helper is optional for library use
        return iterable
    return track(iterable, description, total=total)


def _metrics_from_items(items: list[dict[str, tuple[float, int]]]) -> dict[str, float]:
    """lm-eval's aggregations: weighted_perplexity and bits_per_byte over per-document items."""
    total_ll = math.fsum(item["word_perplexity"][0] for item in items)
    words = sum(item["word_perplexity"][1] for item in items)
    n_bytes = sum(item["byte_perplexity"][1] for item in items)
    return {
        "word_perplexity": math.exp(-total_ll / words),
        "byte_perplexity": math.exp(-total_ll / n_bytes),
        "bits_per_byte": -total_ll / n_bytes / math.log(2),
        "loglikelihood": total_ll,
        "n_words": words,
        "n_bytes": n_bytes,
    }


# ---------------------------------------------------------------------------------------------
# Native evaluator
# ---------------------------------------------------------------------------------------------


class ModelForward:
    """`logits = model(input_ids)` for the evaluators: eager, or replayed from CUDA graphs.

    Why graphs: a small model's evaluation is bound by host time - at batch 1 the demo model's
    fp16 forward takes ~31 ms of host time for ~5.5 ms of GPU work (H100,
    benchmarks/h100/profile_forward.md), and a quantized model launches more kernels. A CUDA graph replays the whole
    forward with one launch. One graph per padded input shape: rows are padded to the batch
    size and the width to a bucket (`max_width`, `max_width / 2`, ... down to 128), so a whole
    evaluation captures a handful of graphs. Padding is right padding, which a causal model's
    logits at real positions cannot see (the eager path pads batches the same way).

    Graphs are used only on CUDA and only while the model does not change: one ModelForward per
    evaluation. Memory: every captured shape keeps its logits and the graphs share one pool until
    `close()`, so an evaluation peaks higher than eagerly. If capture fails (a model whose forward synchronizes with the host), the run
    continues eagerly and `describe()` says why.
    """

    MIN_BUCKET = 128

    def __init__(self, model, cuda_graphs: bool = False) -> None:
        self.model = model
        self.device = _model_device(model)
        self.graphs_enabled = bool(cuda_graphs) and self.device.type == "cuda"
        self._graphs: dict[tuple[int, int], tuple[torch.Tensor, Any, torch.Tensor]] = {}
        self._pool = None
        self._side_stream = None  # one for every warmup: the allocator reuses memory per stream
        self._failure: str | None = None

    def padded_shape(self, rows: int, width: int, batch_size: int, max_width: int) -> tuple[int, int]:
        """The input shape a batch of `rows` x `width` tokens is padded to."""
        if not self.graphs_enabled:
            return rows, width
        bucket = max_width
        while bucket // 2 >= max(width, self.MIN_BUCKET):
            bucket //= 2
        return batch_size, bucket

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.graphs_enabled:
            entry = self._graphs.get(tuple(input_ids.shape))
            if entry is None:
                entry = self._capture(input_ids)
            if entry is not None:
                static_ids, graph, static_logits = entry
                with torch.cuda.device(self.device):  # replay on the device it was captured on
                    static_ids.copy_(input_ids)
                    graph.replay()
                return static_logits  # overwritten by the next replay: callers use it first
        return self.model(input_ids=input_ids, use_cache=False).logits

    def _capture(self, input_ids: torch.Tensor):
        """Warm up on a side stream, then capture one forward (torch.cuda.graphs' recipe); if the
        forward cannot be captured (it synchronizes with the host: `.item()`, a blocking copy),
        switch graphs off for the rest of this evaluation. A failed capture can leave the CUDA
        RNG in capture mode; `_recover_from_failed_capture` undoes that. (CUDA's sync debug
        mode is no pre-check: it also flags HF Llama's forward, which captures fine.)"""
        static_ids = input_ids.clone()
        graph = None
        self._clear_input_cache()  # no quantized input held from an eager call may be captured
        # The model's device, not the current one: torch.cuda.graph captures on a stream of the
        # current device (a recipe may put the model on cuda:N).
        with torch.cuda.device(self.device):
            try:
                if self._side_stream is None:
                    self._side_stream = torch.cuda.Stream(self.device)
                side = self._side_stream
                side.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(side):
                    for _ in range(2):  # compiles kernels, builds lazy state (rotation plans, caches)
                        self.model(input_ids=static_ids, use_cache=False)
                torch.cuda.current_stream(self.device).wait_stream(side)
                if self._pool is None:
                    self._pool = torch.cuda.graph_pool_handle()
                graph = torch.cuda.CUDAGraph()
                # Graphs share one memory pool: they never run concurrently, and each replay's
                # logits are consumed before the next replay.
                with torch.cuda.graph(graph, pool=self._pool):
                    static_logits = self.model(input_ids=static_ids, use_cache=False).logits
            except RuntimeError as err:  # not capturable: stay eager
                if graph is not None:
                    _recover_from_failed_capture()
                self.graphs_enabled = False
                self._graphs.clear()
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                self._failure = first[:200]
                return None
        entry = (static_ids, graph, static_logits)
        self._graphs[tuple(input_ids.shape)] = entry
        return entry

    def describe(self) -> str:
        if self.graphs_enabled:
            shapes = ", ".join(f"{r}x{w}" for r, w in sorted(self._graphs))
            return f"cuda graphs ({shapes})" if shapes else "cuda graphs"
        if self._failure is not None:
            return f"eager (no CUDA graphs: {self._failure})"
        return "eager"

    def close(self) -> None:
        """Free the graphs, their memory pool and what the model's quantized-input cache still
        holds from the capture (a tensor in that pool)."""
        had_graphs = bool(self._graphs)
        self._graphs.clear()
        self._pool = None
        self._side_stream = None
        self._clear_input_cache()
        if had_graphs:
            torch.cuda.empty_cache()  # hand the graphs' pool back for the stages that follow

    def _clear_input_cache(self) -> None:
        cache = getattr(self.model, "mxptq_input_cache", None)  # set by the transform stage
        if cache is not None:
            cache.clear()


def _recover_from_failed_capture() -> None:
    """After a capture that raised, the CUDA RNG may still be registered as capturing (torch
    unregisters it only when a capture ends cleanly) and the next `torch.randn` on the device
    fails. One empty capture that ends cleanly (on the current device: the caller's) resets it."""
    try:
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            pass
    except RuntimeError:  # pragma: no cover - nothing more to do; the evaluation itself is eager
        pass


def _rolling_inputs(
    tokens: list[int], prefix: int, max_length: int, protocol: Protocol
) -> list[tuple[list[int], int]]:
    """HFLM's windows as (sequence, n_scored): the model reads sequence[:-1] and the last n_scored
    positions are scored against sequence[1:] (HFLM: inp = (ctx + cont)[-(max_length+1):][:-1])."""
    windows = []
    for context, continuation in map(
        protocol.make_disjoint, protocol.rolling_windows(tokens, prefix, max_length, 1)
    ):
        windows.append(((context + continuation)[-(max_length + 1) :], len(continuation)))
    return windows


@torch.inference_mode()
def _score_windows(
    forward: ModelForward, windows: list[tuple[list[int], int]], batch_size: int, description: str
) -> torch.Tensor:
    """Sum of log-probabilities of the scored tokens of each window: float64 [n_windows].

    Windows are sorted longest first and right-padded into batches (one forward per batch, no
    attention mask: with causal attention, padding after a row's last token cannot change its
    logits - lm-eval batches the same way; with CUDA graphs batches are padded further, to the
    graph's shape). The log-softmax is taken in float32 on the scored positions only; results
    stay on the device until the end (no sync per window).
    """
    device = forward.device
    order = sorted(range(len(windows)), key=lambda i: -len(windows[i][0]))
    sums = torch.zeros(len(windows), dtype=torch.float64, device=device)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    max_width = len(windows[order[0]][0]) - 1 if order else 0
    max_rows = min(batch_size, len(windows))  # a graph's batch: no rows beyond the windows there are
    for batch in _track(batches, description, total=len(batches)):
        n_rows, width = forward.padded_shape(len(batch), len(windows[batch[0]][0]) - 1, max_rows, max_width)
        inputs = torch.zeros((n_rows, width), dtype=torch.long)
        targets = torch.zeros((len(batch), width), dtype=torch.long)
        for row, index in enumerate(batch):
            sequence = torch.tensor(windows[index][0])
            inputs[row, : len(sequence) - 1] = sequence[:-1]
            targets[row, : len(sequence) - 1] = sequence[1:]
        targets = targets.to(device)
        logits = forward(inputs.to(device))
        for row, index in enumerate(batch):
            n_inputs = len(windows[index][0]) - 1
            scored = slice(n_inputs - windows[index][1], n_inputs)
            # cross_entropy = -log_softmax(logits)[target], computed in float32.
            nll = F.cross_entropy(
                logits[row, scored].to(LOG_SOFTMAX_DTYPE), targets[row, scored], reduction="sum"
            )
            sums[index] = -nll.to(torch.float64)
    return sums.cpu()


def word_perplexity_native(
    model,
    tokenizer,
    docs: Sequence[str],
    max_length: int = 2048,
    batch_size: int = 8,
    *,
    protocol: Protocol | None = None,
    forward: ModelForward | None = None,
) -> dict[str, Any]:
    """lm-eval `wikitext` word/byte perplexity and bits per byte of `docs` (original pages).
    `forward`: how to run the model (default eager; see ModelForward for CUDA graphs)."""
    check_max_length(model, max_length)
    _check_batch_size(batch_size)
    if not docs:
        raise DataError("no documents to evaluate (empty split or limit 0)")
    if not any(page.strip() for page in docs):
        raise DataError("every document to evaluate is empty")
    protocol = protocol or Protocol()
    prefix = prefix_token_id(tokenizer)

    windows: list[tuple[list[int], int]] = []
    window_doc: list[int] = []
    n_tokens = 0
    for doc_index, page in enumerate(docs):
        tokens = encode_like_hflm(tokenizer, protocol.detokenizer({"page": page}), prefix)
        n_tokens += len(tokens)
        doc_windows = _rolling_inputs(tokens, prefix, max_length, protocol)
        windows.extend(doc_windows)
        window_doc.extend([doc_index] * len(doc_windows))

    forward = forward or ModelForward(model)
    window_ll = _score_windows(forward, windows, batch_size, "wikitext word perplexity")
    doc_ll = torch.zeros(len(docs), dtype=torch.float64).index_add_(
        0, torch.tensor(window_doc, dtype=torch.long), window_ll
    )
    items = [protocol.process_results({"page": page}, [float(ll)]) for page, ll in zip(docs, doc_ll.tolist())]
    metrics = _metrics_from_items(items)
    return {
        **{k: metrics[k] for k in ("word_perplexity", "byte_perplexity", "bits_per_byte")},
        "loglikelihood": metrics["loglikelihood"],
        "n_documents": len(docs),
        "n_tokens": n_tokens,
        "n_words": metrics["n_words"],
        "n_bytes": metrics["n_bytes"],
        "protocol": {
            "task": TASK_NAME,
            "max_length": max_length,
            **protocol.describe(),
            "prefix_token_id": prefix,
            "n_windows": len(windows),
            "dtype": str(_model_dtype(model)).removeprefix("torch."),
            "log_softmax_dtype": str(LOG_SOFTMAX_DTYPE).removeprefix("torch."),
            "forward": forward.describe(),
            "backend": "native",
            "lm_eval_version": lm_eval_version(),
        },
    }


# ---------------------------------------------------------------------------------------------
# Token-level perplexity (second metric) and calibration perplexity
# ---------------------------------------------------------------------------------------------


@torch.inference_mode()
def _sum_nll_full_windows(
    forward: ModelForward, windows: torch.Tensor, batch_size: int, description: str
) -> tuple[float, int]:
    """Sum of next-token NLL over every window position 1..S-1 (float32 log-softmax), and the count."""
    device = forward.device
    total = torch.zeros((), dtype=torch.float64, device=device)
    starts = range(0, windows.shape[0], batch_size)
    width = windows.shape[1]
    for start in _track(starts, description, total=len(starts)):
        batch = windows[start : start + batch_size].to(device)
        n_rows, _ = forward.padded_shape(batch.shape[0], width, min(batch_size, windows.shape[0]), width)
        if n_rows > batch.shape[0]:  # a CUDA graph's fixed batch: pad with rows nobody reads
            batch = torch.cat([batch, batch.new_zeros(n_rows - batch.shape[0], width)])
        logits = forward(batch)
        for row in range(min(batch.shape[0], windows.shape[0] - start)):
            nll = F.cross_entropy(logits[row, :-1].to(LOG_SOFTMAX_DTYPE), batch[row, 1:], reduction="sum")
            total += nll.to(torch.float64)
    return float(total), windows.shape[0] * (windows.shape[1] - 1)


def token_perplexity(
    model, tokenizer, text: str, max_length: int = 2048, batch_size: int = 8,
    forward: ModelForward | None = None,
) -> dict[str, Any]:
    """Token-level perplexity of a joined text with non-overlapping `max_length` windows.

    GPTQ's wikitext2 protocol: tokenize the whole joined text once, cut it into
    n = n_tokens // max_length windows (the tail is dropped), score positions 1..L-1 of each
    window (each window starts without context), ppl = exp(mean NLL).
    """
    check_max_length(model, max_length)
    _check_batch_size(batch_size)
    tokens = tokenize_joined(tokenizer, text)
    n_windows = tokens.numel() // max_length
    if n_windows == 0:
        raise DataError(f"text has {tokens.numel()} tokens, fewer than one window of max_length {max_length}")
    windows = tokens[: n_windows * max_length].view(n_windows, max_length)
    total_nll, count = _sum_nll_full_windows(forward or ModelForward(model), windows, batch_size, "token perplexity")
    return {
        "token_perplexity": math.exp(total_nll / count),
        "n_windows": n_windows,
        "n_tokens": count,
        "protocol": {
            "windows": f"non-overlapping {max_length}-token windows of the joined text (GPTQ)",
            "max_length": max_length,
            "log_softmax_dtype": str(LOG_SOFTMAX_DTYPE).removeprefix("torch."),
        },
    }


def calib_perplexity(model, windows: torch.Tensor, batch_size: int = 8) -> float:
    """Token perplexity over calibration windows LongTensor[n, seqlen] (rotation search's score)."""
    if windows.ndim != 2 or windows.shape[1] < 2 or windows.shape[0] < 1:
        raise DataError(
            f"calibration windows must be LongTensor[n >= 1, seqlen >= 2], got {tuple(windows.shape)}"
        )
    _check_batch_size(batch_size)
    # Eager: rotation search changes the model between calls, so a captured graph would go stale.
    total_nll, count = _sum_nll_full_windows(ModelForward(model), windows, batch_size, "calibration perplexity")
    return math.exp(total_nll / count)


# ---------------------------------------------------------------------------------------------
# lm-eval-harness itself
# ---------------------------------------------------------------------------------------------


def _lm_eval_wikitext_config() -> dict[str, Any]:
    """lm-eval's own `wikitext` task config (its YAML, `!function`s resolved to its functions)."""
    from pathlib import Path

    import lm_eval.tasks

    yaml_path = Path(lm_eval.tasks.__file__).parent / "wikitext" / "wikitext.yaml"
    try:
        from lm_eval.tasks._yaml_loader import load_yaml  # lm-eval >= 0.4.10
    except ImportError:  # older lm-eval
        from lm_eval.utils import load_yaml_config

        return load_yaml_config(yaml_path=str(yaml_path))
    return load_yaml(yaml_path, resolve_func=True)


def local_wikitext_task_config(pages: Sequence[str], split: str) -> dict[str, Any]:
    """lm-eval's `wikitext` task config with its dataset replaced by in-memory `pages`.

    Everything that defines the metric (output type, detokenizer, process_results, metric list,
    version) is lm-eval's own; only where the documents come from changes, so no network is
    needed: `custom_dataset` returns a DatasetDict holding the pages under `split`.
    """
    import datasets

    config = dict(_lm_eval_wikitext_config())
    page_list = list(pages)

    def load_local_pages(**_metadata) -> datasets.DatasetDict:
        return datasets.DatasetDict({split: datasets.Dataset.from_dict({"page": page_list})})

    config.update(
        custom_dataset=load_local_pages,
        training_split=None,  # no few-shot / training docs for a perplexity task
        validation_split=None,
        test_split=split,
    )
    metadata = dict(config.get("metadata") or {})
    metadata["mxptq_data"] = f"in-memory pages of wikitext-2-raw-v1 split {split!r}"
    config["metadata"] = metadata
    return config


@contextmanager
def _tie_weights_disabled(model) -> Iterator[None]:
    # HFLM.__init__ calls model.tie_weights(); on a tied-embedding model whose lm_head was
    # replaced by an MX module that would put the float embedding back into the head.
    had_attr = "tie_weights" in vars(model)
    original = vars(model).get("tie_weights")
    model.tie_weights = lambda *args, **kwargs: None
    try:
        yield
    finally:
        if had_attr:
            model.tie_weights = original
        else:
            del model.tie_weights


def evaluate_lm_eval(
    model,
    tokenizer,
    data: WikiText,
    split: str = "test",
    max_length: int = 2048,
    batch_size: int = 8,
    limit: int | None = None,
) -> dict[str, Any]:
    """Run lm-eval-harness's `wikitext` task (lm_eval.simple_evaluate + HFLM on the in-memory
    model) on the pages of `data` - local files when a data directory is set, HF datasets'
    `EleutherAI/wikitext_document_level` otherwise. Returns the same dict as the native evaluator."""
    check_max_length(model, max_length)
    _check_batch_size(batch_size)
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise DataError(
            "eval backend 'lm-eval' needs the lm-eval package (pip install lm-eval); or use backend 'native'"
        ) from exc
    pages = data.documents(split)
    if limit is not None:
        if limit < 1:
            raise DataError(f"eval limit must be a positive number of documents, got {limit}")
        pages = pages[:limit]

    config = local_wikitext_task_config(pages, split)
    with _tie_weights_disabled(model):
        # A copy: HFLM may set a pad token on the tokenizer it is given.
        lm = HFLM(
            pretrained=model,
            tokenizer=copy.deepcopy(tokenizer),
            backend="causal",
            max_length=max_length,
            batch_size=batch_size,
        )
    output = lm_eval.simple_evaluate(
        model=lm,
        tasks=[config],
        task_manager=TaskManager(include_defaults=False),
        bootstrap_iters=0,
        log_samples=False,
    )
    task_results = output["results"][config["task"]]
    metrics = {
        name: float(task_results[f"{name},none"])
        for name in ("word_perplexity", "byte_perplexity", "bits_per_byte")
    }

    protocol = Protocol()
    prefix = prefix_token_id(tokenizer)
    n_tokens = sum(len(encode_like_hflm(tokenizer, protocol.detokenizer({"page": p}), prefix)) for p in pages)
    return {
        **metrics,
        "n_documents": len(pages),
        "n_tokens": n_tokens,
        "protocol": {
            "task": TASK_NAME,
            "task_version": (config.get("metadata") or {}).get("version"),
            "max_length": max_length,
            "detokenizer": "lm_eval.tasks.wikitext.preprocess_wikitext.wikitext_detokenizer",
            "windows": "lm_eval HFLM.loglikelihood_rolling",
            "prefix_token_id": prefix,
            "dtype": str(_model_dtype(model)).removeprefix("torch."),
            "log_softmax_dtype": "model dtype (lm-eval HFLM default)",
            "backend": "lm-eval",
            "lm_eval_version": lm_eval_version(),
            "data": data.source,
        },
    }


# ---------------------------------------------------------------------------------------------
# One entry point for the CLI
# ---------------------------------------------------------------------------------------------


def evaluate_wikitext(
    model,
    tokenizer,
    data: WikiText,
    *,
    split: str = "test",
    max_length: int = 2048,
    batch_size: int = 8,
    limit: int | None = None,
    backend: str = "native",
    token_level: bool = True,
    cuda_graphs: bool = False,
) -> dict[str, Any]:
    """Word perplexity (lm-eval `wikitext` protocol) by `backend`, plus token-level perplexity of
    the joined split when `token_level`. Returns the report's metrics dict.

    backend: "native" (mxptq's evaluator), "lm-eval" (lm-eval-harness itself), or "both": the
    native numbers are the metrics, lm-eval's word/byte perplexity and bits per byte go under
    "lm_eval" (with their protocol), and "agreement" holds the relative differences
    (`<metric>_rel_diff`, relative to lm-eval), the tolerance and whether word perplexity is
    within it. "both" costs two full evaluations."""
    if backend not in BACKENDS:
        raise DataError(f"unknown eval backend {backend!r}; allowed: {', '.join(BACKENDS)}")
    check_max_length(model, max_length)
    if backend == "lm-eval":
        result = evaluate_lm_eval(model, tokenizer, data, split, max_length, batch_size, limit)
    else:
        pages = data.documents(split)
        if limit is not None:
            if limit < 1:
                raise DataError(f"eval limit must be a positive number of documents, got {limit}")
            pages = pages[:limit]
        forward = ModelForward(model, cuda_graphs)
        try:
            result = word_perplexity_native(model, tokenizer, pages, max_length, batch_size, forward=forward)
            if token_level:
                token = _token_level(model, tokenizer, data, split, limit, max_length, batch_size, forward)
                token["forward"] = forward.describe()
            result["protocol"]["forward"] = forward.describe()  # word and token passes
        finally:
            forward.close()
        result["protocol"]["data"] = data.source
    if backend == "both":
        reference = evaluate_lm_eval(model, tokenizer, data, split, max_length, batch_size, limit)
        result["lm_eval"] = {
            **{name: reference[name] for name in LM_EVAL_METRICS},
            "n_documents": reference["n_documents"],
            "n_tokens": reference["n_tokens"],
            "protocol": reference["protocol"],
        }
        result["agreement"] = backend_agreement(result, reference)
    result["protocol"]["split"] = split
    result["protocol"]["limit"] = limit
    if token_level:
        if backend == "lm-eval":
            token = _token_level(model, tokenizer, data, split, limit, max_length, batch_size, ModelForward(model))
        result["token_perplexity"] = token.pop("token_perplexity")
        result["protocol"]["token_perplexity"] = token
    return result


def _token_level(model, tokenizer, data: WikiText, split: str, limit: int | None, max_length: int,
                 batch_size: int, forward: ModelForward) -> dict[str, Any]:
    """Token perplexity of the joined split for the report: {"token_perplexity", **protocol}.
    Under --limit, on the joined rows of the same first `limit` documents."""
    text = data.joined(split, n_documents=limit)
    if limit is not None and len(tokenize_joined(tokenizer, text)) < max_length:
        return {"token_perplexity": None,
                "skipped": f"the first {limit} documents hold fewer than max_length={max_length} tokens"}
    token = token_perplexity(model, tokenizer, text, max_length, batch_size, forward=forward)
    return {"token_perplexity": token["token_perplexity"], **token["protocol"], "n_windows": token["n_windows"]}


def backend_agreement(native: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    """Relative differences |native - lm-eval| / lm-eval of the three lm-eval metrics, and whether
    word perplexity is within DESIGN.md's tolerance."""
    agreement: dict[str, Any] = {
        f"{name}_rel_diff": abs(native[name] - reference[name]) / abs(reference[name])
        for name in LM_EVAL_METRICS
    }
    agreement["tolerance"] = AGREEMENT_TOLERANCE
    agreement["within_tolerance"] = agreement["word_perplexity_rel_diff"] <= AGREEMENT_TOLERANCE
    dtype = native["protocol"]["dtype"]
    if dtype != "float32":
        agreement["note"] = (
            f"model dtype {dtype}: lm-eval takes the log-softmax in {dtype} and the native evaluator "
            "in float32, so differences above the tolerance are expected; compare on float32"
        )
    return agreement
