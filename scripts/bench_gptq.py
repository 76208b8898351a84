#!/usr/bin/env python
"""Benchmark the GPTQ stage: wall time and peak accelerator memory, plus a joint-vs-column
quality comparison on the demo model (issue 6). Not a test: it asserts nothing about time.

Timing models (`--models`):
  llama-3.2-1b, llama-3-8b  randomly initialised models with exactly those architectures' shapes
                            (configs written out below; no download), built directly on the GPU in
                            bfloat16 and then moved to the CPU, as the pipeline holds a model during
                            GPTQ (one layer at a time goes to the GPU). GPTQ's work does not depend
                            on the weight values; calibration = random token ids.
  demo                      SmolLM2-135M (`--demo-model`: the GGUF path or "smollm2-135m"),
                            float16, WikiText-2 calibration windows.
Settings: recipes/tutorial_b_gptq.toml ([gptq] 32 x 512, cali_batch_size 8, quantile_search and
clip_search_y, MXINT4 b32), checkpoints written to a temporary directory like the tutorial does
(`--no-checkpoint` to skip). `--intra-block joint,column` times both modes.

Quality (`--quality`, demo model): for RTN and for GPTQ with each intra_block mode, the word
perplexity (native lm-eval `wikitext` protocol, `--eval-limit` documents of the test split) of
  - weights only (W4, activations in float), and
  - the full tutorial config B (W4 A4 KV4 through the MX transform),
plus GPTQ's relative output errors. Output: one JSON file (`--out`, default $OUT/bench_gptq.json).

    python scripts/bench_gptq.py --models demo,llama-3.2-1b,llama-3-8b --quality \
        --demo-model /root/stage/<gguf> --out $OUT/bench_gptq.json
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mxptq import __version__
from mxptq.context import RunContext
from mxptq.recipe import load_recipe
from mxptq.report import Report
from mxptq.stages.gptq import gptq_calibrate

# Architectures from the models' published config.json files (meta-llama/Llama-3.2-1B,
# meta-llama/Meta-Llama-3-8B).
SHAPES: dict[str, dict[str, Any]] = {
    "llama-3.2-1b": {
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "vocab_size": 128256,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
        "rope_parameters": {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    },
    "llama-3-8b": {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 128256,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
    },
}
RECIPE_B = REPO / "recipes" / "tutorial_b_gptq.toml"
RECIPE_A = REPO / "recipes" / "tutorial_a_rtn.toml"


def random_llama(shape: str, device: torch.device) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[shape])
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # build in bf16 directly: an 8B model in fp32 is 32 GB
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default_dtype)
    with torch.no_grad():  # explicit init: the timing must not depend on whatever memory held
        for name, param in model.named_parameters():
            if "norm" in name:
                param.fill_(1.0)
            else:
                param.normal_(0.0, config.initializer_range)
    return model.eval()


def gptq_recipe(intra_block: str, checkpoint_dir: Path | None):
    recipe = load_recipe(RECIPE_B)
    update = {"intra_block": intra_block, "checkpoint_dir": checkpoint_dir}
    return recipe.model_copy(update={"gptq": recipe.gptq.model_copy(update=update)})


def time_gptq(model, recipe, ctx, windows) -> dict[str, Any]:
    device = ctx.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    summary = gptq_calibrate(model, recipe, ctx, windows=windows)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - start
    layers = summary["layers"]
    return {
        "wall_s": round(wall, 3),
        "peak_gpu_mem_bytes": summary["peak_mem_bytes"],
        "peak_gpu_mem_gib": None
        if summary["peak_mem_bytes"] is None
        else round(summary["peak_mem_bytes"] / 2**30, 3),
        "layers": len(layers),
        "mean_layer_s": round(sum(layer["seconds"] for layer in layers) / max(len(layers), 1), 4),
        "rel_error": summary["rel_error"],
        "rel_error_rtn": summary["rel_error_rtn"],
        "max_damp_percent": summary["max_damp_percent"],
        "fallback_rtn_linears": summary["fallback_rtn_linears"],
        "settings": {
            k: summary[k] for k in ("scale_search", "intra_block", "nsamples", "seqlen", "cali_batch_size")
        },
        "checkpoint": summary["checkpoint_dir"] is not None,
    }


def bench_shape(shape: str, args, device: torch.device) -> list[dict[str, Any]]:
    results = []
    for intra_block in args.intra_block:
        model = random_llama(shape, device).to("cpu")
        gc.collect()
        torch.cuda.empty_cache() if device.type == "cuda" else None
        windows = torch.randint(
            0, SHAPES[shape]["vocab_size"], (32, 512), generator=torch.Generator().manual_seed(0)
        )
        with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
            recipe = gptq_recipe(intra_block, None if args.no_checkpoint else Path(tmp) / "ckpt")
            ctx = RunContext(device=device, report=Report("bench"), progress=False)
            result = {"model": shape, "weights": "random bf16", **time_gptq(model, recipe, ctx, windows)}
        print(json.dumps(result), flush=True)
        results.append(result)
        del model
        gc.collect()
    return results


def load_demo(args, dtype: str = "float16"):
    from types import SimpleNamespace

    from mxptq.models import load_model

    cfg = SimpleNamespace(
        name=args.demo_model, dtype=dtype, device="cpu", attn_implementation="sdpa", trust_remote_code=False
    )
    return load_model(cfg)


def bench_demo(args, device: torch.device) -> dict[str, Any]:
    from mxptq.data import WikiText, calibration_windows
    from mxptq.evaluate import word_perplexity_native
    from mxptq.formats import quantize
    from mxptq.stages.gptq import GPTQ_FORMAT_ATTR
    from mxptq.stages.transform import quantize_model

    base, tokenizer, info = load_demo(args)
    data = WikiText(None)
    recipe_b = gptq_recipe("joint", None)
    windows = calibration_windows(tokenizer, data, "validation", 32, 512, 0)
    docs = data.documents("test")[: args.eval_limit] if args.eval_limit else data.documents("test")

    def ppl(model) -> float:
        model.to(device)
        try:
            return word_perplexity_native(model, tokenizer, docs, max_length=2048, batch_size=8)[
                "word_perplexity"
            ]
        finally:
            model.to("cpu")

    out: dict[str, Any] = {"model": info.to_dict(), "eval_docs": len(docs), "timing": [], "quality": {}}
    if args.quality:
        out["quality"]["float"] = {"word_ppl_weights_only": ppl(copy.deepcopy(base))}
        rtn = copy.deepcopy(base)
        quantize_model(rtn, load_recipe(RECIPE_A))
        rtn_w = copy.deepcopy(base)
        with torch.no_grad():
            for _, selector_names in _gptq_linear_names(rtn_w, recipe_b):
                for name in selector_names:
                    weight = rtn_w.get_submodule(name).weight
                    weight.copy_(quantize(weight, recipe_b.gptq.weight))
        out["quality"]["rtn"] = {"word_ppl_weights_only": ppl(rtn_w), "word_ppl_config": ppl(rtn)}
    for intra_block in args.intra_block:
        model = copy.deepcopy(base)
        ctx = RunContext(
            tokenizer=tokenizer,
            data=data,
            device=device,
            report=Report("bench"),
            model_info=info,
            progress=False,
        )
        timing = {
            "model": "demo",
            "weights": "smollm2-135m float16",
            **time_gptq(model, gptq_recipe(intra_block, None), ctx, windows),
        }
        out["timing"].append(timing)
        print(json.dumps(timing), flush=True)
        if args.quality:
            quality = {
                "rel_error": timing["rel_error"],
                "rel_error_rtn": timing["rel_error_rtn"],
                "word_ppl_weights_only": ppl(model),
            }
            assert any(hasattr(m, GPTQ_FORMAT_ATTR) for m in model.modules())
            quantize_model(model, recipe_b)
            quality["word_ppl_config"] = ppl(model)
            out["quality"][f"gptq_{intra_block}"] = quality
            print(json.dumps({intra_block: quality}), flush=True)
    return out


def _gptq_linear_names(model, recipe):
    from mxptq.stages.transform import match_selectors

    return [
        (s, names)
        for s, names in match_selectors(model, recipe)
        if s.kind == "linear" and getattr(s.config, "gptq", False)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="demo,llama-3.2-1b,llama-3-8b")
    parser.add_argument("--intra-block", default="joint", help="comma list: joint,column")
    parser.add_argument("--demo-model", default="smollm2-135m")
    parser.add_argument("--quality", action="store_true", help="demo: word perplexity RTN vs GPTQ modes")
    parser.add_argument(
        "--eval-limit", type=int, default=0, help="demo quality: first N test documents (0 = all)"
    )
    parser.add_argument("--no-checkpoint", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tmp", default=None, help="where per-layer checkpoints go (default: system temp)")
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "bench_gptq.json"))
    args = parser.parse_args()
    args.intra_block = args.intra_block.split(",")
    device = torch.device(args.device)
    import transformers

    record: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "versions": {
            "mxptq": __version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "command": " ".join(sys.argv),
        "recipe": str(RECIPE_B.relative_to(REPO)),
        "results": [],
    }
    for name in args.models.split(","):
        if name == "demo":
            record["demo"] = bench_demo(args, device)
        else:
            record["results"].extend(bench_shape(name, args, device))
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        # Written after each model, so partial results survive a time limit.
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
