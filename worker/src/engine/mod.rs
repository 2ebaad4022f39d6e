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
//!   as the fused engine's reference.
//!
//! `worker.engine = auto` picks fused on the CPU in f32 and composed
//! elsewhere; the config refuses `fused` where it cannot run.

pub mod gpt;
#[cfg(test)]
mod tests;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use stride_job::config::{self, ModelConfig, Precision};

use crate::model::{self, Gpt, Slot};
pub use gpt::FusedGpt;

/// One worker's model compute; see the module doc.
#[derive(Debug)]
pub enum Engine {
    Fused(Box<FusedGpt<f32>>),
    Composed {
        model: Box<Gpt>,
        slots: Vec<Slot>,
        device: Device,
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
            }
        })
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
            Engine::Composed {
                model,
                slots,
                device,
            } => {
                let (x, y) = tensors(model.config.context, inputs, targets, device)?;
                let loss = model.loss(&x, &y)?;
                let value = f64::from(loss.to_dtype(DType::F32)?.to_scalar::<f32>()?);
                let grads = loss.backward()?;
                for (slot, (name, var)) in slots.iter().zip(model.vars()) {
                    let g = grads
                        .get(var.as_tensor())
                        .with_context(|| format!("no gradient reached {name}"))?
                        .flatten_all()?
                        .to_dtype(DType::F32)?
                        .to_vec1::<f32>()?;
                    for (acc, v) in grad[slot.offset..slot.offset + slot.len].iter_mut().zip(g) {
                        *acc += v;
                    }
                }
                Ok(value)
            }
        }
    }

    /// Mean loss of one micro-batch, without gradients.
    pub fn loss(&mut self, weights: &[f32], inputs: &[u32], targets: &[u32]) -> Result<f64> {
        match self {
            Engine::Fused(m) => Ok(m.loss(weights, inputs, targets)?),
            Engine::Composed { model, device, .. } => {
                let (x, y) = tensors(model.config.context, inputs, targets, device)?;
                let loss = model.loss(&x, &y)?.to_dtype(DType::F32)?;
                Ok(f64::from(loss.to_scalar::<f32>()?))
            }
        }
    }

    /// Tells the engine the weights changed (after an update or a load):
    /// the composed model copies them into its device tensors; the fused
    /// one reads the master weights in place and has nothing to do.
    pub fn weights_changed(&mut self, weights: &[f32]) -> Result<()> {
        match self {
            Engine::Fused(_) => Ok(()),
            Engine::Composed { model, .. } => Ok(model.load_flat(weights)?),
        }
    }
}

/// (B, T) input and target tensors of B·T token ids each.
fn tensors(t: usize, inputs: &[u32], targets: &[u32], device: &Device) -> Result<(Tensor, Tensor)> {
    let b = inputs.len() / t.max(1);
    anyhow::ensure!(
        b * t == inputs.len() && inputs.len() == targets.len(),
        "{} inputs and {} targets are not whole sequences of {t}",
        inputs.len(),
        targets.len()
    );
    Ok((
        Tensor::from_slice(inputs, (b, t), device)?,
        Tensor::from_slice(targets, (b, t), device)?,
    ))
}
