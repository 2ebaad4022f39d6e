//! The device-resident training state of the composed engine: master
//! weights, the gradient accumulator and both AdamW moments as flat f32
//! tensors on the worker's device (CUDA, or Candle's CPU device), created
//! once per trainer. A step keeps them there:
//!
//! - backward's per-parameter gradients are added into the flat gradient
//!   on the device (`Tensor::cat` of the flattened gradients);
//! - the all-reduce sums that tensor in place, on its device
//!   ([`Collective::all_reduce_tensor`]: NCCL on the CUDA buffer, the TCP
//!   ring on the CPU storage);
//! - averaging, the global norm, clipping and AdamW are Candle ops on the
//!   device; only the norm comes back to the host (4 bytes, needed to
//!   decide the clip and for the report);
//! - the model's compute weights (bf16 on CUDA) are refreshed from the
//!   master weights by device-side casts.
//!
//! Copies of the whole state to or from the host (checkpoint snapshots and
//! loads, the every-K-steps weight hash) go through [`Transfers`] with
//! [`Purpose::State`]; the step's own crossings with [`Purpose::Step`].
//!
//! The update is the same AdamW as [`crate::optim`] (decoupled decay on the
//! matrices, bias correction, PyTorch's order), computed in f32 element
//! by element as there; the global norm is an f32 sum on the device (the
//! host path sums in f64), so the two paths agree to f32 rounding, not
//! bit for bit (test). Not yet: Candle's element-wise ops each write a new
//! tensor, so an update allocates a few transient buffers of the state's
//! size (a fused in-place CUDA kernel is the next step; this op-by-op
//! version stays as its reference).

use candle_core::{DType, Device, Result, Tensor};
use stride_job::config::OptimConfig;

use crate::collective::{Collective, CollectiveError};
use crate::model::Slot;
use crate::transfer::{Purpose, Transfers};

/// See the module doc.
#[derive(Debug)]
pub struct DeviceState {
    /// Master weights, flat f32, in layout order.
    pub weights: Tensor,
    /// Gradient accumulator, same layout; `None` until the step's first
    /// micro-batch adds its gradient (which then becomes the accumulator:
    /// no zeros to add to).
    grad: Option<Tensor>,
    m: Tensor,
    v: Tensor,
    /// 1 where weight decay applies, 0 elsewhere.
    decay: Tensor,
    /// Updates applied so far (for bias correction).
    pub step: u64,
    config: OptimConfig,
    transfers: Transfers,
}

impl DeviceState {
    /// The state for `weights` (uploaded once) on `device`, with zero
    /// moments.
    pub fn new(
        weights: &[f32],
        slots: &[Slot],
        config: &OptimConfig,
        device: &Device,
        transfers: Transfers,
    ) -> Result<DeviceState> {
        let n = weights.len();
        let mut mask = vec![0f32; n];
        for s in slots.iter().filter(|s| s.decays()) {
            mask[s.offset..s.offset + s.len].fill(1.0);
        }
        // Each moment its own buffer: nothing here may share storage with
        // anything the in-place all-reduce writes.
        Ok(DeviceState {
            weights: transfers.to_device(Purpose::State, weights, &[n], device)?,
            grad: None,
            m: Tensor::zeros(n, DType::F32, device)?,
            v: Tensor::zeros(n, DType::F32, device)?,
            decay: transfers.to_device(Purpose::State, &mask, &[n], device)?,
            step: 0,
            config: config.clone(),
            transfers,
        })
    }

    pub fn len(&self) -> usize {
        self.weights.elem_count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Clears the gradient accumulator (before a step's micro-batches).
    pub fn zero_grad(&mut self) {
        self.grad = None;
    }

    /// Adds `flat` (f32, the state's length, layout order) into the
    /// gradient accumulator. Taken by value: the first one becomes the
    /// accumulator, which the all-reduce then sums in place.
    pub fn add_grad(&mut self, flat: Tensor) -> Result<()> {
        self.grad = Some(match self.grad.take() {
            Some(sum) => (sum + flat)?,
            None => flat,
        });
        Ok(())
    }

    /// The step's gradient, once a micro-batch has added one.
    fn grad(&self) -> Result<&Tensor> {
        match &self.grad {
            Some(g) => Ok(g),
            None => candle_core::bail!("no micro-batch has added a gradient this step"),
        }
    }

    /// Sums the gradient over all ranks, in place on its device.
    pub fn all_reduce(
        &mut self,
        collective: &mut dyn Collective,
    ) -> std::result::Result<(), CollectiveError> {
        let grad = self
            .grad()
            .map_err(|e| CollectiveError::Setup(e.to_string()))?;
        collective.all_reduce_tensor(grad)
    }

    /// Scales the summed gradient by `scale` (1 / the number of
    /// micro-batches over all ranks), clips it to `grad_clip` (0 = no
    /// clipping) and applies one AdamW update at `lr`. Returns the global
    /// norm before clipping (the one value that comes to the host).
    pub fn update(&mut self, scale: f64, lr: f64) -> Result<f64> {
        let mut g = (self.grad()? * scale)?;
        let norm = f64::from(
            self.transfers
                .scalar(Purpose::Step, &g.sqr()?.sum_all()?)?
                .sqrt(),
        );
        let c = &self.config;
        if c.grad_clip > 0.0 && norm > c.grad_clip {
            g = (&g * (c.grad_clip / (norm + 1e-6)))?;
        }
        self.step += 1;
        let bc1 = 1.0 - c.beta1.powi(self.step as i32);
        let bc2 = 1.0 - c.beta2.powi(self.step as i32);
        let step_size = lr / bc1;
        self.m = ((&self.m * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
        self.v = ((&self.v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
        // Decoupled decay first (PyTorch order): w ← w·(1 − lr·wd) on the
        // matrices.
        let shrink = self.decay.affine(-(lr * c.weight_decay), 1.0)?;
        let decayed = (&self.weights * &shrink)?;
        let denom = self.v.sqrt()?.affine(1.0 / bc2.sqrt(), c.eps)?;
        self.weights = (decayed - ((&self.m / &denom)? * step_size)?)?;
        Ok(norm)
    }

    /// Copies the weights and moments to the host (a checkpoint snapshot),
    /// replacing the buffers' contents ([`Transfers::to_host`]).
    pub fn read(&self, weights: &mut Vec<f32>, m: &mut Vec<f32>, v: &mut Vec<f32>) -> Result<()> {
        self.transfers
            .to_host(Purpose::State, &self.weights, weights)?;
        self.transfers.to_host(Purpose::State, &self.m, m)?;
        self.transfers.to_host(Purpose::State, &self.v, v)
    }

    /// The weights on the host (hashing, a weights-only read).
    pub fn weights_to_host(&self, out: &mut Vec<f32>) -> Result<()> {
        self.transfers.to_host(Purpose::State, &self.weights, out)
    }

    /// Replaces the weights (a checkpoint load).
    pub fn set_weights(&mut self, weights: &[f32]) -> Result<()> {
        let n = self.len();
        same_length("weights", weights.len(), n)?;
        self.weights =
            self.transfers
                .to_device(Purpose::State, weights, &[n], self.weights.device())?;
        Ok(())
    }

    /// Replaces the moments and the update count (a full checkpoint load).
    pub fn set_moments(&mut self, m: &[f32], v: &[f32], step: u64) -> Result<()> {
        let n = self.len();
        same_length("first moments", m.len(), n)?;
        same_length("second moments", v.len(), n)?;
        let device = self.weights.device().clone();
        self.m = self.transfers.to_device(Purpose::State, m, &[n], &device)?;
        self.v = self.transfers.to_device(Purpose::State, v, &[n], &device)?;
        self.step = step;
        Ok(())
    }
}

fn same_length(what: &str, got: usize, want: usize) -> Result<()> {
    if got != want {
        candle_core::bail!("{what} hold {got} values, the model has {want} parameters");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collective::local_ring;
    use crate::optim::{AdamW, clip_global_norm};

    fn slots() -> Vec<Slot> {
        vec![
            Slot {
                name: "a.bias".into(),
                shape: vec![3],
                offset: 0,
                len: 3,
            },
            Slot {
                name: "a.weight".into(),
                shape: vec![4, 5],
                offset: 3,
                len: 20,
            },
        ]
    }

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| (((i as u32).wrapping_mul(2_654_435_761) ^ seed) % 1000) as f32 / 500.0 - 1.0)
            .collect()
    }

    /// The device update (Candle ops) is the host AdamW with clipping, to
    /// f32 rounding: four steps with clipping on and decay on the matrix
    /// only.
    #[test]
    fn the_device_update_is_the_host_adamw_with_clipping() {
        let config = OptimConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            grad_clip: 1.0,
        };
        let slots = slots();
        let n = 23;
        let mut host_w = values(n, 7);
        let mut host = AdamW::new(&config, &slots);
        let transfers = Transfers::default();
        let mut dev = DeviceState::new(&host_w, &slots, &config, &Device::Cpu, transfers.clone())
            .expect("candle");
        for step in 0..4u32 {
            // A summed gradient of 2 micro-batches, large enough to clip.
            let g = values(n, 100 + step);
            let mut host_g: Vec<f32> = g.iter().map(|x| x * 0.5).collect();
            let host_norm = clip_global_norm(&mut host_g, config.grad_clip);
            host.update(&mut host_w, &host_g, 1e-2);
            dev.zero_grad();
            let gt = Tensor::from_slice(&g, n, &Device::Cpu).expect("candle");
            dev.add_grad(gt).expect("candle");
            let norm = dev.update(0.5, 1e-2).expect("candle");
            assert!(
                ((norm - host_norm) / host_norm).abs() < 1e-6,
                "{norm} vs {host_norm}"
            );
            assert!(host_norm > 1.0, "clipping was exercised");
        }
        let (mut w, mut m, mut v) = (Vec::new(), Vec::new(), Vec::new());
        dev.read(&mut w, &mut m, &mut v).expect("candle");
        for (what, a, b) in [
            ("weights", &w, &host_w),
            ("m", &m, &host.m),
            ("v", &v, &host.v),
        ] {
            for (x, y) in a.iter().zip(b.iter()) {
                assert!(
                    (x - y).abs() <= 1e-6 * y.abs().max(1e-2),
                    "{what}: {x} vs {y}"
                );
            }
        }
        assert_eq!(dev.step, 4);
        assert_eq!(transfers.take(Purpose::Step), 4 * 4, "one norm per update");
    }

    /// The default tensor all-reduce sums a CPU tensor's own storage over
    /// the ring, bit for bit what the host buffer sum gives.
    #[test]
    fn the_tensor_all_reduce_sums_in_place_like_the_host_one() {
        let world = 3;
        let n = 1000;
        let results = local_ring(world, |mut c| {
            let rank = c.rank();
            let mine = values(n, rank as u32);
            let t = Tensor::from_slice(&mine, n, &Device::Cpu).expect("candle");
            c.all_reduce_tensor(&t).expect("tensor all-reduce");
            let mut host = mine.clone();
            c.all_reduce_sum(&mut host).expect("host all-reduce");
            (t.to_vec1::<f32>().expect("candle"), host)
        })
        .expect("ring");
        for (tensor, host) in &results {
            assert_eq!(tensor, host);
            assert_eq!(tensor, &results[0].0, "every rank ends with the same bits");
        }
    }
}
