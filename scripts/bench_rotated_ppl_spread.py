"""How far do numerically equivalent rotated-kernel variants move config C's perplexity?

Config C (tutorial_c_rotsearch.toml formats, RTN weights, the 8 rotated matmul types) on the demo
model, full WikiText-2 test split, batch 8, fp16: the default fused rotated kernel, variants that
change only fp32 rounding (bf16 pieces of the intermediate, tile shape, stage order), the torch
reference path for one rotation size at a time, and the torch reference everywhere.

Usage (CUDA machine, from the repo root; MXPTQ_DATA_DIR = wikitext-2-raw-v1):

    python scripts/bench_rotated_ppl_spread.py

A benchmark, not a test (STYLE.md rule 12): it prints one line per variant.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mxptq.data import WikiText
from mxptq.evaluate import ModelForward, word_perplexity_native
from mxptq.formats import kernels
from mxptq.models import load_model
from mxptq.recipe import load_recipe
from mxptq.stages.rotsearch import collect_candidates
from mxptq.stages.transform import quantize_model

data_dir = os.environ["MXPTQ_DATA_DIR"]
docs = WikiText(data_dir).documents("test")
recipe = load_recipe(
    Path(__file__).resolve().parents[1] / "recipes" / "tutorial_c_rotsearch.toml"
).with_overrides(model="smollm2-135m", device="cuda", dtype="float16", data_dir=data_dir)
model, tok, _ = load_model(recipe.model)
model = quantize_model(model, recipe)
cands, _ = collect_candidates(
    model, ["up_proj", "kv_cache", "k_proj", "down_proj", "gate_proj", "v_proj", "q_proj", "o_proj"]
)
for c in cands:
    c.enable()
orig_build = kernels._build_rotation_plan
orig_rfq = kernels.rotated_fake_quantize
DEFAULTS = (kernels.ROTATION_MID_SPLIT, kernels.ROTATION_TILE_ELEMENTS, kernels.ROTATION_TILE_ELEMENTS_A_FIRST)


def clear_caches():
    kernels.clear_caches()
    model.mxptq_input_cache.clear()


def reset():
    kernels._build_rotation_plan = orig_build
    kernels.rotated_fake_quantize = orig_rfq
    kernels.ROTATION_MID_SPLIT, kernels.ROTATION_TILE_ELEMENTS, kernels.ROTATION_TILE_ELEMENTS_A_FIRST = DEFAULTS
    os.environ["MXPTQ_DISABLE_KERNELS"] = "0"
    clear_caches()


def run(label):
    clear_caches()
    f = ModelForward(model, cuda_graphs=os.environ.get("MXPTQ_DISABLE_KERNELS") != "1")
    t = time.time()
    r = word_perplexity_native(model, tok, docs, 2048, 8, forward=f)
    f.close()
    print(f"{label}: word ppl {r['word_perplexity']:.4f} ({time.time() - t:.1f} s)", flush=True)
    reset()


run("default kernel")
kernels.ROTATION_MID_SPLIT = 2
run("MID_SPLIT 2")
kernels.ROTATION_TILE_ELEMENTS = kernels.ROTATION_TILE_ELEMENTS_A_FIRST = 1024
run("tile 1024 (1 row for 576)")
kernels._build_rotation_plan = lambda r, d: dataclasses.replace(orig_build(r, d), a_first=False)
run("all B-first")
for n in (576, 1536, 64):
    kernels.rotated_fake_quantize = lambda x, fmt, rot, n=n: (
        None if x.shape[-1] == n else orig_rfq(x, fmt, rot)
    )
    run(f"reference path for n={n} only")
os.environ["MXPTQ_DISABLE_KERNELS"] = "1"
run("torch reference (all)")
