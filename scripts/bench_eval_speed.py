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
--cuda-graphs both (default) times every configuration eagerly and with the evaluator's CUDA
graphs (mxptq.evaluate.ModelForward; capture included), each against fp16 run the same way.
Passes interleave the configurations; the summary holds medians (--repeat passes).
A benchmark, not a test (STYLE.md rule 12).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
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


def _timed_eval(model, tokenizer, docs, args, graphs: bool) -> tuple[float, dict]:
    """Wall time of one full evaluation, as `mxptq eval-ppl` runs it: with graphs, capturing
    them is part of the time (a fresh ModelForward per evaluation, like the pipeline's)."""
    from mxptq.evaluate import ModelForward, word_perplexity_native

    word_perplexity_native(model, tokenizer, docs[: args.warmup_docs], args.max_length, args.batch_size)
    torch.cuda.synchronize()
    start = time.perf_counter()
    forward = ModelForward(model, cuda_graphs=graphs)
    metrics = word_perplexity_native(model, tokenizer, docs, args.max_length, args.batch_size, forward=forward)
    forward.close()
    torch.cuda.synchronize()
    return time.perf_counter() - start, metrics


def _tokenize_seconds(tokenizer, docs) -> float:
    """Host time the evaluator spends tokenizing the documents (part of every eval row)."""
    from mxptq.evaluate import Protocol, encode_like_hflm, prefix_token_id

    protocol, prefix = Protocol(), prefix_token_id(tokenizer)
    start = time.perf_counter()
    for page in docs:
        encode_like_hflm(tokenizer, protocol.detokenizer({"page": page}), prefix)
    return time.perf_counter() - start


@torch.inference_mode()
def _profile_forward(model, args) -> str:
    """torch.profiler table of one forward on a full [batch, max_length] window: where the
    device time and the host time go."""
    from torch.profiler import ProfilerActivity, profile

    ids = torch.randint(0, 1000, (args.batch_size, args.max_length), device="cuda")
    for _ in range(2):
        model(input_ids=ids, use_cache=False)
    torch.cuda.synchronize()
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        model(input_ids=ids, use_cache=False)
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=50)
    return f"wall {wall * 1e3:.1f} ms (under the profiler)\n{table}"


def _set_kernels(enabled: bool) -> None:
    # mxptq.formats.kernels reads this at every call, so it switches within one process.
    os.environ["MXPTQ_DISABLE_KERNELS"] = "0" if enabled else "1"


def _set_host_fixes(on: bool, models=()) -> None:
    """Issue 9's host-time fixes: compiled-kernel launches (process-wide) and shared quantized
    inputs (the input cache of each of `models` that has one: quantized models)."""
    from mxptq.formats import kernels

    kernels.FAST_LAUNCH = on
    for model in models:
        cache = getattr(model, "mxptq_input_cache", None)
        if cache is not None:
            cache.enabled = on
            cache.clear()


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
    ap.add_argument("--repeat", type=int, default=3,
                    help="interleaved passes over all configurations (the table reports medians)")
    ap.add_argument("--stem", default="bench_eval_speed", help="output file names: STEM.json, STEM.md")
    ap.add_argument("--profile", action="store_true", help="add a torch.profiler table of one forward per config")
    ap.add_argument("--cuda-graphs", choices=["on", "off", "both"], default="both",
                    help="evaluate with the native evaluator's CUDA graphs, eagerly, or both (each vs fp16 the same way)")
    ap.add_argument("--reference-passes", type=int, default=1,
                    help="passes that include the torch-reference rows (unless --skip-reference)")
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
    profiles = {}

    def build(recipe_name: str | None, kernels_on: bool):
        """(model, tokenizer, note) for one configuration; every model stays loaded so that the
        passes below can interleave the configurations."""
        _set_kernels(kernels_on)
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
        return model, tokenizer, note

    configs = [("fp16", None, True, True), ("A (W4A4KV4 RTN)", "a_rtn", True, True)]
    if args.compare_legacy:
        configs.append(("A (W4A4KV4 RTN)", "a_rtn", True, False))
    if not args.skip_reference:
        configs.append(("A (W4A4KV4 RTN)", "a_rtn", False, True))
    configs.append(("C (RTN weights + rotations)", "c_rotsearch", True, True))
    if args.compare_legacy:
        configs.append(("C (RTN weights + rotations)", "c_rotsearch", True, False))
    if not args.skip_reference:
        configs.append(("C (RTN weights + rotations)", "c_rotsearch", False, True))
    built = [build(recipe_name, kernels_on) for _, recipe_name, kernels_on, _ in configs]

    models = [model for model, _, _ in built]  # every one: each switch also clears every cache, as before
    tokenize_s = _tokenize_seconds(built[0][1], docs)
    modes = {"on": [True], "off": [False], "both": [False, True]}[args.cuda_graphs]
    for repeat in range(args.repeat):
        # Interleaved: every pass runs every configuration once, so slow drifts of the machine
        # (other tenants, clocks) fall on all of them alike; the table reports medians.
        for graphs in modes:
            for (label, recipe_name, kernels_on, host_fixes), (model, tokenizer, note) in zip(configs, built):
                if not kernels_on and (graphs or repeat >= args.reference_passes):
                    continue  # the slow torch-reference rows: eager, first passes only
                _set_kernels(kernels_on)
                _set_host_fixes(host_fixes, models)
                seconds, metrics = _timed_eval(model, tokenizer, docs, args, graphs)
                rows.append({"config": label, "kernels": kernels_on, "host_fixes": host_fixes, "graphs": graphs,
                             "seconds": seconds, "repeat": repeat, "word_perplexity": metrics.get("word_perplexity"),
                             "forward": metrics["protocol"]["forward"], "note": note})
                print(f"pass {repeat + 1} {label} graphs={graphs}: {seconds:.2f} s, "
                      f"word ppl {metrics.get('word_perplexity')}", file=sys.stderr)
    if args.profile:
        for (label, _, kernels_on, host_fixes), (model, _, _) in zip(configs, built):
            if kernels_on and host_fixes:
                _set_kernels(True)
                _set_host_fixes(True, models)
                profiles[label] = _profile_forward(model, args)
    del built, models
    gc.collect()
    torch.cuda.empty_cache()
    _set_kernels(True)
    _set_host_fixes(True)
    call_us = _quantize_call_us(getattr(torch, args.dtype)) if args.compare_legacy else None
    base = {(r["repeat"], r["graphs"]): r["seconds"] for r in rows if r["config"] == "fp16"}
    for r in rows:
        r["x_fp16"] = r["seconds"] / base[r["repeat"], r["graphs"]]  # fp16 of the same pass and mode
    summary = []
    for graphs in modes:
        for label, _, kernels_on, host_fixes in configs:
            mine = [r for r in rows if (r["config"], r["kernels"], r["host_fixes"], r["graphs"])
                    == (label, kernels_on, host_fixes, graphs)]
            if not mine:
                continue
            summary.append({"config": label, "kernels": kernels_on, "host_fixes": host_fixes, "graphs": graphs,
                            "passes": len(mine), "median_s": statistics.median(r["seconds"] for r in mine),
                            "median_x_fp16": statistics.median(r["x_fp16"] for r in mine),
                            "max_x_fp16": max(r["x_fp16"] for r in mine),
                            "word_perplexity": mine[0]["word_perplexity"]})
    import triton

    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                "python": platform.python_version(), "command": " ".join(["python"] + sys.argv),
                "model": args.model, "dtype": args.dtype, "batch_size": args.batch_size, "max_length": args.max_length,
                "documents": len(docs), "split": "test", "rotate": rotate, "quantize_call_us": call_us,
                "tokenize_s": round(tokenize_s, 3), "passes": args.repeat,
                "timing": ("wall clock of word_perplexity_native after a warmup (graph capture included), "
                           "torch.cuda.synchronize around it")}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.stem}.json").write_text(json.dumps({"meta": meta, "summary": summary, "rows": rows,
                                                                "profiles": profiles}, indent=1))

    def kind_of(r) -> str:
        kind = "torch reference" if not r["kernels"] else (
            "fused" if r["host_fixes"] else "fused, generic Triton launch, no sharing")
        return f"{kind}, {'CUDA graphs' if r['graphs'] else 'eager'}"

    lines = [f"# Eval time on {meta['device']}", "", *[f"- {k}: `{v}`" for k, v in meta.items() if k != "device"],
             "", f"## Median of interleaved passes ({args.repeat}; torch reference: {args.reference_passes})", "",
             "| config | path | passes | median time (s) | median x fp16 (same pass, same path) | worst x fp16 | word ppl |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in summary:
        lines.append(f"| {r['config']} | {kind_of(r)} | {r['passes']} | {r['median_s']:.2f} | "
                     f"{r['median_x_fp16']:.2f} | {r['max_x_fp16']:.2f} | {r['word_perplexity']:.4f} |")
    lines += ["", "## Every pass", "", "| pass | config | kernels | time (s) | x fp16 | word ppl | note |",
              "|---:|---|---|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['repeat'] + 1} | {r['config']} | {kind_of(r)} | {r['seconds']:.2f} | "
                     f"{r['x_fp16']:.2f} | {r['word_perplexity']:.4f} | {r['note']} |")
    for label, table in profiles.items():
        lines += ["", f"## Profile of one forward [{args.batch_size}, {args.max_length}]: {label}", "", "```", table, "```"]
    (args.out / f"{args.stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
