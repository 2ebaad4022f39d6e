// Softmax cross-entropy over one chunk of logits (R, V), f32, in place: the
// inner loop of stride-kernels' head_cross_entropy (the products around it
// are cuBLASLt's). Launch configuration: src/launch.rs.

#include "common.cuh"

// One block (of whole warps) per row. For row r with target t:
//   row_loss[r] = max + ln Σ e^(l − max) − l[t]        (f32; the CPU widens
//                                                        its f32 value to f64)
// and the row becomes e^(l − max), as the CPU leaves it; with_grad, it then
// becomes (softmax − one-hot)·loss_scale. Each thread takes the columns
// j ≡ threadIdx.x (mod blockDim.x) in order; block_max and block_sum combine
// the threads in a fixed order. targets must be below V (the host checks).
extern "C" __global__ void stride_cross_entropy_f32(
    float *__restrict__ logits, float *__restrict__ row_loss,
    const unsigned *__restrict__ targets, int v, float loss_scale,
    int with_grad) {
  float *l = logits + (size_t)blockIdx.x * v;
  const int target = (int)targets[blockIdx.x];
  // Read before anyone writes the row (block_max's barriers order it).
  const float picked = l[target];
  float m = stride_neg_inf();
  for (int j = threadIdx.x; j < v; j += blockDim.x) {
    m = fmaxf(m, l[j]);
  }
  m = block_max(m);
  float s = 0.0f;
  for (int j = threadIdx.x; j < v; j += blockDim.x) {
    const float e = expf(l[j] - m);
    l[j] = e;
    s += e;
  }
  const float total = block_sum(s);
  if (threadIdx.x == 0) {
    row_loss[blockIdx.x] = m + logf(total) - picked;
  }
  if (with_grad) {
    // The thread that wrote l[target] scales it and subtracts the one-hot,
    // as the CPU does: (e·inv) − loss_scale.
    const float inv = loss_scale / total;
    for (int j = threadIdx.x; j < v; j += blockDim.x) {
      float p = l[j] * inv;
      if (j == target) {
        p -= loss_scale;
      }
      l[j] = p;
    }
  }
}
STRIDE_EMU_LAUNCHER(cross_entropy_f32)
