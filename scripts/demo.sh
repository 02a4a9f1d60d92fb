#!/usr/bin/env bash
# The main job: sets everything up (scripts/setup.sh), then sweeps RYS configs of the embedded
# default model (SmolLM2-135M-Instruct, 30 layers) on the math, eq, reasoning and instruct probes
# in generate mode: prints the top configs with 95% paired bootstrap CIs, p, Benjamini-Hochberg q
# and parse rates, re-scores the top 2 on held-out items, prints the Pareto front over math and
# instruct and the sweep's reading in words, and writes runs/demo-heatmap.png and the interactive
# runs/demo-heatmap.html. Results go to runs/demo-generate.jsonl; running it again resumes from
# that file. About 5 minutes on 2 CPU cores (4.7 on 2026-11-25, set-up included; 9 on 2026-11-23, before the sweep batching).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
mkdir -p runs
.venv/bin/circuit-finder sweep --mode generate --probes math eq reasoning instruct \
  --block-sizes 2 4 6 8 --stride 4 --max-items 6 --top 8 --validate 2 --pareto math instruct \
  --out runs/demo-generate.jsonl --heatmap runs/demo-heatmap.png --html runs/demo-heatmap.html "$@"
