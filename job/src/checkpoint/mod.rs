//! The checkpoint format and its rules (SPEC §4).
//!
//! ```text
//! <checkpoint.dir>/
//!   step-00001000/
//!     model.safetensors        weights, nanoGPT names, f32
//!     optimizer.safetensors    AdamW moments: exp_avg.<name>, exp_avg_sq.<name>
//!     train_state.json         step, max_steps, schedule, data cursor, RNG, world
//!                              size, config hash, metrics so far, sha256 of files
//!     config.toml              the resolved config of the run
//!     COMPLETE                 written last: the sha256 of train_state.json
//!   best   -> step-00000900    symlink: lowest validation loss
//!   latest -> step-00001000    symlink: newest complete checkpoint
//! ```
//!
//! A checkpoint is written under a temporary name in the same folder
//! (`.tmp-step-…`), every file fsynced, `COMPLETE` last, then renamed into
//! place and the folder fsynced; pointers are replaced by renaming a new
//! symlink over the old. `COMPLETE` is in `sha256sum` format (`sha256sum
//! -c COMPLETE` checks it): the sum of `train_state.json`, which lists the
//! sums of every other file, so every byte a resume trusts is covered, and
//! the state is checked before a field of it is read. **A directory
//! without `COMPLETE`, or whose files do not match their sha256, does not
//! exist**: [`validate`] refuses it. A
//! resume may leave the sums of the two large files for later
//! ([`Sums::Later`], [`Unverified::verify`]), to compute them while the
//! workers read the same files; the coordinator then holds the first step
//! until they check out.
//! Nothing here deletes anything except [`prune`], which removes complete
//! `step-*` directories beyond keep-last-k that are not `best`.
//!
//! The weights and moments are flat `f32` buffers in parameter-name order on
//! the worker; this module converts them to and from safetensors by name, so
//! other tools (PyTorch, numpy) read `model.safetensors` directly.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, SafeTensors, View};
use serde::{Deserialize, Serialize};

use crate::params::Slot;
use crate::sampler::DataCursor;
use crate::schedule::Schedule;
use crate::tokens::Fingerprint;

mod commit;
#[doc(hidden)]
pub mod reference;
mod tensors;
#[cfg(test)]
mod tests;
mod verify;

pub use commit::*;
pub use tensors::*;
pub use verify::*;

/// Version of this layout; a checkpoint from a newer Stride is refused.
/// 2: `COMPLETE` holds the sha256 of `train_state.json` (which holds the
/// sums of every other file), and the state records the data's
/// fingerprints. Version 1 checkpoints still load, with a warning that
/// their state file is covered by no sum.
pub const FORMAT_VERSION: u32 = 2;
pub const MODEL_FILE: &str = "model.safetensors";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const STATE_FILE: &str = "train_state.json";
pub const CONFIG_FILE: &str = "config.toml";
pub const COMPLETE_FILE: &str = "COMPLETE";
pub const BEST: &str = "best";
/// The checkpoint folder inside a run directory unless `checkpoint.dir`
/// says otherwise; `--resume RUN_DIR` looks there.
pub const DEFAULT_FOLDER: &str = "checkpoints";
pub const LATEST: &str = "latest";

/// `step-00001000`.
pub fn step_dir_name(step: u64) -> String {
    format!("step-{step:08}")
}

fn parse_step_dir(name: &str) -> Option<u64> {
    name.strip_prefix("step-").and_then(|n| n.parse().ok())
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint {path}: does not exist")]
    NotFound { path: PathBuf },
    #[error(
        "checkpoint {path}: incomplete (no COMPLETE marker: the write was interrupted); it is never loaded"
    )]
    Incomplete { path: PathBuf },
    #[error("checkpoint {path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error(
        "checkpoint {path}: format version {found} is newer than this Stride understands ({FORMAT_VERSION}); use the Stride release that wrote it"
    )]
    FutureFormat { path: PathBuf, found: u32 },
    #[error(
        "checkpoint {path}: {file} does not match its sha256 (expected {expected}, found {found}): the file is corrupted or was modified"
    )]
    Checksum {
        path: PathBuf,
        file: String,
        expected: String,
        found: String,
    },
    #[error("no complete, valid checkpoint in {dir}{skipped}")]
    NoneValid { dir: PathBuf, skipped: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The summary of training so far, carried from checkpoint to checkpoint.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MetricsSoFar {
    pub last_loss: Option<f64>,
    pub best_val_loss: Option<f64>,
    pub best_step: Option<u64>,
    /// (step, val_loss) of every evaluation.
    pub val_history: Vec<(u64, f64)>,
    /// Tokens trained on since step 0.
    pub tokens: u64,
}

impl MetricsSoFar {
    /// Step `step` finished with `loss` (and `val_loss` when evaluated),
    /// `tokens` trained on since step 0. True when the validation loss is
    /// the best so far: the weights after this step (the checkpoint at step
    /// `step + 1`) become `best`.
    pub fn record(&mut self, step: u64, loss: f64, val_loss: Option<f64>, tokens: u64) -> bool {
        self.last_loss = Some(loss);
        self.tokens = tokens;
        let Some(v) = val_loss else {
            return false;
        };
        self.val_history.push((step, v));
        let improved = self.best_val_loss.is_none_or(|b| v < b);
        if improved {
            self.best_val_loss = Some(v);
            self.best_step = Some(step + 1);
        }
        improved
    }
}

/// One change of a run's course: a start, a resume, an extension.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryEvent {
    pub step: u64,
    pub event: String,
    pub detail: String,
}

/// How the random numbers of a run are determined. Stride's RNG streams are
/// pure functions of (seed, purpose, epoch), so the seed and the data cursor
/// are the whole RNG state; nothing else draws random numbers during
/// training (no dropout).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RngState {
    pub seed: u64,
    pub algorithm: String,
}

/// `train_state.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    pub format_version: u32,
    pub stride_version: String,
    /// Steps completed: the next step to run.
    pub step: u64,
    pub max_steps: u64,
    pub schedule: Schedule,
    pub data_cursor: DataCursor,
    pub rng: RngState,
    pub world_size: usize,
    pub config_name: String,
    pub config_hash: String,
    pub run_dir: PathBuf,
    /// The xxh3 of the weights the workers report (compare with `Ready`).
    pub weights_hash: String,
    /// AdamW updates applied.
    pub optimizer_step: u64,
    pub metrics: MetricsSoFar,
    pub history: Vec<HistoryEvent>,
    /// The training and validation data the run read (absent in format 1):
    /// a resume against other data is refused.
    #[serde(default)]
    pub data: Vec<Fingerprint>,
    /// File name → sha256 (hex) of every other file in the directory.
    pub files: BTreeMap<String, String>,
}

/// A checkpoint that passed [`validate`].
#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub dir: PathBuf,
    pub state: TrainState,
}
