// Reductions and casts: the second pass of the column sums (block partials
// added in order), the sum of squares of a vector (the gradient norm), and
// the f32 ↔ bf16 casts. Launch configurations: src/launch.rs.

#include "common.cuh"

// acc[j] += Σ_k partials[k·stride + at + j] for j < w, the blocks k added
// in order 0, 1, ... to acc's value: the CPU's reduce_blocks. One thread
// per column, 1-D grid.
extern "C" __global__ void stride_reduce_partials_f32(
    float *__restrict__ acc, const float *__restrict__ partials, int blocks,
    int stride, int at, int w) {
  const long long j = global_index();
  if (j >= w) {
    return;
  }
  float s = acc[j];
  for (int k = 0; k < blocks; k++) {
    s += partials[(size_t)k * stride + at + j];
  }
  acc[j] = s;
}
STRIDE_EMU_LAUNCHER(reduce_partials_f32)

// Sum of squares, first pass: block k sums x[i]² over the grid-stride
// loop i = k·blockDim.x + threadIdx.x, then + gridDim.x·blockDim.x, ...
// (each thread in order, then a fixed butterfly over the block) into
// partials[k]. The grid is a function of n alone (src/launch.rs), so the
// result is too.
extern "C" __global__ void stride_sumsq_partials_f32(
    float *__restrict__ partials, const float *__restrict__ x, long long n) {
  const long long stride = (long long)gridDim.x * blockDim.x;
  float s = 0.0f;
  for (long long i = global_index(); i < n; i += stride) {
    s += x[i] * x[i];
  }
  s = block_sum(s);
  if (threadIdx.x == 0) {
    partials[blockIdx.x] = s;
  }
}
STRIDE_EMU_LAUNCHER(sumsq_partials_f32)

// Sum of squares, second pass: one block adds the `count` partials (each
// thread its strided share in order, then the butterfly) into out[0].
extern "C" __global__ void stride_sumsq_final_f32(
    float *__restrict__ out, const float *__restrict__ partials, int count) {
  float s = 0.0f;
  for (int i = threadIdx.x; i < count; i += blockDim.x) {
    s += partials[i];
  }
  s = block_sum(s);
  if (threadIdx.x == 0) {
    out[0] = s;
  }
}
STRIDE_EMU_LAUNCHER(sumsq_final_f32)

// f32 → bf16, round to nearest even (the weight refresh).
extern "C" __global__ void stride_cast_f32_to_bf16(bf16 *__restrict__ out,
                                                   const float *__restrict__ x,
                                                   long long n) {
  const long long i = global_index();
  if (i < n) {
    out[i] = from_f32<bf16>(x[i]);
  }
}
STRIDE_EMU_LAUNCHER(cast_f32_to_bf16)

// bf16 → f32 (exact).
extern "C" __global__ void stride_cast_bf16_to_f32(float *__restrict__ out,
                                                   const bf16 *__restrict__ x,
                                                   long long n) {
  const long long i = global_index();
  if (i < n) {
    out[i] = to_f32(x[i]);
  }
}
STRIDE_EMU_LAUNCHER(cast_bf16_to_f32)
