//! The worker set: the connected workers, which of them hold ranks, and
//! everything said with them — forming the set (joining, ranks, the
//! assignment, the collective's bootstrap id, the ready check), sending,
//! receiving, heartbeats, timeouts, and dismissing ranks after a failure.
//!
//! It reports what happened and decides nothing about the job: the answers
//! the driver waits for come back from [`WorkerSet::next`] and
//! [`WorkerSet::gather`]; whatever else arrives meanwhile (a checkpoint
//! report, a SIGTERM, a decay request) is handed to the driver's
//! [`Asides`]. It never commits a checkpoint. A lost, frozen or failing
//! rank becomes a [`RankFailure`](super::recovery::RankFailure) that names it (rank, host, pid, step).
//!
//! A resume's checkpoint files may still be being hashed
//! ([`WorkerSet::expect_check`]) while the set forms and the ranks load
//! them: every wait also watches for that verdict, a damaged checkpoint
//! ends the wait at once ([`DamagedStart`]), and
//! [`WorkerSet::settle_check`] holds the first step until it has come.
//!
//! Its parts: forming the set in `forming.rs`, waiting on the ranks
//! (messages, heartbeats, timeouts) in `waiting.rs`; this file keeps the
//! types, sending and dismissing.

mod forming;
mod waiting;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use stride_job::config::Config;
use stride_proto::exit;
use stride_proto::v1::{
    Abort, CheckpointReport, CoordinatorMessage, Shutdown, coordinator_message, worker_message,
};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::time::Instant as TokioInstant;

use stride_job::tokens::Fingerprint;

use super::decay::DecayRequest;
use super::recovery::Load;
use crate::local::{Exited, LocalWorkers};
use crate::resume_check::{self, Check};
use crate::server::{Event, Outbound, Shared, WorkerInfo};

/// Upper bound on the collective id rank 0 may send (NCCL's is 128 bytes).
const MAX_COLLECTIVE_ID_BYTES: usize = 1024;

/// A connected worker: its session id, what it registered, and its stream.
#[derive(Debug)]
pub struct Worker {
    pub id: String,
    pub info: WorkerInfo,
    pub outbound: Outbound,
}

impl Worker {
    /// Tells the worker to exit with `exit_code` (the worker exit-code
    /// contract, `stride_proto::exit`); a worker already gone needs no
    /// telling.
    async fn stop(&self, reason: &str, exit_code: i32) {
        let _ = self
            .outbound
            .send(Ok(message(coordinator_message::Body::Shutdown(Shutdown {
                reason: reason.into(),
                exit_code,
            }))))
            .await;
    }
}

/// A worker that holds a rank.
#[derive(Debug)]
pub struct Rank {
    pub worker: Worker,
    pub last_step: u64,
    pub last_step_s: f64,
}

impl Rank {
    pub fn describe(&self, rank: usize) -> String {
        format!(
            "rank {rank} ({}, pid {})",
            self.worker.info.host, self.worker.info.pid
        )
    }
}

/// Something that arrived while the driver waited for ranks, and that is
/// not one of the answers it waits for.
#[derive(Debug)]
pub enum Aside {
    /// A writer of the current generation (rank 0; every rank of a
    /// sharded job) wrote its checkpoint files.
    Checkpoint(CheckpointReport),
    /// A first SIGTERM: stop after the step in flight, with a checkpoint.
    Preempt,
    /// `coordinator decay`, for the next step boundary.
    Decay(DecayRequest),
}

/// The driver's side of [`Aside`]s.
pub trait Asides {
    fn take(&mut self, aside: Aside) -> Result<()>;
    /// Called whenever a wait wakes (a message, or the heartbeat interval
    /// at the latest): work the driver finishes on its own time (a
    /// sharded checkpoint hashed in the background, committed now).
    /// Whether it did something (the wait then returns to its caller).
    fn tick(&mut self) -> Result<bool> {
        Ok(false)
    }
}

/// How long the driver waits for ranks to answer.
#[derive(Debug, Clone, Copy)]
pub enum Patience {
    /// Until a fixed instant (forming the worker set, the last checkpoint
    /// writes).
    Until(TokioInstant),
    /// Until `limit` has passed without progress: since `since`, or since
    /// an awaited rank last finished a micro-batch (its heartbeats count
    /// them). Steps and evaluations: a long evaluation that progresses is
    /// never taken for a dead rank.
    Idle { since: Instant, limit: Duration },
}

/// What waiting for an event can produce besides an event.
enum Wait {
    Event(Event),
    TimedOut,
    /// The resume's checkpoint files checked out.
    Checked,
    /// A local worker process that held no rank exited.
    Exited(Exited),
}

/// Why the worker set forms, which says how long it waits for workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Occasion {
    /// The job's first formation: all `cluster.workers`, within
    /// `startup_timeout_s`.
    Start,
    /// After a failure: all `cluster.workers` if they come within
    /// `rejoin_timeout_s`, else as many as are present (at least
    /// `min_workers`, and a count the global batch divides among).
    Restart,
    /// A replacement joined a job running short: everyone present now,
    /// without waiting for more.
    Grow,
}

/// What forming a worker set needs from the job.
#[derive(Debug)]
pub struct Formation<'a> {
    /// The step training starts at (for messages and the trace).
    pub step: u64,
    pub occasion: Occasion,
    /// The resolved config every rank runs.
    pub config_toml: &'a str,
    /// The checkpoint every rank loads first.
    pub load: Option<&'a Load>,
    /// The fingerprints of the job's data: every rank must read the same.
    pub data: &'a [Fingerprint],
    pub job_span: &'a tracing::Span,
}

#[derive(Debug)]
pub struct WorkerSet {
    /// The job's config (the cluster section's sizes and timeouts).
    config: Config,
    events: UnboundedReceiver<Event>,
    shared: Arc<Shared>,
    local: Option<LocalWorkers>,
    ranks: Vec<Rank>,
    by_id: HashMap<String, usize>,
    /// Connected workers without a rank (survivors of a failure, newcomers).
    pool: Vec<Worker>,
    /// When each worker was last heard from.
    last_seen: HashMap<String, Instant>,
    /// Each worker's micro-batch count (from heartbeats) and when it last
    /// grew.
    progress: HashMap<String, (u64, Instant)>,
    /// A rank's collective failed with a peer (a symptom): when it came,
    /// and what to report if no rank is found dead or frozen in time.
    symptom: Option<(Instant, String)>,
    /// Ranks found with a closed session when sent to, and since when:
    /// their `Left` event is expected to follow.
    closed: HashMap<usize, Instant>,
    /// Bumped each time the set forms; messages of older ones are stale.
    generation: u64,
    /// A resume's checkpoint check still running (taken when it ends).
    check: Option<Check>,
    /// A spare joined while the set ran short of `cluster.workers`
    /// ([`WorkerSet::can_grow`]).
    grow: bool,
}

/// What a rank reports once it built its model.
#[derive(Debug)]
struct ReadyReport {
    layout_hash: Vec<u8>,
    weights_hash: Vec<u8>,
    data: Vec<stride_proto::v1::DataSplit>,
}

impl WorkerSet {
    pub fn new(
        config: Config,
        events: UnboundedReceiver<Event>,
        shared: Arc<Shared>,
        local: Option<LocalWorkers>,
    ) -> WorkerSet {
        WorkerSet {
            config,
            events,
            shared,
            local,
            ranks: Vec::new(),
            by_id: HashMap::new(),
            pool: Vec::new(),
            last_seen: HashMap::new(),
            progress: HashMap::new(),
            symptom: None,
            closed: HashMap::new(),
            generation: 0,
            check: None,
            grow: false,
        }
    }

    /// From now on every wait also watches `check`, the hashing of the
    /// checkpoint the ranks are about to load.
    pub fn expect_check(&mut self, check: Check) {
        self.check = Some(check);
    }

    /// Holds the first step until the checkpoint check has come (nothing
    /// to wait for without one). `formed`: whether the set formed; if not
    /// (a damaged file may fail to load), the verdict is awaited alone —
    /// events stay queued — because a damaged checkpoint, not the failure
    /// it caused, is what to report. Otherwise the ranks are watched
    /// (heartbeats, losses, asides) while it runs.
    pub async fn settle_check(
        &mut self,
        step: u64,
        formed: bool,
        asides: &mut impl Asides,
    ) -> Result<()> {
        let Some(check) = self.check.as_mut() else {
            return Ok(());
        };
        if !formed {
            let verdict = check.await;
            self.check = None;
            return resume_check::verdict(verdict);
        }
        tracing::info!(
            "the ranks are ready; the first step waits for the checkpoint's sha256 check"
        );
        // Hashing is bounded by reading the files, as the check before
        // the workers started was: no timeout of its own.
        let forever = Patience::Until(TokioInstant::now() + Duration::from_secs(365 * 86_400));
        while self.check.is_some() {
            self.next(step, forever, "to hear the checkpoint check", &[], asides)
                .await?;
        }
        Ok(())
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn ranks(&self) -> &[Rank] {
        &self.ranks
    }

    /// Workers connected, with or without a rank.
    pub fn connected(&self) -> usize {
        self.ranks.len() + self.pool.len()
    }

    /// `rank` finished `step` in `step_s` seconds (for status and metrics).
    pub fn record_step(&mut self, rank: usize, step: u64, step_s: f64) {
        if let Some(r) = self.ranks.get_mut(rank) {
            r.last_step = step;
            r.last_step_s = step_s;
        }
    }

    /// Sends `body` to `rank`. A closed session is not judged here: the
    /// rank's last messages (an error saying why it stopped) and then its
    /// `Left` event are still queued, and [`WorkerSet::next`] reads them in
    /// order, so the worker's own reason wins over the connection loss. If
    /// no `Left` follows within the heartbeat timeout, `next` reports the
    /// closed session itself.
    pub async fn send(&mut self, step: u64, rank: usize, body: coordinator_message::Body) {
        if self.ranks[rank]
            .worker
            .outbound
            .send(Ok(message(body)))
            .await
            .is_err()
        {
            tracing::debug!("rank {rank}'s session is closed at step {step}; reading why");
            self.closed.entry(rank).or_insert_with(Instant::now);
        }
    }

    /// Sends each rank its own message, `body(rank)`.
    pub async fn send_all(
        &mut self,
        step: u64,
        mut body: impl FnMut(usize) -> coordinator_message::Body,
    ) {
        for rank in 0..self.ranks.len() {
            self.send(step, rank, body(rank)).await;
        }
    }

    /// One reply from every rank: `pick` keeps the messages that answer
    /// (the right kind, generation and step). A timeout names the ranks
    /// that have not answered.
    pub async fn gather<T>(
        &mut self,
        step: u64,
        patience: Patience,
        what: &str,
        mut pick: impl FnMut(u64, worker_message::Body) -> Option<T>,
        asides: &mut impl Asides,
    ) -> Result<Vec<T>> {
        let mut got: Vec<Option<T>> = (0..self.ranks.len()).map(|_| None).collect();
        while got.iter().any(Option::is_none) {
            let missing: Vec<usize> = got
                .iter()
                .enumerate()
                .filter(|(_, r)| r.is_none())
                .map(|(i, _)| i)
                .collect();
            let Some((rank, body)) = self.next(step, patience, what, &missing, asides).await?
            else {
                continue;
            };
            if let Some(v) = pick(self.generation, body) {
                got[rank] = Some(v);
            }
        }
        Ok(got.into_iter().flatten().collect())
    }

    /// After a failure: stops the surviving ranks' step (Abort), tells the
    /// failed worker to leave (restarting it in --local mode), and keeps
    /// the survivors for the next formation.
    pub async fn dismiss(&mut self, failed: Option<&str>, reason: &str) -> Result<()> {
        let generation = self.generation;
        let ranks = std::mem::take(&mut self.ranks);
        self.by_id.clear();
        for r in ranks {
            let worker = r.worker;
            if failed == Some(worker.id.as_str()) {
                worker
                    .stop(
                        "removed from the job after a failure; a replacement may join",
                        exit::REMOVED,
                    )
                    .await;
                if let Some(slot) = worker
                    .info
                    .identity
                    .strip_prefix("local-")
                    .and_then(|s| s.parse().ok())
                    && let Some(local) = &mut self.local
                {
                    let pid = local.restart(slot).await?;
                    tracing::info!(
                        "restarted local worker {slot} (pid {} → pid {pid})",
                        worker.info.pid
                    );
                }
            } else {
                let abort = coordinator_message::Body::Abort(Abort {
                    generation,
                    reason: reason.to_string(),
                });
                let _ = worker.outbound.send(Ok(message(abort))).await;
                self.pool.push(worker);
            }
        }
        if let Some(id) = failed {
            self.pool.retain(|w| w.id != id);
        }
        self.symptom = None;
        self.closed.clear();
        Ok(())
    }

    /// The job is over: every connected worker is told to exit with
    /// `exit_code`, and local worker processes are reaped.
    pub async fn shut_down(&mut self, reason: &str, exit_code: i32) {
        for worker in self.ranks.iter().map(|r| &r.worker).chain(self.pool.iter()) {
            worker.stop(reason, exit_code).await;
        }
        if let Some(local) = &mut self.local {
            // Local workers got Shutdown; one still there after a
            // heartbeat timeout is not going to leave by itself. One that
            // joins meanwhile (a restarted worker registering as the job
            // failed) is told to stop too, instead of being waited for.
            let grace = Duration::from_secs_f64(self.config.cluster.heartbeat_timeout_s);
            let events = &mut self.events;
            let late_joiners = async {
                while let Some(event) = events.recv().await {
                    if let Event::Joined { outbound, .. } = event {
                        let shutdown = Shutdown {
                            reason: reason.into(),
                            exit_code,
                        };
                        let _ = outbound
                            .send(Ok(message(coordinator_message::Body::Shutdown(shutdown))))
                            .await;
                    }
                }
                std::future::pending::<()>().await
            };
            tokio::select! {
                () = local.stop(grace) => {}
                () = late_joiners => {}
            }
        }
    }
}

fn message(body: coordinator_message::Body) -> CoordinatorMessage {
    CoordinatorMessage { body: Some(body) }
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
