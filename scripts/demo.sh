#!/usr/bin/env bash
# The main job: sets everything up (scripts/setup.sh), then sweeps RYS configs of the embedded
# default model (SmolLM2-135M-Instruct, 30 layers) on the math, eq and reasoning probes in
# likelihood mode: prints the top configs with 95% paired bootstrap CIs, re-scores the top 3 on
# held-out items, and writes runs/demo-heatmap.png. Results go to runs/demo-sweep.jsonl; running
# it again resumes from that file. A few minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
mkdir -p runs
.venv/bin/circuit-finder sweep --mode likelihood --block-sizes 2 4 6 8 --stride 4 --max-items 6 \
  --top 8 --validate 3 --out runs/demo-sweep.jsonl --heatmap runs/demo-heatmap.png "$@"
