# Sourced by .ci/cuda-check and .ci/gpu-bundle: the CUDA 13 toolkit from
# NVIDIA's PyPI wheels, pinned, into target/cuda-venv (nothing is installed
# outside the repository), and the environment Candle's and cudarc's build
# scripts read. No GPU is needed: the kernels are compiled for H100
# (compute capability 9.0).
export CARGO_TERM_COLOR=never
VENV=target/cuda-venv
if [ ! -x "$VENV/bin/pip" ]; then
  python3 -m venv "$VENV"
fi
# The package that holds libnvvm is nvidia-nvvm (there is no nvidia-cuda-nvvm).
"$VENV/bin/pip" install --quiet --disable-pip-version-check \
  nvidia-cuda-nvcc==13.2.86 nvidia-cuda-cccl==13.2.86 nvidia-cuda-crt==13.2.86 \
  nvidia-nvvm==13.2.86 nvidia-cuda-runtime==13.2.86

SITE="$(cd "$VENV" && pwd)/lib/python3.$("$VENV/bin/python" -c 'import sys; print(sys.version_info.minor)')/site-packages"
CUDA="$SITE/nvidia/cu13"
test -x "$CUDA/bin/nvcc" || { echo "nvcc not found under $CUDA" >&2; exit 1; }
export CUDA_ROOT="$CUDA" CUDA_HOME="$CUDA" CUDA_PATH="$CUDA" PATH="$CUDA/bin:$PATH"
export CUDA_COMPUTE_CAP=90
"$CUDA/bin/nvcc" --version | tail -2
