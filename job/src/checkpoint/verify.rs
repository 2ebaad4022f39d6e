//! Whether a checkpoint can be trusted: the sums of its files, the
//! `COMPLETE` marker, and which checkpoint a path, a folder or `latest`
//! resolves to (falling back past damaged ones).

use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::names::hex;

use super::*;

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
    pub(super) files: Vec<(String, String)>,
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
