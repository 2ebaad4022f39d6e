//! AdamW and global-norm gradient clipping over flat `f32` buffers.
//!
//! Stride's own optimiser, because Candle's keeps its moments private (they
//! could not be checkpointed) and has no clipping. The state — first and
//! second moments and the step count — is plain data in parameter-name
//! order, readable and writable for checkpoints.
//!
//! The update is decoupled weight decay (Loshchilov & Hutter), as PyTorch's
//! `AdamW`, with bias correction; decay applies only to the slots the model
//! marks as matrices. It must not decide the learning rate: the LR of each
//! step arrives from the coordinator.

use stride_job::config::OptimConfig;

use crate::model::Slot;

/// The optimiser state of all parameters, in the flat layout's order.
#[derive(Debug, Clone, PartialEq)]
pub struct AdamW {
    pub config: OptimConfig,
    /// Per-element: whether weight decay applies (copied from the layout).
    decay_mask: Vec<(usize, usize)>,
    /// First moments.
    pub m: Vec<f32>,
    /// Second moments.
    pub v: Vec<f32>,
    /// Updates applied so far (for bias correction).
    pub step: u64,
}

impl AdamW {
    pub fn new(config: &OptimConfig, slots: &[Slot]) -> AdamW {
        let n = slots.last().map_or(0, |s| s.offset + s.len);
        AdamW {
            config: config.clone(),
            decay_mask: decay_ranges(slots),
            m: vec![0.0; n],
            v: vec![0.0; n],
            step: 0,
        }
    }

    /// One update of `weights` with the (already averaged and clipped)
    /// gradient `grad` at learning rate `lr`.
    pub fn update(&mut self, weights: &mut [f32], grad: &[f32], lr: f64) {
        self.step += 1;
        let k = Coefficients::new(&self.config, self.step, lr);
        adamw_step(
            &k,
            weights,
            &mut self.m,
            &mut self.v,
            grad,
            &self.decay_mask,
        );
    }
}

/// The `(offset, len)` ranges of the slots weight decay applies to.
pub fn decay_ranges(slots: &[Slot]) -> Vec<(usize, usize)> {
    slots
        .iter()
        .filter(|s| s.decays())
        .map(|s| (s.offset, s.len))
        .collect()
}

/// One AdamW update of `weights` and the moments `m`, `v` with the
/// (already averaged and clipped) gradient `grad`, decaying the ranges
/// `decay` (`(offset, len)`): [`AdamW::update`]'s loops, which the fused
/// CPU engine runs on its own buffers.
pub fn adamw_step(
    k: &Coefficients,
    weights: &mut [f32],
    m: &mut [f32],
    v: &mut [f32],
    grad: &[f32],
    decay: &[(usize, usize)],
) {
    assert_eq!(weights.len(), grad.len());
    assert_eq!(weights.len(), m.len());
    assert_eq!(weights.len(), v.len());
    // Decoupled decay first (PyTorch order): w ← w·(1 − lr·wd).
    for &(off, len) in decay {
        for w in &mut weights[off..off + len] {
            *w *= k.shrink;
        }
    }
    for i in 0..weights.len() {
        k.apply(&mut weights[i], &mut m[i], &mut v[i], grad[i], false);
    }
}

/// The constants of one AdamW update, in the f32 the element arithmetic
/// uses. One definition for every implementation: the host loop above, the
/// device state's fused update on the CPU (`crate::engine::composed::adamw`) and its
/// CUDA kernel (`worker/cuda/adamw.cu`, which repeats [`Coefficients::apply`]
/// operation for operation and is compiled without multiply-add
/// contraction), so all three give the same bits from the same gradient.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Coefficients {
    pub beta1: f32,
    pub one_minus_beta1: f32,
    pub beta2: f32,
    pub one_minus_beta2: f32,
    /// lr / (1 − β1^t): bias correction of the first moment folded in.
    pub step_size: f32,
    /// √(1 − β2^t).
    pub bc2_sqrt: f32,
    pub eps: f32,
    /// 1 − lr·weight_decay.
    pub shrink: f32,
}

impl Coefficients {
    /// For update number `step` (counted from 1) at learning rate `lr`.
    pub fn new(c: &OptimConfig, step: u64, lr: f64) -> Coefficients {
        let (beta1, beta2) = (c.beta1 as f32, c.beta2 as f32);
        let t = i32::try_from(step).unwrap_or(i32::MAX);
        Coefficients {
            beta1,
            one_minus_beta1: 1.0 - beta1,
            beta2,
            one_minus_beta2: 1.0 - beta2,
            step_size: (lr / (1.0 - c.beta1.powi(t))) as f32,
            bc2_sqrt: (1.0 - c.beta2.powi(t)).sqrt() as f32,
            eps: c.eps as f32,
            shrink: (1.0 - lr * c.weight_decay) as f32,
        }
    }

    /// One element's update with gradient `g`: decay first where `decays`,
    /// then both moments, then the step.
    #[inline(always)]
    pub fn apply(&self, w: &mut f32, m: &mut f32, v: &mut f32, g: f32, decays: bool) {
        if decays {
            *w *= self.shrink;
        }
        *m = self.beta1 * *m + self.one_minus_beta1 * g;
        *v = self.beta2 * *v + self.one_minus_beta2 * g * g;
        *w -= self.step_size * *m / (v.sqrt() / self.bc2_sqrt + self.eps);
    }
}

/// The same constants for the fused engine's GPU kernel
/// (`stride_cuda_kernels`' `adamw`, which applies them exactly as
/// [`Coefficients::apply`] does: the test below).
impl From<Coefficients> for stride_cuda_kernels::AdamWCoefficients {
    fn from(k: Coefficients) -> Self {
        stride_cuda_kernels::AdamWCoefficients {
            beta1: k.beta1,
            one_minus_beta1: k.one_minus_beta1,
            beta2: k.beta2,
            one_minus_beta2: k.one_minus_beta2,
            step_size: k.step_size,
            bc2_sqrt: k.bc2_sqrt,
            eps: k.eps,
            shrink: k.shrink,
        }
    }
}

/// The sum of a gradient's squares, accumulated in f64 in order (so every
/// rank computes the same bits from the same values).
pub fn sum_of_squares(grad: &[f32]) -> f64 {
    grad.iter().map(|g| f64::from(*g) * f64::from(*g)).sum()
}

/// The L2 norm of a gradient, accumulated in f64 in a fixed order (so every
/// rank computes the same bits from the same gradient).
pub fn global_norm(grad: &[f32]) -> f64 {
    sum_of_squares(grad).sqrt()
}

/// The L2 norm of a gradient as a job of `world` ranks computes it, sharded
/// or not: the squares summed per [`crate::collective::chunk`] (a rank's
/// shard), the chunks' sums added in order from 0.0
/// ([`crate::collective::sum_by_shard`] adds the ranks' sums so).
pub fn norm_by_chunks(grad: &[f32], world: usize) -> f64 {
    let n = grad.len();
    (0..world.max(1))
        .fold(0.0, |sum, k| {
            sum + sum_of_squares(&grad[crate::collective::chunk(n, world, k)])
        })
        .sqrt()
}

/// Scales `grad` so that a global norm of `norm` becomes at most
/// `max_norm` (0 = no clipping).
pub fn clip_to(grad: &mut [f32], norm: f64, max_norm: f64) {
    if max_norm > 0.0 && norm > max_norm {
        let scale = (max_norm / (norm + 1e-6)) as f32;
        for g in grad.iter_mut() {
            *g *= scale;
        }
    }
}

/// Scales `grad` so its global norm is at most `max_norm` (0 = no clipping).
/// Returns the norm before clipping.
pub fn clip_global_norm(grad: &mut [f32], max_norm: f64) -> f64 {
    let norm = global_norm(grad);
    clip_to(grad, norm, max_norm);
    norm
}

/// One host optimizer step on a gradient summed over `micro_batches` — the
/// whole of it, or one rank's shard: averaging, the global norm (`norm`
/// computes it from the averaged values this rank holds), clipping, AdamW
/// on the values held (`decay`: ranges relative to them). Returns the norm
/// before clipping. The fused CPU engine's update, sharded or not: the
/// same operations on every value in both cases, so the same bits.
#[allow(clippy::too_many_arguments)]
pub fn host_step<E>(
    k: &Coefficients,
    weights: &mut [f32],
    m: &mut [f32],
    v: &mut [f32],
    grad: &mut [f32],
    decay: &[(usize, usize)],
    micro_batches: usize,
    grad_clip: f64,
    norm: impl FnOnce(&[f32]) -> Result<f64, E>,
) -> Result<f64, E> {
    let scale = 1.0 / micro_batches as f32;
    for g in grad.iter_mut() {
        *g *= scale;
    }
    let norm = norm(grad)?;
    clip_to(grad, norm, grad_clip);
    adamw_step(k, weights, m, v, grad, decay);
    Ok(norm)
}

/// `ranges` (`(offset, len)` in the whole layout) as they fall in `part`,
/// relative to its start: a shard's decay ranges.
pub fn ranges_within(
    ranges: &[(usize, usize)],
    part: &std::ops::Range<usize>,
) -> Vec<(usize, usize)> {
    ranges
        .iter()
        .filter_map(|&(at, len)| {
            let (lo, hi) = (at.max(part.start), (at + len).min(part.end));
            (lo < hi).then(|| (lo - part.start, hi - lo))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slots() -> Vec<Slot> {
        vec![
            Slot {
                name: "a.bias".into(),
                shape: vec![2],
                offset: 0,
                len: 2,
            },
            Slot {
                name: "a.weight".into(),
                shape: vec![1, 2],
                offset: 2,
                len: 2,
            },
        ]
    }

    #[test]
    fn matches_pytorch_adamw_by_hand() {
        // Two steps of torch.optim.AdamW(lr=0.1, betas=(0.9, 0.95), eps=1e-8,
        // weight_decay=0.1) worked by hand in f64.
        let cfg = OptimConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            grad_clip: 0.0,
        };
        let mut opt = AdamW::new(&cfg, &slots());
        let mut w = vec![1.0f32, -1.0, 0.5, 2.0];
        let grads = [[0.5f32, -0.25, 1.0, 0.0], [0.1, 0.2, -0.3, 0.4]];
        let mut expect: Vec<f64> = w.iter().map(|x| f64::from(*x)).collect();
        let (mut m, mut v) = (vec![0f64; 4], vec![0f64; 4]);
        for (t, g) in grads.iter().enumerate() {
            let t = (t + 1) as i32;
            for i in 0..4 {
                if i >= 2 {
                    expect[i] *= 1.0 - 0.1 * 0.1;
                }
                let gi = f64::from(g[i]);
                m[i] = 0.9 * m[i] + 0.1 * gi;
                v[i] = 0.95 * v[i] + 0.05 * gi * gi;
                let mhat = m[i] / (1.0 - 0.9f64.powi(t));
                let vhat = v[i] / (1.0 - 0.95f64.powi(t));
                expect[i] -= 0.1 * mhat / (vhat.sqrt() + 1e-8);
            }
            opt.update(&mut w, g, 0.1);
        }
        for i in 0..4 {
            assert!(
                (f64::from(w[i]) - expect[i]).abs() < 1e-6,
                "{i}: {} vs {}",
                w[i],
                expect[i]
            );
        }
        assert_eq!(opt.step, 2);
    }

    /// The fused engine's GPU update (`stride_cuda_kernels`' `adamw`
    /// kernel, run by its CPU emulator: the same source nvcc compiles, its
    /// bits checked against the GPU's by the crate's GPU tests) is this
    /// module's update bit for bit: three consecutive steps over a few
    /// hundred elements, decay on the matrices only, the gradient factor
    /// (averaging and the clip) computed on the "device" from the sum of
    /// squares and applied as the kernel reads the gradient, against
    /// `AdamW::update` on the host-scaled gradient and against a loop of
    /// `Coefficients::apply`.
    #[test]
    fn the_gpu_kernel_is_this_update_bit_for_bit() {
        use stride_cuda_kernels::{emu, launch};

        let config = OptimConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            grad_clip: 1.0,
        };
        let shapes: [(&str, Vec<usize>); 4] = [
            ("h.0.attn.bias", vec![37]),
            ("h.0.attn.weight", vec![8, 16]),
            ("h.0.ln.weight", vec![61]),
            ("wte.weight", vec![11, 7]),
        ];
        let mut slots = Vec::new();
        let mut offset = 0;
        for (name, shape) in shapes {
            let len = shape.iter().product();
            slots.push(Slot {
                name: name.into(),
                shape,
                offset,
                len,
            });
            offset += len;
        }
        let n = offset;
        let decay: Vec<u8> = slots
            .iter()
            .flat_map(|s| std::iter::repeat_n(u8::from(s.decays()), s.len))
            .collect();
        // Deterministic values in [−scale, scale) (xorshift64).
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut values = |count: usize, scale: f32| -> Vec<f32> {
            (0..count)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    ((state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
                })
                .collect()
        };
        let w0 = values(n, 1.0);
        let mut host = AdamW::new(&config, &slots);
        let mut host_w = w0.clone();
        let (mut apply_w, mut apply_m, mut apply_v) = (w0.clone(), vec![0f32; n], vec![0f32; n]);
        let (mut dev_w, mut dev_m, mut dev_v) = (w0.clone(), vec![0f32; n], vec![0f32; n]);
        let mut partials = vec![0f32; launch::sumsq_blocks(n)];
        // Two micro-batches summed; gradients large enough to clip on
        // steps 1 and 3, not on step 2.
        let (scale, lr) = (0.5, 3e-2);
        let mut clipped = 0;
        for step in 1..=3u64 {
            let grad = values(n, if step == 2 { 1e-3 } else { 2.0 });
            let (mut sumsq, mut factor, mut norm) = ([0f32], [0f32], [0f32]);
            emu::sum_of_squares(&mut sumsq, &mut partials, &grad).expect("sum of squares");
            emu::grad_factor(&mut factor, &mut norm, &sumsq, scale, config.grad_clip)
                .expect("grad factor");
            clipped += usize::from(f64::from(norm[0]) > config.grad_clip);
            let k = Coefficients::new(&config, step, lr);
            emu::adamw(
                &mut dev_w,
                &mut dev_m,
                &mut dev_v,
                &grad,
                &decay,
                &factor,
                k.into(),
            )
            .expect("adamw");

            // The host: the gradient scaled by the same factor (one f32
            // multiply, as the kernel does when it reads it).
            let scaled: Vec<f32> = grad.iter().map(|g| g * factor[0]).collect();
            host.update(&mut host_w, &scaled, lr);
            for i in 0..n {
                k.apply(
                    &mut apply_w[i],
                    &mut apply_m[i],
                    &mut apply_v[i],
                    scaled[i],
                    decay[i] != 0,
                );
            }
            let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<u32>>();
            assert_eq!(bits(&dev_w), bits(&host_w), "step {step}: weights");
            assert_eq!(bits(&dev_m), bits(&host.m), "step {step}: first moments");
            assert_eq!(bits(&dev_v), bits(&host.v), "step {step}: second moments");
            assert_eq!(bits(&dev_w), bits(&apply_w), "step {step}: apply");
            assert_eq!(bits(&dev_m), bits(&apply_m), "step {step}: apply m");
            assert_eq!(bits(&dev_v), bits(&apply_v), "step {step}: apply v");
        }
        assert_eq!(clipped, 2, "clipping was exercised on two steps of three");
        assert_eq!(host.step, 3);
        assert!(dev_w != w0, "the weights moved");
    }

    #[test]
    fn clipping_caps_the_norm_and_reports_the_original() {
        let mut g = vec![3.0f32, 4.0];
        assert_eq!(clip_global_norm(&mut g, 1.0), 5.0);
        assert!((global_norm(&g) - 1.0).abs() < 1e-5);
        let mut g = vec![0.3f32, 0.4];
        assert!((clip_global_norm(&mut g, 1.0) - 0.5).abs() < 1e-7);
        assert_eq!(g, vec![0.3, 0.4]);
        let mut g = vec![30.0f32, 40.0];
        clip_global_norm(&mut g, 0.0);
        assert_eq!(g, vec![30.0, 40.0], "0 disables clipping");
    }
}
