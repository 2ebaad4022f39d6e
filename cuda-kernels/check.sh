#!/usr/bin/env bash
# Checks stride-cuda-kernels without a GPU:
#   1. fmt, clippy and every test with the kernels run by the CPU emulator;
#   2. the CUDA 13.0 toolkit from NVIDIA's PyPI wheels (.ci/cuda-env.sh,
#      into target/cuda-venv-*), then `--features cuda`: nvcc compiles every
#      kernel into one fatbin of sm_90 SASS and compute_90 PTX (build.rs
#      checks both are there; a test checks the cubin names every kernel),
#      and ptxas' report per kernel (registers, spills, shared memory);
#   3. the GPU layer (src/gpu, cudarc) and the GPU tests (tests/gpu.rs):
#      clippy with the feature, every test binary built and linked (against
#      link stubs of libcuda and the CUDA libraries, link-stubs.sh), the
#      unit tests run, the GPU tests listed (all ignored here), and the GPU
#      test binary copied to target/cuda-kernels-gpu/ for a GPU session
#      (cuda-kernels/gpu-run.sh runs it there; README).
# Prints how long each step took.
#
#   bash cuda-kernels/check.sh              # the above
#   bash cuda-kernels/check.sh --valgrind   # also every test binary under
#                                           # memcheck (the emulated kernels'
#                                           # memory accesses), ~1 minute
#   bash cuda-kernels/check.sh --cuobjdump  # also install cuobjdump and
#                                           # nvdisasm 13.2 (PyPI wheels, into
#                                           # target/cuda-kernels/tools-venv)
#                                           # and list the fatbin's contents
set -euo pipefail
cd "$(dirname "$0")"
ROOT="$(cd .. && pwd)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
export CARGO_TERM_COLOR=never
NICE=(nice -n 19)

VALGRIND=0
CUOBJDUMP=0
for arg in "$@"; do
  case "$arg" in
    --valgrind) VALGRIND=1 ;;
    --cuobjdump) CUOBJDUMP=1 ;;
    *) echo "unknown argument: $arg" >&2; exit 2 ;;
  esac
done

START=$(date +%s)
STEP=""
STEP_START=$START
step() {
  local now
  now=$(date +%s)
  if [ -n "$STEP" ]; then
    echo "   ($((now - STEP_START)) s: $STEP)"
  fi
  STEP="$*"
  STEP_START=$now
  if [ "$*" != "done" ]; then
    echo "== $*"
  fi
}

step "cargo fmt --check"
"${NICE[@]}" cargo fmt --check

step "cargo clippy --all-targets -- -D warnings"
"${NICE[@]}" cargo clippy --locked --all-targets -- -D warnings

step "cargo test (every kernel emulated on the CPU)"
"${NICE[@]}" cargo test --locked 2>&1 | tee "$CARGO_TARGET_DIR/check-tests.log" \
  | grep -E '^(test result|     Running|error|failures)' || true
if grep -qE 'test result: FAILED|^error' "$CARGO_TARGET_DIR/check-tests.log"; then
  echo "tests failed: $CARGO_TARGET_DIR/check-tests.log" >&2
  exit 1
fi
awk '/^test result:/ { p += $4; f += $6 } END { print "tests: " p " passed, " f " failed" }' \
  "$CARGO_TARGET_DIR/check-tests.log"

if [ "$VALGRIND" = 1 ]; then
  step "every test binary under valgrind memcheck (STRIDE_EMU_VALGRIND=1)"
  "${NICE[@]}" env STRIDE_EMU_VALGRIND=1 cargo test --locked --no-run --message-format=json 2>/dev/null \
    | python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] != ["custom-build"]:
        print(m["executable"])' > "$CARGO_TARGET_DIR/check-binaries.txt"
  while read -r binary; do
    case "$binary" in *portability*) continue ;; esac
    "${NICE[@]}" valgrind -q --error-exitcode=9 "$binary" --test-threads=1 \
      > "$CARGO_TARGET_DIR/check-valgrind.log" 2>&1 \
      || { cat "$CARGO_TARGET_DIR/check-valgrind.log"; exit 1; }
    echo "$(basename "$binary"): clean, $(grep '^test result:' "$CARGO_TARGET_DIR/check-valgrind.log")"
  done < "$CARGO_TARGET_DIR/check-binaries.txt"
  # Back to the ordinary build for what follows.
  "${NICE[@]}" cargo build --locked --tests -q
fi

step "CUDA 13.0 toolkit (.ci/cuda-env.sh: PyPI wheels into target/cuda-venv-*)"
pushd "$ROOT" > /dev/null
# shellcheck source=/dev/null
source .ci/cuda-env.sh
popd > /dev/null

step "link stubs of libcuda and the CUDA libraries cudarc links (link-stubs.sh)"
pushd "$ROOT" > /dev/null
# shellcheck source=/dev/null
source cuda-kernels/link-stubs.sh
popd > /dev/null

step "cargo build --features cuda (nvcc: every kernel into one sm_90 + compute_90 fatbin)"
"${NICE[@]}" cargo build --locked --features cuda
LOG="$(ls -t "$CARGO_TARGET_DIR"/debug/build/stride-cuda-kernels-*/out/nvcc.log | head -1)"
FATBIN="$(dirname "$LOG")/stride_kernels.fatbin"
echo "fatbin: $FATBIN ($(stat -c %s "$FATBIN") bytes); nvcc's report: $LOG"
# One line per kernel: registers, spills, barriers, static shared memory.
awk '/Compiling entry function/ { name = $7; arch = $9; gsub(/\047/, "", name); gsub(/\047/, "", arch) }
     /spill stores/ { spills = $5 " spill stores, " $9 " spill loads" }
     /Used [0-9]+ registers/ { sub(/.*Used /, "Used "); print "  " name " " arch ": " $0 ", " spills }' \
  "$LOG"
echo "kernels compiled for sm_90: $(grep -c "Compiling entry function .* for 'sm_90'" "$LOG")"
if grep -qiE 'warning|[1-9][0-9]* bytes spill' "$LOG"; then
  echo "nvcc or ptxas reported warnings or spills (above)"
fi

step "cargo clippy --features cuda (the GPU layer and its tests)"
"${NICE[@]}" cargo clippy --locked --all-targets --features cuda -- -D warnings

step "cargo test --features cuda --no-run, the unit tests, the GPU tests listed"
"${NICE[@]}" cargo test --locked --features cuda --no-run 2>&1 | grep -E '^(error|warning)' || true
# The binaries load the stubs here (the GPU tests are all ignored here).
LD_LIBRARY_PATH="$STRIDE_CUDA_LINK_DIR" "${NICE[@]}" cargo test --locked --features cuda --lib --test gpu \
  2>&1 | tee "$CARGO_TARGET_DIR/check-cuda-tests.log" | grep -E '^test result|FAILED|panicked|error'
if ! grep -q 'test result: ok' "$CARGO_TARGET_DIR/check-cuda-tests.log" \
  || grep -qE 'test result: FAILED|^error' "$CARGO_TARGET_DIR/check-cuda-tests.log"; then
  echo "tests with --features cuda failed: $CARGO_TARGET_DIR/check-cuda-tests.log" >&2
  exit 1
fi
GPU_TESTS="$("${NICE[@]}" cargo test --locked --features cuda --test gpu --no-run --message-format=json 2>/dev/null \
  | python3 -c 'import json, sys
exes = [m["executable"] for m in map(json.loads, sys.stdin) if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "gpu"]
print(exes[-1])')"
BUNDLE="$CARGO_TARGET_DIR/cuda-kernels-gpu"
mkdir -p "$BUNDLE"
cp "$GPU_TESTS" "$BUNDLE/gpu-tests"
strip "$BUNDLE/gpu-tests"
git -C "$ROOT" rev-parse HEAD > "$BUNDLE/COMMIT" 2>/dev/null || true
echo "GPU tests for a GPU session: $BUNDLE/gpu-tests ($(du -k "$BUNDLE/gpu-tests" | cut -f1) KiB," \
  "$(LD_LIBRARY_PATH="$STRIDE_CUDA_LINK_DIR" "$BUNDLE/gpu-tests" --list --ignored 2>/dev/null | grep -c ': test$') tests;" \
  "needs $(readelf -d "$BUNDLE/gpu-tests" | grep -oP 'NEEDED.*\[\K(libcu|libnv)[^]]+' | tr '\n' ' '))"

TOOLS="$CARGO_TARGET_DIR/cuda-tools-venv"
if [ "$CUOBJDUMP" = 1 ] && [ ! -x "$TOOLS/bin/pip" ]; then
  python3 -m venv "$TOOLS"
fi
if [ "$CUOBJDUMP" = 1 ]; then
  "$TOOLS/bin/pip" install --quiet --disable-pip-version-check \
    nvidia-cuda-cuobjdump==13.2.86 nvidia-cuda-nvdisasm==13.2.86
fi
TOOLS_BIN="$(ls -d "$TOOLS"/lib/python3.*/site-packages/nvidia/cu13/bin 2>/dev/null | head -1 || true)"
if [ -n "$TOOLS_BIN" ] && [ -x "$TOOLS_BIN/cuobjdump" ]; then
  step "cuobjdump on the fatbin"
  PATH="$TOOLS_BIN:$PATH"
  cuobjdump --list-elf "$FATBIN"
  cuobjdump --list-ptx "$FATBIN"
  # The PTX ISA the driver must accept (9.0: any CUDA 13 driver).
  echo "PTX $(cuobjdump --dump-ptx "$FATBIN" | grep -m1 '^\.version')"
  if [ -x "$TOOLS_BIN/nvdisasm" ]; then
    echo "SASS functions for sm_90: $(cuobjdump --dump-sass "$FATBIN" | grep -c 'Function :')"
  fi
fi

step "done"
echo "check.sh: all passed in $(( $(date +%s) - START )) s"
