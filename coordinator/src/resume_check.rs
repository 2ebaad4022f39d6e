//! A resume's checkpoint check, in one place. A resume hashes its
//! checkpoint's two large files (`model.safetensors`,
//! `optimizer.safetensors`) while the workers load them, instead of before
//! they start (16 s for GPT-2 small's 1.5 GB on one core):
//!
//! 1. `start.rs` resolves the start with `Sums::Later`, leaving those files
//!    in `StartPoint::unverified` (a dry run, or a start refused for any
//!    reason, hashes them first);
//! 2. [`start_check`] (here) starts the hashing on a blocking thread and,
//!    for a resume of `latest` or of a folder, prepares the [`Replan`]: the
//!    start resolved again with the files hashed first, which falls back
//!    to the checkpoint before a damaged one;
//! 3. the worker set (`driver/worker_set/`) watches the [`Check`] while it
//!    forms and the ranks load ([`verdict`] turns its end into a result),
//!    and holds the first step until it has come;
//! 4. the driver (`driver/recovery.rs`, `fall_back`) runs the `Replan` if
//!    the files do not check out, or fails the job with the checksum error
//!    for an explicit checkpoint.
//!
//! Nothing trains from unverified state: the first step waits for the
//! verdict, and a damaged file's bytes never reach a step, a metrics line
//! or a checkpoint.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Result, anyhow};
use stride_job::checkpoint::{CheckpointError, HistoryEvent, Sums};
use stride_job::config::Config;
use stride_job::schedule::Schedule;
use stride_job::test_hooks::{self, Hook};
use stride_job::tokens::Fingerprint;
use tokio::task::JoinHandle;

use crate::driver::{DamagedStart, RestartPoint};
use crate::train::resumed_data;
use crate::{RunArgs, refused, start};

/// The hashing of a resume's checkpoint files, running on a blocking
/// thread.
pub type Check = JoinHandle<Result<(), CheckpointError>>;

/// How the [`Check`] ended, as the job sees it: Ok when the files match
/// their sha256, a [`DamagedStart`] when they do not.
pub fn verdict(v: Result<Result<(), CheckpointError>, tokio::task::JoinError>) -> Result<()> {
    match v {
        Ok(Ok(())) => {
            tracing::info!("the checkpoint's files match their sha256");
            Ok(())
        }
        Ok(Err(e)) => Err(DamagedStart(e).into()),
        Err(e) => Err(anyhow!("the checkpoint check stopped: {e}")),
    }
}

/// Where a resume of `latest` (or of a folder) starts instead when its
/// checkpoint does not check out: the start resolved again, hashing first.
#[derive(Debug)]
pub struct Fallback {
    /// The same as the job's but for `train.max_steps` (checked).
    pub config: Config,
    pub schedule: Schedule,
    pub start: RestartPoint,
    pub history: Vec<HistoryEvent>,
    pub marker: Option<serde_json::Value>,
}

/// Resolves the start again (see [`Fallback`]).
pub struct Replan(pub Box<dyn FnOnce() -> Result<Fallback> + Send>);

impl std::fmt::Debug for Replan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Replan")
    }
}

/// A resume's checkpoint files being hashed while the workers load them.
#[derive(Debug)]
pub struct StartCheck {
    pub check: Check,
    /// Where to start instead if they do not check out; None (an explicit
    /// checkpoint): the job fails with the checksum error.
    pub fallback: Option<Replan>,
}

/// A resume hashes its checkpoint's two large files while the workers load
/// them (a dry run, or a start refused for any reason, hashes them first).
/// The first step waits for the verdict; a damaged `latest` then starts from the
/// checkpoint before it, found by resolving the start again with the files
/// hashed first.
pub fn start_check(
    args: &RunArgs,
    sp: &start::StartPoint,
    data: Arc<std::sync::OnceLock<Vec<Fingerprint>>>,
) -> Option<StartCheck> {
    if sp.unverified.is_empty() {
        return None;
    }
    let unverified = sp.unverified.clone();
    // A test that must see the ranks load before the hashing ends.
    let delay = test_hooks::seconds(Hook::DelayCheckS);
    let check = tokio::task::spawn_blocking(move || {
        if let Some(s) = delay {
            std::thread::sleep(Duration::from_secs_f64(s));
        }
        unverified.verify()
    });
    let fallback = sp.falls_back.then(|| {
        let (args, first) = (args.clone(), comparable(&sp.config));
        let (name, run_dir) = (sp.name.clone(), sp.run_dir.clone());
        Replan(Box::new(move || {
            let sp = start::start(&args.request(Sums::Now))?;
            for w in &sp.warnings {
                tracing::warn!("{w}");
            }
            if sp.name != name || sp.run_dir != run_dir || comparable(&sp.config) != first {
                let dir = sp.from.load.as_ref().map(|l| l.dir.display().to_string());
                let dir = dir.unwrap_or_default();
                return Err(refused::Refused(format!(
                    "the checkpoint {dir} falls back to was written with another config or run directory than the one the workers were started with; resume it explicitly: --resume {dir}"
                ))
                .into());
            }
            for n in &sp.notes {
                tracing::info!("{n}");
            }
            let (mut from, mut history, mut marker) = (sp.from, sp.history, sp.marker);
            // The older checkpoint's data is judged as the first one's was.
            if let Some(now) = data.get()
                && let Some(change) = resumed_data(&sp.data, now, args.data_changed)?
            {
                tracing::warn!("{change}");
                change.apply(&mut from, &mut history, &mut marker);
            }
            Ok(Fallback {
                config: sp.config,
                schedule: sp.schedule,
                start: from,
                history,
                marker,
            })
        }) as Box<dyn FnOnce() -> Result<Fallback> + Send>)
    });
    Some(StartCheck { check, fallback })
}

/// A config as the workers see it, but for `train.max_steps`, which only
/// seeds a fresh run's schedule (checkpoints written before 2026-12-05
/// recorded an extension's length there).
fn comparable(config: &Config) -> String {
    let mut c = config.clone();
    c.train.max_steps = 0;
    c.to_toml()
}
