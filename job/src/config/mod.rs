//! The job configuration: where a config comes from, its schema, `--set`
//! overrides and validation.
//!
//! Loading has two stages, as in ripgrep: a *raw* stage ([`RawConfig`]: the
//! TOML table as written, plus `--set` overrides, every key checked against
//! [`SCHEMA`]) and a *resolved* stage ([`Config`]: typed, derived defaults
//! filled in, every value checked). Only a resolved config leaves this
//! module; each component then takes only its own section.
//!
//! This module must not guess: an unknown section or key, a wrong type or an
//! impossible value is an error naming the file (or the `--set` argument),
//! the key and what is wrong, with the nearest valid key for a typo.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::named_choices;
use crate::names::{Hint, UnknownName, hex};

mod bounds;
mod raw;

pub use bounds::Violation;
pub use raw::*;

/// Largest timeout a config may set, in seconds (larger values would
/// overflow the clocks they are added to).
pub const MAX_SECONDS: f64 = 1e6;

/// Largest vocabulary a `uint16` token file can address.
pub const MAX_VOCAB: usize = 1 << 16;

/// Largest number of steps (`train.max_steps`, intervals, `--extend-steps`).
pub const MAX_STEPS: u64 = 1 << 40;

/// Largest value a worker's `--threads` (and `worker.threads`) may take.
pub const MAX_THREADS: usize = 4096;

/// What went wrong while loading a config. Every variant names where the
/// value came from (`origin`: a file, an embedded preset or a `--set`).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "config `{name}` not found: tried {tried}; built-in presets are {presets} (pass a path or one of those names)"
    )]
    NotFound {
        name: String,
        tried: String,
        presets: String,
    },
    #[error("{origin}: cannot read: {message}")]
    Io { origin: String, message: String },
    #[error("{origin}: not valid TOML: {message}")]
    Syntax { origin: String, message: String },
    #[error("{origin}: unknown section `[{section}]`{hint}; valid sections are {valid}")]
    UnknownSection {
        origin: String,
        section: String,
        hint: Hint,
        valid: String,
    },
    #[error("{origin}: unknown key `{key}`{hint}")]
    UnknownKey {
        origin: String,
        key: String,
        hint: Hint,
    },
    #[error("{origin}: `{key}` has the wrong type: {message}")]
    WrongType {
        origin: String,
        key: String,
        message: String,
    },
    #[error("{origin}: `{key}` = {value}: {reason}")]
    Invalid {
        origin: String,
        key: String,
        value: String,
        reason: String,
    },
    #[error("--set {arg}: {reason} (expected `section.key=value`, e.g. `--set train.lr=3e-4`)")]
    BadOverride { arg: String, reason: String },
}

/// A resolved, validated job configuration. Serialises to the TOML saved as
/// `config.toml` in every checkpoint and sent to every worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub model: ModelConfig,
    pub data: DataConfig,
    pub train: TrainConfig,
    pub optim: OptimConfig,
    pub checkpoint: CheckpointConfig,
    pub worker: WorkerConfig,
    pub cluster: ClusterConfig,
}

/// GPT-2 architecture sizes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// Transformer blocks.
    pub n_layer: usize,
    /// Attention heads per block; must divide `n_embd`.
    pub n_head: usize,
    /// Width of the residual stream.
    pub n_embd: usize,
    /// Embedding rows; GPT-2's 50,257 tokens padded to 50,304 (a multiple of 64).
    pub vocab_size: usize,
    /// Tokens per sample (the attention window).
    pub context: usize,
}

impl Default for ModelConfig {
    /// GPT-2 small (124M parameters).
    fn default() -> Self {
        ModelConfig {
            n_layer: 12,
            n_head: 12,
            n_embd: 768,
            vocab_size: 50_304,
            context: 1024,
        }
    }
}

/// Where the tokens come from and how they are cut into samples.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// Training token file (nanoGPT `uint16` or llm.c); absent = built-in synthetic corpus.
    pub train: Option<PathBuf>,
    /// Validation token file; absent = the last `val_fraction` of the training source.
    pub val: Option<PathBuf>,
    /// Distance between the starts of consecutive samples; default = `model.context`.
    pub stride: usize,
    /// Distance between the starts of consecutive validation windows;
    /// default = `model.context` (disjoint windows, whatever `stride` is, so
    /// that runs at different training strides are judged on the same
    /// windows).
    pub val_stride: usize,
    /// Share of tokens held out for validation when there is no `val` file
    /// (and the default split of `coordinator prepare`).
    pub val_fraction: f64,
    /// Length of the built-in synthetic corpus, in tokens.
    pub synthetic_tokens: usize,
    /// Possible successors of each token in the synthetic Markov source.
    pub synthetic_branching: usize,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            train: None,
            val: None,
            stride: ModelConfig::default().context,
            val_stride: ModelConfig::default().context,
            val_fraction: 0.1,
            synthetic_tokens: 1_000_000,
            synthetic_branching: 4,
        }
    }
}

/// How the learning rate decays after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Decay {
    Constant,
    Cosine,
    Linear,
    /// `1 − sqrt` (Hägele et al. 2024): see `schedule`'s module doc.
    #[serde(rename = "1-sqrt")]
    OneMinusSqrt,
}

named_choices! {
    /// The dtype gradients travel between workers in; they are summed in
    /// f32 on arrival either way.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
    #[serde(try_from = "String", into = "String")]
    pub enum GradCommDtype: "gradient dtype" {
        /// As computed: the ring's sums are exact up to f32 rounding, in a
        /// fixed order.
        #[default]
        F32 = "f32",
        /// Rounded to bf16 (nearest even) for the wire, half the bytes;
        /// added in f32 by the receiver. Every rank still ends with the
        /// same bits (a chunk's owner keeps the rounded sum it sends).
        Bf16 = "bf16",
    }
}

impl GradCommDtype {
    /// Why `collective` (resolved) cannot carry gradients in this dtype,
    /// if it cannot.
    fn refusal(self, collective: CollectiveKind) -> Option<&'static str> {
        match (self, collective) {
            (GradCommDtype::F32, _) => None,
            (GradCommDtype::Bf16, CollectiveKind::Ring) => None,
            (GradCommDtype::Bf16, CollectiveKind::Nccl) => Some(
                "NCCL carries the gradient in f32 in this build (its bf16 path needs a conversion on the device that is not written yet): use `f32`",
            ),
            (GradCommDtype::Bf16, CollectiveKind::Auto) => {
                Some("the collective must be resolved first (CollectiveKind::on)")
            }
        }
    }
}

named_choices! {
    /// A data-parallel feature that changes no bit of a step, only what
    /// it costs (`train.shard_optimizer`, `train.overlap_grad_comm`):
    /// `auto` turns it on where it was measured to pay, for models of at
    /// least [`AUTO_MIN_PARAMETERS`] (`Config::shards_optimizer`,
    /// `Config::overlaps_grad_comm`). Written `"on"`/`"off"` or
    /// `true`/`false`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
    #[serde(try_from = "Switch", into = "String")]
    pub enum Toggle: "switch" {
        #[default]
        Auto = "auto" ("on where it pays: more than one worker, a model of at least 4 M parameters"),
        On = "on",
        Off = "off",
    }
}

/// The smallest model (parameters) for which `auto` shards the optimizer
/// state and sums gradients during backward. Measured on 2 CPU workers
/// (BENCHMARKS.md, "Data parallelism on the CPU"): for `tiny` (0.1 M) each
/// costs 12-15 % of the tokens/s (its steps are a few ms, and each adds
/// collective calls whose latency dominates); for the 16 M-parameter
/// `main` shape neither costs anything measurable, and sharding halves
/// the moments. Between the two the line is a judgment: a model whose
/// moments are 32 MB per rank.
pub const AUTO_MIN_PARAMETERS: usize = 4_000_000;

/// A switch as TOML writes it: a boolean or a name.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Switch {
    Bool(bool),
    Text(String),
}

impl TryFrom<Switch> for Toggle {
    type Error = UnknownName;
    fn try_from(s: Switch) -> Result<Toggle, UnknownName> {
        match s {
            Switch::Bool(true) => Ok(Toggle::On),
            Switch::Bool(false) => Ok(Toggle::Off),
            Switch::Text(t) => t.parse(),
        }
    }
}

/// Why the fused engine would not run a job on `device` with `engine` at
/// `precision` for `shape` (the composed engine, which keeps its optimizer
/// state whole, would), if it would not.
fn composed_because(
    device: Device,
    engine: Engine,
    precision: Precision,
    shape: &crate::cuda_shapes::ModelShape,
) -> Option<String> {
    match (device, engine) {
        (_, Engine::Composed) => Some("`worker.engine` is `composed`".into()),
        (Device::Cpu, _) if precision == Precision::Bf16 => {
            Some("the CPU computes bf16 with the composed engine (`worker.precision`)".into())
        }
        (Device::Cuda(_), Engine::Auto) => crate::cuda_shapes::supports(shape)
            .err()
            .map(|u| format!("`worker.engine = auto` runs this model composed on CUDA ({u})")),
        _ => None,
    }
}

/// The optimisation schedule and batch geometry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Optimiser steps of a fresh run: where its LR schedule ends. Only
    /// that: a resumed run's length is its checkpoint's schedule, which
    /// `--extend-steps` and `decay` change, never this key.
    pub max_steps: u64,
    /// Steps of linear warmup to the peak LR: `lr(s) = lr · (s+1)/warmup_steps`.
    pub warmup_steps: u64,
    /// Peak learning rate.
    pub lr: f64,
    /// Floor of any decay, as a fraction of `lr` (also used by `--extend-steps`).
    pub min_lr_ratio: f64,
    /// Shape after warmup: `constant`, or `cosine`, `linear`, `1-sqrt` (to `min_lr_ratio · lr`).
    pub decay: Decay,
    /// Samples per optimiser step, summed over all workers; never changes with the worker count.
    pub global_batch: usize,
    /// Samples per forward/backward pass on one worker.
    pub micro_batch: usize,
    /// Evaluate every this many steps (0 = only at the end).
    pub eval_interval: u64,
    /// Validation samples per evaluation, in units of `global_batch` (0 = the whole split).
    pub eval_batches: usize,
    /// Seed of weight initialisation, data order and the synthetic corpus.
    pub seed: u64,
    /// The dtype gradients cross the network in (`f32`, `bf16`): bf16
    /// halves the bytes, rounding each partial sum once per hop; a resume
    /// may change it.
    pub grad_comm_dtype: GradCommDtype,
    /// Each rank keeps the optimizer state of its shard only (ZeRO-1):
    /// `auto` (CPU jobs, [`Toggle`]), `on`, `off`; a resume may change it.
    /// The same bits either way, and the same checkpoints.
    pub shard_optimizer: Toggle,
    /// Sum each block's gradient while backward computes the blocks below
    /// it (the step's last micro-batch), rather than all of it after
    /// backward: `auto` ([`Toggle`]), `on`, `off`; the same bits either
    /// way. The fused engine on the CPU does it on a thread of its own;
    /// the composed engine by buckets.
    pub overlap_grad_comm: Toggle,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            max_steps: 1000,
            warmup_steps: 100,
            lr: 1e-3,
            min_lr_ratio: 0.1,
            decay: Decay::Constant,
            global_batch: 8,
            micro_batch: 1,
            eval_interval: 100,
            eval_batches: 4,
            seed: 1337,
            grad_comm_dtype: GradCommDtype::F32,
            shard_optimizer: Toggle::Auto,
            overlap_grad_comm: Toggle::Auto,
        }
    }
}

/// AdamW and gradient clipping.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimConfig {
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Added to the denominator for numerical safety.
    pub eps: f64,
    /// Decoupled weight decay, applied to matrices (2-D weights) only.
    pub weight_decay: f64,
    /// Clip the global gradient norm to this value (0 = no clipping).
    pub grad_clip: f64,
}

impl Default for OptimConfig {
    fn default() -> Self {
        OptimConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            grad_clip: 1.0,
        }
    }
}

/// Where and how often checkpoints are written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointConfig {
    /// Folder of `step-NNNNNNNN/` directories and the `best`/`latest`
    /// pointers: relative to the run directory (a run directory holds
    /// everything its run writes), or absolute (a shared volume).
    pub dir: PathBuf,
    /// Checkpoint every this many steps (0 = only at the end and on a new best).
    pub interval: u64,
    /// Complete checkpoints to keep, besides `best`.
    pub keep_last: usize,
    /// Time to finish the checkpoints in flight at the end of a run or when
    /// it stops (SIGTERM, a failure); one not committed by then is left
    /// incomplete and never loaded. Keep it below the supervisor's grace
    /// period (Kubernetes: 300 s in deploy/).
    pub write_timeout_s: f64,
}

impl CheckpointConfig {
    /// The folder this job's checkpoints go to: `dir` inside `run_dir`
    /// when relative, as written when absolute (SPEC §1).
    pub fn folder(&self, run_dir: &Path) -> PathBuf {
        if self.dir.is_absolute() {
            self.dir.clone()
        } else {
            run_dir.join(&self.dir)
        }
    }
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        CheckpointConfig {
            dir: PathBuf::from("checkpoints"),
            interval: 100,
            keep_last: 3,
            write_timeout_s: 240.0,
        }
    }
}

/// The compute device of a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Device {
    Cpu,
    /// `cuda` (the worker's local rank picks the GPU) or `cuda:N`.
    Cuda(Option<usize>),
}

impl TryFrom<String> for Device {
    type Error = UnknownName;
    fn try_from(s: String) -> Result<Self, UnknownName> {
        match s.as_str() {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(None)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(|n| Device::Cuda(Some(n)))
                .ok_or_else(|| {
                    UnknownName::new("device", other, "expected `cpu`, `cuda` or `cuda:N`")
                }),
        }
    }
}

impl From<Device> for String {
    fn from(d: Device) -> String {
        d.to_string()
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(None) => write!(f, "cuda"),
            Device::Cuda(Some(n)) => write!(f, "cuda:{n}"),
        }
    }
}

named_choices! {
    /// The dtype the model computes in; master weights and optimizer state
    /// are always f32.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
    #[serde(try_from = "String", into = "String")]
    pub enum Precision: "precision" {
        /// bf16 on CUDA, f32 on CPU.
        #[default]
        Auto = "auto" ("bf16 on CUDA, f32 on CPU"),
        F32 = "f32",
        /// bf16 matmuls with f32 LayerNorm, softmax and loss.
        Bf16 = "bf16",
    }
}

named_choices! {
    /// Which implementation of the model's forward and backward a worker
    /// runs (see the worker's `engine` module).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
    #[serde(try_from = "String", into = "String")]
    pub enum Engine: "engine" {
        /// `fused` where it can run (the CPU in f32; CUDA for the shapes its
        /// kernels take), `composed` elsewhere.
        #[default]
        Auto = "auto" ("fused where its kernels take the model, else composed"),
        /// Stride's fused kernels with their own backward, buffers reused
        /// across steps: f32 on the CPU, f32 or bf16 on CUDA.
        Fused = "fused",
        /// Candle ops and Candle's autograd: any device, bf16 included.
        Composed = "composed",
    }
}

named_choices! {
    /// How the workers sum their gradients (the worker's `collective`
    /// module): the backend a rank forms each generation.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
    #[serde(try_from = "String", into = "String")]
    pub enum CollectiveKind: "collective" {
        /// `nccl` on CUDA, `ring` on CPUs.
        #[default]
        Auto = "auto" ("nccl on CUDA, ring on CPUs"),
        /// Stride's TCP ring between worker processes: host memory, a
        /// fixed summation order (bit-identical results on every rank).
        Ring = "ring",
        /// NVIDIA's NCCL (a `cuda` build): device memory.
        Nccl = "nccl",
    }
}

impl CollectiveKind {
    /// The backend a job on `device` forms: never `Auto`.
    pub fn on(self, device: &Device) -> CollectiveKind {
        match self {
            CollectiveKind::Auto => match device {
                Device::Cuda(_) => CollectiveKind::Nccl,
                Device::Cpu => CollectiveKind::Ring,
            },
            CollectiveKind::Ring => CollectiveKind::Ring,
            CollectiveKind::Nccl => CollectiveKind::Nccl,
        }
    }

    /// Why this backend cannot sum the gradient of a worker on `device`,
    /// if it cannot (said at config validation, naming the key).
    fn refusal(self, device: &Device) -> Option<&'static str> {
        let gpu = matches!(device, Device::Cuda(_));
        match self {
            CollectiveKind::Auto => None,
            CollectiveKind::Ring => gpu.then_some(
                "the TCP ring sums host memory and a CUDA worker's gradient is device memory: use `auto` or `nccl`",
            ),
            CollectiveKind::Nccl => (!gpu).then_some(
                "NCCL sums GPU memory and worker.device is `cpu`: use `auto` or `ring`",
            ),
        }
    }
}

/// What each worker process runs on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    /// `cpu`, `cuda` or `cuda:N`.
    pub device: Device,
    /// Compute dtype (`auto`, `f32`, `bf16`); a resume may change it.
    pub precision: Precision,
    /// Model implementation (`auto`, `fused`, `composed`); a resume may change it.
    pub engine: Engine,
    /// CPU threads per worker (0 = the machine's cores divided among local workers).
    pub threads: usize,
    /// Every this many steps (and at the run's last step) every rank hashes
    /// its weights and the coordinator stops the job if any differs from
    /// rank 0's. 1 (the default) checks every step: on CPUs the hash costs
    /// ~1 % of a step. Checkpoints record rank 0's hash whatever the
    /// interval; a resume may change it.
    pub weights_check_interval: u64,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            device: Device::Cpu,
            precision: Precision::Auto,
            engine: Engine::Auto,
            threads: 0,
            weights_check_interval: 1,
        }
    }
}

/// The worker set and failure handling.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// Workers the job starts with (`--workers` overrides).
    pub workers: usize,
    /// Fewest workers a restarted job may continue with; default = `workers`.
    pub min_workers: usize,
    /// Most workers a restarted job may use; default = `workers`.
    pub max_workers: usize,
    /// Period of heartbeats on each worker stream.
    pub heartbeat_interval_s: f64,
    /// A worker silent for this long is declared lost.
    pub heartbeat_timeout_s: f64,
    /// Time for all workers to register and load (long: model building, checkpoint loading).
    pub startup_timeout_s: f64,
    /// After a failure, how long the worker set waits for replacements
    /// before it continues with the workers present (at least
    /// `min_workers`); a replacement that joins later is taken back at the
    /// next step boundary.
    pub rejoin_timeout_s: f64,
    /// Time for every rank to report one step (short: names the ranks that did not).
    pub step_timeout_s: f64,
    /// Automatic restarts from the latest checkpoint before the job gives up.
    pub max_restarts: u32,
    /// The gradient collective (`auto`, `ring`, `nccl`); a resume may
    /// change it.
    pub collective: CollectiveKind,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            workers: 1,
            min_workers: 1,
            max_workers: 1,
            heartbeat_interval_s: 2.0,
            heartbeat_timeout_s: 10.0,
            startup_timeout_s: 300.0,
            rejoin_timeout_s: 30.0,
            step_timeout_s: 120.0,
            max_restarts: 3,
            collective: CollectiveKind::Auto,
        }
    }
}

impl Config {
    /// The resolved config as TOML, every key present (the text saved as
    /// `config.toml` and sent to workers).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| format!("# cannot serialise config: {e}\n"))
    }

    /// Reads a resolved config back (a worker's job, a checkpoint's
    /// `config.toml`), with the same checks as a user's file.
    pub fn from_toml(text: &str, origin: &str) -> Result<Config, ConfigError> {
        RawConfig::parse(
            text,
            "job".to_string(),
            ConfigSource::File(PathBuf::from(origin)),
        )?
        .resolve()
    }

    /// Whether a generation of `world` ranks keeps the optimizer state by
    /// shard (`train.shard_optimizer`, `auto` resolved): the one answer the
    /// coordinator (which ranks write a checkpoint) and every worker (what
    /// its engine keeps) read. One rank has nothing to shard.
    pub fn shards_optimizer(&self, world: usize) -> bool {
        let w = &self.worker;
        world > 1
            && match self.train.shard_optimizer {
                Toggle::On => true,
                Toggle::Off => false,
                // The CPU's fused engine, for models where it was measured
                // to cost nothing. Not on CUDA until a GPU has measured it
                // (ARCHITECTURE, ZeRO-1).
                Toggle::Auto => {
                    w.device == Device::Cpu
                        && self.shard_refusal(Toggle::On).is_none()
                        && self.parameter_count() >= AUTO_MIN_PARAMETERS
                }
            }
    }

    /// Whether a generation of `world` ranks sums each block's gradient
    /// during backward (`train.overlap_grad_comm`, `auto` resolved).
    pub fn overlaps_grad_comm(&self, world: usize) -> bool {
        world > 1
            && match self.train.overlap_grad_comm {
                Toggle::On => true,
                Toggle::Off => false,
                Toggle::Auto => self.parameter_count() >= AUTO_MIN_PARAMETERS,
            }
    }

    /// The model's parameter count (the tied head counted once).
    pub fn parameter_count(&self) -> usize {
        crate::params::parameter_count(&crate::params::layout(&self.model))
    }

    /// Why `train.shard_optimizer = value` cannot run, if it cannot: the
    /// composed engine keeps the whole optimizer state.
    pub(crate) fn shard_refusal(&self, value: Toggle) -> Option<String> {
        if value != Toggle::On {
            return None;
        }
        let shape = crate::cuda_shapes::ModelShape {
            n_head: self.model.n_head,
            n_embd: self.model.n_embd,
            vocab_size: self.model.vocab_size,
            context: self.model.context,
            micro_batch: self.train.micro_batch,
        };
        let w = &self.worker;
        composed_because(w.device, w.engine, w.precision, &shape).map(|why| {
            format!(
                "only the fused engine keeps its optimizer state by shard, and this job runs the composed one, which keeps it whole: {why}; use `auto` or `off`"
            )
        })
    }

    /// sha256 of the resolved TOML: two runs with the same hash have the
    /// same configuration.
    pub fn hash(&self) -> String {
        hex(&Sha256::digest(self.to_toml().as_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(text: &str) -> Result<RawConfig, ConfigError> {
        RawConfig::parse(text, "t".into(), ConfigSource::File("t.toml".into()))
    }

    fn resolve(text: &str) -> Result<Config, ConfigError> {
        raw(text)?.resolve()
    }

    /// `train.shard_optimizer` reads as a switch or a name; `auto` shards
    /// a CPU job of more than one rank, and one rank never shards; the
    /// saved config says it by name, and reads back the same.
    #[test]
    fn shard_optimizer_reads_booleans_and_names() {
        for (value, want) in [
            ("true", Toggle::On),
            ("false", Toggle::Off),
            ("\"on\"", Toggle::On),
            ("\"auto\"", Toggle::Auto),
        ] {
            let c = resolve(&format!("[train]\nshard_optimizer = {value}\n")).expect(value);
            assert_eq!(c.train.shard_optimizer, want, "{value}");
            let again = resolve(&c.to_toml()).expect("saved config");
            assert_eq!(again.train.shard_optimizer, want, "{value} saved");
        }
        let auto = resolve("").expect("default");
        assert_eq!(auto.train.shard_optimizer, Toggle::Auto);
        assert!(auto.parameter_count() >= AUTO_MIN_PARAMETERS, "GPT-2 small");
        assert!(auto.shards_optimizer(2) && !auto.shards_optimizer(1));
        assert!(auto.overlaps_grad_comm(2) && !auto.overlaps_grad_comm(1));
        let small =
            "[model]\nn_layer = 2\nn_embd = 64\nn_head = 2\nvocab_size = 128\ncontext = 64\n";
        let tiny = resolve(small).expect("a tiny model");
        assert!(
            !tiny.shards_optimizer(2) && !tiny.overlaps_grad_comm(2),
            "auto leaves a model of {} parameters alone",
            tiny.parameter_count()
        );
        let asked = resolve(&format!(
            "{small}[train]\nshard_optimizer = true\noverlap_grad_comm = \"on\"\n"
        ))
        .expect("asked");
        assert!(asked.shards_optimizer(2) && asked.overlaps_grad_comm(2));
        let composed = resolve("[worker]\nengine = \"composed\"\n").expect("composed");
        assert!(
            !composed.shards_optimizer(4),
            "auto keeps the composed engine's state whole"
        );
        let gpu = resolve("[worker]\ndevice = \"cuda\"\n").expect("cuda");
        assert!(!gpu.shards_optimizer(8), "auto: not on CUDA yet");
        let asked = resolve("[train]\nshard_optimizer = true\n[worker]\ndevice = \"cuda\"\n")
            .expect("asked for on CUDA");
        assert!(asked.shards_optimizer(8) && !asked.shards_optimizer(1));
        let off = resolve("[train]\nshard_optimizer = false\n").expect("off");
        assert!(!off.shards_optimizer(8));
    }

    /// `auto` is NCCL on CUDA and the ring on CPUs; a named backend is
    /// itself on any device (validation refuses the pairs that cannot run).
    #[test]
    fn auto_picks_the_collective_by_device() {
        use CollectiveKind::{Auto, Nccl, Ring};
        let (cpu, gpu) = (Device::Cpu, Device::Cuda(Some(0)));
        assert_eq!(Auto.on(&cpu), Ring);
        assert_eq!(Auto.on(&gpu), Nccl);
        for kind in [Ring, Nccl] {
            assert_eq!(kind.on(&cpu), kind);
            assert_eq!(kind.on(&gpu), kind);
        }
    }

    #[test]
    fn schema_matches_the_config_fields() {
        let mut c = Config::default();
        c.data.train = Some("a".into());
        c.data.val = Some("b".into());
        let table: toml::Table = c.to_toml().parse().expect("serialised config parses");
        let mut from_struct: Vec<String> = Vec::new();
        for (s, v) in &table {
            for k in v.as_table().expect("section").keys() {
                from_struct.push(format!("{s}.{k}"));
            }
        }
        let mut from_schema: Vec<String> = SCHEMA
            .iter()
            .flat_map(|(s, ks)| ks.iter().map(move |k| format!("{s}.{k}")))
            .collect();
        from_struct.sort();
        from_schema.sort();
        assert_eq!(from_struct, from_schema);
    }

    #[test]
    fn presets_resolve_and_round_trip() {
        for (name, text) in PRESETS {
            let c = RawConfig::parse(text, name.to_string(), ConfigSource::Embedded(name))
                .and_then(|r| r.resolve())
                .unwrap_or_else(|e| panic!("preset {name}: {e}"));
            let again = Config::from_toml(&c.to_toml(), "x").expect("round trip");
            assert_eq!(c, again, "{name}");
            assert_eq!(c.hash(), again.hash());
        }
    }

    #[test]
    fn bad_inputs_name_the_key_and_the_problem() {
        // (config text, substrings the error must contain)
        let cases: &[(&str, &[&str])] = &[
            (
                "[train]\nlrr = 1e-3\n",
                &[
                    "t.toml",
                    "unknown key `train.lrr`",
                    "did you mean `train.lr`",
                ],
            ),
            (
                "[train]\nbeta1 = 0.9\n",
                &["unknown key `train.beta1`", "`optim.beta1`"],
            ),
            (
                "[train]\nlerning_rate = 1e-3\n",
                &[
                    "unknown key `train.lerning_rate`",
                    "did you mean `train.lr`",
                ],
            ),
            (
                "[model]\nblock_size = 1024\n",
                &[
                    "unknown key `model.block_size`",
                    "did you mean `model.context`",
                ],
            ),
            (
                "[train]\nlr = 1e9\n",
                &["`train.lr` = 1000000000", "at most 1"],
            ),
            (
                "[trian]\nlr = 1e-3\n",
                &["unknown section `[trian]`", "`train`"],
            ),
            ("lr = 1e-3\n", &["unknown section `[lr]`", "[train] lr"]),
            (
                "[train]\nlr = \"fast\"\n",
                &["`train.lr` has the wrong type", "string"],
            ),
            (
                "[train]\nmax_steps = -3\n",
                &["`train.max_steps` has the wrong type"],
            ),
            ("[train]\ndecay = \"cosin\"\n", &["`train.decay`", "cosine"]),
            (
                "[worker]\nweights_check_interval = 0\n",
                &["`worker.weights_check_interval` = 0", "at least 1"],
            ),
            (
                "[worker]\ndevice = \"gpu\"\n",
                &["`worker.device`", "cuda:N"],
            ),
            (
                "[train]\nmax_steps = 10\nwarmup_steps = 20\n",
                &[
                    "`train.warmup_steps` = 20",
                    "must not exceed train.max_steps = 10",
                ],
            ),
            ("[data]\nstride = 0\n", &["`data.stride` = 0", "at least 1"]),
            (
                "[train]\nglobal_batch = 10\nmicro_batch = 4\n",
                &[
                    "`train.global_batch` = 10",
                    "divisible by workers × train.micro_batch = 1 × 4",
                ],
            ),
            (
                "[model]\nn_embd = 100\nn_head = 12\n",
                &["`model.n_embd` = 100", "multiple of model.n_head"],
            ),
            (
                "[model]\nvocab_size = 70000\n",
                &["`model.vocab_size`", "uint16"],
            ),
            (
                "[cluster]\nstep_timeout_s = 1e20\n",
                &[
                    "`cluster.step_timeout_s` = 100000000000000000000",
                    "at most 1000000",
                ],
            ),
            (
                "[cluster]\nstep_timeout_s = 1.5\nheartbeat_interval_s = 1.0\n",
                &[
                    "`cluster.step_timeout_s` = 1.5",
                    "2 × cluster.heartbeat_interval_s",
                ],
            ),
            (
                "[cluster]\ncollective = \"nccl\"\n",
                &[
                    "`cluster.collective` = nccl",
                    "worker.device is `cpu`",
                    "`ring`",
                ],
            ),
            (
                "[cluster]\ncollective = \"ring\"\n[worker]\ndevice = \"cuda\"\n",
                &["`cluster.collective` = ring", "device memory", "`nccl`"],
            ),
            (
                "[train]\ngrad_comm_dtype = \"bf16\"\n[worker]\ndevice = \"cuda\"\n",
                &[
                    "`train.grad_comm_dtype` = bf16",
                    "NCCL carries the gradient in f32",
                    "`f32`",
                ],
            ),
            (
                "[train]\ngrad_comm_dtype = \"fp8\"\n",
                &["`train.grad_comm_dtype`", "`f32`", "`bf16`"],
            ),
            (
                "[train]\nshard_optimizer = true\n[worker]\ndevice = \"cuda\"\n[model]\nn_embd = 96\nn_head = 8\n",
                &[
                    "`train.shard_optimizer` = on",
                    "runs this model composed on CUDA",
                    "`model.n_head`",
                    "`auto` or `off`",
                ],
            ),
            (
                "[train]\nshard_optimizer = \"on\"\n[worker]\nengine = \"composed\"\n",
                &[
                    "`train.shard_optimizer` = on",
                    "which keeps it whole",
                    "`worker.engine` is `composed`",
                ],
            ),
            (
                "[train]\nshard_optimizer = \"on\"\n[worker]\nprecision = \"bf16\"\n",
                &["`train.shard_optimizer` = on", "`worker.precision`"],
            ),
            (
                "[train]\nshard_optimizer = \"yes\"\n",
                &["`train.shard_optimizer`", "`auto`", "`on`", "`off`"],
            ),
            (
                "[train]\nshard_optimizer = 2\n",
                &["`train.shard_optimizer`"],
            ),
            (
                "[cluster]\ncollective = \"gloo\"\n",
                &["`cluster.collective`", "`auto`", "`ring`", "`nccl`"],
            ),
            (
                "[worker]\nengine = \"fast\"\n",
                &["`worker.engine`", "`auto`", "`fused`", "`composed`"],
            ),
            (
                "[worker]\nengine = \"fused\"\ndevice = \"cuda\"\n[model]\nn_embd = 96\nn_head = 8\n",
                &[
                    "`worker.engine` = fused",
                    "CUDA kernels do not take this model",
                    "`model.n_head`",
                    "head size n_embd / n_head = 96 / 8 = 12",
                    "`composed`",
                ],
            ),
            (
                "[worker]\nengine = \"fused\"\nprecision = \"bf16\"\n",
                &["`worker.engine` = fused", "computes in f32", "`composed`"],
            ),
            ("[train\nlr = 1\n", &["t.toml: not valid TOML"]),
            ("model = 3\n", &["`model` has the wrong type"]),
        ];
        for (text, needles) in cases {
            let err = resolve(text).expect_err(text).to_string();
            for n in *needles {
                assert!(err.contains(n), "for {text:?}: error `{err}` lacks `{n}`");
            }
        }
    }

    #[test]
    fn overrides_apply_and_are_checked() {
        let mut r = raw("[train]\nlr = 1e-3\n").expect("parses");
        r.set("train.lr=3e-4").expect("set lr");
        r.set("worker.device=cuda:1").expect("set device");
        r.set("data.train=data/x.bin").expect("set path");
        r.set("cluster.workers=4").expect("set workers");
        r.set("train.global_batch=8").expect("set batch");
        let c = r.resolve().expect("resolves");
        assert_eq!(c.train.lr, 3e-4);
        assert_eq!(c.worker.device, Device::Cuda(Some(1)));
        assert_eq!(c.data.train, Some(PathBuf::from("data/x.bin")));
        assert_eq!((c.cluster.min_workers, c.cluster.max_workers), (4, 4));

        r.set("data.train=").expect("unset");
        assert_eq!(r.resolve().expect("resolves").data.train, None);

        let mut w =
            raw("[cluster]\nworkers = 8\nmin_workers = 8\nmax_workers = 8\n").expect("parses");
        w.set_workers(2).expect("set workers");
        let c = w.resolve().expect("resolves");
        assert_eq!(
            (
                c.cluster.workers,
                c.cluster.min_workers,
                c.cluster.max_workers
            ),
            (2, 2, 8)
        );
        w.set_workers(0).expect("syntactically fine");
        let e = w.resolve().expect_err("zero workers").to_string();
        assert!(
            e.starts_with("--workers 0:") && e.contains("cluster.workers"),
            "{e}"
        );

        let e = r.set("train.lrr=1").expect_err("unknown").to_string();
        assert!(
            e.contains("--set train.lrr=1") && e.contains("did you mean `train.lr`"),
            "{e}"
        );
        let e = r.set("lr=1").expect_err("no section").to_string();
        assert!(e.contains("section.key"), "{e}");
        r.set("train.max_steps=abc").expect("set is syntactic");
        let e = r.resolve().expect_err("wrong type").to_string();
        assert!(e.starts_with("--set train.max_steps=abc"), "{e}");
    }

    #[test]
    fn derived_defaults() {
        let c =
            resolve("[model]\ncontext = 64\n[cluster]\nworkers = 2\n[train]\nglobal_batch = 2\n")
                .expect("resolves");
        assert_eq!(c.data.stride, 64);
        assert_eq!((c.cluster.min_workers, c.cluster.max_workers), (2, 2));
        let c = resolve("[model]\ncontext = 64\n[data]\nstride = 1\n").expect("resolves");
        assert_eq!(c.data.stride, 1);
    }

    #[test]
    fn accumulation_is_derived_from_the_worker_count() {
        let c = resolve("[train]\nglobal_batch = 16\nmicro_batch = 2\n").expect("resolves");
        assert_eq!(c.accumulation_for(1), Ok(8));
        assert_eq!(c.accumulation_for(4), Ok(2));
        assert_eq!(c.accumulation_for(8), Ok(1));
        let e = c.accumulation_for(3).expect_err("16 / (3·2)").to_string();
        assert!(e.contains("3 × 2 = 6"), "{e}");
    }

    #[test]
    fn locate_falls_back_to_the_embedded_preset() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("mine.toml");
        std::fs::write(&file, "[train]\nlr = 0.5\n").expect("write");
        let r = RawConfig::locate(file.to_str().expect("utf8")).expect("by path");
        assert_eq!(r.name, "mine");
        assert_eq!(r.resolve().expect("resolves").train.lr, 0.5);
        let r = RawConfig::locate("h100_1k").expect("preset");
        assert_eq!(r.name, "h100_1k");
        let e = RawConfig::locate("nope").expect_err("missing").to_string();
        assert!(
            e.contains("`nope` not found") && e.contains("`tiny`"),
            "{e}"
        );
    }
}
