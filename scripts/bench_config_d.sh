#!/usr/bin/env bash
# Config D and its ablation (issue 22) on one GPU: every run on the full WikiText-2 test split.
#
#   bash scripts/bench_config_d.sh OUT_DIR [extra mxptq flags, e.g. --data-dir DIR]
#
# Runs (each in its own working directory OUT_DIR/<run>, so no GPTQ checkpoint or rotation cache
# is shared between variants; MODEL, default smollm2-135m, picks the model):
#   fp                      the unquantized model (mxptq eval-ppl)
#   tutorial_c_rotsearch    config C, MXINT4 (recipes/)        mxfp4_c_rotsearch   config C, MXFP4
#   d_mxint4, d_mxfp4       config D (recipes/): [rotation] + GPTQ after it + rotation search
#   ablation, MXINT4, variants of recipes/d_mxint4.toml written to OUT_DIR/recipes/:
#     abl_rotation_rtn      [rotation] alone: no GPTQ, no rotation search
#     abl_rotation_gptq     [rotation] + GPTQ, no rotation search
#     abl_r1_only           only R1 (heads = false, online = []) + GPTQ + rotation search
#     abl_no_online         R1 + R2 (online = []) + GPTQ + rotation search
#     abl_online_o_down     D with o_proj's input rotated online too (online = ["o_proj", "down_proj"])
#     abl_online_all        D with every linear's input rotated online too (a Hadamard on top of R1)
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
out = Path(sys.argv[1]); base = (out / "d_mxint4.toml").read_text()
def drop(text, table):  # remove [table] (and its sub-tables) up to the next table header
    return re.sub(rf"^\[{re.escape(table)}(\.[^\]]*)?\]\n(?:(?!\[).*\n|\n)*", "", text, flags=re.M)
def setkey(text, key, value):
    return re.sub(rf"^{key} = .*$", f"{key} = {value}", text, count=1, flags=re.M)
no_gptq = re.sub(r"^gptq = true\n", "", drop(base, "gptq"), flags=re.M)
variants = {
    "abl_rotation_rtn": drop(no_gptq, "rotation_search"),
    "abl_rotation_gptq": drop(base, "rotation_search"),
    "abl_r1_only": setkey(setkey(base, "heads", "false"), "online", "[]"),
    "abl_no_online": setkey(base, "online", "[]"),
    "abl_online_o_down": setkey(base, "online", '["o_proj", "down_proj"]'),
    "abl_online_all": setkey(base, "online", str(list(("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))).replace("'", '"')),
}
for name, text in variants.items():
    (out / f"{name}.toml").write_text(f"# {name}: a variant of recipes/d_mxint4.toml (scripts/bench_config_d.sh)\n" + text)
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
for name in tutorial_c_rotsearch mxfp4_c_rotsearch d_mxfp4 abl_rotation_rtn abl_rotation_gptq \
            abl_r1_only abl_no_online abl_online_o_down abl_online_all; do
  while (( $(jobs -rp | wc -l) >= ${JOBS:-1} )); do wait -n; done
  run "$name" quantize "$OUT/recipes/$name.toml" --model "$MODEL" --no-fp-eval "$@" &
done
wait
run d_mxint4_reload eval-ppl --checkpoint "$OUT/d_mxint4/checkpoint" "$@"
"$PY" -m mxptq report "$OUT"/*/report.json > "$OUT/summary.md" || true
