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
            decay_mask: slots
                .iter()
                .filter(|s| s.decays())
                .map(|s| (s.offset, s.len))
                .collect(),
            m: vec![0.0; n],
            v: vec![0.0; n],
            step: 0,
        }
    }

    /// One update of `weights` with the (already averaged and clipped)
    /// gradient `grad` at learning rate `lr`.
    pub fn update(&mut self, weights: &mut [f32], grad: &[f32], lr: f64) {
        assert_eq!(weights.len(), grad.len());
        assert_eq!(weights.len(), self.m.len());
        self.step += 1;
        let k = Coefficients::new(&self.config, self.step, lr);
        // Decoupled decay first (PyTorch order): w ← w·(1 − lr·wd).
        for &(off, len) in &self.decay_mask {
            for w in &mut weights[off..off + len] {
                *w *= k.shrink;
            }
        }
        for i in 0..weights.len() {
            k.apply(
                &mut weights[i],
                &mut self.m[i],
                &mut self.v[i],
                grad[i],
                false,
            );
        }
    }
}

/// The constants of one AdamW update, in the f32 the element arithmetic
/// uses. One definition for every implementation: the host loop above, the
/// device state's fused update on the CPU (`crate::fused_adamw`) and its
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

/// The L2 norm of a gradient, accumulated in f64 in a fixed order (so every
/// rank computes the same bits from the same gradient).
pub fn global_norm(grad: &[f32]) -> f64 {
    grad.iter()
        .map(|g| f64::from(*g) * f64::from(*g))
        .sum::<f64>()
        .sqrt()
}

/// Scales `grad` so its global norm is at most `max_norm` (0 = no clipping).
/// Returns the norm before clipping.
pub fn clip_global_norm(grad: &mut [f32], max_norm: f64) -> f64 {
    let norm = global_norm(grad);
    if max_norm > 0.0 && norm > max_norm {
        let scale = (max_norm / (norm + 1e-6)) as f32;
        for g in grad.iter_mut() {
            *g *= scale;
        }
    }
    norm
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
