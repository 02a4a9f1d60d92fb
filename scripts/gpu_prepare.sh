#!/usr/bin/env bash
# Run on the development machine (after scripts/setup.sh) before a GPU session: gathers what the
# GPU machine's image lacks into two git-ignored folders that the device tool carries
# (carry: [".whl", ".cftok"]), for scripts/gpu_session.sh to use there:
#   .whl/   wheels of the pure-Python packages missing there: gguf (the packed-weights tests and
#           benchmark, GGUF fixtures) at this checkout's version, nlohmann-json (the build's headers),
#           plotly and narwhals (a required dependency: the interactive heatmap), and the server's
#           stack (fastapi, uvicorn, pydantic and what they need: the server and CLI tests), at the
#           versions here
#   .cftok/ the default model's tokenizer (benchmarks' chat prompts; CF_TEST_TOKENIZER)
# Then, through the device tool: bash scripts/gpu_session.sh build gputests packed quant qproducts bench
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
version() { $PY -c "import importlib.metadata as m; print(m.version('$1'))"; }
rm -rf .whl .cftok
mkdir -p .whl
SERVER="fastapi starlette uvicorn click h11 annotated-doc pydantic pydantic-core annotated-types typing-inspection
  typing-extensions opentelemetry-api anyio httpx httpcore idna certifi sniffio"
pins=("gguf==$(version gguf)" nlohmann-json "plotly==$(version plotly)" "narwhals==$(version narwhals)")
for p in $SERVER; do pins+=("$p==$(version "$p")"); done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl "${pins[@]}"
$PY -c "import circuit_finder as cf; cf.load('default').tokenizer.save_pretrained('.cftok')" > /dev/null
du -sh .whl .cftok
