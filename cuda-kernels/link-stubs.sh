# Sourced by check.sh (after .ci/cuda-env.sh), from the workspace root:
# link stubs of the CUDA libraries that `--features cuda` links, for this
# machine, which has no NVIDIA driver (libcuda) and whose CUDA wheels hold
# no cuBLAS, cuRAND or NVRTC.
#
# cudarc, with Candle's features (dynamic-linking), links libcuda, libnvrtc,
# libcurand, libcublas and libcublasLt. Each stub here has the library's
# soname (libcuda.so.1, libnvrtc.so.13, libcurand.so.10, libcublas.so.13,
# libcublasLt.so.13) and every function cudarc declares for it, read from
# cudarc's sources; so the test binaries link here and, where they run,
# load the real libraries by soname (a GPU machine: the driver, and CUDA 13
# libraries from a toolkit or PyTorch's nvidia-* wheels). Each stub function
# prints its name and aborts: a stub never pretends to be the library.
#
# Exports STRIDE_CUDA_LINK_DIR (build.rs adds it to the linker's search
# path). Running a test binary here needs LD_LIBRARY_PATH=$STRIDE_CUDA_LINK_DIR
# (to load at all); calling into CUDA there aborts with the stub's message.
STRIDE_CUDA_LINK_DIR="${CARGO_TARGET_DIR:-$PWD/target}/cuda-kernels-link-stubs"
export STRIDE_CUDA_LINK_DIR
mkdir -p "$STRIDE_CUDA_LINK_DIR"
CUDARC_SRC="$(cargo metadata --locked --format-version 1 --features stride-cuda-kernels/cuda |
  python3 -c 'import json, os, sys; print(next(os.path.dirname(p["manifest_path"]) for p in json.load(sys.stdin)["packages"] if p["name"] == "cudarc"))')"
# name:soname:cudarc module:symbol prefix
for spec in cuda:libcuda.so.1:driver:cu nvrtc:libnvrtc.so.13:nvrtc:nvrtc \
  curand:libcurand.so.10:curand:curand cublas:libcublas.so.13:cublas:cublas \
  cublasLt:libcublasLt.so.13:cublaslt:cublasLt; do
  IFS=: read -r name soname module prefix <<< "$spec"
  sys="$CUDARC_SRC/src/$module/sys/mod.rs"
  test -f "$sys" || { echo "link-stubs: $sys not found" >&2; return 1; }
  lib="$STRIDE_CUDA_LINK_DIR/lib$name.so"
  if [ "$lib" -nt "$sys" ] && [ "$lib" -nt "${BASH_SOURCE[0]}" ]; then
    continue
  fi
  src="$STRIDE_CUDA_LINK_DIR/lib$name-stub.c"
  {
    echo '#include <stdio.h>'
    echo '#include <stdlib.h>'
    echo "static void stub(const char *f) { fprintf(stderr, \"%s: called the link stub of $soname (made by cuda-kernels/link-stubs.sh), not the CUDA library: run where the NVIDIA driver and CUDA 13 libraries are, without the stubs on LD_LIBRARY_PATH\\n\", f); abort(); }"
    grep -oP "^\s+fn \K${prefix}\w+(?=\()" "$sys" | sort -u | sed 's/.*/void &(void) { stub("&"); }/'
  } > "$src"
  cc -shared -fPIC -O1 -Wl,-soname,"$soname" -o "$lib" "$src"
  ln -sf "lib$name.so" "$STRIDE_CUDA_LINK_DIR/$soname"
done
echo "link stubs: $STRIDE_CUDA_LINK_DIR ($(cd "$STRIDE_CUDA_LINK_DIR" && ls ./*.so | tr '\n' ' '))"
