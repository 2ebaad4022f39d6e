//! The job driver: forms the worker set, then runs the training loop top to
//! bottom — for each step the LR from the schedule, the global batch from
//! the sampler, one plan per rank, the reports back, the metrics line,
//! evaluation and checkpoints when due.
//!
//! The driver alone advances the global step. It never sees a tensor: ranks
//! report scalars and hashes. Its parts live beside it:
//!
//! - `worker_set/` — the workers and everything said with them (forming,
//!   messages, gathering, heartbeats, timeouts, aborts). It reports what
//!   happened and decides nothing about the job.
//! - `checkpoints.rs` — planned, in-flight and committed checkpoints,
//!   pointers and pruning.
//! - `recovery.rs` — [`RestartPoint`] (where an attempt starts) and the
//!   restart rules after a [`RankFailure`].
//! - `decay.rs` — `coordinator decay`, applied at a step boundary.
//! - `job.rs` — what a job is (`JobSpec`) and what changes as it runs
//!   (`Course`), and how it ended (`Summary`).
//! - `stops.rs` — the ways an attempt stops short of its end (a signal,
//!   a preemption, a damaged start, a failed checkpoint, a regrow).
//!
//! Every failure it reports names the rank, its host and pid, and the step.
//!
//! Its length (~760 lines) is `run_attempt`, the training loop read top to
//! bottom in one function, and the handful of steps it calls.

mod checkpoints;
mod decay;
mod job;
mod recovery;
mod stops;
mod worker_set;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use indicatif::ProgressBar;
use stride_job::checkpoint::{self, HistoryEvent, MetricsSoFar, RngState, TrainState};
use stride_job::config::Config;
use stride_job::sampler::{DataCursor, Sampler, eval_samples, shard, shard_uneven};
use stride_job::schedule::Schedule;
use stride_job::test_hooks::{self, Hook};
use stride_proto::exit;
use stride_proto::v1::{
    CheckpointPlan, EvalPlan, RankStatus, StepPlan, coordinator_message, worker_message,
};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::time::Instant as TokioInstant;

use crate::local::LocalWorkers;
use crate::output::{MetricsRecord, RunDir, STEP_TARGET};
use crate::server::{Event, Shared};
use checkpoints::Checkpoints;
use decay::{DecayRequest, describe_segment};
pub use recovery::RestartPoint;
use recovery::Restarts;
use worker_set::{Aside, Asides, Formation, Occasion, Patience, WorkerSet};

use crate::resume_check::Replan;
pub use job::{Course, DataFile, FileStamp, JobSpec, Summary};
pub use stops::{
    CheckpointFailed, DamagedStart, Interrupted, PREEMPTED_EXIT, Preempted, PreemptedForming,
    Regrow,
};

/// What waits for the next step boundary, and the checkpoints in flight:
/// the driver's side of the worker set's [`Aside`]s.
#[derive(Debug)]
struct Boundary {
    checkpoints: Checkpoints,
    /// A first SIGTERM came: stop after the step in flight, with a
    /// checkpoint of it.
    preempt: bool,
    /// A `coordinator decay` request (one at a time).
    decay: Option<DecayRequest>,
}

impl Asides for Boundary {
    fn take(&mut self, aside: Aside) -> Result<()> {
        match aside {
            Aside::Checkpoint(report) => self.checkpoints.commit(report)?,
            Aside::Preempt => self.preempt = true,
            Aside::Decay(request) if self.decay.is_some() => {
                let _ = request.reply.send(Err(tonic::Status::failed_precondition(
                    "another decay request waits for the next step boundary",
                )));
            }
            Aside::Decay(request) => self.decay = Some(request),
        }
        Ok(())
    }

    fn tick(&mut self) -> Result<bool> {
        self.checkpoints.commit_hashed()
    }
}

#[derive(Debug)]
pub struct Driver {
    spec: JobSpec,
    course: Course,
    workers: WorkerSet,
    boundary: Boundary,
    shared: Arc<Shared>,
    run: RunDir,
    bar: Option<ProgressBar>,
    /// The global step: the next one to run.
    step: u64,
    /// The metrics so far, as the next checkpoint records them.
    metrics: MetricsSoFar,
    last_weights_hash: Vec<u8>,
    /// The step boundary `last_weights_hash` is of.
    last_weights_step: Option<u64>,
    restarts: Restarts,
    /// Root of the job's trace; steps, formations and restarts link to it.
    job_span: tracing::Span,
    /// Where to start instead if the resume's checkpoint check fails.
    fallback: Option<Replan>,
    /// Why the next formation happens (how long it waits for workers).
    occasion: Occasion,
}

impl Driver {
    pub fn new(
        spec: JobSpec,
        mut course: Course,
        events: UnboundedReceiver<Event>,
        shared: Arc<Shared>,
        local: Option<LocalWorkers>,
        run: RunDir,
        bar: Option<ProgressBar>,
    ) -> Driver {
        let job_span = tracing::info_span!(
            parent: None,
            "job",
            job = %spec.name,
            start_step = course.start.step as i64,
            max_steps = course.schedule.max_steps() as i64,
            workers = course.config.cluster.workers as i64,
        );
        let c = &course.config;
        let checkpoints = Checkpoints::new(
            spec.checkpoint_dir.clone(),
            c.checkpoint.keep_last,
            shared.clone(),
        );
        let mut workers = WorkerSet::new(c.clone(), events, shared.clone(), local);
        let fallback = course.check.take().and_then(|c| {
            workers.expect_check(c.check);
            c.fallback
        });
        Driver {
            workers,
            fallback,
            boundary: Boundary {
                checkpoints,
                preempt: false,
                decay: None,
            },
            shared,
            run,
            bar,
            step: course.start.step,
            metrics: course.start.metrics.clone(),
            last_weights_hash: Vec::new(),
            last_weights_step: None,
            restarts: Restarts::new(course.start.clone()),
            job_span,
            spec,
            course,
            occasion: Occasion::Start,
        }
    }

    /// Runs the job to its end. Whatever happens, the workers are told to
    /// stop and local worker processes are reaped before this returns.
    pub async fn run(&mut self) -> Result<Summary> {
        // A test watching the health service notice a stalled loop.
        if let Some(s) = test_hooks::seconds(Hook::StallDriverS) {
            tokio::time::sleep(Duration::from_secs_f64(s)).await;
        }
        let result = self.run_with_restarts().await;
        let in_flight = self.boundary.checkpoints.in_flight();
        if result.is_err() && in_flight > 0 {
            // Stopped (a second SIGTERM, a failure) while a checkpoint was
            // being written: let it finish, within checkpoint.write_timeout_s.
            tracing::info!("finishing {in_flight} checkpoint(s) in flight before stopping");
            if let Err(e) = self.finish_checkpoints().await {
                tracing::warn!(
                    "a checkpoint in flight was not committed ({e:#}); it is left incomplete and will never be loaded"
                );
            }
        }
        // The worker exit-code contract (README, "Exit codes"): 0 done;
        // 3 stopped by a signal to the coordinator (a replacement may join
        // the coordinator that is started again); 4 the job failed
        // (Kubernetes must not retry: the pod failure policy fails the Job).
        let (reason, code) = match &result {
            Ok(_) => ("training finished".to_string(), exit::DONE),
            Err(e) if e.chain().any(|c| c.is::<CheckpointFailed>()) => {
                // The environment failed, not the job's input: a restarted
                // coordinator (`--resume …/latest`) takes the workers back.
                (format!("the coordinator stopped: {e:#}"), exit::REMOVED)
            }
            Err(e)
                if e.chain()
                    .any(|c| c.is::<Interrupted>() || c.is::<Preempted>()) =>
            {
                (format!("the coordinator stopped: {e:#}"), exit::REMOVED)
            }
            Err(e) => (format!("the job failed: {e:#}"), exit::JOB_FAILED),
        };
        self.workers.shut_down(&reason, code).await;
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        result
    }

    /// One attempt: form the worker set at the restart point, then train
    /// step by step to the schedule's end.
    async fn run_attempt(&mut self) -> Result<Summary> {
        let c = self.course.config.clone();
        self.metrics = self.course.start.metrics.clone();
        let config_toml = c.to_toml();
        let formation = Formation {
            step: self.step,
            occasion: self.occasion,
            config_toml: &config_toml,
            load: self.course.start.load.as_ref(),
            data: &self.spec.data,
            job_span: &self.job_span,
        };
        let formed = self.workers.form(formation, &mut self.boundary).await;
        self.workers
            .settle_check(self.step, formed.is_ok(), &mut self.boundary)
            .await?;
        if let Err(e) = formed {
            if e.is::<PreemptedForming>() {
                return Err(self.stop_preempted_forming());
            }
            return Err(e);
        }
        if let Some(marker) = self.course.marker.take() {
            self.run.write_line(&marker)?;
        }
        let world = self.workers.ranks().len();
        let accumulation = c.accumulation_for(world)?;
        tracing::info!(
            "{} workers: global batch {} = {} × micro-batch {} × accumulation {}",
            world,
            c.train.global_batch,
            world,
            c.train.micro_batch,
            accumulation
        );

        let mut sampler = Sampler::new(
            self.spec.train_samples,
            c.train.seed,
            self.course.start.cursor,
        )?;
        let eval_set = eval_samples(
            self.spec.val_samples,
            c.train.eval_batches,
            c.train.global_batch,
        );
        let mut max_steps = self.course.schedule.max_steps();
        let tokens_per_step = (c.train.global_batch * c.model.context) as u64;
        let started = Instant::now();
        let mut tokens = self.metrics.tokens;
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
            if self.boundary.decay.is_some() {
                self.answer_decay();
                max_steps = self.course.schedule.max_steps();
                if let Some(bar) = &self.bar {
                    bar.set_length(max_steps);
                }
            }
            let step = self.step;
            let lr = self.course.schedule.lr_at(step);
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
                generation = self.workers.generation() as i64,
                world_size = world as i64,
                loss = tracing::field::Empty,
                grad_norm = tracing::field::Empty,
                val_loss = tracing::field::Empty,
            );
            span.follows_from(&self.job_span);
            let trace_context = stride_telemetry::carrier(&span);
            let generation = self.workers.generation();
            // The ranks-agree check: every `weights_check_interval` steps and
            // at the end (checkpoints get rank 0's hash with their files).
            let hash_weights =
                (step + 1).is_multiple_of(c.worker.weights_check_interval) || step + 1 == max_steps;
            self.workers
                .send_all(step, |rank| {
                    coordinator_message::Body::Step(StepPlan {
                        generation,
                        step,
                        lr,
                        samples: shard(&batch.samples, world, rank).to_vec(),
                        epoch: batch.epoch,
                        trace_context: trace_context.clone(),
                        hash_weights,
                    })
                })
                .await;
            let reports = self.collect_step(step).await?;
            let step_s = step_start.elapsed().as_secs_f64();
            tokens += tokens_per_step;

            let first_hash = &reports[0].weights_hash;
            if hash_weights == first_hash.is_empty() {
                bail!(
                    "rank 0 {} its weights' hash after step {step} although the plan {} it: are all workers the same Stride build?",
                    if hash_weights {
                        "did not report"
                    } else {
                        "reported"
                    },
                    if hash_weights {
                        "asked for"
                    } else {
                        "did not ask for"
                    }
                );
            }
            if let Some(bad) = reports.iter().position(|r| &r.weights_hash != first_hash) {
                bail!(
                    "{} holds different weights from rank 0 after step {step}: data parallelism is broken (different binaries or hardware?)",
                    self.workers.ranks()[bad].describe(bad)
                );
            }
            let loss = reports.iter().map(|r| r.loss).sum::<f64>() / world as f64;
            let grad_norm = reports[0].grad_norm;
            span.record("loss", loss);
            span.record("grad_norm", grad_norm);
            for (rank, rep) in reports.iter().enumerate() {
                self.workers.record_step(rank, step, rep.total_s);
            }
            self.step = step + 1;

            // After a SIGTERM only the final evaluation still runs: the
            // grace period is for the checkpoint.
            let due = c.train.eval_interval > 0
                && self.step.is_multiple_of(c.train.eval_interval)
                && !self.boundary.preempt;
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
                weights_hash: stride_job::names::hex(first_hash),
                samples_digest: samples_digest(&batch.samples),
                host_device_bytes: reports[0].host_device_bytes,
                comm_exposed_s: reports.iter().map(|r| r.exposed_comm_s).fold(0.0, f64::max),
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
            if hash_weights {
                self.last_weights_hash = first_hash.clone();
                self.last_weights_step = Some(self.step);
            }
            let improved = self.metrics.record(step, loss, val_loss, tokens);
            let interval = c.checkpoint.interval;
            let preempted = self.boundary.preempt && self.step < max_steps;
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
            hold_for_tests(step).await;
            last.final_loss = loss;
            if preempted {
                return Err(self.stop_preempted().await?.into());
            }
            if self.step < max_steps && self.workers.can_grow() {
                return Err(self.grow(sampler.cursor(), &span).await?.into());
            }
        }
        self.finish_checkpoints().await?;
        last.steps = self.step - self.course.start.step;
        last.tokens = tokens - run_start_tokens;
        last.wall_s = started.elapsed().as_secs_f64();
        Ok(last)
    }

    /// After a SIGTERM: the checkpoint of the step just finished is
    /// committed, and the job stops with [`Preempted`].
    async fn stop_preempted(&mut self) -> Result<Preempted> {
        self.finish_checkpoints().await?;
        let dir = self
            .boundary
            .checkpoints
            .last_committed()
            .map(|d| d.display().to_string())
            .unwrap_or_default();
        self.record_preempted(Some(dir))
    }

    /// A SIGTERM while the worker set formed: no step ran since the
    /// checkpoint the attempt starts from, which is the one to resume.
    fn stop_preempted_forming(&mut self) -> anyhow::Error {
        let dir = self
            .course
            .start
            .load
            .as_ref()
            .filter(|l| !l.weights_only)
            .map(|l| l.dir.display().to_string());
        match self.record_preempted(dir) {
            Ok(p) => p.into(),
            Err(e) => e,
        }
    }

    /// The `preempted` history event and metrics line.
    fn record_preempted(&mut self, dir: Option<String>) -> Result<Preempted> {
        let shown = dir.clone().unwrap_or_default();
        self.course.history.push(HistoryEvent {
            step: self.step,
            event: "preempted".into(),
            detail: format!("SIGTERM; checkpoint {shown}"),
        });
        self.run.write_line(&serde_json::json!({
            "event": "preempted",
            "step": self.step,
            "checkpoint": shown,
        }))?;
        Ok(Preempted {
            step: self.step,
            dir,
        })
    }

    /// A replacement joined while the job ran short of workers: checkpoint
    /// the step just finished (unless that was done), commit it, and
    /// return [`Regrow`] — the next attempt forms the set from it with
    /// everyone present. Not a restart: nothing failed.
    async fn grow(&mut self, cursor: DataCursor, span: &tracing::Span) -> Result<Regrow> {
        let planned = self.boundary.checkpoints.is_planned(self.step)
            || self
                .boundary
                .checkpoints
                .last_committed_step()
                .is_some_and(|s| s == self.step);
        if !planned {
            self.plan_checkpoint(false, cursor, span).await?;
        }
        self.finish_checkpoints().await?;
        Ok(Regrow)
    }

    /// Every rank's report of `step`.
    async fn collect_step(&mut self, step: u64) -> Result<Vec<stride_proto::v1::StepReport>> {
        let limit = Duration::from_secs_f64(self.course.config.cluster.step_timeout_s);
        self.workers
            .gather(
                self.step,
                Patience::Idle {
                    since: Instant::now(),
                    limit,
                },
                "to report the step",
                |generation, body| match body {
                    worker_message::Body::Step(r)
                        if r.generation == generation && r.step == step =>
                    {
                        Some(r)
                    }
                    _ => None,
                },
                &mut self.boundary,
            )
            .await
    }

    /// The validation loss after `step`: `samples` shared among the ranks,
    /// the token-weighted mean of their sums.
    async fn evaluate(
        &mut self,
        step: u64,
        samples: &[u64],
        step_span: &tracing::Span,
    ) -> Result<f64> {
        let world = self.workers.ranks().len();
        let span = tracing::info_span!(
            parent: step_span,
            "evaluation",
            step = step as i64,
            samples = samples.len() as i64,
            val_loss = tracing::field::Empty,
        );
        let trace_context = stride_telemetry::carrier(&span);
        let generation = self.workers.generation();
        self.workers
            .send_all(self.step, |rank| {
                coordinator_message::Body::Eval(EvalPlan {
                    generation,
                    step,
                    samples: shard_uneven(samples, world, rank).to_vec(),
                    trace_context: trace_context.clone(),
                })
            })
            .await;
        let limit = Duration::from_secs_f64(self.course.config.cluster.step_timeout_s);
        let got = self
            .workers
            .gather(
                self.step,
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
                &mut self.boundary,
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
    /// copies its state and writes it in the background — or, in a job
    /// that shards its optimizer state, every rank its shard's part of the
    /// files (rank 0 hashing the weights when no step has) — and the
    /// commit happens when all have reported (`Checkpoints::commit`).
    async fn plan_checkpoint(
        &mut self,
        best: bool,
        cursor: DataCursor,
        step_span: &tracing::Span,
    ) -> Result<()> {
        let c = &self.course.config;
        let generation = self.workers.generation();
        let state = TrainState {
            format_version: checkpoint::FORMAT_VERSION,
            stride_version: crate::server::VERSION.to_string(),
            step: self.step,
            max_steps: self.course.schedule.max_steps(),
            schedule: self.course.schedule.clone(),
            data_cursor: cursor,
            rng: RngState {
                seed: c.train.seed,
                algorithm: "ChaCha8 streams per (seed, purpose, epoch); no other randomness".into(),
            },
            world_size: self.workers.ranks().len(),
            config_name: self.spec.name.clone(),
            config_hash: c.hash(),
            run_dir: self.spec.run_dir.clone(),
            weights_hash: stride_job::names::hex(&self.last_weights_hash),
            optimizer_step: self.step,
            metrics: self.metrics.clone(),
            history: self.course.history.clone(),
            data: self.spec.data.clone(),
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
        let tag = format!("{}-g{generation}", std::process::id());
        let world = self.workers.ranks().len();
        let sharded = c.shards_optimizer(world);
        let tmp = self.boundary.checkpoints.plan(
            state,
            checkpoint_config(c, &self.course.schedule),
            best,
            &tag,
            span,
            if sharded { world } else { 1 },
        )?;
        let step = self.step;
        let hash_weights = sharded && self.last_weights_step != Some(step);
        self.workers
            .send_all(step, |rank| {
                coordinator_message::Body::Checkpoint(CheckpointPlan {
                    generation,
                    step,
                    tmp_dir: tmp.display().to_string(),
                    write: rank == 0 || sharded,
                    trace_context: trace_context.clone(),
                    hash_weights: hash_weights && rank == 0,
                })
            })
            .await;
        Ok(())
    }

    /// Waits until every planned checkpoint is committed, within
    /// `checkpoint.write_timeout_s`.
    async fn finish_checkpoints(&mut self) -> Result<()> {
        let limit = Duration::from_secs_f64(self.course.config.checkpoint.write_timeout_s);
        let deadline = TokioInstant::now() + limit;
        let what = format!(
            "to finish writing checkpoints (checkpoint.write_timeout_s = {})",
            self.course.config.checkpoint.write_timeout_s
        );
        while self.boundary.checkpoints.in_flight() > 0 {
            let Some((rank, body)) = self
                .workers
                .next(
                    self.step,
                    Patience::Until(deadline),
                    &what,
                    &[0],
                    &mut self.boundary,
                )
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
        let ranks = self.workers.ranks();
        let connected = self.workers.connected();
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
        m.workers_connected.set(as_i64(connected as u64));
        for (i, rank) in ranks.iter().enumerate() {
            m.rank_step_seconds
                .get_or_create(&crate::metrics::RankLabel { rank: i as u32 })
                .set(rank.last_step_s);
        }
        if let Ok(mut s) = self.shared.status.lock() {
            let done = self.step - self.course.start.step;
            let per_step = started.elapsed().as_secs_f64() / done.max(1) as f64;
            s.config_name = self.spec.name.clone();
            s.step = self.step;
            s.max_steps = max_steps;
            s.lr = r.lr;
            s.last_loss = r.loss;
            s.last_val_loss = r
                .val_loss
                .or_else(|| self.metrics.val_history.last().map(|(_, v)| *v))
                .unwrap_or(f64::NAN);
            s.restarts = self.restarts.count;
            s.last_checkpoint = self
                .boundary
                .checkpoints
                .last_committed()
                .map(|d| d.display().to_string())
                .unwrap_or_default();
            s.eta_s = per_step * (max_steps - self.step) as f64;
            s.schedule = describe_segment(&self.course.schedule, self.step, &self.course.history);
            s.workers_connected = connected as u32;
            s.world_size = ranks.len() as u32;
            s.ranks = ranks
                .iter()
                .enumerate()
                .map(|(i, r)| RankStatus {
                    rank: i as u32,
                    host: r.worker.info.host.clone(),
                    pid: r.worker.info.pid,
                    last_step: r.last_step,
                    step_s: r.last_step_s,
                })
                .collect();
        }
    }
}

/// Short sha256 of a list of sample indices.
/// [`Hook::HoldAfterStep`]: a test looks at a job mid-run (its metrics,
/// `/metrics`) however fast the machine trains it.
async fn hold_for_tests(step: u64) {
    let Some((at, release)) = test_hooks::hold_after_step() else {
        return;
    };
    if at != step {
        return;
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    while !release.exists() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A checkpoint's `config.toml`: the job's config, with a first line that
/// says where the run's length lives (a reader of an extended run's
/// checkpoint would otherwise take `train.max_steps` for it).
fn checkpoint_config(c: &Config, schedule: &Schedule) -> String {
    format!(
        "# train.max_steps only seeds a fresh run's LR schedule; this run's\n\
         # schedule (train_state.json) ends at step {}.\n{}",
        schedule.max_steps(),
        c.to_toml()
    )
}

fn samples_digest(samples: &[u64]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for s in samples {
        h.update(s.to_le_bytes());
    }
    stride_job::names::hex(&h.finalize()[..8])
}
