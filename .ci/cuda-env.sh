# Sourced by .ci/cuda-check and .ci/gpu-bundle: the CUDA 13 toolkit from
# NVIDIA's PyPI wheels, pinned, into target/cuda-venv-* (nothing is installed
# outside the repository), and the environment Candle's and cudarc's build
# scripts read. No GPU is needed: the kernels are compiled for H100
# (compute capability 9.0).
#
# CUDA 13.0, the first 13.x, on purpose: the PTX this toolkit writes
# (Candle's kernels, the composed engine's AdamW) is JIT-compiled by the
# driver, which accepts PTX only from its own CUDA release or older. PTX
# from nvcc 13.0 loads on every CUDA 13 driver (R580, 580.65.06 or newer);
# from 13.2 it would need the CUDA 13.2 driver (CUDA_ERROR_UNSUPPORTED_PTX_
# VERSION on R580, the branch PyTorch's CUDA 13 builds ask for). The fused
# kernels ship sm_90 SASS as well, which any CUDA 13 driver runs.
export CARGO_TERM_COLOR=never
# The toolkit's version is in the folder's name, so that every build script
# that watches CUDA_ROOT or NVCC (cudarc's, Candle's kernels', ours) runs
# again when the pin changes, instead of keeping PTX of the old one.
# (Candle's build keeps PTX files it finds newer than its sources: after
# changing the pin in an existing target/, `rm -rf target/*/build/
# candle-kernels-*` once.)
CUDA_RELEASE=13.0.88
VENV=target/cuda-venv-$CUDA_RELEASE
if [ ! -x "$VENV/bin/pip" ]; then
  python3 -m venv "$VENV"
fi
# The package that holds libnvvm is nvidia-nvvm (there is no nvidia-cuda-nvvm).
"$VENV/bin/pip" install --quiet --disable-pip-version-check \
  nvidia-cuda-nvcc==$CUDA_RELEASE nvidia-cuda-cccl==13.0.85 nvidia-cuda-crt==$CUDA_RELEASE \
  nvidia-nvvm==$CUDA_RELEASE nvidia-cuda-runtime==13.0.96

SITE="$(cd "$VENV" && pwd)/lib/python3.$("$VENV/bin/python" -c 'import sys; print(sys.version_info.minor)')/site-packages"
CUDA="$SITE/nvidia/cu13"
test -x "$CUDA/bin/nvcc" || { echo "nvcc not found under $CUDA" >&2; exit 1; }
export CUDA_ROOT="$CUDA" CUDA_HOME="$CUDA" CUDA_PATH="$CUDA" PATH="$CUDA/bin:$PATH"
export CUDA_COMPUTE_CAP=90
# cudarc's bindings for CUDA 13.0: it declares (and the binaries link) only
# driver and library entry points that a CUDA 13.0 install has.
export CUDARC_CUDA_VERSION=13000 NVCC="$CUDA/bin/nvcc"
"$CUDA/bin/nvcc" --version | tail -2
