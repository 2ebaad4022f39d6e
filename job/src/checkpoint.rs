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
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, SafeTensors, View};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::hex;
use crate::params::Slot;
use crate::sampler::DataCursor;
use crate::schedule::Schedule;
use crate::tokens::Fingerprint;

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

/// sha256 of a file, read in 8 MiB blocks on this thread and hashed on
/// another, so that reading from the disk and hashing overlap.
pub fn sha256_file(path: &Path) -> Result<String, CheckpointError> {
    const BLOCK: usize = 8 << 20;
    const BLOCKS: usize = 3;
    let mut f = std::fs::File::open(path).map_err(io_err(path))?;
    let (full_tx, full_rx) = std::sync::mpsc::sync_channel::<(Vec<u8>, usize)>(BLOCKS);
    let (empty_tx, empty_rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(BLOCKS);
    for _ in 0..BLOCKS {
        let _ = empty_tx.send(vec![0u8; BLOCK]);
    }
    std::thread::scope(|scope| {
        let hasher = scope.spawn(move || {
            let mut h = Sha256::new();
            for (buf, n) in full_rx {
                h.update(&buf[..n]);
                let _ = empty_tx.send(buf);
            }
            hex(&h.finalize())
        });
        // Moves `full_tx` in and drops it at the end: the hasher then sees
        // the end of the file (or of the reading, after an error).
        let read = (move || -> std::io::Result<()> {
            while let Ok(mut buf) = empty_rx.recv() {
                let mut n = 0;
                while n < buf.len() {
                    match f.read(&mut buf[n..]) {
                        Ok(0) => break,
                        Ok(k) => n += k,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(e),
                    }
                }
                if n == 0 || full_tx.send((buf, n)).is_err() {
                    break;
                }
            }
            Ok(())
        })();
        let sha256 = hasher.join();
        read.map_err(io_err(path))?;
        sha256.map_err(|_| CheckpointError::Invalid {
            path: path.to_path_buf(),
            message: "the hashing thread failed".into(),
        })
    })
}

/// [`sha256_file`] of each path, all at the same time (a checkpoint's
/// model and optimizer state are 1/3 and 2/3 of its bytes).
pub fn sha256_files(paths: &[PathBuf]) -> Vec<Result<String, CheckpointError>> {
    std::thread::scope(|scope| {
        let running: Vec<_> = paths
            .iter()
            .map(|p| scope.spawn(move || sha256_file(p)))
            .collect();
        running
            .into_iter()
            .zip(paths)
            .map(|(h, p)| {
                h.join().unwrap_or_else(|_| {
                    Err(CheckpointError::Invalid {
                        path: p.clone(),
                        message: "the hashing thread failed".into(),
                    })
                })
            })
            .collect()
    })
}

/// When a checkpoint's two safetensors files (all but a few kilobytes of
/// it) are hashed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Sums {
    /// Before the checkpoint is returned.
    #[default]
    Now,
    /// Later, by [`Unverified::verify`]: the coordinator hashes them while
    /// the workers load the same files, and no step runs before it has.
    Later,
}

/// Files of a checkpoint whose sums are still to be checked (none after
/// [`Sums::Now`]).
#[derive(Debug, Clone, Default)]
pub struct Unverified {
    dir: PathBuf,
    /// File name → expected sha256.
    files: Vec<(String, String)>,
}

impl Unverified {
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// Hashes the files, all at the same time; the first whose sum differs
    /// (or that cannot be read) is the error — the error [`validate`]
    /// would have given.
    pub fn verify(&self) -> Result<(), CheckpointError> {
        let paths: Vec<PathBuf> = self.files.iter().map(|(f, _)| self.dir.join(f)).collect();
        for ((file, expected), found) in self.files.iter().zip(sha256_files(&paths)) {
            let found = found.map_err(|e| CheckpointError::Invalid {
                path: self.dir.clone(),
                message: format!("{file}: {e}"),
            })?;
            if &found != expected {
                return Err(CheckpointError::Checksum {
                    path: self.dir.clone(),
                    file: file.clone(),
                    expected: expected.clone(),
                    found,
                });
            }
        }
        Ok(())
    }
}

/// Checks that `dir` is a complete checkpoint whose files match their sums.
pub fn validate(dir: &Path) -> Result<Checkpoint, CheckpointError> {
    validate_with(dir, Sums::Now).map(|(c, _)| c)
}

/// [`validate`], hashing the two safetensors files now or leaving them in
/// the returned [`Unverified`].
pub fn validate_with(dir: &Path, sums: Sums) -> Result<(Checkpoint, Unverified), CheckpointError> {
    if !dir.is_dir() {
        return Err(CheckpointError::NotFound {
            path: dir.to_path_buf(),
        });
    }
    if !dir.join(COMPLETE_FILE).is_file() {
        return Err(CheckpointError::Incomplete {
            path: dir.to_path_buf(),
        });
    }
    let invalid = |message: String| CheckpointError::Invalid {
        path: dir.to_path_buf(),
        message,
    };
    let text = std::fs::read_to_string(dir.join(STATE_FILE))
        .map_err(|e| invalid(format!("cannot read {STATE_FILE}: {e}")))?;
    let complete = std::fs::read_to_string(dir.join(COMPLETE_FILE))
        .map_err(|e| invalid(format!("cannot read {COMPLETE_FILE}: {e}")))?;
    // The state's own sum comes first: nothing of it is read before.
    let state_sum = complete_sum(&complete, STATE_FILE)
        .map_err(|m| invalid(format!("{COMPLETE_FILE}: {m}")))?;
    if let Some(expected) = &state_sum {
        let found = hex(&Sha256::digest(text.as_bytes()));
        if &found != expected {
            return Err(CheckpointError::Checksum {
                path: dir.to_path_buf(),
                file: STATE_FILE.into(),
                expected: expected.clone(),
                found,
            });
        }
    }
    // Read the version first, so a future format is reported as such and
    // not as a parse error of fields this version does not know.
    let version = serde_json::from_str::<serde_json::Value>(&text)
        .map_err(|e| invalid(format!("{STATE_FILE} is not valid JSON: {e}")))?
        .get("format_version")
        .and_then(serde_json::Value::as_u64)
        .ok_or_else(|| invalid(format!("{STATE_FILE} has no format_version")))?;
    if version > u64::from(FORMAT_VERSION) {
        return Err(CheckpointError::FutureFormat {
            path: dir.to_path_buf(),
            found: version as u32,
        });
    }
    // From format 2 on the state's sum is required: an empty COMPLETE
    // beside a state that says 2 is damage, not an old checkpoint.
    if state_sum.is_none() && version >= 2 {
        return Err(invalid(format!(
            "{COMPLETE_FILE} holds no sha256 of {STATE_FILE}, which format {version} requires"
        )));
    }
    let state: TrainState = serde_json::from_str(&text)
        .map_err(|e| invalid(format!("{STATE_FILE} does not parse: {e}")))?;
    state
        .schedule
        .validate()
        .map_err(|e| invalid(format!("{STATE_FILE}: {e}")))?;
    for required in [MODEL_FILE, OPTIMIZER_FILE, CONFIG_FILE] {
        if !state.files.contains_key(required) {
            return Err(invalid(format!(
                "{STATE_FILE} lists no checksum for {required}"
            )));
        }
    }
    let (later, now): (Vec<_>, Vec<_>) = state
        .files
        .iter()
        .map(|(f, sum)| (f.clone(), sum.clone()))
        .partition(|(f, _)| {
            sums == Sums::Later && [MODEL_FILE, OPTIMIZER_FILE].contains(&f.as_str())
        });
    let unverified = |files| Unverified {
        dir: dir.to_path_buf(),
        files,
    };
    unverified(now).verify()?;
    Ok((
        Checkpoint {
            dir: dir.to_path_buf(),
            state,
        },
        unverified(later),
    ))
}

/// The sha256 `COMPLETE` lists for `file` (`sha256sum` lines: `HEX  NAME`);
/// `None` for an empty `COMPLETE` (format 1).
fn complete_sum(complete: &str, file: &str) -> Result<Option<String>, String> {
    if complete.trim().is_empty() {
        return Ok(None);
    }
    for line in complete.lines().filter(|l| !l.trim().is_empty()) {
        let (sum, name) = line
            .split_once("  ")
            .ok_or_else(|| format!("`{line}` is not a `SHA256  FILE` line"))?;
        let is_hex = sum.len() == 64 && sum.bytes().all(|b| b.is_ascii_hexdigit());
        if !is_hex {
            return Err(format!("`{sum}` is not a sha256"));
        }
        if name == file {
            return Ok(Some(sum.to_ascii_lowercase()));
        }
    }
    Err(format!("lists no sha256 of {file}"))
}

/// Complete-looking `step-*` directories of a checkpoint folder, oldest first.
pub fn list_steps(folder: &Path) -> Vec<(u64, PathBuf)> {
    let mut v: Vec<(u64, PathBuf)> = std::fs::read_dir(folder)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let path = e.path();
            let is_link = e.file_type().map(|t| t.is_symlink()).unwrap_or(true);
            parse_step_dir(&name)
                .filter(|_| !is_link && path.is_dir())
                .map(|s| (s, path))
        })
        .collect();
    v.sort();
    v
}

/// The newest valid checkpoint in `folder`, with a warning for every newer
/// one that was skipped.
pub fn newest_valid(folder: &Path) -> Result<(Checkpoint, Vec<String>), CheckpointError> {
    newest_valid_with(folder, Sums::Now).map(|r| (r.checkpoint, r.warnings))
}

fn newest_valid_with(folder: &Path, sums: Sums) -> Result<Resolved, CheckpointError> {
    let mut skipped = Vec::new();
    for (_, dir) in list_steps(folder).into_iter().rev() {
        match validate_with(&dir, sums) {
            Ok((checkpoint, unverified)) => {
                return Ok(Resolved {
                    checkpoint,
                    warnings: skipped,
                    unverified,
                    falls_back: true,
                });
            }
            Err(e) => skipped.push(format!("skipped {e}")),
        }
    }
    Err(CheckpointError::NoneValid {
        dir: folder.to_path_buf(),
        skipped: if skipped.is_empty() {
            String::new()
        } else {
            format!(" ({})", skipped.join("; "))
        },
    })
}

/// What [`resolve_with`] found.
#[derive(Debug)]
pub struct Resolved {
    pub checkpoint: Checkpoint,
    /// Newer checkpoints skipped, and why.
    pub warnings: Vec<String>,
    /// The sums still to check ([`Sums::Later`]).
    pub unverified: Unverified,
    /// Named by `latest` or a folder: if the sums still to check do not
    /// match, the start falls back to an older checkpoint (resolving the
    /// same path again with [`Sums::Now`]). An explicit checkpoint fails.
    pub falls_back: bool,
}

/// What `--resume PATH` / `--init-from PATH` names: a step directory (must
/// be valid), the `best` pointer (must be valid), the `latest` pointer, a
/// checkpoint folder or a run directory (its `checkpoints` folder): the
/// newest valid checkpoint, warning about any newer one that was skipped.
/// Returns the checkpoint and the warnings.
pub fn resolve(path: &Path) -> Result<(Checkpoint, Vec<String>), CheckpointError> {
    resolve_with(path, Sums::Now).map(|r| (r.checkpoint, r.warnings))
}

/// [`resolve`], hashing the safetensors files of the checkpoint it picks
/// now or later. Later, a `latest` or a folder picks the newest checkpoint
/// that is complete and whose other files check out; if its own sums turn
/// out wrong, resolving again with [`Sums::Now`] skips it.
pub fn resolve_with(path: &Path, sums: Sums) -> Result<Resolved, CheckpointError> {
    let mut r = resolve_exactly(path, sums)?;
    let version = r.checkpoint.state.format_version;
    if version < 2 {
        r.warnings.push(format!(
            "{} was written by an older Stride (checkpoint format {version}): its {STATE_FILE} is covered by no checksum and it records no data fingerprint, so neither is checked",
            r.checkpoint.dir.display()
        ));
    }
    Ok(r)
}

fn resolve_exactly(path: &Path, sums: Sums) -> Result<Resolved, CheckpointError> {
    // Nothing there at all (a mistyped run, a folder moved away): say so,
    // rather than "no valid checkpoint". A dangling `latest` is there.
    if std::fs::symlink_metadata(path).is_err() {
        return Err(CheckpointError::NotFound {
            path: path.to_path_buf(),
        });
    }
    // A run directory: its checkpoint folder (the default `checkpoints`).
    let in_run = path.join(DEFAULT_FOLDER);
    if path.is_dir() && list_steps(path).is_empty() && in_run.is_dir() {
        return resolve_exactly(&in_run, sums);
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // A pointer is reported as the step directory it names.
    let target = |p: &Path| match std::fs::read_link(p) {
        Ok(t) => p.parent().unwrap_or(Path::new(".")).join(t),
        Err(_) => p.to_path_buf(),
    };
    let exactly = |falls_back: bool| {
        validate_with(&target(path), sums).map(|(checkpoint, unverified)| Resolved {
            checkpoint,
            warnings: Vec::new(),
            unverified,
            falls_back,
        })
    };
    if name == LATEST {
        let folder = path.parent().unwrap_or(Path::new("."));
        return match exactly(true) {
            Ok(r) => Ok(r),
            Err(e) => {
                let mut r = newest_valid_with(folder, sums)?;
                r.warnings.insert(
                    0,
                    format!(
                        "`latest` is not usable ({e}); falling back to {}",
                        r.checkpoint.dir.display()
                    ),
                );
                Ok(r)
            }
        };
    }
    if name == BEST
        || parse_step_dir(&name).is_some()
        || path.join(STATE_FILE).exists()
        || path.join(COMPLETE_FILE).exists()
    {
        return exactly(false);
    }
    if path.is_dir() {
        return newest_valid_with(path, sums);
    }
    Err(CheckpointError::NotFound {
        path: path.to_path_buf(),
    })
}

#[cfg(target_endian = "big")]
compile_error!("checkpoints move f32 buffers to and from disk as their little-endian bytes");

/// One named tensor of a safetensors file.
#[derive(Debug, Clone, PartialEq)]
pub struct NamedTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// Writes `tensors` (name, shape, values) as an f32 safetensors file with
/// `metadata`, fsyncs it, and returns its sha256 — straight from the
/// callers' buffers: the header, then each tensor's bytes (its `f32`
/// slice seen as little-endian bytes, not copied), while a second thread
/// hashes the same bytes. The layout is the safetensors crate's (tensors
/// by name, header padded to 8 bytes; [`reference::write_tensors`] is
/// the crate's own writer, held to this one in tests).
pub fn write_tensors(
    path: &Path,
    tensors: &[(String, Vec<usize>, &[f32])],
    metadata: HashMap<String, String>,
) -> Result<String, CheckpointError> {
    let invalid = |message: String| CheckpointError::Invalid {
        path: path.to_path_buf(),
        message,
    };
    /// A header entry, fields in the safetensors crate's order.
    #[derive(Serialize)]
    struct Info<'a> {
        dtype: &'static str,
        shape: &'a [usize],
        data_offsets: (usize, usize),
    }
    let mut order: Vec<&(String, Vec<usize>, &[f32])> = tensors.iter().collect();
    order.sort_by(|a, b| a.0.cmp(&b.0));
    let json_err = |e: serde_json::Error| invalid(format!("cannot write the header: {e}"));
    let metadata: BTreeMap<String, String> = metadata.into_iter().collect();
    let mut json = format!(
        "{{\"__metadata__\":{}",
        serde_json::to_string(&metadata).map_err(json_err)?
    );
    let mut offset = 0usize;
    for (name, shape, data) in &order {
        if shape.iter().product::<usize>() != data.len() {
            return Err(invalid(format!(
                "cannot write tensor {name}: shape {shape:?} does not hold {} values",
                data.len()
            )));
        }
        let end = offset + 4 * data.len();
        let info = Info {
            dtype: "F32",
            shape,
            data_offsets: (offset, end),
        };
        json.push(',');
        json.push_str(&serde_json::to_string(name).map_err(json_err)?);
        json.push(':');
        json.push_str(&serde_json::to_string(&info).map_err(json_err)?);
        offset = end;
    }
    json.push('}');
    let mut json = json.into_bytes();
    json.resize(json.len().next_multiple_of(8), b' ');
    let len = (json.len() as u64).to_le_bytes();
    let pieces: Vec<&[u8]> = [&len[..], &json[..]]
        .into_iter()
        .chain(
            order
                .iter()
                .map(|(_, _, d)| bytemuck::cast_slice::<f32, u8>(d)),
        )
        .collect();
    std::thread::scope(|scope| {
        let hasher = scope.spawn(|| {
            let mut h = Sha256::new();
            for piece in &pieces {
                h.update(piece);
            }
            hex(&h.finalize())
        });
        let written = (|| {
            // Small tensors gather in the buffer; large ones go out in
            // 4 MiB writes, straight from the caller's memory.
            let mut w = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
            for piece in &pieces {
                for chunk in piece.chunks(4 << 20) {
                    w.write_all(chunk)?;
                }
            }
            w.into_inner().map_err(|e| e.into_error())?.sync_all()
        })();
        let sha256 = hasher
            .join()
            .map_err(|_| invalid("the hashing thread failed".into()));
        written.map_err(io_err(path))?;
        sha256
    })
}

/// One tensor as a safetensors header describes it.
#[derive(Debug)]
struct Entry {
    name: String,
    shape: Vec<usize>,
    /// Where its bytes start in the file.
    start: u64,
}

/// Reads and checks the header of an f32 safetensors file: the tensors in
/// file order, and the metadata.
fn read_header(
    path: &Path,
    f: &mut std::fs::File,
) -> Result<(Vec<Entry>, HashMap<String, String>), CheckpointError> {
    let invalid = |m: String| CheckpointError::Invalid {
        path: path.to_path_buf(),
        message: m,
    };
    let file_len = f.metadata().map_err(io_err(path))?.len();
    let mut len = [0u8; 8];
    f.read_exact(&mut len)
        .map_err(|_| invalid("not a safetensors file: shorter than its header".into()))?;
    let n = u64::from_le_bytes(len);
    if n > (100 << 20) || 8 + n > file_len {
        return Err(invalid(format!(
            "not a safetensors file: a header of {n} bytes in a file of {file_len}"
        )));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(io_err(path))?;
    let json: BTreeMap<String, serde_json::Value> = serde_json::from_slice(&header)
        .map_err(|e| invalid(format!("not a safetensors file: bad header: {e}")))?;
    let mut entries = Vec::new();
    let mut metadata = HashMap::new();
    for (name, v) in json {
        if name == "__metadata__" {
            metadata = serde_json::from_value(v)
                .map_err(|e| invalid(format!("bad metadata in the header: {e}")))?;
            continue;
        }
        let bad = |what: &str| invalid(format!("tensor {name}: {what}"));
        if v.get("dtype").and_then(|d| d.as_str()) != Some("F32") {
            return Err(bad("is not F32"));
        }
        let shape: Vec<usize> = v
            .get("shape")
            .and_then(|s| serde_json::from_value(s.clone()).ok())
            .ok_or_else(|| bad("has no shape"))?;
        let offsets: [u64; 2] = v
            .get("data_offsets")
            .and_then(|s| serde_json::from_value(s.clone()).ok())
            .ok_or_else(|| bad("has no data offsets"))?;
        let (start, end) = (8 + n + offsets[0], 8 + n + offsets[1]);
        let values = shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d as u64));
        if end < start
            || end > file_len
            || values.and_then(|v| v.checked_mul(4)) != Some(end - start)
        {
            return Err(bad(&format!(
                "bytes {start}..{end} of {file_len} do not hold shape {shape:?} (the file is truncated or damaged)"
            )));
        }
        entries.push(Entry { name, shape, start });
    }
    entries.sort_by_key(|e| e.start);
    Ok((entries, metadata))
}

/// Reads the tensors named `prefix` + a slot's name from an f32
/// safetensors file straight into `flat` (in `slots` order), one read per
/// tensor in file order; a tensor missing, extra or of another shape is
/// an error listing every difference.
/// The tensors named `prefix` + a slot's name, in file order, each with
/// where its bytes start and its slot; an error unless they are exactly
/// the model's (names and shapes).
fn matched<'s>(
    path: &Path,
    entries: &[Entry],
    slots: &'s [Slot],
    prefix: &str,
) -> Result<Vec<(u64, &'s Slot)>, CheckpointError> {
    let shapes: BTreeMap<String, Vec<usize>> = entries
        .iter()
        .filter_map(|e| {
            e.name
                .strip_prefix(prefix)
                .map(|n| (n.to_string(), e.shape.clone()))
        })
        .collect();
    let diff = layout_mismatch(&shapes, slots);
    if !diff.is_empty() {
        return Err(CheckpointError::Invalid {
            path: path.to_path_buf(),
            message: format!("tensors differ from the model:\n  {}", diff.join("\n  ")),
        });
    }
    let by_name: HashMap<&str, &Slot> = slots.iter().map(|s| (s.name.as_str(), s)).collect();
    Ok(entries
        .iter()
        .filter_map(|e| {
            let slot = e.name.strip_prefix(prefix).and_then(|n| by_name.get(n))?;
            Some((e.start, *slot))
        })
        .collect())
}

fn read_flat_into(
    path: &Path,
    f: &mut std::fs::File,
    entries: &[Entry],
    slots: &[Slot],
    prefix: &str,
    flat: &mut [f32],
) -> Result<(), CheckpointError> {
    let total = slots.last().map_or(0, |s| s.offset + s.len);
    if flat.len() != total {
        return Err(CheckpointError::Invalid {
            path: path.to_path_buf(),
            message: format!(
                "a buffer of {} values for a model of {total} parameters",
                flat.len()
            ),
        });
    }
    for (start, slot) in matched(path, entries, slots, prefix)? {
        let dest =
            bytemuck::cast_slice_mut::<f32, u8>(&mut flat[slot.offset..slot.offset + slot.len]);
        f.seek(std::io::SeekFrom::Start(start))
            .and_then(|_| f.read_exact(dest))
            .map_err(io_err(path))?;
    }
    Ok(())
}

/// The tensors of one kind in a checkpoint file — the weights of
/// `model.safetensors`, or one moment of `optimizer.safetensors` — read
/// one at a time, in file order, into one buffer reused for each: for
/// moving them on into other memory (a device's) without a host copy of
/// the whole state first.
#[derive(Debug)]
pub struct TensorReader<'s> {
    path: PathBuf,
    file: std::fs::File,
    order: std::vec::IntoIter<(u64, &'s Slot)>,
    buf: Vec<f32>,
    metadata: HashMap<String, String>,
}

/// Which tensors of a checkpoint a [`TensorReader`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Weights,
    FirstMoments,
    SecondMoments,
}

impl<'s> TensorReader<'s> {
    /// Opens `kind`'s file in checkpoint `dir` and checks its tensors are
    /// the model's (names and shapes), reading only the header.
    pub fn open(dir: &Path, slots: &'s [Slot], kind: Kind) -> Result<Self, CheckpointError> {
        let (file, prefix) = match kind {
            Kind::Weights => (MODEL_FILE, ""),
            Kind::FirstMoments => (OPTIMIZER_FILE, "exp_avg."),
            Kind::SecondMoments => (OPTIMIZER_FILE, "exp_avg_sq."),
        };
        let path = dir.join(file);
        let mut file = std::fs::File::open(&path).map_err(io_err(&path))?;
        let (entries, metadata) = read_header(&path, &mut file)?;
        let order = matched(&path, &entries, slots, prefix)?.into_iter();
        Ok(TensorReader {
            path,
            file,
            order,
            buf: Vec::new(),
            metadata,
        })
    }

    /// The next tensor's slot and values; None after the last.
    pub fn next_tensor(&mut self) -> Result<Option<(&'s Slot, &[f32])>, CheckpointError> {
        let Some((start, slot)) = self.order.next() else {
            return Ok(None);
        };
        self.buf.resize(slot.len, 0.0);
        self.file
            .seek(std::io::SeekFrom::Start(start))
            .and_then(|_| {
                self.file
                    .read_exact(bytemuck::cast_slice_mut::<f32, u8>(&mut self.buf))
            })
            .map_err(io_err(&self.path))?;
        Ok(Some((slot, &self.buf)))
    }

    /// The update count an `optimizer.safetensors` records.
    pub fn optimizer_step(&self) -> Result<u64, CheckpointError> {
        optimizer_step(&self.path, &self.metadata)
    }
}

fn optimizer_step(path: &Path, metadata: &HashMap<String, String>) -> Result<u64, CheckpointError> {
    metadata
        .get("step")
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| CheckpointError::Invalid {
            path: path.to_path_buf(),
            message: "no `step` in the metadata".into(),
        })
}

/// The safetensors crate's own writer and reader: the reference the
/// streaming [`write_tensors`] and the direct reads are held to in tests
/// and measured against in the bench.
pub mod reference {
    use super::*;

    /// A flat `f32` buffer's slice as a safetensors view.
    struct F32View<'a> {
        shape: &'a [usize],
        data: &'a [f32],
    }

    impl View for F32View<'_> {
        fn dtype(&self) -> Dtype {
            Dtype::F32
        }
        fn shape(&self) -> &[usize] {
            self.shape
        }
        fn data(&self) -> Cow<'_, [u8]> {
            Cow::Owned(self.data.iter().flat_map(|x| x.to_le_bytes()).collect())
        }
        fn data_len(&self) -> usize {
            self.data.len() * 4
        }
    }

    /// [`write_tensors`](super::write_tensors) through the safetensors
    /// crate: serialise, fsync, then hash by reading the file back.
    pub fn write_tensors(
        path: &Path,
        tensors: &[(String, Vec<usize>, &[f32])],
        metadata: HashMap<String, String>,
    ) -> Result<String, CheckpointError> {
        let views = tensors
            .iter()
            .map(|(n, s, d)| (n.clone(), F32View { shape: s, data: d }));
        safetensors::tensor::serialize_to_file(views, Some(metadata), path).map_err(|e| {
            CheckpointError::Invalid {
                path: path.to_path_buf(),
                message: format!("cannot write: {e}"),
            }
        })?;
        std::fs::File::open(path)
            .and_then(|f| f.sync_all())
            .map_err(io_err(path))?;
        sha256_file(path)
    }

    /// [`write_model`](super::write_model) through the safetensors crate.
    pub fn write_model(
        dir: &Path,
        slots: &[Slot],
        weights: &[f32],
    ) -> Result<String, CheckpointError> {
        let (tensors, meta) = model_tensors(slots, weights);
        write_tensors(&dir.join(MODEL_FILE), &tensors, meta)
    }

    /// [`write_optimizer`](super::write_optimizer) through the
    /// safetensors crate.
    pub fn write_optimizer(
        dir: &Path,
        slots: &[Slot],
        m: &[f32],
        v: &[f32],
        step: u64,
    ) -> Result<String, CheckpointError> {
        let (tensors, meta) = optimizer_tensors(slots, m, v, step);
        write_tensors(&dir.join(OPTIMIZER_FILE), &tensors, meta)
    }

    /// Every tensor of an f32 safetensors file, and its metadata, through
    /// the safetensors crate (the whole file read into memory first).
    pub fn read_tensors(
        path: &Path,
    ) -> Result<(Vec<NamedTensor>, HashMap<String, String>), CheckpointError> {
        let bytes = std::fs::read(path).map_err(io_err(path))?;
        let invalid = |m: String| CheckpointError::Invalid {
            path: path.to_path_buf(),
            message: m,
        };
        let (_, meta) = SafeTensors::read_metadata(&bytes)
            .map_err(|e| invalid(format!("not a safetensors file: {e}")))?;
        let st = SafeTensors::deserialize(&bytes)
            .map_err(|e| invalid(format!("not a safetensors file: {e}")))?;
        let mut out = Vec::new();
        for (name, view) in st.tensors() {
            if view.dtype() != Dtype::F32 {
                return Err(invalid(format!(
                    "tensor {name} is {:?}, expected F32",
                    view.dtype()
                )));
            }
            let data = view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            out.push(NamedTensor {
                name,
                shape: view.shape().to_vec(),
                data,
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok((out, meta.metadata().clone().unwrap_or_default()))
    }
}

/// Names and shapes of the tensors of a safetensors file (header only).
pub fn tensor_shapes(path: &Path) -> Result<BTreeMap<String, Vec<usize>>, CheckpointError> {
    let mut f = std::fs::File::open(path).map_err(io_err(path))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(io_err(path))?;
    let n = u64::from_le_bytes(len) as usize;
    let invalid = |m: String| CheckpointError::Invalid {
        path: path.to_path_buf(),
        message: m,
    };
    if n > 100 << 20 {
        return Err(invalid(format!(
            "header of {n} bytes: not a safetensors file"
        )));
    }
    let mut header = vec![0u8; n];
    f.read_exact(&mut header).map_err(io_err(path))?;
    let json: BTreeMap<String, serde_json::Value> = serde_json::from_slice(&header)
        .map_err(|e| invalid(format!("bad safetensors header: {e}")))?;
    Ok(json
        .into_iter()
        .filter(|(k, _)| k != "__metadata__")
        .map(|(k, v)| {
            let shape = v
                .get("shape")
                .and_then(|s| s.as_array())
                .map(|a| {
                    a.iter()
                        .filter_map(|x| x.as_u64())
                        .map(|x| x as usize)
                        .collect()
                })
                .unwrap_or_default();
            (k, shape)
        })
        .collect())
}

/// How the tensors of a file differ from a model layout: one line per
/// missing, unexpected or differently shaped tensor (empty = they match).
pub fn layout_mismatch(shapes: &BTreeMap<String, Vec<usize>>, slots: &[Slot]) -> Vec<String> {
    let mut out = Vec::new();
    for s in slots {
        match shapes.get(&s.name) {
            None => out.push(format!(
                "{} {:?}: missing from the checkpoint",
                s.name, s.shape
            )),
            Some(shape) if *shape != s.shape => out.push(format!(
                "{}: checkpoint {:?}, model {:?}",
                s.name, shape, s.shape
            )),
            Some(_) => {}
        }
    }
    for (name, shape) in shapes {
        if !slots.iter().any(|s| &s.name == name) {
            out.push(format!(
                "{name} {shape:?}: in the checkpoint, not in the model"
            ));
        }
    }
    out
}

/// The tensors of `model.safetensors`: each slot of the flat weights under
/// its nanoGPT name; and the file's metadata.
type Tensors<'a> = Vec<(String, Vec<usize>, &'a [f32])>;

fn model_tensors<'a>(slots: &[Slot], weights: &'a [f32]) -> (Tensors<'a>, HashMap<String, String>) {
    let tensors = slots
        .iter()
        .map(|s| {
            (
                s.name.clone(),
                s.shape.clone(),
                &weights[s.offset..s.offset + s.len],
            )
        })
        .collect();
    (
        tensors,
        HashMap::from([("format".to_string(), "pt".to_string())]),
    )
}

/// The tensors of `optimizer.safetensors`: AdamW moments as
/// `exp_avg.<name>` and `exp_avg_sq.<name>` (PyTorch's names), the update
/// count as metadata.
fn optimizer_tensors<'a>(
    slots: &[Slot],
    m: &'a [f32],
    v: &'a [f32],
    step: u64,
) -> (Tensors<'a>, HashMap<String, String>) {
    let mut tensors = Vec::new();
    for s in slots {
        let range = s.offset..s.offset + s.len;
        tensors.push((
            format!("exp_avg.{}", s.name),
            s.shape.clone(),
            &m[range.clone()],
        ));
        tensors.push((format!("exp_avg_sq.{}", s.name), s.shape.clone(), &v[range]));
    }
    (
        tensors,
        HashMap::from([("step".to_string(), step.to_string())]),
    )
}

/// Writes `model.safetensors` from flat weights; returns its sha256.
pub fn write_model(dir: &Path, slots: &[Slot], weights: &[f32]) -> Result<String, CheckpointError> {
    let (tensors, meta) = model_tensors(slots, weights);
    write_tensors(&dir.join(MODEL_FILE), &tensors, meta)
}

/// Writes `optimizer.safetensors` from the flat moments; returns its sha256.
pub fn write_optimizer(
    dir: &Path,
    slots: &[Slot],
    m: &[f32],
    v: &[f32],
    step: u64,
) -> Result<String, CheckpointError> {
    let (tensors, meta) = optimizer_tensors(slots, m, v, step);
    write_tensors(&dir.join(OPTIMIZER_FILE), &tensors, meta)
}

/// Reads `model.safetensors` straight into `weights` (a flat buffer in
/// `slots` order); a layout difference is an error listing the tensors
/// that differ.
pub fn read_model_into(
    dir: &Path,
    slots: &[Slot],
    weights: &mut [f32],
) -> Result<(), CheckpointError> {
    let path = dir.join(MODEL_FILE);
    let mut f = std::fs::File::open(&path).map_err(io_err(&path))?;
    let (entries, _) = read_header(&path, &mut f)?;
    read_flat_into(&path, &mut f, &entries, slots, "", weights)
}

/// [`read_model_into`] a new buffer.
pub fn read_model(dir: &Path, slots: &[Slot]) -> Result<Vec<f32>, CheckpointError> {
    let mut weights = vec![0f32; slots.last().map_or(0, |s| s.offset + s.len)];
    read_model_into(dir, slots, &mut weights)?;
    Ok(weights)
}

/// Reads `optimizer.safetensors` straight into the first and second
/// moments `m` and `v`; returns the update count.
pub fn read_optimizer_into(
    dir: &Path,
    slots: &[Slot],
    m: &mut [f32],
    v: &mut [f32],
) -> Result<u64, CheckpointError> {
    let path = dir.join(OPTIMIZER_FILE);
    let mut f = std::fs::File::open(&path).map_err(io_err(&path))?;
    let (entries, meta) = read_header(&path, &mut f)?;
    read_flat_into(&path, &mut f, &entries, slots, "exp_avg.", m)?;
    read_flat_into(&path, &mut f, &entries, slots, "exp_avg_sq.", v)?;
    optimizer_step(&path, &meta)
}

/// [`read_optimizer_into`] new buffers: first moments, second moments,
/// update count.
pub fn read_optimizer(
    dir: &Path,
    slots: &[Slot],
) -> Result<(Vec<f32>, Vec<f32>, u64), CheckpointError> {
    let n = slots.last().map_or(0, |s| s.offset + s.len);
    let (mut m, mut v) = (vec![0f32; n], vec![0f32; n]);
    let step = read_optimizer_into(dir, slots, &mut m, &mut v)?;
    Ok((m, v, step))
}

fn fsync_dir(dir: &Path) -> Result<(), CheckpointError> {
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(io_err(dir))
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<String, CheckpointError> {
    use std::io::Write;
    let mut f = std::fs::File::create(path).map_err(io_err(path))?;
    f.write_all(bytes).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))?;
    Ok(hex(&Sha256::digest(bytes)))
}

/// A fresh temporary directory for the checkpoint of `step` in `folder`.
pub fn temp_dir(folder: &Path, step: u64, tag: &str) -> Result<PathBuf, CheckpointError> {
    std::fs::create_dir_all(folder).map_err(io_err(folder))?;
    let dir = folder.join(format!(".tmp-{}-{tag}", step_dir_name(step)));
    std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    Ok(dir)
}

/// Finishes a checkpoint whose tensor files are already in `tmp`: writes
/// config.toml and train_state.json (with every file's sha256), COMPLETE
/// last, fsyncs, and renames it to `step-NNNNNNNN`. An existing directory
/// of that name (a checkpoint of an earlier attempt at the same step) is
/// moved aside to `.superseded-…`, never deleted.
pub fn commit(
    tmp: &Path,
    folder: &Path,
    mut state: TrainState,
    config_toml: &str,
) -> Result<PathBuf, CheckpointError> {
    let sum = write_synced(&tmp.join(CONFIG_FILE), config_toml.as_bytes())?;
    state.files.insert(CONFIG_FILE.to_string(), sum);
    let json = serde_json::to_string_pretty(&state).map_err(|e| CheckpointError::Invalid {
        path: tmp.to_path_buf(),
        message: format!("cannot serialise the train state: {e}"),
    })?;
    let state_sum = write_synced(&tmp.join(STATE_FILE), json.as_bytes())?;
    write_synced(
        &tmp.join(COMPLETE_FILE),
        format!("{state_sum}  {STATE_FILE}\n").as_bytes(),
    )?;
    fsync_dir(tmp)?;
    let dest = folder.join(step_dir_name(state.step));
    if dest.exists() {
        let aside = folder.join(format!(
            ".superseded-{}-{}",
            step_dir_name(state.step),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis())
        ));
        std::fs::rename(&dest, &aside).map_err(io_err(&dest))?;
    }
    std::fs::rename(tmp, &dest).map_err(io_err(tmp))?;
    fsync_dir(folder)?;
    Ok(dest)
}

/// Points `folder/name` at `step-NNNNNNNN` by renaming a new symlink over
/// the old one (atomic: a reader sees the old or the new target).
pub fn set_pointer(folder: &Path, name: &str, step: u64) -> Result<(), CheckpointError> {
    let link = folder.join(name);
    let tmp = folder.join(format!(".{name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(step_dir_name(step), &tmp).map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, &link).map_err(io_err(&link))?;
    fsync_dir(folder)
}

/// The step a pointer names, if it exists.
pub fn pointer_step(folder: &Path, name: &str) -> Option<u64> {
    std::fs::read_link(folder.join(name))
        .ok()
        .and_then(|t| t.file_name().map(|n| n.to_string_lossy().into_owned()))
        .and_then(|n| parse_step_dir(&n))
}

/// Removes complete `step-*` directories beyond the newest `keep_last`,
/// except the one `best` points at. Returns what was removed.
pub fn prune(folder: &Path, keep_last: usize) -> Result<Vec<PathBuf>, CheckpointError> {
    let best = pointer_step(folder, BEST);
    let complete: Vec<(u64, PathBuf)> = list_steps(folder)
        .into_iter()
        .filter(|(_, d)| d.join(COMPLETE_FILE).is_file())
        .collect();
    let cut = complete.len().saturating_sub(keep_last);
    let mut removed = Vec::new();
    for (step, dir) in &complete[..cut] {
        if Some(*step) == best {
            continue;
        }
        std::fs::remove_dir_all(dir).map_err(io_err(dir))?;
        removed.push(dir.clone());
    }
    Ok(removed)
}

/// Removes what interrupted writes left in `folder`: temporary checkpoint
/// folders (`.tmp-step-…`, never complete, never loaded), checkpoints an
/// earlier attempt at the same step moved aside (`.superseded-…`) and
/// half-made pointer links. Only a coordinator holding the folder's lock
/// may call it (no other process is writing there). Returns what it
/// removed.
pub fn clean_leftovers(folder: &Path) -> Result<Vec<PathBuf>, CheckpointError> {
    let mut removed = Vec::new();
    for e in std::fs::read_dir(folder).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let path = e.path();
        let is_link = e.file_type().map(|t| t.is_symlink()).unwrap_or(false);
        let leftover_dir = !is_link
            && path.is_dir()
            && (name.starts_with(".tmp-step-") || name.starts_with(".superseded-step-"));
        let leftover_link = is_link
            && [LATEST, BEST]
                .iter()
                .any(|p| name.starts_with(&format!(".{p}.tmp-")));
        if leftover_dir {
            std::fs::remove_dir_all(&path).map_err(io_err(&path))?;
        } else if leftover_link {
            std::fs::remove_file(&path).map_err(io_err(&path))?;
        } else {
            continue;
        }
        removed.push(path);
    }
    removed.sort();
    Ok(removed)
}

/// Points `latest` back at the newest complete checkpoint when it names a
/// folder that is gone or incomplete (a crash between a prune and the
/// pointer's move, a hand-deleted step); removes it when no complete
/// checkpoint is left. Returns what it did, for a warning. Only a
/// coordinator holding the folder's lock may call it.
pub fn repair_latest(folder: &Path) -> Result<Option<String>, CheckpointError> {
    let link = folder.join(LATEST);
    let Ok(target) = std::fs::read_link(&link) else {
        return Ok(None);
    };
    if folder.join(&target).join(COMPLETE_FILE).is_file() {
        return Ok(None);
    }
    let newest = list_steps(folder)
        .into_iter()
        .rev()
        .find(|(_, d)| d.join(COMPLETE_FILE).is_file());
    Ok(Some(match newest {
        Some((step, dir)) => {
            set_pointer(folder, LATEST, step)?;
            format!(
                "{} named {}, which is not a complete checkpoint; it now names {}",
                link.display(),
                target.display(),
                dir.display()
            )
        }
        None => {
            std::fs::remove_file(&link).map_err(io_err(&link))?;
            format!(
                "{} named {}, which is not a complete checkpoint, and no complete checkpoint is left: removed it",
                link.display(),
                target.display()
            )
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TrainConfig;

    fn state(step: u64) -> TrainState {
        TrainState {
            format_version: FORMAT_VERSION,
            stride_version: "test".into(),
            step,
            max_steps: 100,
            schedule: Schedule::from_config(&TrainConfig::default()),
            data_cursor: DataCursor {
                epoch: 1,
                position: 7,
            },
            rng: RngState {
                seed: 1,
                algorithm: "chacha8".into(),
            },
            world_size: 2,
            config_name: "t".into(),
            config_hash: "h".into(),
            run_dir: "runs/t".into(),
            weights_hash: "00".into(),
            optimizer_step: step,
            metrics: MetricsSoFar::default(),
            history: vec![],
            data: vec![Fingerprint::new("train", "t.bin", 1000, 42)],
            files: BTreeMap::new(),
        }
    }

    /// Writes a complete checkpoint of `step` into `folder`.
    fn make(folder: &Path, step: u64) -> PathBuf {
        let tmp = temp_dir(folder, step, "t").expect("tmp");
        let w = [1.0f32, 2.0, 3.0];
        let mut s = state(step);
        let m = write_tensors(
            &tmp.join(MODEL_FILE),
            &[("a.weight".into(), vec![3], &w)],
            HashMap::new(),
        )
        .expect("model");
        let o = write_tensors(
            &tmp.join(OPTIMIZER_FILE),
            &[("exp_avg.a.weight".into(), vec![3], &w)],
            HashMap::new(),
        )
        .expect("opt");
        s.files.insert(MODEL_FILE.into(), m);
        s.files.insert(OPTIMIZER_FILE.into(), o);
        commit(&tmp, folder, s, "[train]\n").expect("commit")
    }

    /// Replaces the state file with `edit` of it and COMPLETE with its new
    /// sum: a state that is consistent, but says something else.
    fn rewrite_state(dir: &Path, edit: impl FnOnce(&str) -> String) {
        let t = std::fs::read_to_string(dir.join(STATE_FILE)).expect("r");
        let t = edit(&t);
        std::fs::write(dir.join(STATE_FILE), &t).expect("w");
        let sum = hex(&Sha256::digest(t.as_bytes()));
        std::fs::write(dir.join(COMPLETE_FILE), format!("{sum}  {STATE_FILE}\n")).expect("w");
    }

    /// Two slots of a small model, in name order, and values for them.
    fn two_slots() -> (Vec<Slot>, Vec<f32>) {
        let slots = vec![
            Slot {
                name: "a.bias".into(),
                shape: vec![3],
                offset: 0,
                len: 3,
            },
            Slot {
                name: "b.weight".into(),
                shape: vec![2, 2],
                offset: 3,
                len: 4,
            },
        ];
        let values = (0..7).map(|i| i as f32 * 0.25 - 1.0).collect();
        (slots, values)
    }

    #[test]
    fn the_streaming_writer_writes_the_safetensors_crates_bytes() {
        let d = tempfile::tempdir().expect("tmp");
        let w: Vec<f32> = (0..12).map(|i| i as f32 / 7.0).collect();
        // Given out of order: both writers lay tensors out by name.
        let tensors: Vec<(String, Vec<usize>, &[f32])> = vec![
            ("z.weight".into(), vec![2, 3], &w[..6]),
            ("a.bias".into(), vec![5], &w[6..11]),
            ("m".into(), vec![1], &w[11..]),
        ];
        let meta = HashMap::from([("step".to_string(), "42".to_string())]);
        let (ours, theirs) = (d.path().join("ours"), d.path().join("theirs"));
        let sha = write_tensors(&ours, &tensors, meta.clone()).expect("ours");
        let sha_ref = reference::write_tensors(&theirs, &tensors, meta).expect("theirs");
        assert_eq!(
            std::fs::read(&ours).expect("read"),
            std::fs::read(&theirs).expect("read")
        );
        assert_eq!(sha, sha_ref);
        assert_eq!(sha, sha256_file(&ours).expect("hash"));
    }

    #[test]
    fn files_of_the_reference_writer_load_straight_into_buffers() {
        let d = tempfile::tempdir().expect("tmp");
        let (slots, w) = two_slots();
        let m: Vec<f32> = w.iter().map(|x| x * 3.0).collect();
        let v: Vec<f32> = w.iter().map(|x| x * x).collect();
        // The model file as a checkpoint written before the streaming
        // writer existed.
        reference::write_model(d.path(), &slots, &w).expect("model");
        write_optimizer(d.path(), &slots, &m, &v, 9).expect("optimizer");
        let mut got = vec![f32::NAN; 7];
        read_model_into(d.path(), &slots, &mut got).expect("model");
        assert_eq!(got, w);
        let (mut gm, mut gv) = (vec![0.0; 7], vec![0.0; 7]);
        let step = read_optimizer_into(d.path(), &slots, &mut gm, &mut gv).expect("opt");
        assert_eq!((gm, gv, step), (m.clone(), v.clone(), 9));

        // One tensor at a time: every slot once, the same values.
        for (kind, want) in [
            (Kind::Weights, &w),
            (Kind::FirstMoments, &m),
            (Kind::SecondMoments, &v),
        ] {
            let mut r = TensorReader::open(d.path(), &slots, kind).expect("open");
            let mut flat = vec![f32::NAN; 7];
            let mut seen = Vec::new();
            while let Some((slot, values)) = r.next_tensor().expect("read") {
                flat[slot.offset..slot.offset + slot.len].copy_from_slice(values);
                seen.push(slot.name.clone());
            }
            seen.sort();
            let mut names: Vec<String> = slots.iter().map(|s| s.name.clone()).collect();
            names.sort();
            assert_eq!((&flat, seen), (want, names), "{kind:?}");
            if kind != Kind::Weights {
                assert_eq!(r.optimizer_step().expect("step"), 9);
            }
        }
        let other = [Slot {
            name: "a.bias".into(),
            shape: vec![7],
            offset: 0,
            len: 7,
        }];
        let e = TensorReader::open(d.path(), &other, Kind::Weights).expect_err("another model");
        assert!(e.to_string().contains("differ from the model"), "{e}");
    }

    #[test]
    fn damaged_or_foreign_tensor_files_are_refused_with_what_is_wrong() {
        let d = tempfile::tempdir().expect("tmp");
        let (slots, w) = two_slots();
        write_model(d.path(), &slots, &w).expect("model");
        let path = d.path().join(MODEL_FILE);
        let good = std::fs::read(&path).expect("read");
        let load = || {
            let mut out = vec![0.0; 7];
            read_model_into(d.path(), &slots, &mut out)
                .expect_err("refused")
                .to_string()
        };
        std::fs::write(&path, &good[..good.len() - 4]).expect("truncate");
        assert!(load().contains("truncated or damaged"), "{}", load());
        std::fs::write(&path, &good[..5]).expect("truncate");
        assert!(load().contains("shorter than its header"), "{}", load());
        let mut huge = good.clone();
        huge[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        std::fs::write(&path, &huge).expect("write");
        assert!(load().contains("not a safetensors file"), "{}", load());
        // Another model: a tensor of another shape, one missing.
        let other = vec![Slot {
            name: "a.bias".into(),
            shape: vec![7],
            offset: 0,
            len: 7,
        }];
        write_model(d.path(), &other, &w).expect("model");
        let e = load();
        assert!(
            e.contains("a.bias: checkpoint [7], model [3]") && e.contains("b.weight"),
            "{e}"
        );
    }

    #[test]
    fn a_committed_checkpoint_validates_and_reads_back() {
        let d = tempfile::tempdir().expect("tmp");
        let dir = make(d.path(), 10);
        assert_eq!(
            dir.file_name().and_then(|n| n.to_str()),
            Some("step-00000010")
        );
        let c = validate(&dir).expect("valid");
        assert_eq!(
            c.state.data_cursor,
            DataCursor {
                epoch: 1,
                position: 7
            }
        );
        let (t, _) = reference::read_tensors(&dir.join(MODEL_FILE)).expect("read");
        assert_eq!(t[0].data, vec![1.0, 2.0, 3.0]);
        assert_eq!(
            tensor_shapes(&dir.join(MODEL_FILE)).expect("shapes")["a.weight"],
            vec![3]
        );
        assert!(!d.path().join(".tmp-step-00000010-t").exists());
    }

    #[test]
    fn damaged_checkpoints_are_refused_by_name() {
        let d = tempfile::tempdir().expect("tmp");
        type Damage = fn(&Path);
        let cases: Vec<(&str, Damage, &str)> = vec![
            (
                "no COMPLETE",
                |p| std::fs::remove_file(p.join(COMPLETE_FILE)).expect("rm"),
                "incomplete",
            ),
            (
                "truncated model",
                |p| {
                    let f = std::fs::OpenOptions::new()
                        .write(true)
                        .open(p.join(MODEL_FILE))
                        .expect("open");
                    f.set_len(10).expect("truncate");
                },
                "does not match its sha256",
            ),
            (
                "an edited train_state.json",
                |p| {
                    let t = std::fs::read_to_string(p.join(STATE_FILE)).expect("r");
                    std::fs::write(
                        p.join(STATE_FILE),
                        t.replace("\"position\": 7", "\"position\": 8"),
                    )
                    .expect("w");
                },
                "train_state.json does not match its sha256",
            ),
            (
                "COMPLETE emptied",
                |p| std::fs::write(p.join(COMPLETE_FILE), "").expect("w"),
                "holds no sha256 of train_state.json, which format 2 requires",
            ),
            (
                "COMPLETE garbled",
                |p| std::fs::write(p.join(COMPLETE_FILE), "nonsense\n").expect("w"),
                "is not a `SHA256  FILE` line",
            ),
            (
                "bad json",
                |p| rewrite_state(p, |_| "{not json".into()),
                "not valid JSON",
            ),
            (
                "future version",
                |p| {
                    rewrite_state(p, |t| {
                        t.replace("\"format_version\": 2", "\"format_version\": 99")
                    })
                },
                "format version 99 is newer",
            ),
        ];
        for (i, (what, damage, want)) in cases.into_iter().enumerate() {
            let dir = make(d.path(), i as u64);
            damage(&dir);
            let e = validate(&dir).expect_err(what).to_string();
            assert!(
                e.contains(&dir.display().to_string()) && e.contains(want),
                "{what}: {e}"
            );
        }
    }

    #[test]
    fn latest_falls_back_explicit_paths_do_not() {
        let d = tempfile::tempdir().expect("tmp");
        make(d.path(), 10);
        let newer = make(d.path(), 20);
        set_pointer(d.path(), LATEST, 20).expect("ptr");
        std::fs::remove_file(newer.join(COMPLETE_FILE)).expect("rm");
        let (c, warnings) = resolve(&d.path().join(LATEST)).expect("falls back");
        assert_eq!(c.state.step, 10);
        assert!(warnings[0].contains("falling back"), "{warnings:?}");
        let (c, warnings) = resolve(d.path()).expect("folder");
        assert_eq!(c.state.step, 10);
        assert!(warnings[0].contains("step-00000020"), "{warnings:?}");
        let e = resolve(&newer).expect_err("explicit").to_string();
        assert!(e.contains("incomplete"), "{e}");
        let empty = tempfile::tempdir().expect("tmp");
        assert!(resolve(empty.path()).is_err());
    }

    /// With the sums left for later, resolving reads only the small files:
    /// a damaged model file is found by `verify` (the error `validate`
    /// gives), and resolving `latest` again now skips it.
    #[test]
    fn sums_left_for_later_are_checked_by_verify() {
        let d = tempfile::tempdir().expect("tmp");
        make(d.path(), 10);
        let newer = make(d.path(), 20);
        set_pointer(d.path(), LATEST, 20).expect("ptr");
        let model = newer.join(MODEL_FILE);
        let mut bytes = std::fs::read(&model).expect("read");
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&model, bytes).expect("write");

        let later = resolve_with(&d.path().join(LATEST), Sums::Later).expect("resolves");
        assert_eq!(later.checkpoint.state.step, 20, "not hashed yet");
        assert!(later.falls_back && later.warnings.is_empty());
        let e = later.unverified.verify().expect_err("damaged").to_string();
        assert_eq!(e, validate(&newer).expect_err("damaged").to_string());
        assert!(
            e.contains("model.safetensors does not match its sha256"),
            "{e}"
        );

        let (now, warnings) = resolve(&d.path().join(LATEST)).expect("falls back");
        assert_eq!(now.state.step, 10);
        assert!(warnings[0].contains("falling back"), "{warnings:?}");
        let explicit = resolve_with(&newer, Sums::Later).expect("resolves");
        assert!(!explicit.falls_back);
        assert!(
            resolve_with(d.path(), Sums::Later)
                .expect("folder")
                .falls_back
        );
        let whole = resolve_with(&d.path().join("step-00000010"), Sums::Later).expect("ok");
        assert_eq!(whole.unverified.files.len(), 2, "model and optimizer");
        whole.unverified.verify().expect("intact");
        assert!(resolve_with(&newer, Sums::Now).is_err());
        assert!(
            validate_with(&d.path().join("step-00000010"), Sums::Now)
                .expect("valid")
                .1
                .is_empty()
        );
    }

    #[test]
    fn prune_keeps_the_last_k_and_best() {
        let d = tempfile::tempdir().expect("tmp");
        for s in [10, 20, 30, 40, 50] {
            make(d.path(), s);
        }
        set_pointer(d.path(), BEST, 20).expect("best");
        let removed = prune(d.path(), 2).expect("prune");
        assert_eq!(removed.len(), 2);
        let left: Vec<u64> = list_steps(d.path()).into_iter().map(|(s, _)| s).collect();
        assert_eq!(left, vec![20, 40, 50]);
        assert_eq!(pointer_step(d.path(), BEST), Some(20));
    }

    #[test]
    fn recommitting_a_step_keeps_the_old_one_aside() {
        let d = tempfile::tempdir().expect("tmp");
        make(d.path(), 10);
        make(d.path(), 10);
        let aside = std::fs::read_dir(d.path())
            .expect("ls")
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(".superseded-step-00000010")
            })
            .count();
        assert_eq!(aside, 1);
        validate(&d.path().join("step-00000010")).expect("valid");
    }

    #[test]
    fn format_1_checkpoints_still_load_with_a_warning() {
        let d = tempfile::tempdir().expect("tmp");
        let dir = make(d.path(), 5);
        let t = std::fs::read_to_string(dir.join(STATE_FILE)).expect("r");
        std::fs::write(
            dir.join(STATE_FILE),
            t.replace("\"format_version\": 2", "\"format_version\": 1"),
        )
        .expect("w");
        std::fs::write(dir.join(COMPLETE_FILE), "").expect("w");
        let r = resolve_with(&dir, Sums::Now).expect("format 1 loads");
        assert_eq!(r.checkpoint.state.format_version, 1);
        assert!(
            r.warnings
                .iter()
                .any(|w| w.contains("checkpoint format 1") && w.contains("covered by no checksum")),
            "{:?}",
            r.warnings
        );
        // Written now, it is format 2, and `sha256sum -c COMPLETE` holds.
        let fresh = make(d.path(), 6);
        let ok = std::process::Command::new("sha256sum")
            .args(["-c", COMPLETE_FILE])
            .current_dir(&fresh)
            .output()
            .expect("sha256sum");
        assert!(ok.status.success(), "{ok:?}");
    }

    #[test]
    fn leftovers_are_cleaned_and_a_dangling_latest_is_repaired() {
        let d = tempfile::tempdir().expect("tmp");
        let f = d.path();
        make(f, 10);
        make(f, 20);
        set_pointer(f, LATEST, 20).expect("latest");
        let tmp = temp_dir(f, 30, "gone").expect("tmp");
        std::fs::write(tmp.join(MODEL_FILE), "half").expect("w");
        std::fs::create_dir(f.join(".superseded-step-00000010-123")).expect("mkdir");
        std::os::unix::fs::symlink("step-00000010", f.join(".latest.tmp-99")).expect("ln");
        let removed = clean_leftovers(f).expect("clean");
        assert_eq!(removed.len(), 3, "{removed:?}");
        assert!(!tmp.exists() && f.join("step-00000010").is_dir());
        assert_eq!(repair_latest(f).expect("fine"), None);

        // `latest` names a step that is gone: it is pointed back.
        set_pointer(f, LATEST, 80).expect("dangling");
        let said = repair_latest(f).expect("repair").expect("repaired");
        assert!(
            said.contains("step-00000080") && said.contains("step-00000020"),
            "{said}"
        );
        assert_eq!(pointer_step(f, LATEST), Some(20));
        // Nothing complete left: the pointer goes.
        for s in [10, 20] {
            std::fs::remove_file(f.join(step_dir_name(s)).join(COMPLETE_FILE)).expect("rm");
        }
        let said = repair_latest(f).expect("repair").expect("removed");
        assert!(said.contains("removed it"), "{said}");
        assert!(std::fs::symlink_metadata(f.join(LATEST)).is_err());
    }
}
