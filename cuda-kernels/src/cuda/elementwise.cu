// Elementwise kernels (GELU forward and backward, the residual add) and the
// first pass of the column sums (bias gradients). One element per thread
// over a 1-D grid. Launch configurations: src/launch.rs.

#include "common.cuh"

// The CPU's constants: f64 expressions rounded once to f32.
#define GELU_K 0.7978845608028654 // √(2/π)
#define GELU_A 0.044715
#define GELU_A_F ((float)GELU_A)
#define GELU_MINUS_2K ((float)(-2.0 * GELU_K))
#define GELU_2K ((float)(2.0 * GELU_K))
#define GELU_3A ((float)(3.0 * GELU_A))

// GELU, tanh form, as x·σ(2u): out = x / (1 + e^(−2u)),
// u = √(2/π)(x + 0.044715x³). The same operations in the same order as the
// CPU kernel (whose e^x is a polynomial within 2 ulp; expf here).
template <class T>
STRIDE_DEVICE void gelu_forward(T *__restrict__ out, const T *__restrict__ inp,
                                long long n) {
  const long long i = global_index();
  if (i >= n) {
    return;
  }
  const float x = to_f32(inp[i]);
  const float u = x + GELU_A_F * x * x * x;
  out[i] = from_f32<T>(x / (1.0f + expf(GELU_MINUS_2K * u)));
}

extern "C" __global__ void stride_gelu_forward_f32(float *out, const float *inp,
                                                   long long n) {
  gelu_forward<float>(out, inp, n);
}
STRIDE_EMU_LAUNCHER(gelu_forward_f32)

extern "C" __global__ void stride_gelu_forward_bf16(bf16 *out, const bf16 *inp,
                                                    long long n) {
  gelu_forward<bf16>(out, inp, n);
}
STRIDE_EMU_LAUNCHER(gelu_forward_bf16)

// GELU backward in place: d holds dout and becomes dinp; inp is the
// forward's input. d·(s + x·s·(1 − s)·2k·(1 + 3a·x²)), s = σ(2u).
template <class T>
STRIDE_DEVICE void gelu_backward(T *__restrict__ d, const T *__restrict__ inp,
                                 long long n) {
  const long long i = global_index();
  if (i >= n) {
    return;
  }
  const float x = to_f32(inp[i]);
  const float u = x + GELU_A_F * x * x * x;
  const float s = 1.0f / (1.0f + expf(GELU_MINUS_2K * u));
  const float du = 1.0f + GELU_3A * x * x;
  const float g = to_f32(d[i]);
  d[i] = from_f32<T>(g * (s + x * s * (1.0f - s) * GELU_2K * du));
}

extern "C" __global__ void stride_gelu_backward_f32(float *d, const float *inp,
                                                    long long n) {
  gelu_backward<float>(d, inp, n);
}
STRIDE_EMU_LAUNCHER(gelu_backward_f32)

extern "C" __global__ void stride_gelu_backward_bf16(bf16 *d, const bf16 *inp,
                                                     long long n) {
  gelu_backward<bf16>(d, inp, n);
}
STRIDE_EMU_LAUNCHER(gelu_backward_bf16)

// out = a + b (the residual connection). out may be a or b.
template <class T>
STRIDE_DEVICE void add(T *out, const T *a, const T *b, long long n) {
  const long long i = global_index();
  if (i >= n) {
    return;
  }
  out[i] = from_f32<T>(to_f32(a[i]) + to_f32(b[i]));
}

extern "C" __global__ void stride_add_f32(float *out, const float *a,
                                          const float *b, long long n) {
  add<float>(out, a, b, n);
}
STRIDE_EMU_LAUNCHER(add_f32)

extern "C" __global__ void stride_add_bf16(bf16 *out, const bf16 *a,
                                           const bf16 *b, long long n) {
  add<bf16>(out, a, b, n);
}
STRIDE_EMU_LAUNCHER(add_bf16)

// Column sums, first pass: x is (N, W); block (k, y) sums rows
// 32k .. 32k + 31 of columns y·blockDim.x + threadIdx.x into partials[k]
// (f32, W per block): the first row, then the others added in order, as
// the CPU does. reduce_partials (reduce.cu) adds the blocks in order into
// the accumulator, so f32 gives the CPU's bits.
#define COLUMN_BLOCK_ROWS 32

template <class T>
STRIDE_DEVICE void column_sums(float *__restrict__ partials,
                               const T *__restrict__ x, int n, int w) {
  const int j = blockIdx.y * blockDim.x + threadIdx.x;
  if (j >= w) {
    return;
  }
  const long long first = (long long)blockIdx.x * COLUMN_BLOCK_ROWS;
  const long long end =
      n - first < COLUMN_BLOCK_ROWS ? (long long)n : first + COLUMN_BLOCK_ROWS;
  float acc = to_f32(x[first * w + j]);
  for (long long i = first + 1; i < end; i++) {
    acc += to_f32(x[i * w + j]);
  }
  partials[(size_t)blockIdx.x * w + j] = acc;
}

extern "C" __global__ void stride_column_sums_f32(float *partials,
                                                  const float *x, int n,
                                                  int w) {
  column_sums<float>(partials, x, n, w);
}
STRIDE_EMU_LAUNCHER(column_sums_f32)

extern "C" __global__ void stride_column_sums_bf16(float *partials,
                                                   const bf16 *x, int n,
                                                   int w) {
  column_sums<bf16>(partials, x, n, w);
}
STRIDE_EMU_LAUNCHER(column_sums_bf16)
