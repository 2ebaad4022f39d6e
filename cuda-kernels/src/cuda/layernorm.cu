// LayerNorm over rows of C (ε = 1e-5), forward and backward, statistics
// and every reduction in f32. Launch configurations: src/launch.rs.

#include "common.cuh"

// Rows per block of the backward's partial sums: the CPU's BLOCK_ROWS, so
// both sum the same rows into a partial (not required, but it keeps the
// two close).
#define LN_BLOCK_ROWS 32

// out (N, C) = (x − mean)·rstd·w + b; mean (N) and rstd (N) in f32.
// One warp per row (blocks of whole warps, 1-D grid over rows); two passes
// over the row as on the CPU: the mean, then the variance around it.
template <class T>
STRIDE_DEVICE void layernorm_forward(T *__restrict__ out,
                                     float *__restrict__ mean,
                                     float *__restrict__ rstd,
                                     const T *__restrict__ inp,
                                     const T *__restrict__ w,
                                     const T *__restrict__ b, int n, int c) {
  const int lane = threadIdx.x % STRIDE_WARP;
  const long long row = (long long)blockIdx.x * (blockDim.x / STRIDE_WARP) +
                        threadIdx.x / STRIDE_WARP;
  // The whole warp leaves together: no lane is left at a shuffle.
  if (row >= n) {
    return;
  }
  const T *x = inp + row * c;
  float s = 0.0f;
  for (int j = lane; j < c; j += STRIDE_WARP) {
    s += to_f32(x[j]);
  }
  const float mu = warp_sum(s) / (float)c;
  float v = 0.0f;
  for (int j = lane; j < c; j += STRIDE_WARP) {
    const float d = to_f32(x[j]) - mu;
    v += d * d;
  }
  const float var = warp_sum(v);
  const float sd = 1.0f / sqrtf(var / (float)c + 1e-5f);
  T *o = out + row * c;
  for (int j = lane; j < c; j += STRIDE_WARP) {
    o[j] = from_f32<T>((to_f32(x[j]) - mu) * sd * to_f32(w[j]) + to_f32(b[j]));
  }
  if (lane == 0) {
    mean[row] = mu;
    rstd[row] = sd;
  }
}

extern "C" __global__ void
stride_layernorm_forward_f32(float *out, float *mean, float *rstd,
                             const float *inp, const float *w, const float *b,
                             int n, int c) {
  layernorm_forward<float>(out, mean, rstd, inp, w, b, n, c);
}
STRIDE_EMU_LAUNCHER(layernorm_forward_f32)

extern "C" __global__ void
stride_layernorm_forward_bf16(bf16 *out, float *mean, float *rstd,
                              const bf16 *inp, const bf16 *w, const bf16 *b,
                              int n, int c) {
  layernorm_forward<bf16>(out, mean, rstd, inp, w, b, n, c);
}
STRIDE_EMU_LAUNCHER(layernorm_forward_bf16)

// LayerNorm backward, first pass. Block k (1-D grid of ceil(N / 32)
// blocks of whole warps) takes rows 32k .. 32k + 31:
//  - dinp (N, C) += (w·g − mean(w·g) − norm·mean(w·g·norm))·rstd, one warp
//    per row;
//  - partials[k] (2C, f32) = [Σ norm·g | Σ g] over its rows, one thread per
//    column adding the rows in order. reduce_partials (reduce.cu) then adds
//    the blocks' partials in block order into dw and db: a fixed order, no
//    atomics.
template <class T>
STRIDE_DEVICE void layernorm_backward(
    T *__restrict__ dinp, float *__restrict__ partials,
    const T *__restrict__ dout, const T *__restrict__ inp,
    const T *__restrict__ w, const float *__restrict__ mean,
    const float *__restrict__ rstd, int n, int c) {
  const int lane = threadIdx.x % STRIDE_WARP;
  const int warp = threadIdx.x / STRIDE_WARP;
  const int warps = blockDim.x / STRIDE_WARP;
  const long long first = (long long)blockIdx.x * LN_BLOCK_ROWS;
  const int rows = (int)(n - first < LN_BLOCK_ROWS ? n - first : LN_BLOCK_ROWS);
  const float inv_c = 1.0f / (float)c;
  for (int r = warp; r < rows; r += warps) {
    const long long i = first + r;
    const T *x = inp + i * c;
    const T *g = dout + i * c;
    const float mu = mean[i];
    const float sd = rstd[i];
    float dn = 0.0f;
    float dnn = 0.0f;
    for (int j = lane; j < c; j += STRIDE_WARP) {
      const float norm = (to_f32(x[j]) - mu) * sd;
      const float d = to_f32(w[j]) * to_f32(g[j]);
      dn += d;
      dnn += d * norm;
    }
    const float dn_mean = warp_sum(dn) * inv_c;
    const float dnn_mean = warp_sum(dnn) * inv_c;
    T *dx = dinp + i * c;
    for (int j = lane; j < c; j += STRIDE_WARP) {
      const float norm = (to_f32(x[j]) - mu) * sd;
      const float d = to_f32(w[j]) * to_f32(g[j]);
      dx[j] = from_f32<T>(to_f32(dx[j]) + (d - dn_mean - norm * dnn_mean) * sd);
    }
  }
  float *pw = partials + (size_t)blockIdx.x * 2 * c;
  float *pb = pw + c;
  for (int j = threadIdx.x; j < c; j += blockDim.x) {
    float sw = 0.0f;
    float sb = 0.0f;
    for (int r = 0; r < rows; r++) {
      const long long i = first + r;
      const float gj = to_f32(dout[i * c + j]);
      const float norm = (to_f32(inp[i * c + j]) - mean[i]) * rstd[i];
      sw += norm * gj;
      sb += gj;
    }
    pw[j] = sw;
    pb[j] = sb;
  }
}

extern "C" __global__ void
stride_layernorm_backward_f32(float *dinp, float *partials, const float *dout,
                              const float *inp, const float *w,
                              const float *mean, const float *rstd, int n,
                              int c) {
  layernorm_backward<float>(dinp, partials, dout, inp, w, mean, rstd, n, c);
}
STRIDE_EMU_LAUNCHER(layernorm_backward_f32)

extern "C" __global__ void
stride_layernorm_backward_bf16(bf16 *dinp, float *partials, const bf16 *dout,
                               const bf16 *inp, const bf16 *w,
                               const float *mean, const float *rstd, int n,
                               int c) {
  layernorm_backward<bf16>(dinp, partials, dout, inp, w, mean, rstd, n, c);
}
STRIDE_EMU_LAUNCHER(layernorm_backward_bf16)
