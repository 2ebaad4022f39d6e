// The optimizer step on the device: the step's gradient factor (averaging
// and the global-norm clip) from the gradient's sum of squares, and one
// in-place AdamW pass over f32 master weights and moments that reads that
// factor from device memory, so the host never waits for the norm.
// Launch configurations: src/launch.rs.
//
// Both repeat the worker's CPU arithmetic operation for operation, in the
// same order, with every operation rounded on its own: the fatbin is
// compiled with FMA contraction allowed (nvcc's default), so a plain
// `a * b + c` could become one fused multiply-add there (one rounding, not
// two) and differ from the CPU in the last bit. The `__f*_rn` intrinsics
// are never contracted (portable.cuh; in the emulator they are the plain
// operations, compiled with -ffp-contract=off), so the GPU, the emulator
// and the worker's Rust loop give the same bits from the same inputs.

#include "common.cuh"

// One AdamW update in place, element i of n per thread: the worker's
// `optim::Coefficients::apply` (worker/src/optim.rs) with the gradient
// scaled as it is read, as `fused_adamw.rs` and `worker/cuda/adamw.cu` do:
//
//   g  = grad[i] · factor[0]
//   w  = w · shrink                             where decay[i] ≠ 0
//   m  = β1·m + (1 − β1)·g
//   v  = β2·v + ((1 − β2)·g)·g
//   w  = w − (step_size·m) / (√v / bc2_sqrt + eps)
//
// The coefficients are `Coefficients`' f32 values (step_size = lr / (1 −
// β1^t), bc2_sqrt = √(1 − β2^t), shrink = 1 − lr·weight_decay), passed as
// arguments; `factor` is one f32 in device memory (grad_factor's output).
// w, m, v, grad: n f32 each, separate buffers; decay: n bytes, nonzero =
// weight decay applies.
extern "C" __global__ void stride_adamw_f32(
    float *__restrict__ w, float *__restrict__ m, float *__restrict__ v,
    const float *__restrict__ grad, const unsigned char *__restrict__ decay,
    const float *__restrict__ factor, long long n, float beta1,
    float one_minus_beta1, float beta2, float one_minus_beta2,
    float step_size, float bc2_sqrt, float eps, float shrink) {
  const long long i = global_index();
  if (i >= n) {
    return;
  }
  const float g = __fmul_rn(grad[i], factor[0]);
  float wi = w[i];
  if (decay[i] != 0) {
    wi = __fmul_rn(wi, shrink);
  }
  const float mi =
      __fadd_rn(__fmul_rn(beta1, m[i]), __fmul_rn(one_minus_beta1, g));
  const float vi = __fadd_rn(__fmul_rn(beta2, v[i]),
                             __fmul_rn(__fmul_rn(one_minus_beta2, g), g));
  const float denominator =
      __fadd_rn(__fdiv_rn(__fsqrt_rn(vi), bc2_sqrt), eps);
  m[i] = mi;
  v[i] = vi;
  w[i] = __fsub_rn(wi, __fdiv_rn(__fmul_rn(step_size, mi), denominator));
}
STRIDE_EMU_LAUNCHER(adamw_f32)

// The step's gradient factor, one thread, from sumsq[0] = Σ g² of the
// summed gradient (sum_of_squares' output), in the order of the composed
// engine's `DeviceState::write_factor` (worker/src/device_state.rs):
//
//   norm   = √sumsq · scale              the averaged gradient's norm
//   factor = (1 / (norm + 1e-6)) · clip_scale    if clip and norm > max_norm
//          = scale                               otherwise
//
// scale = 1 / (micro-batches over all ranks), max_norm the clip threshold,
// clip_scale = max_norm·scale (rounded to f32 once, on the host, from the
// f64 product, as Candle's affine takes it). Writes factor[0], which
// adamw reads, and norm[0], which the host reads at the step's end. A NaN
// norm is not clipped (factor = scale), as on the host.
extern "C" __global__ void stride_grad_factor_f32(
    float *__restrict__ factor, float *__restrict__ norm,
    const float *__restrict__ sumsq, float scale, int clip, float max_norm,
    float clip_scale) {
  if (blockIdx.x != 0 || threadIdx.x != 0) {
    return;
  }
  const float n = __fmul_rn(__fsqrt_rn(sumsq[0]), scale);
  float f = scale;
  if (clip != 0 && n > max_norm) {
    f = __fmul_rn(__fdiv_rn(1.0f, __fadd_rn(n, 1e-6f)), clip_scale);
  }
  norm[0] = n;
  factor[0] = f;
}
STRIDE_EMU_LAUNCHER(grad_factor_f32)
