//! The job driver: forms the worker set, then runs the training loop top to
//! bottom — for each step the LR from the schedule, the global batch from
//! the sampler, one plan per rank, the reports back, the metrics line, and
//! evaluation when due.
//!
//! The driver alone advances the global step. It never sees a tensor: ranks
//! report scalars and hashes. Every failure it reports names the rank, its
//! host and pid, and the step.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};
use indicatif::ProgressBar;
use stride_job::checkpoint::{self, HistoryEvent, MetricsSoFar, RngState, TrainState};
use stride_job::config::Config;
use stride_job::sampler::{DataCursor, Sampler, eval_samples, shard, shard_uneven};
use stride_job::schedule::{Cooldown, Schedule};
use stride_proto::v1::{
    Abort, Assignment, CheckpointPlan, CheckpointReport, CollectiveBootstrap, CoordinatorMessage,
    DecayResponse, EvalPlan, PeerAddress, RankStatus, Shutdown, StepPlan, coordinator_message,
    worker_message,
};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::time::Instant as TokioInstant;

use crate::local::LocalWorkers;
use crate::output::{MetricsRecord, RunDir, STEP_TARGET};
use crate::server::{Event, Outbound, Shared, WorkerInfo};
use stride_proto::exit;

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
/// last finished step.
#[derive(Debug, thiserror::Error)]
#[error(
    "stopped after SIGTERM with a checkpoint of step {step} ({dir}); continue with `coordinator --resume {dir}`"
)]
pub struct Preempted {
    pub step: u64,
    pub dir: String,
}

/// Tells a worker to exit with `exit_code` (the worker exit-code contract,
/// `stride_proto::exit`); a worker already gone needs no telling.
async fn stop_worker(outbound: &Outbound, reason: &str, exit_code: i32) {
    let _ = outbound
        .send(Ok(message(coordinator_message::Body::Shutdown(Shutdown {
            reason: reason.into(),
            exit_code,
        }))))
        .await;
}

/// The segment in force at `step`, for `coordinator status`; notes a
/// decay that was requested while the job ran.
fn describe_segment(schedule: &Schedule, step: u64, history: &[HistoryEvent]) -> String {
    let Some(seg) = schedule.segment_at(step) else {
        return String::new();
    };
    let mut text = format!(
        "{} from step {} to {} (lr {:.3e} → {:.3e})",
        seg.kind.name(),
        seg.start_step,
        seg.end_step,
        seg.start_lr,
        seg.end_lr
    );
    if history
        .iter()
        .any(|h| h.event == "decay" && h.step == seg.start_step)
    {
        text.push_str(&format!(", decay requested at step {}", seg.start_step));
    }
    text
}

/// A decay request waiting for the next step boundary: steps of cooldown,
/// its shape, and where to answer.
type DecayRequestPending = (
    u64,
    Cooldown,
    tokio::sync::oneshot::Sender<Result<DecayResponse, tonic::Status>>,
);

/// Upper bound on the collective id rank 0 may send (NCCL's is 128 bytes).
const MAX_COLLECTIVE_ID_BYTES: usize = 1024;

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
    /// stops the job instead of restarting into it again.
    pub cause: String,
}

/// Everything the driver needs to run a job.
#[derive(Debug)]
pub struct JobSpec {
    pub name: String,
    pub config: Config,
    pub schedule: Schedule,
    /// Samples in the training / validation split.
    pub train_samples: u64,
    pub val_samples: u64,
    /// The coordinator's own token splits: every worker must read the same.
    pub data: Vec<DataSplitSpec>,
    /// First step to run, and the data cursor at that step.
    pub start_step: u64,
    pub cursor: DataCursor,
    /// The entropy rate of a synthetic corpus (reported next to losses).
    pub entropy_floor: Option<f64>,
    /// The folder of `step-*` checkpoints, `best` and `latest`.
    pub checkpoint_dir: PathBuf,
    pub run_dir: PathBuf,
    /// A checkpoint every worker loads before step `start_step`, and
    /// whether only its weights are used (Strategy B).
    pub load: Option<(PathBuf, bool)>,
    /// The weights hash the loaded checkpoint recorded (checked against
    /// what the ranks report).
    pub expected_weights_hash: Option<String>,
    /// Carried over from the checkpoint a run resumes.
    pub metrics_so_far: MetricsSoFar,
    pub history: Vec<HistoryEvent>,
}

/// One token split as the coordinator opened it.
#[derive(Debug, Clone)]
pub struct DataSplitSpec {
    /// "train" or "val".
    pub split: &'static str,
    pub name: String,
    pub tokens: u64,
    pub checksum: u64,
}

/// A checkpoint planned at a step boundary whose files are being written.
#[derive(Debug)]
struct Pending {
    tmp: PathBuf,
    state: TrainState,
    best: bool,
    planned: Instant,
    /// Open from the plan to the commit.
    span: tracing::Span,
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

/// A worker that holds a rank.
#[derive(Debug)]
struct Rank {
    worker_id: String,
    info: WorkerInfo,
    outbound: Outbound,
    last_step: u64,
    last_step_s: f64,
}

impl Rank {
    fn describe(&self, rank: usize) -> String {
        format!("rank {rank} ({}, pid {})", self.info.host, self.info.pid)
    }
}

#[derive(Debug)]
pub struct Driver {
    spec: JobSpec,
    events: UnboundedReceiver<Event>,
    shared: Arc<Shared>,
    local: Option<LocalWorkers>,
    run: RunDir,
    bar: Option<ProgressBar>,
    ranks: Vec<Rank>,
    by_id: HashMap<String, usize>,
    generation: u64,
    step: u64,
    pending: BTreeMap<u64, Pending>,
    last_weights_hash: Vec<u8>,
    /// Connected workers without a rank (survivors of a failure, newcomers).
    pool: Vec<(String, WorkerInfo, Outbound)>,
    /// When each worker was last heard from.
    last_seen: HashMap<String, Instant>,
    /// Each worker's micro-batch count (from heartbeats) and when it last
    /// grew.
    progress: HashMap<String, (u64, Instant)>,
    /// The step and cause of the failure the last restart recovered from.
    last_failure: Option<(u64, String)>,
    /// A rank's collective failed with a peer (a symptom): when it came,
    /// and what to report if no rank is found dead or frozen in time.
    symptom: Option<(Instant, String)>,
    /// A first SIGTERM came: stop after the step in flight, with a
    /// checkpoint of it.
    preempt: bool,
    /// A `coordinator decay` request, applied at the next step boundary.
    decay_request: Option<DecayRequestPending>,
    /// Checkpoints this job committed, oldest first (a restart resumes from
    /// the newest of these, never from another run's checkpoint).
    committed: Vec<PathBuf>,
    /// Where the job started (the restart point when nothing was committed).
    initial: (
        u64,
        DataCursor,
        Option<(PathBuf, bool)>,
        Option<String>,
        MetricsSoFar,
    ),
    restarts: u32,
    failures: Vec<String>,
    /// Root of the job's trace; steps, formations and restarts link to it.
    job_span: tracing::Span,
}

/// What waiting for an event can produce besides an event.
enum Wait {
    Event(Event),
    TimedOut,
}

/// How long the driver waits for ranks to answer.
#[derive(Debug, Clone, Copy)]
enum Patience {
    /// Until a fixed instant (forming the worker set, the last checkpoint
    /// writes).
    Until(TokioInstant),
    /// Until `limit` has passed without progress: since `since`, or since
    /// an awaited rank last finished a micro-batch (its heartbeats count
    /// them). Steps and evaluations: a long evaluation that progresses is
    /// never taken for a dead rank.
    Idle { since: Instant, limit: Duration },
}

impl Driver {
    pub fn new(
        spec: JobSpec,
        events: UnboundedReceiver<Event>,
        shared: Arc<Shared>,
        local: Option<LocalWorkers>,
        run: RunDir,
        bar: Option<ProgressBar>,
    ) -> Driver {
        let step = spec.start_step;
        let initial = (
            spec.start_step,
            spec.cursor,
            spec.load.clone(),
            spec.expected_weights_hash.clone(),
            spec.metrics_so_far.clone(),
        );
        let job_span = tracing::info_span!(
            parent: None,
            "job",
            job = %spec.name,
            start_step = spec.start_step as i64,
            max_steps = spec.schedule.max_steps() as i64,
            workers = spec.config.cluster.workers as i64,
        );
        Driver {
            job_span,
            pool: Vec::new(),
            last_seen: HashMap::new(),
            progress: HashMap::new(),
            last_failure: None,
            symptom: None,
            preempt: false,
            decay_request: None,
            committed: Vec::new(),
            initial,
            restarts: 0,
            failures: Vec::new(),
            spec,
            events,
            shared,
            local,
            run,
            bar,
            ranks: Vec::new(),
            by_id: HashMap::new(),
            generation: 0,
            step,
            pending: BTreeMap::new(),
            last_weights_hash: Vec::new(),
        }
    }

    /// Runs the job to its end. Whatever happens, the workers are told to
    /// stop and local worker processes are reaped before this returns.
    pub async fn run(&mut self) -> Result<Summary> {
        // Test hook, in debug builds only: STRIDE_TEST_STALL_DRIVER_S=N
        // holds the driver loop for N seconds, so a test can watch the
        // health service notice.
        if cfg!(debug_assertions)
            && let Some(s) = std::env::var("STRIDE_TEST_STALL_DRIVER_S")
                .ok()
                .and_then(|v| v.parse::<f64>().ok())
                .filter(|s| s.is_finite() && *s >= 0.0 && *s <= 3600.0)
        {
            tokio::time::sleep(Duration::from_secs_f64(s)).await;
        }
        let result = self.run_with_restarts().await;
        if result.is_err() && !self.pending.is_empty() {
            // Stopped (a second SIGTERM, a failure) while a checkpoint was
            // being written: let it finish, within checkpoint.write_timeout_s.
            tracing::info!(
                "finishing {} checkpoint(s) in flight before stopping",
                self.pending.len()
            );
            match self.finish_checkpoints().await {
                Ok(()) => {}
                Err(e) => tracing::warn!(
                    "a checkpoint in flight was not committed ({e:#}); it is left incomplete and will never be loaded"
                ),
            }
        }
        // The worker exit-code contract (README, "Exit codes"): 0 done;
        // 3 stopped by a signal to the coordinator (a replacement may join
        // the coordinator that is started again); 4 the job failed
        // (Kubernetes must not retry: the pod failure policy fails the Job).
        let (reason, code) = match &result {
            Ok(_) => ("training finished".to_string(), exit::DONE),
            Err(e)
                if e.chain()
                    .any(|c| c.is::<Interrupted>() || c.is::<Preempted>()) =>
            {
                (format!("the coordinator stopped: {e:#}"), exit::REMOVED)
            }
            Err(e) => (format!("the job failed: {e:#}"), exit::JOB_FAILED),
        };
        for outbound in self
            .ranks
            .iter()
            .map(|r| &r.outbound)
            .chain(self.pool.iter().map(|p| &p.2))
        {
            stop_worker(outbound, &reason, code).await;
        }
        if let Some(local) = &mut self.local {
            // Local workers got Shutdown; one still there after a
            // heartbeat timeout is not going to leave by itself.
            local
                .stop(Duration::from_secs_f64(
                    self.spec.config.cluster.heartbeat_timeout_s,
                ))
                .await;
        }
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        result
    }

    /// The next event, or `TimedOut` at `deadline`. Wakes at least every
    /// heartbeat interval to mark the driver loop alive (the health service
    /// reads it).
    async fn next_event(&mut self, deadline: TokioInstant) -> Result<Wait> {
        let every = Duration::from_secs_f64(self.spec.config.cluster.heartbeat_interval_s);
        loop {
            self.shared.driver_tick();
            let wake = deadline.min(TokioInstant::now() + every);
            match self.next_event_until(wake).await? {
                Wait::TimedOut if TokioInstant::now() < deadline => continue,
                other => return Ok(other),
            }
        }
    }

    async fn next_event_until(&mut self, deadline: TokioInstant) -> Result<Wait> {
        let local = self.local.as_mut();
        tokio::select! {
            ev = self.events.recv() => ev.map(Wait::Event).ok_or_else(|| anyhow!("the gRPC service stopped")),
            (slot, status) = async move {
                match local {
                    Some(l) => l.exited().await,
                    None => std::future::pending().await,
                }
            } => {
                let identity = format!("local-{slot}");
                let rank = self.ranks.iter().position(|r| r.info.identity == identity);
                let who = rank
                    .map(|r| self.ranks[r].describe(r))
                    .unwrap_or_else(|| format!("local worker {slot}"));
                let worker_id = rank
                    .map(|r| self.ranks[r].worker_id.clone())
                    .or_else(|| self.pool.iter().find(|p| p.1.identity == identity).map(|p| p.0.clone()));
                Err(RankFailure {
                    worker_id,
                    message: format!("{who} lost at step {}: the process exited ({status})", self.step),
                    cause: format!("{identity} exited"),
                }
                .into())
            }
            _ = tokio::time::sleep_until(deadline) => Ok(Wait::TimedOut),
        }
    }

    /// Runs attempts until one finishes; after a recoverable failure the
    /// job restarts from its latest checkpoint, up to `max_restarts` times.
    async fn run_with_restarts(&mut self) -> Result<Summary> {
        loop {
            let err = match self.run_inner().await {
                Ok(summary) => return Ok(summary),
                Err(e) => e,
            };
            let Some(failure) = err.downcast_ref::<RankFailure>() else {
                return Err(err);
            };
            let max = self.spec.config.cluster.max_restarts;
            self.failures
                .push(format!("step {}: {}", self.step, failure.message));
            let this = (self.step, failure.cause.clone());
            if self.last_failure.as_ref() == Some(&this) {
                bail!(
                    "{failure}\nThe same failure stopped step {} before the last restart, so restarting would run into it again; stopping the job. Failures:\n  {}",
                    self.step,
                    self.failures.join("\n  ")
                );
            }
            self.last_failure = Some(this);
            if self.restarts >= max {
                bail!(
                    "{failure}; giving up after {} restart(s) (cluster.max_restarts = {max}). Failures:\n  {}",
                    self.restarts,
                    self.failures.join("\n  ")
                );
            }
            self.restarts += 1;
            tracing::warn!("{failure}");
            let failed = failure.worker_id.clone();
            self.recover(failed).await?;
            tracing::warn!(
                "restart {}/{max}: resuming at step {} with the workers that are present",
                self.restarts,
                self.step
            );
        }
    }

    /// After a failure: stop the surviving ranks' step, drop the failed
    /// worker (restarting it in --local mode), and rewind to the newest
    /// checkpoint this job committed (or to where the job started).
    async fn recover(&mut self, failed: Option<String>) -> Result<()> {
        let generation = self.generation;
        let reason = self.failures.last().cloned().unwrap_or_default();
        let span = tracing::info_span!(
            parent: None,
            "restart",
            restart = i64::from(self.restarts),
            failed_at_step = self.step as i64,
            reason = %reason,
            resume_step = tracing::field::Empty,
        );
        span.follows_from(&self.job_span);
        self.shared.metrics.restarts.inc();
        let ranks = std::mem::take(&mut self.ranks);
        self.by_id.clear();
        for r in ranks {
            let dead = failed.as_ref() == Some(&r.worker_id);
            let abort = if dead {
                coordinator_message::Body::Shutdown(Shutdown {
                    reason: "removed from the job after a failure; a replacement may join".into(),
                    exit_code: exit::REMOVED,
                })
            } else {
                coordinator_message::Body::Abort(Abort {
                    generation,
                    reason: reason.clone(),
                })
            };
            let _ = r.outbound.send(Ok(message(abort))).await;
            if dead {
                if let Some(slot) = r
                    .info
                    .identity
                    .strip_prefix("local-")
                    .and_then(|s| s.parse().ok())
                    && let Some(local) = &mut self.local
                {
                    local.restart(slot).await?;
                    tracing::info!("restarted local worker {slot}");
                }
            } else {
                self.pool.push((r.worker_id, r.info, r.outbound));
            }
        }
        if let Some(id) = &failed {
            self.pool.retain(|p| &p.0 != id);
        }
        self.pending.clear();
        self.symptom = None;
        let newest = self
            .committed
            .iter()
            .rev()
            .find_map(|d| checkpoint::validate(d).ok());
        match newest {
            Some(ckpt) => {
                let st = &ckpt.state;
                self.spec.start_step = st.step;
                self.spec.cursor = st.data_cursor;
                self.spec.load = Some((ckpt.dir.clone(), false));
                self.spec.expected_weights_hash = Some(st.weights_hash.clone());
                self.spec.metrics_so_far = st.metrics.clone();
            }
            None => {
                let (step, cursor, load, hash, metrics) = self.initial.clone();
                self.spec.start_step = step;
                self.spec.cursor = cursor;
                self.spec.load = load;
                self.spec.expected_weights_hash = hash;
                self.spec.metrics_so_far = metrics;
            }
        }
        self.step = self.spec.start_step;
        span.record("resume_step", self.step as i64);
        self.spec.history.push(HistoryEvent {
            step: self.step,
            event: "restart".into(),
            detail: reason.clone(),
        });
        self.run.write_line(&serde_json::json!({
            "event": "restart",
            "step": self.step,
            "restart": self.restarts,
            "reason": reason,
        }))?;
        Ok(())
    }

    async fn run_inner(&mut self) -> Result<Summary> {
        let c = self.spec.config.clone();
        self.symptom = None;
        self.form_world().await?;
        let world = self.ranks.len();
        let accumulation = c.accumulation_for(world)?;
        tracing::info!(
            "{} workers: global batch {} = {} × micro-batch {} × accumulation {}",
            world,
            c.train.global_batch,
            world,
            c.train.micro_batch,
            accumulation
        );

        let mut sampler = Sampler::new(self.spec.train_samples, c.train.seed, self.spec.cursor)?;
        let eval_set = eval_samples(
            self.spec.val_samples,
            c.train.eval_batches,
            c.train.global_batch,
        );
        let mut max_steps = self.spec.schedule.max_steps();
        let tokens_per_step = (c.train.global_batch * c.model.context) as u64;
        let started = Instant::now();
        let mut tokens = self.spec.metrics_so_far.tokens;
        let run_start_tokens = tokens;
        let mut last = Summary {
            steps: 0,
            final_loss: f64::NAN,
            final_val_loss: None,
            tokens: 0,
            wall_s: 0.0,
        };
        if let Some(bar) = &self.bar {
            bar.set_position(self.step);
        }

        while self.step < max_steps {
            if let Some((over, shape, reply)) = self.decay_request.take() {
                let _ = reply.send(self.apply_decay(over, shape));
                max_steps = self.spec.schedule.max_steps();
                if let Some(bar) = &self.bar {
                    bar.set_length(max_steps);
                }
            }
            let step = self.step;
            let lr = self.spec.schedule.lr_at(step);
            let batch = sampler.next_batch(c.train.global_batch);
            let step_start = Instant::now();
            // Each step is a trace of its own (linked to the job's), so a
            // long run is many small traces rather than one unbounded one.
            let span = tracing::info_span!(
                parent: None,
                "step",
                step = step as i64,
                lr,
                epoch = batch.epoch as i64,
                generation = self.generation as i64,
                world_size = world as i64,
                loss = tracing::field::Empty,
                grad_norm = tracing::field::Empty,
                val_loss = tracing::field::Empty,
            );
            span.follows_from(&self.job_span);
            let trace_context = stride_telemetry::carrier(&span);
            for rank in 0..world {
                let plan = StepPlan {
                    generation: self.generation,
                    step,
                    lr,
                    samples: shard(&batch.samples, world, rank).to_vec(),
                    epoch: batch.epoch,
                    trace_context: trace_context.clone(),
                };
                self.send(rank, coordinator_message::Body::Step(plan))
                    .await?;
            }
            let reports = self.collect_step(step).await?;
            let step_s = step_start.elapsed().as_secs_f64();
            tokens += tokens_per_step;

            let first_hash = &reports[0].weights_hash;
            if let Some(bad) = reports.iter().position(|r| &r.weights_hash != first_hash) {
                bail!(
                    "{} holds different weights from rank 0 after step {step}: data parallelism is broken (different binaries or hardware?)",
                    self.ranks[bad].describe(bad)
                );
            }
            let loss = reports.iter().map(|r| r.loss).sum::<f64>() / world as f64;
            let grad_norm = reports[0].grad_norm;
            span.record("loss", loss);
            span.record("grad_norm", grad_norm);
            for (rank, rep) in reports.iter().enumerate() {
                self.ranks[rank].last_step = step;
                self.ranks[rank].last_step_s = rep.total_s;
            }
            self.step = step + 1;

            // After a SIGTERM only the final evaluation still runs: the
            // grace period is for the checkpoint.
            let due = c.train.eval_interval > 0
                && self.step.is_multiple_of(c.train.eval_interval)
                && !self.preempt;
            let val_loss = if (due || self.step == max_steps) && !eval_set.is_empty() {
                Some(self.evaluate(step, &eval_set, &span).await?)
            } else {
                None
            };

            let record = MetricsRecord {
                step,
                loss,
                val_loss,
                lr,
                grad_norm,
                tokens_per_s: tokens_per_step as f64 / step_s,
                epoch: batch.epoch,
                tokens,
                step_s,
                workers: world,
                elapsed_s: started.elapsed().as_secs_f64(),
                weights_hash: stride_job::config::hex(first_hash),
                samples_digest: samples_digest(&batch.samples),
            };
            self.run.write_metrics(&record)?;
            if let Some(v) = val_loss {
                span.record("val_loss", v);
            }
            tracing::info!(
                target: STEP_TARGET,
                "step {step:>6}/{max_steps} | loss {loss:.4} | lr {lr:.3e} | grad norm {grad_norm:.3} | {:.0} tok/s | epoch {}",
                record.tokens_per_s,
                batch.epoch
            );
            self.last_weights_hash = first_hash.clone();
            let so_far = &mut self.spec.metrics_so_far;
            so_far.last_loss = Some(loss);
            so_far.tokens = tokens;
            let mut improved = false;
            if let Some(v) = val_loss {
                so_far.val_history.push((step, v));
                if so_far.best_val_loss.is_none_or(|b| v < b) {
                    so_far.best_val_loss = Some(v);
                    so_far.best_step = Some(self.step);
                    improved = true;
                }
            }
            let interval = c.checkpoint.interval;
            let preempted = self.preempt && self.step < max_steps;
            if (interval > 0 && self.step.is_multiple_of(interval))
                || self.step == max_steps
                || improved
                || preempted
            {
                self.plan_checkpoint(improved, sampler.cursor(), &span)
                    .await?;
            }
            if let Some(v) = val_loss {
                let floor = self
                    .spec
                    .entropy_floor
                    .map(|f| format!(" (entropy floor {f:.4})"))
                    .unwrap_or_default();
                tracing::info!("step {step:>6}: val loss {v:.4}{floor}");
                last.final_val_loss = Some(v);
            }
            if let Some(bar) = &self.bar {
                bar.set_position(self.step);
                bar.set_message(format!("loss {loss:.4}  lr {lr:.2e}"));
            }
            self.publish(&record, tokens_per_step, started, max_steps);
            last.final_loss = loss;
            if preempted {
                self.finish_checkpoints().await?;
                let dir = self
                    .committed
                    .last()
                    .map(|d| d.display().to_string())
                    .unwrap_or_default();
                self.spec.history.push(HistoryEvent {
                    step: self.step,
                    event: "preempted".into(),
                    detail: format!("SIGTERM; checkpoint {dir}"),
                });
                self.run.write_line(&serde_json::json!({
                    "event": "preempted",
                    "step": self.step,
                    "checkpoint": dir,
                }))?;
                return Err(Preempted {
                    step: self.step,
                    dir,
                }
                .into());
            }
        }
        self.finish_checkpoints().await?;
        last.steps = self.step - self.spec.start_step;
        last.tokens = tokens - run_start_tokens;
        last.wall_s = started.elapsed().as_secs_f64();
        Ok(last)
    }

    /// Waits for `workers` workers, gives them ranks and the job, and checks
    /// that they built the same model.
    async fn form_world(&mut self) -> Result<()> {
        let c = self.spec.config.clone();
        let want = c.cluster.workers;
        let startup = Duration::from_secs_f64(c.cluster.startup_timeout_s);
        let deadline = TokioInstant::now() + startup;
        let mut joined: Vec<(String, WorkerInfo, Outbound)> = std::mem::take(&mut self.pool);
        while joined.len() < want {
            match self.next_event(deadline).await? {
                Wait::TimedOut => {
                    // After a failure, continue with fewer workers if the
                    // global batch divides among them (cluster.min_workers).
                    let usable = (c.cluster.min_workers..=joined.len())
                        .rev()
                        .find(|n| c.accumulation_for(*n).is_ok());
                    if self.restarts > 0
                        && let Some(n) = usable
                    {
                        tracing::warn!("continuing with {n} of {want} workers");
                        joined.sort_by_key(|(_, info, _)| natural_key(&info.identity));
                        self.pool = joined.split_off(n);
                        break;
                    }
                    let present = joined.len();
                    // Kept, so that the job's end tells them to stop
                    // (dropping them would look like a lost coordinator,
                    // and they would try to reconnect).
                    self.pool = joined;
                    bail!(
                        "only {present} of {want} workers joined within cluster.startup_timeout_s = {}s; start more `worker --connect` processes or pass --workers {}",
                        c.cluster.startup_timeout_s,
                        present.max(1)
                    )
                }
                Wait::Event(Event::Joined {
                    worker_id,
                    info,
                    outbound,
                }) => {
                    // A newer worker of the same identity replaces the
                    // older one (Kubernetes restarted that index's pod).
                    if let Some(at) = joined
                        .iter()
                        .position(|(_, i, _)| i.identity == info.identity)
                    {
                        let (_, old, old_outbound) = joined.remove(at);
                        tracing::warn!(
                            "worker {} (pid {}) replaced by a newer one of the same identity (pid {})",
                            old.identity,
                            old.pid,
                            info.pid
                        );
                        stop_worker(
                            &old_outbound,
                            "replaced by a newer worker with the same identity",
                            exit::REMOVED,
                        )
                        .await;
                    }
                    tracing::info!(
                        "worker {} joined ({}, pid {}, {})",
                        info.identity,
                        info.host,
                        info.pid,
                        info.device
                    );
                    self.last_seen.insert(worker_id.clone(), Instant::now());
                    joined.push((worker_id, info, outbound));
                }
                Wait::Event(Event::Left { worker_id, reason }) => {
                    joined.retain(|(id, _, _)| *id != worker_id);
                    tracing::warn!("a worker left before the job started: {reason}");
                }
                Wait::Event(Event::Interrupted(sig)) => return Err(Interrupted(sig).into()),
                // No step is in flight while the worker set forms: nothing
                // newer than the last checkpoint to save.
                Wait::Event(Event::Preempt) => return Err(Interrupted("SIGTERM").into()),
                Wait::Event(Event::Decay { over, shape, reply }) => {
                    self.take_decay_request(over, shape, reply)
                }
                Wait::Event(Event::Message { .. }) => {}
            }
        }
        // Stable ranks: by identity (local-0, local-1, …, or pod index), in
        // natural order; ties keep join order.
        joined.sort_by_key(|(_, info, _)| natural_key(&info.identity));
        self.generation += 1;
        let span = tracing::info_span!(
            parent: None,
            "form_world",
            generation = self.generation as i64,
            world_size = joined.len() as i64,
            start_step = self.step as i64,
            load = %self.spec.load.as_ref().map(|(d, _)| d.display().to_string()).unwrap_or_default(),
        );
        span.follows_from(&self.job_span);
        let trace_context = stride_telemetry::carrier(&span);
        // Ranks are numbered afresh: no series of a rank that is gone.
        self.shared.metrics.rank_step_seconds.clear();
        self.shared
            .metrics
            .world_size
            .set(i64::try_from(joined.len()).unwrap_or(i64::MAX));
        let peers: Vec<PeerAddress> = joined
            .iter()
            .map(|(_, info, _)| PeerAddress {
                host: info.collective_host.clone(),
                port: u32::from(info.collective_port),
            })
            .collect();
        let world = joined.len();
        let accumulation = c.accumulation_for(world)?;
        self.ranks = joined
            .into_iter()
            .map(|(worker_id, info, outbound)| Rank {
                worker_id,
                info,
                outbound,
                last_step: 0,
                last_step_s: 0.0,
            })
            .collect();
        self.by_id = self
            .ranks
            .iter()
            .enumerate()
            .map(|(i, r)| (r.worker_id.clone(), i))
            .collect();
        let config_toml = c.to_toml();
        for rank in 0..world {
            let a = Assignment {
                rank: rank as u32,
                world_size: world as u32,
                generation: self.generation,
                config_toml: config_toml.clone(),
                peers: peers.clone(),
                accumulation: accumulation as u32,
                load_checkpoint: self
                    .spec
                    .load
                    .as_ref()
                    .map(|(d, _)| d.display().to_string())
                    .unwrap_or_default(),
                weights_only: self.spec.load.as_ref().is_some_and(|(_, w)| *w),
                trace_context: trace_context.clone(),
            };
            self.send(rank, coordinator_message::Body::Assignment(a))
                .await?;
        }

        // The collective is formed from one id that rank 0 makes (NCCL's
        // unique id, a nonce for the TCP ring): the coordinator hands it to
        // every rank, so no shared file or extra rendezvous is needed.
        let unique_id = loop {
            let Some((rank, body)) = self
                .next_rank_message(Patience::Until(deadline), "to start the collective", &[0])
                .await?
            else {
                continue;
            };
            if let worker_message::Body::Bootstrap(b) = body
                && rank == 0
                && b.generation == self.generation
            {
                break b.unique_id;
            }
        };
        if unique_id.is_empty() || unique_id.len() > MAX_COLLECTIVE_ID_BYTES {
            bail!(
                "rank 0 sent a collective id of {} bytes (expected 1..={MAX_COLLECTIVE_ID_BYTES}): are all workers the same Stride build?",
                unique_id.len()
            );
        }
        for rank in 0..world {
            self.send(
                rank,
                coordinator_message::Body::Bootstrap(CollectiveBootstrap {
                    generation: self.generation,
                    unique_id: unique_id.clone(),
                }),
            )
            .await?;
        }

        // Every rank must report the same parameter layout and initial weights.
        let ready = self
            .gather(
                Patience::Until(deadline),
                "to build its model",
                |generation, body| match body {
                    worker_message::Body::Ready(r) if r.generation == generation => {
                        Some((r.parameter_layout_hash, r.weights_hash, r.data))
                    }
                    _ => None,
                },
            )
            .await?;
        for (rank, r) in ready.iter().enumerate() {
            self.check_data(rank, &r.2)?;
        }
        let first = ready[0].clone();
        for (rank, r) in ready.iter().enumerate().skip(1) {
            if r.0 != first.0 {
                bail!(
                    "{} built a model with other parameter names or shapes than rank 0; every worker must run the same config and binary",
                    self.ranks[rank].describe(rank)
                );
            }
            if r.1 != first.1 {
                bail!(
                    "{} initialised different weights from rank 0 (seeded initialisation disagrees)",
                    self.ranks[rank].describe(rank)
                );
            }
        }
        if let Some(expected) = &self.spec.expected_weights_hash {
            let got = stride_job::config::hex(&first.1);
            if &got != expected {
                bail!(
                    "the ranks loaded weights with hash {got}, but the checkpoint recorded {expected}: the checkpoint changed after it was validated"
                );
            }
            tracing::info!("all {world} ranks loaded the checkpoint's weights (hash {got})");
        }
        tracing::info!(
            "all {world} ranks built the same model; training starts at step {}",
            self.step
        );
        Ok(())
    }

    async fn send(&self, rank: usize, body: coordinator_message::Body) -> Result<()> {
        self.ranks[rank]
            .outbound
            .send(Ok(message(body)))
            .await
            .map_err(|_| {
                anyhow!(
                    "{} lost at step {}: its session is closed",
                    self.ranks[rank].describe(rank),
                    self.step
                )
            })
    }

    /// The next message from a ranked worker, turning failures into errors
    /// that name the rank; `None` when a checkpoint report was handled. `what` says what the ranks are doing, for the
    /// timeout message.
    async fn next_rank_message(
        &mut self,
        patience: Patience,
        what: &str,
        waiting_for: &[usize],
    ) -> Result<Option<(usize, worker_message::Body)>> {
        let hb_every = Duration::from_secs_f64(self.spec.config.cluster.heartbeat_interval_s);
        let hb_timeout = Duration::from_secs_f64(self.spec.config.cluster.heartbeat_timeout_s);
        // How long a collective error waits for the rank that caused it to
        // be found: a dead one closes its stream at once, a frozen one
        // misses its heartbeats within heartbeat_timeout_s.
        let symptom_grace = hb_timeout + hb_every;
        // Silent ranks are looked for every heartbeat interval on a clock of
        // its own: messages from the live ranks (heartbeats every interval
        // from each) must not keep postponing the look at the silent one.
        let mut next_check = TokioInstant::now() + hb_every;
        loop {
            if TokioInstant::now() >= next_check {
                next_check = TokioInstant::now() + hb_every;
                if let Some(failure) = self.silent_rank(hb_timeout) {
                    return Err(failure.into());
                }
            }
            let deadline = self.deadline(patience, waiting_for);
            let mut wake = deadline.min(next_check);
            if let Some((since, _)) = &self.symptom {
                wake = wake.min(TokioInstant::from_std(*since + symptom_grace));
            }
            match self.next_event(wake).await? {
                Wait::TimedOut
                    if self
                        .symptom
                        .as_ref()
                        .is_some_and(|(since, _)| since.elapsed() >= symptom_grace) =>
                {
                    let message = self.symptom.take().map(|(_, m)| m).unwrap_or_default();
                    return Err(RankFailure {
                        worker_id: None,
                        message: format!(
                            "{message} — no rank was found dead or frozen within {:.0} s, so every rank is kept and the job restarts from its latest checkpoint",
                            symptom_grace.as_secs_f64()
                        ),
                        cause: "a collective failed, no rank lost".into(),
                    }
                    .into());
                }
                Wait::TimedOut if TokioInstant::now() >= self.deadline(patience, waiting_for) => {
                    return Err(self.timed_out(patience, what, waiting_for).into());
                }
                Wait::TimedOut => {}
                Wait::Event(Event::Interrupted(sig)) => return Err(Interrupted(sig).into()),
                Wait::Event(Event::Preempt) => self.preempt = true,
                Wait::Event(Event::Decay { over, shape, reply }) => {
                    self.take_decay_request(over, shape, reply)
                }
                Wait::Event(Event::Left { worker_id, reason }) => {
                    self.pool.retain(|p| p.0 != worker_id);
                    if let Some(&rank) = self.by_id.get(&worker_id) {
                        return Err(RankFailure {
                            message: format!(
                                "{} lost at step {}: {reason}",
                                self.ranks[rank].describe(rank),
                                self.step
                            ),
                            cause: format!("{} left", self.ranks[rank].info.identity),
                            worker_id: Some(worker_id),
                        }
                        .into());
                    }
                }
                Wait::Event(Event::Joined {
                    worker_id,
                    info,
                    outbound,
                }) => {
                    // A new worker with a rank's identity (Kubernetes
                    // restarted that index's pod) means that rank's
                    // process is gone, even before its stream says so.
                    if let Some(rank) = self
                        .ranks
                        .iter()
                        .position(|r| r.info.identity == info.identity)
                    {
                        let old = &self.ranks[rank];
                        let failure = RankFailure {
                            worker_id: Some(old.worker_id.clone()),
                            message: format!(
                                "{} lost at step {}: a new worker with its identity joined ({}, pid {}), so this one is gone (its pod was replaced)",
                                old.describe(rank),
                                self.step,
                                info.host,
                                info.pid
                            ),
                            cause: format!("{} replaced", info.identity),
                        };
                        self.last_seen.insert(worker_id.clone(), Instant::now());
                        self.pool.retain(|p| p.1.identity != info.identity);
                        self.pool.push((worker_id, info, outbound));
                        return Err(failure.into());
                    }
                    if self.ranks.len() + self.pool.len() < self.spec.config.cluster.max_workers {
                        tracing::info!(
                            "worker {} ({}, pid {}) joined as a spare; it takes part from the next restart",
                            info.identity,
                            info.host,
                            info.pid
                        );
                        self.last_seen.insert(worker_id.clone(), Instant::now());
                        self.pool.push((worker_id, info, outbound));
                        continue;
                    }
                    tracing::warn!(
                        "turned away worker {} ({}): the job is full",
                        info.identity,
                        info.host
                    );
                    stop_worker(&outbound, "the job already has all its workers", exit::DONE).await;
                }
                Wait::Event(Event::Message { worker_id, body }) => {
                    self.last_seen.insert(worker_id.clone(), Instant::now());
                    let Some(&rank) = self.by_id.get(&worker_id) else {
                        continue;
                    };
                    match body {
                        worker_message::Body::Error(e)
                            if e.generation == self.generation || e.fatal =>
                        {
                            let message = format!(
                                "{} failed at step {}: {}",
                                self.ranks[rank].describe(rank),
                                self.step,
                                e.message
                            );
                            if e.fatal {
                                bail!(message);
                            }
                            // A collective error is a symptom: the peer it
                            // names (or one further round the ring) died or
                            // froze. Keep this rank and wait for the cause.
                            if let Some(peer) = e.collective_peer {
                                tracing::info!(
                                    "{message} (a symptom: looking for the rank that failed, starting with rank {peer})"
                                );
                                self.symptom.get_or_insert((Instant::now(), message));
                                continue;
                            }
                            return Err(RankFailure {
                                worker_id: Some(worker_id),
                                message,
                                cause: format!(
                                    "{} failed: {}",
                                    self.ranks[rank].info.identity, e.message
                                ),
                            }
                            .into());
                        }
                        worker_message::Body::Heartbeat(h) => {
                            let now = Instant::now();
                            let entry = self.progress.entry(worker_id).or_insert((0, now));
                            if h.progress > entry.0 {
                                *entry = (h.progress, now);
                            }
                        }
                        worker_message::Body::Error(_) => {}
                        worker_message::Body::Checkpoint(r) => {
                            self.commit_checkpoint(rank, r)?;
                            return Ok(None);
                        }
                        other => return Ok(Some((rank, other))),
                    }
                }
            }
        }
    }

    /// Refuses a rank whose token splits differ from the coordinator's (a
    /// file of another length or content at the same path, another path):
    /// it would read other samples than the ones it is planned. A worker
    /// that reports no splits (the load test's simulated workers) is not
    /// checked; every real worker of this version reports them.
    fn check_data(&self, rank: usize, got: &[stride_proto::v1::DataSplit]) -> Result<()> {
        if got.is_empty() {
            return Ok(());
        }
        for want in &self.spec.data {
            let theirs = got.iter().find(|d| d.split == want.split);
            let same =
                theirs.is_some_and(|d| d.tokens == want.tokens && d.checksum == want.checksum);
            if !same {
                let theirs = theirs.map_or("no such split".to_string(), |d| {
                    format!(
                        "{}: {} tokens, checksum {:016x}",
                        d.name, d.tokens, d.checksum
                    )
                });
                bail!(
                    "{} reads other {} data than the coordinator: the worker's {theirs}; the coordinator's {}: {} tokens, checksum {:016x}. Every worker must read the same token files (a shared volume, the same data.train / data.val)",
                    self.ranks[rank].describe(rank),
                    want.split,
                    want.name,
                    want.tokens,
                    want.checksum
                );
            }
        }
        Ok(())
    }

    /// When `patience` runs out for the ranks in `waiting_for`.
    /// Keeps a decay request for the next step boundary (one at a time).
    fn take_decay_request(
        &mut self,
        over: u64,
        shape: Cooldown,
        reply: tokio::sync::oneshot::Sender<Result<DecayResponse, tonic::Status>>,
    ) {
        if self.decay_request.is_some() {
            let _ = reply.send(Err(tonic::Status::failed_precondition(
                "another decay request waits for the next step boundary",
            )));
            return;
        }
        self.decay_request = Some((over, shape, reply));
    }

    /// `coordinator decay`: from this step boundary S, a cooldown of
    /// `shape` to step S + `over`, which becomes the run's end — the
    /// segment `--resume --extend-steps S+over --decay shape` would append.
    /// Refused when it would end after the run's end (decay only shortens
    /// a run) or when a cooldown is already in force.
    fn apply_decay(&mut self, over: u64, shape: Cooldown) -> Result<DecayResponse, tonic::Status> {
        let s = self.step;
        let schedule = &self.spec.schedule;
        let old_max = schedule.max_steps();
        let end = s.saturating_add(over);
        if end > old_max {
            return Err(tonic::Status::failed_precondition(format!(
                "a cooldown over {over} steps from step {s} would end at step {end}, after the run's end at step {old_max}: decay only shortens a run (lengthen one with --resume … --extend-steps N --decay {})",
                shape.name()
            )));
        }
        if let Some(seg) = schedule.segment_at(s).filter(|seg| seg.is_cooldown()) {
            return Err(tonic::Status::failed_precondition(format!(
                "the job is already cooling down ({} from step {} to {}, lr {:.3e} → {:.3e}): a decay cannot start inside another",
                seg.kind.name(),
                seg.start_step,
                seg.end_step,
                seg.start_lr,
                seg.end_lr
            )));
        }
        let c = &self.spec.config.train;
        let floor = c.lr * c.min_lr_ratio;
        let new = schedule
            .extend(s, end, floor, shape)
            .map_err(|e| tonic::Status::failed_precondition(e.to_string()))?;
        let Some(seg) = new.segments.last().copied() else {
            return Err(tonic::Status::internal("the extended schedule is empty"));
        };
        let detail = format!(
            "decay requested: {} cooldown over steps {s}..{end} (lr {:.3e} → {:.3e}); max_steps {old_max} → {end}",
            shape.name(),
            seg.start_lr,
            seg.end_lr
        );
        tracing::warn!("{detail}");
        self.spec.schedule = new;
        self.spec.config.train.max_steps = end;
        self.spec.history.push(HistoryEvent {
            step: s,
            event: "decay".into(),
            detail: detail.clone(),
        });
        let line = serde_json::json!({
            "event": "decay",
            "step": s,
            "shape": shape.name(),
            "previous_max_steps": old_max,
            "max_steps": end,
            "start_lr": seg.start_lr,
            "end_lr": seg.end_lr,
        });
        if let Err(e) = self.run.write_line(&line) {
            tracing::warn!("cannot record the decay in metrics.jsonl: {e:#}");
        }
        if let Ok(mut st) = self.shared.status.lock() {
            st.max_steps = end;
            st.schedule = describe_segment(&self.spec.schedule, s, &self.spec.history);
        }
        Ok(DecayResponse {
            start_step: s,
            max_steps: end,
            start_lr: seg.start_lr,
            end_lr: seg.end_lr,
        })
    }

    /// The first rank silent for longer than `hb_timeout`, as a failure
    /// that names it.
    fn silent_rank(&self, hb_timeout: Duration) -> Option<RankFailure> {
        self.ranks.iter().enumerate().find_map(|(rank, r)| {
            let silent = self
                .last_seen
                .get(&r.worker_id)
                .map_or(Duration::ZERO, |t| t.elapsed());
            (silent > hb_timeout).then(|| RankFailure {
                worker_id: Some(r.worker_id.clone()),
                message: format!(
                    "{} lost at step {}: no heartbeat for {:.1}s (cluster.heartbeat_timeout_s = {}): frozen, overloaded or cut off",
                    r.describe(rank),
                    self.step,
                    silent.as_secs_f64(),
                    self.spec.config.cluster.heartbeat_timeout_s
                ),
                cause: format!("no heartbeat from {}", r.info.identity),
            })
        })
    }

    fn deadline(&self, patience: Patience, waiting_for: &[usize]) -> TokioInstant {
        match patience {
            Patience::Until(d) => d,
            Patience::Idle { since, limit } => {
                let last = waiting_for
                    .iter()
                    .filter_map(|&i| self.ranks.get(i))
                    .filter_map(|r| self.progress.get(&r.worker_id))
                    .filter(|(count, _)| *count > 0)
                    .map(|(_, at)| *at)
                    .fold(since, Instant::max);
                TokioInstant::from_std(last + limit)
            }
        }
    }

    /// The failure when `patience` ran out: who did not answer, when each
    /// was last heard (a rank blocked on a dead peer is heard, a frozen one
    /// not) and last made progress — and, when all of them are alive and
    /// heartbeating, that the work is slower than the timeout.
    fn timed_out(&self, patience: Patience, what: &str, waiting_for: &[usize]) -> RankFailure {
        let c = &self.spec.config;
        // A rank that heartbeats was heard within an interval or so; one
        // frozen since the wait began, about a whole timeout ago (the
        // timeout is at least two intervals).
        let alive_within = Duration::from_secs_f64(
            (c.cluster.step_timeout_s / 2.0).max(1.5 * c.cluster.heartbeat_interval_s),
        );
        let missing: Vec<(String, bool)> = waiting_for
            .iter()
            .filter_map(|&i| self.ranks.get(i).map(|r| (i, r)))
            .map(|(i, r)| {
                let seen = self.last_seen.get(&r.worker_id).map(Instant::elapsed);
                let heard = seen.map_or(String::new(), |t| {
                    format!(", last heard {:.1}s ago", t.as_secs_f64())
                });
                let progressed = match self.progress.get(&r.worker_id) {
                    Some((n, at)) if *n > 0 => format!(
                        ", last finished a micro-batch {:.1}s ago",
                        at.elapsed().as_secs_f64()
                    ),
                    _ => String::new(),
                };
                let alive = seen.is_some_and(|t| t <= alive_within);
                (format!("{}{heard}{progressed}", r.describe(i)), alive)
            })
            .collect();
        let names: Vec<&str> = missing.iter().map(|(m, _)| m.as_str()).collect();
        let mut message = format!(
            "timed out at step {} waiting for ranks {what} (not answered: {})",
            self.step,
            names.join("; ")
        );
        let all_alive = !missing.is_empty() && missing.iter().all(|(_, alive)| *alive);
        if let (Patience::Idle { limit, .. }, true) = (patience, all_alive) {
            message.push_str(&format!(
                ": every one of them is alive and heartbeating, but none finished a micro-batch ({} sequences of {} tokens) for {:.0} s. The work is slower than cluster.step_timeout_s = {} (or a rank's compute is stuck); if it is just slow, raise cluster.step_timeout_s",
                c.train.micro_batch,
                c.model.context,
                limit.as_secs_f64(),
                c.cluster.step_timeout_s
            ));
        }
        RankFailure {
            worker_id: None,
            message,
            cause: format!("timeout {what}, all alive: {all_alive}"),
        }
    }

    /// One reply from every rank: `pick` keeps the messages that answer
    /// (the right kind, generation and step). A timeout names the ranks
    /// that have not answered.
    async fn gather<T>(
        &mut self,
        patience: Patience,
        what: &str,
        mut pick: impl FnMut(u64, worker_message::Body) -> Option<T>,
    ) -> Result<Vec<T>> {
        let mut got: Vec<Option<T>> = (0..self.ranks.len()).map(|_| None).collect();
        while got.iter().any(Option::is_none) {
            let missing: Vec<usize> = got
                .iter()
                .enumerate()
                .filter(|(_, r)| r.is_none())
                .map(|(i, _)| i)
                .collect();
            let Some((rank, body)) = self.next_rank_message(patience, what, &missing).await? else {
                continue;
            };
            if let Some(v) = pick(self.generation, body) {
                got[rank] = Some(v);
            }
        }
        Ok(got.into_iter().flatten().collect())
    }

    async fn collect_step(&mut self, step: u64) -> Result<Vec<stride_proto::v1::StepReport>> {
        let limit = Duration::from_secs_f64(self.spec.config.cluster.step_timeout_s);
        self.gather(
            Patience::Idle {
                since: Instant::now(),
                limit,
            },
            "to report the step",
            |generation, body| match body {
                worker_message::Body::Step(r) if r.generation == generation && r.step == step => {
                    Some(r)
                }
                _ => None,
            },
        )
        .await
    }

    async fn evaluate(
        &mut self,
        step: u64,
        samples: &[u64],
        step_span: &tracing::Span,
    ) -> Result<f64> {
        let world = self.ranks.len();
        let span = tracing::info_span!(
            parent: step_span,
            "evaluation",
            step = step as i64,
            samples = samples.len() as i64,
            val_loss = tracing::field::Empty,
        );
        let trace_context = stride_telemetry::carrier(&span);
        for rank in 0..world {
            let plan = EvalPlan {
                generation: self.generation,
                step,
                samples: shard_uneven(samples, world, rank).to_vec(),
                trace_context: trace_context.clone(),
            };
            self.send(rank, coordinator_message::Body::Eval(plan))
                .await?;
        }
        let limit = Duration::from_secs_f64(self.spec.config.cluster.step_timeout_s);
        let got = self
            .gather(
                Patience::Idle {
                    since: Instant::now(),
                    limit,
                },
                "to finish evaluation",
                |generation, body| match body {
                    worker_message::Body::Eval(r)
                        if r.generation == generation && r.step == step =>
                    {
                        Some((r.loss_sum, r.tokens))
                    }
                    _ => None,
                },
            )
            .await?;
        let (sum, n) = got
            .into_iter()
            .fold((0.0, 0u64), |(s, n), (ls, t)| (s + ls, n + t));
        let val_loss = sum / n.max(1) as f64;
        span.record("val_loss", val_loss);
        Ok(val_loss)
    }

    /// Stops every rank at this step boundary for a checkpoint: rank 0
    /// copies its state and writes it in the background; the commit happens
    /// when it reports (see `commit_checkpoint`).
    async fn plan_checkpoint(
        &mut self,
        best: bool,
        cursor: DataCursor,
        step_span: &tracing::Span,
    ) -> Result<()> {
        let c = &self.spec.config;
        let folder = self.spec.checkpoint_dir.clone();
        let tag = format!("{}-g{}", std::process::id(), self.generation);
        let tmp = std::path::absolute(checkpoint::temp_dir(&folder, self.step, &tag)?)?;
        let state = TrainState {
            format_version: checkpoint::FORMAT_VERSION,
            stride_version: crate::server::VERSION.to_string(),
            step: self.step,
            max_steps: self.spec.schedule.max_steps(),
            schedule: self.spec.schedule.clone(),
            data_cursor: cursor,
            rng: RngState {
                seed: c.train.seed,
                algorithm: "ChaCha8 streams per (seed, purpose, epoch); no other randomness".into(),
            },
            world_size: self.ranks.len(),
            config_name: self.spec.name.clone(),
            config_hash: c.hash(),
            run_dir: self.spec.run_dir.clone(),
            weights_hash: stride_job::config::hex(&self.last_weights_hash),
            optimizer_step: self.step,
            metrics: self.spec.metrics_so_far.clone(),
            history: self.spec.history.clone(),
            files: BTreeMap::new(),
        };
        // Open until the commit, which may come several steps later.
        let span = tracing::info_span!(
            parent: step_span,
            "checkpoint",
            step = self.step as i64,
            best,
            dir = tracing::field::Empty,
        );
        let trace_context = stride_telemetry::carrier(&span);
        for rank in 0..self.ranks.len() {
            let plan = CheckpointPlan {
                generation: self.generation,
                step: self.step,
                tmp_dir: tmp.display().to_string(),
                write: rank == 0,
                trace_context: trace_context.clone(),
            };
            self.send(rank, coordinator_message::Body::Checkpoint(plan))
                .await?;
        }
        self.pending.insert(
            self.step,
            Pending {
                tmp,
                state,
                best,
                planned: Instant::now(),
                span,
            },
        );
        Ok(())
    }

    /// Rank 0 wrote its files: write the manifest and COMPLETE, rename into
    /// place, move the pointers, prune.
    fn commit_checkpoint(&mut self, rank: usize, r: CheckpointReport) -> Result<()> {
        if rank != 0 || r.generation != self.generation {
            return Ok(());
        }
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
        let folder = &self.spec.checkpoint_dir;
        let commit_span =
            tracing::info_span!(parent: &p.span, "checkpoint_commit", step = r.step as i64);
        let dir = commit_span.in_scope(|| {
            checkpoint::commit(&p.tmp, folder, p.state, &self.spec.config.to_toml())
        })?;
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
        let removed = checkpoint::prune(folder, self.spec.config.checkpoint.keep_last)?;
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

    /// Waits until every planned checkpoint is committed.
    async fn finish_checkpoints(&mut self) -> Result<()> {
        let limit = Duration::from_secs_f64(self.spec.config.checkpoint.write_timeout_s);
        let deadline = TokioInstant::now() + limit;
        let what = format!(
            "to finish writing checkpoints (checkpoint.write_timeout_s = {})",
            self.spec.config.checkpoint.write_timeout_s
        );
        while !self.pending.is_empty() {
            let Some((rank, body)) = self
                .next_rank_message(Patience::Until(deadline), &what, &[0])
                .await?
            else {
                continue;
            };
            tracing::debug!(
                "ignored a message of rank {rank} while finishing checkpoints: {body:?}"
            );
        }
        Ok(())
    }

    /// Publishes the state after a step: the `Status` RPC's answer and the
    /// Prometheus numbers.
    fn publish(&self, r: &MetricsRecord, tokens_per_step: u64, started: Instant, max_steps: u64) {
        let m = &self.shared.metrics;
        let as_i64 = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        m.step.set(as_i64(self.step));
        m.max_steps.set(as_i64(max_steps));
        m.loss.set(r.loss);
        if let Some(v) = r.val_loss {
            m.val_loss.set(v);
        }
        m.lr.set(r.lr);
        m.tokens_per_second.set(r.tokens_per_s);
        m.tokens.inc_by(tokens_per_step);
        m.step_seconds.observe(r.step_s);
        m.workers_connected
            .set(as_i64((self.ranks.len() + self.pool.len()) as u64));
        for (i, rank) in self.ranks.iter().enumerate() {
            m.rank_step_seconds
                .get_or_create(&crate::metrics::RankLabel { rank: i as u32 })
                .set(rank.last_step_s);
        }
        if let Ok(mut s) = self.shared.status.lock() {
            let done = self.step - self.spec.start_step;
            let per_step = started.elapsed().as_secs_f64() / done.max(1) as f64;
            s.config_name = self.spec.name.clone();
            s.step = self.step;
            s.max_steps = max_steps;
            s.lr = r.lr;
            s.last_loss = r.loss;
            s.last_val_loss = r
                .val_loss
                .or_else(|| self.spec.metrics_so_far.val_history.last().map(|(_, v)| *v))
                .unwrap_or(f64::NAN);
            s.restarts = self.restarts;
            s.last_checkpoint = self
                .committed
                .last()
                .map(|d| d.display().to_string())
                .unwrap_or_default();
            s.eta_s = per_step * (max_steps - self.step) as f64;
            s.schedule = describe_segment(&self.spec.schedule, self.step, &self.spec.history);
            s.workers_connected = (self.ranks.len() + self.pool.len()) as u32;
            s.world_size = self.ranks.len() as u32;
            s.ranks = self
                .ranks
                .iter()
                .enumerate()
                .map(|(i, r)| RankStatus {
                    rank: i as u32,
                    host: r.info.host.clone(),
                    pid: r.info.pid,
                    last_step: r.last_step,
                    step_s: r.last_step_s,
                })
                .collect();
        }
    }
}

fn message(body: coordinator_message::Body) -> CoordinatorMessage {
    CoordinatorMessage { body: Some(body) }
}

/// Short sha256 of a list of sample indices.
fn samples_digest(samples: &[u64]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for s in samples {
        h.update(s.to_le_bytes());
    }
    stride_job::config::hex(&h.finalize()[..8])
}

/// Sort key that orders "local-2" before "local-10".
fn natural_key(s: &str) -> (String, u64) {
    let digits = s.len() - s.trim_end_matches(|c: char| c.is_ascii_digit()).len();
    let (head, num) = s.split_at(s.len() - digits);
    (head.to_string(), num.parse().unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::natural_key;

    #[test]
    fn identities_sort_naturally() {
        let mut v = vec!["local-10", "local-2", "local-0", "pod"];
        v.sort_by_key(|s| natural_key(s));
        assert_eq!(v, vec!["local-0", "local-2", "local-10", "pod"]);
    }
}
