"""Run several recipes on one loaded model: load once, then per recipe quantize a copy and evaluate.

    python scripts/run_variants.py OUT_DIR RECIPE.toml... --model smollm2-135m [--data-dir D]
        [--limit N] [--device cuda] [--dtype float16]

For exploring variants quickly (the demo model's GGUF load takes ~25 s; a variant on a GPU takes
seconds). Each recipe gets OUT_DIR/<recipe stem>/report.json (no checkpoint); OUT_DIR/summary.md
is `mxptq report` over them. Stage times are those of one process running variants back to back
(caches warm): use scripts/bench_config_d.sh for timings. GPTQ checkpoints and rotation caches
are written where the recipes say, relative to the current directory.
"""

from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from mxptq.options import RunOptions
from mxptq.pipeline import _evaluate, _needs_gptq, _new_report, _open, _quantize_in_memory, release
from mxptq.recipe import Recipe, load_recipe


def run_all(
    named: list[tuple[str, Recipe]], out_dir: Path, *, fp: bool = True, env: dict[str, dict[str, str]] | None = None
) -> list[dict]:
    """Quantize and evaluate each (name, recipe) on a copy of the model the first recipe loads.
    env: {name: environment variables set for that run only}.
    -> one row per run: {"name", "word_perplexity", "token_perplexity", "report"}."""
    opts = RunOptions(progress=False, force=True)
    first = named[0][1]
    gptq_anywhere = any(_needs_gptq(recipe) for _, recipe in named)
    loader = first if _needs_gptq(first) or not gptq_anywhere else next(r for _, r in named if _needs_gptq(r))
    model, ctx = _open(loader, opts, "run_variants")  # on the CPU when a recipe runs GPTQ
    rows = []
    runs = ([("fp", None)] if fp else []) + list(named)
    for name, recipe in runs:
        report = _new_report("run_variants", recipe or first, opts, ctx.device)
        report["model"] = ctx.report["model"]
        report["recipe_name"] = name
        run_ctx = replace(ctx, report=report)
        candidate = copy.deepcopy(model)
        if recipe is None or not _needs_gptq(recipe):
            candidate.to(ctx.device)
        saved = {key: os.environ.get(key) for key in (env or {}).get(name, {})}
        os.environ.update((env or {}).get(name, {}))
        try:
            if recipe is not None:
                candidate = _quantize_in_memory(candidate, recipe, run_ctx)
        finally:
            for key, value in saved.items():
                os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)
        metrics = _evaluate(candidate, recipe or first, run_ctx, "quantized" if recipe else "fp")
        report["metrics"]["word_perplexity"] = metrics["word_perplexity"]
        report["metrics"]["token_perplexity"] = metrics["token_perplexity"]
        path = report.write(out_dir / name / "report.json")
        rows.append({"name": name, "word_perplexity": metrics["word_perplexity"],
                     "token_perplexity": metrics["token_perplexity"], "report": str(path)})
        print(f"{name}: word {metrics['word_perplexity']} token {metrics['token_perplexity']}", file=sys.stderr, flush=True)
        release(candidate)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("recipes", type=Path, nargs="+")
    parser.add_argument("--model", required=True)
    for flag in ("--data-dir", "--device", "--dtype"):
        parser.add_argument(flag)
    parser.add_argument("--limit", type=int)
    parser.add_argument("--no-fp", action="store_true", help="skip the unquantized row")
    args = parser.parse_args()
    overrides = {"model": args.model, "data_dir": args.data_dir, "limit": args.limit, "device": args.device,
                 "dtype": args.dtype}
    named = [(path.stem, load_recipe(path).with_overrides(**overrides)) for path in args.recipes]
    rows = run_all(named, args.out_dir, fp=not args.no_fp)
    reports = [row["report"] for row in rows]
    summary = subprocess.run([sys.executable, "-m", "mxptq", "report", *reports], capture_output=True, text=True, check=False)
    (args.out_dir / "summary.md").write_text(summary.stdout)
    print(summary.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
