"""Save and reload the demo model's packed MX checkpoint on a device; check bit-identical logits.

    python scripts/bench_checkpoint.py --out OUT_DIR [--recipe recipes/tutorial_a_rtn.toml]
        [--model smollm2-135m] [--device cuda] [--dtype float16]

Writes OUT_DIR/checkpoint_roundtrip.json: device, bit_identical, save/load seconds, sizes.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from mxptq.checkpoint import load_quantized, save_quantized
from mxptq.models import DEMO_MODEL, load_model
from mxptq.recipe import load_recipe
from mxptq.stages.transform import quantize_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--recipe", default="recipes/tutorial_a_rtn.toml")
    ap.add_argument("--model", default=DEMO_MODEL)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float16")
    args = ap.parse_args()

    recipe = load_recipe(args.recipe).with_overrides(model=args.model, device=args.device, dtype=args.dtype)
    model, tokenizer, info = load_model(recipe.model.model_copy(update={"name": recipe.model_name}))
    model = quantize_model(model, recipe, None)
    ids = tokenizer("The quick brown fox jumps over the lazy dog. " * 20, return_tensors="pt").input_ids
    ids = ids.to(args.device)
    with torch.no_grad():
        before = model(input_ids=ids).logits
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        summary = save_quantized(model, recipe, Path(tmp) / "ckpt", tokenizer=tokenizer, model_info=info)
        save_s = time.perf_counter() - start
        del model
        start = time.perf_counter()
        reloaded, _, _ = load_quantized(Path(tmp) / "ckpt", device=args.device)
        load_s = time.perf_counter() - start
        with torch.no_grad():
            after = reloaded(input_ids=ids).logits
    sizes = summary.to_dict()
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "recipe": args.recipe,
        "dtype": args.dtype,
        "bit_identical": bool(torch.equal(before, after)),
        "save_s": round(save_s, 3),
        "load_s": round(load_s, 3),
        **{k: sizes[k] for k in ("quantized_ratio_to_fp16", "tensors_ratio_to_fp16", "tensor_file_bytes",
                                 "quantized_linears") if k in sizes},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "checkpoint_roundtrip.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
