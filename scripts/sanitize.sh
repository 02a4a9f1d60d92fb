#!/usr/bin/env bash
# Builds the extension with AddressSanitizer + UndefinedBehaviorSanitizer (CMake option
# CF_SANITIZE, build dir build/asan), runs the tests that exercise the C++ core under it, then
# puts the normal build back. Any sanitizer report fails the run (halt_on_error).
#   bash scripts/sanitize.sh                 # the C++-touching tests
#   bash scripts/sanitize.sh tests/test_parity.py -k llama   # or any pytest selection
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >/dev/null
VPY=.venv/bin/python
restore() { "$VPY" -m pip install -q --no-build-isolation --no-deps -e . ; }
trap restore EXIT
"$VPY" -m pip install -q --no-build-isolation --no-deps -e . -Cbuild-dir=build/asan -Ccmake.define.CF_SANITIZE=ON
ASAN_LIB=$(gcc -print-file-name=libasan.so)
UBSAN_LIB=$(gcc -print-file-name=libubsan.so)
TESTS=("$@")
if [ ${#TESTS[@]} -eq 0 ]; then
  TESTS=(tests/test_safetensors.py tests/test_errors.py tests/test_layer_path.py tests/test_parity.py
         tests/test_gguf.py tests/test_sweep.py tests/test_export.py tests/test_fuzz.py tests/test_kernels.py
         tests/test_static_decode.py -m "not slow")
fi
# make sure the instrumented build is the one Python loads
LD_PRELOAD="$ASAN_LIB:$UBSAN_LIB" ASAN_OPTIONS=detect_leaks=0 "$VPY" -c "
import sys, subprocess, circuit_finder._C as c
out = subprocess.run(['nm', '-D', c.__file__], capture_output=True, text=True).stdout
sys.exit(0 if '__asan_report' in out else 'the loaded extension is not built with ASan: ' + c.__file__)"
# Python and torch are not instrumented: leaks at exit and new/delete pairing across libraries
# are theirs, so those two checks are off; everything in our code is checked.
LD_PRELOAD="$ASAN_LIB:$UBSAN_LIB" \
ASAN_OPTIONS=detect_leaks=0:alloc_dealloc_mismatch=0:halt_on_error=1:abort_on_error=1 \
UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
  "$VPY" -m pytest -q -p no:cacheprovider "${TESTS[@]}"
