#!/usr/bin/env bash
# The main job: sets everything up (scripts/setup.sh), then runs the embedded default model
# (SmolLM2-135M-Instruct) on the identity path and along a repeated layer path (RYS 7..9 twice).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PROMPT="${1:-What is 12 * 7? Answer with the number.}"
.venv/bin/circuit-finder generate --chat --max-new-tokens 48 \
  --layers "0..29" --layers "0..9,7..9,10..29" "$PROMPT"
