//! Where an attempt starts, and how the job restarts after a failure.
//!
//! [`RestartPoint`] is the one shape of "where to start from": a fresh
//! start, a resume, an extension and `--init-from` build it in `start.rs`
//! (from a checkpoint, through [`RestartPoint::resume`] and
//! [`RestartPoint::init_from`]); recovery builds it from the newest
//! checkpoint this job committed, or falls back to where the job started.
//!
//! The rules of restarting: a [`RankFailure`] (a rank lost, frozen, too
//! slow, or failed in a step) is recoverable, anything else stops the job;
//! the same repeatable cause at the same step twice in a row stops it
//! (restarting would run into it again), and so does a failure after
//! `cluster.max_restarts` restarts. A job that went on with fewer workers
//! takes a replacement back at a step boundary ([`Driver::grow`]): a
//! checkpoint of that step, then a new formation from it — not a restart.

use std::path::PathBuf;

use anyhow::{Result, bail};
use stride_job::checkpoint::{Checkpoint, HistoryEvent, MetricsSoFar};
use stride_job::sampler::DataCursor;

use super::worker_set::Occasion;
use super::{DamagedStart, Driver, Regrow, Summary};
use crate::resume_check::Replan;

/// Where an attempt starts: the step, the data cursor at that step, what
/// every rank loads first, and the metrics carried over.
#[derive(Debug, Clone, Default)]
pub struct RestartPoint {
    /// The first step to run.
    pub step: u64,
    pub cursor: DataCursor,
    /// None: seeded initialisation.
    pub load: Option<Load>,
    /// Losses so far, the best validation loss, tokens seen.
    pub metrics: MetricsSoFar,
}

/// A checkpoint every rank loads before the first step.
#[derive(Debug, Clone)]
pub struct Load {
    /// Absolute, so that a worker started elsewhere finds it too.
    pub dir: PathBuf,
    /// Only the weights (Strategy B): a fresh optimiser.
    pub weights_only: bool,
    /// The weights hash the checkpoint recorded; the ranks must report it.
    pub weights_hash: String,
}

impl RestartPoint {
    /// Continues the checkpoint's run exactly: its step, data cursor,
    /// weights, optimiser and metrics (a resume, an extension, recovery).
    pub fn resume(ckpt: &Checkpoint) -> std::io::Result<RestartPoint> {
        let st = &ckpt.state;
        Ok(RestartPoint {
            step: st.step,
            cursor: st.data_cursor,
            load: Some(Load {
                dir: std::path::absolute(&ckpt.dir)?,
                weights_only: false,
                weights_hash: st.weights_hash.clone(),
            }),
            metrics: st.metrics.clone(),
        })
    }

    /// Step 0 of a new run from the checkpoint's weights only (Strategy B).
    pub fn init_from(ckpt: &Checkpoint) -> std::io::Result<RestartPoint> {
        Ok(RestartPoint {
            load: Some(Load {
                dir: std::path::absolute(&ckpt.dir)?,
                weights_only: true,
                weights_hash: ckpt.state.weights_hash.clone(),
            }),
            ..RestartPoint::default()
        })
    }
}

/// A failure the job can recover from by restarting from its latest
/// checkpoint: a rank lost, frozen, too slow, or failed in a step.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct RankFailure {
    /// The worker to replace (None: a step timeout with several missing).
    pub worker_id: Option<String>,
    pub message: String,
    /// What failed, without what changes from one attempt to the next
    /// (pids, durations): the same cause at the same step twice in a row
    /// stops the job instead of restarting into it again — when the
    /// failure is `repeatable`.
    pub cause: String,
    /// Whether a restart would run into it again: a step that fails on a
    /// rank, work slower than the step timeout, a collective failing with
    /// every rank alive. A process that died, froze or was replaced is
    /// not (two kills at one step are two accidents, not a pattern).
    pub repeatable: bool,
}

/// The restarts of a job so far.
#[derive(Debug)]
pub struct Restarts {
    /// Where the job started: the restart point while it has committed no
    /// checkpoint (a restart never resumes another run's checkpoint).
    pub initial: RestartPoint,
    pub count: u32,
    /// Every failure, `step N: message`, for the final error.
    failures: Vec<String>,
    /// The step and cause of the failure the last restart recovered from.
    last: Option<(u64, String)>,
}

impl Restarts {
    pub fn new(initial: RestartPoint) -> Restarts {
        Restarts {
            initial,
            count: 0,
            failures: Vec::new(),
            last: None,
        }
    }

    /// Records `failure` at `step`; an error when the job must stop
    /// instead of restarting (the same failure again, or no restarts left).
    fn admit(&mut self, step: u64, failure: &RankFailure, max: u32) -> Result<()> {
        self.failures
            .push(format!("step {step}: {}", failure.message));
        let this = (step, failure.cause.clone());
        if failure.repeatable && self.last.as_ref() == Some(&this) {
            bail!(
                "{failure}\nThe same failure stopped step {step} before the last restart, so restarting would run into it again; stopping the job. Failures:\n  {}",
                self.failures.join("\n  ")
            );
        }
        self.last = Some(this);
        if self.count >= max {
            bail!(
                "{failure}; giving up after {} restart(s) (cluster.max_restarts = {max}). Failures:\n  {}",
                self.count,
                self.failures.join("\n  ")
            );
        }
        self.count += 1;
        Ok(())
    }

    fn last_failure(&self) -> String {
        self.failures.last().cloned().unwrap_or_default()
    }
}

impl Driver {
    /// Runs attempts until one finishes; after a recoverable failure the
    /// job restarts from its latest checkpoint, up to `max_restarts` times.
    pub(super) async fn run_with_restarts(&mut self) -> Result<Summary> {
        loop {
            let err = match self.run_attempt().await {
                Ok(summary) => return Ok(summary),
                Err(e) => e,
            };
            if err.is::<DamagedStart>()
                && let Some(fallback) = self.fallback.take()
            {
                self.fall_back(&err, fallback).await?;
                continue;
            }
            if err.is::<Regrow>() {
                self.regrow().await?;
                continue;
            }
            let Some(failure) = err.downcast_ref::<RankFailure>() else {
                return Err(err);
            };
            let max = self.course.config.cluster.max_restarts;
            self.restarts.admit(self.step, failure, max)?;
            tracing::warn!("{failure}");
            let failed = failure.worker_id.clone();
            self.recover(failed.as_deref()).await?;
            self.occasion = Occasion::Restart;
            tracing::warn!(
                "restart {}/{max}: resuming at step {} with the workers that are present",
                self.restarts.count,
                self.step
            );
        }
    }

    /// The checkpoint a resume of `latest` named did not check out: start
    /// from the one before it instead, with the workers present, as if the
    /// job had been started from it (its step, schedule, history and
    /// marker; nothing of the damaged one was written anywhere).
    async fn fall_back(&mut self, damaged: &anyhow::Error, fallback: Replan) -> Result<()> {
        tracing::warn!("{damaged}; no step ran from it");
        let f = (fallback.0)()?;
        self.workers
            .dismiss(
                None,
                "the checkpoint failed its check; starting from an older one",
            )
            .await?;
        self.step = f.start.step;
        self.metrics = f.start.metrics.clone();
        self.restarts = Restarts::new(f.start.clone());
        self.course.start = f.start;
        self.course.config = f.config;
        self.course.schedule = f.schedule;
        self.course.history = f.history;
        self.course.marker = f.marker;
        if let Some(bar) = &self.bar {
            bar.set_length(self.course.schedule.max_steps());
        }
        Ok(())
    }

    /// A replacement joined a job running short: the step just finished is
    /// committed ([`Driver::grow`]); stop the ranks and form the set again
    /// from that checkpoint with every worker present.
    async fn regrow(&mut self) -> Result<()> {
        let present = self.workers.connected();
        let reason = format!(
            "a replacement joined: re-forming at step {} with the {present} workers present",
            self.step
        );
        tracing::info!("{reason}");
        self.workers.dismiss(None, &reason).await?;
        self.course.start = match self.boundary.checkpoints.newest_valid() {
            Some(ckpt) => RestartPoint::resume(&ckpt)?,
            None => bail!("the checkpoint taken to re-form the worker set does not validate"),
        };
        self.step = self.course.start.step;
        self.course.history.push(HistoryEvent {
            step: self.step,
            event: "grow".into(),
            detail: reason.clone(),
        });
        self.run.write_line(&serde_json::json!({
            "event": "grow",
            "step": self.step,
            "workers": present,
        }))?;
        self.occasion = Occasion::Grow;
        Ok(())
    }

    /// After a failure: stop the surviving ranks' step, drop the failed
    /// worker (restarting it in --local mode), and rewind to the newest
    /// checkpoint this job committed (or to where the job started).
    async fn recover(&mut self, failed: Option<&str>) -> Result<()> {
        let reason = self.restarts.last_failure();
        let span = tracing::info_span!(
            parent: None,
            "restart",
            restart = i64::from(self.restarts.count),
            failed_at_step = self.step as i64,
            reason = %reason,
            resume_step = tracing::field::Empty,
        );
        span.follows_from(&self.job_span);
        self.shared.metrics.restarts.inc();
        self.workers.dismiss(failed, &reason).await?;
        // The checkpoints to restart from were trained on the data as it
        // was: a token file changed under the job (truncated, rewritten,
        // replaced) ends it, naming the file, instead of a restart that
        // would read other samples (or die of SIGBUS reading past its end).
        for f in &self.spec.data_files {
            let now = super::FileStamp::of(&f.path);
            if now.as_ref().ok() != Some(&f.stamp) {
                let now = now.map_or_else(|e| e.to_string(), |s| format!("{} bytes", s.len));
                bail!(
                    "{reason}\nThe token file {} changed while the job ran ({} bytes when it started, {now} now), so the job cannot restart on the data its checkpoints were trained on; restore the file and resume with `--resume …/latest`, or resume on the new data with `--data-changed`",
                    f.path.display(),
                    f.stamp.len
                );
            }
        }
        self.boundary.checkpoints.abandon_in_flight();
        self.course.start = match self.boundary.checkpoints.newest_valid() {
            Some(ckpt) => RestartPoint::resume(&ckpt)?,
            None => self.restarts.initial.clone(),
        };
        self.step = self.course.start.step;
        span.record("resume_step", self.step as i64);
        self.course.history.push(HistoryEvent {
            step: self.step,
            event: "restart".into(),
            detail: reason.clone(),
        });
        self.run.write_line(&serde_json::json!({
            "event": "restart",
            "step": self.step,
            "restart": self.restarts.count,
            "reason": reason,
        }))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(cause: &str, repeatable: bool) -> RankFailure {
        RankFailure {
            worker_id: None,
            message: format!("{cause} at step 25"),
            cause: cause.into(),
            repeatable,
        }
    }

    /// Two kills of a worker at the same step are two accidents: both are
    /// restarted from. The same step failing the same way twice is a
    /// pattern: the second stops the job.
    #[test]
    fn only_a_repeatable_failure_twice_at_one_step_stops_the_job() {
        let mut r = Restarts::new(RestartPoint::default());
        let killed = failure("local-1 exited", false);
        r.admit(25, &killed, 5).expect("first kill");
        r.admit(25, &killed, 5)
            .expect("second kill: another accident");
        let slow = failure("timeout to report the step, all alive: true", true);
        r.admit(25, &slow, 5).expect("first timeout");
        let e = r.admit(25, &slow, 5).expect_err("the same timeout again");
        assert!(
            e.to_string().contains("restarting would run into it again"),
            "{e}"
        );
        assert_eq!(r.count, 3);
        let e = Restarts::new(RestartPoint::default())
            .admit(3, &killed, 0)
            .expect_err("no restarts allowed");
        assert!(
            e.to_string().contains("giving up after 0 restart(s)"),
            "{e}"
        );
    }
}
