//! What a job is and keeps being (`JobSpec`: its name, data and folders),
//! what changes as it runs (`Course`: config, schedule, start, history —
//! changed only by `decay.rs` and `recovery.rs`), and how a finished job
//! went (`Summary`).

use std::path::PathBuf;

use stride_job::checkpoint::HistoryEvent;
use stride_job::config::Config;
use stride_job::schedule::Schedule;
use stride_job::tokens::Fingerprint;

use super::RestartPoint;
use crate::resume_check::StartCheck;

/// What a job is and keeps being, from its start to its end: its name,
/// its data and where it writes. Nothing changes it while the job runs;
/// what does change is its [`Course`].
#[derive(Debug)]
pub struct JobSpec {
    pub name: String,
    /// Samples in the training / validation split.
    pub train_samples: u64,
    pub val_samples: u64,
    /// The fingerprints of the job's data: every worker must read the
    /// same, and every checkpoint records them.
    pub data: Vec<Fingerprint>,
    /// The token files as the coordinator found them: a restart checks
    /// they did not change under the job.
    pub data_files: Vec<DataFile>,
    /// The entropy rate of a synthetic corpus (reported next to losses).
    pub entropy_floor: Option<f64>,
    /// The folder of `step-*` checkpoints, `best` and `latest`.
    pub checkpoint_dir: PathBuf,
    pub run_dir: PathBuf,
}

/// Where a job is going and where its current attempt started: what a
/// decay (`decay.rs`), a recovery or a fallback to an older checkpoint
/// (`recovery.rs`) change as the job runs.
#[derive(Debug)]
pub struct Course {
    /// The config the workers get (a fallback replaces it with its
    /// checkpoint's).
    pub config: Config,
    /// The LR schedule, whose end is the job's `max_steps`: the one source
    /// of the run's length (a decay or an extension changes it;
    /// `config.train.max_steps` only seeded a fresh run's schedule).
    pub schedule: Schedule,
    /// Where the job starts (and, after a restart, where the attempt did).
    pub start: RestartPoint,
    /// Carried over from the checkpoint a run resumes, and added to.
    pub history: Vec<HistoryEvent>,
    /// The line `metrics.jsonl` gets when the first attempt has formed and
    /// its checkpoint checked out (a resume's marker).
    pub marker: Option<serde_json::Value>,
    /// A resume's checkpoint check, if it still runs.
    pub check: Option<StartCheck>,
}

/// A token file and what `stat` said of it when the job started.
#[derive(Debug, Clone, PartialEq)]
pub struct DataFile {
    pub path: PathBuf,
    pub stamp: FileStamp,
}

/// Length, inode and modification time: a file rewritten, replaced or
/// truncated has another stamp.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FileStamp {
    pub len: u64,
    pub inode: u64,
    pub modified: Option<std::time::SystemTime>,
}

impl FileStamp {
    pub fn of(path: &std::path::Path) -> std::io::Result<FileStamp> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path)?;
        Ok(FileStamp {
            len: m.len(),
            inode: m.ino(),
            modified: m.modified().ok(),
        })
    }
}

/// How a finished job went.
#[derive(Debug, Clone)]
pub struct Summary {
    pub steps: u64,
    pub final_loss: f64,
    pub final_val_loss: Option<f64>,
    pub tokens: u64,
    pub wall_s: f64,
}
