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

pub mod gpt;
#[cfg(test)]
mod tests;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use stride_job::config::{self, ModelConfig, Precision};

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
    /// gradient on the device and returns that loss (the one value that
    /// comes to the host).
    pub fn forward_backward_on(
        &mut self,
        state: &mut DeviceState,
        inputs: &[u32],
        targets: &[u32],
    ) -> Result<f64> {
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
        let loss = model.loss(&x, &y)?;
        let value = f64::from(transfers.scalar(Purpose::Step, &loss)?);
        let grads = loss.backward()?;
        let mut flat = Vec::with_capacity(slots.len());
        for (slot, (name, var)) in slots.iter().zip(model.vars()) {
            let g = grads
                .get(var.as_tensor())
                .with_context(|| format!("no gradient reached {name}"))?;
            anyhow::ensure!(
                g.elem_count() == slot.len,
                "the gradient of {name} has {} values, its slot {}",
                g.elem_count(),
                slot.len
            );
            flat.push(g.flatten_all()?.to_dtype(DType::F32)?);
        }
        state.add_grad(Tensor::cat(&flat, 0)?)?;
        Ok(value)
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
