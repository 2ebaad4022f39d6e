//! The composed engine with its training state: the model as Candle ops
//! and Candle's autograd (`crate::model`), on any device Candle supports
//! and in bf16, and its device-resident state ([`DeviceState`]: master
//! weights and both moments as one tensor, the flat gradient, the
//! all-reduce buckets). Tests hold the fused engine to it; on CUDA it is
//! what `worker.engine = composed` runs, and what `auto` falls back to for
//! a model the fused CUDA kernels do not take.
//!
//! A step: [`Composed::begin_step`]; per micro-batch
//! [`Composed::forward_backward`] — one segment at a time
//! ([`segmented_backward`]), each block's gradients added into the flat
//! device gradient and, on the step's last micro-batch, each bucket
//! all-reduced as soon as backward has finished it; [`Composed::all_reduce`]
//! for whatever is left; [`Composed::update`] — norm, averaging, clipping
//! and AdamW as one device pass, the compute weights refreshed by device
//! casts, then the micro-batches' losses and the norm read in one copy.
//! Every host↔device copy goes through [`Transfers`].
//!
//! Its files live here, with the path they serve: `state.rs` the
//! device-resident state, `adamw.rs` its update as one in-place pass (the
//! CPU loop, and the CUDA kernel of `worker/cuda/adamw.cu`).

pub mod adamw;
pub mod state;

use anyhow::{Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use stride_job::config::{ModelConfig, OptimConfig};

use super::Scalars;
use crate::collective::{Collective, CollectiveError};
use crate::model::{self, Gpt, Slot};
use crate::transfer::{Purpose, Transfers};
use state::DeviceState;

/// See the module doc.
#[derive(Debug)]
pub struct Composed {
    model: Box<Gpt>,
    slots: Vec<Slot>,
    device: Device,
    transfers: Transfers,
    state: DeviceState,
    /// This step's losses (device scalars), read at its end.
    losses: Vec<Tensor>,
}

impl Composed {
    /// The model computing in `dtype` on `device`, and its state from
    /// `weights` (uploaded once), zero moments.
    pub fn new(
        config: &ModelConfig,
        weights: &[f32],
        dtype: DType,
        device: &Device,
        optim: &OptimConfig,
        transfers: Transfers,
    ) -> Result<Composed> {
        let slots = model::layout(config);
        let model = Box::new(Gpt::new(config, weights, dtype, device)?);
        let state = DeviceState::new(weights, &slots, optim, device, transfers.clone())?;
        Ok(Composed {
            model,
            slots,
            device: device.clone(),
            transfers,
            state,
            losses: Vec::new(),
        })
    }

    /// The device-resident state.
    pub fn state(&self) -> &DeviceState {
        &self.state
    }

    /// The device-resident state, exclusively (tests drive its buckets).
    pub fn state_mut(&mut self) -> &mut DeviceState {
        &mut self.state
    }

    /// The device the state and the model live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Starts a step: the first micro-batch's gradient replaces the
    /// accumulator's contents; no losses.
    pub fn begin_step(&mut self) {
        self.state.zero_grad();
        self.losses.clear();
    }

    /// Forward and backward of one micro-batch (`inputs` and `targets`: B·T
    /// token ids each): adds the gradient of its mean loss into the
    /// state's flat gradient on the device and returns that loss as an f32
    /// scalar on the device (also kept for the step's one read). With
    /// `reduce` (the step's last micro-batch), each bucket of the gradient
    /// is all-reduced as soon as backward has finished it.
    pub fn forward_backward(
        &mut self,
        inputs: &[u32],
        targets: &[u32],
        reduce: Option<&mut dyn Collective>,
    ) -> Result<Tensor> {
        self.state.begin_micro_batch()?;
        let (x, y) = tensors(
            self.model.config.context,
            inputs,
            targets,
            &self.device,
            &self.transfers,
        )?;
        let loss = segmented_backward(&self.model, &self.slots, &mut self.state, &x, &y, reduce)?;
        self.losses.push(loss.clone());
        Ok(loss)
    }

    /// All-reduces the buckets backward has not (on the device, in place).
    pub fn all_reduce(&mut self, collective: &mut dyn Collective) -> Result<(), CollectiveError> {
        self.state.all_reduce(collective)
    }

    /// Averaging over `micro_batches`, clipping and AdamW at `lr` on the
    /// device, the compute weights refreshed, then the step's one read.
    pub fn update(&mut self, micro_batches: usize, lr: f64) -> Result<Scalars> {
        let norm = self
            .state
            .update_on_device(1.0 / micro_batches as f64, lr)?;
        self.refresh()?;
        // Everything is enqueued: the one read of the step.
        self.losses.push(norm);
        let mut values = Vec::new();
        self.transfers
            .to_host(Purpose::Step, &Tensor::stack(&self.losses, 0)?, &mut values)?;
        self.losses.clear();
        let Some((norm, losses)) = values.split_last() else {
            anyhow::bail!("a step without micro-batches");
        };
        Ok(Scalars {
            loss_sum: losses.iter().copied().map(f64::from).sum(),
            grad_norm: f64::from(*norm),
        })
    }

    /// Mean loss of one micro-batch, without gradients.
    pub fn loss(&mut self, inputs: &[u32], targets: &[u32]) -> Result<f64> {
        let (x, y) = tensors(
            self.model.config.context,
            inputs,
            targets,
            &self.device,
            &self.transfers,
        )?;
        let loss = self.model.loss(&x, &y)?;
        Ok(f64::from(self.transfers.scalar(Purpose::Step, &loss)?))
    }

    /// Copies the weights and moments to the host; returns the update count.
    pub fn read_state(
        &self,
        weights: &mut Vec<f32>,
        m: &mut Vec<f32>,
        v: &mut Vec<f32>,
    ) -> Result<u64> {
        self.state.read(weights, m, v)?;
        Ok(self.state.step)
    }

    /// Loads checkpoint `dir` into the state (one tensor at a time) and
    /// refreshes the compute weights.
    pub fn load(&mut self, dir: &std::path::Path, weights_only: bool) -> Result<()> {
        self.state.load(dir, &self.slots, weights_only)?;
        self.refresh()
    }

    /// xxh3 of the master weights' bits (copied to the host).
    pub fn weights_hash(&self) -> Result<u64> {
        let mut w = Vec::new();
        self.state.weights_to_host(&mut w)?;
        Ok(xxhash_rust::xxh3::xxh3_64(bytemuck::cast_slice(&w)))
    }

    /// Copies the device-resident master weights into the model's compute
    /// weights (a cast on the device: bf16 on CUDA).
    fn refresh(&mut self) -> Result<()> {
        let weights = self.state.weights()?;
        for (slot, (_, var)) in self.slots.iter().zip(self.model.vars()) {
            let w = weights
                .narrow(0, slot.offset, slot.len)?
                .reshape(slot.shape.as_slice())?
                .to_dtype(var.dtype())?;
            var.set(&w)?;
        }
        Ok(())
    }
}

/// Forward and backward of the composed model one segment at a time — the
/// embeddings, each block, the head — so that each block's parameter
/// gradients are final, written into the flat gradient and (with
/// `reduce`) all-reduced before backward moves to the block below: the
/// hook Candle's autograd lacks (it returns every gradient at once).
///
/// Forward runs as usual, but each block's input is a fresh leaf (a copy
/// of the block below's output, cut from its graph). Backward starts from
/// the loss (giving the head's gradients and the gradient at the last
/// block's output), then, block by block downwards, back-propagates
/// Σ(output ⊙ upstream gradient) — whose gradient is exactly the
/// vector–Jacobian product of the block — giving the block's gradients and
/// the gradient at its input. Each block's graph is dropped once done, so
/// activations are freed as backward goes. The tied token embedding sums
/// its head and input gradients and is the last bucket.
///
/// On CUDA the all-reduce runs on NCCL's own stream (collective/nccl.rs):
/// cudarc orders it after the kernels that wrote the bucket and before the
/// kernels that next touch the gradient, so a bucket's sum overlaps the
/// backward of the blocks below it. On the CPU the ring runs in this
/// thread between blocks (no overlap: the cores are busy with backward).
fn segmented_backward(
    model: &Gpt,
    slots: &[Slot],
    state: &mut DeviceState,
    x: &Tensor,
    y: &Tensor,
    mut reduce: Option<&mut dyn Collective>,
) -> Result<Tensor> {
    let layers = model.config.n_layer;
    let embedded = model.embed(x)?;
    let mut leaves = Vec::with_capacity(layers + 1);
    let mut outputs = Vec::with_capacity(layers);
    let mut leaf = Var::from_tensor(&embedded.detach())?;
    for i in 0..layers {
        let out = model.block(i, leaf.as_tensor())?;
        leaves.push(leaf);
        leaf = Var::from_tensor(&out.detach())?;
        outputs.push(out);
    }
    leaves.push(leaf);
    let loss = model.head_loss(leaves[layers].as_tensor(), y)?;
    let value = loss.detach().to_dtype(DType::F32)?;

    // The parameters of one segment, by name prefix, into the flat gradient.
    let vars: Vec<(&Slot, &Var)> = slots.iter().zip(model.vars().map(|(_, v)| v)).collect();
    let mut put = |grads: &GradStore, prefix: &str, extra: Option<&Tensor>| -> Result<()> {
        for (slot, var) in vars.iter().filter(|(s, _)| s.name.starts_with(prefix)) {
            let g = grads
                .get(var.as_tensor())
                .with_context(|| format!("no gradient reached {}", slot.name))?;
            anyhow::ensure!(
                g.elem_count() == slot.len,
                "the gradient of {} has {} values, its slot {}",
                slot.name,
                g.elem_count(),
                slot.len
            );
            match extra {
                Some(e) => state.add_grad_part(slot.offset, &(g + e)?)?,
                None => state.add_grad_part(slot.offset, g)?,
            }
        }
        if let Some(c) = reduce.as_deref_mut() {
            state.reduce_ready(c)?;
        }
        Ok(())
    };
    let wte = "transformer.wte.weight";
    let wte_var = vars
        .iter()
        .find(|(s, _)| s.name == wte)
        .map(|(_, v)| v.as_tensor().clone())
        .context("the model has no token embedding")?;

    // The head: ln_f's gradients are final; the token embedding's head
    // part waits for its input part.
    let grads = loss.backward()?;
    put(&grads, "transformer.ln_f.", None)?;
    let wte_head = grads.get(&wte_var).cloned();
    let mut upstream = gradient_at(&grads, &leaves[layers], "the last block's output")?;
    drop(grads);
    drop(loss);
    for i in (0..layers).rev() {
        let out = outputs.pop().context("one output per block")?;
        let grads = (out * upstream.detach())?.sum_all()?.backward()?;
        put(&grads, &format!("transformer.h.{i}."), None)?;
        upstream = gradient_at(&grads, &leaves[i], "a block's input")?;
    }
    let grads = (embedded * upstream.detach())?.sum_all()?.backward()?;
    put(&grads, "transformer.wpe.", None)?;
    put(&grads, wte, wte_head.as_ref())?;
    Ok(value)
}

/// The gradient backward computed at a segment's boundary leaf.
fn gradient_at(grads: &GradStore, leaf: &Var, what: &str) -> Result<Tensor> {
    grads
        .get(leaf.as_tensor())
        .cloned()
        .with_context(|| format!("no gradient reached {what}"))
}

/// (B, T) input and target tensors of B·T token ids each.
fn tensors(
    t: usize,
    inputs: &[u32],
    targets: &[u32],
    device: &Device,
    transfers: &Transfers,
) -> Result<(Tensor, Tensor)> {
    let b = inputs.len() / t.max(1);
    anyhow::ensure!(
        b * t == inputs.len() && inputs.len() == targets.len(),
        "{} inputs and {} targets are not whole sequences of {t}",
        inputs.len(),
        targets.len()
    );
    Ok((
        transfers.to_device(Purpose::Step, inputs, &[b, t], device)?,
        transfers.to_device(Purpose::Step, targets, &[b, t], device)?,
    ))
}
