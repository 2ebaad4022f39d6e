//! The job's checkpoints, from plan to commit: a checkpoint is planned at
//! a step boundary (its train state captured then), rank 0 writes the
//! files in the background while training goes on — or, in a job that
//! shards its optimizer state, every rank writes its shard's part of both
//! files — and when every writer has reported this module writes the
//! manifest and COMPLETE (hashing the files itself when they came in
//! parts: on a thread of its own, the driver's next wake committing them,
//! so that the hashing never holds a step), renames the folder into place,
//! moves the `latest` / `best` pointers and prunes to
//! `checkpoint.keep_last`. A checkpoint never committed is never loaded.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Result, bail};

use super::CheckpointFailed;
use stride_job::checkpoint::{self, Checkpoint, TrainState};
use stride_job::test_hooks::{self, Hook};
use stride_proto::v1::CheckpointReport;

use crate::server::Shared;

/// The files the writers write (and a sharded job's committer hashes).
const FILES: [&str; 2] = [checkpoint::MODEL_FILE, checkpoint::OPTIMIZER_FILE];

/// A checkpoint planned at a step boundary whose files are being written.
#[derive(Debug)]
struct Pending {
    tmp: PathBuf,
    state: TrainState,
    /// The resolved config as of the plan (saved beside the state).
    config_toml: String,
    best: bool,
    planned: Instant,
    /// Open from the plan to the commit.
    span: tracing::Span,
    /// Writers that have not reported yet (1, or every rank of a sharded
    /// job).
    parts_left: usize,
    /// The reports in so far: the longest write, and rank 0's weights hash.
    write_s: f64,
    weights_hash: Vec<u8>,
    /// A sharded job's files, every part reported, being hashed on a
    /// thread of their own (committed by [`Checkpoints::commit_hashed`]).
    hashing: Option<std::thread::JoinHandle<Vec<Result<String, checkpoint::CheckpointError>>>>,
}

#[derive(Debug)]
pub struct Checkpoints {
    /// The folder of `step-*` checkpoints, `best` and `latest`.
    folder: PathBuf,
    keep_last: usize,
    shared: Arc<Shared>,
    /// By step.
    pending: BTreeMap<u64, Pending>,
    /// Checkpoints this job committed, oldest first (a restart resumes from
    /// the newest of these, never from another run's checkpoint).
    committed: Vec<PathBuf>,
}

impl Checkpoints {
    pub fn new(folder: PathBuf, keep_last: usize, shared: Arc<Shared>) -> Checkpoints {
        Checkpoints {
            folder,
            keep_last,
            shared,
            pending: BTreeMap::new(),
            committed: Vec::new(),
        }
    }

    /// Plans the checkpoint of `state` (its step): returns the temporary
    /// folder its `writers` (rank 0, or every rank of a sharded job) write
    /// into. `tag` makes the folder's name unique to this coordinator and
    /// worker-set generation.
    pub fn plan(
        &mut self,
        state: TrainState,
        config_toml: String,
        best: bool,
        tag: &str,
        span: tracing::Span,
        writers: usize,
    ) -> Result<PathBuf> {
        let step = state.step;
        let tmp = std::path::absolute(checkpoint::temp_dir(&self.folder, step, tag)?)?;
        self.pending.insert(
            step,
            Pending {
                tmp: tmp.clone(),
                state,
                config_toml,
                best,
                planned: Instant::now(),
                span,
                parts_left: writers.max(1),
                write_s: 0.0,
                weights_hash: Vec::new(),
                hashing: None,
            },
        );
        Ok(tmp)
    }

    /// A writer wrote its files: once every writer has, write the manifest
    /// and COMPLETE, rename into place, move the pointers, prune — for a
    /// sharded job's parts once a thread has hashed them
    /// ([`Checkpoints::commit_hashed`]: the driver does not wait for the
    /// hashing). A write that failed (the report says why) or a commit
    /// that fails here (the disk is full) is a [`CheckpointFailed`]: the
    /// temporary folder is removed at once and the job stops, the
    /// checkpoint before staying the newest.
    pub fn commit(&mut self, r: CheckpointReport) -> Result<()> {
        let Some(p) = self.pending.get_mut(&r.step) else {
            return Ok(());
        };
        // A part of a sharded job's files: the commit waits for the others
        // (a failed part fails the checkpoint at once).
        p.write_s = p.write_s.max(r.write_s);
        if !r.weights_hash.is_empty() {
            p.weights_hash = r.weights_hash.clone();
        }
        p.parts_left = p.parts_left.saturating_sub(1);
        if p.parts_left > 0 && r.error.is_empty() {
            return Ok(());
        }
        if r.error.is_empty() && r.sha256.is_empty() && p.hashing.is_none() {
            // Every part is in: the files are hashed while training goes on.
            let paths: Vec<PathBuf> = FILES.iter().map(|f| p.tmp.join(f)).collect();
            let span = p.span.clone();
            let hashing = std::thread::Builder::new()
                .name("checkpoint-hash".into())
                .spawn(move || span.in_scope(|| checkpoint::sha256_files(&paths)));
            match hashing {
                Ok(h) => {
                    p.hashing = Some(h);
                    return Ok(());
                }
                Err(e) => {
                    let p = self.pending.remove(&r.step);
                    return self.finish(
                        p,
                        r.step,
                        Err(format!("cannot start a hashing thread: {e}")),
                    );
                }
            }
        }
        let p = self.pending.remove(&r.step);
        let outcome = if r.error.is_empty() {
            Ok(r.sha256.into_iter().collect())
        } else {
            Err(r.error)
        };
        self.finish(p, r.step, outcome)
    }

    /// Commits the checkpoints whose parts a thread has finished hashing;
    /// whether there was one.
    pub fn commit_hashed(&mut self) -> Result<bool> {
        let done: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| p.hashing.as_ref().is_some_and(|h| h.is_finished()))
            .map(|(step, _)| *step)
            .collect();
        for &step in &done {
            let mut p = self.pending.remove(&step);
            let sums = match p.as_mut().and_then(|p| p.hashing.take()).map(|h| h.join()) {
                Some(Ok(sums)) => FILES
                    .iter()
                    .zip(sums)
                    .map(|(f, sum)| sum.map(|s| (f.to_string(), s)))
                    .collect::<Result<BTreeMap<_, _>, _>>()
                    .map_err(|e| format!("hashing the written files: {e}")),
                _ => Err("the thread hashing the written files failed".to_string()),
            };
            self.finish(p, step, sums)?;
        }
        Ok(!done.is_empty())
    }

    /// The end of the checkpoint of `step` (`p`, if still pending): the
    /// commit with the files' sums, or the failure `outcome` says.
    fn finish(
        &mut self,
        p: Option<Pending>,
        step: u64,
        outcome: Result<BTreeMap<String, String>, String>,
    ) -> Result<()> {
        let Some(p) = p else {
            return Ok(());
        };
        let tmp = p.tmp.clone();
        let failed = match outcome {
            Ok(sums) => match self.commit_written(p, step, sums) {
                Ok(()) => return Ok(()),
                Err(e) => format!("{e:#}"),
            },
            Err(why) => why,
        };
        let removed = match std::fs::remove_dir_all(&tmp) {
            Ok(()) => format!("its temporary folder {} was removed", tmp.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => format!(
                "its temporary folder {} could not be removed ({e})",
                tmp.display()
            ),
        };
        let newest = self
            .committed
            .last()
            .map(|d| format!("the newest checkpoint is still {}", d.display()))
            .unwrap_or_else(|| "this job has committed no checkpoint yet".into());
        Err(CheckpointFailed {
            step,
            message: failed,
            kept: [removed, newest]
                .into_iter()
                .filter(|s| !s.is_empty())
                .collect::<Vec<_>>()
                .join("; "),
        }
        .into())
    }

    /// [`Checkpoints::commit`] of files every writer has reported, with
    /// their sums (rank 0's, or the hashing thread's for a sharded job's
    /// parts).
    fn commit_written(
        &mut self,
        mut p: Pending,
        step: u64,
        sums: BTreeMap<String, String>,
    ) -> Result<()> {
        for file in FILES {
            if !sums.contains_key(file) {
                bail!("rank 0 reported the checkpoint of step {step} without {file}");
            }
        }
        p.state.files = sums;
        // Rank 0's hash of the weights it wrote (the step's own report may
        // not have hashed them: `worker.weights_check_interval`).
        if !p.weights_hash.is_empty() {
            p.state.weights_hash = stride_job::names::hex(&p.weights_hash);
        }
        let folder = &self.folder;
        let commit_span =
            tracing::info_span!(parent: &p.span, "checkpoint_commit", step = step as i64);
        full_disk_for_tests(step, &p.tmp);
        let dir = commit_span
            .in_scope(|| checkpoint::commit(&p.tmp, folder, p.state, &p.config_toml))
            .map_err(|e| environment(e, folder))?;
        p.span.record("dir", dir.display().to_string());
        let write_s = p.write_s;
        let m = &self.shared.metrics;
        m.checkpoint_seconds
            .observe(p.planned.elapsed().as_secs_f64());
        m.checkpoints.inc();
        self.committed.push(dir.clone());
        let env = |e| environment(e, folder);
        if checkpoint::pointer_step(folder, checkpoint::LATEST).is_none_or(|s| s <= step) {
            checkpoint::set_pointer(folder, checkpoint::LATEST, step).map_err(env)?;
        }
        if p.best {
            checkpoint::set_pointer(folder, checkpoint::BEST, step).map_err(env)?;
        }
        let removed = checkpoint::prune(folder, self.keep_last).map_err(env)?;
        let pruned = if removed.is_empty() {
            String::new()
        } else {
            let names: Vec<String> = removed.iter().map(|d| d.display().to_string()).collect();
            format!("; pruned {}", names.join(", "))
        };
        tracing::info!(
            "checkpoint {} committed{} (written in {:.2} s in the background){pruned}",
            dir.display(),
            if p.best { " as best" } else { "" },
            write_s,
        );
        Ok(())
    }

    /// Checkpoints planned and not yet committed.
    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }

    /// Whether the checkpoint of `step` is planned and not yet committed.
    pub fn is_planned(&self, step: u64) -> bool {
        self.pending.contains_key(&step)
    }

    /// The step of the last checkpoint committed.
    pub fn last_committed_step(&self) -> Option<u64> {
        self.committed
            .last()
            .and_then(|d| d.file_name())
            .and_then(|n| n.to_string_lossy().strip_prefix("step-")?.parse().ok())
    }

    /// Forgets the checkpoints in flight (after a failure: their writer's
    /// generation is gone) and removes their temporary folders (a writer
    /// still running finds its folder gone and fails harmlessly).
    pub fn abandon_in_flight(&mut self) {
        for (_, p) in std::mem::take(&mut self.pending) {
            let _ = std::fs::remove_dir_all(&p.tmp);
        }
    }

    /// The newest checkpoint this job committed that still validates.
    pub fn newest_valid(&self) -> Option<Checkpoint> {
        self.committed
            .iter()
            .rev()
            .find_map(|d| checkpoint::validate(d).ok())
    }

    /// The folder of the last checkpoint committed.
    pub fn last_committed(&self) -> Option<&Path> {
        self.committed.last().map(PathBuf::as_path)
    }
}

/// A checkpoint error while committing is the environment's (a full disk,
/// a folder not writable), not a bad input: reported as text, so that it
/// maps to exit 1, not 2 — with what a full disk needs said plainly.
fn environment(e: checkpoint::CheckpointError, folder: &Path) -> anyhow::Error {
    let full = matches!(&e, checkpoint::CheckpointError::Io { source, .. }
        if source.kind() == std::io::ErrorKind::StorageFull);
    if !full {
        return anyhow::anyhow!("{e}");
    }
    let free = stride_job::files::free_bytes(folder)
        .map_or_else(|| "an unknown number of".into(), |b| b.to_string());
    anyhow::anyhow!(
        "no space left on device (ENOSPC) in {}, {free} bytes free: {e}; free space or give checkpoints another folder (checkpoint.dir), then resume",
        folder.display()
    )
}

/// [`Hook::CoordinatorFullDiskAtStep`]: the `config.toml` the commit of
/// that step writes is made a link to `/dev/full`, so the write fails with
/// the kernel's own ENOSPC.
fn full_disk_for_tests(step: u64, tmp: &Path) {
    if test_hooks::at_step(Hook::CoordinatorFullDiskAtStep, step) {
        let _ = std::os::unix::fs::symlink("/dev/full", tmp.join(checkpoint::CONFIG_FILE));
    }
}
