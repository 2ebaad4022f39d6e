// Helpers shared by the kernel files: warp and block reductions in a fixed
// order (so that a result depends on the inputs and the launch
// configuration alone, never on scheduling).

#pragma once

#include "portable.cuh"

#define STRIDE_FULL_MASK 0xffffffffu
#define STRIDE_WARP 32

// Butterfly sum over the 32 lanes of a full warp. Every lane ends with the
// same bits: at each step a lane and its partner add the same two values.
STRIDE_DEVICE float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    v += __shfl_xor_sync(STRIDE_FULL_MASK, v, offset);
  }
  return v;
}

STRIDE_DEVICE float warp_max(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    v = fmaxf(v, __shfl_xor_sync(STRIDE_FULL_MASK, v, offset));
  }
  return v;
}

// Sum over a block of whole warps (1-D, blockDim.x a multiple of 32): each
// warp's butterfly sum, then warp 0 sums the warps' totals in a butterfly.
// Every thread of the block must call it, from the same place; every
// thread gets the same value.
STRIDE_DEVICE float block_sum(float v) {
  __shared__ float warp_totals[STRIDE_WARP];
  __shared__ float total;
  const int lane = threadIdx.x % STRIDE_WARP;
  const int warp = threadIdx.x / STRIDE_WARP;
  const int warps = blockDim.x / STRIDE_WARP;
  v = warp_sum(v);
  if (lane == 0) {
    warp_totals[warp] = v;
  }
  __syncthreads();
  if (warp == 0) {
    float s = lane < warps ? warp_totals[lane] : 0.0f;
    s = warp_sum(s);
    if (lane == 0) {
      total = s;
    }
  }
  __syncthreads();
  float result = total;
  // Nobody writes warp_totals or total again before everyone has read.
  __syncthreads();
  return result;
}

// Maximum over a block, as block_sum.
STRIDE_DEVICE float block_max(float v) {
  __shared__ float warp_maxima[STRIDE_WARP];
  __shared__ float maximum;
  const int lane = threadIdx.x % STRIDE_WARP;
  const int warp = threadIdx.x / STRIDE_WARP;
  const int warps = blockDim.x / STRIDE_WARP;
  v = warp_max(v);
  if (lane == 0) {
    warp_maxima[warp] = v;
  }
  __syncthreads();
  if (warp == 0) {
    float m = lane < warps ? warp_maxima[lane] : stride_neg_inf();
    m = warp_max(m);
    if (lane == 0) {
      maximum = m;
    }
  }
  __syncthreads();
  float result = maximum;
  __syncthreads();
  return result;
}

// The global index of this thread in a 1-D grid, as a 64-bit value.
STRIDE_DEVICE long long global_index() {
  return (long long)blockIdx.x * blockDim.x + threadIdx.x;
}
