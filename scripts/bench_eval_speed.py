"""Side by side in one process: wikitext eval time of the demo model, fp16 vs config A vs config C.

Usage (on a CUDA machine; writes bench_eval_speed.{json,md} into --out):

    python scripts/bench_eval_speed.py --out "$OUT" --data-dir path/to/wikitext-2-raw-v1

Rows: fp16 (unquantized); config A (tutorial_a_rtn.toml) with the fused kernels and with the
torch reference (MXPTQ_DISABLE_KERNELS=1); config C (tutorial_c_rotsearch.toml's selectors and
formats, RTN weights, the rotation winners from --decisions or --rotate switched on) with kernels
and with the reference. Config C's GPTQ weights change no timing, so it is not run here: its
perplexity column is RTN + rotations, not the tutorial's config C number. Every config evaluates
the full test split with the native lm-eval-protocol evaluator (word perplexity), after a
warmup on --warmup-docs documents (compiles the Triton kernels, fills caches).
--compare-legacy adds rows for A and C with the issue-9 host-time fixes switched off in the same
process (Triton's generic launch instead of the compiled-kernel launch, no shared quantized
inputs for q/k/v and gate/up), and the host time of one `quantize` call both ways.
A benchmark, not a test (STYLE.md rule 12).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ROTATE = "down_proj,kv_cache"  # used when neither --decisions nor --rotate is given


def _winners(args) -> list[str]:
    if args.decisions:
        data = json.loads(Path(args.decisions).read_text())
        for key in ("winners", "chosen", "decisions"):
            if isinstance(data.get(key), list):
                return [str(t) for t in data[key]]
        raise SystemExit(f"{args.decisions}: no 'winners' list in the rotation decisions JSON")
    return [t for t in (args.rotate or DEFAULT_ROTATE).split(",") if t]


def _timed_eval(model, tokenizer, docs, args) -> tuple[float, dict]:
    from mxptq.evaluate import word_perplexity_native

    word_perplexity_native(model, tokenizer, docs[: args.warmup_docs], args.max_length, args.batch_size)
    torch.cuda.synchronize()
    start = time.perf_counter()
    metrics = word_perplexity_native(model, tokenizer, docs, args.max_length, args.batch_size)
    torch.cuda.synchronize()
    return time.perf_counter() - start, metrics


def _set_kernels(enabled: bool) -> None:
    # mxptq.formats.kernels reads this at every call, so it switches within one process.
    os.environ["MXPTQ_DISABLE_KERNELS"] = "0" if enabled else "1"


def _set_host_fixes(on: bool) -> None:
    """Issue 9's host-time fixes: compiled-kernel launches and shared quantized inputs."""
    from mxptq.formats import kernels
    from mxptq.nn import quantizer

    kernels.FAST_LAUNCH = on
    quantizer.SHARE_QUANTIZED_INPUTS = on
    quantizer.clear_input_cache()


def _quantize_call_us(dtype: torch.dtype, calls: int = 2000) -> dict:
    """Wall time per `quantize` call on a [1, 2048, 576] activation (the demo model's hidden
    size), issued back to back: the kernel itself takes ~2 us, so this is the host time."""
    from mxptq.formats import Format, quantize

    fmt = Format.from_keys("mxint", width=4, block_size=32, scale_rule="tutorial")
    x = torch.randn(1, 2048, 576, device="cuda", dtype=dtype)
    out = {}
    for label, on in (("legacy", False), ("now", True)):
        _set_host_fixes(on)
        for _ in range(50):
            quantize(x, fmt)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            quantize(x, fmt)
        torch.cuda.synchronize()
        out[label] = (time.perf_counter() - start) / calls * 1e6
    _set_host_fixes(True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--data-dir", default=os.environ.get("MXPTQ_DATA_DIR"), help="wikitext-2-raw-v1 directory")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--batch-size", type=int, default=1, help="issue 9 measured batch 1")
    ap.add_argument("--max-length", type=int, default=2048)
    ap.add_argument("--limit", type=int, default=None, help="first N test documents (default: all)")
    ap.add_argument("--warmup-docs", type=int, default=2)
    ap.add_argument("--decisions", help="rotation decisions JSON (rotsearch cache: its 'winners')")
    ap.add_argument("--rotate", help=f"comma list of matmul types to rotate for C (default {DEFAULT_ROTATE})")
    ap.add_argument("--skip-reference", action="store_true", help="skip the torch-reference rows")
    ap.add_argument("--compare-legacy", action="store_true",
                    help="also run A and C with the issue-9 host-time fixes off (same process)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run all rows this many times in sequence (the first pass also pays first-shape costs)")
    ap.add_argument("--stem", default="bench_eval_speed", help="output file names: STEM.json, STEM.md")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_eval_speed.py needs a CUDA device", file=sys.stderr)
        return 2

    from mxptq.data import WikiText
    from mxptq.models import load_model
    from mxptq.recipe import load_recipe
    from mxptq.stages.rotsearch import collect_candidates
    from mxptq.stages.transform import quantize_model

    data = WikiText(args.data_dir)
    docs = data.documents("test")
    if args.limit:
        docs = docs[: args.limit]
    recipes = {name: load_recipe(REPO / "recipes" / f"tutorial_{name}.toml").with_overrides(
        model=args.model, device="cuda", dtype=args.dtype, data_dir=args.data_dir)
        for name in ("a_rtn", "c_rotsearch")}
    rotate = _winners(args)
    rows = []

    def run(label: str, recipe_name: str | None, kernels_on: bool, host_fixes: bool = True) -> None:
        _set_kernels(kernels_on)
        _set_host_fixes(host_fixes)
        recipe = recipes[recipe_name or "a_rtn"]
        model, tokenizer, _ = load_model(recipe.model)
        note = ""
        if recipe_name is not None:
            model = quantize_model(model, recipe)
        if recipe_name == "c_rotsearch":
            candidates, skipped = collect_candidates(model, rotate)
            for candidate in candidates:
                candidate.enable()
            note = f"rotated: {[c.matmul_type for c in candidates]}" + (f"; skipped {skipped}" if skipped else "")
        seconds, metrics = _timed_eval(model, tokenizer, docs, args)
        rows.append(dict(config=label, kernels=kernels_on, host_fixes=host_fixes, seconds=seconds, repeat=repeat,
                         word_perplexity=metrics.get("word_perplexity"), note=note))
        print(f"{label}: {seconds:.1f} s, word ppl {metrics.get('word_perplexity')}", file=sys.stderr)
        del model
        gc.collect()
        torch.cuda.empty_cache()

    for repeat in range(args.repeat):
        run("fp16", None, True)
        run("A (W4A4KV4 RTN)", "a_rtn", True)
        if args.compare_legacy:
            run("A (W4A4KV4 RTN)", "a_rtn", True, host_fixes=False)
        if not args.skip_reference:
            run("A (W4A4KV4 RTN)", "a_rtn", False)
        run("C (RTN weights + rotations)", "c_rotsearch", True)
        if args.compare_legacy:
            run("C (RTN weights + rotations)", "c_rotsearch", True, host_fixes=False)
        if not args.skip_reference:
            run("C (RTN weights + rotations)", "c_rotsearch", False)
    _set_kernels(True)
    _set_host_fixes(True)
    call_us = _quantize_call_us(getattr(torch, args.dtype)) if args.compare_legacy else None

    base = {r["repeat"]: r["seconds"] for r in rows if r["config"] == "fp16"}
    for r in rows:
        r["x_fp16"] = r["seconds"] / base[r["repeat"]]  # the fp16 row of the same pass
    import triton

    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                python=platform.python_version(), command=" ".join(["python"] + sys.argv),
                model=args.model, dtype=args.dtype, batch_size=args.batch_size, max_length=args.max_length,
                documents=len(docs), split="test", rotate=rotate, quantize_call_us=call_us,
                timing="wall clock of word_perplexity_native after a warmup, torch.cuda.synchronize around it")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.stem}.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    lines = [f"# Eval time on {meta['device']}", "", *[f"- {k}: `{v}`" for k, v in meta.items() if k != "device"],
             "", "| pass | config | kernels | time (s) | x fp16 | word ppl | note |", "|---:|---|---|---:|---:|---:|---|"]
    for r in rows:
        kind = ("fused" if r["host_fixes"] else "fused, generic Triton launch, no sharing") if r["kernels"] else "torch reference"
        lines.append(f"| {r['repeat'] + 1} | {r['config']} | {kind} | {r['seconds']:.1f} | "
                     f"{r['x_fp16']:.2f} | {r['word_perplexity']:.4f} | {r['note']} |")
    (args.out / f"{args.stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
