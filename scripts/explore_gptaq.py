"""Issue 22 exploration: config C plus the asymmetric GPTQ refit (stage gptaq) in several forms, on
one loaded model (scripts/run_variants.py). MXPTQ_GPTAQ_STREAM / MXPTQ_GPTAQ_TARGET select
experimental variants of the refit while they are being measured.

    python scripts/explore_gptaq.py OUT_DIR --model smollm2-135m [--device cuda --dtype float16]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from run_variants import run_all  # noqa: E402

from mxptq.recipe import parse_recipe  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def edit(text: str, asymmetric: bool = False, nsamples: int | None = None) -> str:
    if asymmetric:
        text = text.replace("clip_search_y = true\n", "clip_search_y = true\nasymmetric = true\n", 1)
    if nsamples:
        text = re.sub(r"^nsamples = \d+", f"nsamples = {nsamples}", text, count=1, flags=re.M)
        text = text.replace("config_b_gptq", f"config_b_gptq_n{nsamples}")
    return text


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--model", required=True)
    for flag in ("--data-dir", "--device", "--dtype"):
        parser.add_argument(flag)
    parser.add_argument("--limit", type=int)
    args = parser.parse_args()
    overrides = dict(model=args.model, data_dir=args.data_dir, limit=args.limit, device=args.device, dtype=args.dtype)
    c_int = (REPO / "recipes/tutorial_c_rotsearch.toml").read_text()
    c_fp = (REPO / "recipes/mxfp4_c_rotsearch.toml").read_text()
    L, S = {"MXPTQ_GPTAQ_STREAM": "local"}, {"MXPTQ_GPTAQ_STREAM": "sequential"}
    sym = {"MXPTQ_GPTAQ_TARGET": "sym"}
    variants = {  # name: (recipe text, env)
        "c_int": (c_int, {}),
        "c_int_gptaq_local_sym": (edit(c_int, True), {**L, **sym}),
        "c_int_gptaq_seq_sym": (edit(c_int, True), {**S, **sym}),
        "c_int_gptaq_local_r0.01": (edit(c_int, True), {**L, "MXPTQ_GPTAQ_RIDGE": "0.01"}),
        "c_int_gptaq_local_r0.1": (edit(c_int, True), {**L, "MXPTQ_GPTAQ_RIDGE": "0.1"}),
        "c_int_gptaq_local_r1": (edit(c_int, True), {**L, "MXPTQ_GPTAQ_RIDGE": "1.0"}),
        "c_int_gptaq_seq_r0.1": (edit(c_int, True), {**S, "MXPTQ_GPTAQ_RIDGE": "0.1"}),
        "c_int_gptaq_seq_r1": (edit(c_int, True), {**S, "MXPTQ_GPTAQ_RIDGE": "1.0"}),
        "c_int_n128": (edit(c_int, False, 128), {}),
        "c_int_n128_gptaq_local_sym": (edit(c_int, True, 128), {**L, **sym}),
        "c_int_n128_gptaq_local_r0.1": (edit(c_int, True, 128), {**L, "MXPTQ_GPTAQ_RIDGE": "0.1"}),
        "c_fp": (c_fp, {}),
        "c_fp_gptaq_local_sym": (edit(c_fp, True), {**L, **sym}),
    }
    named = [(name, parse_recipe(text).with_overrides(**overrides)) for name, (text, _) in variants.items()]
    rows = run_all(named, args.out_dir, env={name: env for name, (_, env) in variants.items()})
    (args.out_dir / "rows.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
