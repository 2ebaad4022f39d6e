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
        let c = &self.config;
        let (b1, b2) = (c.beta1 as f32, c.beta2 as f32);
        let bc1 = 1.0 - c.beta1.powi(self.step as i32);
        let bc2 = 1.0 - c.beta2.powi(self.step as i32);
        let step_size = (lr / bc1) as f32;
        let bc2_sqrt = bc2.sqrt() as f32;
        let eps = c.eps as f32;
        // Decoupled decay first (PyTorch order): w ← w·(1 − lr·wd).
        let shrink = (1.0 - lr * c.weight_decay) as f32;
        for &(off, len) in &self.decay_mask {
            for w in &mut weights[off..off + len] {
                *w *= shrink;
            }
        }
        for i in 0..weights.len() {
            let g = grad[i];
            let m = b1 * self.m[i] + (1.0 - b1) * g;
            let v = b2 * self.v[i] + (1.0 - b2) * g * g;
            self.m[i] = m;
            self.v[i] = v;
            weights[i] -= step_size * m / (v.sqrt() / bc2_sqrt + eps);
        }
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
