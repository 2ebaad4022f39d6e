// One AdamW update of the device-resident state, in place (see
// worker/src/fused_adamw.rs). `state` is [weights | m | v], n values each,
// then the step's gradient factor (averaging and clipping, computed on the
// device from the norm).
//
// The arithmetic repeats optim.rs's `Coefficients::apply` operation for
// operation; build.rs compiles this file with -fmad=false (no multiply-add
// contraction), and CUDA's default division and square root are correctly
// rounded, so a GPU update gives the CPU's bits from the same gradient.

extern "C" __global__ void stride_adamw(
    float *state, const float *grad, const unsigned char *decay,
    unsigned long long n, float beta1, float one_minus_beta1,
    float beta2, float one_minus_beta2,
    float step_size, float bc2_sqrt, float eps, float shrink) {
    float *w = state;
    float *m = state + n;
    float *v = state + 2 * n;
    float factor = state[3 * n];
    unsigned long long stride = (unsigned long long)blockDim.x * gridDim.x;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
         i < n; i += stride) {
        float g = grad[i] * factor;
        float wi = w[i];
        if (decay[i]) {
            wi = wi * shrink;
        }
        float mi = beta1 * m[i] + one_minus_beta1 * g;
        float vi = beta2 * v[i] + one_minus_beta2 * g * g;
        m[i] = mi;
        v[i] = vi;
        w[i] = wi - step_size * mi / (sqrtf(vi) / bc2_sqrt + eps);
    }
}
