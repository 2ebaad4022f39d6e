//! The job's checkpoints, from plan to commit: a checkpoint is planned at
//! a step boundary (its train state captured then), rank 0 writes the
//! files in the background while training goes on, and when rank 0
//! reports them this module writes the manifest and COMPLETE, renames the
//! folder into place, moves the `latest` / `best` pointers and prunes to
//! `checkpoint.keep_last`. A checkpoint never committed is never loaded.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Result, bail};
use stride_job::checkpoint::{self, Checkpoint, TrainState};
use stride_proto::v1::CheckpointReport;

use crate::server::Shared;

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
    /// folder rank 0 writes into. `tag` makes the folder's name unique to
    /// this coordinator and worker-set generation.
    pub fn plan(
        &mut self,
        state: TrainState,
        config_toml: String,
        best: bool,
        tag: &str,
        span: tracing::Span,
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
            },
        );
        Ok(tmp)
    }

    /// Rank 0 wrote its files: write the manifest and COMPLETE, rename into
    /// place, move the pointers, prune.
    pub fn commit(&mut self, r: CheckpointReport) -> Result<()> {
        let Some(mut p) = self.pending.remove(&r.step) else {
            return Ok(());
        };
        for file in [checkpoint::MODEL_FILE, checkpoint::OPTIMIZER_FILE] {
            if !r.sha256.contains_key(file) {
                bail!(
                    "rank 0 reported the checkpoint of step {} without {file}",
                    r.step
                );
            }
        }
        p.state.files = r.sha256.into_iter().collect();
        // Rank 0's hash of the weights it wrote (the step's own report may
        // not have hashed them: `worker.weights_check_interval`).
        if !r.weights_hash.is_empty() {
            p.state.weights_hash = stride_job::config::hex(&r.weights_hash);
        }
        let folder = &self.folder;
        let commit_span =
            tracing::info_span!(parent: &p.span, "checkpoint_commit", step = r.step as i64);
        let dir =
            commit_span.in_scope(|| checkpoint::commit(&p.tmp, folder, p.state, &p.config_toml))?;
        p.span.record("dir", dir.display().to_string());
        let m = &self.shared.metrics;
        m.checkpoint_seconds
            .observe(p.planned.elapsed().as_secs_f64());
        m.checkpoints.inc();
        self.committed.push(dir.clone());
        if checkpoint::pointer_step(folder, checkpoint::LATEST).is_none_or(|s| s <= r.step) {
            checkpoint::set_pointer(folder, checkpoint::LATEST, r.step)?;
        }
        if p.best {
            checkpoint::set_pointer(folder, checkpoint::BEST, r.step)?;
        }
        let removed = checkpoint::prune(folder, self.keep_last)?;
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
            r.write_s,
        );
        Ok(())
    }

    /// Checkpoints planned and not yet committed.
    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }

    /// Forgets the checkpoints in flight (after a failure: their writer's
    /// generation is gone; their temporary folders are never loaded).
    pub fn abandon_in_flight(&mut self) {
        self.pending.clear();
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
