"""Where does a W4A4KV4 recipe lose its perplexity? Round-to-nearest with one quantizer family on at
a time (weights only, linear inputs only, KV cache only, all three), with and without the recipe's
[rotation], on a model loaded once.

    python scripts/error_budget.py RECIPE --model smollm2-135m [--data-dir D] [--limit N]
        [--device cpu] [--dtype float32] [--json OUT.json] [--no-rotation]

RECIPE's selectors give the formats (its [gptq] and [rotation_search] are dropped: this is RTN,
so the rows isolate the quantizers, not the calibration). Prints a markdown table of word/token
perplexity per row; --json writes the same rows. Used for issue 22 (benchmarks/).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import tomllib
from pathlib import Path

import tomlkit

from mxptq.options import RunOptions
from mxptq.pipeline import _evaluate, _open, _quantize_in_memory
from mxptq.recipe import parse_recipe

FAMILIES = ("weight", "data_in", "kv_cache")


def variant(raw: dict, keep: set[str], rotation: bool) -> dict:
    """RECIPE's TOML with only the quantizer families in `keep` left on."""
    out = copy.deepcopy(raw)
    for key in ("gptq", "rotation_search"):
        out.pop(key, None)
    if not rotation:
        out.pop("rotation", None)
    elif "rotation" not in out:
        out["rotation"] = {}
    for pattern, table in out.items():
        if not isinstance(table, dict) or key_is_reserved(pattern):
            continue
        table.pop("gptq", None)
        for family in ("weight", "data_in"):
            if family not in keep:
                for k in [k for k in table if k.startswith(family + "_")]:
                    del table[k]
        if "kv_cache" in table and "kv_cache" not in keep:
            table["kv_cache"] = {"bypass": True}
    return out


def key_is_reserved(key: str) -> bool:
    return key in ("by", "rotation", "model", "data", "eval", "output", "formats")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", type=Path)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data-dir")
    parser.add_argument("--limit", type=int)
    parser.add_argument("--device")
    parser.add_argument("--dtype")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--no-rotation", action="store_true", help="skip the rows with [rotation]")
    args = parser.parse_args()
    raw = tomllib.loads(args.recipe.read_text())
    rows = {
        "weights only": {"weight"},
        "linear inputs only": {"data_in"},
        "KV cache only": {"kv_cache"},
        "all (W4A4KV4)": set(FAMILIES),
    }
    overrides = {"model": args.model, "data_dir": args.data_dir, "limit": args.limit, "device": args.device,
                 "dtype": args.dtype}
    base = parse_recipe(tomlkit.dumps(variant(raw, set(), False))).with_overrides(**overrides)
    model, ctx = _open(base, RunOptions(progress=False), "error_budget")
    results = [dict(row="unquantized", rotation=False, **_metrics(_evaluate(model, base, ctx, "fp")))]
    for rotation in (False,) if args.no_rotation else (False, True):
        for name, keep in rows.items():
            recipe = parse_recipe(tomlkit.dumps(variant(raw, keep, rotation))).with_overrides(**overrides)
            start = time.perf_counter()
            quantized = _quantize_in_memory(copy.deepcopy(model), recipe, ctx)
            metrics = _evaluate(quantized, recipe, ctx, "quantized")
            results.append(dict(row=name, rotation=rotation, seconds=round(time.perf_counter() - start, 1), **_metrics(metrics)))
            print(f"{name:20s} rotation={rotation!s:5s} word {results[-1]['word_ppl']:.2f}", file=sys.stderr)
            del quantized
    print("| quantizers on (RTN) | [rotation] | word ppl | token ppl |\n|---|---|---:|---:|")
    for r in results:
        print(f"| {r['row']} | {'yes' if r['rotation'] else 'no'} | {r['word_ppl']:.2f} | {r['token_ppl']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"recipe": str(args.recipe), "overrides": overrides, "rows": results}, indent=1))
    return 0


def _metrics(metrics: dict) -> dict:
    return {"word_ppl": metrics["word_perplexity"], "token_ppl": metrics["token_perplexity"]}


if __name__ == "__main__":
    raise SystemExit(main())
