#!/usr/bin/env bash
# Config D and its ablation (issue 22) on one GPU: every run on the full WikiText-2 test split.
#
#   JOBS=4 bash scripts/bench_config_d.sh OUT_DIR [extra mxptq flags, e.g. --device cuda --dtype float16]
#
# Runs (each in its own working directory OUT_DIR/<run>, so no GPTQ checkpoint or rotation cache
# is shared between variants; MODEL, default smollm2-135m, picks the model):
#   fp                      the unquantized model (mxptq eval-ppl)
#   tutorial_c_rotsearch    config C, MXINT4 (recipes/)        mxfp4_c_rotsearch   config C, MXFP4
#   d_mxint4, d_mxfp4       config D (recipes/): C + the mse scale rule + GPTQ refit on quantized inputs
#   ablation, MXINT4, each technique added to C alone, or changed in D (OUT_DIR/recipes/):
#     abl_c_mse             C + [formats] mxint_scale_rule = "mse"
#     abl_c_refit           C + [gptq] refit = "quantized_inputs"
#     abl_c_rotation        C + [rotation] (R1 + R2 + online down_proj, weights rotated before GPTQ)
#     abl_d_refit_asym      D with refit = "asymmetric" (GPTAQ) instead
#     abl_d_rotation        D + [rotation]
#     abl_d_act_order       D + [gptq] act_order = true
#   d_mxint4_reload         `mxptq eval-ppl --checkpoint OUT_DIR/d_mxint4/checkpoint`: the saved D
#                           checkpoint evaluated again (same perplexity expected, bit for bit)
# then OUT_DIR/summary.md (`mxptq report` over every report.json).
set -euo pipefail
OUT=$(mkdir -p "${1:?usage: bench_config_d.sh OUT_DIR [mxptq flags]}" && cd "$1" && pwd); shift
REPO=$(cd "$(dirname "$0")/.." && pwd)
MODEL=${MODEL:-smollm2-135m}
PY=${PYTHON:-python3}
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" MXPTQ_NO_PROGRESS=1
mkdir -p "$OUT/recipes"
cp "$REPO"/recipes/{tutorial_c_rotsearch,mxfp4_c_rotsearch,d_mxint4,d_mxfp4}.toml "$OUT/recipes/"
"$PY" - "$OUT/recipes" <<'PY'
import re, sys
from pathlib import Path
out = Path(sys.argv[1])
c, d = (out / "tutorial_c_rotsearch.toml").read_text(), (out / "d_mxint4.toml").read_text()
ROTATION = '[rotation]\nresidual = true\nheads = true\nonline = ["down_proj"]\n'
def after_by(text, table):  # a table right after the leading `by = ...` line
    return re.sub(r"^(by = .*\n)", lambda m: m.group(1) + table, text, count=1, flags=re.M)
def refit(text, mode):
    text = re.sub(r"^refit = .*\n", "", text, flags=re.M)
    return text.replace("clip_search_y = true\n", f'clip_search_y = true\nrefit = "{mode}"\n', 1)
variants = {
    "abl_c_mse": after_by(c, '[formats]\nmxint_scale_rule = "mse"\n'),
    "abl_c_refit": refit(c, "quantized_inputs"),
    "abl_c_rotation": after_by(c, ROTATION),
    "abl_d_refit_asym": refit(d, "asymmetric"),
    "abl_d_rotation": after_by(d, ROTATION),
    "abl_d_act_order": d.replace("clip_search_y = true\n", "clip_search_y = true\nact_order = true\n", 1),
}
for name, text in variants.items():
    (out / f"{name}.toml").write_text(f"# {name}: a variant (scripts/bench_config_d.sh)\n" + text)
PY
run() {  # name, mxptq arguments...
  local name=$1; shift
  mkdir -p "$OUT/$name"
  local start=$SECONDS
  (cd "$OUT/$name" && "$PY" -m mxptq "$@" --out "$OUT/$name" > log.txt 2>&1) || echo "$name FAILED (see $OUT/$name/log.txt)"
  printf '%s\t%s\n' "$name" "$((SECONDS - start))" | tee -a "$OUT/process.tsv"
}
# fp and d_mxint4 run alone, so their stage times are clean (the "D in <= 3 minutes" figure); the
# rest run JOBS at a time (default 1): with JOBS > 1 their stage times share the GPU and CPU and
# only their perplexities are comparable.
run fp eval-ppl --model "$MODEL" "$@"
run d_mxint4 quantize "$OUT/recipes/d_mxint4.toml" --model "$MODEL" --no-fp-eval "$@"
for name in tutorial_c_rotsearch mxfp4_c_rotsearch d_mxfp4 abl_c_mse abl_c_refit abl_c_rotation \
            abl_d_refit_asym abl_d_rotation abl_d_act_order; do
  while (( $(jobs -rp | wc -l) >= ${JOBS:-1} )); do wait -n; done
  run "$name" quantize "$OUT/recipes/$name.toml" --model "$MODEL" --no-fp-eval "$@" &
done
wait
run d_mxint4_reload eval-ppl --checkpoint "$OUT/d_mxint4/checkpoint" "$@"
"$PY" -m mxptq report "$OUT"/*/report.json > "$OUT/summary.md" || true
