#!/usr/bin/env bash
# Reproduce the tutorial's progression (RTN -> GPTQ -> rotation search) and publish the table.
#
#   bash scripts/reproduce_tutorial.sh [--model M] [--out DIR] [--limit N] [--device D]
#        [--configs a,b,...] [--recipe-dir DIR] [--resume] [--bundle FILE.tar.gz] [--dry-run]
#        [extra mxptq flags]
#
# Runs, in this order, each into DIR/<config>/report.json (+ DIR/<config>/checkpoint/):
#   fp                    `mxptq eval-ppl --model M`: the unquantized model (dtype auto: fp16 on
#                         CUDA, fp32 on CPU; pass --dtype to choose)
#   tutorial_a_rtn        recipes/tutorial_a_rtn.toml       MXINT4 W4A4 + KV4, round to nearest
#   tutorial_b_gptq       recipes/tutorial_b_gptq.toml      + GPTQ weights
#   tutorial_c_rotsearch  recipes/tutorial_c_rotsearch.toml + online-Hadamard rotation search
#   mxfp4_a_rtn           recipes/mxfp4_a_rtn.toml          the same three with MXFP4 (E2M1)
#   mxfp4_b_gptq          recipes/mxfp4_b_gptq.toml
#   mxfp4_c_rotsearch     recipes/mxfp4_c_rotsearch.toml
#   tutorial_a_symmetric  recipes/tutorial_a_symmetric.toml config A with the symmetric MXINT rule
#   d_mxint4, d_mxfp4     recipes/d_*.toml                  config D (issue 22): C + the mse scale
#                         rule + GPTQ refit on quantized inputs (its own GPTQ checkpoint and cache)
# then `mxptq report ... > DIR/summary.md` and `scripts/plot_progression.py DIR`
# (DIR/progression.png, DIR/table.md). Each run's process wall time and exit status go to
# DIR/<config>/process.tsv (so results of separate invocations can be merged by copying config
# directories) and are appended to the log DIR/timings.tsv.
#
# Every mxptq command runs with DIR as its working directory: the recipes' relative
# [gptq].checkpoint_dir and [rotation_search].cache_path (the tutorial's
# "tutorial_7_output/checkpoints/...", the MXFP4 recipes' "mxfp4_output/checkpoints/...") land
# inside DIR, B and C share their GPTQ checkpoint (as in the tutorial), and a rerun with the same
# DIR resumes from them. Give other paths in extra flags as absolute paths (--data-dir is
# made absolute here).
#
# Options:
#   --model M        model for every run (default smollm2-135m, the packaged demo model)
#   --out DIR        output directory (default reproduce_output)
#   --limit N        evaluate only the first N wikitext test documents (CI smoke runs);
#                    default: the full test split
#   --device D       auto | cpu | cuda | cuda:N (default: mxptq's auto)
#   --configs LIST   comma-separated subset of the configs above, run in the order above
#   --recipe-dir D   read <config>.toml from D instead of this checkout's recipes/ (variants of
#                    the progression, e.g. fewer calibration samples for a CI smoke run)
#   --resume         skip a config whose DIR/<config>/report.json already exists
#   --bundle FILE    finally write FILE (.tar.gz) with the reports, summary.md, table.md,
#                    progression.png, timings and rotation caches -- no checkpoints
#   --dry-run        print the commands, run nothing
#   anything else    passed to every mxptq run (e.g. --dtype float16 --data-dir DIR --force);
#                    use flags that both `quantize` and `eval-ppl` accept
# Environment: PYTHON (default: python, else python3) runs mxptq from this checkout;
# MXPTQ_DATA_DIR / MXPTQ_DEMO_GGUF as for mxptq itself.
# Exit status: 0, or the exit status of the first command that failed (later ones do not run).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ALL_CONFIGS=(fp tutorial_a_rtn tutorial_b_gptq tutorial_c_rotsearch
             mxfp4_a_rtn mxfp4_b_gptq mxfp4_c_rotsearch tutorial_a_symmetric d_mxint4 d_mxfp4)

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }
die() { echo "error: $*" >&2; exit 2; }
absolute() { case $1 in /*) printf '%s\n' "$1" ;; *) printf '%s\n' "$PWD/$1" ;; esac; }

MODEL=smollm2-135m
OUT_DIR=reproduce_output
LIMIT=""
DEVICE=""
CONFIGS=""
RECIPE_DIR="$REPO/recipes"
RESUME=0
BUNDLE=""
DRY_RUN=0
EXTRA=()
while [ $# -gt 0 ]; do
  case $1 in
    -h|--help) usage; exit 0 ;;
    --model|--out|--limit|--device|--configs|--recipe-dir|--bundle|--data-dir)
      [ $# -ge 2 ] && [ "${2#--}" = "$2" ] || die "$1 needs a value"
      opt=$1; val=$2; shift 2 ;;
    --model=*|--out=*|--limit=*|--device=*|--configs=*|--recipe-dir=*|--bundle=*|--data-dir=*)
      opt=${1%%=*}; val=${1#*=}; shift ;;
    --resume) RESUME=1; shift; continue ;;
    --dry-run) DRY_RUN=1; shift; continue ;;
    *) EXTRA+=("$1"); shift; continue ;;
  esac
  case $opt in
    --model) MODEL=$val ;;
    --out) OUT_DIR=$val ;;
    --limit) LIMIT=$val ;;
    --device) DEVICE=$val ;;
    --configs) CONFIGS=$val ;;
    --recipe-dir) RECIPE_DIR=$(absolute "$val") ;;
    --bundle) BUNDLE=$(absolute "$val") ;;
    --data-dir) EXTRA+=(--data-dir "$(absolute "$val")") ;;
  esac
done
case $LIMIT in ''|*[!0-9]*) [ -z "$LIMIT" ] || die "--limit must be a positive integer, got '$LIMIT'" ;; esac
[ "$LIMIT" != 0 ] || die "--limit must be a positive integer, got '0'"

# The configs to run, in the canonical order.
SELECTED=()
if [ -z "$CONFIGS" ]; then
  SELECTED=("${ALL_CONFIGS[@]}")
else
  IFS=, read -r -a wanted <<< "$CONFIGS"
  for name in "${wanted[@]}"; do
    case " ${ALL_CONFIGS[*]} " in *" $name "*) ;; *)
      die "--configs: unknown config '$name'; allowed: $(IFS=,; echo "${ALL_CONFIGS[*]}")" ;; esac
  done
  for name in "${ALL_CONFIGS[@]}"; do
    case ",$CONFIGS," in *",$name,"*) SELECTED+=("$name") ;; esac
  done
  [ ${#SELECTED[@]} -gt 0 ] || die "--configs: no config named; allowed: $(IFS=,; echo "${ALL_CONFIGS[*]}")"
fi

for name in "${SELECTED[@]}"; do
  [ "$name" = fp ] || [ -f "$RECIPE_DIR/$name.toml" ] || die "recipe $RECIPE_DIR/$name.toml not found"
done

# A local model directory or .gguf file is given relative to where the script was called.
if [ -e "$MODEL" ]; then MODEL=$(absolute "$MODEL"); fi
OUT_DIR=$(absolute "$OUT_DIR")
if [ -z "${PYTHON:-}" ]; then
  if command -v python >/dev/null 2>&1; then PYTHON=python; else PYTHON=python3; fi
fi
# This checkout's mxptq, whatever the working directory (mxptq runs from OUT_DIR).
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
# Plain log lines instead of progress bars when stderr is not a terminal (CI, batch jobs).
if [ ! -t 2 ]; then export MXPTQ_NO_PROGRESS=1; fi

COMMON=(--model "$MODEL")
[ -z "$LIMIT" ] || COMMON+=(--limit "$LIMIT")
[ -z "$DEVICE" ] || COMMON+=(--device "$DEVICE")
COMMON+=(${EXTRA[@]+"${EXTRA[@]}"})

# The unquantized baseline is its own run, so the quantize runs skip theirs when mxptq has the flag.
NO_FP_EVAL=()
QUANTIZE_HELP=$("$PYTHON" -m mxptq quantize --help 2>/dev/null || true)
case $QUANTIZE_HELP in *--no-fp-eval*) NO_FP_EVAL=(--no-fp-eval) ;; esac

command_for() {  # config name -> the mxptq command line (as words in CMD)
  local name=$1
  if [ "$name" = fp ]; then
    CMD=("$PYTHON" -m mxptq eval-ppl "${COMMON[@]}" --out "$OUT_DIR/$name")
  else
    CMD=("$PYTHON" -m mxptq quantize "$RECIPE_DIR/$name.toml" "${COMMON[@]}" --out "$OUT_DIR/$name"
         ${NO_FP_EVAL[@]+"${NO_FP_EVAL[@]}"})
  fi
}

START=$(date +%s)
finish() {
  local rc=$?
  echo "total wall time: $(( $(date +%s) - START )) s (exit status $rc)"
  exit $rc
}
trap finish EXIT

echo "reproduce_tutorial: model=$MODEL out=$OUT_DIR limit=${LIMIT:-full split} device=${DEVICE:-auto}"
echo "configs: ${SELECTED[*]}"
if [ $DRY_RUN = 1 ]; then
  for name in "${SELECTED[@]}"; do
    command_for "$name"
    printf '(cd %q &&' "$OUT_DIR"; printf ' %q' "${CMD[@]}"; printf ')\n'
  done
  exit 0
fi

mkdir -p "$OUT_DIR"
TIMINGS="$OUT_DIR/timings.tsv"
[ -f "$TIMINGS" ] || printf 'config\twall_s\texit_status\tcommand\n' > "$TIMINGS"
step=0
for name in "${SELECTED[@]}"; do
  step=$((step + 1))
  if [ $RESUME = 1 ] && [ -f "$OUT_DIR/$name/report.json" ]; then
    echo "==> [$step/${#SELECTED[@]}] $name: report exists, skipped (--resume)"
    continue
  fi
  command_for "$name"
  echo "==> [$step/${#SELECTED[@]}] $name: ${CMD[*]}"
  t0=$(date +%s.%N)
  set +e
  (cd "$OUT_DIR" && "${CMD[@]}")
  rc=$?
  set -e
  wall=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
  row=$(printf '%s\t%s\t%s\t%s' "$name" "$wall" "$rc" "${CMD[*]}")
  echo "$row" >> "$TIMINGS"
  mkdir -p "$OUT_DIR/$name"
  printf 'config\twall_s\texit_status\tcommand\n%s\n' "$row" > "$OUT_DIR/$name/process.tsv"
  if [ $rc -ne 0 ]; then
    echo "error: $name failed with exit status $rc after ${wall} s" >&2
    exit $rc
  fi
  echo "    $name done in ${wall} s"
done

REPORTS=()
for name in "${SELECTED[@]}"; do
  [ ! -f "$OUT_DIR/$name/report.json" ] || REPORTS+=("$OUT_DIR/$name/report.json")
done
[ ${#REPORTS[@]} -gt 0 ] || die "no report.json under $OUT_DIR"
"$PYTHON" -m mxptq report --markdown "${REPORTS[@]}" > "$OUT_DIR/summary.md"
echo "summary: $OUT_DIR/summary.md"
cat "$OUT_DIR/summary.md"
"$PYTHON" "$REPO/scripts/plot_progression.py" "$OUT_DIR"

if [ -n "$BUNDLE" ]; then
  # Only the small result files: reports, tables, plot, timings, rotation decisions.
  (cd "$OUT_DIR" && find . \( -path '*/checkpoint' -prune \) -o -type f \
      \( -name report.json -o -name summary.md -o -name table.md -o -name progression.png \
         -o -name timings.tsv -o -name process.tsv -o -name rotation_decisions.json \) -print | sort \
    | tar -czf "$BUNDLE" -T -)
  echo "bundle: $BUNDLE ($(du -h "$BUNDLE" | cut -f1))"
fi
