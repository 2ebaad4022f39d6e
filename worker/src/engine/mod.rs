//! The model's compute: forward, loss and backward of one micro-batch,
//! behind one type, [`Engine`], chosen in one place ([`Engine::new`]).
//!
//! Two implementations of the same GPT-2 (same parameters, same math):
//!
//! - **fused** (`gpt.rs` over the `stride-kernels` crate): the whole model's
//!   forward and backward written out layer by layer, as llm.c does, on
//!   buffers allocated once and reused every step. Attention (scores, mask,
//!   softmax, weighted sum), the tied LM head with the cross-entropy
//!   (chunked over rows: the B·T × V logits never exist), LayerNorm and
//!   GELU are single kernels with their own backward, parallel over rows;
//!   the products go to `gemm`, the kernel Candle's CPU matmul uses. It
//!   reads the trainer's flat f32 master weights in place and adds
//!   gradients straight into its flat gradient buffer. CPU, f32.
//! - **composed** (`crate::model`): Candle ops and Candle's autograd. Runs
//!   on every device Candle supports and in bf16; the CUDA path until the
//!   fused kernels have CUDA versions that have run on a GPU. Tests use it
//!   as the fused engine's reference. Its training state is
//!   device-resident ([`DeviceState`]): gradients are added into the flat
//!   device gradient, the compute weights are refreshed from the device
//!   master weights, and every host↔device copy goes through
//!   [`Transfers`].
//!
//! `worker.engine = auto` picks fused on the CPU in f32 and composed
//! elsewhere; the config refuses `fused` where it cannot run.

pub mod backend;
#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(test)]
mod emulated;
pub mod gpt;
#[cfg(test)]
mod tests;

use anyhow::{Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use stride_job::config::{self, ModelConfig, Precision};

use crate::collective::Collective;
use crate::device_state::DeviceState;
use crate::model::{self, Gpt, Slot};
use crate::transfer::{Purpose, Transfers};
pub use gpt::FusedGpt;

/// One worker's model compute; see the module doc.
#[derive(Debug)]
pub enum Engine {
    Fused(Box<FusedGpt<f32>>),
    Composed {
        model: Box<Gpt>,
        slots: Vec<Slot>,
        device: Device,
        transfers: Transfers,
    },
}

impl Engine {
    /// The engine `choice` resolves to on `device` at `precision`, for
    /// micro-batches of up to `micro_batch` sequences, holding `weights`.
    pub fn new(
        choice: config::Engine,
        model_config: &ModelConfig,
        weights: &[f32],
        micro_batch: usize,
        device: &Device,
        precision: Precision,
        transfers: Transfers,
    ) -> Result<Engine> {
        let dtype = model::compute_dtype(device, precision);
        let fused_fits = device.is_cpu() && dtype == DType::F32;
        let fused = match choice {
            config::Engine::Auto => fused_fits,
            config::Engine::Composed => false,
            config::Engine::Fused => {
                anyhow::ensure!(
                    fused_fits,
                    "worker.engine = fused runs on the CPU in f32 only (device {device:?}, compute dtype {dtype:?}): use `auto` or `composed`"
                );
                true
            }
        };
        let slots = model::layout(model_config);
        Ok(if fused {
            Engine::Fused(Box::new(FusedGpt::new(model_config, &slots, micro_batch)?))
        } else {
            Engine::Composed {
                model: Box::new(Gpt::new(model_config, weights, dtype, device)?),
                slots,
                device: device.clone(),
                transfers,
            }
        })
    }

    /// Whether the trainer's state lives on the engine's device (the
    /// composed engine) rather than in host buffers (the fused one).
    pub fn is_device_resident(&self) -> bool {
        matches!(self, Engine::Composed { .. })
    }

    /// `fused` or `composed`, for the log.
    pub fn name(&self) -> &'static str {
        match self {
            Engine::Fused(_) => "fused",
            Engine::Composed { .. } => "composed",
        }
    }

    /// Forward and backward of one micro-batch (`inputs` and `targets`: B·T
    /// token ids each): adds the gradient of its mean loss into `grad`
    /// (layout order) and returns that loss.
    pub fn forward_backward(
        &mut self,
        weights: &[f32],
        grad: &mut [f32],
        inputs: &[u32],
        targets: &[u32],
    ) -> Result<f64> {
        match self {
            Engine::Fused(m) => Ok(m.forward_backward(weights, grad, inputs, targets)?),
            Engine::Composed { .. } => {
                anyhow::bail!(
                    "the composed engine keeps its gradient on the device: use forward_backward_on"
                )
            }
        }
    }

    /// Forward and backward of one micro-batch on the device-resident
    /// `state`: adds the gradient of its mean loss into the state's flat
    /// gradient on the device and returns that loss as an f32 scalar on
    /// the device — the caller reads the step's losses once, after the
    /// whole step is enqueued, so the host never waits for the device
    /// mid-step. With `reduce` (the step's last micro-batch), each bucket
    /// of the gradient is all-reduced as soon as backward has finished it
    /// (see [`segmented_backward`]).
    pub fn forward_backward_on(
        &mut self,
        state: &mut DeviceState,
        inputs: &[u32],
        targets: &[u32],
        reduce: Option<&mut dyn Collective>,
    ) -> Result<Tensor> {
        let Engine::Composed {
            model,
            slots,
            device,
            transfers,
        } = self
        else {
            anyhow::bail!("the fused engine works on host buffers: use forward_backward");
        };
        let (x, y) = tensors(model.config.context, inputs, targets, device, transfers)?;
        segmented_backward(model, slots, state, &x, &y, reduce)
    }

    /// Mean loss of one micro-batch, without gradients.
    pub fn loss(&mut self, weights: &[f32], inputs: &[u32], targets: &[u32]) -> Result<f64> {
        match self {
            Engine::Fused(m) => Ok(m.loss(weights, inputs, targets)?),
            Engine::Composed {
                model,
                device,
                transfers,
                ..
            } => {
                let (x, y) = tensors(model.config.context, inputs, targets, device, transfers)?;
                let loss = model.loss(&x, &y)?;
                Ok(f64::from(transfers.scalar(Purpose::Step, &loss)?))
            }
        }
    }

    /// Copies the device-resident master weights into the composed
    /// model's compute weights (a cast on the device: bf16 on CUDA); the
    /// fused engine reads host weights in place and has nothing to do.
    pub fn refresh_from(&mut self, state: &DeviceState) -> Result<()> {
        match self {
            Engine::Fused(_) => Ok(()),
            Engine::Composed { model, slots, .. } => {
                let weights = state.weights()?;
                for (slot, (_, var)) in slots.iter().zip(model.vars()) {
                    let w = weights
                        .narrow(0, slot.offset, slot.len)?
                        .reshape(slot.shape.as_slice())?
                        .to_dtype(var.dtype())?;
                    var.set(&w)?;
                }
                Ok(())
            }
        }
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
