"""Time the native wikitext evaluator (lm-eval `wikitext` protocol) on a whole split.

Usage (a CUDA machine; writes bench_eval.json into --out, default $OUT or the current directory):

    python scripts/bench_eval.py --model smollm2-135m --dtype float16 \
        --data-dir path/to/wikitext-2-raw-v1 [--recipe recipes/tutorial_a_rtn.toml] [--lm-eval]

Loads the model (optionally quantizes it in memory with the recipe's RTN transform), runs one
warm-up evaluation on --warmup-docs documents, then times --repeats full native evaluations of
the split (CUDA synchronized around each). With --lm-eval it also runs lm-eval-harness itself
on the same documents once, for the word-perplexity comparison and its wall time. The JSON holds
the metrics, wall times, device, library versions and the exact command.
A benchmark, not a test (STYLE.md rule 12).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(device: torch.device, work):
    _synchronize(device)
    start = time.perf_counter()
    result = work()
    _synchronize(device)
    return result, time.perf_counter() - start


def _versions() -> dict[str, str | None]:
    import importlib.metadata

    versions = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for package in ("transformers", "lm_eval", "datasets", "mxptq"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def _git_commit() -> str | None:
    try:
        return subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--attn-implementation", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument(
        "--data-dir", default=None, help="wiki.*.raw directory (default: $MXPTQ_DATA_DIR, else HF)"
    )
    parser.add_argument("--split", default="test", choices=["test", "validation"])
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--limit", type=int, default=None, help="first N documents only")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup-docs", type=int, default=2)
    parser.add_argument(
        "--recipe", default=None, help="quantize in memory with this recipe's RTN transform first"
    )
    parser.add_argument("--token-level", action="store_true", help="also time token-level perplexity")
    parser.add_argument("--lm-eval", action="store_true", help="also run lm-eval-harness itself once")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args(argv)

    from mxptq.data import WikiText
    from mxptq.evaluate import evaluate_lm_eval, token_perplexity, word_perplexity_native
    from mxptq.models import load_model

    cfg = SimpleNamespace(
        name=args.model,
        dtype=args.dtype,
        device=args.device,
        attn_implementation=args.attn_implementation,
        trust_remote_code=False,
    )
    (loaded, load_s) = _timed(torch.device("cpu"), lambda: load_model(cfg))
    model, tokenizer, info = loaded
    device = next(model.parameters()).device

    quantized_with = None
    if args.recipe:
        from mxptq.recipe import load_recipe
        from mxptq.stages.transform import quantize_model

        recipe = load_recipe(args.recipe)
        model = quantize_model(model, recipe)
        quantized_with = {"recipe": args.recipe, "sha256": recipe.sha256}

    data = WikiText(args.data_dir)
    docs = data.documents(args.split)
    if args.limit is not None:
        docs = docs[: args.limit]

    def native():
        return word_perplexity_native(model, tokenizer, docs, args.max_length, args.batch_size)

    word_perplexity_native(model, tokenizer, docs[: args.warmup_docs], args.max_length, args.batch_size)
    runs = [_timed(device, native) for _ in range(args.repeats)]
    result = runs[-1][0]
    times = [seconds for _, seconds in runs]

    record = {
        "benchmark": "native wikitext word perplexity (lm-eval protocol)",
        "command": shlex.join([sys.executable, *sys.argv]) if argv is None else shlex.join(argv),
        "git_commit": _git_commit(),
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "versions": _versions(),
        "model": info.to_dict() if hasattr(info, "to_dict") else str(info),
        "quantized_with": quantized_with,
        "data": data.source,
        "split": args.split,
        "n_documents": len(docs),
        "max_length": args.max_length,
        "batch_size": args.batch_size,
        "load_s": load_s,
        "native": {
            "wall_s": times,
            "best_wall_s": min(times),
            "tokens_per_s": result["n_tokens"] / min(times),
            "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
            "metrics": result,
        },
    }
    if args.token_level:
        (token, token_s) = _timed(
            device,
            lambda: token_perplexity(
                model,
                tokenizer,
                data.joined(args.split, n_documents=args.limit),
                args.max_length,
                args.batch_size,
            ),
        )
        record["token_level"] = {"wall_s": token_s, "metrics": token}
    if args.lm_eval:
        (reference, lm_eval_s) = _timed(
            device,
            lambda: evaluate_lm_eval(
                model, tokenizer, data, args.split, args.max_length, args.batch_size, args.limit
            ),
        )
        record["lm_eval"] = {
            "wall_s": lm_eval_s,
            "metrics": reference,
            "word_perplexity_relative_difference": abs(
                result["word_perplexity"] - reference["word_perplexity"]
            )
            / reference["word_perplexity"],
        }

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "bench_eval" + (f"_{Path(args.recipe).stem}" if args.recipe else "") + f"_{args.dtype}"
    out_path = out_dir / f"{stem}.json"
    out_path.write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
    summary = {
        "out": str(out_path),
        "device": record["device"],
        "word_perplexity": result["word_perplexity"],
        "native_best_wall_s": min(times),
        "lm_eval_wall_s": record.get("lm_eval", {}).get("wall_s"),
        "lm_eval_word_perplexity": record.get("lm_eval", {}).get("metrics", {}).get("word_perplexity"),
    }
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
