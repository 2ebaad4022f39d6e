//! The model's compute **and the training state it computes on**: one
//! type, [`Engine`], chosen in one place ([`Engine::new`]), each variant
//! owning its weights, gradient, optimizer state and compute — so that no
//! second enum has to agree with it on where the state lives.
//!
//! Two implementations of the same GPT-2 (same parameters, same math):
//!
//! - **fused** (`gpt.rs`, one model over a [`backend::Backend`]; its state
//!   in `fused.rs`): the whole model's forward and backward written out
//!   layer by layer, as llm.c does, on buffers allocated once. On the CPU
//!   ([`Engine::Fused`]: `stride-kernels`, f32, host memory — the master
//!   weights read in place, gradients added straight into the flat
//!   gradient the all-reduce sums); on CUDA (`Engine::FusedCudaF32`,
//!   `Engine::FusedCudaBf16`: the fatbin's kernels and cuBLASLt, the
//!   state device-resident — f32 master weights, gradient and moments,
//!   the decay mask, the bf16 compute copy — and the optimizer step as
//!   kernels).
//! - **composed** (`composed.rs` over `crate::model`): Candle ops and
//!   Candle's autograd, on every device Candle supports and in bf16, its
//!   state device-resident ([`DeviceState`]) with bucketed all-reduces
//!   during backward. Tests use it as the fused engine's reference; on
//!   CUDA it stays selectable (`worker.engine = composed`).
//!
//! The choice ([`resolve`], a pure function of the config and the device
//! kind): `worker.engine = auto` is fused on the CPU in f32 and fused on
//! CUDA (f32 or bf16 compute) for the shapes its kernels take
//! (`stride_cuda_kernels::supports`), composed otherwise — on CUDA with a
//! warning that names the key and the reason. `fused` where it cannot run
//! is refused here with that message, before anything is allocated (config
//! validation is to call the same `supports` and refuse it earlier), never
//! in a kernel.
//!
//! Every variant does a step the same way, in the order the trainer calls:
//! [`Engine::begin_step`], [`Engine::forward_backward`] per micro-batch,
//! [`Engine::all_reduce`] (the trainer's visible synchronisation point),
//! [`Engine::update`] (averaging, clipping, AdamW, and the step's one read
//! of its losses and norm).

pub mod backend;
pub mod composed;
#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(test)]
mod emulated;
pub mod fused;
pub mod gpt;
#[cfg(test)]
pub(crate) mod tests;

use std::ops::Range;
use std::path::Path;

use anyhow::Result;
use candle_core::{DType, Device};
use stride_cuda_kernels::{ModelShape, supports};
use stride_job::config::{self, ModelConfig, OptimConfig, Precision};

use crate::collective::{Collective, CollectiveError};
use crate::model::{self, Slot};
use crate::transfer::Transfers;
pub use backend::Cpu;
pub use composed::Composed;
#[cfg(feature = "cuda")]
use cuda::CudaBackend;
pub use fused::Fused;
pub use gpt::FusedGpt;
#[cfg(feature = "cuda")]
use stride_cuda_kernels::Bf16;

#[cfg(doc)]
use composed::state::DeviceState;

/// What a step reads back at its end: the sum of its micro-batches' mean
/// losses, and the global gradient norm (averaged over ranks, before
/// clipping).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scalars {
    pub loss_sum: f64,
    pub grad_norm: f64,
}

/// One worker's model compute and training state; see the module doc.
#[derive(Debug)]
pub enum Engine {
    /// The fused engine on the CPU kernels: f32, host memory.
    Fused(Box<Fused<Cpu<f32>>>),
    /// The fused engine on the CUDA kernels, computing in f32.
    #[cfg(feature = "cuda")]
    FusedCudaF32(Box<Fused<CudaBackend<f32>>>),
    /// The fused engine on the CUDA kernels, computing in bf16 (f32 master
    /// weights, gradient and moments).
    #[cfg(feature = "cuda")]
    FusedCudaBf16(Box<Fused<CudaBackend<Bf16>>>),
    /// Candle ops and autograd, the state on Candle's device.
    Composed(Box<Composed>),
}

/// The same expression for every fused variant (each a `Fused<_>` of its
/// own backend), another for the composed one.
macro_rules! each {
    ($engine:expr, $f:ident => $fused:expr, $c:ident => $composed:expr) => {
        match $engine {
            Engine::Fused($f) => $fused,
            #[cfg(feature = "cuda")]
            Engine::FusedCudaF32($f) => $fused,
            #[cfg(feature = "cuda")]
            Engine::FusedCudaBf16($f) => $fused,
            Engine::Composed($c) => $composed,
        }
    };
}

/// What an engine is built from: the worker's sections of the config and
/// the initial weights.
#[derive(Debug, Clone)]
pub struct Setup<'a> {
    pub model: &'a ModelConfig,
    pub optim: &'a OptimConfig,
    /// Initial f32 weights, layout order (the fused CPU engine keeps this
    /// vector as its master weights).
    pub weights: Vec<f32>,
    /// The largest micro-batch (sequences) a step or an evaluation hands it.
    pub micro_batch: usize,
    pub device: &'a Device,
    pub precision: Precision,
    pub transfers: Transfers,
    /// The parameters whose optimizer state this rank keeps, when the job
    /// shards it (`Config::shards_optimizer`); `None`: all of them.
    pub shard: Option<Range<usize>>,
}

/// The kind of device, as the engine choice sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    Cpu,
    Cuda,
    /// Anything else Candle runs (Metal): the composed engine only.
    Other,
}

impl DeviceKind {
    pub fn of(device: &Device) -> DeviceKind {
        if device.is_cpu() {
            DeviceKind::Cpu
        } else if device.is_cuda() {
            DeviceKind::Cuda
        } else {
            DeviceKind::Other
        }
    }
}

/// Which [`Engine`] variant a config resolves to: the value [`resolve`]
/// decides and [`Engine::new`] builds at once (nothing keeps it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolved {
    FusedCpu,
    FusedCuda { bf16: bool },
    Composed,
}

/// The engine `choice` resolves to on a `device` computing in `dtype`, for
/// a model and micro-batch of `shape`, with a note to log when `auto` fell
/// back; an error naming the key and the reason when `fused` cannot run.
pub fn resolve(
    choice: config::Engine,
    device: DeviceKind,
    dtype: DType,
    shape: &ModelShape,
) -> Result<(Resolved, Option<String>), String> {
    let fused = match (device, dtype) {
        (DeviceKind::Cpu, DType::F32) => Ok(Resolved::FusedCpu),
        (DeviceKind::Cpu, _) => Err(format!(
            "the fused engine computes in f32 on the CPU, and the compute dtype is {dtype:?} \
             (worker.precision): use precision `auto` or `f32`, or engine `composed`"
        )),
        (DeviceKind::Cuda, DType::F32 | DType::BF16) => match supports(shape) {
            Ok(()) => Ok(Resolved::FusedCuda {
                bf16: dtype == DType::BF16,
            }),
            Err(u) => Err(format!(
                "the fused engine's CUDA kernels do not take this model: {u}"
            )),
        },
        (DeviceKind::Cuda, _) => Err(format!(
            "the fused engine computes in f32 or bf16 on CUDA, not {dtype:?}"
        )),
        (DeviceKind::Other, _) => {
            Err("the fused engine runs on the CPU and on CUDA GPUs only".to_string())
        }
    };
    match choice {
        config::Engine::Composed => Ok((Resolved::Composed, None)),
        config::Engine::Fused => fused
            .map(|r| (r, None))
            .map_err(|why| format!("worker.engine = fused: {why}; use `auto` or `composed`")),
        config::Engine::Auto => Ok(match fused {
            Ok(r) => (r, None),
            // The composed engine is the CPU's bf16 path and the only one
            // elsewhere: no note. On CUDA the fused engine was expected.
            Err(why) if device == DeviceKind::Cuda => (
                Resolved::Composed,
                Some(format!(
                    "worker.engine = auto runs the composed engine (Candle ops): {why}"
                )),
            ),
            Err(_) => (Resolved::Composed, None),
        }),
    }
}

impl Engine {
    /// The engine `choice` resolves to for `setup` ([`resolve`]), with its
    /// state built from `setup.weights`.
    pub fn new(choice: config::Engine, setup: Setup<'_>) -> Result<Engine> {
        let Setup {
            model: model_config,
            optim,
            weights,
            micro_batch,
            device,
            precision,
            transfers,
            shard,
        } = setup;
        let dtype = model::compute_dtype(device, precision);
        let shape = ModelShape {
            n_head: model_config.n_head,
            n_embd: model_config.n_embd,
            vocab_size: model_config.vocab_size,
            context: model_config.context,
            micro_batch,
        };
        let (resolved, note) =
            resolve(choice, DeviceKind::of(device), dtype, &shape).map_err(anyhow::Error::msg)?;
        if let Some(note) = note {
            tracing::warn!("{note}");
        }
        let slots = model::layout(model_config);
        Ok(match resolved {
            Resolved::FusedCpu => Engine::Fused(Box::new(Fused::new(
                Cpu::default(),
                model_config,
                &slots,
                micro_batch,
                weights,
                optim,
                Device::Cpu,
                transfers,
                shard,
            )?)),
            #[cfg(feature = "cuda")]
            Resolved::FusedCuda { bf16 } => {
                let stream = device.as_cuda_device()?.cuda_stream();
                if bf16 {
                    Engine::FusedCudaBf16(Box::new(Fused::new(
                        CudaBackend::<Bf16>::new(stream)?,
                        model_config,
                        &slots,
                        micro_batch,
                        weights,
                        optim,
                        device.clone(),
                        transfers,
                        shard,
                    )?))
                } else {
                    Engine::FusedCudaF32(Box::new(Fused::new(
                        CudaBackend::<f32>::new(stream)?,
                        model_config,
                        &slots,
                        micro_batch,
                        weights,
                        optim,
                        device.clone(),
                        transfers,
                        shard,
                    )?))
                }
            }
            #[cfg(not(feature = "cuda"))]
            Resolved::FusedCuda { .. } => {
                anyhow::bail!("the fused CUDA engine needs a worker built with `--features cuda`")
            }
            Resolved::Composed if shard.is_some() => anyhow::bail!(
                "the composed engine keeps the whole optimizer state (train.shard_optimizer needs \
                 the fused engine: f32 on the CPU, a model its CUDA kernels take on a GPU): set \
                 train.shard_optimizer = \"off\""
            ),
            Resolved::Composed => Engine::Composed(Box::new(Composed::new(
                model_config,
                &weights,
                dtype,
                device,
                optim,
                transfers,
            )?)),
        })
    }

    /// `fused` or `composed`, as `worker.engine` names them.
    pub fn name(&self) -> &'static str {
        each!(self, _f => "fused", _c => "composed")
    }

    /// The engine, its device and its compute precision, for the log.
    pub fn describe(&self) -> &'static str {
        match self {
            Engine::Fused(_) => "fused (CPU kernels, f32)",
            #[cfg(feature = "cuda")]
            Engine::FusedCudaF32(_) => "fused (CUDA kernels, f32)",
            #[cfg(feature = "cuda")]
            Engine::FusedCudaBf16(_) => "fused (CUDA kernels, bf16 compute, f32 master weights)",
            Engine::Composed(_) => "composed (Candle ops)",
        }
    }

    /// Whether the state lives in device memory (every engine but the
    /// fused CPU one), so that a step's copies cross a link.
    pub fn is_device_resident(&self) -> bool {
        !matches!(self, Engine::Fused(_))
    }

    /// Parameters.
    pub fn len(&self) -> usize {
        each!(self, f => f.len(), c => c.state().len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The parameters whose optimizer state this rank keeps (what
    /// [`Engine::read_state`] copies): all, or its shard.
    pub fn shard(&self) -> Range<usize> {
        each!(self, f => f.shard(), c => 0..c.state().len())
    }

    /// Whether this rank keeps the optimizer state of a shard only.
    pub fn is_sharded(&self) -> bool {
        self.shard().len() != self.len()
    }

    /// The device the state lives on (for page-locking snapshot buffers).
    pub fn device(&self) -> &Device {
        each!(self, f => f.device(), c => c.device())
    }

    /// Starts a step: the gradient ← 0.
    pub fn begin_step(&mut self) -> Result<()> {
        each!(self, f => f.begin_step(), c => {
            c.begin_step();
            Ok(())
        })
    }

    /// Forward and backward of one micro-batch (`inputs`, `targets`: B·T
    /// token ids each): adds the gradient of its mean loss into the step's
    /// gradient; its loss is read at the step's end. With `reduce` (the
    /// step's last micro-batch, `train.overlap_grad_comm`) the gradient is
    /// summed by block as backward finishes each: the fused CPU engine on
    /// a thread of its own ([`Fused::forward_backward_overlapped`]), the
    /// composed engine by buckets in line (on CUDA, on NCCL's stream); the
    /// fused CUDA engine sums once, in [`Engine::sum_gradient`] (no
    /// buckets during its backward yet). Returns the seconds the call
    /// waited for communication after its backward had ended (the fused
    /// CPU engine's; 0 for the others, whose in-line sums are counted in
    /// the compute).
    pub fn forward_backward(
        &mut self,
        inputs: &[u32],
        targets: &[u32],
        reduce: Option<&mut dyn Collective>,
    ) -> Result<f64> {
        match (self, reduce) {
            (Engine::Fused(f), Some(c)) => f.forward_backward_overlapped(inputs, targets, c),
            (engine, reduce) => {
                each!(engine,
                    f => f.forward_backward(inputs, targets),
                    c => c.forward_backward(inputs, targets, reduce).map(drop))?;
                Ok(0.0)
            }
        }
    }

    /// Sums the step's gradient over all ranks, in place where it lives
    /// (the parts not summed during backward): all of it, or — sharded —
    /// into this rank's shard.
    pub fn sum_gradient(&mut self, collective: &mut dyn Collective) -> Result<(), CollectiveError> {
        each!(self, f => f.sum_gradient(collective), c => c.all_reduce(collective))
    }

    /// Averages the summed gradient over `micro_batches` (all ranks'),
    /// clips it to `optim.grad_clip`, applies AdamW at `lr` (to this rank's
    /// shard, sharded), refreshes the compute weights, and reads the step's
    /// losses and norm (one wait).
    pub fn update(
        &mut self,
        micro_batches: usize,
        lr: f64,
        collective: &mut dyn Collective,
    ) -> Result<Scalars> {
        each!(self,
            f => f.update(micro_batches, lr, collective),
            c => c.update(micro_batches, lr))
    }

    /// Sharded: the ranks' updated shards of the weights to every rank.
    pub fn gather_weights(&mut self, collective: &mut dyn Collective) -> Result<()> {
        each!(self, f => f.gather_weights(collective), _c => Ok(()))
    }

    /// Mean loss of one micro-batch, without gradients.
    pub fn loss(&mut self, inputs: &[u32], targets: &[u32]) -> Result<f64> {
        each!(self, f => f.loss(inputs, targets), c => c.loss(inputs, targets))
    }

    /// Copies the f32 master weights and both moments of
    /// [`Engine::shard`] into the three buffers (resized to it); returns
    /// the update count.
    pub fn read_state(
        &self,
        weights: &mut Vec<f32>,
        m: &mut Vec<f32>,
        v: &mut Vec<f32>,
    ) -> Result<u64> {
        each!(self, f => f.read_state(weights, m, v), c => c.read_state(weights, m, v))
    }

    /// Loads checkpoint `dir` (a layout of `slots`): the weights, and
    /// unless `weights_only` the moments and the update count.
    pub fn load(&mut self, dir: &Path, slots: &[Slot], weights_only: bool) -> Result<()> {
        each!(self, f => f.load(dir, slots, weights_only), c => c.load(dir, weights_only))
    }

    /// xxh3 of the master weights' bits, layout order.
    pub fn weights_hash(&self) -> Result<u64> {
        each!(self, f => f.weights_hash(), c => c.weights_hash())
    }

    /// All the f32 master weights on the host (tests; [`Engine::read_state`]
    /// copies a sharded state's shard only).
    #[cfg(test)]
    pub fn weights(&self) -> Result<Vec<f32>> {
        let mut w = vec![0f32; self.len()];
        each!(self, f => f.weights_into(&mut w)?, c => c.state().weights_to_host(&mut w)?);
        Ok(w)
    }

    /// The step's gradient on the host (tests): summed (device fused),
    /// averaged and clipped after the update (host fused), written or
    /// summed (composed).
    #[cfg(test)]
    pub fn gradient(&self) -> Result<Vec<f32>> {
        each!(self, f => f.gradient(), c => {
            let mut g = Vec::new();
            c.state().grad_to_host(&mut g)?;
            Ok(g)
        })
    }
}
