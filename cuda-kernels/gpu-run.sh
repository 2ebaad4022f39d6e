#!/usr/bin/env bash
# The GPU check of stride-cuda-kernels, on a machine with an NVIDIA GPU of
# compute capability 9.0 (H100, H200), a driver for CUDA 13 (R580 or newer)
# and CUDA 13 libraries (cuBLASLt: a toolkit, or PyTorch's nvidia-* wheels),
# but no Rust: it runs the test binary check.sh built here,
# target/cuda-kernels-gpu/gpu-tests (tests/gpu.rs: every kernel against the
# emulator, cuBLASLt against matmul::host, the fatbin's loading).
#
# From the repository root:
#
#   bash cuda-kernels/gpu-run.sh              # every GPU test (~1-2 min)
#   bash cuda-kernels/gpu-run.sh attention    # those whose name has "attention"
#   bash cuda-kernels/gpu-run.sh --sanitize   # also compute-sanitizer's memcheck,
#                                             # racecheck and synccheck over the
#                                             # kernels' tests (not cuBLASLt's)
#
# On a lent device machine: run(command="bash cuda-kernels/gpu-run.sh",
# carry=["target/cuda-kernels-gpu"]). The log goes to $OUT (the device
# tool's folder) when set, else /tmp. Exit status: 0 all passed, 1 a test
# failed, 2 a library or the binary is missing.
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BIN="${STRIDE_GPU_TESTS:-$ROOT/target/cuda-kernels-gpu/gpu-tests}"
LOG_DIR="${OUT:-/tmp}"
if [ ! -x "$BIN" ]; then
  echo "no test binary at $BIN: bash cuda-kernels/check.sh builds it (into" \
    "target/cuda-kernels-gpu/), which must travel with the tree (carry it)" >&2
  exit 2
fi
SANITIZE=0
FILTER=()
for arg in "$@"; do
  case "$arg" in
    --sanitize) SANITIZE=1 ;;
    *) FILTER+=("$arg") ;;
  esac
done

# Where CUDA 13 libraries live on such a machine (as .ci/gpu-run): the
# driver's folders, PyTorch's nvidia-* wheels, a toolkit.
dirs=()
for d in /usr/local/nvidia/lib64 /usr/local/nvidia/lib; do
  [ -d "$d" ] && dirs+=("$d")
done
for py in python3 python; do
  site="$($py -c 'import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))' 2>/dev/null)" || continue
  for d in "$site"/nvidia/*/lib "$site"/nvidia/cu13/lib "$site/torch/lib"; do
    [ -d "$d" ] && dirs+=("$d")
  done
  break
done
for d in /usr/local/cuda/lib64 /usr/local/cuda-13*/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/lib/x86_64-linux-gnu; do
  [ -d "$d" ] && dirs+=("$d")
done
LD_LIBRARY_PATH="$(IFS=:; echo "${dirs[*]}")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export LD_LIBRARY_PATH
missing="$(ldd "$BIN" 2>/dev/null | awk '/not found/ {print $1}' | sort -u)"
if [ -n "$missing" ]; then
  echo "missing libraries (searched: $LD_LIBRARY_PATH):"
  for lib in $missing; do
    case "$lib" in
      libcuda.so*) from="the NVIDIA driver" ;;
      libcublas*) from="pip install nvidia-cublas (13.x), or a CUDA 13 toolkit" ;;
      *) from="a CUDA 13 toolkit" ;;
    esac
    echo "  $lib — from $from"
  done
  exit 2
fi
nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total --format=csv,noheader 2>/dev/null |
  sed 's/^/gpu: /'

status=0
LOG="$LOG_DIR/cuda-kernels-gpu-tests.log"
echo "== GPU tests (log: $LOG)"
STRIDE_TEST_CUDA=1 "$BIN" --ignored --test-threads 1 --nocapture ${FILTER[@]+"${FILTER[@]}"} 2>&1 | tee "$LOG"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

if [ "$SANITIZE" = 1 ]; then
  if ! command -v compute-sanitizer > /dev/null; then
    echo "compute-sanitizer is not on PATH" >&2
    status=1
  else
    for tool in memcheck racecheck synccheck; do
      SLOG="$LOG_DIR/cuda-kernels-sanitizer-$tool.log"
      echo "== compute-sanitizer --tool $tool over the kernels' tests (log: $SLOG)"
      STRIDE_TEST_CUDA=1 compute-sanitizer --tool "$tool" --error-exitcode 9 \
        "$BIN" --ignored --test-threads 1 --skip matmul ${FILTER[@]+"${FILTER[@]}"} > "$SLOG" 2>&1
      rc=$?
      grep -E '^(=========.*(ERROR|errors|hazard)|test result)' "$SLOG" | tail -5
      [ "$rc" -eq 0 ] || { echo "$tool: exit $rc"; status=1; }
    done
  fi
fi

echo
echo "stride-cuda-kernels GPU check: $(grep -E '^test result' "$LOG" | tail -1)"
exit $status
