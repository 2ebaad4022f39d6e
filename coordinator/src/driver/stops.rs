//! How an attempt stops short of its end: by a signal, a preemption, a
//! damaged start, a checkpoint that failed, or to take in more workers.
//! Each is an error type the driver returns and the job's caller
//! (`train.rs`) or the restart rules (`recovery.rs`) downcast; none of
//! them decides what happens next.

use stride_job::checkpoint::CheckpointError;

/// The job was stopped by a signal (Ctrl-C or SIGTERM); exit code 130.
#[derive(Debug, thiserror::Error)]
#[error("interrupted by {0}; all workers were stopped")]
pub struct Interrupted(pub &'static str);

/// The coordinator's exit code after a SIGTERM it answered by finishing
/// the step in flight and committing a checkpoint of it (128 + SIGTERM,
/// the code of a process ended by SIGTERM, so supervisors read it as
/// such; README "Exit codes").
pub const PREEMPTED_EXIT: u8 = 143;

/// The job stopped after a SIGTERM, with a committed checkpoint of its
/// last finished step (or, stopped while the worker set formed, with the
/// checkpoint it was about to start from: no step ran since).
#[derive(Debug, thiserror::Error)]
pub struct Preempted {
    pub step: u64,
    /// None: stopped before the first step of a fresh job; nothing to save.
    pub dir: Option<String>,
}

impl std::fmt::Display for Preempted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.dir {
            Some(dir) => write!(
                f,
                "stopped after SIGTERM with a checkpoint of step {} ({dir}); continue with `coordinator --resume {dir}`",
                self.step
            ),
            None => write!(
                f,
                "stopped after SIGTERM before step {} (no step had run, nothing to save); start the job again with the same command",
                self.step
            ),
        }
    }
}

/// A first SIGTERM came while the worker set formed: no step is in
/// flight, so the driver stops at once with the checkpoint it was to
/// start from ([`Preempted`]).
#[derive(Debug, thiserror::Error)]
#[error("SIGTERM while the worker set formed")]
pub struct PreemptedForming;

/// A checkpoint could not be written or committed (the disk is full, the
/// folder is not writable): the job stops at once (exit 1, not the
/// bad-input 2) with the cause, and the checkpoint before stays the
/// newest.
#[derive(Debug, thiserror::Error)]
#[error("the checkpoint of step {step} was not written: {message}; {kept}")]
pub struct CheckpointFailed {
    pub step: u64,
    pub message: String,
    /// What is left to resume from.
    pub kept: String,
}

/// A replacement joined a job that went on with fewer workers: the
/// driver checkpointed the step just finished and forms the set again
/// from it with everyone present.
#[derive(Debug, thiserror::Error)]
#[error("re-forming the worker set with the workers present")]
pub struct Regrow;

/// The checkpoint a job resumes did not check out: its files were hashed
/// while the workers loaded them, and no step ran from it.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct DamagedStart(pub CheckpointError);
