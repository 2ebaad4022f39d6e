//! The device-resident training state of the composed engine: master
//! weights, the gradient accumulator and both AdamW moments as flat f32
//! tensors on the worker's device (CUDA, or Candle's CPU device), created
//! once per trainer. A step keeps them there:
//!
//! - backward's per-parameter gradients are written (the step's first
//!   micro-batch) or added into the flat gradient on the device, one
//!   parameter at a time ([`DeviceState::add_grad_part`]);
//! - the all-reduce sums that tensor in place, on its device, bucket by
//!   bucket ([`Collective::all_reduce_tensor`]: NCCL on the CUDA buffer,
//!   the TCP ring on the CPU storage). A bucket is one transformer block's
//!   parameters (7.1 M values, 28 MB, in GPT-2 small — PyTorch DDP's
//!   default bucket is 25 MB), or the final LayerNorm, the position
//!   embedding, the tied token embedding; they go in the order backward
//!   finishes them (the tied embedding last). The ring sums every element
//!   in the order of the unbucketed sum, so bucketing changes no bit
//!   (test). The engine's segmented backward hands each bucket over as
//!   soon as it is final ([`DeviceState::reduce_ready`]), so on CUDA the
//!   sums overlap backward (`engine::composed::segmented_backward`);
//! - the global norm is a Candle reduction on the device (bucket by
//!   bucket, so its squares are never a gradient-sized buffer), and so is
//!   the gradient factor (averaging and the clip), which the update reads
//!   from device memory: the host waits for neither; the norm comes to the
//!   host with the step's losses, in the one read at the step's end;
//! - averaging, clipping and AdamW are one in-place pass over the state
//!   ([`FusedAdamW`]: a CUDA kernel on GPUs, the host AdamW's element loop
//!   on CPUs), so an update allocates nothing of the state's size;
//! - the model's compute weights (bf16 on CUDA) are refreshed from the
//!   master weights by device-side casts.
//!
//! The weights and both moments are one tensor, `[weights | m | v]` (and
//! the gradient factor after them): the fused update writes all three in
//! one pass, and a checkpoint load copies each tensor into its place
//! (`slice_set`), read one at a time into a reused host buffer
//! ([`DeviceState::load`]): neither allocates a second state, and the
//! host never holds more than one tensor of it.
//!
//! Copies of the whole state to or from the host (checkpoint snapshots and
//! loads, the every-K-steps weight hash) go through [`Transfers`] with
//! [`Purpose::State`]; the step's own crossings with [`Purpose::Step`].
//!
//! The update is the same AdamW as [`crate::optim`] (decoupled decay on the
//! matrices, bias correction, PyTorch's order; the same
//! [`Coefficients`]), so on a CPU it gives the host optimiser's bits from
//! the same gradient. The global norm is an f32 sum on the device (the
//! host path sums in f64), so the two paths agree to f32 rounding, not bit
//! for bit (test). [`DeviceState::update_reference`], the same update as
//! Candle ops, is kept as the fused kernel's reference in tests and in
//! `bench`.

use std::ops::Range;
use std::path::Path;

use candle_core::{DType, Device, Error, Result, Tensor};
use stride_job::checkpoint::{Kind, TensorReader};
use stride_job::config::OptimConfig;

use super::adamw::FusedAdamW;
use crate::collective::{Collective, CollectiveError};
use crate::model::Slot;
use crate::optim::Coefficients;
use crate::transfer::{Purpose, Transfers};

/// See the module doc.
#[derive(Debug)]
pub struct DeviceState {
    /// Master weights, first moments, second moments: flat f32, layout
    /// order, `len` values each, one buffer; then one value, the step's
    /// gradient factor (averaging and clipping), which the update reads.
    state: Tensor,
    /// Gradient accumulator, same layout, allocated once.
    grad: Tensor,
    /// Whether `grad` holds earlier micro-batches' sum (false after
    /// [`DeviceState::zero_grad`]: the step's first micro-batch writes
    /// instead of adding, so nothing is ever zeroed).
    accumulating: bool,
    /// Values of each bucket the micro-batch in progress has written.
    filled: Vec<usize>,
    /// How many buckets (in launch order) are all-reduced this step.
    reduced: usize,
    /// 1 where weight decay applies, 0 elsewhere (u8: a byte a parameter).
    decay: Tensor,
    /// All-reduce buckets: ranges of the flat gradient, in launch order.
    buckets: Vec<Range<usize>>,
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
        let mut mask = vec![0u8; n];
        for s in slots.iter().filter(|s| s.decays()) {
            mask[s.offset..s.offset + s.len].fill(1);
        }
        // [w | m | v | the step's gradient factor].
        let state = Tensor::zeros(3 * n + 1, DType::F32, device)?;
        state.slice_set(
            &transfers.to_device(Purpose::State, weights, &[n], device)?,
            0,
            0,
        )?;
        let buckets = buckets(slots);
        Ok(DeviceState {
            state,
            grad: Tensor::zeros(n, DType::F32, device)?,
            accumulating: false,
            filled: vec![0; buckets.len()],
            reduced: 0,
            decay: transfers.to_device(Purpose::State, &mask, &[n], device)?,
            buckets,
            step: 0,
            config: config.clone(),
            transfers,
        })
    }

    /// Parameters (the gradient's length).
    pub fn len(&self) -> usize {
        self.grad.elem_count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The device the state lives on.
    pub fn device(&self) -> &Device {
        self.state.device()
    }

    /// Part `i` of the state: 0 weights, 1 first moments, 2 second moments
    /// (a view, no copy).
    fn part(&self, i: usize) -> Result<Tensor> {
        self.state.narrow(0, i * self.len(), self.len())
    }

    /// The master weights (a view of the state, no copy).
    pub fn weights(&self) -> Result<Tensor> {
        self.part(0)
    }

    /// The all-reduce buckets, in launch order.
    pub fn buckets(&self) -> &[Range<usize>] {
        &self.buckets
    }

    /// Starts a step: its first micro-batch's gradient replaces the
    /// accumulator's contents.
    pub fn zero_grad(&mut self) {
        self.accumulating = false;
        self.filled.fill(0);
        self.reduced = 0;
    }

    /// Starts a micro-batch: its gradient adds to the earlier ones'.
    pub fn begin_micro_batch(&mut self) -> Result<()> {
        if self.filled.iter().any(|&f| f > 0) {
            self.check_filled("a micro-batch")?;
            self.accumulating = true;
        }
        self.filled.fill(0);
        Ok(())
    }

    /// Adds `part` (f32, flat) into the gradient's values `at..`: the
    /// micro-batch's gradient of some parameters (in place for the step's
    /// first micro-batch; a sum of the part's size after that).
    pub fn add_grad_part(&mut self, at: usize, part: &Tensor) -> Result<()> {
        let len = part.elem_count();
        if at + len > self.len() {
            candle_core::bail!(
                "a gradient part of {len} values at {at} lies outside the {} parameters",
                self.len()
            );
        }
        let part = part.flatten_all()?.to_dtype(DType::F32)?;
        if self.accumulating {
            let sum = (self.grad.narrow(0, at, len)? + part)?;
            self.grad.slice_set(&sum, 0, at)?;
        } else {
            self.grad.slice_set(&part, 0, at)?;
        }
        for (bucket, filled) in self.buckets.iter().zip(&mut self.filled) {
            let overlap = (at + len)
                .min(bucket.end)
                .saturating_sub(at.max(bucket.start));
            *filled += overlap;
            if *filled > bucket.len() {
                candle_core::bail!(
                    "the gradient of values {bucket:?} was added twice in one micro-batch"
                );
            }
        }
        Ok(())
    }

    /// A whole micro-batch's gradient (the state's length, layout order)
    /// as one tensor: [`DeviceState::begin_micro_batch`] and one
    /// [`DeviceState::add_grad_part`].
    pub fn add_grad(&mut self, flat: &Tensor) -> Result<()> {
        self.begin_micro_batch()?;
        self.add_grad_part(0, flat)
    }

    /// Errors unless the micro-batch in progress wrote every gradient
    /// value exactly once.
    fn check_filled(&self, what: &str) -> Result<()> {
        for (bucket, &filled) in self.buckets.iter().zip(&self.filled) {
            if filled != bucket.len() {
                candle_core::bail!(
                    "{what} wrote {filled} of the {} gradient values {bucket:?}",
                    bucket.len()
                );
            }
        }
        Ok(())
    }

    /// All-reduces, in launch order, the buckets whose gradient the last
    /// micro-batch has finished (called as backward goes, so a bucket's
    /// sum can run while backward computes the next; every rank reaches
    /// the same buckets in the same order). Stops at the first unfinished
    /// bucket.
    pub fn reduce_ready(
        &mut self,
        collective: &mut dyn Collective,
    ) -> std::result::Result<(), CollectiveError> {
        // A sum over one rank is the gradient itself: nothing to call (a
        // one-GPU job, or the tests' `Solo`, which sums host memory only).
        let alone = collective.world_size() == 1;
        while let Some(bucket) = self.buckets.get(self.reduced) {
            if self.filled[self.reduced] != bucket.len() {
                break;
            }
            if !alone {
                collective.all_reduce_tensor(&self.grad, bucket.clone())?;
            }
            self.reduced += 1;
        }
        Ok(())
    }

    /// Sums the gradient over all ranks, in place on its device, bucket by
    /// bucket: those [`DeviceState::reduce_ready`] has not summed yet.
    pub fn all_reduce(
        &mut self,
        collective: &mut dyn Collective,
    ) -> std::result::Result<(), CollectiveError> {
        self.check_filled("the last micro-batch")
            .map_err(|e| CollectiveError::Setup(e.to_string()))?;
        self.reduce_ready(collective)
    }

    /// Writes the step's gradient factor into the state's last value —
    /// `scale` (1 / the number of micro-batches over all ranks), times
    /// `grad_clip / (norm + 1e-6)` when the scaled norm exceeds `grad_clip`
    /// (0 = no clipping) — and returns that norm, all on the device: the
    /// host need not wait for the norm before it enqueues the update.
    fn write_factor(&self, scale: f64) -> Result<Tensor> {
        self.check_filled("the last micro-batch")?;
        // Bucket by bucket: the squares are a transient of one bucket's
        // size, not the gradient's (6 GB for GPT-2 XL).
        let sums = self
            .buckets
            .iter()
            .map(|b| self.grad.narrow(0, b.start, b.len())?.sqr()?.sum_all())
            .collect::<Result<Vec<_>>>()?;
        let norm = (Tensor::stack(&sums, 0)?.sum_all()?.sqrt()? * scale)?;
        // Built from the norm, so nothing is uploaded from the host.
        let plain = norm.zeros_like()?.affine(1.0, scale)?;
        let limit = self.config.grad_clip;
        let factor = if limit > 0.0 {
            let clipped = ((&norm + 1e-6)?.recip()? * (limit * scale))?;
            let over = norm
                .affine(1.0, -limit)?
                .relu()?
                .sign()?
                .to_dtype(DType::U8)?;
            over.where_cond(&clipped, &plain)?
        } else {
            plain
        };
        self.state
            .slice_set(&factor.reshape(1)?, 0, 3 * self.len())?;
        Ok(norm)
    }

    /// Scales the summed gradient by `scale` (1 / the number of
    /// micro-batches over all ranks), clips it to `grad_clip` (0 = no
    /// clipping) and applies one AdamW update at `lr`, in one in-place
    /// pass ([`FusedAdamW`]). Returns the global norm before clipping as a
    /// scalar on the device: nothing here waits for the device, so a step
    /// reads its scalars once, after everything is enqueued.
    pub fn update_on_device(&mut self, scale: f64, lr: f64) -> Result<Tensor> {
        let norm = self.write_factor(scale)?;
        self.step += 1;
        let op = FusedAdamW {
            k: Coefficients::new(&self.config, self.step, lr),
        };
        self.state.inplace_op3(&self.grad, &self.decay, &op)?;
        Ok(norm)
    }

    /// [`DeviceState::update_on_device`], with the norm read to the host.
    pub fn update(&mut self, scale: f64, lr: f64) -> Result<f64> {
        let norm = self.update_on_device(scale, lr)?;
        Ok(f64::from(self.transfers.scalar(Purpose::Step, &norm)?))
    }

    /// [`DeviceState::update`] written as Candle ops, one new tensor per
    /// op (six of the state's size): the fused update's reference in tests
    /// and `bench`, on any device.
    pub fn update_reference(&mut self, scale: f64, lr: f64) -> Result<f64> {
        let norm = self.write_factor(scale)?;
        let factor = self.state.narrow(0, 3 * self.len(), 1)?;
        let g = self.grad.broadcast_mul(&factor)?;
        self.step += 1;
        let c = &self.config;
        let bc1 = 1.0 - c.beta1.powi(self.step as i32);
        let bc2 = 1.0 - c.beta2.powi(self.step as i32);
        let step_size = lr / bc1;
        let m = ((self.part(1)? * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
        let v = ((self.part(2)? * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
        // Decoupled decay first (PyTorch order): w ← w·(1 − lr·wd) on the
        // matrices.
        let shrink = self
            .decay
            .to_dtype(DType::F32)?
            .affine(-(lr * c.weight_decay), 1.0)?;
        let decayed = (self.part(0)? * &shrink)?;
        let denom = v.sqrt()?.affine(1.0 / bc2.sqrt(), c.eps)?;
        let w = (decayed - ((&m / &denom)? * step_size)?)?;
        for (i, t) in [w, m, v].iter().enumerate() {
            self.state.slice_set(t, 0, i * self.len())?;
        }
        Ok(f64::from(self.transfers.scalar(Purpose::Step, &norm)?))
    }

    /// Copies the weights and moments to the host (a checkpoint snapshot),
    /// replacing the buffers' contents ([`Transfers::to_host`]).
    pub fn read(&self, weights: &mut Vec<f32>, m: &mut Vec<f32>, v: &mut Vec<f32>) -> Result<()> {
        for (i, out) in [weights, m, v].into_iter().enumerate() {
            self.transfers
                .to_host(Purpose::State, &self.part(i)?, out)?;
        }
        Ok(())
    }

    /// The gradient accumulator on the host (tests, debugging).
    pub fn grad_to_host(&self, out: &mut Vec<f32>) -> Result<()> {
        self.transfers.to_host(Purpose::State, &self.grad, out)
    }

    /// The weights on the host (hashing, a weights-only read).
    pub fn weights_to_host(&self, out: &mut Vec<f32>) -> Result<()> {
        self.transfers
            .to_host(Purpose::State, &self.weights()?, out)
    }

    /// Copies `values` into part `i` of the state (0 weights, 1 first
    /// moments, 2 second moments) from parameter `at` on, in place.
    fn copy_in(&mut self, i: usize, at: usize, values: &[f32]) -> Result<()> {
        let n = self.len();
        if at + values.len() > n {
            candle_core::bail!(
                "{} values at {at} lie outside a state of {n} parameters",
                values.len()
            );
        }
        let t = self.transfers.to_device(
            Purpose::State,
            values,
            &[values.len()],
            self.state.device(),
        )?;
        self.state.slice_set(&t, 0, i * n + at)
    }

    /// Copies `values` into the whole of part `i` of the state.
    fn load_part(&mut self, i: usize, what: &str, values: &[f32]) -> Result<()> {
        let n = self.len();
        if values.len() != n {
            candle_core::bail!(
                "{what} hold {} values, the model has {n} parameters",
                values.len()
            );
        }
        self.copy_in(i, 0, values)
    }

    /// Replaces the weights from a host buffer (the staged load `bench`
    /// measures [`DeviceState::load`] against).
    pub fn set_weights(&mut self, weights: &[f32]) -> Result<()> {
        self.load_part(0, "weights", weights)
    }

    /// Replaces the moments and the update count from host buffers.
    pub fn set_moments(&mut self, m: &[f32], v: &[f32], step: u64) -> Result<()> {
        self.load_part(1, "first moments", m)?;
        self.load_part(2, "second moments", v)?;
        self.step = step;
        Ok(())
    }

    /// Loads checkpoint `dir` — the weights, and unless `weights_only` the
    /// moments and the update count — one tensor at a time, each read into
    /// one reused host buffer and copied into its place in the state: the
    /// host never holds more than the largest tensor (`wte`, 154 MB for
    /// GPT-2 small), not a copy of the whole state. After an error the
    /// state is half-loaded.
    pub fn load(&mut self, dir: &Path, slots: &[Slot], weights_only: bool) -> Result<()> {
        let kinds: &[Kind] = if weights_only {
            &[Kind::Weights]
        } else {
            &[Kind::Weights, Kind::FirstMoments, Kind::SecondMoments]
        };
        for &kind in kinds {
            let part = match kind {
                Kind::Weights => 0,
                Kind::FirstMoments => 1,
                Kind::SecondMoments => 2,
            };
            let mut tensors = TensorReader::open(dir, slots, kind).map_err(Error::wrap)?;
            while let Some((slot, values)) = tensors.next_tensor().map_err(Error::wrap)? {
                self.copy_in(part, slot.offset, values)?;
            }
            if kind == Kind::SecondMoments {
                self.step = tensors.optimizer_step().map_err(Error::wrap)?;
            }
        }
        Ok(())
    }
}

/// The all-reduce buckets of a layout: consecutive slots of one transformer
/// block (`transformer.h.N.*`) or of one other module (`transformer.ln_f`,
/// `.wpe`, `.wte`), in the order backward finishes them: the final
/// LayerNorm, the blocks from the last to the first, the position
/// embedding, and the token embedding last (tied to the LM head, its
/// gradient is final only when backward reaches the input).
pub fn buckets(slots: &[Slot]) -> Vec<Range<usize>> {
    let module = |name: &str| -> String {
        let parts: Vec<&str> = name.split('.').collect();
        let keep = if parts.get(1) == Some(&"h") { 3 } else { 2 };
        parts[..keep.min(parts.len())].join(".")
    };
    // Ready order: ln_f (0), blocks last to first, wpe, wte, anything else.
    let order = |module: &str| -> (usize, usize) {
        let rest = module.strip_prefix("transformer.").unwrap_or(module);
        match rest.strip_prefix("h.").map(str::parse::<usize>) {
            Some(Ok(block)) => (1, usize::MAX - block),
            _ => match rest {
                "ln_f" => (0, 0),
                "wpe" => (2, 0),
                "wte" => (3, 0),
                _ => (4, 0),
            },
        }
    };
    let mut groups: Vec<(String, Range<usize>)> = Vec::new();
    for s in slots {
        let name = module(&s.name);
        match groups.last_mut() {
            Some((last, range)) if *last == name && range.end == s.offset => {
                range.end = s.offset + s.len;
            }
            _ => groups.push((name, s.offset..s.offset + s.len)),
        }
    }
    groups.sort_by_key(|(name, range)| (order(name), range.start));
    groups.into_iter().map(|(_, range)| range).collect()
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

    /// The device update is the host AdamW with clipping, to
    /// f32 rounding: four steps with clipping on and decay on the matrix
    /// only.
    #[test]
    fn the_device_update_is_the_host_adamw_with_clipping() {
        // β (0.9, 0.95), ε 1e-8, decay 0.1, clipping at 1.
        let config = OptimConfig::default();
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
            dev.add_grad(&gt).expect("candle");
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
            c.all_reduce_tensor(&t, 0..n).expect("tensor all-reduce");
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

    /// The fused in-place update and the Candle-op reference agree to f32
    /// rounding over several steps, with clipping active on some.
    #[test]
    fn the_fused_update_follows_its_candle_op_reference() {
        // β (0.9, 0.95), ε 1e-8, decay 0.1, clipping at 1.
        let config = OptimConfig::default();
        let slots = slots();
        let n = 23;
        let w = values(n, 3);
        let new = || {
            DeviceState::new(&w, &slots, &config, &Device::Cpu, Transfers::default())
                .expect("candle")
        };
        let (mut fused, mut reference) = (new(), new());
        let mut clipped = 0;
        for step in 0..5u32 {
            // Steps 0, 2, 4 have gradients large enough to clip.
            let g = values(n, 200 + step);
            let big = if step % 2 == 0 { 1.0 } else { 0.1 };
            let g: Vec<f32> = g.iter().map(|x| x * big).collect();
            for state in [&mut fused, &mut reference] {
                state.zero_grad();
                let t = Tensor::from_slice(&g, n, &Device::Cpu).expect("candle");
                state.add_grad(&t).expect("candle");
            }
            let norm = fused.update(0.5, 3e-2).expect("fused update");
            let reference_norm = reference.update_reference(0.5, 3e-2).expect("reference");
            assert_eq!(norm, reference_norm, "one norm computation");
            clipped += usize::from(norm > config.grad_clip);
        }
        assert!((2..5).contains(&clipped), "clipped {clipped} of 5 steps");
        let read = |s: &DeviceState| {
            let (mut w, mut m, mut v) = (Vec::new(), Vec::new(), Vec::new());
            s.read(&mut w, &mut m, &mut v).expect("candle");
            [w, m, v]
        };
        let (a, b) = (read(&fused), read(&reference));
        for (what, (x, y)) in ["weights", "m", "v"].iter().zip(a.iter().zip(&b)) {
            for (p, q) in x.iter().zip(y) {
                // Relative to the value, or to the size of an update's
                // change (~lr) where the value crosses zero.
                assert!(
                    (p - q).abs() <= 1e-6 * q.abs().max(0.1),
                    "{what}: {p} vs {q}"
                );
            }
        }
        assert!(a[0] != w, "the updates moved the weights");
    }

    /// GPT-2's layout splits into one bucket per block plus the final
    /// LayerNorm and the two embeddings, which cover the gradient exactly
    /// once, in the order backward finishes them (the tied embedding last).
    #[test]
    fn buckets_are_blocks_in_backward_order() {
        // GPT-2 small's layout (names and offsets only; nothing allocated).
        let config = stride_job::config::ModelConfig::default();
        let slots = crate::model::layout(&config);
        let n = crate::model::parameter_count(&slots);
        let buckets = buckets(&slots);
        assert_eq!(buckets.len(), 12 + 3);
        let mut covered: Vec<Range<usize>> = buckets.clone();
        covered.sort_by_key(|r| r.start);
        assert_eq!(covered[0].start, 0);
        assert_eq!(covered.last().map(|r| r.end), Some(n));
        for pair in covered.windows(2) {
            assert_eq!(pair[0].end, pair[1].start, "no gap, no overlap");
        }
        let first = |range: &Range<usize>| {
            let s = slots
                .iter()
                .find(|s| s.offset == range.start)
                .expect("slot");
            s.name.clone()
        };
        let names: Vec<String> = buckets.iter().map(first).collect();
        assert!(names[0].starts_with("transformer.ln_f."), "{names:?}");
        assert!(names[1].starts_with("transformer.h.11."), "{names:?}");
        assert!(names[2].starts_with("transformer.h.10."), "{names:?}");
        assert!(names[12].starts_with("transformer.h.0."), "{names:?}");
        assert_eq!(names[13], "transformer.wpe.weight");
        assert_eq!(names[14], "transformer.wte.weight");
    }

    /// Summing the gradient bucket by bucket gives the bits of one
    /// unbucketed sum, over a 3-rank ring where the order of a sum matters
    /// (summing each bucket as a buffer of its own does not: the check
    /// would catch a ring that chunked buckets by themselves).
    #[test]
    fn bucketed_and_unbucketed_all_reduces_are_bit_identical() {
        let world = 3;
        let n = 1000;
        let buckets = vec![700..1000, 13..700, 0..13];
        let results = local_ring(world, |mut c| {
            let rank = c.rank() as u32;
            // Magnitudes from 1e-3 to 1e3: rounding depends on the order.
            let mine: Vec<f32> = values(n, rank)
                .iter()
                .enumerate()
                .map(|(i, x)| x * 10f32.powi((i as i32 + rank as i32) % 7 - 3))
                .collect();
            let whole = Tensor::from_slice(&mine, n, &Device::Cpu).expect("candle");
            c.all_reduce_tensor(&whole, 0..n).expect("unbucketed");
            let bucketed = Tensor::from_slice(&mine, n, &Device::Cpu).expect("candle");
            for b in &buckets {
                c.all_reduce_tensor(&bucketed, b.clone()).expect("bucket");
            }
            let mut alone = mine.clone();
            for b in &buckets {
                c.all_reduce_sum(&mut alone[b.clone()])
                    .expect("bucket alone");
            }
            let v = |t: &Tensor| t.to_vec1::<f32>().expect("candle");
            (v(&whole), v(&bucketed), alone)
        })
        .expect("ring");
        for (whole, bucketed, _) in &results {
            assert!(whole == bucketed, "bucketed vs unbucketed");
            assert!(whole == &results[0].0, "every rank ends with the same bits");
        }
        let (whole, _, alone) = &results[0];
        assert!(
            whole != alone,
            "chunking buckets on their own changes the order of some sums"
        );
    }
    #[cfg(feature = "cuda")]
    mod gpu {
        use super::*;
        use crate::test_cuda_device as cuda;

        /// The fused update's CUDA kernel gives the CPU's bits from the
        /// same gradient (no clipping, so the norm's reduction order does
        /// not enter; adamw.cu is compiled without multiply-add
        /// contraction), and follows the Candle-op reference on the GPU to
        /// f32 rounding, over four steps of a state bigger than one block
        /// of threads.
        #[test]
        #[ignore = "needs an NVIDIA GPU: STRIDE_TEST_CUDA=1 cargo test -p stride-worker --features cuda -- --ignored gpu"]
        fn gpu_fused_update_matches_the_cpu_and_its_reference() {
            let device = cuda();
            let config = OptimConfig {
                grad_clip: 0.0,
                ..OptimConfig::default()
            };
            let slots = vec![
                Slot {
                    name: "a.bias".into(),
                    shape: vec![1000],
                    offset: 0,
                    len: 1000,
                },
                Slot {
                    name: "a.weight".into(),
                    shape: vec![300, 1000],
                    offset: 1000,
                    len: 300_000,
                },
            ];
            let n = 301_000;
            let w = values(n, 5);
            let new = |d: &Device| {
                DeviceState::new(&w, &slots, &config, d, Transfers::default()).expect("state")
            };
            let (mut gpu, mut cpu, mut reference) = (new(&device), new(&Device::Cpu), new(&device));
            for step in 0..4u32 {
                let g = values(n, 300 + step);
                for s in [&mut gpu, &mut cpu, &mut reference] {
                    s.zero_grad();
                    let d = s.weights().expect("weights").device().clone();
                    s.add_grad(&Tensor::from_slice(&g, n, &d).expect("gradient"))
                        .expect("add");
                }
                gpu.update(0.5, 1e-3).expect("fused on the GPU");
                cpu.update(0.5, 1e-3).expect("fused on the CPU");
                reference.update_reference(0.5, 1e-3).expect("reference");
            }
            let read = |s: &DeviceState| {
                let (mut w, mut m, mut v) = (Vec::new(), Vec::new(), Vec::new());
                s.read(&mut w, &mut m, &mut v).expect("read");
                [w, m, v]
            };
            let (g, c, r) = (read(&gpu), read(&cpu), read(&reference));
            for (i, what) in ["weights", "m", "v"].iter().enumerate() {
                let differ = g[i].iter().zip(&c[i]).filter(|(a, b)| a != b).count();
                assert_eq!(
                    differ, 0,
                    "{what}: {differ} of {n} values differ from the CPU's bits"
                );
                for (p, q) in g[i].iter().zip(&r[i]) {
                    assert!(
                        (p - q).abs() <= 1e-6 * q.abs().max(0.1),
                        "{what}: {p} vs {q}"
                    );
                }
            }
        }
    }
}
