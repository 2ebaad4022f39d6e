// Kernels that test the emulator itself (tests/emulator.rs): built into
// the emulator's library only, never into the GPU fatbin.

#include "common.cuh"

// out[i] = what lane i of its warp gets from each shuffle, for a block of
// whole warps: values are v = 1000·warp + lane.
//   mode 0: __shfl_xor_sync(v, arg)   mode 1: __shfl_down_sync(v, arg)
//   mode 2: __shfl_sync(v, arg)       mode 3: warp_sum of v (float)
//   mode 4: block_sum of v (float)    mode 5: block_max of v (float)
extern "C" __global__ void stride_test_shuffle(float *out, int mode, int arg) {
  const int lane = threadIdx.x % STRIDE_WARP;
  const int warp = threadIdx.x / STRIDE_WARP;
  const int v = 1000 * warp + lane;
  float r = 0.0f;
  switch (mode) {
  case 0:
    r = (float)__shfl_xor_sync(STRIDE_FULL_MASK, v, arg);
    break;
  case 1:
    r = (float)__shfl_down_sync(STRIDE_FULL_MASK, v, arg);
    break;
  case 2:
    r = (float)__shfl_sync(STRIDE_FULL_MASK, v, arg);
    break;
  case 3:
    r = warp_sum((float)v);
    break;
  case 4:
    r = block_sum((float)v);
    break;
  default:
    r = block_max((float)v);
    break;
  }
  out[threadIdx.x] = r;
}
STRIDE_EMU_LAUNCHER(test_shuffle)

// The classic mistake: a barrier only some threads of the block reach
// (mode 0), or one warp's lanes split around a shuffle (mode 1). Both can
// never complete: the emulator reports a deadlock.
extern "C" __global__ void stride_test_divergent(float *out, int mode) {
  if (mode == 0) {
    if (threadIdx.x < 16) {
      __syncthreads();
    }
  } else if (threadIdx.x % STRIDE_WARP < 16) {
    out[threadIdx.x] = __shfl_xor_sync(STRIDE_FULL_MASK, 1.0f, 1);
    return;
  }
  out[threadIdx.x] = 1.0f;
}
STRIDE_EMU_LAUNCHER(test_divergent)

// Barriers every thread reaches, but from two places in the source (mode
// 0), or a shuffle with a mask that does not name the warp's lanes (mode
// 1): undefined on the GPU, a misuse error in the emulator.
extern "C" __global__ void stride_test_misuse(float *out, int mode) {
  if (mode == 0) {
    if (threadIdx.x < 16) {
      __syncthreads();
    } else {
      __syncthreads();
    }
  } else {
    out[threadIdx.x] = __shfl_xor_sync(0x0000ffffu, 1.0f, 1);
  }
  out[threadIdx.x] = 1.0f;
}
STRIDE_EMU_LAUNCHER(test_misuse)

// Every thread writes its indices and the block's and grid's sizes:
// out[9·g + ...] for the global thread number g (x fastest, blocks in
// x, y, z order); and reads the dynamic shared memory before writing it
// (`poison`: the emulator fills it with all-ones bytes).
extern "C" __global__ void stride_test_indices(unsigned *out,
                                               unsigned *poison) {
  STRIDE_DYNAMIC_SHARED(smem);
  const unsigned threads = blockDim.x * blockDim.y * blockDim.z;
  const unsigned block =
      blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  const unsigned t =
      threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  unsigned *o = out + 9 * (block * threads + t);
  o[0] = threadIdx.x;
  o[1] = threadIdx.y;
  o[2] = threadIdx.z;
  o[3] = blockIdx.x;
  o[4] = blockIdx.y;
  o[5] = blockIdx.z;
  o[6] = blockDim.x * 10000 + blockDim.y * 100 + blockDim.z;
  o[7] = gridDim.x * 10000 + gridDim.y * 100 + gridDim.z;
  o[8] = threads;
  if (t == 0) {
    poison[block] = reinterpret_cast<unsigned *>(smem)[0];
  }
  __syncthreads();
  reinterpret_cast<unsigned *>(smem)[t] = t;
}
STRIDE_EMU_LAUNCHER(test_indices)
