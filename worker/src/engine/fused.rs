//! The fused engine with its training state, on any backend that trains
//! ([`Train`]): the model ([`Gpt`]) and, in the backend's buffers, each
//! allocated once, the f32 master weights, the f32 gradient the
//! micro-batches add into, both f32 AdamW moments, the decay mask (a byte a
//! parameter, where the backend's update reads one) and the compute copy of
//! the weights (bf16, where the kernels read one; f32 compute reads the
//! master weights themselves). The same code is the CPU worker's step
//! (`Fused<Cpu<f32>>`, host memory), the GPU's (`Fused<CudaBackend<_>>`,
//! device memory) and, in tests, the GPU's with its kernels emulated on the
//! CPU (`Fused<Emulated<_>>`).
//!
//! A step, as the trainer calls it:
//!
//! 1. [`Fused::begin_step`]: the gradient ← 0;
//! 2. [`Fused::forward_backward`] per micro-batch: forward and backward
//!    reading the compute weights, adding into the gradient; the loss stays
//!    where the backend computed it (on a GPU: a device value);
//! 3. [`Fused::all_reduce`]: the gradient summed over ranks in place (the
//!    trainer's one exchange);
//! 4. [`Fused::update`]: averaging, clipping and AdamW (the backend's
//!    [`Train::update`]), the compute copy refreshed, and then — once
//!    everything is enqueued — the micro-batches' losses and the norm read
//!    together: the step's one wait for a device.
//!
//! Checkpoints see the same state as every engine's: the f32 master weights
//! and moments by parameter name ([`Fused::read_state`], [`Fused::load`]);
//! the weights hash is over the master weights' bits. On a device, state
//! copies are counted apart from the step's (`Purpose::State`), and the
//! step's own crossings — the token ids the backend uploads, the scalars
//! read at the end — as `Purpose::Step`.
//!
//! It decides nothing about the schedule or the data: the trainer hands it
//! token ids, the micro-batch count and the learning rate.

use std::ops::Range;
use std::path::Path;

use anyhow::{Context, Result};
use candle_core::Device;
use stride_job::checkpoint::{self, Kind, TensorReader};
use stride_job::config::{ModelConfig, OptimConfig};
use stride_job::params::Slot;

use super::Scalars;
use super::backend::{Train, Update, UpdateError};
use super::gpt::Gpt;
use crate::collective::{Collective, CollectiveError};
use crate::optim::{Coefficients, decay_ranges, ranges_within};
use crate::transfer::{Purpose, Transfers};

/// See the module doc.
#[derive(Debug)]
pub struct Fused<B: Train> {
    model: Gpt<B>,
    /// f32 master weights, layout order.
    master: B::Buf<f32>,
    /// The weights the kernels read, in `A`, where the backend copies them
    /// ([`Train::COPIES_WEIGHTS`]).
    copy: Option<B::Buf<B::A>>,
    /// The gradient the micro-batches add into.
    grad: B::Buf<f32>,
    /// First and second AdamW moments.
    m: B::Buf<f32>,
    v: B::Buf<f32>,
    /// 1 where weight decay applies ([`Train::DECAY_MASK`]).
    decay: Option<B::Buf<u8>>,
    /// The same as `(offset, len)` ranges, relative to `shard`.
    decay_ranges: Vec<(usize, usize)>,
    /// Parameters.
    len: usize,
    /// The parameters whose optimizer state this rank keeps (`m` and `v`
    /// hold these): all of them, or its shard (ZeRO-1).
    shard: Range<usize>,
    /// Whether the state is sharded (`shard` may be all of a one-rank
    /// job's parameters either way).
    sharded: bool,
    /// The gradient's values `0..reduced` were summed over the ranks
    /// during this step's backward ([`Fused::forward_backward_overlapped`]);
    /// [`Fused::sum_gradient`] sums the rest.
    reduced: usize,
    /// Host copies of the blocks' gradients for the communication, kept
    /// from step to step.
    buckets: Vec<Vec<f32>>,
    /// Updates applied so far (for bias correction).
    step: u64,
    optim: OptimConfig,
    /// This step's summed losses (one a micro-batch), read at its end,
    /// and each micro-batch's token count.
    losses: Vec<B::Loss>,
    tokens: Vec<usize>,
    /// Candle's device of the same GPU (`Cpu` for host memory): what a
    /// snapshot's host buffers are page-locked for.
    device: Device,
    transfers: Transfers,
}

impl<B: Train> Fused<B> {
    /// The model on `backend`, for micro-batches of up to `micro_batch`
    /// sequences, and its state: `weights` (layout order, `slots`) as the
    /// master weights (taken as they are into host memory, copied to a
    /// device), zero moments — of every parameter, or with `shard` of
    /// those in that range only (ZeRO-1).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        backend: B,
        model: &ModelConfig,
        slots: &[Slot],
        micro_batch: usize,
        weights: Vec<f32>,
        optim: &OptimConfig,
        device: Device,
        transfers: Transfers,
        shard: Option<Range<usize>>,
    ) -> Result<Fused<B>> {
        let len = weights.len();
        anyhow::ensure!(
            len == crate::model::parameter_count(slots),
            "{len} weights for a layout of {} parameters",
            crate::model::parameter_count(slots)
        );
        let sharded = shard.is_some();
        let shard = shard.unwrap_or(0..len);
        anyhow::ensure!(
            shard.end <= len,
            "a shard {shard:?} of a state of {len} parameters"
        );
        let mut gpt = Gpt::on(backend, model, slots, micro_batch)?;
        let be = gpt.backend_mut();
        let master = be.adopt(weights)?;
        let grad = be.alloc::<f32>(len)?;
        let m = be.alloc::<f32>(shard.len())?;
        let v = be.alloc::<f32>(shard.len())?;
        let ranges = decay_ranges(slots);
        let decay = if B::DECAY_MASK {
            let mut mask = vec![0u8; len];
            for &(at, n) in &ranges {
                mask[at..at + n].fill(1);
            }
            let mut d = be.alloc::<u8>(len)?;
            be.upload(B::view_mut(&mut d), &mask)?;
            Some(d)
        } else {
            None
        };
        let copy = if B::COPIES_WEIGHTS {
            let mut c = be.alloc::<B::A>(len)?;
            be.refresh(B::view_mut(&mut c), B::view(&master))?;
            Some(c)
        } else {
            None
        };
        if !B::HOST_MEMORY {
            let mask = if B::DECAY_MASK { len } else { 0 };
            transfers.record_upload(Purpose::State, 4 * len + mask);
        }
        Ok(Fused {
            model: gpt,
            master,
            copy,
            grad,
            m,
            v,
            decay,
            decay_ranges: ranges_within(&ranges, &shard),
            len,
            shard,
            sharded,
            reduced: 0,
            buckets: Vec::new(),
            step: 0,
            optim: optim.clone(),
            losses: Vec::new(),
            tokens: Vec::new(),
            device,
            transfers,
        })
    }

    /// Parameters.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The parameters whose optimizer state this rank keeps: all, or its
    /// shard.
    pub fn shard(&self) -> Range<usize> {
        self.shard.clone()
    }

    /// Candle's device of the same memory (see the field).
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Starts a step: the gradient ← 0, no losses.
    pub fn begin_step(&mut self) -> Result<()> {
        self.losses.clear();
        self.tokens.clear();
        self.reduced = 0;
        let be = self.model.backend_mut();
        be.zero(B::view_mut(&mut self.grad))?;
        Ok(())
    }

    /// Forward and backward of one micro-batch (B·T token ids each):
    /// adds the gradient of its mean loss into the step's gradient; its
    /// loss is read with the step's others ([`Fused::update`]).
    pub fn forward_backward(&mut self, inputs: &[u32], targets: &[u32]) -> Result<()> {
        let loss = {
            let w = B::compute_weights(&self.master, self.copy.as_ref())?;
            self.model.forward_backward_sum(
                &w,
                &mut B::view_mut(&mut self.grad),
                inputs,
                targets,
            )?
        };
        self.losses.push(loss);
        self.tokens.push(inputs.len());
        self.count_uploads();
        Ok(())
    }

    /// Sums the gradient over all ranks, in place: all of it, or (sharded)
    /// into this rank's shard only (a reduce-scatter, the same bits there).
    pub fn sum_gradient(&mut self, collective: &mut dyn Collective) -> Result<(), CollectiveError> {
        let reduced = std::mem::take(&mut self.reduced);
        if self.sharded && collective.shard(self.len) != self.shard {
            return Err(CollectiveError::Setup(format!(
                "the collective reduces {:?} into this rank, whose optimizer state is {:?}",
                collective.shard(self.len),
                self.shard
            )));
        }
        let be = self.model.backend_mut();
        match (reduced, self.sharded) {
            (0, false) => return be.all_reduce(&mut self.grad, collective),
            (0, true) => return be.reduce_scatter(&mut self.grad, collective),
            _ => {}
        }
        // Backward summed the blocks' part (host memory: the CPU engine).
        let Some(grad) = B::host_slice_mut(&mut self.grad) else {
            return Err(CollectiveError::Setup(
                "an overlapped sum of a gradient on a device".into(),
            ));
        };
        // The part backward did not sum, as the whole buffer's part: the
        // same bits as one call over all of it.
        let (n, rest) = (self.len, &mut grad[reduced..]);
        if self.sharded {
            collective.reduce_scatter_part(rest, reduced, n)
        } else {
            collective.all_reduce_part(rest, reduced, n)
        }
    }

    /// Sharded: every rank's updated shard of the weights to every rank
    /// (an all-gather, f32 on the wire), after [`Fused::update`]. Nothing
    /// otherwise.
    pub fn gather_weights(&mut self, collective: &mut dyn Collective) -> Result<()> {
        if !self.sharded {
            return Ok(());
        }
        let be = self.model.backend_mut();
        be.all_gather(&mut self.master, collective)?;
        // The compute copy, from all the weights (the update refreshed
        // none of it).
        if let Some(copy) = &mut self.copy {
            be.refresh(B::view_mut(copy), B::view(&self.master))?;
        }
        Ok(())
    }

    /// Averages the summed gradient over `micro_batches` (over all ranks),
    /// clips it to `optim.grad_clip` and applies one AdamW update at `lr`,
    /// refreshes the compute copy, then reads the step's losses and norm
    /// (one wait for a device). Sharded, the update is of this rank's
    /// shard, the norm's squares summed over the ranks in shard order
    /// ([`crate::collective::sum_by_shard`]: the unsharded step's bits); the weights are then
    /// gathered by [`Fused::gather_weights`].
    pub fn update(
        &mut self,
        micro_batches: usize,
        lr: f64,
        collective: &mut dyn Collective,
    ) -> Result<Scalars> {
        anyhow::ensure!(micro_batches > 0, "a step without micro-batches");
        self.step += 1;
        let k = Coefficients::new(&self.optim, self.step, lr);
        let shard = self.shard.clone();
        let world = collective.world_size();
        let be = self.model.backend_mut();
        let norm = be.update(Update {
            weights: B::part_mut(&mut self.master, shard.clone()),
            m: B::view_mut(&mut self.m),
            v: B::view_mut(&mut self.v),
            grad: B::part_mut(&mut self.grad, shard.clone()),
            decay: self.decay.as_ref().map(|d| B::part(d, shard.clone())),
            decay_ranges: &self.decay_ranges,
            micro_batches,
            grad_clip: self.optim.grad_clip,
            k,
            world,
            across: if self.sharded { Some(collective) } else { None },
        });
        let norm = match norm {
            Ok(norm) => norm,
            // A peer's failure stays a collective error (it names the peer).
            Err(UpdateError::Collective(e)) => return Err(e.into()),
            Err(UpdateError::Backend(e)) => return Err(e.into()),
        };
        // Sharded, the copy is refreshed once the weights are gathered.
        if let (Some(copy), false) = (&mut self.copy, self.sharded) {
            be.refresh(B::view_mut(copy), B::view(&self.master))?;
        }
        // Everything is enqueued: the step's one read.
        self.losses.push(norm);
        let mut values = Vec::with_capacity(self.losses.len());
        be.read_scalars(&self.losses, &mut values)?;
        self.losses.clear();
        if !B::HOST_MEMORY {
            self.transfers
                .record_download(Purpose::Step, 4 * values.len());
        }
        let Some((grad_norm, losses)) = values.split_last() else {
            anyhow::bail!("a step without a gradient norm");
        };
        anyhow::ensure!(
            losses.len() == self.tokens.len(),
            "{} losses for {} micro-batches",
            losses.len(),
            self.tokens.len()
        );
        let mut loss_sum = 0.0;
        for (sum, tokens) in losses.iter().zip(&self.tokens) {
            loss_sum += sum / *tokens as f64;
        }
        Ok(Scalars {
            loss_sum,
            grad_norm: *grad_norm,
        })
    }

    /// Mean loss of one micro-batch, without gradients (evaluation).
    pub fn loss(&mut self, inputs: &[u32], targets: &[u32]) -> Result<f64> {
        let total = {
            let w = B::compute_weights(&self.master, self.copy.as_ref())?;
            self.model.loss_sum(&w, inputs, targets)?
        };
        let mut value = Vec::with_capacity(1);
        self.model
            .backend_mut()
            .read_scalars(std::slice::from_ref(&total), &mut value)?;
        self.count_uploads();
        if !B::HOST_MEMORY {
            self.transfers.record_download(Purpose::Step, 4);
        }
        let sum = value.first().context("no loss came back")?;
        Ok(sum / inputs.len() as f64)
    }

    /// Copies the master weights and both moments of [`Fused::shard`]
    /// (all parameters unless sharded) into `weights`, `m`, `v` (resized
    /// to the shard; their memory reused: a snapshot's buffers) and
    /// returns the update count.
    pub fn read_state(
        &self,
        weights: &mut Vec<f32>,
        m: &mut Vec<f32>,
        v: &mut Vec<f32>,
    ) -> Result<u64> {
        let be = self.model.backend();
        let n = self.shard.len();
        let master = B::part(&self.master, self.shard.clone());
        for (out, buf) in [
            (weights, master),
            (m, B::view(&self.m)),
            (v, B::view(&self.v)),
        ] {
            out.resize(n, 0.0);
            be.download(buf, out)?;
        }
        if !B::HOST_MEMORY {
            self.transfers.record_download(Purpose::State, 3 * 4 * n);
        }
        Ok(self.step)
    }

    /// xxh3 of the master weights' bits (in place on the host; a copy from
    /// a device).
    pub fn weights_hash(&self) -> Result<u64> {
        let hash = |w: &[f32]| xxhash_rust::xxh3::xxh3_64(bytemuck::cast_slice(w));
        if let Some(w) = B::host_slice(&self.master) {
            return Ok(hash(w));
        }
        let mut w = vec![0f32; self.len];
        self.model
            .backend()
            .download(B::view(&self.master), &mut w)?;
        self.transfers.record_download(Purpose::State, 4 * self.len);
        Ok(hash(&w))
    }

    /// Loads checkpoint `dir` — the weights, and unless `weights_only` the
    /// moments and the update count — and refreshes the compute copy. Host
    /// buffers are read into in place; a device's one tensor at a time
    /// through one reused host buffer (never a host copy of the whole
    /// state). After an error the state is half-loaded.
    pub fn load(&mut self, dir: &Path, slots: &[Slot], weights_only: bool) -> Result<()> {
        let whole_on_host = (!self.sharded)
            .then(|| {
                Some((
                    B::host_slice_mut(&mut self.master)?,
                    B::host_slice_mut(&mut self.m)?,
                    B::host_slice_mut(&mut self.v)?,
                ))
            })
            .flatten();
        if let Some((w, m, v)) = whole_on_host {
            checkpoint::read_model_into(dir, slots, w)?;
            if !weights_only {
                self.step = checkpoint::read_optimizer_into(dir, slots, m, v)?;
            }
        } else {
            self.load_by_tensor(dir, slots, weights_only)?;
        }
        if let Some(copy) = &mut self.copy {
            let be = self.model.backend_mut();
            be.refresh(B::view_mut(copy), B::view(&self.master))?;
        }
        Ok(())
    }

    /// [`Fused::load`] a tensor at a time, through the reader's buffer (a
    /// device's state, or a sharded one): all the weights, and the moments
    /// of [`Fused::shard`] only.
    fn load_by_tensor(&mut self, dir: &Path, slots: &[Slot], weights_only: bool) -> Result<()> {
        let shard = self.shard.clone();
        let kinds: &[Kind] = if weights_only {
            &[Kind::Weights]
        } else {
            &[Kind::Weights, Kind::FirstMoments, Kind::SecondMoments]
        };
        let be = self.model.backend_mut();
        for &kind in kinds {
            // The weights are all this rank's; the moments its shard's.
            let (buf, keep) = match kind {
                Kind::Weights => (&mut self.master, 0..self.len),
                Kind::FirstMoments => (&mut self.m, shard.clone()),
                Kind::SecondMoments => (&mut self.v, shard.clone()),
            };
            let mut tensors = TensorReader::open(dir, slots, kind)?;
            while let Some((slot, values)) = tensors.next_tensor()? {
                anyhow::ensure!(
                    slot.offset + values.len() <= self.len,
                    "{} values at {} lie outside a state of {} parameters",
                    values.len(),
                    slot.offset,
                    self.len
                );
                let (lo, hi) = (
                    slot.offset.max(keep.start),
                    (slot.offset + values.len()).min(keep.end),
                );
                if lo >= hi {
                    continue;
                }
                be.upload(
                    B::part_mut(buf, lo - keep.start..hi - keep.start),
                    &values[lo - slot.offset..hi - slot.offset],
                )?;
                if !B::HOST_MEMORY {
                    self.transfers.record_upload(Purpose::State, 4 * (hi - lo));
                }
            }
            if kind == Kind::SecondMoments {
                self.step = tensors.optimizer_step()?;
            }
        }
        Ok(())
    }

    /// The token ids the backend uploaded, counted as the step's traffic.
    fn count_uploads(&mut self) {
        let bytes = self.model.backend_mut().take_uploaded();
        if bytes > 0 {
            self.transfers
                .record_upload(Purpose::Step, usize::try_from(bytes).unwrap_or(usize::MAX));
        }
    }

    /// All the master weights into `w` (tests).
    #[cfg(test)]
    pub fn weights_into(&self, w: &mut [f32]) -> Result<()> {
        self.model.backend().download(B::view(&self.master), w)?;
        Ok(())
    }

    /// The step's summed gradient (before averaging and clipping on a
    /// device; averaged and clipped in place on the host once updated), on
    /// the host.
    #[cfg(test)]
    pub fn gradient(&self) -> Result<Vec<f32>> {
        let mut g = vec![0f32; self.len];
        self.model.backend().download(B::view(&self.grad), &mut g)?;
        Ok(g)
    }
}

/// What the backward thread of [`Fused::forward_backward_overlapped`]
/// hands the communicating one.
enum Handed {
    /// A block's parameters and a copy of their gradient, final.
    Bucket(Range<usize>, Vec<f32>),
    /// The backward ended then.
    Done(std::time::Instant),
}

impl Fused<super::backend::Cpu<f32>> {
    /// [`Fused::forward_backward`] of a step's last micro-batch with the
    /// blocks' gradients summed over the ranks while backward computes
    /// the blocks below (a reduce-scatter into this rank's shard when
    /// sharded): the backward runs on a thread of its own and hands each
    /// block's gradient over as it finishes it (a copy: the backward goes
    /// on writing the buffer); this thread, which holds the collective,
    /// sums each as it comes, as the part of the whole gradient it is (the
    /// ring then keeps the whole buffer's chunk bounds: the same bits as
    /// one sum after backward), and copies them back once backward is
    /// done. `ln_f`, `wpe` and the tied `wte` are left to
    /// [`Fused::sum_gradient`]. Returns the seconds this thread went on
    /// summing after the backward had ended: the communication the step
    /// waited for here.
    pub fn forward_backward_overlapped(
        &mut self,
        inputs: &[u32],
        targets: &[u32],
        collective: &mut dyn Collective,
    ) -> Result<f64> {
        let (whole, sharded) = (self.len, self.sharded);
        let blocks_end = self.model.blocks_end();
        let mut pool = std::mem::take(&mut self.buckets);
        let (model, master, grad) = (&mut self.model, &self.master, &mut self.grad);
        let (tx, rx) = std::sync::mpsc::channel::<Handed>();
        let (loss, summed, exposed) = std::thread::scope(|scope| -> Result<_> {
            let backward = std::thread::Builder::new()
                .name("backward".into())
                .spawn_scoped(scope, move || {
                    let mut hand = |_: &super::backend::Cpu<f32>, at: Range<usize>, g: &[f32]| {
                        let mut copy = pool.pop().unwrap_or_default();
                        copy.clear();
                        copy.extend_from_slice(g);
                        // A communicating thread that gave up has said why.
                        let _ = tx.send(Handed::Bucket(at, copy));
                        Ok(())
                    };
                    let loss = model.forward_backward_ready(
                        &master.as_slice(),
                        &mut grad.as_mut_slice(),
                        inputs,
                        targets,
                        &mut hand,
                    );
                    let _ = tx.send(Handed::Done(std::time::Instant::now()));
                    loss
                })
                .context("cannot start the backward thread")?;
            let (mut summed, mut exposed, mut failed) = (Vec::new(), 0.0, None);
            // Ends when the backward thread has ended (its sender dropped).
            for handed in rx {
                match handed {
                    Handed::Bucket(at, mut copy) if failed.is_none() => {
                        let sum = if sharded {
                            collective.reduce_scatter_part(&mut copy, at.start, whole)
                        } else {
                            collective.all_reduce_part(&mut copy, at.start, whole)
                        };
                        match sum {
                            Ok(()) => summed.push((at, copy)),
                            Err(e) => failed = Some(e),
                        }
                    }
                    Handed::Bucket(..) => {}
                    Handed::Done(at) => exposed = at.elapsed().as_secs_f64(),
                }
            }
            let loss = backward
                .join()
                .map_err(|_| anyhow::anyhow!("the backward thread panicked"))??;
            if let Some(e) = failed {
                return Err(e.into());
            }
            Ok((loss, summed, exposed))
        })?;
        for (at, copy) in summed {
            self.grad[at].copy_from_slice(&copy);
            self.buckets.push(copy);
        }
        self.reduced = blocks_end;
        self.losses.push(loss);
        self.tokens.push(inputs.len());
        Ok(exposed)
    }
}
